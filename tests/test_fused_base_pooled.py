"""The one-pass base + LoRA kernel reading adapters straight from rank-row pools (``linear_lora_pooled``).

References: the op's torch reference on CPU tensors (``_linear_fused.pooled_reference``: per lane, its rows
``rows[l, :r]`` gathered by plain torch indexing), float64 numpy for the kernel called directly, and PEFT's
mixed batch for a patched model. The row tables are built by hand: mixed true ranks (4, 13, 16, 64) with
tails at in-page offsets 2 and 6, the second spilling into the next page, whose other rows belong to tenants
outside the batch and hold Inf/NaN.
"""

import copy
import inspect

import numpy as np
import pytest
import torch
from conftest import assert_close
from test_pool import (  # noqa: F401
    IDS,
    TARGETS,
    _expected,
    _forward,
    _int8_rounded,
    _row_bytes,
    _state,
    base_model,
    peft_model,
)

import torch_xla_lora as tl
from torch_xla_lora import pool
from torch_xla_lora.kernels import fused_base, pages
from torch_xla_lora.layers.linear import LinearWithLoRA
from torch_xla_lora.ops._linear_fused import linear_lora_pooled, pooled_reference

K, N, R, P = 256, 128, 64, 128  # in, out, the table's rank, the pools' data rows
#: Each lane's pool rows in rank order: rank 4 in a tail page at offset 2 (rows 40-41 a neighbour's), rank 13 =
#: one page + a 5-row tail from offset 6 of page 40 spilling into rows 48-50 of the next page (rows 51-55 a
#: neighbour's), rank 16 in two aligned pages, rank 64 in eight, and an unused lane (rank 0).
LANE_ROWS = [list(range(42, 46)), list(range(0, 8)) + list(range(46, 51)), list(range(8, 24)), list(range(56, 120)), []]
NEIGHBOURS = [40, 41, 51, 52, 53, 54, 55]  # rows of shared tail pages that belong to no lane of the batch
L = len(LANE_ROWS)
SCALING = 0.5


def _row_table() -> torch.Tensor:
    return torch.tensor([rows + [P] * (R - len(rows)) for rows in LANE_ROWS], dtype=torch.int32)


def _pools(int8: bool, dtype: torch.dtype, seed: int = 0):
    """(a_pool, b_pool, a_scale, b_scale): random rows, the zero row P, the neighbours' rows non-finite (int8: their
    scales), float pools in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(P + 2, K, generator=g) / 16
    b = torch.randn(P + 2, N, generator=g) / 4
    a[P], b[P] = 0, 0
    if not int8:
        a[NEIGHBOURS], b[NEIGHBOURS] = float("nan"), float("inf")
        return a.to(dtype), b.to(dtype), None, None
    a_scale, b_scale = a.abs().amax(1) / 127 + 1e-3, b.abs().amax(1) / 127 + 1e-3
    qa = torch.round(a / a_scale[:, None]).clamp(-127, 127).to(torch.int8)
    qb = torch.round(b / b_scale[:, None]).clamp(-127, 127).to(torch.int8)
    qa[NEIGHBOURS], qb[NEIGHBOURS] = 127, -127
    a_scale[NEIGHBOURS], b_scale[NEIGHBOURS] = float("inf"), float("nan")
    return qa, qb, a_scale, b_scale


def _lanes(num_tokens: int, g: torch.Generator) -> torch.Tensor:
    """Each token's lane: every lane of the batch, tokens outside [0, L), and the last 8+ tokens none (-1), so the
    CPU plan's second token block (32 tokens) holds no adapter."""
    lanes = torch.randint(-2, L + 2, (num_tokens,), generator=g, dtype=torch.int32)
    lanes[: 2 * L] = torch.arange(2 * L, dtype=torch.int32) % L
    lanes[32:] = -1
    return lanes


CASES = [  # backend, x dtype, int8 pools, int8 base
    ("pallas", torch.float32, False, False),
    ("pallas", torch.bfloat16, True, False),
    ("pallas", torch.float32, True, True),
    ("xla", torch.float32, True, False),
]


