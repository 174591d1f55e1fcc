"""Tenant isolation: a slot whose weights hold an Inf or a NaN (a tenant whose training diverged) poisons no
other tenant's rows, no row without adapter, and, through backward, no other tenant's gradients.

Every op, on CPU tensors (the torch reference) and on the XLA device with both backends. The poisoned slot's
rows share token blocks with other slots' rows and with base rows ("mixed": the laned products, which put
several slots' weights side by side in one matmul, and in the Pallas kernels a block with fewer slots after
it) or have blocks of their own ("uniform"). The reference is plain float64 einsum code over the finite
slots only; the poisoned slot's own rows must come out non-finite (hiding the divergence would be wrong too).
Would catch a laned product that multiplies the other lanes' weights by zero (0 * Inf = NaN) instead of
selecting, and a kernel that leaves a poisoned slot's tile in a lane a later block leaves unused.
"""

from __future__ import annotations

import pytest
import torch
import torch_xla
from conftest import assert_close
from torch.nn import functional as F

import torch_xla_lora as tl

# Lane-aligned widths (the fused Pallas kernel runs) and 64 tokens: two token blocks of 32 on CPU.
T, D, R, L, DOUT, SLICE, OFFSET = 64, 128, 16, 4, 128, 128, 64
SCALING = 0.5
POISONED = 1
LAYOUTS = {
    # Block 0 interleaves the poisoned slot with slots 0, 2, 3 and base rows; block 1 uses slot 0 only.
    "mixed": [1, 0, -1, 2, 1, 3, 0, 1] * 4 + [0] * 32,
    # Block 0 is the poisoned slot's alone; block 1 holds slot 2's rows and base rows.
    "uniform": [1] * 32 + [2, -1] * 16,
}
INF, NAN = float("inf"), float("nan")
# (op, the weights that get poisoned, the value): each op's slot weights; Inf and NaN each in A and in B, and
# in each fused kernel's B.
CASES = [
    ("bgmv_shrink", "a", INF),
    ("bgmv_expand", "b", NAN),
    ("bgmv_expand_slice", "b", INF),
    ("bgmv_shrink_expand", "a", NAN),
    ("bgmv_shrink_expand", "b", INF),
    ("linear_lora", "a", INF),
    ("linear_lora", "b", NAN),
]
# The activations each op takes (what requires grad besides its weights).
INPUT = {"bgmv_shrink": "x", "bgmv_expand": "s", "bgmv_expand_slice": "s"}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(T, D, generator=g),
        "s": torch.randn(T, R, generator=g),
        "a": torch.randn(L, R, D, generator=g) / D**0.5,
        "b": torch.randn(L, R, DOUT, generator=g) / R**0.5,
        "bs": torch.randn(L, R, SLICE, generator=g) / R**0.5,
        "base": torch.randn(T, DOUT, generator=g),
        "wide": torch.randn(T, OFFSET + SLICE + 64, generator=g),
        "w": torch.randn(DOUT, D, generator=g) / D**0.5,
        "bias": torch.randn(DOUT, generator=g),
    }


def _weights(op: str) -> tuple[str, ...]:
    return {"bgmv_shrink": ("a",), "bgmv_expand": ("b",), "bgmv_expand_slice": ("bs",)}.get(op, ("a", "b"))


def _call(op: str, t: dict, idx: torch.Tensor, backend: str) -> torch.Tensor:
    if op == "bgmv_shrink":
        return tl.bgmv_shrink(t["x"], t["a"], idx, SCALING, backend)
    if op == "bgmv_expand":
        return tl.bgmv_expand(t["s"], t["b"], t["base"], idx, True, backend)
    if op == "bgmv_expand_slice":
        return tl.bgmv_expand_slice(t["s"], t["bs"], t["wide"], idx, OFFSET, True, backend)
    if op == "bgmv_shrink_expand":
        return tl.bgmv_shrink_expand(t["x"], t["a"], t["b"], t["base"], idx, SCALING, backend)
    return tl.linear_lora(t["x"], t["w"], t["bias"], t["a"], t["b"], idx, SCALING, "out_in", backend)


