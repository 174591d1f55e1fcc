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

import dataclasses
import math
import re
from pathlib import Path

import pytest

from torch_xla_lora.bench import tpu_compile, tpu_grid
from torch_xla_lora.kernels import block_sizes, fused_base

SAMPLE = tpu_grid.sample()
# Real expert-layer shapes (``bench tpu_compile --moe`` compiles all 32): both grouped-matmul paths (megablox gmm
# for [E, out, in] weights, XLA:TPU's ragged_dot for GPT-OSS's [E, in, out]), both chips, both row counts.
MOE_SAMPLE = [
    tpu_grid.moe_config("v5e", "qwen3-30b-a3b", 1024, "lora"),
    tpu_grid.moe_config("v6e", "mixtral-8x7b", 8192, "lora"),
    tpu_grid.moe_config("v6e", "gpt-oss-20b", 1024, "lora"),
]
# The pooled kernel (rank-true storage): decode batches of mixed true ranks 8/16/64, bfloat16 and int8 pools,
# both chips, max_rank and max_loras from 16/4 to 128/64 (the largest row table and int8 scale table prefetched).
POOLED_SAMPLE = [
    tpu_grid.pooled_config("v5e", "bfloat16", 16, 16, 64, "llama3-8b", "q_proj"),
    tpu_grid.pooled_config("v6e", "int8", 16, 64, 128, "llama3-8b", "gate_proj"),
    tpu_grid.pooled_config("v6e", "bfloat16", 8, 4, 16, "llama3-8b", "k_proj"),
    tpu_grid.pooled_config("v5e", "int8", 1, 16, 64, "llama3-8b", "down_proj"),
    # int8 on v4 (its SMEM holds the page-scale buffer too) and one adapter at 64 x 128 (a page's scale tile read).
    tpu_grid.pooled_config("v4", "int8", 16, 16, 64, "llama3-8b", "k_proj"),
    tpu_grid.pooled_config("v5p", "int8", 1, 64, 128, "llama3-8b", "gate_proj"),
    # An experts layer's pools read through its (lane, expert) entry tables (``ExpertsWithLoRA._entry_tables``), as
    # the layer calls the op: Qwen3-30B-A3B's gate_up_proj, 2,048 entries, 128 routed rows, bf16 and int8 pools
    # (``bench tpu_compile --pooled-experts`` compiles the same two and prints their bytes).
    *tpu_grid.pooled_experts_configs(),
]  # fmt: skip
# linear_lora_fused as the decoder arrangement calls it: down_proj (SiLU * up, residual) and gate_proj (the norm's
# factors) at prefill and decode, both chips (about 23 s of libtpu compilation); Llama-3-8B's down_proj at T = 1024 on
# v6e, the plan of one [1024, 4096] output tile whose row-chunked kernel fills most of the VMEM budget; an int8
# per-channel base read as int8 on every chip, prefill and decode (about 6 s more); and that base's backward pass for
# dx, the output gradient through the int8 weight read transposed (scales per input channel) at training sizes
# (Llama-3-8B's down_proj at T = 2048 on v6e, Qwen2-0.5B's q_proj on v4: about 9 s more).
LINEAR_FUSED_SAMPLE = [
    tpu_grid.linear_fused_config("v6e", "mlp_down", 2048, 16, "qwen2-0.5b", "down_proj"),
    tpu_grid.linear_fused_config("v6e", "mlp_down", 1024, 8, "llama3-8b", "down_proj"),
    tpu_grid.linear_fused_config("v5e", "mlp_down", 8, 64, "llama3-8b", "down_proj"),
    tpu_grid.linear_fused_config("v5e", "norm", 16, 4, "llama3-8b", "gate_proj"),
    tpu_grid.linear_fused_config("v6e", "norm", 100, 16, "qwen2-0.5b", "gate_proj"),
    tpu_grid.linear_fused_config("v5e", "int8", 256, 8, "qwen2-0.5b", "q_proj"),
    tpu_grid.linear_fused_config("v6e", "int8", 8, 16, "qwen2-0.5b", "down_proj"),
    tpu_grid.linear_fused_config("v4", "int8", 300, 16, "llama3-8b", "down_proj"),
    tpu_grid.linear_fused_config("v5p", "int8", 64, 16, "qwen2-0.5b", "q_proj"),
    tpu_grid.linear_fused_config("v6e", "int8_dx", 2048, 16, "llama3-8b", "down_proj"),
    tpu_grid.linear_fused_config("v4", "int8_dx", 256, 16, "qwen2-0.5b", "q_proj"),
]
# The training variant of the fused base kernel, which also writes s for the backward: Llama-3-8B's q_proj at T = 1024
# on v6e; and as linear_lora_fused_train runs it in training, gate_proj applying the arranged decoder's RMSNorm
# (a training group's member) on v5e, o_proj adding its residual on v6e, down_proj reading SiLU(gate) * up and
# adding the residual on v6e (rank 64) and an int8 gate_proj on v5e.
LINEAR_TRAIN_SAMPLE = [
    tpu_grid.Config("v6e", "linear_train", "keep_s", "bfloat16", 1024, 8, 16, "llama3-8b", "q_proj", 4096, 4096),
    tpu_grid.Config(
        "v5e", "linear_train", "keep_s_norm", "bfloat16", 2048, 8, 64, "llama3-8b", "gate_proj", 4096, 14336
    ),
    tpu_grid.Config(
        "v6e", "linear_train", "keep_s_residual", "bfloat16", 2048, 8, 16, "llama3-8b", "o_proj", 4096, 4096
    ),
    tpu_grid.Config(
        "v5e", "linear_train", "keep_s_int8", "bfloat16", 1024, 8, 16, "llama3-8b", "gate_proj", 4096, 14336
    ),
    tpu_grid.Config(
        "v6e", "linear_train", "keep_s_mlp_down", "bfloat16", 2048, 8, 64, "llama3-8b", "down_proj", 14336, 4096
    ),
]
# The backward's one pass over g (``linear_lora_backward``: dx, ds and dB): Llama-3-8B's gate_proj at T = 2048 on v6e
# (g 14336 wide, dB's [8, 64, 14336] f32 sum resident in VMEM over the grid) and at T = 1024 on v5p, an int8 q_proj
# on v5e, its weight read transposed with its scales per input channel, and k_proj on v4 at T = 300 (three
# 128-token blocks, the last one padded).
LINEAR_BACKWARD_SAMPLE = [
    tpu_grid.Config("v6e", "linear_train", "backward", "bfloat16", 2048, 8, 64, "llama3-8b", "gate_proj", 14336, 4096),
    tpu_grid.Config("v5p", "linear_train", "backward", "bfloat16", 1024, 8, 16, "llama3-8b", "gate_proj", 14336, 4096),
    tpu_grid.Config("v5e", "linear_train", "backward_int8", "bfloat16", 1024, 8, 16, "llama3-8b", "q_proj", 4096, 4096),
    tpu_grid.Config("v4", "linear_train", "backward", "bfloat16", 300, 4, 16, "llama3-8b", "k_proj", 1024, 4096),
]
# The training kernels at the TPU training model's shape (T = 8192, 8 slots of rank 64: ``bench tpu_compile
# --linear-train`` compiles all twenty) with their scoped VMEM limit set to the plan's own estimate: v6e's down_proj
# forward (113.6 MiB, the plan nearest the 120 MiB limit) and gate_proj's backward (106.8 MiB, about 20 s).
TRAINING_AT_ESTIMATE_SAMPLE = [
    dataclasses.replace(config, variant=config.variant + "_at_estimate")
    for config in tpu_grid.linear_train_configs(("v6e",))
    if (config.layer, config.variant) in {("down_proj", "keep_s_mlp_down"), ("gate_proj", "backward")}
]
# The weight-gradient kernel's dA at the TPU training model's shape (T = 8192, 8 slots): Llama-3-8B's down_proj
# (P = 64, Q = 14,336) and the q/k/v group's ds side by side (P = 3 x 64, Q = 4,096) on v6e, where each takes its
# whole width as one Q tile, and down_proj on v4 (10 MiB), in narrower tiles.
WEIGHT_GRAD_TRAINING_SAMPLE = [
    tpu_grid.Config("v6e", "weight_grad", "lora_a", "bfloat16", 8192, 8, 64, "llama3-8b", "down_proj", 14336, 4096),
    tpu_grid.Config("v6e", "weight_grad", "lora_a", "bfloat16", 8192, 8, 192, "llama3-8b", "qkv_proj", 4096, 6144),
    tpu_grid.Config("v4", "weight_grad", "lora_a", "bfloat16", 8192, 8, 64, "llama3-8b", "down_proj", 14336, 4096),
]
# The fused kernel over an expert layer's lane-padded slots at gpt-oss-20b's widths (2880 -> 2880, not multiples
# of 128; 2880 -> 5760 in 1,920-wide output tiles); ``bench tpu_compile --kernels fused`` compiles both projections
# on both chips (tpu_grid.expert_lora_grid).
EXPERT_LORA_SAMPLE = [
    tpu_grid.expert_lora_config("v6e", "experts_down"),
    tpu_grid.expert_lora_config("v5e", "experts_up"),
]
# The token embedding's B read from its pool (``pooled_expand``): a decode and a prefill, each beside what the embedding
# ran before, and an int8 prefill (``bench tpu_compile --pooled-expand`` compiles the same five and prints them).
EMBEDDING_SAMPLE = tpu_grid.pooled_expand_configs()
# The laned kernel of the op's plan with its scoped VMEM limit set to the plan's own estimate (``fused.vmem_bytes``),
# at wide inputs where Mosaic keeps more than the pipelined blocks and scratch: an f32 Gemma-7B down_proj on v6e (64
# slots of rank 64; its plan was refused by libtpu at the generation's limit, 66.5 MiB for 64, before the estimate
# counted the body's values), Llama-3-70B's down_proj, Qwen2-7B's at rank 128, and Llama-3-8B's gate_proj on v4.
FUSED_AT_ESTIMATE_SAMPLE = [
    tpu_grid.Config("v6e", "fused", "at_estimate", "float32", 2048, 64, 64, "gemma-7b", "down_proj", 24576, 3072),
    tpu_grid.Config("v6e", "fused", "at_estimate", "bfloat16", 2048, 16, 64, "llama3-70b", "down_proj", 28672, 8192),
    tpu_grid.Config("v5e", "fused", "at_estimate", "bfloat16", 512, 16, 128, "qwen2-7b", "down_proj", 18944, 3584),
    tpu_grid.Config("v4", "fused", "at_estimate", "bfloat16", 2048, 16, 16, "llama3-8b", "gate_proj", 4096, 14336),
]
SETUP = Path(__file__).resolve().parent.parent / "setup.py"


