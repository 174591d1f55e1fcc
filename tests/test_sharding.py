"""Tensor-parallel LoRA on torch_xla SPMD: same logits as one device, no extra collective, no recompilation.

SPMD is process-global, so each mesh runs in a subprocess (``spmd_worker.py``)
on 4 or 8 virtual CPU devices; the checks below read its results. Plans and
argument errors need no mesh of several devices and run in this process.
"""

from __future__ import annotations

import collections
import copy
import os
import subprocess
import sys
import warnings

import numpy as np
import peft
import pytest
import spmd_worker
import torch
import transformers
from conftest import assert_close, cpu_compile_env
from spmd_worker import TOY_PLAN, Toy
from torch import nn

import torch_xla_lora as tl
from torch_xla_lora import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER_TIMEOUT_S = 1200  # a hang guard only: a scenario takes 1-3 minutes on 2 busy cores
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]
LORA_CONFIG = {"max_loras": 2, "max_rank": 8, "target_modules": TARGETS}
BATCH = ["a0", None, "a1", "a0"]
MORE_BATCHES = [["a2", "a0", None, "a2"], ["a1", "a2", "a1", None], [None, None, "a0", "a0"]]
SPMD_ATOL = SPMD_RTOL = 1e-5  # float32: only the order of the sharded sums differs

# name -> (devices, mesh shape, axis names, dp_axis, fully_sharded, base_fusion). base_fusion (linear_lora
# per shard) is forced on: "auto" turns it on for TPU devices only. One base-fusion mesh (data x model)
# covers tensor and data parallelism at once; the layers worker covers each layer kind on (4,).
SCENARIOS = {
    "tp4": (4, (4,), ("model",), None, False, False),
    "tp8-fully-sharded": (8, (8,), ("model",), None, True, False),
    "dp2xtp4": (8, (2, 4), ("data", "model"), "data", False, False),
    "dp2xtp2-base-fusion": (4, (2, 2), ("data", "model"), "data", False, True),
}


def run_worker(scenario: str, workdir: str, inputs: dict, devices: int, dump_hlo: bool = False) -> dict:
    """Run ``spmd_worker.py scenario`` on ``devices`` virtual CPU devices; return its result."""
    torch.save(inputs, os.path.join(workdir, "inputs.pt"))
    dump = (f"--xla_dump_to={inputs['dump_dir']}", "--xla_dump_hlo_as_text") if dump_hlo else ()
    env = cpu_compile_env(dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices)), *dump)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "spmd_worker.py"), scenario, workdir],
        env=env,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    if proc.returncode:
        raise AssertionError(f"spmd_worker.py {scenario} failed:\n{proc.stderr[-6000:]}")
    return torch.load(os.path.join(workdir, "result.pt"), weights_only=False)


# -- a tiny Llama, its PEFT adapters and one-device references ----------------------------------


def _llama_config() -> dict:
    # Heads divisible by 8 so that attention splits evenly over 4 and 8 shards.
    return dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
    )


@pytest.fixture(scope="module")
def llama_inputs() -> dict:
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama_config())).eval()
    adapters = {}
    for i, rank in enumerate((4, 8, 8)):
        config = peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, r=rank, lora_alpha=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notices about saving embedding layers
            model = peft.get_peft_model(copy.deepcopy(base), config)
            adapters[f"a{i}"] = (peft.get_peft_model_state_dict(model), config)
    return {
        "model_config": _llama_config(),
        "state_dict": base.state_dict(),
        "adapters": adapters,
        "lora_config": LORA_CONFIG,
        "ids": torch.randint(0, 128, (len(BATCH), 8), generator=torch.Generator().manual_seed(1)),
        "batch": BATCH,
        "more_batches": MORE_BATCHES,
    }


def _base_llama(inputs: dict) -> nn.Module:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**inputs["model_config"]))
    model.load_state_dict(inputs["state_dict"])
    return model.eval()


@pytest.fixture(scope="module")
def one_device_logits(llama_inputs, xla_device) -> torch.Tensor:
    """The same patched model, adapters and batch on one XLA device (this process is not SPMD)."""
    model = _base_llama(llama_inputs).to(xla_device)
    lora = tl.patch_model(model, tl.LoRAConfig(**LORA_CONFIG))
    for name, (state_dict, config) in llama_inputs["adapters"].items():
        lora.load_adapter(name, state_dict=state_dict, config=config)
    lora.set_batch(BATCH)
    with torch.no_grad():
        return model(llama_inputs["ids"].to(xla_device)).logits.cpu()


