"""Mixture of experts on torch_xla SPMD meshes: tensor and expert parallel, forward and training.

Run in a worker process of their own (``spmd_worker.py moe``, 4 virtual CPU devices): a tiny Mixtral on a
(1, 4) data x model mesh (experts split on their width) and on a (2, 2) expert x model mesh (``ep_axis``), and
a tiny GPT-OSS on the latter; the checks below compare with one device and with PEFT. Kept apart from
``test_sharding.py`` so that the two files' workers run side by side.
"""

from __future__ import annotations

import collections
import copy
import warnings

import peft
import pytest
import spmd_worker
import torch
from conftest import assert_close
from test_sharding import SPMD_ATOL, SPMD_RTOL, run_worker
from torch import nn

import torch_xla_lora as tl

MOE_BATCH = ["math", None, "code", "math"]
MOE_POOL_BUDGET = 10**6  # bytes: rank-true pools on the expert-parallel Mixtral (both adapters fit)
MOE_MORE_BATCHES = [["code", "code", None, "math"], [None, "math", "code", None]]


def _moe_adapters(arch: str) -> tuple[dict, dict[str | None, torch.Tensor]]:
    """(name -> (PEFT state dict, config), PEFT's logits of test_moe.IDS per adapter and None for the base model)
    of test_moe's tiny random ``arch`` with two adapters."""
    import test_moe

    adapters, reference = {}, {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference[None] = test_moe.moe_model(arch)(test_moe.IDS).logits
        for seed, name in enumerate(("math", "code")):
            model = test_moe.peft_model(arch, seed).eval()
            adapters[name] = (peft.get_peft_model_state_dict(model), model.peft_config["default"])
            reference[name] = model(test_moe.IDS).logits
    return adapters, reference


def moe_inputs() -> tuple[dict, dict[str | None, torch.Tensor]]:
    """(worker inputs, PEFT's logits per adapter and None for the base model) of a tiny random Mixtral
    (test_moe's: 4 experts, top-2, expert width 16) with two PEFT adapters on attention, router and experts
    ("all-linear", as PEFT rewrites it for Mixtral)."""
    import test_moe

    ids = test_moe.IDS
    adapters, reference = _moe_adapters("Mixtral")
    specs = {
        "gate_up_proj": (None, "model", None),  # [E, 2 * width, D]: the expert width over the model axis
        "down_proj": (None, None, "model"),  # [E, D, width]
        "lora_a": (None, None, None),
        "lora_b": (None, None, "model"),  # follows gate_up_proj's output
        "lora_a_down": (None, None, "model"),  # follows down_proj's input
        "lora_b_down": (None, None, None),
    }
    # With ep_axis="expert" on an ("expert", "model") mesh: the experts over "expert" too, the slot buffers as above.
    ep_specs = specs | {"gate_up_proj": ("expert", "model", None), "down_proj": ("expert", None, "model")}
    inputs = {
        "model": test_moe.moe_model("Mixtral", "batched_mm"),
        "adapters": adapters,
        "lora_config": {"max_loras": 2, "max_rank": 8},
        "ids": ids,
        "batch": MOE_BATCH,
        "more_batches": MOE_MORE_BATCHES,
        "specs": specs,
        "ep_specs": ep_specs,
    }
    return inputs, reference


@pytest.fixture(scope="module")
def moe(xla_device) -> tuple[dict, dict, torch.Tensor]:
    """(worker inputs, PEFT's logits per adapter, the same patched model's logits on one XLA device)."""
    inputs, reference = moe_inputs()
    return inputs, reference, _one_device_logits(inputs, xla_device)


def _one_device_logits(inputs: dict, device: torch.device, **config) -> torch.Tensor:
    """The MoE model of ``inputs`` patched on one ``device`` (its LoRA config, updated by ``config``) with its
    adapters loaded: the logits of MOE_BATCH."""
    model = copy.deepcopy(inputs["model"]).to(device)
    lora = tl.patch_model(model, tl.LoRAConfig(**{**inputs["lora_config"], **config}))
    for name, (state_dict, adapter_config) in inputs["adapters"].items():
        lora.load_adapter(name, state_dict=state_dict, config=adapter_config)
    lora.set_batch(MOE_BATCH)
    with torch.no_grad():
        return model(inputs["ids"].to(device), use_cache=False).logits.cpu()


@pytest.fixture(scope="module")
def gpt_oss_moe() -> tuple[dict, dict[str | None, torch.Tensor]]:
    """(worker inputs, PEFT's logits per adapter) of test_moe's tiny GPT-OSS (transposed [E, in, out] expert
    weights with biases, interleaved gate and up) with two adapters on attention, router and experts."""
    import test_moe

    adapters, reference = _moe_adapters("GptOss")
    ep_specs = {
        "gate_up_proj": ("expert", None, "model"),  # [E, D, 2 * width]: E over "expert", the width over "model"
        "down_proj": ("expert", "model", None),  # [E, width, D]
        "gate_up_proj_bias": (None, "model"),  # [E, 2 * width]: replicated over "expert"
        "down_proj_bias": (None, None),
    }
    model = test_moe.moe_model("GptOss", "batched_mm")
    inputs = {"model": model, "adapters": adapters, "ids": test_moe.IDS, "batch": MOE_BATCH, "ep_specs": ep_specs}
    return inputs, reference


# Two trainable tenants on the tiny Mixtral (2 layers, hidden 32, 4 experts, expert width 16), on its second layer
# (spmd_worker.MOE_TRAINED_LAYER: the backward stops there, half the graph): expert LoRA through target_parameters
# (t1 on the down projection only) and attention LoRA on column (q, v) and row (o) layers.
MOE_TENANTS = {
    "t0": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": r".*layers\.1\.self_attn\.(q_proj|o_proj)",
        "target_parameters": ["layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj"],
    },
    "t1": {
        "r": 2,
        "lora_alpha": 6,
        "target_modules": r".*layers\.1\.self_attn\.v_proj",
        "target_parameters": ["layers.1.mlp.experts.down_proj"],
    },
}
MOE_TRAIN_BATCH = ["t0", None, "t1", "t0"]


