"""Tests for torch_xla_lora.adapters against PEFT itself (tiny random models, no downloads)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers
from conftest import tiny_llama
from peft import LoraConfig, get_peft_model
from peft import get_peft_model_state_dict as _peft_state_dict
from peft.tuners.lora import LoraLayer
from test_manager import peft_model_of

import torch_xla_lora as tl
from torch_xla_lora.adapters import LoRAAdapter, check_adapter, load_adapter
from torch_xla_lora.errors import (
    AdapterFileError,
    InvalidAdapterError,
    LoRAError,
    RankTooLargeError,
    UnknownModuleError,
    UnsupportedAdapterError,
)
from torch_xla_lora.layers import MergedColumnParallelLinearWithLoRA, QKVParallelLinearWithLoRA

NAME = "tenant-7"  # every error message must name it
PREFIX = "base_model.model."


def tiny_gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def make_peft(base: str = "llama", **lora_kwargs):
    """A PEFT model with random (non-zero) LoRA weights."""
    torch.manual_seed(0)
    model = tiny_gpt2() if base == "gpt2" else tiny_llama()
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out / embedding-saving notices
        return get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))


def save(peft_model, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(path, **kwargs)
    return path


def get_peft_model_state_dict(peft_model) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"
        return _peft_state_dict(peft_model)


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    return {
        name.removeprefix(PREFIX): m
        for name, m in peft_model.named_modules()
        if isinstance(m, LoraLayer) and ("default" in m.lora_A or "default" in m.lora_embedding_A)
    }


def peft_delta_linear_layout(layer: LoraLayer) -> torch.Tensor:
    """PEFT's delta weight in [out, in] (embeddings: [embedding_dim, num_embeddings]) layout, i.e. b @ a."""
    delta = layer.get_delta_weight("default")
    # PEFT returns the delta in the base weight's layout: transposed for Conv1D (fan_in_fan_out) and for
    # nn.Embedding, whose weight is [num_embeddings, embedding_dim].
    is_embedding = "default" in layer.lora_embedding_A
    return delta.T if (is_embedding or layer.fan_in_fan_out) else delta


def module_shapes(peft_model) -> dict[str, tuple[int, int]]:
    return {name: (m.in_features, m.out_features) for name, m in lora_layers(peft_model).items()}


def assert_names_adapter(err: pytest.ExceptionInfo) -> None:
    assert isinstance(err.value, LoRAError)
    assert repr(NAME) in str(err.value), str(err.value)


DELTA_CASES = {
    "plain_r8": {"r": 8, "lora_alpha": 16},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True},
    "rank_alpha_pattern": {
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "r": 4,
        "lora_alpha": 8,
        # suffix match, full-path regex with ^, dotted paths, overlapping keys that agree;
        # k_proj of layer 1 and o_proj keep the defaults
        "rank_pattern": {"q_proj": 2, "layers.1.self_attn.v_proj": 6},
        "alpha_pattern": {"^model.layers.0.self_attn.k_proj": 3, "v_proj": 5, "layers.0.self_attn.v_proj": 5},
    },
    "embed_and_lm_head": {"target_modules": ["q_proj", "lm_head", "embed_tokens"], "r": 4, "lora_alpha": 12},
    "gpt2_fan_in_fan_out": {
        "base": "gpt2",
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True,
        "r": 4,
        "lora_alpha": 8,
    },
    "layers_to_transform": {"layers_to_transform": [1], "r": 4, "lora_alpha": 8},
}


@pytest.mark.parametrize("case", DELTA_CASES, ids=list(DELTA_CASES))
def test_b_at_a_equals_peft_delta(tmp_path, case):
    kwargs = dict(DELTA_CASES[case])
    peft_model = make_peft(kwargs.pop("base", "llama"), **kwargs)
    adapter = load_adapter(NAME, save(peft_model, tmp_path))

    layers = lora_layers(peft_model)
    assert set(adapter.modules) == set(layers)
    for name, layer in layers.items():
        lora = adapter.modules[name]
        assert lora.rank == layer.r["default"], name
        assert lora.scaling == pytest.approx(layer.scaling["default"], rel=1e-12), name
        assert lora.is_embedding == ("default" in layer.lora_embedding_A), name
        torch.testing.assert_close(lora.b @ lora.a, peft_delta_linear_layout(layer), rtol=1e-5, atol=1e-6)
    # the adapter fits the model it was trained on
    check_adapter(adapter, module_shapes(peft_model), max_rank=adapter.max_rank)


