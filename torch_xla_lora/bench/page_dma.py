"""``python -m torch_xla_lora.bench.page_dma``: which DMAs of a few pool rows libtpu's Mosaic compiler accepts.

Why the TPU pooled kernel reads an adapter's rows in pages of 8 (``kernels.fused.PAGE_ROWS``) and the
pool's allocator hands out whole aligned pages there (``pool.granule_for``). Each case is one tiny
``pallas_call`` that DMAs ``rows`` rows of a pool in HBM (``memory_space=ANY``), starting at a row
number read from SMEM (a dynamic offset, as the page table gives it), into a VMEM buffer, and uses them
in a matmul; it is compiled deviceless for the chip (``jax.experimental.topologies``, as
``bench tpu_compile`` does), nothing runs. Layouts:

- ``2d``: the pool as the layers store it, ``[P, D]``; ``rows`` rows at a dynamic offset (``aligned``:
  declared a multiple of 8 with ``pl.multiple_of``, as the kernel's page starts are);
- ``3d``: the pool stored ``[P / g, g, D]`` with g rows per group (``g = 4 // itemsize``: 1 float32,
  2 bfloat16, 4 int8 rows, the rows one 32-bit HBM word packs), ``rows / g`` groups at a dynamic group
  offset, loaded as ``[16 * g, D]`` for the matmul; ``3d-g1`` the same with one row per group (bf16);
- ``stacked``: :data:`STACKED` pools ``[E, P, D]`` (an experts layer's), 8 rows at a dynamic row of the
  flattened numbering, read from its pool in place (``kernels.pages.page_copy``); int8 with P = 24, so
  that E * P = 192 is a multiple of 32 where P is not.

Prints one line per case (chip, dtype, layout, the pool's rows, rows a DMA, offset, "compiles" or Mosaic's
message); ``--json`` prints JSON lines instead. ``--pooled`` compiles the pooled kernel itself
(``bench tpu_compile``'s builder) on int8 and bf16 pools of :data:`POOLED_ROWS` rows instead.
Runs JAX on the CPU in its own process (``JAX_PLATFORMS=cpu``, set here
before JAX starts): never import it into a process running torch_xla. Needs libtpu.
"""

from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
from collections.abc import Sequence  # noqa: E402

CHIPS = ("v5e", "v6e")  # deviceless topologies: tpu_grid.CHIPS
DTYPES = ("float32", "bfloat16", "int8")
POOL_ROWS = 64
WIDTH = 256
BUFFER_GROUPS = 16
STACKED = 8  # pools of the "stacked" layout


@dataclasses.dataclass(frozen=True)
class Case:
    """One DMA: ``rows`` rows of a ``dtype`` pool in ``layout`` at a dynamic offset (``aligned``: a multiple of 8)."""

    chip: str
    dtype: str
    layout: str  # "2d", "3d" (g = 4 // itemsize rows a group), "3d-g1" (one row a group) or "stacked"
    rows: int
    aligned: bool = False
    pool_rows: int = POOL_ROWS


def cases(chips: Sequence[str] = tuple(CHIPS)) -> list[Case]:
    """Per chip and dtype: 2-D pools at 1, 2, 4 rows (any offset) and 8 rows (aligned and not; int8: aligned
    also from a pool of 66 rows, not a multiple of 32); 3-D pools at 1 and 3 groups, and (bf16) one row a group."""
    import jax.numpy as jnp

    out = []
    for chip in chips:
        for dtype in DTYPES:
            group = 4 // jnp.dtype(dtype).itemsize
            out += [Case(chip, dtype, "2d", rows) for rows in (1, 2, 4, 8)]
            out.append(Case(chip, dtype, "2d", 8, aligned=True))
            if dtype == "int8":
                out.append(Case(chip, dtype, "2d", 8, aligned=True, pool_rows=POOL_ROWS + 2))
                out.append(Case(chip, dtype, "stacked", 8, aligned=True, pool_rows=24))
            out += [Case(chip, dtype, "3d", groups * group) for groups in (1, 3)]
            if dtype == "bfloat16":  # (int8's is refused on v5e; on v6e libtpu aborts on it instead of refusing it)
                out.append(Case(chip, dtype, "3d-g1", 1))
    return out


