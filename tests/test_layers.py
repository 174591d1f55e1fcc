"""Patched models against PEFT: mixed adapter batches of tiny random models, on CPU tensors and the XLA device.

Every reference is PEFT itself (its mixed-batch ``adapter_names`` forward, or one adapter at a time) or the
unpatched model; adapters are written by PEFT's ``save_pretrained`` and read back by ``load_adapter``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_close, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import torch_xla_lora as tl
from torch_xla_lora.layers import (
    BaseLayerWithLoRA,
    ColumnParallelLinearWithLoRA,
    EmbeddingWithLoRA,
    LinearWithLoRA,
    LogitsWithLoRA,
    QKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
)

VOCAB = 64
LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_SPECS = {  # three PEFT adapters on every linear layer of the tiny Llama
    "a0": {"r": 8, "lora_alpha": 16},
    "a1": {"r": 16, "lora_alpha": 8, "use_rslora": True},
    "a2": {
        "r": 32,
        "lora_alpha": 32,
        "rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 12},
        "alpha_pattern": {"down_proj": 3, "v_proj": 64},
    },
}
LLAMA_LORA = {"max_loras": 4, "max_rank": 64, "target_modules": "all-linear"}
LLAMA_MIXES = [["a0", None, "a1", "a2"], ["a2", "a2", None, "a0"], [None, "a1", "a1", "a0"]]

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
GPT2_SPECS = {
    "g0": {"r": 8, "lora_alpha": 16, "target_modules": GPT2_TARGETS, "fan_in_fan_out": True},
    "g1": {"r": 4, "lora_alpha": 8, "target_modules": GPT2_TARGETS, "fan_in_fan_out": True, "use_rslora": True},
}

HEAD_TARGETS = ["q_proj", "v_proj", "lm_head", "embed_tokens"]
HEAD_SPECS = {
    "h0": {"r": 4, "lora_alpha": 12, "target_modules": HEAD_TARGETS},
    "h1": {"r": 8, "lora_alpha": 8, "target_modules": ["lm_head", "embed_tokens"]},
}

MLP_TARGETS = ["0", "2"]  # the two nn.Linear of nn.Sequential(Linear, ReLU, Linear)
MLP_SPECS = {
    "m0": {"r": 4, "lora_alpha": 8, "target_modules": MLP_TARGETS},
    "m1": {"r": 8, "lora_alpha": 4, "target_modules": MLP_TARGETS, "use_rslora": True},
}
# One packed row holding two requests and a base-model stretch, token by token.
PACKED = ["m0"] * 4 + [None] * 2 + ["m1"] * 5 + ["m0"]


# --- helpers -------------------------------------------------------------------------------------------------


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_falcon(seed: int = 0) -> nn.Module:
    """Falcon-7B's layout: multi-query attention, so the fused query_key_value is [q | k | v] = [H*d | d | d]."""
    torch.manual_seed(seed)
    cfg = transformers.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        multi_query=True,
        new_decoder_architecture=False,
        parallel_attn=True,
        alibi=False,
        bias=False,
    )
    return transformers.FalconForCausalLM(cfg).eval()


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def build_peft(clean: nn.Module, specs: dict[str, dict]) -> PeftModel:
    """A PEFT model (on a copy of ``clean``) holding one randomly initialised adapter per spec."""
    peft_model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out / embedding notices
        for seed, (name, kwargs) in enumerate(specs.items(), start=100):
            torch.manual_seed(seed)
            config = LoraConfig(init_lora_weights=False, **{"target_modules": "all-linear", **kwargs})
            if peft_model is None:
                peft_model = get_peft_model(copy.deepcopy(clean), config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
    return peft_model.eval()


def save_adapters(peft_model: PeftModel, path: Path) -> dict[str, Path]:
    """save_pretrained writes every adapter not named "default" into a subdirectory named after it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(path)
    dirs = {name: path / name for name in peft_model.peft_config}
    assert all((d / "adapter_config.json").is_file() for d in dirs.values()), dirs
    return dirs


@dataclass
class Case:
    clean: nn.Module  # the base model, never patched
    peft: PeftModel  # PEFT on a copy of it, with every adapter
    dirs: dict[str, Path]  # adapter name -> save_pretrained directory
    inputs: torch.Tensor


def make_case(clean: nn.Module, specs: dict[str, dict], path: Path, inputs: torch.Tensor) -> Case:
    peft_model = build_peft(clean, specs)
    return Case(clean, peft_model, save_adapters(peft_model, path), inputs)


def token_ids(rows: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def on_device(clean: nn.Module, device: torch.device) -> nn.Module:
    model = copy.deepcopy(clean).to(device)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()  # Module.to(xla) gives each tied module its own new Parameter
    return model


def patch(case: Case, device: torch.device, **config) -> tuple[nn.Module, tl.LoRAModel]:
    """A copy of the case's base model on ``device``, patched, with every adapter of the case loaded."""
    model = on_device(case.clean, device)
    lora = tl.patch_model(model, tl.LoRAConfig(**config))
    for name, path in case.dirs.items():
        lora.load_adapter(name, path)
    return model, lora


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device)).logits.cpu()


