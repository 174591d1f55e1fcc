"""JAX functions behind ``xla_lora::linear_lora``: the base matmul and multi-LoRA in one op.

Imported lazily by the op (JAX must start after torch_xla on a TPU host).

- "pallas": the fused base kernel (``kernels/fused_base.py``), Mosaic on TPU,
  interpret mode elsewhere. When no tiling fits (e.g. K or N not a multiple
  of 128 on TPU), the base product is XLA's dot and the LoRA the laned
  shrink-expand kernel, as the separate path would do.
- "xla": the XLA-native counterpart. The base product is one ``dot_general``
  on the weight in its own layout (never transposed per call), accumulated in
  f32, with the bias; the grouped LoRA of ``_xla_native.shrink_expand`` adds
  into that f32 product, so bias, LoRA and the cast to the output dtype are
  one elementwise pass over y instead of a write of the base output and a
  read-modify-write by a second op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from torch_xla_lora.kernels import fused, fused_base, visits
from torch_xla_lora.ops._jax import (
    _CACHE_SIZE,
    _pad_rows,
    _padded_indices,
    page_inputs,
    plan_metadata,
    pool_slot_weights,
    shrink_expand_fn,
    weight_grad_fn,
)
from torch_xla_lora.ops._lora_grads_jax import xla_forward


def _padded_operands(extra: dict, rows: int) -> dict:
    """The fusion operands (``up``, ``row_scale``, ``col_scale``, ``residual``, ``weight_scale``,
    ``weight_in_scale``) of a token-padded call: the per-token ones padded to ``rows`` rows; the column scale
    and the weight's scales as they are."""
    return {
        name: value if name in ("col_scale", "weight_scale", "weight_in_scale") else _pad_rows(value, rows)
        for name, value in extra.items()
    }


def _base_product(x, weight, bias, layout: str, weight_scale=None, weight_in_scale=None):
    """x @ W^T (+ bias) in f32, W [N, K] ("out_in") or [K, N] ("in_out").

    With ``weight_scale`` [N] f32, ``weight`` is int8 and W is ``weight * weight_scale`` per output
    channel: ``(x @ weight^T) * weight_scale``, the int8 weight converted to x's dtype (exact) in the dot.
    With ``weight_in_scale`` [K] f32, W is ``weight * weight_in_scale`` per input channel, dequantised
    (rounded to x's dtype) as the dot reads it, as the kernel converts its tiles.
    """
    contract = (((1,), (1,)), ((), ())) if layout == "out_in" else (((1,), (0,)), ((), ()))
    if weight_in_scale is not None:
        scale = weight_in_scale.astype(jnp.float32)
        along_k = scale[None, :] if layout == "out_in" else scale[:, None]
        weight = (weight.astype(jnp.float32) * along_k).astype(x.dtype)
    if weight_scale is not None:
        weight = weight.astype(x.dtype)
    y = jax.lax.dot_general(x, weight, contract, preferred_element_type=jnp.float32)
    if weight_scale is not None:
        y = y * weight_scale.astype(jnp.float32)
    return y if bias is None else y + bias.astype(jnp.float32)


