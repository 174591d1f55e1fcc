"""Llama-family decoder layers arranged so the fused base kernel takes in what XLA would fuse into its dot.

A LoRA layer sees only its input. Where the linear layers run the fused formulation
(``linear_lora``'s kernel: ``base_fusion=True``, or "auto" choosing it on TPU), a Pallas call
stops XLA from fusing x's producer into the matmul's operand read and the residual add into its
output write. For the decoder layers of Llama, Mistral and Qwen2 (``residual + mlp(norm(h))``,
the MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU) this module replaces the
layer's forward (an instance attribute: the class is untouched) so that:

- gate_proj and up_proj read the post-attention RMSNorm's output on the fly: the norm's per-row
  factor ``rsqrt(mean(h^2) + eps)`` (a [T] vector) and its weight are applied to each x tile the
  kernel reads;
- down_proj reads ``SiLU(gate) * up`` from the two projections' outputs on the fly and adds the
  residual stream in its output write.

Each projection whose call does not run the fused formulation (a mesh, another dtype, a
trainable adapter's dropout, "auto" choosing another one) computes the norm, the product or the
add in torch exactly as transformers does, so results equal the unpatched model's (and PEFT's).
:func:`unpatch` restores the original forwards.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types

import torch
from torch import nn

from torch_xla_lora.layers.linear import LinearWithLoRA

#: Decoder layers whose forward is ``h = h + attn(input_layernorm(h)); h + mlp(post_attention_layernorm(h))``.
DECODER_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
#: RMSNorms computing ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)``.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def fusable(layer: nn.Module) -> bool:
    """Whether ``layer`` is a decoder layer this module can arrange: a known class, a SiLU MLP whose
    down_proj is a linear LoRA layer, a known RMSNorm before it."""
    mlp = getattr(layer, "mlp", None)
    norm = getattr(layer, "post_attention_layernorm", None)
    return (
        type(layer).__name__ in DECODER_LAYERS
        and mlp is not None
        and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        and isinstance(mlp.down_proj, LinearWithLoRA)
        and _is_silu(mlp.act_fn)
        and type(norm).__name__ in RMS_NORMS
    )


def wanted(base_fusion: bool | str, device: torch.device) -> bool:
    """Whether ``patch_model`` arranges the decoder layers: ``base_fusion=True``, or "auto" on a TPU
    (elsewhere "auto" never runs the fused formulation, so the model keeps its own forwards)."""
    if base_fusion is True:
        return True
    if base_fusion != "auto" or device.type != "xla":
        return False
    from torch_xla_lora import ops

    return ops.device_generation() != "cpu"


def patch(model: nn.Module) -> list[nn.Module]:
    """Give every fusable decoder layer of ``model`` the fused forward; returns the layers patched."""
    patched = []
    for module in model.modules():
        if fusable(module) and "forward" not in vars(module):
            module.forward = types.MethodType(_decoder_forward, module)
            patched.append(module)
            # base_fusion="auto" prices the fused formulation of these projections with what it takes in.
            mlp = module.mlp
            for proj, prologue, residual in (("gate_proj", "norm", False), ("up_proj", "norm", False)):
                _take_in(getattr(mlp, proj), prologue, residual)
            _take_in(mlp.down_proj, "silu_mul", True)
    return patched


def _take_in(layer: nn.Module, prologue: str, residual: bool) -> None:
    if isinstance(layer, LinearWithLoRA):
        layer.fusion_role = dataclasses.replace(layer.fusion_role, prologue=prologue, residual_in_kernel=residual)


def unpatch(layers: list[nn.Module]) -> None:
    """Restore the class's own forward on each of ``layers`` (and the projections' roles)."""
    for layer in layers:
        vars(layer).pop("forward", None)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            _take_in(getattr(layer.mlp, proj), "", False)


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _decoder_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # transformers' forward: every argument but hidden_states goes to self_attn as a keyword.
    bound = _signature(type(self)).bind(self, hidden_states, *args, **kwargs)
    bound.apply_defaults()
    call = {}
    for name, value in list(bound.arguments.items())[2:]:
        if _signature(type(self)).parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        else:
            call[name] = value
    residual = hidden_states
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **call)
    hidden_states = residual + attended
    return mlp_with_residual(self.mlp, self.post_attention_layernorm, hidden_states)


def mlp_with_residual(mlp: nn.Module, norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``h + mlp(norm(h))`` with the norm taken into gate/up's x read and SiLU(gate) * up and the residual
    into down_proj's, where those projections run the fused formulation."""
    normed = row_scale = None

    def project(proj: nn.Module) -> torch.Tensor:
        nonlocal normed, row_scale
        if isinstance(proj, LinearWithLoRA) and norm.weight.dtype == h.dtype and proj.formulation(h) == "fused":
            if row_scale is None:  # the norm's per-row factor, [...] float32, shared by gate and up
                row_scale = torch.rsqrt(h.to(torch.float32).pow(2).mean(-1) + norm.variance_epsilon)
            out = proj.forward_fused_with(h, row_scale=row_scale, col_scale=norm.weight)
            if out is not None:
                return out
        if normed is None:
            normed = norm(h)
        return proj(normed)

    gate, up = project(mlp.gate_proj), project(mlp.up_proj)
    out = mlp.down_proj.forward_fused_with(gate, up=up, residual=h)
    if out is not None:
        return out
    return h + mlp.down_proj(mlp.act_fn(gate) * up)
