"""``python -m torch_xla_lora.bench vmem``: each TPU generation's VMEM as libtpu's compiler enforces it, no TPU needed.

The figures behind ``kernels/tuning.py``'s ``VMEM_CAPACITY_BYTES`` and the
scoped limits the kernels declare (``VMEM_LIMIT_BYTES``, and
``BASE_VMEM_LIMIT_BYTES`` for the fused base kernel). Two probes per chip,
compiled deviceless for the chip's named topology in a worker process with JAX
on the CPU (as ``bench tpu_compile``), kernels written at the ops' pinned
Mosaic IR version:

- capacity: a kernel with one VMEM scratch buffer. Asked for 1 GiB, the
  compiler refuses it with "Allocation (size=...) would exceed memory
  (size=N)"; N is the capacity. Then a scratch of exactly N must compile and
  one of N plus one (8, 128) float32 tile must be refused, so N is the bound
  the compiler applies, not only a figure in its message.
- declared limits: for each scoped limit in the table, a copy kernel whose input
  and output blocks take the limit less 64 KiB (declared with
  ``vmem_limit_bytes``) must compile, and one whose blocks take the limit plus
  64 KiB must be refused ("exceeded scoped vmem limit"): the compiler enforces
  the declared limit, and a kernel may fill it.
- the kernel among XLA's ops: the copy kernel filling the limit less 64 KiB,
  fed by an RMSNorm XLA computes and read by an XLA dot and residual add, in
  one jitted program, must compile: what XLA keeps in VMEM around a custom
  call still fits beside a kernel that takes all of its declared limit
  (``python -m torch_xla_lora.bench.fused_base_vmem --layer`` compiles the
  planned kernels of a whole decoder layer the same way).

Prints one row per check; exits 1 when a capacity differs from the table or a
check fails, 2 without libtpu (the ``test`` and ``tpu`` extras install it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

MIB = 1024 * 1024
MARGIN = 64 * 1024  # bytes below and above a declared limit
TILE = 8 * 128 * 4  # one (8, 128) float32 tile, the scratch's granularity
PROBE_BYTES = 1024 * MIB  # more VMEM than any chip has


def limits(chip: str) -> dict[str, int]:
    """The scoped limits the kernels declare on ``chip``: table name -> bytes."""
    from torch_xla_lora.kernels import tuning

    return {name: getattr(tuning, name)[chip] for name in ("VMEM_LIMIT_BYTES", "BASE_VMEM_LIMIT_BYTES")}


# -- the worker (JAX on the CPU, libtpu's compiler) ---------------------------------------------


def _compile(chip: str, fn, arg_shape: tuple[int, int]) -> str | None:
    """None when ``fn`` compiles for ``chip``, else the compiler's error."""
    import jax
    import jax.numpy as jnp

    from torch_xla_lora.bench import tpu_compile_worker
    from torch_xla_lora.kernels import mosaic_version

    sharding = jax.sharding.SingleDeviceSharding(tpu_compile_worker.topology_device(chip))
    try:
        with mosaic_version.pinned_ir_version():
            spec = jax.ShapeDtypeStruct(arg_shape, jnp.float32, sharding=sharding)
            jax.jit(fn).trace(spec).lower(lowering_platforms=("tpu",)).compile()
    except Exception as exc:  # the compiler's refusal is the probe's finding
        return f"{type(exc).__name__}: {exc}"
    return None


def _scratch_kernel(scratch_bytes: int):
    """A kernel holding one float32 VMEM scratch of ``scratch_bytes`` (a multiple of TILE), read and written."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    def kernel(x_ref, o_ref, scratch):
        scratch[...] = jnp.zeros(scratch.shape, jnp.float32) + x_ref[0:1, :]
        o_ref[...] = scratch[0:8, :]

    def fn(x):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
            scratch_shapes=[pltpu.VMEM((scratch_bytes // 512, 128), jnp.float32)],
        )(x)

    return fn


def _copy_kernel(block_bytes: int, limit: int):
    """(fn, argument shape): a one-step copy whose input and output blocks are ``block_bytes`` each."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    rows = block_bytes // TILE * 8

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    def fn(x):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((rows, 128), jnp.float32),
            grid=(1,),
            in_specs=[pl.BlockSpec((rows, 128), lambda i: (i, 0))],
            out_specs=pl.BlockSpec((rows, 128), lambda i: (i, 0)),
            compiler_params=pltpu.CompilerParams(vmem_limit_bytes=limit),
        )(x)

    return fn, (rows, 128)


def _among_xla_ops(block_bytes: int, limit: int):
    """(fn, argument shape): the copy kernel of :func:`_copy_kernel` between XLA's ops in one program, an
    RMSNorm producing its input, a dot and a residual add consuming its output."""
    import jax
    import jax.numpy as jnp

    copy, shape = _copy_kernel(block_bytes, limit)

    def fn(x):
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return copy(normed) @ jnp.full((128, 128), 0.5, jnp.float32) + x

    return fn, shape


