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
