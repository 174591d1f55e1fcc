"""Training expert LoRA (PEFT ``target_parameters``) in mixed batches equals training each adapter alone with PEFT.

One tiny random Qwen3-MoE (2 layers, hidden 32, 4 experts, top-2). Each tenant has LoRA on attention
projections (``target_modules``), on the fused expert weights and on the router (``target_parameters``);
PEFT refuses mixed batches on parameter targets, so the reference is one PeftModel per tenant, trained
eagerly on CPU tensors with its own backward on the tenant's own rows.
"""

import warnings

import pytest
import torch
import torch_xla
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import torch_xla_lora as tl

VOCAB, SEQ, MAX_RANK = 64, 5, 8
TENANTS = {
    "t0": {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
    },
    # rsLoRA, and a rank pattern on one expert weight; gate_up_proj not targeted (its slot entries stay zero).
    "t1": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["o_proj"],
        "target_parameters": ["down_proj", "gate.weight"],
        "rank_pattern": {"down_proj": 8},
    },
}
MIX = ["t0", None, "t1", "t0", "t1"]


def tiny_moe() -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    config._experts_implementation = "batched_mm"  # the transformers path that runs on XLA
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Qwen3MoeForCausalLM(config).eval()


def _patched(device: torch.device) -> tl.LoRAModel:
    lora = tl.patch_model(tiny_moe().to(device), tl.LoRAConfig(max_loras=3, max_rank=MAX_RANK))
    torch.manual_seed(1)
    for name, kwargs in TENANTS.items():
        # init False: B non-zero, so that A's gradients are not all zero.
        lora.create_adapter(name, LoraConfig(init_lora_weights=False, **kwargs))
    return lora


def _peft(lora: tl.LoRAModel, name: str) -> PeftModel:
    """A PeftModel on a fresh copy of the base holding ``name``'s current weights (one per tenant: PEFT
    requires every adapter of a model to target the same parameters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_moe(), LoraConfig(**TENANTS[name]))
    state = {k: v.detach().cpu().clone() for k, v in lora.trainable_parameters(name).items()}
    result = set_peft_model_state_dict(peft_model, state)
    assert not [k for k in (*result.missing_keys, *result.unexpected_keys) if "lora" in k]
    return peft_model.train()


def _own(peft_model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """PEFT's adapter parameters, keyed as get_peft_model_state_dict keys them."""
    return {k.replace(".default", ""): p for k, p in peft_model.named_parameters() if ".default" in k}


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of each row's mean cross-entropy: each tenant's gradient is its own rows' loss's."""
    per_token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return per_token.mean(dim=1).sum()


def _batch(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, SEQ), generator=gen), torch.randint(0, VOCAB, (rows, SEQ), generator=gen)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Relative 1e-4 (of the largest magnitude, and elementwise): float32 rounding of two formulations."""
    expected = expected.detach().cpu()
    magnitude = expected.abs().max().item()
    torch.testing.assert_close(actual.detach().cpu(), expected, atol=1e-4 * magnitude, rtol=1e-4)


