"""``xla_lora::pooled_shrink_expand``: adapters read from rank-row pools at their true rank.

References: float64 torch math over each lane's true-rank rows, written here from the op's contract (pool
rows named by the table, int8 rows times their scales); PEFT's own mixed batch for the layers' wiring is in
tests/test_pool.py. Every pool here is poisoned where a lane's true rank ends: its unused rows hold NaN (A)
and Inf (B), int8 pools a NaN / Inf scale there, and so do the rows of lane 4 (an adapter no token uses),
whose tail shares an aligned page with lane 3's; lane 3's 5-row tail runs on from that page into the next (a
spilled tail), where lane 2's tail follows it; tails of lanes 0 and 1 share another page (at in-page offsets
4 and 0), so a result that used any row of a shared page but the lane's own, or missed a row of the spilled
tail, would be wrong.
"""

import pytest
import torch
from conftest import assert_close

import torch_xla_lora as tl
from torch_xla_lora import ops, pool
from torch_xla_lora.errors import ShapeError
from torch_xla_lora.kernels import fused

DATA_ROWS = 64  # 8 pages of 8 rows
LANES, MAX_RANK = 5, 24
RANKS = (20, 4, 12, 13, 3)  # lane 4 has rows (poisoned) but no token
#: lane -> (page, in-page offset) where its tail (rank % 8 rows) starts: page 7 shared by lanes 1 and 0; lane 3's
#: tail spills from page 5 (rows 5-7, after lane 4's and two free rows) into page 6 (rows 0-1), lane 2's
#: follows it (rows 2-5 of page 6; rows 6-7 free). The allocator's layout (``pool.PoolManager`` at granule 8).
TAILS = {1: (7, 0), 0: (7, 4), 4: (5, 0), 3: (5, 5), 2: (6, 2)}
IN, OUT, TOKENS = 256, 384, 20  # lane-aligned widths: the fused kernel runs them; 20 tokens pad to a block
SCALING = 0.5


