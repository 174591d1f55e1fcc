"""Test setup: the suite runs on the CPU PJRT device, chosen here rather than by the user."""

import os

# Must be set before torch_xla starts its runtime.
os.environ.setdefault("PJRT_DEVICE", "CPU")

import pytest  # noqa: E402
import torch  # noqa: E402

TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 5e-2, "rtol": 2e-2},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale=1.0):
    """Compare with the tolerance of ``dtype`` (default: expected's), atol scaled by ``scale``."""
    tol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), atol=tol["atol"] * scale, rtol=tol["rtol"])


@pytest.fixture(scope="session")
def xla_device() -> torch.device:
    import torch_xla

    return torch_xla.device()
