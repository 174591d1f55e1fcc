"""Command line: ``python -m torch_xla_lora demo`` and ``python -m torch_xla_lora train-demo``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="serve PEFT adapters (KV cache, continuous batching) on a small random Llama, checked against PEFT",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="smaller model and fewer tokens (the test suite's)")
    train = sub.add_parser(
        "train-demo",
        help="train three tenants' adapters together in mixed batches on a small random Llama, checked against PEFT",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quick", action="store_true", help="fewer steps of fewer rows (the test suite's)")
    train.add_argument("--out", default=None, help="directory for the loss curves and adapters (default: a new one)")
    args = parser.parse_args(argv)
    # The CPU PJRT device unless the user chose one; must precede torch_xla's start.
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    if os.environ["PJRT_DEVICE"] == "CPU":
        # JAX (inside the ops' call_jax) on the CPU too: an installed libtpu is then never probed for a TPU.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.command == "train-demo":
        from torch_xla_lora import train_demo

        return train_demo.run(seed=args.seed, quick=args.quick, out=args.out)
    from torch_xla_lora import demo as demo_module

    return demo_module.run(seed=args.seed, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