@pytest.fixture(scope="module")
def compiled() -> tpu_compile.Run:
    """One worker run over the whole sample and the expert layers."""
    configs = SAMPLE + MOE_SAMPLE + POOLED_SAMPLE + LINEAR_FUSED_SAMPLE + LINEAR_TRAIN_SAMPLE + EXPERT_LORA_SAMPLE
    configs += EMBEDDING_SAMPLE + LINEAR_BACKWARD_SAMPLE + FUSED_AT_ESTIMATE_SAMPLE + TRAINING_AT_ESTIMATE_SAMPLE
    configs += WEIGHT_GRAD_TRAINING_SAMPLE
    run = tpu_compile.run(configs, timeout=3000)
    assert run.libtpu is not None, "libtpu is not installed: pip install -e '.[test]' installs the pinned release"
    expected = len(configs)
    assert len(run.results) == expected, f"the worker stopped early:\n{run.stderr[-4000:]}"
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


@pytest.mark.parametrize("config", FUSED_AT_ESTIMATE_SAMPLE, ids=lambda c: c.name)
def test_fused_kernel_compiles_within_its_own_vmem_estimate(config, compiled):
    """The planner keeps the laned kernel within the generation's limit by its estimate alone, so the estimate must
    cover what Mosaic allocates: compiled with the limit set to it, the plan compiles (each of these was refused
    with the estimate that left out the body's values)."""
    (result,) = [r for r in compiled.results if r["name"] == config.name]
    assert result["ok"], result.get("error")
    assert result["vmem_limit"] < block_sizes.vmem_limit(config.chip)  # the limit the compile got: the estimate


