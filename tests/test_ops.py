"""The ops on the XLA device, both backends, against the plain-torch reference."""

import math

import pytest
import torch
from conftest import assert_close

import torch_xla_lora as tl
from torch_xla_lora import reference

BACKENDS = ["xla", "pallas"]
DTYPES = [torch.float32, torch.bfloat16]

# (T, D, R, L): a covering set rather than the full product, so every value of
# T {1, 7, 16, 300}, D {64, 1000, 4096}, R {1, 8, 16, 64}, L {1, 3, 8} appears
# with several partners, and T/D values that do not divide into tiles appear.
SHAPES = [
    (1, 64, 1, 1),
    (7, 1000, 8, 3),
    (16, 4096, 16, 8),
    (300, 64, 64, 8),
    (300, 1000, 16, 1),
    (7, 4096, 64, 3),
    (1, 4096, 8, 8),
    (300, 4096, 1, 3),
]


def _indices(num_tokens: int, num_slots: int, pattern: str, generator) -> torch.Tensor:
    if pattern == "mixed":  # valid slots, -1 and out-of-range values on both sides
        return torch.randint(-2, num_slots + 2, (num_tokens,), generator=generator, dtype=torch.int32)
    if pattern == "one":
        return torch.full((num_tokens,), num_slots - 1, dtype=torch.int32)
    if pattern == "none":
        return torch.full((num_tokens,), -1, dtype=torch.int32)
    raise ValueError(pattern)


def _case(shape, dtype, pattern="mixed", seed=0):
    num_tokens, hidden, rank, num_slots = shape
    g = torch.Generator().manual_seed(seed)
    # A scaled like a LoRA init so outputs stay O(1) in bfloat16.
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    a = (torch.randn(num_slots, rank, hidden, generator=g) / math.sqrt(hidden)).to(dtype)
    idx = _indices(num_tokens, num_slots, pattern, g)
    return x, a, idx, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shrink_matches_reference(shape, dtype, backend, xla_device):
    x, a, idx, _ = _case(shape, dtype)
    out = tl.bgmv_shrink(x.to(xla_device), a.to(xla_device), idx.to(xla_device), 0.5, backend)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2])
    assert_close(out, reference.bgmv_shrink(x, a, idx, 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_expand_matches_reference(shape, dtype, backend, xla_device):
    num_tokens, out_dim, rank, num_slots = shape
    _, _, idx, g = _case(shape, dtype)
    s = torch.randn(num_tokens, rank, generator=g).to(dtype)
    b = (torch.randn(num_slots, rank, out_dim, generator=g) / math.sqrt(rank)).to(dtype)
    base = torch.randn(num_tokens, out_dim, generator=g).to(dtype)
    for add_inputs in (True, False):
        out = tl.bgmv_expand(
            s.to(xla_device), b.to(xla_device), base.to(xla_device), idx.to(xla_device), add_inputs, backend
        )
        assert out.dtype == dtype and out.shape == base.shape
        assert_close(out, reference.bgmv_expand(s, b, base, idx, add_inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("out_dim", "offset", "width"), [(96, 32, 32), (1000, 0, 1000), (4096, 1024, 512)])
def test_expand_slice_matches_reference(out_dim, offset, width, dtype, add_inputs, backend, xla_device):
    g = torch.Generator().manual_seed(1)
    num_tokens, rank, num_slots = 7, 16, 3
    s = torch.randn(num_tokens, rank, generator=g).to(dtype)
    b = (torch.randn(num_slots, rank, width, generator=g) / 4).to(dtype)
    base = torch.randn(num_tokens, out_dim, generator=g).to(dtype)
    idx = _indices(num_tokens, num_slots, "mixed", g)
    args = (s, b, base, idx)
    out = tl.bgmv_expand_slice(*(t.to(xla_device) for t in args), offset, add_inputs, backend)
    expected = reference.bgmv_expand_slice(*args, offset, add_inputs)
    assert_close(out, expected)
    outside = torch.ones(out_dim, dtype=torch.bool)
    outside[offset : offset + width] = False
    # Columns outside the slice are exactly the base (or exactly zero).
    assert torch.equal(out.cpu()[:, outside], (base if add_inputs else torch.zeros_like(base))[:, outside])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["mixed", "one", "none"])
def test_index_patterns(pattern, backend, xla_device):
    shape = (40, 256, 16, 4)
    x, a, idx, g = _case(shape, torch.float32, pattern)
    b = torch.randn(4, 16, 128, generator=g)
    base = torch.randn(40, 128, generator=g)
    dev = [t.to(xla_device) for t in (x, a, idx, b, base)]
    s = tl.bgmv_shrink(dev[0], dev[1], dev[2], 1.0, backend)
    out = tl.bgmv_expand(s, dev[3], dev[4], dev[2], True, backend)
    assert_close(out, reference.bgmv_expand(reference.bgmv_shrink(x, a, idx), b, base, idx))
    no_adapter = (idx < 0) | (idx >= 4)
    # A token without an adapter gets exactly zero from shrink and exactly the base from expand.
    assert torch.equal(s.cpu()[no_adapter], torch.zeros_like(s.cpu()[no_adapter]))
    assert torch.equal(out.cpu()[no_adapter], base[no_adapter])


def test_ops_do_not_mutate_arguments(xla_device):
    x, a, idx, g = _case((16, 128, 8, 3), torch.float32)
    base = torch.randn(16, 64, generator=g)
    b = torch.randn(3, 8, 64, generator=g)
    for device in ("cpu", xla_device):
        base_d = base.to(device)
        tl.bgmv_expand(tl.bgmv_shrink(x.to(device), a.to(device), idx.to(device)), b.to(device), base_d, idx.to(device))
        tl.bgmv_expand_slice(torch.ones(16, 8, device=device), b[:, :, :32].to(device), base_d, idx.to(device), 16)
        assert torch.equal(base_d.cpu(), base)


@pytest.mark.parametrize(("num_tokens", "rank"), [(24, 16), (300, 16), (300, 64)], ids=["one-block", "laned", "sorted"])
def test_interleaved_adapters_shrink_then_expand_xla(num_tokens, rank, xla_device):
    """Decode layout (token t on adapter t mod 8, every 4th token base), an unused slot full of Inf."""
    x, a, _, g = _case((num_tokens, 256, rank, 9), torch.float32)
    b, base = torch.randn(9, rank, 192, generator=g), torch.randn(num_tokens, 192, generator=g)
    a[8], b[8] = float("inf"), float("inf")
    idx = (torch.arange(num_tokens) % 8).to(torch.int32)
    idx[::4] = -1
    dev = [t.to(xla_device) for t in (x, a, idx, b, base)]
    s = tl.bgmv_shrink(dev[0], dev[1], dev[2], 1.0, "xla")
    out = tl.bgmv_expand(s, dev[3], dev[4], dev[2], True, "xla").cpu()
    expected_s = reference.bgmv_shrink(x, a[:8], idx)
    assert_close(s.cpu(), expected_s)
    assert_close(out, reference.bgmv_expand(expected_s, b[:8], base, idx))
    assert torch.equal(out[idx < 0], base[idx < 0])
