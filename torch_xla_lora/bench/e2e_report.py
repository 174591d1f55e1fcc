"""Results of the end-to-end benchmark: the JSON document, markdown tables, targets, PNG heatmaps.

Kept apart from the measuring code (:mod:`torch_xla_lora.bench.e2e`) so the
tables and pictures can be rebuilt from a saved ``e2e.json``::

    result = json.loads(Path("bench_out/e2e.json").read_text())
    e2e_report.write(result, Path("bench_out"))
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

from torch_xla_lora.bench.e2e_model import POOLS

# The targets.
MAX_PREFILL_SLOWDOWN_PCT = 5.0  # LoRA, every prefill cell of the grid
MAX_FUSED_PREFILL_SLOWDOWN_PCT = 2.5  # base_fusion on (--compare-fusion), every prefill cell and slot count
MAX_PREFILL_SLOT_DRIFT_PCT = 3.0  # LoRA prefill slowdown, most slots vs fewest (points)
DECODE_MARGIN_FEWEST_SLOTS_PCT = 1.0  # LoRA decode slowdown <= one-hot's + this, at the fewest slots
DECODE_FRACTION_MOST_SLOTS = 0.5  # LoRA decode slowdown <= this fraction of one-hot's, at the most slots
MAX_DECODE_SLOT_DRIFT_PCT = 2.0  # LoRA decode slowdown: max - min over the slot counts (points)
MAX_CACHE_ERROR = 1e-3  # cached decode vs full forward, max |logits difference|
MAX_POOL_RATIO = 1.03  # rank-true float pool (--compare-pool) over padded slots, every step cell (Step 13)
# The int8 pool's cached logits vs the float pool's full forward, max |difference| as a fraction of the
# adapters' largest effect on the logits (the float pool's vs the base model's). Rounding every rank row to
# int8 gave 0.03-0.09 on the tiny random Llamas of tests/test_bench_e2e.py and of
# `python -m torch_xla_lora.bench e2e --quick --compare-pool` (0.05); a wrong scale, or a lane reading
# another adapter's rows, is off by the effect's own size (about 1).
MAX_INT8_REL_ERROR = 0.2
INT8_VS_POOL = "pool int8 vs pool"  # the cache check's int8 entry (see e2e.check_cache)


def cache_limit(key: str) -> float:
    """The cache check's limit for its entry ``key``."""
    return MAX_INT8_REL_ERROR if key == INT8_VS_POOL else MAX_CACHE_ERROR


def _slowdown(base: Sequence[float], other: Sequence[float]) -> float:
    return 100.0 * (1.0 - statistics.median(b / o for b, o in zip(base, other, strict=True)))


def generation(cell: dict, out_len: int) -> dict:
    """A whole generation of ``out_len`` tokens from a grid cell: prefill + out_len decode steps, per repetition."""
    prefill, decode = cell["prefill"], cell["decode"]
    seconds = {
        f: [p + out_len * d for p, d in zip(prefill["seconds"][f], decode["seconds"][f], strict=True)]
        for f in prefill["seconds"]
    }
    batch = prefill["batch"]
    median = {f: statistics.median(s) for f, s in seconds.items()}
    return {
        "batch": batch,
        "seq": prefill["seq"],
        "out": out_len,
        "seconds": median,
        "output_tokens_per_s": {f: batch * out_len / t for f, t in median.items()},
        "total_tokens_per_s": {f: batch * (prefill["seq"] + out_len) / t for f, t in median.items()},
        "slowdown_pct": {f: _slowdown(seconds["base"], s) for f, s in seconds.items() if f != "base"},
        "ratio_to_lora": {
            f: statistics.median(p / q for p, q in zip(s, seconds["lora"], strict=True))
            for f, s in seconds.items()
            if f in POOLS
        },
    }