@pytest.mark.parametrize("config", TRAINING_AT_ESTIMATE_SAMPLE, ids=lambda c: c.name)
def test_training_kernel_compiles_within_its_own_vmem_estimate(config, compiled):
    """The one-pass kernel's planner (``fused_base.plan``) likewise trusts ``fused_base.vmem_bytes``: the training
    step's two largest plans compile with the limit set to it."""
    (result,) = [r for r in compiled.results if r["name"] == config.name]
    assert result["ok"], result.get("error")
    assert result["vmem_estimate"] <= result["vmem_limit"] < fused_base.vmem_limit(config.chip)


def test_slot_kernels_results_are_returned_without_a_select_after_them(compiled):
    """``bgmv_shrink``, ``bgmv_expand`` and ``bgmv_shrink_expand``'s separate kernels select each token's own slot
    inside, giving 0 or the base row exactly to tokens without an adapter, so the ops return their output as it is:
    libtpu's program runs nothing on a kernel's result but the next kernel, or ``bgmv_expand_slice``'s pad-and-add
    into the wider base (``hlo_traffic.after_kernels``). With a select after them (the ops before 2026-12) every one
    of these ran a select fusion over the result and the base; at T = 8192 into a 14336-wide base that pass was 705
    of the op's 1190 MB of HBM traffic on v6e."""
    results = [
        r for r in compiled.results if r["config"]["kernel"] in ("shrink", "expand") or r.get("path") == "shrink+expand"
    ]
    assert {r["config"]["kernel"] for r in results} == {"shrink", "expand", "fused"}
    for result in results:
        assert result["ok"], result.get("error")
        expected = {"slice": ["add", "pad"]}.get(result["config"]["variant"], [])
        expected = ["custom-call"] if result.get("path") == "shrink+expand" else expected
        assert result["after_kernels"] == expected, result["name"]


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
    results = [r for r in results if r["config"]["variant"] != "g_pass"]
    for result in results:
        estimate, cost = result["estimate"], result["cost"]
        assert estimate["flops"] <= cost["flops"] <= estimate["flops"] * 1.25, result["name"]
        assert cost["bytes accessed"] >= estimate["bytes accessed"], result["name"]


