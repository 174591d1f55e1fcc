"""The per-shard regions of LoRA layers on an SPMD mesh, as opaque custom ops.

Each region enters manual sharding (``enable_manual_sharding``: every device
gets its local shard), runs the LoRA op on local shapes, and leaves it
(``disable_manual_sharding``) with the global result. Dynamo cannot trace the
manual-sharding calls, so each region is a ``torch.library.custom_op`` with a
fake that gives the global output shape: ``torch.compile(backend="openxla")``
sees one node per layer, and the implementation runs when torch_xla traces
the graph, as torch_xla's own Pallas wrappers do.

The op arguments are the layer's tensors and one string, the placement's
``key`` (mesh, axes, kind; see :class:`torch_xla_lora.sharding.LayerSharding`):
the op is a pure function of its arguments, with no registry to look up.

``metadata`` is the batch's token grouping built on the host for the local
shard shapes, [dp, K] int32 split over the data axis (one row per data shard,
whose tokens differ), or None to group on the device.

With ``LoRAConfig.base_fusion`` the base matmul runs inside the region too:
each shard calls ``linear_lora`` (the base product and the LoRA in one op) on
its local weight shard, so x is read once and the output written once per
shard, as on one device.

Every region but the pooled ones (``sharded_pooled_*``: serving only; a layer
whose operands need gradients gathers its lanes into slots and runs the slot
regions) is differentiable (``register_autograd``, at the end of this
module), and each backward is a region too: one custom op with a fake
(``sharded_*_backward``) that runs the one-device ops (``bgmv_shrink``,
``bgmv_expand``, ``bgmv_weight_grad``; for expert layers also ``grouped_matmul``
and ``grouped_matmul_weight_grad``) on the local shards. A gradient that
several shards compute parts of (a replicated tensor's: A of a column layer,
B of a row layer or embedding, every slot tensor under data parallelism)
leaves the region as the shards' partials stacked on the axes they differ
over, and one sum reduces them: the partitioner lowers it to one all-reduce
(see :func:`_leave_summed` and docs/distributed.md, "Training on a mesh").
"""

from __future__ import annotations

import ast
import functools
import math
from typing import TYPE_CHECKING

import torch

from torch_xla_lora.layers.embedding import scaled

if TYPE_CHECKING:
    from torch_xla_lora.sharding import LayerSharding

__all__ = [
    "sharded_linear",
    "sharded_linear_lora",
    "sharded_row_linear",
    "sharded_embedding",
    "sharded_grouped_matmul",
    "sharded_gather_slots",
    "sharded_pooled_lora",
    "sharded_pooled_linear_lora",
    "sharded_pooled_row_linear",
    "replicated",
]


@functools.lru_cache(maxsize=64)
def _placement(key: str) -> LayerSharding:
    from torch_xla_lora.sharding import LayerSharding

    return LayerSharding.from_key(key)


def _local_metadata(p: LayerSharding, metadata: torch.Tensor | None) -> torch.Tensor | None:
    """This data shard's row of the host-built metadata, [K]."""
    if metadata is None:
        return None
    return p.enter(metadata, (p.data_axis, None), placed=True).reshape(-1)