@pytest.fixture(scope="module")
def peft_logits(llama_inputs) -> torch.Tensor:
    """PEFT's own mixed-batch inference (``adapter_names``) on the host."""
    names = list(llama_inputs["adapters"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_base_llama(llama_inputs), llama_inputs["adapters"][names[0]][1], names[0])
        for name in names[1:]:
            model.add_adapter(name, llama_inputs["adapters"][name][1])
        for name in names:
            peft.set_peft_model_state_dict(model, llama_inputs["adapters"][name][0], adapter_name=name)
    rows = [name or "__base__" for name in BATCH]
    with torch.no_grad():
        return model.eval()(llama_inputs["ids"], adapter_names=rows).logits


def _expected_specs(fully: bool) -> dict[str, dict[str, tuple]]:
    """Partition spec of the base weight and LoRA buffers of one layer of each kind."""
    rank = "model" if fully else None
    column = {"weight": ("model", None), "lora_a": (None, rank, None), "lora_b": (None, None, "model")}
    row = {"weight": (None, "model"), "lora_a": (None, None, "model"), "lora_b": (None, None, None)}
    embedding = {"weight": ("model", None), "lora_a": (None, "model", None), "lora_b": (None, None, None)}
    return {"q_proj": column, "lm_head": column, "o_proj": row, "down_proj": row, "embed_tokens": embedding}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def spmd_llama(request, llama_inputs, tmp_path_factory) -> tuple[str, dict]:
    """(scenario, result) of the patched Llama on a mesh: warm-up, loads, a mixed batch, more mixes."""
    devices, shape, names, dp_axis, fully, fusion = SCENARIOS[request.param]
    inputs = dict(llama_inputs, mesh_shape=shape, axis_names=names, dp_axis=dp_axis, fully_sharded=fully)
    inputs["lora_config"] = {**LORA_CONFIG, "base_fusion": fusion}
    inputs["expected_specs"] = _expected_specs(fully)
    result = run_worker("llama", str(tmp_path_factory.mktemp(request.param)), inputs, devices)
    assert result["num_devices"] == devices
    return request.param, result


def test_spmd_logits_match_one_device(spmd_llama, one_device_logits):
    _, result = spmd_llama
    torch.testing.assert_close(result["logits"], one_device_logits, atol=SPMD_ATOL, rtol=SPMD_RTOL)


def test_spmd_logits_match_peft(spmd_llama, peft_logits):
    _, result = spmd_llama
    assert_close(result["logits"], peft_logits)


@pytest.mark.parametrize("layer", ["q_proj", "o_proj", "down_proj", "lm_head", "embed_tokens"])
def test_buffers_sharded_like_base_weight(spmd_llama, layer):
    _, result = spmd_llama
    assert result["specs_patched"][layer] == result["expected_spec_text"][layer]


def test_slot_writes_keep_sharding(spmd_llama):
    _, result = spmd_llama
    assert result["specs_loaded"] == result["specs_patched"]


def test_warmup_compiles_one_forward_and_one_slot_write(spmd_llama):
    _, result = spmd_llama
    assert result["warmup_compiles"] == 2  # one forward, one slot write


def test_no_recompile_across_adapter_mixes_and_loads(spmd_llama):
    _, result = spmd_llama
    assert result["compiles_after_warmup"] == 0


def test_serving_loop_copies_nothing_to_host(spmd_llama):
    _, result = spmd_llama
    assert result["loop_transfers_from_device"] == 0


# -- the same Llama under torch.compile(backend="openxla"), host-built metadata per shard ----------


def test_compiled_on_mesh_matches_one_device(spmd_llama, one_device_logits):
    _, result = spmd_llama
    torch.testing.assert_close(result["compiled"]["logits"], one_device_logits, atol=SPMD_ATOL, rtol=SPMD_RTOL)


def test_compiled_on_mesh_matches_peft(spmd_llama, peft_logits):
    _, result = spmd_llama
    assert_close(result["compiled"]["logits"], peft_logits)


def test_compiled_warmup_compiles_one_forward(spmd_llama):
    _, result = spmd_llama
    # The forward, and the slot write as it hashes after a compiled forward; the other slot-write
    # graph is the lazy run's, compiled earlier in the same worker process.
    assert result["compiled"]["warmup_compiles"] == 2


def test_compiled_no_recompile_across_adapter_mixes_and_loads(spmd_llama):
    _, result = spmd_llama
    assert (result["compiled"]["compiles_after_warmup"], result["compiled"]["graphs_after_warmup"]) == (0, 0)


def test_compiled_per_token_slots_match_one_device(spmd_llama, one_device_logits):
    _, result = spmd_llama
    torch.testing.assert_close(
        result["compiled"]["per_token_logits"], one_device_logits, atol=SPMD_ATOL, rtol=SPMD_RTOL
    )


def _expected_op_calls(scenario: str) -> collections.Counter:
    """(op, first argument's shape, base's shape) of every LoRA op of one traced forward, on local shard shapes."""
    devices, shape, names, dp_axis, fully, fusion = SCENARIOS[scenario]
    config = _llama_config()
    tp, dp = shape[-1], shape[0] if dp_axis else 1
    tokens, hidden, inner = len(BATCH) * 8 // dp, config["hidden_size"], config["intermediate_size"]
    rank = LORA_CONFIG["max_rank"]

    def column(out: int) -> list[tuple]:
        if fully:  # rank-split shrink, gathered, then the expand into the local columns
            return [("shrink", (tokens, hidden), None), ("expand", (tokens, rank), (tokens, out // tp))]
        if fusion:  # linear_lora on the local weight shard [out / tp, in]
            return [("linear+metadata", (tokens, hidden), (out // tp, hidden))]
        return [("fused+metadata", (tokens, hidden), (tokens, out // tp))]

    def row(inp: int) -> list[tuple]:
        if fusion:  # linear_lora on the local K slice of the weight [out, in / tp]
            return [("linear+metadata", (tokens, inp // tp), (hidden, inp // tp))]
        return [("fused+metadata", (tokens, inp // tp), (tokens, hidden))]

    layer = 3 * column(hidden) + row(hidden) + 2 * column(inner) + row(inner)
    head = column(config["vocab_size"])
    embedding = [("expand", (tokens, rank), (tokens, hidden))]
    return collections.Counter(config["num_hidden_layers"] * layer + head + embedding)


def test_compiled_layers_run_fused_op_with_host_metadata_on_local_shapes(spmd_llama):
    scenario, result = spmd_llama
    second = {"fused": 3, "fused+metadata": 3, "expand": 2, "linear": 1, "linear+metadata": 1}  # base / weight
    calls = collections.Counter(
        (op, shapes[0], shapes[second[op]] if op in second else None) for op, shapes in result["compiled"]["op_calls"]
    )
    expected = _expected_op_calls(scenario)
    # torch_xla's dynamo bridge runs the captured graph a few times while tracing: the same ops each time.
    passes = calls.total() // expected.total()
    assert passes >= 1 and calls == collections.Counter({call: passes * n for call, n in expected.items()})


def test_host_metadata_is_one_row_per_data_shard_split_over_the_data_axis(spmd_llama):
    scenario, result = spmd_llama
    _, shape, _, dp_axis, _, _ = SCENARIOS[scenario]
    checks = result["compiled"]["metadata"]
    assert checks
    dp = shape[0] if dp_axis else 1
    assert all(rows == dp and split and equal for (rows, _), split, equal in checks.values())


# -- single layers on 4 devices: the collectives of their compiled HLO ---------------------------


# -- scaled word embeddings (Gemma: a tensor embed_scale, XGLM: a float), in the layers worker -------

SCALED_KINDS = ("gemma", "xglm")


@pytest.fixture(scope="module")
def scaled(tmp_path_factory, xla_device) -> dict[str, tuple[dict, torch.Tensor, torch.Tensor]]:
    """kind -> (worker inputs, one-device logits, PEFT logits) of a small model with LoRA on its scaled
    word embedding and q_proj, two adapters and the base in one batch (see test_embed_scale.py)."""
    from test_embed_scale import BATCH, IDS, TARGETS, _models, _serve

    cases = {}
    for kind in SCALED_KINDS:
        clean, peft_model = _models(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notices about saving embedding layers
            adapters = {
                name: (peft.get_peft_model_state_dict(peft_model, adapter_name=name), peft_model.peft_config[name])
                for name in ("a", "b")
            }
        lora_config = {"max_loras": 2, "max_rank": 4, "target_modules": TARGETS}
        inputs = {"model": clean, "adapters": adapters, "lora_config": lora_config, "ids": IDS, "batch": BATCH}
        model = _serve(clean, peft_model, tmp_path_factory.mktemp(kind), xla_device)
        with torch.no_grad():
            one_device = model(IDS.to(xla_device)).logits.cpu()
            expected = peft_model(IDS, adapter_names=[name or "__base__" for name in BATCH]).logits
        cases[kind] = (inputs, one_device, expected)
    return cases


TOY_TOKENS = 16
TOY_IDS = torch.randint(0, 128, (TOY_TOKENS,), generator=torch.Generator().manual_seed(3))
TOY_TOKEN_ADAPTERS = ["a" if i % 3 else None for i in range(TOY_TOKENS)]
TOY_ROWS = ["default" if name else "__base__" for name in TOY_TOKEN_ADAPTERS]  # PEFT's adapter_names


@pytest.fixture(scope="module")
def toy_peft() -> tuple[Toy, peft.PeftModel]:
    """(the toy on the host, PEFT's model of it with one random adapter "default"): the reference."""
    torch.manual_seed(2)
    toy = Toy()
    config = peft.LoraConfig(
        target_modules=list(TOY_PLAN), init_lora_weights=False, r=8, lora_alpha=16, fan_in_fan_out=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out and embedding-saving notices
        return toy, peft.get_peft_model(copy.deepcopy(toy), config).eval()


# -- rank-true storage and quantized bases on a mesh (in the layers worker) ------------------------------

POOL_ROWS = 16  # a0 (rank 4) and a1 (8) fit, a2 (8) evicts one: every mix of MORE_BATCHES loads or evicts


def _pool_inputs(llama_inputs: dict) -> dict:
    """The Llama inputs with a memory budget of POOL_ROWS rank rows, and the pools' expected partition specs:
    each pool [1, rows, in or out] (A of the embedding: [1, vocab, rows]) split as its slot buffer."""
    model = _base_llama(llama_inputs)
    modules = [m for n, m in model.named_modules() if n.rpartition(".")[2] in TARGETS]
    row_bytes = sum(sum(m.weight.shape) for m in modules) * 4  # one float32 rank row of A and B, every layer
    budget = (POOL_ROWS + 2) * row_bytes  # + the zero and scratch rows
    specs = {
        short: {f"{name}_pool": spec for name, spec in layer.items() if name != "weight"}
        for short, layer in _expected_specs(False).items()
        if short != "down_proj"
    }
    return dict(llama_inputs, lora_config={**LORA_CONFIG, "memory_budget": budget}, pool_specs=specs)


@pytest.fixture(scope="module")
def int8_peft_logits(llama_inputs) -> torch.Tensor:
    """PEFT's mixed batch with every adapter's rank rows rounded to int8 by plain torch (test_pool's rounding)."""
    from test_pool import _int8_rounded

    names = list(llama_inputs["adapters"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_base_llama(llama_inputs), llama_inputs["adapters"][names[0]][1], names[0])
        for name in names[1:]:
            model.add_adapter(name, llama_inputs["adapters"][name][1])
        for name in names:
            peft.set_peft_model_state_dict(model, llama_inputs["adapters"][name][0], adapter_name=name)
        rounded = copy.deepcopy(model)
        for name in names:
            peft.set_peft_model_state_dict(rounded, _int8_rounded(model, name)[0], adapter_name=name)
    with torch.no_grad():
        return rounded.eval()(llama_inputs["ids"], adapter_names=[n or "__base__" for n in BATCH]).logits


QUANTIZED_SCHEMES = ("asymmetric", "blockwise")  # per channel with zero points; blockwise (16 inputs a block)
QUANTIZED_ROWS = ["a", None, "b", "a"]
#: scheme -> its LoRAConfig: the per-channel base with its adapters in a rank-true pool, the blockwise in slots.
QUANTIZED_CONFIGS = {
    "asymmetric": {"max_loras": 2, "max_rank": 8, "memory_budget": 10**6},
    "blockwise": {"max_loras": 2, "max_rank": 8},
}


def _quantized_specs(scheme: str) -> dict[str, dict[str, tuple]]:
    """The int8 weight and scales of a column (q_proj) and a row (o_proj) layer, split as the float weight."""
    if scheme == "blockwise":  # weight [in / bs, bs, out], scales [in / bs, out]
        column = {"weight": (None, None, "model"), "weight_scaler": (None, "model"), "zero_point": (None, "model")}
        row = {"weight": ("model", None, None), "weight_scaler": ("model", None), "zero_point": ("model", None)}
    else:  # weight [out, in], scales and zero points [out]
        column = {"weight": ("model", None), "weight_scaler": ("model",), "zero_point": ("model",)}
        row = {"weight": (None, "model"), "weight_scaler": (None,), "zero_point": (None,)}
    return {"q_proj": column, "o_proj": row}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, xla_device) -> dict[str, tuple[dict, torch.Tensor, torch.Tensor]]:
    """scheme -> (worker inputs, one-device logits, PEFT's logits on the dequantized float model) of
    test_quantized_base's tiny Llama with torch_xla int8 projections, two adapters and a base row."""
    import test_quantized_base as tq

    cases = {}
    ids = torch.randint(0, 64, (len(QUANTIZED_ROWS), 6), generator=torch.Generator().manual_seed(0))
    for scheme in QUANTIZED_SCHEMES:
        model, dequantized = tq._quantized_and_float(scheme)
        peft_model = tq._peft(copy.deepcopy(dequantized), tmp_path_factory.mktemp(scheme))
        adapters = {
            name: (peft.get_peft_model_state_dict(peft_model, adapter_name=name), peft_model.peft_config[name])
            for name in tq.ADAPTERS
        }
        specs = {
            short: {k: v for k, v in spec.items() if scheme != "blockwise" or k != "zero_point"}
            for short, spec in _quantized_specs(scheme).items()
        }  # (the blockwise layers here are symmetric: no zero point)
        inputs = {
            "model": model,
            "adapters": adapters,
            "lora_config": QUANTIZED_CONFIGS[scheme],
            "ids": ids,
            "batch": QUANTIZED_ROWS,
            "expected_specs": specs,
            "placed": {"q_proj": "model.layers.0.self_attn.q_proj", "o_proj": "model.layers.1.self_attn.o_proj"},
        }
        one = copy.deepcopy(model).to(xla_device)
        lora = tl.patch_model(one, tl.LoRAConfig(**QUANTIZED_CONFIGS[scheme]))
        for name, (state_dict, config) in adapters.items():
            lora.load_adapter(name, state_dict=state_dict, config=config)
        lora.set_batch(QUANTIZED_ROWS)
        with torch.no_grad():
            one_device = one(ids.to(xla_device)).logits.cpu()
            expected = peft_model(ids, adapter_names=[r or "__base__" for r in QUANTIZED_ROWS]).logits
        cases[scheme] = (inputs, one_device, expected)
    return cases


@pytest.fixture(scope="module")
def spmd_layers(llama_inputs, scaled, quantized, toy_peft, tmp_path_factory) -> dict:
    toy, adapter = toy_peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embedding-saving notices
        adapter_state = peft.get_peft_model_state_dict(adapter)
    workdir = tmp_path_factory.mktemp("layers")
    inputs = {
        "toy_state": toy.state_dict(),
        "adapter": (adapter_state, adapter.peft_config["default"]),
        "ids": TOY_IDS,
        "token_adapters": TOY_TOKEN_ADAPTERS,
        "dump_dir": str(workdir / "hlo"),
        "llama": llama_inputs,
        "scaled": {kind: scaled[kind][0] for kind in SCALED_KINDS},
        "pool": _pool_inputs(llama_inputs),
        "quantized": {scheme: quantized[scheme][0] for scheme in QUANTIZED_SCHEMES},
    }
    return run_worker("layers", str(workdir), inputs, devices=4, dump_hlo=True)


def _collectives(result: dict, layer: str, fully: bool, with_lora: bool) -> dict[str, int]:
    return result["collectives"][(layer, fully, with_lora)]


@pytest.mark.parametrize("variant", [False, "fused"], ids=["separate", "base-fusion"])
def test_row_parallel_layer_reduces_once(spmd_layers, variant):
    counts = _collectives(spmd_layers, "down", variant, True)
    assert counts == {**dict.fromkeys(counts, 0), "all-reduce": 1}


@pytest.mark.parametrize("variant", [False, "fused"], ids=["separate", "base-fusion"])
def test_row_parallel_lora_adds_no_collective(spmd_layers, variant):
    assert _collectives(spmd_layers, "down", variant, True) == _collectives(spmd_layers, "down", False, False)


@pytest.mark.parametrize("variant", ["lora", "lora-fused"], ids=["separate", "base-fusion"])
def test_lora_adds_no_collective_to_the_llama_forward(spmd_layers, variant):
    counts = spmd_layers["model_collectives"]
    assert counts[variant] == counts["base"]


def test_collective_count_sees_what_the_partitioner_adds(spmd_layers):
    # The control: the one-device LoRA forward on the same sharded buffers reduces [T, R] on its own.
    partitioner = spmd_layers["collectives"]["down/partitioner"]
    assert partitioner["all-reduce"] > _collectives(spmd_layers, "down", False, True)["all-reduce"]


@pytest.mark.parametrize("variant", [False, "fused"], ids=["separate", "base-fusion"])
@pytest.mark.parametrize("layer", ["up", "head", "mix"])
def test_column_parallel_or_replicated_lora_adds_no_collective(spmd_layers, layer, variant):
    counts = _collectives(spmd_layers, layer, variant, True)
    assert counts == _collectives(spmd_layers, layer, False, False)
    assert not any(counts.values())


def test_vocab_parallel_embedding_lora_adds_no_collective(spmd_layers):
    assert _collectives(spmd_layers, "embed", False, True) == _collectives(spmd_layers, "embed", False, False)


def test_fully_sharded_column_gathers_only_the_rank_intermediate(spmd_layers):
    counts = _collectives(spmd_layers, "up", True, True)
    assert counts == {**dict.fromkeys(counts, 0), "all-gather": 1}


@pytest.mark.parametrize(
    "layer, fully",
    [("embed", False), ("mix", False), ("up", False), ("down", False), ("head", False), ("up", True), ("head", True)]
    + [(layer, "fused") for layer in ("mix", "up", "down", "head")],
)
def test_sharded_layer_matches_peft(spmd_layers, toy_peft, layer, fully):
    """Each layer alone on the mesh against PEFT's layer (mixed batch) on the same input: a wrong shard,
    a reduce missing or done twice, or LoRA on the wrong tokens shows here."""
    x, actual = spmd_layers["layer_outputs"][(layer, fully)]
    with torch.no_grad():
        expected = getattr(toy_peft[1].base_model.model, layer)(x, adapter_names=TOY_ROWS)
    torch.testing.assert_close(actual, expected, atol=SPMD_ATOL, rtol=SPMD_RTOL)


@pytest.mark.parametrize(
    "variant",
    [False, True, "pallas", "fused", "pallas-fused"],
    ids=["tp", "fully-sharded", "pallas", "base-fusion", "pallas-base-fusion"],
)
def test_sharding_plan_hook_shards_a_custom_model(spmd_layers, toy_peft, variant):
    with torch.no_grad():
        expected = toy_peft[1](TOY_IDS, adapter_names=TOY_ROWS)
    torch.testing.assert_close(spmd_layers["model_outputs"][variant], expected, atol=SPMD_ATOL, rtol=SPMD_RTOL)


def test_adapters_in_float32_on_a_bfloat16_model(spmd_layers, toy_peft):
    """Against PEFT's toy in float64 with the base weights rounded to bf16 and the adapter as loaded
    (float32). The bf16 activations differ from it by about one bf16 step at the largest logit (0.5% of
    it here); LoRA moves the adapter's rows by about as much as the largest logit, so 2**-6 of it is tight."""
    actual = spmd_layers["model_outputs"]["bf16"]
    assert actual.dtype == torch.bfloat16
    model = copy.deepcopy(toy_peft[1])
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data = (param if "lora_" in name else param.to(torch.bfloat16)).double()
        expected = model(TOY_IDS, adapter_names=TOY_ROWS)
    torch.testing.assert_close(actual.double(), expected, atol=2**-6 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", SCALED_KINDS)
def test_scaled_embedding_on_mesh_matches_one_device(spmd_layers, scaled, kind):
    placement, logits = spmd_layers["scaled_embedding"][kind]
    assert placement == "vocab"  # the embedding runs the per-shard lookup region
    torch.testing.assert_close(logits, scaled[kind][1], atol=SPMD_ATOL, rtol=SPMD_RTOL)


@pytest.mark.parametrize("kind", SCALED_KINDS)
def test_scaled_embedding_on_mesh_matches_peft(spmd_layers, scaled, kind):
    assert_close(spmd_layers["scaled_embedding"][kind][1], scaled[kind][2])


def test_lora_dimension_not_dividing_over_the_axis_raises(spmd_layers):
    assert "'0': column-parallel dimension 6 does not divide into 4 shards" in spmd_layers["divisibility_error"]


# -- rank-true storage on a mesh (the layers worker, (4,)) -------------------------------------------------


def test_pools_are_sharded_as_the_slot_buffers_they_stand_for(spmd_layers):
    """Column layers' B pool split on out, row layers' A pool on in, the embedding's A pool on the vocabulary;
    the rest replicated: after patching and after loads and evictions."""
    for specs in (spmd_layers["pool"]["specs"], spmd_layers["pool"]["specs_loaded"]):
        assert len(specs) == 8
        for actual, expected in specs.values():
            assert actual == expected


def test_every_layer_on_a_mesh_reads_its_pools_without_gathering(spmd_layers):
    """On a mesh every layer of the pooled Llama reads its lanes' true-rank rows from its pools on each shard, none
    gathers them into slots (``xla_lora::sharded_gather_slots``): column, vocab and replicated layers in
    ``sharded_pooled_lora``, row-parallel ones (o_proj, down_proj) in ``sharded_pooled_row_linear`` (their LoRA
    partial sharing the base's one reduction), the embedding in ``sharded_embedding`` (A per token, B by
    ``pooled_expand``)."""
    reads = spmd_layers["pool"]["pool_reads"]
    assert reads["sharded_gather_slots"] == []
    layers = {name.rsplit(".", 1)[0] for names in reads.values() for name in names}
    assert layers == set(spmd_layers["pool"]["patched_layers"])
    for op, names in reads.items():
        kinds = {name.rsplit(".", 1)[0].rsplit(".", 1)[-1] for name in names}
        expected = {
            "sharded_gather_slots": set(),
            "sharded_pooled_lora": {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"},
            "sharded_pooled_linear_lora": set(),  # (base_fusion)
            "sharded_pooled_row_linear": {"o_proj", "down_proj"},
            "sharded_embedding": {"embed_tokens"},
            "sharded_grouped_matmul": set(),  # no experts in a Llama
        }[op]
        assert kinds == expected, op
        assert all(
            f"{layer}.lora_a_pool" in names and f"{layer}.lora_b_pool" in names
            for layer in {name.rsplit(".", 1)[0] for name in names}
        ), op


def test_linear_layers_on_a_mesh_pass_the_batch_page_table_and_kept_page_scales(spmd_layers):
    """The pooled linear regions hand each shard's pooled op what one device's gets: the batch's host-built page
    table (every pooled layer, float and int8 pools) and an int8 pool's kept page scales (``lora_page_scale``), so
    on a TPU the kernel neither derives the table from the row table nor multiplies the two scale arrays over every
    row of the pool each call (the int8 logits read through those kept scales:
    ``test_int8_pools_on_a_mesh_match_peft_on_int8_rounded_factors``)."""
    linear_ops = ("sharded_pooled_lora", "sharded_pooled_row_linear")
    for key, expected in (("pool_reads", {"lora_a_pool", "lora_b_pool", "pages"}), ("int8_pool_reads", None)):
        reads = spmd_layers["pool"][key]
        expected = expected or {"lora_a_pool", "lora_b_pool", "pages", "lora_page_scale"}
        passed = spmd_worker.reads_by_layer(name for op in linear_ops for name in reads[op])
        assert set(passed) == set(spmd_layers["pool"]["patched_layers"]) - {"model.embed_tokens"}, key
        for layer, what in passed.items():
            assert what == expected, (key, layer)


@pytest.mark.parametrize("mode", ["lazy", "compiled"])
def test_pooled_adapters_on_a_mesh_match_one_device_and_peft(spmd_layers, one_device_logits, peft_logits, mode):
    """Ranks 4 and 8 and a base row from a memory budget's pools on (4,): the one-device logits of the same
    adapters (padded slots; a pool gathers the same values, test_pool.py) to 1e-5, and PEFT's."""
    result = spmd_layers["pool"] if mode == "lazy" else spmd_layers["pool"]["compiled"]
    torch.testing.assert_close(result["logits"], one_device_logits, atol=SPMD_ATOL, rtol=SPMD_RTOL)
    assert_close(result["logits"], peft_logits)


def test_base_fusion_on_a_mesh_reads_the_pools_in_the_one_pass_op(spmd_layers, one_device_logits, peft_logits):
    """With ``base_fusion`` and a memory budget each shard runs base and LoRA in one op reading the pools
    (``linear_lora_pooled``): column, vocab and replicated layers in ``sharded_pooled_linear_lora``, row layers in
    ``sharded_pooled_row_linear`` (their base partial and LoRA in one op, then the one reduction), none gathering
    its lanes into slots; the logits equal one device's (1e-5) and PEFT's."""
    result = spmd_layers["pool"]
    torch.testing.assert_close(result["fused_logits"], one_device_logits, atol=SPMD_ATOL, rtol=SPMD_RTOL)
    assert_close(result["fused_logits"], peft_logits)
    reads = result["fused_pool_reads"]
    assert reads["sharded_gather_slots"] == [] and reads["sharded_pooled_lora"] == []
    kinds = {
        op: {name.rpartition(".")[0].rpartition(".")[2] for name in reads[op]}
        for op in ("sharded_pooled_linear_lora", "sharded_pooled_row_linear")
    }
    assert kinds == {
        "sharded_pooled_linear_lora": {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"},
        "sharded_pooled_row_linear": {"o_proj", "down_proj"},
    }
    assert {name.rpartition(".")[2] for name in reads["sharded_pooled_linear_lora"]} == {
        "lora_a_pool", "lora_b_pool", "pages"
    }  # fmt: skip


def test_int8_pools_on_a_mesh_match_peft_on_int8_rounded_factors(spmd_layers, int8_peft_logits, peft_logits):
    logits = spmd_layers["pool"]["int8_logits"]
    assert_close(logits, int8_peft_logits)
    assert not torch.allclose(logits, peft_logits, atol=1e-4)  # int8 rows were read, not float ones


@pytest.mark.parametrize("mode", ["lazy", "compiled"])
def test_pooled_loads_and_evictions_on_a_mesh_compile_nothing_after_warmup(spmd_layers, mode):
    result = spmd_layers["pool"] if mode == "lazy" else spmd_layers["pool"]["compiled"]
    assert result["warmup_compiles"] == 2  # one forward, one row write
    assert result["compiles_after_warmup"] == 0
    if mode == "lazy":
        assert spmd_layers["pool"]["evictions"] > 0 and result["loop_transfers_from_device"] == 0
    else:
        assert result["graphs_after_warmup"] == 0


def test_pooled_lora_adds_no_collective(spmd_layers):
    """Each shard gathers its batch's rows from its own slice of the pools: the forward's collectives with a
    mixed batch are the base model's."""
    assert spmd_layers["pool"]["collectives"] == spmd_layers["model_collectives"]["base"]  # the same Llama and ids


def test_fully_sharded_with_a_memory_budget_is_refused(spmd_layers):
    error = spmd_layers["pool"]["fully_sharded_error"]
    assert "fully_sharded" in error and "memory_budget" in error


# -- torch_xla quantized bases on a mesh (the layers worker, (2, 2) data x model) ------------------------------


@pytest.mark.parametrize("mode", ["lazy", "compiled"])
@pytest.mark.parametrize("scheme", QUANTIZED_SCHEMES)
def test_quantized_base_on_a_mesh_matches_one_device_and_peft(spmd_layers, quantized, scheme, mode):
    """int8 projections (per channel with zero points, or blockwise), two adapters and a base row on a
    (2, 2) data x model mesh: the one-device logits (1e-5) and PEFT's on the dequantized float model."""
    _, one_device, expected = quantized[scheme]
    result = spmd_layers["quantized"][scheme]
    logits = result["logits"] if mode == "lazy" else result["compiled_logits"]
    torch.testing.assert_close(logits, one_device, atol=SPMD_ATOL, rtol=SPMD_RTOL)
    assert_close(logits, expected)


@pytest.mark.parametrize("scheme", QUANTIZED_SCHEMES)
def test_quantized_weights_and_scales_are_sharded_as_the_float_weight(spmd_layers, scheme):
    specs = spmd_layers["quantized"][scheme]["specs"]
    assert len(specs) == (6 if scheme == "asymmetric" else 4)
    for actual, expected in specs.values():
        assert actual == expected


def test_quantized_row_layers_on_a_mesh_read_their_pools_without_gathering(spmd_layers):
    """With a memory budget, a quantized base's row-parallel layers run torch_xla's quantized matmul per shard in
    the pooled row region (its LoRA partial from the pools at true rank, reduced with the base's), as its column
    layers read theirs in the column region: no layer gathers its lanes into slots (the logits are
    ``test_quantized_base_on_a_mesh_matches_one_device_and_peft``'s, pooled on one device too)."""
    reads = spmd_layers["quantized"]["asymmetric"]["pool_reads"]
    assert reads["sharded_gather_slots"] == []
    rows = {name.rpartition(".")[0] for name in reads["sharded_pooled_row_linear"]}
    assert rows == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.o_proj", "mlp.down_proj")}
    assert reads["sharded_pooled_lora"]


def test_lora_on_a_quantized_base_adds_no_collective(spmd_layers):
    """With a batch, row layers run torch_xla's quantized matmul per shard in the region and reduce once; the
    base alone (no batch) is left to the partitioner, which reduces the zero-point term apart: at most as many."""
    counts = spmd_layers["quantized"]["asymmetric"]["collectives"]
    assert all(counts["lora"][op] <= counts["base"][op] for op in counts["base"])
    assert counts["lora"]["all-reduce"] >= 4  # one per row layer (o_proj, down_proj of 2 layers) at least


def test_serving_steps_on_a_mesh_compile_nothing_after_warmup(spmd_layers):
    """serving.Steps (prefill and decode, compiled) on a mesh with a vocab-parallel head: repeated calls compile
    nothing after warm-up (the logits are replicated inside the graph); the control, a compiled step returning
    the vocabulary-sharded logits, compiles a gather graph at each of its two fetches."""
    result = spmd_layers["serving"]
    assert result["shapes"] == ((128,), (2, 128))
    assert result["compiles_after_warmup"] == 0
    assert result["sharded_fetch_compiles"] >= 2


# -- training on a mesh: gradients through the per-shard regions (one worker process) ------------------

GRAD_SLOTS = 3  # two adapters: one slot stays unused and must get exact zeros
GRAD_BATCH = ["a", None, "b", "a"]  # rows of two adapters (ranks 8 and 4: padded ranks) and a base row
GRAD_SEQ = 4
# name -> (mesh shape over ("data", "model"), dp_axis, fully_sharded, base_fusion, trainable adapters)
GRAD_VARIANTS = {
    "dp2xtp2": ((2, 2), "data", False, False, False),
    "dp2xtp2-base-fusion": ((2, 2), "data", False, True, False),
    "tp4-fully-sharded": ((1, 4), None, True, False, False),
    "dp2xtp2-trainable": ((2, 2), "data", False, True, True),
}


# variant -> the region ops whose first call in its step the worker opchecks: every branch of each region
# once (the separate path and the backward regions; base fusion; fully sharded column layers)
OPCHECK_CALLS = {
    "dp2xtp2": (
        "sharded_linear",
        "sharded_row_linear",
        "sharded_embedding",
        "sharded_linear_backward",
        "sharded_row_linear_backward",
        "sharded_embedding_backward",
    ),
    "dp2xtp2-base-fusion": ("sharded_linear_lora", "sharded_row_linear", "sharded_linear_lora_backward"),
    "tp4-fully-sharded": ("sharded_linear", "sharded_linear_backward"),
}


@pytest.fixture(scope="module")
def grads_peft(toy_peft) -> peft.PeftModel:
    """PEFT's toy with two random adapters "a" (r=8) and "b" (r=4, another alpha), in float64, eval mode."""
    toy, _ = toy_peft
    torch.manual_seed(4)
    common = {"target_modules": list(TOY_PLAN), "init_lora_weights": False, "fan_in_fan_out": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out and embedding-saving notices
        model = peft.get_peft_model(copy.deepcopy(toy), peft.LoraConfig(r=8, lora_alpha=16, **common), "a")
        model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=12, **common))
    return model.double().eval()


@pytest.fixture(scope="module")
def spmd_grads(toy_peft, grads_peft, tmp_path_factory) -> tuple[dict, dict]:
    """(worker inputs, result) of the gradient scenario: every variant of GRAD_VARIANTS in one process."""
    toy, _ = toy_peft
    generator = torch.Generator().manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embedding-saving notices
        adapters = {
            name: (
                {k: v.float() for k, v in peft.get_peft_model_state_dict(grads_peft, adapter_name=name).items()},
                grads_peft.peft_config[name],
            )
            for name in ("a", "b")
        }
    workdir = tmp_path_factory.mktemp("grads")
    inputs = {
        "toy_state": toy.state_dict(),
        "adapters": adapters,
        "max_loras": GRAD_SLOTS,
        "batch": GRAD_BATCH,
        "ids": torch.randint(0, 128, (len(GRAD_BATCH), GRAD_SEQ), generator=generator),
        "loss_weights": torch.randn(len(GRAD_BATCH), GRAD_SEQ, 128, generator=generator),
        "variants": GRAD_VARIANTS,
        "compiled_variant": "dp2xtp2-trainable",
        "opcheck": OPCHECK_CALLS,
        "dump_dir": str(workdir / "hlo"),
    }
    return inputs, run_worker("grads", str(workdir), inputs, devices=4, dump_hlo=True)


def _reference_grads(inputs: dict, variant: dict) -> dict:
    """Float64 plain-torch gradients of the toy's loss with each token's slot factors (as the worker's
    slots held them, scaling folded into B), the slots the batch read, none of the library's code."""
    state = {k: v.double().requires_grad_(k in spmd_worker.TRAINED_BASE) for k, v in inputs["toy_state"].items()}
    factors = {
        n: (a.double().requires_grad_(), b.double().requires_grad_()) for n, (a, b) in variant["factors"].items()
    }
    ids = inputs["ids"].reshape(-1)
    slots = variant["slots"].long().repeat_interleave(GRAD_SEQ)
    used = ((slots >= 0) & (slots < GRAD_SLOTS))[:, None]
    slot = slots.clamp(0, GRAD_SLOTS - 1)

    def lora(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = factors[name]
        s = a[slot, ids] if name == "embed" else torch.einsum("nri,ni->nr", a[slot], x)  # embed: A [L, V, R]
        return y + torch.einsum("nr,nro->no", torch.where(used, s, 0), b[slot])

    embedded = lora("embed", None, state["embed.weight"][ids])
    h = lora("mix", embedded, embedded @ state["mix.weight"].T + state["mix.bias"])
    h = torch.relu(lora("up", h, h @ state["up.weight"].T + state["up.bias"]))
    h = lora("down", h, h @ state["down.weight"] + state["down.bias"])  # Conv1D: weight [in, out]
    logits = lora("head", h, h @ state["head.weight"].T)
    loss = (logits.reshape(inputs["loss_weights"].shape) * inputs["loss_weights"].double()).sum()
    keys = [("base", k) for k in spmd_worker.TRAINED_BASE]
    keys += [(kind, n) for n in factors for kind in ("lora_a", "lora_b")]
    tensors = [state[k] for k in spmd_worker.TRAINED_BASE]
    tensors += [factors[n][i] for n in factors for i in (0, 1)]
    d_embedded, *grads = torch.autograd.grad(loss, [embedded, *tensors])
    expected = dict(zip(keys, grads, strict=True))
    return expected | {"loss": loss, "d_embedded": d_embedded.reshape(len(GRAD_BATCH), GRAD_SEQ, -1)}


@pytest.mark.parametrize("variant", [v for v in GRAD_VARIANTS if not GRAD_VARIANTS[v][4]])
def test_mesh_gradients_match_float64_math(spmd_grads, variant):
    """d x (the embedding output), d lora_a / d lora_b of every layer (embedding, replicated, column, row,
    vocab head) and d of trained base tensors (column weight and bias, row Conv1D weight, replicated weight,
    the vocab-parallel embedding table) on the mesh, against float64 math on the host."""
    inputs, result = spmd_grads
    actual = result["variants"][variant]
    expected = _reference_grads(inputs, actual)
    assert_close(actual["loss"], expected["loss"], torch.float32)
    assert_close(actual["d_embedded"], expected["d_embedded"], torch.float32)
    assert set(actual["grads"]) == set(expected) - {"loss", "d_embedded"}
    for key, grad in actual["grads"].items():
        assert grad.shape == expected[key].shape, key
        assert_close(grad, expected[key], torch.float32)


@pytest.mark.parametrize("variant", [v for v in GRAD_VARIANTS if not GRAD_VARIANTS[v][4]])
def test_mesh_gradients_of_unused_slots_and_padded_ranks_are_exact_zeros(spmd_grads, variant):
    inputs, result = spmd_grads
    actual = result["variants"][variant]
    slots = actual["slots"].tolist()
    unused = [s for s in range(GRAD_SLOTS) if s not in slots]
    slot_b = slots[GRAD_BATCH.index("b")]
    assert unused and slot_b >= 0
    for (kind, name), grad in actual["grads"].items():
        if kind == "base":
            continue
        assert torch.count_nonzero(grad[unused]) == 0, (kind, name)
        rank_dim = 2 if (kind, name) == ("lora_a", "embed") else 1  # the embedding's A is token-major
        padded = grad[slot_b].narrow(rank_dim - 1, 4, grad.shape[rank_dim] - 4)  # adapter b has rank 4
        assert torch.count_nonzero(padded) == 0, (kind, name)
        assert torch.count_nonzero(grad[slot_b]) > 0, (kind, name)  # and the test can see a gradient


def _added_collectives(variant: str) -> tuple[collections.Counter, collections.Counter]:
    """(added, removed): the collectives the LoRA step's graph has that the base step's (data-parallel alike)
    has not, and the converse, as docs/distributed.md ("Training on a mesh") lists them: each slot tensor's
    gradient summed once over the axes whose shards computed parts of it, column layers' rank gradient
    [N / dp, R] summed over the model axis (separate path), fully sharded column layers' gathers."""
    shape, dp_axis, fully, fusion, _ = GRAD_VARIANTS[variant]
    dp, tp = (shape[0] if dp_axis else 1), shape[1]
    n, slots, rank, hidden, inner, vocab = len(GRAD_BATCH) * GRAD_SEQ // dp, GRAD_SLOTS, 8, 64, 128, 128
    added, removed = collections.Counter(), collections.Counter()

    def summed(shape: tuple[int, ...], over_model: bool = False) -> None:
        if dp > 1 or (over_model and tp > 1):
            added[("all-reduce", shape)] += 1

    summed((slots, vocab // tp, rank))  # embedding: A, split on the vocabulary
    summed((slots, rank, hidden), over_model=True)  # embedding: B, replicated (each token's A row on one shard)
    summed((slots, rank, hidden))  # replicated layer (mix): A
    summed((slots, rank, hidden))  # and B
    summed((slots, rank, inner // tp))  # row layer (down): A, split on the input features
    summed((slots, rank, hidden), over_model=True)  # and B, replicated
    for out in (inner, vocab):  # column layers (up, head)
        summed((slots, rank // tp if fully else rank, hidden), over_model=fusion)  # A (fused: from partial ds)
        summed((slots, rank, out // tp))  # B, split on the output features
        if not fusion:
            added[("all-reduce", (n, rank))] += 1  # the rank gradient ds, summed over the column shards
        if fully:
            added[("all-gather", (n, rank))] += 2  # the whole shrink: the forward's, and again for dB
            added[("all-gather", (slots, rank, hidden))] += 1  # the whole A for dx
    if dp > 1:  # the embedding table's own data-parallel reduction, done per vocabulary shard in the region
        added[("all-reduce", (vocab // tp, hidden))] += 1
        removed[("all-reduce", (vocab, hidden))] += 1
    return added, removed


@pytest.mark.parametrize("variant", [v for v in GRAD_VARIANTS if not GRAD_VARIANTS[v][4]])
def test_lora_backward_adds_only_the_reduction_of_replicated_gradients(spmd_grads, variant):
    """The collectives of the compiled training step (forward and backward, after SPMD partitioning), against
    the same step of the base model alone (its ids split over the data axis as the regions split the tokens):
    LoRA adds exactly the listed rank- and slot-sized reductions (and gathers for fully_sharded), no
    activation-sized collective, and removes nothing but the embedding table's whole-vocabulary reduction."""
    _, result = spmd_grads
    shape, dp_axis, *_ = GRAD_VARIANTS[variant]
    lora = collections.Counter(result["variants"][variant]["collectives"])
    base = collections.Counter(result["base_collectives"][(shape, dp_axis)])
    assert base  # the counting sees the base step's own reductions (row layers, data-parallel weights)
    assert (lora - base, base - lora) == _added_collectives(variant)


def _peft_step_grads(model: peft.PeftModel, inputs: dict) -> dict:
    """PEFT's own float64 gradients of the toy's loss for the mixed batch (``adapter_names``, eval mode):
    (adapter, PEFT state-dict key) -> gradient, and "d_embedded" (the embedding output's)."""
    model, params = copy.deepcopy(model), {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        for adapter in ("a", "b"):
            if adapter in parts:  # PEFT trains its active adapter only: both here, as the mesh does
                params[(adapter, ".".join(part for part in parts if part != adapter))] = param.requires_grad_()
    captured = []
    hook = model.base_model.model.embed.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        rows = [name or "__base__" for name in GRAD_BATCH]
        logits = model(inputs["ids"], adapter_names=rows)
    finally:
        hook.remove()
    loss = (logits * inputs["loss_weights"].double()).sum()
    d_embedded, *grads = torch.autograd.grad(loss, [captured[0], *params.values()])
    return dict(zip(params, grads, strict=True)) | {"loss": loss, "d_embedded": d_embedded}


def test_trainable_adapters_on_a_mesh_match_peft_gradients(spmd_grads, grads_peft):
    """Trainable adapters (``load_adapter(trainable=True)``: parameters put into the slots in the graph by
    ``slot_factors()``) on the (data, model) mesh with base fusion: the gradients of ``trainable_parameters``
    of both adapters, keyed as PEFT keys them, and of the embedding output equal PEFT's own, float64."""
    inputs, result = spmd_grads
    actual = result["variants"]["dp2xtp2-trainable"]
    expected = _peft_step_grads(grads_peft, inputs)
    assert set(actual["grads"]) == set(expected) - {"loss", "d_embedded"}
    assert_close(actual["loss"], expected["loss"], torch.float32)
    assert_close(actual["d_embedded"], expected["d_embedded"], torch.float32)
    for key, grad in actual["grads"].items():
        assert grad.shape == expected[key].shape, key
        assert_close(grad, expected[key], torch.float32)


def test_compiled_training_step_on_a_mesh_matches_peft(spmd_grads, grads_peft):
    """The same trainable step under ``torch.compile(backend="openxla")`` and ``loss.backward()``: one dynamo
    graph, no graph break (the regions and their backward regions are opaque nodes), PEFT's gradients."""
    inputs, result = spmd_grads
    compiled = result["variants"]["dp2xtp2-trainable"]["compiled"]
    expected = _peft_step_grads(grads_peft, inputs)
    assert (compiled["graph_breaks"], compiled["graphs"]) == (0, 1)
    assert_close(compiled["loss"], expected["loss"], torch.float32)
    for key, grad in compiled["grads"].items():
        assert_close(grad, expected[key], torch.float32)


def test_what_the_mesh_cannot_train_yet_raises(spmd_grads):
    """Typed errors, not a silently different training: trainable adapters' lora_dropout (the regions do not
    drop the LoRA input), an embedding table trained with scale_grad_by_freq (the region's gradient ignores it)."""
    _, result = spmd_grads
    errors = result["variants"]["dp2xtp2-trainable"]["refusals"]
    assert "lora_dropout of trainable adapters is not applied on a mesh" in errors["dropout"]
    assert "scale_grad_by_freq or sparse gradient is not supported on a mesh" in errors["freq"]


def test_region_ops_pass_opcheck_on_a_mesh(spmd_grads, spmd_layers):
    """``torch.library.opcheck`` (schema, fake implementation, AOT dispatch with dynamic shapes: forward and,
    where inputs require grad, gradients) of every per-shard region op and backward region op, on the
    arguments a real step passed it on the mesh (the workers record each op's first call: the toy's
    training step per variant of OPCHECK_CALLS and the pooled Llama forward; the expert regions in
    test_sharding_moe.py). torch's
    autograd-registration check is not implemented for XLA tensors and a region runs on a mesh only: the
    regions' autograd is checked by the gradient tests above. A backward region's own gradient (double
    backward) is not implemented, nor a gradient of the pooled regions (serving only: a layer reads its pools in
    place only where autograd records none): they are checked on detached arguments."""
    checks = spmd_grads[1]["opcheck"] | spmd_layers["pool"]["opcheck"]
    checks = {call: error for call, error in checks.items() if call != "seconds"}
    assert {call: error for call, error in checks.items() if error} == {}
    # The expert regions are checked in test_sharding_moe.py, on the MoE worker's calls.
    assert {op for op, _ in checks} == set(spmd_worker.REGION_OPS) - set(spmd_worker.MOE_REGION_OPS)


# -- plans and argument checks (no SPMD needed) -------------------------------------------------


@pytest.fixture(scope="module")
def one_device_mesh():
    import torch_xla.distributed.spmd as xs

    return xs.Mesh(np.arange(1), (1,), ("model",))


def test_default_plan_for_llama(llama_inputs):
    plan = sharding.default_plan(_base_llama(llama_inputs))
    layer = "model.layers.0."
    assert {name: plan[layer + name] for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj")} == {
        "self_attn.q_proj": "column",
        "self_attn.o_proj": "row",
        "mlp.up_proj": "column",
    }
    assert (plan["lm_head"], plan["model.embed_tokens"], plan[layer + "mlp.down_proj"]) == ("vocab", "vocab", "row")


def test_plan_mapping_matches_dotted_suffix_longest_first(one_device_mesh):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    kinds = sharding.plan_model(model, {}, one_device_mesh, "model", plan={"0": "column", "1.0": "row"}).kinds
    assert kinds == {"0": "column", "1.0": "row"}


def test_plan_callable(one_device_mesh):
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4))
    plan = lambda name, module: "vocab" if isinstance(module, nn.Embedding) else None
    assert sharding.plan_model(model, {}, one_device_mesh, "model", plan=plan).kinds == {"0": "vocab"}


def test_plan_key_matching_nothing_raises(one_device_mesh):
    with pytest.raises(sharding.ShardingError, match=r"keys \['proj'\] match no linear or embedding module"):
        sharding.plan_model(nn.Sequential(nn.Linear(4, 4)), {}, one_device_mesh, "model", plan={"proj": "row"})


def test_plan_unknown_kind_raises(one_device_mesh):
    with pytest.raises(sharding.ShardingError, match="kind must be one of .* got 'rows'"):
        sharding.plan_model(nn.Sequential(nn.Linear(4, 4)), {}, one_device_mesh, "model", plan={"0": "rows"})


def test_row_parallel_embedding_raises(one_device_mesh):
    with pytest.raises(sharding.ShardingError, match="embedding '0' can be 'vocab' or 'replicated', got 'row'"):
        sharding.plan_model(nn.Sequential(nn.Embedding(8, 4)), {}, one_device_mesh, "model", plan={"0": "row"})


def test_axis_not_in_mesh_raises(one_device_mesh):
    with pytest.raises(sharding.ShardingError, match=r"tp_axis 'tp' is not an axis of the mesh \(axes: \('model',\)\)"):
        sharding.plan_model(nn.Sequential(nn.Linear(4, 4)), {}, one_device_mesh, "tp")


def test_placement_key_round_trips(one_device_mesh):
    placement = sharding.LayerSharding(one_device_mesh, "model", "row", None, True)
    rebuilt = sharding.LayerSharding.from_key(placement.key)
    assert (rebuilt.key, rebuilt.mesh.axis_names, rebuilt.shards) == (placement.key, ("model",), 1)
    import torch_xla.distributed.spmd as xs

    mesh = xs.Mesh(np.arange(1), (1, 1), ("expert", "model"))
    placement = sharding.LayerSharding(mesh, "model", "experts", None, False, "expert")
    rebuilt = sharding.LayerSharding.from_key(placement.key)
    assert (rebuilt.expert_axis, rebuilt.expert_shards) == ("expert", 1)


def test_expert_axis_checked(one_device_mesh):
    """ep_axis must be another axis of the mesh than tp_axis (and dp_axis), and needs a mesh."""
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(sharding.ShardingError, match=r"ep_axis 'expert' is not an axis of the mesh"):
        sharding.plan_model(model, {}, one_device_mesh, "model", ep_axis="expert")
    with pytest.raises(sharding.ShardingError, match="ep_axis must differ from tp_axis and dp_axis, got 'model'"):
        sharding.plan_model(model, {}, one_device_mesh, "model", ep_axis="model")
    with pytest.raises(TypeError, match="need a mesh"):
        tl.patch_model(model, tl.LoRAConfig(), ep_axis="expert")


def test_failed_plan_leaves_model_unpatched(one_device_mesh):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(sharding.ShardingError):
        tl.patch_model(model, tl.LoRAConfig(), mesh=one_device_mesh, sharding_plan={"0": "diagonal"})
    assert type(model[0]) is nn.Linear


def test_moe_plan_experts_and_router(one_device_mesh):
    """Expert layers are tensor parallel ("experts"), routers replicated; another kind for an expert layer: refused."""
    from test_moe import moe_model

    from torch_xla_lora.context import BatchContext
    from torch_xla_lora.layers import ExpertsWithLoRA, RouterWithLoRA

    model = moe_model("Mixtral")
    block = model.model.layers[0].mlp
    layers = {
        "model.layers.0.mlp.experts": ExpertsWithLoRA(block.experts, BatchContext(), 2, 4, torch.float32),
        "model.layers.0.mlp.gate": RouterWithLoRA(block.gate, BatchContext(), 2, 4, torch.float32),
    }
    kinds = sharding.plan_model(model, layers, one_device_mesh, "model").kinds
    assert (kinds["model.layers.0.mlp.experts"], kinds["model.layers.0.mlp.gate"]) == ("experts", "replicated")
    placement = sharding.LayerSharding(one_device_mesh, "model", "column")
    with pytest.raises(sharding.ShardingError, match="is 'experts' or 'replicated', got 'column'"):
        placement.check("experts", block.experts, layers["model.layers.0.mlp.experts"])


def test_sharding_arguments_need_a_mesh():
    with pytest.raises(TypeError, match="need a mesh"):
        tl.patch_model(nn.Sequential(nn.Linear(4, 4)), tl.LoRAConfig(), fully_sharded=True)
