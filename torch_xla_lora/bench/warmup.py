"""``python -m torch_xla_lora.bench warmup``: warm-up time and compilations against the number of slots.

For each ``max_loras``, a fresh process (so no compilation is cached) builds a
random-weight Llama, patches every linear layer with LoRA, and times
``lora.warmup`` for one (batch, sequence) bucket. Reported: seconds, XLA
compilations, and the ratio to the first slot count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence


def _worker(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    import torch_xla_lora as tl

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 512),
    )
    import torch_xla

    model = transformers.LlamaForCausalLM(config).eval().to(torch_xla.device())
    lora = tl.patch_model(model, tl.LoRAConfig(max_loras=args.worker, max_rank=args.rank))
    start = time.perf_counter()
    compiles = lora.warmup([args.batch], [args.seq], progress=False)
    return {"max_loras": args.worker, "seconds": time.perf_counter() - start, "compilations": compiles}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench warmup", description=__doc__)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.seq, args.slots = 128, 1, 256, 16, [1, 4]
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    if args.worker is not None:
        print(json.dumps(_worker(args)))
        return 0
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "rank", "batch", "seq")]
    rows = []
    print(f"warm-up of a {args.layers}-layer Llama (hidden {args.hidden}), LoRA rank {args.rank} on every linear layer")
    for slots in args.slots:
        done = subprocess.run(
            [sys.executable, "-m", "torch_xla_lora.bench.warmup", *passthrough, f"--worker={slots}"],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["ratio"] = row["seconds"] / rows[0]["seconds"] if rows else 1.0
        rows.append(row)
        print(
            f"max_loras {slots:3d}: {row['seconds']:6.2f} s, {row['compilations']} compilations, "
            f"{row['ratio']:.2f}x of {args.slots[0]} slot(s)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
