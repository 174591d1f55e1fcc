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
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from torch_xla_lora.layers.embedding import scaled

if TYPE_CHECKING:
    from torch_xla_lora.sharding import LayerSharding

__all__ = ["sharded_linear", "sharded_linear_lora", "sharded_row_linear", "sharded_embedding", "replicated"]


@functools.lru_cache(maxsize=64)
def _placement(key: str) -> LayerSharding:
    from torch_xla_lora.sharding import LayerSharding

    return LayerSharding.from_key(key)


def _local_metadata(p: LayerSharding, metadata: torch.Tensor | None) -> torch.Tensor | None:
    """This data shard's row of the host-built metadata, [K]."""
    if metadata is None:
        return None
    return p.enter(metadata, (p.data_axis, None), placed=True).reshape(-1)


def _enter_slots(p: LayerSharding, slots: torch.Tensor) -> torch.Tensor:
    """Local slots: per-token slots arrive as device data placed by ``send_batch``,
    per-row slots as their expansion to tokens (not yet sharded)."""
    import torch_xla

    placed = bool(torch_xla._XLAC._get_xla_sharding_spec(slots))
    return p.enter(slots, (p.data_axis,), placed=placed)


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
    a, b = p.enter(lora_a, specs["lora_a"], placed=True), p.enter(lora_b, specs["lora_b"], placed=True)
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
    x = p.enter(inputs, (tokens, None))
    w = p.enter(weight, (out_axis, None) if weight_layout == "out_in" else (None, out_axis), placed=True)
    local_bias = None if bias is None else p.enter(bias, (out_axis,), placed=True)
    a, b = p.enter(lora_a, specs["lora_a"], placed=True), p.enter(lora_b, specs["lora_b"], placed=True)
    meta = _local_metadata(p, metadata)
    out = torch.ops.xla_lora.linear_lora(x, w, local_bias, a, b, idx, 1.0, weight_layout, backend, meta, own_metadata)
    return p.leave(out, (tokens, out_axis), (inputs.shape[0], lora_b.shape[2]))


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
) -> torch.Tensor:
    """Row-parallel linear layer, base and LoRA, reduced once (bias not added).

    Args:
      inputs: [N, in]; weight: the base weight, [out, in] (nn.Linear) or [in, out]
        (Conv1D, ``transposed``); lora_a: [L, R, in]; lora_b: [L, R, out].
      lora_indices: [N] int32; metadata: [dp, K] int32 or None.
      fuse_base: each shard runs ``linear_lora`` (base and LoRA partial in one
        op; inputs, weight and adapters then share one dtype); own_metadata: the
        metadata was built for ``linear_lora``'s own plan.

    Returns:
      [N, out] in weight's dtype: sum over shards of x_k W_k^T + B A_k x_k.

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
    w = p.enter(weight, (p.axis, None) if transposed else (None, p.axis), placed=True)
    a, b = p.enter(lora_a, specs["lora_a"], placed=True), p.enter(lora_b, specs["lora_b"], placed=True)
    meta = _local_metadata(p, metadata)
    if fuse_base:
        # x_k W_k^T + B A_k x_k in one op on the local K slice; the bias is added after the reduction.
        layout = "in_out" if transposed else "out_in"
        partial = torch.ops.xla_lora.linear_lora(x, w, None, a, b, idx, 1.0, layout, backend, meta, own_metadata)
        return p.reduce(partial, inputs.shape[0])
    partial = x @ w if transposed else x @ w.T  # [N_local, out], the model's dtype
    lora = torch.ops.xla_lora.bgmv_shrink_expand(x.to(a.dtype), a, b, partial.to(b.dtype), idx, 1.0, backend, meta)
    # Reduced in the model's dtype, as the base layer alone would be.
    return p.reduce(lora.to(partial.dtype), inputs.shape[0])


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
):
    return inputs.new_empty((inputs.shape[0], lora_b.shape[2]), dtype=weight.dtype)


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
) -> torch.Tensor:
    """Vocab-parallel (or replicated) embedding with LoRA: masked local lookups, one reduction.

    Args:
      ids: [N] integer; weight: [vocab, D]; lora_a: [L, vocab, R] (token-major);
      lora_b: [L, R, D]; lora_indices: [N] int32.
      scale, scale_value: the base embedding's ``embed_scale`` (see
        :func:`torch_xla_lora.layers.embedding.embed_scale`) when it is a
        one-element tensor or a number, else None.

    Returns:
      [N, D] in weight's dtype.

    Each shard looks up the ids in its vocabulary range, base row and A row
    alike, and zeroes the others; the shards' partial outputs (base plus
    LoRA expand) are summed once, as for a row layer. A scaled embedding's
    base rows and A rows are multiplied by its scale as on one device (the
    base module's own forward, which scales its lookup, does not run here).
    """
    p = _placement(key)
    tokens = p.data_axis
    vocab_axis = p.axis if p.kind == "vocab" else None
    shards = p.shards if vocab_axis else 1
    vocab, rank = weight.shape[0] // shards, lora_a.shape[2]  # rows per shard
    idx = _enter_slots(p, lora_indices)
    w = p.enter(weight, (vocab_axis, None), placed=True)
    a = p.enter(lora_a, (None, vocab_axis, None), placed=True)  # [L, vocab_local, R]
    # This shard's first vocabulary row: the shard's element of an iota split over the axis.
    shard = p.enter(torch.arange(shards, dtype=torch.int32, device=ids.device), (vocab_axis,))
    local = p.enter(ids, (tokens,)).to(torch.int32) - shard * vocab  # [N_local]
    inside = ((local >= 0) & (local < vocab))[:, None]
    local = local.clamp(0, vocab - 1)
    factor = p.enter(scale.reshape(1), (None,)) if scale is not None else scale_value
    base = scaled(torch.where(inside, w.index_select(0, local), 0), factor)  # [N_local, D]
    rows = idx.clamp(min=0) * vocab + local  # -1 slots add zero in expand
    s = scaled(torch.where(inside, a.reshape(-1, rank).index_select(0, rows), 0), factor)  # [N_local, R]
    b = p.enter(lora_b, (None, None, None), placed=True)
    partial = torch.ops.xla_lora.bgmv_expand(s, b, base.to(b.dtype), idx, True, backend)
    partial = partial.to(base.dtype)  # reduced in the model's dtype, as the base lookup alone would be
    if vocab_axis is None:
        return p.leave(partial, (tokens, None), (ids.shape[0], weight.shape[1]))
    return p.reduce(partial, ids.shape[0])


@sharded_embedding.register_fake
def _(ids, weight, lora_a, lora_b, lora_indices, scale, scale_value, key, backend):
    return weight.new_empty((ids.shape[0], weight.shape[1]))


@torch.library.custom_op("xla_lora::replicated", mutates_args=())
def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` replicated on every device (the same sharding on any mesh)."""
    import torch_xla.distributed.spmd as xs

    out = tensor.clone()
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
