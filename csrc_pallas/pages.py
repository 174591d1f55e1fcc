"""Reading adapters from a rank-row pool a page at a time: the pieces the pooled kernels share.

A pool holds every resident adapter's A and B rank rows, ``[P + 2, D]`` and ``[P + 2, Dout]`` (the P data
rows, then the zero row and a scratch row), in the compute dtype or int8. A batch's *lanes* (its distinct
adapters) are described by a page table built on the host (``pool.page_table``), read by the kernels as one
scalar-prefetch array: lane l's page p starts at entry ``l * pages(R) + p``, and its true rank follows the
page starts at entry ``L * pages(R) + l``.

An adapter of rank ``r = 8q + t`` owns ``q`` aligned pages and, if ``t > 0``, ``t`` contiguous rows at
in-page offset ``o`` of one more aligned page, whose other rows may belong to other adapters (a *tail
page*). A tail may run on into the next aligned page (``o + t > 8``, a *spilled* tail: the allocator packs
tails of 5 to 7 rows so, where the lane's VMEM rows have room for the extra page). So a page start may be
unaligned: the kernels DMA the aligned page that holds it (:func:`page_copy`: Mosaic slices a tiled HBM
array only along whole (8, 128) tiles) into the lane's page of the VMEM tile, a spilled tail's next
aligned page into the lane's next page (:meth:`PageTable.dma_pages`, :meth:`PageTable.dma_row`), and
take only the rows :func:`lane_rows` marks as the lane's. Every other row of a lane's
rows in VMEM (past its rank, another tenant's tail rows, an earlier chunk's values) must contribute
nothing: the kernels *select* them out (``jnp.where``), never multiply them by zero, since they may hold
Inf or NaN.

int8 pools: each page is staged as int8 (:func:`page_copy` into a staging buffer), converted in VMEM
(:func:`convert_pages`; exact: |q| <= 127), and each rank channel's ``a_scale * b_scale`` is folded into
the shrink (:func:`row_scales`), read from the pool's page-scale array ``[N]`` float32 (N whole
:data:`SCALE_TILE_ROWS` tiles): each used page's tile DMA'd into SMEM (:func:`scale_tile_step`; once for a
run of a lane's pages in one tile), or the whole array once where that is fewer tiles than pages
(:func:`choose_scale_mode`, priced by :func:`scale_read_bytes`).

Stacked pools ``[E, P + 2, W]`` (an experts layer's, one per expert, P + 2 a multiple of 8): the page table
numbers their rows as if flattened, every page lies inside one pool, and :func:`page_copy` DMAs it from the
3-D array in place (a v6e tiles an int8 array 32 rows deep when its row count is a multiple of 32, which the
flattened view's may be where each pool's is not). Their page scales interleave G pools (:func:`scale_group`:
8 where E allows) a block of ``1024 / G`` rows each per tile (:func:`scale_index`): a tile holds the same rows of
G experts, so the entries of one adapter on neighbouring experts (a chunk's lanes, sorted by expert) read one
tile between them (:func:`scale_tile_step`), where each expert's own tile would bring 4 KiB per entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

#: Rank rows per page: the unit a lane's rows are DMA'd in (Mosaic: "Slice shape along dimension 0 must
#: be aligned to tiling (8)"), and the alignment of every page the kernels DMA.
PAGE_ROWS = 8
#: Page scales a DMA moves at a time: Mosaic slices a 1-D float32 HBM array only along whole tiles of 1024
#: elements, so a used page's scales come with the 4 KiB tile they lie in.
SCALE_TILE_ROWS = 1024
#: Page-scale arrays of at most this many rows may be read whole into SMEM (128 KiB).
SMEM_SCALE_ROWS = 2**15
#: Most stacked pools whose page scales share a tile (:func:`scale_group`): a tile then holds 128 rows of each.
MAX_SCALE_GROUP = 8


class Pooled(NamedTuple):
    """A kernel's pooled source: A and B read from rank-row pools through the page table.

    Attributes:
      rank: table entries per lane (the pool's ``max_rank``): ``pages(rank)`` page starts each.
      int8: the pools hold int8 rows, scaled per row by the page-scale array.
      num_slots: the lanes L: the page table holds L * pages(R) page starts, then the L ranks.
      scale_rows: (int8) N, the page-scale array's length.
      stride: stacked pools [E, P + 2, W] (an experts layer's): P + 2, the rows of each (the page table's rows
        are numbered as if the pools were flattened); 0: one pool [P + 2, W].
      scale_stride: (int8, stacked) the page-scale entries of each pool: its P + 2 scales padded to whole
        blocks of ``1024 / scale_group(E)`` rows (:func:`scale_index` lays them out; a spilled tail never crosses
        such a block, as the allocator places them).
    """

    rank: int
    int8: bool
    num_slots: int = 0
    scale_rows: int = 0
    stride: int = 0
    scale_stride: int = 0

    @property
    def whole_scales(self) -> bool:
        """(int8) Whether the whole page-scale array may be read into SMEM (N <= :data:`SMEM_SCALE_ROWS`)."""
        return self.int8 and self.scale_rows <= SMEM_SCALE_ROWS


def pages(rank: int) -> int:
    """Pages of ``PAGE_ROWS`` rows that hold ``rank`` rank rows (a tail page counted whole)."""
    return -(-rank // PAGE_ROWS)


def padded_scale_rows(rows: int, pools: int = 1) -> int:
    """Page-scale entries of each of ``pools`` stacked pools of ``rows`` rows (one pool: N of its array): whole
    blocks of ``1024 / scale_group(pools)`` rows (one pool: whole :data:`SCALE_TILE_ROWS` tiles)."""
    block = SCALE_TILE_ROWS // scale_group(pools)
    return -(-rows // block) * block


def scale_group(pools: int) -> int:
    """How many of ``pools`` stacked pools interleave their page scales in a tile: the largest power of two up to
    :data:`MAX_SCALE_GROUP` that divides ``pools`` (1 for one pool)."""
    group = MAX_SCALE_GROUP
    while pools % group:
        group //= 2
    return group


def scale_index(pool, row, scale_stride: int, group: int):
    """The page-scale entry of row ``row`` of stacked pool ``pool`` (ints or arrays): tiles of ``group`` pools'
    blocks of ``B = 1024 / group`` rows, tile ``(pool // group) * (scale_stride / B) + row // B``, at ``(pool %
    group) * B + row % B`` in it. ``group`` 1: ``pool * scale_stride + row`` (each pool's scales in a block of
    whole tiles of its own)."""
    block = SCALE_TILE_ROWS // group
    tile = (pool // group) * (scale_stride // block) + row // block
    return tile * SCALE_TILE_ROWS + (pool % group) * block + row % block


def page_scales_of(product: jax.Array, stacked: int = 0) -> jax.Array:
    """The page-scale array of a pool's per-row ``a_scale * b_scale`` [rows] float32: padded to whole tiles; for
    ``stacked`` pools (E of them, rows = E * (P + 2)) laid out by :func:`scale_index`."""
    if not stacked:
        return jnp.pad(product, (0, padded_scale_rows(product.shape[0]) - product.shape[0]))
    per_pool = product.reshape(stacked, -1)
    stride, group = padded_scale_rows(per_pool.shape[1], stacked), scale_group(stacked)
    padded = jnp.pad(per_pool, ((0, 0), (0, stride - per_pool.shape[1])))
    block = SCALE_TILE_ROWS // group
    return padded.reshape(stacked // group, group, stride // block, block).transpose(0, 2, 1, 3).reshape(-1)


def flat_page_scales(page_scales: jax.Array, stacked: int, rows: int) -> jax.Array:
    """:func:`page_scales_of`'s inverse: the per-row scales of the ``rows`` pool rows (flattened, if
    ``stacked``) from a page-scale array, its padding dropped (a slice, which a gather of rows fuses)."""
    if not stacked:
        return page_scales[:rows]
    group = scale_group(stacked)
    stride, block = page_scales.shape[0] // stacked, SCALE_TILE_ROWS // group
    per_pool = page_scales.reshape(stacked // group, stride // block, group, block).transpose(0, 2, 1, 3)
    return per_pool.reshape(stacked, stride)[:, : rows // stacked].reshape(-1)


def scale_tiles(rank: int) -> int:
    """Page-scale tiles the kernels DMA for a lane of ``rank`` where they read its pages' tiles (mode 0), as the
    cost model prices them: one per run of its pages in one tile (:meth:`PageTable.opens_scale_run`): its whole
    pages, contiguous as the allocator takes them (``pool.PoolManager._place``), in at most two (one tile edge),
    its tail page in one more. In a fragmented pool whole pages may lie apart: at most one tile a page."""
    whole, tail = divmod(int(rank), PAGE_ROWS)
    return min(whole, 2) + (tail > 0)


def scale_read_bytes(page_count: int, scale_rows: int, tiles: int) -> int:
    """HBM bytes a kernel reads of a page-scale array of ``scale_rows`` rows for a call that DMAs ``page_count``
    pages whose scales lie in ``tiles`` runs (:func:`scale_tiles`): the whole array once (N <=
    :data:`SMEM_SCALE_ROWS` and no more tiles than the pages: :func:`choose_scale_mode` makes the same choice)
    or a tile per run."""
    whole = scale_rows // SCALE_TILE_ROWS
    if scale_rows <= SMEM_SCALE_ROWS and whole <= page_count:
        return 4 * scale_rows
    return 4 * SCALE_TILE_ROWS * tiles


def scale_buffer_rows(pooled: Pooled, lanes: int) -> int:
    """Float32 entries of a kernel's SMEM scale buffer: one chunk's page tiles, or the whole array."""
    return max(lanes * pages(pooled.rank) * SCALE_TILE_ROWS, pooled.scale_rows if pooled.whole_scales else 0)


def table_read_bytes(table_size: int, ranks, scale_rows: int) -> int:
    """HBM bytes of the tables a pooled kernel reads for one token block of adapters of ``ranks``: the page table
    (``table_size`` int32 entries, read whole into SMEM) and, for an int8 pool (``scale_rows`` > 0, its page-scale
    array's length), the used pages' scale tiles or the whole array (:func:`scale_read_bytes`)."""
    if not scale_rows:
        return 4 * table_size
    return 4 * table_size + scale_read_bytes(sum(map(pages, ranks)), scale_rows, sum(map(scale_tiles, ranks)))


def pool_rows_read(ranks) -> int:
    """Pool rows the kernels DMA for adapters of ``ranks``: whole pages (a tail page read whole; a spilled tail,
    which this does not know of, reads one page more)."""
    return sum(pages(int(rank)) * PAGE_ROWS for rank in ranks)


class PageTable:
    """The page table (an SMEM ref) as the kernels read it, for a pool of :class:`Pooled` ``pooled``."""

    def __init__(self, table_ref, pooled: Pooled):
        self.ref = table_ref
        self.per_lane = pages(pooled.rank)
        self.rank_offset = pooled.num_slots * self.per_lane
        self.stride, self.scale_stride = pooled.stride, pooled.scale_stride
        self.scale_group = scale_group(pooled.scale_rows // pooled.scale_stride) if pooled.scale_stride else 1

    def scale_row(self, row):
        """The page-scale entry of pool row ``row``: the row itself, or in stacked pools (their rows numbered as
        if flattened) its entry by :func:`scale_index`."""
        if not self.stride:
            return row
        return scale_index(row // self.stride, row % self.stride, self.scale_stride, self.scale_group)

    def scale_tile(self, slot, page):
        """The page-scale tile (:data:`SCALE_TILE_ROWS` entries) holding the scales of ``slot``'s page ``page``."""
        return self.scale_row(self.start(slot, page)) // SCALE_TILE_ROWS

    def opens_scale_run(self, slot, page):
        """Whether ``slot``'s page ``page`` is its first or lies in another scale tile than its page before: a run
        of pages in one tile (an adapter's whole pages, contiguous as the allocator takes them) brings that tile
        once, into the run's first page's place (:func:`scale_tile_step`)."""
        before = jnp.maximum(page - 1, 0)
        return (page == 0) | (self.scale_tile(slot, page) != self.scale_tile(slot, before))

    def rank(self, slot):
        """The true rank of ``slot`` (0 for a chunk's unused lanes, slot -1)."""
        return jnp.where(slot >= 0, self.ref[self.rank_offset + jnp.maximum(slot, 0)], 0)

    def pages(self, slot):
        """Pages that hold ``slot``'s true-rank rows (0 for slot -1)."""
        return (self.rank(slot) + PAGE_ROWS - 1) // PAGE_ROWS

    def start(self, slot, page):
        """The pool row of ``slot``'s page ``page``'s first rank row (unaligned in a tail page)."""
        return self.ref[jnp.maximum(slot, 0) * self.per_lane + page]

    def span(self, slot, page: int):
        """(in-page offset, rows) of ``slot``'s page ``page``: its rows from the aligned page on (0 rows past its
        rank; a spilled tail's run on into the next aligned page, offset + rows > 8)."""
        offset = self.start(slot, page) % PAGE_ROWS
        count = jnp.clip(self.rank(slot) - page * PAGE_ROWS, 0, PAGE_ROWS)
        return offset, count

    def spills(self, slot):
        """Whether ``slot``'s tail runs on into the next aligned page (False for slot -1 and whole pages)."""
        last = jnp.maximum(self.pages(slot) - 1, 0)
        offset = self.start(slot, last) % PAGE_ROWS
        return (self.rank(slot) > 0) & (offset + self.rank(slot) - last * PAGE_ROWS > PAGE_ROWS)

    def dma_pages(self, slot):
        """Aligned pages the kernels DMA for ``slot``: :meth:`pages`, plus one where its tail spills."""
        return self.pages(slot) + self.spills(slot).astype(jnp.int32)

    def dma_row(self, slot, page):
        """The first row of the aligned page DMA'd into ``slot``'s VMEM page ``page`` (< :meth:`dma_pages`): the
        page holding its page ``page``, or for the spilled tail's extra page the aligned page after the tail's."""
        tail = self.start(slot, jnp.maximum(self.pages(slot) - 1, 0))
        row = jnp.where(page < self.pages(slot), self.start(slot, jnp.minimum(page, self.per_lane - 1)), tail)
        return pl.multiple_of(row - row % PAGE_ROWS + jnp.where(page < self.pages(slot), 0, PAGE_ROWS), PAGE_ROWS)


def page_copy(source, row, columns, target, sem):
    """The DMA of the aligned page starting at pool row ``row`` (a multiple of 8), ``columns`` of it, to ``target``.

    ``source`` [P + 2, W], or stacked pools [E, P + 2, W] (an experts layer's, P + 2 a multiple of 8) whose rows
    are numbered as if flattened: row r is row ``r % (P + 2)`` of pool ``r // (P + 2)``. Stacked, the DMA reads
    the 3-D array in place, where the flattened view of an int8 one whose row count is a multiple of 32 would be
    tiled 32 rows deep on a v6e and refuse 8-row pages (``python -m torch_xla_lora.bench.page_dma``)."""
    if len(source.shape) == 3:
        stride = source.shape[1]
        within = pl.multiple_of(row % stride, PAGE_ROWS)
        return pltpu.make_async_copy(source.at[row // stride, pl.ds(within, PAGE_ROWS), columns], target, sem)
    return pltpu.make_async_copy(source.at[pl.ds(row, PAGE_ROWS), columns], target, sem)


def lane_page_target(dest, staging, lane: int, stride: int, page):
    """Where a lane's page lands: its rows of ``dest`` (``lane * stride + 8 * page``), or its int8 staging page."""
    if staging is None:
        return dest.at[pl.ds(pl.multiple_of(lane * stride + page * PAGE_ROWS, PAGE_ROWS), PAGE_ROWS)]
    return staging.at[lane * (stride // PAGE_ROWS) + page]


def for_lane_pages(table: PageTable, slots, step: Callable, *, spill: bool = False) -> None:
    """``step(slot, lane, page)`` for every page of every lane's true rank (``slots``: the chunk's lane slots);
    ``spill``: a spilled tail's extra page too (the pages DMA'd, :meth:`PageTable.dma_pages`)."""
    for lane, slot in enumerate(slots):

        def body(page, carry, slot=slot, lane=lane):
            step(jnp.maximum(slot, 0), lane, page)
            return carry

        jax.lax.fori_loop(0, table.dma_pages(slot) if spill else table.pages(slot), body, 0)


def convert_pages(table: PageTable, slots, staging, dest, stride: int) -> None:
    """int8 pages staged for the chunk's lanes, converted into their rows of ``dest`` (exact for |q| <= 127)."""
    for lane, slot in enumerate(slots):
        count = table.dma_pages(slot)
        for page in range(table.per_lane):

            @pl.when(page < count)
            def _convert(lane=lane, page=page):
                first = lane * stride + page * PAGE_ROWS
                values = staging[lane * (stride // PAGE_ROWS) + page].astype(jnp.float32)
                dest[first : first + PAGE_ROWS, :] = values.astype(dest.dtype)


def shares_scale_tile(table: PageTable, slots, lane: int, slot, page):
    """Per earlier lane i of the chunk (``slots[:lane]``): whether its page ``page`` is one of its own and lies in
    the same page-scale tile as ``slot``'s page ``page`` (lane ``lane``'s), whose tile that lane's place then
    holds: the chunk's lanes read a tile they share once (stacked pools' scales interleave neighbouring experts'
    rows, :func:`scale_index`; one pool's adapters may share a tile too)."""
    tile = table.scale_tile(slot, page)
    return [
        (page < table.pages(other)) & (table.scale_tile(jnp.maximum(other, 0), page) == tile) for other in slots[:lane]
    ]


def keeps_first_tile(table: PageTable, slot, previous) -> jax.Array:
    """Whether a chunk's lane 0 (``slot``) finds the tile of its page 0 in place 0 already: ``previous`` = (whether
    the chunk has one before it in this pass, that chunk's lane 0 slot), whose page 0 brought the same tile there
    (consecutive chunks of one adapter's entries on neighbouring experts)."""
    if previous is None:
        return jnp.bool_(False)
    has, before = previous
    same = table.scale_tile(jnp.maximum(before, 0), 0) == table.scale_tile(slot, 0)
    return has & (table.pages(before) > 0) & same


def scale_tile_step(
    scales_hbm, s_buf, table: PageTable, slots, slot, lane: int, page, sem, step: str, previous=None
) -> None:
    """``step`` ("start" or "wait") of the DMA of the page-scale tile of ``slot``'s page ``page`` into its place
    (chunk position ``lane``, of the chunk's ``slots``) of the SMEM buffer: only where the page opens a run of the
    lane's pages in one tile (:meth:`PageTable.opens_scale_run`), no earlier lane of the chunk brings the same
    tile for its page ``page`` (:func:`shares_scale_tile`) and, lane 0's page 0, the chunk before did not bring it
    (:func:`keeps_first_tile`, ``previous``); :func:`row_scales` reads the place that holds it."""
    row = table.scale_row(table.start(slot, page))
    first = pl.multiple_of(row // SCALE_TILE_ROWS * SCALE_TILE_ROWS, SCALE_TILE_ROWS)
    place = pl.multiple_of((lane * table.per_lane + page) * SCALE_TILE_ROWS, SCALE_TILE_ROWS)
    copy = pltpu.make_async_copy(
        scales_hbm.at[pl.ds(first, SCALE_TILE_ROWS)], s_buf.at[pl.ds(place, SCALE_TILE_ROWS)], sem
    )
    if lane == 0:  # no earlier lane: the chunk before's lane 0 may have brought its page 0's tile
        shared = (page == 0) & keeps_first_tile(table, slot, previous)
    else:
        shared = functools.reduce(jnp.logical_or, shares_scale_tile(table, slots, lane, slot, page))
    pl.when(table.opens_scale_run(slot, page) & ~shared)(getattr(copy, step))


def choose_scale_mode(pooled: Pooled, scales_hbm, s_buf, mode_ref, sem, count_pages: Callable) -> None:
    """Set ``mode_ref[0]``: 1, the whole page-scale array read into SMEM now (at most :data:`SMEM_SCALE_ROWS`
    rows and no more tiles than the call's pages, ``count_pages()``); else 0, each chunk DMAs its pages' tiles."""
    mode_ref[0] = 0
    if not pooled.whole_scales:
        return

    @pl.when(pooled.scale_rows // SCALE_TILE_ROWS <= count_pages())
    def _whole():
        mode_ref[0] = 1
        copy = pltpu.make_async_copy(scales_hbm, s_buf.at[pl.ds(0, pooled.scale_rows)], sem)
        copy.start()
        copy.wait()


def lane_rows(table: PageTable, slots, stride: int, shape, axis: int):
    """bool ``shape``: the positions along ``axis`` of a chunk's laned rows (lane ``l`` at ``l * stride``, its
    page p at ``+ 8p``) that hold one of the lane's own rank rows: rows ``[8p + o, 8p + o + min(8, r - 8p))``
    of the lane for each page p < pages(r) (a spilled tail's run on into the lane's next page). Rows past the
    rank, another tenant's rows of a tail page, and unused lanes: False."""
    position = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    own = jnp.zeros(shape, bool)
    for lane, slot in enumerate(slots):
        for page in range(table.per_lane):
            offset, count = table.span(slot, page)
            first = lane * stride + page * PAGE_ROWS + offset
            own = own | ((position >= first) & (position < first + count))
    return own


def row_scales(table: PageTable, slots, stride: int, width: int, s_buf, mode_ref):
    """[1, width] float32: each laned rank channel's ``a_scale * b_scale`` (int8 pools), read for the lanes' own
    rows only (1 elsewhere; the caller selects those channels out): from the whole array in SMEM (mode 1) or
    from the tile of its page (mode 0, :func:`scale_tile_step`): in the place of the first page of its run of
    pages in that tile, or where an earlier lane of the chunk brought it for the same page (a spilled tail never
    crosses a tile)."""
    column = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    out = jnp.ones((1, width), jnp.float32)
    places = []  # places[lane][page]: the SMEM place holding the tile of the lane's page
    for lane, slot in enumerate(slots):
        places.append([])
        for page in range(table.per_lane):
            offset, count = table.span(slot, page)
            aligned = table.scale_row(table.start(slot, page) - offset)  # the tail's rows: contiguous in a pool
            first = lane * stride + page * PAGE_ROWS
            place = jnp.int32(lane * table.per_lane + page)  # its own, where it opens a run and no lane shares
            shared = shares_scale_tile(table, slots, lane, jnp.maximum(slot, 0), page)
            for earlier in reversed(range(lane)):  # the first earlier lane that shares it
                place = jnp.where(shared[earlier], places[earlier][page], place)
            if page:  # a page in its page before's tile: that page's place
                place = jnp.where(table.opens_scale_run(slot, page), place, places[lane][page - 1])
            places[lane].append(place)

            def body(j, acc, place=place, aligned=aligned, first=first):
                row = aligned + j
                paged = place * SCALE_TILE_ROWS + row % SCALE_TILE_ROWS
                return jnp.where(column == first + j, s_buf[jnp.where(mode_ref[0] == 1, row, paged)], acc)

            out = jax.lax.fori_loop(offset, offset + count, body, out)
    return out
