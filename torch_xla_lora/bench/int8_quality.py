"""int8 adapters against the same adapters in float (``python -m torch_xla_lora.bench memory --quality``).

A random-weight Llama (built from a config and a seed; nothing is downloaded) and
PEFT adapters of several ranks on all seven projections, with random A and B
(PEFT's ``init_lora_weights=False``) and B scaled per module so that the LoRA
delta is ``delta_fraction`` of the base output's norm on the prompts (random B
alone would give deltas of very different sizes per module). The adapters are
loaded twice, into a rank-true pool in float32 and into one in int8
(``LoRAConfig(memory_budget=..., weight_dtype="int8")``), and compared:

- per layer, the relative error of the LoRA delta: each patched layer of the
  int8 model run on the input the float model's layer received, ``|y_int8 -
  y_float| / |y_float - base(x)|``;
- the logits' relative error (Frobenius norm over prompts x positions x vocab);
- teacher-forced greedy agreement: the argmax token at every position of every prompt;
- a short greedy generation from each prompt's first tokens (no KV cache), the
  share of generated positions holding the same token.

Every row of a batch runs the same adapter; the float pool is also compared with
PEFT's own forward (it should equal it to float32 rounding).
"""

from __future__ import annotations

import copy
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class QualitySizes:
    """The random Llama's sizes (:func:`torch_xla_lora.random_models.random_llama` reads them)."""

    vocab: int = 4096
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4


@dataclass
class Setup:
    """What :func:`measure` compares: the base model, prompts [P, S] and PEFT adapters (name -> (state, config))."""

    base: nn.Module
    prompts: torch.Tensor
    adapters: dict[str, tuple[dict[str, torch.Tensor], object]] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)


