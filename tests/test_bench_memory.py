"""``bench memory --quality`` (torch_xla_lora/bench/int8_quality.py) at tiny sizes, against plain torch and PEFT.

References: one layer's LoRA delta recomputed by plain torch (float64) from the adapter's PEFT factors, with
and without each rank row rounded to int8 (symmetric, absmax / 127, one scale per row); the logits of PEFT's
own forward with the float factors and with the rounded ones.
"""

import copy
import warnings

import peft
import torch

from torch_xla_lora.bench import int8_quality as q

SIZES = q.QualitySizes(vocab=64, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2)
LAYER = "model.layers.0.self_attn.q_proj"  # its input does not depend on any adapter (the embedding has none)


def _rounded(rows: torch.Tensor) -> torch.Tensor:
    """Each row of ``rows`` [r, n] rounded to int8 with its own absmax / 127 scale, back in float64."""
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(rows / scale).clamp(-127, 127) * scale


def _peft(setup: q.Setup, rounded: bool, name: str) -> torch.Tensor:
    state, config = setup.adapters[name]
    if rounded:
        state = {
            k: (_rounded(v.double()) if "lora_A" in k else _rounded(v.double().T).T).float() for k, v in state.items()
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(setup.base), config)
    peft.set_peft_model_state_dict(model, state)
    with torch.no_grad():
        return model.eval()(setup.prompts).logits.double()


def test_quality_figures_match_plain_torch_and_peft():
    setup = q.setup(SIZES, ranks=(2, 8), per_rank=1, prompts=4, positions=6, delta_fraction=0.25)
    result = q.measure(setup, generate=2, prompt_len=3)
    name = "r8_1"
    state, config = setup.adapters[name]
    seen = {}
    module = dict(setup.base.named_modules())[LAYER]
    hook = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0].double()))
    with torch.no_grad():
        setup.base(setup.prompts)
    hook.remove()
    key = f"base_model.model.{LAYER}"
    a, b = state[f"{key}.lora_A.weight"].double(), state[f"{key}.lora_B.weight"].double()
    scaling = config.lora_alpha / config.r
    x, base_out = seen["x"], seen["x"] @ module.weight.detach().double().T
    exact = scaling * (x @ a.T) @ b.T
    rounded = scaling * (x @ _rounded(a).T) @ _rounded(b.T)  # B^T [r, out]: one row per rank row
    expected_error = float((rounded - exact).norm() / exact.norm())

    layer = next(r for r in result["layers"] if r["adapter"] == name and r["layer"] == LAYER)
    assert 0 < expected_error < 0.05
    assert abs(layer["delta_rel_error"] - expected_error) <= 1e-2 * expected_error
    assert abs(layer["delta_fraction"] - float(exact.norm() / base_out.norm())) < 1e-4
    assert abs(layer["delta_fraction"] - 0.25) < 1e-3  # B scaled to the requested share
    assert len(result["layers"]) == 2 * 7 * SIZES.layers

    row = next(r for r in result["adapters"] if r["adapter"] == name)
    peft_float, peft_int8 = _peft(setup, False, name), _peft(setup, True, name)
    assert row["float_vs_peft_rel_error"] < 1e-5
    expected_logits_error = float((peft_int8 - peft_float).norm() / peft_float.norm())
    assert abs(row["logits_rel_error"] - expected_logits_error) <= 1e-2 * expected_logits_error
    agreement = float((peft_int8.argmax(-1) == peft_float.argmax(-1)).double().mean())
    assert abs(row["argmax_agreement"] - agreement) <= 1 / peft_float[..., 0].numel()
    assert 0 <= row["generated_agreement"] <= 1

    table = {r["rank"]: r for r in q.by_rank(result)}
    assert set(table) == {2, 8}
    assert table[8]["logits_rel_error_max"] == row["logits_rel_error"]
    assert table[8]["delta_rel_error_max"] >= layer["delta_rel_error"]
