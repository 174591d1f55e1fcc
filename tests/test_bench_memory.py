"""``bench memory --quality`` (torch_xla_lora/bench/int8_quality.py) at tiny sizes, against plain torch and PEFT;
``bench memory --resident`` against page arithmetic.

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


def test_resident_bytes_follow_the_true_ranks_with_tails_sharing_and_spanning_pages():
    """``bench memory --resident`` at Llama-3-8B shapes, a budget of 90 bf16 rank rows (88 data rows, 11 aligned
    pages where the TPU kernel may run): an adapter's own bytes are its rank's elements (bf16) plus the int8 row
    and page scales (12 bytes a row and layer); the pool's allocator holds 22 rank-4 adapters (two tails a page),
    7 of rank 12 (a page each and two tails a page) and 17 of rank 5 (85 of the 88 rows: a tail of 5 shares
    no page with another whole, so they run on from page to page), the figures here from page arithmetic alone."""
    from torch_xla_lora.bench import memory

    layers, per_layer = 32, (4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336)
    elements = layers * per_layer  # one rank row of all seven projections of every layer
    assert memory.row_bytes("llama-3-8b", 2, False) == 2 * elements
    budget = 90 * 2 * elements
    rows = memory.resident("llama-3-8b", budget, ranks=(4, 5, 12))
    by = {(r["dtype"], r["rank"]): r for r in rows}
    for rank, count in ((4, 22), (5, 17), (12, 7)):
        bf16, int8 = by["bf16", rank], by["int8", rank]
        assert bf16["adapters"] == count and int8["adapters"] >= 2 * count
        assert bf16["own_ratio"] == 1.0
        assert abs(int8["own_ratio"] - (1 + 12 * 7 * layers / elements)) < 1e-12
        assert abs(bf16["budget_ratio"] - budget / count / (rank * elements * 2)) < 1e-12
    assert all(by["bf16", rank]["budget_ratio"] <= 1.10 for rank in (4, 5, 12))