def _grads(loss: torch.Tensor, keyed: dict) -> dict:
    grads = torch.autograd.grad(loss, list(keyed.values()))
    return {"loss": loss.detach(), "grads": dict(zip(keyed, grads, strict=True))}


def _training_case(arch: str, gate: dict | None = None, hook=None) -> tuple[dict, dict, dict, nn.Module, tl.LoRAModel]:
    """(worker inputs, one-device results, keyed parameters, model, LoRAModel) of the MoE model step on CPU
    tensors (``spmd_worker.moe_training_step``): test_moe's tiny ``arch`` with MOE_TENANTS made by
    ``create_adapter`` (``init_lora_weights=False``: B non-zero, so A gets gradients) and the trained layer's
    expert weights (and biases) unfrozen; the mixed batch's loss sum(logits * weights) and its gradients, keyed
    as the worker keys them. ``gate``: attributes set on the trained layer's base experts (GPT-OSS's
    ``limit``), in the worker too; ``hook(base experts)``: called after, here only."""
    import test_moe

    model = test_moe.moe_model(arch, "batched_mm")
    lora = tl.patch_model(model, tl.LoRAConfig(max_loras=2, max_rank=8))
    base = lora.layers[spmd_worker.MOE_TRAINED_LAYER + "mlp.experts"].base_layer
    for attribute, value in (gate or {}).items():
        setattr(base, attribute, value)
    if hook is not None:
        hook(base)
    torch.manual_seed(6)
    tenants, keyed = {}, {}
    for name, kwargs in MOE_TENANTS.items():
        config = peft.LoraConfig(init_lora_weights=False, **kwargs)
        lora.create_adapter(name, config)
        params = lora.trainable_parameters(name)
        tenants[name] = (config, {key: param.detach().clone() for key, param in params.items()})
        keyed |= {(name, key): param for key, param in params.items()}
    for key, param in model.named_parameters():
        if key.startswith(spmd_worker.MOE_TRAINED_LAYER + "mlp.experts."):
            keyed[("base", key.replace(".base_layer", ""))] = param.requires_grad_(True)
    generator = torch.Generator().manual_seed(7)
    ids, vocab = test_moe.IDS, model.config.vocab_size
    weights = torch.randn(*ids.shape, vocab, generator=generator)
    lora.set_batch(MOE_TRAIN_BATCH)
    expected = {"model": _grads((model(ids, use_cache=False).logits * weights).sum(), keyed)}
    inputs = {"tenants": tenants, "train_batch": MOE_TRAIN_BATCH, "ids": ids, "loss_weights": weights}
    return inputs | {"gate": gate or {}}, expected, keyed, model, lora