def test_patterns_give_per_module_ranks(tmp_path):
    adapter = load_adapter(NAME, save(make_peft(**DELTA_CASES["rank_alpha_pattern"]), tmp_path))
    ranks = {name: m.rank for name, m in adapter.modules.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2
    assert ranks["model.layers.1.self_attn.q_proj"] == 2
    assert adapter.modules["model.layers.0.self_attn.v_proj"].scaling == 5 / 4
    assert adapter.modules["model.layers.0.self_attn.k_proj"].scaling == 3 / 4
    assert adapter.modules["model.layers.1.self_attn.k_proj"].scaling == 8 / 4
    assert ranks["model.layers.1.self_attn.v_proj"] == 6
    assert ranks["model.layers.0.self_attn.v_proj"] == 4
    assert adapter.max_rank == 6


@pytest.mark.parametrize("source", ["dir", "lora_config"])
def test_overlapping_patterns_with_different_values_are_rejected(tmp_path, source):
    # PEFT applies the first matching key at training time but saves the keys sorted, so its own reload
    # would use "model.layers.1.self_attn.q_proj" -> 3 while the weights have rank 2.
    peft_model = make_peft(
        target_modules=["q_proj"], r=4, rank_pattern={"q_proj": 2, "model.layers.1.self_attn.q_proj": 3}
    )
    with pytest.raises(InvalidAdapterError) as err:
        if source == "dir":
            load_adapter(NAME, save(peft_model, tmp_path))
        else:
            state_dict = get_peft_model_state_dict(peft_model)
            load_adapter(NAME, state_dict=state_dict, config=peft_model.peft_config["default"])
    assert_names_adapter(err)
    assert "model.layers.1.self_attn.q_proj" in str(err.value) and "rank_pattern" in str(err.value)


def test_layers_to_transform_restricts_modules(tmp_path):
    adapter = load_adapter(NAME, save(make_peft(**DELTA_CASES["layers_to_transform"]), tmp_path))
    assert sorted(adapter.modules) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


PHI3_TARGETS = ["qkv_proj", "gate_up_proj"]
PHI3_SPECS = {
    "p0": {"r": 8, "lora_alpha": 16, "target_modules": PHI3_TARGETS},
    "p1": {"r": 4, "lora_alpha": 4, "use_rslora": True, "target_modules": PHI3_TARGETS},
}


def tiny_phi3() -> torch.nn.Module:
    """Phi-3's layout: a fused qkv_proj [q | k | v] (96 = 3 x 32 wide here) and a dense gate_up_proj [gate | up]."""
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.Phi3ForCausalLM(cfg).eval()


@torch.no_grad()
def test_phi3_packed_gate_up_and_fused_qkv_match_peft(tmp_path):
    """The sliced layer kinds on a real architecture: a mixed batch with a base row equals PEFT's own
    adapter_names forward. Catches a wrong kind chosen for qkv_proj / gate_up_proj, PEFT keys of fused
    modules mapped to the wrong module, B's slices misplaced, and a LoRA that is not applied at all."""
    clean = tiny_phi3()
    peft_model = peft_model_of(clean, PHI3_SPECS)
    save(peft_model, tmp_path)  # every adapter not named "default" goes to a subdirectory of its name
    model = copy.deepcopy(clean)
    lora = tl.patch_model(model, tl.LoRAConfig(max_loras=2, max_rank=8, target_modules=PHI3_TARGETS))
    layer = model.model.layers[0]
    assert type(layer.mlp.gate_up_proj) is MergedColumnParallelLinearWithLoRA
    assert type(layer.self_attn.qkv_proj) is QKVParallelLinearWithLoRA
    for name in PHI3_SPECS:
        lora.load_adapter(name, tmp_path / name)
    mix = ["p1", None, "p0"]
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    lora.set_batch(mix)
    out = model(ids).logits
    expected = peft_model(ids, adapter_names=["__base__" if n is None else n for n in mix]).logits
    atol = 1e-4 * expected.abs().max().item()  # float32, relative to the logits' magnitude
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=atol)
    base = clean(ids).logits
    assert torch.equal(out[1], base[1])  # the base row: exactly the unpatched model (its slot is -1)
    assert (expected[[0, 2]] - base[[0, 2]]).abs().amax(dim=(1, 2)).min() > 100 * atol  # both adapters show