@pytest.mark.parametrize(("backend", "dtype", "int8", "int8_base"), CASES)
def test_op_reads_each_lane_at_its_true_rank(backend, dtype, int8, int8_base, xla_device):
    """The op on the XLA device ("pallas": the pooled kernel in interpret mode, lanes chunked 2 at a time at R = 64;
    "xla": the lanes gathered into slots) equals the torch reference on the same row table: mixed ranks, tails at
    in-page offsets beside a neighbour's Inf/NaN rows, tokens outside [0, L), a token block without adapters;
    with an int8 base (weight_scale) read as int8. Tokens without an adapter get exactly the base row."""
    g = torch.Generator().manual_seed(3)
    num_tokens = 40
    x = torch.randn(num_tokens, K, generator=g).to(dtype)
    weight = (torch.randn(N, K, generator=g) / 16).to(dtype)
    bias, weight_scale = torch.randn(N, generator=g).to(dtype), None
    if int8_base:
        weight_scale = torch.rand(N, generator=g) / 64 + 1e-3
        weight, bias = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8), None
    a_pool, b_pool, a_scale, b_scale = _pools(int8, dtype)
    lanes, rows = _lanes(num_tokens, g), _row_table()
    table = pool.page_table(rows.reshape(-1), L, P)
    page_scales = None
    if int8:
        page_scales = torch.zeros(pages.padded_scale_rows(P + 2))
        page_scales[: P + 2] = a_scale * b_scale
    cpu = (x, weight, bias, a_pool, b_pool, lanes, rows, a_scale, b_scale, SCALING, "out_in", backend)
    kwargs = {"pages": table, "page_scales": page_scales, "weight_scale": weight_scale}
    on_device = [None if t is None else t.to(xla_device) for t in cpu[:9]]
    moved = {k: None if t is None else t.to(xla_device) for k, t in kwargs.items()}
    out = linear_lora_pooled(*on_device, *cpu[9:], **moved).cpu()
    expected = pooled_reference(*cpu[:10], weight_scale=weight_scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, expected, dtype)
    base = pooled_reference(*cpu[:5], torch.full_like(lanes, -1), rows, a_scale, b_scale, weight_scale=weight_scale)
    outside = (lanes < 0) | (lanes >= L)
    assert_close(out[outside], base[outside], dtype)
    assert not torch.equal(out[~outside], base[~outside])


GRAD_CASES = [  # backend (None: CPU tensors), int8 pools, weight layout
    (None, False, "out_in"),
    ("xla", True, "in_out"),
    ("pallas", False, "out_in"),
    ("pallas", True, "in_out"),
]


@pytest.mark.parametrize(("backend", "int8", "layout"), GRAD_CASES, ids=str)
def test_gradients_of_a_plain_layer_reach_x_the_weight_the_bias_and_the_residual(backend, int8, layout, xla_device):
    """Autograd through the op for a plain layer (the pools serve, so take no gradient): dx = g W + scaling *
    (g B_l^T) A_l over each token's lane's true-rank rows (the op itself with the roles swapped), dW = g^T x in the
    weight's layout, d bias = the column sums of g, d residual = g; against float64 math on rows poisoned where no
    lane of the batch owns them, the kernel too (interpret mode)."""
    g = torch.Generator().manual_seed(4)
    num_tokens = 40
    x, residual = torch.randn(num_tokens, K, generator=g), torch.randn(num_tokens, N, generator=g)
    weight, bias = torch.randn(N, K, generator=g) / 16, torch.randn(N, generator=g)
    stored = weight if layout == "out_in" else weight.T.contiguous()
    a_pool, b_pool, a_scale, b_scale = _pools(int8, torch.float32)
    lanes, rows = _lanes(num_tokens, g), _row_table()
    grad = torch.randn(num_tokens, N, generator=g)
    device = torch.device("cpu") if backend is None else xla_device
    leaves = [t.to(device).requires_grad_() for t in (x, stored, bias, residual)]
    served = [None if t is None else t.to(device) for t in (a_pool, b_pool, lanes, rows, a_scale, b_scale)]
    table = pool.page_table(rows.reshape(-1), L, P).to(device)
    out = linear_lora_pooled(*leaves[:3], *served, SCALING, layout, backend or "auto", pages=table, residual=leaves[3])
    d_x, d_weight, d_bias, d_residual = torch.autograd.grad(out, leaves, grad.to(device))
    dense_a, dense_b = (p.double() for p in (a_pool, b_pool))
    if int8:
        dense_a, dense_b = dense_a * a_scale.double()[:, None], dense_b * b_scale.double()[:, None]
    expected = grad.double() @ weight.double()
    for t, lane in enumerate(lanes.tolist()):
        if 0 <= lane < L and LANE_ROWS[lane]:
            mine = LANE_ROWS[lane]
            expected[t] += SCALING * (dense_b[mine] @ grad[t].double()) @ dense_a[mine]
    assert torch.isfinite(d_x.cpu()).all()
    assert_close(d_x.cpu(), expected, torch.float32)
    d_w = grad.double().T @ x.double()
    assert_close(d_weight.cpu(), d_w if layout == "out_in" else d_w.T, torch.float32)
    assert_close(d_bias.cpu(), grad.double().sum(0), torch.float32)
    assert torch.equal(d_residual.cpu(), grad)


