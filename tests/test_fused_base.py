"""The base matmul and multi-LoRA in one op (``linear_lora``): kernel, both backends, TPU lowering, layers.

The op grid is sampled, not crossed: each case varies the token count (decode, prefill, not a
multiple of the token block), whether K and N divide the tiles, dtype, weight layout, bias and
the adapter mix, and every case runs on both backends.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from jax import export as jax_export
from test_layers import (  # noqa: F401
    GPT2_TARGETS,
    LLAMA_LORA,
    LLAMA_MIXES,
    gpt2_case,
    llama_case,
    logits,
    patch,
    peft_logits,
)

import torch_xla_lora as tl
from torch_xla_lora import reference
from torch_xla_lora.bench import tpu_model
from torch_xla_lora.kernels import fused_base, visits
from torch_xla_lora.kernels import reference as jnp_reference
from torch_xla_lora.kernels.block_sizes import BlockSizes

BACKENDS = ["xla", "pallas"]


def _indices(pattern: str, num_tokens: int, num_slots: int, g: torch.Generator) -> torch.Tensor:
    if pattern == "uniform":
        return torch.full((num_tokens,), num_slots - 1, dtype=torch.int32)
    if pattern == "none":
        return torch.full((num_tokens,), -1, dtype=torch.int32)
    if pattern == "out_of_range":
        return torch.randint(num_slots, num_slots + 3, (num_tokens,), generator=g, dtype=torch.int32) * (
            1 - 2 * (torch.arange(num_tokens) % 2).int()
        )
    if pattern == "mixed":
        return torch.randint(-2, num_slots + 2, (num_tokens,), generator=g, dtype=torch.int32)
    if pattern == "requests":  # prefill: each request's tokens together
        return (torch.arange(num_tokens, dtype=torch.int32) * 4 // num_tokens) * max(1, num_slots // 4)
    raise ValueError(pattern)


def _operands(num_tokens, hidden, out_dim, rank, num_slots, dtype, layout, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w_shape = (out_dim, hidden) if layout == "out_in" else (hidden, out_dim)
    w = (torch.randn(*w_shape, generator=g) / math.sqrt(hidden)).to(dtype)
    b = torch.randn(out_dim, generator=g).to(dtype) if bias else None
    a = (torch.randn(num_slots, rank, hidden, generator=g) / math.sqrt(hidden)).to(dtype)
    lb = (torch.randn(num_slots, rank, out_dim, generator=g) / math.sqrt(rank)).to(dtype)
    return x, w, b, a, lb, g


def _op(device, x, w, b, a, lb, idx, layout, backend, scaling=0.5):
    moved = [None if t is None else t.to(device) for t in (x, w, b, a, lb, idx)]
    return tl.linear_lora(*moved, scaling, layout, backend).cpu()


CASES = [  # (T, K, N, rank, L, dtype, layout, bias, pattern)
    (1, 128, 256, 16, 3, torch.float32, "out_in", True, "mixed"),  # decode, one token
    (5, 1000, 200, 16, 8, torch.float32, "in_out", True, "mixed"),  # K, N not multiples of 128 (Conv1D)
    (72, 256, 384, 16, 12, torch.float32, "out_in", False, "requests"),  # prefill, contiguous requests
    (300, 256, 128, 64, 64, torch.float32, "in_out", False, "mixed"),  # T not a block multiple, many slots, rank 64
    (48, 512, 256, 16, 6, torch.bfloat16, "out_in", True, "uniform"),  # every block one adapter
    (40, 256, 128, 8, 4, torch.bfloat16, "in_out", True, "mixed"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "out_dim", "rank", "num_slots", "dtype", "layout", "bias", "pattern"), CASES
)
def test_matches_reference(
    num_tokens, hidden, out_dim, rank, num_slots, dtype, layout, bias, pattern, backend, xla_device
):
    x, w, b, a, lb, g = _operands(num_tokens, hidden, out_dim, rank, num_slots, dtype, layout, bias)
    idx = _indices(pattern, num_tokens, num_slots, g)
    out = _op(xla_device, x, w, b, a, lb, idx, layout, backend)
    assert out.dtype == dtype
    assert_close(out, reference.linear_lora(x, w, b, a, lb, idx, 0.5, layout))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "out_dim"),
    [(8, 256, 128), (72, 256, 384), (5, 1000, 200)],
    ids=["decode", "prefill", "unaligned"],
)
def test_host_metadata_matches_reference(num_tokens, hidden, out_dim, backend, xla_device):
    """With the batch's host-built metadata (set_batch(..., seq_len=...)): used where the plans agree."""
    x, w, b, a, lb, g = _operands(num_tokens, hidden, out_dim, 16, 6, torch.float32, "out_in", True, seed=2)
    idx = _indices("mixed", num_tokens, 6, g)
    meta = tl.ops.batch_metadata(idx, [(hidden, out_dim)], 16, 6, torch.float32)[(hidden, out_dim)]
    moved = [t.to(xla_device) for t in (x, w, b, a, lb, idx)]
    out = tl.linear_lora(*moved, 0.5, "out_in", backend, meta.to(xla_device)).cpu()
    assert_close(out, reference.linear_lora(x, w, b, a, lb, idx, 0.5, "out_in"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["out_of_range", "mixed"])
def test_rows_without_adapter_are_exactly_the_base(pattern, backend, xla_device):
    """Tokens with no adapter (or an index outside [0, L)) get exactly the op's base row, and it equals x W^T + b."""
    x, w, b, a, lb, g = _operands(40, 256, 128, 16, 4, torch.float32, "out_in", True, seed=1)
    idx = _indices(pattern, 40, 4, g)
    out = _op(xla_device, x, w, b, a, lb, idx, "out_in", backend)
    base = _op(xla_device, x, w, b, a, lb, torch.full((40,), -1, dtype=torch.int32), "out_in", backend)
    no_adapter = (idx < 0) | (idx >= 4)
    assert no_adapter.any()
    assert torch.equal(out[no_adapter], base[no_adapter])
    assert_close(base, x @ w.T + b)


@pytest.mark.parametrize(
    ("layout", "bias", "weight"),
    [("out_in", True, "float"), ("in_out", False, "float"), ("out_in", True, "int8"), ("out_in", False, "fused")],
)
def test_kernel_with_tiled_reduction_and_output_in_row_chunks(layout, bias, weight):
    """Several reduction and output tiles (K = 2 tiles, N = 3 tiles): the shrink accumulates across k; each
    32-token block is computed in two row chunks of 16 (base product, shrink, the write's bias and scales,
    the expand of each of a block's lane chunks). Blocks: one without adapters, one of a single adapter,
    two mixed ones, the last of more distinct slots than lanes. ``int8``: the weight is int8 with
    per-output-channel scales, each output tile scaled by its own channels'. ``fused``: x is SiLU(gate) * up
    times RMSNorm's row and column factors (in pieces of 8 rows, kept for the shrink), and a residual is
    added in the write; the reference is float64 numpy. The first case runs the training kernel (``keep_s``):
    its shrink output is each token's own scaled shrink, zeros in the block without adapters and for tokens
    without adapter, across the blocks of one adapter and of more slots than lanes."""
    rng = np.random.default_rng(0)
    num_tokens, hidden, out_dim, rank, num_slots, lanes = 128, 256, 384, 16, 6, 4
    x = jnp.asarray(rng.standard_normal((num_tokens, hidden)), jnp.float32)
    w_shape = (out_dim, hidden) if layout == "out_in" else (hidden, out_dim)
    w = jnp.asarray(rng.standard_normal(w_shape) / 16, jnp.float32)
    b = jnp.asarray(rng.standard_normal(out_dim), jnp.float32) if bias else None
    a = jnp.asarray(rng.standard_normal((num_slots, rank, hidden)) / 16, jnp.float32)
    lb = jnp.asarray(rng.standard_normal((num_slots, rank, out_dim)) / 4, jnp.float32)
    idx = jnp.asarray(rng.integers(-2, num_slots + 2, num_tokens), jnp.int32).at[:32].set(-1).at[32:64].set(2)
    idx = idx.at[96:].set(jnp.arange(32) % (num_slots + 1) - 1)  # every slot and none: 6 distinct > 4 lanes
    meta = visits.build_lanes(visits.valid_slots(idx, num_slots), num_slots, 32, lanes)
    assert int(meta.chunks.max()) > 1  # a block of more distinct slots than lanes: two expand passes
    sizes = BlockSizes(tokens=32, hidden=128, out=128)
    extra, x_read = {}, x
    if weight == "int8":
        extra["weight_scale"] = jnp.asarray(rng.uniform(0.5, 2.0, out_dim) / 127 / 16, jnp.float32)
        q = jnp.asarray(rng.integers(-127, 128, w_shape), jnp.int8)
        w = q.astype(jnp.float32) * extra["weight_scale"][:, None]  # the reference's float weight
    if weight == "fused":
        up, res = rng.standard_normal((num_tokens, hidden)), rng.standard_normal((num_tokens, out_dim))
        row, col = rng.uniform(0.5, 1.5, num_tokens), rng.standard_normal(hidden)
        gate = np.asarray(x, np.float64)
        x_read = jnp.asarray(gate / (1 + np.exp(-gate)) * up * row[:, None] * col, jnp.float32)
        extra = {"up": up, "row_scale": row, "col_scale": col, "residual": res}
        extra = {key: jnp.asarray(value, jnp.float32) for key, value in extra.items()}
    keep_s = (layout, bias, weight) == ("out_in", True, "float")
    out = fused_base.linear_lora(
        x, q if weight == "int8" else w, b, a, lb, meta, scaling=0.5, block_sizes=sizes, lanes=lanes, layout=layout,
        interpret=True, row_chunk_rows=16, keep_s=keep_s, **extra,
    )  # fmt: skip
    if keep_s:
        out, s = out
        x64, a64, slots = np.asarray(x, np.float64), np.asarray(a, np.float64), np.asarray(idx)
        own = (slots >= 0) & (slots < num_slots)
        shrink = 0.5 * np.einsum("tk,trk->tr", x64, a64[np.where(own, slots, 0)])
        expected_s = np.where(own[:, None], shrink, 0.0)
        np.testing.assert_allclose(np.asarray(s), expected_s, atol=1e-5, rtol=1e-5)
        assert not np.asarray(s)[~own].any()
    expected = jnp_reference.linear_lora(x_read, w, b, a, lb, idx, 0.5, layout) + extra.get("residual", 0.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("layout", "out_dim", "chunk"), [("out_in", 768, 128), ("in_out", 384, 256)])
def test_int8_weight_tile_converted_in_column_chunks(layout, out_dim, chunk):
    """An int8 weight tile of 384 output columns is converted ``chunk`` columns at a time (``out_in``: three
    chunks of 128 in each of two output tiles, with a bias and RMSNorm's factors on x's read and a residual in
    the write; ``in_out``: a chunk of 256 and a ragged one of 128, x being SiLU(gate) * up): every column takes
    its own chunk's weights and scales, over two reduction tiles and two 32-token blocks in row chunks of 16,
    equal to float64 numpy; ``out_in`` also equals, bit for bit, the same kernel converting each tile whole."""
    rng = np.random.default_rng(4)
    num_tokens, hidden, rank, num_slots, lanes = 64, 256, 8, 3, 2
    w_shape = (out_dim, hidden) if layout == "out_in" else (hidden, out_dim)
    q = rng.integers(-127, 128, w_shape)
    scale = rng.uniform(0.5, 2.0, out_dim) / 127 / 16
    w = q * scale[:, None] if layout == "out_in" else q * scale[None, :]  # the float weight, float64
    x, up = rng.standard_normal((num_tokens, hidden)), rng.standard_normal((num_tokens, hidden))
    a = rng.standard_normal((num_slots, rank, hidden)) / 16
    lb = rng.standard_normal((num_slots, rank, out_dim)) / 4
    idx = np.arange(num_tokens) % (num_slots + 1) - 1  # tokens without adapter and every slot, in both blocks
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    extra = {"weight_scale": f32(scale)}
    if layout == "out_in":
        b, row, col, res = (
            rng.standard_normal(out_dim),
            rng.uniform(0.5, 1.5, num_tokens),
            rng.standard_normal(hidden),
            rng.standard_normal((num_tokens, out_dim)),
        )
        extra.update(row_scale=f32(row), col_scale=f32(col), residual=f32(res))
        x_read = x * row[:, None] * col
    else:
        b, res = None, 0.0
        extra["up"] = f32(up)
        x_read = x / (1 + np.exp(-x)) * up
    meta = visits.build_lanes(jnp.asarray(idx, jnp.int32), num_slots, 32, lanes)
    sizes = BlockSizes(tokens=32, hidden=128, out=384)
    run = functools.partial(
        fused_base.linear_lora, f32(x), jnp.asarray(q, jnp.int8), None if b is None else f32(b), f32(a), f32(lb),
        meta, scaling=0.5, block_sizes=sizes, lanes=lanes, layout=layout, interpret=True, row_chunk_rows=16, **extra,
    )  # fmt: skip
    out = np.asarray(run(weight_chunk_cols=chunk))
    own = idx >= 0
    lora = 0.5 * np.einsum("tk,trk->tr", x_read, a[np.where(own, idx, 0)])
    lora = np.einsum("tr,trn->tn", lora, lb[np.where(own, idx, 0)]) * own[:, None]
    base = x_read @ w.T if layout == "out_in" else x_read @ w
    expected = base + (0.0 if b is None else b) + res + lora
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
    if layout == "out_in":
        np.testing.assert_array_equal(out, np.asarray(run(weight_chunk_cols=sizes.out)))


@pytest.mark.parametrize(("layout", "chunk"), [("out_in", 128), ("in_out", 256)])
def test_int8_weight_scaled_per_input_channel_is_dequantised_in_vmem(layout, chunk):
    """``weight_in_scale`` (the backward's transposed read of a per-output-channel int8 weight): each weight chunk
    is dequantised along its contracted dim as it is converted (``out_in``: the scales a [1, tk] row over the tile's
    columns; ``in_out``: a [tk, 1] column over its rows), over two reduction tiles, output tiles of 384 columns in
    chunks of ``chunk`` (``in_out``: a ragged last chunk), two 32-token blocks in row chunks of 16; the LoRA reads x
    unscaled. Equal to float64 numpy on the dequantized weight; a scale applied on the wrong axis or to the LoRA
    fails it."""
    rng = np.random.default_rng(5)
    num_tokens, hidden, out_dim, rank, num_slots, lanes = 64, 256, 384, 8, 3, 2
    w_shape = (out_dim, hidden) if layout == "out_in" else (hidden, out_dim)
    q = rng.integers(-127, 128, w_shape)
    scale = rng.uniform(0.5, 2.0, hidden) / 127 / 16
    w = q * scale[None, :] if layout == "out_in" else q * scale[:, None]  # the float weight, float64
    x = rng.standard_normal((num_tokens, hidden))
    a = rng.standard_normal((num_slots, rank, hidden)) / 16
    lb = rng.standard_normal((num_slots, rank, out_dim)) / 4
    idx = np.arange(num_tokens) % (num_slots + 1) - 1  # tokens without adapter and every slot, in both blocks
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    meta = visits.build_lanes(jnp.asarray(idx, jnp.int32), num_slots, 32, lanes)
    out = fused_base.linear_lora(
        f32(x), jnp.asarray(q, jnp.int8), None, f32(a), f32(lb), meta, scaling=0.5,
        block_sizes=BlockSizes(tokens=32, hidden=128, out=384), lanes=lanes, layout=layout, interpret=True,
        row_chunk_rows=16, weight_chunk_cols=chunk, weight_in_scale=f32(scale),
    )  # fmt: skip
    own = idx >= 0
    lora = 0.5 * np.einsum("tk,trk->tr", x, a[np.where(own, idx, 0)])
    lora = np.einsum("tr,trn->tn", lora, lb[np.where(own, idx, 0)]) * own[:, None]
    expected = (x @ w.T if layout == "out_in" else x @ w) + lora
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


def test_chunks_share_one_shrink_tile_with_their_tokens_interleaved():
    """One [block, lanes * R] f32 shrink tile serves every lane chunk of a block: a 32-token block of 7
    distinct slots and tokens without adapter, interleaved token by token (every 16-row chunk holds
    tokens of all four lane chunks), over two reduction tiles (each chunk's sum accumulates across k in
    its own tokens' rows only) and two output tiles; one slot's B holds an Inf, so its tokens are NaN in that
    output tile, and every other value equals the float64 reference (no chunk's rows leak into another's).
    The training kernel (``keep_s``) runs it: its second output, written at the first output tile's last
    reduction step and kept over the second, is each token's own shrink (rounded as the expand reads it,
    finite for the poisoned slot too: the Inf is in B) and zero for tokens without adapter."""
    rng = np.random.default_rng(1)
    num_tokens, hidden, out_dim, rank, num_slots, lanes = 64, 256, 256, 8, 9, 2
    x = rng.standard_normal((num_tokens, hidden))
    w = rng.standard_normal((out_dim, hidden)) / 16
    a = rng.standard_normal((num_slots, rank, hidden)) / 16
    lb = rng.standard_normal((num_slots, rank, out_dim)) / 4
    lb[5, 3, 200] = np.inf  # slot 5: its tokens' outputs are NaN (in the second output tile)
    idx = np.arange(num_tokens) % 8 - 1  # -1, 0, ..., 6 in turn: 7 distinct slots per block, 4 chunks of 2
    idx[32:] = np.where(idx[32:] >= 0, idx[32:] + 2, -1)  # the second block: slots 1, 2, 3, 5, ..., 8
    meta = visits.build_lanes(jnp.asarray(idx, jnp.int32), num_slots, 32, lanes)
    assert [int(c) for c in meta.chunks] == [4, 4]
    sizes = BlockSizes(tokens=32, hidden=128, out=128)
    f32 = [jnp.asarray(v, jnp.float32) for v in (x, w, a, lb)]
    out, s = fused_base.linear_lora(
        f32[0], f32[1], None, f32[2], f32[3], meta, scaling=0.5, block_sizes=sizes, lanes=lanes, layout="out_in",
        interpret=True, row_chunk_rows=16, keep_s=True,
    )  # fmt: skip
    out = np.asarray(out, np.float64)
    assert s.shape == (num_tokens, rank) and s.dtype == jnp.float32
    poisoned = idx == 5
    assert np.isnan(out[poisoned, 128:]).all()  # the output tile whose B tile held the Inf
    expected, expected_s = x @ w.T, np.zeros((num_tokens, rank))
    for t, slot in enumerate(idx):
        if slot >= 0:
            shrink = np.asarray(jnp.asarray(0.5 * x[t] @ a[slot].T, jnp.float32), np.float64)
            expected_s[t] = shrink
            with np.errstate(invalid="ignore"):
                expected[t] += shrink @ lb[slot]
    np.testing.assert_allclose(np.asarray(s, np.float64), expected_s, atol=1e-5, rtol=1e-5)
    assert not np.asarray(s)[idx < 0].any()  # tokens without adapter: exact zeros
    np.testing.assert_allclose(out[~poisoned], expected[~poisoned], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out[poisoned, :128], expected[poisoned, :128], atol=1e-4, rtol=1e-4)


def test_a_grad_rows_sum_each_slots_outer_products_in_the_pass_over_x():
    """The backward's pass (``a_grad_rows`` u): its third output is ``sum_{t on slot l} outer(u[t], x[t])`` per
    slot in float32, over two 128-token blocks of 7 distinct slots each, interleaved token by token (four chunks of
    two lanes) with tokens without adapter, two reduction tiles (the resident sum is [2, L, R, 128], written once
    at the last step into [L, R, 256]) and two output tiles (taken at the first only); exact zeros for the unused
    slots 4 and 7. x's rows of slot 6 hold an Inf: only slot 6's sum is non-finite (other slots' rows are selected
    out of both operands); the output and s are the training kernel's as without u."""
    rng = np.random.default_rng(2)
    num_tokens, hidden, out_dim, rank, num_slots, lanes = 256, 256, 256, 8, 9, 2
    idx = np.arange(num_tokens) % 8 - 1
    idx = np.where(idx == 4, 8, idx)  # slots 0-3, 5, 6, 8 and none in every block; 4 and 7 unused
    x = rng.standard_normal((num_tokens, hidden))
    x[idx == 6, 100] = np.inf
    w = rng.standard_normal((out_dim, hidden)) / 16
    a = rng.standard_normal((num_slots, rank, hidden)) / 16
    lb = rng.standard_normal((num_slots, rank, out_dim)) / 4
    u = rng.standard_normal((num_tokens, rank))
    meta = visits.build_lanes(jnp.asarray(idx, jnp.int32), num_slots, 128, lanes)
    assert [int(c) for c in meta.chunks] == [4, 4]
    f32 = [jnp.asarray(v, jnp.float32) for v in (x, w, a, lb, u)]
    kwargs = {"scaling": 0.5, "lanes": lanes, "layout": "out_in", "interpret": True, "keep_s": True}
    kwargs["block_sizes"] = BlockSizes(tokens=128, hidden=128, out=128)
    out, s, d_a = fused_base.linear_lora(*f32[:2], None, *f32[2:4], meta, **kwargs, a_grad_rows=f32[4])
    assert d_a.shape == (num_slots, rank, hidden) and d_a.dtype == jnp.float32
    d_a = np.asarray(d_a, np.float64)
    with np.errstate(invalid="ignore"):
        expected = np.stack([u[idx == slot].T @ x[idx == slot] for slot in range(num_slots)])
    assert not d_a[[4, 7]].any()
    assert not np.isfinite(d_a[6]).all()
    others = [slot for slot in range(num_slots) if slot != 6]
    np.testing.assert_allclose(d_a[others], expected[others], atol=1e-4, rtol=1e-4)
    plain_out, plain_s = fused_base.linear_lora(*f32[:2], None, *f32[2:4], meta, **kwargs)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(plain_s))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain_out))


