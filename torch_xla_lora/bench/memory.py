"""How many adapters fit a device budget: ``python -m torch_xla_lora.bench memory``.

Computed, not allocated: the bytes come from the pool's own accounting
(:func:`torch_xla_lora.pool.layer_row_bytes`, the function ``patch_model`` sizes
the pools with) applied to a model's projection shapes, so real model sizes
need no memory. Three layouts:

- *padded*: today's default, ``budget // (max_rank rows)`` slots whatever the ranks;
- *rank-true*: the pool in the adapter dtype, each adapter its own rank's rows;
- *rank-true int8*: the pool with ``weight_dtype="int8"`` (a byte per element and a
  float32 scale per rank row and factor).

For each, uniform fleets of one rank and a mixed fleet (by default 70% rank 8, 20%
rank 16, 10% rank 64, filled in that proportion until the next adapter does not fit).
``--chips`` adds the budget left beside a base model and its KV cache on a TPU's HBM.

``--resident``: bytes per resident adapter against its true-rank bytes, for ranks 4 to
64 where the TPU pooled kernel may run (the allocator's 8-row aligned pages, tails of
rank % 8 rows sharing pages): the adapter's own rows by the pool's accounting, and the
whole budget over the adapters of that rank the pool's own allocator (:class:`PoolManager`,
here on stand-in layers) places in the rows ``patch_model`` would give it, so spare rows,
page-scale padding and rows no adapter can use are included.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

import torch

from torch_xla_lora.pool import (
    KERNEL_PAGE_ROWS,
    SCALE_BYTES,
    SPARE_ROWS,
    PoolFullError,
    PoolManager,
    kernel_pool_rows,
    layer_row_bytes,
    page_scale_rows,
    parse_bytes,
)

#: (hidden, intermediate, layers, attention heads, KV heads, head dim, vocab) of the models the table knows.
MODELS = {
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128, 128256),
    "llama-3-70b": (8192, 28672, 80, 64, 8, 128, 128256),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 128, 152064),
    "mistral-7b": (4096, 14336, 32, 32, 8, 128, 32768),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: HBM per chip (bytes), for ``--chips``.
CHIPS = {"v5e": 16 * 2**30, "v6e": 32 * 2**30, "v5p": 95 * 2**30}


def projection_shapes(model: str) -> list[tuple[int, int]]:
    """(in, out) of the seven projections of every decoder layer of ``model``."""
    hidden, inter, layers, heads, kv_heads, head_dim, _ = MODELS[model]
    q, kv = heads * head_dim, kv_heads * head_dim
    one = {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return [one[name] for name in PROJECTIONS] * layers


def row_bytes(model: str, itemsize: int, int8: bool, max_rank: int = 64) -> int:
    """One rank row over every projection, by the pool's accounting (the layers' padded slot shapes)."""
    return sum(
        layer_row_bytes(
            {"lora_a": (1, max_rank, d_in), "lora_b": (1, max_rank, d_out)},
            {"lora_a": 0, "lora_b": 0},
            1,
            max_rank,
            itemsize,
            int8,
        )
        for d_in, d_out in projection_shapes(model)
    )


def fleet(mix: dict[int, float], count: int) -> list[int]:
    """The ranks of the first ``count`` adapters of a fleet with rank -> share ``mix`` (largest remainder
    order: after n adapters each rank has its share of n, rounded)."""
    ranks, have = [], dict.fromkeys(mix, 0)
    for n in range(1, count + 1):
        rank = max(mix, key=lambda r: (mix[r] * n - have[r], -r))
        have[rank] += 1
        ranks.append(rank)
    return ranks


def adapters_fitting(budget: int, unit: int, ranks_of: Sequence[int] | None, max_rank: int, padded: bool) -> int:
    """How many adapters a budget holds: padded slots of ``max_rank`` rows, or pool rows filled in fleet order."""
    if padded:
        return budget // (max_rank * unit)
    rows = budget // unit - SPARE_ROWS
    fitted = 0
    for rank in ranks_of:
        if rank > rows:
            break
        rows -= rank
        fitted += 1
    return fitted


def budget_rows(model: str, budget: int, int8: bool, granule: int, max_rank: int = 64) -> int:
    """Data rows of every layer's pool a budget gives, as ``patch_model`` sizes them: whole rows with the
    spare rows, an int8 pool's page scales padded to whole tiles inside the budget, and where the TPU kernel
    may read an int8 pool (``granule`` > 1) no multiple of 32 rows (``pool.kernel_pool_rows``)."""
    unit = row_bytes(model, 1 if int8 else 2, int8, max_rank)
    layers = len(projection_shapes(model))

    def allocated(rows: int) -> int:
        padding = SCALE_BYTES * (page_scale_rows(rows) - rows - SPARE_ROWS) * layers if int8 else 0
        return (rows + SPARE_ROWS) * unit + padding

    rows = budget // unit - SPARE_ROWS
    while rows > 0 and allocated(rows) > budget:
        rows -= 1
    return kernel_pool_rows(rows, int8, granule)


class _Stand:
    """A stand-in layer for the allocator (it reads a layer's backend and module shapes, and writes no rows here)."""

    backend, adapter_shapes = "pallas", (1, 1)

    def factor_pairs(self) -> dict:
        return {}  # no pool buffers: no per-module rank cut


def placed(rows: int, ranks: Sequence[int], granule: int, max_rank: int = 64) -> int:
    """How many adapters of ``ranks``, in order, the pool's own allocator (:class:`PoolManager` at ``granule``)
    holds resident at once in ``rows`` data rows: each is made resident and pinned until one cannot be placed."""
    from torch_xla_lora.adapters import LoRAAdapter, ModuleLoRA

    manager = PoolManager(
        {"m": _Stand()}, 1, max_rank, len(ranks) + 1, rows, row_bytes=1, budget_bytes=rows, granule=granule
    )
    for count, rank in enumerate(ranks):
        factors = ModuleLoRA(torch.zeros(rank, 1), torch.zeros(1, rank), rank, 1.0, False)
        manager.add(LoRAAdapter(name=str(count), modules={"m": factors}, config={}))
        try:
            manager.pin(str(count))
        except PoolFullError:
            return count
    return len(ranks)


RESIDENT_RANKS = (4, 8, 12, 16, 24, 32, 64)


def resident(model: str, budget: int, ranks: Sequence[int] = RESIDENT_RANKS, max_rank: int = 64) -> list[dict]:
    """Per rank and dtype (bf16, int8): an adapter's true-rank bytes (its rank's elements of every projection,
    int8 one byte each), its own bytes by the pool's accounting (its rank rows, int8 with their float32 row and
    page scales) and the budget's bytes per adapter of that rank the allocator holds at the TPU kernel's
    granule (:func:`placed` in :func:`budget_rows`), both as ratios to the true bytes."""
    elements = sum(d_in + d_out for d_in, d_out in projection_shapes(model))
    out = []
    for dtype, int8 in (("bf16", False), ("int8", True)):
        unit = row_bytes(model, 1 if int8 else 2, int8, max_rank)
        rows = budget_rows(model, budget, int8, KERNEL_PAGE_ROWS, max_rank)
        for rank in ranks:
            true = rank * elements * (1 if int8 else 2)
            count = placed(rows, [rank] * (rows // rank + 1), KERNEL_PAGE_ROWS, max_rank)
            out.append(
                {
                    "dtype": dtype,
                    "rank": rank,
                    "true_mb": true / 1e6,
                    "own_ratio": rank * unit / true,
                    "adapters": count,
                    "budget_ratio": budget / count / true,
                }
            )
    return out


def table(model: str, budget: int, max_rank: int, mixes: dict[str, dict[int, float]]) -> list[dict]:
    """Rows of the capacity table: layout, fleet, adapters, bytes per adapter."""
    bf16, int8 = row_bytes(model, 2, False, max_rank), row_bytes(model, 1, True, max_rank)
    out = []
    for fleet_name, mix in mixes.items():
        ranks = fleet(mix, 100_000)
        mean = sum(ranks[:1000]) / 1000
        for layout, unit, padded in (("padded bf16", bf16, True), ("rank-true bf16", bf16, False)) + (
            ("rank-true int8", int8, False),
        ):
            count = adapters_fitting(budget, unit, ranks, max_rank, padded)
            per = unit * (max_rank if padded else mean)
            out.append({"model": model, "fleet": fleet_name, "layout": layout, "adapters": count, "mb": per / 1e6})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for mode, name in (("--quality", "int8_quality"), ("--decode-bytes", "decode_bytes")):
        if mode in argv:  # its own options, --help and --json included, go to its own parser
            return importlib.import_module(f"torch_xla_lora.bench.{name}").main([a for a in argv if a != mode])
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="llama-3-8b")
    parser.add_argument("--budget", default="6GiB", help="device bytes for adapters (e.g. 6GiB)")
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument(
        "--chips", action="store_true", help="also: adapters beside an int8 or bf16 base and its KV cache per chip"
    )
    parser.add_argument("--kv-tokens", type=int, default=32768, help="KV cache tokens reserved with --chips")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--resident",
        action="store_true",
        help="instead: bytes per resident adapter against its true-rank bytes, ranks 4-64, the TPU allocator",
    )
    parser.add_argument(
        "--quality",
        action="store_true",
        help="instead: int8 adapters against float ones on a random Llama (bench/int8_quality.py; its own options)",
    )
    parser.add_argument(
        "--decode-bytes",
        action="store_true",
        help="instead: LoRA bytes per decode step from XLA's cost analysis (bench/decode_bytes.py; its own options)",
    )
    args = parser.parse_args(argv)
    budget = parse_bytes(args.budget, "--budget")
    if args.resident:
        return _print_resident(args.model, args.budget, budget, args.max_rank, args.json)
    mixes = {f"uniform r{r}": {r: 1.0} for r in (8, 16, 64)}
    mixes["mixed 70/20/10% r8/16/64"] = {8: 0.7, 16: 0.2, 64: 0.1}
    rows = table(args.model, budget, args.max_rank, mixes)
    chips = chip_rows(args.model, args.kv_tokens, args.max_rank) if args.chips else []
    if args.json:
        print(json.dumps({"capacity": rows, "chips": chips}, indent=1))
        return 0
    print(f"{args.model}, all seven projections of every layer, {args.budget} for adapters, max_rank {args.max_rank}")
    print("| fleet | padded bf16 | rank-true bf16 | rank-true int8 |\n|---|---|---|---|")
    for name in mixes:
        cells = {r["layout"]: r for r in rows if r["fleet"] == name}
        print(
            f"| {name} | " + " | ".join(f"{cells[k]['adapters']} ({cells[k]['mb']:.1f} MB each)" for k in cells) + " |"
        )
    if chips:
        print(
            f"\nper chip: base weights, a KV cache of {args.kv_tokens} tokens (bf16), 1 GiB for activations; "
            "adapters in what is left (mixed fleet)"
        )
        print("| chip | base | left for adapters | padded bf16 r64 | rank-true bf16 | rank-true int8 |")
        print("|---|---|---|---|---|---|")
        for r in chips:
            print(
                f"| {r['chip']} | {r['base']} | {r['left_gib']:.1f} GiB | {r['padded bf16']} | "
                f"{r['rank-true bf16']} | {r['rank-true int8']} |"
            )
    return 0


def _print_resident(model: str, label: str, budget: int, max_rank: int, as_json: bool) -> int:
    rows = resident(model, budget, range(4, max_rank + 1), max_rank)
    if as_json:
        print(json.dumps({"resident": rows}, indent=1))
        return 0
    print(
        f"{model}, all seven projections of every layer, {label} for adapters, max_rank {max_rank}; the allocator "
        "where the TPU pooled kernel may run (8-row aligned pages, tails sharing pages)"
    )
    print(
        "| rank | bf16 true MB | bf16 own / true | bf16 adapters in the budget | bf16 budget / adapters / true "
        "| int8 true MB | int8 own / true | int8 adapters in the budget | int8 budget / adapters / true |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rank in RESIDENT_RANKS:
        cells = [str(rank)]
        for dtype in ("bf16", "int8"):
            r = next(r for r in rows if r["rank"] == rank and r["dtype"] == dtype)
            cells += [f"{r['true_mb']:.1f}", f"{r['own_ratio']:.3f}", str(r["adapters"]), f"{r['budget_ratio']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    ranks = fleet({8: 0.7, 16: 0.2, 64: 0.1}, 100_000)
    mixed = {
        dtype: placed(budget_rows(model, budget, int8, KERNEL_PAGE_ROWS, max_rank), ranks, KERNEL_PAGE_ROWS, max_rank)
        for dtype, int8 in (("bf16", False), ("int8", True))
    }
    print(f"mixed fleet 70/20/10% r8/16/64 held by this allocator: {mixed['bf16']} bf16, {mixed['int8']} int8")
    for dtype in ("bf16", "int8"):
        mine = [r for r in rows if r["dtype"] == dtype]
        over = ", ".join(f"{r['rank']} ({r['budget_ratio']:.3f})" for r in mine if r["budget_ratio"] > 1.10)
        by_tail = "; ".join(
            f"tails of {'/'.join(map(str, tails))} rows: at most "
            f"{max(r['budget_ratio'] for r in mine if r['rank'] % KERNEL_PAGE_ROWS in tails):.3f}"
            for tails in ((0, 1, 2, 4), (3,), (5, 6, 7))
        )
        print(
            f"{dtype}, every rank 4-{max_rank}: own / true at most {max(r['own_ratio'] for r in mine):.3f}; "
            f"budget / adapters / true at most {max(r['budget_ratio'] for r in mine):.3f} ({by_tail}), "
            f"over 1.10 at ranks: {over or 'none'}"
        )
    return 0


def chip_rows(model: str, kv_tokens: int, max_rank: int) -> list[dict]:
    """Adapters of the mixed fleet beside a base (bf16 or int8 weight-only linear layers, bf16 embeddings)
    and a bf16 KV cache of ``kv_tokens`` tokens, in each chip's HBM less 1 GiB for activations."""
    hidden, _, layers, _, kv_heads, head_dim, vocab = MODELS[model]
    linear = sum(d_in * d_out for d_in, d_out in projection_shapes(model)) + vocab * hidden  # + lm_head
    embedding = vocab * hidden * 2
    kv = kv_tokens * layers * 2 * kv_heads * head_dim * 2
    ranks = fleet({8: 0.7, 16: 0.2, 64: 0.1}, 100_000)
    units = {"bf16": row_bytes(model, 2, False, max_rank), "int8": row_bytes(model, 1, True, max_rank)}
    out = []
    for chip, hbm in CHIPS.items():
        for base, per_weight in (("bf16", 2), ("int8", 1)):
            left = hbm - linear * per_weight - embedding - kv - 2**30
            if left <= 0:
                out.append(
                    {
                        "chip": chip,
                        "base": base,
                        "left_gib": left / 2**30,
                        "padded bf16": 0,
                        "rank-true bf16": 0,
                        "rank-true int8": 0,
                    }
                )
                continue
            out.append(
                {
                    "chip": chip,
                    "base": base,
                    "left_gib": left / 2**30,
                    "padded bf16": adapters_fitting(left, units["bf16"], ranks, max_rank, True),
                    "rank-true bf16": adapters_fitting(left, units["bf16"], ranks, max_rank, False),
                    "rank-true int8": adapters_fitting(left, units["int8"], ranks, max_rank, False),
                }
            )
    return out
