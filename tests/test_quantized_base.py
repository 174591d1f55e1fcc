"""LoRA on torch_xla's weight-only quantized linear layers (docs/layers.md, "Quantized bases").

The reference is PEFT's mixed batch (``adapter_names``) on the same model with every quantized
projection replaced by an ``nn.Linear`` holding its dequantized weight in float32: the quantized
layer computes exactly that linear map, so the two agree to float32 rounding.
"""

import copy
import warnings

import pytest
import torch
import torch_xla
from conftest import assert_close, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from torch import nn
from torch_xla.experimental.xla_quantized_matmul import XlaQuantizedLinear

import torch_xla_lora as tl
from torch_xla_lora import ops
from torch_xla_lora.ops import _linear_fused

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantize(linear: nn.Linear, scheme: str) -> tuple[XlaQuantizedLinear, torch.Tensor]:
    """(torch_xla's quantized layer for ``linear``'s weight, the weight it computes with, dequantized)."""
    weight = linear.weight.detach()  # [out, in]
    out_dim, in_dim = weight.shape
    if scheme == "blockwise":
        block = 16
        blocks = weight.T.reshape(in_dim // block, block, out_dim)  # [in / block, block, out]
        scale = blocks.abs().amax(dim=1) / 127  # [in / block, out]
        q = torch.round(blocks / scale[:, None]).to(torch.int8)
        layer = XlaQuantizedLinear(in_dim, out_dim, is_symmetric=True, block_size=block)
        layer.load_quantized_weight(q, scale)
        dequantized = (q.float() * scale[:, None]).reshape(in_dim, out_dim).T
        return layer, dequantized
    if scheme == "int4":  # int4 values per output channel, in torch_xla's int8 container
        scale = weight.abs().amax(dim=1) / 7
        q = torch.round(weight / scale[:, None]).clamp(-8, 7).to(torch.int8)
        layer = XlaQuantizedLinear(in_dim, out_dim, is_symmetric=True, int4_weight=True)
        layer.load_quantized_weight(q, scale)
        return layer, q.float() * scale[:, None]
    scale = weight.abs().amax(dim=1) / 127  # per output channel
    q = torch.round(weight / scale[:, None]).to(torch.int8)
    if scheme == "asymmetric":
        zero_point = torch.linspace(-0.01, 0.01, out_dim)
        layer = XlaQuantizedLinear(in_dim, out_dim, is_symmetric=False)
        layer.load_quantized_weight(q, scale, zero_point)
        # out = x (q * scale)^T - sum(x) * zero_point
        return layer, q.float() * scale[:, None] - zero_point[:, None]
    layer = XlaQuantizedLinear(in_dim, out_dim, is_symmetric=True)
    layer.load_quantized_weight(q, scale)
    return layer, q.float() * scale[:, None]


def _quantized_and_float(scheme: str, **overrides) -> tuple[nn.Module, nn.Module]:
    """A tiny Llama with every projection quantized, and the float model computing the same maps."""
    quantized, dequantized = tiny_llama(**overrides), tiny_llama(**overrides)
    for name, module in list(quantized.named_modules()):
        if name.rpartition(".")[2] in PROJECTIONS:
            layer, weight = _quantize(module, scheme)
            parent = name.rpartition(".")[0]
            setattr(quantized.get_submodule(parent), name.rpartition(".")[2], layer)
            with torch.no_grad():
                dequantized.get_submodule(name).weight.copy_(weight)
    return quantized, dequantized


ADAPTERS = {
    "a": {"r": 4, "lora_alpha": 8, "target_modules": list(PROJECTIONS)},
    "b": {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
}


def _peft(base: nn.Module, tmp_path) -> PeftModel:
    torch.manual_seed(3)
    peft_model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kwargs in ADAPTERS.items():
            config = LoraConfig(init_lora_weights=False, **kwargs)
            if peft_model is None:
                peft_model = get_peft_model(base, config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
        for name in ADAPTERS:
            peft_model.save_pretrained(tmp_path, selected_adapters=[name])
    return peft_model.eval()


@pytest.mark.parametrize(
    "scheme,mode",
    [("symmetric", "lazy"), ("blockwise", "lazy"), ("asymmetric", "compile")],
)
def test_mixed_batch_on_a_quantized_base_equals_peft_on_the_dequantized_base(scheme, mode, tmp_path, xla_device):
    quantized, dequantized = _quantized_and_float(scheme)
    peft_model = _peft(copy.deepcopy(dequantized), tmp_path)
    lora = tl.patch_model(quantized.to(xla_device), tl.LoRAConfig(max_loras=2, max_rank=8))
    assert {n.rpartition(".")[2] for n in lora.layers} == set(PROJECTIONS)
    for name in ADAPTERS:
        path = tmp_path / name if name != "default" else tmp_path
        lora.load_adapter(name, path)
    rows = ["a", None, "b", "a"]
    ids = torch.randint(0, 64, (len(rows), 5), generator=torch.Generator().manual_seed(0))
    lora.set_batch(rows)
    forward = torch.compile(lora.model, backend="openxla") if mode == "compile" else lora.model
    with torch.no_grad():
        logits = forward(ids.to(xla_device)).logits
        torch_xla.sync()
        names = [n if n is not None else "__base__" for n in rows]
        expected = peft_model(ids, adapter_names=names).logits
    assert_close(logits, expected)


@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_int8_per_channel_base_runs_fused_and_equals_peft_on_the_dequantized_base(
    backend, tmp_path, xla_device, monkeypatch
):
    """base_fusion=True on int8 per-channel symmetric weights: every projection runs ``linear_lora_fused``
    with the int8 weight and its scales (the one-pass kernel in interpret mode on "pallas", the
    XLA-native ``(x q^T) * s`` on "xla"), equal to PEFT on the dequantized float base."""
    quantized, dequantized = _quantized_and_float("symmetric")
    peft_model = _peft(copy.deepcopy(dequantized), tmp_path)
    config = tl.LoRAConfig(max_loras=2, max_rank=8, base_fusion=True, backend=backend)
    lora = tl.patch_model(quantized.to(xla_device), config)
    for name in ADAPTERS:
        lora.load_adapter(name, tmp_path / name)
    calls = []
    op = _linear_fused.linear_lora_fused

    def spy(inputs, weight, *args, **kwargs):
        calls.append((weight.dtype, kwargs.get("weight_scale") is not None))
        return op(inputs, weight, *args, **kwargs)

    monkeypatch.setattr(_linear_fused, "linear_lora_fused", spy)
    rows = ["a", None, "b", "a"]
    ids = torch.randint(0, 64, (len(rows), 5), generator=torch.Generator().manual_seed(2))
    lora.set_batch(rows)
    with torch.no_grad():
        logits = lora.model(ids.to(xla_device)).logits
        torch_xla.sync()
        expected = peft_model(ids, adapter_names=[n if n is not None else "__base__" for n in rows]).logits
    assert len(calls) == len(lora.layers) and set(calls) == {(torch.int8, True)}
    magnitude = expected.abs().max().item()  # relative 1e-4 in float32
    torch.testing.assert_close(logits.cpu(), expected, atol=1e-4 * magnitude, rtol=1e-4)


@pytest.mark.parametrize(
    "scheme,mode",
    [
        ("symmetric", "lazy"),
        ("blockwise", "compile"),
        ("symmetric", "fused"),
        ("symmetric", "fused-compile"),
        ("symmetric", "fused-pallas"),
    ],
)
def test_training_on_a_quantized_base_equals_peft_on_the_dequantized_base(scheme, mode, xla_device, monkeypatch):
    """QLoRA-style: adapters trained on the frozen quantized base get PEFT's gradients on the dequantized
    float base (gradients flow through the quantized matmul to the activations). "fused" (``base_fusion=True``,
    the decoders arranged): every projection reads its int8 weight in ``linear_lora_fused``'s training forward
    (``keep_s``) and its backward reads it transposed as int8 (no float copy of a weight is made); under
    ``torch.compile`` too ("fused-compile"). "fused-pallas": the Pallas backend (interpret mode here), where each
    projection's backward takes dx, ds and dB in its pass over g reading the int8 weight and each decoder's q/k/v
    and gate/up train as groups with one dA pass over their shared input (``layers/shared_input.py``), each group's
    kernels reading the norm's input and applying it."""
    quantized, dequantized = _quantized_and_float(scheme)
    calls = []
    if mode == "fused":
        from torch_xla_lora.ops import _linear_fused

        def spy(inputs, weight, *args, **kwargs):
            calls.append((weight.dtype, kwargs.get("keep_s", False), kwargs.get("weight_in_scale") is not None))
            return op(inputs, weight, *args, **kwargs)

        def no_float_copy(*args, **kwargs):
            raise AssertionError("an int8 weight was dequantized to a float copy")

        op = _linear_fused.linear_lora_fused
        monkeypatch.setattr(_linear_fused, "linear_lora_fused", spy)
        monkeypatch.setattr(_linear_fused, "dequantize", no_float_copy)
    groups = []
    if mode == "fused-pallas":
        from torch_xla_lora.layers import shared_input

        run_group = shared_input.run

        def group_spy(projs, x, *norm):  # (the norm's row factor and weight: taken into the group's kernels)
            groups.append((len(projs), len(norm)))
            return run_group(projs, x, *norm)

        monkeypatch.setattr(shared_input, "run", group_spy)
    backend = "pallas" if mode == "fused-pallas" else "auto"
    config = tl.LoRAConfig(max_loras=2, max_rank=8, base_fusion=mode.startswith("fused"), backend=backend)
    lora = tl.patch_model(quantized.to(xla_device), config)
    torch.manual_seed(4)
    config = LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=list(PROJECTIONS))
    lora.create_adapter("a", config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(dequantized, LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJECTIONS)))
    set_peft_model_state_dict(peft_model, {k: v.detach().cpu() for k, v in lora.trainable_parameters("a").items()})
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    lora.model.train()
    lora.set_batch(["a", None, "a"])
    forward = torch.compile(lora.model, backend="openxla") if mode.endswith("compile") else lora.model
    forward(ids.to(xla_device)).logits[[0, 2]].float().pow(2).mean().backward()
    torch_xla.sync()
    if mode == "fused":  # each projection's training forward, then its backward's transposed int8 read for dx
        forwards = [(torch.int8, True, False)] * len(PROJECTIONS) * len(lora.fused_decoders)
        # (but the first decoder's q/k/v: their input, the frozen embedding's output, needs no gradient)
        assert calls == forwards + [(torch.int8, False, True)] * (len(forwards) - 3), calls
    if mode == "fused-pallas":  # (the first decoder's q/k/v read the frozen embedding's output: no dx, alone)
        decoders = len(lora.fused_decoders)
        assert sorted(groups) == [(2, 2)] * decoders + [(3, 2)] * (decoders - 1), groups
    peft_model.train()
    peft_model(ids[[0, 2]]).logits.float().pow(2).mean().backward()
    grads = {k: p.grad for k, p in peft_model.named_parameters() if p.grad is not None}
    for key, param in lora.trainable_parameters("a").items():
        expected = grads[key.replace(".weight", ".default.weight")]
        # Relative 1e-4 (the step's target): the blockwise matmul sums in another order than a dense one.
        magnitude = expected.abs().max().item()
        torch.testing.assert_close(param.grad.cpu(), expected, atol=1e-4 * magnitude, rtol=1e-4)


def test_int4_weights_are_refused_on_a_mesh_and_nothing_changes():
    """int8 weights are sharded on a mesh (tests/test_sharding.py); int4 ones (unpacked on the host at every
    forward by torch_xla) are not: a typed error before the model is changed."""
    import numpy as np
    import torch_xla.distributed.spmd as xs

    quantized, _ = _quantized_and_float("symmetric")
    quantized.model.layers[1].mlp.down_proj.int4_weight = True
    before = {name: type(module) for name, module in quantized.named_modules()}
    mesh = xs.Mesh(np.array([0]), (1,), ("model",))
    with pytest.raises(tl.ShardingError, match="'model.layers.1.mlp.down_proj'.*int4"):
        tl.patch_model(quantized, mesh=mesh)
    assert {name: type(module) for name, module in quantized.named_modules()} == before


def _int4_hlo(layer: nn.Module, device: torch.device) -> str:
    """The HLO torch_xla builds for ``layer`` on one row (not executed: its tensors die with this call)."""
    return torch_xla._XLAC._get_xla_tensors_hlo([layer(torch.ones(1, layer.input_dim, device=device))])


def test_int4_weights_equal_peft_on_a_tpu_and_are_refused_on_other_xla_devices(tmp_path, xla_device):
    """torch_xla runs int4 weights as XLA's s4 type (cast on the host, a constant of the graph), which only
    TPUs compile (XLA:CPU's verifier rejects s4: "custom element sizes"; executing such a graph here also
    leaves torch_xla's runtime unusable, so it is not run). Off TPU, patch_model refuses them with a typed
    error naming the module and the reason, before changing the model; on a TPU the mixed batch equals
    PEFT's on the dequantized float base."""
    quantized, dequantized = _quantized_and_float("int4")
    quantized.to(xla_device)
    q_proj = quantized.model.layers[0].self_attn.q_proj
    assert " s4[" in _int4_hlo(q_proj, xla_device)  # the s4 cast the refusal names
    if ops.device_generation() == "cpu":
        before = {name: type(module) for name, module in quantized.named_modules()}
        with pytest.raises(tl.ConfigError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*int4.*s4.*TPU"):
            tl.patch_model(quantized, tl.LoRAConfig(max_loras=2, max_rank=8))
        assert {name: type(module) for name, module in quantized.named_modules()} == before
        # Not over-broad: a model whose int4 layers are left out of the targets is patched.
        lora = tl.patch_model(quantized, tl.LoRAConfig(max_loras=2, max_rank=8, target_modules=["lm_head"]))
        assert list(lora.layers) == ["lm_head"]
        return
    peft_model = _peft(copy.deepcopy(dequantized), tmp_path)
    lora = tl.patch_model(quantized, tl.LoRAConfig(max_loras=2, max_rank=8))
    for name in ADAPTERS:
        lora.load_adapter(name, tmp_path / name)
    rows = ["a", None, "b", "a"]
    ids = torch.randint(0, 64, (len(rows), 5), generator=torch.Generator().manual_seed(5))
    lora.set_batch(rows)
    with torch.no_grad():
        logits = lora.model(ids.to(xla_device)).logits
        torch_xla.sync()
        expected = peft_model(ids, adapter_names=[n if n is not None else "__base__" for n in rows]).logits
    assert_close(logits, expected)


@pytest.mark.parametrize("scheme,mode", [("symmetric", "lazy"), ("blockwise", "compiled")])
def test_serving_loop_on_a_quantized_base_compiles_nothing_after_warmup(scheme, mode, xla_device):
    """As tests/test_recompile.py for a float base: after ``warmup``, loads, reloads, evictions and adapter
    mixes on int8 per-channel or blockwise projections compile nothing and copy nothing to the host."""
    import peft
    import torch_xla.debug.metrics as met

    quantized, dequantized = _quantized_and_float(scheme, num_hidden_layers=1)
    adapters = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(4):
            config = LoraConfig(init_lora_weights=False, r=4 + 4 * (i % 2), lora_alpha=8, target_modules=[*PROJECTIONS])
            state = peft.get_peft_model_state_dict(get_peft_model(copy.deepcopy(dequantized), config))
            adapters[f"a{i}"] = (state, config)
    model = quantized.to(xla_device)
    lora = tl.patch_model(model, tl.LoRAConfig(max_loras=2, max_rank=8))
    forward = lambda ids: model(ids).logits
    step = forward if mode == "lazy" else torch.compile(forward, backend="openxla")
    assert lora.warmup([3], [4], step=step, progress=False) >= 1  # this test's graphs are its own

    def transfers() -> int:
        data = met.metric_data("TransferFromDeviceTime")
        return int(data[0]) if data else 0

    names, rng = list(adapters), torch.Generator().manual_seed(6)
    with tl.assert_no_recompile() as counter:
        for i in range(10):
            name = names[i % len(names)]
            lora.load_adapter(name, state_dict=adapters[name][0], config=adapters[name][1])  # load or reload
            if i % 5 == 4:
                lora.remove(names[(i + 1) % len(names)])
            loaded = list(lora.adapters())
            batch = [loaded[int(j)] if j < len(loaded) else None for j in torch.randint(0, 3, (3,), generator=rng)]
            try:
                lora.set_batch(batch)
            except tl.NoFreeSlotError:  # more distinct adapters than slots: one of them
                lora.set_batch([batch[0]] * 3)
            before = transfers()
            with torch.no_grad():
                logits = step(torch.randint(0, 64, (3, 4), generator=rng).to(xla_device))
                torch_xla.sync()
            assert transfers() == before, "the forward pass must not copy device data to the host"
            del logits
        assert counter.count == 0


def test_concurrency_contract_on_a_quantized_base(tmp_path, xla_device):
    """tests/test_concurrency.py's stress run on int8 per-channel projections: loader threads load, reload,
    pin, unpin and remove adapters while batches are set and run; every row is PEFT's output for the adapter
    named for it on the dequantized float base (or a failed set_batch raised a typed error and changed
    nothing), and nothing compiles after warm-up."""
    import test_concurrency as stress

    quantized, dequantized = _quantized_and_float("symmetric", num_hidden_layers=1)
    peft_model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, offset in stress.VERSIONS.items():
            torch.manual_seed(300 + offset)
            config = LoraConfig(target_modules=stress.TARGETS, init_lora_weights=False, r=2 + offset, lora_alpha=8)
            if peft_model is None:
                peft_model = get_peft_model(dequantized, config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
        peft_model.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        names = [*stress.VERSIONS, "__base__"]
        reference = {n: peft_model(stress.IDS, adapter_names=[n] * stress.BATCH).logits for n in names}
    reference[None] = reference.pop("__base__")
    model, lora = stress._patched(quantized, xla_device)
    forward = lambda ids: model(ids).logits
    lora.warmup([stress.BATCH], [stress.SEQ], step=forward, progress=False)
    with tl.assert_no_recompile():
        stress._stress(lora, forward, {n: tmp_path / n for n in stress.VERSIONS}, reference, xla_device, 20)


def test_layer_asks_the_tpu_model_with_int8_weight_only_for_an_int8_per_channel_base(xla_device, monkeypatch):
    """On a TPU generation (set here), ``base_fusion="auto"`` asks ``formulation.choose`` with
    ``int8_weight=True`` for an int8 per-channel symmetric base (priced at its own weight bytes), and
    records its answer; a blockwise, zero-point or activation-quantizing base cannot run the fused
    kernel: it runs the separate op without asking the model as int8."""
    from torch_xla_lora import formulation

    layers = {}
    for scheme in ("symmetric", "blockwise", "asymmetric"):  # patched as on this device
        quantized, _ = _quantized_and_float(scheme, num_hidden_layers=1)
        lora = tl.patch_model(quantized.to(xla_device), tl.LoRAConfig(max_loras=2, max_rank=8))
        layers[scheme] = lora.model.model.layers[0].self_attn.q_proj
    monkeypatch.setattr(ops, "device_generation", lambda: "v6e")
    calls = []
    choose = formulation.choose

    def spy(*args, **kwargs):
        calls.append(kwargs.get("int8_weight", False))
        return choose(*args, **kwargs)

    monkeypatch.setattr(formulation, "choose", spy)
    for scheme, layer in layers.items():
        x = torch.zeros(3, 5, layer.in_features, device=xla_device)
        calls.clear()
        choice = layer.formulation(x)
        if scheme == "symmetric":
            expected = choose(
                "v6e", 15, layer.in_features, layer.out_features, 8, 2, False, layer.fusion_role, int8_weight=True
            )
            assert calls == [True] and choice == expected and layer.formulations == {15: expected}
            layer.base_layer.quantize_activation = True  # int8 activations: not the fused kernel's scheme
            calls.clear()
            assert layer.formulation(x) == "separate" and calls == []
        else:
            assert choice == "separate" and calls == [], scheme


def test_bench_model_prices_lora_over_the_int8_base_beside_the_bf16_base(tmp_path, capsys):
    """``bench model --fused-base --int8-base``'s overhead comparison (TPU cost model, no TPU): at decode the
    int8 base takes about half the time; a bf16 pool at the slots' rank costs what padded slots do (within
    the pool's tables), an int8 pool less over either base (its pages at one byte an element); and int8
    adapters over the int8 base still cost more, relatively, than bf16 adapters over the bf16 base (the
    kernel's fixed costs do not halve with the base's bytes)."""
    import json

    from torch_xla_lora.bench import model

    out = tmp_path / "model.json"
    argv = ["--fused-base", "--int8-base", "--chips", "v6e", "--tokens", "8", "--slots", "8", "--json", str(out)]
    assert model.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    bases = {"": row["layer_base_us"], "int8_": row["int8_layer_base_us"]}
    assert bases["int8_"] < 0.6 * bases[""]  # decode reads weights: half the bytes
    lora_us = {p: {a: row[f"{p}layer_pooled_{a}_pct"] * bases[p] for a in ("bf16", "int8")} for p in bases}
    for p in bases:
        assert row[f"{p}layer_pooled_bf16_pct"] == pytest.approx(row[f"{p}layer_chosen_pct"], rel=0.01)
        assert lora_us[p]["int8"] < lora_us[p]["bf16"]
    assert row["int8_layer_pooled_int8_pct"] > row["layer_pooled_bf16_pct"]  # not met at decode, even so
    assert row["int8_chosen_overhead_met"] == (row["int8_layer_chosen_pct"] <= row["layer_chosen_pct"])
    assert row["int8_pooled_int8_overhead_met"] is False
    printed = capsys.readouterr().out
    assert f"| v6e | 8 | 8 | {bases['']:.1f} | {bases['int8_']:.1f} | {row['layer_chosen_pct']:+.1f}% |" in printed
