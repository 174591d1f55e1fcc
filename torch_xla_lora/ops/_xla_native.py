"""The grouped BGMV algorithm in plain jax ops, for devices without Mosaic.

Same visits as the Pallas kernels (see ``torch_xla_lora.kernels.visits``),
walked by a ``fori_loop`` whose trip count is the number of visits, a device
value: the loop body multiplies one token block by one adapter, so the cost is
O(T * R * D) plus a small per-visit overhead, whatever the number of slots.
XLA keeps the loop-carried output in place (dynamic-update-slice), so nothing
is copied per visit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from torch_xla_lora.kernels.visits import Visits


def _rows(array: jax.Array, block: jax.Array, block_tokens: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(array, block * block_tokens, block_tokens)


def shrink(
    x: jax.Array,  # [T_pad, D]
    lora_a: jax.Array,  # [L, R, D]
    indices: jax.Array,  # [T_pad] int32, -1 = no adapter
    visits: Visits,
    *,
    scaling: float,
    block_tokens: int,
) -> jax.Array:  # [T_pad, R], x.dtype
    """Grouped shrink: per visit, one [tokens, D] x [D, R] product, masked to the slot's rows."""

    def body(v, acc):
        block, slot = visits.block[v], visits.slot[v]
        y = lax.dot_general(
            _rows(x, block, block_tokens),
            lora_a[jnp.maximum(slot, 0)],
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        mask = ((_rows(indices, block, block_tokens) == slot) & (slot >= 0))[:, None]
        update = _rows(acc, block, block_tokens) + jnp.where(mask, y, 0.0)
        return lax.dynamic_update_slice_in_dim(acc, update, block * block_tokens, 0)

    acc = jnp.zeros((x.shape[0], lora_a.shape[1]), jnp.float32)
    acc = lax.fori_loop(0, visits.count[0], body, acc)
    return (acc * scaling).astype(x.dtype)


def expand(
    s: jax.Array,  # [T_pad, R]
    lora_b: jax.Array,  # [L, R, Dout]
    base: jax.Array,  # [T_pad, Dout]
    indices: jax.Array,  # [T_pad] int32
    visits: Visits,
    *,
    add_inputs: bool,
    block_tokens: int,
) -> jax.Array:  # [T_pad, Dout], base.dtype
    """Grouped expand: per visit, one [tokens, R] x [R, Dout] product added to the slot's rows."""

    def body(v, acc):
        block, slot = visits.block[v], visits.slot[v]
        b = lora_b[jnp.maximum(slot, 0)]
        y = jnp.dot(_rows(s, block, block_tokens).astype(b.dtype), b, preferred_element_type=jnp.float32)
        mask = ((_rows(indices, block, block_tokens) == slot) & (slot >= 0))[:, None]
        update = _rows(acc, block, block_tokens) + jnp.where(mask, y, 0.0)
        return lax.dynamic_update_slice_in_dim(acc, update, block * block_tokens, 0)

    acc = base.astype(jnp.float32) if add_inputs else jnp.zeros(base.shape, jnp.float32)
    acc = lax.fori_loop(0, visits.count[0], body, acc)
    return acc.astype(base.dtype)


def shrink_expand(
    x: jax.Array,  # [T_pad, D]
    lora_a: jax.Array,  # [L, R, D]
    lora_b: jax.Array,  # [L, R, Dout]
    base: jax.Array,  # [T_pad, Dout]
    indices: jax.Array,  # [T_pad] int32
    visits: Visits,
    *,
    scaling: float,
    block_tokens: int,
) -> jax.Array:  # [T_pad, Dout], base.dtype
    """Fused grouped shrink-expand: per visit, [tokens, D] x [D, R] x [R, Dout] for one slot's rows."""

    def body(v, acc):
        block, slot = visits.block[v], visits.slot[v]
        safe = jnp.maximum(slot, 0)
        s = lax.dot_general(
            _rows(x, block, block_tokens), lora_a[safe], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        mask = ((_rows(indices, block, block_tokens) == slot) & (slot >= 0))[:, None]
        s = jnp.where(mask, s * scaling, 0.0).astype(lora_b.dtype)
        y = jnp.dot(s, lora_b[safe], preferred_element_type=jnp.float32)
        update = _rows(acc, block, block_tokens) + y
        return lax.dynamic_update_slice_in_dim(acc, update, block * block_tokens, 0)

    acc = lax.fori_loop(0, visits.count[0], body, base.astype(jnp.float32))
    return acc.astype(base.dtype)