@pytest.fixture(scope="module")
def moe_training() -> tuple[dict, dict]:
    """(worker inputs, one-device results) of the MoE training steps (``spmd_worker.moe_training_step`` and
    ``moe_layer_training_step``) on CPU tensors, the tiny Mixtral: "model" of :func:`_training_case`, "layer":
    the same through the trained layer's experts alone on random hidden states and routing."""
    inputs, expected, keyed, model, lora = _training_case("Mixtral")
    generator = torch.Generator().manual_seed(8)
    tokens, experts, hidden_size = inputs["ids"].numel(), model.config.num_local_experts, model.config.hidden_size
    layer = {
        "hidden": torch.randn(tokens, hidden_size, generator=generator),
        "top_k_index": torch.rand(tokens, experts, generator=generator).topk(2, dim=1).indices,  # two experts each
        "top_k_weights": torch.rand(tokens, 2, generator=generator),
        "weights": torch.randn(tokens, hidden_size, generator=generator),
    }
    hidden = layer["hidden"].clone().requires_grad_(True)
    experts_layer = lora.layers[spmd_worker.MOE_TRAINED_LAYER + "mlp.experts"]
    out = experts_layer(hidden, layer["top_k_index"], layer["top_k_weights"])
    layer_keyed = {("hidden", ""): hidden} | {key: p for key, p in keyed.items() if ".mlp.experts." in key[1]}
    expected["layer"] = _grads((out * layer["weights"]).sum(), layer_keyed)
    return inputs | {"layer": layer}, expected


#: GPT-OSS's clamp of the trained layer's interleaved gate (gate <= limit, |up| <= limit), lowered from 7.0 so that
#: the tiny model's activations (|gate| about 0.08) cross it: the clamp's zero gradients are exercised.
GPT_OSS_TRAIN_LIMIT = 0.1


@pytest.fixture(scope="module")
def gpt_oss_training() -> tuple[dict, dict]:
    """(worker inputs, one-device results) of the same tenants' model step on test_moe's tiny GPT-OSS
    (:func:`_training_case`): transposed [E, in, out] expert weights and their biases unfrozen, the interleaved
    gate clamped at GPT_OSS_TRAIN_LIMIT; "clamped": the fractions of the trained layer's routed gate and up
    values beyond the limit in that step."""
    gate_values = []

    def record(base: nn.Module) -> None:
        apply_gate = base._apply_gate

        def recording(gate_up: torch.Tensor) -> torch.Tensor:
            gate_values.append(gate_up.detach())
            return apply_gate(gate_up)

        base._apply_gate = recording

    inputs, expected, *_ = _training_case("GptOss", gate={"limit": GPT_OSS_TRAIN_LIMIT}, hook=record)
    (gate_up,) = gate_values
    expected["clamped"] = (
        (gate_up[..., ::2] > GPT_OSS_TRAIN_LIMIT).float().mean().item(),
        (gate_up[..., 1::2].abs() > GPT_OSS_TRAIN_LIMIT).float().mean().item(),
    )
    return inputs, expected


def _peft_rows(reference: dict) -> torch.Tensor:
    """PEFT's mixed batch: each row's logits from PEFT with that row's adapter (PEFT refuses mixed MoE batches)."""
    return torch.stack([reference[name][row] for row, name in enumerate(MOE_BATCH)])