@pytest.mark.parametrize("generation", ["cpu", "v4", "v6e"])
def test_a_grad_plans_take_whole_lanes_or_one_block_of_the_batch(generation):
    """The backward's pass reads the rows u transposed ([R, bt] blocks), so its token block is whole 128-token
    lanes or the whole batch: a batch of up to 128 tokens is one block (rounded up to 8) where the serving plan
    cuts it in smaller blocks (36 tokens: 32-token blocks on the CPU), larger batches take blocks that are
    multiples of 128; where dB's f32 [L, R, N] sum cannot fit VMEM beside the pass there is no plan (64 slots of
    rank 64 of Llama-3-8B gate_proj's backward: 235 MB for the sum alone; 8 slots fit the v6e's budget and the
    CPU's, not the v4's)."""
    hidden = out_dim = 256
    for num_tokens in (8, 36, 100, 128, 200, 300, 1000):
        planned = fused_base.plan(
            num_tokens, hidden, out_dim, 8, 4, jnp.float32, generation, False, fused_base.NO_FUSION, True, True
        )
        assert planned is not None, num_tokens
        bt = planned[0].tokens
        blocks = -(-num_tokens // bt)
        assert bt % 128 == 0 or blocks == 1, (num_tokens, bt)
        if generation == "cpu" and num_tokens == 36:  # the serving plan's 32-token blocks: two, not whole lanes
            assert bt == 40
            serving = fused_base.plan(36, hidden, out_dim, 8, 4, jnp.float32, "cpu", False, fused_base.NO_FUSION)
            assert serving[0].tokens == 32
    gate_backward = (8192, 14336, 4096, 64)  # Llama-3-8B gate_proj's backward: g 14336 wide, dB [L, 64, 14336]
    plans = {slots: fused_base.plan(*gate_backward, slots, jnp.bfloat16, generation, False, fused_base.NO_FUSION,
                                    True, True) for slots in (8, 64)}  # fmt: skip
    assert plans[64] is None  # the sum alone: 235 MB
    assert (plans[8] is not None) == (generation != "v4")  # 29 MB of sum: within 114 MiB, not v4's 9


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_plans_do_not_depend_on_the_slot_count_beyond_the_lanes(generation):
    """The shrink scratch is one tile whatever L is: at 16 and at 128 slots (the same lanes at rank 16),
    every Llama-3-8B projection as the decoder arranges it plans alike at decode and prefill (with a tile
    per chunk a block could need, 128 slots gave down_proj half the reduction tile on v6e at T = 1024)."""
    for num_tokens in (64, 1024, 4096):
        for name, (hidden, out_dim, _) in tpu_model.LLAMA3_8B_LAYER.items():
            fusion = tpu_model.kernel_fusion(*tpu_model.KERNEL_FUSION[name])
            plans = [
                fused_base.plan(num_tokens, hidden, out_dim, 16, slots, jnp.bfloat16, generation, False, fusion)
                for slots in (16, 128)
            ]
            assert plans[0][1] == plans[1][1]  # the same lanes, so the same kernel body
            assert plans[0] == plans[1], (num_tokens, name)


def test_row_chunk_divides_the_block():
    assert [fused_base.row_chunk(t) for t in (8, 256, 512, 1024, 24, 768)] == [8, 256, 256, 256, 24, 256]
    assert fused_base.row_chunk(16, 8) == 8 and fused_base.row_chunk(40, 16) == 8
    assert [fused_base.prologue_chunk(rows) for rows in (8, 16, 64, 256)] == [8, 8, 16, 64]


def test_cpu_tensors_use_reference():
    x, w, b, a, lb, _ = _operands(6, 32, 16, 4, 2, torch.float32, "in_out", True)
    idx = torch.tensor([0, 1, -1, 1, 0, 5], dtype=torch.int32)
    out = tl.linear_lora(x, w, b, a, lb, idx, 2.0, "in_out")
    torch.testing.assert_close(out, x @ w + b + reference.bgmv_shrink_expand(x, a, lb, torch.zeros(6, 16), idx, 2.0))


def _int8_operands(num_tokens, hidden, out_dim, rank, num_slots, seed=0):
    """(x, int8 weight [N, K], its f32 per-channel scales, A, B, indices), float32."""
    x, w, _, a, lb, g = _operands(num_tokens, hidden, out_dim, rank, num_slots, torch.float32, "out_in", False, seed)
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    return x, q, scale, a, lb, _indices("mixed", num_tokens, num_slots, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_weight_forward_and_backward_match_float64(backend, xla_device, monkeypatch):
    """An int8 weight with per-output-channel scales: out and the gradients of x, A and B equal float64 autograd
    on the dequantized weight ``q * s[:, None]`` (relative 1e-4). The backward reads the weight as int8 (its dx
    pass is the op on the transposed int8 weight, ``weight_in_scale``): no float copy of it is made."""
    from torch_xla_lora.ops import _linear_fused
    from torch_xla_lora.ops._linear_fused import linear_lora_fused

    def no_float_copy(*args, **kwargs):
        raise AssertionError("the int8 weight was dequantized to a float copy")

    monkeypatch.setattr(_linear_fused, "dequantize", no_float_copy)
    x, q, scale, a, lb, idx = _int8_operands(40, 256, 128, 8, 4, seed=3)
    leaves = [t.to(xla_device).requires_grad_() for t in (x, a, lb)]
    out = linear_lora_fused(
        leaves[0], q.to(xla_device), None, leaves[1], leaves[2], idx.to(xla_device), 0.5, "out_in", backend,
        weight_scale=scale.to(xla_device),
    )  # fmt: skip
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = [out, *torch.autograd.grad(out, leaves, grad.to(xla_device))]
    ref = [t.double().requires_grad_() for t in (x, a, lb)]
    w = q.double() * scale.double()[:, None]
    expected = ref[0] @ w.T
    for t in range(40):
        if 0 <= idx[t] < 4:
            expected[t] = expected[t] + 0.5 * (ref[0][t] @ ref[1][idx[t]].T) @ ref[2][idx[t]]
    wanted = [expected, *torch.autograd.grad(expected, ref, grad.double())]
    for actual, exp in zip(got, wanted, strict=True):
        magnitude = exp.abs().max().item()
        torch.testing.assert_close(actual.detach().cpu().double(), exp.detach(), atol=1e-4 * magnitude, rtol=1e-4)


def test_int8_weight_scale_is_checked():
    from torch_xla_lora.ops._linear_fused import linear_lora_fused

    x, q, scale, a, lb, idx = _int8_operands(4, 32, 16, 4, 2)
    with pytest.raises(tl.ShapeError, match="with weight_scale the weight must be int8"):
        linear_lora_fused(x, q.float(), None, a, lb, idx, weight_scale=scale)
    with pytest.raises(tl.ShapeError, match=r"weight_scale must be \[16\] torch.float32"):
        linear_lora_fused(x, q, None, a, lb, idx, weight_scale=scale[:8])
    with pytest.raises(tl.ShapeError, match=r"weight_scale must be \[16\] torch.float32"):
        linear_lora_fused(x, q, None, a, lb, idx, weight_scale=scale.half())
    with pytest.raises(tl.ShapeError, match="weight dim 1 must equal K of inputs = 32"):
        linear_lora_fused(x, q[:, :16], None, a, lb, idx, weight_scale=scale)
    in_scale = torch.rand(32) / 127
    with pytest.raises(tl.ShapeError, match="with weight_in_scale the weight must be int8"):
        linear_lora_fused(x, q.float(), None, a, lb, idx, weight_in_scale=in_scale)
    with pytest.raises(tl.ShapeError, match=r"weight_in_scale must be \[32\] torch.float32"):
        linear_lora_fused(x, q, None, a, lb, idx, weight_in_scale=scale)
    with pytest.raises(tl.ShapeError, match="weight_scale or weight_in_scale, not both"):
        linear_lora_fused(x, q, None, a, lb, idx, weight_scale=scale, weight_in_scale=in_scale)


def test_rejects_weight_of_wrong_input_dim():
    x, w, b, a, lb, _ = _operands(3, 32, 16, 4, 2, torch.float32, "out_in", True)
    with pytest.raises(tl.ShapeError, match="weight dim 0 must equal K of inputs = 32"):
        tl.linear_lora(x, w, b, a, lb, torch.zeros(3, dtype=torch.int32), 1.0, "in_out")


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "out_dim", "num_slots", "layout", "bias"),
    [
        (1024, 4096, 4096, 8, "out_in", False),  # the prefill configuration
        (8, 4096, 4096, 128, "out_in", True),  # decode, many slots
        (512, 4096, 14336, 64, "in_out", True),  # gate/up-sized output, Conv1D layout
    ],
)
def test_lowers_to_mosaic(num_tokens, hidden, out_dim, num_slots, layout, bias, generation):
    fn, args = fused_base.tpu_compile_case(
        num_tokens, hidden, out_dim, 16, num_slots, jnp.bfloat16, generation, layout, bias
    )
    module = jax_export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    assert "tpu_custom_call" in module


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
@pytest.mark.parametrize(("layout", "scales"), [("out_in", "weight_scale"), ("in_out", "weight_in_scale")])
def test_int8_weight_lowers_to_mosaic_reading_int8(layout, scales, generation):
    """The int8 base's kernel, and its backward's transposed read (scales per input channel), lower for TPU and
    take the weight as int8 (libtpu compiles them: test_tpu_compile)."""
    fusion = fused_base.Fusion(**{scales: True})
    fn, args = fused_base.tpu_compile_case(1024, 4096, 4096, 16, 8, jnp.bfloat16, generation, layout, fusion=fusion)
    assert args[1].dtype == jnp.int8
    module = jax_export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    assert "tpu_custom_call" in module