def _inputs_of(model: nn.Module, ids: torch.Tensor, suffixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Module name -> the input it received in ``model(ids)``, for modules whose name ends in ``suffixes``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach()))
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in suffixes and isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def setup(
    sizes: QualitySizes,
    ranks: Sequence[int] = (8, 16, 64),
    per_rank: int = 2,
    prompts: int = 64,
    positions: int = 32,
    delta_fraction: float = 0.2,
    seed: int = 0,
) -> Setup:
    """The random Llama, random prompts and ``per_rank`` PEFT adapters of each rank (see the module)."""
    import peft

    from torch_xla_lora.random_models import random_llama

    base = random_llama(sizes, seed)
    ids = torch.randint(0, sizes.vocab, (prompts, positions), generator=torch.Generator().manual_seed(seed + 1))
    inputs = _inputs_of(base, ids, TARGETS)
    modules = dict(base.named_modules())
    out = Setup(base=base, prompts=ids)
    for i, rank in enumerate(r for r in ranks for _ in range(per_rank)):
        name = f"r{rank}_{i}"
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), init_lora_weights=False)
        torch.manual_seed(seed + 100 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(copy.deepcopy(base), config)
        state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
        scaling = config.lora_alpha / rank
        for module_name, x in inputs.items():
            key = f"base_model.model.{module_name}"
            a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
            with torch.no_grad():
                base_out = modules[module_name](x)
                delta = scaling * (x @ a.T) @ b.T
            state[f"{key}.lora_B.weight"] = b * (delta_fraction * base_out.norm() / delta.norm())
        out.adapters[name], out.ranks[name] = (state, config), rank
    return out


def _patched(s: Setup, int8: bool) -> object:
    import torch_xla_lora as tl
    from torch_xla_lora import pool

    # Room for every adapter at once (+ the pool's zero and scratch rows, and an int8 pool's page scales padded to
    # whole tiles per layer): nothing is evicted.
    targets = [m for n, m in s.base.named_modules() if n.rpartition(".")[2] in TARGETS]
    elements = sum(m.in_features + m.out_features for m in targets)
    budget = (sum(s.ranks.values()) + 2) * elements * 4 + len(targets) * pool.PAGE_SCALE_TILE * pool.SCALE_BYTES
    config = tl.LoRAConfig(
        max_loras=1,
        max_rank=max(s.ranks.values()),
        target_modules=list(TARGETS),
        memory_budget=budget,
        weight_dtype="int8" if int8 else None,
    )
    lora = tl.patch_model(copy.deepcopy(s.base), config)
    for name, (state, peft_config) in s.adapters.items():
        lora.load_adapter(name, state_dict=state, config=peft_config)
    return lora


def _greedy(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens after ``ids`` [P, S] (the whole sequence recomputed each step)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, -steps:]


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected| (Frobenius, in float64)."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def measure(s: Setup, generate: int = 16, prompt_len: int = 8, with_peft: bool = True) -> dict:
    """Per adapter and per layer, the int8 pool against the float pool (see the module); ``with_peft`` also
    compares the float pool with PEFT's forward.

    Returns ``{"adapters": [...], "layers": [...]}``: per adapter its rank, logits relative error, teacher-forced
    argmax agreement, generated-token agreement and (``with_peft``) the float pool's logits error against PEFT;
    per (adapter, patched layer) the delta's relative error and the float delta's size relative to the base output.
    """
    float_lora, int8_lora = _patched(s, False), _patched(s, True)
    peft_model = None
    if with_peft:
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, (state, config) in s.adapters.items():
                if peft_model is None:
                    peft_model = peft.get_peft_model(copy.deepcopy(s.base), config, adapter_name=name)
                else:
                    peft_model.add_adapter(name, config)
                peft.set_peft_model_state_dict(peft_model, state, adapter_name=name)
        peft_model.eval()
    rows, layers = [], []
    count = s.prompts.shape[0]
    for name, rank in s.ranks.items():
        for lora in (float_lora, int8_lora):
            lora.set_batch([name] * count)
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [
            layer.register_forward_hook(
                lambda m, args, out, key=key, seen=seen: seen.__setitem__(key, (args[0].detach(), out.detach()))
            )
            for key, layer in float_lora.layers.items()
        ]
        with torch.no_grad():
            logits_f = float_lora.model(s.prompts).logits
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            logits_q = int8_lora.model(s.prompts).logits
            for key, (x, y_f) in seen.items():
                layer = int8_lora.layers[key]
                y_q, y_base = layer(x), layer.base_layer(x)
                layers.append(
                    {
                        "adapter": name,
                        "rank": rank,
                        "layer": key,
                        "delta_rel_error": _rel(y_q - y_base, y_f - y_base),
                        "delta_fraction": float((y_f - y_base).norm() / y_base.norm()),
                    }
                )
        row = {
            "adapter": name,
            "rank": rank,
            "logits_rel_error": _rel(logits_q, logits_f),
            "argmax_agreement": float((logits_q.argmax(-1) == logits_f.argmax(-1)).float().mean()),
        }
        if generate:
            start = s.prompts[:, :prompt_len]
            row["generated_agreement"] = float(
                (_greedy(int8_lora.model, start, generate) == _greedy(float_lora.model, start, generate)).float().mean()
            )
        if peft_model is not None:
            with torch.no_grad():
                expected = peft_model(s.prompts, adapter_names=[name] * count).logits
            row["float_vs_peft_rel_error"] = _rel(logits_f, expected)
        rows.append(row)
    return {"adapters": rows, "layers": layers}


def by_rank(result: dict) -> list[dict]:
    """The table's rows: per rank, the worst and median figures over its adapters and layers."""
    out = []
    for rank in sorted({r["rank"] for r in result["adapters"]}):
        rows = [r for r in result["adapters"] if r["rank"] == rank]
        layer_errors = [r["delta_rel_error"] for r in result["layers"] if r["rank"] == rank]
        fractions = [r["delta_fraction"] for r in result["layers"] if r["rank"] == rank]
        entry = {
            "rank": rank,
            "adapters": len(rows),
            "delta_rel_error_median": statistics.median(layer_errors),
            "delta_rel_error_max": max(layer_errors),
            "delta_fraction_median": statistics.median(fractions),
            "logits_rel_error_max": max(r["logits_rel_error"] for r in rows),
            "argmax_agreement_min": min(r["argmax_agreement"] for r in rows),
        }
        if all("generated_agreement" in r for r in rows):
            entry["generated_agreement_min"] = min(r["generated_agreement"] for r in rows)
        if all("float_vs_peft_rel_error" in r for r in rows):
            entry["float_vs_peft_rel_error_max"] = max(r["float_vs_peft_rel_error"] for r in rows)
        out.append(entry)
    return out


def print_table(rows: list[dict], sizes: QualitySizes, s: Setup, generate: int, prompt_len: int) -> None:
    """The markdown table of :func:`by_rank`'s rows."""
    p, n = s.prompts.shape
    print(
        f"random Llama (hidden {sizes.hidden}, intermediate {sizes.intermediate}, {sizes.layers} layers, vocab "
        f"{sizes.vocab}), float32; PEFT adapters on all seven projections; {p} prompts x {n} positions; "
        f"greedy generation: {generate} tokens after {prompt_len}"
    )
    print(
        "| rank | adapters | LoRA delta / base output (median) | delta rel. error, median / max over layers | "
        "logits rel. error (max) | teacher-forced argmax agreement (min) | generated tokens agreement (min) | "
        "float pool vs PEFT logits (max) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gen = r.get("generated_agreement_min", math.nan)
        peft_err = r.get("float_vs_peft_rel_error_max", math.nan)
        print(
            f"| {r['rank']} | {r['adapters']} | {r['delta_fraction_median']:.3f} | "
            f"{r['delta_rel_error_median']:.2e} / {r['delta_rel_error_max']:.2e} | {r['logits_rel_error_max']:.2e} | "
            f"{100 * r['argmax_agreement_min']:.2f}% | {100 * gen:.2f}% | {peft_err:.1e} |"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``bench memory --quality [options]``: the table of :func:`by_rank` (or every figure with ``--json``)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench memory --quality", description=__doc__)
    defaults = QualitySizes()
    for name in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--per-rank", type=int, default=2, help="adapters of each rank")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--generate", type=int, default=16, help="greedy tokens generated after --prompt-len")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--delta-fraction", type=float, default=0.2, help="|LoRA delta| / |base output| per module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = QualitySizes(
        **{k: getattr(args, k) for k in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads")}
    )
    s = setup(sizes, args.ranks, args.per_rank, args.prompts, args.positions, args.delta_fraction, args.seed)
    result = measure(s, args.generate, args.prompt_len)
    rows = by_rank(result)
    if args.json:
        print(json.dumps({"by_rank": rows, **result}, indent=1))
    else:
        print_table(rows, sizes, s, args.generate, args.prompt_len)
    return 0