def _pools(int8: bool, dtype: torch.dtype, seed: int = 0):
    """(a_pool, b_pool, rows [L, R] int32, a_scale, b_scale, dense A and B rows in float64 [P + 2, *])."""
    gen = torch.Generator().manual_seed(seed)
    zero = DATA_ROWS
    pages = torch.randperm(5, generator=gen).tolist()  # the whole pages 0-4: scattered, any order
    # The pool's last page holds lanes 1 and 0's tails: a DMA of 8 rows from lane 0's unaligned tail start (60)
    # would run past the pool (66 rows), so only the aligned page's rows can give the exact result.
    rows = torch.full((LANES, MAX_RANK), zero, dtype=torch.int32)
    used = set()
    for lane, rank in enumerate(RANKS):
        whole = [pages.pop() for _ in range(rank // 8)]
        lane_rows = [8 * page + k for page in whole for k in range(8)]
        if rank % 8:
            page, offset = TAILS[lane]
            lane_rows += [8 * page + offset + k for k in range(rank % 8)]
        rows[lane, :rank] = torch.tensor(lane_rows, dtype=torch.int32)
        used.update(lane_rows if lane != 4 else ())
    poisoned = torch.tensor([r not in used for r in range(DATA_ROWS)] + [False, True])  # scratch row too
    a = torch.randn(DATA_ROWS + 2, IN, generator=gen, dtype=torch.float64) / 8
    b = torch.randn(DATA_ROWS + 2, OUT, generator=gen, dtype=torch.float64) / 4
    a[zero], b[zero] = 0, 0
    if not int8:
        a_pool, b_pool = a.to(dtype), b.to(dtype)
        a_pool[poisoned], b_pool[poisoned] = float("nan"), float("inf")
        return a_pool, b_pool, rows, None, None, a_pool.double(), b_pool.double()
    a_pool, b_pool, a_scale, b_scale, dense_a, dense_b = _int8_pools(poisoned, gen)
    return a_pool, b_pool, rows, a_scale, b_scale, dense_a, dense_b


def _int8_pools(poisoned: torch.Tensor, gen: torch.Generator):
    """(a_pool, b_pool, a_scale, b_scale, dense A, dense B in float64): random int8 pools of ``len(poisoned)``
    rows (the zero row, second to last, zero) and their row scales, NaN (A) and Inf (B) at the ``poisoned`` rows."""
    total = poisoned.shape[0]
    a_pool = torch.randint(-127, 128, (total, IN), generator=gen, dtype=torch.int8)
    b_pool = torch.randint(-127, 128, (total, OUT), generator=gen, dtype=torch.int8)
    a_pool[total - 2], b_pool[total - 2] = 0, 0
    a_scale = torch.rand(total, generator=gen) / 500 + 1e-3
    b_scale = torch.rand(total, generator=gen) / 250 + 1e-3
    dense_a, dense_b = a_pool.double() * a_scale.double()[:, None], b_pool.double() * b_scale.double()[:, None]
    a_scale[poisoned], b_scale[poisoned] = float("nan"), float("inf")
    return a_pool, b_pool, a_scale, b_scale, dense_a, dense_b


def _batch(dtype: torch.dtype, blocks: bool = False, seed: int = 1):
    """(x, base, lanes): lanes 0-3 mixed with base rows (-1) and an out-of-range lane (5); lane 4 has no token.
    ``blocks``: 300 tokens (several token blocks), the first 128 all on lane 2."""
    gen = torch.Generator().manual_seed(seed)
    tokens = 300 if blocks else TOKENS
    x = torch.randn(tokens, IN, generator=gen).to(dtype)
    base = torch.randn(tokens, OUT, generator=gen).to(dtype)
    lanes = torch.tensor([0, 1, -1, 2, 3, 0, 5, 1, 2, 2, -1, 3, 0, 1, 1, 2, 0, -1, 3, 2], dtype=torch.int32)
    if blocks:
        lanes = torch.cat([torch.full((128,), 2, dtype=torch.int32), lanes.repeat(9)[:172]])
    return x, base, lanes


def _expected(x, base, lanes, rows, dense_a, dense_b):
    """float64: base + scaling * (A x) B over each token's lane's true-rank rows (not read from the op's code)."""
    out = base.double().clone()
    for t, lane in enumerate(lanes.tolist()):
        if 0 <= lane < LANES:
            mine = rows[lane, : RANKS[lane]].long()
            out[t] += SCALING * (dense_a[mine] @ x[t].double()) @ dense_b[mine]
    return out


CASES = [  # (backend, pool kind, compute dtype, several token blocks with host metadata)
    ("pallas", "float", torch.float32, True),
    ("pallas", "float", torch.bfloat16, False),
    ("pallas", "int8", torch.bfloat16, False),  # the page-scale array read whole (1 tile, fewer than the 8 pages')
    ("pallas", "int8 pages", torch.float32, False),  # a pool past SMEM_SCALE_ROWS: each used page's scale tile
    ("xla", "int8", torch.float32, False),
    ("xla", "float", torch.float32, True),  # a prefill: the slot op reading the visits' tiles from the pools
    ("xla", "int8", torch.bfloat16, True),
]


@pytest.mark.parametrize(("backend", "kind", "dtype", "blocks"), CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_op_reads_each_lane_at_its_true_rank(backend, kind, dtype, blocks, xla_device, monkeypatch):
    """The Pallas kernel (interpret mode off TPU) and the XLA-native op against float64 math: ranks 20, 4, 12,
    13 on scattered pages, tails sharing aligned pages at in-page offsets 0, 2, 4 and 5, one spilling into the
    next page (the module's layout), base rows, an
    out-of-range lane, a lane with rows but no token; the unused rows and that lane's (a neighbour tail in a
    shared page) poisoned with Inf / NaN. Base and out-of-range rows are exactly the base. ``blocks``:
    several token blocks, with the batch's host-built grouping of the slots the pool stands for
    (``ops.batch_metadata`` at rank R and L lanes), as the layers pass it. The XLA-native op never gathers every
    lane into slots (a prefill reads the tiles its visits name, a decode the packed true-rank rows)."""
    if backend == "xla":

        def gathered(*args, **kwargs):
            raise AssertionError("the XLA-native op gathered every lane into slots")

        monkeypatch.setattr("torch_xla_lora.ops._xla_native.gather_lanes", gathered)
    if kind == "int8 pages":  # the pool counts as too large for SMEM (its own shapes are traced afresh here)
        monkeypatch.setattr("torch_xla_lora.kernels.pages.SMEM_SCALE_ROWS", DATA_ROWS)
    a_pool, b_pool, rows, a_scale, b_scale, dense_a, dense_b = _pools(kind.startswith("int8"), dtype)
    x, base, lanes = _batch(dtype, blocks)
    args = [x, a_pool, b_pool, base, lanes, rows, a_scale, b_scale]
    metadata = None
    if blocks:
        metadata = ops.batch_metadata(lanes, [(IN, OUT)], MAX_RANK, LANES, dtype)[(IN, OUT)].to(xla_device)
    on_device = [None if t is None else t.to(xla_device) for t in args]
    pages = pool.page_table(rows, LANES, DATA_ROWS).to(xla_device)  # host-built, as the layers pass it
    page_scales = None  # "int8": computed by the op from a_scale and b_scale; "int8 pages": kept beside the pool
    if kind == "int8 pages":
        page_scales = torch.zeros(pool.page_scale_rows(DATA_ROWS)).index_copy(
            0, torch.arange(DATA_ROWS + 2), a_scale * b_scale
        )
        page_scales = page_scales.to(xla_device)
    kwargs = {"metadata": metadata, "pages": pages, "page_scales": page_scales}
    out = ops.pooled_shrink_expand(*on_device, scaling=SCALING, backend=backend, **kwargs).cpu()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, _expected(x, base, lanes, rows, dense_a, dense_b), dtype)
    outside = (lanes < 0) | (lanes >= LANES)
    assert torch.equal(out[outside], base[outside])
    # The CPU reference (the op on CPU tensors) reads the same rows and agrees.
    assert_close(ops.pooled_shrink_expand(*args, scaling=SCALING), out.double(), dtype)


#: lane -> its pages' first rows in a 2,048-row pool (whole pages, then the tail's row), across the page-scale tiles
#: of rows 0-1023 and 1024-2047: lane 0's three pages lie in tiles 0, 1, 0; lane 2's page and tail both in tile 1,
#: apart (its tail shares lane 1's page); lane 3's page in tile 0, its tail in tile 1; lane 4 (no token) in tile 0.
TILED_PAGES = {0: (1016, 1024, 24), 1: (1032,), 2: (2040, 1036), 3: (48, 2032), 4: (40,)}


def test_page_scale_tiles_are_read_once_per_run_of_pages_in_a_tile(xla_device, monkeypatch):
    """An int8 pool's page scales read a tile at a time (the whole array counted too large for SMEM): the kernel
    DMAs a lane's tile once for each run of its pages that lie in it, into the run's first page's place, and
    reads each page's scales from there; pages that go back to an earlier tile (lane 0: tiles 0, 1, 0), a tail
    apart from its lane's page in the same tile (lane 2) and a tail in another tile than its page (lane 3) each
    come out exact. Against float64 math on the lanes' rows; every other row of the pool is poisoned."""
    monkeypatch.setattr("torch_xla_lora.kernels.pages.SMEM_SCALE_ROWS", 1024)
    data_rows = 2048
    rows = torch.full((LANES, MAX_RANK), data_rows, dtype=torch.int32)
    for lane, starts in TILED_PAGES.items():
        rank = RANKS[lane]
        whole = [start + k for start in starts[: rank // 8] for k in range(8)]
        tail = [starts[-1] + k for k in range(rank % 8)] if rank % 8 else []
        rows[lane, :rank] = torch.tensor(whole + tail, dtype=torch.int32)
    used = {int(r) for lane in range(4) for r in rows[lane, : RANKS[lane]]}
    poisoned = torch.tensor([r not in used for r in range(data_rows)] + [False, True])
    gen = torch.Generator().manual_seed(6)
    a_pool, b_pool, a_scale, b_scale, dense_a, dense_b = _int8_pools(poisoned, gen)
    page_scales = torch.zeros(pool.page_scale_rows(data_rows))
    page_scales[: data_rows + 2] = a_scale * b_scale
    x, base, lanes = _batch(torch.float32)
    args = [x, a_pool, b_pool, base, lanes, rows, a_scale, b_scale]
    tables = {"pages": pool.page_table(rows, LANES, data_rows), "page_scales": page_scales}
    on_device = {key: t.to(xla_device) for key, t in tables.items()}
    out = ops.pooled_shrink_expand(
        *[t.to(xla_device) for t in args], scaling=SCALING, backend="pallas", **on_device
    ).cpu()
    assert torch.isfinite(out).all()
    assert_close(out, _expected(x, base, lanes, rows, dense_a, dense_b), torch.float32)


#: Stacked pools [E, P + 2, W] (an experts layer's): the module's layout in pool 2 of 3 pools of 488 rows, whose
#: rows 976 on, numbered as if flattened, put lane 3's spilled tail (pool rows 45-49) across row 1024, the edge of
#: a page-scale tile of the flattened rows, but of none of the pool's own.
STACKED_POOLS, STACKED_ROWS, STACKED_AT = 3, 488, 2


def _stacked(kind: str, dtype: torch.dtype):
    """(a_pool, b_pool [E, P + 2, W], rows numbered as flattened, a_scale, b_scale [E * (P + 2)], dense A and B
    flattened in float64): :func:`_pools`' rows moved into pool ``STACKED_AT``, every other row poisoned (NaN in A,
    Inf in B; int8: in the scales), the last pool's zero row zero."""
    int8 = kind.startswith("int8")
    a, b, rows, a_scale, b_scale, dense_a, dense_b = _pools(int8, dtype)
    total, first = STACKED_POOLS * STACKED_ROWS, STACKED_AT * STACKED_ROWS
    zero = total - 2  # the flattened pools' zero row: the last pool's row P
    moved = torch.where(rows == DATA_ROWS, zero, rows + first)
    placed = torch.arange(first, first + DATA_ROWS)

    def spread(values, fill):
        out = torch.full((total, *values.shape[1:]), fill, dtype=values.dtype)
        out[placed] = values[:DATA_ROWS]
        out[zero] = 0
        return out

    flat_a, flat_b = spread(dense_a, float("nan")), spread(dense_b, float("inf"))
    if int8:
        a_pool, b_pool = spread(a, 0), spread(b, 0)
        a_scale, b_scale = spread(a_scale, float("nan")), spread(b_scale, float("inf"))
        a_scale[zero], b_scale[zero] = 1, 1
        flat_a[zero], flat_b[zero] = 0, 0
    else:
        a_pool, b_pool = flat_a.to(dtype), flat_b.to(dtype)
    stacked = [t.reshape(STACKED_POOLS, STACKED_ROWS, -1) for t in (a_pool, b_pool)]
    return (*stacked, moved, a_scale, b_scale, flat_a, flat_b)


@pytest.mark.parametrize(
    ("backend", "kind", "dtype"),
    [("pallas", "int8 pages", torch.float32), ("pallas", "int8", torch.bfloat16), ("pallas", "float", torch.float32),
     ("xla", "int8 pages", torch.float32), ("xla", "int8", torch.float32)],
    ids=lambda v: str(v).removeprefix("torch."),
)  # fmt: skip
def test_stacked_pools_are_read_in_place_as_if_flattened(backend, kind, dtype, xla_device, monkeypatch):
    """Stacked pools [E, P + 2, W] (an experts layer's) with rows numbered as if flattened: the Pallas kernel
    (interpret mode) DMAs each page from the 3-D array in place (on a v6e an int8 pool flattened to a multiple of 32
    rows would be tiled 32 deep, ``tests/test_tpu_compile.py``) and reads the scales laid out per pool: in "int8
    pages" the page scales kept beside the pools as an experts layer keeps them (three pools: one to a tile, each
    pool's block of whole tiles; each page's tile read, not the whole array; the XLA-native path reads them too),
    in "int8" formed by the op from ``a_scale`` and ``b_scale``. Lane 3's spilled tail crosses row 1024 of the
    flattened rows, so a flattened scale layout would give some of its rows another tile's scales. Against float64
    math on the flattened rows; every row outside the lanes' is poisoned."""
    if kind == "int8 pages":
        monkeypatch.setattr("torch_xla_lora.kernels.pages.SMEM_SCALE_ROWS", DATA_ROWS)
    a_pool, b_pool, rows, a_scale, b_scale, dense_a, dense_b = _stacked(kind, dtype)
    x, base, lanes = _batch(dtype)
    args = [x, a_pool, b_pool, base, lanes, rows, a_scale, b_scale]
    pages = pool.page_table(rows, LANES, STACKED_POOLS * STACKED_ROWS - 2).to(xla_device)
    page_scales = None
    if kind == "int8 pages":
        kept = torch.zeros(STACKED_POOLS, pool.page_scale_rows(STACKED_ROWS - pool.SPARE_ROWS))
        kept[:, :STACKED_ROWS] = (a_scale * b_scale).reshape(STACKED_POOLS, STACKED_ROWS)
        page_scales = kept.reshape(-1).to(xla_device)
        with pytest.raises(ShapeError, match="3 blocks of whole 1024-row tiles covering the 488 rows"):
            flat = torch.zeros(pool.page_scale_rows(STACKED_POOLS * STACKED_ROWS), device=xla_device)  # not per pool
            ops.pooled_shrink_expand(*[t.to(xla_device) for t in args], page_scales=flat)
    on_device = [None if t is None else t.to(xla_device) for t in args]
    kwargs = {"pages": pages, "page_scales": page_scales}
    out = ops.pooled_shrink_expand(*on_device, scaling=SCALING, backend=backend, **kwargs).cpu()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, _expected(x, base, lanes, rows, dense_a, dense_b), dtype)
    assert_close(ops.pooled_shrink_expand(*args, scaling=SCALING), out.double(), dtype)  # the CPU reference
    with pytest.raises(ShapeError, match=r"b_pool's \[E, P \+ 2\] must equal"):
        ops.pooled_shrink_expand(*args[:2], b_pool[:2], *args[3:], scaling=SCALING)


#: Eight stacked pools (an experts layer's on eight experts: their page scales share tiles, 8 pools' blocks of 128
#: rows to a tile) of 136 rows; lane e is an adapter's entry on expert e, cut to a rank of its own: lanes 0-3 one
#: adapter's (the same pool rows in every pool: pages 1 and 3 whole, then a tail at row 40: scale tile 0), lanes
#: 4-7 another's (a tail at row 128: tile 1). With the kernel's chunks of 5 lanes here, lane 4 reads another tile
#: than the lanes before it in its chunk, and the next chunk's lane 0 another than the chunk before's.
GROUPED_POOLS, GROUPED_ROWS = 8, 136
GROUPED_RANKS = (20, 8, 16, 5, 5, 6, 3, 4)
GROUPED_LANE_ROWS = (
    [8 + k for k in range(8)] + [24 + k for k in range(8)] + [40 + k for k in range(4)],
    [128 + k for k in range(6)],
)


@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_entries_on_neighbouring_experts_read_the_scale_tiles_they_share(backend, xla_device, monkeypatch):
    """int8 stacked pools whose page scales interleave eight pools to a tile (``pool.page_scale_index``, as an
    experts layer keeps them): entries of one adapter on neighbouring experts lie in the same tiles, so a chunk's
    later lanes read the tile an earlier lane brought for the same page, and a chunk's lane 0 the tile the chunk
    before's lane 0 brought where it is the same (the kernel in tile mode: the array counted too large for SMEM),
    each at its own rank; entries whose tiles differ bring their own. Against float64 math on the flattened rows;
    every other row's scales are NaN / Inf. The XLA-native op reads the same kept scales through their layout."""
    monkeypatch.setattr("torch_xla_lora.kernels.pages.SMEM_SCALE_ROWS", GROUPED_ROWS)
    gen = torch.Generator().manual_seed(8)
    pools, stride = GROUPED_POOLS, GROUPED_ROWS
    total, zero = pools * stride, pools * stride - 2  # the last pool's zero row, flattened
    rows = torch.full((pools, MAX_RANK), zero, dtype=torch.int32)
    used = set()
    for lane, rank in enumerate(GROUPED_RANKS):
        mine = [lane * stride + row for row in GROUPED_LANE_ROWS[lane >= 4][:rank]]
        rows[lane, :rank] = torch.tensor(mine, dtype=torch.int32)
        used.update(mine)
    poisoned = torch.tensor([r not in used and r != zero for r in range(total)])
    a_flat, b_flat, a_scale, b_scale, dense_a, dense_b = _int8_pools(poisoned, gen)
    a_flat[zero], b_flat[zero], a_scale[zero], b_scale[zero] = 0, 0, 1, 1
    dense_a[zero], dense_b[zero] = 0, 0
    a_pool, b_pool = a_flat.reshape(pools, stride, IN), b_flat.reshape(pools, stride, OUT)
    entry, row = torch.arange(total) // stride, torch.arange(total) % stride
    page_scales = torch.zeros(pools * pool.page_scale_rows(stride - pool.SPARE_ROWS, pools))
    page_scales[pool.page_scale_index(entry, row, stride - pool.SPARE_ROWS, pools)] = a_scale * b_scale
    assert page_scales.shape == (2048,)  # two tiles: rows 0-127 and 128-135 of the eight pools
    x = torch.randn(TOKENS, IN, generator=gen)
    base = torch.randn(TOKENS, OUT, generator=gen)
    lanes = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, 3, 2, 1, 0, 7, 6, 5, 4, 8, 1, 0], dtype=torch.int32)
    args = [x, a_pool, b_pool, base, lanes, rows, a_scale, b_scale]
    tables = {"pages": pool.page_table(rows, pools, zero), "page_scales": page_scales}
    on_device = {key: t.to(xla_device) for key, t in tables.items()}
    out = ops.pooled_shrink_expand(
        *[t.to(xla_device) for t in args], scaling=SCALING, backend=backend, **on_device
    ).cpu()
    expected = base.double().clone()
    for t, lane in enumerate(lanes.tolist()):
        if 0 <= lane < pools:
            mine = rows[lane, : GROUPED_RANKS[lane]].long()
            expected[t] += SCALING * (dense_a[mine] @ x[t].double()) @ dense_b[mine]
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.float32)


