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
from collections.abc import Sequence
from pathlib import Path

# The targets.
MAX_LORA_SLOWDOWN_PCT = 5.0  # in every cell of the grid
MAX_FRACTION_OF_ONEHOT = 1 / 3  # LoRA slowdown / one-hot slowdown, in every cell
MAX_SLOT_DRIFT_PCT = 3.0  # LoRA throughput at the most slots vs the fewest


def document(config, grid: Sequence, slots: Sequence, seconds: float, command: str = "") -> dict:
    """The JSON-ready result of a run: config, environment, cells, targets."""
    import torch
    import torch_xla

    from torch_xla_lora.ops import device_generation

    result = {
        "command": command,
        "config": dataclasses.asdict(config),
        "environment": {
            "torch": torch.__version__,
            "torch_xla": torch_xla.__version__,
            "device": device_generation(),
            "machine": platform.machine(),
            "cpus": _cpu_count(),
            # Other work on the machine adds noise to every number; this says how much there was.
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "grid": [cell.to_json() for cell in grid],
        "slot_sweep": [cell.to_json() for cell in slots],
        "seconds": seconds,
        "recompiles_during_timing": sum(cell.recompiles for cell in [*grid, *slots]),
    }
    result["targets"] = targets(result)
    return result


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def targets(result: dict) -> dict:
    """Each target: the measured value, the limit, and whether it is met."""
    grid = result["grid"]
    lora = [cell["slowdown_pct"]["lora"] for cell in grid]
    ratios = [_fraction(cell["slowdown_pct"]["lora"], cell["slowdown_pct"]["onehot"]) for cell in grid]
    out = {
        "lora_slowdown": {
            "worst_pct": max(lora),
            "limit_pct": MAX_LORA_SLOWDOWN_PCT,
            "cells_met": sum(v <= MAX_LORA_SLOWDOWN_PCT for v in lora),
            "cells": len(lora),
            "met": max(lora) <= MAX_LORA_SLOWDOWN_PCT,
        },
        "third_of_onehot": {
            "worst_fraction": max(ratios),
            "limit_fraction": MAX_FRACTION_OF_ONEHOT,
            "cells_met": sum(r <= MAX_FRACTION_OF_ONEHOT for r in ratios),
            "cells": len(ratios),
            "met": max(ratios) <= MAX_FRACTION_OF_ONEHOT,
        },
    }
    sweep = result["slot_sweep"]
    if len(sweep) >= 2:
        first, last = sweep[0], sweep[-1]
        raw = 100.0 * (last["tokens_per_s"]["lora"] / first["tokens_per_s"]["lora"] - 1.0)
        # Each LoRA rate over the base rate timed alongside it: cancels machine-load drift between the patches.
        relative = 100.0 * (_relative(last) / _relative(first) - 1.0)
        out["slot_drift"] = {
            "slots": [first["slots"], last["slots"]],
            "raw_pct": raw,
            "base_normalised_pct": relative,
            "limit_pct": MAX_SLOT_DRIFT_PCT,
            "met": abs(relative) <= MAX_SLOT_DRIFT_PCT,
        }
    return out


def _fraction(lora: float, onehot: float) -> float:
    """LoRA slowdown as a fraction of the one-hot one; inf when the one-hot one is not positive."""
    if onehot <= 0:
        return 0.0 if lora <= 0 else float("inf")
    return lora / onehot


def _relative(cell: dict) -> float:
    """LoRA throughput over base throughput (paired per repetition, see ``Cell.slowdown``)."""
    return 1.0 - cell["slowdown_pct"]["lora"] / 100.0


# -- tables ----------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def grid_table(result: dict) -> str:
    """Throughput and slowdown of every (batch, seq) cell."""
    rows = []
    for cell in result["grid"]:
        tps, slow = cell["tokens_per_s"], cell["slowdown_pct"]
        rows.append(
            [
                str(cell["batch"]),
                str(cell["seq"]),
                f"{tps['base']:,.0f}",
                f"{tps['lora']:,.0f}",
                f"{slow['lora']:+.1f}%",
                f"{tps['onehot']:,.0f}",
                f"{slow['onehot']:+.1f}%",
            ]
        )
    header = ["batch", "input len", "base tok/s", "LoRA tok/s", "LoRA slowdown", "one-hot tok/s", "one-hot slowdown"]
    return _table(header, rows)


def slot_table(result: dict) -> str:
    """Throughput and slowdown at each slot count of the sweep."""
    sweep = result["slot_sweep"]
    if not sweep:
        return "(no slot sweep)"
    first = sweep[0]
    rows = []
    for cell in sweep:
        tps, slow = cell["tokens_per_s"], cell["slowdown_pct"]
        vs_first = 100.0 * (tps["lora"] / first["tokens_per_s"]["lora"] - 1.0)
        rows.append(
            [
                str(cell["slots"]),
                f"{tps['base']:,.0f}",
                f"{tps['lora']:,.0f}",
                f"{slow['lora']:+.1f}%",
                f"{vs_first:+.1f}%",
                f"{tps['onehot']:,.0f}",
                f"{slow['onehot']:+.1f}%",
            ]
        )
    header = ["slots", "base tok/s", "LoRA tok/s", "LoRA slowdown", f"LoRA vs {first['slots']} slots"]
    return _table([*header, "one-hot tok/s", "one-hot slowdown"], rows)


def targets_text(result: dict) -> str:
    """One line per target: value, limit, met or not."""
    t = result["targets"]
    lines = []
    s = t["lora_slowdown"]
    lines.append(
        f"- LoRA slowdown <= {s['limit_pct']:.0f}% in every cell: worst {s['worst_pct']:+.1f}% "
        f"({s['cells_met']}/{s['cells']} cells within): **{'met' if s['met'] else 'not met'}**"
    )
    f = t["third_of_onehot"]
    lines.append(
        f"- LoRA slowdown <= 1/3 of the one-hot einsum's in every cell: worst fraction {f['worst_fraction']:.2f} "
        f"({f['cells_met']}/{f['cells']} cells within): **{'met' if f['met'] else 'not met'}**"
    )
    if "slot_drift" in t:
        d = t["slot_drift"]
        lines.append(
            f"- LoRA throughput with {d['slots'][1]} slots within {d['limit_pct']:.0f}% of {d['slots'][0]} slots: "
            f"{d['base_normalised_pct']:+.1f}% normalised by base ({d['raw_pct']:+.1f}% raw): "
            f"**{'met' if d['met'] else 'not met'}**"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The tables and targets as markdown (printed, and written to ``e2e.md``)."""
    c = result["config"]
    model = (
        f"Llama, {c['layers']} layer(s), hidden {c['hidden']}, intermediate {c['intermediate']}, "
        f"heads {c['heads']}/{c['kv_heads']} kv, vocab {c['vocab']}, float32; LoRA rank {c['rank']} on every "
        f"linear layer, {c['num_adapters']} adapters, request i uses adapter i mod {c['num_adapters']}; "
        f"device {result['environment']['device']}, backend {c['backend']}, grouping on the {c['grouping']}, "
        f"median of {c['repeats']} runs"
    )
    sweep = f"batch {c['slot_batch']} x input length {c['slot_seq']}, {c['num_adapters']} adapters in use"
    parts = [
        f"{model}.",
        "",
        "Prefill throughput (tokens/s of one forward, device time), grid:",
        "",
        grid_table(result),
        "",
        f"Slot sweep ({sweep}):",
        "",
        slot_table(result),
        "",
        "Targets:",
        "",
        targets_text(result),
    ]
    if result["recompiles_during_timing"]:
        parts += ["", f"WARNING: {result['recompiles_during_timing']} compilation(s) during timed runs"]
    return "\n".join(parts)


# -- pictures --------------------------------------------------------------------------------------


def _heatmap(ax, values, row_labels, col_labels, title, norm, cmap) -> object:
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:+.1f}%", ha="center", va="center", fontsize=9)
    return image


def _norm(values: Sequence[float]):
    """Colours centred on the target: green below it, yellow at it, red above."""
    from matplotlib import colors

    low = min(min(values), 0.0) - 1.0
    high = max(max(values), 2 * MAX_LORA_SLOWDOWN_PCT)
    return colors.TwoSlopeNorm(vmin=low, vcenter=MAX_LORA_SLOWDOWN_PCT, vmax=high)


def plot_grid(result: dict, path: Path) -> None:
    """Two heatmaps side by side: slowdown (%) of LoRA and of the one-hot einsum, batch x input length."""
    import matplotlib.pyplot as plt

    grid = result["grid"]
    batches = sorted({cell["batch"] for cell in grid})
    seqs = sorted({cell["seq"] for cell in grid})
    by_point = {(cell["batch"], cell["seq"]): cell["slowdown_pct"] for cell in grid}
    panels = {
        "this library's LoRA layers": [[by_point[b, s]["lora"] for s in seqs] for b in batches],
        "one-hot einsum (vLLM TPU)": [[by_point[b, s]["onehot"] for s in seqs] for b in batches],
    }
    norm = _norm([v for rows in panels.values() for row in rows for v in row])
    size = (2.5 + 2.0 * len(seqs), 2 + 0.6 * len(batches))
    fig, axes = plt.subplots(1, 2, figsize=size, squeeze=False, layout="constrained")
    for ax, (title, values) in zip(axes[0], panels.items(), strict=True):
        image = _heatmap(ax, values, batches, seqs, title, norm, "RdYlGn_r")
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel("batch size")
    fig.colorbar(image, ax=axes[0].tolist(), label=f"prefill slowdown vs base (%); target {MAX_LORA_SLOWDOWN_PCT:g}%")
    fig.suptitle(f"LoRA slowdown, rank {result['config']['rank']}, {result['config']['num_adapters']} adapters")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_slots(result: dict, path: Path) -> None:
    """One heatmap: slowdown (%) of each formulation (rows) at each slot count (columns)."""
    import matplotlib.pyplot as plt

    sweep = result["slot_sweep"]
    slots = [cell["slots"] for cell in sweep]
    values = [[cell["slowdown_pct"][f] for cell in sweep] for f in ("lora", "onehot")]
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(slots), 2.6), layout="constrained")
    image = _heatmap(
        ax,
        values,
        ["LoRA layers", "one-hot einsum"],
        slots,
        "prefill slowdown vs slot count",
        _norm([v for row in values for v in row]),
        "RdYlGn_r",
    )
    c = result["config"]
    ax.set_xlabel(f"slots (max_loras); batch {c['slot_batch']} x {c['slot_seq']}, {c['num_adapters']} adapters in use")
    fig.colorbar(image, ax=ax, label=f"slowdown vs base (%); target {MAX_LORA_SLOWDOWN_PCT:g}%")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path) -> list[Path]:
    """Write ``e2e.json``, ``e2e.md``, ``e2e_slowdown.png`` and ``e2e_slots.png``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "e2e.json", out_dir / "e2e.md", out_dir / "e2e_slowdown.png"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result) + "\n")
    plot_grid(result, paths[2])
    if result["slot_sweep"]:
        paths.append(out_dir / "e2e_slots.png")
        plot_slots(result, paths[-1])
    return paths
