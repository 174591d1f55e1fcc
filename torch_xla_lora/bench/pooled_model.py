"""``python -m torch_xla_lora.bench.pooled_model``: LoRA bytes and time of one decode step, TPU-modelled.

Llama-3-8B's seven projections in each of its 32 layers, a decode batch of 16 tokens (one per request)
on 1, 8 or 16 distinct adapters of mixed true ranks (8, 16, 64 in turn), for ``max_loras`` x
``max_rank`` in {16, 64} x {64, 128}, bf16 and int8 pools, on v5e and v6e:

- *padded*: today's slots, ``bgmv_shrink_expand``'s fused kernel (:func:`tpu_model.fused_cost`):
  every used slot's ``max_rank`` rows;
- *gathered pool*: rank-true storage read as before the pooled kernel: the lanes' rows gathered into
  the ``[max_loras, max_rank]`` slot layout (all ``max_loras x max_rank`` table entries read, the slot
  buffers written), then the same fused kernel;
- *pooled*: ``pooled_shrink_expand``'s kernel (``kernels.fused.Pooled``), walked like the padded one
  (:func:`pooled_cost`): the pages of each used lane's true rank, plus the tables the kernel reads: the
  batch's page table (page starts and ranks, built on the host), and for int8 pools of the page-scale array
  kept beside the pool (pools of a 6 GiB budget, :func:`pool_rows`) the 4 KiB tile of each used page (once
  for a run of a lane's pages in one tile, ``fused.scale_tiles``), or the whole array where that is fewer
  tiles than pages (``fused.scale_read_bytes``, the kernel's own choice);
- *one-pass*: the base matmul and the LoRA in one kernel reading the pool (``linear_lora_pooled``,
  ``tpu_model.fused_base_cost`` with a ``PoolSpec``), what ``base_fusion`` runs: its adapter bytes are the
  kernel's traffic less the same kernel's on a batch without adapters, its time the kernel's less XLA's
  base matmul (:func:`one_pass_cost`).

``--moe`` prices instead the expert LoRA of MoE models' decode steps (:func:`moe_step_rows`: Mixtral-8x7B,
Qwen3-30B-A3B; bf16 and int8 pools, the experts' page scales kept per expert).

``--resident`` prints instead the bytes of one adapter's rows at its true rank rounded to a granule
(:func:`resident_rows`, the pool's own accounting: ``pool.layer_row_bytes``, ``pool.span_rows``) at the same
shapes: whole aligned pages of 8 rows (the rows the TPU kernel reads per step; since tails share pages an
adapter *owns* only its rank's rows, which ``python -m torch_xla_lora.bench memory --resident`` prices), one
row (off TPU) and, for comparison, groups of 2 (bf16) or 4 (int8) rows (a ``[rows / g, g, D]`` pool layout the
pools do not have), against the rank's own bytes.

"Adapter bytes" are what each formulation reads of the adapters (the rows the kernel DMAs, the
tables, the gather's reads and writes); the op's activations (x and the base read, the output
written) are the same for all three and left out. "true" is the true-rank bytes of the batch's
distinct adapters (int8: one byte an element). Times are the whole LoRA op's modelled time (the
kernel with its activations, plus the gather's roofline), summed over the step's projections.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np

from torch_xla_lora.bench import tpu_model

DISTINCT = (1, 8, 16)
MIXED_RANKS = (8, 16, 64)
SLOT_GRID = ((16, 64), (64, 64), (16, 128), (64, 128))  # (max_loras, max_rank)
DECODE_TOKENS = 16
LAYERS = 32
BUDGET = 6 * 2**30  # the 6 GiB beside a bf16 base and its KV cache on a v6e


def batch_ranks(distinct: int) -> tuple[int, ...]:
    """True ranks of a batch's ``distinct`` adapters: :data:`MIXED_RANKS` in turn."""
    return tuple(MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(distinct))


def decode_lanes(tokens: int, distinct: int) -> np.ndarray:
    """[T] lane of each decode token: token t on lane t mod ``distinct``."""
    return (np.arange(tokens) % distinct).astype(np.int32)


