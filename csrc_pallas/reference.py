"""Plain-jnp loop definitions of the kernels, for checking them inside JAX."""

from __future__ import annotations

import jax.numpy as jnp


def shrink(x, lora_a, indices, scaling: float):
    """out[t] = scaling * lora_a[i_t] @ x[t]; zero where i_t is outside [0, L)."""
    out = jnp.zeros((x.shape[0], lora_a.shape[1]), jnp.float32)
    for slot in range(lora_a.shape[0]):
        y = jnp.dot(x.astype(jnp.float32), lora_a[slot].astype(jnp.float32).T)
        out = jnp.where((indices == slot)[:, None], y, out)
    return (out * scaling).astype(x.dtype)


def expand(s, lora_b, base, indices, add_inputs: bool):
    """out[t] = (base[t] if add_inputs else 0) + s[t] @ lora_b[i_t]."""
    out = base.astype(jnp.float32) if add_inputs else jnp.zeros(base.shape, jnp.float32)
    for slot in range(lora_b.shape[0]):
        y = jnp.dot(s.astype(jnp.float32), lora_b[slot].astype(jnp.float32))
        out = out + jnp.where((indices == slot)[:, None], y, 0.0)
    return out.astype(base.dtype)


def linear_lora(x, weight, bias, lora_a, lora_b, indices, scaling: float, layout: str = "out_in"):
    """out[t] = x[t] @ W^T (+ bias) + (scaling * x[t] @ lora_a[i_t]^T) @ lora_b[i_t], in f32, rounded once.

    ``weight`` is [N, K] for layout "out_in" (nn.Linear) or [K, N] for "in_out"
    (Conv1D); the rank intermediate is rounded to lora_b's dtype.
    """
    w = weight.astype(jnp.float32)
    out = x.astype(jnp.float32) @ (w.T if layout == "out_in" else w)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    for slot in range(lora_a.shape[0]):
        s = (scaling * (x.astype(jnp.float32) @ lora_a[slot].astype(jnp.float32).T)).astype(lora_b.dtype)
        y = jnp.dot(s.astype(jnp.float32), lora_b[slot].astype(jnp.float32))
        out = out + jnp.where((indices == slot)[:, None], y, 0.0)
    return out.astype(x.dtype)