def document(config, grid: Sequence[dict], slots: Sequence[dict], check: dict, seconds: float, command="") -> dict:
    """The JSON-ready result of a run: config, environment, cells, generations, targets."""
    import torch
    import torch_xla

    from torch_xla_lora.ops import device_generation

    grid_json = [{kind: cell.to_json() for kind, cell in point.items()} for point in grid]
    slot_json = [{kind: cell.to_json() for kind, cell in point.items()} for point in slots]
    result = {
        "command": command,
        "config": dataclasses.asdict(config),
        "environment": {
            "torch": torch.__version__,
            "torch_xla": torch_xla.__version__,
            "device": device_generation(),
            "machine": platform.machine(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
            # Other work on the machine adds noise to every number; this says how much there was.
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            # glibc's malloc settings (see torch_xla_lora.bench.__main__): reused memory or the defaults.
            "malloc": os.environ.get("GLIBC_TUNABLES", "system defaults"),
        },
        "cache_check": {
            "max_abs_logits_diff": check,
            "met": bool(check) and all(v <= cache_limit(k) for k, v in check.items()),
        },
        "grid": grid_json,
        "generation": [generation(point, out) for point in grid_json for out in config.out_lens],
        "slot_sweep": slot_json,
        "seconds": seconds,
        "page_faults_per_step": page_faults_per_step([*grid_json, *slot_json]),
        "recompiles_during_timing": sum(cell.recompiles for point in [*grid, *slots] for cell in point.values()),
    }
    result["targets"] = targets(result)
    return result


def page_faults_per_step(points: Sequence[dict]) -> dict[str, float]:
    """Per formulation, the median of every timed run's minor page faults per step, over all cells."""
    runs: dict[str, list[int]] = {}
    for point in points:
        for cell in point.values():
            for formulation, counts in cell.get("page_faults", {}).items():
                runs.setdefault(formulation, []).extend(counts)
    return {formulation: statistics.median(counts) for formulation, counts in runs.items() if counts}


def _fused(result: dict) -> bool:
    return bool(result["config"].get("compare_fusion"))


def _pools(result: dict) -> tuple[str, ...]:
    """The pool formulations of the run (``--compare-pool``), else none."""
    return POOLS if result["config"].get("compare_pool") else ()


def _met(value: bool) -> str:
    return "met" if value else "not met"


def _every_cell(slowdowns: Sequence[float], limit: float) -> dict:
    """A target every cell must meet: the worst cell, how many are within, met or not."""
    return {
        "worst_pct": max(slowdowns),
        "limit_pct": limit,
        "cells_met": sum(v <= limit for v in slowdowns),
        "cells": len(slowdowns),
        "met": max(slowdowns) <= limit,
    }


def targets(result: dict) -> dict:
    """Each target: the measured values, the limit, and whether it is met."""
    out = {}
    prefill = [point["prefill"]["slowdown_pct"]["lora"] for point in result["grid"]]
    if prefill:
        out["prefill_slowdown"] = _every_cell(prefill, MAX_PREFILL_SLOWDOWN_PCT)
    sweep = result["slot_sweep"]
    if len(sweep) >= 2:
        first, last = sweep[0], sweep[-1]
        decode = [point["decode"]["slowdown_pct"] for point in sweep]
        out["decode_fewest_slots"] = {
            "slots": first["decode"]["slots"],
            "lora_pct": decode[0]["lora"],
            "onehot_pct": decode[0]["onehot"],
            "limit_pct": decode[0]["onehot"] + DECODE_MARGIN_FEWEST_SLOTS_PCT,
            "met": decode[0]["lora"] <= decode[0]["onehot"] + DECODE_MARGIN_FEWEST_SLOTS_PCT,
        }
        out["decode_most_slots"] = {
            "slots": last["decode"]["slots"],
            "lora_pct": decode[-1]["lora"],
            "onehot_pct": decode[-1]["onehot"],
            "limit_pct": DECODE_FRACTION_MOST_SLOTS * decode[-1]["onehot"],
            "met": decode[-1]["lora"] <= DECODE_FRACTION_MOST_SLOTS * decode[-1]["onehot"],
        }
        lora = [d["lora"] for d in decode]
        out["decode_flat_in_slots"] = {
            "spread_pct": max(lora) - min(lora),
            "limit_pct": MAX_DECODE_SLOT_DRIFT_PCT,
            "met": max(lora) - min(lora) <= MAX_DECODE_SLOT_DRIFT_PCT,
        }
        drift = last["prefill"]["slowdown_pct"]["lora"] - first["prefill"]["slowdown_pct"]["lora"]
        out["prefill_flat_in_slots"] = {
            "slots": [first["prefill"]["slots"], last["prefill"]["slots"]],
            "drift_pct": drift,
            "limit_pct": MAX_PREFILL_SLOT_DRIFT_PCT,
            "met": abs(drift) <= MAX_PREFILL_SLOT_DRIFT_PCT,
        }
    if _fused(result):
        fused = [point["prefill"]["slowdown_pct"]["fused"] for point in [*result["grid"], *sweep]]
        out["fused_prefill_slowdown"] = _every_cell(fused, MAX_FUSED_PREFILL_SLOWDOWN_PCT)
    if _pools(result):
        ratios = [p[k]["ratio_to_lora"]["pool"] for p in [*result["grid"], *sweep] for k in ("prefill", "decode")]
        out["pool_vs_padded"] = {
            "worst": max(ratios),
            "limit": MAX_POOL_RATIO,
            "cells_met": sum(r <= MAX_POOL_RATIO for r in ratios),
            "cells": len(ratios),
            "met": max(ratios) <= MAX_POOL_RATIO,
        }
    return out


# Each target's line, filled from its entry of ``targets()`` (and ``margin``); ": **met**" or ": **not met**" follows.
_TARGET_LINES = (
    (
        "prefill_slowdown",
        "prefill: LoRA slowdown <= {limit_pct:.0f}% in every cell: worst {worst_pct:+.1f}% "
        "({cells_met}/{cells} cells within)",
    ),
    (
        "decode_fewest_slots",
        "decode, {slots} slots: LoRA {lora_pct:+.1f}% <= one-hot {onehot_pct:+.1f}% + {margin:g} point",
    ),
    ("decode_most_slots", "decode, {slots} slots: LoRA {lora_pct:+.1f}% <= half of one-hot {onehot_pct:+.1f}%"),
    (
        "decode_flat_in_slots",
        "decode: LoRA slowdown flat in slots within {limit_pct:g} points: spread {spread_pct:.1f} points",
    ),
    (
        "prefill_flat_in_slots",
        "prefill: LoRA slowdown at {slots[1]} slots within {limit_pct:g} points of {slots[0]} slots: "
        "{drift_pct:+.1f} points",
    ),
    (
        "fused_prefill_slowdown",
        "prefill, base_fusion on: slowdown <= {limit_pct:g}% in every cell and slot count: worst {worst_pct:+.1f}% "
        "({cells_met}/{cells} within)",
    ),
    (
        "pool_vs_padded",
        "rank-true float pool / padded slots <= {limit:g} in every prefill and decode cell: worst {worst:.3f} "
        "({cells_met}/{cells} within)",
    ),
)


def targets_text(result: dict) -> str:
    """One line per target: value, limit, met or not."""
    t = result["targets"]
    lines = [
        f"- {line.format(**t[key], margin=DECODE_MARGIN_FEWEST_SLOTS_PCT)}: **{_met(t[key]['met'])}**"
        for key, line in _TARGET_LINES
        if key in t
    ]
    check = result["cache_check"]
    if not check["max_abs_logits_diff"]:
        lines.append("- cache check: not run (--skip-check)")
        return "\n".join(lines)
    diffs = check["max_abs_logits_diff"]
    text = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items() if k != INT8_VS_POOL)
    lines.append(
        f"- prefill + decode on a fresh static cache equals a full forward (max |logits diff| <= "
        f"{MAX_CACHE_ERROR:g}): {text}"
        + (
            f"; the int8 pool's against the float pool's, over the adapters' effect on the logits (<= "
            f"{MAX_INT8_REL_ERROR:g}): {diffs[INT8_VS_POOL]:.1e}"
            if INT8_VS_POOL in diffs
            else ""
        )
        + f": **{_met(check['met'])}**"
    )
    return "\n".join(lines)


