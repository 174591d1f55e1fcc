"""Mixture-of-experts LoRA (PEFT ``target_parameters`` on fused expert weights) against PEFT itself.

Every architecture is a transformers 5 model built from a small random config
(2 layers, hidden 32, 4 experts, top-2). PEFT 0.21 rewrites ``"all-linear"``
into expert and router ``target_parameters`` for Mixtral, Qwen3-MoE, OLMoE and
DeepSeek-V2/V3; the others name them explicitly, as their users must. PEFT
refuses mixed batches on these layers, so the reference is PEFT with each
adapter alone, row by row.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers
from conftest import assert_close
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import ParamWrapper

from torch_xla_lora import LoRAConfig, patch_model, pool
from torch_xla_lora.adapters import ExpertsLoRA, load_adapter
from torch_xla_lora.context import BatchContext
from torch_xla_lora.errors import (
    AlreadyPatchedError,
    InvalidAdapterError,
    RankTooLargeError,
    UnsupportedAdapterError,
)
from torch_xla_lora.layers import ExpertsWithLoRA, RouterWithLoRA

_COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts_per_tok": 2,
}
_DEEPSEEK = {
    "n_routed_experts": 4,
    "moe_intermediate_size": 16,
    "first_k_dense_replace": 0,
    "kv_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "head_dim": 4,  # the rotary part (qk_rope_head_dim)
}
# architecture -> (config overrides, PEFT targets: None = "all-linear" as PEFT rewrites it, else the router).
ARCHS = {
    "Mixtral": ({"num_local_experts": 4}, None),
    "Qwen3Moe": ({"num_experts": 4, "moe_intermediate_size": 16}, None),
    "Olmoe": ({"num_experts": 4}, None),
    "DeepseekV2": ({**_DEEPSEEK, "q_lora_rank": None}, None),
    "DeepseekV3": ({**_DEEPSEEK, "q_lora_rank": 8}, None),
    "Qwen2Moe": ({"num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}, "gate"),
    "GptOss": ({"num_local_experts": 4, "layer_types": ["full_attention", "sliding_attention"]}, "router"),
    "GraniteMoe": ({"num_local_experts": 4}, "router"),
    "Phimoe": ({"num_local_experts": 4}, "router"),
}
EXPLICIT = [arch for arch, (_, router) in ARCHS.items() if router is not None]
#: Widths at which the experts' projections are whole 128-lane tiles (gate_up 128 -> 256, down 128 -> 128): where
#: the pooled Pallas kernel runs them (the default model's 32-wide ones take the XLA-native path); one layer.
WIDE = {"hidden_size": 128, "intermediate_size": 128, "head_dim": 32, "num_hidden_layers": 1}


def moe_model(arch: str, experts_implementation: str | None = None, wide: bool = False) -> torch.nn.Module:
    """The same random weights on every call for ``arch`` (``wide``: at :data:`WIDE` widths)."""
    overrides, _ = ARCHS[arch]
    config = getattr(transformers, f"{arch}Config")(**{**_COMMON, **overrides, **(WIDE if wide else {})})
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, f"{arch}ForCausalLM")(config).eval()


def lora_config(arch: str, seed: int, **kwargs) -> LoraConfig:
    _, router = ARCHS[arch]
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8 + seed)
    if router is None:
        kwargs.setdefault("target_modules", "all-linear")
    else:
        kwargs.setdefault("target_modules", ["q_proj", "v_proj", "o_proj"])
        kwargs.setdefault("target_parameters", ["gate_up_proj", "down_proj", f"{router}.weight"])
    return LoraConfig(init_lora_weights=False, **kwargs)


def peft_model(arch: str, seed: int, wide: bool = False, **kwargs):
    torch.manual_seed(100 + seed)  # random, non-zero factors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(moe_model(arch, wide=wide), lora_config(arch, seed, **kwargs))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(arch, wide) -> {adapter name: directory written by PEFT's save_pretrained}, made on first use."""
    cache: dict[tuple[str, bool], dict[str, str]] = {}

    def get(arch: str, wide: bool = False) -> dict[str, str]:
        if (arch, wide) not in cache:
            cache[arch, wide] = {}
            for seed, name in enumerate(("math", "code")):
                path = tmp_path_factory.mktemp(f"{arch}-{name}")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    peft_model(arch, seed, wide).save_pretrained(path)
                cache[arch, wide][name] = str(path)
        return cache[arch, wide]

    return get


