"""PNG heatmaps of the end-to-end benchmark's JSON document (see :mod:`torch_xla_lora.bench.e2e_report`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Colours centre on this slowdown (%): green below, yellow at it, red above.
CENTRE_PCT = 5.0


def _heatmap(ax, values, row_labels, col_labels, title, norm) -> object:
    image = ax.imshow(values, cmap="RdYlGn_r", norm=norm, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:+.1f}%", ha="center", va="center", fontsize=8)
    return image


def _norm(values: Sequence[float]):
    from matplotlib import colors

    low = min(min(values), 0.0) - 1.0
    high = max(max(values), 2 * CENTRE_PCT)
    return colors.TwoSlopeNorm(vmin=low, vcenter=CENTRE_PCT, vmax=high)


def _panels(fig_rows: int, fig_cols: int, size):
    import matplotlib.pyplot as plt

    return plt.subplots(fig_rows, fig_cols, figsize=size, squeeze=False, layout="constrained")


def plot_generation(result: dict, path: Path) -> None:
    """Per batch size (rows of panels): whole-generation slowdown of LoRA and one-hot, output x input length."""
    import matplotlib.pyplot as plt

    gens = result["generation"]
    batches = sorted({g["batch"] for g in gens})
    seqs = sorted({g["seq"] for g in gens})
    outs = sorted({g["out"] for g in gens})
    by_point = {(g["batch"], g["seq"], g["out"]): g["slowdown_pct"] for g in gens}
    norm = _norm([v for g in gens for v in g["slowdown_pct"].values()])
    fig, axes = _panels(len(batches), 2, (3 + 3.6 * len(seqs) / 2.5, 0.6 + 1.9 * len(batches)))
    titles = {"lora": "this library's LoRA layers", "onehot": "one-hot einsum (vLLM TPU)"}
    for row, batch in enumerate(batches):
        for col, (formulation, title) in enumerate(titles.items()):
            values = [[by_point[batch, s, o][formulation] for s in seqs] for o in outs]
            image = _heatmap(axes[row][col], values, outs, seqs, f"{title}, batch {batch}", norm)
            axes[row][col].set_xlabel("input length (tokens)")
            axes[row][col].set_ylabel("output tokens")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="generation slowdown vs base (%)")
    c = result["config"]
    fig.suptitle(f"Whole-generation slowdown, rank {c['rank']}, every request another adapter")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_steps(result: dict, path: Path) -> None:
    """Prefill and decode-step slowdown of LoRA and one-hot, batch x input length (four panels)."""
    import matplotlib.pyplot as plt

    grid = result["grid"]
    batches = sorted({p["prefill"]["batch"] for p in grid})
    seqs = sorted({p["prefill"]["seq"] for p in grid})
    by_point = {(p["prefill"]["batch"], p["prefill"]["seq"]): p for p in grid}
    panels = {
        (kind, f): [[by_point[b, s][kind]["slowdown_pct"][f] for s in seqs] for b in batches]
        for kind in ("prefill", "decode")
        for f in ("lora", "onehot")
    }
    norm = _norm([v for rows in panels.values() for row in rows for v in row])
    fig, axes = _panels(2, 2, (3 + 3.6 * len(seqs) / 2.5, 1.2 + 2 * 0.6 * len(batches) + 2))
    names = {"lora": "LoRA layers", "onehot": "one-hot einsum"}
    for ax, ((kind, f), values) in zip(axes.ravel(), panels.items(), strict=True):
        image = _heatmap(ax, values, batches, seqs, f"{kind} step, {names[f]}", norm)
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel("batch size")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="step slowdown vs base (%)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_slots(result: dict, path: Path) -> None:
    """Slowdown of each (step, formulation) (rows) at each slot count (columns)."""
    import matplotlib.pyplot as plt

    sweep = result["slot_sweep"]
    slots = [point["decode"]["slots"] for point in sweep]
    rows = {
        f"{kind} {name}": [point[kind]["slowdown_pct"][f] for point in sweep]
        for kind in ("decode", "prefill")
        for f, name in (("lora", "LoRA"), ("onehot", "one-hot"))
    }
    fig, ax = plt.subplots(figsize=(3 + 1.2 * len(slots), 3.2), layout="constrained")
    values = list(rows.values())
    c = result["config"]
    title = (
        f"slowdown vs slots: decode {c['decode_batch']} requests interleaved,\n"
        f"prefill {c['slot_batch']} x {c['slot_seq']}; {c['num_adapters']} adapters in use"
    )
    image = _heatmap(ax, values, list(rows), slots, title, _norm([v for r in values for v in r]))
    ax.set_xlabel("slots (max_loras)")
    fig.colorbar(image, ax=ax, label="slowdown vs base (%)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, out_dir: Path) -> list[Path]:
    """Write ``e2e_generation.png``, ``e2e_steps.png`` and (with a sweep) ``e2e_slots.png``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    paths = [out_dir / "e2e_generation.png", out_dir / "e2e_steps.png"]
    plot_generation(result, paths[0])
    plot_steps(result, paths[1])
    if result["slot_sweep"]:
        paths.append(out_dir / "e2e_slots.png")
        plot_slots(result, paths[-1])
    return paths