def test_keys_shapes_and_initialisation_match_peft():
    """create_adapter with target_parameters gives exactly PEFT's keys and shapes (nested ParamWrapper keys,
    A [r * E, in], B [out, r * E]) and PEFT's initialisation for True, "gaussian" and False."""
    lora = tl.patch_model(tiny_moe(), tl.LoRAConfig(max_loras=3, max_rank=MAX_RANK))
    config = {**TENANTS["t0"], "r": 8, "lora_alpha": 8}  # rank 8: enough samples per factor for the spreads
    for init in (True, "gaussian", False):
        name = f"init-{init}"
        torch.manual_seed(0)
        lora.create_adapter(name, LoraConfig(init_lora_weights=init, **config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = get_peft_model_state_dict(
                get_peft_model(tiny_moe(), LoraConfig(init_lora_weights=init, **config))
            )
        params = lora.trainable_parameters(name)
        assert list(params) == list(expected)
        assert any(".experts.base_layer.lora_A." in key for key in params)
        for key, value in expected.items():
            ours = params[key].detach()
            assert ours.shape == value.shape, key
            if value.abs().max() == 0:  # B under True / "gaussian"
                assert ours.abs().max() == 0, key
            else:  # same distribution: same bound (uniform) or spread (normal) within sampling error
                ratio = ours.std() / value.std()
                assert 0.6 < ratio < 1.6, (key, ratio)
        lora.remove(name)
    with pytest.raises(tl.UnsupportedAdapterError, match="all-linear"):
        lora.create_adapter("x", LoraConfig(target_modules="all-linear"))
    with pytest.raises(tl.UnsupportedAdapterError, match="lora_dropout"):
        lora.create_adapter("x", LoraConfig(lora_dropout=0.1, **TENANTS["t1"]))
    assert not lora.adapters()


@pytest.mark.parametrize("on_xla", [False, True], ids=["cpu", "xla"])
def test_one_step_gradients_equal_peft_alone(on_xla, xla_device):
    """Both tenants' expert, router and attention LoRA trained in one mixed batch with base rows: each
    parameter's gradient equals PEFT's with the tenant alone on its own rows."""
    device = xla_device if on_xla else torch.device("cpu")
    lora = _patched(device)
    ids, targets = _batch(0, len(MIX))
    lora.model.train()
    lora.set_batch(MIX)
    _loss(lora.model(ids.to(device)).logits, targets.to(device)).backward()
    if on_xla:
        torch_xla.sync()
    for name in TENANTS:
        rows = [i for i, n in enumerate(MIX) if n == name]
        peft_model = _peft(lora, name)
        _loss(peft_model(ids[rows]).logits, targets[rows]).backward()
        expected = _own(peft_model)
        params = lora.trainable_parameters(name)
        assert list(params) == list(expected)
        for key, param in params.items():
            assert param.grad is not None, key
            assert expected[key].grad.abs().max() > 0, key  # the check has teeth: every factor gets a gradient
            _assert_close(param.grad, expected[key].grad)


STEPS = [["t0", "t1", None, "t1"], ["t0", None, "t0", "t0"], ["t1", "t0", "t1", None]]  # t1 sits out step 2


def _optimizer(params) -> torch.optim.Optimizer:
    # eps well above float32 rounding of the gradients (see test_training.py).
    return torch.optim.AdamW(params, lr=0.01, eps=1e-5, weight_decay=0.1)


def test_adamw_steps_equal_peft_alone():
    """Three AdamW steps on changing mixes, one optimizer over both tenants: every tenant's weights equal its
    own PEFT run; the tenant sitting a step out gets no gradients that step. On CPU tensors: the XLA device's
    forward and backward are the gradient test's, and its optimizer path is test_training.py's (lazy AdamW)."""
    lora = _patched(torch.device("cpu"))
    initial = {
        name: {k: p.detach().cpu().clone() for k, p in lora.trainable_parameters(name).items()} for name in TENANTS
    }
    expected = {}
    for name in TENANTS:
        peft_model = _peft(lora, name)
        params = _own(peft_model)
        optimizer = _optimizer(params.values())
        for number, mix in enumerate(STEPS):
            rows = [i for i, n in enumerate(mix) if n == name]
            if rows:
                ids, targets = _batch(100 + number, len(mix))
                optimizer.zero_grad(set_to_none=True)
                _loss(peft_model(ids[rows]).logits, targets[rows]).backward()
                optimizer.step()
        expected[name] = {key: p.detach().clone() for key, p in params.items()}

    optimizer = _optimizer([p for name in TENANTS for p in lora.trainable_parameters(name).values()])
    lora.model.train()
    for number, mix in enumerate(STEPS):
        ids, targets = _batch(100 + number, len(mix))
        lora.set_batch(mix)
        optimizer.zero_grad(set_to_none=True)
        _loss(lora.model(ids).logits, targets).backward()
        for name in TENANTS:
            grads = [p.grad for p in lora.trainable_parameters(name).values()]
            assert all((g is None) == (name not in mix) for g in grads), name
        optimizer.step()
    for name in TENANTS:
        for key, param in lora.trainable_parameters(name).items():
            assert not torch.equal(param.detach().cpu(), initial[name][key]), key  # training moved it
            _assert_close(param, expected[name][key])


def test_save_reload_round_trip(tmp_path):
    """save_adapter writes what PeftModel.from_pretrained loads with equal outputs; load_adapter(trainable=True)
    reloads it bit-exactly."""
    lora = _patched(torch.device("cpu"))
    with torch.no_grad():  # move the weights off their initial values
        for param in lora.trainable_parameters("t1").values():
            param.add_(0.01 * torch.randn_like(param))
    lora.save_adapter("t1", tmp_path / "t1")
    ids, _ = _batch(3, 3)
    lora.set_batch(["t1"] * 3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lora.model(ids).logits
        peft_model = PeftModel.from_pretrained(tiny_moe(), tmp_path / "t1")
        torch.testing.assert_close(ours, peft_model(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours, tiny_moe()(ids).logits, atol=1e-3)  # the adapter changes the output

    lora.remove("t0")  # a free slot
    lora.load_adapter("again", tmp_path / "t1", trainable=True)
    saved, reloaded = lora.trainable_parameters("t1"), lora.trainable_parameters("again")
    assert list(saved) == list(reloaded)
    for key in saved:
        assert torch.equal(saved[key], reloaded[key]), key
