"""A TPU cost model of one LoRA training step's projections (forward, loss's backward to the activations).

The model prices, per projection of a decoder layer (``y = x W^T`` with its LoRA, frozen base):

- the base, the floor ``(a)``: the forward GEMM ``x W^T`` and the backward to the activations
  ``dx = g W`` (the base is frozen: no weight gradient), each at XLA's roofline
  (:func:`tpu_model.matmul_cost`);
- ours: the forward as the layer runs it on the chip (one of ``linear_lora``'s fused kernel, the base then
  the fused LoRA kernel, or the XLA-native op, priced by :func:`tpu_model.projection_costs`, as
  ``base_fusion="auto"`` chooses for a training call: the least forward, as training runs it, plus
  backward by this model, ``formulation.choose(training=True)``; in the decoder arranged as in training,
  :data:`TRAINING_KERNEL_FUSION`: the fused kernels take the norms, SiLU(gate) * up and the residual adds in), then
  the backward as ``ops/_autograd.py`` runs it on a TPU (``linear_lora_backward``, or the fused op
  ``bgmv_lora_grads``, ``ops/_lora_grads_jax.py``):

  - dx: for a projection whose forward is ``linear_lora``, its backward's one pass over g (the base's
    dx and LoRA's, ``linear_lora``'s kernel with the roles swapped); otherwise ``dx += bgmv_expand(ds,
    A)`` (the expand kernel with A in B's place, priced from its own ``cost_estimate`` byte counts, MXU
    work padded to whole tiles), added to the base's dx;
  - ``s = scaling * x A^T`` kept from the forward where the layer's training forward keeps it: a
    projection whose forward is ``linear_lora`` runs ``linear_lora_train``, whose kernel writes ``s``
    beside the output (priced by the kernel's own plan and grid with ``keep_s``: the [T, R] block more),
    and the XLA-native formulation runs ``bgmv_shrink_expand_train`` (priced as the serving XLA-native
    op); a projection on the base then the fused LoRA kernel recomputes it (``bgmv_shrink(x, A)``: on TPU
    that kernel does not write ``s``, and a shrink of its own costs what the backward's does);
  - ds and dB: for a projection whose forward is ``linear_lora``, in that same pass over g
    (``linear_lora_backward``: the kernel, planned with ``a_grad``, writes ds beside dx and keeps dB's f32
    [L, R, N] sum resident in VMEM, :func:`tpu_model.fused_base_cost` with ``a_grad``) where that plan fits and
    pays (:func:`one_pass_backward_cost`); otherwise in one pass over g of their own (``shrink_weight_grad``:
    :func:`g_pass_kernel_cost`, its grid walked);
  - dA: the segmented outer product's Pallas kernel over x (slot-major visits, a slot's f32 tile
    resident across its token blocks: :func:`weight_grad_kernel_cost`, its grid walked);
  - the trainable adapters' parameters put into the slot tensors and the slot gradients carried back to
    them (:func:`slot_assembly_seconds`: the HBM bytes libtpu's compile of torch_xla's graphs moves,
    ``bench.slot_assembly``);

- ours with dB in a pass over g of its own for every projection (``ratio_ours_db_own_pass``: the backward before
  ``linear_lora_backward``);
- ours with the separate backward ops (``ops._autograd.FUSED_BACKWARD = False``): ds by its own shrink
  over g, dA and dB by the weight-gradient kernel (and, for comparison, by the XLA-native op,
  ``backend="xla"``, :func:`weight_grad_xla_seconds`); ours with every projection's serving forward and
  ``s`` recomputed in the backward (``layers.base.TRAIN_FORWARD = False``);
- what-if: ours with every projection's dx computed in the base's backward pass over g (what
  ``linear_lora``'s backward does for the projections whose forward runs it);

- the floor no formulation can go below, :func:`lora_mxu_floor_seconds`: the base (a) plus the MXU time of
  LoRA's six products (forward shrink and expand; backward ds, LoRA's dx, dA and dB) at each token's
  true rank, with every byte, grid step and launch of them hidden inside the base's own passes. The MXU
  pads a product's contraction and output widths to whole tiles (:func:`tpu_model.mxu_flops`), so each
  rank-r product costs at least a full tile's width of work (256 on a v6e) whatever r is;

- the one-hot einsum formulation: the base, the forward of :func:`tpu_model.onehot_cost` (every token
  against every slot's A and B, masked by its slot's one-hot) and its backward as XLA's autograd of
  those two einsums runs it (:func:`onehot_backward_seconds`), plus the same slot assembly.

Everything else of a training step (attention, norms, the head and the loss) is the same for all three
and left out, so the ratios are those of the projections alone: an upper bound on a whole layer's. All
bf16 activations and weights, f32 slot gradients. The chips' figures are :data:`tpu_model.CHIPS`.
"""

from __future__ import annotations

import math

import numpy as np

from torch_xla_lora.bench import tpu_model
from torch_xla_lora.bench.tpu_model import Chip, Cost, mxu_flops

#: The default modelled batch: 16 rows of 512 tokens (T = 8192), row i on tenant i mod 8.
MODEL_ROWS, MODEL_SEQ = 16, 512
_BF16, _F32 = 2, 4


def llama_layer(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int, str]]:
    """A Llama decoder layer's projections: name -> (in_features, out_features, input group), as
    :data:`tpu_model.LLAMA3_8B_LAYER` lists them."""
    kv = hidden // heads * kv_heads
    return {
        "q_proj": (hidden, hidden, "norm1"),
        "k_proj": (hidden, kv, "norm1"),
        "v_proj": (hidden, kv, "norm1"),
        "o_proj": (hidden, hidden, "attention"),
        "gate_proj": (hidden, intermediate, "norm2"),
        "up_proj": (hidden, intermediate, "norm2"),
        "down_proj": (intermediate, hidden, "silu_mul"),
    }


