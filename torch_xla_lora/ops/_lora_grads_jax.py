"""JAX functions behind ``xla_lora::bgmv_lora_grads``: a LoRA projection's whole backward in one op.

Imported lazily by the op (JAX must start after torch_xla on a TPU host). For
``y = base + (scaling * x A[i_t]^T) @ B[i_t]`` and the output gradient ``g``:
``s = scaling * x A^T`` (recomputed: the forward ops do not return it),
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

import jax.numpy as jnp
from jax import lax

from torch_xla_lora.kernels import block_sizes, weight_grad
from torch_xla_lora.ops import _xla_native
from torch_xla_lora.ops._jax import _CACHE_SIZE, _pad_rows, _padded_indices, expand_fn, shrink_fn, weight_grad_fn

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


def xla_grads(g, x, lora_a, lora_b, indices, *, scaling: float, with_dx: bool):
    """The XLA-native formulation (see the module doc); ``indices`` as the op takes them."""
    num_tokens = x.shape[0]
    num_slots = lora_a.shape[0]
    block = sorted_block_tokens(num_tokens)
    padded = -(-num_tokens // block) * block
    idx = _padded_indices(indices, num_slots, padded)
    order = _xla_native.sort_order(idx)
    sorted_idx = idx[order]
    xs, gs = _pad_rows(x, padded)[order], _pad_rows(g, padded)[order]
    plan = _xla_native._sorted_plan(sorted_idx, block)
    direct = functools.partial(_xla_native._direct_shrink, start=None, indices=sorted_idx, plan=plan)
    s = direct(xs, lora_a=lora_a, scaling=scaling, block_tokens=block).astype(lora_b.dtype)
    ds = direct(gs, lora_a=lora_b, scaling=1.0, block_tokens=block).astype(lora_b.dtype)
    d_b = _sorted_weight_grad(s, gs, sorted_idx, plan, num_slots, block)
    d_a = _sorted_weight_grad(ds, xs, sorted_idx, plan, num_slots, block) * scaling
    out = [d_a.astype(lora_a.dtype), d_b.astype(lora_b.dtype)]
    if with_dx:
        scaled = (ds.astype(jnp.float32) * scaling).astype(lora_a.dtype)
        dx = _xla_native._direct_expand(scaled, None, lora_a, sorted_idx, plan, block_tokens=block)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(padded, dtype=order.dtype))
        out.append(dx[inverse][:num_tokens].astype(x.dtype))
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


def pallas_grads(g, x, lora_a, lora_b, indices, *, scaling: float, with_dx: bool, generation: str):
    """The Pallas formulation (see the module doc); interpret mode when ``generation`` is "cpu"."""
    num_tokens, hidden = x.shape
    num_slots = lora_b.shape[0]
    s = shrink_fn("pallas", generation, scaling)(x, lora_a, indices).astype(lora_b.dtype)
    ds, d_b = g_pass(s, g, lora_b, indices, generation)
    d_a = weight_grad_fn(num_slots, scaling, "pallas", generation)(ds, x, indices)
    out = [d_a.astype(lora_a.dtype), d_b]
    if with_dx:
        scaled = (ds.astype(jnp.float32) * scaling).astype(lora_a.dtype)
        zeros = jnp.zeros((num_tokens, hidden), x.dtype)
        out.append(expand_fn("pallas", generation, False, None)(scaled, lora_a, zeros, indices))
    return tuple(out)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def lora_grads_fn(backend: str, generation: str, scaling: float, with_dx: bool) -> Callable:
    """``fn(g[T, N], x[T, K], lora_a[L, R, K], lora_b[L, R, N], indices[T]) -> (dA, dB[, dx])``."""

    def fn(g, x, lora_a, lora_b, indices):
        if backend == "pallas":
            return pallas_grads(g, x, lora_a, lora_b, indices, scaling=scaling, with_dx=with_dx, generation=generation)
        return xla_grads(g, x, lora_a, lora_b, indices, scaling=scaling, with_dx=with_dx)

    return fn