@pytest.mark.parametrize("config", WEIGHT_GRAD_TRAINING_SAMPLE, ids=lambda c: c.name)
def test_weight_grad_kernel_takes_the_widest_q_tile_its_vmem_limit_holds(config, compiled):
    """The training step's dA kernels compile in the Q tiles ``weight_grad.width_tile`` plans in the chip's
    scoped VMEM limit: the whole width on v6e (one walk of the visits, where 2,048-wide tiles walked them seven
    and two times), narrower on v4; the plan's estimate within the limit."""
    result = next(r for r in compiled.results if r["name"] == config.name)
    assert result["ok"], result.get("error")
    tile, limit = result["block"]["width"], result["vmem_limit"]
    assert result["vmem_estimate"] <= limit
    if config.chip == "v6e":
        assert tile == config.in_features
    else:
        assert tile < config.in_features and config.in_features % tile == 0


def test_fused_backward_g_pass_cost_is_the_kernel_s_estimate(compiled):
    """The fused backward's pass over g (ds and dB together): where every slot's dB tile fits VMEM (the
    kernel's path) libtpu counts at least its ``pl.CostEstimate``'s flops and at most a quarter more (the
    visits' sort, padding, the ds partial sums added up), and at least its bytes; where it does not fit
    (large L * R on v4's 10 MiB), the op's separate kernels compile instead."""
    results = [r for r in compiled.results if r["config"]["variant"] == "g_pass"]
    assert results and all(r["ok"] for r in results)
    fused = [r for r in results if r["path"] == "g_pass"]
    assert fused
    for result in fused:
        estimate, cost = result["estimate"], result["cost"]
        assert estimate["flops"] <= cost["flops"] <= estimate["flops"] * 1.25, result["name"]
        assert cost["bytes accessed"] >= estimate["bytes accessed"], result["name"]
        assert result["vmem_estimate"] <= result["vmem_limit"]


@pytest.mark.parametrize("config", POOLED_SAMPLE, ids=lambda c: c.name)
def test_pooled_kernel_compiles_reading_the_true_ranks(config, compiled):
    """The pooled kernel compiles for the chip, and the ``pl.CostEstimate`` it declares counts, besides the
    activations and the tables it prefetches (page starts, ranks, an int8 pool's scale arrays), exactly the
    true-rank bytes of the batch's distinct adapters (ranks 8/16/64 fill whole pages; int8: one byte an
    element), whatever max_rank and max_loras: libtpu's ``cost_analysis()`` of the op counts the kernel by it
    (flops within 1%, the rest the op's grouping) and bytes at least it."""
    (result,) = [r for r in compiled.results if r["name"] == config.name]
    assert result["ok"], result.get("error")
    assert result["path"] == "pooled"
    ranks = tpu_grid.pooled_ranks(min(config.tokens, config.slots), config.rank)
    element = 1 if config.variant == "int8" else 2
    true_rank_bytes = sum(ranks) * (config.in_features + config.out_features) * element
    estimate, cost = result["estimate"], result["cost"]
    assert estimate["bytes accessed"] - result["activation_bytes"] - result["table_bytes"] == true_rank_bytes
    assert estimate["flops"] <= cost["flops"] <= estimate["flops"] * 1.01, result["name"]
    assert cost["bytes accessed"] >= estimate["bytes accessed"], result["name"]