def interleaved_rows(rows: int, seq: int, tenants: int) -> np.ndarray:
    """[rows * seq] slots of a batch whose row i (``seq`` tokens) is on tenant (slot) i mod ``tenants``."""
    return np.repeat(np.arange(rows, dtype=np.int32) % tenants, seq)


def _roofline(chip: Chip, nbytes: float, flops: float, steps: int = 0) -> float:
    return max(nbytes / chip.hbm_bytes_per_s, flops / chip.peak_flops) + steps * chip.step_overhead_s


def _block_runs(indices: np.ndarray, num_slots: int, block: int) -> list[int]:
    """Per token block of ``block`` tokens: how many distinct valid slots its tokens use."""
    valid = np.where((indices >= 0) & (indices < num_slots), indices, -1)
    padded = np.full(-(-len(valid) // block) * block, -1, np.int32)
    padded[: len(valid)] = valid
    return [len({int(s) for s in chunk if s >= 0}) for chunk in padded.reshape(-1, block)]


def shrink_seconds(chip: Chip, indices: np.ndarray, hidden: int, rank: int, num_slots: int) -> float:
    """``bgmv_shrink`` ([T, hidden] -> [T, rank]) on the chip: the shrink kernel's own ``cost_estimate``
    bytes (x once, one adapter tile per token block, the [T, R] result), MXU work per token block
    and distinct slot in it, one grid step per (block, slot)."""
    from torch_xla_lora.kernels import block_sizes, shrink

    num_tokens = len(indices)
    sizes = block_sizes.choose(num_tokens, hidden, rank, chip.generation)
    runs = _block_runs(indices, num_slots, sizes.tokens)
    estimate = shrink.cost_estimate(num_tokens, hidden, rank, num_slots, sizes.tokens, _BF16)
    flops = sum(runs) * mxu_flops([(sizes.tokens, hidden, rank)], chip.mxu_width)
    steps = max(sum(runs), 1) * math.ceil(hidden / sizes.hidden)
    return _roofline(chip, estimate.bytes_accessed, flops, steps)


def expand_seconds(chip: Chip, indices: np.ndarray, rank: int, out_dim: int, num_slots: int) -> float:
    """``bgmv_expand`` ([T, rank] -> [T, out_dim], added to a base it reads): the expand kernel's own
    ``cost_estimate`` bytes, MXU work per token block and distinct slot in it."""
    from torch_xla_lora.kernels import block_sizes, expand

    num_tokens = len(indices)
    sizes = block_sizes.choose(num_tokens, rank, out_dim, chip.generation)
    runs = _block_runs(indices, num_slots, sizes.tokens)
    estimate = expand.cost_estimate(num_tokens, rank, out_dim, num_slots, sizes.tokens, True, _BF16)
    flops = sum(runs) * mxu_flops([(sizes.tokens, rank, out_dim)], chip.mxu_width)
    steps = max(sum(runs), 1) * math.ceil(out_dim / sizes.out)
    return _roofline(chip, estimate.bytes_accessed, flops, steps)


def weight_grad_kernel_cost(chip: Chip, indices: np.ndarray, left: int, right: int, num_slots: int) -> Cost:
    """``bgmv_weight_grad``'s Pallas kernel (``kernels/weight_grad.py``: ``out[l] = sum_{i_t = l} left[t]^T
    right[t]``, [L, left, right] f32), its grid walked step by step as the op calls it on a TPU: the
    kernel's token block and right-width tile (planned in the chip's VMEM limit, ``weight_grad.width_tile``),
    rows padded to whole blocks and the width as ``padded_width`` pads it, slot-major visits from the
    kernel's own ``build_slot_visits``; grid (width tiles, visits).

    A block is fetched (or the output tile written back) when its block index changes between consecutive
    steps, as the TPU pipeline does: the indices (int32, twice), ``left`` transposed [left, block],
    ``right`` [block, tile] (bf16), the f32 [1, left, tile] output. One [left, block] x [block, tile] MXU
    product per visit with tokens (an unused slot's empty visit only writes its zeros)."""
    from torch_xla_lora.kernels import block_sizes, weight_grad

    num_tokens = len(indices)
    tokens = weight_grad.block_tokens(num_tokens)
    padded = np.full(-(-num_tokens // tokens) * tokens, -1, np.int32)
    padded[:num_tokens] = np.where((indices >= 0) & (indices < num_slots), indices, -1)
    wide = weight_grad.padded_width(right)
    tile = weight_grad.width_tile(wide, tokens, left, _BF16, block_sizes.vmem_limit(chip.generation))
    num_blocks = len(padded) // tokens
    vis = weight_grad.build_slot_visits(padded, num_slots, tokens, xp=np)
    count = int(vis.count[0])
    # (block shape, bytes per element, index map (j, block, slot)) of the kernel's BlockSpecs, output last.
    specs = [
        ((1, tokens), 4, lambda j, b, s: (0, b)),
        ((tokens, 1), 4, lambda j, b, s: (b, 0)),
        ((left, tokens), _BF16, lambda j, b, s: (0, b)),
        ((tokens, tile), _BF16, lambda j, b, s: (b, j)),
        ((1, left, tile), _F32, lambda j, b, s: (s, 0, j)),
    ]
    last = [None] * len(specs)
    pipelined, flops = 0, 0.0
    product = mxu_flops([(left, tokens, tile)], chip.mxu_width)
    for j in range(wide // tile):
        for v in range(count):
            block, slot = int(vis.block[v]), int(vis.slot[v])
            for k, (shape, itemsize, index_map) in enumerate(specs):
                index = index_map(j, min(block, num_blocks - 1), slot)
                if index != last[k]:
                    pipelined += math.prod(shape) * itemsize
                    last[k] = index
            if block < num_blocks:
                flops += product
    steps = (wide // tile) * count
    return Cost(pipelined, 0, flops, steps, _roofline(chip, pipelined, flops, steps))


def g_pass_kernel_cost(chip: Chip, indices: np.ndarray, rank: int, out_dim: int, num_slots: int) -> Cost:
    """The fused backward's one pass over g (``kernels/weight_grad.py``'s ``shrink_weight_grad``: ``ds = g B^T``
    and ``dB = s^T g``), its grid walked as the op calls it on a TPU: the weight-gradient kernel's token
    block, the width padded as ``padded_width`` pads it and tiled by ``fused_width_tile``, the forward's
    token-major visits (``visits.build``); grid (width tiles, visits). Blocks: the indices (int32, twice),
    s transposed [R, block] and g [block, tile] (bf16), the visit's B tile [1, R, tile] (bf16), every slot's
    f32 dB tile [L, R, tile] (resident across a width tile's walk) and the f32 ds partial sum [1, block, R].
    Two MXU products per visit with a slot; then the ds partial sums added up (one fusion). Where no width
    tile fits, the separate shrink and weight-gradient kernels."""
    from torch_xla_lora.kernels import block_sizes, visits, weight_grad

    num_tokens = len(indices)
    tokens = weight_grad.block_tokens(num_tokens)
    wide = weight_grad.padded_width(out_dim)
    budget = weight_grad.fused_vmem_budget(block_sizes.vmem_limit(chip.generation))
    tile = weight_grad.fused_width_tile(wide, tokens, rank, num_slots, _BF16, budget)
    if tile is None:
        separate = shrink_seconds(chip, indices, out_dim, rank, num_slots)
        separate += weight_grad_kernel_cost(chip, indices, rank, out_dim, num_slots).seconds
        return Cost(0, 0, 0.0, 0, separate)
    padded = np.full(-(-num_tokens // tokens) * tokens, -1, np.int32)
    padded[:num_tokens] = np.where((indices >= 0) & (indices < num_slots), indices, -1)
    num_tiles = wide // tile
    vis = visits.build(padded, num_slots, tokens, xp=np)
    count = int(vis.count[0])
    specs = [  # (block shape, bytes per element, index map (j, block, slot)), outputs last
        ((1, tokens), 4, lambda j, b, s: (0, b)),
        ((tokens, 1), 4, lambda j, b, s: (b, 0)),
        ((rank, tokens), _BF16, lambda j, b, s: (0, b)),
        ((tokens, tile), _BF16, lambda j, b, s: (b, j)),
        ((1, rank, tile), _BF16, lambda j, b, s: (max(s, 0), 0, j)),
        ((num_slots, rank, tile), _F32, lambda j, b, s: (0, 0, j)),
        ((1, tokens, rank), _F32, lambda j, b, s: (j, b, 0)),
    ]
    last = [None] * len(specs)
    pipelined, flops = 0, 0.0
    product = mxu_flops([(tokens, tile, rank), (rank, tokens, tile)], chip.mxu_width)
    for j in range(num_tiles):
        for v in range(count):
            block, slot = int(vis.block[v]), int(vis.slot[v])
            for k, (shape, itemsize, index_map) in enumerate(specs):
                index = index_map(j, block, slot)
                if index != last[k]:
                    pipelined += math.prod(shape) * itemsize
                    last[k] = index
            if slot >= 0:
                flops += product
    steps = num_tiles * count
    seconds = _roofline(chip, pipelined, flops, steps)
    seconds += tpu_model._fusions(chip, [(_F32 * num_tiles * len(padded) * rank + _BF16 * num_tokens * rank, 0.0)])
    return Cost(pipelined, 0, flops, steps, seconds)


def weight_grad_xla_seconds(chip: Chip, indices: np.ndarray, left: int, right: int, num_slots: int) -> float:
    """The same product as ``ops/_xla_native.weight_grad`` runs it (``backend="xla"``), as XLA fusions: the
    rows sorted by slot (both operands gathered: read and written), one [left, block] x [block, right]
    product per token block into [blocks, left, right] f32 partial sums, a scatter-add of those into the
    [L, left, right] output, then one fusion per run of a slot starting inside a block (block-sized
    product, the slot's tile read and written)."""
    from torch_xla_lora.ops import _xla_native

    num_tokens = len(indices)
    bt = _xla_native.weight_grad_block_tokens(num_tokens)
    runs = _block_runs(np.sort(np.where(indices >= 0, indices, num_slots)), num_slots, bt)
    blocks = len(runs)
    rows = blocks * bt
    extra = sum(max(r - 1, 0) for r in runs)
    parts = [
        (2 * _BF16 * rows * (left + right), 0.0),  # the sorted copies of both operands
        (
            _BF16 * rows * (left + right) + _F32 * blocks * left * right,
            blocks * mxu_flops([(left, bt, right)], chip.mxu_width),
        ),
        (_F32 * (blocks + num_slots) * left * right, 0.0),  # partial sums added into the output
    ]
    parts += [
        (_BF16 * bt * (left + right) + 2 * _F32 * left * right, mxu_flops([(left, bt, right)], chip.mxu_width))
    ] * extra
    return tpu_model._fusions(chip, parts)


def slot_assembly_bytes(
    hidden: int, out_dim: int, rank: int, num_slots: int, trained_rows: int, every_slot: bool = True
) -> dict[str, int]:
    """HBM bytes of building one projection's bf16 [L, R, in] and [L, R, out] slot tensors from the trainable
    adapters' f32 parameters (``trained_rows``: the sum of their ranks), ``forward``, and of carrying the bf16
    slot gradients back to the parameters' f32 gradients, ``backward``, as libtpu compiles torch_xla's graphs
    of ``slot_factors`` (``python -m torch_xla_lora.bench.slot_assembly``). ``every_slot``: every slot holds a
    trainable adapter, so the slot tensors are the parameters stacked (the forward reads them and writes the
    slots; the backward reads only the adapters' rows of the gradient); otherwise the rows are put into the
    slot buffers (the forward reads those too, and the backward reads the whole gradient to gather the rows)."""
    width = hidden + out_dim
    slots = num_slots * rank * width
    forward = _F32 * trained_rows * width + _BF16 * slots * (1 if every_slot else 2)
    backward = _BF16 * (trained_rows * width if every_slot else slots) + _F32 * trained_rows * width
    return {"forward": forward, "backward": backward}


def slot_assembly_seconds(chip: Chip, hidden: int, out_dim: int, rank: int, num_slots: int, trained_rows: int) -> float:
    """:func:`slot_assembly_bytes` (every slot trainable, as :func:`modelled_rows` places the tenants) in two
    fusions' time, the forward's and the backward's."""
    nbytes = slot_assembly_bytes(hidden, out_dim, rank, num_slots, trained_rows)
    return tpu_model._fusions(chip, [(nbytes["forward"], 0.0), (nbytes["backward"], 0.0)])


def onehot_backward_seconds(chip: Chip, num_tokens: int, hidden: int, out_dim: int, rank: int, num_slots: int) -> float:
    """XLA's autograd of the one-hot forward (``s_all = x A_all^T`` masked by the one-hot, ``y += s_all
    B_all``), the saved [T, L*R] masked ``s_all`` reused: ``ds_all = g B_all^T`` (masked), ``dx += ds_all
    A_all``, ``dA_all = ds_all^T x``, ``dB_all = s_all^T g``: four fusions of L*R-wide products."""
    lr = num_slots * rank
    w = chip.mxu_width
    parts = [
        (_BF16 * (num_tokens * out_dim + lr * out_dim + num_tokens * lr), mxu_flops([(num_tokens, out_dim, lr)], w)),
        (_BF16 * (num_tokens * lr + lr * hidden + 2 * num_tokens * hidden), mxu_flops([(num_tokens, lr, hidden)], w)),
        (
            _BF16 * (num_tokens * lr + num_tokens * hidden) + _F32 * lr * hidden,
            mxu_flops([(lr, num_tokens, hidden)], w),
        ),
        (
            _BF16 * (num_tokens * lr + num_tokens * out_dim) + _F32 * lr * out_dim,
            mxu_flops([(lr, num_tokens, out_dim)], w),
        ),
    ]
    return tpu_model._fusions(chip, parts)


def lora_mxu_floor_seconds(
    chip: Chip, indices: np.ndarray, hidden: int, out_dim: int, ranks: np.ndarray, weight_grad_a: bool = True
) -> float:
    """MXU seconds of one projection's LoRA products in a training step, at the tokens' true ranks, with
    nothing else paid: no bytes, grid steps or launches (all hidden in the base's passes), the slot layout
    not padded. Per slot s of r = ``ranks[s]`` rows and its n tokens (``indices`` [T]; outside
    [0, len(ranks)) none): the forward shrink (n, in, r) and expand (n, r, out), the backward's ds = g B^T
    (n, out, r) and LoRA's dx = ds A (n, r, in), and the weight gradients dB = s^T g (r, n, out) and, with
    ``weight_grad_a``, dA = ds^T x (r, n, in), each as :func:`tpu_model.mxu_flops` pads it (K and N to whole
    tiles; the weight gradients in their cheaper orientation, the rank as M, which it does not pad)."""
    flops = 0.0
    for slot, rank in enumerate(int(r) for r in ranks):
        n = int(np.count_nonzero(indices == slot))
        if n == 0 or rank == 0:
            continue
        products = [(n, hidden, rank), (n, rank, out_dim), (n, out_dim, rank), (n, rank, hidden), (rank, n, out_dim)]
        products += [(rank, n, hidden)] if weight_grad_a else []
        flops += mxu_flops(products, chip.mxu_width)
    return flops / chip.peak_flops


def one_pass_backward_cost(
    chip: Chip,
    indices: np.ndarray,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    int8_weight: bool = False,
    two_passes: tuple[Cost | None, float] | None = None,
) -> Cost | None:
    """``linear_lora_backward``'s pass (dx, ds and dB in one pass over g: the one-pass kernel with the roles
    swapped, planned with ``a_grad``) for a projection ``hidden`` -> ``out_dim``, or None where the backward
    does not take it: no plan holds dB's f32 [L, R, N] sum in VMEM, or the plan that does runs slower than
    the two passes that replace it (the dx pass without dB, then ds and dB in one pass over g of their own:
    Llama-3-8B gate_proj's backward at rank 64 and 32 slots plans only 128 x 256 x 256 tiles, modelled 27 ms
    on v6e against 1.5 ms). The library decides the same way (``ops/_linear_fused.takes_one_pass_backward``).
    ``two_passes``: the dx pass's cost (None where no plan fits) and the g pass's seconds where the caller has
    priced them already (:func:`projection_train_costs`)."""
    transposed = {"layout": "in_out", "int8_weight": int8_weight, "scales_along_input": True}
    with_db = tpu_model.fused_base_cost(
        chip, indices, out_dim, hidden, rank, num_slots, **transposed, keep_s=True, a_grad=True
    )
    if with_db is None:
        return None
    if two_passes is None:
        dx_pass = tpu_model.fused_base_cost(chip, indices, out_dim, hidden, rank, num_slots, **transposed)
        two_passes = dx_pass, g_pass_kernel_cost(chip, indices, rank, out_dim, num_slots).seconds
    dx_pass, g_pass = two_passes
    if dx_pass is None:
        return with_db
    return with_db if with_db.seconds <= dx_pass.seconds + g_pass else None


def projection_train_costs(
    chip: Chip,
    indices: np.ndarray,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    residual_output: bool = False,
    input_share: float = 0.0,
    trained_rows: int | None = None,
    operands: int = 1,
    prologue: str = "",
    residual_in_kernel: bool = False,
    int8_weight: bool = False,
) -> dict:
    """Seconds of one projection's training-step parts (see the module doc); ``forward_choice`` names the
    formulation the forward was priced with. ``trained_rows``: the sum of the trainable adapters' ranks
    (default: every slot at ``rank``); ``operands``: x's producer's inputs (2 for SiLU(gate) * up), as
    :func:`tpu_model.projection_costs` takes them. ``prologue`` / ``residual_in_kernel``: the arranged
    decoder's training forward (``linear_lora_fused_train``) takes x's producer / the residual add into the
    kernel, as :func:`tpu_model.projection_costs` prices it; the training kernel then writes x as it read it
    beside the output (``fused_base.keeps_x``: a pipelined [T, K] write in the kernel's walk), which the
    backward's dA reads. ``recompute_x``: x's write outside the kernel (``input_share`` of it, the projections of
    one input sharing it) where the training kernel has no plan and the op's fallback writes it; 0 where the
    kernel keeps it. (Before the kernel kept x, the backward recomputed it for dA at the price of x's write: XLA
    computes x in the fusion that differentiates the producer, which reads the producer's inputs and the
    gradient anyway; libtpu's bytes for that fusion with and without x as an output, ``python -m
    torch_xla_lora.bench.recompute_fusion``.) ``int8_weight``: a frozen int8 per-channel base
    (torch_xla's quantized layer), at one byte an element in the base's GEMMs (XLA converting it in the dot) and
    in the fused kernels, whose backward reads it transposed with its scales along the contraction
    (``linear_grads``); ``lora_dx_one_pass_dequantized`` prices that pass as the previous backward ran it, on a
    bf16 copy of the weight made by a pass of its own."""
    num_tokens = len(indices)
    base_backward = tpu_model.matmul_cost(chip, num_tokens, out_dim, hidden, int8_weight).seconds
    ds = shrink_seconds(chip, indices, out_dim, rank, num_slots)  # g B^T: dA's left operand
    separate_dx = ds + expand_seconds(chip, indices, rank, hidden, num_slots)
    # dx of the base and of LoRA in one pass over g: linear_lora's kernel with W, B and A in the roles of W, A
    # and B (W [out, in] read as [in', out'] = [out, in]), as linear_lora's backward runs it; ds for dA is
    # still its own shrink. Where no tiling fits, as the separate ops run it.
    transposed = {"layout": "in_out", "int8_weight": int8_weight, "scales_along_input": True}
    one_pass = tpu_model.fused_base_cost(chip, indices, out_dim, hidden, rank, num_slots, **transposed)
    one_pass_dx = separate_dx if one_pass is None else one_pass.seconds - base_backward + ds
    g_pass = g_pass_kernel_cost(chip, indices, rank, out_dim, num_slots).seconds
    # linear_lora_backward: the same pass also writing ds and taking dB, where it fits and pays (else None).
    with_db = one_pass_backward_cost(chip, indices, hidden, out_dim, rank, num_slots, int8_weight, (one_pass, g_pass))
    dequantized_dx = one_pass_dx
    if int8_weight:  # a bf16 copy of the weight (int8 read, bf16 written), then the bf16 one-pass kernel reading it
        bf16_pass = tpu_model.fused_base_cost(chip, indices, out_dim, hidden, rank, num_slots, layout="in_out")
        copy = (3 * hidden * out_dim + 4 * out_dim) / chip.hbm_bytes_per_s
        dequantized_dx = separate_dx if bf16_pass is None else copy + bf16_pass.seconds - base_backward + ds
    forward = tpu_model.projection_costs(
        chip, indices, hidden, out_dim, rank, num_slots, residual_output, input_share, prologue=prologue,
        residual_in_kernel=residual_in_kernel, int8_weight=int8_weight, operands=operands,
    )  # fmt: skip
    recompute_s = shrink_seconds(chip, indices, hidden, rank, num_slots)

    def training(choice: str) -> dict[str, float]:
        """The LoRA's training parts under the forward formulation ``choice``: its forward as training runs it
        (linear_lora's kernel writing s too, by its own plan: the difference to the serving kernel's walk; the
        XLA-native one keeping s; the separate kernels recomputing s), and the backward's passes over g."""
        lora_forward = forward[choice] - forward["base"]
        kept_forward, kept_recompute, recompute_x = lora_forward, recompute_s, 0.0
        if choice == "fused":
            taken = {"prologue": prologue, "residual": residual_in_kernel and residual_output}
            taken["int8_weight"] = int8_weight
            serving = tpu_model.fused_base_cost(chip, indices, hidden, out_dim, rank, num_slots, **taken)
            kept = tpu_model.fused_base_cost(chip, indices, hidden, out_dim, rank, num_slots, **taken, keep_s=True)
            if serving is not None and kept is not None:
                kept_forward, kept_recompute = lora_forward + kept.seconds - serving.seconds, 0.0
            if prologue and serving is not None and kept is None:  # the training op's fallback writes x
                recompute_x = input_share * num_tokens * hidden * _BF16 / chip.hbm_bytes_per_s
        elif choice == "xla_native":
            kept_recompute = 0.0
        dx = one_pass_dx - ds if choice == "fused" else separate_dx - ds
        # dx, ds and dB: linear_lora_backward's one pass where the forward is linear_lora, else the two passes.
        passes = with_db.seconds - base_backward if choice == "fused" and with_db is not None else dx + g_pass
        return {
            "lora_forward": lora_forward,
            "lora_forward_s_kept": kept_forward,
            "recompute_s_kept": kept_recompute,
            "recompute_x": recompute_x,
            "fused_dx": dx,
            "backward_g_passes": passes,
        }

    options = {name: training(name) for name in tpu_model.FORMULATIONS}
    serving_choice = tpu_model.cheapest(forward)
    # Training runs the formulation of least forward and backward (base_fusion="auto" on a training call:
    # formulation.choose(training=True)); serving the one of least forward.
    shared = ("lora_forward_s_kept", "recompute_s_kept", "recompute_x", "backward_g_passes")
    choice = min(tpu_model.FORMULATIONS, key=lambda name: sum(options[name][key] for key in shared))
    parts = options[choice]
    return {
        "base_forward": forward["base"],
        "base_backward": base_backward,
        "lora_forward": parts["lora_forward"],
        "lora_forward_s_kept": parts["lora_forward_s_kept"],
        "forward_choice": choice,
        "serving_choice": serving_choice,
        # What the serving choice would cost this training step more (it was the choice before training calls were
        # priced with their backward; 0 where the two agree).
        "serving_choice_extra": sum(options[serving_choice][k] for k in shared) - sum(parts[k] for k in shared),
        "lora_dx": one_pass_dx if choice == "fused" else separate_dx,  # linear_lora's backward: one pass
        "lora_dx_one_pass": one_pass_dx,
        "lora_dx_one_pass_dequantized": dequantized_dx,
        # The fused backward (ops/_lora_grads.py): ds comes from the pass over g that computes dB, so dx is the
        # one pass (linear_lora) or the expand alone; dB is in that pass, dA the weight-gradient kernel over x.
        "fused_dx": parts["fused_dx"],
        "fused_g_pass": g_pass,
        "backward_g_passes": parts["backward_g_passes"],
        "fused_weight_grad_a": weight_grad_kernel_cost(chip, indices, rank, hidden, num_slots).seconds,
        "recompute_s": recompute_s,
        "recompute_s_kept": parts["recompute_s_kept"],  # where the training forward does not keep s
        "recompute_x": parts["recompute_x"],  # x's write outside the kernel (the training op's fallback)
        "weight_grad_kernel": weight_grad_kernel_cost(chip, indices, rank, hidden, num_slots).seconds
        + weight_grad_kernel_cost(chip, indices, rank, out_dim, num_slots).seconds,
        "weight_grad_xla": weight_grad_xla_seconds(chip, indices, rank, hidden, num_slots)
        + weight_grad_xla_seconds(chip, indices, rank, out_dim, num_slots),
        "slot_assembly": slot_assembly_seconds(
            chip, hidden, out_dim, rank, num_slots, num_slots * rank if trained_rows is None else trained_rows
        ),
        "onehot_forward": tpu_model.onehot_cost(chip, num_tokens, hidden, out_dim, rank, num_slots).seconds,
        "onehot_backward": onehot_backward_seconds(chip, num_tokens, hidden, out_dim, rank, num_slots),
    }


def grouped_weight_grad_saving(
    chip: Chip, indices: np.ndarray, layer: dict[str, tuple[int, int, str]], rank: int, num_slots: int, choices: dict
) -> float:
    """What dA costs less (a negative number of seconds) when the projections reading one input, all on
    ``linear_lora`` (``choices``), take it together (``layers/shared_input.py``: one weight gradient of their ds
    side by side, [T, n * R], against x, where each alone reads x again): the weight-gradient kernel's walk of
    the group against the sum of its members' walks."""
    saving = 0.0
    for group in dict.fromkeys(g for _, _, g in layer.values()):
        members = [name for name, (_, _, g) in layer.items() if g == group]
        if len(members) < 2 or any(choices[name] != "fused" for name in members):
            continue
        fan_in = layer[members[0]][0]
        alone = weight_grad_kernel_cost(chip, indices, rank, fan_in, num_slots).seconds * len(members)
        saving += weight_grad_kernel_cost(chip, indices, rank * len(members), fan_in, num_slots).seconds - alone
    return saving


def train_step_costs(
    chip: Chip,
    indices: np.ndarray,
    layer: dict[str, tuple[int, int, str]],
    rank: int,
    num_slots: int,
    trained_rows: int | None = None,
    ranks: tuple[int, ...] | None = None,
    kernel_fusion: dict[str, tuple[str, bool]] | None = None,
    int8_weight: bool = False,
) -> dict:
    """Seconds of a decoder layer's projections in one training step, per formulation, and the ratios.

    ``int8_weight``: every projection's frozen base int8 per channel (:func:`projection_train_costs`); the base
    (a) then reads it at one byte an element too. ``ratio_ours_dequantized_dx``: ours with the fused projections'
    dx pass on a bf16 copy of the weight (the backward before it read the int8 weight transposed).

    ``kernel_fusion``: name -> (prologue, residual) the arranged decoder's fused kernels take in
    (:data:`TRAINING_KERNEL_FUSION`, what the layers do in training; :data:`NORMS_OUTSIDE`, the norms computed
    outside); None: not arranged.

    ``layer``: name -> (in, out, input group), as :func:`llama_layer`; the projections' roles (residual
    outputs, shared inputs) are Llama's (:func:`tpu_model.llama_roles`). Keys: ``base`` (the floor (a)),
    ``ours`` (the training forwards keeping ``s`` where they do, the fused backward: dx, ds and dB in one pass over
    g where the forward is ``linear_lora``), ``ours_separate``
    (the separate backward ops, the weight gradients by their Pallas kernel), ``ours_xla_weight_grad``
    (separate, by the XLA-native op), ``onehot``; ``ratio_*`` to base (``ratio_ours_recomputed_s``: ours with
    the serving forwards, every ``s`` recomputed; ``ratio_ours_one_pass_dx``: the separate ops with every
    projection's LoRA dx in the base's backward pass over g; ``ratio_ours_db_own_pass``: ours with ds and dB in a
    pass over g of their own everywhere, as the backward ran before ``linear_lora_backward``); ``overhead_vs_onehot*``
    (an overhead over base divided by the one-hot's), ``parts`` (each part summed over the projections)
    and ``choices``; ``floor`` and ``ratio_floor``: the base plus :func:`lora_mxu_floor_seconds` at the
    slots' true ``ranks`` (default: every slot at ``rank``), what no formulation can go below;
    ``floor_with_x_pass`` and its ratio: the same with dA in a pass of its own over each distinct input x
    (no pass of the frozen base's backward reads x), at that pass's roofline.
    """
    roles = tpu_model.llama_roles()
    parts: dict[str, float] = {}
    da_by_input: dict[str, float] = {}  # input group -> dA's MXU seconds of the projections reading that x
    choices, serving_choices = {}, {}
    dx_passes = []  # (name, its dx pass on the weight as stored, on a bf16 copy of it)
    for name, (fan_in, fan_out, _) in layer.items():
        residual, share = roles[name]
        operands = tpu_model.llama_fused_reads(name)["operands"]
        prologue, residual_in_kernel = (kernel_fusion or {}).get(name, ("", False))
        costs = projection_train_costs(
            chip, indices, fan_in, fan_out, rank, num_slots, residual, share, trained_rows, operands, prologue,
            residual_in_kernel, int8_weight,
        )  # fmt: skip
        choices[name] = costs.pop("forward_choice")
        serving_choices[name] = costs.pop("serving_choice")
        dx_passes.append((name, costs["lora_dx_one_pass"], costs["lora_dx_one_pass_dequantized"]))
        slot_ranks = np.asarray(ranks if ranks is not None else [rank] * num_slots)
        costs["lora_mxu_floor"] = lora_mxu_floor_seconds(chip, indices, fan_in, fan_out, slot_ranks)
        costs["lora_mxu_floor_but_da"] = lora_mxu_floor_seconds(chip, indices, fan_in, fan_out, slot_ranks, False)
        da = costs["lora_mxu_floor"] - costs["lora_mxu_floor_but_da"]
        group = layer[name][2]
        da_by_input[group] = da_by_input.get(group, 0.0) + da
        for key, value in costs.items():
            parts[key] = parts.get(key, 0.0) + value
    if kernel_fusion is not None:  # the arranged decoder trains q/k/v and gate/up as groups: dA in one pass over x
        parts["fused_weight_grad_a"] += grouped_weight_grad_saving(chip, indices, layer, rank, num_slots, choices)
    base = parts["base_forward"] + parts["base_backward"]
    # The forward, s and (arranged) x, as training runs them.
    kept = parts["lora_forward_s_kept"] + parts["recompute_s_kept"] + parts["recompute_x"]
    shared = kept + parts["lora_dx"] + parts["slot_assembly"]
    separate = base + shared + parts["weight_grad_kernel"]
    ours_xla = base + shared + parts["weight_grad_xla"]
    ours_one_pass = separate - parts["lora_dx"] + parts["lora_dx_one_pass"]
    fused_parts = ("backward_g_passes", "fused_weight_grad_a", "slot_assembly")
    ours = base + kept + sum(parts[key] for key in fused_parts)
    db_own_pass = ours - parts["backward_g_passes"] + parts["fused_dx"] + parts["fused_g_pass"]
    serving_choice = ours + parts["serving_choice_extra"]
    # The fused projections' dx pass (in fused_dx) on a bf16 copy of an int8 weight instead (equal for bf16 bases).
    dequantized = ours + sum(
        costs_dequantized - costs_one_pass
        for name, costs_one_pass, costs_dequantized in dx_passes
        if choices[name] == "fused"
    )
    recomputed = ours - kept + parts["lora_forward"] + parts["recompute_s"]
    onehot = base + parts["onehot_forward"] + parts["onehot_backward"] + parts["slot_assembly"]
    floor = base + parts["lora_mxu_floor"]
    # dA = ds^T x needs x again, and no pass of the frozen base's backward reads x: at least one pass over
    # each distinct input (projections reading one x sharing it), at the roofline of its read and dA's MXU work.
    fan_ins = {group: fan_in for fan_in, _, group in layer.values()}
    x_passes = sum(
        max(len(indices) * fan_ins[group] * _BF16 / chip.hbm_bytes_per_s, seconds)
        for group, seconds in da_by_input.items()
    )
    floor_x = base + parts["lora_mxu_floor_but_da"] + x_passes
    return {
        "base": base,
        "floor": floor,
        "ratio_floor": floor / base,
        "floor_with_x_pass": floor_x,
        "ratio_floor_with_x_pass": floor_x / base,
        "ours": ours,
        "ours_separate": separate,
        "ours_xla_weight_grad": ours_xla,
        "onehot": onehot,
        "ratio_ours": ours / base,
        "ratio_ours_dequantized_dx": dequantized / base,
        "ratio_ours_db_own_pass": db_own_pass / base,
        "ratio_ours_serving_choice": serving_choice / base,
        "ratio_ours_separate": separate / base,
        "ratio_ours_xla_weight_grad": ours_xla / base,
        "ratio_ours_one_pass_dx": ours_one_pass / base,
        "ratio_ours_recomputed_s": recomputed / base,
        "ratio_onehot": onehot / base,
        "overhead_vs_onehot": (ours - base) / (onehot - base),
        "overhead_vs_onehot_separate": (separate - base) / (onehot - base),
        "overhead_vs_onehot_xla_weight_grad": (ours_xla - base) / (onehot - base),
        "parts": parts,
        "choices": choices,
        "serving_choices": serving_choices,
    }


#: What the arranged decoder's kernels take in during training (``LinearWithLoRA.forward_fused_with`` and the
#: groups of ``layers/shared_input.py``): every producer and residual add, as when serving
#: (:data:`tpu_model.KERNEL_FUSION`); each kernel taking a producer in writes x as it made it (``fused_base.keeps_x``),
#: which its backward's dA reads (q/k/v's and gate/up's one dA per group reading one of them).
TRAINING_KERNEL_FUSION = dict(tpu_model.KERNEL_FUSION)

#: :data:`TRAINING_KERNEL_FUSION` with the norms computed outside the kernels (q/k/v and gate/up grouped on the
#: normed x): how the layers trained before the groups took the norms in.
NORMS_OUTSIDE = {name: ("" if prologue == "norm" else prologue, residual) for name, (prologue, residual) in
                 TRAINING_KERNEL_FUSION.items()}  # fmt: skip


def modelled_rows(
    chips: tuple[str, ...] = ("v6e",),
    rows: int = MODEL_ROWS,
    seq: int = MODEL_SEQ,
    ranks: tuple[int, ...] = (8, 8, 16, 16, 32, 32, 64, 64),
    layers: dict[str, dict[str, tuple[int, int, str]]] | None = None,
    int8_weight: bool = False,
) -> list[dict]:
    """One row per (chip, layer): :func:`train_step_costs` of ``rows`` x ``seq`` tokens, row i on tenant
    i mod ``len(ranks)`` (one slot per tenant), the slots padded to ``max(ranks)`` as the library pads
    them to ``max_rank``, the decoder arranged as the layers run it in training
    (:data:`TRAINING_KERNEL_FUSION`); ``ratio_ours_unarranged`` and ``ratio_ours_norms_outside``: ours with
    nothing taken in, and with the norms left outside the kernels (:data:`NORMS_OUTSIDE`, the arrangement before
    the training groups took them in). ``int8_weight``: every base int8 per channel (:func:`train_step_costs`).

    Default layers: the bench's Llama (hidden 2048, TinyLlama's widths) and Llama-3-8B's.
    """
    if layers is None:
        layers = {
            "Llama hidden 2048 (bench)": llama_layer(2048, 5632, 32, 4),
            "Llama-3-8B": dict(tpu_model.LLAMA3_8B_LAYER),
        }
    num_slots, rank = len(ranks), max(ranks)
    indices = interleaved_rows(rows, seq, num_slots)
    out = []
    for generation in chips:
        chip = tpu_model.CHIPS[generation]
        for name, layer in layers.items():
            args = (chip, indices, layer, rank, num_slots, sum(ranks), ranks)
            costs = train_step_costs(*args, kernel_fusion=TRAINING_KERNEL_FUSION, int8_weight=int8_weight)
            costs["ratio_ours_unarranged"] = train_step_costs(*args, int8_weight=int8_weight)["ratio_ours"]
            outside = train_step_costs(*args, kernel_fusion=NORMS_OUTSIDE, int8_weight=int8_weight)
            costs["ratio_ours_norms_outside"] = outside["ratio_ours"]
            row = {"chip": generation, "layer": name, "rows": rows, "seq": seq, "tokens": len(indices)}
            row["base_weights"] = "int8" if int8_weight else "bf16"
            out.append({**row, "ranks": list(ranks), **costs})
    return out


def format_rows(rows: list[dict]) -> str:
    """A markdown table of :func:`modelled_rows` (over int8 bases: one more column, ours with the fused
    projections' dx pass on a bf16 copy of the weight, as the backward ran before it read the int8 weight)."""
    int8 = any(row.get("base_weights") == "int8" for row in rows)
    header = (
        "| chip | layer (7 projections) | T | (a) base us | ours us | ours / (a) | one-hot / (a) "
        "| ours' overhead / one-hot's | ours / (a), separate backward ops | their overhead / one-hot's "
        "| ours / (a), s recomputed (serving forwards) | ours / (a), separate ops, dA/dB by the XLA-native op "
        "| floor / (a): LoRA's MXU work alone | floor / (a) with dA's pass over x "
        "| ours / (a), not arranged | ours / (a), norms outside the kernels | ours / (a), dB in a pass of its own |"
    )
    header += " ours / (a), dx on a bf16 copy of the weight |" if int8 else ""
    lines = [header, "|---" * (18 if int8 else 17) + "|"]
    for row in rows:
        layer = row["layer"] + (", int8 base" if row.get("base_weights") == "int8" else "")
        line = (
            f"| {row['chip']} | {layer} | {row['tokens']} | {row['base'] * 1e6:.0f} | {row['ours'] * 1e6:.0f} "
            f"| {row['ratio_ours']:.3f} | {row['ratio_onehot']:.3f} | {row['overhead_vs_onehot']:.2f} "
            f"| {row['ratio_ours_separate']:.3f} | {row['overhead_vs_onehot_separate']:.2f} "
            f"| {row['ratio_ours_recomputed_s']:.3f} | {row['ratio_ours_xla_weight_grad']:.3f} "
            f"| {row['ratio_floor']:.3f} | {row['ratio_floor_with_x_pass']:.3f} "
            f"| {row['ratio_ours_unarranged']:.3f} | {row['ratio_ours_norms_outside']:.3f} "
            f"| {row['ratio_ours_db_own_pass']:.3f} |"
        )
        lines.append(line + (f" {row['ratio_ours_dequantized_dx']:.3f} |" if int8 else ""))
    return "\n".join(lines)