def _numpy_expected(x, w, a_rows, b_rows, lanes, scales=None):
    """float64: x W^T + scaling * (x A_l^T) B_l per token, A_l / B_l the lane's rows (int8: per-row scales)."""
    out = x @ w.T
    for t, lane in enumerate(lanes):
        if 0 <= lane < L and LANE_ROWS[lane]:
            picked = LANE_ROWS[lane]
            s = x[t] @ a_rows[picked].T
            if scales is not None:
                s = s * scales[picked]
            out[t] += SCALING * s @ b_rows[picked]
    return out


def test_kernel_tiles_chunks_and_int8_paged_scales():
    """The kernel called directly (interpret mode) with tiled reduction and output (128-wide tiles of K = 256 and
    N = 128 x 2), 16-token blocks in 8-row chunks and 2 lanes a chunk, on an int8 pool whose page scales are longer
    than ``SMEM_SCALE_ROWS``, so read a tile per used page (the op test's int8 cases read a 1024-row array whole):
    equal to float64 numpy; lanes whose rows are all finite stay finite beside the neighbours' Inf scales."""
    import jax.numpy as jnp

    from torch_xla_lora.kernels import visits
    from torch_xla_lora.kernels.block_sizes import BlockSizes

    out_dim = 2 * N
    rng = np.random.default_rng(1)
    qa = rng.integers(-127, 128, (P + 2, K)).astype(np.int8)
    qb = rng.integers(-127, 128, (P + 2, out_dim)).astype(np.int8)
    scales = (rng.random(P + 2) / 2**14).astype(np.float32)
    scales[NEIGHBOURS] = np.inf
    page_scales = np.zeros(pages.SMEM_SCALE_ROWS + pages.SCALE_TILE_ROWS, np.float32)
    page_scales[: P + 2] = scales
    x = rng.standard_normal((48, K)).astype(np.float32)
    w = (rng.standard_normal((out_dim, K)) / 16).astype(np.float32)
    lanes = np.array(
        [0, 1, 2, 3, 4, -1, 3, 0] * 2 + [-1] * 16 + [2, 2, 1, 9, 3, 3, 0, 1] * 2, np.int32
    )  # block 1: none
    sizes, lane_count = BlockSizes(tokens=16, hidden=128, out=128), 2
    meta = visits.build_lanes(jnp.asarray(np.where(lanes < L, lanes, -1)), L, sizes.tokens, lane_count)
    table = pool.page_table(_row_table().reshape(-1), L, P).numpy()
    out = fused_base.linear_lora(
        jnp.asarray(x),
        jnp.asarray(w),
        None,
        jnp.asarray(qa),
        jnp.asarray(qb),
        meta,
        scaling=SCALING,
        block_sizes=sizes,
        lanes=lane_count,
        layout="out_in",
        interpret=True,
        row_chunk_rows=8,
        page_table=jnp.asarray(table),
        page_scales=jnp.asarray(page_scales),
        pool_rank=R,
    )
    expected = _numpy_expected(x.astype(np.float64), w, qa.astype(np.float64), qb.astype(np.float64), lanes, scales)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_pricing_follows_the_true_ranks():
    """The pooled kernel's cost estimate, modelled time and step work count each adapter's whole pages at its true
    rank (int8: one byte an element plus its pages' scale tiles), whatever the table's rank R: the same batch at
    R = 64 and R = 128 reads the same adapter bytes, and int8 pools read fewer than bf16."""
    import types

    sizes = fused_base.BlockSizes(tokens=8, hidden=4096, out=4096)
    ranks = (4, 12, 16, 64)
    rows_read = (8 + 16 + 16 + 64) * (4096 + 4096)
    by_rank = {}
    for table_rank in (64, 128):
        for int8 in (False, True):
            pooled = pages.Pooled(table_rank, int8, 16, 1024 if int8 else 0)
            estimate = fused_base.pooled_cost_estimate(
                8, 4096, 4096, ranks, table_rank, "bfloat16", sizes, 4, pooled=pooled
            )
            base = fused_base.hbm_bytes(8, 4096, 4096, sizes, 2) + 4 * 8
            tables = 4 * 16 * (pages.pages(table_rank) + 1) + (4 * 1024 if int8 else 0)
            assert estimate.bytes_accessed - base - tables == rows_read * (1 if int8 else 2)
            by_rank[table_rank, int8] = fused_base.modelled_seconds(
                8, 4096, 4096, table_rank, sizes, 4, "bfloat16", "v6e", ranks=ranks, int8_pool=int8
            )
    assert by_rank[64, True] < by_rank[64, False]
    meta = types.SimpleNamespace(chunks=np.array([1]), slots=np.array([0, 1, 2, 3]))
    lane_ranks = dict(enumerate(ranks))
    overlapped, exposed, _ = fused_base.pooled_step_work(0, 0, 0, meta, lane_ranks, 4, sizes, 1, 2)
    assert (overlapped, exposed) == (rows_read * 2, 0)
    overlapped, exposed, _ = fused_base.pooled_step_work(0, 0, 0, meta, lane_ranks, 4, sizes, 1, 2, int8_pool=True)
    # Scale tiles: rank 4 a tail (1), 12 a page and a tail (2), 16 two pages (2), 64 eight pages contiguous (2).
    assert (overlapped, exposed) == (rows_read, 4 * 1024 * (1 + 2 + 2 + 2))


