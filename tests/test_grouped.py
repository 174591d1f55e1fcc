"""``grouped_matmul`` and ``grouped_matmul_weight_grad``: the CPU reference and every XLA method against a float64
row-by-row loop, the group patterns that break grouped kernels (empty groups, one group holding every row, rows
past the last group, tiles shared by several groups), bfloat16, typed errors, opcheck and float64 gradcheck.

The float64 loop below walks the rows one at a time, finds each row's group from the cumulative sizes and
multiplies it by that group's weight: it shares nothing with the library's per-group loop or tiles.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from torch_xla_lora.errors import ArgumentTypeError, ShapeError
from torch_xla_lora.ops._grouped import block_rows, grouped_matmul, grouped_matmul_weight_grad

ROWS, IN, OUT, GROUPS = 37, 24, 40, 5
# Group sizes: empty groups between and at both ends, and 3 rows past the last group (sum 34 < 37); every
# row in one middle group; every row in the last group. The "tiled" method runs 8-row tiles here.
SIZES = {
    "mixed": [0, 11, 0, 23, 0],
    "one_group": [0, 0, ROWS, 0, 0],
    "last_group": [0, 0, 0, 0, ROWS],
}
METHODS = ["tiled", "ragged_dot", "gmm"]


@pytest.fixture(scope="module", autouse=True)
def _xla_device_before_any_backward(xla_device):
    """torch's autograd engine must see the XLA device before the first backward of the process (see
    test_autograd.py): the gradcheck below runs CPU backwards."""
    return xla_device


def _group_of_rows(sizes: list[int], rows: int) -> list[int]:
    """Each row's group, -1 for rows past the last group."""
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [next((g for g, end in enumerate(ends) if r < end), -1) for r in range(rows)]


def loop_matmul(x: torch.Tensor, w: torch.Tensor, sizes: list[int], transposed: bool) -> torch.Tensor:
    x, w = x.double(), w.double()
    out = torch.zeros(x.shape[0], w.shape[2] if transposed else w.shape[1], dtype=torch.float64)
    for row, group in enumerate(_group_of_rows(sizes, x.shape[0])):
        if group >= 0:
            out[row] = x[row] @ w[group] if transposed else w[group] @ x[row]
    return out


