"""One routed expert layer's forward as a JAX function, as the library runs it on TPU.

What :class:`~torch_xla_lora.layers.experts.ExpertsWithLoRA` computes over the
N x K routed rows, written with the JAX functions behind its ops, so libtpu can
compile the whole layer without a TPU (``bench tpu_compile --moe``):

- one stable sort of the rows by expert, group sizes by a scatter-add, the rows'
  hidden states gathered (a gather of rows, never of weights);
- both projections by ``xla_lora::grouped_matmul``'s JAX function for the chip
  (``ops._grouped.matmul_fn``: megablox ``gmm`` for ``[E, out, in]`` weights, XLA:TPU's
  ``ragged_dot`` for ``[E, in, out]``, as its ``"auto"`` method picks on TPU);
- with adapters, each row's (slot, expert) LoRA after each projection by
  ``xla_lora::bgmv_shrink_expand``'s JAX function (``ops._jax.shrink_expand_fn``,
  backend "pallas", grouping built on the device), row index ``slot * E + expert``
  into ``[L * E, R, width]`` buffers, in the sorted order;
- the gate (SiLU(gate) * up, or GPT-OSS's clamped interleaved SwiGLU), the rows
  put back in token order by one gather, weighted and summed over k.

Only the layer's glue (sort, gather, gate, unsort) is written here, mirroring the
layer line by line; the matmuls are the ops' own functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch_xla_lora.bench.tpu_grid import MOE_MODELS, MoeShape

# GPT-OSS's SwiGLU (transformers' GptOssConfig defaults, which gpt-oss-20b's config keeps).
GPT_OSS_LIMIT, GPT_OSS_ALPHA = 7.0, 1.702


def grouped_method(transposed: bool) -> str:
    """The method ``grouped_matmul(method="auto")`` takes on a TPU for this weight layout."""
    return "ragged_dot" if transposed else "gmm"


def _gate(jnp, jax, up, shape: MoeShape):
    if shape.gate == "gpt_oss":
        gate, linear = up[:, ::2], up[:, 1::2]
        gate = jnp.minimum(gate, GPT_OSS_LIMIT)
        linear = jnp.clip(linear, -GPT_OSS_LIMIT, GPT_OSS_LIMIT)
        return (linear + 1) * (gate * jax.nn.sigmoid(gate * GPT_OSS_ALPHA))
    gate, linear = jnp.split(up, 2, axis=1)
    return jax.nn.silu(gate) * linear


@functools.lru_cache(maxsize=32)
def layer_fn(model: str, generation: str, with_lora: bool) -> Callable:
    """``fn(hidden [N, D], top_k_index [N, K] int32, top_k_weights [N, K], weights, lora) -> [N, D]``.

    ``weights``: ``(up, down)`` in the model's layout, plus ``(up_bias [E, 2I], down_bias [E, D])`` with
    biases. ``lora`` (``with_lora`` only): ``(lora_a [L*E, R, D], lora_b [L*E, R, 2I], lora_a_down
    [L*E, R, I], lora_b_down [L*E, R, D], token_slots [N] int32)``, slot -1 for a token without adapter
    (on TPU the layer's widths padded to whole lane tiles: :func:`argument_shapes`); None otherwise.
    ``generation``: a TPU generation ("v5e", ...) compiles the Mosaic kernels, "cpu" runs them in
    interpret mode.
    """
    import jax
    import jax.numpy as jnp

    from torch_xla_lora.ops import _grouped, _jax

    shape = MOE_MODELS[model]
    matmul = _grouped.matmul_fn(grouped_method(shape.transposed), shape.transposed, generation)
    add_lora = _jax.shrink_expand_fn("pallas", generation, 1.0, False)

    def fn(hidden, top_k_index, top_k_weights, weights, lora=None):
        num_tokens, top_k = top_k_index.shape
        experts = weights[0].shape[0]
        expert_ids = top_k_index.reshape(-1).astype(jnp.int32)
        order = jnp.argsort(expert_ids, stable=True).astype(jnp.int32)
        expert_sorted = expert_ids[order]
        group_sizes = jnp.zeros((experts,), jnp.int32).at[expert_sorted].add(1)
        token_of_row = order // top_k
        x = hidden[token_of_row]
        rows = None
        if with_lora:
            lora_a, lora_b, lora_a_down, lora_b_down, slots = lora
            rows = slots[token_of_row] * experts + expert_sorted

        up = matmul(x, weights[0], group_sizes)
        if shape.bias:
            up = up + weights[2][expert_sorted]
        if rows is not None:
            up = add_lora(x.astype(lora_a.dtype), lora_a, lora_b, up.astype(lora_b.dtype), rows).astype(up.dtype)
        h = _gate(jnp, jax, up, shape).astype(x.dtype)

        down = matmul(h, weights[1], group_sizes)
        if shape.bias:
            down = down + weights[3][expert_sorted]
        if rows is not None:
            down = add_lora(h, lora_a_down, lora_b_down, down, rows).astype(down.dtype)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
        weighted = down[inverse] * top_k_weights.reshape(-1, 1).astype(down.dtype)
        return weighted.reshape(num_tokens, top_k, -1).sum(axis=1).astype(hidden.dtype)

    return fn


def argument_shapes(model: str, tokens: int, with_lora: bool, slots: int, rank: int) -> tuple:
    """((shape, dtype name), ...) pytree of :func:`layer_fn`'s arguments in bf16 (index arrays int32)."""
    shape = MOE_MODELS[model]
    d, i, e, k = shape.hidden, shape.intermediate, shape.experts, shape.top_k
    bf16, i32 = "bfloat16", "int32"
    up, down = ((e, d, 2 * i), (e, i, d)) if shape.transposed else ((e, 2 * i, d), (e, d, i))
    weights = [(up, bf16), (down, bf16)]
    if shape.bias:
        weights += [((e, 2 * i), bf16), ((e, d), bf16)]
    entries = slots * e
    lora = None
    if with_lora:  # the layer's slots on TPU: widths padded to whole 128-lane tiles (ExpertsWithLoRA.lane_padded)
        pad = lambda width: -(-width // 128) * 128  # noqa: E731
        lora = (
            ((entries, rank, pad(d)), bf16),
            ((entries, rank, pad(2 * i)), bf16),
            ((entries, rank, pad(i)), bf16),
            ((entries, rank, pad(d)), bf16),
            ((tokens,), i32),
        )
    return ((tokens, d), bf16), ((tokens, k), i32), ((tokens, k), bf16), tuple(weights), lora
