"""``python -m torch_xla_lora.bench warmup``: warm-up time and compilations against the number of slots.

For each ``max_loras``, a fresh process (so no compilation is cached) builds a
random-weight Llama, patches every linear layer with LoRA, and times
``lora.warmup`` for one (batch, sequence) bucket. Reported: seconds of the whole
warm-up (compiling and running the step), the XLA compilation time within it
(torch_xla's CompileTime metric), the compilations, and ratios to the first slot count. Each slot count runs
``--repeats`` times, in rotation, and keeps its fastest run: the machine's
noise only ever adds time.
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
    import torch_xla.debug.metrics as met

    met.clear_all()
    start = time.perf_counter()
    compiles = lora.warmup([args.batch], [args.seq], progress=False)
    seconds = time.perf_counter() - start
    compile_ns = met.metric_data("CompileTime")[1]  # (count, total ns, samples)
    return {"max_loras": args.worker, "seconds": seconds, "compile_seconds": compile_ns / 1e9, "compilations": compiles}


def _run_worker(passthrough: list[str], slots: int) -> dict:
    """One warm-up in a fresh process (nothing compiled yet); its result row."""
    done = subprocess.run(
        [sys.executable, "-m", "torch_xla_lora.bench.warmup", *passthrough, f"--worker={slots}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench warmup", description=__doc__)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per slot count (fastest kept)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.seq, args.slots, args.repeats = 128, 1, 256, 16, [1, 4], 1
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    if args.worker is not None:
        print(json.dumps(_worker(args)))
        return 0
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "rank", "batch", "seq")]
    print(f"warm-up of a {args.layers}-layer Llama (hidden {args.hidden}), LoRA rank {args.rank} on every linear layer")
    runs: dict[int, list[dict]] = {slots: [] for slots in args.slots}
    for repeat in range(args.repeats):
        for slots in args.slots:
            runs[slots].append(_run_worker(passthrough, slots))
            print(
                f"  run {repeat + 1}/{args.repeats}, max_loras {slots}: {runs[slots][-1]['seconds']:.2f} s", flush=True
            )
    rows = [min(runs[slots], key=lambda row: row["seconds"]) for slots in args.slots]
    for row in rows:
        row["ratio"] = row["seconds"] / rows[0]["seconds"]
        row["compile_ratio"] = row["compile_seconds"] / rows[0]["compile_seconds"]
        print(
            f"max_loras {row['max_loras']:3d}: warm-up {row['seconds']:6.2f} s ({row['ratio']:.2f}x of "
            f"{args.slots[0]} slot(s)), of which XLA compilation {row['compile_seconds']:.2f} s in "
            f"{row['compilations']} compilations ({row['compile_ratio']:.2f}x)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