GRAD_CASES = [  # (backend, int8 pool, tokens): CPU tensors (None), the packed decode, a prefill, the kernel
    (None, False, TOKENS),
    ("xla", True, TOKENS),
    ("xla", False, 300),
    ("pallas", True, TOKENS),
    ("pallas", False, 300),
]


@pytest.mark.parametrize(("backend", "int8", "tokens"), GRAD_CASES, ids=str)
def test_gradients_reach_the_inputs_and_the_base_through_the_pools(backend, int8, tokens, xla_device):
    """Autograd through ``pooled_shrink_expand`` (served adapters: the pools take no gradient): the inputs'
    gradient is each token's ``scaling * (g B_l^T) A_l`` over its lane's true-rank rows and the base's is ``g``,
    against float64 math on the module's poisoned pools (a gradient that read any row not a lane's own, or
    multiplied one by zero, would not be finite); out-of-range and base rows get none from the pools."""
    a_pool, b_pool, rows, a_scale, b_scale, dense_a, dense_b = _pools(int8, torch.float32)
    x, base, lanes = _batch(torch.float32, blocks=tokens > TOKENS)
    grad = torch.randn(base.shape, generator=torch.Generator().manual_seed(9))
    device = torch.device("cpu") if backend is None else xla_device
    leaves = [t.to(device).requires_grad_() for t in (x, base)]
    tables = [None if t is None else t.to(device) for t in (a_pool, b_pool, lanes, rows, a_scale, b_scale)]
    pool_a, pool_b, token_lanes, table, scale_a, scale_b = tables
    out = ops.pooled_shrink_expand(
        leaves[0], pool_a, pool_b, leaves[1], token_lanes, table, scale_a, scale_b, SCALING, backend or "auto"
    )
    d_x, d_base = torch.autograd.grad(out, leaves, grad.to(device))
    expected = torch.zeros(x.shape, dtype=torch.float64)
    for t, lane in enumerate(lanes.tolist()):
        if 0 <= lane < LANES:
            mine = rows[lane, : RANKS[lane]].long()
            expected[t] = SCALING * (dense_b[mine] @ grad[t].double()) @ dense_a[mine]
    assert torch.isfinite(d_x.cpu()).all()
    assert_close(d_x.cpu(), expected, torch.float32)
    assert torch.equal(d_base.cpu(), grad)


