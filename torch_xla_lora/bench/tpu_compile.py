"""``python -m torch_xla_lora.bench tpu_compile``: compile every Pallas kernel with libtpu's TPU compiler.

No TPU is needed: libtpu compiles for a named topology (v4, v5e, v5p, v6e)
in a worker process with JAX on the CPU (``tpu_compile_worker``), so torch_xla
in the calling process is never disturbed. Each configuration is the op
wrapper's own JAX function (backend "pallas", the chip's generation), so the
check covers padding, plans, block sizes and metadata shapes as the ops make
them. The Mosaic compiler checks what ``jax.export`` cannot: VMEM budgets,
layouts, DMA and loop legality.

Grids (``tpu_grid``): ``--grid sample`` (default) compiles ``--per-cell``
configurations per (chip, kernel) cell, covering every token count, rank, slot
count, dtype and variant in each cell and every layer shape for each kernel;
``--grid full`` is the whole cartesian product (230,400 configurations with
``tpu_grid``'s axes: narrow it with ``--chips``, ``--kernels``, ``--models``,
``--limit``).

``--moe`` compiles whole mixture-of-experts expert layers instead (``bench.moe_layer``: the
grouped base matmuls and the expert LoRA as the layer runs them on TPU) for the models of
``tpu_grid.MOE_MODELS`` at 1,024 and 8,192 routed rows, v5e and v6e, and prints their HBM
temporaries (``memory_analysis()``) and libtpu's ``cost_analysis()`` as a markdown table.
Needs libtpu (the ``test`` and ``tpu`` extras install it).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

from torch_xla_lora.bench import tpu_grid


@dataclasses.dataclass
class Run:
    """What a worker reported: the versions it compiled with and one result per configuration."""

    libtpu: str | None
    jax: str | None
    results: list[dict]
    stderr: str
    returncode: int


def run(configs: Iterable[tpu_grid.Config], pin_ir_version: bool = True, timeout: float = 3600) -> Run:
    """Compile ``configs`` in a fresh worker process; results in order (``ok``, ``error``, timings, memory)."""
    request = {"configs": [dataclasses.asdict(c) for c in configs], "pin_ir_version": pin_ir_version}
    proc = subprocess.run(
        [sys.executable, "-m", "torch_xla_lora.bench.tpu_compile_worker"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    header = lines[0] if lines else {}
    return Run(header.get("libtpu"), header.get("jax"), lines[1:], proc.stderr, proc.returncode)


def summary(results: Sequence[dict]) -> list[dict]:
    """Per (chip, kernel): configurations compiled / tried, compile seconds, the VMEM estimate of the
    configuration closest to its own limit (a kernel's plans and limits differ by path), HBM temp."""
    rows = []
    key = lambda r: (r["config"]["chip"], r["config"]["kernel"])  # noqa: E731
    for (chip, kernel), group in itertools.groupby(sorted(results, key=key), key=key):
        group = list(group)
        done = [r for r in group if r["ok"]]
        tightest = max(group, key=lambda r: r.get("vmem_estimate", 0) / max(r.get("vmem_limit", 0), 1))
        rows.append(
            {
                "chip": chip,
                "kernel": kernel,
                "compiled": len(done),
                "tried": len(group),
                "compile_s_total": sum(r["compile_s"] for r in done),
                "compile_s_max": max((r["compile_s"] for r in done), default=0.0),
                "vmem_estimate_mib": tightest.get("vmem_estimate", 0) / 2**20,
                "vmem_limit_mib": tightest.get("vmem_limit", 0) / 2**20,
                "hbm_temp_max_mib": max((r["memory"]["temp"] for r in done), default=0) / 2**20,
            }
        )
    return rows


def _table(rows: Sequence[dict]) -> str:
    lines = [
        "| chip | kernel | compiled / tried | compile s (total, max) | VMEM estimate / limit, tightest (MiB) "
        "| HBM temp max (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chip']} | {r['kernel']} | {r['compiled']} / {r['tried']} | "
            f"{r['compile_s_total']:.1f}, {r['compile_s_max']:.1f} | "
            f"{r['vmem_estimate_mib']:.1f} / {r['vmem_limit_mib']:.0f} | {r['hbm_temp_max_mib']:.1f} |"
        )
    return "\n".join(lines)


def moe_activation_bytes(result: dict) -> int:
    """One copy of each of an expert layer's row activations: rows x (hidden + 2I up + I gated) x itemsize."""
    cfg = result["config"]
    itemsize = 2 if cfg["dtype"] == "bfloat16" else 4
    return result["routed_rows"] * (cfg["in_features"] + 3 * cfg["out_features"]) * itemsize


def moe_gather_bytes(result: dict) -> int:
    """What gathering the up projection's expert weight per routed row would hold (transformers' batched_mm)."""
    cfg = result["config"]
    itemsize = 2 if cfg["dtype"] == "bfloat16" else 4
    return result["routed_rows"] * 2 * cfg["out_features"] * cfg["in_features"] * itemsize


def moe_rows(results: Sequence[dict]) -> list[dict]:
    """One row per (chip, model, routed rows): the base ("base") and with-LoRA ("lora") compilations side by side."""
    rows = {}
    for r in results:
        cfg = r["config"]
        key = (cfg["chip"], cfg["model"], cfg["tokens"])
        row = rows.setdefault(
            key,
            {
                "chip": cfg["chip"],
                "model": cfg["model"],
                "tokens": cfg["tokens"],
                "routed_rows": r.get("routed_rows"),
                "activation_mib": moe_activation_bytes(r) / 2**20 if "routed_rows" in r else None,
                "gather_gib": moe_gather_bytes(r) / 2**30 if "routed_rows" in r else None,
            },
        )
        variant = cfg["variant"]
        row[f"{variant}_ok"] = r["ok"]
        if r["ok"]:
            row[f"{variant}_temp_mib"] = r["memory"]["temp"] / 2**20
            row[f"{variant}_flops"] = r["cost"].get("flops")
            row[f"{variant}_bytes"] = r["cost"].get("bytes accessed")
            row[f"{variant}_compile_s"] = r["compile_s"]
    return list(rows.values())


def _moe_table(rows: Sequence[dict]) -> str:
    def num(row: dict, key: str, scale: float = 1.0, fmt: str = ".1f") -> str:
        value = row.get(key)
        return "failed" if value is None else f"{value / scale:{fmt}}"

    lines = [
        "| chip | model | routed rows | HBM temp, base (MiB) | HBM temp, LoRA (MiB) | LoRA temp / activations "
        "| rows x weight gather (GiB) | GFLOP base / LoRA | GB accessed base / LoRA | compile s base / LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r.get("lora_temp_mib")
        share = "failed" if share is None else f"{share / r['activation_mib']:.2f}"
        lines.append(
            f"| {r['chip']} | {r['model']} | {r['routed_rows']:,} | {num(r, 'base_temp_mib')} | "
            f"{num(r, 'lora_temp_mib')} | {share} | {r['gather_gib']:,.0f} | "
            f"{num(r, 'base_flops', 1e9, ',.0f')} / {num(r, 'lora_flops', 1e9, ',.0f')} | "
            f"{num(r, 'base_bytes', 1e9)} / {num(r, 'lora_bytes', 1e9)} | "
            f"{num(r, 'base_compile_s')} / {num(r, 'lora_compile_s')} |"
        )
    return "\n".join(lines)


def _configs(args: argparse.Namespace) -> list[tpu_grid.Config]:
    if args.moe:
        chips = args.chips or list(tpu_grid.MOE_CHIPS)
        models = [m for m in tpu_grid.MOE_MODELS if not args.models or m in args.models]
        configs = tpu_grid.moe_grid(tuple(chips), tuple(models))
        return configs[: args.limit] if args.limit else configs
    args.chips = args.chips or list(tpu_grid.CHIPS)
    if args.grid == "sample":
        configs = tpu_grid.sample(args.per_cell, tuple(args.chips), args.kernels)
        if not args.kernels or "fused" in args.kernels:  # + gpt-oss's expert LoRA on lane-padded slots
            configs += tpu_grid.expert_lora_grid(tuple(c for c in args.chips if c in tpu_grid.MOE_CHIPS))
    else:
        configs = tpu_grid.full(tuple(args.chips), args.kernels)
    configs = [c for c in configs if not args.models or c.model in args.models]
    return configs[: args.limit] if args.limit else configs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench tpu_compile", description=__doc__)
    parser.add_argument("--grid", choices=["sample", "full"], default="sample")
    parser.add_argument("--per-cell", type=int, default=6, help="sample: configurations per (chip, kernel)")
    parser.add_argument(
        "--chips", nargs="+", choices=list(tpu_grid.CHIPS), help="default: all (v5e and v6e with --moe)"
    )
    parser.add_argument(
        "--moe",
        action="store_true",
        help="compile whole MoE expert layers instead (tpu_grid.MOE_MODELS, 1,024 and 8,192 routed rows, base and "
        "with expert LoRA) and print their HBM temporaries",
    )
    parser.add_argument("--kernels", nargs="+", choices=[k.name for k in tpu_grid.KERNELS])
    parser.add_argument("--models", nargs="+", help="only layers of these models (tpu_grid.LAYERS names)")
    parser.add_argument("--limit", type=int, help="at most this many configurations")
    parser.add_argument("--json", help="write every result to this file")
    parser.add_argument(
        "--no-ir-pin",
        action="store_true",
        help="lower at jax's own Mosaic IR version instead of the ops' pinned one (which libtpu reads it?)",
    )
    args = parser.parse_args(argv)

    configs = _configs(args)
    print(f"compiling {len(configs)} configurations with libtpu (deviceless) ...", flush=True)
    start = time.perf_counter()
    result = run(configs, pin_ir_version=not args.no_ir_pin)
    if result.libtpu is None:
        print("error: libtpu is not installed (pip install -e '.[test]' or '.[tpu]')", file=sys.stderr)
        return 2
    print(f"libtpu {result.libtpu}, jax {result.jax}, {time.perf_counter() - start:.0f} s wall")
    if args.moe:
        print(
            f"Expert layers, bfloat16, expert LoRA of rank {tpu_grid.MOE_RANK} over {tpu_grid.MOE_SLOTS} slots "
            "(LoRA: every routed row has an adapter); activations = rows x (hidden + 3 x expert width) x 2 bytes"
        )
        print(_moe_table(moe_rows(result.results)))
    else:
        print(_table(summary(result.results)))
    failed = [r for r in result.results if not r["ok"]]
    for r in failed:
        print(f"FAILED {r['name']}: {r['error'][:400]}")
    if len(result.results) != len(configs):
        print(f"error: the worker stopped after {len(result.results)} of {len(configs)}:\n{result.stderr[-3000:]}")
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"libtpu": result.libtpu, "jax": result.jax, "results": result.results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
