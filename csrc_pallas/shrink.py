"""BGMV shrink kernel: ``out[t] = scaling * lora_a[slot_t] @ x[t]``.

Grid: ``(visits, hidden tiles)``, both sequential. Visit ``v`` multiplies the
token block ``visits.block[v]`` by the adapter ``visits.slot[v]`` and keeps
the rows whose token uses that slot. The output block (and the f32
accumulator) stays resident across a block's consecutive visits and is
written once, after its last one. The visit arrays are scalar-prefetched into
SMEM, so the BlockSpec index maps pick which x block and adapter tile to
fetch; the TPU pipeline skips a fetch whose block index did not change, so x
is read once when D is a single tile, and each visit reads one adapter tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .block_sizes import BlockSizes, typical_adapters
from .visits import Visits, visit_flags


def _shrink_kernel(
    block_ref,  # SMEM [V] int32
    slot_ref,  # SMEM [V] int32
    count_ref,  # SMEM [1] int32
    idx_ref,  # [tokens, 1] int32
    x_ref,  # [tokens, hidden]
    a_ref,  # [1, R, hidden]
    o_ref,  # [tokens, R]
    acc_ref,  # VMEM [tokens, R] f32
    *,
    scaling: float,
):
    v, k = pl.program_id(0), pl.program_id(1)
    first, last = visit_flags(v, block_ref, count_ref)
    slot = slot_ref[v]

    @pl.when(first & (k == 0))
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(slot >= 0)
    def _accumulate():
        y = jax.lax.dot_general(x_ref[...], a_ref[0], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        acc_ref[...] += jnp.where(idx_ref[...] == slot, y, 0.0)

    @pl.when(last & (k == pl.num_programs(1) - 1))
    def _store():
        o_ref[...] = (acc_ref[...] * scaling).astype(o_ref.dtype)


def cost_estimate(num_tokens: int, hidden: int, rank: int, num_slots: int, block_tokens: int, itemsize: int):
    """Typical cost for XLA's scheduler: one visit per token block (each block's tokens share an
    adapter, as in prefill); the grid length is data-dependent, so this is not a bound.

    Reads x once, the visited adapters' A once, the indices, and writes the [T, R] result.
    """
    adapters = typical_adapters(num_tokens, num_slots, block_tokens)
    return pl.CostEstimate(
        flops=2 * num_tokens * hidden * rank,
        transcendentals=0,
        bytes_accessed=(num_tokens * hidden + adapters * rank * hidden + num_tokens * rank) * itemsize + 4 * num_tokens,
    )


@functools.partial(jax.jit, static_argnames=("scaling", "block_sizes", "interpret", "vmem_limit_bytes"))
def shrink(
    x: jax.Array,  # [T_pad, D]
    lora_a: jax.Array,  # [L, R, D]
    indices: jax.Array,  # [T_pad] int32, -1 = no adapter
    visits: Visits,
    *,
    scaling: float,
    block_sizes: BlockSizes,
    interpret: bool,
    vmem_limit_bytes: int | None = None,
) -> jax.Array:  # [T_pad, R], x.dtype
    """Pallas shrink over prepared visits; shapes must already be tile-aligned.

    ``vmem_limit_bytes``: the generation's scoped VMEM limit (None: Mosaic's default).
    """
    num_tokens, hidden = x.shape
    _, rank, _ = lora_a.shape
    bt, bd = block_sizes.tokens, block_sizes.hidden
    block_sizes.check(hidden, block_sizes.out)

    def x_map(v, k, block, slot, count):
        return block[v], k

    def a_map(v, k, block, slot, count):
        return jnp.maximum(slot[v], 0), 0, k

    def row_map(v, k, block, slot, count):
        return block[v], 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(visits.count[0], hidden // bd),
        in_specs=[
            pl.BlockSpec((bt, 1), row_map),
            pl.BlockSpec((bt, bd), x_map),
            pl.BlockSpec((1, rank, bd), a_map),
        ],
        out_specs=pl.BlockSpec((bt, rank), row_map),
        scratch_shapes=[pltpu.VMEM((bt, rank), jnp.float32)],
    )
    kernel = functools.partial(_shrink_kernel, scaling=scaling)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_tokens, rank), x.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes
        ),
        cost_estimate=cost_estimate(num_tokens, hidden, rank, lora_a.shape[0], bt, x.dtype.itemsize),
        interpret=interpret,
        name="xla_lora_bgmv_shrink",
    )(visits.block, visits.slot, visits.count, indices.reshape(num_tokens, 1), x, lora_a)