@pytest.fixture(scope="module")
def spmd_moe(moe, moe_training, gpt_oss_moe, gpt_oss_training, tmp_path_factory) -> dict:
    """The MoE worker's result: "moe" (the (1, 4) mesh) and "moe_ep" (the (2, 2) expert x model mesh, with
    "gpt_oss", "pool" and the training steps)."""
    workdir = tmp_path_factory.mktemp("moe")
    inputs = {
        "dump_dir": str(workdir / "hlo"),
        "moe": moe[0] | {"training": moe_training[0], "memory_budget": MOE_POOL_BUDGET},
        "moe_gpt_oss": gpt_oss_moe[0] | {"training": gpt_oss_training[0]},
    }
    return run_worker("moe", str(workdir), inputs, devices=4, dump_hlo=True)


def test_moe_layers_placed_experts_tensor_parallel_router_replicated(spmd_moe):
    kinds = spmd_moe["moe"]["kinds"]
    layer = "model.layers.0."
    assert kinds[layer + "mlp.experts"] == "experts" and kinds[layer + "mlp.gate"] == "replicated"
    assert (kinds[layer + "self_attn.q_proj"], kinds[layer + "self_attn.o_proj"]) == ("column", "row")
    assert spmd_moe["moe"]["specs"] == spmd_moe["moe"]["expected_specs"]


@pytest.mark.parametrize("mode", ["lazy", "compiled"])
def test_moe_on_a_mesh_matches_one_device_and_peft(spmd_moe, moe, mode):
    """Expert, router and attention LoRA, two adapters and a base row, on a (1, 4) mesh (experts split on
    their width): the logits of the one-device patched model (1e-5) and PEFT's per row (1e-4)."""
    _, reference, one_device = moe
    result = spmd_moe["moe"] if mode == "lazy" else spmd_moe["moe"]["compiled"]
    torch.testing.assert_close(result["logits"], one_device, atol=SPMD_ATOL, rtol=SPMD_RTOL)
    assert_close(result["logits"], _peft_rows(reference))
    assert not torch.allclose(reference["math"], reference[None], atol=1e-3)  # the adapters matter


@pytest.mark.parametrize("mode", ["lazy", "compiled"])
def test_moe_on_a_mesh_no_recompile_after_warmup(spmd_moe, mode):
    result = spmd_moe["moe"] if mode == "lazy" else spmd_moe["moe"]["compiled"]
    assert result["compiles_after_warmup"] == 0  # two more adapter mixes, with a reload each
    if mode == "compiled":
        assert result["graphs_after_warmup"] == 0


def test_moe_lora_adds_no_collective_on_a_mesh(spmd_moe):
    """The whole Mixtral forward's compiled HLO after SPMD partitioning: the same collectives with expert, router
    and attention LoRA as the base model (the same patched model without a batch) on the same mesh."""
    counts = spmd_moe["moe"]["collectives"]
    assert counts["base"]["all-reduce"] > 0  # the counting sees the row layers' and the experts' reductions
    assert counts["lora"] == counts["base"]


def test_moe_expert_weights_split_over_the_expert_axis(spmd_moe):
    """On a (2, 2) ("expert", "model") mesh with ep_axis="expert": each expert weight split on E over the expert
    axis and on its width over the model axis; the slot buffers placed as without an expert axis."""
    result = spmd_moe["moe_ep"]
    assert result["kind"] == "experts"
    assert result["specs"] == result["expected_specs"]
    assert result["specs"]["gate_up_proj"] != spmd_moe["moe"]["specs"]["gate_up_proj"]  # not the TP-only split


@pytest.mark.parametrize("mode", ["lazy", "compiled"])
def test_moe_expert_parallel_matches_one_device_and_peft(spmd_moe, moe, mode):
    """Experts over the expert axis, their width over the model axis: the mixed batch (two adapters and a base row)
    gives the one-device logits (1e-5) and PEFT's per row (1e-4), lazy and under torch.compile."""
    _, reference, one_device = moe
    result = spmd_moe["moe_ep"]
    logits = result["logits"] if mode == "lazy" else result["compiled_logits"]
    torch.testing.assert_close(logits, one_device, atol=SPMD_ATOL, rtol=SPMD_RTOL)
    assert_close(logits, _peft_rows(reference))
    if mode == "compiled":
        assert result["compiled_compiles_after_warmup"] == 0  # the batch and another mix with a reload