@torch.no_grad()
def peft_logits(case: Case, names: list[str | None]) -> torch.Tensor:
    adapter_names = ["__base__" if n is None else n for n in names]
    return case.peft(case.inputs, adapter_names=adapter_names).logits


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["cpu", "xla"])
def device(request) -> torch.device:
    return request.getfixturevalue("xla_device") if request.param == "xla" else torch.device("cpu")


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory) -> Case:
    return make_case(tiny_llama(), LLAMA_SPECS, tmp_path_factory.mktemp("llama"), token_ids(4, 7))


@pytest.fixture(scope="module")
def gpt2_case(tmp_path_factory) -> Case:
    return make_case(tiny_gpt2(), GPT2_SPECS, tmp_path_factory.mktemp("gpt2"), token_ids(4, 6))


@pytest.fixture(scope="module")
def falcon_case(tmp_path_factory) -> Case:
    specs = {"f0": {"r": 8, "lora_alpha": 16}, "f1": {"r": 4, "lora_alpha": 4}}
    return make_case(tiny_falcon(), specs, tmp_path_factory.mktemp("falcon"), token_ids(3, 6))


@pytest.fixture(scope="module")
def head_case(tmp_path_factory) -> Case:
    return make_case(tiny_llama(seed=3), HEAD_SPECS, tmp_path_factory.mktemp("head"), token_ids(3, 5))


@pytest.fixture(scope="module")
def mlp_case(tmp_path_factory) -> Case:
    inputs = torch.randn(1, len(PACKED), 16, generator=torch.Generator().manual_seed(2))
    return make_case(tiny_mlp(), MLP_SPECS, tmp_path_factory.mktemp("mlp"), inputs)


# --- mixed batches equal PEFT --------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", LLAMA_MIXES, ids=lambda m: "-".join(str(n) for n in m))
def test_llama_mixed_batch_matches_peft(llama_case, device, mix):
    model, lora = patch(llama_case, device, **LLAMA_LORA)
    lora.set_batch(mix)
    assert_close(logits(model, llama_case.inputs), peft_logits(llama_case, mix))


def test_gpt2_conv1d_and_fused_qkv_match_peft(gpt2_case, device):
    model, lora = patch(gpt2_case, device, max_loras=2, max_rank=8, target_modules=GPT2_TARGETS)
    assert isinstance(model.transformer.h[0].attn.c_attn, QKVParallelLinearWithLoRA)
    mix = ["g0", None, "g1", "g0"]
    lora.set_batch(mix)
    assert_close(logits(model, gpt2_case.inputs), peft_logits(gpt2_case, mix))


def test_falcon_multi_query_fused_qkv_matches_peft(falcon_case, device):
    # query_key_value is [H*d + 2*d] = 64 wide here (4672 in Falcon-7B): not three equal slices
    mix = ["f1", None, "f0"]
    expected = peft_logits(falcon_case, mix)
    model, lora = patch(falcon_case, device, max_loras=2, max_rank=8, target_modules="all-linear")
    lora.set_batch(mix)
    assert_close(logits(model, falcon_case.inputs), expected)


def test_embedding_and_lm_head_match_peft(head_case, device):
    model, lora = patch(head_case, device, max_loras=2, max_rank=8, target_modules=HEAD_TARGETS)
    assert isinstance(model.lm_head, LogitsWithLoRA)
    assert isinstance(model.model.embed_tokens, EmbeddingWithLoRA)
    mix = ["h1", None, "h0"]
    lora.set_batch(mix)
    assert_close(logits(model, head_case.inputs), peft_logits(head_case, mix))


@pytest.mark.parametrize("targets", [["lm_head"], ["lm_head", "embed_tokens"], [*LLAMA_PROJ, "lm_head"]])
def test_tied_lm_head_keeps_the_embedding_parameter(device, targets):
    model = on_device(tiny_llama(tie_word_embeddings=True), device)
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding  # precondition: the model is tied
    tl.patch_model(model, tl.LoRAConfig(max_rank=8, target_modules=targets))
    assert isinstance(model.lm_head, LogitsWithLoRA)
    assert model.lm_head.base_layer.weight is embedding
    embed_tokens = model.model.embed_tokens
    assert (embed_tokens.base_layer if "embed_tokens" in targets else embed_tokens).weight is embedding