def _capacity(error: str | None) -> int | None:
    import re

    match = re.search(r"would exceed memory \(size=(\d+)\)", error or "")
    return int(match.group(1)) if match else None


def probe_chip(chip: str) -> list[dict]:
    """Every check of one chip, as JSON-able rows (``ok``: the compiler did what the check expects)."""
    rows = []

    def check(what: str, fn, shape, expect_ok: bool, refusal: str, **extra) -> None:
        start = time.perf_counter()
        error = _compile(chip, fn, shape)
        ok = error is None if expect_ok else (error is not None and refusal in error)
        row = {"chip": chip, "check": what, "expect": "compiles" if expect_ok else "refused", "ok": ok, **extra}
        row["seconds"] = time.perf_counter() - start
        if error is not None:
            row["error"] = error[:600]
        rows.append(row)

    error = _compile(chip, _scratch_kernel(PROBE_BYTES), (8, 128))
    capacity = _capacity(error)
    rows.append({"chip": chip, "check": "capacity", "bytes": capacity, "expect": "a size", "ok": bool(capacity)})
    if capacity is None:
        rows[-1]["error"] = (error or "compiled")[:600]
        return rows
    exceed = "would exceed memory"
    check("scratch = capacity", _scratch_kernel(capacity), (8, 128), True, exceed, bytes=capacity)
    check("scratch = capacity + 4 KiB", _scratch_kernel(capacity + TILE), (8, 128), False, exceed, bytes=capacity)
    for name, limit in limits(chip).items():
        for sign, expect_ok in ((-1, True), (1, False)):
            fn, shape = _copy_kernel((limit + sign * MARGIN) // 2, limit)
            what = f"{name}: blocks = limit {'-' if sign < 0 else '+'} 64 KiB"
            check(what, fn, shape, expect_ok, "exceeded scoped vmem limit", bytes=limit)
        fn, shape = _among_xla_ops((limit - MARGIN) // 2, limit)
        check(f"{name}: blocks = limit - 64 KiB, among XLA ops", fn, shape, True, "", bytes=limit)
    return rows


def _worker(chips: Sequence[str]) -> int:
    from importlib import metadata

    try:
        libtpu = metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        libtpu = None
    print(json.dumps({"libtpu": libtpu}), flush=True)
    if libtpu is None:
        return 3
    for chip in chips:
        for row in probe_chip(chip):
            print(json.dumps(row), flush=True)
    return 0


# -- the command --------------------------------------------------------------------------------


def run(chips: Sequence[str], timeout: float = 1800) -> tuple[str | None, list[dict], subprocess.CompletedProcess]:
    """(libtpu version, result rows, the finished process) of a worker process probing ``chips``."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch_xla_lora.bench.vmem", "--worker", "--chips", *chips],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    header = lines[0] if lines else {}
    return header.get("libtpu"), lines[1:], proc


def main(argv: Sequence[str] | None = None) -> int:
    from torch_xla_lora.bench import tpu_grid
    from torch_xla_lora.kernels import tuning

    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench vmem", description=__doc__)
    parser.add_argument("--chips", nargs="+", default=list(tpu_grid.CHIPS), choices=list(tpu_grid.CHIPS))
    parser.add_argument("--json", help="write every row to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.chips)

    libtpu, rows, proc = run(args.chips)
    if libtpu is None:
        print("error: libtpu is not installed (pip install -e '.[test]' or '.[tpu]')", file=sys.stderr)
        return 2
    print(f"libtpu {libtpu}, deviceless compiles; capacity in the table: tuning.VMEM_CAPACITY_BYTES")
    print("| chip | check | MiB | expected | result |")
    print("|---|---|---:|---|---|")
    failed = []
    for row in rows:
        if row["check"] == "capacity" and row["ok"]:
            row["ok"] = row["bytes"] == tuning.VMEM_CAPACITY_BYTES[row["chip"]]
            row["expect"] = f"table: {tuning.VMEM_CAPACITY_BYTES[row['chip']] / MIB:g}"
        mib = "-" if row.get("bytes") is None else f"{row['bytes'] / MIB:g}"
        print(f"| {row['chip']} | {row['check']} | {mib} | {row['expect']} | {'ok' if row['ok'] else 'FAILED'} |")
        if not row["ok"]:
            failed.append(row)
    for row in failed:
        print(f"FAILED {row['chip']} {row['check']}: {row.get('error', '')}")
    if proc.returncode:
        print(f"error: the worker failed:\n{proc.stderr[-3000:]}")
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"libtpu": libtpu, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