def assert_same_adapter(x: LoRAAdapter, y: LoRAAdapter) -> None:
    assert x.modules.keys() == y.modules.keys()
    for name in x.modules:
        mx, my = x.modules[name], y.modules[name]
        assert torch.equal(mx.a, my.a) and torch.equal(mx.b, my.b), name
        assert (mx.rank, mx.scaling, mx.is_embedding) == (my.rank, my.scaling, my.is_embedding)


@pytest.mark.parametrize("source", ["bin", "state_dict_and_lora_config", "state_dict_and_json_dict"])
def test_sources_give_identical_tensors(tmp_path, source):
    peft_model = make_peft(target_modules=["q_proj", "embed_tokens"], rank_pattern={"q_proj": 2})
    reference = load_adapter(NAME, save(peft_model, tmp_path / "st"))
    if source == "bin":
        save(peft_model, tmp_path / "bin", safe_serialization=False)
        assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
        other = load_adapter(NAME, tmp_path / "bin")
    else:
        state_dict = get_peft_model_state_dict(peft_model)
        config = peft_model.peft_config["default"]
        if source == "state_dict_and_json_dict":
            config = json.loads((tmp_path / "st" / "adapter_config.json").read_text())
        other = load_adapter(NAME, state_dict=state_dict, config=config)
    assert_same_adapter(reference, other)


def test_outputs_are_contiguous_cpu_copies():
    peft_model = make_peft()
    state_dict = get_peft_model_state_dict(peft_model)
    adapter = load_adapter(NAME, state_dict=state_dict, config=peft_model.peft_config["default"])
    lora = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert lora.a.is_contiguous() and lora.b.is_contiguous() and lora.a.device.type == "cpu"
    with torch.no_grad():  # later training of the live PEFT model must not leak into the loaded adapter
        peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.zero_()
    assert lora.a.abs().sum() > 0


def test_bfloat16_cast(tmp_path):
    path = save(make_peft(r=8, lora_alpha=16), tmp_path)
    f32 = load_adapter(NAME, path)
    bf16 = load_adapter(NAME, path, dtype=torch.bfloat16)
    for name, lora in bf16.modules.items():
        assert lora.a.dtype == lora.b.dtype == torch.bfloat16
        assert torch.equal(lora.a, f32.modules[name].a.to(torch.bfloat16))
        # scaling folded in float32, then one rounding to bf16
        assert torch.equal(lora.b, f32.modules[name].b.to(torch.bfloat16))


# --- file errors --------------------------------------------------------------------------------------------


def test_missing_dir(tmp_path):
    with pytest.raises(AdapterFileError) as err:
        load_adapter(NAME, tmp_path / "does-not-exist")
    assert_names_adapter(err)


@pytest.mark.parametrize("filename", ["adapter_model.safetensors", "adapter_config.json"])
def test_missing_file(tmp_path, filename):
    path = save(make_peft(), tmp_path)
    (path / filename).unlink()
    with pytest.raises(AdapterFileError) as err:
        load_adapter(NAME, path)
    assert_names_adapter(err)
    assert filename in str(err.value)


def test_corrupt_json(tmp_path):
    path = save(make_peft(), tmp_path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError) as err:
        load_adapter(NAME, path)
    assert_names_adapter(err)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_truncated_weights(tmp_path, safe):
    path = save(make_peft(), tmp_path, safe_serialization=safe)
    weights = path / ("adapter_model.safetensors" if safe else "adapter_model.bin")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError) as err:
        load_adapter(NAME, path)
    assert_names_adapter(err)


# --- invalid / unsupported adapters ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(tmp_path, bad):
    peft_model = make_peft()
    with torch.no_grad():
        peft_model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[3, 1] = bad
    with pytest.raises(InvalidAdapterError) as err:
        load_adapter(NAME, save(peft_model, tmp_path))
    assert_names_adapter(err)
    assert "model.layers.1.self_attn.v_proj.lora_B.weight" in str(err.value)


