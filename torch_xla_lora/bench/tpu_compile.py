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
``--pooled-linear``, ``--pooled-expand`` and ``--pooled-experts`` compile the pooled (rank-true storage) reads
instead and print libtpu's bytes. ``--linear-train`` compiles the training step's kernels at the TPU training
model's shape (``tpu_grid.linear_train_configs``: T = 8192) and prints libtpu's counts beside their estimates.
Each result records the compiled program's HBM traffic and what it runs on a kernel's result (``hlo_traffic``).
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
    configuration closest to its own limit (a kernel's plans and limits differ by path), HBM temp, the compiled
    programs' HBM traffic summed (``hlo_traffic.hbm_bytes``) and what they run on a kernel's result
    (``hlo_traffic.after_kernels``, every configuration's together)."""
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
                "hbm_traffic_mb": sum(r.get("hbm_bytes") or 0 for r in done) / 1e6,
                "after_kernels": sorted({op for r in done for op in r.get("after_kernels") or ()}),
            }
        )
    return rows


def _table(rows: Sequence[dict]) -> str:
    lines = [
        "| chip | kernel | compiled / tried | compile s (total, max) | VMEM estimate / limit, tightest (MiB) "
        "| HBM temp max (MiB) | HBM traffic, all configurations (MB) | run on a kernel's result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        after = ", ".join(r["after_kernels"]) or "nothing"
        lines.append(
            f"| {r['chip']} | {r['kernel']} | {r['compiled']} / {r['tried']} | "
            f"{r['compile_s_total']:.1f}, {r['compile_s_max']:.1f} | "
            f"{r['vmem_estimate_mib']:.1f} / {r['vmem_limit_mib']:.0f} | {r['hbm_temp_max_mib']:.1f} | "
            f"{r['hbm_traffic_mb']:.1f} | {after} |"
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


@dataclasses.dataclass(frozen=True)
class PooledLinearCase:
    """One compilation of the pooled one-pass kernel (``fused_base.linear_lora(..., page_table=)``, what
    ``linear_lora_pooled`` runs on TPU): a decode batch whose distinct adapters have the true ranks ``ranks``,
    read from pools of ``pool_rows`` rows (``pool`` "bfloat16" or "int8") under a bfloat16 or int8 base."""

    chip: str
    pool: str
    int8_base: bool = False
    tokens: int = 8
    hidden: int = 4096
    out: int = 4096
    rank: int = 64
    slots: int = 16
    ranks: tuple[int, ...] = (8, 16, 64)
    pool_rows: int = 8 * 300 + 1  # not a multiple of 32 rows (an int8 pool's 8-row DMAs compile on a v6e)

    @property
    def name(self) -> str:
        base = "int8_base" if self.int8_base else "bf16_base"
        return f"{self.chip}-linear_pooled-{self.pool}_pool-{base}-T{self.tokens}-L{self.slots}-R{self.rank}"


def pooled_linear_cases(chips: Sequence[str] = ("v5e", "v6e")) -> list[PooledLinearCase]:
    """bfloat16 and int8 pools under a bfloat16 base, and int8 pools under an int8 base, on each chip
    (Llama-3-8B's q_proj, 4096 x 4096, at decode)."""
    return [
        PooledLinearCase(chip, pool, int8_base)
        for chip in chips
        for pool, int8_base in (("bfloat16", False), ("int8", False), ("int8", True))
    ]


def compile_pooled_linear(cases: Sequence[PooledLinearCase], timeout: float = 1200) -> list[dict]:
    """Compile ``cases`` with libtpu in a worker process (JAX on the CPU); one result per case, in order: ``ok`` or
    ``error``, the VMEM estimate and limit, the kernel's declared estimate, libtpu's cost analysis, and the
    batch's true-rank adapter bytes (whole pages, int8 at one byte an element)."""
    request = json.dumps([dataclasses.asdict(c) for c in cases])
    proc = subprocess.run(
        [sys.executable, "-c", "from torch_xla_lora.bench.tpu_compile import _pooled_worker; _pooled_worker()"],
        input=request,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1"},
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(results) != len(cases):
        raise RuntimeError(f"the worker stopped after {len(results)} of {len(cases)}:\n{proc.stderr[-3000:]}")
    return results


def _pooled_worker() -> None:
    """The worker of :func:`compile_pooled_linear`: cases on stdin, one JSON line per result on stdout."""
    import jax
    import jax.numpy as jnp

    from torch_xla_lora.bench.tpu_compile_worker import topology_device
    from torch_xla_lora.kernels import fused_base, mosaic_version, pages

    for raw in json.loads(sys.stdin.read()):
        case = PooledLinearCase(**{**raw, "ranks": tuple(raw["ranks"])})
        result = {"name": case.name, "ok": False}
        try:
            dtype, int8 = jnp.bfloat16, case.pool == "int8"
            fusion = fused_base.Fusion(weight_scale=case.int8_base)
            shape = (case.tokens, case.hidden, case.out, case.rank, case.slots)
            fn, args = fused_base.tpu_compile_case(
                *shape, dtype, case.chip, fusion=fusion, pool_rows=case.pool_rows, int8_pool=int8,
                typical_ranks=case.ranks,
            )  # fmt: skip
            sizes, lanes = fused_base.pooled_plan(*shape, dtype, case.chip, False, fusion, int8)
            scale_rows = pages.padded_scale_rows(case.pool_rows) if int8 else 0
            pooled = pages.Pooled(case.rank, int8, case.slots, scale_rows)
            padded = sizes.padded_tokens(case.tokens)
            estimate = fused_base.pooled_cost_estimate(
                padded, case.hidden, case.out, case.ranks, case.rank, dtype, sizes, lanes, fusion, pooled
            )
            vmem = fused_base.pooled_vmem_bytes(sizes, case.rank, case.slots, lanes, dtype, False, fusion, int8)
            result.update(
                block=dataclasses.asdict(sizes),
                lanes=lanes,
                vmem_estimate=vmem,
                vmem_limit=fused_base.vmem_limit(case.chip),
                estimate={"flops": estimate.flops, "bytes accessed": estimate.bytes_accessed},
                base_bytes=fused_base.hbm_bytes(padded, case.hidden, case.out, sizes, 2, fusion) + 4 * padded,
                adapter_bytes=pages.pool_rows_read(case.ranks) * (case.hidden + case.out) * (1 if int8 else 2),
            )  # fmt: skip
            sharding = jax.sharding.SingleDeviceSharding(topology_device(case.chip))
            args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
            start = time.perf_counter()
            with mosaic_version.pinned_ir_version():
                compiled = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()
            result["compile_s"] = time.perf_counter() - start
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            result["cost"] = {key: float(cost[key]) for key in ("flops", "bytes accessed") if key in (cost or {})}
            result["ok"] = True
        except Exception as exc:  # a compile error is this check's finding: report it, go on
            result["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        print(json.dumps(result), flush=True)


def _pooled_table(results: Sequence[dict]) -> str:
    lines = [
        "| case | compiled | VMEM estimate / limit (MiB) | adapter bytes (true rank) | estimate bytes | libtpu bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        mib = f"{r.get('vmem_estimate', 0) / 2**20:.1f} / {r.get('vmem_limit', 0) / 2**20:.0f}"
        cost = r.get("cost", {}).get("bytes accessed", 0)
        ok = "yes" if r["ok"] else "NO"
        estimate = r.get("estimate", {}).get("bytes accessed", 0)
        lines.append(f"| {r['name']} | {ok} | {mib} | {r.get('adapter_bytes', 0):,} | {estimate:,} | {cost:,.0f} |")
    return "\n".join(lines)


def _pooled_expand_table(results: Sequence[dict]) -> str:
    lines = [
        "| case | compiled | path | kernel estimate MB | libtpu MB accessed | libtpu MFLOP |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        cost = r.get("cost", {})
        mb, mflop = cost.get("bytes accessed", 0) / 1e6, cost.get("flops", 0) / 1e6
        estimate = f"{r['estimate']['bytes accessed'] / 1e6:.1f}" if "estimate" in r else "-"  # the kernel's own
        ok = "yes" if r["ok"] else f"NO: {r.get('error', '')[:200]}"
        lines.append(f"| {r['name']} | {ok} | {r.get('path', '')} | {estimate} | {mb:.1f} | {mflop:.1f} |")
    return "\n".join(lines)


def _pooled_experts_table(results: Sequence[dict]) -> str:
    lines = [
        "| case | compiled | path | kernel estimate MB | libtpu MB accessed | libtpu / estimate |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        cost = r.get("cost", {}).get("bytes accessed", 0) / 1e6
        estimate = r.get("estimate", {}).get("bytes accessed", 0) / 1e6
        ok = "yes" if r["ok"] else f"NO: {r.get('error', '')[:200]}"
        ratio = f"{cost / estimate:.2f}x" if estimate else "-"
        lines.append(f"| {r['name']} | {ok} | {r.get('path', '')} | {estimate:.1f} | {cost:.1f} | {ratio} |")
    return "\n".join(lines)


def _linear_train_table(results: Sequence[dict]) -> str:
    """One row per training kernel (:func:`tpu_grid.linear_train_configs`): its plan, VMEM, and libtpu's count of
    the compiled program beside the kernel's declared ``pl.CostEstimate``."""
    lines = [
        "| chip | projection | pass | T | tiles (tokens x out x reduction) | VMEM estimate / limit (MiB) "
        "| libtpu GFLOP / estimate | libtpu MB accessed / estimate | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        config = r["config"]
        kind = "backward (dx, ds, dB)" if config["variant"].startswith("backward") else f"forward ({config['variant']})"
        head = f"| {config['chip']} | {config['layer']} | {kind} | {config['tokens']} |"
        if not r["ok"]:
            lines.append(f"{head} NO: {r.get('error', '')[:200]} ||||")
            continue
        block = r["block"]
        tiles = f"{block['tokens']} x {block['out']} x {block.get('hidden', '')}"
        cost, estimate = r["cost"], r["estimate"]
        flops = f"{cost['flops'] / 1e9:.1f} / {estimate['flops'] / 1e9:.1f}"
        nbytes = f"{cost['bytes accessed'] / 1e6:.0f} / {estimate['bytes accessed'] / 1e6:.0f}"
        vmem = f"{r['vmem_estimate'] / 2**20:.1f} / {r['vmem_limit'] / 2**20:.0f}"
        lines.append(f"{head} {tiles} | {vmem} | {flops} | {nbytes} | {r['compile_s']:.1f} |")
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
    parser.add_argument(
        "--pooled-linear",
        action="store_true",
        help="compile the pooled one-pass kernel instead (pooled_linear_cases: bfloat16 and int8 pools, an int8 "
        "base, Llama-3-8B q_proj at decode) and print its VMEM and bytes",
    )
    parser.add_argument(
        "--pooled-expand",
        action="store_true",
        help="compile the embedding's pooled expand instead (tpu_grid.pooled_expand_configs: a decode beside the "
        "gathered slot kernel it replaced, an int8 prefill) and print libtpu's bytes and flops",
    )
    parser.add_argument(
        "--pooled-experts",
        action="store_true",
        help="compile an experts layer's pooled read instead (tpu_grid.pooled_experts_configs: Qwen3-30B-A3B's "
        "gate_up_proj, 2,048 entries, bfloat16 and int8 pools) and print libtpu's bytes beside the kernel's estimate",
    )
    parser.add_argument(
        "--linear-train",
        action="store_true",
        help="compile the training step's kernels instead at the TPU training model's shape "
        "(tpu_grid.linear_train_configs: Llama-3-8B's projections, T = 8192, 8 slots of rank 64; the forward keeping "
        "s, the backward's pass over g; v5e and v6e unless --chips) and print libtpu's counts beside their estimates",
    )
    args = parser.parse_args(argv)
    if args.linear_train:
        configs = tpu_grid.linear_train_configs(tuple(args.chips or ("v5e", "v6e")))
        print(f"compiling {len(configs)} training kernels with libtpu (deviceless) ...", flush=True)
        result = run(configs, pin_ir_version=not args.no_ir_pin)
        print(_linear_train_table(result.results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"libtpu": result.libtpu, "jax": result.jax, "results": result.results}, f, indent=1)
        return 0 if len(result.results) == len(configs) and all(r["ok"] for r in result.results) else 1
    if args.pooled_experts:
        result = run(tpu_grid.pooled_experts_configs(), pin_ir_version=not args.no_ir_pin)
        print(_pooled_experts_table(result.results))
        return 0 if result.results and all(r["ok"] for r in result.results) else 1
    if args.pooled_expand:
        result = run(tpu_grid.pooled_expand_configs(), pin_ir_version=not args.no_ir_pin)
        print(_pooled_expand_table(result.results))
        return 0 if result.results and all(r["ok"] for r in result.results) else 1
    if args.pooled_linear:
        results = compile_pooled_linear(pooled_linear_cases(tuple(c for c in args.chips or ("v5e", "v6e"))))
        print(_pooled_table(results))
        for r in results:
            if not r["ok"]:
                print(f"FAILED {r['name']}: {r['error'][:400]}")
        return 0 if all(r["ok"] for r in results) else 1

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
