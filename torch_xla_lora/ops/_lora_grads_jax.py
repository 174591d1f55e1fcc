"""JAX functions behind ``xla_lora::bgmv_lora_grads``: a LoRA projection's whole backward in one op.

Imported lazily by the op (JAX must start after torch_xla on a TPU host). For
``y = base + (scaling * x A[i_t]^T) @ B[i_t]`` and the output gradient ``g``:
``s = scaling * x A^T`` (kept from the forward when the layer ran ``bgmv_shrink_expand_train``,
else recomputed),
``ds = g B^T``, ``dB = s^T g`` and ``dA = scaling * ds^T x`` per slot, and,
when asked, the LoRA's input gradient ``dx = scaling * ds A``.

- "pallas": ds and dB in one pass over g (``kernels.weight_grad.shrink_weight_grad``),
  s by the shrink kernel, dA by the weight-gradient kernel, dx by the expand
  kernel; the separate shrink and weight-gradient kernels where every slot's
  dB tile does not fit VMEM.
- "xla": the tokens are sorted by slot once and every product runs on the
  sorted rows, whose token blocks then almost all hold one slot: the two
  shrinks, dx's expand and the two segmented outer products share one sort
  and one gather of x and of g, where the separate ops sort (or lane) the
  batch five times.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from torch_xla_lora.kernels import block_sizes, weight_grad
from torch_xla_lora.ops import _xla_native
from torch_xla_lora.ops._jax import (
    _CACHE_SIZE,
    _in_range,
    _pad_rows,
    _padded_indices,
    expand_fn,
    shrink_fn,
    weight_grad_fn,
)

#: Token block of the XLA-native formulation's sorted rows: between these, about T / 32 (fewer, larger
#: blocks keep XLA:CPU's products efficient; the per-block partial sums of dA and dB stay at most 32).
MIN_SORTED_BLOCK, MAX_SORTED_BLOCK = 64, 256


def sorted_block_tokens(num_tokens: int) -> int:
    """Token block of the XLA-native formulation: a power of two, about T / 32, in [64, 256]; the batch
    rounded up to a multiple of 8 when it is smaller than 64 tokens."""
    if num_tokens < MIN_SORTED_BLOCK:
        return max(8, -(-num_tokens // 8) * 8)
    wanted = -(-num_tokens // 32)
    return min(MAX_SORTED_BLOCK, max(MIN_SORTED_BLOCK, 1 << max(wanted - 1, 0).bit_length()))


def _outer_sum(mask, lhs, rhs, rhs_selected: bool = False):
    """[..., tokens, P] x [..., tokens, Q] -> [..., P, Q] f32 over the tokens of ``mask`` (selected, not masked;
    ``rhs_selected``: ``rhs`` is zero outside ``mask`` already)."""
    return jnp.einsum(
        "...tp,...tq->...pq",
        _xla_native._select(mask, lhs, 0),
        rhs if rhs_selected else _xla_native._select(mask, rhs, 0),
        preferred_element_type=jnp.float32,
    )


#: Up to this many slots the blocks' partial weight gradients are summed per slot by selection (each slot's
#: sum reads them all: L passes); beyond, by a scatter-add (one pass), which XLA:CPU ran 1.8 times slower
#: in the backward of a 2048 x 5632 projection at L = 8, T = 512 (51 against 29 ms).
SELECT_SUM_MAX_SLOTS = 16


def _sum_by_slot(partial, primary, num_slots: int):
    """[L, P, Q]: each slot's sum of the blocks' partial sums [blocks, P, Q] whose ``primary`` is that slot (-1:
    none); an Inf in one slot's partial sum reaches no other slot (selected, or scattered)."""
    if num_slots > SELECT_SUM_MAX_SLOTS:
        target = jnp.where(primary >= 0, primary, num_slots)  # no slot: dropped (not -1, which would wrap)
        return jnp.zeros((num_slots, *partial.shape[1:]), jnp.float32).at[target].add(partial, mode="drop")
    return jnp.stack([jnp.where((primary == slot)[:, None, None], partial, 0).sum(0) for slot in range(num_slots)])


class _Sorted(NamedTuple):
    """A batch's rows grouped by slot for the XLA-native formulation (see :func:`_sorted`)."""

    block: int  # token block of the sorted rows
    padded: int  # rows, padded to whole blocks
    order: jax.Array  # [padded] the rows' stable order by slot, rows without adapter last
    indices: jax.Array  # [padded] the sorted rows' slots
    plan: _xla_native._Plan  # their visits, read off the runs (no second sort)

    def rows(self, array: jax.Array) -> jax.Array:
        """``array`` [T, W] padded to whole blocks, its rows in the sorted order."""
        return _pad_rows(array, self.padded)[self.order]

    def unsort(self, array: jax.Array, num_tokens: int) -> jax.Array:
        """Sorted rows [padded, W] back to token order, the first ``num_tokens``."""
        inverse = jnp.zeros_like(self.order).at[self.order].set(jnp.arange(self.padded, dtype=self.order.dtype))
        return array[inverse][:num_tokens]


