"""``python -m torch_xla_lora.bench moe``: the LoRA slowdown of a small MoE model next to a dense one.

One run, one device, the same batch for every row:

- dense: a Llama, base against LoRA on every linear layer;
- moe: a Mixtral of the same width (``experts_implementation="batched_mm"``), base against LoRA on the
  attention only, and against LoRA on every linear layer *and* the fused experts and routers
  (what PEFT 0.21's ``"all-linear"`` trains on Mixtral).

Each row is the median of ``--reps`` warmed-up forward passes (one XLA graph each, compiled by
``LoRAModel.warmup``), the cases taken in turn, with the batch rows spread over every slot and the
base model. Slots hold zeros: the cost does not depend on the values. Times are this machine's; the
ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence

import torch

from torch_xla_lora import LoRAConfig, patch_model

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(kind: str, hidden: int, layers: int, experts: int, top_k: int) -> torch.nn.Module:
    import transformers

    common = {
        "vocab_size": 256,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "num_key_value_heads": max(1, hidden // 128),
    }
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dense":
            # The dense MLP does the work of the top_k experts a token visits.
            config = transformers.LlamaConfig(intermediate_size=2 * hidden * top_k, **common)
            return transformers.LlamaForCausalLM(config).eval()
        config = transformers.MixtralConfig(
            intermediate_size=2 * hidden, num_local_experts=experts, num_experts_per_tok=top_k, **common
        )
        config._experts_implementation = "batched_mm"  # what runs on XLA
        return transformers.MixtralForCausalLM(config).eval()


def prepare(kind: str, targets, args, device: torch.device):
    """A compiled forward step of the model, patched with ``targets`` (None: unpatched)."""
    import torch_xla

    model = build(kind, args.hidden, args.layers, args.experts, args.top_k).to(device)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        with torch.no_grad():
            out = model(ids, use_cache=False).logits
            torch_xla.sync()
        return out

    if targets is not None:
        lora = patch_model(model, LoRAConfig(max_loras=args.slots, max_rank=args.rank, target_modules=targets))
        lora.warmup([args.batch], [args.seq], step=lambda _: step(), progress=False)
        lora.set_batch([i % (args.slots + 1) - 1 for i in range(args.batch)])
    step()  # compiles the unpatched model; a no-op recompile check for the patched ones
    return step


def run(args) -> list[dict]:
    import torch_xla
    import torch_xla.core.xla_model as xm

    device = torch_xla.device()
    cases = [
        ("dense", "base", None),
        ("dense", "LoRA all-linear", "all-linear"),
        ("moe", "base", None),
        ("moe", "LoRA attention", ATTENTION),
        ("moe", "LoRA all-linear + experts + router", "all-linear"),
    ]
    steps = [prepare(kind, targets, args, device) for kind, _, targets in cases]
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(args.reps):  # round robin: load on a shared machine hits every case alike
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            xm.wait_device_ops()
            times[i].append(time.perf_counter() - start)
    rows, base = [], {}
    for (kind, label, _), samples in zip(cases, times, strict=True):
        seconds = statistics.median(samples)
        base.setdefault(kind, seconds)
        rows.append({"model": kind, "case": label, "ms": seconds * 1e3, "vs_base": seconds / base[kind]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | LoRA | ms / forward | vs base |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['case']} | {r['ms']:.2f} | {r['vs_base']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench moe", description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--slots", type=int, default=4, help="max_loras")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = run(args)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