def test_bfloat16_llama_matches_bfloat16_peft(llama_case, device):
    mix = LLAMA_MIXES[0]
    peft16 = copy.deepcopy(llama_case.peft).to(torch.bfloat16)
    with torch.no_grad():
        expected = peft16(llama_case.inputs, adapter_names=["__base__" if n is None else n for n in mix]).logits
    model = copy.deepcopy(llama_case.clean).to(torch.bfloat16).to(device)
    lora = tl.patch_model(model, tl.LoRAConfig(**LLAMA_LORA))
    for name, path in llama_case.dirs.items():
        lora.load_adapter(name, path)
    lora.set_batch(mix)
    out = logits(model, llama_case.inputs)
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, dtype=torch.bfloat16)


def test_adapter_dtype_other_than_the_model_dtype(llama_case, device):
    # LoRAConfig.dtype: "dtype of the adapter buffers; None means the model's"
    model, lora = patch(llama_case, device, dtype=torch.bfloat16, **LLAMA_LORA)
    mix = LLAMA_MIXES[0]
    lora.set_batch(mix)
    out = logits(model, llama_case.inputs)
    assert out.dtype == torch.float32
    # Each patched layer runs its LoRA op in the adapters' dtype, base output included (layers.base.fused_lora casts
    # y to it and back), so the float32 logits carry bfloat16 rounding: bfloat16's tolerance, relative to them.
    assert_close(out, peft_logits(llama_case, mix), dtype=torch.bfloat16)


# --- per-token adapters --------------------------------------------------------------------------------------


@torch.no_grad()
def peft_token_by_token(case: Case, names: list[str | None]) -> torch.Tensor:
    """Each token through PEFT alone, with only its own adapter active (or none)."""
    rows = []
    for t, name in enumerate(names):
        x = case.inputs[:, t : t + 1]
        if name is None:
            with case.peft.disable_adapter():
                rows.append(case.peft(x))
        else:
            case.peft.base_model.set_adapter(name)
            rows.append(case.peft(x))
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("form", ["names", "slot_ints", "slot_tensor"])
def test_token_adapters_of_packed_row_match_peft_per_token(mlp_case, device, form):
    model, lora = patch(mlp_case, device, max_loras=2, max_rank=8, target_modules=MLP_TARGETS)
    slots = {name: lora.pin(name) for name in MLP_SPECS}
    entries = {
        "names": PACKED,
        "slot_ints": [-1 if n is None else slots[n] for n in PACKED],
        "slot_tensor": torch.tensor([-1 if n is None else slots[n] for n in PACKED]),
    }[form]
    lora.set_token_adapters(entries)
    with torch.no_grad():
        out = model(mlp_case.inputs.to(device)).cpu()
    assert_close(out, peft_token_by_token(mlp_case, PACKED))


def test_row_constant_token_adapters_equal_set_batch(llama_case, device):
    model, lora = patch(llama_case, device, **LLAMA_LORA)
    mix = LLAMA_MIXES[0]
    lora.set_batch(mix)
    per_row = logits(model, llama_case.inputs)
    seq = llama_case.inputs.shape[1]
    lora.set_token_adapters([name for name in mix for _ in range(seq)])
    assert torch.equal(logits(model, llama_case.inputs), per_row)


# --- base model when no adapter applies ----------------------------------------------------------------------


BASE_STATES = {
    "no_batch": lambda lora, rows, tokens: None,
    "all_none": lambda lora, rows, tokens: lora.set_batch([None] * rows),
    "all_none_tokens": lambda lora, rows, tokens: lora.set_token_adapters([None] * tokens),
    "all_minus_one_slots": lambda lora, rows, tokens: lora.set_batch([-1] * rows),
    "cleared": lambda lora, rows, tokens: (lora.set_batch(["a0", "a1", "a2", "a0"][:rows]), lora.clear_batch()),
}


@pytest.mark.parametrize("state", BASE_STATES)
def test_no_adapter_gives_exactly_the_unpatched_output(llama_case, device, state):
    reference = logits(on_device(llama_case.clean, device), llama_case.inputs)
    model, lora = patch(llama_case, device, **LLAMA_LORA)
    lora.set_batch(["a0", "a1", "a2"])  # every slot holds non-zero factors
    lora.clear_batch()
    BASE_STATES[state](lora, llama_case.inputs.shape[0], llama_case.inputs.numel())
    assert torch.equal(logits(model, llama_case.inputs), reference)


# --- layer kinds and unpatching ------------------------------------------------------------------------------