def pooled_cost(
    chip: tpu_model.Chip,
    lanes: np.ndarray,
    ranks: Sequence[int],
    hidden: int,
    out_dim: int,
    max_rank: int,
    max_loras: int,
    int8: bool,
    pool_rows: int,
    stacked: int = 1,
) -> tpu_model.Cost:
    """Cost of ``pooled_shrink_expand``'s kernel (bf16 compute) for one batch: ``lanes`` [T] each token's lane,
    ``ranks[l]`` lane l's true rank (lanes past ``len(ranks)`` hold none). Pipelined blocks as
    :func:`tpu_model.fused_cost`; manual bytes the pages the kernel DMAs (``fused.pooled_step_work``) plus
    the tables it reads: the page table (page starts, ranks) whole; int8: of the page-scale array of a pool of
    ``pool_rows`` rows (``stacked`` such pools, each its block of whole tiles: an experts layer's), a tile per
    page DMA'd or the whole array, as the kernel chooses)."""
    import jax.numpy as jnp

    from torch_xla_lora.kernels import fused, visits

    dtype = jnp.bfloat16
    num_tokens = len(lanes)
    sizes, lane_count, run = fused.pooled_plan_call(
        num_tokens, hidden, out_dim, max_rank, max_loras, dtype, chip.generation, int8
    )
    if not run:
        raise ValueError(f"the pooled kernel does not run D={hidden}, Dout={out_dim}, R={max_rank} on {chip.name}")
    padded = np.full(sizes.padded_tokens(num_tokens), -1, np.int32)
    padded[:num_tokens] = lanes
    meta = visits.build_lanes(padded, max_loras, sizes.tokens, lane_count, xp=np)
    pooled = fused.Pooled(max_rank, int8)
    spec = fused.grid_spec(len(padded), hidden, out_dim, max_rank, max_loras, dtype, sizes, lane_count, pooled)
    prefetch = (meta.active, meta.chunks, meta.slots, meta.uniform)
    lane_ranks = np.zeros(max_loras, np.int64)
    lane_ranks[: len(ranks)] = ranks
    tile_of = _scale_tiles_of(lane_ranks, pool_rows, stacked) if int8 else None
    specs = [*spec.in_specs, spec.out_specs]
    last = [None] * len(specs)
    pipelined = manual = page_count = page_tiles = 0
    flops = 0.0
    steps = int(meta.num_active[0]) * spec.grid[1]
    for i in range(int(meta.num_active[0])):
        for n in range(spec.grid[1]):
            for k, block_spec in enumerate(specs):
                if block_spec.block_shape is None:  # memory_space=ANY: the pools, moved by manual DMAs
                    continue
                index = tuple(int(v) for v in block_spec.index_map(i, n, *prefetch))
                if index != last[k]:
                    pipelined += math.prod(block_spec.block_shape) * (4 if k == 0 else 2)
                    last[k] = index
            dma, matmuls = fused.pooled_step_work(i, n, meta, lane_ranks, hidden, lane_count, sizes, 1 if int8 else 2)
            manual += dma
            if n == 0:  # the pages the shrink DMAs, and their scale tiles if the kernel reads them so
                step_pages, step_tiles = fused.pooled_step_pages(i, meta, lane_ranks, lane_count, tile_of)
                page_count, page_tiles = page_count + step_pages, page_tiles + step_tiles
            flops += tpu_model.mxu_flops(matmuls, chip.mxu_width)
    entries = max_loras * fused.pages(max_rank)
    manual += 4 * (entries + max_loras)  # the page table (page starts, ranks), built on the host per batch
    if int8:
        scale_rows = stacked * fused.padded_scale_rows(pool_rows + 2, stacked)
        manual += fused.scale_read_bytes(page_count, scale_rows, page_tiles)
    return tpu_model.Cost(pipelined, manual, flops, steps, tpu_model._time(chip, pipelined, manual, flops, steps))


def gather_cost(chip: tpu_model.Chip, max_loras: int, max_rank: int, hidden: int, out_dim: int, int8: bool):
    """(bytes, seconds) of gathering every lane's ``max_rank`` rows of both pools into bf16 slot buffers (the rows
    read, at one byte an element for int8, and the slots written), one XLA fusion at its roofline."""
    gather = max_loras * max_rank * (hidden + out_dim) * ((1 if int8 else 2) + 2)
    return gather, gather / chip.hbm_bytes_per_s + tpu_model.XLA_FUSION_OVERHEAD_S


