"""The fused, laned shrink-expand: every grouping case and fast path, both backends, and TPU lowering."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from jax import export as jax_export
from test_reference import _lora64

import torch_xla_lora as tl
from torch_xla_lora.kernels import fused, visits

BACKENDS = ["xla", "pallas"]


def _expected(x, a, b, base, idx, scaling=1.0) -> torch.Tensor:
    """Float64 ``base + scaling * (x @ A_i^T) @ B_i`` per token (0 outside [0, L)), rounded to base's dtype;
    the rank intermediate rounded to lora_b's dtype first (the rule test_reference.py checks)."""
    return (base.double() + _lora64(x, a, b, idx, scaling, b.dtype)).to(base.dtype)


def _indices(pattern: str, num_tokens: int, num_slots: int, g) -> torch.Tensor:
    if pattern == "one_adapter":
        return torch.full((num_tokens,), num_slots - 1, dtype=torch.int32)
    if pattern == "no_adapter":
        return torch.full((num_tokens,), -1, dtype=torch.int32)
    if pattern == "every_token_different":
        return (torch.arange(num_tokens, dtype=torch.int32) * 7) % num_slots
    if pattern == "unsorted_mixed":
        return torch.randint(-2, num_slots + 2, (num_tokens,), generator=g, dtype=torch.int32)
    if pattern == "contiguous_requests":  # prefill: each request's tokens together
        return (torch.arange(num_tokens, dtype=torch.int32) * 8 // num_tokens) * max(1, num_slots // 8)
    raise ValueError(pattern)


def _run(pattern, num_tokens, hidden, rank, num_slots, out_dim, backend, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    a = (torch.randn(num_slots, rank, hidden, generator=g) / math.sqrt(hidden)).to(dtype)
    b = (torch.randn(num_slots, rank, out_dim, generator=g) / math.sqrt(rank)).to(dtype)
    base = torch.randn(num_tokens, out_dim, generator=g).to(dtype)
    idx = _indices(pattern, num_tokens, num_slots, g)
    out = tl.bgmv_shrink_expand(*(t.to(device) for t in (x, a, b, base, idx)), 0.5, backend)
    return out.cpu(), _expected(x, a, b, base, idx, 0.5), base, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "pattern", ["one_adapter", "no_adapter", "every_token_different", "unsorted_mixed", "contiguous_requests"]
)
def test_grouping_cases(pattern, backend, xla_device):
    out, expected, base, idx = _run(pattern, 72, 256, 16, 12, 384, backend, xla_device)
    assert_close(out, expected)
    untouched = (idx < 0) | (idx >= 12)
    assert torch.equal(out[untouched], base[untouched]), "tokens without an adapter keep the exact base"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "rank", "num_slots", "out_dim"),
    [
        (1, 64, 8, 3, 64),  # decode, one token
        (5, 1000, 16, 8, 200),  # decode; D and Dout not multiples of 128
        (300, 512, 16, 64, 256),  # T not a multiple of the token block; many slots
        (40, 256, 64, 4, 128),  # rank 64: two lanes in a 128-wide tile
        (24, 128, 1, 1, 128),  # L=1, rank 1: one slot, laning degenerate
        (33, 128, 128, 3, 384),  # a rank that fills the MXU: one lane
    ],
)
def test_shapes(num_tokens, hidden, rank, num_slots, out_dim, backend, xla_device):
    out, expected, _, _ = _run("unsorted_mixed", num_tokens, hidden, rank, num_slots, out_dim, backend, xla_device)
    assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend, xla_device):
    out, expected, _, _ = _run("unsorted_mixed", 48, 512, 16, 6, 256, backend, xla_device, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_close(out, expected)


def test_single_slot_uniform_block_skips_mask_correctly(xla_device):
    """L=1 packs one lane; a block whose tokens all use it takes the no-mask path.

    Through the op, the result equals float64 math. On the kernel itself (interpret mode): the metadata
    marks exactly the uniform block, and the kernel obeys the mark (a mixed block marked uniform would
    add the adapter to its base rows): so the no-mask path is live and taken where it should be. A
    kernel that ignored the mark, or metadata that never set it, fails the second part.
    """
    g = torch.Generator().manual_seed(3)
    idx = torch.zeros(64, dtype=torch.int32)
    idx[40:] = -1  # the second 32-token block mixes adapter and base tokens: masked path
    x, a = torch.randn(64, 128, generator=g), torch.randn(1, 8, 128, generator=g) / 11
    b, base = torch.randn(1, 8, 128, generator=g) / 3, torch.randn(64, 128, generator=g)
    expected = _expected(x, a, b, base, idx)
    out = tl.bgmv_shrink_expand(*(t.to(xla_device) for t in (x, a, b, base, idx)), 1.0, "pallas")
    assert_close(out, expected)

    sizes, lanes = fused.plan(64, 128, 128, 8, 1, jnp.float32, "cpu")
    assert (sizes.tokens, lanes) == (32, 1)
    meta = visits.build_lanes(jnp.asarray(idx.numpy()), 1, sizes.tokens, lanes)
    np.testing.assert_array_equal(np.asarray(meta.uniform), [1, 0])
    args = [jnp.asarray(t.numpy()) for t in (x, a, b, base)]

    def kernel(meta):
        return torch.from_numpy(
            np.array(fused.shrink_expand(*args, meta, scaling=1.0, block_sizes=sizes, lanes=lanes, interpret=True))
        )

    assert_close(kernel(meta), expected)
    both_marked = kernel(meta._replace(uniform=jnp.ones_like(meta.uniform)))
    assert_close(both_marked[:40], expected[:40])
    lora_rows = _lora64(x, a, b, torch.zeros(64, dtype=torch.int32), 1.0)[40:].float()
    assert_close(both_marked[40:], base[40:] + lora_rows)  # base rows now carry the adapter: the mark is obeyed


def test_cpu_tensors_match_float64_math():
    """CPU tensors take the plain-torch path: slots out of [0, L) (-1, 5) keep the base row."""
    x, a, b, base = torch.randn(6, 32), torch.randn(2, 4, 32), torch.randn(2, 4, 16), torch.randn(6, 16)
    idx = torch.tensor([0, 1, -1, 1, 0, 5], dtype=torch.int32)
    assert_close(tl.bgmv_shrink_expand(x, a, b, base, idx, 2.0), _expected(x, a, b, base, idx, 2.0))


def test_rejects_mismatched_ranks():
    with pytest.raises(tl.ShapeError, match="lora_b dim 1 must equal R of lora_a = 4"):
        tl.bgmv_shrink_expand(
            torch.zeros(3, 8), torch.zeros(2, 4, 8), torch.zeros(2, 5, 6), torch.zeros(3, 6), torch.zeros(3).int()
        )


def test_lane_metadata_matches_plain_loop():
    rng = np.random.default_rng(0)
    num_slots, block_tokens, lanes = 40, 16, 4
    idx = rng.integers(-2, num_slots + 2, 64).astype(np.int32)
    meta = visits.build_lanes(jnp.asarray(idx), num_slots, block_tokens, lanes)
    per_block = visits.max_chunks(block_tokens, num_slots, lanes) * lanes
    active = []
    for block in range(4):
        rows = idx[block * block_tokens : (block + 1) * block_tokens]
        distinct = sorted({int(i) for i in rows if 0 <= i < num_slots})
        assert int(meta.chunks[block]) == math.ceil(len(distinct) / lanes)
        got = np.asarray(meta.slots[block * per_block : (block + 1) * per_block]).tolist()
        assert got == distinct + [-1] * (per_block - len(distinct))
        codes = np.asarray(meta.code[block * block_tokens : (block + 1) * block_tokens]).tolist()
        assert codes == [distinct.index(int(i)) if 0 <= i < num_slots else -1 for i in rows]
        active += [block] if distinct else []
    assert int(meta.num_active[0]) == len(active)
    assert np.asarray(meta.active[: len(active)]).tolist() == active


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
@pytest.mark.parametrize(
    ("num_tokens", "rank", "num_slots", "out_dim"),
    [
        (128, 16, 8, 4096),  # the configuration: laned (16 or 8 lanes)
        (8, 16, 128, 4096),  # decode, many slots
        (256, 128, 4, 4096),  # wide rank: 1-2 lanes
        (128, 16, 1, 4096),  # one slot: single lane, no-mask fast path compiled in
        (512, 16, 64, 12288),  # fused QKV-sized output, tiled
    ],
)
def test_fused_lowers_to_mosaic(num_tokens, rank, num_slots, out_dim, generation):
    hidden = 4096
    sizes, lanes = fused.plan(num_tokens, hidden, out_dim, rank, num_slots, jnp.bfloat16, generation)

    def fn(x, a, b, base, idx):
        meta = visits.build_lanes(idx, num_slots, sizes.tokens, lanes)
        return fused.shrink_expand(x, a, b, base, meta, scaling=1.0, block_sizes=sizes, lanes=lanes, interpret=False)

    padded = sizes.padded_tokens(num_tokens)
    shapes = [
        _sds((padded, hidden)),
        _sds((num_slots, rank, hidden)),
        _sds((num_slots, rank, out_dim)),
        _sds((padded, out_dim)),
        _sds((padded,), jnp.int32),
    ]
    module = jax_export.export(jax.jit(fn), platforms=["tpu"])(*shapes).mlir_module()
    assert "tpu_custom_call" in module


def _interleaved(num_tokens: int, num_slots: int, in_use: int, with_base: bool) -> torch.Tensor:
    """Decode layout: token t on request t mod in_use, requests spread over the slots; every 5th token base."""
    idx = (torch.arange(num_tokens) % in_use * (num_slots // in_use)).to(torch.int32)
    if with_base:
        idx[::5] = -1
    return idx


def _tensors(num_tokens, hidden, rank, num_slots, out_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    a = torch.randn(num_slots, rank, hidden, generator=g) / math.sqrt(hidden)
    b = torch.randn(num_slots, rank, out_dim, generator=g) / math.sqrt(rank)
    return x, a, b, torch.randn(num_tokens, out_dim, generator=g)


# The XLA-native backend's paths for blocks that mix adapters: laned (adapters
# side by side; one block, or several while the batch's adapters fill at most 2
# chunks of lanes) and sorted rows (several blocks, more adapters). A sample of
# the shapes, not a product.
MIXING = [
    (20, 256, 16, 64, 8, False),  # one block, 8 adapters in one chunk of 8 lanes
    (20, 256, 64, 8, 8, True),  # one block, rank 64: 2 lanes, 4 chunks
    (200, 256, 16, 64, 8, True),  # several blocks, laned
    (200, 256, 16, 64, 24, True),  # several blocks, 24 adapters: 3 chunks, sorted
    (300, 128, 64, 12, 12, False),  # several blocks, rank 64: 6 chunks, sorted; T not a multiple of the block
]


@pytest.mark.parametrize("host_metadata", [False, True], ids=["device-grouping", "host-metadata"])
@pytest.mark.parametrize(("num_tokens", "hidden", "rank", "num_slots", "in_use", "with_base"), MIXING)
def test_interleaved_adapters_xla(num_tokens, hidden, rank, num_slots, in_use, with_base, host_metadata, xla_device):
    x, a, b, base = _tensors(num_tokens, hidden, rank, num_slots, 192)
    idx = _interleaved(num_tokens, num_slots, in_use, with_base)
    meta = None
    if host_metadata:
        meta = tl.ops.batch_metadata(idx, [(hidden, 192)], rank, num_slots, torch.float32)[(hidden, 192)]
        meta = meta.to(xla_device)
    dev = [t.to(xla_device) for t in (x, a, b, base, idx)]
    out = tl.bgmv_shrink_expand(*dev, 0.5, "xla", meta).cpu()
    assert_close(out, _expected(x, a, b, base, idx, 0.5))
    assert torch.equal(out[idx < 0], base[idx < 0])


@pytest.mark.parametrize(
    ("num_tokens", "rank", "num_slots"),
    [(20, 16, 9), (20, 16, 8), (200, 16, 8), (200, 16, 9), (200, 64, 9)],
    ids=["one-block", "one-block-every-slot", "laned-every-slot", "laned", "sorted"],
)
def test_unused_slot_holding_inf_leaves_base_rows_exact(num_tokens, rank, num_slots, xla_device):
    # With 8 slots of rank 16 the laned products take every slot at once (lane = slot).
    x, a, b, base = _tensors(num_tokens, 128, rank, num_slots, 128)
    unused = num_slots - 1
    a[unused], b[unused] = float("inf"), float("nan")  # never used
    idx = _interleaved(num_tokens, 8, 8, with_base=True)
    idx[idx == unused] = (unused + 1) % 8 if num_slots == 8 else unused
    out = tl.bgmv_shrink_expand(*(t.to(xla_device) for t in (x, a, b, base, idx)), 1.0, "xla").cpu()
    assert torch.equal(out[idx < 0], base[idx < 0])
    assert_close(out, _expected(x, a[:unused], b[:unused], base, idx))


@pytest.mark.parametrize(("hidden", "out_dim"), [(576, 192), (1000, 256)])
def test_widths_not_lane_aligned_with_host_metadata(hidden, out_dim, xla_device):
    """Unaligned widths on unpadded buffers (the fused kernel DMAs whole rows only at lane-aligned widths) run
    shrink then expand, fed by the same host metadata as the fused plan."""
    assert fused.plan_call(40, hidden, out_dim, 16, 6, jnp.float32, "cpu")[2]
    g = torch.Generator().manual_seed(3)
    x, base = torch.randn(40, hidden, generator=g), torch.randn(40, out_dim, generator=g)
    a = torch.randn(6, 16, hidden, generator=g) / math.sqrt(hidden)
    b = torch.randn(6, 16, out_dim, generator=g) / 4
    idx = torch.randint(-1, 6, (40,), generator=g, dtype=torch.int32)
    meta = tl.ops.batch_metadata(idx, [(hidden, out_dim)], 16, 6, torch.float32)[(hidden, out_dim)]
    args = [t.to(xla_device) for t in (x, a, b, base, idx)]
    out = tl.bgmv_shrink_expand(*args, 0.5, "pallas", meta.to(xla_device))
    assert_close(out.cpu(), _expected(x, a, b, base, idx, 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("hidden", "out_dim", "host"), [(200, 72, True), (2880 // 8, 5760 // 8, False)])
def test_lane_padded_buffers(hidden, out_dim, host, backend, xla_device, monkeypatch):
    """Adapter buffers wider than the layer, padded to whole 128-lane tiles (as layers allocate them where the TPU
    fused kernel may run): the Pallas backend runs the fused kernel on them (the traced graph holds its call), and
    both backends use only the first D / Dout columns: the padding columns hold Inf here, which any read of them
    into the product would turn into Inf or NaN."""
    g = torch.Generator().manual_seed(5)
    x, base = torch.randn(40, hidden, generator=g), torch.randn(40, out_dim, generator=g)
    a = torch.randn(6, 16, hidden, generator=g) / math.sqrt(hidden)
    b = torch.randn(6, 16, out_dim, generator=g) / 4
    idx = torch.randint(-1, 6, (40,), generator=g, dtype=torch.int32)
    wide_a = torch.full((6, 16, fused.padded_width(hidden)), float("inf"))
    wide_b = torch.full((6, 16, fused.padded_width(out_dim)), float("inf"))
    wide_a[:, :, :hidden], wide_b[:, :, :out_dim] = a, b
    traced = []  # widths the fused kernel was traced with (these shapes are new to the process: traced here)
    kernel = fused.shrink_expand
    monkeypatch.setattr(
        fused, "shrink_expand", lambda x, a, b, *rest, **kw: traced.append(a.shape) or kernel(x, a, b, *rest, **kw)
    )
    args = [t.to(xla_device) for t in (x, wide_a, wide_b, base, idx)]
    meta = tl.ops.batch_metadata(idx, [(hidden, out_dim)], 16, 6, torch.float32)[(hidden, out_dim)] if host else None
    out = tl.bgmv_shrink_expand(*args, 0.5, backend, None if meta is None else meta.to(xla_device))
    assert_close(out.cpu(), _expected(x, a, b, base, idx, 0.5))
    assert traced == ([wide_a.shape] if backend == "pallas" else []), "the fused kernel runs the padded buffers"
    cpu = tl.bgmv_shrink_expand(x, wide_a, wide_b, base, idx, 0.5)  # the CPU reference path slices too
    assert_close(cpu, _expected(x, a, b, base, idx, 0.5))


def test_lane_padded_buffers_backward():
    """The op's gradients with buffers wider than the layer: those of the layer's columns (float64 autograd of the
    unpadded product), zero in the padding columns, and the input's gradient unchanged by them."""
    g = torch.Generator().manual_seed(6)
    x, base = torch.randn(12, 200, generator=g), torch.randn(12, 72, generator=g)
    a, b = torch.randn(3, 8, 200, generator=g) / 14, torch.randn(3, 8, 72, generator=g) / 4
    idx = torch.tensor([0, 1, 2, -1] * 3, dtype=torch.int32)
    weights = torch.randn(12, 72, generator=g)
    wide_a, wide_b = torch.nn.functional.pad(a, (0, 56)), torch.nn.functional.pad(b, (0, 56))
    leaves = [t.clone().requires_grad_() for t in (x, wide_a, wide_b)]
    (tl.bgmv_shrink_expand(leaves[0], leaves[1], leaves[2], base, idx, 0.5) * weights).sum().backward()
    exact = [t.double().requires_grad_() for t in (x, a, b)]
    (_lora64(exact[0], exact[1], exact[2], idx, 0.5, torch.float64) * weights.double()).sum().backward()
    assert_close(leaves[0].grad, exact[0].grad.float())
    assert_close(leaves[1].grad[:, :, :200], exact[1].grad.float())
    assert_close(leaves[2].grad[:, :, :72], exact[2].grad.float())
    assert not leaves[1].grad[:, :, 200:].any() and not leaves[2].grad[:, :, 72:].any()


def test_lane_padded_buffers_equal_peft_on_a_linear_layer(xla_device):
    """PEFT's own mixed-batch forward (``adapter_names``) of a plain nn.Linear whose widths are not multiples of 128
    (200 -> 72): its two adapters' factors written into buffers padded to whole 128-lane tiles (scaling folded into
    B, as the layers write them), the Pallas backend's fused kernel adds each row's LoRA to the base output."""
    import warnings

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(200, 72))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=24, target_modules=["0"], init_lora_weights=False))
        peft.add_adapter("other", LoraConfig(r=8, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    peft.eval()
    layer = peft.base_model.model[0]
    wide_a, wide_b = torch.zeros(6, 16, 256), torch.zeros(6, 16, 128)
    for slot, name in ((1, "default"), (4, "other")):
        a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        wide_a[slot, : a.shape[0], :200] = a
        wide_b[slot, : a.shape[0], :72] = (b * layer.scaling[name]).T
    x = torch.randn(40, 200, generator=torch.Generator().manual_seed(8))
    names = ["default", "__base__", "other", "default", "other"] * 8
    idx = torch.tensor([{"default": 1, "other": 4, "__base__": -1}[n] for n in names], dtype=torch.int32)
    with torch.no_grad():
        expected = peft(x, adapter_names=names)
        base = model[0].base_layer(x)
    meta = tl.ops.batch_metadata(idx, [(200, 72)], 16, 6, torch.float32)[(200, 72)]
    args = [t.to(xla_device) for t in (x, wide_a, wide_b, base, idx)]
    out = tl.bgmv_shrink_expand(*args, 1.0, "pallas", meta.to(xla_device))
    assert_close(out.cpu(), expected)
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapters matter