def compile_case(case: Case) -> dict:
    """Compile ``case`` for its chip: ``{**case, "ok": bool, "error": Mosaic's first line or None}``."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    from torch_xla_lora.bench.tpu_compile_worker import topology_device
    from torch_xla_lora.kernels import mosaic_version, pages

    dtype = jnp.dtype(case.dtype)
    group = 1 if case.layout != "3d" else 4 // dtype.itemsize
    count = case.rows // group  # leading-axis entries one DMA moves
    flat = case.layout in ("2d", "stacked")
    pool_shape = (case.pool_rows, WIDTH) if flat else (case.pool_rows // group, group, WIDTH)
    if case.layout == "stacked":
        pool_shape = (STACKED, case.pool_rows, WIDTH)
    buffer_shape = (BUFFER_GROUPS * 8, WIDTH) if flat else (BUFFER_GROUPS, group, WIDTH)
    buffer_rows = buffer_shape[0] * (1 if flat else group)

    def kernel(offset_ref, pool_hbm, x_ref, out_ref, buffer, sem):
        start = offset_ref[0]
        if case.aligned:
            start = pl.multiple_of(start, 8)
        if case.layout == "stacked":  # the pooled kernels' own page DMA
            copy = pages.page_copy(pool_hbm, start, slice(None), buffer.at[pl.ds(0, count)], sem.at[0])
        else:
            copy = pltpu.make_async_copy(pool_hbm.at[pl.ds(start, count)], buffer.at[pl.ds(0, count)], sem.at[0])
        copy.start()
        copy.wait()
        rows = buffer[...].reshape(buffer_rows, WIDTH).astype(x_ref.dtype)
        out_ref[...] = jax.lax.dot_general(
            x_ref[...], rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    def fn(offset, pool, x):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((8, buffer_rows), jnp.float32),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1,
                grid=(1,),
                in_specs=[pl.BlockSpec(memory_space=pltpu.ANY), pl.BlockSpec((8, WIDTH), lambda i, *_: (0, 0))],
                out_specs=pl.BlockSpec((8, buffer_rows), lambda i, *_: (0, 0)),
                scratch_shapes=[pltpu.VMEM(buffer_shape, dtype), pltpu.SemaphoreType.DMA((1,))],
            ),
        )(offset, pool, x)

    sharding = jax.sharding.SingleDeviceSharding(topology_device(case.chip))
    args = (
        jax.ShapeDtypeStruct((1,), jnp.int32, sharding=sharding),
        jax.ShapeDtypeStruct(pool_shape, dtype, sharding=sharding),
        jax.ShapeDtypeStruct((8, WIDTH), jnp.bfloat16, sharding=sharding),
    )
    result = {**dataclasses.asdict(case), "ok": False, "error": None}
    try:
        with mosaic_version.pinned_ir_version():
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))
        lowered.compile()
        result["ok"] = True
    except Exception as exc:  # the compiler's refusal is this command's finding
        message = str(exc)
        marker = "Mosaic failed to compile TPU kernel: "
        first = message[message.index(marker) + len(marker) :] if marker in message else message
        result["error"] = first.splitlines()[0].strip()
    return result


#: Data rows of the pools ``--pooled`` compiles the pooled kernel on: 4,096 and 2,464 rows with the spare rows
#: (multiples of 32), and what ``pool.kernel_pool_rows`` makes of them.
POOLED_ROWS = (4094, 4093, 2462, 2461)


def compile_pooled(chip: str, variant: str, rows: int) -> dict:
    """The pooled kernel as ``bench tpu_compile`` compiles it (16 decode tokens, 16 lanes of rank 64, Llama-3-8B's
    q_proj), on pools of ``rows`` data rows (and the 2 spare rows) of ``variant`` ("int8" or "bfloat16")."""
    from torch_xla_lora.bench import tpu_compile_worker, tpu_grid

    tpu_grid.POOLED_POOL_ROWS = rows  # read by the worker's builder; this process compiles nothing else
    result = tpu_compile_worker.compile_one(tpu_grid.pooled_config(chip, variant, 16, 16, 64, "llama3-8b", "q_proj"))
    error = result.get("error") or ""
    marker = "Mosaic failed to compile TPU kernel: "
    first = error[error.index(marker) + len(marker) :].splitlines()[0].strip() if marker in error else error
    return {"chip": chip, "variant": variant, "pool_rows": rows + 2, "ok": result["ok"], "error": first or None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench.page_dma", description=__doc__)
    parser.add_argument("--chips", nargs="+", default=list(CHIPS), choices=sorted(CHIPS))
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    parser.add_argument(
        "--pooled",
        action="store_true",
        help="compile the pooled kernel itself on int8 and bf16 pools of POOLED_ROWS rows instead (about 40 s)",
    )
    args = parser.parse_args(argv)
    if args.pooled:
        if not args.json:
            print("| chip | pool | pool rows (with the spare rows) | Mosaic |")
            print("|---|---|---|---|")
        for chip in args.chips:
            for variant in ("int8", "bfloat16"):
                for rows in POOLED_ROWS:
                    result = compile_pooled(chip, variant, rows)
                    if args.json:
                        print(json.dumps(result), flush=True)
                    else:
                        verdict = "compiles" if result["ok"] else f'"{result["error"]}"'
                        print(f"| {chip} | {variant} | {rows + 2} | {verdict} |", flush=True)
        return 0
    if not args.json:
        print("| chip | dtype | pool layout | pool rows | rows a DMA | offset | Mosaic |")
        print("|---|---|---|---|---|---|---|")
    for case in cases(args.chips):
        result = compile_case(case)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            offset = "multiple of 8" if case.aligned else "any"
            verdict = "compiles" if result["ok"] else f'"{result["error"]}"'
            cells = (case.chip, case.dtype, case.layout, case.pool_rows, case.rows, offset, verdict)
            print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