def _sorted(indices, num_slots: int, num_tokens: int) -> _Sorted:
    """One stable sort of the tokens by slot (a [T] int32 argsort: cheap beside the products)."""
    block = sorted_block_tokens(num_tokens)
    padded = -(-num_tokens // block) * block
    idx = _padded_indices(indices, num_slots, padded)
    order = _xla_native.sort_order(idx)
    sorted_idx = idx[order]
    return _Sorted(block, padded, order, sorted_idx, _xla_native._sorted_plan(sorted_idx, block))


def _primary_shrink(rows, weights, grouped: _Sorted, scaling: float):
    """[padded, R] f32: each sorted row's product with its block's first slot's ``weights`` [L, R, W] (zero for
    the rows of the block's other slots, which the extra visits add)."""
    blocks = rows.reshape(-1, grouped.block, rows.shape[1])
    y = _xla_native._shrink_rows(blocks, weights[jnp.maximum(grouped.plan.primary, 0)], scaling)
    mask = _xla_native._primary_mask(grouped.indices, grouped.plan, grouped.block)
    return _xla_native._select(mask, y, 0.0).reshape(rows.shape[0], -1)


def _primary_expand(rows, weights, grouped: _Sorted):
    """[padded, W] f32: each sorted row [R] times its block's first slot's ``weights`` [L, R, W] (zero for the
    rows of the block's other slots)."""
    blocks = rows.reshape(-1, grouped.block, rows.shape[1])
    primary = weights[jnp.maximum(grouped.plan.primary, 0)]
    y = jnp.einsum("btr,brw->btw", blocks, primary, preferred_element_type=jnp.float32)
    mask = _xla_native._primary_mask(grouped.indices, grouped.plan, grouped.block)
    return _xla_native._select(mask, y, 0.0).reshape(rows.shape[0], -1)


def _primary_rows(rows, grouped: _Sorted):
    """Sorted ``rows`` [padded, W] with every row not on its block's first slot selected to zero."""
    mask = _xla_native._primary_mask(grouped.indices, grouped.plan, grouped.block).reshape(-1)
    return _xla_native._select(mask, rows, 0)


def _primary_weight_grad(lhs, rhs, grouped: _Sorted, num_slots: int):
    """[L, P, Q] f32: each slot's outer products over the rows of the blocks it is the first slot of; ``rhs``
    from :func:`_primary_rows` (selected once, where it is read twice)."""
    blocks = grouped.padded // grouped.block
    partial = _outer_sum(
        _xla_native._primary_mask(grouped.indices, grouped.plan, grouped.block),
        lhs.reshape(blocks, grouped.block, -1),
        rhs.reshape(blocks, grouped.block, -1),
        rhs_selected=True,
    )
    return _sum_by_slot(partial, grouped.plan.primary, num_slots)


def _extra_visits(grouped: _Sorted, body, carry):
    """``carry = body(rows, mask, slot, block, carry)`` for every extra visit (a run of rows starting inside a
    block): ``rows(array)`` gives the visited block's rows of an array in *token* order (gathered there by the
    sorted order), ``mask`` [block] those of them on ``slot``.

    One loop per op, after the batched products, and reading the inputs as given rather than their sorted
    copies: XLA:CPU ran the op about 40% slower (2048 x 5632 projection, T = 512: the backward 45 ms against
    27, the forward 18 against 13) when a loop body read the sorted copies, even where it ran no visit."""
    plan, block_tokens = grouped.plan, grouped.block

    def step(v, carry):
        block, slot = plan.extra_block[v], plan.extra_slot[v]
        order = _xla_native._rows(grouped.order, block, block_tokens)

        def rows(array):  # rows past the batch (its padding) are clipped, and masked: no slot there
            return jnp.take(array, order, axis=0, mode="clip")

        mask = _xla_native._mask(_xla_native._rows(grouped.indices, block, block_tokens), slot)
        return body(rows, mask, jnp.maximum(slot, 0), block, carry)

    return lax.fori_loop(0, plan.num_extra, step, carry)


def _add_rows(acc, block, block_tokens, mask, value):
    """``acc`` [padded, W] with ``value`` [block, W] added to the masked rows of ``block`` (selected)."""
    rows = _xla_native._rows(acc, block, block_tokens)
    update = _xla_native._select(mask, rows + value, rows)
    return lax.dynamic_update_slice_in_dim(acc, update, block * block_tokens, 0)


def _add_slot(acc, slot, value):
    """``acc`` [L, P, Q] with ``value`` [P, Q] added to ``slot``."""
    current = lax.dynamic_slice_in_dim(acc, slot, 1)
    return lax.dynamic_update_slice_in_dim(acc, current + value[None], slot, 0)


def xla_forward(x, lora_a, lora_b, base, indices, *, scaling: float):
    """(out, s) of ``base + (scaling * x A[i_t]^T) @ B[i_t]`` on the rows sorted by slot: the training
    forward that keeps ``s`` ([T, R], B's dtype, zero for rows without adapter) for the backward.

    On sorted rows almost every token block holds one slot, so the shrink and the expand each cost about
    one block-sized product per block (the serving forward's direct pass on rows as given pays a second
    product for each block whose rows change slot inside it): the blocks' first slots in one batched
    product each, then the runs starting inside a block in one loop (:func:`_extra_visits`)."""
    num_tokens = x.shape[0]
    grouped = _sorted(indices, lora_a.shape[0], num_tokens)
    xs = grouped.rows(x)
    s = _primary_shrink(xs, lora_a, grouped, scaling)
    delta = _primary_expand(s.astype(lora_b.dtype), lora_b, grouped)

    def visit(rows, mask, slot, block, carry):
        s, delta = carry
        s_rows = _xla_native._shrink_rows(rows(x), lora_a[slot], scaling)
        product = jnp.dot(s_rows.astype(lora_b.dtype), lora_b[slot], preferred_element_type=jnp.float32)
        return _add_rows(s, block, grouped.block, mask, s_rows), _add_rows(delta, block, grouped.block, mask, product)

    s, delta = _extra_visits(grouped, visit, (s, delta))
    keep = _in_range(indices, lora_a.shape[0])
    out = base.astype(jnp.float32) + grouped.unsort(delta, num_tokens)
    s = grouped.unsort(s.astype(lora_b.dtype), num_tokens)
    return jnp.where(keep, out, base).astype(base.dtype), jnp.where(keep, s, 0)


def xla_grads(g, x, lora_a, lora_b, indices, s=None, *, scaling: float, with_dx: bool):
    """The XLA-native formulation (see the module doc); ``indices`` as the op takes them; ``s`` [T, R] as the
    forward kept it (None: recomputed).

    Every product runs on the rows sorted by slot: first each block's first slot (batched), then the runs
    starting inside a block, all five products of one visit in one loop (:func:`_extra_visits`): a visit's
    rows of ``ds`` are used only by that visit's dA and dx."""
    num_tokens = x.shape[0]
    num_slots = lora_a.shape[0]
    grouped = _sorted(indices, num_slots, num_tokens)
    # The sorted rows of x and g, those of other slots than their block's first zero: read by the products
    # on the blocks' first slots only (the extra visits read x and g), so selected once, in the row gather.
    xs, gs = _primary_rows(grouped.rows(x), grouped), _primary_rows(grouped.rows(g), grouped)
    kept = None if s is None else s.astype(lora_b.dtype)
    if kept is None:  # recomputed: the blocks' first slots here, the extra visits' rows in the loop
        s_sorted = _primary_shrink(xs, lora_a, grouped, scaling).astype(lora_b.dtype)
    else:
        s_sorted = grouped.rows(kept)
    ds = _primary_shrink(gs, lora_b, grouped, 1.0).astype(lora_b.dtype)
    d_b = _primary_weight_grad(s_sorted, gs, grouped, num_slots)
    d_a = _primary_weight_grad(ds, xs, grouped, num_slots)
    dx = None
    if with_dx:
        dx = _primary_expand((ds.astype(jnp.float32) * scaling).astype(lora_a.dtype), lora_a, grouped)

    def visit(rows, mask, slot, block, carry):
        d_a, d_b, dx = carry
        g_rows, x_rows = rows(g), rows(x)
        ds_rows = jnp.einsum("tn,rn->tr", g_rows, lora_b[slot], preferred_element_type=jnp.float32)
        ds_rows = ds_rows.astype(lora_b.dtype)
        if kept is None:
            s_rows = _xla_native._shrink_rows(x_rows, lora_a[slot], scaling).astype(lora_b.dtype)
        else:
            s_rows = rows(kept)
        d_b = _add_slot(d_b, slot, _outer_sum(mask, s_rows, g_rows))
        d_a = _add_slot(d_a, slot, _outer_sum(mask, ds_rows, x_rows))
        if dx is not None:
            scaled = (ds_rows.astype(jnp.float32) * scaling).astype(lora_a.dtype)
            product = jnp.dot(scaled, lora_a[slot], preferred_element_type=jnp.float32)
            dx = _add_rows(dx, block, grouped.block, mask, product)
        return d_a, d_b, dx

    d_a, d_b, dx = _extra_visits(grouped, visit, (d_a, d_b, dx))
    out = [(d_a * scaling).astype(lora_a.dtype), d_b.astype(lora_b.dtype)]
    if with_dx:
        out.append(grouped.unsort(dx, num_tokens).astype(x.dtype))
    return tuple(out)


def g_pass(s, g, lora_b, indices, generation: str):
    """(ds [T, R], dB [L, R, N]) in lora_b's dtype: one pass over g by ``shrink_weight_grad`` (padding as the
    op pads), or the separate shrink and weight-gradient kernels where every slot's dB tile does not fit."""
    num_tokens = g.shape[0]
    num_slots, rank, width = lora_b.shape
    tokens = weight_grad.block_tokens(num_tokens)
    wide = weight_grad.padded_width(width)
    budget = weight_grad.fused_vmem_budget(block_sizes.vmem_limit(generation))
    tile = weight_grad.fused_width_tile(wide, tokens, rank, num_slots, lora_b.dtype.itemsize, budget)
    if tile is None:
        ds = shrink_fn("pallas", generation, 1.0)(g, lora_b, indices)
        return ds, weight_grad_fn(num_slots, 1.0, "pallas", generation)(s, g, indices)
    padded = -(-num_tokens // tokens) * tokens
    columns = [(0, 0), (0, wide - width)]
    ds, d_b = weight_grad.shrink_weight_grad(
        _pad_rows(s, padded),
        jnp.pad(_pad_rows(g, padded), columns),
        jnp.pad(lora_b, [(0, 0), *columns]),
        _padded_indices(indices, num_slots, padded),
        tokens=tokens,
        tile=tile,
        interpret=generation == "cpu",
        vmem_limit_bytes=block_sizes.vmem_limit(generation),
    )
    return ds[:num_tokens].astype(lora_b.dtype), d_b[:, :, :width].astype(lora_b.dtype)


def pallas_grads(g, x, lora_a, lora_b, indices, s=None, *, scaling: float, with_dx: bool, generation: str):
    """The Pallas formulation (see the module doc); interpret mode when ``generation`` is "cpu"; ``s`` as the
    forward kept it (None: recomputed by the shrink kernel)."""
    num_tokens, hidden = x.shape
    num_slots = lora_b.shape[0]
    if s is None:
        s = shrink_fn("pallas", generation, scaling)(x, lora_a, indices)
    s = s.astype(lora_b.dtype)
    ds, d_b = g_pass(s, g, lora_b, indices, generation)
    d_a = weight_grad_fn(num_slots, scaling, "pallas", generation)(ds, x, indices)
    out = [d_a.astype(lora_a.dtype), d_b]
    if with_dx:
        scaled = (ds.astype(jnp.float32) * scaling).astype(lora_a.dtype)
        zeros = jnp.zeros((num_tokens, hidden), x.dtype)
        out.append(expand_fn("pallas", generation, False, None)(scaled, lora_a, zeros, indices))
    return tuple(out)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def lora_grads_fn(backend: str, generation: str, scaling: float, with_dx: bool, with_s: bool = False) -> Callable:
    """``fn(g[T, N], x[T, K], lora_a[L, R, K], lora_b[L, R, N], indices[T][, s[T, R]]) -> (dA, dB[, dx])``;
    ``with_s``: the forward's ``s`` is the last argument (else recomputed)."""

    def fn(g, x, lora_a, lora_b, indices, s=None):
        if backend == "pallas":
            return pallas_grads(
                g, x, lora_a, lora_b, indices, s, scaling=scaling, with_dx=with_dx, generation=generation
            )
        return xla_grads(g, x, lora_a, lora_b, indices, s, scaling=scaling, with_dx=with_dx)

    if with_s:
        return fn
    return lambda g, x, lora_a, lora_b, indices: fn(g, x, lora_a, lora_b, indices)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def train_forward_fn(scaling: float) -> Callable:
    """``fn(x[T, D], lora_a[L, R, D'], lora_b[L, R, N'], base[T, N], indices[T]) -> (out, s)`` by
    :func:`xla_forward` on the layer's columns (buffers wider than the layer: their first D / N)."""

    def fn(x, lora_a, lora_b, base, indices):
        lora_a, lora_b = lora_a[:, :, : x.shape[1]], lora_b[:, :, : base.shape[1]]
        return xla_forward(x, lora_a, lora_b, base, indices, scaling=scaling)

    return fn
