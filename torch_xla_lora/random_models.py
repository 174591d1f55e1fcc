"""Random-weight transformers models built from a few sizes, for the demo and the benchmarks (nothing is downloaded)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["LlamaSizes", "random_llama"]


class LlamaSizes(Protocol):
    """The sizes :func:`random_llama` reads (``DemoConfig`` and ``bench.e2e.E2EConfig`` have them)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


def random_llama(sizes: LlamaSizes, seed: int, **config: Any) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``sizes`` with weights drawn after ``torch.manual_seed(seed)``: float32, eval
    mode, on the host, input and output embeddings untied unless ``config`` says otherwise.

    Args:
      sizes: vocab, hidden, intermediate, layers, heads, kv_heads.
      seed: seeds torch's global generator first.
      config: further ``LlamaConfig`` fields (e.g. ``max_position_embeddings``).
    """
    import transformers

    torch.manual_seed(seed)
    llama = transformers.LlamaConfig(
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        **{"tie_word_embeddings": False, **config},
    )
    return transformers.LlamaForCausalLM(llama).eval()
