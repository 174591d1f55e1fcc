"""A TPU cost model of the fused LoRA kernel, driven by the kernel's own grid and BlockSpecs.

No TPU is needed: the model walks the grid the kernel would run for a given
batch (the real lane metadata, computed by the same code the op uses),
evaluates every BlockSpec's index map at every step, and counts

- HBM bytes of pipelined blocks: a block is fetched (or, for the output,
  written back) when its block index changes between consecutive grid steps,
  as the TPU pipeline does;
- bytes of the kernel's manual DMAs (adapter tiles), from ``fused.step_work``;
- MXU work in hardware tiles: a matmul (M, K, N) costs 2 * M * ceil(K/W)*W *
  ceil(N/W)*W flops at MXU width W (rows stream; each pass uses a W x W tile);
- grid steps, each with a fixed overhead.

Time = max(pipelined bytes / HBM bandwidth, MXU flops / peak) + manual DMA
bytes / bandwidth (the kernel waits for them) + steps * step overhead.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from torch_xla_lora.kernels import cost as kernel_cost


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public figures of one TPU generation (bf16)."""

    name: str
    generation: str  # tuning-table key
    hbm_bytes_per_s: float
    peak_flops: float
    mxu_width: int
    step_overhead_s: float = 0.35e-6


def _chip(generation: str) -> Chip:
    from torch_xla_lora.kernels import tuning

    return Chip(
        f"TPU {generation}",
        generation,
        tuning.HBM_BYTES_PER_S[generation],
        tuning.PEAK_FLOPS[generation],
        tuning.MXU_WIDTH[generation],
        tuning.STEP_OVERHEAD_S,
    )


# The per-chip figures of the tuning table (Cloud TPU documentation; see kernels/tuning.py), the same
# ones the fused base kernel's planner prices its tilings with.
CHIPS = {generation: _chip(generation) for generation in ("v4", "v5e", "v5p", "v6e")}
# What XLA spends per fusion it launches besides its roofline time (an assumption, like the grid step's).
XLA_FUSION_OVERHEAD_S = 1e-6


# One call's modelled traffic, work and seconds, and the MXU's padded flops: the kernels' own cost model
# (``kernels/cost.py``), which the fused op's planner prices its fused-or-separate choice with.
Cost = kernel_cost.Cost
mxu_flops = kernel_cost.mxu_flops


def _time(chip: Chip, pipelined: int, manual: int, flops: float, steps: int) -> float:
    return kernel_cost.seconds(chip, pipelined, manual, flops, steps)


def fused_cost(chip: Chip, indices: np.ndarray, hidden: int, out_dim: int, rank: int, num_slots: int) -> Cost:
    """Cost of the fused kernel of ``bgmv_shrink_expand`` (bf16) for one batch whose token slots are ``indices``:
    its grid walked step by step (``kernels.cost.fused_walk``, the walk the op's planner prices too)."""
    return kernel_cost.fused_walk(indices, hidden, out_dim, rank, num_slots, "bfloat16", chip.generation, chip)


def onehot_cost(chip: Chip, num_tokens: int, hidden: int, out_dim: int, rank: int, num_slots: int) -> Cost:
    """The one-hot einsum (shrink and expand over every slot), as two XLA fusions.

    Modelled in its cheapest contraction order: x @ A_all^T ([T, L*R]), masked by the
    one-hot, then @ B_all. It reads every slot's weights and does L times the MXU work.
    """
    itemsize = 2
    lr = num_slots * rank
    pipelined = itemsize * (
        num_tokens * hidden + lr * hidden + lr * out_dim + 2 * num_tokens * out_dim + 2 * num_tokens * lr
    )
    flops = mxu_flops([(num_tokens, hidden, lr), (num_tokens, lr, out_dim)], chip.mxu_width)
    return Cost(pipelined, 0, flops, 2, _time(chip, pipelined, 0, flops, 2))


def _fusions(chip: Chip, parts) -> float:
    """Seconds of XLA fusions run one after another: each (bytes, flops) at its roofline, plus its launch."""
    return sum(
        max(nbytes / chip.hbm_bytes_per_s, flops / chip.peak_flops) + XLA_FUSION_OVERHEAD_S for nbytes, flops in parts
    )


