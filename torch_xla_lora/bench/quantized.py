"""LoRA's overhead on an int8 base against a float base, paired: ``python -m torch_xla_lora.bench quantized``.

One random Llama (the e2e benchmark's sizes, ``--layers``) twice on the XLA device: as built (float32),
and with every projection replaced by torch_xla's weight-only int8 layer (``XlaQuantizedLinear``, one
symmetric scale per output channel, as the PyTorch/XLA docs quantise a model). Both are patched with
the same ``--adapters`` random adapters of rank ``--rank`` on the seven projections. Per step kind (a
decode step of ``--decode-batch`` rows, a prefill of 4 x ``--seq`` tokens) four cases run in rotating
order, ``--repeats`` times, each timed as ``bench e2e`` times a step: float base (no batch), float with
LoRA (rows over every adapter), int8 base, int8 with LoRA. The overhead of LoRA is the median of
(LoRA / base) per repetition minus one; the issue's target is the int8 overhead no larger than the float
one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
from collections.abc import Sequence

import torch
from torch import nn

from torch_xla_lora.bench.e2e import E2EConfig, paired_ratio, paired_seconds
from torch_xla_lora.bench.e2e_model import LINEAR_TARGETS, build_model, random_adapter

CASES = ("float base", "float LoRA", "int8 base", "int8 LoRA")


def quantize_projections(model: nn.Module) -> nn.Module:
    """``model`` with every linear projection of LINEAR_TARGETS replaced by torch_xla's int8 weight-only layer."""
    from torch_xla.experimental.xla_quantized_matmul import XlaQuantizedLinear

    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] not in LINEAR_TARGETS or not isinstance(module, nn.Linear):
            continue
        weight = module.weight.detach()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        layer = XlaQuantizedLinear(module.in_features, module.out_features, is_symmetric=True)
        layer.load_quantized_weight(torch.round(weight / scale[:, None]).to(torch.int8), scale)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model


def run(config: E2EConfig, adapters: int, rank: int, decode_batch: int, seq: int, repeats: int) -> list[dict]:
    import torch_xla

    import torch_xla_lora as tl

    device = torch_xla.device()
    base = build_model(config, torch.device("cpu"))
    handles = {}
    for kind, model in (("float", copy.deepcopy(base)), ("int8", quantize_projections(copy.deepcopy(base)))):
        lora = tl.patch_model(
            model.to(device), tl.LoRAConfig(max_loras=adapters, max_rank=rank, target_modules=LINEAR_TARGETS)
        )
        shapes = {name: (layer.in_features, layer.out_features) for name, layer in lora.layers.items()}
        for number in range(adapters):
            state, adapter_config = random_adapter(shapes, rank, seed=number)
            lora.load_adapter(f"a{number}", state_dict=state, config=adapter_config)
        handles[kind] = lora
    g = torch.Generator().manual_seed(0)
    inputs = {
        "decode": torch.randint(0, config.vocab, (decode_batch, 1), generator=g).to(device),
        "prefill": torch.randint(0, config.vocab, (4, seq), generator=g).to(device),
    }
    rows = []
    for step, ids in inputs.items():
        names = [f"a{i % adapters}" for i in range(ids.shape[0])]
        steps = {}
        for case in CASES:
            lora = handles[case.split()[0]]
            prepare = (
                lora.clear_batch if case.endswith("base") else (lambda lora=lora, names=names: lora.set_batch(names))
            )
            steps[case] = (prepare, lambda lora=lora, ids=ids: lora.model(ids, use_cache=False).logits)
        seconds = paired_seconds(steps, repeats)
        overhead = {
            kind: paired_ratio(seconds[f"{kind} LoRA"], seconds[f"{kind} base"]) - 1 for kind in ("float", "int8")
        }
        rows.append(
            {
                "step": step,
                **{f"{case} ms": 1000 * statistics.median(seconds[case]) for case in CASES},
                "float overhead": overhead["float"],
                "int8 overhead": overhead["int8"],
            }
        )
        print(f"{step}: LoRA over float base {overhead['float']:+.1%}, over int8 base {overhead['int8']:+.1%}")
    for lora in handles.values():
        lora.unpatch()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torch_xla_lora.bench quantized", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128, help="prefill tokens per row (4 rows)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    config = dataclasses.replace(E2EConfig(), layers=args.layers)
    if args.quick:
        config = dataclasses.replace(config, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128)
    rows = run(config, args.adapters, args.rank, args.decode_batch, args.seq, args.repeats)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"\n{config.layers}-layer Llama (hidden {config.hidden}), {args.adapters} adapters of rank {args.rank}")
    print("| step | float base (ms) | float LoRA | int8 base (ms) | int8 LoRA | LoRA over float | LoRA over int8 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['step']} | {r['float base ms']:.2f} | {r['float LoRA ms']:.2f} | {r['int8 base ms']:.2f} | "
            f"{r['int8 LoRA ms']:.2f} | {r['float overhead']:+.1%} | {r['int8 overhead']:+.1%} |"
        )
    return 0