def _aligned_tiles(dim: int, largest: int) -> list[int]:
    """Every tile the kernel may take over ``dim`` on TPU: a multiple of 128 dividing it, at most ``largest``."""
    return [tile for tile in range(128, min(dim, largest) + 1, 128) if dim % tile == 0]


@pytest.mark.parametrize("generation", ["v4", "v5e", "v5p", "v6e"])
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "out_dim"),
    # the last: Qwen2-7B's down_proj, whose best tiling fits 15 lanes but not lanes_for's 16 on v6e
    [(8, 4096, 4096), (1024, 4096, 14336), (4096, 14336, 4096), (300, 4096, 1024), (256, 18944, 3584)],
)
def test_plan_is_the_best_fitting_tiling_of_an_exhaustive_search(num_tokens, hidden, out_dim, generation):
    """The plan against every tiling that fits, each at the most lanes it fits, searched here.

    The rule (fused_base.plan): among the tilings that fit the VMEM budget (token blocks from the table's down to 8,
    tiles that divide the dims) at some lane count up to lanes_for's, each at the most such lanes, the least
    modelled time for a block of as many adapters as lanes_for's lanes hold (fewer lanes pay its extra chunks),
    then the fewest grid steps, then the most lanes. Fails for tiles that do not divide the dims, a budget check
    made with other lanes than the plan returns, and a search that misses a tiling or a lane count (a divisor, a
    token block or a count skipped) or ranks them wrongly.
    """
    from torch_xla_lora.kernels import fused

    rank, num_slots, dtype = 16, 128, jnp.bfloat16
    sizes, lanes = fused_base.plan(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
    sizes.check(hidden, out_dim)
    budget, largest = fused_base.tuning.BASE_VMEM_BUDGET_BYTES[generation], fused_base.tuning.BASE_MAX_TILE[generation]
    widest = fused.lanes_for(rank, num_slots, dtype, generation)
    blocks = [fused_base.token_block(num_tokens, generation)]
    while blocks[-1] > 8:
        blocks.append(blocks[-1] // 2)
    tilings = [
        BlockSizes(tokens, tk, tn)
        for tokens in blocks
        for tk in _aligned_tiles(hidden, largest)
        for tn in _aligned_tiles(out_dim, largest)
    ]
    # Each tiling at the most lanes (up to lanes_for's) with which it fits.
    fitting = [
        (t, max(fits))
        for t in tilings
        if (fits := [c for c in range(1, widest + 1) if fused_base.vmem_bytes(t, rank, num_slots, c, dtype) <= budget])
    ]

    def key(t: BlockSizes, count: int) -> tuple[float, int, int]:
        steps = t.padded_tokens(num_tokens) // t.tokens * (hidden // t.hidden) * (out_dim // t.out)
        seconds = fused_base.modelled_seconds(
            num_tokens, hidden, out_dim, rank, t, count, dtype, generation, block_adapters=min(widest, t.tokens)
        )
        return seconds, steps, -count

    assert (sizes, lanes) in fitting
    assert key(sizes, lanes) == min(key(t, c) for t, c in fitting)


@pytest.fixture
def small_cpu_budget():
    """A CPU VMEM budget of 1.6 MB: (T=56, K=384, N=256, R=8, L=16, f32) untiled needs 1.88 MB at lanes_for's 16
    lanes, 1.59 MB at 10 and 1.64 MB at 11; the plan's cache is cleared on the way in and out."""
    budgets = fused_base.tuning.BASE_VMEM_BUDGET_BYTES
    saved = budgets["cpu"]
    budgets["cpu"] = 1_600_000
    fused_base.plan.cache_clear()
    yield
    budgets["cpu"] = saved
    fused_base.plan.cache_clear()


def test_the_op_runs_with_the_plans_fewer_lanes(small_cpu_budget, xla_device, monkeypatch):
    """Where lanes_for's 16 lanes leave only split tilings in VMEM, the plan takes the whole tiling at the 10
    lanes that fit it; the op (on the device's grouping and on the host-built one) runs the kernel with exactly
    the plan's tiling and lanes, a block of all 16 slots takes two lane chunks, and the output equals float64 math.
    Fails if any caller recomputes the lanes (then the kernel or its metadata has 16) or the kernel is wrong
    at fewer lanes than the slots a block uses."""
    from torch_xla_lora.kernels import fused

    num_tokens, hidden, out_dim, rank, num_slots = 56, 384, 256, 8, 16
    sizes, lanes = fused_base.plan(num_tokens, hidden, out_dim, rank, num_slots, jnp.float32, "cpu", True)
    assert fused.lanes_for(rank, num_slots, jnp.float32, "cpu") == 16
    assert (sizes, lanes) == (BlockSizes(32, hidden, out_dim), 10)
    calls, kernel = [], fused_base.linear_lora
    monkeypatch.setattr(
        fused_base,
        "linear_lora",
        lambda *args, **kwargs: calls.append((kwargs["block_sizes"], kwargs["lanes"])) or kernel(*args, **kwargs),
    )
    x, w, b, a, lb, _ = _operands(num_tokens, hidden, out_dim, rank, num_slots, torch.float32, "out_in", True, seed=5)
    idx = (torch.arange(num_tokens, dtype=torch.int32) * 7 % (num_slots + 2)) - 1  # -1, every slot, 16 (none)
    assert len(set(idx[:32].tolist()) & set(range(num_slots))) == num_slots  # the first block: chunks of 10 and 6
    expected = x.double() @ w.double().T + b.double()
    for t, slot in enumerate(idx.tolist()):
        if 0 <= slot < num_slots:
            expected[t] += 0.5 * (x[t].double() @ a[slot].double().T) @ lb[slot].double()
    shapes = [(hidden, out_dim, True)]
    meta = tl.ops.batch_metadata(idx, [(hidden, out_dim)], rank, num_slots, torch.float32, linear_shapes=shapes)
    own = meta[(hidden, out_dim, "linear", True)]
    assert own is not meta[(hidden, out_dim)]  # the kernel's own grouping: the shrink-expand op's has 16 lanes
    moved = [t.to(xla_device) for t in (x, w, b, a, lb, idx)]
    out = tl.linear_lora(*moved, 0.5, "out_in", "pallas").cpu()
    monkeypatch.setattr(visits, "build_lanes", lambda *args, **kwargs: pytest.fail("grouped on the device"))
    out_host = tl.linear_lora(*moved, 0.5, "out_in", "pallas", own.to(xla_device), own_metadata=True).cpu()
    assert calls == [(sizes, lanes)] * 2
    assert_close(out, expected, torch.float32)
    assert_close(out_host, expected, torch.float32)


def test_plan_refuses_widths_not_lane_aligned_on_tpu():
    for generation in ("v4", "v5e", "v5p", "v6e"):
        assert fused_base.plan(8, 1000, 4096, 16, 8, jnp.bfloat16, generation) is None  # the caller falls back


# --- layers ---------------------------------------------------------------------------------------------------


def test_llama_layers_with_base_fusion_match_peft(llama_case, xla_device):  # noqa: F811
    """Through the Pallas kernel (interpret mode); the GPT-2 test below goes through the XLA-native path."""
    model, lora = patch(llama_case, xla_device, **LLAMA_LORA, base_fusion=True, backend="pallas")
    mix = ["a0", None, "a1", "a2"]
    lora.set_batch(mix)
    assert_close(logits(model, llama_case.inputs), peft_logits(llama_case, mix))


def test_gpt2_conv1d_fused_qkv_with_base_fusion_matches_peft(gpt2_case, xla_device):  # noqa: F811
    model, lora = patch(
        gpt2_case, xla_device, max_loras=2, max_rank=8, target_modules=GPT2_TARGETS, base_fusion=True, backend="xla"
    )
    mix = ["g0", None, "g1", "g0"]
    lora.set_batch(mix)
    assert_close(logits(model, gpt2_case.inputs), peft_logits(gpt2_case, mix))


def test_base_fusion_auto_is_on_exactly_on_tpu(llama_case, xla_device):  # noqa: F811
    """base_fusion="auto" (the default) runs the separate op off TPU; on a TPU, linear_lora exactly where the
    TPU cost model chooses the fused formulation for the layer (``formulation.choose``, tested on its own in
    tests/test_formulation.py).

    The device kind comes from the PJRT runtime, not from the library's generation lookup; a spy on the layer
    records which path its forward took. Fails on either device if "auto" resolves the other way.
    """
    import torch_xla.runtime as xr

    from torch_xla_lora import formulation, ops

    model, lora = patch(llama_case, xla_device, **LLAMA_LORA)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_fusion == "auto"
    fused_calls, forward_base_fused = [], layer._forward_base_fused
    layer._forward_base_fused = lambda x, slots: fused_calls.append(x.shape) or forward_base_fused(x, slots)
    lora.set_token_adapters(["a0", None])
    with torch.no_grad():
        layer(torch.zeros(2, layer.in_features, device=xla_device))  # traced only: nothing is compiled
    on_tpu = xr.device_type() == "TPU"
    chosen = on_tpu and formulation.choose(
        ops.device_generation(), 2, layer.in_features, layer.out_features, 64, 4, False, layer.fusion_role
    )
    assert bool(fused_calls) == (chosen == "fused")


def test_rejects_unknown_base_fusion():
    with pytest.raises(ValueError, match="base_fusion"):
        tl.LoRAConfig(base_fusion="always")


# --- TPU cost model -------------------------------------------------------------------------------------------

CHIP = tpu_model.Chip("test", "v6e", hbm_bytes_per_s=1e9, peak_flops=1e12, mxu_width=256, step_overhead_s=1e-6)


def test_fused_base_cost_one_step_one_adapter():
    # T=256, K=N=256, R=16, L=1 on "v6e": one token block, one output and one reduction tile, one lane.
    cost = tpu_model.fused_base_cost(CHIP, np.zeros(256, np.int32), 256, 256, rank=16, num_slots=1)
    codes, x, w, out = 256 * 4, 256 * 256 * 2, 256 * 256 * 2, 256 * 256 * 2
    adapters = 16 * 256 * 2 * 2  # A and B tiles, fetched while the base product runs
    assert cost.pipelined_bytes == codes + x + w + out + adapters
    assert cost.manual_bytes == 0
    assert cost.mxu_flops == 3 * 2 * 256 * 256 * 256  # base, shrink and expand, padded to 256-wide tiles
    assert cost.steps == 1
    assert cost.seconds == pytest.approx(max(cost.pipelined_bytes / 1e9, cost.mxu_flops / 1e12) + 1e-6)
    # An int8 base: the weight tile at one byte an element, plus its [1, N] f32 scales; the same MXU work.
    int8 = tpu_model.fused_base_cost(CHIP, np.zeros(256, np.int32), 256, 256, 16, 1, int8_weight=True)
    assert int8.pipelined_bytes == codes + x + w // 2 + 256 * 4 + out + adapters
    assert int8.mxu_flops == cost.mxu_flops


@pytest.mark.parametrize("chip", ["v5e", "v6e"])
@pytest.mark.parametrize("num_tokens", [8, 1024])
def test_fused_base_beats_separate_per_layer(chip, num_tokens):
    indices = (np.arange(num_tokens) * 8 // num_tokens).astype(np.int32)
    costs = tpu_model.layer_costs(tpu_model.CHIPS[chip], indices, rank=16, num_slots=128)
    assert costs["base"] < costs["fused"] < costs["separate"]


# --- torch.compile --------------------------------------------------------------------------------------------


def test_compiled_op_matches_reference_without_recompile(xla_device):
    import torch_xla
    import torch_xla.debug.metrics as met

    x, w, b, a, lb, _ = _operands(24, 128, 256, 8, 3, torch.float32, "out_in", True, seed=2)
    dev = [t.to(xla_device) for t in (x, w, b, a, lb)]

    def step(x, w, b, a, lb, idx):
        return torch.ops.xla_lora.linear_lora(x, w, b, a, lb, idx, 1.0, "out_in", "auto", None)

    compiled = torch.compile(step, backend="openxla")

    def indices(seed):
        return torch.randint(-1, 3, (24,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)

    met.clear_all()
    assert_close(compiled(*dev, indices(0).to(xla_device)), reference.linear_lora(x, w, b, a, lb, indices(0)))
    torch_xla.sync()
    compiles = met.metric_data("CompileTime")[0]
    for seed in (1, 2):  # new index values, same shapes
        out = compiled(*dev, indices(seed).to(xla_device))
        assert_close(out, reference.linear_lora(x, w, b, a, lb, indices(seed)))
    torch_xla.sync()
    assert met.metric_data("CompileTime")[0] == compiles, "new index values must not compile a new graph"


def test_compiled_model_with_base_fusion_matches_peft_without_recompile(llama_case, xla_device, monkeypatch):  # noqa: F811
    """A whole patched Llama, every linear layer through linear_lora, under torch.compile(openxla)."""
    import torch_xla

    from torch_xla_lora import ops

    model, lora = patch(llama_case, xla_device, **LLAMA_LORA, base_fusion=True)
    step = torch.compile(lambda ids: model(ids).logits, backend="openxla")
    ids = llama_case.inputs
    calls, call_jax = [], ops._call_jax
    monkeypatch.setattr(ops, "_call_jax", lambda fn, *args: calls.append(fn.__qualname__) or call_jax(fn, *args))
    lora.warmup([ids.shape[0]], [ids.shape[1]], step=step, progress=False, host_metadata=True)
    # Every LoRA op is linear_lora; the MLPs' gate/up/down take the norm, SiLU * up and the residual in.
    assert calls and all(name.startswith(("linear_lora_fn", "linear_lora_fused_fn")) for name in calls)
    assert any(name.startswith("linear_lora_fused_fn") for name in calls)
    with tl.assert_no_recompile():
        for mix in LLAMA_MIXES:
            lora.set_batch(mix, seq_len=ids.shape[1])
            with torch.no_grad():
                out = step(ids.to(xla_device))
                torch_xla.sync()
            assert_close(out.cpu(), peft_logits(llama_case, mix))


# --- host metadata of the fused base kernel's own plan (prefill on TPU) ---------------------------------------


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_host_metadata_of_the_base_plan_is_used_at_prefill(generation, monkeypatch):
    """At prefill the kernel's token block differs from the shrink-expand op's: the host builds the kernel's own
    grouping, equal to the device's, and the op takes it instead of sorting (pure JAX: no TPU needed)."""
    from torch_xla_lora.ops import _jax, _linear

    num_tokens, hidden, out_dim, rank, num_slots = 1024, 4096, 4096, 16, 8
    slots = np.random.default_rng(0).integers(-1, num_slots, num_tokens).astype(np.int32)
    shape = (hidden, out_dim, False)
    host = _linear.linear_batch_metadata(slots, [shape], rank, num_slots, "bfloat16", generation)
    sizes, lanes = fused_base.plan(num_tokens, hidden, out_dim, rank, num_slots, "bfloat16", generation, False)
    idx = _jax._padded_indices(jnp.asarray(slots), num_slots, sizes.padded_tokens(num_tokens))
    on_device = visits.build_lanes(idx, num_slots, sizes.tokens, lanes)
    monkeypatch.setattr(visits, "build_lanes", lambda *args, **kwargs: pytest.fail("grouped on the device"))
    args = (idx, num_slots, sizes, lanes, num_tokens, hidden, out_dim, rank, "bfloat16", generation)
    from_host = _linear._lane_meta(jnp.asarray(host[shape]), *args, own_metadata=True)
    for got, expected in zip(from_host, on_device, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("generation", ["v6e", "cpu"])
def test_no_extra_host_metadata_where_the_plans_agree(generation):
    """Decode on TPU, and any size off TPU: the shrink-expand op's metadata serves linear_lora too."""
    from torch_xla_lora.ops import _linear

    num_tokens = 8 if generation != "cpu" else 1024
    slots = np.arange(num_tokens, dtype=np.int32) % 8
    assert _linear.linear_batch_metadata(slots, [(4096, 4096, True)], 16, 8, "bfloat16", generation) == {}
