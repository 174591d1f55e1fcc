"""The grouped BGMV algorithm in plain jax ops, for devices without Mosaic (the default off TPU).

Same visits as the Pallas kernels (see ``torch_xla_lora.kernels.visits``).
The *direct* algorithm runs in two passes that XLA compiles well:

1. the *primary* pass: every token block is multiplied by its first adapter
   (its smallest slot) in one batched matmul over all blocks, rows of other
   adapters left out; in a prefill batch (each request's tokens together)
   this covers almost every token;
2. the *extra* visits, the (block, slot) pairs the primary pass left, walked by
   a ``fori_loop`` whose trip count is a device value; its body multiplies one
   token block by one adapter and updates the output in place
   (dynamic-update-slice, no copy).

A batch whose blocks mix adapters (decode: every row another request) would
cost one block-sized product per extra visit, so the ops choose at run time
(``lax.cond`` on device values, one compiled graph):

- *laned*, as the TPU kernel does: the batch's distinct adapters are taken
  ``lanes`` at a time (``lanes * R`` = 128 columns) and their A (B) tiles
  packed side by side, so one [T, D] x [D, lanes * R] shrink and one
  [T, lanes * R] x [lanes * R, Dout] expand serve ``lanes`` adapters, each
  token keeping its own lane (select). Used for a single token block that
  mixes adapters (decode), and for several mixing blocks while the batch's
  distinct adapters fill at most ``MAX_LANED_CHUNKS`` chunks;
- *sorted*, for several mixing blocks with more distinct adapters: the rows
  are permuted so each slot's tokens are together (a stable sort by slot,
  built on the host with the batch metadata when there is one), the direct
  algorithm runs on the sorted rows (almost every block then uses one
  adapter) and the result rows are permuted back;
- otherwise (prefill, blocks with at most one extra visit on average): the
  direct algorithm as is.

Rows whose index is outside [0, L) get exactly the base (or zero): every
adapter product is *selected* into the result, never multiplied by a mask, so
an unused slot holding Inf or NaN cannot leak into them. Nor can a used one
reach another slot's rows: the laned expand, which multiplies every lane's
tile by every token's row (zero outside the token's lane), selects the tiles'
non-finite values out and makes the rows of a poisoned lane NaN instead
(``_finite_chunk``), so a tenant whose weights diverged poisons only its own
rows (and, through the backward's expands, only its own gradients). The cost is
O(T * R * D) plus one block-sized product per adapter boundary, whatever the
number of slots L (laned: O(T * D * lanes * R) per chunk of distinct adapters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from torch_xla_lora.kernels.visits import Visits

# Adapter ranks packed side by side in one laned product: a 128-wide column
# block keeps XLA:CPU's matmul on full vector tiles at small ranks.
LANE_COLUMNS = 128
# Several blocks that mix adapters go laned while the batch's distinct adapters
# fill at most this many chunks of lanes, sorted by slot beyond.
MAX_LANED_CHUNKS = 2


class _Plan(NamedTuple):
    primary: jax.Array  # [num_blocks] slot of each block's first visit (-1: none)
    extra_block: jax.Array  # [T_pad] block of each extra visit
    extra_slot: jax.Array  # [T_pad]
    num_extra: jax.Array  # scalar


def _compact_extras(extra: jax.Array, block: jax.Array, slot: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    entries = extra.shape[0]
    target = jnp.where(extra, jnp.cumsum(extra) - 1, entries)
    extra_block = jnp.zeros((entries,), jnp.int32).at[target].set(block, mode="drop")
    extra_slot = jnp.zeros((entries,), jnp.int32).at[target].set(slot, mode="drop")
    return extra_block, extra_slot, jnp.sum(extra)


def _plan(visits: Visits, num_blocks: int) -> _Plan:
    entries = visits.block.shape[0]
    real = jnp.arange(entries) < visits.count[0]
    first = real & jnp.concatenate([jnp.ones((1,), bool), visits.block[1:] != visits.block[:-1]])
    primary = (
        jnp.full((num_blocks,), -1, jnp.int32)
        .at[jnp.where(first, visits.block, num_blocks)]
        .set(visits.slot, mode="drop")
    )
    return _Plan(primary, *_compact_extras(real & ~first, visits.block, visits.slot))


def _sorted_plan(indices: jax.Array, block_tokens: int) -> _Plan:
    """The plan of indices sorted by slot (-1 last), read off the runs: no sort."""
    (num_tokens,) = indices.shape
    position = jnp.arange(num_tokens, dtype=jnp.int32)
    first = indices[::block_tokens]
    primary = jnp.where(first >= 0, first, -1)
    run_start = jnp.concatenate([jnp.ones((1,), bool), indices[1:] != indices[:-1]])
    extra = run_start & (position % block_tokens != 0) & (indices >= 0)
    return _Plan(primary, *_compact_extras(extra, position // block_tokens, indices))


def _rows(array: jax.Array, block: jax.Array, block_tokens: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(array, block * block_tokens, block_tokens)


def _mask(indices: jax.Array, slot: jax.Array) -> jax.Array:
    return (indices == slot) & (slot >= 0)


def _select(mask: jax.Array, value: jax.Array, otherwise: jax.Array) -> jax.Array:
    return jnp.where(mask[..., None], value, otherwise)


def _walk(plan: _Plan, acc: jax.Array, indices: jax.Array, block_tokens: int, product) -> jax.Array:
    """Add ``product(block, slot)`` ([tokens, W] f32) to the rows of every extra visit whose token uses ``slot``."""

    def body(v, acc):
        block, slot = plan.extra_block[v], plan.extra_slot[v]
        mask = _mask(_rows(indices, block, block_tokens), slot)
        rows = _rows(acc, block, block_tokens)
        update = _select(mask, rows + product(block, jnp.maximum(slot, 0)), rows)
        return lax.dynamic_update_slice_in_dim(acc, update, block * block_tokens, 0)

    return lax.fori_loop(0, plan.num_extra, body, acc)


def _primary_mask(indices: jax.Array, plan: _Plan, block_tokens: int) -> jax.Array:
    return _mask(indices.reshape(-1, block_tokens), plan.primary[:, None])


def _shrink_rows(x, a, scaling):
    """[..., tokens, D] x [..., R, D] -> [..., tokens, R] f32."""
    return jnp.einsum("...td,...rd->...tr", x, a, preferred_element_type=jnp.float32) * scaling


# -- the direct algorithm, on the rows as given ------------------------------------------------------


def _start(start: jax.Array | None, shape) -> jax.Array:
    return jnp.zeros(shape, jnp.float32) if start is None else start.astype(jnp.float32)


def _direct_shrink(x, start, lora_a, indices, plan, *, scaling, block_tokens):
    num_tokens, hidden = x.shape
    blocks = x.reshape(-1, block_tokens, hidden)
    y = _shrink_rows(blocks, lora_a[jnp.maximum(plan.primary, 0)], scaling)
    acc = _select(_primary_mask(indices, plan, block_tokens), y, 0.0).reshape(num_tokens, -1)

    def product(block, slot):
        return _shrink_rows(_rows(x, block, block_tokens), lora_a[slot], scaling)

    return _walk(plan, acc, indices, block_tokens, product)


def _direct_expand(s, start, lora_b, indices, plan, *, block_tokens):
    num_tokens, rank = s.shape
    s_blocks = s.reshape(-1, block_tokens, rank)
    y = jnp.einsum("btr,bro->bto", s_blocks, lora_b[jnp.maximum(plan.primary, 0)], preferred_element_type=jnp.float32)
    start = _start(start, (num_tokens, lora_b.shape[2])).reshape(y.shape)
    mask = _primary_mask(indices, plan, block_tokens)
    acc = _select(mask, start + y, start).reshape(num_tokens, -1)

    def product(block, slot):
        return jnp.dot(_rows(s, block, block_tokens), lora_b[slot], preferred_element_type=jnp.float32)

    return _walk(plan, acc, indices, block_tokens, product)


def _direct_shrink_expand(x, start, weights, indices, plan, *, scaling, block_tokens):
    # The shrink of every visit, then the expand of every visit: x is dead before the
    # expand's [T, Dout] accumulator exists (a permuted x in the sorted branch is a
    # temporary as large as that accumulator; see _grouped).
    lora_a, lora_b = weights
    s = _direct_shrink(x, None, lora_a, indices, plan, scaling=scaling, block_tokens=block_tokens)
    return _direct_expand(s.astype(lora_b.dtype), start, lora_b, indices, plan, block_tokens=block_tokens)


# -- laned: one token block, its distinct adapters side by side --------------------------------------


class _Lanes(NamedTuple):
    slots: jax.Array  # [chunks_max * lanes] slot of each distinct-adapter rank, -1 past the count
    code: jax.Array  # [T] rank of each token's slot among the distinct ones, -1 = no adapter
    chunks: jax.Array  # scalar: number of chunks of ``lanes`` ranks
    count: jax.Array  # scalar: number of distinct slots
    used: jax.Array  # [L] bool: the slots some token uses
    lanes: int
    every_slot: bool  # static: all L slots fit one chunk, so rank = slot (no numbering, no gather)


def _lanes(indices: jax.Array, num_slots: int, rank: int) -> _Lanes:
    """Number the batch's distinct slots (in slot order) with a scatter and a cumsum: no sort."""
    lanes = max(1, LANE_COLUMNS // rank)
    used = jnp.zeros((num_slots + 1,), bool).at[jnp.where(indices >= 0, indices, num_slots)].set(True)[:num_slots]
    count = jnp.sum(used, dtype=jnp.int32)
    if num_slots <= lanes:
        # Few slots (e.g. 8 of rank 16): one chunk holds them all, lane = slot.
        slots = jnp.arange(num_slots, dtype=jnp.int32)
        return _Lanes(slots, indices, (count > 0).astype(jnp.int32), count, used, num_slots, True)
    width = -(-min(indices.shape[0], num_slots) // lanes) * lanes
    order = jnp.cumsum(used, dtype=jnp.int32) - 1
    slots = (
        jnp.full((width,), -1, jnp.int32)
        .at[jnp.where(used, order, width)]
        .set(jnp.arange(num_slots, dtype=jnp.int32), mode="drop")
    )
    code = jnp.where(indices >= 0, order[jnp.maximum(indices, 0)], -1)
    return _Lanes(slots, code, -(-count // lanes), count, used, lanes, False)


class PoolTiles:
    """The slot weights [L, R, W] of a rank-row pool, read through its row table tile by tile.

    ``tiles[slots]`` is ``gathered[slots]`` for the slot layout ``gathered`` the
    lanes' rows would make (:func:`gather_lanes`), but reads only the pool rows
    of the slots named: the direct and laned algorithms index their weights by
    the slots their visits and chunks name, so on a pool they read the tiles of
    the lanes the batch uses and never gather every lane (``L x R`` rows per
    projection). Rows past a lane's true rank name the pool's zero row.
    """

    def __init__(
        self,
        pool: jax.Array,  # [P + 2, W'] (W' >= width)
        scale: jax.Array | None,  # int8 pools: [P + 2] f32 per-row scales
        rows: jax.Array,  # [L, R] int32
        dtype,
        width: int | None = None,  # the layer's columns (pools may be wider)
    ):
        self.pool, self.rows, self.dtype = jnp.asarray(pool), jnp.asarray(rows), dtype
        self.scale = None if scale is None else jnp.asarray(scale)
        self.shape = (*rows.shape, pool.shape[1] if width is None else width)

    def __getitem__(self, slots: jax.Array) -> jax.Array:  # [..., R, W]
        return self._read(self.rows[slots])

    def every_lane(self) -> jax.Array:  # [L, R, W]
        """Every lane's tile: the whole slot layout (the table's rows read as they stand, no index of it)."""
        return self._read(self.rows)

    def _read(self, picked: jax.Array) -> jax.Array:
        tiles = self.pool[picked]
        if self.scale is not None:
            tiles = tiles.astype(jnp.float32) * self.scale[picked][..., None]
        return tiles[..., : self.shape[2]].astype(self.dtype)


def gather_lanes(pool: jax.Array, scale: jax.Array | None, rows: jax.Array, dtype) -> jax.Array:
    """The slot layout [L, R, W] of a row table [L, R] over a pool [P + 2, W] (int8 rows dequantised by their
    scales [P + 2] to ``dtype``): every lane's rows, as the slot kernels read them."""
    return PoolTiles(pool, scale, rows, dtype).every_lane()


def _tiles(weights: jax.Array | PoolTiles, lanes: _Lanes, c) -> jax.Array:
    """[lanes, R, W]: the tiles of chunk c's slots (any tile where a lane has no slot)."""
    if lanes.every_slot:
        return weights.every_lane() if isinstance(weights, PoolTiles) else weights
    slots = lax.dynamic_slice_in_dim(lanes.slots, c * lanes.lanes, lanes.lanes)
    return weights[jnp.maximum(slots, 0)]


def _chunk(weights: jax.Array, lanes: _Lanes, c) -> jax.Array:
    """[lanes * R, W]: the chunk's tiles side by side, as they are (a shrink: its result is selected per token)."""
    return _tiles(weights, lanes, c).reshape(-1, weights.shape[2])


def _finite_chunk(weights: jax.Array, lanes: _Lanes, c) -> tuple[jax.Array, jax.Array]:
    """(tiles [lanes * R, W] with every non-finite value selected to zero, poisoned [lanes * R] bool: the
    columns of the lanes whose tile held one), for an expand.

    An expand multiplies every lane's tile by every token's row, zero outside the
    token's own lane: 0 * Inf in another slot's tile (or in a lane no token uses)
    would be NaN in that token's row. Selecting the non-finite values out keeps
    the other tenants' rows exact; the rows of a poisoned lane are made NaN by
    the caller (:func:`_own_lane`) instead of the finite values the cleaned tile would give.
    """
    tiles = _tiles(weights, lanes, c)
    finite = jnp.isfinite(tiles)
    lanes_count, rank = tiles.shape[:2]
    poisoned = jnp.repeat(~finite.all(axis=(1, 2)), rank, total_repeat_length=lanes_count * rank)
    return jnp.where(finite, tiles, 0).reshape(-1, weights.shape[2]), poisoned


def _lane_keep(lanes: _Lanes, c, rank: int) -> tuple[jax.Array, jax.Array]:
    """(keep [T, lanes * R]: the token's own lane's columns, row [T]: the token's slot is in chunk c)."""
    column_lane = jnp.arange(lanes.lanes * rank) // rank
    local = lanes.code - c * lanes.lanes
    return column_lane[None, :] == local[:, None], (local >= 0) & (local < lanes.lanes)


def _own_lane(keep: jax.Array, poisoned: jax.Array, rows: jax.Array) -> jax.Array:
    """The expand's left operand: each token's ``rows`` in its own lane, NaN there if its lane's tile is
    poisoned (the token's result is then NaN, as the uncleaned tile would make it), zero (selected) elsewhere."""
    return jnp.where(keep, jnp.where(poisoned[None, :], jnp.nan, rows), 0)


def _chunks(lanes: _Lanes, body, acc: jax.Array) -> jax.Array:
    """``body`` over every chunk; the first outside the loop (a batch rarely needs a second), where
    XLA:CPU runs its matmuls faster than in a loop body. With no chunk at all it selects nothing."""
    return lax.fori_loop(1, lanes.chunks, body, body(0, acc))


def _laned_shrink(x, start, lora_a, lanes, *, scaling):
    rank = lora_a.shape[1]

    def body(c, acc):
        y = jnp.dot(x, _chunk(lora_a, lanes, c).T, preferred_element_type=jnp.float32) * scaling
        keep, _ = _lane_keep(lanes, c, rank)
        return acc + jnp.where(keep, y, 0.0).reshape(x.shape[0], lanes.lanes, rank).sum(axis=1)

    return _chunks(lanes, body, jnp.zeros((x.shape[0], rank), jnp.float32))


def _laned_expand(s, start, lora_b, lanes):
    rank = lora_b.shape[1]
    wide = jnp.tile(s, (1, lanes.lanes))

    def body(c, acc):
        keep, row = _lane_keep(lanes, c, rank)
        tiles, poisoned = _finite_chunk(lora_b, lanes, c)
        y = jnp.dot(_own_lane(keep, poisoned, wide), tiles, preferred_element_type=jnp.float32)
        return _select(row, acc + y, acc)

    return _chunks(lanes, body, _start(start, (s.shape[0], lora_b.shape[2])))


def _laned_shrink_expand(x, start, weights, lanes, *, scaling):
    lora_a, lora_b = weights
    rank = lora_b.shape[1]

    def body(c, acc):
        keep, row = _lane_keep(lanes, c, rank)
        y = jnp.dot(x, _chunk(lora_a, lanes, c).T, preferred_element_type=jnp.float32) * scaling
        tiles, poisoned = _finite_chunk(lora_b, lanes, c)
        y = _own_lane(keep, poisoned, y).astype(lora_b.dtype)
        return _select(row, acc + jnp.dot(y, tiles, preferred_element_type=jnp.float32), acc)

    return _chunks(lanes, body, _start(start, (x.shape[0], lora_b.shape[2])))


# -- the choice ----------------------------------------------------------------------------------------


def sort_order(indices: jax.Array) -> jax.Array:
    """[T] int32: a stable order of the tokens by slot, tokens without adapter (-1) last."""
    return jnp.argsort(indices.astype(jnp.uint32), stable=True).astype(jnp.int32)


def _grouped(
    inputs: jax.Array,  # [T_pad, K]: x (shrink) or s (expand)
    start: jax.Array | None,  # [T_pad, W] the base the products add to, None = zeros
    weight_shape: tuple[int, ...],  # [L, R, ...]
    indices: jax.Array,
    visits: Visits,
    block_tokens: int,
    direct: Callable,
    laned: Callable,
    order: jax.Array | None,
) -> jax.Array:
    """``direct(inputs, start, indices, plan)``; when blocks mix adapters ``laned(inputs, start, lanes)``,
    or direct on sorted rows. Result [T_pad, W] f32."""
    num_blocks = indices.shape[0] // block_tokens
    lanes = _lanes(indices, weight_shape[0], weight_shape[1])
    if num_blocks == 1:
        # One block (decode): its distinct slots, numbered on the device without a sort,
        # decide alone; the visits are not needed (nor built, when no host metadata came).
        zero = jnp.zeros((1,), jnp.int32)
        first = jnp.where(lanes.count > 0, jnp.argmax(lanes.used), -1).astype(jnp.int32).reshape(1)
        single = _Plan(first, zero, zero, jnp.int32(0))
        return lax.cond(
            lanes.count <= 1,
            lambda: direct(inputs, start, indices, single),
            lambda: laned(inputs, start, lanes),
        )
    plan = _plan(visits, num_blocks)

    def as_given():
        return direct(inputs, start, indices, plan)

    def side_by_side():
        return laned(inputs, start, lanes)

    def by_slot():
        # Only the inputs are permuted; the products come back to token order and the
        # base is added there. XLA:CPU keeps every branch's temporaries in one
        # allocation: a permuted base would double it (past the size glibc's malloc
        # maps afresh, page faults and all, on every call), slowing every branch.
        perm = sort_order(indices) if order is None else order
        inverse = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))
        sorted_indices = indices[perm]
        products = direct(inputs[perm], None, sorted_indices, _sorted_plan(sorted_indices, block_tokens))[inverse]
        return products if start is None else start.astype(jnp.float32) + products

    # Mixing: more extra visits than blocks. Laned costs a [T, D] x [D, lanes * R]
    # product per chunk; sorting costs about two such chunks (row permutations).
    mixing = plan.num_extra > num_blocks
    branch = jnp.where(mixing, jnp.where(lanes.chunks <= MAX_LANED_CHUNKS, 1, 2), 0)
    return lax.switch(branch, [as_given, side_by_side, by_slot])


def shrink(
    x: jax.Array,  # [T_pad, D]
    lora_a: jax.Array,  # [L, R, D]
    indices: jax.Array,  # [T_pad] int32, -1 = no adapter
    visits: Visits,
    *,
    scaling: float,
    block_tokens: int,
    order: jax.Array | None = None,  # [T_pad] sort_order(indices), host-built
) -> jax.Array:  # [T_pad, R], x.dtype
    """Grouped shrink: ``out[t] = scaling * lora_a[i_t] @ x[t]``."""

    def direct(x, start, idx, plan):
        return _direct_shrink(x, start, lora_a, idx, plan, scaling=scaling, block_tokens=block_tokens)

    def laned(x, start, lanes):
        return _laned_shrink(x, start, lora_a, lanes, scaling=scaling)

    return _grouped(x, None, lora_a.shape, indices, visits, block_tokens, direct, laned, order).astype(x.dtype)


def expand(
    s: jax.Array,  # [T_pad, R]
    lora_b: jax.Array,  # [L, R, Dout]
    base: jax.Array,  # [T_pad, Dout]
    indices: jax.Array,  # [T_pad] int32
    visits: Visits,
    *,
    add_inputs: bool,
    block_tokens: int,
    order: jax.Array | None = None,
) -> jax.Array:  # [T_pad, Dout], base.dtype
    """Grouped expand: ``out[t] = (base[t] if add_inputs else 0) + s[t] @ lora_b[i_t]``."""

    def direct(s, start, idx, plan):
        return _direct_expand(s, start, lora_b, idx, plan, block_tokens=block_tokens)

    def laned(s, start, lanes):
        return _laned_expand(s, start, lora_b, lanes)

    start = base if add_inputs else None
    out = _grouped(s.astype(lora_b.dtype), start, lora_b.shape, indices, visits, block_tokens, direct, laned, order)
    return out.astype(base.dtype)


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
    order: jax.Array | None = None,
) -> jax.Array:  # [T_pad, Dout], base.dtype
    """Fused grouped shrink-expand: ``out[t] = base[t] + (scaling * lora_a[i_t] @ x[t]) @ lora_b[i_t]``."""
    weights = (lora_a, lora_b)

    def direct(x, start, idx, plan):
        return _direct_shrink_expand(x, start, weights, idx, plan, scaling=scaling, block_tokens=block_tokens)

    def laned(x, start, lanes):
        return _laned_shrink_expand(x, start, weights, lanes, scaling=scaling)

    return _grouped(x, base, lora_b.shape, indices, visits, block_tokens, direct, laned, order).astype(base.dtype)


# -- rank-true: a pool's rows, packed by true rank (decode) --------------------------------------------

# A pooled batch of at most this many tokens runs :func:`pooled_shrink_expand` (the batch's true-rank rows
# packed side by side); more tokens run the slot ops on :class:`PoolTiles`, whose direct algorithm takes
# each token's lane alone rather than every lane's.
PACKED_MAX_TOKENS = 64
#: A packed batch whose used lanes hold at most this many rows runs one chunk this wide instead of
#: ``LANE_COLUMNS``-wide chunks: one adapter of rank 16 (a decode batch of one request) reads 32 rows, not 128.
NARROW_COLUMNS = 32


def lane_ranks(rows: jax.Array, zero_row: int) -> jax.Array:
    """[L] int32: each lane's true rank in a row table [L, R]: the position after its last entry that is not
    the zero row (entries before it that name the zero row are read, as zeros)."""
    position = jnp.arange(1, rows.shape[1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(rows != zero_row, position, 0), axis=1).astype(jnp.int32)


class _Packed(NamedTuple):
    rows: jax.Array  # [C * LANE_COLUMNS] pool row of each packed column (the zero row past the batch's rows)
    lane: jax.Array  # [C * LANE_COLUMNS] lane of each packed column, -1 past the batch's rows
    position: jax.Array  # [C * LANE_COLUMNS] each packed column's rank row in its lane, in [0, R)
    total: jax.Array  # scalar: the batch's rows (the used lanes' true ranks summed)


def _packed(rows: jax.Array, lanes: jax.Array, zero_row: int) -> _Packed:
    """The true-rank rows of the lanes some token uses, side by side in lane order, padded to whole chunks."""
    num_lanes, rank = rows.shape
    used = jnp.zeros((num_lanes + 1,), bool).at[jnp.where((lanes >= 0) & (lanes < num_lanes), lanes, num_lanes)]
    used = used.set(True)[:num_lanes]
    ranks = jnp.where(used, lane_ranks(rows, zero_row), 0)
    ends = jnp.cumsum(ranks)
    total = ends[-1]
    width = -(-num_lanes * rank // LANE_COLUMNS) * LANE_COLUMNS
    column = jnp.arange(width, dtype=jnp.int32)
    # Each lane's number at its first column (lanes of rank 0 start where the next does: the larger wins),
    # carried forward: the lane of every column, in O(columns + lanes).
    starts = jnp.where(ranks > 0, ends - ranks, width)
    marks = jnp.zeros((width,), jnp.int32).at[starts].max(jnp.arange(num_lanes, dtype=jnp.int32), mode="drop")
    lane = lax.cummax(marks)
    inside = column < total
    within = jnp.clip(column - (ends - ranks)[lane], 0, rank - 1)
    return _Packed(
        jnp.where(inside, rows[lane, within], zero_row),
        jnp.where(inside, lane, -1),
        within,
        total,
    )


def _pool_rows(pool: jax.Array, picked: jax.Array) -> jax.Array:
    """``pool[picked]`` ([W, ...]): one gather of the chunk's rows (clamped: the table's rows are in range).

    A gather reads only the rows it names at run time. XLA's cost analysis counts it (fused, as XLA:CPU
    always fuses it) as reading its whole operand, where one dynamic slice per row was counted by the rows
    (docs/performance.md, "LoRA bytes per decode step"); the slices made each op 2 x (32 + 2 x 128) slices,
    several times slower for XLA:CPU to compile than the gathers (``bench pool``: 11 minutes against 4.5), at
    the same run time."""
    return jnp.take(pool, picked, axis=0, mode="clip")


def pooled_shrink_expand(
    x: jax.Array,  # [T, D]
    a_pool: jax.Array,  # [P + 2, D], x's dtype or int8
    b_pool: jax.Array,  # [P + 2, Dout]
    base: jax.Array,  # [T, Dout]
    lanes: jax.Array,  # [T] int32: each token's lane, outside [0, L): none
    rows: jax.Array,  # [L, R] int32: each lane's pool rows
    page_scales: jax.Array | None,  # int8 pools: [>= P + 2] f32 a_scale * b_scale of each row
    *,
    scaling: float,
) -> jax.Array:  # [T, Dout] f32 (tokens without an adapter: the base)
    """``ops.pooled_shrink_expand`` reading only the true-rank rows of the lanes the batch uses.

    Those rows are numbered side by side (lane by lane, each its true rank) and taken
    ``LANE_COLUMNS`` at a time: per chunk its rows read from each pool (:func:`_pool_rows`),
    one [T, D] x [D, 128] shrink and one [T, 128] x [128, Dout] expand, each token keeping
    only its own lane's columns (selected, never multiplied by a mask). The chunks
    run in a ``fori_loop`` whose trip count is the batch's (device value): rows past
    the lanes' true ranks, and lanes no token uses, are neither read nor multiplied,
    whatever ``max_loras`` and ``max_rank``. A batch of at most ``NARROW_COLUMNS`` rows
    runs one chunk that wide instead (a ``lax.cond`` on the device's row count). The
    expand's chunk has its non-finite values selected out (a token whose own column held
    one gets NaN), so a tenant whose weights diverged reaches no other tenant's rows.
    """
    dtype = x.dtype

    def shrunk(picked, position):
        s = jnp.dot(x, _pool_rows(a_pool, picked).astype(dtype).T, preferred_element_type=jnp.float32)
        return s * scaling

    return _packed_expand(shrunk, b_pool, base, lanes, rows, page_scales, dtype)


def pooled_expand(
    s: jax.Array,  # [T, R]: each token's rank rows' values (rows past its lane's rank: any)
    b_pool: jax.Array,  # [P + 2, Dout], s's dtype or int8
    base: jax.Array,  # [T, Dout]
    lanes: jax.Array,  # [T] int32: each token's lane, outside [0, L): none
    rows: jax.Array,  # [L, R] int32: each lane's pool rows
    b_scale: jax.Array | None,  # int8 pools: [P + 2] f32 per-row scales
) -> jax.Array:  # [T, Dout] f32 (tokens without an adapter: the base)
    """``ops.pooled_expand``: :func:`pooled_shrink_expand`'s expand alone, on the tokens' given ``s``.

    The same packing of the used lanes' true-rank rows: each chunk's column j of lane l takes each token's
    ``s[t, position]`` (its rank row in the lane) and multiplies it by that pool row of B, read once for
    all the tokens; rows past the lanes' true ranks and lanes no token uses are neither read nor multiplied.
    """
    dtype = s.dtype

    def shrunk(picked, position):
        return s.astype(jnp.float32)[:, position]

    return _packed_expand(shrunk, b_pool, base, lanes, rows, b_scale, dtype)


def _packed_expand(shrunk, b_pool, base, lanes, rows, row_scales, dtype) -> jax.Array:
    """``base + `` each token's own lane's columns of ``shrunk(picked, position)`` ([T, width] f32 for the
    chunk's pool rows ``picked`` at rank rows ``position``) times those rows of ``b_pool``, chunk by chunk over
    the used lanes' packed true-rank rows (see :func:`pooled_shrink_expand`). ``row_scales`` [>= P + 2] f32
    (int8 pools) multiply each column; a float pool's non-finite values are selected out of the tile and
    poison only their own lane's tokens (NaN)."""
    packed = _packed(rows, lanes, b_pool.shape[0] - 2)

    def chunk(width: int):
        def body(c, acc):
            picked = lax.dynamic_slice_in_dim(packed.rows, c * width, width)
            own = lax.dynamic_slice_in_dim(packed.lane, c * width, width)
            keep = (own[None, :] == lanes[:, None]) & (own[None, :] >= 0)
            s = shrunk(picked, lax.dynamic_slice_in_dim(packed.position, c * width, width))
            tile = _pool_rows(b_pool, picked).astype(dtype)
            if row_scales is None:
                finite = jnp.isfinite(tile)
                poisoned = ~finite.all(axis=1)
                tile = jnp.where(finite, tile, 0)
                s = jnp.where(poisoned[None, :], jnp.nan, s)
            else:
                s = s * row_scales[picked][None, :]
            left = jnp.where(keep, s, 0).astype(dtype)
            return acc + jnp.dot(left, tile, preferred_element_type=jnp.float32)

        return body

    start = base.astype(jnp.float32)
    wide = chunk(LANE_COLUMNS)

    def chunks() -> jax.Array:
        # The first chunk outside the loop (XLA:CPU runs matmuls faster there); with no used lane it adds zeros.
        first = wide(0, start)
        if packed.rows.shape[0] == LANE_COLUMNS:
            return first
        return lax.fori_loop(1, -(-packed.total // LANE_COLUMNS), wide, first)

    return lax.cond(packed.total <= NARROW_COLUMNS, lambda: chunk(NARROW_COLUMNS)(0, start), chunks)


# -- the slot weights' gradient (training) -------------------------------------------------------------

# Token blocks of the weight gradient: at most this many per batch (so the per-block partial
# sums stay within this many [P, Q] tiles), each of 8 to 256 tokens.
WEIGHT_GRAD_BLOCKS = 32


def weight_grad_block_tokens(num_tokens: int) -> int:
    """Token block of :func:`weight_grad` for a batch of ``num_tokens``: a power of two in [8, 256]
    with at most ``WEIGHT_GRAD_BLOCKS`` blocks up to 8192 tokens."""
    wanted = -(-num_tokens // WEIGHT_GRAD_BLOCKS)
    return min(256, max(8, 1 << max(wanted - 1, 0).bit_length()))


def weight_grad(
    left: jax.Array,  # [T_pad, P]
    right: jax.Array,  # [T_pad, Q]
    indices: jax.Array,  # [T_pad] int32, -1 = no adapter (T_pad a multiple of block_tokens)
    num_slots: int,
    *,
    scaling: float,
    block_tokens: int,
) -> jax.Array:  # [L, P, Q] f32
    """Segmented outer product: ``out[l] = scaling * sum_{t: i_t = l} outer(left[t], right[t])``, in f32.

    The rows are sorted by slot (a stable sort, tokens without adapter last), so
    almost every token block holds one slot's rows: one batched
    [P, block] x [block, Q] product per block's first slot (its partial sum
    added into that slot), then a ``fori_loop`` over the other runs that start
    inside a block (at most one per distinct slot), each a block-sized product
    added into its slot. Rows of other slots are *selected* out of both
    operands, so an Inf or NaN in a row without adapter cannot reach any slot;
    a slot no token uses is never written and stays exactly zero.

    Cost: the sort and two row gathers, O(T * P * Q) multiply-adds plus one
    block of them per distinct slot beyond the first of its block, whatever L;
    memory: the f32 output, the [T / block, P, Q] partial sums and the sorted
    copies of ``left`` and ``right``.
    """
    num_tokens = indices.shape[0]
    num_blocks = num_tokens // block_tokens
    perm = sort_order(indices)
    idx, lhs, rhs = indices[perm], left[perm], right[perm]
    plan = _sorted_plan(idx, block_tokens)

    def outer_sum(mask, lhs, rhs):
        # [..., tokens, P] x [..., tokens, Q] -> [..., P, Q] over the masked tokens.
        return jnp.einsum(
            "...tp,...tq->...pq",
            _select(mask, lhs, 0),
            _select(mask, rhs, 0),
            preferred_element_type=jnp.float32,
        )

    partial = outer_sum(
        _primary_mask(idx, plan, block_tokens),
        lhs.reshape(num_blocks, block_tokens, -1),
        rhs.reshape(num_blocks, block_tokens, -1),
    )
    target = jnp.where(plan.primary >= 0, plan.primary, num_slots)  # no slot: dropped (not -1, which would wrap)
    out = jnp.zeros((num_slots, *partial.shape[1:]), jnp.float32).at[target].add(partial, mode="drop")

    def body(v, out):
        block, slot = plan.extra_block[v], plan.extra_slot[v]
        mask = _mask(_rows(idx, block, block_tokens), slot)
        tile = outer_sum(mask, _rows(lhs, block, block_tokens), _rows(rhs, block, block_tokens))
        current = lax.dynamic_slice_in_dim(out, slot, 1)
        return lax.dynamic_update_slice_in_dim(out, current + tile[None], slot, 0)

    return lax.fori_loop(0, plan.num_extra, body, out) * scaling
