"""Fused, laned BGMV shrink-expand: ``out[t] = base[t] + scaling * (A[s_t] x[t]) @ B[s_t]``.

One kernel per LoRA layer: the [T, R] intermediate never leaves VMEM, and B
covers every output slice of a fused projection (QKV, gate_up) at once.

Grid: ``(active token blocks, output tiles)``. Only blocks in which some token
uses an adapter are visited (a device-valued grid length); the output aliases
``base``, so every other block keeps the base values without being read or
written. Per visited block:

- at the first output tile, the block's distinct adapters are taken ``lanes``
  at a time (a *chunk*): their A tiles are DMA'd side by side into one
  [lanes * Rp, D] VMEM tile, so a single MXU pass computes x @ A^T for all of
  them; each token keeps only its own lane (mask) and the [tokens, lanes * Rp]
  result stays in VMEM for every output tile;
- at every output tile, the chunk's B tiles are DMA'd the same way and one
  matmul adds all lanes' products to the base tile. The tile's non-finite
  values are selected out first and the tokens of a lane that held one get
  NaN (``finite_lanes``): a tenant whose weights diverged poisons only its own
  rows, never the other lanes' tokens through 0 * Inf.

Laning is what keeps small ranks from wasting the MXU: at R=16 a 256-wide
MXU pass serves 16 adapters for the price of one. The work per block is one
shrink and one expand pass per chunk, whatever the number of slots L; adapter
tiles are fetched only for slots the block uses.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import tuning
from .block_sizes import LANE, BlockSizes, choose, known, lane_tile, typical_adapters, vmem_limit
from .pages import (
    PAGE_ROWS,
    SCALE_TILE_ROWS,
    PageTable,
    Pooled,
    choose_scale_mode,
    convert_pages,
    for_lane_pages,
    lane_page_target,
    lane_rows,
    page_copy,
    pages,
    pool_rows_read,
    row_scales,
    scale_buffer_rows,
    scale_tile_step,
    scale_tiles,
    table_read_bytes,
)
from .pages import flat_page_scales as flat_page_scales  # re-exported: the XLA path reads kept page scales by it
from .pages import padded_scale_rows as padded_scale_rows  # re-exported: callers size page scales by it
from .pages import page_scales_of as page_scales_of  # re-exported: callers build page scales by it
from .pages import scale_read_bytes as scale_read_bytes  # re-exported: the TPU model prices page-scale reads by it
from .visits import LaneBlocks, max_chunks

logger = logging.getLogger(__name__)


def rank_stride(rank: int, dtype) -> int:
    """Rows per lane in VMEM: the rank rounded up to the dtype's sublane tile (8 f32, 16 bf16)."""
    sublanes = 8 * (4 // jnp.dtype(dtype).itemsize)
    return -(-rank // sublanes) * sublanes


def lanes_for(rank: int, num_slots: int, dtype, generation: str) -> int:
    """Adapters packed side by side in one MXU-wide tile (1 when a rank fills the MXU)."""
    width = tuning.MXU_WIDTH[known(generation)]
    return max(1, min(width // rank_stride(rank, dtype), num_slots))


def lane_aligned(hidden: int, out_dim: int) -> bool:
    """Whether both widths are multiples of the 128-lane tile (the adapter buffers then need no padding).

    The kernel DMAs whole [R, D'] and [R, tile] adapter rows by hand, and Mosaic slices
    a memref only along lane-aligned widths (libtpu: "Slice shape along dimension 2
    must be aligned to tiling (128), but is 576"). For other widths the kernel reads
    adapter buffers padded to whole lane tiles (:func:`padded_width`) and uses only
    their first D / Dout columns.
    """
    return hidden % 128 == 0 and out_dim % 128 == 0


def padded_width(width: int) -> int:
    """The width of an adapter buffer the kernel reads for a layer width: whole 128-lane tiles."""
    return -(-width // 128) * 128


def b_tile_width(block_sizes: BlockSizes, out_dim: int) -> int:
    """Columns of B the kernel DMAs per output tile: the tile, or the padded row where one tile spans an
    unaligned Dout (its columns past Dout are read and not used)."""
    return padded_width(out_dim) if block_sizes.out == out_dim else block_sizes.out


#: Mosaic's own scratch beside the values :func:`vmem_bytes` counts (found by compiling with libtpu near the limit).
MOSAIC_SCRATCH_BYTES = 1 << 20


def vmem_bytes(block_sizes: BlockSizes, rank: int, num_slots: int, lanes: int, dtype) -> int:
    """VMEM the kernel needs: double-buffered pipelined blocks, scratch (the adapter tiles at their padded
    widths, :func:`padded_width`), and the body's values Mosaic keeps in VMEM: the expand loop's three f32
    [tokens, tile] values (the sum carried, the product, the next sum), the B tile with its non-finite values
    selected out (:func:`finite_lanes`), the shrink's f32 [tokens, lanes * Rp] product, and Mosaic's own scratch.
    Plans compile with their scoped limit set to this (``tests/test_tpu_compile.py``); before it counted the body's
    values, a v6e f32 plan estimated at 62.0 MiB needed 66.5."""
    itemsize = jnp.dtype(dtype).itemsize
    bt, hidden, bn = block_sizes.tokens, block_sizes.hidden, block_sizes.out
    width = lanes * rank_stride(rank, dtype)
    pipelined = 2 * (bt * 4 + bt * hidden * itemsize + 2 * bt * bn * itemsize)
    tiles = padded_width(hidden) + padded_width(bn)  # a tile spanning an unaligned Dout reads the padded row
    scratch = width * tiles * itemsize + max_chunks(bt, num_slots, lanes) * bt * width * itemsize
    values = 3 * bt * bn * 4 + width * bn * itemsize + bt * width * 4
    return pipelined + scratch + values + MOSAIC_SCRATCH_BYTES


def _fit(num_tokens: int, hidden: int, out_dim: int, rank: int, num_slots: int, dtype, generation: str):
    """(BlockSizes, lanes, fits): the tuning table's token block and output tile, full D, shrunk
    (tokens, then the output tile, then lanes) until the kernel fits the generation's VMEM limit;
    ``fits`` is False when even the smallest of them does not (the last sizes tried are returned)."""
    sizes = dataclasses.replace(choose(num_tokens, hidden, out_dim, generation), hidden=hidden)
    lanes = lanes_for(rank, num_slots, dtype, generation)
    limit = vmem_limit(generation)
    while vmem_bytes(sizes, rank, num_slots, lanes, dtype) > limit:
        if sizes.tokens > 8 * (4 // jnp.dtype(dtype).itemsize):
            sizes = dataclasses.replace(sizes, tokens=sizes.tokens // 2)
        elif narrower := lane_tile(out_dim, sizes.out - LANE):
            sizes = dataclasses.replace(sizes, out=narrower)
        elif lanes > 1:
            lanes //= 2
        else:
            return sizes, lanes, False
    return sizes, lanes, True


def plan(num_tokens: int, hidden: int, out_dim: int, rank: int, num_slots: int, dtype, generation: str):
    """(BlockSizes, lanes) of one call: the tuning table's token block and output tile, full D,
    shrunk (tokens first) until the kernel fits the generation's VMEM limit.

    Raises:
      ValueError: no tiling fits (a full-D adapter tile beyond the limit): see :func:`plan_call`.
    """
    sizes, lanes, fits = _fit(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
    if not fits:
        raise ValueError(
            f"fused kernel cannot fit D={hidden}, Dout={out_dim}, R={rank} in "
            f"{vmem_limit(generation)} bytes of VMEM on {generation} "
            f"(needs {vmem_bytes(sizes, rank, num_slots, lanes, dtype)})"
        )
    return sizes, lanes


def plan_call(num_tokens: int, hidden: int, out_dim: int, rank: int, num_slots: int, dtype, generation: str):
    """(BlockSizes, lanes, fused) of one shrink-expand call on ``generation``.

    ``fused`` is True when this kernel runs it (:func:`plan`), at any widths: where
    D or Dout is not a multiple of 128 it reads adapter buffers padded to whole lane
    tiles (:func:`padded_width`; the output then spans an unaligned Dout in one tile).
    Otherwise the caller runs the separate shrink and expand kernels with the tuning
    table's tiles and ``lanes`` 1, for one of two reasons:

    - by cost: the separate kernels' modelled time is less than this kernel's, both priced by
      ``cost.fused_is_cheaper`` (the TPU cost model the bench reports, on a batch spreading the
      tokens over every slot; host-only, cached per shape);
    - a full-D adapter tile beyond the VMEM limit, e.g. D = 28672 at rank 128 in float32 on v4
      (logged once per shape).

    The choice is static per shape and generation, like the plan. Any other error of the planner propagates.
    """
    from . import cost

    sizes, lanes, fits = _fit(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
    name = str(jnp.dtype(dtype))
    if fits and cost.fused_is_cheaper(num_tokens, hidden, out_dim, rank, num_slots, name, generation):
        return sizes, lanes, True
    if not fits:
        _log_beyond_vmem(hidden, out_dim, rank, num_slots, name, generation)
    return choose(num_tokens, hidden, out_dim, generation), 1, False


@functools.cache
def _log_beyond_vmem(hidden: int, out_dim: int, rank: int, num_slots: int, dtype: str, generation: str) -> None:
    logger.warning(
        "fused shrink-expand kernel: D=%d, Dout=%d, R=%d, L=%d in %s does not fit the %d bytes of VMEM "
        "of %s at any tiling; running the separate shrink and expand kernels",
        hidden,
        out_dim,
        rank,
        num_slots,
        dtype,
        vmem_limit(generation),
        generation,
    )


def finite_lanes(tile: jax.Array, lanes: int, stride: int) -> tuple[jax.Array, jax.Array]:
    """(``tile`` with its non-finite values selected to zero, poisoned [1, lanes * stride] bool: the
    columns of the lanes whose rows of ``tile`` held one), for a laned expand inside a kernel.

    The expand multiplies every lane's rows of the B tile by every token, zero
    outside the token's own lane: 0 * Inf in another slot's rows (or in a lane
    the block leaves unused, which keeps an earlier block's tile) would be NaN
    in that token's output. With the values selected out the other tokens stay
    exact; the caller makes the tokens of a poisoned lane NaN (:func:`poison_own_lane`).
    Work: a few elementwise passes and per-lane reductions over the tile in VMEM, no HBM traffic.
    """
    wide = tile.astype(jnp.float32)  # Mosaic tests finiteness on float32 only
    finite = jnp.isfinite(wide)
    nonfinite = jnp.where(finite, 0.0, 1.0)
    column_lane = jax.lax.broadcasted_iota(jnp.int32, (1, lanes * stride), 1) // stride
    poisoned = jnp.zeros((1, lanes * stride), jnp.float32)
    for lane in range(lanes):
        rows = nonfinite[lane * stride : (lane + 1) * stride]
        hit = jnp.max(jnp.max(rows, axis=0, keepdims=True), axis=1, keepdims=True)  # [1, 1]
        poisoned = jnp.where(column_lane == lane, hit, poisoned)
    return jnp.where(finite, wide, 0.0).astype(tile.dtype), poisoned > 0


def poison_own_lane(y: jax.Array, code: jax.Array, first_lane, poisoned: jax.Array, stride: int) -> jax.Array:
    """``y`` [tokens, lanes * stride] (each token's shrink in its own lane, zero elsewhere) with the own
    lane of every token whose lane is ``poisoned`` made NaN: its expand row is then NaN, as the tile's
    non-finite values would have made it, while the tile they were selected out of serves the others."""
    column_lane = jax.lax.broadcasted_iota(jnp.int32, (1, y.shape[1]), 1) // stride
    own = column_lane == (code - first_lane)
    return jnp.where(own & poisoned, jnp.asarray(jnp.nan, y.dtype), y)


def step_work(i: int, n: int, meta, rank: int, hidden: int, lanes: int, block_sizes: BlockSizes, itemsize: int):
    """What the kernel body does at grid step (i, n), for the cost model: (manual DMA bytes, matmuls).

    ``meta`` holds the LaneBlocks arrays as numpy. Matmuls are (M, K, N) shapes.
    Mirrors ``_fused_kernel``: at n == 0 one shrink per chunk with its A tiles,
    at every n one expand per chunk with its B tiles.
    """
    block = int(meta.active[i])
    chunks = int(meta.chunks[block])
    per_block = len(meta.slots) // len(meta.chunks)
    used = [int(s) for s in meta.slots[block * per_block : block * per_block + chunks * lanes] if s >= 0]
    width = lanes * rank_stride(rank, "float32" if itemsize == 4 else "bfloat16")
    bt, bn = block_sizes.tokens, block_sizes.out
    dma = len(used) * rank * padded_width(bn) * itemsize  # a tile spanning an unaligned Dout: the padded row
    matmuls = [(bt, width, bn)] * chunks
    if n == 0:
        dma += len(used) * rank * padded_width(hidden) * itemsize
        matmuls += [(bt, hidden, width)] * chunks
    return dma, matmuls


def _fused_kernel(
    *refs,
    lanes: int,
    stride: int,
    per_block: int,
    scaling: float,
    pooled: Pooled | None = None,
    expand_only: bool = False,
):
    """The laned shrink-expand. Refs, in order: the scalar-prefetch arrays (SMEM: active, chunks,
    slots, uniform; pooled: + the page table [L * pages(R) + L]: page starts, then ranks, and the number of
    visited blocks [1]), code [tokens, 1],
    x [tokens, D], base [tokens, out], A and B (ANY: slots [L, R, D] / [L, R, Dout], or pools
    [P + 2, D] / [P + 2, Dout]; int8 pools: + the page-scale array [N] f32, ANY), the output [tokens, out],
    then the scratch: A [lanes * Rp, D] and B [lanes * Rp, out] tiles in the compute dtype,
    y [max_chunks, tokens, lanes * Rp], DMA semaphores [2] (int8 pools: + page buffers [lanes * Rp / 8, 8, D]
    and [..., 8, out] for the int8 rows, the SMEM scale buffer, the scale mode [1] (SMEM) and its semaphore).

    ``expand_only`` (pooled): no A. x is then [tokens, lanes * Rp], each token's rank values already at its own
    rank rows' positions in every lane's columns (:func:`pooled_expand`), and stands for the shrink's x @ A^T;
    there is no A pool, A tile nor A page buffer, and an int8 pool's page scales are B's alone."""
    num_prefetch = 4 if pooled is None else 6
    active_ref, chunks_ref, slots_ref, uniform_ref, *pool_refs = refs[:num_prefetch]
    int8 = pooled is not None and pooled.int8
    code_ref, x_ref, base_ref, *rest = refs[num_prefetch:]
    a_hbm, rest = (None, rest) if expand_only else (rest[0], rest[1:])
    b_hbm, *rest = rest
    s_hbm, rest = (rest[0], rest[1:]) if int8 else (None, rest)
    o_ref, *rest = rest
    a_buf, rest = (None, rest) if expand_only else (rest[0], rest[1:])
    b_buf, y_buf, sem, *page_bufs = rest
    if expand_only:  # int8: B's staging buffer alone
        page_bufs = [None, *page_bufs]
    i, n = pl.program_id(0), pl.program_id(1)
    block = active_ref[i]
    num_chunks = chunks_ref[block]
    tile = o_ref.shape[1]
    hidden = x_ref.shape[1]
    width = lanes * stride

    def lane_slots(c):
        return [slots_ref[block * per_block + c * lanes + lane] for lane in range(lanes)]

    if pooled is None:
        rank = a_hbm.shape[1]

        def load(c, which: int) -> None:
            """DMA each lane's tile of chunk c (A: which 0, B: 1) into its rows of the buffer, then wait for all."""
            source, dest = (a_hbm, a_buf) if which == 0 else (b_hbm, b_buf)
            copies = []
            for lane, slot in enumerate(lane_slots(c)):
                entry = jnp.maximum(slot, 0)
                # B: the output tile's columns, or the whole padded row where one tile spans an unaligned Dout
                columns = pl.ds(n * tile, tile) if dest.shape[1] == tile else slice(None)
                index = entry if which == 0 else (entry, slice(None), columns)
                copy = pltpu.make_async_copy(source.at[index], dest.at[pl.ds(lane * stride, rank)], sem.at[which])
                copies.append((slot, copy))
                pl.when(slot >= 0)(copy.start)
            for slot, copy in copies:
                pl.when(slot >= 0)(copy.wait)

    else:
        table = PageTable(pool_refs[0], pooled)  # lane l's page p starts at entry l * pages(R) + p, ranks follow
        if int8:
            s_buf, mode_ref, s_sem = page_bufs[2:]

        def load(c, which: int) -> None:
            """DMA the pages holding each lane's true-rank rows of chunk c, each the aligned page holding them, into
            its rows of the buffer (int8: staged, then converted; A's pages bring their scale tiles unless the whole
            array was read, mode 1); rows that are not the lane's own are selected out by the caller."""
            source, dest = (a_hbm, a_buf) if which == 0 else (b_hbm, b_buf)
            staging = page_bufs[which] if int8 else None
            columns = slice(None) if which == 0 else pl.ds(n * tile, tile)
            slots = lane_slots(c)
            for step in ("start", "wait"):

                def page(slot, lane: int, p, step=step):
                    target = lane_page_target(dest, staging, lane, stride, p)
                    getattr(page_copy(source, table.dma_row(slot, p), columns, target, sem.at[which]), step)()

                for_lane_pages(table, slots, page, spill=True)
                if int8 and which == 0:
                    load_scales(c, step)
            if staging is not None:
                convert_pages(table, slots, staging, dest, stride)

        def load_scales(c, step: str) -> None:
            """``step`` of the DMAs of the page-scale tiles of chunk c's lanes' pages (:func:`scale_tile_step`)."""
            slots = lane_slots(c)

            def scale_tile(slot, lane: int, p):
                before = (c > 0, slots_ref[block * per_block + jnp.maximum(c - 1, 0) * lanes])
                scale_tile_step(s_hbm, s_buf, table, slots, slot, lane, p, s_sem.at[0], step, before)

            pl.when(mode_ref[0] == 0)(functools.partial(for_lane_pages, table, slots, scale_tile))

        def own_rows(c, shape, axis: int):
            """bool ``shape``: the positions along ``axis`` holding their lane's own rank rows (:func:`lane_rows`)."""
            return lane_rows(table, lane_slots(c), stride, shape, axis)

    def _choose_scale_mode():
        """The scale mode (:func:`choose_scale_mode`), against the pages the call's visited blocks DMA, a tile each
        (:func:`scale_read_bytes` prices the same choice)."""

        def count_pages():
            def block_pages(k, total):
                visited = active_ref[k]

                def chunk_pages(c, total):
                    for lane in range(lanes):
                        total += table.pages(slots_ref[visited * per_block + c * lanes + lane])
                    return total

                return jax.lax.fori_loop(0, chunks_ref[visited], chunk_pages, total)

            return jax.lax.fori_loop(0, pool_refs[1][0], block_pages, jnp.int32(0))  # over the visited blocks

        choose_scale_mode(pooled, s_hbm, s_buf, mode_ref, s_sem.at[0], count_pages)

    @pl.when((i == 0) & (n == 0))
    def _zero_buffers():
        # Lanes a chunk leaves unused keep earlier tiles (non-finite ones too: the expand
        # selects those out, finite_lanes); zero them once so no uninitialised VMEM is read.
        if a_buf is not None:
            a_buf[...] = jnp.zeros_like(a_buf)
        b_buf[...] = jnp.zeros_like(b_buf)
        if int8:
            _choose_scale_mode()

    @pl.when(n == 0)
    def _shrink():
        column_lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1) // stride

        def body(c, carry):
            if expand_only:  # x holds the rank values at their positions: the scales' tiles alone to bring
                if int8:
                    for step in ("start", "wait"):
                        load_scales(c, step)
                y = x_ref[...].astype(jnp.float32)
            else:
                load(c, 0)
                # A's padded columns (past an unaligned D) are read by the DMA and not used: a static slice
                a = a_buf[...] if a_buf.shape[1] == hidden else a_buf[:, :hidden]
                y = jax.lax.dot_general(x_ref[...], a, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            keep = column_lane == (code_ref[...] - c * lanes)
            if lanes == 1:  # a block whose tokens all use one adapter needs no mask
                keep = keep | (uniform_ref[block] == 1)
            if pooled is not None:  # channels of rows not the lane's own (stale, a neighbour's tail): selected out
                keep = keep & own_rows(c, (1, width), 1)
                if pooled.int8:
                    y = y * row_scales(table, lane_slots(c), stride, width, s_buf, mode_ref)
            y = jnp.where(keep, y, 0.0)
            y_buf[c] = (y * scaling).astype(y_buf.dtype)
            return carry

        jax.lax.fori_loop(0, num_chunks, body, 0)

    def expand(c, acc):
        load(c, 1)
        b = b_buf[...] if b_buf.shape[1] == tile else b_buf[:, :tile]  # a tile spanning an unaligned Dout
        if pooled is not None:  # rows not the lane's own (stale, a neighbour's tail): zero (0 * Inf would be NaN)
            b = jnp.where(own_rows(c, (width, 1), 0), b.astype(jnp.float32), 0.0).astype(b.dtype)
        b, poisoned = finite_lanes(b, lanes, stride)
        y = poison_own_lane(y_buf[c], code_ref[...], c * lanes, poisoned, stride)
        return acc + jnp.dot(y, b, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, num_chunks, expand, base_ref[...].astype(jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def grid_spec(
    num_tokens: int,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    dtype,
    block_sizes: BlockSizes,
    lanes: int,
    pooled: Pooled | None = None,
    expand_only: bool = False,
) -> pltpu.PrefetchScalarGridSpec:
    """The kernel's grid and BlockSpecs (also read by the TPU cost model).

    The grid's first dimension is set by the caller: the number of active blocks. ``dtype`` is the
    compute dtype (the slots', or a float pool's; an int8 pool's rows are converted to it in VMEM).
    ``expand_only`` (:func:`pooled_expand`): ``hidden`` is x's width, lanes * Rp, and nothing of A is read or held.
    """
    bt, bn = block_sizes.tokens, block_sizes.out
    stride = rank_stride(rank, dtype)
    chunks = max_chunks(bt, num_slots, lanes)

    def rows(i, n, active, *_):
        return active[i], 0

    def tile(i, n, active, *_):
        return active[i], n

    a_tile = [] if expand_only else [pltpu.VMEM((lanes * stride, padded_width(hidden)), dtype)]
    scratch = [  # the adapter tiles at their padded widths (equal to D and the tile where lane-aligned)
        *a_tile,
        pltpu.VMEM((lanes * stride, b_tile_width(block_sizes, out_dim)), dtype),
        pltpu.VMEM((chunks, bt, lanes * stride), dtype),
        pltpu.SemaphoreType.DMA((2,)),
    ]
    in_specs = [
        pl.BlockSpec((bt, 1), rows),
        pl.BlockSpec((bt, hidden), rows),
        pl.BlockSpec((bt, bn), tile),
        *([] if expand_only else [pl.BlockSpec(memory_space=pltpu.ANY)]),
        pl.BlockSpec(memory_space=pltpu.ANY),
    ]
    if pooled is not None and pooled.int8:
        page_count = lanes * stride // PAGE_ROWS
        in_specs.append(pl.BlockSpec(memory_space=pltpu.ANY))  # the page-scale array, DMA'd by hand
        a_pages = [] if expand_only else [pltpu.VMEM((page_count, PAGE_ROWS, hidden), jnp.int8)]
        scratch += [
            *a_pages,
            pltpu.VMEM((page_count, PAGE_ROWS, bn), jnp.int8),
            pltpu.SMEM((scale_buffer_rows(pooled, lanes),), jnp.float32),
            pltpu.SMEM((1,), jnp.int32),
            pltpu.SemaphoreType.DMA((1,)),
        ]
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4 if pooled is None else 6,
        grid=(num_tokens // bt, out_dim // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bt, bn), tile),
        scratch_shapes=scratch,
    )


def cost_estimate(
    num_tokens: int, hidden: int, out_dim: int, rank: int, num_slots: int, dtype, block_sizes: BlockSizes, lanes: int
) -> pl.CostEstimate:
    """Typical cost for XLA's scheduler: every token block active with one chunk (its adapters fit
    one laned MXU pass, as in prefill or a decode batch of at most ``lanes`` adapters per block).

    The grid length and chunk counts are data-dependent: fewer active blocks cost less, blocks
    with more distinct adapters than lanes cost one more pass each. Flops count the MXU work as
    issued (lanes * Rp columns); bytes count x, the base read and the output written once, and
    the A and B rows of ``lanes`` adapters per block (at most L).
    """
    itemsize = jnp.dtype(dtype).itemsize
    width = lanes * rank_stride(rank, dtype)
    adapters = typical_adapters(num_tokens, num_slots, block_sizes.tokens, lanes)
    activations = num_tokens * (hidden + 2 * out_dim) * itemsize + 4 * num_tokens
    adapter_width = padded_width(hidden) + padded_width(out_dim)  # the rows as DMA'd, padded
    return pl.CostEstimate(
        flops=2 * num_tokens * width * (hidden + out_dim),
        transcendentals=0,
        bytes_accessed=activations + adapters * rank * adapter_width * itemsize,
    )


@functools.partial(jax.jit, static_argnames=("scaling", "block_sizes", "lanes", "interpret", "vmem_limit_bytes"))
def shrink_expand(
    x: jax.Array,  # [T_pad, D]
    lora_a: jax.Array,  # [L, R, D'], D' = padded_width(D): columns past D are not used
    lora_b: jax.Array,  # [L, R, Dout'], Dout' = padded_width(Dout)
    base: jax.Array,  # [T_pad, Dout]
    meta: LaneBlocks,
    *,
    scaling: float,
    block_sizes: BlockSizes,
    lanes: int,
    interpret: bool,
    vmem_limit_bytes: int | None = None,
) -> jax.Array:  # [T_pad, Dout], base.dtype
    """Fused laned kernel over prepared lane metadata; tokens padded to whole blocks, the adapter buffers'
    widths D and Dout padded to whole lane tiles (:func:`padded_width`; equal where lane-aligned).

    ``vmem_limit_bytes``: the scoped VMEM limit of the generation ``plan`` used
    (None: the v5e/v6e figure, :func:`block_sizes.vmem_limit`).
    """
    num_tokens, hidden = x.shape
    num_slots, rank, _ = lora_b.shape
    out_dim = base.shape[1]
    widths = (lora_a.shape[2], lora_b.shape[2])
    if widths != (padded_width(hidden), padded_width(out_dim)):
        raise ValueError(
            f"adapter widths {widths}: expected the layer's D={hidden}, Dout={out_dim} padded to whole "
            f"lane tiles, {(padded_width(hidden), padded_width(out_dim))}"
        )
    block_sizes.check(hidden, out_dim)
    spec = grid_spec(num_tokens, hidden, out_dim, rank, num_slots, lora_b.dtype, block_sizes, lanes)
    spec.grid = (meta.num_active[0], spec.grid[1])
    kernel = functools.partial(
        _fused_kernel,
        lanes=lanes,
        stride=rank_stride(rank, lora_b.dtype),
        per_block=max_chunks(block_sizes.tokens, num_slots, lanes) * lanes,
        scaling=scaling,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct(base.shape, base.dtype),
        # base is operand 6 counting the 4 scalar-prefetch arrays: untouched blocks keep it.
        input_output_aliases={6: 0},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes or vmem_limit("v6e"),
        ),
        cost_estimate=cost_estimate(num_tokens, hidden, out_dim, rank, num_slots, lora_b.dtype, block_sizes, lanes),
        interpret=interpret,
        name="xla_lora_bgmv_shrink_expand",
    )(meta.active, meta.chunks, meta.slots, meta.uniform, meta.code.reshape(num_tokens, 1), x, base, lora_a, lora_b)


def pooled_cost_estimate(
    num_tokens: int,
    hidden: int,
    out_dim: int,
    ranks: tuple[int, ...],
    table_rank: int,
    dtype,
    block_sizes: BlockSizes,
    lanes: int,
    int8: bool,
    table_bytes: int = 0,
    expand_only: bool = False,
) -> pl.CostEstimate:
    """As :func:`cost_estimate` for the pooled kernel, with the adapter bytes of the true ranks: the
    pages of each of ``ranks`` (the distinct adapters of a typical batch, one entry each, all in one
    token block as in decode), int8 rows at one byte an element, plus ``table_bytes`` (the tables the
    kernel reads: the page table, an int8 pool's page-scale tiles or whole array, :func:`scale_read_bytes`).
    Flops count the MXU work as issued: one laned pass per chunk of ``lanes`` of them. ``expand_only``
    (:func:`pooled_expand`): x is ``hidden`` = lanes * Rp wide, and no A is read or multiplied."""
    itemsize = jnp.dtype(dtype).itemsize
    width = lanes * rank_stride(table_rank, dtype)
    activations = num_tokens * (hidden + 2 * out_dim) * itemsize + 4 * num_tokens
    rows = pool_rows_read(ranks)
    chunks = max(1, -(-len(ranks) // lanes))
    read_width = out_dim + (0 if expand_only else hidden)  # of each row read: B's, and A's
    return pl.CostEstimate(
        flops=2 * num_tokens * width * read_width * chunks,
        transcendentals=0,
        bytes_accessed=activations + rows * read_width * (1 if int8 else itemsize) + table_bytes,
    )


def pooled_vmem_bytes(block_sizes: BlockSizes, rank: int, num_slots: int, lanes: int, dtype, int8: bool) -> int:
    """VMEM of the pooled kernel: :func:`vmem_bytes`, plus the int8 page buffers of an int8 pool."""
    extra = lanes * rank_stride(rank, dtype) * (block_sizes.hidden + block_sizes.out) if int8 else 0
    return vmem_bytes(block_sizes, rank, num_slots, lanes, dtype) + extra


def pooled_plan_call(
    num_tokens: int, hidden: int, out_dim: int, rank: int, num_slots: int, dtype, generation: str, int8: bool
):
    """(BlockSizes, lanes, fused) of one pooled call: :func:`plan_call`'s plan for the slots the pool stands
    for (so the batch's host metadata serves both), ``fused`` False where the pooled kernel cannot run it
    (widths not lane-aligned, VMEM) or :func:`plan_call` takes the separate kernels by cost (the plan is then
    theirs): the caller then gathers the lanes' rows into slots and runs the slot kernels."""
    sizes, lanes, run_fused = plan_call(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
    if not lane_aligned(hidden, out_dim):  # pools hold rows of the layer's own widths: no padded rows to DMA
        run_fused = False
    elif run_fused and pooled_vmem_bytes(sizes, rank, num_slots, lanes, dtype, int8) > vmem_limit(generation):
        run_fused = False
    return sizes, lanes, run_fused


def pooled_step_work(i: int, n: int, meta, ranks, hidden: int, lanes: int, block_sizes: BlockSizes, itemsize: int):
    """:func:`step_work` of the pooled kernel: (manual DMA bytes, matmuls) at grid step (i, n), the DMAs
    being the pages of each used lane's true rank (``ranks``: lane -> rank; ``itemsize`` the pool's)."""
    block = int(meta.active[i])
    chunks = int(meta.chunks[block])
    per_block = len(meta.slots) // len(meta.chunks)
    used = [int(s) for s in meta.slots[block * per_block : block * per_block + chunks * lanes] if s >= 0]
    rows = pool_rows_read(ranks[s] for s in used)
    bt, bn = block_sizes.tokens, block_sizes.out
    width = lanes * rank_stride(max(int(r) for r in ranks), "float32" if itemsize == 4 else "bfloat16")
    matmuls = [(bt, width, bn)] * chunks
    dma = rows * bn * itemsize
    if n == 0:
        dma += rows * hidden * itemsize
        matmuls += [(bt, hidden, width)] * chunks
    return dma, matmuls


def pooled_step_pages(i: int, meta, ranks, lanes: int, tile_of: Callable | None = None) -> tuple[int, int]:
    """(pages, page-scale tiles) the pooled kernel DMAs of each factor at grid step (i, 0): those of the visited
    block's used lanes (``ranks``: lane -> true rank), the pages as ``_choose_scale_mode`` counts them; the tiles
    as :func:`scale_tiles` prices them, or with ``tile_of(lane, page)`` (the tile of a lane's page, as its rows
    lie) as the kernel reads them: a page's tile unless its page before's tile, an earlier lane of its chunk's
    same page's or (lane 0's page 0) the chunk before's lane 0's page 0's (``pages.scale_tile_step``)."""
    block = int(meta.active[i])
    chunks = int(meta.chunks[block])
    per_block = len(meta.slots) // len(meta.chunks)
    slots = [int(s) for s in meta.slots[block * per_block : block * per_block + chunks * lanes]]
    used = [int(ranks[s]) for s in slots if s >= 0]
    if tile_of is None:
        return sum(map(pages, used)), sum(map(scale_tiles, used))
    tiles, before = 0, -1  # before: the chunk before's lane 0 slot
    for c in range(chunks):
        chunk = slots[c * lanes : (c + 1) * lanes]
        for k, slot in enumerate(chunk):
            for page in range(pages(int(ranks[slot])) if slot >= 0 else 0):
                tile = tile_of(slot, page)
                if page and tile == tile_of(slot, page - 1):
                    continue
                if k == 0 and page == 0 and before >= 0 and ranks[before] and tile_of(before, 0) == tile:
                    continue
                tiles += not any(o >= 0 and page < pages(int(ranks[o])) and tile_of(o, page) == tile for o in chunk[:k])
        before = chunk[0]
    return sum(map(pages, used)), tiles


@functools.partial(
    jax.jit,
    static_argnames=("scaling", "block_sizes", "lanes", "interpret", "vmem_limit_bytes", "rank", "typical_ranks"),
)
def pooled_shrink_expand(
    x: jax.Array,  # [T_pad, D], the compute dtype
    a_pool: jax.Array,  # [P + 2, D], x's dtype or int8; or stacked [E, P + 2, D] (rows numbered as if flattened)
    b_pool: jax.Array,  # [P + 2, Dout] (or [E, P + 2, Dout]), a_pool's dtype
    base: jax.Array,  # [T_pad, Dout], x's dtype
    meta: LaneBlocks,
    page_table: jax.Array,  # [L * pages(R) + L] int32: lane l's page p starts at row [l * pages(R) + p], its
    # true rank at [L * pages(R) + l] (``pool.page_table``, built on the host per batch)
    page_scales: jax.Array | None,  # int8 pools: [N] f32, a_scale * b_scale of each row, N whole 1024-row tiles
    # (stacked pools: laid out G pools to a tile, ``page_scales_of``)
    *,
    scaling: float,
    block_sizes: BlockSizes,
    lanes: int,
    rank: int,
    interpret: bool,
    vmem_limit_bytes: int | None = None,
    typical_ranks: tuple[int, ...] | None = None,
) -> jax.Array:  # [T_pad, Dout], base.dtype
    """The fused laned kernel reading each lane's A and B rows from the pools through the page table.

    Lane l's rank-r rows (r = 8q + t) are ``pages(r)`` pages of :data:`PAGE_ROWS` rows, page p starting at
    row ``page_table[l * pages(R) + p]``: for p < q a multiple of 8, the next seven rows contiguous (a whole
    aligned page); for the tail page p = q (t > 0) ``aligned + o``, the lane's t rows contiguous from there,
    inside the aligned page or running on into the next (o + t > 8, q + 2 <= pages(R): a spilled tail; the
    pool's allocator places tails so, other adapters' tails sharing the pages). The kernel DMAs each page
    whole from its aligned row (``start - start % 8``), a spilled tail's next aligned page too, and uses of
    them only the tail's t rows: the pages' other rows are selected out, whatever they hold (Inf and NaN
    included); it reads nothing past the lane's last page. An int8 pool's row scales come
    from ``page_scales`` at the true pool rows: the tile of each used page, or the whole array where that
    is fewer tiles (:func:`scale_read_bytes`). ``typical_ranks``: the distinct adapters' ranks for the cost
    estimate (default: ``lanes`` adapters of rank R).
    """
    hidden, out_dim = x.shape[1], b_pool.shape[-1]
    num_slots = page_table.shape[0] // (pages(rank) + 1)
    int8 = page_scales is not None
    stride = a_pool.shape[1] if a_pool.ndim == 3 else 0  # stacked pools: rows per pool
    scale_rows = page_scales.shape[0] if int8 else 0
    pooled = Pooled(rank, int8, num_slots, scale_rows, stride, scale_rows // a_pool.shape[0] if stride else 0)
    block_sizes.check(hidden, out_dim)
    return _pooled_call(
        x, (a_pool, b_pool), base, meta, page_table, page_scales, pooled, scaling, block_sizes, lanes,
        interpret, vmem_limit_bytes, typical_ranks, name="xla_lora_pooled_shrink_expand",
    )  # fmt: skip


def _pooled_call(
    x: jax.Array,
    pools: tuple[jax.Array, ...],
    base: jax.Array,
    meta: LaneBlocks,
    page_table: jax.Array,
    page_scales: jax.Array | None,
    pooled: Pooled,
    scaling: float,
    block_sizes: BlockSizes,
    lanes: int,
    interpret: bool,
    vmem_limit_bytes: int | None,
    typical_ranks: tuple[int, ...] | None,
    name: str,
) -> jax.Array:
    """The pooled kernel's ``pallas_call`` on x [T_pad, width] and ``pools`` ((A, B), or (B,): :func:`pooled_expand`,
    x then ``lanes * Rp`` wide), with its cost estimate for ``typical_ranks`` (default: ``lanes`` adapters of the
    table's rank): the activations, the typical adapters' pages, the page table read whole and an int8 pool's scale
    tiles of those pages (or the whole array, where that is fewer), as one token block holds them in decode."""
    num_tokens, width = x.shape
    out_dim, rank, dtype = pools[-1].shape[-1], pooled.rank, x.dtype
    expand_only = len(pools) == 1
    if pooled.int8 and page_scales.shape[0] % SCALE_TILE_ROWS:
        raise ValueError(f"page_scales must hold whole tiles of {SCALE_TILE_ROWS} rows, got {page_scales.shape}")
    spec = grid_spec(num_tokens, width, out_dim, rank, pooled.num_slots, dtype, block_sizes, lanes, pooled, expand_only)
    spec.grid = (meta.num_active[0], spec.grid[1])
    kernel = functools.partial(
        _fused_kernel,
        lanes=lanes,
        stride=rank_stride(rank, dtype),
        per_block=max_chunks(block_sizes.tokens, pooled.num_slots, lanes) * lanes,
        scaling=scaling,
        pooled=pooled,
        expand_only=expand_only,
    )
    typical = typical_ranks or (rank,) * min(lanes, pooled.num_slots)
    table_bytes = table_read_bytes(page_table.size, typical, pooled.scale_rows if pooled.int8 else 0)
    estimate = pooled_cost_estimate(
        num_tokens, width, out_dim, typical, rank, dtype, block_sizes, lanes, pooled.int8, table_bytes, expand_only
    )
    prefetch = (meta.active, meta.chunks, meta.slots, meta.uniform, page_table, meta.num_active)
    return pl.pallas_call(
        kernel,
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct(base.shape, base.dtype),
        # base follows the scalar-prefetch arrays, code and x: untouched blocks keep it.
        input_output_aliases={len(prefetch) + 2: 0},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes or vmem_limit("v6e"),
        ),
        cost_estimate=estimate,
        interpret=interpret,
        name=name,
    )(*prefetch, meta.code.reshape(num_tokens, 1), x, base, *pools, *([] if page_scales is None else [page_scales]))


def pooled_expand_plan(
    num_tokens: int, out_dim: int, rank: int, num_slots: int, dtype, generation: str, int8: bool
) -> tuple[BlockSizes, int, bool]:
    """(BlockSizes, lanes, runs) of one :func:`pooled_expand` call: the pooled kernel's plan with no A (its x is
    ``lanes * Rp`` wide, ``BlockSizes.hidden``), ``runs`` False where B's pages cannot be DMA'd (Dout not
    lane-aligned) or no tiling fits VMEM: the caller then gathers the lanes' rows into slots for the slot expand."""
    lanes = lanes_for(rank, num_slots, dtype, generation)
    sizes, lanes, fits = _fit(
        num_tokens, padded_width(lanes * rank_stride(rank, dtype)), out_dim, rank, num_slots, dtype, generation
    )
    sizes = dataclasses.replace(sizes, hidden=lanes * rank_stride(rank, dtype))
    runs = fits and lane_aligned(LANE, out_dim)
    runs = runs and pooled_vmem_bytes(sizes, rank, num_slots, lanes, dtype, int8) <= vmem_limit(generation)
    return sizes, lanes, runs


def lane_placed(s: jax.Array, token_slots: jax.Array, page_table: jax.Array, rank: int, lanes: int) -> jax.Array:
    """[T, lanes * Rp]: each token's rank values ``s`` [T, R] where :func:`pooled_expand`'s kernel holds its lane's
    rank rows, in every lane's columns: value j at ``j``, or in the tail page (j >= 8q, r = 8q + t) at ``j + o``,
    o the tail's in-page offset (the kernel DMAs the aligned page, so the tail's rows lie o rows in, a spilled
    tail's on into the next page); zero at every other position (past the rank, other tenants' tail rows) and for
    tokens outside [0, L) (``token_slots`` [T]: each token's lane). Selects only: values past a lane's rank, Inf
    or NaN, reach nothing."""
    num_tokens = s.shape[0]
    per_lane = pages(rank)
    num_slots = page_table.shape[0] // (per_lane + 1)
    stride = rank_stride(rank, s.dtype)
    valid = (token_slots >= 0) & (token_slots < num_slots)
    slot = jnp.clip(token_slots, 0, num_slots - 1)
    ranks = jnp.where(valid, page_table[num_slots * per_lane + slot], 0)[:, None]  # [T, 1]
    whole = ranks - ranks % PAGE_ROWS  # the rows of the lane's whole pages, at their own positions
    tail_page = jnp.minimum(ranks[:, 0] // PAGE_ROWS, per_lane - 1)
    offset = (page_table[slot * per_lane + tail_page] % PAGE_ROWS)[:, None]
    position = jax.lax.broadcasted_iota(jnp.int32, (num_tokens, stride), 1)
    values = jnp.pad(s, ((0, 0), (0, stride + PAGE_ROWS - s.shape[1])))
    placed = jnp.where(position < whole, values[:, :stride], 0)
    in_tail = (position >= whole + offset) & (position < ranks + offset)
    for o in range(PAGE_ROWS):  # the tail's values, shifted by its offset (a static shift each)
        shifted = jnp.pad(values, ((0, 0), (o, 0)))[:, :stride]
        placed = jnp.where(in_tail & (offset == o), shifted, placed)
    return jnp.tile(placed, (1, lanes))


@functools.partial(
    jax.jit, static_argnames=("block_sizes", "lanes", "interpret", "vmem_limit_bytes", "rank", "typical_ranks")
)
def pooled_expand(
    x: jax.Array,  # [T_pad, lanes * Rp]: lane_placed(s, ...), the compute dtype
    b_pool: jax.Array,  # [P + 2, Dout], x's dtype or int8
    base: jax.Array,  # [T_pad, Dout], x's dtype
    meta: LaneBlocks,
    page_table: jax.Array,  # [L * pages(R) + L] int32, as pooled_shrink_expand's
    page_scales: jax.Array | None,  # int8 pools: [N] f32, b_scale of each row, N whole 1024-row tiles
    *,
    block_sizes: BlockSizes,
    lanes: int,
    rank: int,
    interpret: bool,
    vmem_limit_bytes: int | None = None,
    typical_ranks: tuple[int, ...] | None = None,
) -> jax.Array:  # [T_pad, Dout], base.dtype
    """:func:`pooled_shrink_expand`'s expand alone: ``base`` plus each token's rank values (given, ``x``: the
    token embedding's A rows, read per token from its own pool) times its lane's true-rank B rows, read from the
    pool a page at a time through the page table, with the same laning, selections and int8 handling (the
    scales here B's alone). ``x`` is :func:`lane_placed`'s layout, so the kernel multiplies it as it would its own
    x @ A^T; rows past a lane's rank and lanes no token uses are neither read nor multiplied."""
    width, expected = x.shape[1], lanes * rank_stride(rank, x.dtype)
    if width != expected or width != block_sizes.hidden:
        raise ValueError(f"x is {width} wide: expected lanes * Rp = {expected}")
    int8 = page_scales is not None
    pooled = Pooled(rank, int8, page_table.shape[0] // (pages(rank) + 1), page_scales.shape[0] if int8 else 0)
    return _pooled_call(
        x, (b_pool,), base, meta, page_table, page_scales, pooled, 1.0, block_sizes, lanes, interpret,
        vmem_limit_bytes, typical_ranks, name="xla_lora_pooled_expand",
    )  # fmt: skip
