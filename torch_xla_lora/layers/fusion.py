"""Llama-family decoder layers arranged so the fused base kernel takes in what XLA would fuse into its dot.

A LoRA layer sees only its input. Where the linear layers run the fused formulation
(``linear_lora``'s kernel: ``base_fusion=True``, or "auto" choosing it on TPU), a Pallas call
stops XLA from fusing x's producer into the matmul's operand read and the residual add into its
output write. For the decoder layers of Llama, Mistral and Qwen2 (``h = h + attn(norm1(h));
h + mlp(norm2(h))``, the MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU) this module
replaces the layer's forward (an instance attribute: the class is untouched) so that:

- q_proj, k_proj and v_proj read the input RMSNorm's output on the fly, and gate_proj and up_proj the
  post-attention RMSNorm's: the norm's per-row factor ``rsqrt(mean(h^2) + eps)`` (a [T] vector,
  computed once per norm) and its weight are applied to each x tile the kernel reads;
- o_proj adds the attention's residual stream in its output write;
- down_proj reads ``SiLU(gate) * up`` from the two projections' outputs on the fly and adds the
  residual stream in its output write.

The attention is transformers' own: it calls ``self.q_proj(hidden_states)`` itself. So before calling it
the decoder hands q/k/v and o_proj a pending call (:attr:`LinearWithLoRA.pending`, cleared when the
attention returns): a projection called with exactly the normed tensor the decoder passed (the same
object) runs the kernel on the un-normed stream with the norm's factors instead; o_proj runs it with the
residual and says so, and the decoder then does not add the residual again. The normed tensor is still
computed for the attention to receive; where nothing reads it, XLA drops it from the graph.

In training (trainable adapters, grad enabled) q/k/v, and gate/up, run as one group each where all of them can
(:mod:`.shared_input`: their dA in one pass over the shared input), the norm taken into the group's kernels,
which write the normed x beside their outputs for that dA. down_proj takes SiLU(gate) * up and the residual in;
its kernel also writes x, which its backward's dA reads.

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

from torch_xla_lora.layers import shared_input
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
            for proj, prologue, residual in _roles(module):
                _take_in(proj, prologue, residual)
    return patched


def _roles(layer: nn.Module) -> list[tuple[nn.Module | None, str, bool]]:
    """(projection, prologue, residual) of what the arranged ``layer`` has each projection take in."""
    attn, mlp = getattr(layer, "self_attn", None), layer.mlp
    qkv = "norm" if _is_rms(getattr(layer, "input_layernorm", None)) else ""
    roles = [(getattr(attn, name, None), qkv, False) for name in ("q_proj", "k_proj", "v_proj")]
    roles.append((getattr(attn, "o_proj", None), "", True))
    roles += [(mlp.gate_proj, "norm", False), (mlp.up_proj, "norm", False), (mlp.down_proj, "silu_mul", True)]
    return roles


def _is_rms(norm: nn.Module | None) -> bool:
    return type(norm).__name__ in RMS_NORMS


def _take_in(layer: nn.Module, prologue: str, residual: bool) -> None:
    if isinstance(layer, LinearWithLoRA):
        layer.fusion_role = dataclasses.replace(layer.fusion_role, prologue=prologue, residual_in_kernel=residual)


def unpatch(layers: list[nn.Module]) -> None:
    """Restore the class's own forward on each of ``layers`` (and the projections' roles)."""
    for layer in layers:
        vars(layer).pop("forward", None)
        for proj, _, _ in _roles(layer):
            _take_in(proj, "", False)
            if isinstance(proj, LinearWithLoRA):
                proj.pending = None


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
    attended, took_residual = attention_with_residual(self.self_attn, self.input_layernorm, hidden_states, call)
    hidden_states = attended if took_residual else hidden_states + attended
    return mlp_with_residual(self.mlp, self.post_attention_layernorm, hidden_states)


class _Norm:
    """An RMSNorm of ``h`` taken into the projections reading it: its row factor computed once, on first use."""

    def __init__(self, norm: nn.Module, h: torch.Tensor) -> None:
        self.norm, self.h, self._row_scale = norm, h, None

    @property
    def takes_in(self) -> bool:
        """Whether kernels can apply this norm (its weight in h's dtype)."""
        return self.norm.weight.dtype == self.h.dtype

    def row_scale(self) -> torch.Tensor:
        """The norm's per-row factor, [...] float32."""
        if self._row_scale is None:
            h = self.h.to(torch.float32)
            self._row_scale = torch.rsqrt(h.pow(2).mean(-1) + self.norm.variance_epsilon)
        return self._row_scale

    def project(self, proj: nn.Module) -> torch.Tensor | None:
        """``proj(norm(h))`` with the norm in the kernel's x read; None where proj does not run fused."""
        if not (isinstance(proj, LinearWithLoRA) and self.takes_in and proj.formulation(self.h) == "fused"):
            return None
        return proj.forward_fused_with(self.h, row_scale=self.row_scale(), col_scale=self.norm.weight)

    def group(self, projections: list, normed: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The projections trained as one group (:mod:`.shared_input`) on ``norm(h)``, the norm in their kernels
        where it can be, else on ``normed`` (computed here if not given)."""
        if self.takes_in:
            return shared_input.run(projections, self.h, self.row_scale(), self.norm.weight)
        return shared_input.run(projections, self.norm(self.h) if normed is None else normed)


class _PendingNorm:
    """q/k/v's pending call: called with ``normed`` (that very tensor), run on the norm's input instead."""

    def __init__(self, norm: _Norm, normed: torch.Tensor) -> None:
        self.norm, self.normed = norm, normed

    def run(self, proj: LinearWithLoRA, x: torch.Tensor) -> torch.Tensor | None:
        proj.pending = None  # one call
        return self.norm.project(proj) if x is self.normed else None


class _PendingGroup:
    """q/k/v's pending call in training: called with ``normed``, the three run as one group
    (:mod:`torch_xla_lora.layers.shared_input`: dA of all three in one pass over x; an RMSNorm in their kernels),
    on the first call."""

    def __init__(self, projections: list, normed: torch.Tensor, norm: _Norm | None) -> None:
        self.projections, self.normed, self.norm, self.outputs = projections, normed, norm, None

    def run(self, proj: LinearWithLoRA, x: torch.Tensor) -> torch.Tensor | None:
        proj.pending = None  # one call
        if x is not self.normed:
            return None
        if self.outputs is None:
            outs = (
                self.norm.group(self.projections, x) if self.norm is not None else shared_input.run(self.projections, x)
            )
            self.outputs = dict(zip(map(id, self.projections), outs, strict=True))
        return self.outputs.pop(id(proj), None)


class _PendingResidual:
    """o_proj's pending call: the residual added in the kernel's write; ``taken`` says whether it was."""

    def __init__(self, residual: torch.Tensor) -> None:
        self.residual, self.taken = residual, False

    def run(self, proj: LinearWithLoRA, x: torch.Tensor) -> torch.Tensor | None:
        proj.pending = None  # one call
        out = proj.forward_fused_with(x, residual=self.residual)
        self.taken = out is not None
        return out


def attention_with_residual(
    attn: nn.Module, norm: nn.Module, h: torch.Tensor, kwargs: dict
) -> tuple[torch.Tensor, bool]:
    """``attn(hidden_states=norm(h), **kwargs)``'s output and whether it already includes ``h`` (o_proj took the
    residual in), with the norm taken into q/k/v's x read where those projections run the fused formulation; in
    training, where the three can, they run as one group on the normed tensor (:mod:`.shared_input`)."""
    normed = norm(h)
    projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    taken_norm = _Norm(norm, h) if _is_rms(norm) else None
    ready = shared_input.ready(projections[:3], normed)
    group = _PendingGroup(projections[:3], normed, taken_norm) if ready else None
    residual = _PendingResidual(h)
    try:
        for proj in projections:
            if isinstance(proj, LinearWithLoRA):
                is_o = proj is projections[-1]
                if is_o:
                    proj.pending = residual
                elif group is not None:  # training: the three share the norm and dA's pass over x
                    proj.pending = group
                elif taken_norm is not None:
                    proj.pending = _PendingNorm(taken_norm, normed)
        attended, _ = attn(hidden_states=normed, **kwargs)
    finally:
        for proj in projections:
            if isinstance(proj, LinearWithLoRA):
                proj.pending = None
    return attended, residual.taken


def mlp_with_residual(mlp: nn.Module, norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``h + mlp(norm(h))`` with the norm taken into gate/up's x read and SiLU(gate) * up and the residual
    into down_proj's, where those projections run the fused formulation; in training, gate and up as one group
    where they can (:mod:`.shared_input`)."""
    taken_norm, normed = _Norm(norm, h), None

    def project(proj: nn.Module) -> torch.Tensor:
        nonlocal normed
        out = taken_norm.project(proj)
        if out is not None:
            return out
        if normed is None:
            normed = norm(h)
        return proj(normed)

    pair = [mlp.gate_proj, mlp.up_proj]
    if shared_input.ready(pair, h):  # training (h stands for norm(h): its shape, dtype): gate and up share the
        gate, up = taken_norm.group(pair)  # norm and dA's pass over x
    else:
        gate, up = project(mlp.gate_proj), project(mlp.up_proj)
    out = mlp.down_proj.forward_fused_with(gate, up=up, residual=h)
    if out is not None:
        return out
    return h + mlp.down_proj(mlp.act_fn(gate) * up)