IDS = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(1))
ROWS = ["math", None, "code", "math"]


def peft_reference(arch: str, saved_dirs: dict[str, str], ids: torch.Tensor) -> dict[str | None, torch.Tensor]:
    """Logits of PEFT with each adapter alone (None: the base model)."""
    from peft import PeftModel

    out = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out[None] = moe_model(arch)(ids).logits
        for name, path in saved_dirs.items():
            out[name] = PeftModel.from_pretrained(moe_model(arch), path).eval()(ids).logits
    return out


def served(arch: str, saved_dirs: dict[str, str], device: torch.device, wide: bool = False, **config):
    model = moe_model(arch, "batched_mm", wide).to(device)
    lora = patch_model(model, LoRAConfig(**{"max_loras": 2, "max_rank": 8, **config}))
    for name, path in saved_dirs.items():
        lora.load_adapter(name, path)
    return model, lora


# -- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_expert_factors_equal_peft_delta(arch):
    pm = peft_model(arch, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = load_adapter("t", state_dict=_state_dict(pm), config=pm.peft_config["default"])
    wrappers = {
        (n.replace("base_model.model.", "").replace(".base_layer", ""), m.parameter_name): m
        for n, m in pm.named_modules()
        if isinstance(m, ParamWrapper) and m.get_param().dim() == 3
    }
    assert wrappers, "PEFT targeted no expert weight"
    for (module, param), wrapper in wrappers.items():
        lora = adapter.modules[module]
        assert isinstance(lora, ExpertsLoRA)
        delta = wrapper.get_delta_weight("default")  # the parameter's own layout
        if getattr(wrapper.get_base_layer(), "is_transposed", False):
            delta = delta.transpose(1, 2)
        ours = lora.params[param].b @ lora.params[param].a  # [E, out, in]
        assert_close(ours, delta.float())


def _state_dict(pm):
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(pm)


def _mixtral_adapter():
    pm = peft_model("Mixtral", 0)
    return _state_dict(pm), pm.peft_config["default"].to_dict()


def test_unknown_expert_parameter_is_refused():
    state_dict, config = _mixtral_adapter()
    config["target_parameters"] = ["w13", "down_proj", "gate.weight"]
    with pytest.raises(UnsupportedAdapterError, match=r"target_parameters \['w13'\]"):
        load_adapter("t", state_dict=state_dict, config=config)


def test_missing_wrapper_level_is_refused():
    state_dict, config = _mixtral_adapter()
    state_dict = {k: v for k, v in state_dict.items() if ".experts.base_layer." not in k}  # gate_up_proj gone
    with pytest.raises(InvalidAdapterError, match=r"expected 2 nested parameter wrappers"):
        load_adapter("t", state_dict=state_dict, config=config)


def test_only_down_proj_targeted_loads_one_parameter():
    pm = peft_model("Mixtral", 0, target_modules=[], target_parameters=["down_proj"])
    adapter = load_adapter("t", state_dict=_state_dict(pm), config=pm.peft_config["default"])
    assert set(adapter.modules) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert set(adapter.modules["model.layers.0.mlp.experts"].params) == {"down_proj"}


@pytest.mark.parametrize("arch", ["Mixtral", "GptOss"])
def test_patch_finds_experts_and_routers(arch):
    lora = patch_model(moe_model(arch), LoRAConfig())
    kinds = [type(layer) for layer in lora.layers.values()]
    assert kinds.count(ExpertsWithLoRA) == 2 and kinds.count(RouterWithLoRA) == 2


def test_patching_a_model_patched_on_its_experts_only_is_refused():
    model = moe_model("Mixtral")
    patch_model(model, LoRAConfig(target_modules=["experts"]))
    with pytest.raises(AlreadyPatchedError, match="'model.layers.0.mlp.experts' is a ExpertsWithLoRA"):
        patch_model(model, LoRAConfig(target_modules=["experts"]))


def test_wrong_expert_count_is_refused(saved):
    model = moe_model("Mixtral")
    model.model.layers[0].mlp.experts.gate_up_proj.data = model.model.layers[0].mlp.experts.gate_up_proj.data[:3]
    lora = patch_model(model, LoRAConfig(max_rank=8))
    with pytest.raises(InvalidAdapterError, match="experts: expected 3, got 4"):
        lora.load_adapter("math", saved("Mixtral")["math"])
    assert lora.adapters() == {}


def test_expert_rank_above_max_rank_is_refused(saved):
    lora = patch_model(moe_model("Mixtral"), LoRAConfig(max_rank=4))  # gate_up_proj has rank 2r = 8
    with pytest.raises(RankTooLargeError, match="gate_up_proj"):
        lora.load_adapter("math", saved("Mixtral")["math"])


# -- serving -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_mixed_batch_equals_peft_per_adapter_cpu(arch, saved):
    dirs = saved(arch)
    reference = peft_reference(arch, dirs, IDS)
    model, lora = served(arch, dirs, torch.device("cpu"))
    lora.set_batch(ROWS)
    with torch.no_grad():
        logits = model(IDS).logits
    for row, name in enumerate(ROWS):
        assert_close(logits[row], reference[name][row])
    assert not torch.allclose(reference["math"], reference[None], atol=1e-3)  # the adapters matter


# A sample on XLA, where each case compiles a whole model (`pytest tests/test_moe.py -k xla --durations=0`
# shows the cost): the common [E, out, in] layout with the default backend, and GPT-OSS's transposed [E, in, out]
# one with biases and interleaved gate/up on the Pallas backend (interpret mode on the CPU device). Every
# architecture of ARCHS runs through the same layers on the CPU path above; the suite runs no other architecture
# on XLA (GPT-OSS's XLA-native grouped path: test_grouped_experts_gradients_equal_float64_plain).
@pytest.mark.parametrize(("arch", "backend"), [("Mixtral", "auto"), ("GptOss", "pallas")])
def test_mixed_batch_equals_peft_per_adapter_xla(arch, backend, saved, xla_device, monkeypatch):
    """GPT-OSS's widths (hidden 32, expert width 16, gate_up 32) are not multiples of 128, as gpt-oss-20b's 2880
    are not: its expert slots are stored lane-padded to 128 columns and the fused Pallas kernel runs them."""
    from torch_xla_lora.kernels import fused

    traced = []  # adapter widths the fused kernel is traced with
    kernel = fused.shrink_expand
    monkeypatch.setattr(
        fused, "shrink_expand", lambda x, a, *rest, **kw: traced.append(a.shape[2]) or kernel(x, a, *rest, **kw)
    )
    dirs = saved(arch)
    reference = peft_reference(arch, dirs, IDS)
    model, lora = served(arch, dirs, xla_device, backend=backend)
    experts = [layer for layer in lora.layers.values() if isinstance(layer, ExpertsWithLoRA)]
    if backend == "pallas":
        assert all(layer.lane_padded and layer.lora_a_down.shape[2] == 128 for layer in experts)
    lora.set_batch(ROWS)
    with torch.no_grad():
        # No cache: transformers' dynamic sliding-window cache fails on XLA (GPT-OSS).
        logits = model(IDS.to(xla_device), use_cache=False).logits.cpu()
    for row, name in enumerate(ROWS):
        assert_close(logits[row], reference[name][row])
    if backend == "pallas":  # the up and down projections' padded slots (in 32 and 16) ran the fused kernel
        assert set(traced) == {128}
        import torch_xla

        from torch_xla_lora import assert_no_recompile

        def forward(ids):
            return model(ids, use_cache=False).logits

        lora.warmup([4], [5], step=forward, progress=False)
        with assert_no_recompile() as counter:  # another mix, and an adapter written again into padded slots
            lora.remove("math")
            lora.load_adapter("math", dirs["math"])
            mix = ["code", "math", None, None]
            lora.set_batch(mix)
            with torch.no_grad():
                logits = forward(IDS.to(xla_device))
                torch_xla.sync()
            assert counter.count == 0
        logits = logits.cpu()
        for row, name in enumerate(mix):
            assert_close(logits[row], reference[name][row])


def test_token_adapters_equal_peft(saved):
    dirs = saved("Qwen3Moe")
    ids = IDS[:1]
    reference = peft_reference("Qwen3Moe", dirs, ids)
    model, lora = served("Qwen3Moe", dirs, torch.device("cpu"))
    # Every token of the one row on "code": per-token slots must reach the flattened MoE tokens.
    lora.set_token_adapters(["code"] * ids.shape[1])
    with torch.no_grad():
        assert_close(model(ids).logits, reference["code"])


def test_slot_reuse_and_removal(saved):
    dirs = saved("Mixtral")
    reference = peft_reference("Mixtral", dirs, IDS[:1])
    model, lora = served("Mixtral", dirs, torch.device("cpu"), max_loras=1, max_cpu_adapters=2)
    for name in ("math", "code", "math"):  # each evicts the other from the one slot
        lora.set_batch([name])
        with torch.no_grad():
            assert_close(model(IDS[:1]).logits, reference[name])
    lora.remove("math")
    lora.set_batch([0])  # the freed slot now holds zeros: base output
    with torch.no_grad():
        assert_close(model(IDS[:1]).logits, reference[None])


def test_no_batch_runs_the_base_experts(saved):
    dirs = saved("Olmoe")
    reference = peft_reference("Olmoe", dirs, IDS)
    model, lora = served("Olmoe", dirs, torch.device("cpu"))
    lora.pin("math")
    with torch.no_grad():
        assert_close(model(IDS).logits, reference[None])


@pytest.mark.parametrize("mode,budget", [("lazy", None), ("compiled", 10**7)], ids=["lazy", "compiled-pool"])
def test_zero_recompiles_after_warmup(mode, budget, saved, xla_device):
    """One graph for every adapter mix and a load after warm-up: padded slots in lazy mode, pools under
    ``torch.compile`` (the experts' entry table derived in the graph from the batch's row table, the router's
    LoRA traced through its function mode into the one graph either way)."""
    import torch_xla

    from torch_xla_lora import assert_no_recompile

    dirs = saved("Mixtral")
    model, lora = served("Mixtral", {"math": dirs["math"]}, xla_device, max_loras=2, memory_budget=budget)

    def forward(ids):
        return model(ids, use_cache=False).logits

    # The router's LoRA goes through a TorchFunctionMode: dynamo must trace it into the one graph.
    step = forward if mode == "lazy" else torch.compile(forward, backend="openxla")

    lora.warmup([4], [5], step=step, progress=False)
    with assert_no_recompile() as counter:
        for rows in (["math", None, None, "math"], [None] * 4, ["math"] * 4, "load", ["code", "math", None, "code"]):
            if rows == "load":  # a new adapter after warm-up: a slot write, no new graph
                lora.load_adapter("code", dirs["code"])
                continue
            lora.set_batch(rows)
            with torch.no_grad():
                logits = step(IDS.to(xla_device))
                torch_xla.sync()
            del logits
        assert counter.count == 0
    reference = peft_reference("Mixtral", dirs, IDS)
    with torch.no_grad():
        logits = step(IDS.to(xla_device)).cpu()
    for row, name in enumerate(["code", "math", None, "code"]):
        assert_close(logits[row], reference[name][row])


# -- the grouped experts: memory and gradients ------------------------------------------------------


def _routing(num_tokens: int, top_k: int, experts: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    return index, torch.rand(num_tokens, top_k, generator=gen)


def _largest_intermediate(tensor: torch.Tensor) -> int:
    """Elements of the largest array in the pending XLA graph of ``tensor`` (parameters included), read off its HLO
    text: every instruction of the entry computation and of the computations it calls (the JAX functions of
    the library's ops)."""
    import re

    import torch_xla

    hlo = torch_xla._XLAC._get_xla_tensors_hlo([tensor])
    dims = re.findall(r"\b(?:pred|[sfu]\d+|bf16)\[([\d,]*)\]", hlo)
    return max(math.prod(int(d) for d in shape.split(",")) if shape else 1 for shape in dims)


@pytest.mark.parametrize("batch", ["mixed", "none"])
def test_grouped_experts_temporaries_follow_the_rows(batch, xla_device):
    """No array of the experts layer's graph exceeds the larger of rows x widest projection and one expert
    weight tensor, with a batch (expert LoRA) and without one (the model configured with ``batched_mm``): a
    weight gathered per routed row, [N * K, out, in], as ``batched_mm`` itself does (checked below), is 32x
    that here. Counted in the traced graph, so it holds whatever XLA later fuses."""
    model = moe_model("Mixtral", "batched_mm").to(xla_device)
    experts = model.model.layers[0].mlp.experts
    context = BatchContext()
    layer = ExpertsWithLoRA(experts, context, max_loras=2, max_rank=4, dtype=torch.float32)
    num_tokens, top_k = 64, 2
    hidden = torch.randn(num_tokens, _COMMON["hidden_size"]).to(xla_device)
    index, weights = (t.to(xla_device) for t in _routing(num_tokens, top_k, 4, seed=5))
    if batch == "mixed":
        context.set(torch.tensor([0, -1, 1, 0], dtype=torch.int32).to(xla_device), False)
    rows = num_tokens * top_k
    width = max(experts.gate_up_proj.shape[1], experts.down_proj.shape[1])
    bound = max(rows * width, experts.gate_up_proj.numel())
    gathered = rows * experts.gate_up_proj[0].numel()
    assert gathered >= 32 * bound
    assert _largest_intermediate(layer(hidden, index, weights)) <= bound
    assert _largest_intermediate(experts(hidden, index, weights)) >= gathered  # the test's teeth: batched_mm


def _plain_experts(experts, x, index, weights, slots, buffers: dict) -> torch.Tensor:
    """The expert layer in float64 plain torch: each routed row with its expert's weight gathered and its
    (slot, expert) LoRA entry, zero for a token without slot."""
    num_experts, top_k = experts.gate_up_proj.shape[0], index.shape[1]
    rows_x = x.repeat_interleave(top_k, dim=0)
    expert = index.reshape(-1)
    slot = slots.repeat_interleave(top_k)
    entry = (slot * num_experts + expert).clamp(min=0)
    has_lora = (slot >= 0).double()[:, None, None]

    def project(inputs, weight, bias, a, b):
        w = weight.double()[expert]
        out = torch.einsum("si,sio->so", inputs, w) if experts.is_transposed else torch.einsum("si,soi->so", inputs, w)
        if bias is not None:
            out = out + bias.double()[expert]
        a_rows, b_rows = a[entry] * has_lora, b[entry] * has_lora
        return out + torch.einsum("sr,sro->so", torch.einsum("sri,si->sr", a_rows, inputs), b_rows)

    has_bias = getattr(experts, "has_bias", False)
    up = project(rows_x, experts.gate_up_proj, experts.gate_up_proj_bias if has_bias else None,
                 buffers["lora_a"], buffers["lora_b"])  # fmt: skip
    h = experts._apply_gate(up)
    down = project(h, experts.down_proj, experts.down_proj_bias if has_bias else None,
                   buffers["lora_a_down"], buffers["lora_b_down"])  # fmt: skip
    weighted = down * weights.reshape(-1, 1).double()
    return weighted.view(index.shape[0], top_k, -1).sum(dim=1)


BUFFERS = ("lora_a", "lora_b", "lora_a_down", "lora_b_down")


# On XLA GPT-OSS only (each case compiles a forward and backward of ~20 s here): its forward runs the
# transposed layout and its input gradient the other one; tests/test_grouped.py covers both on the device.
@pytest.mark.parametrize(("arch", "on_xla"), [("Mixtral", False), ("GptOss", False), ("GptOss", True)],
                         ids=["Mixtral-cpu", "GptOss-cpu", "GptOss-xla"])  # fmt: skip
def test_grouped_experts_gradients_equal_float64_plain(arch, on_xla, request):
    """The grouped path stays differentiable: gradients of the hidden states, of the four slot buffers and of
    the base expert weights (frozen in serving, trainable here) equal torch.autograd through the float64 plain
    formulation, for a mix of two slots and base tokens; (slot, expert) entries no row uses get exact zeros.
    Mixtral's [E, out, in] weights, and GPT-OSS's transposed [E, in, out] ones with biases."""
    device = request.getfixturevalue("xla_device") if on_xla else torch.device("cpu")
    experts = moe_model(arch, "batched_mm").model.layers[0].mlp.experts.to(device)
    context = BatchContext()
    layer = ExpertsWithLoRA(experts, context, max_loras=2, max_rank=4, dtype=torch.float32)
    num_experts, num_tokens, top_k = 4, 12, 2
    gen = torch.Generator().manual_seed(6)
    values = {name: torch.randn(getattr(layer, name).shape, generator=gen) * 0.3 for name in BUFFERS}
    for name, value in values.items():
        setattr(layer, name, value.to(device).requires_grad_())
    hidden = torch.randn(num_tokens, _COMMON["hidden_size"], generator=gen)
    index, weights = _routing(num_tokens, top_k, num_experts, seed=7)
    slots = torch.tensor([0, 1, -1, 0, 0, 1, -1, -1, 1, 0, 1, 0], dtype=torch.int32)
    index[slots == 1] = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1]])  # slot 1 never meets expert 3
    context.set(slots.to(device), per_token=True)
    grad_out = torch.randn(num_tokens, _COMMON["hidden_size"], generator=gen)

    x = hidden.to(device).requires_grad_()
    bases = [experts.gate_up_proj, experts.down_proj]
    out = layer(x, index.to(device), weights.to(device))
    leaves = [x, *(getattr(layer, n) for n in BUFFERS), *bases]
    actual = torch.autograd.grad(out, leaves, grad_out.to(device))

    x64 = hidden.double().requires_grad_()
    buffers64 = {n: v.double().requires_grad_() for n, v in values.items()}
    cpu_experts = moe_model(arch, "batched_mm").model.layers[0].mlp.experts.double()
    bases64 = [cpu_experts.gate_up_proj, cpu_experts.down_proj]
    expected_out = _plain_experts(cpu_experts, x64, index, weights, slots, buffers64)
    expected = torch.autograd.grad(expected_out, [x64, *buffers64.values(), *bases64], grad_out.double())

    assert_close(out, expected_out, torch.float32)
    names = ["x", *BUFFERS, "gate_up_proj", "down_proj"]
    for name, a, e in zip(names, actual, expected, strict=True):
        assert a.shape == e.shape, name
        assert_close(a, e, torch.float32)
    used = set((slots.repeat_interleave(top_k) * num_experts + index.reshape(-1)).tolist())
    unused = [entry for entry in range(2 * num_experts) if entry not in used]
    assert unused  # routing leaves some (slot, expert) pairs out
    for name, grad in zip(BUFFERS, actual[1:5], strict=True):
        assert torch.equal(grad[unused].cpu(), torch.zeros_like(grad[unused].cpu())), name


