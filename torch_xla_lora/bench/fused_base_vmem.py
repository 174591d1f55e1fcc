"""``python -m torch_xla_lora.bench.fused_base_vmem``: the fused base kernel's VMEM estimate against libtpu's compiler.

For the plans of a Llama-3-8B decoder layer's seven projections, as the decoder arrangement calls the
kernel (``tpu_model.KERNEL_FUSION``: RMSNorm's factors on q/k/v/gate/up's read, SiLU(gate) * up on
down_proj's, the residual in o/down_proj's write; ``--plain``: no fusion), compiles the kernel deviceless
for each chip (as ``bench tpu_compile``'s worker: JAX on the CPU, libtpu's compiler, nothing runs) at its
declared scoped VMEM limit, then bisects the least limit, in whole MiB, it still compiles at, and prints
it beside ``fused_base.vmem_bytes``: the plans' budget (``tuning.BASE_VMEM_BUDGET_BYTES``) is only safe
while the estimate stays above it. Run in a process of its own. Exits 1 when a plan does not compile at
its declared limit or needs more than its estimate.

A least limit far below the estimate is not slack in the estimate alone: below a block's double buffers
the compiler may single-buffer it (o_proj's plan at T = 1024 on v5e, tiles (512, 4096, 2048): estimate
59.25 MiB, least limit 34 MiB, less than its blocks' double buffers alone); the estimate counts every
block double-buffered.
"""

from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

MIB = 1024 * 1024


def _compiles(fn, args, chip: str, limit: int) -> bool:
    """Whether ``fn`` compiles for ``chip`` with the kernel's scoped VMEM limit set to ``limit`` bytes."""
    import jax

    from torch_xla_lora.bench import tpu_compile_worker
    from torch_xla_lora.kernels import fused_base, mosaic_version

    declared = fused_base.vmem_limit
    fused_base.vmem_limit = lambda generation: limit  # tpu_compile_case's fn reads it when traced
    try:
        sharding = jax.sharding.SingleDeviceSharding(tpu_compile_worker._device(chip))
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
        with mosaic_version.pinned_ir_version():
            # A new function each time: jax caches the trace of ``fn`` itself, with the limit it first read.
            jax.jit(lambda *operands: fn(*operands)).trace(*args).lower(lowering_platforms=("tpu",)).compile()
        return True
    except Exception:  # the compiler's refusal (scoped VMEM exceeded) is the finding
        return False
    finally:
        fused_base.vmem_limit = declared


def least_limit(fn, args, chip: str, estimate: int) -> int | None:
    """The least whole MiB the kernel compiles at (searched up to its declared limit), or None if not even there."""
    from torch_xla_lora.kernels import fused_base

    declared = fused_base.vmem_limit(chip)
    if not _compiles(fn, args, chip, declared):
        return None
    high = min(math.ceil(estimate / MIB), declared // MIB)
    if not _compiles(fn, args, chip, high * MIB):
        high = declared // MIB
    low = 0  # fails
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if _compiles(fn, args, chip, middle * MIB) else (middle, high)
    return high


HEADER = (
    "| chip | T | L | projection | fusion | tiles (tokens, reduction, output) | lanes | estimate (MiB) "
    "| least limit (MiB) |\n|---|---|---|---|---|---|---|---|---|"
)


def rows(chips, token_counts, slot_counts, plain: bool):
    """One table row a distinct plan: (row text, whether it fails the check)."""
    import jax.numpy as jnp

    from torch_xla_lora.bench import tpu_model
    from torch_xla_lora.kernels import fused_base

    dtype, seen = jnp.bfloat16, set()
    for chip in chips:
        for tokens in token_counts:
            for slots in slot_counts:
                for name, (hidden, out_dim, _) in tpu_model.LLAMA3_8B_LAYER.items():
                    prologue, residual = ("", False) if plain else tpu_model.KERNEL_FUSION[name]
                    fusion = tpu_model.kernel_fusion(prologue, residual)
                    sizes, lanes = fused_base.plan(tokens, hidden, out_dim, 16, slots, dtype, chip, False, fusion)
                    estimate = fused_base.vmem_bytes(sizes, 16, slots, lanes, dtype, False, fusion)
                    key = (chip, tokens, hidden, out_dim, fusion, sizes, lanes, estimate)
                    if key in seen:
                        continue
                    seen.add(key)
                    fn, shapes = fused_base.tpu_compile_case(
                        tokens, hidden, out_dim, 16, slots, dtype, chip, fusion=fusion
                    )
                    least = least_limit(fn, shapes, chip, estimate)
                    fields = ("silu_mul", "row_scale", "col_scale", "residual")
                    taken = "+".join(f for f in fields if getattr(fusion, f)) or "-"
                    cells = [chip, tokens, slots, name, taken, f"({sizes.tokens}, {sizes.hidden}, {sizes.out})", lanes]
                    cells += [f"{estimate / MIB:.2f}", "does not compile" if least is None else least]
                    failed = least is None or least > math.ceil(estimate / MIB)
                    yield "| " + " | ".join(str(c) for c in cells) + " |", failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench.fused_base_vmem", description=__doc__)
    parser.add_argument("--chips", nargs="+", default=["v5e", "v6e"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 128], help="adapter slots L (rank 16, bf16)")
    parser.add_argument("--plain", action="store_true", help="the kernel without fusions")
    args = parser.parse_args(argv)
    print(HEADER)
    failed = False
    for row, bad in rows(args.chips, args.tokens, args.slots, args.plain):
        print(row, flush=True)
        failed |= bad
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