def pooled_op_seconds(
    chip: tpu_model.Chip,
    lanes: np.ndarray,
    ranks: Sequence[int],
    hidden: int,
    out_dim: int,
    max_rank: int,
    max_loras: int,
    int8: bool,
    pool_rows: int,
) -> float:
    """Seconds of ``pooled_shrink_expand`` with the Pallas backend as it runs the batch on ``chip``: the pooled
    kernel (:func:`pooled_cost`) where ``fused.pooled_plan_call`` runs it; else a batch of at most
    ``_xla_native.PACKED_MAX_TOKENS`` tokens the packed XLA ops (priced as the XLA-native slot op, as
    ``tpu_model.projection_costs`` prices them) and a longer one every lane gathered into slots
    (:func:`gather_cost`), then the slot kernel."""
    import jax.numpy as jnp

    from torch_xla_lora.kernels import fused
    from torch_xla_lora.ops import _xla_native

    num_tokens = len(lanes)
    run = fused.pooled_plan_call(num_tokens, hidden, out_dim, max_rank, max_loras, jnp.bfloat16, chip.generation, int8)
    if run[2]:
        return pooled_cost(chip, lanes, ranks, hidden, out_dim, max_rank, max_loras, int8, pool_rows).seconds
    if num_tokens <= _xla_native.PACKED_MAX_TOKENS:
        return tpu_model.xla_native_cost(chip, lanes, hidden, out_dim, max_rank, max_loras)
    gather_s = gather_cost(chip, max_loras, max_rank, hidden, out_dim, int8)[1]
    return gather_s + tpu_model.fused_cost(chip, lanes, hidden, out_dim, max_rank, max_loras).seconds