def test_expert_pools_are_read_stacked_in_place(compiled):
    """The experts' ``[E, P + 2, width]`` pools are read by the pooled kernel as they lie, bf16 and int8 alike (the
    int8 pools flattened would be a multiple of 32 rows, tiled 32 deep on a v6e, where an 8-row page DMA does not
    compile), through the entries' page table and an int8 pool's kept page scales as the layer passes them
    (``ExpertsWithLoRA._entry_tables``, ``lora_page_scale``): libtpu's count of the whole op stays within 1.3 times
    the kernel's estimate (31.8 MB against 28.0 MB bf16, 19.4 MB against 15.6 MB int8 when this was written; with
    the page table derived from the row table in the graph and, int8, the page scales from ``a_scale * b_scale``
    over all 128 x 4,104 rows each call, 44.2 and 55.4 MB), where a copy of the two pools (3.8 GB bf16, 1.9 GB int8,
    read and written) would add over two hundred times the estimate."""
    results = [r for r in compiled.results if r["config"]["kernel"] == "pooled_experts"]
    assert [r["config"]["variant"] for r in results] == ["bfloat16", "int8"]
    for result in results:
        assert result["ok"], result.get("error")
        assert result["path"] == "pooled"
        itemsize = 1 if result["config"]["variant"] == "int8" else 2
        pools = 128 * (tpu_grid.POOLED_POOL_ROWS + 8) * (2048 + 1536) * itemsize  # both pools' bytes
        assert 2 * pools > 200 * result["estimate"]["bytes accessed"], result["name"]
        assert result["cost"]["bytes accessed"] <= 1.3 * result["estimate"]["bytes accessed"], result["name"]


def test_embedding_pooled_expand_compiles_and_reads_fewer_bytes_than_gathering(compiled):
    """The embedding's pooled expand compiles for the chips on both paths (decode: XLA ops over the packed rows;
    prefill, float and int8 pools: the pooled kernel's expand, its pages through the table), and libtpu's
    ``cost_analysis()`` counts each at under a third of the bytes of what the embedding ran before on the same
    batch (every lane's B gathered into slots, then the slot expand kernel): decode 30.9 MB against 146.6 MB,
    prefill 14.9 MB against 157.3 MB (``python -m torch_xla_lora.bench tpu_compile --pooled-expand``). The
    kernel's declared flops are libtpu's to 1% (the rest of the call is XLA's selects and the table's few ops)."""
    results = {r["name"]: r for r in compiled.results}
    decode, decode_gathered, prefill, prefill_gathered, int8_prefill = (
        results[config.name] for config in EMBEDDING_SAMPLE
    )
    for result in (decode, decode_gathered, prefill, prefill_gathered, int8_prefill):
        assert result["ok"], result.get("error")
    assert decode["path"] == "packed rows (XLA ops)"
    assert prefill["path"] == int8_prefill["path"] == "pooled expand kernel"
    assert 3 * decode["cost"]["bytes accessed"] < decode_gathered["cost"]["bytes accessed"]
    assert 3 * prefill["cost"]["bytes accessed"] < prefill_gathered["cost"]["bytes accessed"]
    for result in (prefill, int8_prefill):
        estimate, cost = result["estimate"], result["cost"]
        assert estimate["flops"] <= cost["flops"] <= 1.01 * estimate["flops"], result["name"]
        assert cost["bytes accessed"] >= estimate["bytes accessed"], result["name"]
        assert result["vmem_estimate"] <= result["vmem_limit"], result["name"]


@pytest.mark.parametrize("config", LINEAR_FUSED_SAMPLE, ids=lambda c: c.name)
def test_linear_fused_compiles_and_is_counted_by_its_estimate(config, compiled):
    """The fused base kernel with x's producer and the residual taken in compiles for the chip within its VMEM
    estimate, and libtpu counts it by the ``pl.CostEstimate`` it declares (flops within 0.1%, bytes at least)."""
    (result,) = [r for r in compiled.results if r["name"] == config.name]
    assert result["ok"], result.get("error")
    assert result["vmem_estimate"] <= result["vmem_limit"]
    estimate, cost = result["estimate"], result["cost"]
    assert estimate["flops"] <= cost["flops"] <= estimate["flops"] * 1.001, result["name"]
    assert cost["bytes accessed"] >= estimate["bytes accessed"], result["name"]


@pytest.mark.parametrize("config", LINEAR_TRAIN_SAMPLE, ids=lambda c: c.name)
def test_linear_train_compiles_writing_s_and_is_counted_by_its_estimate(config, compiled):
    """The training kernel (``keep_s``) compiles for the chip within its VMEM estimate, returns the output and
    s ([T, N] and [T, R] in bf16: libtpu's output bytes), and, reading SiLU(gate) * up or applying a norm, x as it
    made it ([T, K]), and libtpu counts it by its declared cost (flops within 0.1%, bytes at least, the s and x
    writes included)."""
    (result,) = [r for r in compiled.results if r["name"] == config.name]
    assert result["ok"], result.get("error")
    assert result["vmem_estimate"] <= result["vmem_limit"]
    (tokens, out_dim), (_, rank), *kept = result["outputs"]
    assert (out_dim, rank) == (config.out_features, config.rank)
    takes_in = config.variant in ("keep_s_mlp_down", "keep_s_norm")
    assert kept == ([[tokens, config.in_features]] if takes_in else [])
    assert result["memory"]["output"] >= 2 * tokens * (out_dim + rank + sum(width for _, width in kept))
    estimate, cost = result["estimate"], result["cost"]
    assert estimate["flops"] <= cost["flops"] <= estimate["flops"] * 1.001, result["name"]
    assert cost["bytes accessed"] >= estimate["bytes accessed"], result["name"]


