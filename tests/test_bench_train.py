"""The training benchmark: every formulation computes the mixed step's gradients, a --quick run end to end,
and the TPU cost model of the training step on hand-computed cases. Never timings."""

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from torch_xla_lora.bench import tpu_model, tpu_train_model, train
from torch_xla_lora.bench.__main__ import main as bench_main
from torch_xla_lora.kernels import fused_base


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(exit code, JSON document, markdown) of one ``bench train --quick`` through the dispatcher."""
    out = tmp_path_factory.mktemp("bench_train")
    code = bench_main(["train", "--quick", "--json", str(out / "train.json"), "--markdown", str(out / "train.md")])
    return code, json.loads((out / "train.json").read_text()), (out / "train.md").read_text()


@pytest.fixture(scope="module")
def bench(xla_device):
    """The quick configuration's model, tenants and batch (the same graphs as the quick run's)."""
    return train.TrainBench(train.TrainConfig.quick(), xla_device)


@pytest.fixture(scope="module")
def steps(bench):
    """One host-copied step of every formulation but the base, each from the same starting weights."""
    return {f: train.host_copy(bench.step(f)) for f in ("lora", "in_turn", "onehot", "peft")}


@pytest.mark.parametrize("formulation", ["lora", "in_turn", "onehot"])
def test_every_formulation_gives_peft_alone_gradients(steps, bench, formulation):
    """Our mixed step, the 8 one-tenant steps in turn and the one-hot formulation each give every tenant the
    gradients PEFT computes training it alone on its rows (float32, eager on CPU tensors), and the same
    gradient of the embedding output."""
    reference, result = steps["peft"], steps[formulation]
    assert set(result.grads) == set(bench.config.tenants)
    for name, expected in reference.grads.items():
        assert set(result.grads[name]) == set(expected), name
        for key, grad in expected.items():
            assert grad.abs().max() > 0, key  # random A and B: no gradient is trivially zero
            assert_close(result.grads[name][key], grad)
    assert_close(result.embeds_grad, reference.embeds_grad)
    assert result.loss == pytest.approx(reference.loss, rel=1e-5)


def test_gradient_comparison_has_teeth(steps):
    """compare_gradients flags a gradient off by 1e-3 of its magnitude, a missing one and a missing key."""
    reference = steps["lora"]
    assert max(train.compare_gradients(reference, steps["onehot"]).values()) <= train.GRADIENT_TOLERANCE
    name, group = next(iter(reference.grads.items()))
    key = next(iter(group))

    def altered(change):
        grads = {n: dict(g) for n, g in reference.grads.items()}
        change(grads[name])
        return train.StepResult(reference.loss, grads, reference.embeds_grad)

    def nudge(g):
        g[key] = g[key] + 1e-3 * g[key].abs().max()

    def drop(g):
        g[key] = None

    assert train.compare_gradients(reference, altered(nudge))["adapters"] > train.GRADIENT_TOLERANCE
    assert train.compare_gradients(reference, altered(drop))["adapters"] == math.inf
    assert train.compare_gradients(reference, altered(lambda g: g.pop(key)))["adapters"] == math.inf


def test_onehot_layers_swap_and_restore(bench):
    layers = dict(bench.lora.layers)
    with pytest.raises(RuntimeError, match="inside"):
        with train.onehot_layers(bench.lora):
            for name in layers:
                assert isinstance(bench.lora.model.get_submodule(name), train.OneHotLoRALinear), name
            raise RuntimeError("inside")
    assert all(bench.lora.model.get_submodule(name) is layer for name, layer in layers.items())


def test_quick_run(quick_run):
    code, result, text = quick_run
    assert code == 0
    assert result["command"].startswith("python -m torch_xla_lora.bench train --quick --json ")
    assert result["config"] == {**dataclasses.asdict(train.TrainConfig.quick()), "ranks": list(train.TENANT_RANKS)}
    assert result["recompiles_during_timing"] == 0
    check = result["gradient_check"]
    assert check["met"] and set(check["max_relative_difference"]) == {"lora_recompute", "in_turn", "onehot", "peft"}
    assert all(v <= check["tolerance"] for d in check["max_relative_difference"].values() for v in d.values())
    rows = {row["formulation"]: row for row in result["rows"]}
    assert list(rows) == list(train.FORMULATIONS)
    repeats = result["config"]["repeats"]
    assert all(len(runs) == repeats and min(runs) > 0 for runs in result["seconds_per_round"].values())
    assert all(len(runs) == repeats and min(runs) > 0 for runs in result["cpu_seconds_per_round"].values())
    base, base_cpu = result["seconds_per_round"]["base"], result["cpu_seconds_per_round"]["base"]
    for name, row in rows.items():
        ratios = [t / b for t, b in zip(result["seconds_per_round"][name], base, strict=True)]
        assert row["ratio_to_base"] == pytest.approx(float(np.median(ratios)))
        cpu_ratios = [t / b for t, b in zip(result["cpu_seconds_per_round"][name], base_cpu, strict=True)]
        assert row["ratio_to_base_cpu"] == pytest.approx(float(np.median(cpu_ratios)))
        assert row["overhead_over_base"] == pytest.approx(row["ratio_to_base"] - 1)
        assert row["step_ms"] == pytest.approx(1e3 * float(np.median(result["seconds_per_round"][name])))
    assert rows["base"]["ratio_to_base"] == 1.0
    onehot = rows["onehot"]["overhead_over_base"]
    if onehot > 0:
        assert rows["lora"]["overhead_vs_onehot"] == pytest.approx(rows["lora"]["overhead_over_base"] / onehot)
    targets = result["targets"]
    assert set(targets) == {"ratio_to_base", "overhead_vs_onehot", "ratio_to_base_cpu", "overhead_vs_onehot_cpu"}
    for suffix in ("", "_cpu"):
        ratio, versus = rows["lora"][f"ratio_to_base{suffix}"], rows["lora"][f"overhead_vs_onehot{suffix}"]
        assert targets[f"ratio_to_base{suffix}"]["met"] == (ratio <= train.MAX_RATIO_TO_BASE)
        within = versus <= train.MAX_OVERHEAD_VS_ONEHOT if versus is not None else ratio <= 1
        assert targets[f"overhead_vs_onehot{suffix}"]["met"] == within
    assert result["sgd_update_ms"] > 0
    assert {row["chip"] for row in result["tpu_model"]} == {"v6e"}
    assert all(row["tokens"] == 8192 for row in result["tpu_model"])
    assert "| (a) base, frozen" in text and "TPU cost model" in text and "modelled" in text


# -- the TPU cost model of the training step ---------------------------------------------------------------


def test_weight_grad_kernel_cost_by_hand():
    """The weight-gradient kernel's grid walked on v6e (256-wide MXU): 128 tokens (one 128-token block) all on
    slot 0 of 4, right 512 wide (one tile): visits (0, block 0) then the empty visits of slots 1-3. Fetched:
    both index blocks, left^T and right once; the f32 output tile written for every slot; one product, its
    K = 128 padded to the MXU width; one grid step per visit."""
    chip = tpu_model.CHIPS["v6e"]
    tokens, left, right, slots = 128, 64, 512, 4
    cost = tpu_train_model.weight_grad_kernel_cost(chip, np.zeros(tokens, np.int32), left, right, slots)
    assert cost.pipelined_bytes == 2 * 4 * tokens + 2 * left * tokens + 2 * tokens * right + slots * 4 * left * right
    assert cost.mxu_flops == 2 * left * 256 * right
    assert cost.steps == slots
    expected = max(cost.pipelined_bytes / chip.hbm_bytes_per_s, cost.mxu_flops / chip.peak_flops) + 4 * 0.35e-6
    assert cost.seconds == pytest.approx(expected)
    # A second slot's tokens inside the block: a second product (same fetches); tokens without adapter: none.
    mixed = np.array([0] * 64 + [1] * 32 + [-1] * 32, np.int32)
    other = tpu_train_model.weight_grad_kernel_cost(chip, mixed, left, right, slots)
    assert (other.mxu_flops, other.pipelined_bytes, other.steps) == (2 * cost.mxu_flops, cost.pipelined_bytes, 4)


def test_fused_g_pass_cost_by_hand():
    """The fused backward's pass over g (ds and dB) walked on v6e: 128 tokens (one block) all on slot 0 of 4,
    g 512 wide (one tile): one visit. Fetched once: both index blocks, s^T, g, slot 0's B tile; written once:
    every slot's f32 dB tile and the f32 ds block. Two products (ds: N = R padded to the MXU width; dB: K =
    128 padded); one grid step; then the ds partial sums added up. Mixed rows: one more visit (slot 1's B
    tile fetched, two more products); rows without adapter add nothing."""
    chip = tpu_model.CHIPS["v6e"]
    tokens, rank, width, slots = 128, 64, 512, 4
    cost = tpu_train_model.g_pass_kernel_cost(chip, np.zeros(tokens, np.int32), rank, width, slots)
    fetched = 2 * 4 * tokens + 2 * rank * tokens + 2 * tokens * width + 2 * rank * width
    assert cost.pipelined_bytes == fetched + 4 * slots * rank * width + 4 * tokens * rank
    assert cost.mxu_flops == 2 * tokens * 512 * 256 + 2 * rank * 256 * 512
    assert cost.steps == 1
    mixed = np.array([0] * 64 + [1] * 32 + [-1] * 32, np.int32)
    other = tpu_train_model.g_pass_kernel_cost(chip, mixed, rank, width, slots)
    assert other.mxu_flops == 2 * cost.mxu_flops and other.steps == 2
    assert other.pipelined_bytes == cost.pipelined_bytes + 2 * rank * width


def test_train_step_model_one_hot_grows_with_slots_ours_does_not():
    """Same batch (8 tenants), more slots: the one-hot formulation's modelled backward and forward grow with
    L, our dx and recomputed shrink do not; the base is the sum of the forward and backward GEMMs (the forward's
    reading what XLA fuses into it)."""
    chip = tpu_model.CHIPS["v6e"]
    layer = tpu_train_model.llama_layer(256, 512, 4, 2)
    indices = tpu_train_model.interleaved_rows(8, 128, 8)
    few = tpu_train_model.train_step_costs(chip, indices, layer, 16, 8)
    many = tpu_train_model.train_step_costs(chip, indices, layer, 16, 64)
    for key in ("lora_dx", "fused_dx", "recompute_s", "base_forward", "base_backward"):
        assert many["parts"][key] == pytest.approx(few["parts"][key]), key
    assert many["parts"]["onehot_backward"] > 1.5 * few["parts"]["onehot_backward"]
    assert many["ratio_onehot"] > few["ratio_onehot"]
    tokens = len(indices)
    roles = tpu_model.llama_roles()
    # The forward GEMM reads what XLA fuses into it: the residual (o, down) and SiLU(gate) * up's second operand.
    fused = {n: (i if g == "silu_mul" else 0) + (o if roles[n][0] else 0) for n, (i, o, g) in layer.items()}
    gemms = sum(
        tpu_model.matmul_cost(chip, tokens, i, o, fused_reads=tokens * fused[n]).seconds
        + tpu_model.matmul_cost(chip, tokens, o, i).seconds
        for n, (i, o, _) in layer.items()
    )
    assert few["base"] == pytest.approx(gemms)
    assert few["ratio_ours"] == pytest.approx(few["ours"] / few["base"])
    assert few["overhead_vs_onehot"] == pytest.approx((few["ours"] - few["base"]) / (few["onehot"] - few["base"]))


def test_train_step_model_keeps_s_where_the_training_forward_does():
    """Ours keeps ``s`` from the forward where the layers' training forward keeps it: a projection on
    ``linear_lora`` pays its kernel writing s (the walk of the keep_s kernel: exactly one bf16 [T, R] write
    more under the same plan) and no recomputing shrink, the XLA-native one no shrink either, a projection on
    the separate kernels still recomputes it; the serving forwards' figure recomputes every s."""
    chip = tpu_model.CHIPS["v6e"]
    rank, slots = 16, 8
    layer = tpu_train_model.llama_layer(2048, 5632, 32, 4)
    indices = tpu_train_model.interleaved_rows(16, 512, slots)
    serving = tpu_model.fused_base_cost(chip, indices, 2048, 2048, rank, slots)
    training = tpu_model.fused_base_cost(chip, indices, 2048, 2048, rank, slots, keep_s=True)
    assert (serving.steps, serving.mxu_flops) == (training.steps, training.mxu_flops)  # the same plan here
    assert training.pipelined_bytes - serving.pipelined_bytes == len(indices) * rank * 2
    costs = tpu_train_model.train_step_costs(chip, indices, layer, rank, slots)
    roles = tpu_model.llama_roles()
    recomputed, kept = 0.0, 0.0
    for name, (fan_in, fan_out, _) in layer.items():
        operands = tpu_model.llama_fused_reads(name)["operands"]
        part = tpu_train_model.projection_train_costs(
            chip, indices, fan_in, fan_out, rank, slots, *roles[name], operands=operands
        )
        assert part["recompute_s_kept"] == (part["recompute_s"] if part["forward_choice"] == "separate" else 0.0)
        if part["forward_choice"] == "fused":
            assert part["lora_forward_s_kept"] >= part["lora_forward"] * (1 - 1e-12)  # (rounding: MXU-bound here)
        recomputed += part["lora_forward"] + part["recompute_s"]
        kept += part["lora_forward_s_kept"] + part["recompute_s_kept"]
    assert costs["choices"]["q_proj"] == "fused" and costs["parts"]["recompute_s_kept"] < costs["parts"]["recompute_s"]
    assert costs["ours"] == pytest.approx(costs["ratio_ours_recomputed_s"] * costs["base"] - recomputed + kept)


