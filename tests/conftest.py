"""Test setup: the suite runs on the CPU PJRT device, chosen here rather than by the user."""

import os

# Must be set before torch_xla starts its runtime.
os.environ.setdefault("PJRT_DEVICE", "CPU")
# JAX (inside call_jax) on the CPU too: libtpu, which the test extra installs for
# tests/test_tpu_compile.py, is then never asked for a TPU client in these processes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every compiled XLA:CPU executable keeps its JIT code in memory maps of its own (about one per fusion: a tiny
# patched Llama's training step holds ~570, a Pallas kernel in interpret mode ~150), and a process may hold
# 65,530 maps: with every graph kept, a worker running a quarter of the suite reached 60,000 and one crashed.
# torch_xla's computation cache (least recently used first) keeps the 64 newest graphs, far more than any test
# reuses; an evicted graph's maps are released (README, "Test suite").
os.environ.setdefault("XLA_COMPILATION_CACHE_SIZE", "64")
# XLA:CPU generates the suite's code at LLVM's lowest optimisation level: most of the suite's time is compiling
# graphs it runs once on tiny tensors (a Pallas kernel in interpret mode is a large graph of loops), and at level 0
# that takes a third less time (the HLO passes are unchanged; every test passes as at the default). Worker
# processes the tests start with XLA_FLAGS of their own add these flags (``cpu_compile_env``). On the CPU only.
CPU_COMPILE_FLAGS = "--xla_backend_optimization_level=0" if os.environ["PJRT_DEVICE"] == "CPU" else ""
if CPU_COMPILE_FLAGS and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_COMPILE_FLAGS}".strip()
if os.environ["PJRT_DEVICE"] == "TPU":
    # A TPU multiplies float32 in one bfloat16 pass by default (~1e-3 relative): full precision, in torch_xla's
    # graphs and in the JAX functions the ops trace, so that float32 results are held to float32 tolerances.
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    import torch_xla.backends

    torch_xla.backends.set_mat_mul_precision("highest")

import pytest  # noqa: E402
import torch  # noqa: E402

# Per dtype: ``atol`` is a fraction of the reference's largest magnitude, ``rtol`` of each element's, so that a
# tolerance is always small against the values it compares. Measured on this suite's tiny models: float32 results
# differ from their references by at most ~1e-6 of the largest magnitude; a two-layer Llama run in bfloat16
# differs from PEFT run in bfloat16 by up to ~1.4% of it, while a wrong adapter on a row moves that row by ~100%.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 3e-2, "rtol": 1e-2},
}


def tolerance(expected: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, float]:
    """``atol``/``rtol`` for comparing with ``expected`` at the precision of ``dtype`` (default: expected's)."""
    tol = TOLERANCES[dtype or expected.dtype]
    magnitude = expected.detach().abs().max().item() if expected.numel() else 0.0
    return {"atol": tol["atol"] * magnitude, "rtol": tol["rtol"]}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Elementwise ``|actual - expected| <= atol * max|expected| + rtol * |expected|``, at ``dtype``'s tolerance."""
    expected = expected.detach().cpu()
    tol = tolerance(expected, dtype)
    torch.testing.assert_close(actual.detach().cpu().double(), expected.double(), **tol)


def cpu_compile_env(env: dict[str, str], *flags: str) -> dict[str, str]:
    """``env`` with ``XLA_FLAGS`` set to the suite's compile flags (see CPU_COMPILE_FLAGS) and ``flags``."""
    return {**env, "XLA_FLAGS": " ".join(flag for flag in (CPU_COMPILE_FLAGS, *flags) if flag)}


def pytest_sessionstart(session) -> None:
    # The XLA device before anything else: a backward on CPU tensors run before it exists leaves torch_xla's
    # autograd engine unable to run backwards on XLA tensors later in the process (docs/ops.md, Autograd).
    import torch_xla

    torch_xla.device()


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    """With ``MAPS_LOG=<directory>``: after each test, this process's memory-map count and torch_xla's cached graphs,
    one line per test in ``<directory>/maps_<pid>.log`` (how the figures in README, "Test suite", were taken)."""
    directory = os.environ.get("MAPS_LOG")
    if not directory or not os.path.exists("/proc/self/maps"):
        return
    import torch_xla

    with open("/proc/self/maps") as maps:
        count = sum(1 for _ in maps)
    graphs = torch_xla._XLAC._xla_get_num_cached_compilation_graph()
    with open(os.path.join(directory, f"maps_{os.getpid()}.log"), "a") as log:
        log.write(f"{count} {graphs} {nodeid}\n")


@pytest.fixture(autouse=True, scope="module")
def _release_jax_executables():
    """After each test file, JAX's compiled executables (the kernels a file runs through JAX itself, in interpret
    mode) are dropped, and their code maps with them (see XLA_COMPILATION_CACHE_SIZE above)."""
    yield
    import jax

    jax.clear_caches()


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