# -- tables ----------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


def _ratios(cell: dict, pools: Sequence[str]) -> list[str]:
    return [f"{cell['ratio_to_lora'][f]:.3f}" for f in pools]


def _ratio_headers(prefix: str, pools: Sequence[str]) -> list[str]:
    return [f"{prefix}{f} / LoRA" for f in pools]


def generation_table(result: dict) -> str:
    """Output-token throughput and slowdown of every (batch, input, output) generation."""
    fused, pools = _fused(result), _pools(result)
    rows = []
    for g in result["generation"]:
        tps, slow = g["output_tokens_per_s"], g["slowdown_pct"]
        rows.append(
            [str(g["batch"]), str(g["seq"]), str(g["out"]), f"{tps['base']:,.1f}", f"{tps['lora']:,.1f}"]
            + [_pct(slow["lora"]), f"{tps['onehot']:,.1f}", _pct(slow["onehot"])]
            + ([_pct(slow["fused"])] if fused else [])
            + _ratios(g, pools)
        )
    header = ["batch", "input", "output", "base out tok/s", "LoRA out tok/s", "LoRA slowdown"]
    header += ["one-hot out tok/s", "one-hot slowdown"] + (["fused slowdown"] if fused else [])
    return _table(header + _ratio_headers("", pools), rows)