@pytest.mark.parametrize(("backend", "int8"), [(None, False), ("xla", True), ("pallas", False)], ids=str)
def test_pooled_expand_gives_the_base_and_the_rank_values_their_gradients(backend, int8, xla_device):
    """Autograd through ``pooled_expand``: the base's gradient is the output's (an unfrozen embedding's), and each
    token's rank values get ``g B_l^T`` over its lane's true-rank rows, zero past the rank (entries the forward
    ignores) and for tokens without a lane; against float64 math on the module's poisoned pool."""
    _, b_pool, rows, _, b_scale, _, dense_b = _pools(int8, torch.float32)
    _, base, lanes = _batch(torch.float32)
    s = torch.randn(TOKENS, MAX_RANK, generator=torch.Generator().manual_seed(10))
    grad = torch.randn(base.shape, generator=torch.Generator().manual_seed(11))
    device = torch.device("cpu") if backend is None else xla_device
    leaves = [t.to(device).requires_grad_() for t in (s, base)]
    tables = [None if t is None else t.to(device) for t in (b_pool, lanes, rows, b_scale)]
    out = ops.pooled_expand(leaves[0], tables[0], leaves[1], *tables[1:], backend=backend or "auto")
    d_s, d_base = torch.autograd.grad(out, leaves, grad.to(device))
    expected = torch.zeros(s.shape, dtype=torch.float64)
    for t, lane in enumerate(lanes.tolist()):
        if 0 <= lane < LANES:
            expected[t, : RANKS[lane]] = dense_b[rows[lane, : RANKS[lane]].long()] @ grad[t].double()
    assert torch.isfinite(d_s.cpu()).all()
    assert_close(d_s.cpu(), expected, torch.float32)
    assert torch.equal(d_base.cpu(), grad)


EXPAND_CASES = [  # (backend, int8 pool, compute dtype, tokens): the packed decode path on every backend, then longer
    ("xla", False, torch.float32, TOKENS),
    ("xla", True, torch.bfloat16, TOKENS),
    ("pallas", False, torch.bfloat16, TOKENS),
    ("xla", False, torch.float32, 300),  # the slot expand on the pool's tiles
    ("pallas", True, torch.float32, 300),  # the pooled kernel's expand (interpret mode): pages through the table
    ("pallas", False, torch.bfloat16, 300),
    ("pallas", "pages", torch.bfloat16, 300),  # int8, the scales a tile at a time (counted too large for SMEM)
]