def xla_native_cost(chip: Chip, indices: np.ndarray, hidden: int, out_dim: int, rank: int, num_slots: int) -> float:
    """Seconds of ``bgmv_shrink_expand`` with ``backend="xla"`` on a TPU (bf16): the grouped algorithm
    of ``ops/_xla_native.py`` as XLA fusions, branch chosen as the op chooses it at run time.

    - direct (prefill): a shrink fusion (reads x and each block's gathered A; (bt, K, R) per block)
      and an expand fusion that adds to the base (reads s, base and the gathered B, writes the
      output), then two block-sized products per extra visit (a loop, one fusion each, the f32
      rows read and written in place);
    - laned (blocks that mix adapters, at most two chunks of 128 / R adapters): per chunk a
      [T, K] x [K, 128] shrink and a [T, 128] x [128, N] expand over the f32 accumulator;
    - sorted (more distinct adapters): x permuted, direct on the sorted rows, the products
      permuted back and added to the base.

    Unlike a Pallas call, these fusions are XLA's own: producers of x (a norm's scale,
    SiLU(gate) * up) fuse into the shrink's read and a residual add into the last fusion, so
    the layer pays no materialised x and no separate residual pass (see :func:`layer_costs`).
    """
    from torch_xla_lora.kernels import block_sizes, visits
    from torch_xla_lora.ops import _xla_native

    itemsize = 2
    num_tokens = len(indices)
    bt = block_sizes.choose(num_tokens, hidden, out_dim, chip.generation).tokens
    padded = np.full(-(-num_tokens // bt) * bt, -1, np.int32)
    padded[:num_tokens] = np.where((indices >= 0) & (indices < num_slots), indices, -1)
    rows, blocks = len(padded), len(padded) // bt
    pad = lambda d: -(-d // chip.mxu_width) * chip.mxu_width  # noqa: E731
    distinct = len({int(s) for s in padded if s >= 0})
    lanes = max(1, _xla_native.LANE_COLUMNS // rank)
    chunks = -(-distinct // lanes)
    vis = visits.build(padded, num_slots, bt, xp=np)
    extra = int(vis.count[0]) - len(set(vis.block[: int(vis.count[0])].tolist()))
    mixing = distinct > 1 if blocks == 1 else extra > blocks

    def direct(num_extra: int, start: bool) -> list[tuple[float, float]]:
        shrink = (itemsize * (rows * hidden + blocks * rank * hidden), 2.0 * rows * hidden * pad(rank))
        expand = (
            itemsize * (rows * rank + blocks * rank * out_dim + (2 if start else 1) * rows * out_dim),
            2.0 * rows * pad(rank) * pad(out_dim),
        )
        visit = [
            (itemsize * (bt * hidden + rank * hidden), 2.0 * bt * hidden * pad(rank)),
            (itemsize * rank * out_dim + 8 * bt * out_dim, 2.0 * bt * pad(rank) * pad(out_dim)),
        ]
        return [shrink, expand] + visit * num_extra

    if not mixing:
        parts = direct(extra, start=True)
    elif blocks == 1 or chunks <= _xla_native.MAX_LANED_CHUNKS:
        lane_width = lanes * rank
        parts = []
        for _ in range(chunks):
            parts.append((itemsize * (rows * hidden + lane_width * hidden), 2.0 * rows * hidden * pad(lane_width)))
            parts.append(
                (itemsize * lane_width * out_dim + 8 * rows * out_dim, 2.0 * rows * pad(lane_width) * pad(out_dim))
            )
        parts.append((itemsize * 2 * rows * out_dim, 0.0))  # base in, output out
    else:  # sorted: permute x, direct on the sorted rows (about one extra visit per adapter), permute back
        parts = [(2 * itemsize * rows * hidden, 0.0), *direct(distinct, start=False)]
        parts.append((8 * rows * out_dim + 2 * itemsize * rows * out_dim, 0.0))
    return _fusions(chip, parts)


def floor_cost(chip: Chip, indices: np.ndarray, hidden: int, out_dim: int, rank: int) -> Cost:
    """The roofline floor: read x, base and the adapters in use once, write the output once."""
    itemsize = 2
    num_tokens = len(indices)
    in_use = len({int(i) for i in indices if i >= 0})
    pipelined = itemsize * (num_tokens * hidden + 2 * num_tokens * out_dim + in_use * rank * (hidden + out_dim))
    flops = 2.0 * num_tokens * rank * (hidden + out_dim)
    return Cost(pipelined, 0, flops, 0, max(pipelined / chip.hbm_bytes_per_s, flops / chip.peak_flops))


def matmul_cost(
    chip: Chip, num_tokens: int, hidden: int, out_dim: int, int8_weight: bool = False, fused_reads: int = 0
) -> Cost:
    """The base layer as XLA runs it, at its roofline: read x and W, write y, once each (bf16; with
    ``int8_weight`` W at one byte an element and its f32 per-channel scales, as torch_xla's quantized matmul),
    and ``fused_reads`` more bf16 elements read by what XLA fuses into the dot (a residual, a second operand)."""
    itemsize = 2
    pipelined = itemsize * (num_tokens * hidden + num_tokens * out_dim + fused_reads)
    pipelined += hidden * out_dim + 4 * out_dim if int8_weight else itemsize * hidden * out_dim
    flops = mxu_flops([(num_tokens, hidden, out_dim)], chip.mxu_width)
    return Cost(pipelined, 0, flops, 1, max(pipelined / chip.hbm_bytes_per_s, flops / chip.peak_flops))


def kernel_fusion(prologue: str = "", residual: bool = False):
    """The ``fused_base.Fusion`` of a projection whose kernel takes in x's ``prologue`` ("", "silu_mul",
    "norm") and, with ``residual``, the residual add."""
    from torch_xla_lora.kernels import fused_base

    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    norm = prologue == "norm"
    return fused_base.Fusion(silu_mul=prologue == "silu_mul", row_scale=norm, col_scale=norm, residual=residual)


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """Adapters in a rank-true pool (``memory_budget``) for the cost model: ``ranks[l]`` the true rank of lane
    l (the slots; 0: no adapter), ``int8`` an int8 pool (one byte an element, its page scales), ``rows`` the
    pool's data rows (what the page-scale array spans)."""

    ranks: tuple[int, ...]
    int8: bool = False
    rows: int = 0


#: What a fused kernel can take in of x's producer: nothing, SiLU(gate) * up, RMSNorm's factors.
PROLOGUES = ("", "silu_mul", "norm")


def fused_base_cost(
    chip: Chip,
    indices: np.ndarray,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    layout: str = "out_in",
    has_bias: bool = False,
    prologue: str = "",
    residual: bool = False,
    int8_weight: bool = False,
    keep_s: bool = False,
    pool: PoolSpec | None = None,
    scales_along_input: bool = False,
    a_grad: bool = False,
) -> Cost | None:
    """Cost of ``linear_lora``'s fused kernel (bf16): its own grid (token block, output tile, reduction tile)
    walked step by step, with ``fused_base.step_work``; None when no tiling fits (the op then falls back).

    ``prologue`` ("silu_mul": x is SiLU(gate) * up, two x tiles per step; "norm": RMSNorm's row and
    column factors) and ``residual`` (a [T, N] tile added in the output write): what the kernel takes
    in (``fused_base.Fusion``), its extra operands' traffic walked with the rest. ``int8_weight``: an int8
    per-channel base read as int8 (one byte an element) with its f32 scales per output tile
    (``scales_along_input``: per reduction tile, ``Fusion.weight_in_scale``, the backward's transposed read of
    such a weight, dequantised in VMEM). ``keep_s``: the
    training kernel, which also writes s (``fused_base.linear_lora(keep_s=True)``: its plan and its [bt, R] block).
    ``pool``: the adapters read from a rank-true pool (``linear_lora_pooled``: ``fused_base.pooled_plan``, its
    grid, ``fused_base.pooled_step_work``: each used lane's whole pages at its true rank, int8 at one byte),
    plus the page table and, for an int8 pool, its page scales as the kernel reads them (the whole array or a
    tile per page, ``pages.scale_read_bytes``); ``rank`` is then the pool's ``max_rank``.
    ``a_grad`` (with ``keep_s``): the backward's pass (``linear_lora_backward``), which also takes A's gradient: its
    plan, the rows' [R, bt] and codes' [1, bt] blocks, one [R, bt] x [bt, tk] product per adapter of a block at each
    reduction step of its first output tile, and the f32 [L, R, K] gradient written once.
    """
    import jax.numpy as jnp

    from torch_xla_lora.kernels import fused_base, pages, visits

    dtype, itemsize = jnp.bfloat16, 2
    num_tokens = len(indices)
    scales = {"weight_in_scale" if scales_along_input else "weight_scale": int8_weight}
    fusion = dataclasses.replace(kernel_fusion(prologue, residual), **scales)
    if pool is None:
        planned = fused_base.plan(
            num_tokens, hidden, out_dim, rank, num_slots, dtype, chip.generation, has_bias, fusion, keep_s, a_grad
        )
    else:
        planned = fused_base.pooled_plan(
            num_tokens, hidden, out_dim, rank, num_slots, dtype, chip.generation, has_bias, fusion, pool.int8
        )
    if planned is None:
        return None
    sizes, lanes = planned
    padded = np.full(sizes.padded_tokens(num_tokens), -1, np.int32)
    padded[:num_tokens] = np.where((indices >= 0) & (indices < num_slots), indices, -1)
    meta = visits.build_lanes(padded, num_slots, sizes.tokens, lanes, xp=np)
    pooled = None
    if pool is not None:
        scale_rows = pages.padded_scale_rows(pool.rows + 2) if pool.int8 else 0
        pooled = pages.Pooled(rank, pool.int8, num_slots, scale_rows)
    spec = fused_base.grid_spec(
        len(padded), hidden, out_dim, rank, num_slots, dtype, sizes, lanes, layout, has_bias, fusion, keep_s, pooled,
        a_grad,
    )  # fmt: skip
    specs = [*spec.in_specs, *(spec.out_specs if keep_s else [spec.out_specs])]
    # Bytes per element of each spec, in grid_spec's order: the int32 codes, the f32 row scale, an int8 weight
    # and its f32 scales, else bf16.
    widths = [4, itemsize] + [itemsize] * fusion.silu_mul + [4] * fusion.row_scale + [itemsize] * fusion.col_scale
    widths += [1, 4] if int8_weight else [itemsize]
    widths += [itemsize] * (len(specs) - len(widths))
    if a_grad:  # the codes' [1, bt] row, before the two adapter arrays (ANY)
        widths[len(spec.in_specs) - 3] = 4
    last = [None] * len(specs)
    pipelined = manual = page_count = page_tiles = 0
    flops = 0.0
    blocks, tiles, reductions = spec.grid
    per_block = len(meta.slots) // len(meta.chunks)
    pool_ranks = None if pool is None else np.asarray(pool.ranks, np.int64)
    for i in range(blocks):
        for n in range(tiles):
            for k in range(reductions):
                for s, block_spec in enumerate(specs):
                    if block_spec.block_shape is None:  # memory_space=ANY: moved by manual DMAs
                        continue
                    index = tuple(int(v) for v in block_spec.index_map(i, n, k))
                    if index != last[s]:
                        pipelined += math.prod(block_spec.block_shape) * widths[s]
                        last[s] = index
                if pool is None:
                    work = fused_base.step_work(i, n, k, meta, rank, lanes, sizes, reductions, itemsize)
                else:
                    work = fused_base.pooled_step_work(
                        i, n, k, meta, pool_ranks, lanes, sizes, reductions, itemsize, pool.int8
                    )
                hidden_dma, dma, matmuls = work
                if a_grad and n == 0:
                    used = meta.slots[i * per_block : i * per_block + int(meta.chunks[i]) * lanes]
                    matmuls = matmuls + [(rank, sizes.tokens, sizes.hidden)] * int(np.count_nonzero(used >= 0))
                if pool is not None and pool.int8 and n == 0 and k == reductions - 1:
                    # The step's page-scale tiles (pooled_step_work's paged mode): priced once below instead, as
                    # the kernel reads them (the whole array where that is fewer tiles).
                    used = meta.slots[i * per_block : i * per_block + int(meta.chunks[i]) * lanes]
                    used_ranks = [int(pool_ranks[s]) for s in used if s >= 0]
                    page_count += sum(map(pages.pages, used_ranks))
                    block_tiles = sum(map(pages.scale_tiles, used_ranks))
                    page_tiles += block_tiles
                    dma -= 4 * pages.SCALE_TILE_ROWS * block_tiles
                pipelined += hidden_dma  # issued before the base product: shares bandwidth, overlaps compute
                manual += dma
                flops += mxu_flops(matmuls, chip.mxu_width)
    manual += 4 * num_slots * rank * hidden if a_grad else 0  # A's gradient, DMA'd out at the last step
    if pool is not None:
        manual += 4 * (num_slots * pages.pages(rank) + num_slots)  # the page table, built on the host per batch
        manual += pages.scale_read_bytes(page_count, pooled.scale_rows, page_tiles) if pool.int8 else 0
    steps = blocks * tiles * reductions
    return Cost(pipelined, manual, flops, steps, _time(chip, pipelined, manual, flops, steps))


def contiguous_requests(num_tokens: int, num_slots: int, in_use: int) -> np.ndarray:
    """[T] slots of a batch of ``in_use`` requests of equal length, each on its own adapter (spread over
    the L slots), clipped to what T and L allow: the typical prefill batch of the model's tables."""
    used = max(1, min(in_use, num_tokens, num_slots))
    return ((np.arange(num_tokens) * used // num_tokens) * (num_slots // used)).astype(np.int32)


def projection_costs(
    chip: Chip,
    indices: np.ndarray,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    residual_output: bool = False,
    input_share: float = 0.0,
    has_bias: bool = False,
    prologue: str = "",
    residual_in_kernel: bool = False,
    int8_weight: bool = False,
    operands: int | None = None,
    residual_read: bool | None = None,
    pool: PoolSpec | None = None,
) -> dict[str, float]:
    """Seconds of one projection with its LoRA under each formulation a layer can run, and its base.

    - ``base``: XLA's matmul at its roofline, with what XLA fuses into it read there: the residual
      (``residual_output``: the add fused into the dot's output write reads it) and x's producer's
      ``operands`` ([T, in] arrays the fused operand read takes; 2 for SiLU(gate) * up, the default
      when ``prologue`` is "silu_mul", else 1: a norm's input is read in x's place); ``residual_read``
      (default ``residual_output``) says whether the output adds a residual, apart from whether its add
      is charged as a pass;
    - ``fused``: ``linear_lora``'s kernel (:func:`fused_base_cost`; XLA's dot and the separate op where
      no tiling fits);
    - ``separate``: XLA's matmul, then the fused LoRA kernel (:func:`fused_cost`);
    - ``xla_native``: XLA's matmul, then the XLA-native op (:func:`xla_native_cost`).

    A Pallas call (fused, separate) also pays what XLA no longer fuses around it: with
    ``residual_output`` the residual add after the projection as its own pass (read y, write the
    sum), and ``input_share`` of x's producer as its own pass (x's producer, a norm's scale or
    SiLU(gate) * up, fuses into XLA's operand reads but not into a custom call's; a group of n
    projections reading one x shares the pass, 1/n each; 0 where x is materialised anyway, e.g.
    attention's output): ``operands`` [T, in] arrays more than the fused read (a norm's pass reads
    its input and writes x, the dot then reads x in the input's place; SiLU(gate) * up's reads gate
    and up and writes x, the dot then reads x in place of gate and up). The XLA-native op is XLA's
    own fusions: it pays neither.

    ``prologue`` / ``residual_in_kernel``: the fused kernel takes x's producer / the residual add in
    (``layers/fusion.py`` arranges a Llama-family decoder so): the fused formulation then pays no
    pass for it, and its walk reads the producer's operands (gate and up, or the norm's factors) and
    the residual tile instead (:func:`fused_base_cost`). The separate formulation still pays.

    ``int8_weight``: an int8 per-channel base, its weight at one byte an element in the base matmul and
    in the fused kernel (which reads it as int8).

    ``pool``: the adapters in a rank-true pool, as a pooled layer runs each formulation: fused reads the
    pool's pages (``linear_lora_pooled``, :func:`fused_base_cost` with ``pool``), separate runs
    ``pooled_shrink_expand`` (``pooled_model.pooled_op_seconds``: its kernel, or where that does not run the
    shape its packed XLA ops or the lanes gathered for the slot kernel) and XLA-native is priced
    as the slot op (:func:`xla_native_cost`), whose tiles it reads from the pool instead of slots (a
    prefill's: each visit's lane; a decode's: the used lanes' rows packed 128 to a chunk), every lane at
    ``rank``, the pool's ``max_rank``, in bf16: an upper bound for lower true ranks and int8 pools.
    """
    itemsize = 2
    num_tokens = len(indices)
    bandwidth = chip.hbm_bytes_per_s
    operands = (2 if prologue == "silu_mul" else 1) if operands is None else operands
    producer_pass = input_share * operands * num_tokens * hidden * itemsize / bandwidth
    residual_pass = 2 * num_tokens * out_dim * itemsize / bandwidth if residual_output else 0.0
    unfused = producer_pass + residual_pass
    residual_read = residual_output if residual_read is None else residual_read
    fused_reads = (operands - 1) * num_tokens * hidden + (num_tokens * out_dim if residual_read else 0)
    base = matmul_cost(chip, num_tokens, hidden, out_dim, int8_weight, fused_reads).seconds
    xla_native = xla_native_cost(chip, indices, hidden, out_dim, rank, num_slots)
    if pool is None:
        lora = fused_cost(chip, indices, hidden, out_dim, rank, num_slots).seconds
    else:
        from torch_xla_lora.bench import pooled_model

        lora = pooled_model.pooled_op_seconds(
            chip, indices, pool.ranks, hidden, out_dim, rank, num_slots, pool.int8, pool.rows
        )
    fused = fused_base_cost(
        chip,
        indices,
        hidden,
        out_dim,
        rank,
        num_slots,
        has_bias=has_bias,
        prologue=prologue,
        residual=residual_in_kernel and residual_output,
        int8_weight=int8_weight,
        pool=pool,
    )
    if fused is None:  # XLA's dot and the separate op: nothing is taken in
        fused_seconds = base + lora + unfused
    else:
        fused_seconds = fused.seconds + (0.0 if prologue else producer_pass)
        fused_seconds += 0.0 if residual_in_kernel else residual_pass
    return {
        "base": base,
        "fused": fused_seconds,
        "separate": base + lora + unfused,
        "xla_native": base + xla_native,
    }


# The projections of one Llama-3-8B decoder layer: name -> (in_features, out_features, input group).
# Projections of one group read the same x; "residual" marks outputs XLA adds to the residual stream.
LLAMA3_8B_LAYER = {
    "q_proj": (4096, 4096, "norm1"),
    "k_proj": (4096, 1024, "norm1"),
    "v_proj": (4096, 1024, "norm1"),
    "o_proj": (4096, 4096, "attention"),
    "gate_proj": (4096, 14336, "norm2"),
    "up_proj": (4096, 14336, "norm2"),
    "down_proj": (14336, 4096, "silu_mul"),
}
# Producers XLA fuses into the base matmul's operand read (a norm's scale, SiLU(gate) * up); attention's
# output is a custom call's result, materialised either way. Residual adds XLA fuses into the dot's output.
_FUSABLE_PRODUCERS = ("norm1", "norm2", "silu_mul")
_RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


#: The formulations a layer chooses among, in the order ties are broken (see ``torch_xla_lora/formulation.py``).
FORMULATIONS = ("fused", "separate", "xla_native")


def cheapest(costs: dict[str, float]) -> str:
    """The formulation of least cost among :data:`FORMULATIONS` in :func:`projection_costs`' result."""
    return min(FORMULATIONS, key=costs.get)


def llama_roles() -> dict[str, tuple[bool, float]]:
    """Each Llama-3-8B projection's (residual_output, input_share) for :func:`projection_costs`."""
    groups = [group for _, _, group in LLAMA3_8B_LAYER.values()]
    return {
        name: (name in _RESIDUAL_OUTPUTS, 1 / groups.count(group) if group in _FUSABLE_PRODUCERS else 0.0)
        for name, (_, _, group) in LLAMA3_8B_LAYER.items()
    }


def llama_fused_reads(name: str) -> dict[str, int | bool]:
    """What XLA fuses into a Llama-3-8B projection's base dot, as :func:`projection_costs`' ``operands`` (2 for
    down_proj: SiLU(gate) * up reads gate and up) and ``residual_read`` (o_proj and down_proj add the residual)."""
    return {"operands": 2 if LLAMA3_8B_LAYER[name][2] == "silu_mul" else 1, "residual_read": name in _RESIDUAL_OUTPUTS}


# What ``layers/fusion.py`` has the fused kernel take in, per Llama-family projection: (prologue, residual).
# q/k/v and gate/up read their RMSNorm on the fly (the input and the post-attention norm), o_proj adds the
# attention residual and down_proj reads SiLU(gate) * up and adds the MLP residual in their output writes.
KERNEL_FUSION = {
    "q_proj": ("norm", False),
    "k_proj": ("norm", False),
    "v_proj": ("norm", False),
    "o_proj": ("", True),
    "gate_proj": ("norm", False),
    "up_proj": ("norm", False),
    "down_proj": ("silu_mul", True),
}


def layer_costs(
    chip: Chip,
    indices: np.ndarray,
    rank: int,
    num_slots: int,
    unfused_passes: bool = True,
    kernel_fusion: bool = True,
    int8_weight: bool = False,
    pool: PoolSpec | None = None,
) -> dict:
    """Seconds of one Llama-3-8B decoder layer's projections (bf16) under each formulation.

    Sums :func:`projection_costs` over the seven projections with their roles (:func:`llama_roles`):
    x written once per input group (norm1, norm2, SiLU*up) and the residual add after o and down as
    its own pass for the Pallas formulations. Keys: ``base``, ``fused``, ``separate``, ``xla_native``,
    ``onehot`` (base + the one-hot einsum per projection, all XLA), ``fused_no_adapter`` (the fused
    kernel on a batch without adapters), ``chosen`` (each projection the cheapest of fused, separate
    and XLA-native, as ``base_fusion="auto"`` chooses on TPU: see ``torch_xla_lora/formulation.py``)
    and ``choices`` (projection -> formulation). ``unfused_passes=False`` prices the Pallas formulations
    as if they took x's producer and the residual add in, as XLA's own dot does (what a kernel given
    the decoder layer's structure would cost). ``kernel_fusion``: the projections as
    ``layers/fusion.py`` arranges them (:data:`KERNEL_FUSION`: the input norm into q/k/v's read, the attention
    residual into o_proj's write, the post-attention norm into gate/up's read, SiLU(gate) * up and the residual
    into down_proj's); False prices every Pallas call with its passes (the layer unarranged).
    ``int8_weight``: every projection's base int8 per channel (:func:`projection_costs`); ``pool``: the
    adapters in a rank-true pool (:func:`projection_costs`; the pool's rows per layer as at Llama-3-8B).
    """
    num_tokens = len(indices)
    no_adapter = np.full(num_tokens, -1, np.int32)
    out = dict.fromkeys(("base", "separate", "fused", "onehot", "fused_no_adapter", "xla_native", "chosen"), 0.0)
    choices = {}
    for name, (residual, share) in llama_roles().items():
        if not unfused_passes:
            residual, share = False, 0.0
        hidden, out_dim, _ = LLAMA3_8B_LAYER[name]
        prologue, in_kernel = KERNEL_FUSION.get(name, ("", False)) if kernel_fusion else ("", False)
        fusion = {"prologue": prologue, "residual_in_kernel": in_kernel, "int8_weight": int8_weight, "pool": pool}
        fusion.update(llama_fused_reads(name))
        costs = projection_costs(chip, indices, hidden, out_dim, rank, num_slots, residual, share, **fusion)
        plain = projection_costs(chip, no_adapter, hidden, out_dim, rank, num_slots, residual, share, **fusion)
        for key in ("base", "fused", "separate", "xla_native"):
            out[key] += costs[key]
        out["onehot"] += costs["base"] + onehot_cost(chip, num_tokens, hidden, out_dim, rank, num_slots).seconds
        out["fused_no_adapter"] += plain["fused"]
        choices[name] = cheapest(costs)
        out["chosen"] += costs[choices[name]]
    out["choices"] = choices
    return out


# -- mixture-of-experts expert layers (``bench model --moe``) -------------------------------------------------


def moe_routing(num_tokens: int, experts: int, top_k: int) -> np.ndarray:
    """[T, K] expert ids of a balanced routing: token t's k-th expert is (t * K + k) mod E (K distinct experts,
    every expert ``T * K / E`` rows when E divides T * K). The rows of each expert come from every request."""
    return ((np.arange(num_tokens)[:, None] * top_k + np.arange(top_k)[None, :]) % experts).astype(np.int32)


def moe_sorted_rows(expert_ids: np.ndarray, token_slots: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(group sizes [E], LoRA row index [T * K]) of the routed rows sorted by expert (stable), as the expert
    layer builds them: row index ``slot * E + expert``, negative for a token without adapter."""
    flat = expert_ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    token_of_row = order // expert_ids.shape[1]
    rows = token_slots[token_of_row] * experts + flat[order]
    rows = np.where(token_slots[token_of_row] >= 0, rows, -1).astype(np.int32)
    return np.bincount(flat, minlength=experts), rows


def grouped_matmul_cost(chip: Chip, group_sizes: np.ndarray, in_dim: int, out_dim: int) -> Cost:
    """A grouped matmul at its roofline (bf16): the rows read and written once, each expert with rows reads
    its [in, out] weight once; each group's rows times its weight on the MXU (K and N padded to whole tiles)."""
    itemsize = 2
    rows = int(group_sizes.sum())
    present = int((group_sizes > 0).sum())
    pipelined = itemsize * (rows * in_dim + present * in_dim * out_dim + rows * out_dim)
    flops = mxu_flops([(int(m), in_dim, out_dim) for m in group_sizes if m > 0], chip.mxu_width)
    return Cost(pipelined, 0, flops, 1, max(pipelined / chip.hbm_bytes_per_s, flops / chip.peak_flops))


def separate_lora_cost(
    chip: Chip,
    indices: np.ndarray,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    lane_padded: bool = False,
) -> Cost:
    """The shrink kernel then the expand kernel (bf16), what ``bgmv_shrink_expand`` runs where the fused kernel
    does not (its planner prices it cheaper, a full-D adapter tile beyond VMEM, or widths not multiples of 128
    on slots that are not lane-padded): both kernels' grids walked step by step over the batch's visits
    (``kernels.cost.separate_walk``: output and reduction tiles included). ``lane_padded``: on slots padded to
    whole lane tiles, as the expert layer stores them (x and base padded to their widths first)."""
    return kernel_cost.separate_walk(
        indices, hidden, out_dim, rank, num_slots, "bfloat16", chip.generation, chip, lane_padded
    )


def expert_lora_kernel(num_rows: int, hidden: int, out_dim: int, rank: int, num_slots: int, generation: str) -> str:
    """ "fused" or "separate": what ``bgmv_shrink_expand`` runs on the expert layer's lane-padded slots for
    ``num_rows`` sorted rows and ``num_slots`` (L * E) entries, as the op plans it (``fused.plan_call``: the
    cheaper of the two by the kernels' cost model, where the fused plan fits VMEM)."""
    from torch_xla_lora.kernels import fused

    return (
        "fused"
        if fused.plan_call(num_rows, hidden, out_dim, rank, num_slots, "bfloat16", generation)[2]
        else ("separate")
    )


def expert_lora_cost(chip: Chip, rows: np.ndarray, hidden: int, out_dim: int, rank: int, num_slots: int) -> Cost:
    """``bgmv_shrink_expand`` over the sorted routed rows (row index ``slot * E + expert``, ``num_slots`` = L * E
    entries) on the expert layer's lane-padded slots, with the kernel the op plans (:func:`expert_lora_kernel`):
    the fused kernel's walk (:func:`fused_cost`; at widths that are not multiples of 128, gpt-oss's 2880, it
    DMAs the padded adapter rows and uses the first D / Dout columns in VMEM) or the separate shrink and expand
    on the padded slots (:func:`separate_lora_cost`)."""
    if expert_lora_kernel(len(rows), hidden, out_dim, rank, num_slots, chip.generation) == "fused":
        return fused_cost(chip, rows, hidden, out_dim, rank, num_slots)
    return separate_lora_cost(chip, rows, hidden, out_dim, rank, num_slots, lane_padded=True)


def moe_layer_costs(
    chip: Chip,
    num_tokens: int,
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    rank: int,
    num_slots: int,
    in_use: int,
) -> dict:
    """Seconds of one routed expert layer's matmuls (bf16) for ``num_tokens`` tokens routed top-k
    (:func:`moe_routing`), requests on ``in_use`` adapters (:func:`contiguous_requests`):

    - ``base``: the up ([D -> 2I]) and down ([I -> D]) grouped matmuls (:func:`grouped_matmul_cost`);
    - ``lora``: the expert LoRA of both projections over the sorted rows (:func:`expert_lora_cost`, L * E
      entries), what the layer adds to the base;
    - ``kernels``: (up, down) the kernel the op plans for each projection (:func:`expert_lora_kernel`);
    - ``lora_fused``, ``lora_separate``: the expert LoRA were both projections run by the fused kernel
      (:func:`fused_cost`) or by the separate kernels on the padded slots (:func:`separate_lora_cost`);
    - ``pairs``: the (slot, expert) pairs present, each read once per token block it appears in.
    """
    expert_ids = moe_routing(num_tokens, experts, top_k)
    slots = contiguous_requests(num_tokens, num_slots, in_use)
    group_sizes, rows = moe_sorted_rows(expert_ids, slots, experts)
    entries = num_slots * experts
    projections = ((hidden, 2 * intermediate), (intermediate, hidden))
    base = sum(grouped_matmul_cost(chip, group_sizes, d_in, d_out).seconds for d_in, d_out in projections)
    return {
        "base": base,
        "lora": sum(expert_lora_cost(chip, rows, d_in, d_out, rank, entries).seconds for d_in, d_out in projections),
        "kernels": tuple(
            expert_lora_kernel(len(rows), d_in, d_out, rank, entries, chip.generation) for d_in, d_out in projections
        ),
        "lora_fused": sum(fused_cost(chip, rows, d_in, d_out, rank, entries).seconds for d_in, d_out in projections),
        "lora_separate": sum(
            separate_lora_cost(chip, rows, d_in, d_out, rank, entries, lane_padded=True).seconds
            for d_in, d_out in projections
        ),
        "pairs": len({int(r) for r in rows if r >= 0}),
        "rows": len(rows),
    }