UNSUPPORTED_CASES = {
    "use_dora": {"use_dora": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "bias_all": {"bias": "all"},
    "bias_lora_only": {"bias": "lora_only"},
    "lora_bias": {"lora_bias": True},
    "trainable_tokens": {"trainable_token_indices": [1, 2]},
}


@pytest.mark.parametrize("case", UNSUPPORTED_CASES, ids=list(UNSUPPORTED_CASES))
def test_unsupported_config(tmp_path, case):
    with pytest.raises(UnsupportedAdapterError) as err:
        load_adapter(NAME, save(make_peft(**UNSUPPORTED_CASES[case]), tmp_path))
    assert_names_adapter(err)


def test_unsupported_peft_type_and_base_mutating_init():
    peft_model = make_peft()
    state_dict = get_peft_model_state_dict(peft_model)
    config = peft_model.peft_config["default"].to_dict()
    for override in ({"peft_type": "ADALORA"}, {"init_lora_weights": "pissa_niter_4"}):
        with pytest.raises(UnsupportedAdapterError) as err:
            load_adapter(NAME, state_dict=state_dict, config={**config, **override})
        assert_names_adapter(err)


def test_extra_tensor_is_rejected():
    peft_model = make_peft()
    state_dict = dict(get_peft_model_state_dict(peft_model))
    state_dict[PREFIX + "model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    with pytest.raises(UnsupportedAdapterError) as err:
        load_adapter(NAME, state_dict=state_dict, config=peft_model.peft_config["default"])
    assert_names_adapter(err)
    assert "lora_magnitude_vector" in str(err.value)


def state_dict_and_config(**lora_kwargs):
    peft_model = make_peft(**lora_kwargs)
    return dict(get_peft_model_state_dict(peft_model)), peft_model.peft_config["default"].to_dict()


def test_lora_a_without_lora_b():
    state_dict, config = state_dict_and_config()
    del state_dict[PREFIX + "model.layers.0.self_attn.q_proj.lora_B.weight"]
    with pytest.raises(InvalidAdapterError) as err:
        load_adapter(NAME, state_dict=state_dict, config=config)
    assert_names_adapter(err)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in str(err.value)


def test_a_b_rank_mismatch():
    state_dict, config = state_dict_and_config()
    key = PREFIX + "model.layers.0.self_attn.q_proj.lora_B.weight"
    state_dict[key] = state_dict[key][:, :4]
    with pytest.raises(InvalidAdapterError) as err:
        load_adapter(NAME, state_dict=state_dict, config=config)
    assert_names_adapter(err)


@pytest.mark.parametrize("override", [{"r": 4}, {"rank_pattern": {"v_proj": 16}}], ids=["r", "rank_pattern"])
def test_weights_rank_differs_from_config(override):
    state_dict, config = state_dict_and_config(r=8)
    with pytest.raises(InvalidAdapterError) as err:
        load_adapter(NAME, state_dict=state_dict, config={**config, **override})
    assert_names_adapter(err)


# --- check_adapter --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_and_shapes():
    peft_model = make_peft(r=8)
    state_dict = get_peft_model_state_dict(peft_model)
    adapter = load_adapter(NAME, state_dict=state_dict, config=peft_model.peft_config["default"])
    return adapter, module_shapes(peft_model)


def test_check_adapter_unknown_module(adapter_and_shapes):
    adapter, shapes = adapter_and_shapes
    shapes = {k: v for k, v in shapes.items() if k != "model.layers.1.self_attn.v_proj"}
    with pytest.raises(UnknownModuleError) as err:
        check_adapter(adapter, shapes, max_rank=16)
    assert_names_adapter(err)
    assert "model.layers.1.self_attn.v_proj" in str(err.value)


def test_check_adapter_rank_too_large(adapter_and_shapes):
    adapter, shapes = adapter_and_shapes
    with pytest.raises(RankTooLargeError) as err:
        check_adapter(adapter, shapes, max_rank=4)
    assert_names_adapter(err)
    assert "expected <= 4" in str(err.value) and "got 8" in str(err.value)


@pytest.mark.parametrize("axis", [0, 1], ids=["in_features", "out_features"])
def test_check_adapter_wrong_shape(adapter_and_shapes, axis):
    adapter, shapes = adapter_and_shapes
    name = "model.layers.0.self_attn.v_proj"
    wrong = list(shapes[name])
    wrong[axis] += 1
    with pytest.raises(InvalidAdapterError) as err:
        check_adapter(adapter, {**shapes, name: tuple(wrong)}, max_rank=16)
    assert not isinstance(err.value, (UnknownModuleError, RankTooLargeError))
    assert_names_adapter(err)
    assert name in str(err.value) and f"expected {wrong[axis]}" in str(err.value)


@pytest.mark.parametrize("sources", ["neither", "path_and_state_dict", "state_dict_without_config"])
def test_exactly_one_source_is_required(tmp_path, sources):
    state_dict, config = state_dict_and_config()
    kwargs = {
        "neither": {},
        "path_and_state_dict": {"path": tmp_path, "state_dict": state_dict, "config": config},
        "state_dict_without_config": {"state_dict": state_dict},
    }[sources]
    with pytest.raises(TypeError, match=repr(NAME)):
        load_adapter(NAME, **kwargs)