def test_bench_moe_command_smoke(capsys):
    from torch_xla_lora.bench import moe

    args = ["--hidden", "64", "--layers", "1", "--experts", "4", "--batch", "2", "--seq", "4", "--reps", "1"]
    assert moe.main(args) == 0
    out = capsys.readouterr().out
    assert "| moe | LoRA all-linear + experts + router |" in out and "| dense | base |" in out


def test_bench_moe_targets_verdicts():
    """The verdicts ``bench moe --targets`` prints (its runs take minutes; docs/performance.md has them)."""
    from torch_xla_lora.bench import moe

    row = {"ms": 1.0, "resident_mib": 1.0, "forward_peak_mib": 1.0, "total_mib": 2.0, "max_abs_diff_vs_eager": 0.0}
    rows = [row | {"case": name} for name in moe.CASES]
    targets = {"gathered_gib": 66.0, "skipped": False, "lora_vs_batched_mm_speedup": 2.0,
               "lora_total_vs_eager_total": 1.11, "lora_vs_base_only": 1.1}  # fmt: skip
    out = moe.format_targets(rows, targets)
    assert "batched_mm base gathers 66.0 GiB" in out
    assert "2.0x faster (target >= 2x: met)" in out
    assert "eager base: 1.11x (target <= 1.10x: MISSED)" in out
    assert "base-only batch: 1.10x (target <= 1.10x: met)" in out
    out = moe.format_targets(rows, targets | {"skipped": True, "lora_vs_batched_mm_speedup": None})
    assert "skipped, it would gather 66.0 GiB" in out and "faster" not in out
    config = type("Args", (), {"batch": 4, "seq": 256, "top_k": 2, "expert_width": 2816, "hidden": 1024})
    assert moe.gathered_gib(config) == 2048 * 3 * 2816 * 1024 * 4 / 2**30  # 2,048 rows x (gate_up + down)


