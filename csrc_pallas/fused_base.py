"""The base matmul and multi-LoRA in one pass: ``out[t] = x[t] @ W^T (+ bias) + scaling * (x[t] @ A[s_t]^T) @ B[s_t]``.

A LoRA op that runs after the base layer re-reads x and reads and re-writes
the base output. This kernel *is* the base layer: it tiles the base matmul
over (token block i, output tile n, reduction tile k), and while the x tiles
of a token block are in VMEM for the block's first output tile (n == 0) it
also accumulates the block's laned shrink, exactly as the fused LoRA kernel
(``fused.py``) does. At the last reduction step of every output tile the
laned expand and the bias are added to the f32 accumulator, and the output
tile is written once. x is read once per block (when the reduction is not
tiled), y is written once, and the LoRA costs only its MXU work and the
adapter tiles of the slots the block uses.

Per token block i (all blocks are visited: the base product is needed everywhere):

- every step (i, n, k): ``acc += x[i, k] . W[n, k]`` (f32 VMEM accumulator);
  W is used in the layout it has: nn.Linear's [out, in] (contracting dim 1 of
  both) or GPT-2 Conv1D's [in, out] (contracting x's dim 1 with W's dim 0);
- at n == 0, for each chunk c of the block's distinct slots (``lanes`` of them
  side by side, from :class:`~.visits.LaneBlocks`): the A tiles ``[:, k-tile]``
  are DMA'd into one [lanes * Rp, tk] VMEM tile and ``x[i, k] @ A_c^T`` is added
  to the rows of the tokens whose slot is in chunk c, in one [bt, lanes * Rp] f32
  scratch tile ``y`` shared by all chunks (a token needs only its own chunk's
  lanes, so the scratch is one tile whatever the slot count); at the last k each
  token keeps only its own lane, scaled and rounded to the adapter dtype (as two
  separate ops would);
- at the last k of every n: ``out = acc + bias + sum_c y[rows of chunk c] @ B_c[:, n-tile]``,
  written once; the B tile's non-finite values are selected out and the tokens
  of a lane that held one get NaN (``fused.finite_lanes``), so a tenant whose
  weights diverged poisons no other lane's tokens through 0 * Inf.

A block whose tokens use no adapter has 0 chunks: it does the base work only.

Every step works in row chunks of the token block (:func:`row_chunk`, at most :data:`ROW_CHUNK`
rows): the base product of a chunk is added to its rows of the accumulator (at the last k with the
write's scales, bias and residual), the shrink and the expand take the same chunks, so the f32
values Mosaic keeps in VMEM are [rows, tn] whatever the block's height (:func:`vmem_bytes`).

What XLA fuses into its own dot and cannot fuse into a custom call, the kernel takes in
(:class:`Fusion`): x's producer on every x tile's read (``SiLU(gate) * up`` from two input
tiles, RMSNorm's per-row and per-column scales), which both the base product and the shrink
read, and the residual add in the output tile's single write.

An int8 base (per-output-channel symmetric quantization, ``W = q * s[:, None]``) is read as
int8: ``x W^T = (x q^T) * s``, so each int8 weight tile is converted to x's dtype in VMEM (exact:
|q| <= 127 fits bf16's mantissa) :data:`WEIGHT_CHUNK` output columns at a time, each chunk's
product taken before the next is converted (only one chunk's copies sit beside the int8 tile), the
base product accumulates in f32 as for a float weight, and the output tile's f32 scales multiply
the accumulator at the last reduction step, before the bias and the LoRA are added
(``Fusion.weight_scale``). The weight's HBM bytes halve against bf16.

Pooled adapters (``linear_lora(..., page_table=)``): A and B are rank-row pools ``[P + 2, K]`` /
``[P + 2, N]`` (bf16 or int8) read through the batch's page table (a fourth scalar-prefetch array). Per
lane of a chunk the kernel DMAs the lane's true-rank pages (:mod:`.pages`; a tail page's aligned page)
instead of its slot's tile, selects out every row that is not the lane's own (past its rank, other
adapters' rows of a shared tail page) from the shrink's sum at the last k and from the B tile before
``finite_lanes``, and for int8 pools stages each page as int8, converts it in VMEM and multiplies each
shrink channel by its row's ``a_scale * b_scale`` (the pool's page scales). The adapter bytes then follow
the true ranks of the batch's adapters (:func:`pooled_cost_estimate`, :func:`pooled_step_work`,
:func:`modelled_seconds` with ``ranks``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import tuning
from .block_sizes import LANE, BlockSizes, known, typical_adapters
from .fused import finite_lanes, lanes_for, poison_own_lane, rank_stride
from .pages import (
    PAGE_ROWS,
    SCALE_TILE_ROWS,
    PageTable,
    Pooled,
    choose_scale_mode,
    convert_pages,
    for_lane_pages,
    lane_page_target,
    lane_rows,
    page_copy,
    pages,
    pool_rows_read,
    row_scales,
    scale_buffer_rows,
    scale_tile_step,
    scale_tiles,
    table_read_bytes,
)
from .visits import LaneBlocks, max_chunks

#: Weight layouts: nn.Linear's [out, in] and transformers' Conv1D [in, out].
LAYOUTS = ("out_in", "in_out")

#: Rows of the token block the kernel computes at a time (its f32 values are [ROW_CHUNK, tile]), and
#: columns of the B tile whose non-finite values are selected out at a time.
ROW_CHUNK = 256
COLUMN_CHUNK = 512
#: Output columns of an int8 weight tile converted to x's dtype at a time (their f32 and x-dtype copies are
#: the only ones alive): a multiple of the int8 (32, 128) tile on either layout's sliced dim.
WEIGHT_CHUNK = 256
#: Rows whose x prologue (f32 values [rows, tk]) is computed at a time, within a row chunk.
PROLOGUE_CHUNK = 64


def prologue_chunk(rows: int) -> int:
    """Rows of a row chunk of ``rows`` whose x prologue (:class:`Fusion`) the kernel computes at a time: at
    most :data:`PROLOGUE_CHUNK`, and a quarter of the chunk down to 8 rows."""
    return row_chunk(rows, min(PROLOGUE_CHUNK, max(8, rows // 4)))


def row_chunk(tokens: int, largest: int = ROW_CHUNK) -> int:
    """Rows of a token block of ``tokens`` the kernel takes at a time: the largest divisor of the block
    up to ``largest`` that is a multiple of 8 (the whole block when it is at most ``largest``)."""
    if tokens <= largest:
        return tokens
    return max(r for r in range(8, largest + 1, 8) if tokens % r == 0)


@dataclasses.dataclass(frozen=True)
class Fusion:
    """What the kernel takes in from around the layer: x's producer on its read, the residual on its write.

    In the order applied to every x tile (the base product and the LoRA's shrink both read the result,
    as PEFT applies the LoRA to the projection's input):

    - ``silu_mul``: x is ``SiLU(gate) * up`` of two [T, K] operands (a Llama MLP's down projection
      reading its gate and up projections' outputs); SiLU is rounded to x's dtype, then the product;
    - ``row_scale``: x times a float32 [T] factor per row, rounded to x's dtype (RMSNorm's
      ``rsqrt(mean(x^2) + eps)``, computed outside: one [T] vector);
    - ``col_scale``: x times a [K] factor per column in x's dtype, rounded (RMSNorm's weight);
    - ``residual``: a [T, N] operand added to the f32 output tile before its single rounding;
    - ``weight_scale``: the weight is int8 with a float32 [N] scale per output channel, multiplied
      into the f32 base product before the bias, the residual and the LoRA are added;
    - ``weight_in_scale``: the weight is int8 with a float32 [K] scale per *input* channel (the
      contraction's), as a per-output-channel int8 weight is when its transpose is read (the backward's
      ``dy W``, ``layout`` swapped): each chunk of the weight tile is dequantised as it is converted in
      VMEM (``q * scale`` rounded to x's dtype), the LoRA untouched. Not with ``weight_scale``.
    """

    silu_mul: bool = False
    row_scale: bool = False
    col_scale: bool = False
    residual: bool = False
    weight_scale: bool = False
    weight_in_scale: bool = False

    def __post_init__(self) -> None:
        if self.weight_scale and self.weight_in_scale:
            raise ValueError("an int8 weight is scaled per output channel or per input channel, not both")

    @property
    def prologue(self) -> bool:
        return self.silu_mul or self.row_scale or self.col_scale

    @property
    def int8(self) -> bool:
        """Whether the weight is int8 (either scale)."""
        return self.weight_scale or self.weight_in_scale


#: No prologue, no epilogue: the plain linear layer.
NO_FUSION = Fusion()


def keeps_x(fusion: Fusion, keep_s: bool) -> bool:
    """Whether the training kernel (``keep_s``) also writes x, its producer's output, as it read it (a third
    output, [T, K]): with a prologue the backward's dA then reads it instead of recomputing it. The write is
    pipelined, once per x tile (at the token block's first output tile), under the kernel's MXU work."""
    return keep_s and fusion.prologue


def apply_prologue(x, up, row, col, fusion: Fusion):
    """x's producer as :class:`Fusion` defines it, on a tile or a whole array (kernel and XLA-native alike)."""
    dtype = x.dtype
    if fusion.silu_mul:
        gate = x.astype(jnp.float32)
        x = (gate * jax.nn.sigmoid(gate)).astype(dtype)
        x = (x.astype(jnp.float32) * up.astype(jnp.float32)).astype(dtype)
    if fusion.row_scale:
        x = (x.astype(jnp.float32) * row.astype(jnp.float32)).astype(dtype)
    if fusion.col_scale:
        x = (x.astype(jnp.float32) * col.astype(jnp.float32)).astype(dtype)
    return x


def vmem_limit(generation: str) -> int:
    """The scoped VMEM limit (bytes) this kernel declares on ``generation``."""
    return tuning.BASE_VMEM_LIMIT_BYTES[known(generation)]


def token_block(num_tokens: int, generation: str) -> int:
    """The token block of the fused base kernel for ``num_tokens`` tokens (see tuning.BASE_TOKEN_BLOCKS)."""
    table = tuning.BASE_TOKEN_BLOCKS[known(generation)]
    for max_tokens, block in table:
        if max_tokens is None or num_tokens <= max_tokens:
            return block
    return table[-1][1]


def vmem_bytes(
    sizes: BlockSizes,
    rank: int,
    num_slots: int,
    lanes: int,
    dtype,
    has_bias: bool = True,
    fusion: Fusion = NO_FUSION,
    keep_s: bool = False,
    a_grad_width: int = 0,
) -> int:
    """VMEM of one configuration, an upper bound of what libtpu allocates for the kernel.

    Every pipelined block double-buffered, at its VMEM footprint: a [bt, 1] column (the token codes, the
    row scale) fills whole 128-lane rows, a [1, d] row (bias, scales) a whole (32 bytes, d) tile; the
    scratch (the adapter tiles, the base accumulator, the laned shrink: one [bt, lanes * Rp] f32 tile
    whatever ``num_slots`` is, each token's sum kept in its own chunk's lanes; x's transformed tile with a
    prologue); and the values of one row chunk (:func:`row_chunk`): two f32 [rows, tn] (the product
    and the sum being written), with a prologue two f32 [:func:`prologue_chunk` rows, tk], three of the
    shrink's [rows, lanes * Rp] (the product, the sum, the rows of the chunk selected) and
    the B tile's f32 copies while its non-finite values are selected out. An int8 weight tile is
    converted :data:`WEIGHT_CHUNK` output columns at a time (one chunk's f32 and x-dtype copies).
    ``keep_s``: the [bt, R] block of the kept shrink ``s`` (its rows filling whole 128-lane rows) and one
    f32 [rows, R] value of it; with a prologue (:func:`keeps_x`) x's transformed tile is an output block, not
    scratch. ``a_grad_width``: K, the width of A's gradient (0: none), kept resident as f32
    [L, R, K] in VMEM; with it the [R, bt] block of the rows it is taken against and its [1, bt] token codes,
    and one lane's values (x's block and those rows with other lanes' tokens selected out, their f32 [R, tk]
    product and its sum).
    """
    itemsize = jnp.dtype(dtype).itemsize
    bt, tk, tn = sizes.tokens, sizes.hidden, sizes.out
    rows = row_chunk(bt)
    width = lanes * rank_stride(rank, dtype)
    column, row = bt * LANE * 4, 32  # a [bt, 1] 32-bit column; bytes per element of a [1, d] row
    block = column + bt * tk * itemsize * (2 if fusion.silu_mul else 1) + bt * tn * itemsize  # codes, x, out
    block += tk * tn * (1 if fusion.int8 else itemsize) + row * tn * (fusion.weight_scale + has_bias)
    block += (column if fusion.row_scale else 0) + (row * tk if fusion.col_scale else 0)
    block += tk * LANE * 4 if fusion.weight_in_scale else 0  # a [tk, 1] column ("in_out"; a [1, tk] row is less)
    block += bt * tn * itemsize if fusion.residual else 0
    scratch = width * (tk + tn) * itemsize + (bt * width + bt * tn) * 4  # one shrink tile for every chunk
    scratch += bt * tk * itemsize if fusion.prologue and not keeps_x(fusion, keep_s) else 0
    block += bt * tk * itemsize if keeps_x(fusion, keep_s) else 0
    values = 2 * rows * tn * 4 + 3 * rows * width * 4 + 3 * width * min(tn, COLUMN_CHUNK) * 4
    values += 2 * prologue_chunk(rows) * tk * 4 if fusion.prologue else 0
    values += tk * min(tn, WEIGHT_CHUNK) * (4 + itemsize) if fusion.int8 else 0
    if keep_s:  # s's output block, its last dim padded to whole lanes, and its sum over the lanes
        block += bt * -(-rank // LANE) * LANE * itemsize
        values += rows * -(-rank // LANE) * LANE * 4
    if a_grad_width:
        sublanes = -(-rank // 16) * 16
        block += sublanes * bt * itemsize + row * bt
        scratch += num_slots * -(-rank // 8) * 8 * a_grad_width * 4
        values += bt * tk * itemsize + sublanes * bt * itemsize + 2 * sublanes * tk * 4
    return 2 * block + scratch + values


def _divisor_tiles(dim: int, largest: int) -> list[int]:
    """The dim itself when it fits, then its lane-aligned divisors up to ``largest``, widest first."""
    tiles = [dim] if dim <= largest else []
    tiles += [t for t in range(largest - largest % LANE, 0, -LANE) if t != dim and dim % t == 0]
    return tiles


def hbm_bytes(
    num_tokens: int,
    hidden: int,
    out_dim: int,
    sizes: BlockSizes,
    itemsize: int,
    fusion: Fusion = NO_FUSION,
    kept_rank: int = 0,
    kept_x: bool = False,
) -> int:
    """Pipelined HBM traffic of the base product under ``sizes``: W once per token block, x once per
    output tile unless the reduction is untiled (then once), the output once; with ``fusion``, the
    up operand as often as x, the column scale once per x pass, the row scale and residual once;
    an int8 weight (``fusion.int8``) at one byte an element, its f32 scales once per token block (per
    output channel) or with every x pass (``weight_in_scale``, per input channel);
    ``kept_rank``: the rank of the kept shrink ``s`` (``linear_lora(..., keep_s=True)``), written once
    ([T, R] in x's dtype; 0: not kept); ``kept_x``: x as the prologue made it written once too ([T, K],
    :func:`keeps_x`)."""
    blocks = -(-num_tokens // sizes.tokens)
    x_passes = 1 if sizes.hidden == hidden else out_dim // sizes.out
    x_bytes = num_tokens * hidden * (2 if fusion.silu_mul else 1) + (blocks * hidden if fusion.col_scale else 0)
    extra = (num_tokens * out_dim if fusion.residual else 0) + num_tokens * kept_rank
    extra += num_tokens * hidden if kept_x else 0
    weight_bytes = blocks * hidden * out_dim * (1 if fusion.int8 else itemsize)
    weight_bytes += blocks * out_dim * 4 if fusion.weight_scale else 0
    weight_bytes += x_passes * blocks * hidden * 4 if fusion.weight_in_scale else 0
    return (
        itemsize * (x_passes * x_bytes + num_tokens * out_dim + extra)
        + weight_bytes
        + (4 * num_tokens if fusion.row_scale else 0)
    )


def modelled_seconds(
    num_tokens: int,
    hidden: int,
    out_dim: int,
    rank: int,
    sizes: BlockSizes,
    lanes: int,
    dtype,
    generation: str,
    fusion: Fusion = NO_FUSION,
    block_adapters: int | None = None,
    keep_s: bool = False,
    ranks: tuple[int, ...] | None = None,
    int8_pool: bool = False,
    a_grad_slots: int = 0,
) -> float:
    """Roofline time of the kernel under ``sizes`` on ``generation``, for choosing among tilings and lane counts.

    Pooled (``ranks`` given: the true ranks of a token block's distinct adapters, each block alike; ``rank`` is
    then the page table's R): each adapter's A and B bytes are its whole pages' (:func:`pages.pool_rows_read`),
    at one byte an element for an int8 pool (``int8_pool``), which also reads a 4 KiB scale tile per page
    per block (the paged scale mode, an upper bound of the whole-array mode); ``block_adapters`` is then
    ``len(ranks)``, the first ``lanes`` of them fetched beside the base product and the others exposed.

    ``max(HBM bytes / bandwidth, MXU flops / peak) + exposed DMA / bandwidth + grid steps * step overhead``,
    with the pipelined traffic of :func:`hbm_bytes`, every matmul's contraction and output dims padded to
    whole MXU tiles (a 128-wide reduction tile half-fills v6e's 256-wide MXU), and ``block_adapters``
    distinct adapters per token block (None: ``lanes``, one laned chunk) in ``ceil(block_adapters / lanes)``
    chunks: each chunk's shrink at every reduction tile and expand at every output tile, the first chunk's
    adapter tiles fetched beside the base product's and every later chunk's while the MXU waits (as
    :func:`step_work` has them); ``keep_s``: the kept shrink's [T, R] write counted with the traffic.
    ``a_grad_slots``: L where the kernel also takes A's gradient (0: not): the [T, R] rows and the codes read,
    the f32 [L, R, K] gradient written once, one [R, bt] x [bt, tk] product per adapter of a block at n == 0.
    """
    generation = known(generation)
    width = tuning.MXU_WIDTH[generation]

    def pad(dim: int) -> int:
        return -(-dim // width) * width

    adapters = lanes if block_adapters is None else block_adapters
    adapters = adapters if ranks is None else len(ranks)
    chunks = max(1, -(-adapters // lanes))
    bt, tk, tn = sizes.tokens, sizes.hidden, sizes.out
    rows = sizes.padded_tokens(num_tokens)
    k_tiles, n_tiles = hidden // tk, out_dim // tn
    lane_width = pad(lanes * rank_stride(rank, dtype))
    lora = chunks * lane_width * (k_tiles * pad(tk) + n_tiles * pad(tn))
    flops = 2 * rows * (k_tiles * pad(tk) * n_tiles * pad(tn) + lora)
    itemsize = jnp.dtype(dtype).itemsize
    a_grad_bytes = 0
    if a_grad_slots:
        flops += 2 * rows * rank * k_tiles * pad(tk) * adapters
        a_grad_bytes = rows * (rank * itemsize + 4) + a_grad_slots * rank * hidden * 4
    if ranks is None:
        adapter_bytes = (rows // bt) * rank * (hidden + out_dim) * itemsize  # one adapter's A and B rows per block
        overlapped = min(adapters, lanes) * adapter_bytes
        exposed = max(0, adapters - lanes) * adapter_bytes
    else:  # each adapter's whole pages per block (int8: one byte an element, and its pages' scale tiles)
        per_page = PAGE_ROWS * (hidden + out_dim) * (1 if int8_pool else itemsize)
        tiles = 4 * SCALE_TILE_ROWS if int8_pool else 0
        sizes_ = [(rows // bt) * (pages(r) * per_page + scale_tiles(r) * tiles) for r in ranks]
        overlapped, exposed = sum(sizes_[:lanes]), sum(sizes_[lanes:])
    bandwidth = tuning.HBM_BYTES_PER_S[generation]
    seconds = max(
        (
            hbm_bytes(
                num_tokens, hidden, out_dim, sizes, itemsize, fusion, rank if keep_s else 0, keeps_x(fusion, keep_s)
            )
            + overlapped
        )
        / bandwidth
        + a_grad_bytes / bandwidth,
        flops / tuning.PEAK_FLOPS[generation],
    )
    return seconds + exposed / bandwidth + (rows // bt) * k_tiles * n_tiles * tuning.STEP_OVERHEAD_S


@functools.lru_cache(maxsize=4096)
def plan(
    num_tokens: int,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    dtype,
    generation: str,
    has_bias: bool = True,
    fusion: Fusion = NO_FUSION,
    keep_s: bool = False,
    a_grad: bool = False,
) -> tuple[BlockSizes, int] | None:
    """(BlockSizes(tokens, reduction tile, output tile), lanes), or None when no tiling fits VMEM.

    The one place the kernel's lane count is chosen: the ops, their host metadata, the cost model and
    the compile checks all take the lanes returned here.

    Every tiling (token blocks from :func:`token_block`'s down to 8, tiles that divide their dims) runs
    at the most lanes, up to ``fused.lanes_for``'s, with which it fits the generation's
    :data:`tuning.BASE_VMEM_BUDGET_BYTES` (:func:`widest_lanes`); among them the plan takes the least
    :func:`modelled_seconds`, then the fewest grid steps, then the most lanes. Every tiling is priced
    for a token block that uses as many adapters as ``lanes_for``'s lanes hold (at most the block's
    tokens): one that fits only fewer lanes pays the extra chunks such a block needs, so it wins only
    where the better tiling is worth them (under the earlier 90 MiB budget, 16 lanes' A and shrink tiles at
    rank 16 on v6e pushed the best tiling of Qwen2-7B's down_proj out of VMEM where 15 lanes fit it: the
    plan kept that tiling at 15 lanes). So by this model a token block of at most ``lanes_for``'s adapters
    never costs more than under ``lanes_for``'s lanes (blocks of more pay more chunks at fewer lanes).

    The tiling does not depend on ``num_slots``: it is chosen for ``lanes_for``'s lanes with unbounded
    slots (as many adapters as one MXU pass holds side by side), and ``num_slots`` only caps the lanes
    (a block never holds more distinct adapters than there are slots). A fewer-lane kernel of the same
    tiling needs less VMEM, and every chunk is one MXU pass whatever its lanes, so a batch costs no more
    at a higher slot count: its blocks run as many chunks or fewer, over the same tiles and steps
    (``bench model --slot-sweep``). Choosing the tiling at each slot count's own lanes instead let the
    adapter tiles' VMEM at one more lane push the best tiling out (Llama-3-8B gate_proj at rank 4 on
    v6e: 13 slots tiled (1024, 4096, 3584), 14 slots (1024, 4096, 2048), three more grid steps per block
    for the same batch).
    Minimising HBM traffic alone would pick a 128-wide reduction tile wherever it saves one re-read of
    x, and pay for it in half-empty MXU passes and grid steps.
    ``keep_s``: the plan of the training kernel that also writes the shrink (``linear_lora(..., keep_s=True)``):
    its block counted in VMEM and its write in the traffic. ``a_grad`` (with ``keep_s``): the backward's pass that
    also takes A's gradient against rows it is given (``linear_lora(..., a_grad_rows=)``): its resident
    [L, R, K] f32 gradient in VMEM (so this plan depends on ``num_slots``), token blocks of whole lanes (the rows
    come transposed, [R, bt] blocks; a batch of up to 128 tokens is one block of the whole batch, rounded up to 8)
    and its traffic and products priced. Where the sum does not fit, no plan: the backward then takes ds and dB in
    a pass of its own (``ops/_linear_fused.takes_one_pass_backward``).
    No weight is ever padded per call. On TPU, K and N must be multiples of 128 (the caller falls
    back otherwise).
    """
    if generation != "cpu" and (hidden % LANE or out_dim % LANE):
        return None  # Mosaic slices adapter rows only at lane-aligned widths (libtpu rejects K=1000)
    widest = lanes_for(rank, 1 << 30, dtype, generation)  # one MXU pass of lanes; num_slots only caps them
    max_tile, budget = tuning.BASE_MAX_TILE[known(generation)], tuning.BASE_VMEM_BUDGET_BYTES[known(generation)]
    best = None
    bt = token_block(num_tokens, generation)
    if a_grad and bt % LANE and -(-num_tokens // bt) > 1:
        # The rows' [R, bt] blocks take whole lanes: up to 128 tokens in one block of the whole batch, else whole lanes.
        bt = -(-num_tokens // 8) * 8 if num_tokens <= LANE else -(-bt // LANE) * LANE
    while bt >= 8:
        if a_grad and bt % LANE and -(-num_tokens // bt) > 1:
            bt //= 2  # the rows' [R, bt] blocks: whole lanes, or the whole (padded) batch
            continue
        for tk in _divisor_tiles(hidden, max_tile):
            for tn in _divisor_tiles(out_dim, max_tile):
                sizes = BlockSizes(tokens=bt, hidden=tk, out=tn)
                lanes = widest_lanes(
                    sizes, rank, num_slots, widest, dtype, budget, has_bias, fusion, keep_s, hidden if a_grad else 0
                )
                if not lanes:
                    continue
                adapters = min(widest, bt)
                seconds = modelled_seconds(
                    num_tokens, hidden, out_dim, rank, sizes, lanes, dtype, generation, fusion, adapters, keep_s,
                    a_grad_slots=num_slots if a_grad else 0,
                )  # fmt: skip
                steps = sizes.padded_tokens(num_tokens) // bt * (hidden // tk) * (out_dim // tn)
                key = (seconds, steps, -lanes)
                if best is None or key < best[0]:
                    best = (key, sizes, lanes)
        bt //= 2
    return None if best is None else (best[1], min(best[2], num_slots))


def widest_lanes(
    sizes: BlockSizes,
    rank: int,
    num_slots: int,
    widest: int,
    dtype,
    budget: int,
    has_bias: bool = True,
    fusion: Fusion = NO_FUSION,
    keep_s: bool = False,
    a_grad_width: int = 0,
) -> int:
    """The most lanes, at most ``widest``, with which ``sizes`` fits ``budget`` bytes of VMEM (0: not even one).

    :func:`vmem_bytes` grows with the lanes (the A, B and shrink tiles are ``lanes * Rp`` wide): a bisection.
    """

    def fits(lanes: int) -> bool:
        return vmem_bytes(sizes, rank, num_slots, lanes, dtype, has_bias, fusion, keep_s, a_grad_width) <= budget

    if fits(widest):
        return widest
    low, high = 0, widest  # fits(low) (or low == 0), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def step_work(i: int, n: int, k: int, meta, rank: int, lanes: int, sizes: BlockSizes, num_k: int, itemsize: int):
    """What the kernel body does at grid step (i, n, k), for the cost model:
    (DMA bytes overlapped with the base product, exposed DMA bytes, matmuls).

    Mirrors ``_kernel``: the base product every step; at n == 0 one shrink per
    chunk with its A tiles; at the last k one expand per chunk with its B
    tiles. The first chunk's tiles are fetched during the base product; later
    chunks' wait. Matmuls are (M, K, N) shapes.
    """
    chunks = int(meta.chunks[i])
    per_block = len(meta.slots) // len(meta.chunks)
    used = [int(s) for s in meta.slots[i * per_block : i * per_block + chunks * lanes] if s >= 0]
    first = min(len(used), lanes)
    width = lanes * rank_stride(rank, "float32" if itemsize == 4 else "bfloat16")
    bt, tk, tn = sizes.tokens, sizes.hidden, sizes.out
    overlapped = exposed = 0
    matmuls = [(bt, tk, tn)]
    for applies, tile, shape in ((n == 0, tk, (bt, tk, width)), (k == num_k - 1, tn, (bt, width, tn))):
        if applies:
            overlapped += first * rank * tile * itemsize
            exposed += (len(used) - first) * rank * tile * itemsize
            matmuls += [shape] * chunks
    return overlapped, exposed, matmuls


def pooled_step_work(
    i: int,
    n: int,
    k: int,
    meta,
    ranks,
    lanes: int,
    sizes: BlockSizes,
    num_k: int,
    itemsize: int,
    int8_pool: bool = False,
):
    """:func:`step_work` of the pooled kernel (``linear_lora(..., page_table=)``): (DMA bytes overlapped with the
    base product, exposed DMA bytes, matmuls) at grid step (i, n, k), the DMAs being each used lane's whole
    pages (``ranks``: lane -> true rank; ``itemsize`` the compute dtype's, an int8 pool's rows at one byte),
    and with ``int8_pool`` the scale tile of each of the block's pages at the last k of n == 0 (exposed; the
    paged scale mode). Matmuls are the slot kernel's at the table's rank (``max(ranks)`` lanes wide)."""
    chunks = int(meta.chunks[i])
    per_block = len(meta.slots) // len(meta.chunks)
    used = [int(s) for s in meta.slots[i * per_block : i * per_block + chunks * lanes] if s >= 0]
    width = lanes * rank_stride(max(int(r) for r in ranks), "float32" if itemsize == 4 else "bfloat16")
    row_bytes = 1 if int8_pool else itemsize
    bt, tk, tn = sizes.tokens, sizes.hidden, sizes.out
    first, rest = used[:lanes], used[lanes:]
    overlapped = exposed = 0
    matmuls = [(bt, tk, tn)]
    for applies, tile, shape in ((n == 0, tk, (bt, tk, width)), (k == num_k - 1, tn, (bt, width, tn))):
        if applies:
            overlapped += pool_rows_read(ranks[s] for s in first) * tile * row_bytes
            exposed += pool_rows_read(ranks[s] for s in rest) * tile * row_bytes
            matmuls += [shape] * chunks
    if int8_pool and n == 0 and k == num_k - 1:
        exposed += 4 * SCALE_TILE_ROWS * sum(scale_tiles(int(ranks[s])) for s in used)
    return overlapped, exposed, matmuls


def _kernel(
    chunks_ref,  # SMEM [num_blocks]
    slots_ref,  # SMEM [num_blocks * per_block]
    uniform_ref,  # SMEM [num_blocks]
    *refs,  # [pooled: the page table, SMEM [L * pages(R) + L]], code [bt, 1] int32, x [bt, tk] (the gate with
    # fusion.silu_mul), [up [bt, tk]], [row [bt, 1] f32], [col [1, tk]], w, [in_scale [1, tk] ("out_in") or
    # [tk, 1] ("in_out") f32], [scale [1, tn] f32], [bias [1, tn]],
    # [residual [bt, tn]], [a_grad: the rows u transposed [R, bt], the codes as a row [1, bt]],
    # a_hbm, b_hbm (slots [L, R, K] / [L, R, N], or pools [P + 2, K] / [P + 2, N]), [int8 pools: page scales
    # [S] f32], o_ref, [s_ref [bt, R] with keep_s], [x_out [bt, tk] with keeps_x], [a_grad: dA (ANY) [L, R, K]
    # f32], a_buf, b_buf, y_acc [bt, lanes * stride] f32, acc_ref, [x_buf [bt, tk] with a prologue but not
    # keeps_x: there x_out is x's tile], [int8 pools: page staging
    # [lanes * stride / 8, 8, tk] and [.., 8, tn] int8, the SMEM scale buffer, the scale mode [1] SMEM],
    # [a_grad: dA's resident sum [K / tk, L, R, tk] f32], sem ([2]; int8 pools [3]; a_grad [3])
    lanes: int,
    stride: int,
    per_block: int,
    scaling: float,
    layout: str,
    has_bias: bool,
    fusion: Fusion = NO_FUSION,
    rows: int = 0,
    weight_chunk: int = WEIGHT_CHUNK,
    keep_s: bool = False,
    pooled: Pooled | None = None,
    a_grad: bool = False,
):
    refs = list(refs)
    table = PageTable(refs.pop(0), pooled) if pooled is not None else None
    int8_pool = pooled is not None and pooled.int8
    code_ref, x_ref = refs.pop(0), refs.pop(0)
    up_ref = refs.pop(0) if fusion.silu_mul else None
    row_ref = refs.pop(0) if fusion.row_scale else None
    col_ref = refs.pop(0) if fusion.col_scale else None
    w_ref = refs.pop(0)
    in_scale_ref = refs.pop(0) if fusion.weight_in_scale else None
    scale_ref = refs.pop(0) if fusion.weight_scale else None
    bias_ref = refs.pop(0) if has_bias else None
    res_ref = refs.pop(0) if fusion.residual else None
    ut_ref, code_row_ref = (refs.pop(0), refs.pop(0)) if a_grad else (None, None)
    a_hbm, b_hbm = refs.pop(0), refs.pop(0)
    s_hbm = refs.pop(0) if int8_pool else None
    o_ref = refs.pop(0)
    s_ref = refs.pop(0) if keep_s else None
    # x's transformed tile: the output block of the kept x (written back once per x tile, grid_spec), or scratch.
    x_out = refs.pop(0) if keeps_x(fusion, keep_s) else None
    a_grad_hbm = refs.pop(0) if a_grad else None
    a_grad_acc = refs[-2] if a_grad else None
    a_buf, b_buf, y_acc, acc_ref = refs[:4]
    x_scratch = fusion.prologue and x_out is None
    x_buf = x_out if x_out is not None else refs[4] if x_scratch else None
    if int8_pool:
        a_stage, b_stage, s_buf, mode_ref = refs[4 + x_scratch : 8 + x_scratch]
    sem = refs[-1]
    i, n, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    last_k = pl.num_programs(2) - 1
    num_chunks = chunks_ref[i]
    rank = a_hbm.shape[1] if pooled is None else pooled.rank
    bt, tk, tn = x_ref.shape[0], x_ref.shape[1], o_ref.shape[1]
    rows = rows or bt
    prologue_rows_ = prologue_chunk(rows)

    def over_rows(body, size: int = rows, first=0, count: int = bt):
        """``body(r)`` for each chunk ``r`` (a slice of ``size`` tokens) of the ``count`` rows from ``first``:
        every value the kernel computes is [size, ...], so Mosaic's temporaries are bounded by the chunk,
        not the block."""
        if size == count:
            body(pl.ds(first, count))
            return

        def step(j, carry):
            body(pl.ds(pl.multiple_of(first + j * size, size), size))
            return carry

        jax.lax.fori_loop(0, count // size, step, 0)

    def in_chunk(code, c):
        """Whether each token of a [rows, 1] code column has its slot in chunk ``c``."""
        return (code >= c * lanes) & (code < (c + 1) * lanes)

    def tile_of(index, tile, dim):
        # A tile spanning its dim is the slot's whole [R, dim] array: Mosaic only slices
        # lane-aligned (128) widths.
        if tile == dim:
            return lambda s: s
        return lambda s: (s, slice(None), pl.ds(index * tile, tile))

    def lane_copies(c, source, dest, sem_index, src_index):
        """(slot, DMA) of each lane's tile of chunk c into its rows of ``dest``."""
        copies = []
        for lane in range(lanes):
            slot = slots_ref[i * per_block + c * lanes + lane]
            copy = pltpu.make_async_copy(
                source.at[src_index(jnp.maximum(slot, 0))], dest.at[pl.ds(lane * stride, rank)], sem.at[sem_index]
            )
            copies.append((slot, copy))
        return copies

    def start(copies):
        for slot, copy in copies:
            pl.when(slot >= 0)(copy.start)

    def wait(copies):
        for slot, copy in copies:
            pl.when(slot >= 0)(copy.wait)

    def chunk_slots(c):
        return [slots_ref[i * per_block + c * lanes + lane] for lane in range(lanes)]

    if pooled is None:
        a_copies = functools.partial(
            lane_copies, source=a_hbm, dest=a_buf, sem_index=0, src_index=tile_of(k, tk, a_hbm.shape[2])
        )
        b_copies = functools.partial(
            lane_copies, source=b_hbm, dest=b_buf, sem_index=1, src_index=tile_of(n, tn, b_hbm.shape[2])
        )

        def fetch(c, which: int, step: str) -> None:
            """Start (``step`` "start") or wait for ("wait") the DMAs of chunk c's A (which 0) or B (1) tiles."""
            (start if step == "start" else wait)((a_copies if which == 0 else b_copies)(c))

    else:

        def fetch(c, which: int, step: str) -> None:
            """Chunk c's lanes' true-rank pages of the A (which 0: the k tile's columns) or B (1: the n tile's)
            pools, each the aligned page holding its rows, into the lanes' rows of the buffer (int8: staged, then
            converted once all have arrived); int8 scale tiles follow A's pages where the scales are paged."""
            source, dest = (a_hbm, a_buf) if which == 0 else (b_hbm, b_buf)
            staging = None if not int8_pool else (a_stage if which == 0 else b_stage)
            index, tile_width = (k, tk) if which == 0 else (n, tn)
            columns = slice(None) if tile_width == source.shape[1] else pl.ds(index * tile_width, tile_width)
            slots = chunk_slots(c)

            def page(slot, lane, p):
                target = lane_page_target(dest, staging, lane, stride, p)
                copy = page_copy(source, table.dma_row(slot, p), columns, target, sem.at[which])
                getattr(copy, step)()

            for_lane_pages(table, slots, page, spill=True)
            if step == "wait" and staging is not None:
                convert_pages(table, slots, staging, dest, stride)

        def fetch_scales(c) -> None:
            """(int8, paged scales) chunk c's pages' scale tiles into the SMEM buffer, waited for."""
            slots = chunk_slots(c)
            for step in ("start", "wait"):

                def tile(slot, lane, p, step=step):
                    before = (c > 0, chunk_slots(jnp.maximum(c - 1, 0))[0])
                    scale_tile_step(s_hbm, s_buf, table, slots, slot, lane, p, sem.at[2], step, before)

                @pl.when(mode_ref[0] == 0)
                def _paged():
                    for_lane_pages(table, slots, tile)

        def own_rows_of(c, shape, axis: int):
            return lane_rows(table, chunk_slots(c), stride, shape, axis)

    @pl.when((i == 0) & (n == 0) & (k == 0))
    def _zero_lane_tiles():
        # Lanes a chunk leaves unused keep earlier tiles (non-finite ones too: the expand
        # selects those out, finite_lanes); zero them once so no uninitialised VMEM is read.
        a_buf[...] = jnp.zeros_like(a_buf)
        b_buf[...] = jnp.zeros_like(b_buf)
        if int8_pool:

            def count_pages():  # every block's lanes' pages, as the chunks will read their scale tiles
                def block_pages(block, total):
                    def chunk_pages(c, total):
                        for lane in range(lanes):
                            total += table.pages(slots_ref[block * per_block + c * lanes + lane])
                        return total

                    return jax.lax.fori_loop(0, chunks_ref[block], chunk_pages, total)

                return jax.lax.fori_loop(0, pl.num_programs(0), block_pages, jnp.int32(0))

            choose_scale_mode(pooled, s_hbm, s_buf, mode_ref, sem.at[2], count_pages)

    # The first chunk's adapter tiles are fetched while the MXU runs the base product.
    @pl.when((n == 0) & (num_chunks > 0))
    def _prefetch_a():
        fetch(0, 0, "start")

    @pl.when((k == last_k) & (num_chunks > 0))
    def _prefetch_b():
        fetch(0, 1, "start")

    contract = (((1,), (1,)), ((), ())) if layout == "out_in" else (((1,), (0,)), ((), ()))
    shrinks = (n == 0) & (num_chunks > 0)

    def epilogue(out, r, cols):
        """What the output tile's single write adds to the f32 base product of rows ``r``, columns ``cols``."""
        if scale_ref is not None:  # (x q^T) * s = x (q * s)^T, per output channel
            out = out * scale_ref[:, cols]
        if has_bias:
            out = out + bias_ref[:, cols].astype(jnp.float32)
        if res_ref is not None:  # the residual add, in the output's single write
            out = out + res_ref[r, cols].astype(jnp.float32)
        return out

    def prologue_rows(r):
        x_buf[r, :] = apply_prologue(
            x_ref[r, :],
            None if up_ref is None else up_ref[r, :],
            None if row_ref is None else row_ref[r, :],
            None if col_ref is None else col_ref[...],
            fusion,
        )

    def product_rows(r, cols, w):
        """The base product of rows ``r`` and output columns ``cols`` (``w`` their weight, in x's dtype) added to
        the accumulator; at the last k with the write's epilogue."""
        x = (x_ref if x_buf is None else x_buf)[r, :]
        part = jax.lax.dot_general(x, w, contract, preferred_element_type=jnp.float32)
        total = jnp.where(k == 0, part, acc_ref[r, cols] + part)

        @pl.when(k < last_k)
        def _accumulate():
            acc_ref[r, cols] = total

        @pl.when(k == last_k)
        def _finish():
            out = epilogue(total, r, cols)

            @pl.when(num_chunks == 0)  # a block without adapters: the base tile is the output
            def _write_base():
                o_ref[r, cols] = out.astype(o_ref.dtype)

            @pl.when(num_chunks > 0)
            def _keep_for_expand():
                acc_ref[r, cols] = out

    if not fusion.int8:

        def base_rows(r):
            # x's producer on the read, in chunks of prologue_rows rows (its f32 values are [tk] wide) into
            # x_buf: the base product and the shrink both take the transformed tile.
            if fusion.prologue:
                over_rows(prologue_rows, prologue_rows_, r.start, rows)
            product_rows(r, slice(None), w_ref[...])

        over_rows(base_rows)
    else:
        # int8 weight: converted to x's dtype in VMEM (exact for |q| <= 127; per-output-channel scales come at
        # the write, per-input-channel ones multiply the chunk's f32 copy along its contracted dim before its
        # rounding) weight_chunk output columns at a time, each chunk's product taken over every row chunk before
        # the next chunk is converted: only one chunk's f32 and x-dtype copies are alive. Every output column's
        # product is the same dot over the same k tile as unchunked.
        if fusion.prologue:
            over_rows(prologue_rows, prologue_rows_)
        for col in range(0, tn, weight_chunk):
            width = min(weight_chunk, tn - col)
            cols = slice(None) if width == tn else pl.ds(col, width)
            q = w_ref[cols, :] if layout == "out_in" else w_ref[:, cols]
            w = q.astype(jnp.float32)
            if in_scale_ref is not None:  # [1, tk] along out_in's columns, [tk, 1] along in_out's rows
                w = w * in_scale_ref[...]
            over_rows(functools.partial(product_rows, cols=cols, w=w.astype(x_ref.dtype)))

    x_src = x_ref if x_buf is None else x_buf

    @pl.when(shrinks)
    def _shrink():
        def body(c, carry):
            pl.when(c > 0)(lambda: fetch(c, 0, "start"))
            fetch(c, 0, "wait")

            def shrink_rows(r):
                part = jax.lax.dot_general(
                    x_src[r, :], a_buf[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )
                # Only the rows of chunk c's tokens take it: the others keep their own chunk's sum.
                mine = in_chunk(code_ref[r, :], c)
                y_acc[r, :] = jnp.where(mine, jnp.where(k == 0, part, y_acc[r, :] + part), y_acc[r, :])

            over_rows(shrink_rows)
            if pooled is not None:

                @pl.when(k == last_k)
                def _own_pool_rows():
                    # Channels of rows that are not the lane's own (past its rank, a neighbour's tail rows, stale
                    # values) are selected out of chunk c's tokens' sums; int8: each channel times its row scale.
                    own = own_rows_of(c, (1, lanes * stride), 1)
                    if int8_pool:
                        fetch_scales(c)
                        scales = row_scales(table, chunk_slots(c), stride, lanes * stride, s_buf, mode_ref)

                    def select_rows(r):
                        y = y_acc[r, :]
                        kept = jnp.where(own, y * scales if int8_pool else y, 0.0)
                        y_acc[r, :] = jnp.where(in_chunk(code_ref[r, :], c), kept, y)

                    over_rows(select_rows)

            return carry

        jax.lax.fori_loop(0, num_chunks, body, 0)

        @pl.when(k == last_k)
        def _keep_own_lane():
            column_lane = jax.lax.broadcasted_iota(jnp.int32, (1, lanes * stride), 1) // stride

            def own_rows(r):
                code = code_ref[r, :]
                # The token's lane within its chunk; tokens without adapter (code -1) keep nothing.
                keep = (column_lane == code - jnp.maximum(code, 0) // lanes * lanes) & (code >= 0)
                if lanes == 1:  # a block whose tokens all use one adapter needs no mask
                    keep = keep | (uniform_ref[i] == 1)
                y = jnp.where(keep, y_acc[r, :] * scaling, 0.0)
                y = y.astype(a_buf.dtype).astype(jnp.float32)
                y_acc[r, :] = y
                if s_ref is not None:  # every lane but the token's own is zero: s is the sum of the lanes
                    s = y[:, 0:stride]
                    for lane in range(1, lanes):
                        s = s + y[:, lane * stride : (lane + 1) * stride]
                    s_ref[r, :] = s[:, :rank].astype(s_ref.dtype)

            over_rows(own_rows)

    if s_ref is not None:

        @pl.when((n == 0) & (k == last_k) & (num_chunks == 0))
        def _no_adapter_s():  # a block without adapters keeps a zero s
            s_ref[...] = jnp.zeros_like(s_ref)

    if a_grad:
        _take_a_grad(
            a_grad_acc, a_grad_hbm, x_src, code_ref, ut_ref, code_row_ref, slots_ref, i, k, num_chunks, lanes,
            per_block, sem.at[2],
        )  # fmt: skip

    @pl.when((k == last_k) & (num_chunks > 0))
    def _expand():
        def body(c, carry):
            pl.when(c > 0)(lambda: fetch(c, 1, "start"))
            fetch(c, 1, "wait")
            # Non-finite values selected out of the tile in place, column chunk by column chunk (pooled: rows
            # that are not a lane's own first, so that only its own rows' values poison its tokens).
            own = None if pooled is None else own_rows_of(c, (lanes * stride, 1), 0)
            poisoned = jnp.zeros((1, lanes * stride), jnp.bool_)
            for col in range(0, tn, COLUMN_CHUNK):
                cols = pl.ds(col, min(COLUMN_CHUNK, tn - col))
                tile = b_buf[:, cols]
                if own is not None:
                    tile = jnp.where(own, tile.astype(jnp.float32), 0.0).astype(tile.dtype)
                clean, hit = finite_lanes(tile, lanes, stride)
                b_buf[:, cols] = clean
                poisoned = poisoned | hit

            def expand_rows(r):
                code = code_ref[r, :]
                y = jnp.where(in_chunk(code, c), y_acc[r, :], 0.0)  # the other chunks' tokens add nothing
                y = poison_own_lane(y, code, c * lanes, poisoned, stride)
                out = acc_ref[r, :] + jnp.dot(y.astype(b_buf.dtype), b_buf[...], preferred_element_type=jnp.float32)

                @pl.when(c < num_chunks - 1)
                def _more_chunks():
                    acc_ref[r, :] = out

                @pl.when(c == num_chunks - 1)
                def _write():
                    o_ref[r, :] = out.astype(o_ref.dtype)

            over_rows(expand_rows)
            return carry

        jax.lax.fori_loop(0, num_chunks, body, 0)


def _take_a_grad(
    acc, out_hbm, x_src, code_ref, ut_ref, code_row_ref, slots_ref, i, k, num_chunks, lanes, per_block, sem
):
    """A's gradient against the rows u: ``dA[l] += sum_{t of block i on slot l} outer(u[t], x[t])`` for the k tile,
    at n == 0 (the steps that read every k tile of the block), into the resident f32 sum ``acc`` [K / tk, L, R, tk];
    written to ``out_hbm`` [L, R, K] at the grid's last step. Per lane of each chunk, the tokens of other lanes are
    selected out of both operands (not multiplied by zero: a non-finite row of another tenant stays out of this
    slot's sum), then one [R, bt] x [bt, tk] product."""
    n = pl.program_id(1)

    @pl.when((i == 0) & (n == 0) & (k == 0))
    def _zero():
        acc[...] = jnp.zeros_like(acc)

    @pl.when((n == 0) & (num_chunks > 0))
    def _accumulate():
        def body(c, carry):
            for lane in range(lanes):
                slot = slots_ref[i * per_block + c * lanes + lane]
                code = c * lanes + lane

                @pl.when(slot >= 0)
                def _lane(slot=slot, code=code):
                    x = jnp.where(code_ref[...] == code, x_src[...], jnp.zeros((), x_src.dtype))
                    u = jnp.where(code_row_ref[...] == code, ut_ref[...], jnp.zeros((), ut_ref.dtype))
                    product = jnp.dot(u.astype(x.dtype), x, preferred_element_type=jnp.float32)
                    acc[k, pl.ds(slot, 1)] += product[None]

            return carry

        jax.lax.fori_loop(0, num_chunks, body, 0)

    last = (i == pl.num_programs(0) - 1) & (n == pl.num_programs(1) - 1) & (k == pl.num_programs(2) - 1)

    @pl.when(last)
    def _write():
        tiles, tk = acc.shape[0], acc.shape[3]
        copies = [
            pltpu.make_async_copy(acc.at[j], out_hbm if tiles == 1 else out_hbm.at[:, :, pl.ds(j * tk, tk)], sem)
            for j in range(tiles)
        ]
        for copy in copies:
            copy.start()
        for copy in copies:
            copy.wait()


def grid_spec(
    num_tokens: int,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    dtype,
    sizes: BlockSizes,
    lanes: int,
    layout: str,
    has_bias: bool,
    fusion: Fusion = NO_FUSION,
    keep_s: bool = False,
    pooled: Pooled | None = None,
    a_grad: bool = False,
) -> pltpu.PrefetchScalarGridSpec:
    """The kernel's grid ``(token blocks, output tiles, reduction tiles)`` and BlockSpecs (read by the cost model);
    ``keep_s``: a second output, the [bt, R] block of the shrink per token block; with a prologue a third, x's
    [bt, tk] tiles (:func:`keeps_x`). ``pooled``: A and B are pools
    read through the page table (a fourth scalar-prefetch array); int8 pools add the page-scale array (ANY),
    the int8 page staging buffers, the SMEM scale buffer and mode, and a third DMA semaphore. ``a_grad`` (with
    ``keep_s``): the rows A's gradient is taken against, transposed ([R, bt] blocks) with the codes as a row, a
    third output [L, R, K] f32 (ANY, written by hand once), its resident sum and a third DMA semaphore."""
    bt, tk, tn = sizes.tokens, sizes.hidden, sizes.out
    stride = rank_stride(rank, dtype)
    width = lanes * stride
    weight = pl.BlockSpec((tn, tk), lambda i, n, k, *_: (n, k))
    if layout == "in_out":
        weight = pl.BlockSpec((tk, tn), lambda i, n, k, *_: (k, n))
    x_tile = pl.BlockSpec((bt, tk), lambda i, n, k, *_: (i, k))
    in_specs = [pl.BlockSpec((bt, 1), lambda i, n, k, *_: (i, 0)), x_tile]
    if fusion.silu_mul:
        in_specs.append(x_tile)  # up, beside the gate
    if fusion.row_scale:
        in_specs.append(pl.BlockSpec((bt, 1), lambda i, n, k, *_: (i, 0)))
    if fusion.col_scale:
        in_specs.append(pl.BlockSpec((1, tk), lambda i, n, k, *_: (0, k)))
    in_specs.append(weight)
    if fusion.weight_in_scale:  # along the weight tile's contracted dim: its columns (out_in) or rows (in_out)
        if layout == "out_in":
            in_specs.append(pl.BlockSpec((1, tk), lambda i, n, k, *_: (0, k)))
        else:
            in_specs.append(pl.BlockSpec((tk, 1), lambda i, n, k, *_: (k, 0)))
    if fusion.weight_scale:
        in_specs.append(pl.BlockSpec((1, tn), lambda i, n, k, *_: (0, n)))
    if has_bias:
        in_specs.append(pl.BlockSpec((1, tn), lambda i, n, k, *_: (0, n)))
    if fusion.residual:
        in_specs.append(pl.BlockSpec((bt, tn), lambda i, n, k, *_: (i, n)))
    if a_grad:  # read at n == 0; the same block over the token block's steps
        in_specs += [pl.BlockSpec((rank, bt), lambda i, n, k, *_: (0, i))]
        in_specs += [pl.BlockSpec((1, bt), lambda i, n, k, *_: (0, i))]
    in_specs += [pl.BlockSpec(memory_space=pltpu.ANY), pl.BlockSpec(memory_space=pltpu.ANY)]
    int8_pool = pooled is not None and pooled.int8
    if int8_pool:
        in_specs.append(pl.BlockSpec(memory_space=pltpu.ANY))  # the page scales, DMA'd by hand
    out_specs = pl.BlockSpec((bt, tn), lambda i, n, k, *_: (i, n))
    if keep_s:  # written at n == 0 and the last k, kept in VMEM over the block's other steps
        out_specs = [out_specs, pl.BlockSpec((bt, rank), lambda i, n, k, *_: (i, 0))]
    if keeps_x(fusion, keep_s):
        # x's tiles as the prologue makes them, at the first output tile's steps (n == 0); the later output tiles
        # stay on the block's last x tile, which they rewrite with the same values, so each tile is written back
        # once (and the last once more, when the token block ends).
        last_k = hidden // tk - 1
        out_specs.append(pl.BlockSpec((bt, tk), lambda i, n, k, *_: (i, jnp.where(n == 0, k, last_k))))
    a_grad_sum = []
    if a_grad:  # A's gradient, resident in VMEM over the whole grid, DMA'd out at its last step
        out_specs.append(pl.BlockSpec(memory_space=pltpu.ANY))
        a_grad_sum = [pltpu.VMEM((hidden // tk, num_slots, rank, tk), jnp.float32)]
    staging = []
    if int8_pool:  # each lane's pages staged as int8, then converted into the A and B tiles
        staging = [
            pltpu.VMEM((width // PAGE_ROWS, PAGE_ROWS, tk), jnp.int8),
            pltpu.VMEM((width // PAGE_ROWS, PAGE_ROWS, tn), jnp.int8),
            pltpu.SMEM((scale_buffer_rows(pooled, lanes),), jnp.float32),
            pltpu.SMEM((1,), jnp.int32),
        ]
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3 if pooled is None else 4,
        grid=(num_tokens // bt, out_dim // tn, hidden // tk),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((width, tk), dtype),
            pltpu.VMEM((width, tn), dtype),
            pltpu.VMEM((bt, width), jnp.float32),  # the shrink of every token, in its own chunk's lanes
            pltpu.VMEM((bt, tn), jnp.float32),
            # x's transformed tile, for the shrink (the kept x's output block where keeps_x)
            *([pltpu.VMEM((bt, tk), dtype)] if fusion.prologue and not keeps_x(fusion, keep_s) else []),
            *staging,
            *a_grad_sum,
            pltpu.SemaphoreType.DMA((3 if int8_pool or a_grad else 2,)),
        ],
    )


def cost_estimate(
    num_tokens: int,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    dtype,
    block_sizes: BlockSizes,
    lanes: int,
    fusion: Fusion = NO_FUSION,
    keep_s: bool = False,
    a_grad: bool = False,
) -> pl.CostEstimate:
    """Typical cost for XLA's scheduler: the base matmul, plus one laned chunk per token block.

    Like :func:`fused.cost_estimate` for the LoRA part (blocks with more distinct adapters than
    lanes cost one more pass each; blocks without adapters none). Bytes count x once per output
    tile unless the reduction is untiled, W once per token block, the output once
    (:func:`hbm_bytes`, with the kept shrink's [T, R] when ``keep_s``), and the A and B rows of ``lanes``
    adapters per block (at most L). ``a_grad``: A's gradient too, each token's [R] x [K] outer product, its
    rows and codes read and the f32 [L, R, K] written once.
    """
    itemsize = jnp.dtype(dtype).itemsize
    width = lanes * rank_stride(rank, dtype)
    adapters = typical_adapters(num_tokens, num_slots, block_sizes.tokens, lanes)
    a_grad_flops = 2 * num_tokens * rank * hidden if a_grad else 0
    a_grad_bytes = num_tokens * (rank * itemsize + 4) + num_slots * rank * hidden * 4 if a_grad else 0
    return pl.CostEstimate(
        flops=2 * num_tokens * (hidden * out_dim + width * (hidden + out_dim)) + a_grad_flops,
        transcendentals=num_tokens * hidden if fusion.silu_mul else 0,
        bytes_accessed=hbm_bytes(
            num_tokens, hidden, out_dim, block_sizes, itemsize, fusion, rank if keep_s else 0, keeps_x(fusion, keep_s)
        )
        + 4 * num_tokens
        + adapters * rank * (hidden + out_dim) * itemsize
        + a_grad_bytes,
    )


def pooled_vmem_bytes(
    sizes: BlockSizes,
    rank: int,
    num_slots: int,
    lanes: int,
    dtype,
    has_bias: bool = True,
    fusion: Fusion = NO_FUSION,
    int8_pool: bool = False,
) -> int:
    """VMEM of the pooled kernel: :func:`vmem_bytes`, plus the B tile's copy its own-rows mask makes (f32, a
    column chunk) and, for int8 pools, the int8 page staging of the A and B tiles and an f32 page being converted."""
    width = lanes * rank_stride(rank, dtype)
    extra = width * min(sizes.out, COLUMN_CHUNK) * 4
    if int8_pool:
        extra += width * (sizes.hidden + sizes.out) + PAGE_ROWS * max(sizes.hidden, sizes.out) * 4
    return vmem_bytes(sizes, rank, num_slots, lanes, dtype, has_bias, fusion) + extra


def pooled_plan(
    num_tokens: int,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    dtype,
    generation: str,
    has_bias: bool = True,
    fusion: Fusion = NO_FUSION,
    int8_pool: bool = False,
) -> tuple[BlockSizes, int] | None:
    """The pooled kernel's (BlockSizes, lanes): :func:`plan`'s for the slots the pool stands for (so the batch's
    host metadata serves both), or None where that plan's :func:`pooled_vmem_bytes` exceeds the generation's
    VMEM limit or no plan exists (the caller then gathers the lanes into slots)."""
    planned = plan(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation, has_bias, fusion)
    if planned is None:
        return None
    sizes, lanes = planned
    if pooled_vmem_bytes(sizes, rank, num_slots, lanes, dtype, has_bias, fusion, int8_pool) > vmem_limit(generation):
        return None
    return planned


def pooled_cost_estimate(
    num_tokens: int,
    hidden: int,
    out_dim: int,
    ranks: tuple[int, ...],
    table_rank: int,
    dtype,
    block_sizes: BlockSizes,
    lanes: int,
    fusion: Fusion = NO_FUSION,
    pooled: Pooled | None = None,
) -> pl.CostEstimate:
    """:func:`cost_estimate` of the pooled kernel: the base traffic (:func:`hbm_bytes`) and the adapter bytes of
    ``ranks`` (a typical block's distinct adapters) at their whole pages, int8 rows at one byte an element,
    plus the page table and an int8 pool's page scales as the kernel reads them (:func:`pages.scale_read_bytes`).
    Flops: the base matmul and one laned pass per chunk of ``lanes`` of them (at the table's rank)."""
    itemsize = jnp.dtype(dtype).itemsize
    int8_pool = pooled is not None and pooled.int8
    width = lanes * rank_stride(table_rank, dtype)
    chunks = max(1, -(-len(ranks) // lanes))
    table_size = pooled.num_slots * (pages(table_rank) + 1) if pooled is not None else 0
    tables = table_read_bytes(table_size, ranks, pooled.scale_rows if int8_pool else 0)
    return pl.CostEstimate(
        flops=2 * num_tokens * (hidden * out_dim + chunks * width * (hidden + out_dim)),
        transcendentals=num_tokens * hidden if fusion.silu_mul else 0,
        bytes_accessed=hbm_bytes(num_tokens, hidden, out_dim, block_sizes, itemsize, fusion)
        + 4 * num_tokens
        + pool_rows_read(ranks) * (hidden + out_dim) * (1 if int8_pool else itemsize)
        + tables,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "scaling",
        "block_sizes",
        "lanes",
        "layout",
        "interpret",
        "vmem_limit_bytes",
        "row_chunk_rows",
        "weight_chunk_cols",
        "keep_s",
        "pool_rank",
        "typical_ranks",
    ),
)
def linear_lora(
    x: jax.Array,  # [T_pad, K]
    weight: jax.Array,  # [N, K] (out_in) or [K, N] (in_out)
    bias: jax.Array | None,  # [N] or None
    lora_a: jax.Array,  # [L, R, K]
    lora_b: jax.Array,  # [L, R, N]
    meta: LaneBlocks,
    *,
    scaling: float,
    block_sizes: BlockSizes,
    lanes: int,
    layout: str,
    interpret: bool,
    vmem_limit_bytes: int | None = None,
    up: jax.Array | None = None,  # [T_pad, K]: x is SiLU(x) * up
    row_scale: jax.Array | None = None,  # [T_pad] float32
    col_scale: jax.Array | None = None,  # [K]
    residual: jax.Array | None = None,  # [T_pad, N]
    weight_scale: jax.Array | None = None,  # [N] float32: weight is int8, W = weight * weight_scale per channel
    weight_in_scale: jax.Array | None = None,  # [K] float32: weight is int8, W = weight * weight_in_scale along K
    row_chunk_rows: int = ROW_CHUNK,
    weight_chunk_cols: int = WEIGHT_CHUNK,
    keep_s: bool = False,
    page_table: jax.Array | None = None,  # pooled: [L * pages(R) + L] int32 (lora_a, lora_b are then pools)
    page_scales: jax.Array | None = None,  # int8 pools: [S] f32, a_scale * b_scale of each row, whole 1024-row tiles
    pool_rank: int = 0,  # pooled: R, the page table's rank
    typical_ranks: tuple[int, ...] | None = None,  # pooled: a block's distinct adapters' ranks, for the estimate
    a_grad_rows: jax.Array | None = None,  # [T_pad, R], with keep_s: also return A's gradient against these rows
) -> jax.Array | tuple[jax.Array, ...]:  # [T_pad, N], x.dtype (and s [T_pad, R] with keep_s; x; dA)
    """The fused base + LoRA kernel over prepared lane metadata; T_pad a multiple of the token block.

    ``vmem_limit_bytes``: the scoped VMEM limit of the generation ``plan`` used
    (None: the v5e/v6e figure, ``tuning.BASE_VMEM_LIMIT_BYTES["v6e"]``).
    ``up``, ``row_scale``, ``col_scale``, ``residual``, ``weight_scale``, ``weight_in_scale``: the
    :class:`Fusion` operands, each present or None (plan with the same Fusion). ``row_chunk_rows``: at most
    this many rows of the token block at a time (:func:`row_chunk`; smaller than the block in tests, to take several).
    ``weight_chunk_cols``: an int8 weight tile's output columns converted at a time (:data:`WEIGHT_CHUNK`; a
    multiple of 128 on TPU, the last chunk of a tile ragged when it does not divide the tile).
    ``keep_s``: also return the shrink ``s[t] = scaling * x[t] @ A[s_t]^T`` [T_pad, R] as the expand
    read it (rounded to the adapters' dtype; zeros for tokens without adapter), what the backward's
    ``bgmv_lora_grads(saved_s=)`` takes instead of recomputing it (plan with the same ``keep_s``); with a
    prologue (``up``, ``row_scale`` or ``col_scale``) also x as the prologue made it, [T_pad, K] in x's dtype
    (:func:`keeps_x`), which the backward's dA reads instead of recomputing it.

    Pooled (``page_table`` given): ``lora_a`` [P + 2, K] and ``lora_b`` [P + 2, N] are rank-row pools in x's
    dtype or int8 (then ``page_scales``), lane l's page p starting at row ``page_table[l * pages(R) + p]``
    (R = ``pool_rank``; a tail page's start may be unaligned, see :mod:`.pages`), its true rank at
    ``page_table[L * pages(R) + l]``. Each used lane's true-rank pages are DMA'd (an int8 page staged and
    converted in VMEM, its rows' scales folded into the shrink), and rows that are not the lane's own are
    selected out (:func:`.pages.lane_rows`). Plan as for slots (``pooled_vmem_bytes`` must fit), without
    ``keep_s``. ``typical_ranks``: the ranks of a block's distinct adapters, for the cost estimate
    (default: ``lanes`` adapters of rank R).

    ``a_grad_rows`` u (with ``keep_s``; slots only; plan with ``a_grad``): a third output, the gradient of A
    against u, ``dA[l] = sum_{t: s_t = l} outer(u[t], x[t])`` [L, R, K] f32 (exact zeros for a slot no token
    uses), taken while x's tiles are in VMEM for the shrink: the backward's one pass over the output gradient,
    where x is g and A is the layer's B, gives dx, ``ds`` (the kept s) and dB (u the forward's s) at once.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    num_tokens, hidden = x.shape
    pooled = None
    if page_table is None:
        num_slots, rank, out_dim = lora_b.shape
    else:
        if keep_s or a_grad_rows is not None:
            raise ValueError("a pooled linear_lora does not keep s (pools serve adapters that are not trained)")
        if (page_scales is not None) != (lora_a.dtype == jnp.int8):
            raise ValueError("page_scales must be given exactly for int8 pools")
        if page_scales is not None and page_scales.shape[0] % SCALE_TILE_ROWS:
            raise ValueError(f"page_scales must hold whole tiles of {SCALE_TILE_ROWS} rows, got {page_scales.shape}")
        rank, out_dim = pool_rank, lora_b.shape[1]
        num_slots = page_table.shape[0] // (pages(rank) + 1)
        pooled = Pooled(rank, page_scales is not None, num_slots, 0 if page_scales is None else page_scales.shape[0])
    block_sizes.check(hidden, out_dim)
    a_grad = a_grad_rows is not None
    if a_grad and not keep_s:
        raise ValueError("a_grad_rows is the backward's pass: it keeps s too (keep_s=True)")
    has_bias = bias is not None
    fusion = Fusion(
        up is not None,
        row_scale is not None,
        col_scale is not None,
        residual is not None,
        weight_scale is not None,
        weight_in_scale is not None,
    )
    spec = grid_spec(
        num_tokens,
        hidden,
        out_dim,
        rank,
        num_slots,
        x.dtype,
        block_sizes,
        lanes,
        layout,
        has_bias,
        fusion,
        keep_s,
        pooled,
        a_grad,
    )
    kernel = functools.partial(
        _kernel,
        lanes=lanes,
        stride=rank_stride(rank, x.dtype),
        per_block=max_chunks(block_sizes.tokens, num_slots, lanes) * lanes,
        scaling=scaling,
        layout=layout,
        has_bias=has_bias,
        fusion=fusion,
        rows=row_chunk(block_sizes.tokens, row_chunk_rows),
        weight_chunk=weight_chunk_cols,
        keep_s=keep_s,
        pooled=pooled,
        a_grad=a_grad,
    )
    operands = [meta.code.reshape(num_tokens, 1), x]
    operands += [] if up is None else [up]
    operands += [] if row_scale is None else [row_scale.astype(jnp.float32).reshape(num_tokens, 1)]
    operands += [] if col_scale is None else [col_scale.reshape(1, hidden)]
    operands.append(weight)
    if weight_in_scale is not None:
        in_shape = (1, hidden) if layout == "out_in" else (hidden, 1)
        operands.append(weight_in_scale.astype(jnp.float32).reshape(in_shape))
    if weight_scale is not None:
        operands.append(weight_scale.astype(jnp.float32).reshape(1, out_dim))
    if has_bias:
        operands.append(bias.reshape(1, out_dim))
    operands += [] if residual is None else [residual]
    if a_grad:
        operands += [a_grad_rows.T, meta.code.reshape(1, num_tokens)]
    out_shape = jax.ShapeDtypeStruct((num_tokens, out_dim), x.dtype)
    if keep_s:
        out_shape = (out_shape, jax.ShapeDtypeStruct((num_tokens, rank), lora_a.dtype))
    if keeps_x(fusion, keep_s):
        out_shape += (jax.ShapeDtypeStruct((num_tokens, hidden), x.dtype),)
    if a_grad:
        out_shape += (jax.ShapeDtypeStruct((num_slots, rank, hidden), jnp.float32),)
    if pooled is None:
        estimate = cost_estimate(
            num_tokens, hidden, out_dim, rank, num_slots, x.dtype, block_sizes, lanes, fusion, keep_s, a_grad
        )
        prefetch, pools = (meta.chunks, meta.slots, meta.uniform), (lora_a, lora_b)
    else:
        typical = typical_ranks or (rank,) * min(lanes, num_slots)
        estimate = pooled_cost_estimate(
            num_tokens, hidden, out_dim, typical, rank, x.dtype, block_sizes, lanes, fusion, pooled
        )
        prefetch = (meta.chunks, meta.slots, meta.uniform, page_table.astype(jnp.int32))
        pools = (lora_a, lora_b) + (() if page_scales is None else (page_scales.astype(jnp.float32),))
    return pl.pallas_call(
        kernel,
        grid_spec=spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes or tuning.BASE_VMEM_LIMIT_BYTES["v6e"],
        ),
        cost_estimate=estimate,
        interpret=interpret,
        name="xla_lora_linear_lora" if pooled is None else "xla_lora_linear_lora_pooled",
    )(*prefetch, *operands, *pools)


def tpu_compile_case(
    num_tokens: int,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    dtype,
    generation: str,
    layout: str = "out_in",
    has_bias: bool = False,
    fusion: Fusion = NO_FUSION,
    keep_s: bool = False,
    pool_rows: int = 0,
    int8_pool: bool = False,
    typical_ranks: tuple[int, ...] | None = None,
    a_grad: bool = False,
    vmem_limit_bytes: int | None = None,
):
    """(fn, argument ShapeDtypeStructs) of the kernel with Mosaic for one configuration, for TPU compile checks.

    ``pool_rows`` > 0: the pooled kernel, ``lora_a`` / ``lora_b`` pools of ``pool_rows`` rows (P + 2) in
    ``dtype`` or int8 (``int8_pool``: then an f32 page-scale array of whole tiles follows them), then the page
    table [L * pages(R) + L] int32 after ``indices``; ``typical_ranks`` for the cost estimate.

    ``fn(x, weight, [bias,] lora_a, lora_b, indices, *fusion operands)`` builds the lane metadata on
    the device and calls the kernel with ``interpret=False``; pass the arguments'
    shapes to ``jax.jit(fn).trace(...).lower(lowering_platforms=("tpu",))``. The fusion operands,
    in order, those ``fusion`` has: up [T, K], row scale [T] f32, column scale [K], residual [T, N],
    weight scale [N] f32 or weight input scale [K] f32 (then the weight is int8). ``keep_s``: the training
    kernel, which also writes the shrink; ``a_grad`` (with it): the backward's pass, which also takes A's gradient
    against rows [T, R] in ``dtype``, the last argument. ``vmem_limit_bytes``: the scoped VMEM limit to compile
    with (default: the generation's, which the plan fits).
    """
    if pool_rows:
        planned = pooled_plan(
            num_tokens, hidden, out_dim, rank, num_slots, dtype, generation, has_bias, fusion, int8_pool
        )
    else:
        planned = plan(
            num_tokens, hidden, out_dim, rank, num_slots, dtype, generation, has_bias, fusion, keep_s, a_grad
        )
    if planned is None:
        raise ValueError(f"no tiling of K={hidden}, N={out_dim} fits VMEM on {generation}")
    sizes, lanes = planned
    padded = -(-num_tokens // sizes.tokens) * sizes.tokens
    from .visits import build_lanes

    flags = {"up": fusion.silu_mul, "row_scale": fusion.row_scale, "col_scale": fusion.col_scale}
    flags.update(residual=fusion.residual, weight_scale=fusion.weight_scale, weight_in_scale=fusion.weight_in_scale)
    names = [name for name, on in flags.items() if on]

    def fn(x, weight, *rest):
        bias, rest = (rest[0], rest[1:]) if has_bias else (None, rest)
        rows = {"a_grad_rows": rest[-1]} if a_grad else {}
        rest = rest[:-1] if a_grad else rest
        pooled = {}
        if pool_rows:
            if int8_pool:
                pooled["page_scales"], rest = rest[2], rest[:2] + rest[3:]
            pooled["page_table"], rest = rest[3], rest[:3] + rest[4:]
            pooled.update(pool_rank=rank, typical_ranks=typical_ranks)
        (lora_a, lora_b, indices), extra = rest[:3], dict(zip(names, rest[3:], strict=True))
        meta = build_lanes(indices, num_slots, sizes.tokens, lanes)
        return linear_lora(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            meta,
            scaling=1.0,
            block_sizes=sizes,
            lanes=lanes,
            layout=layout,
            interpret=False,
            vmem_limit_bytes=vmem_limit_bytes or vmem_limit(generation),
            keep_s=keep_s,
            **extra,
            **pooled,
            **rows,
        )

    w_shape = (out_dim, hidden) if layout == "out_in" else (hidden, out_dim)
    shapes = [(padded, hidden), w_shape] + ([(out_dim,)] if has_bias else [])
    shapes += [(num_slots, rank, hidden), (num_slots, rank, out_dim)]
    if pool_rows:
        shapes[-2:] = [(pool_rows, hidden), (pool_rows, out_dim)]
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes] + [jax.ShapeDtypeStruct((padded,), jnp.int32)]
    if pool_rows:
        if int8_pool:
            args[-3:-1] = [jax.ShapeDtypeStruct(a.shape, jnp.int8) for a in args[-3:-1]]
            args.insert(-1, jax.ShapeDtypeStruct((-(-pool_rows // SCALE_TILE_ROWS) * SCALE_TILE_ROWS,), jnp.float32))
        args.append(jax.ShapeDtypeStruct((num_slots * (pages(rank) + 1),), jnp.int32))
    if fusion.int8:
        args[1] = jax.ShapeDtypeStruct(w_shape, jnp.int8)
    extra = {"up": (padded, hidden), "row_scale": (padded,), "col_scale": (hidden,), "residual": (padded, out_dim)}
    extra.update(weight_scale=(out_dim,), weight_in_scale=(hidden,))
    f32 = ("row_scale", "weight_scale", "weight_in_scale")
    args += [jax.ShapeDtypeStruct(extra[n], jnp.float32 if n in f32 else dtype) for n in names]
    args += [jax.ShapeDtypeStruct((padded, rank), dtype)] if a_grad else []
    return fn, args
