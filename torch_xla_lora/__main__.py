"""Command line: ``python -m torch_xla_lora demo``."""

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
    args = parser.parse_args(argv)
    # The CPU PJRT device unless the user chose one; must precede torch_xla's start.
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    from torch_xla_lora import demo as demo_module

    return demo_module.run(seed=args.seed, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
