"""Bad arguments raise ShapeError (a ValueError) naming the argument, before any tracing."""

import pytest
import torch

import torch_xla_lora as tl


def _shrink_args(device="cpu"):
    return (
        torch.zeros(4, 64, device=device),
        torch.zeros(2, 8, 64, device=device),
        torch.zeros(4, dtype=torch.int32, device=device),
    )


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda x, a, i: (x[0], a, i), "inputs must be 2-D"),
        (lambda x, a, i: (x, a[0], i), "lora_a must be 3-D"),
        (lambda x, a, i: (x, a[:, :, :32], i), "lora_a dim 2 must equal D of inputs = 64"),
        (lambda x, a, i: (x, a.double(), i), "lora_a must have the dtype of inputs"),
        (lambda x, a, i: (x, a, i[:3]), "lora_indices dim 0 must equal T = 4"),
        (lambda x, a, i: (x, a, i.float()), "lora_indices must be"),
        (lambda x, a, i: (x.int(), a.int(), i), "inputs must be a floating tensor"),
    ],
)
def test_shrink_rejects(mutate, needle):
    with pytest.raises(tl.ShapeError, match=needle.replace("(", r"\(")) as err:
        tl.bgmv_shrink(*mutate(*_shrink_args()))
    assert isinstance(err.value, ValueError) and isinstance(err.value, tl.LoRAError)


def test_int64_indices_rejected_on_xla(xla_device):
    x, a, idx = _shrink_args(xla_device)
    with pytest.raises(tl.ShapeError, match=r"lora_indices must be torch.int32 on device xla, got torch.int64"):
        tl.bgmv_shrink(x, a, idx.long())


def test_int64_indices_accepted_off_xla():
    x, a, idx = _shrink_args()
    assert tl.bgmv_shrink(x, a, idx.long()).shape == (4, 8)


def test_unknown_backend_rejected():
    with pytest.raises(tl.ShapeError, match="backend must be one of"):
        tl.bgmv_shrink(*_shrink_args(), 1.0, "cuda")


@pytest.mark.parametrize(
    ("b_shape", "base_shape", "needle"),
    [
        ((2, 4, 32), (4, 32), "lora_b dim 1 must equal R of inputs = 8"),
        ((2, 8, 32), (3, 32), "base dim 0 must equal T of inputs = 4"),
        ((2, 8, 16), (4, 32), "lora_b dim 2 must equal Dout of base = 32"),
    ],
)
def test_expand_rejects(b_shape, base_shape, needle):
    with pytest.raises(tl.ShapeError, match=needle):
        tl.bgmv_expand(
            torch.zeros(4, 8),
            torch.zeros(b_shape),
            torch.zeros(base_shape),
            torch.zeros(4, dtype=torch.int32),
        )


@pytest.mark.parametrize("offset", [-1, 20])
def test_expand_slice_rejects_slice_outside_base(offset):
    with pytest.raises(tl.ShapeError, match=r"must lie within base's Dout = 32"):
        tl.bgmv_expand_slice(
            torch.zeros(4, 8),
            torch.zeros(2, 8, 16),
            torch.zeros(4, 32),
            torch.zeros(4, dtype=torch.int32),
            offset,
        )


def test_mismatched_device_rejected(xla_device):
    x, a, idx = _shrink_args()
    with pytest.raises(tl.ShapeError, match="lora_a must be on the device of inputs"):
        tl.bgmv_shrink(x.to(xla_device), a, idx.to(xla_device))
