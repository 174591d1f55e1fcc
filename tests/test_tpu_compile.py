"""Every Pallas kernel compiled by libtpu's real TPU compiler (v4, v5e, v5p, v6e), no TPU needed.

The compilation runs in a worker process with JAX on the CPU
(``python -m torch_xla_lora.bench tpu_compile``'s worker), so torch_xla here
is never disturbed. The configurations are the op wrappers' own JAX functions
(``ops/_jax.py``, ``ops/_linear.py``, backend "pallas", generation = chip): padding, plans, block
sizes and host metadata exactly as the ops make them.

Sampling (``tpu_grid.sample``): 6 configurations per (chip, kernel) cell, 120 in
all, a few minutes on 2 cores. Each cell covers every token count (decode and
prefill), rank, slot count, dtype and kernel variant; each kernel meets every
layer shape of the real models listed in ``tpu_grid.LAYERS``. Wider grids:
``python -m torch_xla_lora.bench tpu_compile --per-cell N`` or ``--grid full``.
"""

import re
from pathlib import Path

import pytest

from torch_xla_lora.bench import tpu_compile, tpu_grid

SAMPLE = tpu_grid.sample()
SETUP = Path(__file__).resolve().parent.parent / "setup.py"


@pytest.fixture(scope="module")
def compiled() -> tpu_compile.Run:
    """One worker run over the whole sample."""
    run = tpu_compile.run(SAMPLE, timeout=3000)
    assert run.libtpu is not None, "libtpu is not installed: pip install -e '.[test]' installs the pinned release"
    assert len(run.results) == len(SAMPLE), f"the worker stopped early:\n{run.stderr[-4000:]}"
    return run


def _pinned_libtpu() -> str:
    (version,) = set(re.findall(r'"libtpu==([0-9.]+)"', SETUP.read_text()))
    return version


@pytest.mark.parametrize("config", SAMPLE, ids=lambda c: c.name)
def test_kernel_compiles_for_tpu(config, compiled):
    (result,) = [r for r in compiled.results if r["name"] == config.name]
    # libtpu refuses a kernel beyond its declared scoped VMEM limit (`python -m torch_xla_lora.bench vmem`).
    assert result["ok"], result.get("error")
    # The laned kernels' plans (fused.plan, fused_base.plan) shrink until their estimate fits the limit, so there
    # the estimate fits by construction; the separate shrink and expand kernels take the tuning table's tiles with
    # no VMEM check, and their estimate fails here if a table entry outgrows the generation's limit.
    if result.get("path", "").split(" + ")[-1] not in ("fused", "fused_base"):
        assert result["vmem_estimate"] <= result["vmem_limit"]


def test_linear_compiles_with_the_metadata_set_batch_gives_it(compiled):
    """Where the fused base kernel's plan differs from the shrink-expand op's (tall prefill token
    blocks), set_batch builds it its own host metadata; the sample compiles that path too."""
    linear = [r for r in compiled.results if r["config"]["kernel"] == "linear" and "host" in r["config"]["variant"]]
    assert {r["own_metadata"] for r in linear} == {True, False}
    assert all(r["ok"] for r in linear)


def test_compiled_cost_is_the_kernel_s_estimate(compiled):
    """libtpu's ``cost_analysis()`` of the compiled op counts the fused base kernel by the
    ``pl.CostEstimate`` it declares (the estimate is checked against the TPU cost model's walk of the
    kernel's grid in tests/test_tpu_model.py): flops within 0.1% (the rest is the on-device
    grouping), bytes at least the estimate's. An estimate XLA ignored, or one that drifted from the
    kernel's grid, breaks the chain from the model to the compiler."""
    fused = [r for r in compiled.results if r.get("path") == "fused_base"]
    assert fused
    for result in fused:
        estimate, cost = result["estimate"], result["cost"]
        assert estimate["flops"] <= cost["flops"] <= estimate["flops"] * 1.001, result["name"]
        assert cost["bytes accessed"] >= estimate["bytes accessed"], result["name"]


def test_weight_grad_cost_is_the_kernel_s_estimate(compiled):
    """The backward's weight-gradient kernel: libtpu counts at least the flops its ``pl.CostEstimate``
    declares, and at most a quarter more: the rest is the op's own XLA work around the kernel (the sort
    building the slot-major visits, padding, the [L, P, Q] result), which weighs most beside a one-token
    batch (12% at most in the CI sample, a 1-token float32 case); and at least its bytes."""
    results = [r for r in compiled.results if r["config"]["kernel"] == "weight_grad"]
    assert results and all(r["ok"] for r in results)
    for result in results:
        estimate, cost = result["estimate"], result["cost"]
        assert estimate["flops"] <= cost["flops"] <= estimate["flops"] * 1.25, result["name"]
        assert cost["bytes accessed"] >= estimate["bytes accessed"], result["name"]


def test_worker_compiles_with_the_pinned_libtpu(compiled):
    assert compiled.libtpu == _pinned_libtpu()


def test_jax_default_ir_version_needs_the_pin():
    """Without the pin jax 0.7.1 writes Mosaic IR 8: libtpu < 0.0.23 refuses it, so the ops pin 7.

    The same configuration compiled with the pin is part of the sample above.
    """
    (config,) = [c for c in SAMPLE if c.chip == "v6e" and c.kernel == "fused" and c.variant == "host_metadata"][:1]
    unpinned = tpu_compile.run([config], pin_ir_version=False)
    (result,) = unpinned.results
    if tuple(int(part) for part in unpinned.libtpu.split(".")) < (0, 0, 23):
        assert not result["ok"]
        assert "expected <= 7 but got 8" in result["error"]
    else:
        assert result["ok"], result.get("error")


@pytest.mark.parametrize("kernel", [entry.name for entry in tpu_grid.KERNELS])
@pytest.mark.parametrize("chip", list(tpu_grid.CHIPS))
def test_sample_cell_covers_every_axis_value(chip, kernel):
    cell = [c for c in SAMPLE if c.chip == chip and c.kernel == kernel]
    (entry,) = [e for e in tpu_grid.KERNELS if e.name == kernel]
    assert {c.tokens for c in cell} == set(tpu_grid.TOKENS)
    assert {c.rank for c in cell} == set(tpu_grid.RANKS)
    assert {c.slots for c in cell} == set(tpu_grid.SLOTS)
    assert {c.dtype for c in cell} == set(tpu_grid.DTYPES)
    assert {c.variant for c in cell} == set(entry.variants)


@pytest.mark.parametrize("kernel", [entry.name for entry in tpu_grid.KERNELS])
def test_sample_meets_every_layer_shape(kernel):
    shapes = {(c.model, c.layer) for c in SAMPLE if c.kernel == kernel}
    assert shapes == {(model, layer) for model, layer, _, _ in tpu_grid.LAYERS}
