"""The ops under torch.compile(backend="openxla"): same results, no CPU fallback, no recompilation."""

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
from conftest import assert_close

import torch_xla_lora as tl
from torch_xla_lora import reference

T, D, R, L, DOUT = 32, 256, 16, 4, 192


def _lora_step(x, a, b, base, idx):
    s = torch.ops.xla_lora.bgmv_shrink(x, a, idx, 2.0)
    y = torch.ops.xla_lora.bgmv_expand(s, b, base, idx, True)
    return torch.ops.xla_lora.bgmv_expand_slice(s, b[:, :, :64], y, idx, 64, True)


def _expected(x, a, b, base, idx):
    s = reference.bgmv_shrink(x, a, idx, 2.0)
    y = reference.bgmv_expand(s, b, base, idx, True)
    return reference.bgmv_expand_slice(s, b[:, :, :64], y, idx, 64, True)


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(T, D, generator=g),
        torch.randn(L, R, D, generator=g) / 16,
        torch.randn(L, R, DOUT, generator=g) / 4,
        torch.randn(T, DOUT, generator=g),
    )


def _random_indices(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, L, (T,), generator=g, dtype=torch.int32)


def _compile_count() -> int:
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


def test_compiled_matches_reference_without_fallback_or_recompile(tensors, xla_device):
    step = torch.compile(_lora_step, backend="openxla")
    dev = [t.to(xla_device) for t in tensors]
    met.clear_all()
    first = step(*dev, _random_indices(0).to(xla_device))
    assert_close(first, _expected(*tensors, _random_indices(0)))
    torch_xla.sync()
    compiles = _compile_count()
    assert compiles >= 1
    for seed in (1, 2, 3):  # new index values, same shapes
        out = step(*dev, _random_indices(seed).to(xla_device))
        assert_close(out, _expected(*tensors, _random_indices(seed)))
    torch_xla.sync()
    assert _compile_count() == compiles, "new index values must not compile a new graph"
    assert torch_xla._XLAC._get_executed_fallback_ops() == []


def test_lazy_mode_reuses_graph_for_new_indices(tensors, xla_device):
    dev = [t.to(xla_device) for t in tensors]
    out = _lora_step(*dev, _random_indices(4).to(xla_device))
    torch_xla.sync()
    compiles = _compile_count()
    out = _lora_step(*dev, _random_indices(5).to(xla_device))
    assert_close(out, _expected(*tensors, _random_indices(5)))
    assert _compile_count() == compiles


def test_fake_implementations_give_shape_dtype_device():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 64, dtype=torch.bfloat16)
        a = torch.empty(3, 8, 64, dtype=torch.bfloat16)
        idx = torch.empty(5, dtype=torch.int32)
        s = torch.ops.xla_lora.bgmv_shrink(x, a, idx, 1.0)
        base = torch.empty(5, 96, dtype=torch.bfloat16)
        y = tl.bgmv_expand(s, torch.empty(3, 8, 96, dtype=torch.bfloat16), base, idx)
        z = tl.bgmv_expand_slice(s, torch.empty(3, 8, 32, dtype=torch.bfloat16), base, idx, 32)
    assert (s.shape, s.dtype) == ((5, 8), torch.bfloat16)
    assert (y.shape, y.dtype) == ((5, 96), torch.bfloat16)
    assert (z.shape, z.dtype) == ((5, 96), torch.bfloat16)