def test_moe_expert_parallel_transposed_experts_with_biases_match_peft(spmd_moe, gpt_oss_moe):
    """GPT-OSS's layout on the same (2, 2) expert x model mesh: [E, in, out] expert weights split on E and on their
    width (the last dimension of gate_up_proj, the middle one of down_proj), the biases added to the stacked up
    output, the interleaved gate run on it; the mixed batch equals PEFT's rows (lazy)."""
    _, reference = gpt_oss_moe
    result = spmd_moe["moe_ep"]["gpt_oss"]
    assert result["specs"] == result["expected_specs"]
    assert_close(result["logits"], _peft_rows(reference))
    assert not torch.allclose(reference["math"], reference[None], atol=1e-3)


def test_moe_expert_parallel_rank_true_pools_match_one_device_and_peft(spmd_moe, moe):
    """``memory_budget`` on the (2, 2) expert x model mesh: the expert layer's four pools [E, rows, in or out]
    placed as the slot buffers they stand for (B of the up projection and A of the down one split on the
    width, replicated over the expert axis), and the mixed batch's logits read through them equal the
    one-device padded slots' (1e-5) and PEFT's rows (1e-4)."""
    _, reference, one_device = moe
    result = spmd_moe["moe_ep"]["pool"]
    assert result["pooled"]
    assert result["specs"] == result["expected_specs"]
    assert result["specs"]["lora_b"] != result["specs"]["lora_a"]  # a split one and a replicated one
    torch.testing.assert_close(result["logits"], one_device, atol=SPMD_ATOL, rtol=SPMD_RTOL)
    assert_close(result["logits"], _peft_rows(reference))


def test_moe_int8_expert_pools_on_a_mesh_read_their_kept_page_scales_and_match_one_device(spmd_moe, moe, xla_device):
    """int8 pools on the (2, 2) expert x model mesh: every projection's region hands each shard's pooled op the
    entries' page table and the layer's kept page scales of that projection (``lora_page_scale``,
    ``lora_page_scale_down``: 4 experts to a tile, whole on every shard, as every shard holds all E pools' rows), and
    the logits read through them equal the same int8 pools on one device (1e-5), which are not the float ones."""
    one_device = _one_device_logits(moe[0], xla_device, memory_budget=MOE_POOL_BUDGET, weight_dtype="int8")
    result = spmd_moe["moe_ep"]["pool"]
    torch.testing.assert_close(result["int8_logits"], one_device, atol=SPMD_ATOL, rtol=SPMD_RTOL)
    assert not torch.allclose(result["int8_logits"], result["logits"], atol=1e-4)  # int8 rows were read
    passed = spmd_worker.reads_by_layer(result["int8_pool_reads"]["sharded_grouped_matmul"])
    pools = {"lora_a_pool", "lora_b_pool", "lora_a_down_pool", "lora_b_down_pool"}
    assert passed == {f"model.layers.{i}.mlp.experts": pools | {"pages", "lora_page_scale", "lora_page_scale_down"}
                      for i in (0, 1)}  # fmt: skip


def test_moe_layers_on_a_mesh_read_their_pools_without_gathering(spmd_moe):
    """With a memory budget on the (2, 2) expert x model mesh no layer gathers its lanes into slots
    (``xla_lora::sharded_gather_slots``): the experts read each (lane, expert) entry's true-rank rows from their
    slices of the four pools inside ``sharded_grouped_matmul``, the router (replicated) and the attention's
    column layers inside ``sharded_pooled_lora``, o_proj inside ``sharded_pooled_row_linear``."""
    result = spmd_moe["moe_ep"]["pool"]
    reads = result["pool_reads"]
    assert reads["sharded_gather_slots"] == []
    assert {name.rsplit(".", 1)[0] for names in reads.values() for name in names} == set(result["patched_layers"])
    experts = [name for name in reads["sharded_grouped_matmul"] if ".experts." in name]
    assert experts and len(experts) == len(reads["sharded_grouped_matmul"])
    for suffix in ("lora_a_pool", "lora_b_pool", "lora_a_down_pool", "lora_b_down_pool"):
        assert any(name.endswith(f".experts.{suffix}") for name in experts), suffix
    assert any(name.endswith(".gate.lora_a_pool") for name in reads["sharded_pooled_lora"])


