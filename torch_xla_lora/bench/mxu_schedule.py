"""``python -m torch_xla_lora.bench.mxu_schedule``: the cost model's MXU padding against libtpu's own schedule.

Every TPU figure in this repository prices a matmul's MXU work with ``kernels.cost.mxu_flops``: the
contraction (K) and output (N) widths padded to whole MXU tiles (128 on a v5e, 256 on a v6e), so a rank-16
shrink costs what a full tile's width does. That rule decides, among others, the training floor
(``tpu_train_model.lora_mxu_floor_seconds``). This command checks it against the TPU compiler itself, with no
TPU: it compiles a one-block Pallas matmul per shape for a chip with libtpu (deviceless, as
:mod:`torch_xla_lora.bench.tpu_compile` does), has libtpu dump its scheduled machine code (its LLO "final
bundles"), and reads from it the MXU matmul instructions issued and the kernel's static schedule length in
cycles (the straight-line program: one block, no loop). Each shape is compared with the same product at the
MXU's full width; the model's ratio is 1.0 for any width up to a tile.

The products are LoRA's: a shrink ``x [M, K] @ A [N, K]^T`` (the kernels' orientation, both minor dimensions
contracted) at output widths N from 8 to a tile, and an expand ``s [M, N] @ B [N, K]`` at contraction widths
(ranks) from 8 to a tile.

One worker process per compiled kernel (libtpu reads its dump flags once per process); about 3 s each.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence

#: The chips checked: the topology names :mod:`torch_xla_lora.bench.tpu_grid` compiles for.
CHIPS = ("v5e", "v6e")
#: Rows (tokens) and the long dimension of every probe.
ROWS, WIDE = 256, 4096
#: The narrow widths probed: LoRA ranks, then a full v5e tile and a full v6e tile.
NARROW = (8, 16, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Probe:
    """One compiled product: ``kind`` "shrink" (x [rows, wide] @ A [narrow, wide]^T) or "expand"
    (s [rows, narrow] @ B [narrow, wide]) on ``chip``."""

    chip: str
    kind: str
    narrow: int
    rows: int = ROWS
    wide: int = WIDE

    @property
    def matmul(self) -> tuple[int, int, int]:
        """(M, K, N) of the product, as ``mxu_flops`` takes it."""
        if self.kind == "shrink":
            return self.rows, self.wide, self.narrow
        return self.rows, self.narrow, self.wide


def _worker(probe: Probe) -> None:
    """Compile ``probe``'s kernel for its chip (this process's libtpu dumps its schedule; see :func:`schedule`)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    from torch_xla_lora.bench.tpu_compile_worker import topology_device
    from torch_xla_lora.kernels import mosaic_version

    if probe.kind == "shrink":
        shapes, out = [(probe.rows, probe.wide), (probe.narrow, probe.wide)], (probe.rows, probe.narrow)
        dims = (((1,), (1,)), ((), ()))
    else:
        shapes, out = [(probe.rows, probe.narrow), (probe.narrow, probe.wide)], (probe.rows, probe.wide)
        dims = (((1,), (0,)), ((), ()))

    def kernel(left_ref, right_ref, out_ref):
        out_ref[...] = jax.lax.dot_general(left_ref[...], right_ref[...], dims, preferred_element_type=jnp.float32)

    def fn(left, right):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(out, jnp.float32), name="mxu_probe")(left, right)

    sharding = jax.sharding.SingleDeviceSharding(topology_device(probe.chip))
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding) for shape in shapes]
    with mosaic_version.pinned_ir_version():
        jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()


def schedule(probe: Probe, timeout: float = 300) -> dict:
    """Compile ``probe`` in a worker process with libtpu's LLO dump on, and read the kernel's schedule:
    ``{"cycles": static schedule length, "matmuls": MXU matmul instructions, "pushes": weight pushes}``."""
    with tempfile.TemporaryDirectory() as dump:
        env = dict(os.environ)
        env.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
        env["LIBTPU_INIT_ARGS"] = (
            f"--xla_jf_dump_to={dump} --xla_jf_dump_llo_text=true "
            "--xla_jf_dump_llo_pass_label_regex=final_bundles|post-delay-converter"
        )
        command = [sys.executable, "-m", "torch_xla_lora.bench.mxu_schedule"]
        proc = subprocess.run(
            [*command, "--worker", json.dumps(dataclasses.asdict(probe))],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"libtpu did not compile {probe}:\n{proc.stderr[-3000:]}")
        return _read_dump(dump)


def _read_dump(dump: str) -> dict:
    """The compiled kernel's figures from a dump directory (the Pallas call is the module's fusion ``fn``)."""
    bundles = glob.glob(os.path.join(dump, "*-fn.*-final_bundles.txt"))
    delays = glob.glob(os.path.join(dump, "*-fn.*-post-delay-converter.txt"))
    if len(bundles) != 1 or len(delays) != 1:
        raise RuntimeError(f"expected one kernel's dump, found {len(bundles)} bundle and {len(delays)} schedule files")
    with open(delays[0]) as f:
        cycles = int(re.search(r"region range: \[0, (\d+)\)", f.read()).group(1))
    with open(bundles[0]) as f:
        opcodes = re.findall(r"= (v[a-z_0-9.]+)", f.read())
    return {
        "cycles": cycles,
        "matmuls": sum(op.startswith("vmatmul") for op in opcodes),
        "pushes": sum(op.startswith("vmatpush") for op in opcodes),
    }


def rows(
    chips: Sequence[str] = CHIPS,
    narrow: Sequence[int] = NARROW,
    kinds: Sequence[str] = ("shrink", "expand"),
    progress: bool = True,
) -> list[dict]:
    """One row per (chip, kind, narrow width): libtpu's schedule, and its ratios to the same product at the
    chip's full MXU width next to the cost model's."""
    from torch_xla_lora.bench import tpu_model
    from torch_xla_lora.kernels.cost import mxu_flops

    out = []
    for chip in chips:
        width = tpu_model.CHIPS[chip].mxu_width
        for kind in kinds:
            full = Probe(chip, kind, width)
            reference = schedule(full)
            for n in narrow:
                probe = Probe(chip, kind, n)
                got = reference if n == width else schedule(probe)
                model = mxu_flops([probe.matmul], width) / mxu_flops([full.matmul], width)
                row = {"chip": chip, "kind": kind, "narrow": n, "mxu_width": width, **got}
                row.update(
                    cycles_ratio=got["cycles"] / reference["cycles"],
                    matmuls_ratio=got["matmuls"] / reference["matmuls"],
                    model_ratio=model,
                )
                out.append(row)
                if progress:
                    print(f"  {chip} {kind} {probe.matmul}: {got['cycles']} cycles", file=sys.stderr, flush=True)
    return out


def table(results: Sequence[dict]) -> str:
    """The markdown table of :func:`rows`."""
    lines = [
        "| chip | product | (M, K, N) | libtpu cycles | / full width | MXU matmul instr. | / full width "
        "| model (mxu_flops) / full width |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shape = Probe(r["chip"], r["kind"], r["narrow"]).matmul
        lines.append(
            f"| {r['chip']} | {r['kind']} | {shape} | {r['cycles']} | {r['cycles_ratio']:.2f} | {r['matmuls']} "
            f"| {r['matmuls_ratio']:.2f} | {r['model_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench.mxu_schedule", description=__doc__)
    parser.add_argument("--chips", nargs="+", default=list(CHIPS), choices=CHIPS)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(Probe(**json.loads(args.worker)))
        return 0
    results = rows(args.chips)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
