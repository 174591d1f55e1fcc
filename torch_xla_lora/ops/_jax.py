"""JAX functions behind the ops, built once per static configuration.

This module imports JAX at the top; the ops import it lazily, from inside
their XLA branch, because on a TPU host JAX must start after torch_xla (and
never claim the TPU itself), and CPU-only users should not pay for importing
JAX at all.

``call_jax`` caches its traced computations by ``id(jax_fn)`` and the input
shapes, so each configuration must map to one function object for the life of
the process: a function built afresh per call would be re-traced on every
call. ``functools.lru_cache`` gives that, and bounds the number of entries.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from torch_xla_lora.kernels import block_sizes, expand, fused, shrink, visits, weight_grad
from torch_xla_lora.ops import _xla_native

_CACHE_SIZE = 256


def page_inputs(rows, a_pool, table, a_scale, b_scale, page_scales, stacked: int = 0):
    """(page table, page scales) the pooled kernels read: the host-built ones where given, else derived in the
    graph: each lane's page starts (entries 0, 8, 16, ... of its rows) and true ranks from the row table (read
    whole), and for int8 pools (``a_scale`` given) ``a_scale * b_scale`` padded to whole scale tiles (``stacked``
    pools, E of them: each pool's, ``fused.page_scales_of``). ``a_pool``: [rows, D], flattened if stacked."""
    if table is None:
        starts = rows[:, :: fused.PAGE_ROWS].reshape(-1).astype(jnp.int32)
        table = jnp.concatenate([starts, _xla_native.lane_ranks(rows, a_pool.shape[0] - 2)])
    if a_scale is not None and page_scales is None:
        page_scales = fused.page_scales_of(a_scale * b_scale, stacked)
    return table, page_scales


def _pad_rows(array: jax.Array, rows: int, value=0) -> jax.Array:
    extra = rows - array.shape[0]
    if extra == 0:
        return array
    return jnp.pad(array, [(0, extra)] + [(0, 0)] * (array.ndim - 1), constant_values=value)


def _padded_indices(indices: jax.Array, num_slots: int, rows: int) -> jax.Array:
    """int32 indices padded to ``rows`` with -1, every value outside [0, num_slots) made -1."""
    return visits.valid_slots(_pad_rows(indices.astype(jnp.int32), rows, -1), num_slots)


def _width(array: jax.Array, width: int) -> jax.Array:
    """``array`` [T, W] with zero columns appended up to ``width`` (itself when W == width)."""
    extra = width - array.shape[-1]
    return array if extra == 0 else jnp.pad(array, [(0, 0), (0, extra)])


def _in_range(indices: jax.Array, num_slots: int) -> jax.Array:
    """[T, 1] bool: the tokens whose slot is in [0, num_slots), i.e. that get an adapter."""
    return ((indices >= 0) & (indices < num_slots))[:, None]


def _prepare(indices: jax.Array, num_slots: int, sizes: block_sizes.BlockSizes):
    padded = _padded_indices(indices, num_slots, sizes.padded_tokens(indices.shape[0]))
    return padded, visits.build(padded, num_slots, sizes.tokens)


def _kernels(backend: str, generation: str, sizes: block_sizes.BlockSizes):
    """(shrink, expand) callables of one backend, with the static tiling bound."""
    if backend == "pallas":
        interpret = generation == "cpu"  # Mosaic only exists on TPU
        tiling = {"block_sizes": sizes, "interpret": interpret, "vmem_limit_bytes": block_sizes.vmem_limit(generation)}
        return functools.partial(shrink.shrink, **tiling), functools.partial(expand.expand, **tiling)
    tiling = {"block_tokens": sizes.tokens}
    return functools.partial(_xla_native.shrink, **tiling), functools.partial(_xla_native.expand, **tiling)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def shrink_fn(backend: str, generation: str, scaling: float) -> Callable:
    """``fn(inputs[T, D], lora_a[L, R, D], indices[T]) -> [T, R]`` for one configuration."""

    def fn(x, lora_a, indices):
        num_tokens, hidden = x.shape
        sizes = block_sizes.choose(num_tokens, hidden, lora_a.shape[1], generation)
        idx, vis = _prepare(indices, lora_a.shape[0], sizes)
        run_shrink, _ = _kernels(backend, generation, sizes)
        out = run_shrink(_pad_rows(x, idx.shape[0]), lora_a, idx, vis, scaling=scaling)[:num_tokens]
        if backend == "pallas":  # the kernel selects each token's own slot's rows: 0 exactly without an adapter
            return out
        # A select on the result, not a masked input: 0 * Inf in an unused slot would be NaN.
        return jnp.where(_in_range(indices, lora_a.shape[0]), out, 0)

    return fn


@functools.lru_cache(maxsize=_CACHE_SIZE)
def expand_fn(backend: str, generation: str, add_inputs: bool, slice_offset: int | None) -> Callable:
    """``fn(inputs[T, R], lora_b[L, R, S], base[T, Dout], indices[T]) -> [T, Dout]``.

    With ``slice_offset`` None, S == Dout and the kernel adds into the base
    directly; otherwise the product lands in columns [slice_offset,
    slice_offset + S) as a pad-and-add, never a scattered write.
    """

    def fn(s, lora_b, base, indices):
        num_tokens, out_dim = base.shape
        width = lora_b.shape[2]
        sizes = block_sizes.choose(num_tokens, s.shape[1], width, generation)
        idx, vis = _prepare(indices, lora_b.shape[0], sizes)
        _, run_expand = _kernels(backend, generation, sizes)
        into_base = add_inputs and slice_offset is None
        target = base if into_base else jnp.zeros((num_tokens, width), base.dtype)
        delta = run_expand(
            _pad_rows(s, idx.shape[0]),
            lora_b,
            _pad_rows(target, idx.shape[0]),
            idx,
            vis,
            add_inputs=into_base,
        )[:num_tokens]
        if backend != "pallas":  # the kernel selects, giving target exactly on tokens without an adapter
            delta = jnp.where(_in_range(indices, lora_b.shape[0]), delta, target)  # out-of-range rows: exactly target
        if slice_offset is None:
            return delta
        padded = jnp.pad(delta, [(0, 0), (slice_offset, out_dim - slice_offset - width)])
        return base + padded if add_inputs else padded

    return fn


def _columns(weights: jax.Array | _xla_native.PoolTiles, width: int) -> jax.Array | _xla_native.PoolTiles:
    """Slot weights' first ``width`` columns, the layer's (a slice XLA fuses into its consumers); pool tiles
    are read at the layer's width already."""
    if isinstance(weights, _xla_native.PoolTiles):
        return weights
    return weights[:, :, :width]


@functools.lru_cache(maxsize=_CACHE_SIZE)
def shrink_expand_fn(backend: str, generation: str, scaling: float, with_metadata: bool) -> Callable:
    """``fn(inputs[T, D], lora_a[L, R, D'], lora_b[L, R, Dout'], base[T, Dout], indices[T][, metadata])``.

    With ``with_metadata`` the grouping comes packed from the host (see
    ``kernels.visits.pack``) instead of being sorted out on the device.
    The adapter buffers may be wider than the layer (D' >= D, Dout' >= Dout, zero columns past D / Dout:
    the layers pad them to whole lane tiles for the fused kernel, ``fused.padded_width``); the fused
    kernel and the XLA path use only their first D / Dout columns. Backend "pallas" runs the fused
    kernel where its planner takes it (``fused.plan_call``: the plan fits VMEM and is modelled no
    slower than the separate kernels) and the buffers are lane-padded (D' and Dout' whole 128-lane
    tiles: the kernel DMAs whole rows); otherwise the separate shrink and expand kernels, over the
    same token blocks and host metadata (buffers wider than the layer: x and base padded with zero
    columns to them, so the buffers' zeros past D / Dout are read there).
    No path copies the adapter buffers.
    """

    def fn(x, lora_a, lora_b, base, indices, metadata=None):
        num_tokens, hidden = x.shape
        num_slots, rank, _ = lora_b.shape
        out_dim = base.shape[1]
        dtype = lora_b.dtype
        sizes, lanes, run_fused = fused.plan_call(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
        lane_padded = (lora_a.shape[2], lora_b.shape[2]) == (fused.padded_width(hidden), fused.padded_width(out_dim))
        run_fused = run_fused and lane_padded
        padded = sizes.padded_tokens(num_tokens)
        idx = _padded_indices(indices, num_slots, padded)
        x_pad, base_pad = _pad_rows(x, padded), _pad_rows(base, padded)
        order = None
        if metadata is not None:
            # The packed lane and visit arrays, then the tokens' order by slot (see batch_metadata).
            grouping, order = metadata[:-padded], metadata[-padded:]
            meta, vis = visits.unpack(grouping, padded, num_slots, sizes.tokens, lanes)
        if backend == "pallas" and not run_fused:
            # Shapes the fused kernel cannot take or is modelled slower on (see fused.plan_call): shrink, then expand,
            # over the same token blocks (the packed metadata carries their visits too).
            if metadata is None:
                vis = visits.build(idx, num_slots, sizes.tokens)
            # Wider buffers: x and base padded with zero columns to their widths; the plan's token block.
            wide = block_sizes.choose(num_tokens, lora_a.shape[2], lora_b.shape[2], generation)
            wide = dataclasses.replace(wide, tokens=sizes.tokens)
            run_shrink, run_expand = _kernels(backend, generation, wide)
            x_wide, base_wide = _width(x_pad, lora_a.shape[2]), _width(base_pad, lora_b.shape[2])
            s = run_shrink(x_wide, lora_a, idx, vis, scaling=scaling).astype(lora_b.dtype)
            out = run_expand(s, lora_b, base_wide, idx, vis, add_inputs=True)[:, :out_dim]
        elif backend == "pallas":
            if metadata is None:
                meta = visits.build_lanes(idx, num_slots, sizes.tokens, lanes)
            out = fused.shrink_expand(
                x_pad,
                lora_a,
                lora_b,
                base_pad,
                meta,
                scaling=scaling,
                block_sizes=sizes,
                lanes=lanes,
                interpret=generation == "cpu",
                vmem_limit_bytes=block_sizes.vmem_limit(generation),
            )
        else:
            if metadata is None:
                vis = visits.build(idx, num_slots, sizes.tokens)
            out = _xla_native.shrink_expand(
                x_pad,
                _columns(lora_a, hidden),
                _columns(lora_b, out_dim),
                base_pad,
                idx,
                vis,
                scaling=scaling,
                block_tokens=sizes.tokens,
                order=order,
            )
        if backend == "pallas":  # the kernels give base exactly on tokens without an adapter (they select)
            return out[:num_tokens]
        return jnp.where(_in_range(indices, num_slots), out[:num_tokens], base)  # out of range: exactly base

    if with_metadata:
        return fn
    return lambda x, lora_a, lora_b, base, indices: fn(x, lora_a, lora_b, base, indices)


def pool_slot_weights(
    backend: str, a_pool, b_pool, a_scale, b_scale, rows: jax.Array, dtype, hidden: int, out_dim: int
) -> tuple[jax.Array | _xla_native.PoolTiles, jax.Array | _xla_native.PoolTiles]:
    """(lora_a, lora_b): what the slot ops read in place of the pools [P + 2, D'] / [P + 2, Dout'] under the row
    table ``rows`` [L, R], in ``dtype`` (int8 rows dequantised by ``a_scale`` / ``b_scale``). On "pallas" every
    lane's rows gathered into the [L, R, ...] slot layout (the slot kernels read whole arrays); otherwise
    :class:`_xla_native.PoolTiles` at the layer's widths ``hidden`` and ``out_dim`` (pools may be wider), whose
    reads take from the pools only the tiles the XLA-native algorithms' visits name."""
    lora_a = _pool_weights(backend, a_pool, a_scale, rows, dtype, hidden)
    return lora_a, _pool_weights(backend, b_pool, b_scale, rows, dtype, out_dim)


def _pool_weights(backend: str, pool, scale, rows: jax.Array, dtype, width: int):
    """One pool as :func:`pool_slot_weights` gives it: gathered into slots on "pallas", else its tiles."""
    if backend == "pallas":
        return _xla_native.gather_lanes(pool, scale, rows, dtype)
    return _xla_native.PoolTiles(pool, scale, rows, dtype, width)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def pooled_shrink_expand_fn(
    backend: str,
    generation: str,
    scaling: float,
    int8: bool,
    with_metadata: bool,
    typical_ranks=None,
    with_pages: bool = False,
    with_page_scales: bool = False,
) -> Callable:
    """``fn(inputs[T, D], a_pool[P+2, D], b_pool[P+2, Dout], base[T, Dout], lanes[T], rows[L, R]
    [, a_scale[P+2], b_scale[P+2]][, metadata][, pages][, page_scales])`` for one configuration (see
    ``ops.pooled_shrink_expand``; stacked pools [E, P+2, D] and [E, P+2, Dout] with scales [E * (P+2)]).

    Backend "pallas", where the pooled kernel runs the shape (``fused.pooled_plan_call``): the kernel
    reads each lane's true-rank pages through the page table: ``pages`` [L * pages(R) + L] as built on the
    host (``with_pages``; the row table is then not read at all), else derived from ``rows`` here. An int8
    pool's scales: ``page_scales`` [N] (``with_page_scales``: a_scale * b_scale kept beside the pool, whole
    1024-row tiles), of which the kernel reads only the used pages' tiles (or the whole array where that is
    fewer); else computed here from ``a_scale`` and ``b_scale`` (reading both whole).
    Otherwise (backend "xla", or shapes the pooled kernel cannot take): a batch of at most
    ``_xla_native.PACKED_MAX_TOKENS`` tokens runs :func:`_xla_native.pooled_shrink_expand` (the used lanes'
    true-rank rows only, 128 at a time, or one chunk of 32 for at most 32); a longer one runs
    :func:`shrink_expand_fn` on the pools' :class:`_xla_native.PoolTiles` (its algorithms read the tiles of
    the lanes their visits name; the direct one multiplies each token by its own adapter alone), or on
    "pallas" the slot kernels on every lane's rows gathered into slots.
    ``typical_ranks``: the batch's distinct ranks for the kernel's cost estimate (the compile grid).
    """

    def fn(x, stacked_a, stacked_b, base, lanes, rows, *rest):
        rest = list(rest)
        a_scale, b_scale = (rest.pop(0), rest.pop(0)) if int8 else (None, None)
        metadata = rest.pop(0) if with_metadata else None
        table = rest.pop(0) if with_pages else None
        page_scales = rest.pop(0) if int8 and with_page_scales else None
        # Stacked pools [E, P + 2, W] (an experts layer's): the kernel DMAs them in place, the rest reads them
        # flattened (a bitcast), their rows numbered so.
        a_pool, b_pool = (pool.reshape(-1, pool.shape[-1]) for pool in (stacked_a, stacked_b))
        num_tokens, hidden = x.shape
        num_slots, rank = rows.shape
        out_dim = b_pool.shape[1]
        dtype = x.dtype
        sizes, lanes_count, run = fused.pooled_plan_call(
            num_tokens, hidden, out_dim, rank, num_slots, dtype, generation, int8
        )
        stacked = stacked_a.shape[0] if stacked_a.ndim == 3 else 0
        if (backend != "pallas" or not run) and num_tokens <= _xla_native.PACKED_MAX_TOKENS:
            # Decode: only the true-rank rows of the lanes in use, read straight from the pools.
            if int8 and page_scales is None:
                page_scales = a_scale * b_scale
            elif int8:
                page_scales = fused.flat_page_scales(page_scales, stacked, a_pool.shape[0])
            out = _xla_native.pooled_shrink_expand(
                x, a_pool, b_pool, base, lanes.astype(jnp.int32), rows, page_scales if int8 else None, scaling=scaling
            )
            return jnp.where(_in_range(lanes, num_slots), out.astype(base.dtype), base)
        if backend != "pallas" or not run:
            lora_a, lora_b = pool_slot_weights(backend, a_pool, b_pool, a_scale, b_scale, rows, dtype, hidden, out_dim)
            slot_fn = shrink_expand_fn(backend, generation, scaling, with_metadata)
            return slot_fn(x, lora_a, lora_b, base, lanes, *(() if metadata is None else (metadata,)))
        padded = sizes.padded_tokens(num_tokens)
        idx = _padded_indices(lanes, num_slots, padded)
        if metadata is None:
            meta = visits.build_lanes(idx, num_slots, sizes.tokens, lanes_count)
        else:
            meta, _ = visits.unpack(metadata[:-padded], padded, num_slots, sizes.tokens, lanes_count)
        table, page_scales = page_inputs(rows, a_pool, table, a_scale, b_scale, page_scales, stacked)
        out = fused.pooled_shrink_expand(
            _pad_rows(x, padded),
            stacked_a,
            stacked_b,
            _pad_rows(base, padded),
            meta,
            table,
            page_scales,
            scaling=scaling,
            block_sizes=sizes,
            lanes=lanes_count,
            rank=rank,
            interpret=generation == "cpu",
            vmem_limit_bytes=block_sizes.vmem_limit(generation),
            typical_ranks=typical_ranks,
        )
        return out[:num_tokens]  # the kernel gives base exactly on tokens without an adapter (it selects)

    return fn


@functools.lru_cache(maxsize=_CACHE_SIZE)
def pooled_expand_fn(backend: str, generation: str, int8: bool) -> Callable:
    """``fn(inputs[T, R], b_pool[P+2, Dout], base[T, Dout], lanes[T], rows[L, R][, b_scale[P+2]])`` for one
    configuration (see ``ops.pooled_expand``).

    A batch of at most ``_xla_native.PACKED_MAX_TOKENS`` tokens, on every backend, runs
    :func:`_xla_native.pooled_expand` (the used lanes' true-rank rows only, as XLA ops). A longer one runs, on
    "pallas", the pooled kernel's expand (``fused.pooled_expand``: each lane's true-rank pages of B through the
    page table, derived from ``rows`` here; where it cannot run the shape, Dout not lane-aligned, the slot kernel
    on every lane's rows gathered into slots), on "xla" :func:`expand_fn` on the pool's
    :class:`_xla_native.PoolTiles` (the tiles of the lanes its visits name).
    """

    def fn(s, b_pool, base, lanes, rows, *scale):
        b_scale = scale[0] if int8 else None
        num_tokens, (num_slots, rank) = s.shape[0], rows.shape
        if num_tokens <= _xla_native.PACKED_MAX_TOKENS:
            out = _xla_native.pooled_expand(s, b_pool, base, lanes.astype(jnp.int32), rows, b_scale)
            return jnp.where(_in_range(lanes, num_slots), out.astype(base.dtype), base)
        run = backend == "pallas"
        if run:
            plan = fused.pooled_expand_plan(num_tokens, base.shape[1], rank, num_slots, s.dtype, generation, int8)
            sizes, lanes_count, run = plan
        if run:
            padded = sizes.padded_tokens(num_tokens)
            idx = _padded_indices(lanes, num_slots, padded)
            table, _ = page_inputs(rows, b_pool, None, None, None, None)
            out = fused.pooled_expand(
                fused.lane_placed(_pad_rows(s, padded), idx, table, rank, lanes_count),
                b_pool,
                _pad_rows(base, padded),
                visits.build_lanes(idx, num_slots, sizes.tokens, lanes_count),
                table,
                None if b_scale is None else fused.page_scales_of(b_scale),
                block_sizes=sizes,
                lanes=lanes_count,
                rank=rank,
                interpret=generation == "cpu",
                vmem_limit_bytes=block_sizes.vmem_limit(generation),
            )
            return out[:num_tokens]  # the kernel gives base exactly on tokens without an adapter (it selects)
        # The slot expand multiplies every entry of s (by the zero row past a lane's rank): keep only the lanes'.
        ranks = _xla_native.lane_ranks(rows, b_pool.shape[0] - 2)[jnp.clip(lanes, 0, num_slots - 1)]
        s = jnp.where(jnp.arange(s.shape[1])[None, :] < ranks[:, None], s, 0)
        lora_b = _pool_weights(backend, b_pool, b_scale, rows, s.dtype, base.shape[1])
        return expand_fn(backend, generation, True, None)(s, lora_b, base, lanes)

    return fn


@functools.lru_cache(maxsize=_CACHE_SIZE)
def weight_grad_fn(num_slots: int, scaling: float, backend: str = "xla", generation: str = "cpu") -> Callable:
    """``fn(left[T, P], right[T, Q], indices[T]) -> [L, P, Q]`` in right's dtype, for one configuration.

    Backend "pallas": the slot-major Pallas kernel (``kernels.weight_grad``; interpret mode on
    the CPU); otherwise the XLA-native segmented outer product (``_xla_native.weight_grad``).
    """

    def fn(left, right, indices):
        num_tokens, width = indices.shape[0], right.shape[1]
        if backend == "pallas" and num_slots > 0:
            tokens = weight_grad.block_tokens(num_tokens)
            padded = -(-num_tokens // tokens) * tokens
            wide = weight_grad.padded_width(width)
            out = weight_grad.weight_grad(
                _pad_rows(left, padded),
                jnp.pad(_pad_rows(right, padded), [(0, 0), (0, wide - width)]),
                _padded_indices(indices, num_slots, padded),
                num_slots=num_slots,
                scaling=scaling,
                tokens=tokens,
                interpret=generation == "cpu",
                vmem_limit_bytes=block_sizes.vmem_limit(generation),
            )[:, :, :width]
            return out.astype(right.dtype)
        block_tokens = _xla_native.weight_grad_block_tokens(num_tokens)
        padded = -(-num_tokens // block_tokens) * block_tokens
        idx = _padded_indices(indices, num_slots, padded)
        out = _xla_native.weight_grad(
            _pad_rows(left, padded),
            _pad_rows(right, padded),
            idx,
            num_slots,
            scaling=scaling,
            block_tokens=block_tokens,
        )
        return out.astype(right.dtype)

    return fn


@functools.lru_cache(maxsize=_CACHE_SIZE)
def metadata_size(
    num_tokens: int, hidden: int, out_dim: int, rank: int, num_slots: int, dtype: str, generation: str
) -> int:
    """Length of the packed metadata the fused op expects for these shapes (see :func:`batch_metadata`)."""
    sizes, lanes, _ = fused.plan_call(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
    padded = sizes.padded_tokens(num_tokens)
    return visits.packed_size(padded, num_slots, sizes.tokens, lanes) + padded  # + the tokens' order by slot


def batch_metadata(slots, layer_shapes, rank: int, num_slots: int, dtype: str, generation: str) -> dict:
    """Host-built metadata of one batch for the fused op, per layer shape.

    Args:
      slots: [N] int32 numpy: each token's slot (-1 = none).
      layer_shapes: (in_features, out_features) of the layers that will run the fused op.

    Returns:
      (in_features, out_features) -> int32 numpy array: ``visits.pack`` of the lane
      and visit metadata, then the padded tokens' stable order by slot (what the
      XLA-native backend permutes rows by when the blocks mix adapters); layers
      whose plans share a token block and lane count share one array.
    """
    num_tokens = len(slots)
    by_plan, out = {}, {}
    for hidden, out_dim in dict.fromkeys(layer_shapes):
        sizes, lanes, _ = _plan_call(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
        key = (sizes.tokens, lanes)
        if key not in by_plan:
            by_plan[key] = plan_metadata(slots, num_slots, sizes, lanes)
        out[(hidden, out_dim)] = by_plan[key]
    return out


def plan_metadata(slots, num_slots: int, sizes: block_sizes.BlockSizes, lanes: int):
    """One plan's host metadata: ``visits.pack`` of the lane and visit arrays, then the padded
    tokens' stable order by slot (int32 numpy). ``slots``: [N] int32 numpy, -1 = none."""
    import numpy as np

    num_tokens = len(slots)
    padded = np.full(sizes.padded_tokens(num_tokens), -1, np.int32)
    padded[:num_tokens] = np.where((slots >= 0) & (slots < num_slots), slots, -1)
    if padded.shape[0] == sizes.tokens:
        packed = _one_block_packed(padded, num_slots, lanes)
    else:
        packed = visits.pack(
            visits.build_lanes(padded, num_slots, sizes.tokens, lanes, xp=np),
            visits.build(padded, num_slots, sizes.tokens, xp=np),
            xp=np,
        )
    order = np.argsort(padded.astype(np.uint32), kind="stable").astype(np.int32)
    return np.concatenate([packed, order])


_plan_call = functools.lru_cache(maxsize=_CACHE_SIZE)(fused.plan_call)


def _one_block_packed(padded, num_slots: int, lanes: int):
    """``visits.pack`` of the lane and visit metadata of a batch that fits one token block (decode).

    The same arrays ``visits.build_lanes`` and ``visits.build`` give, read off the
    block's distinct slots (``np.unique``) instead of the general sorts: a few
    numpy calls, since a decode step builds this on the host every step.
    """
    import numpy as np

    (num_tokens,) = padded.shape
    valid = padded >= 0
    distinct, code = np.unique(padded[valid], return_inverse=True)
    count = len(distinct)
    per_block = visits.max_chunks(num_tokens, num_slots, lanes) * lanes
    lane_slots = np.full(per_block, -1, np.int32)
    lane_slots[:count] = distinct
    token_code = np.full(num_tokens, -1, np.int32)
    token_code[valid] = code.reshape(-1)
    # Visits: the distinct slots in order (one visit with slot -1 if none), padded by repeating the last.
    visit_slot = np.full(num_tokens, distinct[-1] if count else -1, np.int32)
    visit_slot[:count] = distinct
    fields = [
        [0],  # active
        [1 if count else 0],  # num_active
        [-(-count // lanes)],  # chunks
        lane_slots,
        token_code,
        [int(count == 1 and valid.all())],  # uniform
        np.zeros(num_tokens, np.int32),  # visit block
        visit_slot,
        [max(count, 1)],  # visit count
    ]
    return np.concatenate([np.asarray(f, np.int32) for f in fields])
