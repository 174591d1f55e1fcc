"""Test setup: the suite runs on the CPU PJRT device, chosen here rather than by the user."""

import os

# Must be set before torch_xla starts its runtime.
os.environ.setdefault("PJRT_DEVICE", "CPU")
# JAX (inside call_jax) on the CPU too: libtpu, which the test extra installs for
# tests/test_tpu_compile.py, is then never asked for a TPU client in these processes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One process compiles a few thousand small graphs over the suite: keep them all
# (torch_xla's default cache of 2048 would start evicting part-way through).
os.environ.setdefault("XLA_COMPILATION_CACHE_SIZE", "16384")

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


def tiny_llama(**overrides):
    """A random-weight transformers Llama small enough for unit tests (seeded; no download)."""
    import transformers

    torch.manual_seed(overrides.pop("seed", 0))
    config = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    config.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
