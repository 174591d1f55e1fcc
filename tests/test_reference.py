"""The plain-torch reference against an independent formulation (per-token gathered weights)."""

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
