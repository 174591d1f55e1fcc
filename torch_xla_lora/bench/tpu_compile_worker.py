"""Compile kernel configurations with libtpu's TPU compiler, deviceless: the worker process.

Run by :mod:`torch_xla_lora.bench.tpu_compile` in a process of its own, with JAX
on the CPU (``JAX_PLATFORMS=cpu``) and no torch_xla runtime: libtpu only
provides the compiler for a named topology (``jax.experimental.topologies``),
nothing runs and no TPU is needed. Reads a JSON list of
:class:`tpu_grid.Config` dicts on stdin and writes one JSON result a line.

Each configuration is built exactly as the op wrappers build it: the JAX
function of ``torch_xla_lora.ops._jax`` for backend "pallas" and the chip's
generation (padding, plans, block sizes, metadata shapes), with host-built
metadata sized by the host builder itself, lowered inside the ops' Mosaic IR
version pin.
"""

from __future__ import annotations

import os

# Before JAX starts: CPU as JAX's platform, no metadata-server probe by libtpu,
# and no claim on libtpu's single-process lock (nothing runs on a TPU here).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from torch_xla_lora.bench import hlo_traffic, tpu_grid  # noqa: E402
from torch_xla_lora.bench.tpu_grid import CHIPS, Config  # noqa: E402
from torch_xla_lora.kernels import (  # noqa: E402
    block_sizes,
    expand,
    fused,
    fused_base,
    mosaic_version,
    shrink,
    visits,
    weight_grad,
)
from torch_xla_lora.ops import _jax, _linear, _xla_native  # noqa: E402

SCALING = 0.5