def test_backward_pass_over_g_takes_ds_and_db_where_the_forward_is_linear_lora():
    """``linear_lora_backward``'s pass priced by hand against the dx pass that keeps ds only (the same plan at
    q_proj's shapes on v6e, T = 8192, 16 rows of 512 tokens on 8 tenants of rank 64): the rows' [R, bt] bf16 and
    the codes' [1, bt] int32 blocks fetched once per token block, dB's f32 [L, R, K] written once, one
    [R, bt] x [bt, tk] product per distinct adapter of a block at each reduction step of the first output tile.
    The step model takes a fused projection's dx, ds and dB from that pass (less than dx's pass and the g pass of
    its own), and its "dB in a pass of its own" figure is ours with those two instead."""
    chip = tpu_model.CHIPS["v6e"]
    tokens, hidden, rank, slots = 8192, 2048, 64, 8
    indices = tpu_train_model.interleaved_rows(16, 512, slots)
    sizes, _ = fused_base.plan(tokens, hidden, hidden, rank, slots, jnp.bfloat16, "v6e", False, fused_base.NO_FUSION,
                               True, True)  # fmt: skip
    assert (sizes, _) == fused_base.plan(tokens, hidden, hidden, rank, slots, jnp.bfloat16, "v6e", False,
                                         fused_base.NO_FUSION, True)  # fmt: skip
    kept = tpu_model.fused_base_cost(chip, indices, hidden, hidden, rank, slots, "in_out", keep_s=True)
    grads = tpu_model.fused_base_cost(chip, indices, hidden, hidden, rank, slots, "in_out", keep_s=True, a_grad=True)
    assert grads.pipelined_bytes - kept.pipelined_bytes == tokens * (2 * rank + 4)
    assert grads.manual_bytes - kept.manual_bytes == 4 * slots * rank * hidden
    blocks = indices.reshape(-1, sizes.tokens)
    distinct = sum(len(set(block.tolist())) for block in blocks)
    product = tpu_model.mxu_flops([(rank, sizes.tokens, sizes.hidden)], chip.mxu_width)
    assert grads.mxu_flops - kept.mxu_flops == distinct * (hidden // sizes.hidden) * product
    part = tpu_train_model.projection_train_costs(chip, indices, hidden, hidden, rank, slots)
    assert part["forward_choice"] == "fused"
    assert part["backward_g_passes"] == pytest.approx(grads.seconds - part["base_backward"])
    assert part["backward_g_passes"] < part["fused_dx"] + part["fused_g_pass"]
    layer = tpu_train_model.llama_layer(2048, 5632, 32, 4)
    costs = tpu_train_model.train_step_costs(chip, indices, layer, rank, slots)
    parts = costs["parts"]
    own_pass = costs["ours"] - parts["backward_g_passes"] + parts["fused_dx"] + parts["fused_g_pass"]
    assert costs["ratio_ours_db_own_pass"] == pytest.approx(own_pass / costs["base"])
    assert costs["ratio_ours_db_own_pass"] > costs["ratio_ours"]


def test_arranged_step_takes_da_of_projections_sharing_an_input_in_one_pass():
    """The arranged decoder trains q/k/v and gate/up as groups (``layers/shared_input.py``): the model prices their
    dA as one weight-gradient walk of [T, n * R] against the shared x per group, where alone each member walks x
    (by hand: q/k/v read 2048-wide x, gate/up too; o and down stay alone). Not arranged, no group."""
    chip = tpu_model.CHIPS["v6e"]
    rank, slots = 64, 8
    layer = tpu_train_model.llama_layer(2048, 5632, 32, 4)
    indices = tpu_train_model.interleaved_rows(16, 512, slots)
    args = (chip, indices, layer, rank, slots)
    arranged = tpu_train_model.train_step_costs(*args, kernel_fusion=tpu_train_model.TRAINING_KERNEL_FUSION)
    alone = tpu_train_model.train_step_costs(*args)
    assert set(arranged["choices"].values()) == {"fused"}

    def walk(left: int, width: int) -> float:
        return tpu_train_model.weight_grad_kernel_cost(chip, indices, left, width, slots).seconds

    expected = walk(3 * rank, 2048) + walk(2 * rank, 2048) + walk(rank, 2048) + walk(rank, 5632)
    assert arranged["parts"]["fused_weight_grad_a"] == pytest.approx(expected)
    assert alone["parts"]["fused_weight_grad_a"] == pytest.approx(6 * walk(rank, 2048) + walk(rank, 5632))
    assert expected < alone["parts"]["fused_weight_grad_a"]


def test_train_step_model_of_an_int8_base_reads_the_weight_as_int8_in_the_backward():
    """Over an int8 base the fused projections' dx pass reads the int8 weight transposed (its scales per input
    channel): one byte an element where the bf16 copy the previous backward made cost a pass of its own (int8
    read, bf16 written) and two bytes an element in the kernel; the base's GEMMs read the weight at one byte too.
    Over a bf16 base both figures are one."""
    chip = tpu_model.CHIPS["v6e"]
    rank, slots, hidden, out_dim = 16, 8, 2048, 2048
    indices = tpu_train_model.interleaved_rows(16, 512, slots)
    int8 = tpu_model.fused_base_cost(chip, indices, out_dim, hidden, rank, slots, "in_out", int8_weight=True,
                                     scales_along_input=True)  # fmt: skip
    bf16 = tpu_model.fused_base_cost(chip, indices, out_dim, hidden, rank, slots, "in_out")
    # The weight is read once per token block at least: a byte an element less each time (its f32 scales added).
    assert bf16.pipelined_bytes - int8.pipelined_bytes >= hidden * out_dim - 4 * len(indices) * hidden
    part = tpu_train_model.projection_train_costs(chip, indices, hidden, out_dim, rank, slots, int8_weight=True)
    copy = (3 * hidden * out_dim + 4 * out_dim) / chip.hbm_bytes_per_s
    # (at least the copy: the kernels' times are their rooflines, here MXU-bound at T = 8192 either way)
    assert part["lora_dx_one_pass_dequantized"] - part["lora_dx_one_pass"] >= copy * (1 - 1e-9)
    # At T = 256 the pass is bound by the weight's bytes: reading it as int8 saves a third of the copy's more.
    few = tpu_train_model.interleaved_rows(2, 128, slots)
    part = tpu_train_model.projection_train_costs(chip, few, 4096, 14336, rank, slots, int8_weight=True)
    copy = (3 * 4096 * 14336 + 4 * 14336) / chip.hbm_bytes_per_s
    assert part["lora_dx_one_pass_dequantized"] - part["lora_dx_one_pass"] > 1.3 * copy
    layer = tpu_train_model.llama_layer(2048, 5632, 32, 4)
    args = (chip, indices, layer, rank, slots)
    quantized = tpu_train_model.train_step_costs(*args, kernel_fusion=tpu_train_model.TRAINING_KERNEL_FUSION,
                                                 int8_weight=True)  # fmt: skip
    assert quantized["ratio_ours_dequantized_dx"] > quantized["ratio_ours"]
    plain = tpu_train_model.train_step_costs(*args, kernel_fusion=tpu_train_model.TRAINING_KERNEL_FUSION)
    assert plain["ratio_ours_dequantized_dx"] == pytest.approx(plain["ratio_ours"])
    assert quantized["base"] <= plain["base"]


def test_model_command_prices_an_int8_base_and_refuses_the_flag_without_model(tmp_path, capsys):
    """``bench train --model --int8-base`` prints and writes the int8 rows (with the column of the backward on a
    bf16 copy of the weight); ``--int8-base`` without ``--model`` is refused before anything is built."""
    from torch_xla_lora.bench import train

    out = tmp_path / "model.json"
    assert train.main(["--model", "--int8-base", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["tpu_model"]
    assert rows and all(row["base_weights"] == "int8" for row in rows)
    assert all(row["ratio_ours_dequantized_dx"] > row["ratio_ours"] for row in rows)
    assert "dx on a bf16 copy of the weight" in capsys.readouterr().out
    assert train.main(["--int8-base"]) == 2
    assert "pass --model too" in capsys.readouterr().err