def _placed(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` already carries a sharding (a buffer marked by ``apply``, data sent by ``send_batch``,
    or a tensor a region entered before): then it is entered as it is, without marking it again."""
    import torch_xla

    return bool(torch_xla._XLAC._get_xla_sharding_spec(tensor))


def _enter_factor(p: LayerSharding, factor: torch.Tensor, spec: tuple) -> torch.Tensor:
    """Local shard of a slot tensor: the buffer as ``apply`` marked it, or what ``layer.slot_factors()``
    computed from it in the graph (trainable adapters' rows put into the slots), marked on entry."""
    return p.enter(factor, spec, placed=_placed(factor))


def _enter_slots(p: LayerSharding, slots: torch.Tensor) -> torch.Tensor:
    """Local slots: per-token slots arrive as device data placed by ``send_batch``,
    per-row slots as their expansion to tokens (not yet sharded)."""
    return p.enter(slots, (p.data_axis,), placed=_placed(slots))


@torch.library.custom_op("xla_lora::sharded_linear", mutates_args=())
def sharded_linear(
    inputs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    base: torch.Tensor,
    lora_indices: torch.Tensor,
    metadata: torch.Tensor | None,
    key: str,
    backend: str,
) -> torch.Tensor:
    """Column, vocab (lm_head) or replicated linear layer's LoRA update, per shard.

    Args:
      inputs: [N, in]; base: [N, out], the base layer's output, sharded like B's columns.
      lora_a: [L, R, in]; lora_b: [L, R, out]; lora_indices: [N] int32.
      metadata: [dp, K] int32 or None (see the module docstring).

    Returns:
      [N, out] = base + the LoRA product, sharded on out (and tokens over dp).

    x and A are replicated over the model axis, so each shard runs the fused
    shrink-expand into its own columns of B and the base output. With
    ``fully_sharded`` A is split on the rank: separate shrink, one all-gather
    of the [N, R] intermediate, expand.
    """
    p = _placement(key)
    tokens, out_axis = p.data_axis, p.out_axis
    specs = p.lora_specs_linear()
    idx = _enter_slots(p, lora_indices)
    x, y = p.enter(inputs, (tokens, None)), p.enter(base, (tokens, out_axis))
    a, b = _enter_factor(p, lora_a, specs["lora_a"]), _enter_factor(p, lora_b, specs["lora_b"])
    rank_axis = specs["lora_a"][1]
    if rank_axis is None:
        out = torch.ops.xla_lora.bgmv_shrink_expand(x, a, b, y, idx, 1.0, backend, _local_metadata(p, metadata))
    else:
        s = torch.ops.xla_lora.bgmv_shrink(x, a, idx, 1.0, backend)  # [N_local, R / n]
        # The expand needs all R ranks: gather the small [N, R] intermediate.
        s = p.enter(p.leave(s, (tokens, rank_axis), (inputs.shape[0], lora_a.shape[1])), (tokens, None))
        out = torch.ops.xla_lora.bgmv_expand(s, b, y, idx, True, backend)
    return p.leave(out, (tokens, out_axis), tuple(base.shape))


@sharded_linear.register_fake
def _(inputs, lora_a, lora_b, base, lora_indices, metadata, key, backend):
    return torch.empty_like(base)


@torch.library.custom_op("xla_lora::sharded_linear_lora", mutates_args=())
def sharded_linear_lora(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    metadata: torch.Tensor | None,
    weight_layout: str,
    key: str,
    backend: str,
    own_metadata: bool = False,
) -> torch.Tensor:
    """Column, vocab (lm_head) or replicated linear layer, base and LoRA in one op per shard.

    Args:
      inputs: [N, in]; weight: [out, in] ("out_in", nn.Linear) or [in, out] ("in_out",
        Conv1D), sharded on out like B; bias: [out] or None; lora_a: [L, R, in]
        (replicated); lora_b: [L, R, out]; lora_indices: [N] int32.
      metadata: [dp, K] int32 or None (see the module docstring); own_metadata: it
        was built for ``linear_lora``'s own plan (see ``ops.batch_metadata``).

    Returns:
      [N, out] = x W^T + bias + the LoRA product, in inputs' dtype, sharded on out
      (and tokens over dp).

    Each shard runs ``linear_lora`` on its own columns of W, bias and B: the
    same placement as the separate path's, so no collective either.
    """
    p = _placement(key)
    tokens, out_axis = p.data_axis, p.out_axis
    specs = p.lora_specs_linear()
    idx = _enter_slots(p, lora_indices)
    x, w, local_bias = _enter_column_base(p, inputs, weight, bias, weight_layout)
    a, b = _enter_factor(p, lora_a, specs["lora_a"]), _enter_factor(p, lora_b, specs["lora_b"])
    meta = _local_metadata(p, metadata)
    out = torch.ops.xla_lora.linear_lora(x, w, local_bias, a, b, idx, 1.0, weight_layout, backend, meta, own_metadata)
    return p.leave(out, (tokens, out_axis), (inputs.shape[0], lora_b.shape[2]))


def _enter_column_base(
    p: LayerSharding, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_layout: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A column layer's base operands on this shard: x [N_local, in] (whole features), its columns of W (in
    ``weight_layout``) and of the bias."""
    out_axis = p.out_axis
    x = p.enter(inputs, (p.data_axis, None))
    w = p.enter(weight, (out_axis, None) if weight_layout == "out_in" else (None, out_axis), placed=True)
    return x, w, None if bias is None else p.enter(bias, (out_axis,), placed=True)


@sharded_linear_lora.register_fake
def _(inputs, weight, bias, lora_a, lora_b, lora_indices, metadata, weight_layout, key, backend, own_metadata=False):
    return inputs.new_empty((inputs.shape[0], lora_b.shape[2]))


@torch.library.custom_op("xla_lora::sharded_row_linear", mutates_args=())
def sharded_row_linear(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    metadata: torch.Tensor | None,
    transposed: bool,
    key: str,
    backend: str,
    fuse_base: bool = False,
    own_metadata: bool = False,
    weight_scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    block_size: int = -1,
) -> torch.Tensor:
    """Row-parallel linear layer, base and LoRA, reduced once (bias not added).

    Args:
      inputs: [N, in]; weight: the base weight, [out, in] (nn.Linear) or [in, out]
        (Conv1D, ``transposed``); lora_a: [L, R, in]; lora_b: [L, R, out].
      lora_indices: [N] int32; metadata: [dp, K] int32 or None.
      fuse_base: each shard runs ``linear_lora`` (base and LoRA partial in one
        op; inputs, weight and adapters then share one dtype); own_metadata: the
        metadata was built for ``linear_lora``'s own plan.
      weight_scale, zero_point, block_size: a torch_xla quantized base (``XlaQuantizedLinear``): weight is
        its int8 weight, [out, in] per channel (scales and zero points [out], whole on every shard) or
        [in / bs, bs, out] blockwise (``block_size`` bs; scales and zero points [in / bs, out], split on
        the blocks like the weight). Each shard runs torch_xla's own ``quantized_matmul`` on its slice:
        linear in x, so the shards' products sum to the one-device product.

    Returns:
      [N, out] in weight's dtype (a quantized base: inputs' dtype promoted with the scales'): sum over
      shards of x_k W_k^T + B A_k x_k.

    Each shard multiplies its input slice by its weight slice and adds its
    LoRA partial product (the fused op, expand being linear in the shrink);
    the partials leave the region stacked on the model axis and one sum (one
    all-reduce) reduces base and LoRA together.
    """
    p = _placement(key)
    tokens = p.data_axis
    specs = p.lora_specs_linear()
    x = p.enter(inputs, (tokens, p.axis))
    idx = _enter_slots(p, lora_indices)
    a, b = _enter_factor(p, lora_a, specs["lora_a"]), _enter_factor(p, lora_b, specs["lora_b"])
    meta = _local_metadata(p, metadata)
    if fuse_base and weight_scale is None:
        # x_k W_k^T + B A_k x_k in one op on the local K slice; the bias is added after the reduction.
        w = p.enter(weight, (p.axis, None) if transposed else (None, p.axis), placed=True)
        layout = "in_out" if transposed else "out_in"
        partial = torch.ops.xla_lora.linear_lora(x, w, None, a, b, idx, 1.0, layout, backend, meta, own_metadata)
        return p.reduce(partial, inputs.shape[0])
    partial = _row_partial(p, x, inputs, weight, transposed, weight_scale, zero_point, block_size)
    lora = torch.ops.xla_lora.bgmv_shrink_expand(x.to(a.dtype), a, b, partial.to(b.dtype), idx, 1.0, backend, meta)
    # Reduced in the model's dtype, as the base layer alone would be.
    return p.reduce(lora.to(partial.dtype), inputs.shape[0])


def _row_partial(
    p: LayerSharding,
    x: torch.Tensor,
    inputs: torch.Tensor,
    weight: torch.Tensor,
    transposed: bool,
    weight_scale: torch.Tensor | None,
    zero_point: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """A row-parallel base's partial product on this shard, x_k W_k^T ([N_local, out]): the model's dtype, or of a
    torch_xla quantized base (``weight_scale`` given) its own ``quantized_matmul`` on the shard's input slice, the
    scales and zero points as ``apply`` placed them (:func:`sharded_row_linear`'s arguments)."""
    w_spec = (p.axis, None) if transposed else (None, p.axis)
    if block_size != -1:
        w_spec = (p.axis, None, None)  # blockwise [in / bs, bs, out]: whole blocks per shard
    w = p.enter(weight, w_spec, placed=True)
    if weight_scale is None:
        return x @ w if transposed else x @ w.T
    per_output = (None,) if block_size == -1 else (p.axis, None)
    scale = p.enter(weight_scale, per_output, placed=True)
    zero = None if zero_point is None else p.enter(zero_point, per_output, placed=True)
    partial = torch.ops.xla.quantized_matmul(x, w, scale, zero, block_size=block_size)
    return partial.to(_quantized_dtype(inputs, weight_scale))


@sharded_row_linear.register_fake
def _(
    inputs,
    weight,
    lora_a,
    lora_b,
    lora_indices,
    metadata,
    transposed,
    key,
    backend,
    fuse_base=False,
    own_metadata=False,
    weight_scale=None,
    zero_point=None,
    block_size=-1,
):
    dtype = weight.dtype if weight_scale is None else _quantized_dtype(inputs, weight_scale)
    return inputs.new_empty((inputs.shape[0], lora_b.shape[2]), dtype=dtype)


def _quantized_dtype(inputs: torch.Tensor, weight_scale: torch.Tensor) -> torch.dtype:
    """The output dtype of a quantized base's row region: the activations' promoted with the scales'."""
    return torch.promote_types(inputs.dtype, weight_scale.dtype)


@torch.library.custom_op("xla_lora::sharded_embedding", mutates_args=())
def sharded_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    scale: torch.Tensor | None,
    scale_value: float | None,
    key: str,
    backend: str,
    padding_idx: int | None = None,
    pool_rows: torch.Tensor | None = None,
    pool_scale: torch.Tensor | None = None,
    pool_b_scale: torch.Tensor | None = None,
    pool_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Vocab-parallel (or replicated) embedding with LoRA: masked local lookups, one reduction.

    Args:
      ids: [N] integer; weight: [vocab, D]; lora_a: [L, vocab, R] (token-major);
      lora_b: [L, R, D]; lora_indices: [N] int32.
      scale, scale_value: the base embedding's ``embed_scale`` (see
        :func:`torch_xla_lora.layers.embedding.embed_scale`) when it is a
        one-element tensor or a number, else None.
      padding_idx: the base embedding's ``padding_idx`` (its row gets no weight
        gradient, as ``nn.Embedding`` gives it none), or None. The output does not
        depend on it.
      pool_rows, pool_scale, pool_b_scale, pool_dtype: with rank-true storage, the batch's row table [L, R]
        (replicated), A's and B's int8 scales [1, rows] (or None) and the adapters' dtype: lora_a is then A's
        pool [1, vocab, rows] (split on the vocabulary), from which each token's R values are read at its id
        and its lane's rows, and lora_b B's pool [1, rows, D] (whole), of which ``pooled_expand`` reads the
        lanes' true-rank rows, as on one device.

    Returns:
      [N, D] in weight's dtype.

    Each shard looks up the ids in its vocabulary range, base row and A row
    alike, and zeroes the others; the shards' partial outputs (base plus
    LoRA expand) are summed once, as for a row layer. A scaled embedding's
    base rows and A rows are multiplied by its scale as on one device (the
    base module's own forward, which scales its lookup, does not run here).
    """
    p = _placement(key)
    look = _Lookup(p, ids, weight, lora_a, lora_indices, scale, scale_value)
    w = p.enter(weight, (look.vocab_axis, None), placed=True)
    a = _enter_factor(p, lora_a, (None, look.vocab_axis, None))  # [L, vocab_local, R] (a pool: [1, vocab_local, rows])
    base = scaled(torch.where(look.inside, w.index_select(0, look.local), 0), look.factor)  # [N_local, D]
    b = _enter_factor(p, lora_b, (None, None, None))
    if pool_rows is None:
        partial = torch.ops.xla_lora.bgmv_expand(look.a_rows(a), b, base.to(b.dtype), look.idx, True, backend)
    else:
        table = p.enter(pool_rows, (None, None), placed=_placed(pool_rows))
        s = look.pooled_a_rows(p, a, table, pool_scale, pool_dtype)  # [N_local, R]
        b_scale = None if pool_b_scale is None else p.enter(pool_b_scale, (None, None), placed=True)[0]
        partial = torch.ops.xla_lora.pooled_expand(s, b[0], base.to(pool_dtype), look.idx, table, b_scale, backend)
    partial = partial.to(base.dtype)  # reduced in the model's dtype, as the base lookup alone would be
    if look.vocab_axis is None:
        return p.leave(partial, (p.data_axis, None), (ids.shape[0], weight.shape[1]))
    return p.reduce(partial, ids.shape[0])


@sharded_embedding.register_fake
def _(ids, weight, lora_a, lora_b, lora_indices, scale, scale_value, key, backend, padding_idx=None, *pooled):
    return weight.new_empty((ids.shape[0], weight.shape[1]))


class _Lookup:
    """One shard's view of an embedding region's ids (inside the region): local rows, mask, slots, scale."""

    def __init__(self, p, ids, weight, lora_a, lora_indices, scale, scale_value) -> None:
        self.vocab_axis = p.axis if p.kind == "vocab" else None
        shards = p.shards if self.vocab_axis else 1
        self.vocab, self.rank = weight.shape[0] // shards, lora_a.shape[2]  # rows per shard
        self.idx = _enter_slots(p, lora_indices)
        # This shard's first vocabulary row: the shard's element of an iota split over the axis.
        shard = p.enter(torch.arange(shards, dtype=torch.int32, device=ids.device), (self.vocab_axis,))
        local = p.enter(ids, (p.data_axis,)).to(torch.int32) - shard * self.vocab  # [N_local]
        self.inside = ((local >= 0) & (local < self.vocab))[:, None]
        self.local = local.clamp(0, self.vocab - 1)
        self.factor = p.enter(scale.reshape(1), (None,)) if scale is not None else scale_value
        # Row of (slot, local id) in A's [L * vocab_local, R] view; -1 slots read slot 0 and add zero in expand.
        self.rows = self.idx.clamp(0, lora_a.shape[0] - 1) * self.vocab + self.local

    def pooled_a_rows(
        self, p, pool: torch.Tensor, table: torch.Tensor, pool_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """[N_local, R] in ``dtype``: each token's (scaled) A row read from this shard's slice of A's pool [1,
        vocab_local, rows] at its local id and its lane's rows of the row table [L, R] (int8 values
        dequantised), zero for ids of other shards."""
        lane_rows = table.long().index_select(0, self.idx.clamp(0, table.shape[0] - 1).long())  # [N_local, R]
        s = pool.reshape(-1)[self.local[:, None].long() * pool.shape[2] + lane_rows]
        if pool_scale is not None:
            row_scale = p.enter(pool_scale, (None, None), placed=True)[0]
            s = s.to(torch.float32) * row_scale[lane_rows]
        return scaled(torch.where(self.inside, s.to(dtype), 0), self.factor)

    def a_rows(self, a: torch.Tensor) -> torch.Tensor:
        """[N_local, R]: each token's (scaled) A row on this shard, zero for ids of other shards."""
        rows = a.reshape(-1, self.rank).index_select(0, self.rows)
        return scaled(torch.where(self.inside, rows, 0), self.factor)


@torch.library.custom_op("xla_lora::sharded_grouped_matmul", mutates_args=())
def sharded_grouped_matmul(
    rows: torch.Tensor,
    weight: torch.Tensor,
    group_sizes: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    lora_rows: torch.Tensor | None,
    transposed: bool,
    row_parallel: bool,
    key: str,
    backend: str,
    pool_table: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    pool_dtype: torch.dtype | None = None,
    pool_pages: torch.Tensor | None = None,
    page_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """One projection of a mixture-of-experts layer, tensor (and expert) parallel, per shard.

    Args:
      rows: [S, in], the routed rows sorted by expert (with an expert axis, the down projection's
        input is the up projection's stacked output, [n, S, width]); weight: [E, out, in]
        ([E, in, out] if ``transposed``); group_sizes: [E] int32 (rows per expert, device data).
      lora_a: [L * E, R, in]; lora_b: [L * E, R, out]; lora_rows: [S] int32, each row's
        (slot, expert) entry (outside [0, L * E): no LoRA); all three None: the base alone.
      row_parallel: the down projection (split on its input, the expert width); else the
        up projection (split on its output).
      pool_table, a_scale, b_scale, pool_dtype: with rank-true storage read in place, the (lane, expert) entries'
        row table [L * E, R] into the pools seen as [E * (P + 2), width] (``ExpertsWithLoRA._entry_tables``,
        replicated), the pools' int8 scales [E, P + 2] (or None) and the adapters' dtype: lora_a and lora_b are
        then the pools [E, P + 2, in or out], split as the slot buffers they stand for, and each shard runs
        ``pooled_shrink_expand`` on its slices of them, each entry at its true rank, as one device does.
      pool_pages, page_scales: the entries' page table (``ExpertsWithLoRA._entry_tables``) and an int8 layer's
        kept page scales of this projection, G pools to a tile (replicated: every shard holds all E pools' rows),
        which the pooled kernel reads as on one device; None: derived per shard in the graph.

    Returns:
      without bias, in rows' dtype: the up projection [S, out] split on out, or with an expert
      axis of n shards [n, S, out] (each expert shard's rows, zero for other experts' rows),
      split on the stack and on out; the down projection [S, out] reduced (replicated).

    Every shard holds all experts (with an expert axis: its E / n experts), each cut to its
    slice of the expert width, and all S rows (the sort by expert is global, so the rows are
    replicated over every other axis); ``group_sizes`` is the same on every shard. Up: the
    grouped matmul of the rows by the local weight slice gives the shard's output columns, and
    the LoRA expand writes into them with the local columns of B (A whole): no collective.
    Down: each shard's grouped matmul reads its slice of the width, the LoRA shrink its slice
    of A (B whole), and the partial products leave stacked on the model (and expert) axis: one
    sum, the base's one all-reduce. With an expert axis see :class:`_ExpertRows`. The backward is
    :func:`sharded_grouped_matmul_backward`.
    """
    p = _placement(key)
    view = _ExpertRows(p, rows, weight, group_sizes, lora_rows, transposed, row_parallel)
    out = view.grouped(view.x, view.w, transposed)
    if lora_rows is not None and pool_table is not None:
        pools, scales, pages = (lora_a, lora_b), (a_scale, b_scale), _enter_pages(p, pool_pages, page_scales)
        out = _pooled_expert_lora(p, view, out, pools, pool_table, scales, pool_dtype, pages, backend)
    elif lora_rows is not None:
        out = _expert_lora(p, view.x, out, lora_a, lora_b, view.idx, row_parallel, backend)
    width = weight.shape[2] if transposed else weight.shape[1]
    count = view.x.shape[0]
    if not row_parallel:
        if p.expert_axis is None:
            return p.leave(out, view.out_spec, (count, width))
        return p.leave(out[None], view.out_spec, (p.expert_shards, count, width))
    # Reduced in the rows' dtype, as the base projection alone would be.
    return _leave_summed(p, out, (None, None), (count, width), (p.expert_axis, p.axis), float32=False)


def _expert_specs(p: LayerSharding, row_parallel: bool) -> tuple[tuple, tuple]:
    """(lora_a's, lora_b's) partition spec of an expert projection's slot buffers [L * E, R, in or out]."""
    axis = p.axis
    return ((None, None, axis), (None, None, None)) if row_parallel else ((None,) * 3, (None, None, axis))


def _expert_lora(p, x, out, lora_a, lora_b, idx, row_parallel: bool, backend: str) -> torch.Tensor:
    """``out`` plus each row's (slot, expert) LoRA of ``x``, on this shard's slices of the slot buffers."""
    a_spec, b_spec = _expert_specs(p, row_parallel)
    a, b = _enter_factor(p, lora_a, a_spec), _enter_factor(p, lora_b, b_spec)
    lora = torch.ops.xla_lora.bgmv_shrink_expand(x.to(a.dtype), a, b, out.to(b.dtype), idx, 1.0, backend, None)
    return lora.to(out.dtype)


def _pooled_expert_lora(p, view, out, pools, table, scales, dtype, pages: tuple, backend: str) -> torch.Tensor:
    """``out`` plus each routed row's (lane, expert) LoRA read from this shard's slices of the pools [E, P + 2,
    width] at the entry's true rank (``pooled_shrink_expand`` on them seen as [E * (P + 2), width]; ``pages``:
    the entries' page table and the kept page scales, each whole on this shard, or None)."""
    specs = _expert_specs(p, view.row_parallel)
    a, b = (p.enter(t, spec, placed=True) for t, spec in zip(pools, specs, strict=True))  # stacked pools
    a_scale, b_scale = (None if t is None else p.enter(t, (None, None), placed=True).flatten() for t in scales)
    local_table = p.enter(table, (None, None), placed=_placed(table))
    x, y = view.x.to(dtype), out.to(dtype)
    lora = torch.ops.xla_lora.pooled_shrink_expand(
        x, a, b, y, view.idx, local_table, a_scale, b_scale, 1.0, backend, None, *pages
    )
    return lora.to(out.dtype)


class _ExpertRows:
    """One shard's view of an expert projection's routed rows (inside the region, forward and backward).

    ``x``: the local rows, [S, in] (the down projection: [S, width / tp], with an expert axis this expert
    shard's slice of the up projection's stacked output); ``w``: the local expert weights; ``idx``: each row's
    (slot, expert) entry, -1 for rows of other expert shards' experts; ``in_spec``/``out_spec``: how the rows
    and the output (before any reduction) are split.

    With an expert axis (n shards) each device holds E / n contiguous experts, whose rows are one contiguous
    run of the sorted rows, starting at the rows of the experts before them (``offset``, device data).
    :meth:`grouped` rotates the rows so that the run starts at row 0, multiplies them by the local groups
    (rows past them: zeros) and rotates back: two row gathers of [S, width / tp], no weight gathered.
    """

    def __init__(self, p, rows, weight, group_sizes, lora_rows, transposed: bool, row_parallel: bool) -> None:
        axis, experts_axis = p.axis, p.expert_axis
        self.row_parallel = row_parallel
        if experts_axis is not None and row_parallel:  # the up projection's stacked output
            self.in_spec = (experts_axis, None, axis)
            self.x = p.enter(rows, self.in_spec)[0]
        else:
            self.in_spec = (None, axis) if row_parallel else (None, None)
            self.x = p.enter(rows, self.in_spec)
        if row_parallel:
            self.out_spec = (None, None)  # after the reduction
        else:
            self.out_spec = (None, axis) if experts_axis is None else (experts_axis, None, axis)
        self.w = p.enter(weight, p.expert_weight_spec(transposed, row_parallel), placed=True)
        sizes = p.enter(group_sizes, (None,))
        idx = None if lora_rows is None else p.enter(lora_rows, (None,))
        self.order = self.back = None
        if experts_axis is None:
            self.sizes, self.idx = sizes, idx
            return
        experts, device, count = weight.shape[0], rows.device, self.x.shape[0]
        local_experts = experts // p.expert_shards
        # This shard's first expert, and the first row of its experts' run (every operand entered: all manual).
        shard = p.enter(torch.arange(p.expert_shards, dtype=torch.int32, device=device), (experts_axis,))
        first = shard * local_experts  # [1]
        expert = p.enter(torch.arange(experts, dtype=torch.int32, device=device), (None,))
        within = p.enter(torch.arange(local_experts, dtype=torch.int32, device=device), (None,))
        self.sizes = sizes.index_select(0, first + within)
        offset = torch.where(expert < first, sizes, 0).sum()
        position = p.enter(torch.arange(count, dtype=torch.int32, device=device), (None,))
        self.order, self.back = (position + offset) % count, (position - offset) % count
        if idx is not None:  # the LoRA entries of other experts' rows: "no LoRA"
            mine = (position >= offset) & (position < offset + self.sizes.sum())
            idx = torch.where(mine, idx, -1)
        self.idx = idx

    def grouped(self, x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
        """The grouped matmul of the rows ``x`` (sorted order) by the local groups of ``w``; other rows zero."""
        from torch_xla_lora.ops._grouped import grouped_matmul

        if self.order is None:
            return grouped_matmul(x, w, self.sizes, transposed)
        out = grouped_matmul(x.index_select(0, self.order), w, self.sizes, transposed)
        return out.index_select(0, self.back)  # sorted order; other experts' rows zero

    def weight_grad(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Each local group's ``left^T right`` over its rows (sorted order): [E (/ n), P, Q]."""
        from torch_xla_lora.ops._grouped import grouped_matmul_weight_grad

        if self.order is not None:
            left, right = left.index_select(0, self.order), right.index_select(0, self.order)
        return grouped_matmul_weight_grad(left, right, self.sizes)


@sharded_grouped_matmul.register_fake
def _(rows, weight, group_sizes, lora_a, lora_b, lora_rows, transposed, row_parallel, key, backend, *pooled):
    width = weight.shape[2] if transposed else weight.shape[1]
    p = _placement(key)
    if p.expert_axis is not None and not row_parallel:
        return rows.new_empty((p.expert_shards, rows.shape[0], width))
    return rows.new_empty((rows.shape[-2], width))


@torch.library.custom_op("xla_lora::sharded_gather_slots", mutates_args=())
def sharded_gather_slots(
    pool: torch.Tensor,
    scale: torch.Tensor | None,
    rows: torch.Tensor,
    rank_axis: int,
    max_loras: int,
    dtype: torch.dtype,
    spec: str,
    key: str,
) -> torch.Tensor:
    """A batch's lanes gathered from a rank-true pool into the slot layout, per shard (no collective).

    Args:
      pool: [k, *slot] with the rank axis holding the pool's rows (int8 or the adapters' dtype), split as
        ``LayerSharding.pool_specs`` gives (the features of the slot buffer it stands for).
      scale: [k, rows] float32 for an int8 pool (replicated), else None.
      rows: [max_loras * max_rank] int32, the batch's lane-major row table (replicated).
      rank_axis: the rank axis within one slot; spec: the slot buffer's partition spec, as ``repr``.

    Returns:
      [max_loras * k, *slot] in ``dtype`` (int8 rows dequantised), split by ``spec``: what the padded
      slot buffer would hold, read by the layer's region as its ``lora_a``/``lora_b``.

    The rows table and the scales are whole on every shard and the pool's row axis is never split, so each
    shard gathers its own feature slice of every row: :func:`torch_xla_lora.pool.gather_slots` on local
    shapes, the same function one device runs.
    """
    from torch_xla_lora import pool as pools

    p = _placement(key)
    slot_spec = ast.literal_eval(spec)
    local = p.enter(pool, slot_spec, placed=True)
    local_scale = None if scale is None else p.enter(scale, (None, None), placed=True)
    local_rows = p.enter(rows, (None,), placed=_placed(rows))
    out = pools.gather_slots(local, local_scale, local_rows, rank_axis, max_loras, dtype)
    return p.leave(out, slot_spec, _gathered_shape(pool, rows, rank_axis, max_loras))


def _gathered_shape(pool: torch.Tensor, rows: torch.Tensor, rank_axis: int, max_loras: int) -> tuple[int, ...]:
    shape = [pool.shape[0] * max_loras, *pool.shape[1:]]
    shape[1 + rank_axis] = rows.shape[0] // max_loras
    return tuple(shape)


@sharded_gather_slots.register_fake
def _(pool, scale, rows, rank_axis, max_loras, dtype, spec, key):
    return pool.new_empty(_gathered_shape(pool, rows, rank_axis, max_loras), dtype=dtype)


@torch.library.custom_op("xla_lora::sharded_pooled_lora", mutates_args=())
def sharded_pooled_lora(
    inputs: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    base: torch.Tensor,
    lora_indices: torch.Tensor,
    rows: torch.Tensor,
    a_scale: torch.Tensor | None,
    b_scale: torch.Tensor | None,
    max_loras: int,
    key: str,
    backend: str,
    pages: torch.Tensor | None = None,
    page_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """A column, vocab (lm_head) or replicated linear layer's LoRA read from its rank-true pools, per shard.

    Args:
      inputs: [N, in]; base: [N, out], the base layer's output, sharded like B's columns.
      a_pool: [1, P + 2, in], b_pool: [1, P + 2, out]: the layer's pools (int8 or the adapters' dtype), split as
        ``LayerSharding.pool_specs`` gives (A whole, B on its columns); a_scale, b_scale: [1, P + 2] float32 of an
        int8 pool (replicated), else None.
      lora_indices: [N] int32, each token's lane; rows: [max_loras * R] int32, the batch's row table (replicated).
      pages, page_scales: the batch's host-built page table and an int8 pool's kept page scales (both
        replicated), which the pooled kernel reads as on one device; None: derived per shard in the graph.

    Returns:
      [N, out] = base + each token's LoRA at its lane's true rank, sharded on out (and tokens over dp).

    Each shard runs ``pooled_shrink_expand`` on its columns of B's pool and of the base output, the same op one
    device runs, with no collective: where :func:`sharded_linear` reads slots that :func:`sharded_gather_slots`
    filled with every lane's ``max_rank`` rows per step, this reads only the lanes' true-rank rows. Serving
    only (no backward): a layer whose operands need gradients gathers into slots instead.
    """
    p = _placement(key)
    tokens, out_axis = p.data_axis, p.out_axis
    idx = _enter_slots(p, lora_indices)
    x, y = p.enter(inputs, (tokens, None)), p.enter(base, (tokens, out_axis))
    a, b, table, *scales = _enter_pools(p, a_pool, b_pool, rows, a_scale, b_scale, max_loras)
    out = torch.ops.xla_lora.pooled_shrink_expand(
        x, a, b, y, idx, table, *scales, 1.0, backend, None, *_enter_pages(p, pages, page_scales)
    )
    return p.leave(out, (tokens, out_axis), tuple(base.shape))


@sharded_pooled_lora.register_fake
def _(
    inputs, a_pool, b_pool, base, lora_indices, rows, a_scale, b_scale, max_loras, key, backend, pages=None,
    page_scales=None,
):  # fmt: skip
    return torch.empty_like(base)


@torch.library.custom_op("xla_lora::sharded_pooled_linear_lora", mutates_args=())
def sharded_pooled_linear_lora(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    lora_indices: torch.Tensor,
    rows: torch.Tensor,
    a_scale: torch.Tensor | None,
    b_scale: torch.Tensor | None,
    max_loras: int,
    weight_layout: str,
    key: str,
    backend: str,
    pages: torch.Tensor | None = None,
    page_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sharded_linear_lora` (a column, vocab or replicated layer with ``base_fusion``: base and LoRA in one
    op per shard) with the LoRA read from the layer's rank-true pools: each shard runs ``linear_lora_pooled`` on
    its columns of W, the bias and B's pool, A's pool whole, each token's lane at its true rank.

    Args:
      inputs, weight, bias, weight_layout: as :func:`sharded_linear_lora`; a_pool, b_pool, lora_indices, rows,
        a_scale, b_scale, max_loras, pages, page_scales: as :func:`sharded_pooled_lora`.

    Returns:
      [N, out] = x W^T + bias + each token's LoRA, in inputs' dtype, sharded on out (and tokens over dp).
    """
    from torch_xla_lora.ops._linear_fused import linear_lora_pooled

    p = _placement(key)
    tokens, out_axis = p.data_axis, p.out_axis
    idx = _enter_slots(p, lora_indices)
    x, w, local_bias = _enter_column_base(p, inputs, weight, bias, weight_layout)
    a, b, table, *scales = _enter_pools(p, a_pool, b_pool, rows, a_scale, b_scale, max_loras)
    local_pages, local_page_scales = _enter_pages(p, pages, page_scales)
    out = linear_lora_pooled(
        x, w, local_bias, a, b, idx, table, *scales, 1.0, weight_layout, backend,
        pages=local_pages, page_scales=local_page_scales,
    )  # fmt: skip
    return p.leave(out, (tokens, out_axis), (inputs.shape[0], b_pool.shape[2]))


@sharded_pooled_linear_lora.register_fake
def _(
    inputs, weight, bias, a_pool, b_pool, lora_indices, rows, a_scale, b_scale, max_loras, weight_layout, key,
    backend, pages=None, page_scales=None,
):  # fmt: skip
    return inputs.new_empty((inputs.shape[0], b_pool.shape[2]))


@torch.library.custom_op("xla_lora::sharded_pooled_row_linear", mutates_args=())
def sharded_pooled_row_linear(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    lora_indices: torch.Tensor,
    rows: torch.Tensor,
    a_scale: torch.Tensor | None,
    b_scale: torch.Tensor | None,
    max_loras: int,
    dtype: torch.dtype,
    transposed: bool,
    key: str,
    backend: str,
    weight_scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    block_size: int = -1,
    pages: torch.Tensor | None = None,
    page_scales: torch.Tensor | None = None,
    fuse_base: bool = False,
) -> torch.Tensor:
    """:func:`sharded_row_linear` (base and LoRA reduced once, bias not added) with the LoRA read from the layer's
    rank-true pools: each shard adds ``pooled_shrink_expand`` of its input slice to its base partial, or with
    ``fuse_base`` (a plain weight: ``base_fusion``) runs ``linear_lora_pooled`` on it, base partial and LoRA in one
    op.

    Args:
      inputs: [N, in]; weight: [out, in] (nn.Linear) or [in, out] (Conv1D, ``transposed``); or a torch_xla
        quantized base's int8 weight with ``weight_scale``, ``zero_point``, ``block_size`` as
        :func:`sharded_row_linear` takes them.
      a_pool: [1, P + 2, in] split on its columns as the input, b_pool: [1, P + 2, out] whole on every shard
        (``LayerSharding.pool_specs``); a_scale, b_scale: [1, P + 2] float32 of an int8 pool, else None.
      lora_indices: [N] int32; rows: [max_loras * R] int32, the batch's row table; dtype: the adapters' dtype
        (the LoRA product's); pages, page_scales: as :func:`sharded_pooled_lora` takes them.

    Returns:
      [N, out] in weight's dtype (a quantized base: inputs' promoted with the scales'): sum over shards of
      x_k W_k^T + B A_k x_k, each lane at its true rank.

    The pooled op is linear in x (its per-row scales included), so the shards' partials sum to the one-device
    LoRA, and base and LoRA share the one all-reduce. Serving only, as :func:`sharded_pooled_lora`.
    """
    p = _placement(key)
    tokens = p.data_axis
    x = p.enter(inputs, (tokens, p.axis))
    idx = _enter_slots(p, lora_indices)
    a, b, table, *scales = _enter_pools(p, a_pool, b_pool, rows, a_scale, b_scale, max_loras)
    page_inputs = _enter_pages(p, pages, page_scales)
    if fuse_base and weight_scale is None:
        from torch_xla_lora.ops._linear_fused import linear_lora_pooled

        # x_k W_k^T + B A_k x_k in one op on the local K slice; the bias is added after the reduction.
        w = p.enter(weight, (p.axis, None) if transposed else (None, p.axis), placed=True)
        layout = "in_out" if transposed else "out_in"
        kept = dict(zip(("pages", "page_scales"), page_inputs, strict=True))
        partial = linear_lora_pooled(x, w, None, a, b, idx, table, *scales, 1.0, layout, backend, **kept)
        return p.reduce(partial, inputs.shape[0])
    partial = _row_partial(p, x, inputs, weight, transposed, weight_scale, zero_point, block_size)
    lora = torch.ops.xla_lora.pooled_shrink_expand(
        x.to(dtype), a, b, partial.to(dtype), idx, table, *scales, 1.0, backend, None, *page_inputs
    )
    # Reduced in the model's dtype, as the base layer alone would be.
    return p.reduce(lora.to(partial.dtype), inputs.shape[0])


@sharded_pooled_row_linear.register_fake
def _(
    inputs,
    weight,
    a_pool,
    b_pool,
    lora_indices,
    rows,
    a_scale,
    b_scale,
    max_loras,
    dtype,
    transposed,
    key,
    backend,
    weight_scale=None,
    zero_point=None,
    block_size=-1,
    pages=None,
    page_scales=None,
    fuse_base=False,
):
    out_dtype = weight.dtype if weight_scale is None else _quantized_dtype(inputs, weight_scale)
    return inputs.new_empty((inputs.shape[0], b_pool.shape[2]), dtype=out_dtype)


def _enter_pools(
    p: LayerSharding,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    rows: torch.Tensor,
    a_scale: torch.Tensor | None,
    b_scale: torch.Tensor | None,
    max_loras: int,
) -> tuple[torch.Tensor | None, ...]:
    """A linear layer's pools on this shard, as ``pooled_shrink_expand`` takes them: (A [P + 2, in_local],
    B [P + 2, out_local], the row table [max_loras, R], A's scales, B's scales (None unless int8))."""
    specs = p.lora_specs_linear()
    a = p.enter(a_pool, specs["lora_a"], placed=True)[0]
    b = p.enter(b_pool, specs["lora_b"], placed=True)[0]
    scales = [None if t is None else p.enter(t, (None, None), placed=True)[0] for t in (a_scale, b_scale)]
    table = p.enter(rows, (None,), placed=_placed(rows)).reshape(max_loras, -1)
    return (a, b, table, *scales)


def _enter_pages(
    p: LayerSharding, pages: torch.Tensor | None, page_scales: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The page table and an int8 pool's page scales on this shard: whole (replicated), or None."""
    return tuple(None if t is None else p.enter(t, (None,), placed=_placed(t)) for t in (pages, page_scales))


@torch.library.custom_op("xla_lora::replicated", mutates_args=())
def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` replicated on every device (the same sharding on any mesh)."""
    import torch_xla.distributed.spmd as xs

    out = tensor.clone()
    if _placed(out):  # sharded device data, whose copy shares its data and sharding: copy a reshaped view
        out = tensor.reshape(-1).clone().reshape(tensor.shape)
    return xs.mark_sharding(out, _all_devices(), (None,) * out.dim()).global_tensor


@replicated.register_fake
def _(tensor):
    return torch.empty_like(tensor)


@functools.lru_cache(maxsize=1)
def _all_devices():
    import numpy as np
    import torch_xla.runtime as xr
    from torch_xla.distributed.spmd import Mesh

    count = xr.global_runtime_device_count()
    return Mesh(np.arange(count), (count,))


# -- autograd: each region's backward is a region too -------------------------------------------------
#
# The backward ops take the output gradient and the forward's tensors, and flags saying which gradients
# autograd needs; a gradient not needed is returned as an empty placeholder (custom ops return tensors).
# Inside, the same one-device ops as on one device (ops/_autograd.py: dx by shrink and expand with A and B
# swapped, dA and dB by bgmv_weight_grad) run on the local shards. What several shards compute parts of
# is summed by _leave_summed, once, over exactly the axes the parts differ over.

_ops = torch.ops.xla_lora
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _none(like: torch.Tensor) -> torch.Tensor:
    """The placeholder of a gradient autograd does not need."""
    return like.new_empty(0)


def _leave_summed(
    p: LayerSharding,
    partial: torch.Tensor,
    spec: tuple,
    shape: tuple[int, ...],
    over: tuple[str | None, ...],
    float32: bool = True,
) -> torch.Tensor:
    """The global tensor of ``shape``, split by ``spec``, that is the sum over the mesh axes ``over`` (None
    entries skipped) of every shard's ``partial``: the partials leave stacked on those axes and one sum
    reduces them (the partitioner lowers it to one all-reduce over the axes' devices).

    ``float32``: half-precision partials (the rank- and slot-sized ones) are summed in float32 and rounded
    once, as one device accumulates them; activation-sized ones (False) are reduced in their own dtype,
    as the base layer's own reduction is."""
    over = tuple(axis for axis in over if axis is not None)
    if not over:
        return p.leave(partial, spec, shape)
    dtype = partial.dtype
    if float32 and dtype in _LOW_PRECISION:
        partial = partial.float()
    # One stacking dimension split over all the axes at once: one sum, one all-reduce over their devices.
    count = math.prod(int(p.mesh.shape()[axis]) for axis in over)
    stacked = p.leave(partial[None], (over[0] if len(over) == 1 else over, *spec), (count, *shape))
    return stacked.sum(0).to(dtype)


def _rank_slice(p: LayerSharding, ds: torch.Tensor) -> torch.Tensor:
    """This shard's slice of the model axis of the ranks of ``ds`` [N_local, R] (inside a region)."""
    width = ds.shape[1] // p.shards
    # The shard's number, and the offsets within a slice, both entered: every operand of the region is manual.
    shard = p.enter(torch.arange(p.shards, dtype=torch.int32, device=ds.device), (p.axis,))
    within = p.enter(torch.arange(width, dtype=torch.int32, device=ds.device), (None,))
    return ds.index_select(1, shard * width + within)


# -- sharded_linear -------------------------------------------------------------------------------------


@torch.library.custom_op("xla_lora::sharded_linear_backward", mutates_args=())
def sharded_linear_backward(
    grad: torch.Tensor,
    inputs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    key: str,
    backend: str,
    need_inputs: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d inputs, d lora_a, d lora_b) of :func:`sharded_linear` (d base is ``grad``); empty where not needed.

    Per shard, on its columns of ``grad`` and B: ds = shrink(g, B) is a partial of the rank gradient when
    the columns are split, so it is summed over the model axis (one all-reduce of [N / dp, R]); dx and dA
    then follow from it on every shard, with no collective. With ``fully_sharded`` each shard holds a slice
    of A's ranks: dA takes the shard's slice of ds, dx needs the whole A (one all-gather of [L, R, in],
    rather than an all-reduce of [N / dp, in] partials), and dB the whole shrink (one all-gather of
    [N / dp, R], as the forward). dA and dB are summed over the data axis.
    """
    p = _placement(key)
    tokens, out_axis = p.data_axis, p.out_axis
    specs = p.lora_specs_linear()
    rank_axis = specs["lora_a"][1]
    n, slots = inputs.shape[0], lora_a.shape[0]
    idx = _enter_slots(p, lora_indices)
    x = p.enter(inputs, (tokens, None))
    a, b = _enter_factor(p, lora_a, specs["lora_a"]), _enter_factor(p, lora_b, specs["lora_b"])
    g = p.enter(grad, (tokens, out_axis)).to(b.dtype)
    dx = d_a = d_b = _none(grad)
    if need_inputs or need_a:
        ds = _ops.bgmv_shrink(g, b, idx, 1.0, backend)  # [N_local, R]
        if out_axis is not None:  # a partial over the column shards
            ds = p.enter(_leave_summed(p, ds, (tokens, None), (n, ds.shape[1]), (out_axis,)), (tokens, None))
        ds = ds.to(a.dtype)
        if need_inputs:
            whole_a = a if rank_axis is None else p.enter(p.leave(a, specs["lora_a"], lora_a.shape), (None,) * 3)
            dx_local = _ops.bgmv_expand(ds, whole_a, torch.zeros_like(x), idx, False, backend)
            dx = p.leave(dx_local, (tokens, None), tuple(inputs.shape))
        if need_a:
            ds_local = ds if rank_axis is None else _rank_slice(p, ds)  # [N_local, R (/ tp)]
            d_a_local = _ops.bgmv_weight_grad(ds_local.to(x.dtype), x, idx, slots, 1.0).to(lora_a.dtype)
            d_a = _leave_summed(p, d_a_local, specs["lora_a"], tuple(lora_a.shape), (tokens,))
    if need_b:
        s = _ops.bgmv_shrink(x, a, idx, 1.0, backend)  # [N_local, R (/ tp)]
        if rank_axis is not None:  # the whole shrink, as the forward gathers it
            s = p.enter(p.leave(s, (tokens, rank_axis), (n, lora_a.shape[1])), (tokens, None))
        d_b_local = _ops.bgmv_weight_grad(s.to(b.dtype), g, idx, slots, 1.0).to(lora_b.dtype)
        d_b = _leave_summed(p, d_b_local, specs["lora_b"], tuple(lora_b.shape), (tokens,))
    return dx, d_a, d_b


@sharded_linear_backward.register_fake
def _(grad, inputs, lora_a, lora_b, lora_indices, key, backend, need_inputs, need_a, need_b):
    return _fakes((inputs, need_inputs), (lora_a, need_a), (lora_b, need_b))


def _fakes(*pairs: tuple[torch.Tensor, bool]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty_like(t) if need else t.new_empty(0) for t, need in pairs)


def _linear_setup(ctx, inputs, output) -> None:
    x, lora_a, lora_b, _, indices, _, key, backend = inputs
    ctx.save_for_backward(x, lora_a, lora_b, indices)
    ctx.key, ctx.backend = key, backend


def _linear_backward(ctx, grad: torch.Tensor):
    x, lora_a, lora_b, indices = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _ops.sharded_linear_backward(grad, x, lora_a, lora_b, indices, ctx.key, ctx.backend, *need[:3])
    return *_needed(grads, need[:3]), grad if need[3] else None, None, None, None, None


def _needed(grads: tuple[torch.Tensor, ...], need: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    return tuple(g if n else None for g, n in zip(grads, need, strict=True))


# -- sharded_linear_lora --------------------------------------------------------------------------------


@torch.library.custom_op("xla_lora::sharded_linear_lora_backward", mutates_args=())
def sharded_linear_lora_backward(
    grad: torch.Tensor,
    inputs: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    weight_layout: str,
    key: str,
    backend: str,
    need_inputs: bool,
    need_weight: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d inputs, d weight, d lora_a, d lora_b) of :func:`sharded_linear_lora`; empty where not needed.

    Per shard, on its columns: dx_k = g_k W_k + (g_k B_k^T) A, whose sum over the model axis is the base
    layer's own all-reduce of [N / dp, in], now carrying LoRA's part too; dA_k = sum_t outer(g_k B_k^T, x)
    is a partial over the model axis and the data axis, summed once (one all-reduce of [L, R, in]); dB and
    dW are local to the columns, summed over the data axis (dW: the base's own data-parallel reduction).
    """
    p = _placement(key)
    tokens, out_axis = p.data_axis, p.out_axis
    specs = p.lora_specs_linear()
    out_in = weight_layout == "out_in"
    w_spec = (out_axis, None) if out_in else (None, out_axis)
    slots = lora_a.shape[0]
    idx = _enter_slots(p, lora_indices)
    x = p.enter(inputs, (tokens, None))
    w = p.enter(weight, w_spec, placed=True)
    a, b = _enter_factor(p, lora_a, specs["lora_a"]), _enter_factor(p, lora_b, specs["lora_b"])
    g = p.enter(grad, (tokens, out_axis))
    dx = d_w = d_a = d_b = _none(grad)
    if need_inputs or need_a:
        ds = _ops.bgmv_shrink(g.to(b.dtype), b, idx, 1.0, backend)  # [N_local, R], partial over the columns
        if need_inputs:
            dx_base = g @ w if out_in else g @ w.T
            dx_local = _ops.bgmv_expand(ds.to(a.dtype), a, dx_base, idx, True, backend)
            dx = _leave_summed(p, dx_local, (tokens, None), tuple(inputs.shape), (out_axis,), float32=False)
        if need_a:
            d_a_local = _ops.bgmv_weight_grad(ds.to(x.dtype), x, idx, slots, 1.0).to(lora_a.dtype)
            d_a = _leave_summed(p, d_a_local, specs["lora_a"], tuple(lora_a.shape), (tokens, out_axis))
    if need_b:
        s = _ops.bgmv_shrink(x, a, idx, 1.0, backend).to(b.dtype)
        d_b_local = _ops.bgmv_weight_grad(s, g.to(b.dtype), idx, slots, 1.0).to(lora_b.dtype)
        d_b = _leave_summed(p, d_b_local, specs["lora_b"], tuple(lora_b.shape), (tokens,))
    if need_weight:
        d_w_local = (g.T @ x if out_in else x.T @ g).to(weight.dtype)
        d_w = _leave_summed(p, d_w_local, w_spec, tuple(weight.shape), (tokens,))
    return dx, d_w, d_a, d_b


@sharded_linear_lora_backward.register_fake
def _(grad, inputs, weight, lora_a, lora_b, lora_indices, weight_layout, key, backend, *need):
    return _fakes(*zip((inputs, weight, lora_a, lora_b), need, strict=True))


def _linear_lora_setup(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, indices, _, layout, key, backend, _ = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, indices)
    ctx.layout, ctx.key, ctx.backend = layout, key, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_lora_backward(ctx, grad: torch.Tensor):
    x, weight, lora_a, lora_b, indices = ctx.saved_tensors
    need = ctx.needs_input_grad
    flags = (need[0], need[1], need[3], need[4])
    args = (grad, x, weight, lora_a, lora_b, indices, ctx.layout, ctx.key, ctx.backend)
    dx, d_w, d_a, d_b = _needed(_ops.sharded_linear_lora_backward(*args, *flags), flags)
    d_bias = None
    if need[2] and ctx.bias_dtype is not None:  # the bias is split like the columns: the partitioner sums the tokens
        d_bias = grad.sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)).to(ctx.bias_dtype)
    return dx, d_w, d_bias, d_a, d_b, *(None,) * 6


# -- sharded_row_linear ---------------------------------------------------------------------------------


@torch.library.custom_op("xla_lora::sharded_row_linear_backward", mutates_args=())
def sharded_row_linear_backward(
    grad: torch.Tensor,
    inputs: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    transposed: bool,
    key: str,
    backend: str,
    need_inputs: bool,
    need_weight: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d inputs, d weight, d lora_a, d lora_b) of :func:`sharded_row_linear`; empty where not needed.

    The output gradient is whole on every shard of the model axis (B is replicated), so ds = shrink(g, B)
    is too, and dx_k = g W_k + ds A_k, dA_k and dW_k are local to the shard's input slice: no collective
    on the model axis, the sums over the data axis only. dB = sum_t outer(s, g) needs the whole shrink
    s = sum_k A_k x_k: each shard's partial dB is summed over the model and data axes at once (one
    all-reduce of [L, R, out]), the reduction of B's replicated gradient.
    """
    p = _placement(key)
    tokens, axis = p.data_axis, p.axis
    specs = p.lora_specs_linear()
    w_spec = (axis, None) if transposed else (None, axis)
    slots = lora_a.shape[0]
    idx = _enter_slots(p, lora_indices)
    x = p.enter(inputs, (tokens, axis))  # [N_local, in / tp]
    w = p.enter(weight, w_spec, placed=True)
    a, b = _enter_factor(p, lora_a, specs["lora_a"]), _enter_factor(p, lora_b, specs["lora_b"])
    g = p.enter(grad, (tokens, None))  # [N_local, out], weight's dtype
    xa = x.to(a.dtype)  # the LoRA product reads x in the adapters' dtype
    dx = d_w = d_a = d_b = _none(grad)
    if need_inputs or need_a:
        ds = _ops.bgmv_shrink(g.to(b.dtype), b, idx, 1.0, backend)  # [N_local, R], whole
        if need_inputs:
            dx_base = (g @ w.T if transposed else g @ w).to(a.dtype)
            dx_local = _ops.bgmv_expand(ds.to(a.dtype), a, dx_base, idx, True, backend).to(inputs.dtype)
            dx = p.leave(dx_local, (tokens, axis), tuple(inputs.shape))
        if need_a:
            d_a_local = _ops.bgmv_weight_grad(ds.to(a.dtype), xa, idx, slots, 1.0).to(lora_a.dtype)
            d_a = _leave_summed(p, d_a_local, specs["lora_a"], tuple(lora_a.shape), (tokens,))
    if need_b:
        s = _ops.bgmv_shrink(xa, a, idx, 1.0, backend).to(b.dtype)  # this shard's part of the shrink
        d_b_local = _ops.bgmv_weight_grad(s, g.to(b.dtype), idx, slots, 1.0).to(lora_b.dtype)
        d_b = _leave_summed(p, d_b_local, specs["lora_b"], tuple(lora_b.shape), (tokens, axis))
    if need_weight:
        d_w_local = (x.T @ g if transposed else g.T @ x).to(weight.dtype)
        d_w = _leave_summed(p, d_w_local, w_spec, tuple(weight.shape), (tokens,))
    return dx, d_w, d_a, d_b


@sharded_row_linear_backward.register_fake
def _(grad, inputs, weight, lora_a, lora_b, lora_indices, transposed, key, backend, *need):
    return _fakes(*zip((inputs, weight, lora_a, lora_b), need, strict=True))


def _row_setup(ctx, inputs, output) -> None:
    x, weight, lora_a, lora_b, indices, _, transposed, key, backend, *_ = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, indices)
    ctx.transposed, ctx.key, ctx.backend = transposed, key, backend


def _row_backward(ctx, grad: torch.Tensor):
    x, weight, lora_a, lora_b, indices = ctx.saved_tensors
    flags = ctx.needs_input_grad[:4]
    grads = _ops.sharded_row_linear_backward(
        grad, x, weight, lora_a, lora_b, indices, ctx.transposed, ctx.key, ctx.backend, *flags
    )
    return *_needed(grads, flags), *(None,) * 10  # no training on a quantized base: refused before the region


# -- sharded_embedding ----------------------------------------------------------------------------------


@torch.library.custom_op("xla_lora::sharded_embedding_backward", mutates_args=())
def sharded_embedding_backward(
    grad: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    scale: torch.Tensor | None,
    scale_value: float | None,
    key: str,
    backend: str,
    padding_idx: int | None,
    need_weight: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d weight, d lora_a, d lora_b) of :func:`sharded_embedding`; empty where not needed.

    The output gradient is whole on every shard (the forward's reduction broadcasts back), so
    ds = shrink(g, B) is too: each shard adds its tokens' scaled ds into the A rows of its vocabulary
    range (and g into its weight rows), local to the shard, summed over the data axis. dB = sum_t
    outer(s, g) needs the whole A row of each token, which one shard holds: the shards' partial dB are
    summed over the model and data axes at once (one all-reduce of [L, R, D]).
    """
    p = _placement(key)
    look = _Lookup(p, ids, weight, lora_a, lora_indices, scale, scale_value)
    tokens, vocab_axis, slots = p.data_axis, look.vocab_axis, lora_a.shape[0]
    a = _enter_factor(p, lora_a, (None, vocab_axis, None))
    b = _enter_factor(p, lora_b, (None, None, None))
    g = p.enter(grad, (tokens, None))  # [N_local, D]
    d_w = d_a = d_b = _none(grad)
    if need_a:
        ds = scaled(_ops.bgmv_shrink(g.to(b.dtype), b, look.idx, 1.0, backend), look.factor)  # [N_local, R]
        valid = look.inside & ((look.idx >= 0) & (look.idx < slots))[:, None]
        ds = torch.where(valid, ds, 0).to(a.dtype)
        d_a_local = torch.zeros_like(a).reshape(-1, look.rank).index_add(0, look.rows, ds).reshape(a.shape)
        d_a = _leave_summed(p, d_a_local, (None, vocab_axis, None), tuple(lora_a.shape), (tokens,))
    if need_b:
        s = look.a_rows(a).to(b.dtype)  # this shard's tokens' A rows, zero for the others'
        d_b_local = _ops.bgmv_weight_grad(s, g.to(b.dtype), look.idx, slots, 1.0).to(lora_b.dtype)
        d_b = _leave_summed(p, d_b_local, (None, None, None), tuple(lora_b.shape), (tokens, vocab_axis))
    if need_weight:
        rows = torch.where(look.inside, scaled(g, look.factor), 0).to(weight.dtype)
        d_w_local = weight.new_zeros((look.vocab, weight.shape[1])).index_add(0, look.local, rows)
        d_w = _leave_summed(p, d_w_local, (vocab_axis, None), tuple(weight.shape), (tokens,))
        if padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            d_w = d_w.index_fill(0, torch.tensor([padding_idx], device=d_w.device), 0)
    return d_w, d_a, d_b


@sharded_embedding_backward.register_fake
def _(grad, ids, weight, lora_a, lora_b, lora_indices, scale, scale_value, key, backend, padding_idx, *need):
    return _fakes(*zip((weight, lora_a, lora_b), need, strict=True))


def _embedding_setup(ctx, inputs, output) -> None:
    ids, weight, lora_a, lora_b, indices, scale, scale_value, key, backend, padding_idx, *_ = inputs
    ctx.save_for_backward(ids, weight, lora_a, lora_b, indices, scale)
    ctx.scale_value, ctx.key, ctx.backend, ctx.padding_idx = scale_value, key, backend, padding_idx


def _embedding_backward(ctx, grad: torch.Tensor):
    ids, weight, lora_a, lora_b, indices, scale = ctx.saved_tensors
    flags = ctx.needs_input_grad[1:4]
    args = (grad, ids, weight, lora_a, lora_b, indices, scale, ctx.scale_value, ctx.key, ctx.backend)
    grads = _ops.sharded_embedding_backward(*args, ctx.padding_idx, *flags)
    # (Pooled A, read per token, is only passed when no adapter trains: its buffers get no gradient.)
    return None, *_needed(grads, flags), *(None,) * 10


# -- sharded_grouped_matmul ----------------------------------------------------------------------------


@torch.library.custom_op("xla_lora::sharded_grouped_matmul_backward", mutates_args=())
def sharded_grouped_matmul_backward(
    grad: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    group_sizes: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    lora_rows: torch.Tensor | None,
    transposed: bool,
    row_parallel: bool,
    key: str,
    backend: str,
    need_rows: bool,
    need_weight: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d rows, d weight, d lora_a, d lora_b) of :func:`sharded_grouped_matmul`; empty where not needed.

    Per shard, on the rows of its experts (all of them without an expert axis) and its slice of the expert
    width, the one-device formulas: dx = g W (a grouped matmul with the other layout) + ds A with
    ds = shrink(g, B), dA = sum_t outer(ds, x), dB = sum_t outer(shrink(x, A), g), dW = each group's
    g^T x (:func:`~torch_xla_lora.ops._grouped.grouped_matmul_weight_grad`); rows of other expert shards
    have entry -1 and give nothing. The slot buffers are replicated over the expert axis, so each one's
    gradient is summed over it (every entry gets the sum of its expert's shard's part and zeros). Up
    projection (split on its output): dx and dA are partials over the model axis too, summed over both axes
    at once (dx: the base's own all-reduce of [S, in]; dA: one all-reduce of [L * E, R, in]); dB is local to
    the columns. Down projection (split on its input, the output gradient whole): dx and dA are local to the
    width slice; dB is summed over both axes (one all-reduce of [L * E, R, out]). dW is local (the rows are
    whole on every shard): no collective.
    """
    p = _placement(key)
    view = _ExpertRows(p, rows, weight, group_sizes, lora_rows, transposed, row_parallel)
    x, w, idx = view.x, view.w, view.idx
    g = p.enter(grad, view.out_spec)
    if p.expert_axis is not None and not row_parallel:
        g = g[0]  # this expert shard's slice of the stacked output
    experts_axis, axis = p.expert_axis, p.axis
    d_rows = d_w = d_a = d_b = _none(grad)
    lora = lora_rows is not None
    if lora:
        a_spec, b_spec = _expert_specs(p, row_parallel)
        a, b = _enter_factor(p, lora_a, a_spec), _enter_factor(p, lora_b, b_spec)
        slots = lora_a.shape[0]
    if need_rows or (lora and need_a):
        ds = _ops.bgmv_shrink(g.to(b.dtype), b, idx, 1.0, backend).to(a.dtype) if lora else None  # [S, R]
        if need_rows:
            dx = view.grouped(g, w, not transposed)  # [S, in (/ tp)]
            if lora:
                dx = _ops.bgmv_expand(ds, a, dx.to(a.dtype), idx, True, backend)
            dx = dx.to(rows.dtype)
            if not row_parallel:  # a partial over the width (and the experts): the base's own reduction
                d_rows = _leave_summed(p, dx, (None, None), tuple(rows.shape), (experts_axis, axis), float32=False)
            elif experts_axis is None:
                d_rows = p.leave(dx, view.in_spec, tuple(rows.shape))
            else:
                d_rows = p.leave(dx[None], view.in_spec, tuple(rows.shape))
        if lora and need_a:
            d_a_local = _ops.bgmv_weight_grad(ds, x.to(a.dtype), idx, slots, 1.0).to(lora_a.dtype)
            over = (experts_axis,) if row_parallel else (experts_axis, axis)
            d_a = _leave_summed(p, d_a_local, a_spec, tuple(lora_a.shape), over)
    if lora and need_b:
        s = _ops.bgmv_shrink(x.to(a.dtype), a, idx, 1.0, backend).to(b.dtype)  # row parallel: a partial
        d_b_local = _ops.bgmv_weight_grad(s, g.to(b.dtype), idx, slots, 1.0).to(lora_b.dtype)
        over = (experts_axis, axis) if row_parallel else (experts_axis,)
        d_b = _leave_summed(p, d_b_local, b_spec, tuple(lora_b.shape), over)
    if need_weight:
        left, right = (x, g) if transposed else (g, x)
        d_w_local = view.weight_grad(left.to(weight.dtype), right.to(weight.dtype)).to(weight.dtype)
        d_w = p.leave(d_w_local, p.expert_weight_spec(transposed, row_parallel), tuple(weight.shape))
    return d_rows, d_w, d_a, d_b


@sharded_grouped_matmul_backward.register_fake
def _(grad, rows, weight, group_sizes, lora_a, lora_b, lora_rows, transposed, row_parallel, key, backend, *need):
    pairs = zip((rows, weight, lora_a, lora_b), need, strict=True)
    return tuple(torch.empty_like(t) if flag else grad.new_empty(0) for t, flag in pairs)


def _grouped_setup(ctx, inputs, output) -> None:
    rows, weight, group_sizes, lora_a, lora_b, lora_rows, transposed, row_parallel, key, backend, *_ = inputs
    ctx.save_for_backward(rows, weight, group_sizes, lora_a, lora_b, lora_rows)
    ctx.transposed, ctx.row_parallel, ctx.key, ctx.backend = transposed, row_parallel, key, backend


def _grouped_backward(ctx, grad: torch.Tensor):
    rows, weight, group_sizes, lora_a, lora_b, lora_rows = ctx.saved_tensors
    need = ctx.needs_input_grad
    flags = (need[0], need[1], need[3] and lora_rows is not None, need[4] and lora_rows is not None)
    args = (grad, rows, weight, group_sizes, lora_a, lora_b, lora_rows, ctx.transposed, ctx.row_parallel)
    grads = _ops.sharded_grouped_matmul_backward(*args, ctx.key, ctx.backend, *flags)
    d_rows, d_w, d_a, d_b = _needed(grads, flags)
    # (Pools read in place are only passed when autograd records no gradient: see ExpertsWithLoRA._reads_pool.)
    return d_rows, d_w, None, d_a, d_b, *(None,) * 11


# -- replicated: a sharding annotation, whose gradient is the output gradient ---------------------------


def _replicated_backward(ctx, grad: torch.Tensor):
    return grad


for _op, _backward, _setup in (
    (sharded_linear, _linear_backward, _linear_setup),
    (sharded_linear_lora, _linear_lora_backward, _linear_lora_setup),
    (sharded_row_linear, _row_backward, _row_setup),
    (sharded_embedding, _embedding_backward, _embedding_setup),
    (sharded_grouped_matmul, _grouped_backward, _grouped_setup),
    (replicated, _replicated_backward, None),
):
    _op.register_autograd(_backward, setup_context=_setup)