def _scale_tiles_of(ranks: np.ndarray, pool_rows: int, stacked: int):
    """``tile_of(lane, page)`` for :func:`fused.pooled_step_pages`: the page-scale tile of a lane's page, its
    adapter's rows placed as whole pages one adapter after another from row 0 (lane ``l`` of ``stacked``
    pools: adapter ``l // stacked`` on pool ``l % stacked``, ``kernels.pages.scale_index``)."""
    from torch_xla_lora.kernels import pages

    adapters = ranks if stacked == 1 else ranks[::stacked]
    starts = np.concatenate([[0], np.cumsum([pages.pages(int(r)) * pages.PAGE_ROWS for r in adapters])])
    group, stride = pages.scale_group(stacked), pages.padded_scale_rows(pool_rows + 2, stacked)

    def tile_of(lane: int, page: int) -> int:
        row = int(starts[lane // stacked]) + page * pages.PAGE_ROWS
        return pages.scale_index(lane % stacked, row, stride, group) // pages.SCALE_TILE_ROWS

    return tile_of


def one_pass_cost(
    chip: tpu_model.Chip,
    lanes: np.ndarray,
    ranks: Sequence[int],
    hidden: int,
    out_dim: int,
    max_rank: int,
    max_loras: int,
    int8: bool,
    pool_rows: int,
) -> tuple[int, float]:
    """(adapter bytes, seconds over the base) of one projection's one-pass kernel reading the pool: its walked
    traffic (``tpu_model.fused_base_cost`` with the pool) less the same kernel's on a batch without adapters,
    and its time less XLA's base matmul (bf16 base)."""
    lane_ranks = np.zeros(max_loras, np.int64)
    lane_ranks[: len(ranks)] = ranks
    pool = tpu_model.PoolSpec(tuple(int(r) for r in lane_ranks), int8, pool_rows)
    cost = tpu_model.fused_base_cost(chip, lanes, hidden, out_dim, max_rank, max_loras, pool=pool)
    plain = tpu_model.fused_base_cost(chip, np.full_like(lanes, -1), hidden, out_dim, max_rank, max_loras)
    if cost is None or plain is None:
        raise ValueError(f"the one-pass kernel does not run D={hidden}, Dout={out_dim}, R={max_rank} on {chip.name}")
    total = cost.pipelined_bytes + cost.manual_bytes - plain.pipelined_bytes - plain.manual_bytes
    base = tpu_model.matmul_cost(chip, len(lanes), hidden, out_dim).seconds
    return total, cost.seconds - base


def pool_rows(int8: bool) -> int:
    """Data rows of every layer's pool with a :data:`BUDGET` budget at Llama-3-8B shapes (all seven projections
    of the 32 layers; int8: one byte an element and three float32 scales (A's, B's, their product, the page
    scale) per projection, page scales padded to whole tiles), zero and scratch rows aside."""
    projections = len(tpu_model.LLAMA3_8B_LAYER)
    row = sum(hidden + out_dim for hidden, out_dim, _ in tpu_model.LLAMA3_8B_LAYER.values())
    row_bytes = LAYERS * (row * (1 if int8 else 2) + (3 * 4 * projections if int8 else 0))
    rows = BUDGET // row_bytes - 2
    while int8 and (rows + 2) * row_bytes + 4 * LAYERS * projections * (fused_padding(rows)) > BUDGET:
        rows -= 1
    return rows


def fused_padding(rows: int) -> int:
    """Padding rows of a page-scale array of a pool of ``rows`` data rows (whole 1024-row tiles)."""
    from torch_xla_lora.kernels import fused

    return fused.padded_scale_rows(rows + 2) - rows - 2


def step_rows(chip: tpu_model.Chip, distinct: int, max_loras: int, max_rank: int, int8: bool) -> dict:
    """One table row: LoRA bytes and modelled time of a whole decode step's projections (all layers)."""
    ranks = batch_ranks(distinct)
    lanes = decode_lanes(DECODE_TOKENS, distinct)
    totals = dict.fromkeys(("padded_bytes", "gathered_bytes", "pooled_bytes", "one_pass_bytes", "true_bytes"), 0.0)
    totals.update(dict.fromkeys(("padded_s", "gathered_s", "pooled_s", "one_pass_s"), 0.0))
    for hidden, out_dim, _ in tpu_model.LLAMA3_8B_LAYER.values():
        padded = tpu_model.fused_cost(chip, lanes, hidden, out_dim, max_rank, max_loras)
        pooled = pooled_cost(chip, lanes, ranks, hidden, out_dim, max_rank, max_loras, int8, pool_rows(int8))
        element = 1 if int8 else 2
        gather, gather_s = gather_cost(chip, max_loras, max_rank, hidden, out_dim, int8)
        one_pass = one_pass_cost(chip, lanes, ranks, hidden, out_dim, max_rank, max_loras, int8, pool_rows(int8))
        totals["one_pass_bytes"] += one_pass[0]
        totals["one_pass_s"] += one_pass[1]
        totals["padded_bytes"] += padded.manual_bytes
        totals["gathered_bytes"] += padded.manual_bytes + gather
        totals["pooled_bytes"] += pooled.manual_bytes
        totals["true_bytes"] += sum(ranks) * (hidden + out_dim) * element
        totals["padded_s"] += padded.seconds
        totals["gathered_s"] += padded.seconds + gather_s
        totals["pooled_s"] += pooled.seconds
    return {key: value * LAYERS for key, value in totals.items()}


def table(chips: Sequence[str] = ("v5e", "v6e")) -> str:
    """The markdown table of :func:`step_rows` over the chips, pool dtypes, distinct adapters and slot grid."""
    lines = [
        "| chip | pool | distinct | max_loras x max_rank | true MB | padded MB | gathered pool MB | pooled MB "
        "| pooled / true | padded µs | gathered pool µs | pooled µs | one-pass MB | one-pass / true "
        "| one-pass µs over the base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for chip_name in chips:
        chip = tpu_model.CHIPS[chip_name]
        for int8 in (False, True):
            for distinct in DISTINCT:
                for max_loras, max_rank in SLOT_GRID:
                    row = step_rows(chip, distinct, max_loras, max_rank, int8)
                    lines.append(
                        f"| {chip_name} | {'int8' if int8 else 'bf16'} | {distinct} | {max_loras} x {max_rank} "
                        + _formulation_cells(row)
                        + f"| {row['one_pass_bytes'] / 1e6:.1f} | {row['one_pass_bytes'] / row['true_bytes']:.3f} "
                        f"| {row['one_pass_s'] * 1e6:.0f} |"
                    )
    return "\n".join(lines)


#: ``--moe``: the models priced (``tpu_grid.MOE_MODELS``), and their layers.
MOE_STEP_MODELS = {"mixtral-8x7b": 32, "qwen3-30b-a3b": 48}
MOE_SLOT_GRID = ((8, 64), (16, 64))  # (max_loras, max_rank): up to 2,048 entries, as libtpu compiles


def moe_entries(model: str, distinct: int, tokens: int = DECODE_TOKENS) -> np.ndarray:
    """[T * K] each routed row's (lane, expert) entry ``lane * E + expert``, sorted by expert as the experts layer
    sorts its rows: token t on lane t mod ``distinct``, routed to the K experts ``(t * K + k) mod E`` (every
    expert as evenly loaded as the batch allows)."""
    from torch_xla_lora.bench import tpu_grid

    shape = tpu_grid.MOE_MODELS[model]
    token = np.repeat(np.arange(tokens), shape.top_k)
    expert = (token * shape.top_k + np.tile(np.arange(shape.top_k), tokens)) % shape.experts
    order = np.argsort(expert, kind="stable")
    return ((token % distinct) * shape.experts + expert)[order].astype(np.int32)


def moe_step_rows(
    chip: tpu_model.Chip, model: str, distinct: int, max_loras: int, max_rank: int, int8: bool = False
) -> dict:
    """One ``--moe`` table row: the expert LoRA's bytes and modelled time over a decode step's layers (both
    projections): padded bf16 ``[L * E, R]`` slots (the fused kernel over the routed rows' entries), the pool
    gathered into them per step (what the experts did before reading pools; an int8 pool's rows read as int8),
    and the pooled kernel on the ``L * E`` entries' true-rank pages (``ExpertsWithLoRA._entry_tables``), of bf16
    or ``int8`` pools (their page scales kept beside them, 8 experts to a 4 KiB tile, read as the kernel reads them,
    ``fused.pooled_step_pages``). *True* bytes are the routed
    entries' true-rank rows in the pool's dtype."""
    from torch_xla_lora.bench import tpu_grid

    shape = tpu_grid.MOE_MODELS[model]
    ranks = batch_ranks(distinct)
    entries = moe_entries(model, distinct)
    slots = max_loras * shape.experts
    entry_ranks = [ranks[e // shape.experts] if e // shape.experts < distinct else 0 for e in range(slots)]
    used = set(entries.tolist())
    element = 1 if int8 else 2
    totals = dict.fromkeys(("padded_bytes", "gathered_bytes", "pooled_bytes", "true_bytes"), 0.0)
    totals.update(dict.fromkeys(("padded_s", "gathered_s", "pooled_s"), 0.0))
    for hidden, out_dim in ((shape.hidden, 2 * shape.intermediate), (shape.intermediate, shape.hidden)):
        padded = tpu_model.fused_cost(chip, entries, hidden, out_dim, max_rank, slots)
        rows = pool_rows(int8)
        pooled = pooled_cost(chip, entries, entry_ranks, hidden, out_dim, max_rank, slots, int8, rows, shape.experts)
        gather = slots * max_rank * (hidden + out_dim) * (element + 2)  # read every entry's rows, write bf16 slots
        totals["padded_bytes"] += padded.manual_bytes
        totals["gathered_bytes"] += padded.manual_bytes + gather
        totals["pooled_bytes"] += pooled.manual_bytes
        totals["true_bytes"] += sum(entry_ranks[e] for e in used) * (hidden + out_dim) * element
        totals["padded_s"] += padded.seconds
        totals["gathered_s"] += padded.seconds + gather / chip.hbm_bytes_per_s + tpu_model.XLA_FUSION_OVERHEAD_S
        totals["pooled_s"] += pooled.seconds
    return {key: value * MOE_STEP_MODELS[model] for key, value in totals.items()}


def moe_table(chips: Sequence[str] = ("v5e", "v6e")) -> str:
    """The markdown table of :func:`moe_step_rows` over the chips, models, pool dtypes, distinct adapters and
    slot grid."""
    lines = [
        "| chip | model | pools | distinct | max_loras x max_rank | entries used | true MB | padded MB "
        "| gathered pool MB | pooled MB | pooled / true | padded µs | gathered pool µs | pooled µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for chip_name in chips:
        chip = tpu_model.CHIPS[chip_name]
        for model in MOE_STEP_MODELS:
            for int8 in (False, True):
                for distinct in DISTINCT:
                    for max_loras, max_rank in MOE_SLOT_GRID:
                        if distinct > max_loras:
                            continue
                        row = moe_step_rows(chip, model, distinct, max_loras, max_rank, int8)
                        used = len(set(moe_entries(model, distinct).tolist()))
                        lines.append(
                            f"| {chip_name} | {model} | {'int8' if int8 else 'bf16'} | {distinct} "
                            f"| {max_loras} x {max_rank} | {used} " + _formulation_cells(row) + "|"
                        )
    return "\n".join(lines)


def _formulation_cells(row: dict) -> str:
    """The cells both tables give each row: true, padded, gathered and pooled MB, pooled / true, the three times."""
    mb = {key: row[f"{key}_bytes"] / 1e6 for key in ("true", "padded", "gathered", "pooled")}
    times = " | ".join(f"{row[f'{key}_s'] * 1e6:.0f}" for key in ("padded", "gathered", "pooled"))
    return (
        f"| {mb['true']:.1f} | {mb['padded']:.1f} | {mb['gathered']:.1f} | {mb['pooled']:.1f} "
        f"| {row['pooled_bytes'] / row['true_bytes']:.3f} | {times} "
    )


RESIDENT_RANKS = (4, 5, 6, 7, 8, 9, 10, 12, 16, 20, 24, 32, 40, 48, 56, 64)


def resident_rows(rank: int, granule: int, int8: bool, max_loras: int = 16, max_rank: int = 64) -> dict:
    """Bytes one adapter of ``rank`` holds resident in the pools of Llama-3-8B's seven projections (32 layers),
    allocated at ``granule`` rows (``pool.span_rows``), each row at ``pool.layer_row_bytes`` (int8: one byte an
    element plus the row's float32 scales); ``true`` its rank's elements at the pool's element size."""
    from torch_xla_lora import pool

    element = 1 if int8 else 2
    row_bytes = true_row = 0
    for hidden, out_dim, _ in tpu_model.LLAMA3_8B_LAYER.values():
        shapes = {"lora_a": (max_loras, max_rank, hidden), "lora_b": (max_loras, max_rank, out_dim)}
        row_bytes += pool.layer_row_bytes(shapes, {"lora_a": 0, "lora_b": 0}, max_loras, max_rank, element, int8)
        true_row += (hidden + out_dim) * element
    resident = pool.span_rows(rank, granule) * row_bytes * LAYERS
    true = rank * true_row * LAYERS
    return {"rank": rank, "granule": granule, "resident_bytes": resident, "true_bytes": true, "ratio": resident / true}


#: Rows a group of a pool stored ``[rows / g, g, D]`` would hold (``bench.page_dma``: the rows one 32-bit HBM word
#: packs, the finest row DMA Mosaic compiles at any offset): a layout the pools do not have, priced for comparison.
GROUP_ROWS = {False: 2, True: 4}


def resident_table(ranks: Sequence[int] = RESIDENT_RANKS) -> str:
    """The markdown table of :func:`resident_rows`, bf16 and int8: the TPU kernel's page granule, one row (off
    TPU) and :data:`GROUP_ROWS` (not built), then the largest ratio over every rank from 4 to 64."""
    from torch_xla_lora import pool

    header = ["rank"]
    for dtype, int8 in (("bf16", False), ("int8", True)):
        header += [
            f"{dtype} true MB",
            f"{dtype} / true, whole 8-row pages (rows a TPU step reads)",
            "1 row (off TPU)",
            f"{GROUP_ROWS[int8]}-row groups (3-D pool, not built)",
        ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def granules(int8: bool) -> tuple[int, ...]:
        return (pool.KERNEL_PAGE_ROWS, 1, GROUP_ROWS[int8])

    for rank in ranks:
        cells = [str(rank)]
        for int8 in (False, True):
            rows = [resident_rows(rank, g, int8) for g in granules(int8)]
            cells += [f"{rows[0]['true_bytes'] / 1e6:.1f}"] + [f"{row['ratio']:.3f}" for row in rows]
        lines.append("| " + " | ".join(cells) + " |")
    worst = ["largest, ranks 4-64"]
    for int8 in (False, True):
        worst += [""] + [f"{max(resident_rows(r, g, int8)['ratio'] for r in range(4, 65)):.3f}" for g in granules(int8)]
    lines.append("| " + " | ".join(worst) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench.pooled_model", description=__doc__)
    parser.add_argument("--chips", nargs="+", default=["v5e", "v6e"], choices=sorted(tpu_model.CHIPS))
    parser.add_argument("--resident", action="store_true", help="resident bytes per adapter and rank instead")
    parser.add_argument("--moe", action="store_true", help="the expert LoRA of MoE models' decode steps instead")
    args = parser.parse_args(argv)
    if args.resident:
        print(resident_table())
    else:
        print(moe_table(args.chips) if args.moe else table(args.chips))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
