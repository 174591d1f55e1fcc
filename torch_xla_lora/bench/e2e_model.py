"""The model side of the end-to-end benchmark: a random Llama, random PEFT adapters, and the
one-hot einsum formulation (vLLM's TPU end state) swapped into the library's layers.
"""

from __future__ import annotations

import contextlib
import copy
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


def lora_config(config: E2EConfig, slots: int, **extra):
    """The run's ``LoRAConfig`` for ``slots`` slots (or lanes) on every linear layer of the decoder; ``extra``:
    further fields (the pools' ``memory_budget`` and ``weight_dtype``)."""
    import torch_xla_lora as tl

    return tl.LoRAConfig(
        max_loras=slots,
        max_rank=config.rank,
        target_modules=LINEAR_TARGETS,
        max_cpu_adapters=max(slots, config.num_adapters),
        backend=config.backend,
        base_fusion={"auto": "auto", "on": True, "off": False}[config.base_fusion],
        **extra,
    )


def patch(model: nn.Module, config: E2EConfig, slots: int):
    """Patch every linear layer of the decoder with ``slots`` slots; load the adapters; return the handle."""
    import torch_xla_lora as tl

    lora = tl.patch_model(model, lora_config(config, slots))
    _load_adapters(lora, config)
    return lora


def _load_adapters(lora, config: E2EConfig) -> None:
    shapes = {name: (layer.in_features, layer.out_features) for name, layer in lora.layers.items()}
    for number in range(config.num_adapters):
        state, adapter_config = random_adapter(shapes, config.rank, config.seed + 1 + number)
        lora.load_adapter(f"adapter{number}", state_dict=state, config=adapter_config)


# -- rank-true pools (--compare-pool) --------------------------------------------------------------

#: The pool formulations and their ``LoRAConfig.weight_dtype``.
POOLS = {"pool": None, "pool int8": "int8"}


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules holding the same parameter and buffer tensors (no weight is copied), to
    patch beside ``model``. Copy before patching: a patched model cannot be patched again."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def pool_budget(padded, rows: int, int8: bool) -> int:
    """Bytes of ``memory_budget`` whose pools hold ``rows`` rank rows: the pools' own accounting
    (``pool_bytes``: the spare rows and int8 page-scale padding included) of ``padded``'s layers."""
    return sum(layer.pool_bytes(rows, int8) for layer in padded.layers.values())


def patch_pool(model: nn.Module, config: E2EConfig, slots: int, padded, weight_dtype: str | None):
    """Patch ``model`` (e.g. a :func:`shared_copy`) with ``slots`` lanes of rank-true storage whose
    ``memory_budget`` holds exactly the run's adapters (sized from ``padded``, the same layers with padded
    slots); load them and make them all resident, so no step of the benchmark evicts or uploads.

    Raises:
      RuntimeError: the pool does not hold every adapter (its accounting disagrees with the budget's).
    """
    import torch_xla_lora as tl

    int8 = weight_dtype == "int8"
    rows = config.num_adapters * config.rank
    for extra in (0, 1):  # an int8 pool the TPU kernel reads may keep one row fewer (pool.kernel_pool_rows)
        budget = pool_budget(padded, rows + extra, int8)
        lora = tl.patch_model(model, lora_config(config, slots, memory_budget=budget, weight_dtype=weight_dtype))
        if next(iter(lora.layers.values())).pool_rows >= rows:
            break
        lora.unpatch()
    _load_adapters(lora, config)
    names = [f"adapter{number}" for number in range(config.num_adapters)]
    lora.set_batch(names)  # uploads every adapter
    lora.clear_batch()
    memory = lora.memory()
    row_bytes = sum(layer.pool_row_bytes(int8) for layer in lora.layers.values())
    if sorted(memory["adapters"]) != sorted(names) or memory["used_bytes"] != rows * row_bytes:
        lora.unpatch()
        raise RuntimeError(f"the {weight_dtype or 'float'} pool does not hold the run's adapters: {memory}")
    return lora


def patch_all(model: nn.Module, config: E2EConfig, slots: int) -> dict[str, object]:
    """Formulation -> its patched handle: "lora" (``model`` with :func:`patch`; base, one-hot and fused
    run on it too) and, with ``config.compare_pool``, "pool" and "pool int8" (:func:`patch_pool` on
    shared copies of ``model``). Unpatch them all when done (:func:`unpatch_all`)."""
    copies = {name: shared_copy(model) for name in POOLS} if config.compare_pool else {}
    loras = {"lora": patch(model, config, slots)}
    try:
        for name, weight_dtype in POOLS.items():
            if name in copies:
                loras[name] = patch_pool(copies[name], config, slots, loras["lora"], weight_dtype)
    except BaseException:
        unpatch_all(loras)
        raise
    return loras


def unpatch_all(loras: dict[str, object]) -> None:
    """Unpatch every handle of :func:`patch_all`."""
    for lora in loras.values():
        lora.unpatch()