def _lane_meta(
    metadata,
    idx,
    num_slots: int,
    sizes,
    lanes: int,
    num_tokens: int,
    hidden: int,
    out_dim: int,
    rank,
    dtype,
    generation,
    own_metadata: bool,
):
    """The batch's lane metadata: the host-built one when it was built for this plan, else built on the device.

    ``own_metadata``: ``metadata`` was built for this kernel's plan
    (:func:`linear_batch_metadata`, via ``batch_metadata(..., linear_shapes=)``).
    Otherwise it is the shrink-expand op's, usable when that plan has this
    kernel's token block and lanes (then the two formats are one).
    """
    if metadata is not None:
        host_sizes, host_lanes, _ = fused.plan_call(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
        if own_metadata or (host_sizes.tokens, host_lanes) == (sizes.tokens, lanes):
            # This kernel's token block and padding: the packed arrays, then the tokens' order (see batch_metadata).
            return visits.unpack(metadata[: -idx.shape[0]], idx.shape[0], num_slots, sizes.tokens, lanes)[0]
    return visits.build_lanes(idx, num_slots, sizes.tokens, lanes)


def _planned_meta(planned, x, lora_b, indices, metadata, own_metadata: bool, generation: str, has_bias: bool):
    """(padded indices, lane metadata) of a fused base kernel call on ``x`` [T, K] planned as ``planned``.

    Host metadata built for the kernel's own plan (``own_metadata``) is the plain kernel's (no fusion, no
    ``keep_s``): a variant takes it only when its plan has the same token block and lanes, and otherwise
    builds it on the device (:func:`_lane_meta`).
    """
    (sizes, lanes), (num_tokens, hidden), (num_slots, rank, out_dim) = planned, x.shape, lora_b.shape
    idx = _padded_indices(indices, num_slots, sizes.padded_tokens(num_tokens))
    plain = fused_base.plan(num_tokens, hidden, out_dim, rank, num_slots, x.dtype, generation, has_bias)
    own = own_metadata and plain is not None and (plain[0].tokens, plain[1]) == (sizes.tokens, lanes)
    metadata = None if own_metadata and not own else metadata
    args = (num_slots, sizes, lanes, num_tokens, hidden, out_dim, rank, x.dtype, generation, own)
    return idx, _lane_meta(metadata, idx, *args)


def linear_batch_metadata(slots, layer_shapes, rank: int, num_slots: int, dtype: str, generation: str) -> dict:
    """Host-built metadata of one batch for ``linear_lora``'s Pallas kernel, where ``batch_metadata``'s does not fit.

    The fused base kernel plans its own token block (tall prefill blocks,
    ``tuning.BASE_TOKEN_BLOCKS``) and lanes, so at prefill on TPU the
    shrink-expand op's metadata does not fit it and the op would sort the
    tokens on the device in every layer. This builds the kernel's own, in the
    same packed format, for the shapes whose plan differs (for the others the
    shrink-expand op's array is the kernel's too, or serves its fallback).

    Args:
      slots: [N] int32 numpy: each token's slot (-1 = none).
      layer_shapes: (in_features, out_features, has_bias) of layers that will run
        ``linear_lora`` with the Pallas backend.

    Returns:
      (in_features, out_features, has_bias) -> int32 numpy array, only for the
      shapes that need their own; layers whose plans share a token block and
      lane count share one array.
    """
    num_tokens = len(slots)
    by_plan, out = {}, {}
    for hidden, out_dim, has_bias in dict.fromkeys(layer_shapes):
        planned = fused_base.plan(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation, has_bias)
        if planned is None:
            continue  # the op falls back to the shrink-expand op, which takes batch_metadata's
        sizes, lanes = planned
        host_sizes, host_lanes, _ = fused.plan_call(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
        if (host_sizes.tokens, host_lanes) == (sizes.tokens, lanes):
            continue  # batch_metadata's array is this kernel's too
        key = (sizes.tokens, lanes)
        if key not in by_plan:
            by_plan[key] = plan_metadata(slots, num_slots, sizes, lanes)
        out[(hidden, out_dim, has_bias)] = by_plan[key]
    return out


@functools.lru_cache(maxsize=_CACHE_SIZE)
def linear_lora_fn(
    backend: str,
    generation: str,
    scaling: float,
    layout: str,
    has_bias: bool,
    with_metadata: bool,
    own_metadata: bool = False,
) -> Callable:
    """``fn(x[T, K], weight, [bias[N],] lora_a[L, R, K], lora_b[L, R, N], indices[T][, metadata]) -> [T, N]``.

    ``own_metadata``: the metadata was built for the fused base kernel's plan (see :func:`_lane_meta`).
    """

    def fn(x, weight, *rest):
        bias, rest = (rest[0], rest[1:]) if has_bias else (None, rest)
        lora_a, lora_b, indices = rest[:3]
        metadata = rest[3] if with_metadata else None
        num_tokens, hidden = x.shape
        num_slots, rank, out_dim = lora_b.shape
        planned = None
        if backend == "pallas":
            planned = fused_base.plan(num_tokens, hidden, out_dim, rank, num_slots, x.dtype, generation, has_bias)
        if planned is not None:
            sizes, lanes = planned
            idx, meta = _planned_meta(planned, x, lora_b, indices, metadata, own_metadata, generation, has_bias)
            out = fused_base.linear_lora(
                _pad_rows(x, idx.shape[0]),
                weight,
                bias,
                lora_a,
                lora_b,
                meta,
                scaling=scaling,
                block_sizes=sizes,
                lanes=lanes,
                layout=layout,
                interpret=generation == "cpu",
                vmem_limit_bytes=fused_base.vmem_limit(generation),
            )
            return out[:num_tokens]
        # No fused-base tiling (or the XLA-native backend): the base product, then the
        # shrink-expand op's own function, which picks the laned kernel, the separate
        # kernels (widths the laned kernel cannot take) or the XLA-native grouping.
        base = _base_product(x, weight, bias, layout)
        lora = shrink_expand_fn(backend, generation, scaling, with_metadata)
        extra = (metadata,) if with_metadata else ()
        if backend == "pallas":
            return lora(x, lora_a, lora_b, base.astype(x.dtype), indices, *extra)
        # XLA-native: the LoRA adds into the f32 product, so bias, LoRA and the cast are one pass.
        return lora(x, lora_a, lora_b, base, indices, *extra).astype(x.dtype)

    return fn


@functools.lru_cache(maxsize=_CACHE_SIZE)
def linear_lora_train_fn(
    backend: str,
    generation: str,
    scaling: float,
    layout: str,
    has_bias: bool,
    with_metadata: bool,
    own_metadata: bool = False,
) -> Callable:
    """``linear_lora_fn``'s training variant: ``fn(...same arguments...) -> (out [T, N], s [T, R])``, ``s`` the
    scaled shrink each token's expand read (lora_b's dtype, zero for tokens without adapter), kept for the
    backward (``bgmv_lora_grads(saved_s=)``).

    "pallas": the fused base kernel writing ``s`` beside the output (``fused_base.linear_lora(keep_s=True)``,
    planned with its block); the host metadata serves when the serving kernel's plan (for which it was
    built) has this one's token block and lanes. Where no tiling fits, and on "xla": the base product in
    f32, then the XLA-native training forward on rows sorted by slot (``_lora_grads_jax.xla_forward``,
    what ``bgmv_shrink_expand_train`` runs), the output rounded once.
    """

    def fn(x, weight, *rest):
        bias, rest = (rest[0], rest[1:]) if has_bias else (None, rest)
        lora_a, lora_b, indices = rest[:3]
        metadata = rest[3] if with_metadata else None
        num_tokens, hidden = x.shape
        num_slots, rank, out_dim = lora_b.shape
        planned = None
        if backend == "pallas":
            planned = fused_base.plan(
                num_tokens, hidden, out_dim, rank, num_slots, x.dtype, generation, has_bias, keep_s=True
            )
        if planned is not None:
            sizes, lanes = planned
            idx, meta = _planned_meta(planned, x, lora_b, indices, metadata, own_metadata, generation, has_bias)
            out, s = fused_base.linear_lora(
                _pad_rows(x, idx.shape[0]),
                weight,
                bias,
                lora_a,
                lora_b,
                meta,
                scaling=scaling,
                block_sizes=sizes,
                lanes=lanes,
                layout=layout,
                interpret=generation == "cpu",
                vmem_limit_bytes=fused_base.vmem_limit(generation),
                keep_s=True,
            )
            return out[:num_tokens], s[:num_tokens].astype(lora_b.dtype)
        base = _base_product(x, weight, bias, layout)
        out, s = xla_forward(x, lora_a, lora_b, base, indices, scaling=scaling)
        return out.astype(x.dtype), s

    return fn


@functools.lru_cache(maxsize=_CACHE_SIZE)
def linear_lora_fused_fn(
    backend: str,
    generation: str,
    scaling: float,
    layout: str,
    has_bias: bool,
    fusion: fused_base.Fusion,
    with_metadata: bool,
    own_metadata: bool = False,
    keep_s: bool = False,
    a_grad: bool = False,
) -> Callable:
    """``linear_lora_fn`` with x's producer and the residual add taken in (:class:`fused_base.Fusion`).

    ``fn(x[T, K], weight, [bias[N],] lora_a, lora_b, indices[T], [up[T, K],] [row[T] f32,] [col[K],]
    [residual[T, N],] [weight_scale[N] f32,] [weight_in_scale[K] f32,] [metadata]) -> [T, N]``; with
    ``weight_scale`` the weight is int8, per-output-channel symmetric (W = weight * weight_scale), read as int8
    by the kernel; with ``weight_in_scale`` int8 per input channel (the transposed read of such a weight in the
    backward, dequantised in VMEM).
    "pallas": the fused base kernel with the prologue on its x read and the residual in its write; where
    no tiling fits, and on "xla", the same arithmetic as XLA ops (the prologue, then ``linear_lora_fn``'s
    path, the residual added to the f32 sum before the single
    rounding), which XLA fuses into its own dot's operand read and output.

    ``keep_s`` (``linear_lora_fused_train``): ``fn`` returns ``(out, s [T, R], x)``, ``s`` the scaled shrink of the
    producer's output each token's expand read, as ``linear_lora_train_fn`` keeps it: written beside the output
    by the kernel, or the XLA-native training forward on rows sorted by slot; ``x`` the producer's output [T, K]
    as the product read it where ``fusion`` has a prologue (the kernel's third output, ``fused_base.keeps_x``),
    else an empty [0] array.

    ``a_grad`` (with ``keep_s``; the backward's one pass, ``linear_lora_backward``): ``fn`` takes rows u [T, R]
    last and returns ``(out, s, dA)``, ``dA[l] = sum_{i_t = l} outer(u[t], x[t])`` [L, R, K] in lora_a's dtype
    (x the producer's output): taken by the kernel while x's tiles are in VMEM (``fused_base.linear_lora(
    a_grad_rows=)``, planned with ``a_grad``), else by the weight-gradient op of ``backend`` after the keep_s path.
    """
    names = [
        name
        for name, on in (
            ("up", fusion.silu_mul),
            ("row_scale", fusion.row_scale),
            ("col_scale", fusion.col_scale),
            ("residual", fusion.residual),
            ("weight_scale", fusion.weight_scale),
            ("weight_in_scale", fusion.weight_in_scale),
        )
        if on
    ]

    def fn(x, weight, *rest):
        bias, rest = (rest[0], rest[1:]) if has_bias else (None, rest)
        (lora_a, lora_b, indices), rest = rest[:3], rest[3:]
        extra = dict(zip(names, rest[: len(names)], strict=True))
        metadata = rest[len(names)] if with_metadata else None
        rows = rest[-1] if a_grad else None
        num_tokens, hidden = x.shape
        num_slots, rank, out_dim = lora_b.shape
        planned = None
        if backend == "pallas":
            planned = fused_base.plan(
                num_tokens, hidden, out_dim, rank, num_slots, x.dtype, generation, has_bias, fusion, keep_s, a_grad
            )
        if planned is not None:
            sizes, lanes = planned
            idx, meta = _planned_meta(planned, x, lora_b, indices, metadata, own_metadata, generation, has_bias)
            padded = _padded_operands(extra, idx.shape[0])
            out = fused_base.linear_lora(
                _pad_rows(x, idx.shape[0]),
                weight,
                bias,
                lora_a,
                lora_b,
                meta,
                scaling=scaling,
                block_sizes=sizes,
                lanes=lanes,
                layout=layout,
                interpret=generation == "cpu",
                vmem_limit_bytes=fused_base.vmem_limit(generation),
                keep_s=keep_s,
                **padded,
                **({} if rows is None else {"a_grad_rows": _pad_rows(rows.astype(lora_a.dtype), idx.shape[0])}),
            )
            if a_grad:
                return out[0][:num_tokens], out[1][:num_tokens].astype(lora_b.dtype), out[2].astype(lora_a.dtype)
            if keep_s:
                x_kept = out[2][:num_tokens] if fused_base.keeps_x(fusion, keep_s) else jnp.zeros((0,), x.dtype)
                return out[0][:num_tokens], out[1][:num_tokens].astype(lora_b.dtype), x_kept
            return out[:num_tokens]
        row = extra.get("row_scale")
        x_in = fused_base.apply_prologue(
            x, extra.get("up"), None if row is None else row[:, None], extra.get("col_scale"), fusion
        )
        base = _base_product(x_in, weight, bias, layout, extra.get("weight_scale"), extra.get("weight_in_scale"))
        if fusion.residual:
            base = base + extra["residual"].astype(jnp.float32)
        if keep_s:
            out, s = xla_forward(x_in, lora_a, lora_b, base, indices, scaling=scaling)
            if a_grad:
                d_a = weight_grad_fn(num_slots, 1.0, backend, generation)(rows.astype(x_in.dtype), x_in, indices)
                return out.astype(x.dtype), s, d_a.astype(lora_a.dtype)
            return out.astype(x.dtype), s, x_in if fusion.prologue else jnp.zeros((0,), x.dtype)
        lora = shrink_expand_fn(backend, generation, scaling, with_metadata)
        meta_arg = () if not with_metadata else (None if own_metadata else metadata,)
        if with_metadata and own_metadata:
            # The metadata was built for the fused base kernel's plan; the shrink-expand op groups on the device.
            lora = shrink_expand_fn(backend, generation, scaling, False)
            meta_arg = ()
        if backend == "pallas":
            return lora(x_in, lora_a, lora_b, base.astype(x.dtype), indices, *meta_arg)
        return lora(x_in, lora_a, lora_b, base, indices, *meta_arg).astype(x.dtype)

    return fn


class _SlotShape(NamedTuple):
    """The [L, R, N] shape of the slots a pool stands for, where :func:`_planned_meta` reads lora_b's."""

    shape: tuple[int, int, int]


@functools.lru_cache(maxsize=_CACHE_SIZE)
def linear_lora_pooled_fn(
    backend: str,
    generation: str,
    scaling: float,
    layout: str,
    has_bias: bool,
    fusion: fused_base.Fusion,
    int8: bool,
    with_metadata: bool,
    own_metadata: bool = False,
    with_pages: bool = False,
    with_page_scales: bool = False,
    typical_ranks: tuple[int, ...] | None = None,
) -> Callable:
    """``linear_lora_fused_fn`` reading the adapters from rank-row pools (``ops.linear_lora_pooled``).

    ``fn(x[T, K], weight, [bias[N],] a_pool[P+2, K], b_pool[P+2, N], lanes[T], rows[L, R], [a_scale[P+2],
    b_scale[P+2],] [up,] [row,] [col,] [residual,] [weight_scale,] [metadata,] [pages,] [page_scales]) -> [T, N]``.

    "pallas", where the pooled kernel has a plan (``fused_base.pooled_plan``: the slot kernel's plan, its VMEM
    with the pooled buffers within the limit): the one-pass kernel reads each lane's true-rank pages through
    the page table (``pages`` as built on the host, else derived from ``rows`` here, reading the row table
    whole), an int8 pool's row scales from ``page_scales`` (else a_scale * b_scale formed here). Otherwise
    (backend "xla", or no pooled plan) :func:`linear_lora_fused_fn` runs on the lanes' slot weights
    (``_jax.pool_slot_weights``: on "xla" pool tiles its slot op reads the visited lanes' rows from, int8 rows
    dequantised; on "pallas" the lanes' rows gathered into the slot layout).
    ``typical_ranks``: a block's distinct adapters' ranks, for the kernel's cost estimate.
    """
    names = [
        name
        for name, on in (
            ("up", fusion.silu_mul),
            ("row_scale", fusion.row_scale),
            ("col_scale", fusion.col_scale),
            ("residual", fusion.residual),
            ("weight_scale", fusion.weight_scale),
        )
        if on
    ]

    def fn(x, weight, *rest):
        rest = list(rest)
        bias = rest.pop(0) if has_bias else None
        a_pool, b_pool, lanes, rows = rest[:4]
        rest = rest[4:]
        a_scale, b_scale = (rest.pop(0), rest.pop(0)) if int8 else (None, None)
        extra = {name: rest.pop(0) for name in names}
        metadata = rest.pop(0) if with_metadata else None
        table = rest.pop(0) if with_pages else None
        page_scales = rest.pop(0) if int8 and with_page_scales else None
        num_tokens, hidden = x.shape
        num_slots, rank = rows.shape
        out_dim = b_pool.shape[1]
        planned = None
        if backend == "pallas":
            planned = fused_base.pooled_plan(
                num_tokens, hidden, out_dim, rank, num_slots, x.dtype, generation, has_bias, fusion, int8
            )
        if planned is None:  # linear_lora_fused's path on the lanes' slot weights
            slot_fn = linear_lora_fused_fn(
                backend, generation, scaling, layout, has_bias, fusion, with_metadata, own_metadata
            )
            slots = pool_slot_weights(backend, a_pool, b_pool, a_scale, b_scale, rows, x.dtype, hidden, out_dim)
            head = (x, weight) + (() if bias is None else (bias,))
            tail = tuple(extra.values()) + (() if metadata is None else (metadata,))
            return slot_fn(*head, *slots, lanes, *tail)
        sizes, lanes_count = planned
        slot_shape = _SlotShape((num_slots, rank, out_dim))
        idx, meta = _planned_meta(planned, x, slot_shape, lanes, metadata, own_metadata, generation, has_bias)
        table, page_scales = page_inputs(rows, a_pool, table, a_scale, b_scale, page_scales)
        padded = _padded_operands(extra, idx.shape[0])
        out = fused_base.linear_lora(
            _pad_rows(x, idx.shape[0]),
            weight,
            bias,
            a_pool,
            b_pool,
            meta,
            scaling=scaling,
            block_sizes=sizes,
            lanes=lanes_count,
            layout=layout,
            interpret=generation == "cpu",
            vmem_limit_bytes=fused_base.vmem_limit(generation),
            page_table=table,
            page_scales=page_scales,
            pool_rank=rank,
            typical_ranks=typical_ranks,
            **padded,
        )
        return out[:num_tokens]

    return fn