@pytest.mark.parametrize(
    "arch,on_xla,backend",
    [("GptOss", False, "auto"), ("Qwen2Moe", False, "auto"), ("Mixtral", True, "auto"), ("Mixtral", True, "pallas")],
)
def test_mixed_batch_in_a_pool_equals_peft(arch, on_xla, backend, saved, xla_device, monkeypatch):
    """Rank-true storage (``memory_budget``) holds expert and router LoRA too, and no layer gathers its lanes
    into slots: the experts read each (lane, expert) entry's true-rank rows from their pools (the row table of
    ``ExpertsWithLoRA._entry_tables``), the router and the linear layers their lanes' rows (docs/layers.md). With
    the Pallas backend the pooled kernel reads the experts' pools a page at a time, each expert's block
    starting on an aligned page (``pool.kernel_pool_rows``)."""

    def gathered(*args, **kwargs):
        raise AssertionError("a layer gathered its lanes into slots")

    monkeypatch.setattr(pool, "gather_slots", gathered)
    dirs = saved(arch)
    reference = peft_reference(arch, dirs, IDS)
    device = xla_device if on_xla else torch.device("cpu")
    model, lora = served(arch, dirs, device, memory_budget=10**7, backend=backend)
    assert lora.manager.pooled
    if backend == "pallas":
        assert (lora.manager.rows + pool.SPARE_ROWS) % pool.KERNEL_PAGE_ROWS == 0
    lora.set_batch(ROWS)
    with torch.no_grad():
        logits = model(IDS.to(device), use_cache=False).logits.cpu()
    for row, name in enumerate(ROWS):
        assert_close(logits[row], reference[name][row])
    assert set(lora.memory()["adapters"]) == {"math", "code"}