def test_moe_expert_parallel_lora_adds_no_collective(spmd_moe):
    """The expert-parallel Mixtral forward's compiled HLO: the same collectives with expert, router and attention
    LoRA as without a batch (the experts' partials summed over both axes in the base's own all-reduce)."""
    counts = spmd_moe["moe_ep"]["collectives"]
    assert counts["base"]["all-reduce"] > 0
    assert counts["lora"] == counts["base"]


def test_moe_experts_not_dividing_over_the_expert_axis_refused(spmd_moe):
    """Six experts over an expert axis of four devices: ShardingError, and the model is left unpatched."""
    result = spmd_moe["moe_ep"]
    assert result["indivisible_error"] == (
        "ShardingError",
        "module 'model.layers.0.mlp.experts': 6 experts do not divide into 4 shards of mesh axis 'expert' (ep_axis)",
    )
    assert result["indivisible_untouched"]


@pytest.mark.parametrize("scenario", ["moe", "moe_ep", "gpt_oss_ep"])
def test_moe_training_on_a_mesh_matches_one_device(spmd_moe, moe_training, gpt_oss_training, scenario):
    """One training step (lazy mode) of two tenants' expert LoRA (``create_adapter`` with ``target_parameters``)
    in a mixed batch with a base row, the expert weights unfrozen too: on the (2, 2) expert x model mesh
    (``ep_axis``) the whole Mixtral with the tenants' attention LoRA ("moe_ep") and the whole GPT-OSS likewise
    ("gpt_oss_ep": [E, in, out] expert weights, the backward's other layout, their biases training too, the
    interleaved gate clamped on part of the rows); on the (1, 4) mesh (experts split on their width) the trained
    layer's experts alone, on hidden states requiring grad ("moe"). The loss and the gradients of every
    ``trainable_parameters`` entry (every expert's rows, on whichever expert shard it lives), of the expert
    weights (and of the hidden states) equal the same step on one device (CPU tensors), relative 1e-4."""
    if scenario == "gpt_oss_ep":
        result, expected = spmd_moe["moe_ep"]["gpt_oss"]["training"], gpt_oss_training[1]["model"]
        bases = {key.rpartition(".")[2] for tenant, key in result["grads"] if tenant == "base"}
        assert bases == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}
        for fraction in gpt_oss_training[1]["clamped"]:  # gate and up: the clamp cuts some gradients, not all
            assert 0.05 < fraction < 0.95
    else:
        result, expected = spmd_moe[scenario]["training"], moe_training[1]["layer" if scenario == "moe" else "model"]
    assert set(result["grads"]) == set(expected["grads"])
    tenants = {"t0", "t1", "base"} | ({"hidden"} if scenario == "moe" else set())
    assert {tenant for tenant, _ in result["grads"]} == tenants
    if scenario != "moe":
        assert any(".self_attn." in key for _, key in result["grads"])  # attention LoRA trains along
    assert_close(result["loss"], expected["loss"], torch.float32)
    for key, grad in result["grads"].items():
        assert torch.count_nonzero(expected["grads"][key]) > 0, key  # every gradient is seen
        magnitude = expected["grads"][key].abs().max().item()
        torch.testing.assert_close(grad, expected["grads"][key], atol=1e-4 * magnitude, rtol=1e-4, msg=str(key))


