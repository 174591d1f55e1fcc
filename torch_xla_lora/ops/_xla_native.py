"""The grouped BGMV algorithm in plain jax ops, for devices without Mosaic (the default off TPU).

Same visits as the Pallas kernels (see ``torch_xla_lora.kernels.visits``), in
two passes that XLA compiles well:

1. the *primary* pass: every token block is multiplied by its first adapter
   (its smallest slot) in one batched matmul over all blocks, rows of other
   adapters masked out; in a prefill batch (each request's tokens together)
   this covers almost every token;
2. the *extra* visits, the (block, slot) pairs the primary pass left, walked by
   a ``fori_loop`` whose trip count is a device value; its body multiplies one
   token block by one adapter and updates the output in place
   (dynamic-update-slice, no copy).

The cost is O(T * R * D) for the primary pass plus O(extra visits * tokens *
R * D), whatever the number of slots L.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from torch_xla_lora.kernels.visits import Visits


class _Plan(NamedTuple):
    primary: jax.Array  # [num_blocks] slot of each block's first visit (-1: none)
    extra_block: jax.Array  # [T_pad] block of each extra visit
    extra_slot: jax.Array  # [T_pad]
    num_extra: jax.Array  # scalar


def _plan(visits: Visits, num_blocks: int) -> _Plan:
    entries = visits.block.shape[0]
    position = jnp.arange(entries)
    real = position < visits.count[0]
    first = real & jnp.concatenate([jnp.ones((1,), bool), visits.block[1:] != visits.block[:-1]])
    primary = (
        jnp.full((num_blocks,), -1, jnp.int32)
        .at[jnp.where(first, visits.block, num_blocks)]
        .set(visits.slot, mode="drop")
    )
    extra = real & ~first
    target = jnp.where(extra, jnp.cumsum(extra) - 1, entries)
    extra_block = jnp.zeros((entries,), jnp.int32).at[target].set(visits.block, mode="drop")
    extra_slot = jnp.zeros((entries,), jnp.int32).at[target].set(visits.slot, mode="drop")
    return _Plan(primary, extra_block, extra_slot, jnp.sum(extra))


def _rows(array: jax.Array, block: jax.Array, block_tokens: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(array, block * block_tokens, block_tokens)


def _mask(indices: jax.Array, slot: jax.Array) -> jax.Array:
    return (indices == slot) & (slot >= 0)


def _shrink_rows(x, a, mask, scaling):
    """[..., tokens, D] x [..., R, D] -> [..., tokens, R] f32, masked rows zero."""
    y = jnp.einsum("...td,...rd->...tr", x, a, preferred_element_type=jnp.float32)
    return jnp.where(mask[..., None], y * scaling, 0.0)


def _walk(plan: _Plan, acc: jax.Array, indices: jax.Array, block_tokens: int, product) -> jax.Array:
    """Add ``product(block, slot, mask)`` ([tokens, W] f32) to the rows of every extra visit."""

    def body(v, acc):
        block, slot = plan.extra_block[v], plan.extra_slot[v]
        mask = _mask(_rows(indices, block, block_tokens), slot)
        update = _rows(acc, block, block_tokens) + product(block, jnp.maximum(slot, 0), mask)
        return lax.dynamic_update_slice_in_dim(acc, update, block * block_tokens, 0)

    return lax.fori_loop(0, plan.num_extra, body, acc)


def _primary_mask(indices: jax.Array, plan: _Plan, block_tokens: int) -> jax.Array:
    return _mask(indices.reshape(-1, block_tokens), plan.primary[:, None])


def shrink(
    x: jax.Array,  # [T_pad, D]
    lora_a: jax.Array,  # [L, R, D]
    indices: jax.Array,  # [T_pad] int32, -1 = no adapter
    visits: Visits,
    *,
    scaling: float,
    block_tokens: int,
) -> jax.Array:  # [T_pad, R], x.dtype
    """Grouped shrink: ``out[t] = scaling * lora_a[i_t] @ x[t]``."""
    num_tokens, hidden = x.shape
    plan = _plan(visits, num_tokens // block_tokens)
    blocks = x.reshape(-1, block_tokens, hidden)
    acc = _shrink_rows(
        blocks, lora_a[jnp.maximum(plan.primary, 0)], _primary_mask(indices, plan, block_tokens), scaling
    )
    acc = acc.reshape(num_tokens, -1)

    def product(block, slot, mask):
        return _shrink_rows(_rows(x, block, block_tokens), lora_a[slot], mask, scaling)

    return _walk(plan, acc, indices, block_tokens, product).astype(x.dtype)


def expand(
    s: jax.Array,  # [T_pad, R]
    lora_b: jax.Array,  # [L, R, Dout]
    base: jax.Array,  # [T_pad, Dout]
    indices: jax.Array,  # [T_pad] int32
    visits: Visits,
    *,
    add_inputs: bool,
    block_tokens: int,
) -> jax.Array:  # [T_pad, Dout], base.dtype
    """Grouped expand: ``out[t] = (base[t] if add_inputs else 0) + s[t] @ lora_b[i_t]``."""
    num_tokens, rank = s.shape
    plan = _plan(visits, num_tokens // block_tokens)
    s = s.astype(lora_b.dtype)
    mask = _primary_mask(indices, plan, block_tokens)
    s_blocks = jnp.where(mask[..., None], s.reshape(-1, block_tokens, rank), 0)
    y = jnp.einsum("btr,bro->bto", s_blocks, lora_b[jnp.maximum(plan.primary, 0)], preferred_element_type=jnp.float32)
    acc = y.reshape(num_tokens, -1)
    if add_inputs:
        acc = acc + base.astype(jnp.float32)

    def product(block, slot, mask):
        rows = jnp.where(mask[:, None], _rows(s, block, block_tokens), 0)
        return jnp.dot(rows, lora_b[slot], preferred_element_type=jnp.float32)

    return _walk(plan, acc, indices, block_tokens, product).astype(base.dtype)


def shrink_expand(
    x: jax.Array,  # [T_pad, D]
    lora_a: jax.Array,  # [L, R, D]
    lora_b: jax.Array,  # [L, R, Dout]
    base: jax.Array,  # [T_pad, Dout]
    indices: jax.Array,  # [T_pad] int32
    visits: Visits,
    *,
    scaling: float,
    block_tokens: int,
) -> jax.Array:  # [T_pad, Dout], base.dtype
    """Fused grouped shrink-expand: ``out[t] = base[t] + (scaling * lora_a[i_t] @ x[t]) @ lora_b[i_t]``."""
    num_tokens, hidden = x.shape
    plan = _plan(visits, num_tokens // block_tokens)
    primary = jnp.maximum(plan.primary, 0)
    blocks = x.reshape(-1, block_tokens, hidden)
    s = _shrink_rows(blocks, lora_a[primary], _primary_mask(indices, plan, block_tokens), scaling)
    y = jnp.einsum("btr,bro->bto", s.astype(lora_b.dtype), lora_b[primary], preferred_element_type=jnp.float32)
    acc = y.reshape(num_tokens, -1) + base.astype(jnp.float32)

    def product(block, slot, mask):
        s = _shrink_rows(_rows(x, block, block_tokens), lora_a[slot], mask, scaling).astype(lora_b.dtype)
        return jnp.dot(s, lora_b[slot], preferred_element_type=jnp.float32)

    return _walk(plan, acc, indices, block_tokens, product).astype(base.dtype)