@pytest.mark.parametrize(("backend", "int8", "dtype", "tokens"), EXPAND_CASES, ids=lambda v: str(v).split(".")[-1])
def test_pooled_expand_reads_each_lane_at_its_true_rank(backend, int8, dtype, tokens, xla_device, monkeypatch):
    """``pooled_expand`` (the embedding's B from its pool, each token's ``s`` given) against float64 math on the
    module's pools and lanes: each token's first r entries of ``s`` times its lane's true-rank rows of B. The
    entries of ``s`` past the lane's rank hold NaN, and so do the pool's unused rows and lane 4's (Inf: the
    scale of an int8 pool), so reading or multiplying any of them would not give a finite result. Base and
    out-of-range rows are exactly the base; no backend gathers every lane into slots (the longer batch on
    "pallas" runs the pooled kernel's expand: its tails at in-page offsets, one spilled, are placed by
    ``fused.lane_placed``); the CPU reference agrees."""

    def gathered(*args, **kwargs):
        raise AssertionError(f"{backend}: every lane gathered into slots")

    monkeypatch.setattr("torch_xla_lora.ops._xla_native.gather_lanes", gathered)
    if int8 == "pages":
        monkeypatch.setattr("torch_xla_lora.kernels.pages.SMEM_SCALE_ROWS", DATA_ROWS)
    _, b_pool, rows, _, b_scale, _, dense_b = _pools(bool(int8), dtype)
    _, base, lanes = _batch(dtype, blocks=tokens > TOKENS)
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(tokens, MAX_RANK, generator=gen).to(dtype)
    expected = base.double().clone()
    for t, lane in enumerate(lanes.tolist()):
        if 0 <= lane < LANES:
            s[t, RANKS[lane] :] = float("nan")
            expected[t] += s[t, : RANKS[lane]].double() @ dense_b[rows[lane, : RANKS[lane]].long()]
    args = [s, b_pool, base, lanes, rows, b_scale]
    out = ops.pooled_expand(*[None if t is None else t.to(xla_device) for t in args], backend=backend).cpu()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, expected, dtype)
    outside = (lanes < 0) | (lanes >= LANES)
    assert torch.equal(out[outside], base[outside])
    assert_close(ops.pooled_expand(*args), out.double(), dtype)


def test_opcheck_and_validation():
    """The schema, fake and dispatch (``torch.library.opcheck`` on CPU tensors, float and int8 pools) and the
    typed errors of bad arguments."""
    for int8 in (False, True):
        a_pool, b_pool, rows, a_scale, b_scale, *_ = _pools(int8, torch.float32)
        x, base, lanes = _batch(torch.float32)
        a_pool, b_pool = (p.nan_to_num(0.0, 0.0, 0.0) if not int8 else p for p in (a_pool, b_pool))
        if int8:
            a_scale, b_scale = a_scale.nan_to_num(1.0, 1.0), b_scale.nan_to_num(1.0, 1.0)
        args = (x, a_pool, b_pool, base, lanes, rows, a_scale, b_scale, SCALING, "auto", None)
        torch.library.opcheck(torch.ops.xla_lora.pooled_shrink_expand.default, args)
        grads = (x.clone().requires_grad_(), *args[1:3], base.clone().requires_grad_(), *args[4:])
        torch.library.opcheck(torch.ops.xla_lora.pooled_shrink_expand.default, grads)  # its autograd too
    a_pool, b_pool, rows, a_scale, b_scale, *_ = _pools(True, torch.float32)
    with pytest.raises(tl.ShapeError, match="a_scale"):  # int8 pools need their scales
        ops.pooled_shrink_expand(x, a_pool, b_pool, base, lanes, rows)
    with pytest.raises(tl.ShapeError, match="rows must be int32"):
        ops.pooled_shrink_expand(x, a_pool, b_pool, base, lanes, rows.long(), a_scale, b_scale)
    with pytest.raises(tl.ShapeError, match="b_pool"):
        ops.pooled_shrink_expand(x, a_pool, b_pool[:-1], base, lanes, rows, a_scale, b_scale)
    with pytest.raises(tl.ShapeError, match="a_pool"):  # a float pool in another dtype than the inputs
        ops.pooled_shrink_expand(x, a_pool.double(), b_pool.double(), base, lanes, rows)
    with pytest.raises(tl.ArgumentTypeError):
        ops.pooled_shrink_expand(x, a_pool, b_pool, base, lanes.tolist(), rows, a_scale, b_scale)
    with pytest.raises(tl.ArgumentError):
        ops.pooled_shrink_expand(x, a_pool, b_pool, base, lanes, rows, a_scale, b_scale, scaling=float("inf"))
    # pooled_expand: the same checks of its pool, scale, table and lanes, and of s against the table's ranks.
    s = torch.randn(TOKENS, MAX_RANK)
    for int8 in (False, True):
        _, pool_b, table, _, scale_b, *_ = _pools(int8, torch.float32)
        pool_b = pool_b if int8 else pool_b.nan_to_num(0.0, 0.0, 0.0)
        scale_b = None if scale_b is None else scale_b.nan_to_num(1.0, 1.0)
        torch.library.opcheck(torch.ops.xla_lora.pooled_expand.default, (s, pool_b, base, lanes, table, scale_b))
        grads = (s.clone().requires_grad_(), pool_b, base.clone().requires_grad_(), lanes, table, scale_b)
        torch.library.opcheck(torch.ops.xla_lora.pooled_expand.default, grads)  # its autograd too
    with pytest.raises(tl.ShapeError, match="b_scale"):
        ops.pooled_expand(s, b_pool, base, lanes, rows)
    with pytest.raises(tl.ShapeError, match="R of inputs"):
        ops.pooled_expand(s[:, :-1], b_pool, base, lanes, rows, b_scale)
    with pytest.raises(tl.ShapeError, match="Dout of base"):
        ops.pooled_expand(s, b_pool[:, :-1], base, lanes, rows, b_scale)
    with pytest.raises(tl.ArgumentTypeError):
        ops.pooled_expand(s, b_pool, base, lanes.tolist(), rows, b_scale)