def steps_table(result: dict) -> str:
    """Prefill and decode-step throughput and slowdown of every (batch, input length)."""
    fused, pools = _fused(result), _pools(result)
    rows = []
    for point in result["grid"]:
        p, d = point["prefill"], point["decode"]
        rows.append(
            [str(p["batch"]), str(p["seq"]), f"{p['tokens_per_s']['base']:,.0f}"]
            + [_pct(p["slowdown_pct"]["lora"]), _pct(p["slowdown_pct"]["onehot"])]
            + ([_pct(p["slowdown_pct"]["fused"])] if fused else [])
            + _ratios(p, pools)
            + [f"{d['tokens_per_s']['base']:,.1f}", _pct(d["slowdown_pct"]["lora"]), _pct(d["slowdown_pct"]["onehot"])]
            + ([_pct(d["slowdown_pct"]["fused"])] if fused else [])
            + _ratios(d, pools)
        )
    header = ["batch", "input", "prefill base tok/s", "prefill LoRA", "prefill one-hot"]
    header += (["prefill fused"] if fused else []) + _ratio_headers("prefill ", pools)
    header += ["decode base tok/s", "decode LoRA", "decode one-hot"] + (["decode fused"] if fused else [])
    return _table(header + _ratio_headers("decode ", pools), rows)


def slot_table(result: dict) -> str:
    """Decode-step and prefill slowdown at each slot count of the sweep."""
    fused, pools = _fused(result), _pools(result)
    rows = []
    for point in result["slot_sweep"]:
        d, p = point["decode"], point["prefill"]
        rows.append(
            [str(d["slots"]), f"{d['tokens_per_s']['base']:,.1f}", f"{d['tokens_per_s']['lora']:,.1f}"]
            + [
                _pct(d["slowdown_pct"]["lora"]),
                f"{d['tokens_per_s']['onehot']:,.1f}",
                _pct(d["slowdown_pct"]["onehot"]),
            ]
            + [_pct(p["slowdown_pct"]["lora"]), _pct(p["slowdown_pct"]["onehot"])]
            + ([_pct(d["slowdown_pct"]["fused"]), _pct(p["slowdown_pct"]["fused"])] if fused else [])
            + _ratios(d, pools)
            + _ratios(p, pools)
        )
    header = ["slots", "decode base tok/s", "decode LoRA tok/s", "decode LoRA", "decode one-hot tok/s"]
    header += ["decode one-hot", "prefill LoRA", "prefill one-hot"]
    header += ["decode fused", "prefill fused"] if fused else []
    header += _ratio_headers("decode ", pools) + _ratio_headers("prefill ", pools)
    return _table(header, rows)


def markdown(result: dict) -> str:
    """The tables and targets as markdown (printed, and written to ``e2e.md``)."""
    c = result["config"]
    model = (
        f"Llama, {c['layers']} layer(s), hidden {c['hidden']}, intermediate {c['intermediate']}, "
        f"heads {c['heads']}/{c['kv_heads']} kv, vocab {c['vocab']}, float32, static KV cache; LoRA rank "
        f"{c['rank']} on every linear layer, {c['num_adapters']} adapters, request i on adapter i mod "
        f"{c['num_adapters']}; device {result['environment']['device']}, backend {c['backend']}, grouping on the "
        f"{c['grouping']}, median of {c['repeats']} runs ({c['decode_steps']} decode steps each), malloc: "
        f"{result['environment'].get('malloc', 'system defaults')}"
    )
    if _fused(result):
        model += "; fused: the LoRA layers with base_fusion on (one linear_lora op per layer)"
    if _pools(result):
        model += (
            "; pool, pool int8: the same adapters in rank-true storage (memory_budget holding them all; float and "
            "int8 rows), as time / LoRA's (padded slots), median of the paired runs"
        )
    sweep = (
        f"decode: {c['decode_batch']} requests, adapters interleaved row by row, cache of {c['slot_seq']} tokens; "
        f"prefill: {c['slot_batch']} x {c['slot_seq']}"
    )
    parts = [
        f"{model}.",
        "",
        "Whole generation (prefill + output x decode step), output tokens/s and slowdown vs base:",
        "",
        generation_table(result),
        "",
        "The steps: prefill (tokens/s of the forward) and one decode step (requests/s):",
        "",
        steps_table(result),
        "",
        f"Slot sweep ({sweep}):",
        "",
        slot_table(result),
        "",
        "Minor page faults per step (median over every timed run; host preparation, tracing and execution): "
        + ", ".join(f"{f} {n:,.0f}" for f, n in result.get("page_faults_per_step", {}).items()),
        "",
        "Targets:",
        "",
        targets_text(result),
    ]
    if result["recompiles_during_timing"]:
        parts += ["", f"WARNING: {result['recompiles_during_timing']} compilation(s) during timed runs"]
    return "\n".join(parts)


def write(result: dict, out_dir: Path) -> list[Path]:
    """Write ``e2e.json``, ``e2e.md`` and the heatmaps (:mod:`e2e_plots`); return their paths."""
    from torch_xla_lora.bench import e2e_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "e2e.json", out_dir / "e2e.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result) + "\n")
    return paths + e2e_plots.write(result, out_dir)
