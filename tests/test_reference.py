"""The plain-torch reference against independent math: per-token gathered weights, in float64 where a
rounding rule or a weight layout is the point."""

import pytest
import torch

from torch_xla_lora import reference


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    T, D, R, L, DOUT = 23, 40, 6, 4, 30
    idx = torch.randint(-3, L + 3, (T,), generator=g)
    return (
        torch.randn(T, D, generator=g),
        torch.randn(L, R, D, generator=g),
        torch.randn(L, R, DOUT, generator=g),
        torch.randn(T, DOUT, generator=g),
        idx,
    )


def _gathered(weights, idx):
    valid = (idx >= 0) & (idx < weights.shape[0])
    w = weights[idx.clamp(0, weights.shape[0] - 1)]
    return w * valid[:, None, None]


def test_shrink(case):
    x, a, _, _, idx = case
    expected = 0.25 * torch.einsum("trd,td->tr", _gathered(a, idx), x)
    torch.testing.assert_close(reference.bgmv_shrink(x, a, idx, 0.25), expected)


def test_expand_and_slice(case):
    x, _, b, base, idx = case
    s = x[:, : b.shape[1]]
    delta = torch.einsum("tr,tro->to", s, _gathered(b, idx))
    torch.testing.assert_close(reference.bgmv_expand(s, b, base, idx), base + delta)
    torch.testing.assert_close(reference.bgmv_expand(s, b, base, idx, add_inputs=False), delta)
    narrow = b[:, :, :10]
    out = reference.bgmv_expand_slice(s, narrow, base, idx, 5)
    expected = base.clone()
    expected[:, 5:15] += torch.einsum("tr,tro->to", s, _gathered(narrow, idx))
    torch.testing.assert_close(out, expected)


def test_shrink_expand(case):
    x, a, b, base, idx = case
    s = torch.einsum("trd,td->tr", _gathered(a, idx), x)
    expected = base + 0.5 * torch.einsum("tr,tro->to", s, _gathered(b, idx))
    torch.testing.assert_close(reference.bgmv_shrink_expand(x, a, b, base, idx, 0.5), expected)


def _lora64(x, a, b, idx, scaling, intermediate_dtype=None):
    """Float64 ``scaling * (x @ A_i^T) @ B_i`` per token; the [T, R] intermediate rounded to
    ``intermediate_dtype`` first when given."""
    shrunk = scaling * torch.einsum("trd,td->tr", _gathered(a.double(), idx), x.double())
    if intermediate_dtype is not None:
        shrunk = shrunk.to(intermediate_dtype).double()
    return torch.einsum("tr,tro->to", shrunk, _gathered(b.double(), idx))


@pytest.mark.parametrize("op", ["shrink_expand", "linear_lora"])
def test_rank_intermediate_rounded_to_lora_b_dtype(op):
    """The documented bf16 rule, with bf16 ``lora_b`` and float32 everything else (a float32 output,
    so the rule shows): a reference that kept the intermediate in float32, or rounded it to another
    dtype (the inputs', lora_a's), fails here."""
    g = torch.Generator().manual_seed(1)
    T, K, N, R, L = 12, 40, 24, 6, 3
    # Integers: the float32 shrink is exact, so only the rule's rounding separates the two answers below.
    x = torch.randint(-64, 65, (T, K), generator=g).float()
    a = torch.randint(-64, 65, (L, R, K), generator=g).float()
    b = (torch.randn(L, R, N, generator=g) / 1e4).to(torch.bfloat16)
    idx = torch.randint(-1, L, (T,), generator=g)
    if op == "shrink_expand":
        base = torch.randn(T, N, generator=g)
        out = reference.bgmv_shrink_expand(x, a, b, base, idx, 0.25)
        base64 = base.double()
    else:
        weight, bias = torch.randn(N, K, generator=g) / 1e3, torch.randn(N, generator=g)
        out = reference.linear_lora(x, weight, bias, a, b, idx, 0.25)
        base64 = x.double() @ weight.double().T + bias.double()
    assert out.dtype == torch.float32
    rounded = base64 + _lora64(x, a, b, idx, 0.25, torch.bfloat16)
    torch.testing.assert_close(out.double(), rounded, atol=1e-6 * rounded.abs().max().item(), rtol=1e-6)
    # The case tells the rule apart: without the rounding the answer is measurably different.
    unrounded = base64 + _lora64(x, a, b, idx, 0.25)
    assert (unrounded - rounded).abs().max() > 100 * 1e-6 * rounded.abs().max()


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_linear_lora_weight_layouts(case, layout):
    """``in_out`` takes W as [K, N] (GPT-2's Conv1D), ``out_in`` as [N, K] (nn.Linear). W is square
    and not symmetric, so a layout read the wrong way round gives other values, not a shape error."""
    x, a, _, _, idx = case
    g = torch.Generator().manual_seed(2)
    K = x.shape[1]
    weight = torch.randn(K, K, generator=g)  # [N, K], N = K
    b, bias = torch.randn(a.shape[0], a.shape[1], K, generator=g), torch.randn(K, generator=g)
    given = weight if layout == "out_in" else weight.T.contiguous()
    out = reference.linear_lora(x, given, bias, a, b, idx, 0.5, weight_layout=layout)
    expected = x.double() @ weight.double().T + bias.double() + _lora64(x, a, b, idx, 0.5)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
