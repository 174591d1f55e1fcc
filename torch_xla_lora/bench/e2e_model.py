"""The model side of the end-to-end benchmark: a random Llama, random PEFT adapters, and the
one-hot einsum formulation (vLLM's TPU end state) swapped into the library's layers.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from torch_xla_lora.random_models import random_llama

if TYPE_CHECKING:
    from torch_xla_lora.bench.e2e import E2EConfig

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- the one-hot einsum formulation ----------------------------------------------------------------


def _one_hot(slots: torch.Tensor, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[T] int32 slots -> [T, L] one-hot; a slot outside [0, L) (e.g. -1, base) is an all-zero row."""
    return (slots[:, None] == torch.arange(num_slots, dtype=slots.dtype, device=slots.device)).to(dtype)


def _onehot_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A LoRA linear layer's forward as vLLM's TPU einsums: every token against every slot's factors.

    Semantics (per token t, one-hot row h_t over the L slots):
      s[t] = sum_X h_t[X] * A[X] @ x[t]          einsum("td,tX,Xrd->tr")
      y[t] = base(x)[t] + sum_X h_t[X] * s[t] @ B[X]   einsum("tr,tX,Xrd->td")
    The cost is O(T * L * R * D): it grows with the number of slots L.
    ``lora_b`` spans every output slice, so one expand also covers fused QKV / gate_up.
    """
    y = layer.base_layer(x)
    slots = layer.context.token_slots(x)
    if slots is None:
        return y
    x2 = x.reshape(-1, layer.in_features)  # [T, D]
    hot = _one_hot(slots, layer.lora_a.shape[0], x2.dtype)  # [T, L]
    s = torch.einsum("td,tX,Xrd->tr", x2, hot, layer.lora_a)  # [T, R]
    delta = torch.einsum("tr,tX,Xrd->td", s, hot, layer.lora_b)  # [T, Dout]
    return y + delta.reshape(y.shape).to(y.dtype)


@contextlib.contextmanager
def onehot_formulation(lora) -> Iterator[None]:
    """Within the block, every LoRA linear layer of ``lora`` (a LoRAModel) runs :func:`_onehot_forward`.

    The swap is an instance attribute on each layer, removed on exit; library
    code is untouched. Trace (call the model) inside the block.

    Raises:
      TypeError: the model has a LoRA layer that is not a linear kind (e.g. embeddings).
    """
    from torch_xla_lora.layers import LinearWithLoRA

    layers = list(lora.layers.values())
    for layer in layers:
        if not isinstance(layer, LinearWithLoRA):
            raise TypeError(f"onehot_formulation supports linear LoRA layers only, got {type(layer).__name__}")
    for layer in layers:
        layer.forward = types.MethodType(_onehot_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@contextlib.contextmanager
def fused_formulation(lora) -> Iterator[None]:
    """Within the block, every LoRA linear layer of ``lora`` runs with ``base_fusion`` on: the base
    matmul and its LoRA as one ``xla_lora::linear_lora`` op. Restored on exit; trace inside the block."""
    from torch_xla_lora.layers import LinearWithLoRA

    layers = [layer for layer in lora.layers.values() if isinstance(layer, LinearWithLoRA)]
    before = [layer.base_fusion for layer in layers]
    for layer in layers:
        layer.base_fusion = True
    try:
        yield
    finally:
        for layer, fusion in zip(layers, before, strict=True):
            layer.base_fusion = fusion


# -- model and adapters ----------------------------------------------------------------------------


def build_model(config: E2EConfig, device: torch.device) -> nn.Module:
    """A random-weight float32 ``LlamaForCausalLM`` in eval mode on ``device``."""
    return random_llama(config, config.seed, max_position_embeddings=max(4096, config.max_cache_len)).to(device)


def random_adapter(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> tuple[dict, dict]:
    """A PEFT-format (state dict, config) of rank ``rank`` on every module of ``shapes`` (name -> (in, out))."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (fan_in, fan_out) in shapes.items():
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) / rank**0.5
    return state, {"r": rank, "lora_alpha": rank, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in shapes})}


def patch(model: nn.Module, config: E2EConfig, slots: int):
    """Patch every linear layer of the decoder with ``slots`` slots; load the adapters; return the handle."""
    import torch_xla_lora as tl

    lora_config = tl.LoRAConfig(
        max_loras=slots,
        max_rank=config.rank,
        target_modules=LINEAR_TARGETS,
        max_cpu_adapters=max(slots, config.num_adapters),
        backend=config.backend,
        base_fusion={"auto": "auto", "on": True, "off": False}[config.base_fusion],
    )
    lora = tl.patch_model(model, lora_config)
    shapes = {name: (layer.in_features, layer.out_features) for name, layer in lora.layers.items()}
    for number in range(config.num_adapters):
        state, adapter_config = random_adapter(shapes, config.rank, config.seed + 1 + number)
        lora.load_adapter(f"adapter{number}", state_dict=state, config=adapter_config)
    return lora
