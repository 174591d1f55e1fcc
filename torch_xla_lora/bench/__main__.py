"""Benchmarks: ``python -m torch_xla_lora.bench {e2e,kernels,model,moe,warmup,tpu_compile} [options]``.

Each command is a module of this package with a ``main(argv) -> int``;
``python -m torch_xla_lora.bench COMMAND --help`` lists its options.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

COMMANDS = {
    "e2e": ("torch_xla_lora.bench.e2e", "whole generation (prefill + decode) with and without LoRA, heatmaps"),
    "kernels": ("torch_xla_lora.bench.kernels", "wall clock of the BGMV formulations, side by side"),
    "model": ("torch_xla_lora.bench.model", "the kernels' TPU cost model"),
    "moe": ("torch_xla_lora.bench.moe", "LoRA slowdown of a small MoE model (expert LoRA) next to a dense one"),
    "warmup": ("torch_xla_lora.bench.warmup", "warm-up time and compilations against the number of slots"),
    "tpu_compile": ("torch_xla_lora.bench.tpu_compile", "compile every Pallas kernel with libtpu, no TPU needed"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark command; 2 when the command's module is not available."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_xla_lora.bench",
        description="Benchmarks of torch_xla_lora.",
        epilog="\n".join(f"{name}: {help_text}" for name, (_, help_text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options of the command (see COMMAND --help)")
    args = parser.parse_args(argv)
    # The CPU PJRT device unless the user chose one; must precede torch_xla's start.
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    module_name = COMMANDS[args.command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        path = module_name.replace(".", "/") + ".py"
        print(f"error: benchmark {args.command!r} is not available: {path} does not exist yet", file=sys.stderr)
        return 2
    return module.main(args.args)


if __name__ == "__main__":
    sys.exit(main())