def test_opcheck_and_validation():
    """Schema, fake and dispatch (``torch.library.opcheck`` on CPU tensors: float pools with a bias, int8 pools
    under an int8 base with the decoder arrangement's operands) and typed errors."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, K, generator=g)
    lanes = torch.tensor([0, 1, -1, 3, 2, 7], dtype=torch.int32)
    rows = _row_table()
    for int8 in (False, True):
        a_pool, b_pool, a_scale, b_scale = _pools(int8, torch.float32)
        if int8:
            a_scale, b_scale = a_scale.nan_to_num(1.0, 1.0), b_scale.nan_to_num(1.0, 1.0)
            weight, bias = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8), None
            extra = {"weight_scale": torch.rand(N, generator=g), "residual": torch.randn(6, N, generator=g)}
            extra["up"] = torch.randn(6, K, generator=g)
        else:
            a_pool, b_pool = a_pool.nan_to_num(0.0, 0.0, 0.0), b_pool.nan_to_num(0.0, 0.0, 0.0)
            weight, bias, extra = torch.randn(N, K, generator=g), torch.randn(N, generator=g), {}
        args = (x, weight, bias, a_pool, b_pool, lanes, rows, a_scale, b_scale, SCALING)
        torch.library.opcheck(torch.ops.xla_lora.linear_lora_pooled.default, args, extra)
    a_pool, b_pool, a_scale, b_scale = _pools(True, torch.float32)
    weight = torch.randn(N, K)
    with pytest.raises(tl.ShapeError, match="a_scale"):  # int8 pools need their scales
        linear_lora_pooled(x, weight, None, a_pool, b_pool, lanes, rows)
    with pytest.raises(tl.ShapeError, match="weight"):  # an int8 weight needs its weight_scale
        linear_lora_pooled(x, weight.to(torch.int8), None, a_pool, b_pool, lanes, rows, a_scale, b_scale)
    with pytest.raises(tl.ShapeError, match="pages"):
        linear_lora_pooled(x, weight, None, a_pool, b_pool, lanes, rows, a_scale, b_scale, pages=rows.reshape(-1))
    with pytest.raises(tl.ShapeError, match="residual"):
        residual = torch.zeros(6, N + 1)
        linear_lora_pooled(x, weight, None, a_pool, b_pool, lanes, rows, a_scale, b_scale, residual=residual)
    with pytest.raises(tl.ArgumentTypeError):
        linear_lora_pooled(x, weight, None, a_pool, b_pool, lanes.tolist(), rows, a_scale, b_scale)


def test_patched_model_reads_the_pools_in_the_one_pass_kernel(base_model, peft_model, xla_device, monkeypatch):  # noqa: F811
    """A tiny Llama with a budget of int8 adapters, ``base_fusion=True`` and the Pallas backend: every linear layer
    runs the pooled one-pass kernel (nothing gathered into slots, the host-built page table read; the decoder
    arrangement's projections with their norm, SiLU and residual operands too), and a mixed
    batch with a base row equals PEFT's mixed batch on the factors with each rank row rounded to int8. (Float
    pools: the op test above; one model here keeps the file's compile time small.)"""
    import peft

    int8 = True

    from torch_xla_lora.ops import _linear_fused, _xla_native

    model = copy.deepcopy(base_model).to(xla_device)
    budget = (30 + 2) * _row_bytes(base_model, 4)
    config = tl.LoRAConfig(
        max_loras=3,
        max_rank=8,
        target_modules=TARGETS,
        memory_budget=budget,
        backend="pallas",
        base_fusion=True,
        weight_dtype="int8" if int8 else None,
    )
    lora = tl.patch_model(model, config)
    reference = copy.deepcopy(peft_model) if int8 else peft_model
    for name in ("a", "b", "c"):
        state, peft_config = _state(peft_model, name)
        lora.load_adapter(name, state_dict=state, config=peft_config)
        if int8:
            peft.set_peft_model_state_dict(reference, _int8_rounded(peft_model, name)[0], adapter_name=name)
    rows = ["a", "c", None, "b"]
    lora.set_batch(rows)
    linear = [n for n in lora.layers if not n.endswith("embed_tokens")]
    calls = []

    def gathered(*args, **kwargs):
        raise AssertionError("a linear layer gathered its lanes instead of reading the pools")

    lane_ranks = _xla_native.lane_ranks

    def derived(*args, **kwargs):
        # The embedding's B (pooled_expand on a decode batch: XLA ops) reads its lanes' ranks from the row table.
        if not any(frame.function == "pooled_expand" for frame in inspect.stack()):
            raise AssertionError("a linear layer derived the page table from the row table in its graph")
        return lane_ranks(*args, **kwargs)

    original = _linear_fused.linear_lora_pooled

    def counted(*args, **kwargs):
        calls.append((kwargs["pages"] is not None, kwargs.get("residual") is not None))
        return original(*args, **kwargs)

    monkeypatch.setattr(LinearWithLoRA, "slot_factors", gathered)  # (the embedding reads its pools its own way)
    monkeypatch.setattr(_xla_native, "gather_lanes", gathered)
    monkeypatch.setattr(_xla_native, "lane_ranks", derived)
    monkeypatch.setattr(_linear_fused, "linear_lora_pooled", counted)
    out = _forward(lora, IDS, xla_device)
    assert len(calls) == len(linear) and all(pages for pages, _ in calls)
    assert any(residual for _, residual in calls)  # the decoder arrangement's fused residual adds read pools too
    assert_close(out, _expected(reference, IDS, rows))
