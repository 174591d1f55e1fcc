"""Benchmarks: ``python -m torch_xla_lora.bench [--system-malloc] COMMAND [options]``.

COMMAND is one of e2e, kernels, memory, model, moe, pool, quantized, train, warmup, tpu_compile, vmem, xla_memory,
each a module of this package with a ``main(argv) -> int``; ``python -m torch_xla_lora.bench
COMMAND --help`` lists its options.

The allocator. XLA:CPU allocates every call's temporaries afresh, large ones
included (for a linear layer it copies the weight transposed: 262 MB per call
for a 32000 x 2048 LM head in float32). With glibc's defaults every block
above 32 MiB is mapped with mmap and unmapped on free, and threads' arenas
hand freed pages back to the kernel, so each call page-faults hundreds of MB
anew: a 1-layer Llama's prefill of 1024 tokens took 83,000-100,000 page
faults per call (``bench e2e`` counts them), cost up to a tenth of a step and
varied from run to run by as much, more than the LoRA costs being measured. On glibc the command line therefore restarts
itself once with ``GLIBC_TUNABLES`` set (:data:`REUSE_MALLOC`: no mmap, no
trimming, one arena) so freed memory is reused; every formulation runs under
the same setting (the role tcmalloc plays in CPU serving setups).
``--system-malloc``, or a ``GLIBC_TUNABLES`` already set, keeps the environment
as it is.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from collections.abc import Sequence

COMMANDS = {
    "e2e": ("torch_xla_lora.bench.e2e", "whole generation (prefill + decode) with and without LoRA, heatmaps"),
    "kernels": ("torch_xla_lora.bench.kernels", "wall clock of the BGMV formulations, side by side"),
    "memory": ("torch_xla_lora.bench.memory", "adapters fitting a device budget: padded, rank-true, int8"),
    "model": ("torch_xla_lora.bench.model", "the kernels' TPU cost model"),
    "pool": ("torch_xla_lora.bench.pool", "padded slots against rank-true pools (float, int8), paired"),
    "quantized": ("torch_xla_lora.bench.quantized", "LoRA's overhead on an int8 base against a float base"),
    "moe": ("torch_xla_lora.bench.moe", "LoRA slowdown of a small MoE model (expert LoRA) next to a dense one"),
    "train": ("torch_xla_lora.bench.train", "a mixed training step of 8 tenants against its alternatives"),
    "warmup": ("torch_xla_lora.bench.warmup", "warm-up time and compilations against the number of slots"),
    "tpu_compile": ("torch_xla_lora.bench.tpu_compile", "compile every Pallas kernel with libtpu, no TPU needed"),
    "vmem": ("torch_xla_lora.bench.vmem", "each TPU generation's VMEM and scoped limits, from libtpu's compiler"),
    "xla_memory": ("torch_xla_lora.bench.xla_memory", "compiled temporaries of the XLA-native fused op"),
}

# glibc malloc tunables: never mmap (so never munmap), never trim the heap, one arena (no
# per-thread heaps given back with MADV_DONTNEED). Read by glibc at process start only.
REUSE_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.arena_max=1"


def malloc_environment(environ: dict[str, str], argv: Sequence[str]) -> dict[str, str] | None:
    """The environment to restart the command line in so freed memory is reused, or None to run as is.

    None off glibc, with ``--system-malloc`` in ``argv`` (before the command), or when
    ``GLIBC_TUNABLES`` is already set (the user's choice, or this restart's).
    """
    options = list(argv[: next((i for i, a in enumerate(argv) if a in COMMANDS), len(argv))])
    if "--system-malloc" in options or "GLIBC_TUNABLES" in environ:
        return None
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    return {**environ, "GLIBC_TUNABLES": REUSE_MALLOC}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark command; its exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_xla_lora.bench",
        description="Benchmarks of torch_xla_lora.",
        epilog="\n".join(f"{name}: {help_text}" for name, (_, help_text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default malloc settings (the command line otherwise restarts with REUSE_MALLOC)",
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options of the command (see COMMAND --help)")
    args = parser.parse_args(argv)
    # The CPU PJRT device unless the user chose one; must precede torch_xla's start.
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(args.args)


if __name__ == "__main__":
    environment = malloc_environment(dict(os.environ), sys.argv[1:])
    if environment is not None:
        print(f"(restarting with GLIBC_TUNABLES={REUSE_MALLOC}; --system-malloc keeps the defaults)", file=sys.stderr)
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "torch_xla_lora.bench", *sys.argv[1:]], environment)
    sys.exit(main())