@pytest.mark.parametrize("config", LINEAR_BACKWARD_SAMPLE, ids=lambda c: c.name)
def test_linear_backward_pass_compiles_taking_db_and_is_counted_by_its_estimate(config, compiled):
    """The backward's one pass over g (``linear_lora_backward`` on TPU) compiles for the chip within its VMEM
    estimate (dB's f32 [L, R, K] sum resident), returns dx [T, N'], ds [T, R] and dB [L, R, K] (libtpu's output
    bytes hold all three, dB in f32), and libtpu counts it by its declared cost (flops within 0.1%: the base's dx,
    the LoRA's and dB's products; bytes at least)."""
    (result,) = [r for r in compiled.results if r["name"] == config.name]
    assert result["ok"], result.get("error")
    assert result["vmem_estimate"] <= result["vmem_limit"]
    (tokens, out_dim), (_, rank), d_b = result["outputs"]
    assert (out_dim, rank) == (config.out_features, config.rank)
    assert d_b == [config.slots, config.rank, config.in_features]
    assert result["memory"]["output"] >= 2 * tokens * (out_dim + rank) + 4 * math.prod(d_b)
    estimate, cost = result["estimate"], result["cost"]
    assert estimate["flops"] <= cost["flops"] <= estimate["flops"] * 1.001, result["name"]
    assert cost["bytes accessed"] >= estimate["bytes accessed"], result["name"]


def test_pooled_one_pass_kernel_compiles_reading_int8_pages_under_an_int8_base():
    """The pooled one-pass kernel (``linear_lora_pooled`` on TPU) compiles for a v6e with int8 pools under an int8
    base (Llama-3-8B q_proj at decode; ``bench tpu_compile --pooled-linear`` compiles bfloat16 and int8 pools on
    v5e and v6e), within its VMEM estimate, and its declared estimate counts the base traffic, the tables and
    exactly the batch's true-rank adapter bytes at one byte an element (ranks 8, 16, 64 at max_rank 64, 16
    lanes); libtpu counts the op by it (flops within 1%, bytes at least)."""
    (result,) = tpu_compile.compile_pooled_linear([tpu_compile.PooledLinearCase("v6e", "int8", int8_base=True)])
    assert result["ok"], result.get("error")
    assert result["vmem_estimate"] <= result["vmem_limit"]
    assert result["adapter_bytes"] == (8 + 16 + 64) * (4096 + 4096)
    estimate, cost = result["estimate"], result["cost"]
    tables = 4 * 16 * (8 + 1) + 4 * 3 * 1024  # the page table; the scale array (3 tiles, fewer than the 11 pages)
    assert estimate["bytes accessed"] - result["base_bytes"] - tables == result["adapter_bytes"]
    assert estimate["flops"] <= cost["flops"] <= estimate["flops"] * 1.01
    assert cost["bytes accessed"] >= estimate["bytes accessed"]


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


@pytest.mark.parametrize("config", EXPERT_LORA_SAMPLE, ids=lambda c: c.name)
def test_fused_kernel_compiles_on_lane_padded_expert_slots(config, compiled):
    """Widths that are not multiples of 128 (gpt-oss-20b's 2880): the fused kernel DMAs the slots' padded rows
    (2944 columns) and uses the first 2880 in VMEM; Mosaic compiles it within the plan's VMEM estimate."""
    (result,) = [r for r in compiled.results if r["name"] == config.name]
    assert config.in_features % 128 and result["path"] == "fused", result
    assert result["ok"], result.get("error")
    assert result["vmem_estimate"] <= block_sizes.vmem_limit(config.chip)


# -- mixture-of-experts expert layers (bench.moe_layer) --------------------------------------------------