@pytest.mark.parametrize("on_xla", [False, True])
def test_pooled_experts_carry_the_gradient_of_their_inputs(on_xla, saved, xla_device, monkeypatch):
    """With gradients recorded for the activations (a model trained around served adapters: an unfrozen part
    upstream, prompt embeddings) every layer still reads its pools, the experts each (lane, expert) entry at its
    true rank, and the gradient of the inputs equals, row by row, PEFT's with each row's adapter alone
    (``pooled_shrink_expand``'s backward: the same op with the pools' roles swapped)."""
    from peft import PeftModel

    def gathered(*args, **kwargs):
        raise AssertionError("a layer gathered its lanes into slots")

    monkeypatch.setattr(pool, "gather_slots", gathered)
    dirs = saved("Mixtral")
    device = xla_device if on_xla else torch.device("cpu")
    model, lora = served("Mixtral", dirs, device, memory_budget=10**7)
    lora.set_batch(ROWS)
    embeds = moe_model("Mixtral").get_input_embeddings()(IDS).detach()
    inputs = embeds.to(device, copy=True).requires_grad_()
    model(inputs_embeds=inputs, use_cache=False).logits.float().pow(2).sum().backward()
    expected = torch.zeros_like(embeds)
    for name in set(ROWS):
        mine = [row for row, row_name in enumerate(ROWS) if row_name == name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = (
                moe_model("Mixtral") if name is None else PeftModel.from_pretrained(moe_model("Mixtral"), dirs[name])
            )
        leaf = embeds.clone().requires_grad_()
        reference.eval()(inputs_embeds=leaf).logits[mine].float().pow(2).sum().backward()
        expected[mine] = leaf.grad[mine]
    assert_close(inputs.grad.cpu(), expected)
    assert expected[[0, 2]].abs().sum() > 0


@pytest.mark.parametrize(("backend", "wide"), [("auto", False), ("pallas", False), ("pallas", True)])
def test_int8_expert_pools_equal_plain_math_on_int8_rounded_factors(backend, wide, saved, xla_device, monkeypatch):
    """int8 expert pools read at their true rank compute exactly the adapters with each (slot, expert) entry's
    rank rows rounded to int8 (one absmax scale per row, rounded here in plain torch from the padded float
    slots), by the float64 plain experts (the int8 quality bound against float adapters is measured on whole
    models: ``bench memory --quality``, tests/test_pool.py). On "pallas" (the allocator's aligned pages) the layer
    hands the op its four pools stacked, [E, P + 2, width], nothing gathered; at the default model's widths (32,
    under the kernel's 128 lanes) the op reads them by its XLA-native path, at :data:`WIDE` ones by the pooled
    kernel (interpret mode), through the entries' page table and the kept page scales the layer passes, each
    projection cut to its own rank (PEFT's ``"all-linear"`` gives ``gate_up_proj`` rank 8, ``down_proj`` 4);
    libtpu compiles the experts' call (tests/test_tpu_compile.py)."""
    from torch_xla_lora.kernels import fused

    def gathered(*args, **kwargs):
        raise AssertionError("a layer gathered its lanes into slots")

    monkeypatch.setattr(pool, "gather_slots", gathered)
    kernel_calls = []
    original = fused.pooled_shrink_expand

    def kernel(*args, **kwargs):
        kernel_calls.append(args[5])  # the page table the kernel reads (traced)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "pooled_shrink_expand", kernel)
    dirs = saved("Mixtral", wide)
    model, lora = served("Mixtral", dirs, xla_device, wide, memory_budget=10**7, weight_dtype="int8", backend=backend)
    float_model, float_lora = served("Mixtral", dirs, torch.device("cpu"), wide)  # padded float slots: the factors
    lora.set_batch(ROWS)
    float_lora.set_batch(ROWS)
    layer = model.model.layers[0].mlp.experts
    float_layer = float_model.model.layers[0].mlp.experts
    assert layer.pool_rows is not None and float_layer.pool_rows is None
    # Each projection's page scales kept beside its pools, all in the budget: the 4 experts' scales 4 to a tile,
    # each expert's P + 2 rows in whole blocks of 256 (1024 / 4).
    assert layer.num_experts == 4
    blocks = 4 * -(-(layer.pool_rows + 2) // 256) * 256
    assert layer.lora_page_scale.shape == layer.lora_page_scale_down.shape == (blocks,)
    stored = [b for n, b in model.named_buffers() if "_pool" in n or "_scale" in n]
    assert sum(b.numel() * b.element_size() for b in stored) <= 10**7

    def rounded(values: torch.Tensor) -> torch.Tensor:  # [entries, R, width], per (entry, rank row)
        scale = values.double().abs().amax(dim=2, keepdim=True) / 127
        return torch.round(values.double() / scale.clamp(min=1e-300)).clamp(-127, 127) * scale

    buffers = {name: rounded(getattr(float_layer, name)) for name in BUFFERS}
    seq = 6
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(len(ROWS) * seq, (WIDE if wide else _COMMON)["hidden_size"], generator=gen)
    index, weights = _routing(len(ROWS) * seq, 2, 4, seed=4)
    slots = float_lora.context.slots.repeat_interleave(seq)  # each row's slot, per token
    with torch.no_grad():
        out = layer(hidden.to(xla_device), index.to(xla_device), weights.to(xla_device)).cpu()
    expected = _plain_experts(float_layer.base_layer.double(), hidden.double(), index, weights, slots, buffers)
    assert_close(out, expected, torch.float32)
    assert len(kernel_calls) == (2 if wide else 0)  # both projections by the kernel where their widths allow


def test_rank_and_alpha_patterns_on_a_router_weight_apply_as_in_peft(tmp_path):
    """PEFT matches pattern keys against a targeted parameter's name (``gate.weight``), not its module's."""
    from peft import PeftModel

    config = lora_config("Qwen2Moe", 0, rank_pattern={"gate.weight": 4}, alpha_pattern={"gate.weight": 3})
    torch.manual_seed(9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(moe_model("Qwen2Moe"), config).save_pretrained(tmp_path)
        expected = PeftModel.from_pretrained(moe_model("Qwen2Moe"), tmp_path).eval()
    model = moe_model("Qwen2Moe")
    lora = patch_model(model, LoRAConfig(max_loras=1, max_rank=8))
    lora.load_adapter("r", tmp_path)
    modules = lora.manager._host["r"].modules
    assert {modules[n].rank for n in modules if n.endswith("mlp.gate")} == {4}  # r=2 elsewhere
    lora.set_batch(["r"] * len(IDS))
    with torch.no_grad():
        assert_close(model(IDS).logits, expected(IDS).logits)
