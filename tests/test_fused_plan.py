"""The fused kernel's planner: which shapes fall back to the separate kernels, and that nothing else does.

Host-only (no XLA graph): ``plan_call`` decides per shape and generation, whatever the device at hand.
"""

import logging

import jax.numpy as jnp
import pytest

from csrc_pallas import fused

# Llama-3-70B's down projection at rank 128, float32, on v4: the full-D [lanes * R, D] adapter tile alone
# is 14 MiB, beyond v4's 10 MiB limit, so no token block, output tile or lane count fits.
BEYOND_V4 = (2048, 28672, 8192, 128, 16, jnp.float32, "v4")


def test_a_shape_beyond_vmem_falls_back_explicitly_and_says_so_once(caplog):
    """Catches a silent fallback (no log), a log per call, and a planner that no longer refuses the shape."""
    fused._log_beyond_vmem.cache_clear()
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        for _ in range(3):
            sizes, lanes, run_fused = fused.plan_call(*BEYOND_V4)
            assert not run_fused and lanes == 1
    assert [r.getMessage() for r in caplog.records if "does not fit" in r.getMessage()] == [
        "fused shrink-expand kernel: D=28672, Dout=8192, R=128, L=16 in float32 does not fit the "
        f"{fused.vmem_limit('v4')} bytes of VMEM of v4 at any tiling; running the separate shrink and expand kernels"
    ]
    with pytest.raises(ValueError, match="cannot fit D=28672"):
        fused.plan(*BEYOND_V4)
    # The same call fits where VMEM is larger: the fallback is the shape's, not the planner's.
    assert fused.plan_call(*BEYOND_V4[:-1], "v6e")[2]


def test_a_planner_error_is_not_taken_for_a_fallback(monkeypatch):
    """A ValueError inside the planner (here from lanes_for) must reach the caller: the earlier
    ``except ValueError`` turned any such bug into a silent run of the separate kernels."""

    def broken(*args):
        raise ValueError("planner bug")

    monkeypatch.setattr(fused, "lanes_for", broken)
    with pytest.raises(ValueError, match="planner bug"):
        fused.plan_call(1024, 4096, 4096, 16, 8, jnp.bfloat16, "v6e")