@pytest.mark.parametrize("config", MOE_SAMPLE, ids=lambda c: c.name)
def test_moe_layer_compiles_with_temporaries_of_rows_x_width(config, compiled):
    """A whole expert layer with every row's expert LoRA compiles for the chip, and libtpu's peak HBM temporaries
    stay within two copies of the layer's row activations (rows x (hidden + 2I + I)) at these shapes (the whole
    grid's most is 2.27, gpt-oss at 8,192 rows, where XLA's memory-space assignment keeps more of the layer in HBM
    at the peak: ``bench tpu_compile --moe``): temporaries of rows x width, never rows x weight. Gathering one
    projection's expert weight per routed row (transformers' batched_mm) would hold
    rows x 2I x hidden, over 100x more at every one of these shapes."""
    (result,) = [r for r in compiled.results if r["name"] == config.name]
    assert result["ok"], result.get("error")
    shape = tpu_grid.MOE_MODELS[config.model]
    rows = config.tokens * shape.top_k
    activations = rows * (shape.hidden + 3 * shape.intermediate) * 2
    assert result["routed_rows"] == rows
    assert result["memory"]["temp"] <= 2 * activations, result["memory"]
    assert 100 * result["memory"]["temp"] < tpu_compile.moe_gather_bytes(result)
    # The two grouped matmuls' own flops at least (libtpu counts the kernels by their declared estimates).
    assert result["cost"]["flops"] >= 2 * rows * 3 * shape.hidden * shape.intermediate


def _expert_layer_reference(model, hidden, top_k_index, top_k_weights, weights, lora):
    """Float64 numpy, token by token and expert by expert, as transformers' experts loop and PEFT's LoRA define it."""
    import numpy as np

    from torch_xla_lora.bench import moe_layer

    shape = tpu_grid.MOE_MODELS[model]
    f64 = [np.asarray(w, np.float64) for w in weights]
    a_up, b_up, a_down, b_down, slots = [np.asarray(t, np.float64) for t in lora]
    experts = f64[0].shape[0]
    out = np.zeros(hidden.shape, np.float64)
    for t, x in enumerate(np.asarray(hidden, np.float64)):
        for e, w in zip(top_k_index[t], np.asarray(top_k_weights, np.float64)[t], strict=True):
            up = x @ f64[0][e] if shape.transposed else f64[0][e] @ x
            if shape.bias:
                up = up + f64[2][e]
            row = int(slots[t]) * experts + int(e)
            if slots[t] >= 0:
                up = up + b_up[row].T @ (a_up[row] @ x)
            if shape.gate == "gpt_oss":
                gate, linear = np.minimum(up[::2], moe_layer.GPT_OSS_LIMIT), np.clip(up[1::2], -7.0, 7.0)
                h = (linear + 1) * gate / (1 + np.exp(-gate * moe_layer.GPT_OSS_ALPHA))
            else:
                gate, linear = np.split(up, 2)
                h = gate / (1 + np.exp(-gate)) * linear
            down = h @ f64[1][e] if shape.transposed else f64[1][e] @ h
            if shape.bias:
                down = down + f64[3][e]
            if slots[t] >= 0:
                down = down + b_down[row].T @ (a_down[row] @ h)
            out[t] += w * down
    return out


