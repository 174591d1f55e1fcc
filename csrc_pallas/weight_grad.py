"""Segmented outer product (the slot weights' gradient): ``out[l] = scaling * sum_{t: slot_t = l} left[t]^T right[t]``.

``left`` [T, P] and ``right`` [T, Q]: for dA, the rank gradient and x; for dB, the
rank intermediate and the output gradient. The result [L, P, Q] is f32.

Grid: ``(Q tiles, visits)``, both sequential. Unlike the forward kernels, the
visits are ordered by *slot*: visit ``v`` is a pair (slot, token block) such
that some token of the block uses the slot, and a slot's visits are
consecutive, so its output tile (the f32 accumulator itself) stays resident in
VMEM across them and is written back once. Each visit is one
[P, block] x [block, Q tile] MXU product of the block's rows of that slot:
rows of other slots are *selected* out of both operands (not multiplied by a
zero mask, so an Inf or NaN in another tenant's rows cannot reach this slot).
Every slot gets at least one visit (an empty one for a slot no token uses), so
every output tile is written, with exact zeros for unused slots. Tokens are
not permuted; a token block whose rows belong to one tenant (prefill, training
on whole sequences) costs one visit; the work is
``O((T / block + distinct (slot, block) pairs) * block * P * Q)`` whatever L.

The left operand comes transposed ([P, T]) so the product is a plain
[P, block] x [block, Q] matmul; P (the rank) is small, so the transpose is cheap.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


class SlotVisits(NamedTuple):
    """Visits ordered by slot, int32, padded to the static bound T_pad + L.

    Attributes:
      block: [T_pad + L] token block of visit v; ``num_blocks`` marks the empty visit of an unused slot.
      slot: [T_pad + L] slot of visit v (every slot in [0, L) appears, in order).
      count: [1] number of real visits; entries past it repeat the last visit.
    """

    block: jax.Array
    slot: jax.Array
    count: jax.Array


def build_slot_visits(indices, num_slots: int, block_tokens: int, xp=jnp) -> SlotVisits:
    """Slot-major visits of ``indices`` ([T_pad] int32 in [-1, L), T_pad a multiple of ``block_tokens``).

    One stable sort of T + L keys (slot, block): O(T log T) whatever L is.
    """
    (num_tokens,) = indices.shape
    num_blocks = num_tokens // block_tokens
    valid = indices >= 0
    block = (xp.arange(num_tokens) // block_tokens).astype(xp.int32)
    span = num_blocks + 1  # block ids 0..num_blocks-1, and num_blocks: "no tokens" (sorts after a slot's blocks)
    # Tokens without adapter sort after every slot; each slot also gets one empty entry.
    token_keys = xp.where(valid, indices * span + block, num_slots * span)
    empty_keys = xp.arange(num_slots, dtype=xp.int32) * span + num_blocks
    keys = xp.sort(xp.concatenate([token_keys.astype(xp.int32), empty_keys]))
    slot, blk = keys // span, keys % span
    first = xp.concatenate([xp.ones((1,), bool), keys[1:] != keys[:-1]])
    # A slot's empty entry sorts after its blocks: keep it only when it is the slot's first entry (no tokens).
    previous_same_slot = xp.concatenate([xp.zeros((1,), bool), slot[1:] == slot[:-1]])
    keep = first & (slot < num_slots) & ((blk < num_blocks) | ~previous_same_slot)
    position = xp.cumsum(keep.astype(xp.int32)) - 1
    count = position[-1] + 1
    size = num_tokens + num_slots
    target = xp.where(keep, position, size)
    if xp is jnp:
        chosen = xp.zeros((size,), xp.int32).at[target].set(xp.arange(size, dtype=xp.int32), mode="drop")
    else:
        chosen = xp.zeros(size, xp.int32)
        chosen[target[target < size]] = xp.arange(size, dtype=xp.int32)[target < size]
    chosen = chosen[xp.minimum(xp.arange(size), count - 1)]  # pad by repeating the last visit
    return SlotVisits(
        block=blk[chosen].astype(xp.int32),
        slot=slot[chosen].astype(xp.int32),
        count=xp.reshape(count, (1,)).astype(xp.int32),
    )


def _weight_grad_kernel(
    block_ref,  # SMEM [V] int32
    slot_ref,  # SMEM [V] int32
    count_ref,  # SMEM [1] int32
    idx_row_ref,  # [1, tokens] int32
    idx_col_ref,  # [tokens, 1] int32
    left_ref,  # [P, tokens] (left transposed)
    right_ref,  # [tokens, tq]
    o_ref,  # [1, P, tq] f32, resident across a slot's visits
    *,
    num_blocks: int,
    scaling: float,
):
    v = pl.program_id(1)
    num_entries = slot_ref.shape[0]
    slot = slot_ref[v]
    first = (v == 0) | (slot_ref[jnp.maximum(v - 1, 0)] != slot)
    last = (v == count_ref[0] - 1) | (slot_ref[jnp.minimum(v + 1, num_entries - 1)] != slot)

    @pl.when(first)
    def _init():
        o_ref[...] = jnp.zeros_like(o_ref)

    @pl.when(block_ref[v] < num_blocks)
    def _accumulate():
        lhs = jnp.where(idx_row_ref[...] == slot, left_ref[...], jnp.zeros((), left_ref.dtype))
        rhs = jnp.where(idx_col_ref[...] == slot, right_ref[...], jnp.zeros((), right_ref.dtype))
        o_ref[0] += jnp.dot(lhs, rhs, preferred_element_type=jnp.float32)

    @pl.when(last)
    def _scale():
        o_ref[...] *= scaling


def cost_estimate(num_tokens: int, rank: int, width: int, num_slots: int, itemsize: int) -> pl.CostEstimate:
    """Typical cost for XLA's scheduler: one visit per token block (each block's rows on one adapter, as in
    training on whole sequences); the grid length is data-dependent, so this is not a bound.

    Reads left and right once per Q tile of right (left is [P, T], small), writes the f32 [L, P, Q] result.
    """
    operands = (num_tokens * rank + num_tokens * width) * itemsize
    return pl.CostEstimate(
        flops=2 * num_tokens * rank * width,
        transcendentals=0,
        bytes_accessed=operands + 4 * num_slots * rank * width + 8 * num_tokens,  # + f32 result, indices twice
    )


def block_tokens(num_tokens: int) -> int:
    """Token block: 128 for small batches, 256 from 1024 tokens (lane-aligned: left's block is [P, tokens])."""
    return 128 if num_tokens < 1024 else 256


#: The widest Q tile: a [P, tile] f32 output block and a double-buffered [tokens, tile] input block stay a
#: few MiB at P = 256, tokens = 256, while each Q tile re-walks every visit (a grid step each).
MAX_WIDTH_TILE = 2048


def padded_width(width: int) -> int:
    """Q as the op pads it for the kernel: as is up to ``MAX_WIDTH_TILE`` (one tile), else to a multiple of 128."""
    return width if width <= MAX_WIDTH_TILE else -(-width // 128) * 128


def width_tile(width: int) -> int:
    """Q tile: the whole width up to ``MAX_WIDTH_TILE``, else the widest multiple of 128 dividing it that is
    at most that (the caller pads Q to a multiple of 128), so that few tiles re-walk the visits."""
    if width <= MAX_WIDTH_TILE:
        return width
    lanes = width // 128
    return 128 * max(d for d in range(1, MAX_WIDTH_TILE // 128 + 1) if lanes % d == 0)


@functools.partial(jax.jit, static_argnames=("num_slots", "scaling", "tokens", "interpret", "vmem_limit_bytes"))
def weight_grad(
    left: jax.Array,  # [T_pad, P]
    right: jax.Array,  # [T_pad, Q_pad]
    indices: jax.Array,  # [T_pad] int32 in [-1, L)
    *,
    num_slots: int,
    scaling: float,
    tokens: int,
    interpret: bool,
    vmem_limit_bytes: int | None = None,
) -> jax.Array:  # [L, P, Q_pad] f32
    """Pallas segmented outer product; T_pad a multiple of ``tokens``, Q_pad as :func:`padded_width` gives it."""
    num_tokens, rank = left.shape
    width = right.shape[1]
    num_blocks = num_tokens // tokens
    tq = width_tile(width)
    vis = build_slot_visits(indices, num_slots, tokens)

    def token_block(v, block):
        return jnp.minimum(block[v], num_blocks - 1)  # an empty visit fetches the last block, unused

    def row_map(j, v, block, slot, count):
        return 0, token_block(v, block)

    def col_map(j, v, block, slot, count):
        return token_block(v, block), 0

    def right_map(j, v, block, slot, count):
        return token_block(v, block), j

    def out_map(j, v, block, slot, count):
        return slot[v], 0, j

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(width // tq, vis.count[0]),
        in_specs=[
            pl.BlockSpec((1, tokens), row_map),
            pl.BlockSpec((tokens, 1), col_map),
            pl.BlockSpec((rank, tokens), row_map),
            pl.BlockSpec((tokens, tq), right_map),
        ],
        out_specs=pl.BlockSpec((1, rank, tq), out_map),
    )
    kernel = functools.partial(_weight_grad_kernel, num_blocks=num_blocks, scaling=scaling)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_slots, rank, width), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes
        ),
        cost_estimate=cost_estimate(num_tokens, rank, width, num_slots, right.dtype.itemsize),
        interpret=interpret,
        name="xla_lora_bgmv_weight_grad",
    )(vis.block, vis.slot, vis.count, indices.reshape(1, num_tokens), indices.reshape(num_tokens, 1), left.T, right)