def _expert_step_collectives(collectives: list, scenario: str) -> tuple[collections.Counter, collections.Counter]:
    """(seen, expected): the training step's collectives that carry slot-entry gradients [L * E, R, *] or the
    S = N * K routed rows, and what they are to be. The expert backward reduces, per trained layer, the up
    projection's dA [L * E, R, D] (a partial over the expert width) and the down projection's dB [L * E, R, D]
    (each width slice holds a part of the shrink) over the model (and expert) axis, and with an expert axis also
    the up projection's dB [L * E, R, 2 W / tp] and the down projection's dA [L * E, R, W / tp] over it (each
    expert shard holds its experts' entries, zeros elsewhere); the rows' only reductions are the base's own
    [S, D]: each layer's down projection in the forward, the trained layer's up projection's dx in the backward.

    "moe": the expert layer's step alone (tp = 4): every reduction and gather of the graph is counted (its
    all-to-all and permutes re-pair the up projection's gate and up halves, split over different shards by the
    base layout; see docs/distributed.md). "moe_ep": the whole Mixtral (tp = 2, two layers, one trained): the
    collectives with a slot-entry or routed-row shape (the attention's have N rows), but for the permutes of the
    gate and up halves. "gpt_oss_ep": the whole GPT-OSS likewise (same sizes; interleaved gate and up, no
    permutes), plus the base's up bias gradient: the bias is added to the expert shards' stacked up output, so
    its rows' gradient [S, 2 W / tp] is summed over the expert axis (the same step without a batch has it too)."""
    entries, rank, hidden, width, rows = 2 * 4, 8, 32, 16, 4 * 5 * 2
    expected = collections.Counter({("all-reduce", (entries, rank, hidden)): 2})
    if scenario == "moe":
        expected[("all-reduce", (rows, hidden))] += 2
        seen = collections.Counter(c for c in collectives if c[0] in ("all-reduce", "all-gather", "reduce-scatter"))
        return seen, expected
    tp = 2
    expected[("all-reduce", (entries, rank, 2 * width // tp))] += 1
    expected[("all-reduce", (entries, rank, width // tp))] += 1
    expected[("all-reduce", (rows, hidden))] += 2 + 1
    if scenario == "gpt_oss_ep":
        expected[("all-reduce", (rows, 2 * width // tp))] += 1
    seen = collections.Counter(
        (op, shape)
        for op, shape in collectives
        if op != "collective-permute" and ((len(shape) == 3 and shape[0] == entries) or rows in shape)
    )
    return seen, expected


@pytest.mark.parametrize("scenario", ["moe", "moe_ep", "gpt_oss_ep"])
def test_moe_training_on_a_mesh_adds_only_the_reduction_of_expert_slot_gradients(spmd_moe, scenario):
    """The compiled training step's collectives (after SPMD partitioning) that carry expert slot-entry gradients
    or routed rows: exactly the reductions of the slot gradients that several shards compute parts of and the
    base's own row reductions; no gather of rows or slot entries (see :func:`_expert_step_collectives`)."""
    result = spmd_moe["moe_ep"]["gpt_oss"] if scenario == "gpt_oss_ep" else spmd_moe[scenario]
    seen, expected = _expert_step_collectives(result["training"]["collectives"], scenario)
    assert seen == expected


def test_warmup_warns_once_about_a_sharded_step_result(spmd_moe):
    """A step returning the vocabulary-sharded logits recompiles at every fetch (see the serving test's control):
    warm-up says so, with the fix."""
    caught = [m for m in spmd_moe["moe"]["warnings"] if "sharded over the mesh" in m]
    assert len(caught) == 1 and "sharding.replicated(t, mesh)" in caught[0]


def test_expert_region_ops_pass_opcheck_on_a_mesh(spmd_moe):
    """``torch.library.opcheck`` of the expert regions (see test_sharding.py's region-op check) on the arguments
    the Mixtral forward ((1, 4) mesh) and the expert-parallel training step passed them."""
    checks = spmd_moe["moe"]["opcheck"] | spmd_moe["moe_ep"]["opcheck"]
    checks = {call: error for call, error in checks.items() if call != "seconds"}
    assert {call: error for call, error in checks.items() if error} == {}
    assert {op for op, _ in checks} == set(spmd_worker.MOE_REGION_OPS)
