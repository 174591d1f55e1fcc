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

from .fused import MOSAIC_SCRATCH_BYTES
from .visits import build, visit_flags


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


#: Up to this width Q is taken as it is (one tile when it fits); wider, it is padded to a multiple of 128 lanes.
MAX_UNPADDED_WIDTH = 2048

#: The scoped VMEM limit a plan is made against when the caller declares none (Mosaic's default).
DEFAULT_VMEM_LIMIT_BYTES = 16 << 20


def padded_width(width: int) -> int:
    """Q as the op pads it for the kernel: as is up to ``MAX_UNPADDED_WIDTH``, else to a multiple of 128."""
    return width if width <= MAX_UNPADDED_WIDTH else -(-width // 128) * 128


def vmem_bytes(tokens: int, rank: int, tile: int, itemsize: int) -> int:
    """VMEM the kernel needs at a plan: its double-buffered blocks (the indices as [1, tokens] and as [tokens, 1],
    the latter padded to 128 lanes; left [P, tokens]; right [tokens, tile]; the f32 [P, tile] output), the body's
    values (both operands with other slots' rows selected out, the f32 product) and Mosaic's own scratch. P is
    counted padded to 16 rows (a bf16 sublane tile). Mosaic places the pipelined blocks beside its scoped
    allocation (the scoped limit caps only the latter), so keeping all of it within the limit is conservative;
    ``tests/test_tpu_compile.py`` compiles the plans at the generations' limits."""
    rows = -(-rank // 16) * 16
    blocks = 8 * tokens * 4 + tokens * 128 * 4 + (rows * tokens + tokens * tile) * itemsize + rows * tile * 4
    values = (rows * tokens + tokens * tile) * itemsize + rows * tile * 4
    return 2 * blocks + values + MOSAIC_SCRATCH_BYTES


def _tile_candidates(width: int) -> list[int]:
    """Q tiles of a width as :func:`padded_width` pads it, widest first: the whole width, then (a lane multiple)
    every narrower multiple of 128 dividing it."""
    candidates = [width]
    if width % 128 == 0:
        lanes = width // 128
        candidates += [128 * d for d in range(lanes - 1, 0, -1) if lanes % d == 0]
    return candidates


def width_tile(width: int, tokens: int, rank: int, itemsize: int, vmem_limit_bytes: int | None = None) -> int:
    """Q tile for a width as :func:`padded_width` pads it: the widest of :func:`_tile_candidates` whose plan fits
    ``vmem_limit_bytes`` (:func:`vmem_bytes`; the narrowest where none does). Each Q tile re-walks every visit, a
    grid step each, so the fewer tiles the better: Llama-3-8B's down_proj dA (P = 64, Q = 14,336, bf16) takes
    its whole width in 64 MiB (32.9 MiB planned), against seven 2,048-wide tiles before."""
    limit = DEFAULT_VMEM_LIMIT_BYTES if vmem_limit_bytes is None else vmem_limit_bytes
    candidates = _tile_candidates(width)
    for tile in candidates:
        if vmem_bytes(tokens, rank, tile, itemsize) <= limit:
            return tile
    return candidates[-1]


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
    """Pallas segmented outer product; T_pad a multiple of ``tokens``, Q_pad as :func:`padded_width` gives it, in
    Q tiles of :func:`width_tile` planned against ``vmem_limit_bytes``."""
    num_tokens, rank = left.shape
    width = right.shape[1]
    num_blocks = num_tokens // tokens
    tq = width_tile(width, tokens, rank, right.dtype.itemsize, vmem_limit_bytes)
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


# -- one pass over the output gradient: ds = g B^T and dB = s^T g together --------------------------------
#
# The backward of a LoRA projection ``y = base + s @ B[i_t]`` (s = scaling * x A^T, [T, R]) reads the
# output gradient g twice when ds (for dx and dA) and dB are separate kernels. ``shrink_weight_grad``
# reads it once. Grid ``(Q tiles, visits)``: the visits are the forward's (``visits.build``: ordered by
# token block, a block's slots consecutive), so each token block's ds rows stay resident across its
# visits, while dB's tiles of *every* slot ([L, R, Q tile] f32) stay resident in VMEM for the whole walk
# of a Q tile: a visit adds its block's outer product into its slot's rows of that tile. Rows of other
# slots are selected out of both operands of dB's product and out of ds's product, so a non-finite row
# stays in its own slot. ds over a Q tile is a partial sum ([Q tiles, T, R] f32), added up outside (the
# tiles are few: Q / ``fused_width_tile``); dB of a slot no token uses stays exactly zero.


def _shrink_weight_grad_kernel(
    block_ref,  # SMEM [V] int32
    slot_ref,  # SMEM [V] int32
    count_ref,  # SMEM [1] int32
    idx_row_ref,  # [1, tokens] int32
    idx_col_ref,  # [tokens, 1] int32
    s_ref,  # [R, tokens] (s transposed)
    g_ref,  # [tokens, tq]
    b_ref,  # [1, R, tq]
    db_ref,  # [L, R, tq] f32, resident across the walk of one Q tile
    ds_ref,  # [1, tokens, R] f32, resident across a token block's visits
):
    v = pl.program_id(1)
    first, _ = visit_flags(v, block_ref, count_ref)
    slot = slot_ref[v]

    @pl.when(v == 0)
    def _init_db():
        db_ref[...] = jnp.zeros_like(db_ref)

    @pl.when(first)
    def _init_ds():
        ds_ref[...] = jnp.zeros_like(ds_ref)

    @pl.when(slot >= 0)
    def _accumulate():
        rows = idx_col_ref[...] == slot
        g = jnp.where(rows, g_ref[...], jnp.zeros((), g_ref.dtype))
        ds = jax.lax.dot_general(g, b_ref[0], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds_ref[0] += jnp.where(rows, ds, 0.0)
        s = jnp.where(idx_row_ref[...] == slot, s_ref[...], jnp.zeros((), s_ref.dtype))
        db_ref[pl.ds(slot, 1)] += jnp.dot(s, g, preferred_element_type=jnp.float32)[None]


def fused_vmem_budget(vmem_limit_bytes: int) -> int:
    """VMEM the fused kernel's blocks may take (double-buffered): half the generation's scoped limit."""
    return vmem_limit_bytes // 2


def _fused_bytes(tile: int, tokens: int, rank: int, num_slots: int, itemsize: int) -> int:
    resident = num_slots * rank * tile * 4 + tokens * rank * 4  # dB tiles of every slot, ds block
    streamed = (tokens * tile + rank * tile + rank * tokens) * itemsize + 8 * tokens  # g, B, s, indices
    return 2 * (resident + streamed)


def fused_width_tile(width: int, tokens: int, rank: int, num_slots: int, itemsize: int, budget: int) -> int | None:
    """Q tile of :func:`shrink_weight_grad` for a width as :func:`padded_width` pads it: the whole width, else
    the widest multiple of 128 dividing it, whose blocks fit ``budget`` bytes (:func:`fused_vmem_budget`):
    each tile re-reads s and re-walks the visits, so the fewer the better. None when no tile fits (every
    slot's dB tile is resident: L * R large), and the caller runs the separate kernels."""
    for tile in _tile_candidates(width):
        if _fused_bytes(tile, tokens, rank, num_slots, itemsize) <= budget:
            return tile
    return None


def fused_cost_estimate(num_tokens: int, rank: int, width: int, num_slots: int, tiles: int, itemsize: int):
    """Typical cost: one visit per token block. Reads g and s once per Q tile of g (s is [R, T], small), B
    once per visited tile, writes dB (f32) and the ds partial sums (f32, one [T, R] per Q tile)."""
    operands = (num_tokens * width + tiles * num_tokens * rank + num_slots * rank * width) * itemsize
    return pl.CostEstimate(
        flops=4 * num_tokens * rank * width,
        transcendentals=0,
        bytes_accessed=operands + 4 * (num_slots * rank * width + tiles * num_tokens * rank) + 8 * num_tokens,
    )


@functools.partial(jax.jit, static_argnames=("tokens", "tile", "interpret", "vmem_limit_bytes"))
def shrink_weight_grad(
    s: jax.Array,  # [T_pad, R]: the forward's rank intermediate (scaled, in B's dtype)
    g: jax.Array,  # [T_pad, Q_pad]: the output gradient
    lora_b: jax.Array,  # [L, R, Q_pad]
    indices: jax.Array,  # [T_pad] int32 in [-1, L)
    *,
    tokens: int,
    tile: int,
    interpret: bool,
    vmem_limit_bytes: int | None = None,
) -> tuple[jax.Array, jax.Array]:  # ds [T_pad, R] f32, dB [L, R, Q_pad] f32
    """``ds[t] = g[t] @ B[i_t]^T`` and ``dB[l] = sum_{i_t = l} outer(s[t], g[t])`` in one pass over g.

    T_pad a multiple of ``tokens``; ``tile`` as :func:`fused_width_tile` gives it.
    """
    num_tokens, rank = s.shape
    width = g.shape[1]
    num_slots = lora_b.shape[0]
    tiles = width // tile
    vis = build(indices, num_slots, tokens)

    def row_map(j, v, block, slot, count):
        return 0, block[v]

    def col_map(j, v, block, slot, count):
        return block[v], 0

    def g_map(j, v, block, slot, count):
        return block[v], j

    def b_map(j, v, block, slot, count):
        return jnp.maximum(slot[v], 0), 0, j

    def db_map(j, v, block, slot, count):
        return 0, 0, j

    def ds_map(j, v, block, slot, count):
        return j, block[v], 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(tiles, vis.count[0]),
        in_specs=[
            pl.BlockSpec((1, tokens), row_map),
            pl.BlockSpec((tokens, 1), col_map),
            pl.BlockSpec((rank, tokens), row_map),
            pl.BlockSpec((tokens, tile), g_map),
            pl.BlockSpec((1, rank, tile), b_map),
        ],
        out_specs=[
            pl.BlockSpec((num_slots, rank, tile), db_map),
            pl.BlockSpec((1, tokens, rank), ds_map),
        ],
    )
    d_b, ds = pl.pallas_call(
        _shrink_weight_grad_kernel,
        grid_spec=grid_spec,
        out_shape=(
            jax.ShapeDtypeStruct((num_slots, rank, width), jnp.float32),
            jax.ShapeDtypeStruct((tiles, num_tokens, rank), jnp.float32),
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes
        ),
        cost_estimate=fused_cost_estimate(num_tokens, rank, width, num_slots, tiles, g.dtype.itemsize),
        interpret=interpret,
        name="xla_lora_bgmv_shrink_weight_grad",
    )(vis.block, vis.slot, vis.count, indices.reshape(1, num_tokens), indices.reshape(num_tokens, 1), s.T, g, lora_b)
    return ds.sum(axis=0), d_b