class _Proj(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _int8_rounded(factor: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """``factor`` with each rank row rounded to int8 at its own symmetric scale (absmax / 127), in float64."""
    rows = factor.double() if rank_dim == 0 else factor.double().T
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    rounded = torch.round(rows / scale).clamp(-127, 127) * scale
    return rounded if rank_dim == 0 else rounded.T


@pytest.mark.parametrize(
    ("int8", "ranks"),
    [(False, (4, 12, 16)), (True, (4, 12, 16)), (False, (5, 5, 16))],
    ids=["float", "int8", "float-spilled"],
)
def test_pooled_layer_runs_the_kernel_on_allocated_pages(int8, ranks, xla_device, monkeypatch):
    """A patched linear layer with a budget and the Pallas backend: the pool places ranks 4, 12, 16 in their own
    4, 12, 16 rows (the 4-row tails of the rank-4 and rank-12 adapters sharing one aligned page, one of them at
    in-page offset 4; or two rank-5 adapters, the second's tail running on from the first's page into the next),
    the layer runs the pooled kernel on them (interpret mode off TPU) through the batch's
    host-built page table (nothing derived from the row table in the graph), and a mixed batch with a base
    row equals PEFT's own mixed batch (``adapter_names``); an int8 pool (``weight_dtype="int8"``, the page
    scales read in the kernel) equals PEFT's mixed batch with each rank row of the factors rounded to int8."""
    import copy
    import warnings

    import peft

    torch.manual_seed(0)
    model = _Proj()
    ranks = dict(zip("abc", ranks, strict=True))
    reference = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's warning about adapter names containing "a"
        for name, rank in ranks.items():
            config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], init_lora_weights=False)
            if reference is None:
                reference = peft.get_peft_model(copy.deepcopy(model), config, adapter_name=name)
            else:
                reference.add_adapter(name, config)
    states = {name: peft.get_peft_model_state_dict(reference, adapter_name=name) for name in ranks}
    budget = (48 + 2) * (IN + OUT) * 4
    config = tl.LoRAConfig(
        max_loras=3,
        max_rank=16,
        target_modules=["proj"],
        memory_budget=budget,
        backend="pallas",
        weight_dtype="int8" if int8 else None,
    )
    lora = tl.patch_model(_Proj().to(xla_device), config)
    lora.model.proj.base_layer.load_state_dict(model.proj.state_dict())
    for name, state in states.items():
        lora.load_adapter(name, state_dict=state, config=reference.peft_config[name])
    assert lora.manager.granule == fused.PAGE_ROWS
    rows = ["b", None, "a", "c", "b"]
    lora.set_batch(rows)
    tails = [lora.manager._rows[name][-(ranks[name] % 8) :] for name in ("a", "b")]
    if ranks["a"] == 4:
        assert tails[0][0] // 8 == tails[1][0] // 8 and {tails[0][0] % 8, tails[1][0] % 8} == {0, 4}
    else:  # one tail continues the other: rows 5-7 of its page and 0-1 of the next
        first, second = sorted(tails)
        assert first[0] % 8 == 0 and second == list(range(first[0] + 5, first[0] + 10))

    def gathered(*args, **kwargs):
        raise AssertionError("the layer gathered its lanes instead of reading the pools")

    from torch_xla_lora.ops import _xla_native

    def derived(*args, **kwargs):
        raise AssertionError("the layer derived the page table from the row table in its graph")

    monkeypatch.setattr(pool, "gather_slots", gathered)
    monkeypatch.setattr(_xla_native, "gather_lanes", gathered)
    monkeypatch.setattr(_xla_native, "lane_ranks", derived)  # the context's host-built page table is read instead
    x = torch.randn(len(rows), 3, IN)
    with torch.no_grad():
        out = lora.model(x.to(xla_device)).cpu()
    float_bytes = {n: r * (IN + OUT) * 4 for n, r in ranks.items()}
    used = lora.memory()["adapters"]
    assert used == float_bytes if not int8 else all(float_bytes[n] / 4 <= used[n] < float_bytes[n] / 3 for n in ranks)
    if int8:
        for name, state in states.items():
            rounded = {k: _int8_rounded(v, 0 if "lora_A" in k else 1).float() for k, v in state.items()}
            peft.set_peft_model_state_dict(reference, rounded, adapter_name=name)
    with torch.no_grad():
        expected = reference.eval()(x, adapter_names=[name or "__base__" for name in rows])
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("int8", [False, True])
def test_tpu_model_walk_reads_the_true_rank_pages(int8):
    """``bench.pooled_model``'s walk of the kernel's grid at Llama-3-8B's gate_proj on v6e (16 decode tokens on
    8 adapters of ranks 8/16/64, max_loras 16, max_rank 64): the DMA'd bytes are each used adapter's true-rank
    rows once over all output tiles, plus the tables: the page table (no [L, R] row table), and of an int8
    pool's page scales (1000 rows: one 1024-row tile) the whole array, fewer tiles than the 25 pages'. One
    adapter of rank 8 in a 6 GiB pool (3 tiles of page scales) reads its one page's tile instead. The slot
    kernel's walk reads max_rank rows per adapter."""
    import numpy as np

    from torch_xla_lora.bench import pooled_model, tpu_model

    chip, hidden, out_dim, max_loras, max_rank = tpu_model.CHIPS["v6e"], 4096, 14336, 16, 64
    ranks = pooled_model.batch_ranks(8)
    lanes = pooled_model.decode_lanes(16, 8)
    pool_rows = 1000
    cost = pooled_model.pooled_cost(chip, lanes, ranks, hidden, out_dim, max_rank, max_loras, int8, pool_rows)
    element = 1 if int8 else 2
    page_table = 4 * (max_loras * 8 + max_loras)  # 8 page starts and a rank per lane
    assert cost.manual_bytes == sum(ranks) * (hidden + out_dim) * element + page_table + (4 * 1024 if int8 else 0)
    rows = pooled_model.pool_rows(int8)
    assert not int8 or 2048 < rows + 2 <= 3072
    one = pooled_model.pooled_cost(chip, lanes[:1] * 0, (8,), hidden, out_dim, max_rank, max_loras, int8, rows)
    assert one.manual_bytes == 8 * (hidden + out_dim) * element + page_table + (4 * 1024 if int8 else 0)
    padded = tpu_model.fused_cost(chip, np.asarray(lanes), hidden, out_dim, max_rank, max_loras)
    assert padded.manual_bytes == len(ranks) * max_rank * (hidden + out_dim) * 2
    # The one-pass kernel reading the same pool (what base_fusion runs): the same adapter bytes, tables included,
    # by its own walk (its traffic less its traffic on a batch without adapters).
    one_pass, _ = pooled_model.one_pass_cost(chip, lanes, ranks, hidden, out_dim, max_rank, max_loras, int8, pool_rows)
    assert one_pass == cost.manual_bytes