@functools.cache
def topology_device(chip: str):
    """The first device of ``chip``'s deviceless topology (:data:`tpu_grid.CHIPS`): what libtpu compiles for."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        topology_name=CHIPS[chip],
        platform="tpu",
        chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
        wrap=[False, False, False],
    )
    return topology.devices[0]


def _shrink_vmem(bt: int, bd: int, rank: int, itemsize: int) -> int:
    """Estimate: double-buffered indices, x block, A tile and output block, plus the f32 accumulator."""
    return 2 * (bt * 4 + bt * bd * itemsize + rank * bd * itemsize + bt * rank * itemsize) + bt * rank * 4


def _expand_vmem(bt: int, bn: int, rank: int, itemsize: int) -> int:
    """Estimate: double-buffered indices, input, B tile, base and output blocks, plus the f32 accumulator."""
    return 2 * (bt * 4 + bt * rank * itemsize + rank * bn * itemsize + 2 * bt * bn * itemsize) + bt * bn * 4


def _estimate(estimate) -> dict:
    """A kernel's ``pl.CostEstimate`` as the result records it, beside libtpu's ``cost``."""
    return {"flops": estimate.flops, "bytes accessed": estimate.bytes_accessed}


def _host_metadata(cfg: Config, sds):
    """The spec of the packed metadata the host builder (ops.batch_metadata) makes for this layer."""
    shape = (cfg.in_features, cfg.out_features)
    packed = _jax.batch_metadata(np.full(cfg.tokens, -1, np.int32), [shape], cfg.rank, cfg.slots, cfg.dtype, cfg.chip)
    return sds(packed[shape].shape, jnp.int32)


def _shrink_expand_info(cfg: Config) -> dict:
    """Plan and VMEM estimate of the shrink-expand call (laned kernel, or shrink then expand)."""
    dtype = jnp.dtype(cfg.dtype)
    rank, slots = cfg.rank, cfg.slots
    sizes, lanes, run_fused = fused.plan_call(
        cfg.tokens, cfg.in_features, cfg.out_features, rank, slots, dtype, cfg.chip
    )
    # Unaligned widths run the fused kernel on lane-padded buffers only (ops._jax.shrink_expand_fn).
    run_fused = run_fused and (fused.lane_aligned(cfg.in_features, cfg.out_features) or tpu_grid.lane_padded(cfg))
    info = {"block": dataclasses.asdict(sizes), "lanes": lanes, "path": "fused" if run_fused else "shrink+expand"}
    if run_fused:
        info["vmem_estimate"] = fused.vmem_bytes(sizes, rank, slots, lanes, dtype)
    else:  # the wrapper runs shrink then expand (see ops._jax.shrink_expand_fn)
        shrink_vmem = _shrink_vmem(sizes.tokens, sizes.hidden, rank, dtype.itemsize)
        info["vmem_estimate"] = max(shrink_vmem, _expand_vmem(sizes.tokens, sizes.out, rank, dtype.itemsize))
        padded, wide = sizes.padded_tokens(cfg.tokens), tpu_grid.lane_padded(cfg)
        d_in, d_out = (fused.padded_width(w) if wide else w for w in (cfg.in_features, cfg.out_features))
        both = [
            shrink.cost_estimate(padded, d_in, rank, slots, sizes.tokens, dtype.itemsize),
            expand.cost_estimate(padded, rank, d_out, slots, sizes.tokens, True, dtype.itemsize),
        ]
        info["estimate"] = {key: sum(_estimate(e)[key] for e in both) for key in ("flops", "bytes accessed")}
    return info


def build_fused_at_estimate(cfg: Config, sds):
    """The laned kernel (``fused.shrink_expand``) of the op's plan, compiled with its scoped VMEM limit set to the
    plan's own estimate (``fused.vmem_bytes``, rounded up to 4 KiB): it compiles only if the estimate covers what
    Mosaic allocates, which the planner relies on to keep every plan within the generation's limit."""
    dtype = jnp.dtype(cfg.dtype)
    tokens, d_in, d_out, rank, slots = cfg.tokens, cfg.in_features, cfg.out_features, cfg.rank, cfg.slots
    sizes, lanes = fused.plan(tokens, d_in, d_out, rank, slots, dtype, cfg.chip)
    limit = -(-fused.vmem_bytes(sizes, rank, slots, lanes, dtype) // 4096) * 4096

    def fn(x, lora_a, lora_b, base, indices):
        padded = sizes.padded_tokens(tokens)
        idx = _jax._padded_indices(indices, slots, padded)
        meta = visits.build_lanes(idx, slots, sizes.tokens, lanes)
        return fused.shrink_expand(
            _jax._pad_rows(x, padded), lora_a, lora_b, _jax._pad_rows(base, padded), meta, scaling=SCALING,
            block_sizes=sizes, lanes=lanes, interpret=False, vmem_limit_bytes=limit,
        )  # fmt: skip

    widths = (fused.padded_width(d_in), fused.padded_width(d_out))
    args = [sds((tokens, d_in), dtype), sds((slots, rank, widths[0]), dtype), sds((slots, rank, widths[1]), dtype)]
    args += [sds((tokens, d_out), dtype), sds((tokens,), jnp.int32)]
    info = {"block": dataclasses.asdict(sizes), "lanes": lanes, "path": "fused", "vmem_estimate": limit}
    return fn, args, info | {"vmem_limit": limit}


def build_fused(cfg: Config, sds):
    if cfg.variant == "at_estimate":
        return build_fused_at_estimate(cfg, sds)
    dtype = jnp.dtype(cfg.dtype)
    tokens, d_in, d_out, rank, slots = cfg.tokens, cfg.in_features, cfg.out_features, cfg.rank, cfg.slots
    host = cfg.variant in ("host_metadata", "lane_padded")
    wide = tpu_grid.lane_padded(cfg)  # an expert layer's slots, padded to whole lane tiles
    args = [
        sds((tokens, d_in), dtype),
        sds((slots, rank, fused.padded_width(d_in) if wide else d_in), dtype),
        sds((slots, rank, fused.padded_width(d_out) if wide else d_out), dtype),
        sds((tokens, d_out), dtype),
        sds((tokens,), jnp.int32),
    ]
    if host:
        args.append(_host_metadata(cfg, sds))
    return _jax.shrink_expand_fn("pallas", cfg.chip, SCALING, host), args, _shrink_expand_info(cfg)


def build_linear(cfg: Config, sds):
    """linear_lora as the op calls it: nn.Linear's layout with host metadata, or Conv1D's with a bias."""
    dtype = jnp.dtype(cfg.dtype)
    tokens, d_in, d_out, rank, slots = cfg.tokens, cfg.in_features, cfg.out_features, cfg.rank, cfg.slots
    layout, has_bias, host = {
        "out_in_host_metadata": ("out_in", False, True),
        "in_out_bias": ("in_out", True, False),
    }[cfg.variant]
    args = [sds((tokens, d_in), dtype), sds((d_out, d_in) if layout == "out_in" else (d_in, d_out), dtype)]
    args += [sds((d_out,), dtype)] if has_bias else []
    args += [sds((slots, rank, d_in), dtype), sds((slots, rank, d_out), dtype), sds((tokens,), jnp.int32)]
    own = False
    if host:
        # The array set_batch gives the layer (ops.batch_metadata with linear_shapes): built for
        # linear_lora's own plan where the shrink-expand op's does not fit it, else the op's.
        shape = (d_in, d_out, has_bias)
        mine = _linear.linear_batch_metadata(np.full(tokens, -1, np.int32), [shape], rank, slots, cfg.dtype, cfg.chip)
        own = shape in mine
        args.append(sds(mine[shape].shape, jnp.int32) if own else _host_metadata(cfg, sds))
    planned = fused_base.plan(tokens, d_in, d_out, rank, slots, dtype, cfg.chip, has_bias)
    if planned is None:  # the op runs XLA's dot, then the shrink-expand call
        info = _shrink_expand_info(cfg)
        info["path"] = "dot + " + info["path"]
    else:
        sizes, lanes = planned
        padded = sizes.padded_tokens(tokens)
        estimate = fused_base.cost_estimate(padded, d_in, d_out, rank, slots, dtype, sizes, lanes)
        info = {
            "block": dataclasses.asdict(sizes),
            "lanes": lanes,
            "path": "fused_base",
            "vmem_estimate": fused_base.vmem_bytes(sizes, rank, slots, lanes, dtype, has_bias),
            "vmem_limit": fused_base.vmem_limit(cfg.chip),
            # The pl.CostEstimate the kernel declares (for XLA's scheduler), to compare with the compiled cost.
            "estimate": _estimate(estimate),
        }
    info["own_metadata"] = own
    return _linear.linear_lora_fn("pallas", cfg.chip, SCALING, layout, has_bias, host, own), args, info


def build_shrink(cfg: Config, sds):
    dtype = jnp.dtype(cfg.dtype)
    tokens, d_in, rank, slots = cfg.tokens, cfg.in_features, cfg.rank, cfg.slots
    args = [sds((tokens, d_in), dtype), sds((slots, rank, d_in), dtype), sds((tokens,), jnp.int32)]
    sizes = block_sizes.choose(tokens, d_in, rank, cfg.chip)
    info = {"block": dataclasses.asdict(sizes)}
    info["vmem_estimate"] = _shrink_vmem(sizes.tokens, sizes.hidden, rank, dtype.itemsize)
    padded = sizes.padded_tokens(tokens)
    info["estimate"] = _estimate(shrink.cost_estimate(padded, d_in, rank, slots, sizes.tokens, dtype.itemsize))
    return _jax.shrink_fn("pallas", cfg.chip, SCALING), args, info


def build_expand(cfg: Config, sds):
    dtype = jnp.dtype(cfg.dtype)
    tokens, width, rank, slots = cfg.tokens, cfg.out_features, cfg.rank, cfg.slots
    add_inputs = cfg.variant != "no_add"
    offset = width if cfg.variant == "slice" else None  # the second half of a [T, 2 * width] base
    base_width = 2 * width if offset is not None else width
    args = [
        sds((tokens, rank), dtype),
        sds((slots, rank, width), dtype),
        sds((tokens, base_width), dtype),
        sds((tokens,), jnp.int32),
    ]
    sizes = block_sizes.choose(tokens, rank, width, cfg.chip)
    info = {"block": dataclasses.asdict(sizes)}
    info["vmem_estimate"] = _expand_vmem(sizes.tokens, sizes.out, rank, dtype.itemsize)
    into_base = add_inputs and offset is None  # a slice's product is expanded onto zeros, then added (ops._jax)
    padded = sizes.padded_tokens(tokens)
    estimate = expand.cost_estimate(padded, rank, width, slots, sizes.tokens, into_base, dtype.itemsize)
    info["estimate"] = _estimate(estimate)
    return _jax.expand_fn("pallas", cfg.chip, add_inputs, offset), args, info


# Kernel entry name (tpu_grid.KERNELS) -> builder(config, sds) -> (jax fn, argument specs, info).
def build_g_pass(cfg: Config, sds):
    """The fused backward's pass over g as the op calls it: ds and dB (or the separate kernels' fallback)."""
    from torch_xla_lora.ops import _lora_grads_jax

    dtype = jnp.dtype(cfg.dtype)
    rank, width, slots = cfg.rank, cfg.out_features, cfg.slots
    args = (sds((cfg.tokens, rank), dtype), sds((cfg.tokens, width), dtype))
    args += (sds((slots, rank, width), dtype), sds((cfg.tokens,), jnp.int32))
    tokens = weight_grad.block_tokens(cfg.tokens)
    wide = weight_grad.padded_width(width)
    budget = weight_grad.fused_vmem_budget(block_sizes.vmem_limit(cfg.chip))
    tile = weight_grad.fused_width_tile(wide, tokens, rank, slots, dtype.itemsize, budget)
    info = {"path": "g_pass" if tile is not None else "separate", "block": {"tokens": tokens, "width": tile}}
    if tile is None:  # the separate shrink and weight-gradient kernels: the latter's plan, as build_weight_grad
        wg_tile = weight_grad.width_tile(wide, tokens, rank, dtype.itemsize, block_sizes.vmem_limit(cfg.chip))
        info["vmem_estimate"] = weight_grad.vmem_bytes(tokens, rank, wg_tile, dtype.itemsize)
    else:
        info["vmem_estimate"] = weight_grad._fused_bytes(tile, tokens, rank, slots, dtype.itemsize)
        padded = -(-cfg.tokens // tokens) * tokens
        estimate = weight_grad.fused_cost_estimate(padded, rank, wide, slots, wide // tile, dtype.itemsize)
        info["estimate"] = {"flops": estimate.flops, "bytes accessed": estimate.bytes_accessed}

    def fn(s, g, lora_b, indices):
        return _lora_grads_jax.g_pass(s, g, lora_b, indices, cfg.chip)

    return fn, args, info


def build_weight_grad(cfg: Config, sds):
    if cfg.variant == "g_pass":
        return build_g_pass(cfg, sds)
    dtype = jnp.dtype(cfg.dtype)
    rank = cfg.rank
    width = cfg.in_features if cfg.variant == "lora_a" else cfg.out_features
    args = (sds((cfg.tokens, rank), dtype), sds((cfg.tokens, width), dtype), sds((cfg.tokens,), jnp.int32))
    tokens = weight_grad.block_tokens(cfg.tokens)
    limit = block_sizes.vmem_limit(cfg.chip)
    tile = weight_grad.width_tile(weight_grad.padded_width(width), tokens, rank, dtype.itemsize, limit)
    info = {
        "block": {"tokens": tokens, "width": tile},
        "vmem_estimate": weight_grad.vmem_bytes(tokens, rank, tile, dtype.itemsize),
    }
    padded_tokens = -(-cfg.tokens // tokens) * tokens
    estimate = weight_grad.cost_estimate(
        padded_tokens, rank, weight_grad.padded_width(width), cfg.slots, dtype.itemsize
    )
    info["estimate"] = {"flops": estimate.flops, "bytes accessed": estimate.bytes_accessed}
    return _jax.weight_grad_fn(cfg.slots, SCALING, "pallas", cfg.chip), args, info


def _specs(tree, sds):
    """ShapeDtypeStructs for ``moe_layer.argument_shapes``' (shape, dtype name) leaves, the pytree kept."""
    if tree is None:
        return None
    if len(tree) == 2 and isinstance(tree[1], str):
        return sds(tree[0], jnp.dtype(tree[1]))
    return tuple(_specs(item, sds) for item in tree)


def build_moe(cfg: Config, sds):
    """One routed expert layer (``bench.moe_layer``): variant "base" (no adapter rows) or "lora" (every row's
    expert LoRA, ``cfg.slots`` slots of rank ``cfg.rank``); ``cfg.tokens`` tokens routed top-k."""
    from torch_xla_lora.bench import moe_layer

    with_lora = cfg.variant == "lora"
    args = _specs(moe_layer.argument_shapes(cfg.model, cfg.tokens, with_lora, cfg.slots, cfg.rank), sds)
    shape = tpu_grid.MOE_MODELS[cfg.model]
    info = {
        "routed_rows": cfg.tokens * shape.top_k,
        "experts": shape.experts,
        "top_k": shape.top_k,
        "method": moe_layer.grouped_method(shape.transposed),
    }
    return moe_layer.layer_fn(cfg.model, cfg.chip, with_lora), list(args), info


def build_pooled(cfg: Config, sds, experts: int | None = None):
    """pooled_shrink_expand as the op calls it: pooled_shrink_expand_fn('pallas', chip, ...) on pools of
    ``tpu_grid.POOLED_POOL_ROWS`` rows, the batch's distinct ranks (``tpu_grid.pooled_ranks``) for its estimate.

    ``experts``: as an experts layer calls it (``ExpertsWithLoRA._pooled_lora``): the ``[E, P + 2, width]`` pools
    stacked (P + 2 whole 8-row pages, not a multiple of 32: ``pool.kernel_pool_rows``), read by the kernel in place,
    their scales flattened; ``cfg.slots`` the ``L * E`` (lane, expert) entries of the row table and of the page
    table (``ExpertsWithLoRA._entry_tables``), an int8 pool's page scales kept G pools to a tile."""
    dtype, int8 = jnp.dtype(cfg.dtype), cfg.variant == "int8"
    pool_dtype = jnp.int8 if int8 else dtype
    tokens, d_in, d_out, rank, slots = cfg.tokens, cfg.in_features, cfg.out_features, cfg.rank, cfg.slots
    ranks = tpu_grid.pooled_ranks(min(tokens, slots), rank)
    pool_rows = tpu_grid.POOLED_POOL_ROWS + 2
    if experts is None:
        pools = [sds((pool_rows, d_in), pool_dtype), sds((pool_rows, d_out), pool_dtype)]
    else:
        pool_rows = tpu_grid.POOLED_POOL_ROWS + fused.PAGE_ROWS  # each expert's pool whole pages (4,104 rows)
        pools = [sds((experts, pool_rows, d_in), pool_dtype), sds((experts, pool_rows, d_out), pool_dtype)]
        pool_rows *= experts
    args = [sds((tokens, d_in), dtype), *pools, sds((tokens, d_out), dtype)]
    args += [sds((tokens,), jnp.int32), sds((slots, rank), jnp.int32)]
    args += [sds((pool_rows,), jnp.float32)] * 2 if int8 else []
    args += [sds((slots * fused.pages(rank) + slots,), jnp.int32)]  # the page table, as the layers send it
    # An int8 pool's page scales: whole tiles (stacked pools: G pools to a tile, ``fused.page_scales_of``).
    scale_rows = (
        fused.padded_scale_rows(pool_rows)
        if experts is None
        else experts * fused.padded_scale_rows(pool_rows // experts, experts)
    )
    args += [sds((scale_rows,), jnp.float32)] if int8 else []  # the page scales kept beside an int8 pool
    sizes, lanes, run = fused.pooled_plan_call(tokens, d_in, d_out, rank, slots, dtype, cfg.chip, int8)
    padded = sizes.padded_tokens(tokens)
    # The tables the kernel reads: the page table (page starts, ranks) whole, and of an int8 pool's page scales the
    # used pages' tiles or the whole array, whichever is fewer (one block of decode tokens holds every adapter).
    table_bytes = fused.table_read_bytes(slots * fused.pages(rank) + slots, ranks, scale_rows if int8 else 0)
    estimate = fused.pooled_cost_estimate(padded, d_in, d_out, ranks, rank, dtype, sizes, lanes, int8, table_bytes)
    info = {
        "block": dataclasses.asdict(sizes),
        "lanes": lanes,
        "path": "pooled" if run else "gather + shrink_expand",
        "vmem_estimate": fused.pooled_vmem_bytes(sizes, rank, slots, lanes, dtype, int8),
        "ranks": list(ranks),
        "estimate": _estimate(estimate),
        "activation_bytes": padded * (d_in + 2 * d_out) * dtype.itemsize + 4 * padded,
        "table_bytes": table_bytes,
    }
    fn = _jax.pooled_shrink_expand_fn("pallas", cfg.chip, SCALING, int8, False, ranks, True, int8)
    return fn, args, info


def build_pooled_experts(cfg: Config, sds):
    """:func:`build_pooled` as the experts layer of ``cfg.model`` (``tpu_grid.MOE_MODELS``) calls the op."""
    return build_pooled(cfg, sds, experts=tpu_grid.MOE_MODELS[cfg.model].experts)


def build_pooled_expand(cfg: Config, sds):
    """pooled_expand as the token embedding calls it on a TPU: pooled_expand_fn('pallas', chip, int8) on a B pool
    of ``tpu_grid.POOLED_POOL_ROWS`` rows: at most ``_xla_native.PACKED_MAX_TOKENS`` tokens XLA ops over the used
    lanes' packed true-rank rows, more the pooled kernel's expand (``fused.pooled_expand``: the lanes' pages through
    the page table; its estimate recorded). Variant "gathered": what the embedding ran before, every lane's rows
    gathered into slots and the slot expand kernel, to compare."""
    if cfg.variant == "gathered":
        _, args, info = build_pooled_expand(dataclasses.replace(cfg, variant="float"), sds)

        def gathered(s, b_pool, base, lanes, rows):
            lora_b = _xla_native.gather_lanes(b_pool, None, rows, s.dtype)
            return _jax.expand_fn("pallas", cfg.chip, True, None)(s, lora_b, base, lanes)

        return gathered, args, {"path": "gather + expand", "pool_rows": info["pool_rows"]}
    dtype, int8 = jnp.dtype(cfg.dtype), cfg.variant == "int8"
    tokens, d_out, rank, slots = cfg.tokens, cfg.out_features, cfg.rank, cfg.slots
    pool_rows = tpu_grid.POOLED_POOL_ROWS + 2
    args = [
        sds((tokens, rank), dtype),
        sds((pool_rows, d_out), jnp.int8 if int8 else dtype),
        sds((tokens, d_out), dtype),
        sds((tokens,), jnp.int32),
        sds((slots, rank), jnp.int32),
    ]
    args += [sds((pool_rows,), jnp.float32)] if int8 else []
    info = {"path": "packed rows (XLA ops)", "pool_rows": pool_rows}
    if tokens > _xla_native.PACKED_MAX_TOKENS:
        sizes, lanes, run = fused.pooled_expand_plan(tokens, d_out, rank, slots, dtype, cfg.chip, int8)
        padded, typical = sizes.padded_tokens(tokens), (rank,) * min(lanes, slots)
        scale_rows = fused.padded_scale_rows(pool_rows) if int8 else 0  # the page scales the op builds from b_scale
        table_bytes = fused.table_read_bytes(slots * fused.pages(rank) + slots, typical, scale_rows)
        estimate = fused.pooled_cost_estimate(
            padded, sizes.hidden, d_out, typical, rank, dtype, sizes, lanes, int8, table_bytes, expand_only=True
        )
        info |= {
            "path": "pooled expand kernel" if run else "gather + expand",
            "block": dataclasses.asdict(sizes),
            "lanes": lanes,
            "vmem_estimate": fused.pooled_vmem_bytes(sizes, rank, slots, lanes, dtype, int8),
            "estimate": _estimate(estimate),
        }
    return _jax.pooled_expand_fn("pallas", cfg.chip, int8), args, info


BUILDERS = {
    "pooled": build_pooled,
    "pooled_experts": build_pooled_experts,
    "pooled_expand": build_pooled_expand,
    "moe": build_moe,
    "fused": build_fused,
    "shrink": build_shrink,
    "expand": build_expand,
    "linear": build_linear,
    "weight_grad": build_weight_grad,
}


def build_linear_fused(cfg: Config, sds):
    """linear_lora_fused as layers/fusion.py calls it (tpu_grid.linear_fused_config): "mlp_down" reads SiLU(gate)
    * up and adds the residual, "norm" scales x by RMSNorm's row and column factors, "int8" reads an int8
    weight and applies its per-channel f32 scales; with the host metadata set_batch gives the layer. "int8_dx":
    the int8 layer's backward pass for dx (``_autograd.linear_grads``): the output gradient [T, out] through the
    same int8 weight read transposed ("in_out", its scales per input channel, ``Fusion.weight_in_scale``), B as
    the shrink's and A as the expand's weights, without host metadata (the backward groups on the device)."""
    dtype = jnp.dtype(cfg.dtype)
    tokens, d_in, d_out, rank, slots = cfg.tokens, cfg.in_features, cfg.out_features, cfg.rank, cfg.slots
    mlp, norm, int8, dx = (cfg.variant == v for v in ("mlp_down", "norm", "int8", "int8_dx"))
    fusion = fused_base.Fusion(
        silu_mul=mlp, row_scale=norm, col_scale=norm, residual=mlp, weight_scale=int8, weight_in_scale=dx
    )
    if dx:  # the product's K is the layer's out, its N the layer's in
        d_in, d_out = d_out, d_in
    args = [sds((tokens, d_in), dtype)]
    args.append(sds((d_in, d_out) if dx else (d_out, d_in), jnp.int8 if fusion.int8 else dtype))
    args += [sds((slots, rank, d_in), dtype), sds((slots, rank, d_out), dtype), sds((tokens,), jnp.int32)]
    args += [sds((tokens, d_in), dtype), sds((tokens, d_out), dtype)] if mlp else []
    args += [sds((tokens,), jnp.float32), sds((d_in,), dtype)] if norm else []
    args += [sds((d_out,), jnp.float32)] if int8 else []
    args += [sds((d_in,), jnp.float32)] if dx else []
    shape = (d_in, d_out, False)
    own = False
    if not dx:
        mine = _linear.linear_batch_metadata(np.full(tokens, -1, np.int32), [shape], rank, slots, cfg.dtype, cfg.chip)
        own = shape in mine
        args.append(sds(mine[shape].shape, jnp.int32) if own else _host_metadata(cfg, sds))
    sizes, lanes = fused_base.plan(tokens, d_in, d_out, rank, slots, dtype, cfg.chip, False, fusion)
    estimate = fused_base.cost_estimate(
        sizes.padded_tokens(tokens), d_in, d_out, rank, slots, dtype, sizes, lanes, fusion
    )
    info = {
        "block": dataclasses.asdict(sizes),
        "lanes": lanes,
        "path": "fused_base_fusion",
        "own_metadata": own,
        "vmem_estimate": fused_base.vmem_bytes(sizes, rank, slots, lanes, dtype, False, fusion),
        "vmem_limit": fused_base.vmem_limit(cfg.chip),
        "estimate": _estimate(estimate),
    }
    layout = "in_out" if dx else "out_in"
    fn = _linear.linear_lora_fused_fn("pallas", cfg.chip, SCALING, layout, False, fusion, not dx, own)
    return fn, args, info


BUILDERS["linear_fused"] = build_linear_fused


#: The training kernel's variants, what it takes in beside writing s as the layers run it in training: nothing
#: (``linear_lora_train``), the arranged decoder's RMSNorm of q/k/v's and gate/up's x, its o_proj residual, its
#: down_proj's SiLU(gate) * up and residual, an int8 base's weight and scales (``linear_lora_fused_train``).
LINEAR_TRAIN_FUSIONS = {
    "keep_s": fused_base.NO_FUSION,
    "keep_s_norm": fused_base.Fusion(row_scale=True, col_scale=True),
    "keep_s_residual": fused_base.Fusion(residual=True),
    "keep_s_mlp_down": fused_base.Fusion(silu_mul=True, residual=True),
    "keep_s_int8": fused_base.Fusion(weight_scale=True),
    # The backward's one pass over g (linear_lora_backward): the forward's [out, in] weight read as the swapped
    # pass's [in', out'] ("in_out"), A's gradient (the layer's dB) taken against the forward's s.
    "backward": fused_base.NO_FUSION,
    "backward_int8": fused_base.Fusion(weight_in_scale=True),
}


#: A variant's suffix that compiles the kernel with its scoped VMEM limit set to the plan's own estimate (rounded up to
#: 4 KiB) instead of the generation's: it compiles only where the estimate covers what Mosaic allocates.
AT_ESTIMATE = "_at_estimate"


def build_linear_train(cfg: Config, sds):
    """The fused base kernel of training, which also writes each token's shrink ``s`` for the backward
    (``fused_base.tpu_compile_case(..., keep_s=True)``: nn.Linear's layout, no bias, metadata built on the device),
    with the variant's fusion (:data:`LINEAR_TRAIN_FUSIONS`; with :data:`AT_ESTIMATE` after its name, its VMEM limit
    the estimate). The "backward" variants: the backward's pass over g
    (``in_features`` g's width, ``out_features`` dx's), in the swapped layout, also taking dB ([L, R, in] f32)."""
    dtype = jnp.dtype(cfg.dtype)
    tokens, d_in, d_out, rank, slots = cfg.tokens, cfg.in_features, cfg.out_features, cfg.rank, cfg.slots
    variant = cfg.variant.removesuffix(AT_ESTIMATE)
    fusion = LINEAR_TRAIN_FUSIONS[variant]
    a_grad = variant.startswith("backward")
    layout = "in_out" if a_grad else "out_in"
    sizes, lanes = fused_base.plan(tokens, d_in, d_out, rank, slots, dtype, cfg.chip, False, fusion, True, a_grad)
    vmem = fused_base.vmem_bytes(sizes, rank, slots, lanes, dtype, False, fusion, True, d_in if a_grad else 0)
    limit = -(-vmem // 4096) * 4096 if cfg.variant.endswith(AT_ESTIMATE) else fused_base.vmem_limit(cfg.chip)
    fn, shapes = fused_base.tpu_compile_case(
        tokens, d_in, d_out, rank, slots, dtype, cfg.chip, layout, fusion=fusion, keep_s=True, a_grad=a_grad,
        vmem_limit_bytes=limit,
    )  # fmt: skip
    padded = sizes.padded_tokens(tokens)
    estimate = fused_base.cost_estimate(
        padded, d_in, d_out, rank, slots, dtype, sizes, lanes, fusion, keep_s=True, a_grad=a_grad
    )
    info = {
        "block": dataclasses.asdict(sizes),
        "lanes": lanes,
        "path": "fused_base_backward" if a_grad else "fused_base_keep_s",
        "vmem_estimate": vmem,
        "vmem_limit": limit,
        "estimate": _estimate(estimate),
        "outputs": [[padded, d_out], [padded, rank]]
        + ([[padded, d_in]] if fused_base.keeps_x(fusion, True) else [])  # x as the prologue made it
        + ([[slots, rank, d_in]] if a_grad else []),
    }
    return fn, [sds(a.shape, a.dtype) for a in shapes], info


BUILDERS["linear_train"] = build_linear_train


def compile_one(cfg: Config, pin_ir_version: bool = True) -> dict:
    """Lower and compile one configuration for its chip; the result as a JSON-able dict."""
    result = {"name": cfg.name, "config": dataclasses.asdict(cfg), "ok": False}
    try:
        sharding = jax.sharding.SingleDeviceSharding(topology_device(cfg.chip))

        def sds(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        fn, args, info = BUILDERS[cfg.kernel](cfg, sds)
        result.update({"vmem_limit": block_sizes.vmem_limit(cfg.chip), **info})
        pin = mosaic_version.pinned_ir_version() if pin_ir_version else contextlib.nullcontext()
        start = time.perf_counter()
        with pin:
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))
        result["lower_s"] = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        result["compile_s"] = time.perf_counter() - start
        memory = compiled.memory_analysis()
        result["memory"] = {
            key: int(getattr(memory, f"{key}_size_in_bytes"))
            for key in ("argument", "output", "temp", "generated_code")
        }
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost  # a list of one dict on older jax
        result["cost"] = {key: float(cost[key]) for key in ("flops", "bytes accessed") if key in (cost or {})}
        try:  # the compiled program's HBM traffic alone (libtpu's "bytes accessed" counts VMEM's too)
            text = compiled.as_text()
            result["hbm_bytes"] = hlo_traffic.hbm_bytes(text)
            result["after_kernels"] = sorted(hlo_traffic.after_kernels(text))
        except (ValueError, KeyError, StopIteration):  # an HLO text the counter does not parse: left out
            result["hbm_bytes"] = result["after_kernels"] = None
        result["ok"] = True
    except Exception as exc:  # a compile error is this check's finding: report it, go on
        result["error"] = f"{type(exc).__name__}: {exc}"[:3000]
    return result


def main() -> int:
    request = json.load(sys.stdin)
    pin = request.get("pin_ir_version", True)
    try:
        libtpu_version = metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        libtpu_version = None
    print(json.dumps({"libtpu": libtpu_version, "jax": jax.__version__}), flush=True)
    if libtpu_version is None:
        return 3
    for raw in request["configs"]:
        print(json.dumps(compile_one(Config(**raw), pin)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
