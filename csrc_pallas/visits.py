"""Grouping of tokens into visits: the grid every BGMV kernel walks.

A *visit* is a pair (token block, adapter slot) such that some token of the
block uses the slot. Visits are ordered by block, so each block's output tile
stays resident across its visits and is written back once; x and the output
are read and written once whatever the number of slots L. Per visit the
kernel multiplies one token block by one adapter: the work is
``O((T / tokens + extra visits) * tokens * R * D)``, independent of L. A block
whose tokens use no adapter gets exactly one visit (slot = -1) so its output
is still written.

The visits are computed with a sort of T int32 keys (no [T, L] one-hot), so
building them costs O(T log T) whatever L is, and no activation is permuted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Visits(NamedTuple):
    """Visit arrays, int32, padded to the static bound T_pad (one visit per token at most).

    Attributes:
      block: [T_pad] token block of visit v.
      slot: [T_pad] adapter slot of visit v, -1 for a block with no adapter.
      count: [1] number of real visits; entries past it repeat the last visit,
        so a fixed-size grid walking them fetches nothing new.
    """

    block: jax.Array
    slot: jax.Array
    count: jax.Array


def valid_slots(indices: jax.Array, num_slots: int) -> jax.Array:
    """Indices with every value outside [0, num_slots) replaced by -1."""
    return jnp.where((indices >= 0) & (indices < num_slots), indices, -1).astype(jnp.int32)


def build(indices: jax.Array, num_slots: int, block_tokens: int) -> Visits:
    """Visits of ``indices`` ([T_pad] int32, T_pad a multiple of ``block_tokens``)."""
    (num_tokens,) = indices.shape
    if num_tokens % block_tokens:
        raise ValueError(f"indices length {num_tokens} is not a multiple of block_tokens={block_tokens}")
    stride = num_slots + 1
    # "no adapter" sorts last within a block, so a block's first key is -1
    # only when no token of it uses an adapter.
    key = jnp.where((indices >= 0) & (indices < num_slots), indices, num_slots).astype(jnp.int32)
    block = jnp.arange(num_tokens, dtype=jnp.int32) // block_tokens
    order = jnp.sort(block * stride + key)
    sorted_block, sorted_slot = order // stride, order % stride
    first_of_key = jnp.concatenate([jnp.ones((1,), bool), order[1:] != order[:-1]])
    first_of_block = jnp.concatenate([jnp.ones((1,), bool), sorted_block[1:] != sorted_block[:-1]])
    keep = first_of_key & ((sorted_slot < num_slots) | first_of_block)
    position = jnp.cumsum(keep.astype(jnp.int32)) - 1
    count = position[-1] + 1
    # Pad by repeating the last visit: gather index min(v, count - 1).
    source = (
        jnp.zeros((num_tokens,), jnp.int32)
        .at[jnp.where(keep, position, num_tokens)]
        .set(jnp.arange(num_tokens, dtype=jnp.int32), mode="drop")
    )
    source = source[jnp.minimum(jnp.arange(num_tokens), count - 1)]
    slot = sorted_slot[source]
    return Visits(
        block=sorted_block[source],
        slot=jnp.where(slot < num_slots, slot, -1).astype(jnp.int32),
        count=count.reshape(1).astype(jnp.int32),
    )


def visit_flags(v, block_ref, count_ref):
    """(first, last): whether visit ``v`` is the first / last visit of its token block.

    For use inside a kernel, with the visit arrays in SMEM.
    """
    num_entries = block_ref.shape[0]
    block = block_ref[v]
    first = (v == 0) | (block_ref[jnp.maximum(v - 1, 0)] != block)
    last = (v == count_ref[0] - 1) | (block_ref[jnp.minimum(v + 1, num_entries - 1)] != block)
    return first, last


class LaneBlocks(NamedTuple):
    """Per-token-block adapter lists for the laned kernels, int32, static shapes.

    The distinct slots a block uses are numbered 0, 1, ... (their *rank*, in
    slot order) and processed ``lanes`` at a time: chunk c holds ranks
    [c * lanes, (c + 1) * lanes), packed side by side in one MXU-wide tile.

    Attributes:
      active: [num_blocks] ids of blocks that use some adapter, first ``num_active``
        entries valid (the rest repeat the last one).
      num_active: [1].
      chunks: [num_blocks] number of chunks of each block (0 = no adapter).
      slots: [num_blocks * max_chunks * lanes] slot of rank r of block b at
        ``b * max_chunks * lanes + r``, -1 past the block's distinct count.
      code: [T_pad] rank of each token's slot within its block, -1 = no adapter.
      uniform: [num_blocks] 1 where every token of the block uses the same single slot.
    """

    active: jax.Array
    num_active: jax.Array
    chunks: jax.Array
    slots: jax.Array
    code: jax.Array
    uniform: jax.Array


def max_chunks(block_tokens: int, num_slots: int, lanes: int) -> int:
    """Static bound on the chunks of one block: its distinct slots are at most min(tokens, L)."""
    return -(-min(block_tokens, num_slots) // lanes)


def build_lanes(indices: jax.Array, num_slots: int, block_tokens: int, lanes: int) -> LaneBlocks:
    """Lane metadata of ``indices`` ([T_pad] int32, T_pad a multiple of ``block_tokens``).

    One stable sort of T keys, then segment sums: O(T log T) whatever L is.
    """
    (num_tokens,) = indices.shape
    if num_tokens % block_tokens:
        raise ValueError(f"indices length {num_tokens} is not a multiple of block_tokens={block_tokens}")
    num_blocks = num_tokens // block_tokens
    per_block = max_chunks(block_tokens, num_slots, lanes) * lanes
    stride = num_slots + 1
    valid = (indices >= 0) & (indices < num_slots)
    key = jnp.where(valid, indices, num_slots).astype(jnp.int32)
    block = jnp.arange(num_tokens, dtype=jnp.int32) // block_tokens
    order = jnp.argsort(block * stride + key, stable=True)
    sorted_key, sorted_block = key[order], block[order]
    composite = sorted_block * stride + sorted_key
    new_key = jnp.concatenate([jnp.ones((1,), bool), composite[1:] != composite[:-1]])
    distinct = (new_key & (sorted_key < num_slots)).astype(jnp.int32)
    counts = jax.ops.segment_sum(distinct, sorted_block, num_segments=num_blocks)
    before_block = jnp.cumsum(counts) - counts
    rank = jnp.cumsum(distinct) - 1 - before_block[sorted_block]
    code = jnp.zeros((num_tokens,), jnp.int32).at[order].set(jnp.where(sorted_key < num_slots, rank, -1))
    target = jnp.where(distinct == 1, sorted_block * per_block + rank, num_blocks * per_block)
    slots = jnp.full((num_blocks * per_block,), -1, jnp.int32).at[target].set(sorted_key, mode="drop")
    chunks = (-(-counts // lanes)).astype(jnp.int32)
    active_mask = counts > 0
    (active,) = jnp.nonzero(active_mask, size=num_blocks, fill_value=0)
    num_active = jnp.sum(active_mask).astype(jnp.int32)
    active = active[jnp.minimum(jnp.arange(num_blocks), jnp.maximum(num_active - 1, 0))].astype(jnp.int32)
    all_valid = jax.ops.segment_min(valid.astype(jnp.int32), block, num_segments=num_blocks)
    return LaneBlocks(
        active=active,
        num_active=num_active.reshape(1),
        chunks=chunks,
        slots=slots,
        code=code,
        uniform=((counts == 1) & (all_valid == 1)).astype(jnp.int32),
    )
