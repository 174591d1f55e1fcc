"""BGMV expand kernel: ``out[t] = (base[t] if add_inputs else 0) + s[t] @ lora_b[slot_t]``.

Grid: ``(output tiles, visits)``, both sequential; the visit axis is inner so
each output block stays resident across its token block's consecutive visits
and is written once. ``lora_b`` is stored rank-first ([L, R, Dout]) so each
visit reads one contiguous [R, tile] slab. The base is read once per output
block (as the accumulator's initial value), never copied separately.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .block_sizes import BlockSizes, typical_adapters
from .visits import Visits, visit_flags


def _expand_kernel(
    block_ref,  # SMEM [V] int32
    slot_ref,  # SMEM [V] int32
    count_ref,  # SMEM [1] int32
    idx_ref,  # [tokens, 1] int32
    s_ref,  # [tokens, R]
    b_ref,  # [1, R, out]
    *refs,  # (base_ref [tokens, out])?, o_ref [tokens, out], acc_ref VMEM [tokens, out] f32
    add_inputs: bool,
):
    base_ref = refs[0] if add_inputs else None
    o_ref, acc_ref = refs[-2], refs[-1]
    v = pl.program_id(1)
    first, last = visit_flags(v, block_ref, count_ref)
    slot = slot_ref[v]

    @pl.when(first)
    def _init():
        if add_inputs:
            acc_ref[...] = base_ref[...].astype(jnp.float32)
        else:
            acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(slot >= 0)
    def _accumulate():
        b = b_ref[0]
        y = jnp.dot(s_ref[...].astype(b.dtype), b, preferred_element_type=jnp.float32)
        acc_ref[...] += jnp.where(idx_ref[...] == slot, y, 0.0)

    @pl.when(last)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def cost_estimate(
    num_tokens: int, rank: int, out_dim: int, num_slots: int, block_tokens: int, add_inputs: bool, itemsize: int
):
    """Typical cost for XLA's scheduler: one visit per token block (each block's tokens share an
    adapter, as in prefill); the grid length is data-dependent, so this is not a bound.

    Per output tile, reads the [T, R] input and the visited adapters' B tile, the base when
    ``add_inputs``, and writes the output.
    """
    adapters = typical_adapters(num_tokens, num_slots, block_tokens)
    tiles = num_tokens * out_dim * (2 if add_inputs else 1)
    return pl.CostEstimate(
        flops=2 * num_tokens * rank * out_dim,
        transcendentals=0,
        bytes_accessed=(num_tokens * rank + adapters * rank * out_dim + tiles) * itemsize + 4 * num_tokens,
    )


@functools.partial(jax.jit, static_argnames=("add_inputs", "block_sizes", "interpret", "vmem_limit_bytes"))
def expand(
    s: jax.Array,  # [T_pad, R]
    lora_b: jax.Array,  # [L, R, Dout]
    base: jax.Array,  # [T_pad, Dout]
    indices: jax.Array,  # [T_pad] int32, -1 = no adapter
    visits: Visits,
    *,
    add_inputs: bool,
    block_sizes: BlockSizes,
    interpret: bool,
    vmem_limit_bytes: int | None = None,
) -> jax.Array:  # [T_pad, Dout], base.dtype
    """Pallas expand over prepared visits; shapes must already be tile-aligned.

    ``vmem_limit_bytes``: the generation's scoped VMEM limit (None: Mosaic's default).
    """
    num_tokens, rank = s.shape
    out_dim = lora_b.shape[2]
    bt, bn = block_sizes.tokens, block_sizes.out
    block_sizes.check(block_sizes.hidden, out_dim)

    def row_map(n, v, block, slot, count):
        return block[v], 0

    def tile_map(n, v, block, slot, count):
        return block[v], n

    def b_map(n, v, block, slot, count):
        return jnp.maximum(slot[v], 0), 0, n

    in_specs = [
        pl.BlockSpec((bt, 1), row_map),
        pl.BlockSpec((bt, rank), row_map),
        pl.BlockSpec((1, rank, bn), b_map),
    ]
    operands = [indices.reshape(num_tokens, 1), s, lora_b]
    if add_inputs:
        in_specs.append(pl.BlockSpec((bt, bn), tile_map))
        operands.append(base)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(out_dim // bn, visits.count[0]),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bt, bn), tile_map),
        scratch_shapes=[pltpu.VMEM((bt, bn), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_expand_kernel, add_inputs=add_inputs),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_tokens, out_dim), base.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes
        ),
        cost_estimate=cost_estimate(
            num_tokens, rank, out_dim, lora_b.shape[0], bt, add_inputs, jnp.dtype(base.dtype).itemsize
        ),
        interpret=interpret,
        name="xla_lora_bgmv_expand",
    )(visits.block, visits.slot, visits.count, *operands)