def loop_weight_grad(left: torch.Tensor, right: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    out = torch.zeros(len(sizes), left.shape[1], right.shape[1], dtype=torch.float64)
    for row, group in enumerate(_group_of_rows(sizes, left.shape[0])):
        if group >= 0:
            out[group] += torch.outer(left[row].double(), right[row].double())
    return out


def _operands(transposed: bool, dtype=torch.float32, rows: int = ROWS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, IN, generator=gen).to(dtype)
    shape = (GROUPS, IN, OUT) if transposed else (GROUPS, OUT, IN)
    return x, torch.randn(shape, generator=gen).to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float64:  # the suite's tolerances are for float32 and bfloat16
        torch.testing.assert_close(actual, expected)
    else:
        assert_close(actual, expected, dtype)


def _sizes(name: str, device=None) -> torch.Tensor:
    return torch.tensor(SIZES[name], dtype=torch.int32, device=device)


# -- CPU tensors: the reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", SIZES)
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_equals_float64_loop(pattern, transposed, dtype):
    x, w = _operands(transposed, dtype)
    expected = loop_matmul(x, w, SIZES[pattern], transposed)
    out = grouped_matmul(x, w, _sizes(pattern), transposed)
    assert out.dtype == dtype and out.shape == expected.shape
    _close(out, expected, dtype)
    if pattern == "mixed":  # rows past the last group are exactly zero
        assert torch.equal(out[34:], torch.zeros_like(out[34:]))
    grad = torch.randn(ROWS, OUT, dtype=dtype)
    expected_grad = loop_weight_grad(grad, x, SIZES[pattern])
    _close(grouped_matmul_weight_grad(grad, x, _sizes(pattern)), expected_grad, dtype)


@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
def test_gradcheck_cpu_float64(transposed):
    """Both ops' gradients (and the matmul's second-order ones) against finite differences."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, 2, dtype=torch.float64, generator=gen)  # [E, in, out]
    w = (w if transposed else w.transpose(1, 2).contiguous()).requires_grad_()
    sizes = torch.tensor([2, 0, 4, 1], dtype=torch.int32)  # an empty group, 2 rows past the groups

    def matmul(x, w):
        return grouped_matmul(x, w, sizes, transposed)

    assert torch.autograd.gradcheck(matmul, (x, w))
    assert torch.autograd.gradgradcheck(matmul, (x, w), fast_mode=True)
    left = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    right = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_matmul_weight_grad(a, b, sizes), (left, right))


@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
def test_opcheck_cpu(transposed):
    """Schema, fake implementation, autograd registration and AOT dispatch (dynamic shapes) agree with the ops."""
    x, w = (t.requires_grad_() for t in _operands(transposed))
    torch.library.opcheck(torch.ops.xla_lora.grouped_matmul, (x, w, _sizes("mixed"), transposed, "auto"))
    left, right = (torch.randn(ROWS, n, requires_grad=True) for n in (3, 4))
    torch.library.opcheck(torch.ops.xla_lora.grouped_matmul_weight_grad, (left, right, _sizes("mixed"), "auto"))


# -- XLA tensors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
def test_xla_equals_float64_loop(transposed, method, xla_device):
    """One compiled graph per (layout, method): the group sizes are device data, every pattern reuses it."""
    x, w = _operands(transposed)
    xd, wd = x.to(xla_device), w.to(xla_device)
    for pattern in SIZES:
        out = grouped_matmul(xd, wd, _sizes(pattern, xla_device), transposed, method).cpu()
        assert_close(out, loop_matmul(x, w, SIZES[pattern], transposed), torch.float32)
        if pattern == "mixed":
            assert torch.equal(out[34:], torch.zeros_like(out[34:]))


def test_xla_tiles_shared_by_groups_and_weight_grad(xla_device):
    """Groups that start and end inside a tile of the "tiled" method, a tile holding four groups, and the
    weights' gradient of the "tiled" and "ragged_dot" methods."""
    rows = 150
    x, w = _operands(False, rows=rows, seed=1)
    sizes = [70, 1, 2, 0, 60]  # the tile of rows 64..79 holds groups 0, 1, 2 and 4; 17 rows past the groups
    assert block_rows(rows, GROUPS) == 16
    sizes_d = torch.tensor(sizes, dtype=torch.int32, device=xla_device)
    out = grouped_matmul(x.to(xla_device), w.to(xla_device), sizes_d, False, "tiled").cpu()
    assert_close(out, loop_matmul(x, w, sizes, False), torch.float32)
    grad = torch.randn(rows, OUT, generator=torch.Generator().manual_seed(2))
    expected = loop_weight_grad(grad, x, sizes)
    for method in ("tiled", "ragged_dot"):
        actual = grouped_matmul_weight_grad(grad.to(xla_device), x.to(xla_device), sizes_d, method).cpu()
        assert_close(actual, expected, torch.float32)


def test_xla_bfloat16(xla_device):
    x, w = _operands(True, torch.bfloat16)
    sizes = _sizes("mixed", xla_device)
    out = grouped_matmul(x.to(xla_device), w.to(xla_device), sizes, True).cpu()
    assert out.dtype == torch.bfloat16
    assert_close(out, loop_matmul(x, w, SIZES["mixed"], True), torch.bfloat16)


def test_xla_gradients_equal_float64_autograd(xla_device):
    """The registered backward on the device (the "auto" method: "tiled" here, ragged dot and gmm on TPU)
    against torch.autograd through the float64 loop."""
    x, w = _operands(False)
    sizes = SIZES["mixed"]
    grad = torch.randn(ROWS, OUT, generator=torch.Generator().manual_seed(3))
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    expected = torch.autograd.grad(loop_matmul(x64, w64, sizes, False), (x64, w64), grad.double())
    xd, wd = x.to(xla_device).requires_grad_(), w.to(xla_device).requires_grad_()
    out = grouped_matmul(xd, wd, _sizes("mixed", xla_device), False)
    actual = torch.autograd.grad(out, (xd, wd), grad.to(xla_device))
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, torch.float32)
    assert torch.equal(actual[1][0].cpu(), torch.zeros(OUT, IN))  # an empty group's weight gets exactly zero


def test_zero_rows_and_zero_groups(xla_device):
    for device in (torch.device("cpu"), xla_device):
        x, w = torch.zeros(0, IN, device=device), torch.randn(GROUPS, OUT, IN).to(device)
        assert grouped_matmul(x, w, _sizes("mixed", device) * 0).shape == (0, OUT)
        none = torch.zeros(0, dtype=torch.int32, device=device)
        out = grouped_matmul(torch.ones(3, IN, device=device), w[:0], none)
        assert torch.equal(out.cpu(), torch.zeros(3, OUT))


# -- typed errors -------------------------------------------------------------------------------------------


def test_bad_arguments_raise_typed_errors():
    x, w = _operands(False)
    sizes = _sizes("mixed")
    with pytest.raises(ArgumentTypeError, match="group_sizes must be a torch.Tensor"):
        grouped_matmul(x, w, [0, 11, 0, 23, 0])
    with pytest.raises(ShapeError, match="group_sizes must be int32"):
        grouped_matmul(x, w, sizes.long())
    with pytest.raises(ShapeError, match=r"group_sizes must be \[E\] = \[5\]"):
        grouped_matmul(x, w, sizes[:4])
    with pytest.raises(ShapeError, match=r"weights \[E, out, in\] dim 2 must equal in of inputs = 24"):
        grouped_matmul(x, w.transpose(1, 2), sizes)
    with pytest.raises(ShapeError, match="weights must have the dtype of inputs"):
        grouped_matmul(x, w.double(), sizes)
    with pytest.raises(ShapeError, match="inputs must be a floating tensor"):
        grouped_matmul(x.int(), w.int(), sizes)
    with pytest.raises(ShapeError, match="method must be one of"):
        grouped_matmul(x, w, sizes, method="pallas")
    with pytest.raises(ShapeError, match="right dim 0 must equal S of left"):
        grouped_matmul_weight_grad(x, x[:3], sizes)