@pytest.mark.parametrize("model", ["mixtral-8x7b", "gpt-oss-20b"])
def test_moe_layer_function_is_the_expert_layer(model):
    """The function compiled above computes the expert layer: run on the CPU (the same Pallas kernels in
    interpret mode) at a small size of the model's layout, a mixed batch (tokens without adapter, tokens of
    several slots, an expert no token picks) equals the float64 per-token loop."""
    import jax
    import numpy as np

    from torch_xla_lora.bench import moe_layer

    shape = tpu_grid.MOE_MODELS[model]
    tokens, hidden, width, experts, top_k, slots, rank = 24, 128, 128, 4, 2, 3, 8
    rng = np.random.default_rng(0)
    up, down = ((experts, hidden, 2 * width), (experts, width, hidden))
    if not shape.transposed:  # nn.Linear's [E, out, in]
        up, down = (experts, 2 * width, hidden), (experts, hidden, width)
    weight_shapes = [up, down] + ([(experts, 2 * width), (experts, hidden)] if shape.bias else [])
    entries = slots * experts
    lora_shapes = [(entries, rank, hidden), (entries, rank, 2 * width), (entries, rank, width), (entries, rank, hidden)]
    weights = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in weight_shapes]
    lora = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in lora_shapes]
    token_slots = np.array([-1, 0, 2, 1] * (tokens // 4), np.int32)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    top_k_index = np.stack([rng.permutation(experts - 1)[:top_k] for _ in range(tokens)]).astype(np.int32)
    top_k_weights = rng.random((tokens, top_k)).astype(np.float32)

    fn = jax.jit(moe_layer.layer_fn(model, "cpu", True))
    out = np.asarray(fn(x, top_k_index, top_k_weights, tuple(weights), (*lora, token_slots)))
    expected = _expert_layer_reference(model, x, top_k_index, top_k_weights, weights, (*lora, token_slots))
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_pool_row_dmas_mosaic_compiles():
    """Why the pooled kernel's pages are 8 aligned rows and why int8 pools avoid 32-row multiples, checked with
    libtpu's compiler (``python -m torch_xla_lora.bench.page_dma``, its own process): a DMA of 1, 2 or 4 rows of a
    [P, D] pool is refused on v5e and v6e in every dtype, and so are 8 rows at an offset not known to be a
    multiple of 8; 8 rows at such an offset compile, except from a v6e int8 pool of a multiple of 32 rows
    (``pool.kernel_pool_rows``), and they compile from stacked int8 pools [8, 24, D] (an experts layer's, 192 rows
    flattened: a multiple of 32) read in place by the kernels' own page DMA. A pool stored [P / g, g, D] with g the
    rows one 32-bit word packs (1 f32, 2 bf16, 4 int8) DMAs any number of groups at any offset; one bf16 row a
    group is refused."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "torch_xla_lora.bench.page_dma", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2 * (7 + 8 + 9), proc.stderr[-4000:]  # per chip: float32, bfloat16, int8 cases
    for r in results:
        packed = {"float32": 1, "bfloat16": 2, "int8": 4}[r["dtype"]]
        if r["layout"] in ("3d", "stacked"):
            assert r["ok"], r
        elif r["layout"] == "3d-g1":
            assert r["error"] == f"Slice shape along dimension 1 must be aligned to tiling ({packed}), but is 1.", r
        elif r["rows"] < 8:
            assert r["error"] == f"Slice shape along dimension 0 must be aligned to tiling (8), but is {r['rows']}.", r
        elif not r["aligned"]:
            assert not r["ok"] and "Failed to prove that a tile index in dimension 0 is divisible" in r["error"], r
        elif r["chip"] == "v6e" and r["dtype"] == "int8" and r["pool_rows"] % 32 == 0:
            assert r["error"] == "Failed to prove that a tile index in dimension 0 is divisible by the tiling (32).", r
        else:
            assert r["ok"], r


def test_decoder_layer_compiles_with_the_kernels_among_xla_ops():
    """The fused base kernel's declared scoped VMEM limit (``tuning.BASE_VMEM_LIMIT_BYTES``) leaves XLA what it
    needs around the kernel: a whole Llama-3-8B decoder layer at a 1024-token prefill on v6e with 16 slots (a full
    MXU pass of lanes at rank 16: the fullest plans, down_proj's estimated at 109.5 of the 120 MiB), its seven
    planned kernels between XLA's RMSNorms, attention and a following dot, compiles in one program at that limit
    (``python -m torch_xla_lora.bench.fused_base_vmem --layer``, its own process). Fails if the limit or a plan
    outgrows what libtpu lets the program hold."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "torch_xla_lora.bench.fused_base_vmem", "--layer", "--chips", "v6e"]
        + ["--tokens", "1024", "--slots", "16"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| v6e")]
    assert proc.returncode == 0 and len(rows) == 1, proc.stdout + proc.stderr[-4000:]
    assert "| yes |" in rows[0], rows


def test_linear_train_configs_are_the_training_model_s_kernels():
    """``bench tpu_compile --linear-train`` compiles what ``bench train --model`` prices: Llama-3-8B's widths, each
    projection's forward kernel with what the arranged decoder takes in during training, its backward's swapped
    pass, at the model's T, slots and rank."""
    from torch_xla_lora.bench import tpu_model, tpu_train_model

    layer = tpu_model.LLAMA3_8B_LAYER
    assert {name: (d_in, d_out) for name, (d_in, d_out, _) in layer.items()} == tpu_grid.LLAMA3_8B_PROJECTIONS
    configs = tpu_grid.linear_train_configs(("v6e",))
    assert {c.tokens for c in configs} == {tpu_train_model.MODEL_ROWS * tpu_train_model.MODEL_SEQ}
    assert {(c.slots, c.rank) for c in configs} == {(8, 64)}
    # every distinct projection shape, forward and backward
    assert {(c.in_features, c.out_features) for c in configs if c.variant != "backward"} == set(
        tpu_grid.LLAMA3_8B_PROJECTIONS.values()
    )
    for config in configs:
        d_in, d_out, _ = layer[config.layer]
        prologue, residual = tpu_train_model.TRAINING_KERNEL_FUSION[config.layer]
        forward = {"silu_mul": "keep_s_mlp_down", "norm": "keep_s_norm"}.get(prologue)
        forward = forward or ("keep_s_residual" if residual else "keep_s")
        if config.variant == "backward":
            assert (config.in_features, config.out_features) == (d_out, d_in)
        else:
            assert (config.variant, config.in_features, config.out_features) == (forward, d_in, d_out)
