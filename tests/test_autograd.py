"""Autograd of every op: float64 gradcheck and opcheck on CPU tensors, gradients on the XLA device against
torch.autograd on plain per-token einsum formulations in float64, exact zeros for unused slots and padded
ranks, and one compiled training step.

The plain formulations below gather each token's slot weights (zero where the index is outside [0, L)) and
never call the library, so a wrong backward formula, a gradient leaking into a slot no token uses, or a
token without adapter contributing to a slot makes these tests fail.
"""

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch.nn import functional as F

import torch_xla_lora  # noqa: F401  (registers torch.ops.xla_lora)

OPS = torch.ops.xla_lora
T, D, R, L, DOUT, SLICE, OFFSET = 7, 10, 3, 5, 12, 5, 4
SCALING = 0.5
# Slots 1 and 3 unused; -1 (no adapter), -3 (an experts row of a token without adapter: slot * E + e < 0)
# and L + 1 (out of range) contribute nothing.
INDICES = {"mixed": [0, 2, -1, L + 1, 2, -3, 4], "one_token": [2]}


def _gathered(weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[T, ...]: each token's slot weights, zero where its index is outside [0, L)."""
    valid = (idx >= 0) & (idx < weights.shape[0])
    rows = weights[idx.long().clamp(0, weights.shape[0] - 1)]
    return torch.where(valid.reshape(-1, *[1] * (rows.dim() - 1)), rows, torch.zeros_like(rows))


def _lora(x, a, b, idx, scaling):
    s = scaling * torch.einsum("trd,td->tr", _gathered(a, idx), x)
    return torch.einsum("tr,tro->to", s, _gathered(b, idx))


class Case(NamedTuple):
    shapes: dict[str, tuple[int, ...]]  # one-element shapes are per token: [T, n]
    op: Callable
    args: tuple  # the op's arguments: names of ``shapes`` entries, "idx", "backend", or values
    plain: Callable  # (tensors, idx) -> the op's output, in plain torch


CASES = {
    "bgmv_shrink": Case(
        {"x": (D,), "a": (L, R, D)},
        OPS.bgmv_shrink,
        ("x", "a", "idx", SCALING, "backend"),
        lambda t, idx: SCALING * torch.einsum("trd,td->tr", _gathered(t["a"], idx), t["x"]),
    ),
    "bgmv_expand": Case(
        {"s": (R,), "b": (L, R, DOUT), "base": (DOUT,)},
        OPS.bgmv_expand,
        ("s", "b", "base", "idx", True, "backend"),
        lambda t, idx: t["base"] + torch.einsum("tr,tro->to", t["s"], _gathered(t["b"], idx)),
    ),
    "bgmv_expand_slice": Case(  # add_inputs=False: base gets no gradient
        {"s": (R,), "b": (L, R, SLICE), "base": (DOUT,)},
        OPS.bgmv_expand_slice,
        ("s", "b", "base", "idx", OFFSET, False, "backend"),
        lambda t, idx: (
            F.pad(torch.einsum("tr,tro->to", t["s"], _gathered(t["b"], idx)), (OFFSET, DOUT - OFFSET - SLICE))
            + 0 * t["base"]
        ),
    ),
    "bgmv_shrink_expand": Case(
        {"x": (D,), "a": (L, R, D), "b": (L, R, DOUT), "base": (DOUT,)},
        OPS.bgmv_shrink_expand,
        ("x", "a", "b", "base", "idx", SCALING, "backend", None),
        lambda t, idx: t["base"] + _lora(t["x"], t["a"], t["b"], idx, SCALING),
    ),
    "linear_lora_out_in": Case(
        {"x": (D,), "w": (DOUT, D), "bias": (DOUT,), "a": (L, R, D), "b": (L, R, DOUT)},
        OPS.linear_lora,
        ("x", "w", "bias", "a", "b", "idx", SCALING, "out_in", "backend", None, False),
        lambda t, idx: t["x"] @ t["w"].T + t["bias"] + _lora(t["x"], t["a"], t["b"], idx, SCALING),
    ),
    "linear_lora_in_out": Case(  # GPT-2's Conv1D layout, no bias
        {"x": (D,), "w": (D, DOUT), "a": (L, R, D), "b": (L, R, DOUT)},
        OPS.linear_lora,
        ("x", "w", None, "a", "b", "idx", SCALING, "in_out", "backend", None, False),
        lambda t, idx: t["x"] @ t["w"] + _lora(t["x"], t["a"], t["b"], idx, SCALING),
    ),
    "bgmv_weight_grad": Case(
        {"left": (R,), "right": (D,)},
        OPS.bgmv_weight_grad,
        ("left", "right", "idx", L, SCALING),
        lambda t, idx: (
            SCALING * torch.einsum("tl,tp,tq->lpq", _one_hot(idx).to(t["left"].dtype), t["left"], t["right"])
        ),
    ),
}


def _one_hot(idx: torch.Tensor) -> torch.Tensor:
    """[T, L] bool: token t uses slot l (no column for an index outside [0, L))."""
    return idx.long()[:, None] == torch.arange(L, device=idx.device)


def _call(case: Case, tensors: dict[str, torch.Tensor], idx: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    named = {**tensors, "idx": idx, "backend": backend}
    return case.op(*(named[a] if isinstance(a, str) and a in named else a for a in case.args))


def _tensors(name: str, num_tokens: int, dtype=torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """CPU tensors of one case (per-token ones get ``num_tokens`` rows); rank R - 1 is padding: zero in A and B."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in CASES[name].shapes.items():
        full = (num_tokens, *shape) if len(shape) == 1 and key != "bias" else shape
        value = torch.randn(full, generator=g, dtype=torch.float64)
        if key in ("a", "b"):
            value[:, R - 1] = 0
        out[key] = value.to(dtype)
    return out


def _indices(pattern: str) -> torch.Tensor:
    return torch.tensor(INDICES[pattern], dtype=torch.int32)


@pytest.mark.parametrize("pattern", INDICES)
@pytest.mark.parametrize("name", CASES)
def test_gradcheck_cpu_float64(name, pattern):
    """Analytic gradients, and their own gradients, match finite differences of the op for every input."""
    case, tensors, idx = CASES[name], _tensors(name, len(INDICES[pattern])), _indices(pattern)
    keys = list(tensors)

    def fn(*values):
        return _call(case, dict(zip(keys, values, strict=True)), idx)

    inputs = tuple(t.requires_grad_() for t in tensors.values())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)  # random projections: a third of the time


@pytest.mark.parametrize("name", CASES)
def test_opcheck_cpu(name):
    """Schema, fake implementation, autograd registration and AOT dispatch (dynamic shapes) agree with the op."""
    case = CASES[name]
    named = {k: v.requires_grad_() for k, v in _tensors(name, T, torch.float32).items()}
    named |= {"idx": _indices("mixed"), "backend": "auto"}
    args = tuple(named[a] if isinstance(a, str) and a in named else a for a in case.args)
    torch.library.opcheck(case.op, args)