LAYER_KINDS = {  # model -> (LoRAConfig target_modules, module-name suffix -> expected layer class)
    "llama_all_linear": (
        tiny_llama,
        "all-linear",
        {
            **dict.fromkeys(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], ColumnParallelLinearWithLoRA),
            **dict.fromkeys(["o_proj", "down_proj"], RowParallelLinearWithLoRA),
        },
    ),
    "llama_head_and_embedding": (
        tiny_llama,
        HEAD_TARGETS,
        {
            "q_proj": ColumnParallelLinearWithLoRA,
            "v_proj": ColumnParallelLinearWithLoRA,
            "lm_head": LogitsWithLoRA,
            "embed_tokens": EmbeddingWithLoRA,
        },
    ),
    "gpt2": (
        tiny_gpt2,
        GPT2_TARGETS,
        {
            "c_attn": QKVParallelLinearWithLoRA,
            "c_proj": RowParallelLinearWithLoRA,
            "c_fc": ColumnParallelLinearWithLoRA,
        },
    ),
    "mlp": (tiny_mlp, MLP_TARGETS, {"0": LinearWithLoRA, "2": LinearWithLoRA}),
}


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_each_target_gets_its_layer_kind_around_the_original_module(kind):
    make, targets, expected = LAYER_KINDS[kind]
    model = make()
    original = dict(model.named_modules())
    wanted = {name for name in original if name.rsplit(".", 1)[-1] in expected}
    lora = tl.patch_model(model, tl.LoRAConfig(max_rank=8, target_modules=targets))
    assert set(lora.layers) == wanted
    for name in wanted:
        layer = model.get_submodule(name)
        assert type(layer) is expected[name.rsplit(".", 1)[-1]], name
        assert layer.base_layer is original[name], name


def test_unpatch_restores_original_modules_and_outputs(llama_case, device):
    model = on_device(llama_case.clean, device)
    original = dict(model.named_modules())
    reference = logits(model, llama_case.inputs)
    lora = tl.patch_model(model, tl.LoRAConfig(**LLAMA_LORA))
    for name, path in llama_case.dirs.items():
        lora.load_adapter(name, path)
    lora.set_batch(LLAMA_MIXES[0])
    assert not torch.equal(logits(model, llama_case.inputs), reference)  # the adapters did apply
    assert lora.unpatch() is model
    restored = dict(model.named_modules())
    assert restored.keys() == original.keys()
    assert all(restored[name] is module for name, module in original.items())
    assert not any(isinstance(m, BaseLayerWithLoRA) for m in model.modules())
    assert torch.equal(logits(model, llama_case.inputs), reference)


@pytest.mark.parametrize(
    "call",
    [
        lambda lora, dirs: lora.set_batch(["a0"]),
        lambda lora, dirs: lora.set_token_adapters([None]),
        lambda lora, dirs: lora.load_adapter("a0", dirs["a0"]),
        lambda lora, dirs: lora.unpatch(),
    ],
    ids=["set_batch", "set_token_adapters", "load_adapter", "unpatch"],
)
def test_handle_is_unusable_after_unpatch(llama_case, call):
    _, lora = patch(llama_case, torch.device("cpu"), **LLAMA_LORA)
    lora.unpatch()
    with pytest.raises(tl.LoRAError, match="unpatched"):
        call(lora, llama_case.dirs)


# --- torch.compile -------------------------------------------------------------------------------------------


def compile_count() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return data[0] if data else 0


def test_compiled_llama_matches_eager_and_new_mixes_do_not_recompile(llama_case, xla_device):
    """The compiled step equals the eager model and PEFT for every mix, and only the first mix compiles.

    The ids are [4, 5], a shape no other test here runs, so the first run must compile its graphs in this test:
    that proves the counter sees this test's compilations, and a new mix that compiled would fail the test.
    """
    import torch_xla

    model, lora = patch(llama_case, xla_device, **LLAMA_LORA)
    ids = llama_case.inputs[:, :5]

    def step(x):
        return model(x).logits

    compiled = torch.compile(step, backend="openxla")

    @torch.no_grad()
    def run(mix):
        lora.set_batch(mix)
        out = compiled(ids.to(xla_device))
        torch_xla.sync()
        eager = step(ids.to(xla_device))
        torch_xla.sync()
        return out.cpu(), eager.cpu()

    @torch.no_grad()
    def peft(mix):
        return llama_case.peft(ids, adapter_names=["__base__" if n is None else n for n in mix]).logits

    before = compile_count()
    out, eager = run(LLAMA_MIXES[0])  # compiles the compiled and the eager graph (one, if XLA finds them equal)
    compiles = compile_count()
    assert 1 <= compiles - before <= 2
    assert_close(out, eager)
    assert_close(out, peft(LLAMA_MIXES[0]))
    for mix in [*LLAMA_MIXES[1:], [None] * 4, ["a1"] * 4]:
        out, eager = run(mix)
        assert compile_count() == compiles, f"batch {mix} compiled a new graph"
        assert_close(out, eager)
        assert_close(out, peft(mix))
