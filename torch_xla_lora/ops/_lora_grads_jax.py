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


def _outer_sum(mask, lhs, rhs):
    """[..., tokens, P] x [..., tokens, Q] -> [..., P, Q] f32 over the tokens of ``mask`` (selected, not masked)."""
    return jnp.einsum(
        "...tp,...tq->...pq",
        _xla_native._select(mask, lhs, 0),
        _xla_native._select(mask, rhs, 0),
        preferred_element_type=jnp.float32,
    )


def _sorted_weight_grad(lhs, rhs, idx, plan, num_slots: int, block_tokens: int):
    """Segmented outer product of rows already sorted by slot: one batched product per block's first slot,
    then the runs starting inside a block (``plan``'s extra visits). [L, P, Q] f32; unused slots stay zero."""
    num_blocks = idx.shape[0] // block_tokens
    partial = _outer_sum(
        _xla_native._primary_mask(idx, plan, block_tokens),
        lhs.reshape(num_blocks, block_tokens, -1),
        rhs.reshape(num_blocks, block_tokens, -1),
    )
    target = jnp.where(plan.primary >= 0, plan.primary, num_slots)  # no slot: dropped
    out = jnp.zeros((num_slots, *partial.shape[1:]), jnp.float32).at[target].add(partial, mode="drop")

    def body(v, out):
        block, slot = plan.extra_block[v], plan.extra_slot[v]
        rows = functools.partial(_xla_native._rows, block=block, block_tokens=block_tokens)
        tile = _outer_sum(_xla_native._mask(rows(idx), slot), rows(lhs), rows(rhs))
        current = lax.dynamic_slice_in_dim(out, slot, 1)
        return lax.dynamic_update_slice_in_dim(out, current + tile[None], slot, 0)

    return lax.fori_loop(0, plan.num_extra, body, out)


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


def xla_forward(x, lora_a, lora_b, base, indices, *, scaling: float):
    """(out, s) of ``base + (scaling * x A[i_t]^T) @ B[i_t]`` on the rows sorted by slot: the training
    forward that keeps ``s`` ([T, R], B's dtype, zero for rows without adapter) for the backward.

    On sorted rows almost every token block holds one slot, so the shrink and the expand each cost about
    one block-sized product per block (the serving forward's direct pass on rows as given pays a second
    product for each block whose rows change slot inside it)."""
    num_tokens = x.shape[0]
    grouped = _sorted(indices, lora_a.shape[0], num_tokens)
    direct = functools.partial(_xla_native._direct_shrink, start=None, indices=grouped.indices, plan=grouped.plan)
    s = direct(grouped.rows(x), lora_a=lora_a, scaling=scaling, block_tokens=grouped.block).astype(lora_b.dtype)
    delta = _xla_native._direct_expand(s, None, lora_b, grouped.indices, grouped.plan, block_tokens=grouped.block)
    keep = _in_range(indices, lora_a.shape[0])
    out = base.astype(jnp.float32) + grouped.unsort(delta, num_tokens)
    s = grouped.unsort(s, num_tokens)
    return jnp.where(keep, out, base).astype(base.dtype), jnp.where(keep, s, 0)


def xla_grads(g, x, lora_a, lora_b, indices, s=None, *, scaling: float, with_dx: bool):
    """The XLA-native formulation (see the module doc); ``indices`` as the op takes them; ``s`` [T, R] as the
    forward kept it (None: recomputed)."""
    num_tokens = x.shape[0]
    num_slots = lora_a.shape[0]
    grouped = _sorted(indices, num_slots, num_tokens)
    block, sorted_idx, plan = grouped.block, grouped.indices, grouped.plan
    xs, gs = grouped.rows(x), grouped.rows(g)
    direct = functools.partial(_xla_native._direct_shrink, start=None, indices=sorted_idx, plan=plan)
    if s is None:
        s = direct(xs, lora_a=lora_a, scaling=scaling, block_tokens=block).astype(lora_b.dtype)
    else:
        s = grouped.rows(s.astype(lora_b.dtype))
    ds = direct(gs, lora_a=lora_b, scaling=1.0, block_tokens=block).astype(lora_b.dtype)
    d_b = _sorted_weight_grad(s, gs, sorted_idx, plan, num_slots, block)
    d_a = _sorted_weight_grad(ds, xs, sorted_idx, plan, num_slots, block) * scaling
    out = [d_a.astype(lora_a.dtype), d_b.astype(lora_b.dtype)]
    if with_dx:
        scaled = (ds.astype(jnp.float32) * scaling).astype(lora_a.dtype)
        dx = _xla_native._direct_expand(scaled, None, lora_a, sorted_idx, plan, block_tokens=block)
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