def _gathered(weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[T, ...]: each token's slot weights, zero for a token without adapter."""
    rows = weights[idx.long().clamp(min=0)]
    return torch.where((idx >= 0).reshape(-1, 1, 1), rows, torch.zeros_like(rows))


def _plain(op: str, t: dict, idx: torch.Tensor) -> torch.Tensor:
    """The op in plain torch einsum code (float64 tensors in, float64 out)."""
    if op == "bgmv_shrink":
        return SCALING * torch.einsum("trd,td->tr", _gathered(t["a"], idx), t["x"])
    if op == "bgmv_expand":
        return t["base"] + torch.einsum("tr,tro->to", t["s"], _gathered(t["b"], idx))
    if op == "bgmv_expand_slice":
        delta = torch.einsum("tr,tro->to", t["s"], _gathered(t["bs"], idx))
        return t["wide"] + F.pad(delta, (OFFSET, t["wide"].shape[1] - OFFSET - SLICE))
    shrunk = SCALING * torch.einsum("trd,td->tr", _gathered(t["a"], idx), t["x"])
    lora = torch.einsum("tr,tro->to", shrunk, _gathered(t["b"], idx))
    if op == "bgmv_shrink_expand":
        return t["base"] + lora
    return t["x"] @ t["w"].T + t["bias"] + lora


def _device(backend: str, request) -> torch.device:
    return torch.device("cpu") if backend == "reference" else request.getfixturevalue("xla_device")


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("op", "poisoned", "value"), CASES, ids=[f"{op}-{w}-{v}" for op, w, v in CASES])
def test_a_non_finite_slot_poisons_only_its_own_rows_and_gradients(op, poisoned, value, layout, backend, request):
    device = _device(backend, request)
    idx = torch.tensor(LAYOUTS[layout], dtype=torch.int32)
    own, base_rows = idx == POISONED, idx < 0
    others = ~own
    tensors = _tensors()
    key = "bs" if op == "bgmv_expand_slice" else poisoned
    clean = {k: v.double() for k, v in tensors.items()}
    tensors[key][POISONED, 1, 3] = value  # one entry of the poisoned slot's weights

    clean[key][POISONED] = 0  # the float64 reference over the finite slots (the poisoned one is not read there)
    leaves = [INPUT.get(op, "x"), *_weights(op)]
    on_device = {k: v.to(device) for k, v in tensors.items()}
    for name in leaves:
        on_device[name].requires_grad_()
    out = _call(op, on_device, idx.to(device), "auto" if backend == "reference" else backend)
    # Backward of a loss over the other rows only (its output gradient is zero on the poisoned slot's rows).
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out[own] = 0
    grads = torch.autograd.grad(out, [on_device[k] for k in leaves], grad_out.float().to(device))
    if device.type == "xla":
        torch_xla.sync()  # forward and backward in one graph: half the compilations

    result = out.detach().cpu()
    expected = _plain(op, clean, idx)
    assert torch.isfinite(result[others]).all(), f"non-finite rows outside slot {POISONED}"
    assert_close(result[others], expected[others], torch.float32)
    if op != "linear_lora":  # a row without adapter is exactly its base row (zero for shrink)
        assert torch.equal(result[base_rows], expected[base_rows].float())
    assert (~torch.isfinite(result[own])).any(dim=1).all(), "the poisoned slot's rows must show it"

    clean_leaves = [clean[k].requires_grad_() for k in leaves]
    expected_grads = torch.autograd.grad(_plain(op, clean, idx), clean_leaves, grad_out)
    for name, grad, want in zip(leaves, grads, expected_grads, strict=True):
        grad = grad.cpu()
        part = others if name in ("x", "s") else torch.arange(L) != POISONED  # rows or slots of other tenants
        assert torch.isfinite(grad[part]).all(), f"d{name} of other tenants is non-finite"
        assert_close(grad[part], want[part], torch.float32)
