"""Edges of the op contract on the XLA device, both backends: tokens whose slot is outside [0, L) get exactly
the base row (zero for shrink) whatever the slots hold, Inf included; zero-size dims give what the CPU
reference gives; packed metadata of the wrong length raises ShapeError."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import torch_xla_lora as tl
from torch_xla_lora import ops

T, L, R, D, DOUT, WIDTH, OFFSET = 16, 3, 4, 32, 24, 8, 8
INDICES = {  # slot 0 holds Inf and no token uses it; -1 and 7 are out of range
    "all_out_of_range": [-1, 7] * (T // 2),
    "mixed": [1, -1, 2, 7] * (T // 4),
}
OPS = ("shrink", "expand", "expand_slice", "shrink_expand")


def _call(op: str, x, s, a, b, base, idx, backend: str, width: int = WIDTH):
    if op == "shrink":
        return tl.bgmv_shrink(x, a, idx, 0.5, backend)
    if op == "expand":
        return tl.bgmv_expand(s, b, base, idx, True, backend)
    if op == "expand_slice":
        return tl.bgmv_expand_slice(s, b[..., :width], base, idx, OFFSET, True, backend)
    return tl.bgmv_shrink_expand(x, a, b, base, idx, 0.5, backend)


def _tensors(indices, rank=R, slots=L, hidden=D, out_dim=DOUT):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, hidden, generator=gen)
    s = torch.randn(T, rank, generator=gen)
    a = torch.randn(slots, rank, hidden, generator=gen)
    b = torch.randn(slots, rank, out_dim, generator=gen)
    base = torch.randn(T, out_dim, generator=gen)
    idx = torch.tensor(indices, dtype=torch.int32)
    return x, s, a, b, base, idx


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("indices", INDICES)
@pytest.mark.parametrize("op", OPS)
def test_out_of_range_rows_are_exactly_the_base_whatever_the_slots_hold(op, indices, backend, xla_device):
    x, s, a, b, base, idx = _tensors(INDICES[indices])
    a[0], b[0] = float("inf"), float("inf")  # an unused slot
    expected = _call(op, x, s, a, b, base, idx, backend)  # CPU reference
    out = _call(op, *(t.to(xla_device) for t in (x, s, a, b, base, idx)), backend).cpu()
    outside = (idx < 0) | (idx >= L)
    assert torch.equal(out[outside], expected[outside])  # exactly base (or zero), no NaN
    assert torch.isfinite(out).all()
    assert_close(out, expected)


ZERO_DIMS = {"L": {"slots": 0}, "R": {"rank": 0}, "D": {"hidden": 0}, "Dout": {"out_dim": 0}, "width": {}}
ZERO_CASES = [(op, zero) for op in OPS for zero in ZERO_DIMS if zero != "width" or op == "expand_slice"]


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize(("op", "zero"), ZERO_CASES)
def test_zero_size_dims_behave_as_on_cpu(op, zero, backend, xla_device):
    x, s, a, b, base, idx = _tensors([1, -1, 0, 2] * (T // 4), **ZERO_DIMS[zero])
    width = 0 if zero == "width" else min(WIDTH, b.shape[2])
    try:
        expected = _call(op, x, s, a, b, base, idx, backend, width)
    except tl.ShapeError:  # CPU refuses it (e.g. a slice wider than Dout = 0): XLA must refuse it alike
        with pytest.raises(tl.ShapeError):
            _call(op, *(t.to(xla_device) for t in (x, s, a, b, base, idx)), backend, width)
        return
    out = _call(op, *(t.to(xla_device) for t in (x, s, a, b, base, idx)), backend, width).cpu()
    assert out.shape == expected.shape
    assert_close(out, expected)


@pytest.mark.parametrize("change", [-1, 1])
def test_metadata_of_the_wrong_length_raises_shape_error(change, xla_device):
    x, _, a, b, base, idx = _tensors([1, -1, 0, 2] * (T // 4))
    packed = ops.batch_metadata(idx, [(D, DOUT)], R, L, torch.float32)[(D, DOUT)]
    wrong = torch.zeros(packed.shape[0] + change, dtype=torch.int32)
    wrong[: min(len(packed), len(wrong))] = packed[: len(wrong)]
    args = [t.to(xla_device) for t in (x, a, b, base, idx)]
    with pytest.raises(tl.ShapeError, match="metadata must have"):
        tl.bgmv_shrink_expand(*args, 1.0, "xla", wrong.to(xla_device))
    ok = tl.bgmv_shrink_expand(*args, 1.0, "xla", packed.to(xla_device))  # the right length passes
    assert_close(ok.cpu(), tl.bgmv_shrink_expand(x, a, b, base, idx, 1.0))