def test_tpu_model_prices_moe_experts_at_the_routed_entries_true_ranks():
    """``bench.pooled_model --moe``: an experts layer's decode step (16 tokens on 8 adapters of ranks 8/16/64, top-2
    of Mixtral-8x7B's 8 experts) walks the pooled kernel over the routed rows' (lane, expert) entries: it DMAs each
    entry the batch routes to at its lane's true rank, plus the page table of all ``L * E`` entries, whatever
    ``max_loras``; padded slots read ``max_rank`` rows of each routed entry, and gathering adds every entry's rows.
    int8 pools: their bytes, plus the page scales as the kernel reads them (whole, or a tile per routed page)."""
    import jax.numpy as jnp

    from torch_xla_lora.bench import pooled_model, tpu_grid, tpu_model

    chip, shape = tpu_model.CHIPS["v6e"], tpu_grid.MOE_MODELS["mixtral-8x7b"]
    entries = pooled_model.moe_entries("mixtral-8x7b", 8)
    assert sorted(entries.tolist()) == sorted((t % 8) * 8 + (2 * t + k) % 8 for t in range(16) for k in range(2))
    assert list(entries % 8) == sorted(entries % 8)  # the rows sorted by expert, as the experts layer sorts them
    used = set(entries.tolist())
    ranks = pooled_model.batch_ranks(8)
    widths = ((shape.hidden, 2 * shape.intermediate), (shape.intermediate, shape.hidden))
    true = sum(ranks[e // 8] for e in used) * sum(h + o for h, o in widths) * 2
    rows = {loras: pooled_model.moe_step_rows(chip, "mixtral-8x7b", 8, loras, 64) for loras in (8, 16)}
    layers = pooled_model.MOE_STEP_MODELS["mixtral-8x7b"]
    for loras, row in rows.items():
        page_table = 4 * (loras * 8 * (8 + 1)) * len(widths)  # 8 page starts and a rank per entry, per projection
        assert row["true_bytes"] == true * layers
        assert row["pooled_bytes"] == (true + page_table) * layers
        assert row["padded_bytes"] == len(used) * 64 * sum(h + o for h, o in widths) * 2 * layers
        gather = loras * 8 * 64 * sum(h + o for h, o in widths) * 4 * layers
        assert row["gathered_bytes"] == row["padded_bytes"] + gather
    # int8 pools: one byte an element, and the page scales kept per expert (8 pools' blocks of 128 rows to a tile: 8
    # x 2,560 entries, read whole, fewer tiles than the step's pages); gathering reads the int8 rows and writes
    # bf16 slots.
    assert 2432 < pooled_model.pool_rows(True) + 2 <= 2560
    for loras in (8, 16):
        row = pooled_model.moe_step_rows(chip, "mixtral-8x7b", 8, loras, 64, int8=True)
        page_table = 4 * (loras * 8 * (8 + 1)) * len(widths)
        assert row["true_bytes"] == true // 2 * layers
        assert row["pooled_bytes"] == (true // 2 + page_table + 2 * 4 * 8 * 2560) * layers
        gather = loras * 8 * 64 * sum(h + o for h, o in widths) * 3 * layers
        assert row["gathered_bytes"] == rows[loras]["padded_bytes"] + gather
    # Qwen3-30B-A3B: page scales too many for SMEM, read a 4 KiB tile at a time: the one rank-8 adapter's 128
    # routed entries (one page each, experts 0-127 in order) run in chunks of 4 lanes (the plan's, both projections),
    # two chunks to a group of 8 experts sharing a tile: the first chunk's lane 0 brings it, its other lanes and the
    # next chunk read it: 16 tiles per projection, where a tile per entry (each expert's scales in a block of its
    # own) read 128.
    qwen = tpu_grid.MOE_MODELS["qwen3-30b-a3b"]
    for hidden, out_dim in ((qwen.hidden, 2 * qwen.intermediate), (qwen.intermediate, qwen.hidden)):
        assert fused.pooled_plan_call(128, hidden, out_dim, 64, 8 * 128, jnp.bfloat16, "v6e", True)[1] == 4
    row = pooled_model.moe_step_rows(chip, "qwen3-30b-a3b", 1, 8, 64, int8=True)
    widths = ((qwen.hidden, 2 * qwen.intermediate), (qwen.intermediate, qwen.hidden))
    true = 128 * 8 * sum(h + o for h, o in widths)  # 16 tokens x top-8: all 128 experts, rank 8
    page_table = 4 * (8 * 128 * (8 + 1)) * len(widths)
    layers = pooled_model.MOE_STEP_MODELS["qwen3-30b-a3b"]
    assert row["pooled_bytes"] == (true + page_table + 2 * 16 * 4096) * layers


@pytest.mark.parametrize("int8", [False, True])
def test_kernel_reads_the_host_page_table_not_the_row_table(int8):
    """The op's TPU function (traced for v6e, Llama-3-8B's k_proj, 64 lanes of max_rank 128) given the host-built
    page table reads nothing of the [L, R] row table (the 32 KiB it read per projection before), and given an
    int8 pool's page scales, nothing of its two whole scale arrays (the kernel DMAs the used pages' tiles);
    without them it derives them from the row table and the scales, which are then read. The table is what
    ``pool.page_table`` builds: each lane's page starts, then its true rank."""
    import jax
    import jax.numpy as jnp
    from jax.extend.core import Var

    from torch_xla_lora.ops import _jax

    lanes, max_rank, hidden, out_dim, rows = 64, 128, 4096, 1024, 1000
    element = jnp.int8 if int8 else jnp.bfloat16
    shapes = [((16, hidden), jnp.bfloat16), ((rows + 2, hidden), element), ((rows + 2, out_dim), element)]
    shapes += [((16, out_dim), jnp.bfloat16), ((16,), jnp.int32), ((lanes, max_rank), jnp.int32)]
    shapes += [((rows + 2,), jnp.float32)] * (2 if int8 else 0)
    for with_pages in (True, False):
        args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
        args += [jax.ShapeDtypeStruct((lanes * fused.pages(max_rank) + lanes,), jnp.int32)] * with_pages
        args += [jax.ShapeDtypeStruct((pool.page_scale_rows(rows),), jnp.float32)] * (with_pages and int8)
        fn = _jax.pooled_shrink_expand_fn(
            "pallas", "v6e", SCALING, int8, False, with_pages=with_pages, with_page_scales=with_pages
        )
        traced = jax.make_jaxpr(fn)(*args).jaxpr
        read = {v for eqn in traced.eqns for v in eqn.invars if isinstance(v, Var)}
        assert (traced.invars[5] in read) is not with_pages  # the row table
        if int8:  # a_scale, b_scale
            assert all((v in read) is not with_pages for v in traced.invars[6:8])
    table = torch.full((3, 16), 99, dtype=torch.int32)
    table[0, :11] = torch.arange(40, 51)
    table[2, :3] = torch.tensor([8, 99, 10])  # an entry naming the zero row inside the rank: read, as zeros
    assert pool.page_table(table.reshape(-1), 3, 99).tolist() == [40, 48, 99, 99, 8, 99, 11, 0, 3]


@pytest.mark.parametrize("few", [False, True], ids=["chunks", "narrow"])
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_xla_decode_reads_the_used_lanes_true_rank_rows_in_chunks(int8, few, xla_device):
    """The XLA-native op on a decode batch (``_xla_native.PACKED_MAX_TOKENS`` tokens or fewer) against float64
    math: 16 lanes of ranks 1 to 64 on scattered rows (the CPU allocator's granule 1), 295 rows among the
    lanes the batch uses, so their packed rows fill three chunks of 128 columns and a lane straddles each
    chunk boundary; two lanes with rows but no token, base rows and an out-of-range lane. ``few``: only four
    lanes used (ranks 8, 16, 1, 5: 30 rows, the one chunk of ``NARROW_COLUMNS``). Every row that is
    not a used lane's true-rank row holds NaN (A) and Inf (B) (int8: its scales), so reading any of them, or
    multiplying one into another lane's column, would not give a finite result."""
    from torch_xla_lora.ops import _xla_native

    gen = torch.Generator().manual_seed(3)
    ranks = [64, 8, 8, 16, 64, 1, 33, 8, 16, 8, 64, 5, 8, 16, 40, 8]
    unused = set(range(16)) - {1, 3, 5, 11} if few else {4, 9}
    lanes_count, max_rank, data_rows, tokens = len(ranks), 64, 512, _xla_native.PACKED_MAX_TOKENS
    zero = data_rows
    order = torch.randperm(data_rows, generator=gen).tolist()
    rows = torch.full((lanes_count, max_rank), zero, dtype=torch.int32)
    for lane, rank in enumerate(ranks):
        rows[lane, :rank] = torch.tensor([order.pop() for _ in range(rank)], dtype=torch.int32)
    used_rows = {r for lane in range(lanes_count) if lane not in unused for r in rows[lane, : ranks[lane]].tolist()}
    used_count = sum(ranks[lane] for lane in range(lanes_count) if lane not in unused)
    assert used_count == 30 if few else used_count == 295
    assert (used_count <= _xla_native.NARROW_COLUMNS) is few
    poisoned = torch.tensor([r not in used_rows for r in range(data_rows)] + [False, True])
    if int8:
        a_pool, b_pool, a_scale, b_scale, dense_a, dense_b = _int8_pools(poisoned, gen)
    else:
        dense_a = torch.randn(data_rows + 2, IN, generator=gen, dtype=torch.float64) / 8
        dense_b = torch.randn(data_rows + 2, OUT, generator=gen, dtype=torch.float64) / 4
        dense_a[zero], dense_b[zero] = 0, 0
        a_pool, b_pool = dense_a.float(), dense_b.float()
        a_pool[poisoned], b_pool[poisoned] = float("nan"), float("inf")
        a_scale = b_scale = None
    x = torch.randn(tokens, IN, generator=gen)
    base = torch.randn(tokens, OUT, generator=gen)
    choices = [lane for lane in range(lanes_count) if lane not in unused] + [-1, lanes_count]
    lanes = torch.tensor([choices[t % len(choices)] for t in range(tokens)], dtype=torch.int32)
    lanes = lanes[torch.randperm(tokens, generator=gen)]
    expected = base.double().clone()
    for t, lane in enumerate(lanes.tolist()):
        if 0 <= lane < lanes_count:
            mine = rows[lane, : ranks[lane]].long()
            expected[t] += SCALING * (dense_a[mine] @ x[t].double()) @ dense_b[mine]
    args = [x, a_pool, b_pool, base, lanes, rows, a_scale, b_scale]
    out = ops.pooled_shrink_expand(
        *[None if t is None else t.to(xla_device) for t in args], scaling=SCALING, backend="xla"
    ).cpu()
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.float32)
    outside = (lanes < 0) | (lanes >= lanes_count)
    assert torch.equal(out[outside], base[outside])


def test_xla_bytes_do_not_grow_with_max_loras_and_max_rank():
    """XLA:CPU's cost analysis of the XLA-native op's function, a decode (16 tokens) and a prefill (65, one past the
    packed path): with the pools, tokens and widths fixed, a [128, 64] row table (128 lanes of max_rank 64) costs
    within 5% of an [8, 32] one's bytes (the analysis counts a decode chunk's gather of pool rows as the whole pool,
    a fixed size, and a prefill's tiles the visits name: not the table's lanes).
    Gathering the larger table's lanes into slots for the prefill, as the op did, read 4.5x the smaller's. The
    same for ``pooled_expand``'s decode (the embedding's B), within 10%."""
    import jax
    import jax.numpy as jnp

    from torch_xla_lora.ops import _jax

    data_rows, hidden, out_dim = 4096, 1024, 1024

    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])  # XLA:CPU's analysis, on a TPU host too

    def bytes_accessed(fn, shapes) -> float:
        specs = [jax.ShapeDtypeStruct(shape, dtype, sharding=cpu) for shape, dtype in shapes]
        analysis = jax.jit(fn).lower(*specs).compile().cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["bytes accessed"]

    def accessed(lanes: int, max_rank: int, tokens: int) -> float:
        shapes = [((tokens, hidden), jnp.float32), ((data_rows + 2, hidden), jnp.float32)]
        shapes += [((data_rows + 2, out_dim), jnp.float32), ((tokens, out_dim), jnp.float32)]
        shapes += [((tokens,), jnp.int32), ((lanes, max_rank), jnp.int32)]
        return bytes_accessed(_jax.pooled_shrink_expand_fn("xla", "cpu", SCALING, False, False), shapes)

    def expand_accessed(lanes: int, max_rank: int, tokens: int) -> float:  # pooled_expand: the embedding's B
        shapes = [((tokens, max_rank), jnp.float32), ((data_rows + 2, out_dim), jnp.float32)]
        shapes += [((tokens, out_dim), jnp.float32), ((tokens,), jnp.int32), ((lanes, max_rank), jnp.int32)]
        # s [T, R] grows with max_rank by construction: the pool's bytes are what must not.
        return bytes_accessed(_jax.pooled_expand_fn("xla", "cpu", False), shapes) - 4 * tokens * max_rank

    from torch_xla_lora.ops import _xla_native

    for tokens in (16, _xla_native.PACKED_MAX_TOKENS + 1):
        assert accessed(128, 64, tokens) <= 1.05 * accessed(8, 32, tokens)
    # The decode of pooled_expand alone reads far less beside the table: its packing's int32 index arrays (a few
    # per table entry) are what grows with the table.
    assert expand_accessed(128, 64, 16) <= 1.10 * expand_accessed(8, 32, 16)


def test_decode_bytes_floor_of_xla_cpu_cost_analysis():
    """``bench memory --decode-bytes --floor``, the measure's floor the docs cite: XLA:CPU's cost analysis counts a
    few pool rows read by a dynamic slice and multiplied at exactly 3x their bytes (sliced out, written, read by
    the dot: the formulations of docs/performance.md's decode-bytes table cannot reach 1.1x by that measure) and
    the same rows gathered by number at the whole pool's bytes (64x here, plus the slice and dot's 2x)."""
    from torch_xla_lora.bench import decode_bytes

    counted = decode_bytes.floor(hidden=256, pool_rows=512, rank=8, tokens=4)
    assert counted["dynamic slice"] == pytest.approx(3.0)
    assert counted["gather"] >= 512 / 8
