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
import numpy as np


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


# The builders below take an array namespace ``xp``: jax.numpy inside the ops'
# JAX functions, numpy on the host (where a batch's metadata is built once and
# shared by every layer). One algorithm serves both.


def _scatter(xp, size: int, index, values, fill: int):
    """An int32 array of ``size`` entries, ``fill`` except ``out[index] = values``; index >= size is dropped."""
    if xp is np:
        out = np.full(size, fill, np.int32)
        keep = index < size
        out[index[keep]] = values[keep]
        return out
    return xp.full((size,), fill, xp.int32).at[index].set(values, mode="drop")


def _sorted_keys(xp, indices, num_slots: int, block_tokens: int):
    """Per-token (key, block) with "no adapter" = num_slots, and the stable order sorting them by (block, key).

    "No adapter" sorts last within a block, so a block's first key is num_slots
    only when no token of it uses an adapter. Sorting keeps each block's tokens
    together: sorted position p belongs to block p // block_tokens.
    """
    (num_tokens,) = indices.shape
    if num_tokens % block_tokens:
        raise ValueError(f"indices length {num_tokens} is not a multiple of block_tokens={block_tokens}")
    valid = (indices >= 0) & (indices < num_slots)
    key = xp.where(valid, indices, num_slots).astype(xp.int32)
    block = (xp.arange(num_tokens) // block_tokens).astype(xp.int32)
    order = xp.argsort(block * (num_slots + 1) + key, stable=True)
    return valid, key, block, order


def _starts(xp, values):
    """Where a sorted run of ``values`` starts."""
    return xp.concatenate([xp.ones((1,), bool), values[1:] != values[:-1]])


def build(indices, num_slots: int, block_tokens: int, xp=jnp) -> Visits:
    """Visits of ``indices`` ([T_pad] int32, T_pad a multiple of ``block_tokens``)."""
    (num_tokens,) = indices.shape
    _, key, block, order = _sorted_keys(xp, indices, num_slots, block_tokens)
    sorted_key, sorted_block = key[order], block[order]
    composite = sorted_block * (num_slots + 1) + sorted_key
    keep = _starts(xp, composite) & ((sorted_key < num_slots) | _starts(xp, sorted_block))
    position = xp.cumsum(keep.astype(xp.int32)) - 1
    count = position[-1] + 1
    source = _scatter(xp, num_tokens, xp.where(keep, position, num_tokens), xp.arange(num_tokens, dtype=xp.int32), 0)
    # Pad by repeating the last visit.
    source = source[xp.minimum(xp.arange(num_tokens), count - 1)]
    slot = sorted_key[source]
    return Visits(
        block=sorted_block[source].astype(xp.int32),
        slot=xp.where(slot < num_slots, slot, -1).astype(xp.int32),
        count=count.reshape(1).astype(xp.int32),
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


def build_lanes(indices, num_slots: int, block_tokens: int, lanes: int, xp=jnp) -> LaneBlocks:
    """Lane metadata of ``indices`` ([T_pad] int32, T_pad a multiple of ``block_tokens``).

    One stable sort of T keys, then per-block sums: O(T log T) whatever L is.
    """
    (num_tokens,) = indices.shape
    valid, key, _, order = _sorted_keys(xp, indices, num_slots, block_tokens)
    num_blocks = num_tokens // block_tokens
    per_block = max_chunks(block_tokens, num_slots, lanes) * lanes
    sorted_key = key[order]
    sorted_block = (xp.arange(num_tokens) // block_tokens).astype(xp.int32)
    distinct = (_starts(xp, sorted_block * (num_slots + 1) + sorted_key) & (sorted_key < num_slots)).astype(xp.int32)
    counts = distinct.reshape(num_blocks, block_tokens).sum(axis=1).astype(xp.int32)
    before_block = xp.cumsum(counts) - counts
    rank = (xp.cumsum(distinct) - 1 - before_block[sorted_block]).astype(xp.int32)
    code = _scatter(xp, num_tokens, order, xp.where(sorted_key < num_slots, rank, -1).astype(xp.int32), -1)
    target = xp.where(distinct == 1, sorted_block * per_block + rank, num_blocks * per_block)
    slots = _scatter(xp, num_blocks * per_block, target, sorted_key, -1)
    num_active = (counts > 0).sum().astype(xp.int32)
    active = xp.argsort(counts == 0, stable=True).astype(xp.int32)  # blocks with adapters first, in order
    active = active[xp.minimum(xp.arange(num_blocks), xp.maximum(num_active - 1, 0))]
    all_valid = valid.reshape(num_blocks, block_tokens).all(axis=1)
    return LaneBlocks(
        active=active,
        num_active=num_active.reshape(1),
        chunks=(-(-counts // lanes)).astype(xp.int32),
        slots=slots,
        code=code,
        uniform=((counts == 1) & all_valid).astype(xp.int32),
    )


def _packed_sizes(num_tokens: int, num_slots: int, block_tokens: int, lanes: int) -> list[int]:
    num_blocks = num_tokens // block_tokens
    per_block = max_chunks(block_tokens, num_slots, lanes) * lanes
    lane_fields = [num_blocks, 1, num_blocks, num_blocks * per_block, num_tokens, num_blocks]
    return lane_fields + [num_tokens, num_tokens, 1]  # + Visits fields


def packed_size(num_tokens: int, num_slots: int, block_tokens: int, lanes: int) -> int:
    """Length of :func:`pack`'s array for ``num_tokens`` (padded) tokens."""
    return sum(_packed_sizes(num_tokens, num_slots, block_tokens, lanes))


def pack(lane_blocks: LaneBlocks, visits: Visits, xp=jnp):
    """Both metadata kinds as one int32 array: one host-to-device transfer per batch."""
    return xp.concatenate([xp.ravel(f) for f in (*lane_blocks, *visits)]).astype(xp.int32)


def unpack(packed, num_tokens: int, num_slots: int, block_tokens: int, lanes: int) -> tuple[LaneBlocks, Visits]:
    """Inverse of :func:`pack` (static offsets from the shapes)."""
    sizes = _packed_sizes(num_tokens, num_slots, block_tokens, lanes)
    if packed.shape[0] != sum(sizes):
        raise ValueError(f"packed metadata has {packed.shape[0]} entries, expected {sum(sizes)}")
    fields, offset = [], 0
    for size in sizes:
        fields.append(packed[offset : offset + size])
        offset += size
    return LaneBlocks(*fields[:6]), Visits(*fields[6:])
