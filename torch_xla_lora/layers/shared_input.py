"""Projections that read one input, trained together: dA of all of them in one pass over x.

In a training step each projection's backward reads its input x once more, for ``dA = ds^T x`` (the one
gradient that needs x; its dx, ds and dB come from its pass over g, ``linear_lora_backward``). q, k and v
read the same normed hidden state, gate and up another: run one at a time, their backwards read each x
three and two times. :func:`run` runs such a group's training forwards (``linear_lora_train``, each keeping
``s``) under one autograd node whose backward takes each projection's pass over g, then one weight gradient
of the group's ``ds`` side by side (``[T, R1 + R2 + ...]``) against x, split back per projection: one pass
over x per input, as the TPU training model prices it (``bench/tpu_train_model.py``, ``train_step_costs``).

The arranged decoder layers (:mod:`torch_xla_lora.layers.fusion`) group q/k/v and gate/up where every member
would run ``linear_lora_train`` with the Pallas backend (:func:`ready`); anything else runs each projection
on its own, as before. There the group also takes the RMSNorm before it in (``row_scale``, ``col_scale``): each
member's kernel (``linear_lora_fused_train``) reads the un-normed stream, applies the norm to each x tile it
reads and writes the normed x beside its output; the backward's dA reads that x, and the norm's derivative runs
once, on the members' summed dx. The group's gradients are the projections' own: each token adds only to its
slot.
"""

from __future__ import annotations

import torch

from torch_xla_lora.layers.base import _keeps_s, kernel_runs
from torch_xla_lora.layers.linear import LinearWithLoRA, int8_channel_scale
from torch_xla_lora.ops import _linear_fused


def ready(projections: list, x: torch.Tensor) -> bool:
    """Whether :func:`run` takes these projections of ``x`` together: at least two ``LinearWithLoRA`` layers
    of one batch, off a mesh, each running ``linear_lora``'s training forward on its slots on the Pallas
    backend (the formulation "fused", a frozen base, float or int8 per channel, no pool read, no trainable
    adapter's dropout in training mode) whose backward takes its one pass over g
    (``_linear_fused.takes_one_pass_backward``), the fused backward on and a gradient wanted for x."""
    from torch_xla_lora.ops import _autograd

    if len(projections) < 2 or not all(isinstance(p, LinearWithLoRA) for p in projections):
        return False
    if not (_autograd.FUSED_BACKWARD and torch.is_grad_enabled() and x.requires_grad):
        return False
    first = projections[0]
    if any(p.context is not first.context or p.backend != first.backend for p in projections):
        return False
    if not kernel_runs(x, first.backend) or first.context.token_slots(x) is None:
        return False
    x2 = x.reshape(-1, first.in_features)
    for p in projections:
        base = p.base_layer
        bias = getattr(base, "bias", None)
        frozen = not base.weight.requires_grad and (bias is None or not bias.requires_grad)
        if p.tensor_parallel is not None or (p.weight_layout is None and int8_channel_scale(base) is None):
            return False
        if not frozen or p.in_features != first.in_features or p.formulation(x) != "fused":
            return False
        if p.training and any(m.dropout > 0 for m in p.trainable.values()):
            return False
        if p._reads_pool(x2, p.backend, differentiable=True):
            return False
        if not _keeps_s(x2, p.factors_need_grad(), p.backend, fused_base=True):
            return False
        int8 = int8_channel_scale(base) is not None
        grad_width = p.slot_shapes()["lora_b"][-1]  # as linear_grads asks it: lora_b's width
        if not _linear_fused.takes_one_pass_backward(
            x2.shape[0], grad_width, p.in_features, p.max_rank, p.max_loras, x.dtype, p.backend, (int8, False)
        ):  # (else each projection runs alone: its two passes over g)
            return False
    return True


def run(
    projections: list,
    x: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Each projection's output on ``x`` [..., in] (as its forward would give it), trained as one group: see the
    module doc. Call only where :func:`ready` holds (for the normed tensor). With ``row_scale`` [...] (float32)
    and ``col_scale`` [in] (x's dtype) ``x`` is the un-normed stream and the projections read
    ``x * row_scale[..., None] * col_scale`` (RMSNorm's factors, each product rounded to x's dtype as the norm
    rounds it), computed in their kernels."""
    first = projections[0]
    slots = first.context.token_slots(x)
    x2 = x.reshape(-1, first.in_features)
    normed = row_scale is not None or col_scale is not None
    row = None if row_scale is None else row_scale.reshape(-1)
    operands, specs = [], []
    for p in projections:
        metadata, own = p._linear_metadata(x2)
        lora_a, lora_b = p.slot_factors()
        scale = int8_channel_scale(p.base_layer)  # an int8 base: read as int8 (no bias, as the layer runs it)
        bias = None if scale is not None else getattr(p.base_layer, "bias", None)
        operands += [p.base_layer.weight, lora_a, lora_b]
        operands += [t for t in (bias, metadata, scale) if t is not None]
        specs.append((p.weight_layout or "out_in", bias is not None, metadata is not None, own, scale is not None))
    outs = _SharedInput.apply(x2, slots, tuple(specs), first.backend, normed, row, col_scale, *operands)
    return [out.reshape(*x.shape[:-1], p.out_features) for p, out in zip(projections, outs, strict=True)]


def _unpack(specs: tuple, operands: tuple) -> list[tuple]:
    """Per projection: (weight, lora_a, lora_b, bias, metadata, int8 weight scale (each or None), layout, own)."""
    out, i = [], 0
    for layout, has_bias, has_metadata, own, has_scale in specs:
        weight, lora_a, lora_b = operands[i : i + 3]
        i += 3
        optional = []
        for flag in (has_bias, has_metadata, has_scale):
            optional.append(operands[i] if flag else None)
            i += flag
        out.append((weight, lora_a, lora_b, *optional, layout, own))
    return out


class _SharedInput(torch.autograd.Function):
    """The group's training forwards (the norm in their kernels where ``normed``), and a backward with one weight
    gradient of all their ``ds`` against x (the normed x one of the kernels wrote, where they took the norm in)."""

    @staticmethod
    def forward(ctx, x2, slots, specs, backend, normed, row, col, *operands):
        outs, kept, kept_x = [], [], None
        for weight, lora_a, lora_b, bias, metadata, scale, layout, own in _unpack(specs, operands):
            if scale is None and not normed:
                args = (x2, weight, bias, lora_a, lora_b, slots, 1.0, layout, backend, metadata, own)
                out, s = torch.ops.xla_lora.linear_lora_train(*args)
            else:  # linear_lora_fused_train: the norm's factors taken in, or an int8 weight and its scales
                args = (x2, None, row, col, weight, bias, lora_a, lora_b, slots, None, 1.0, layout, backend)
                out, s, x = torch.ops.xla_lora.linear_lora_fused_train(*args, metadata, own, scale, None)
                kept_x = x if normed and kept_x is None else kept_x
            outs.append(out)
            kept.append(s)
        ctx.specs, ctx.backend, ctx.count, ctx.normed = specs, backend, len(operands), normed
        ctx.save_for_backward(x2, row, col, kept_x, slots, *operands, *kept)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        from torch_xla_lora.ops import _linear_fused

        saved = ctx.saved_tensors
        x2, row, col, kept_x, slots = saved[:5]
        operands, kept = saved[5 : 5 + ctx.count], saved[5 + ctx.count :]
        unpacked = _unpack(ctx.specs, operands)
        dx, ds, d_bs = None, [], []
        # (An output nothing read has a zero gradient here: autograd materialises it.)
        for (weight, lora_a, lora_b, *optional, layout, _), s, grad in zip(unpacked, kept, grads, strict=True):
            dx_i, ds_i, d_b = _linear_fused.linear_lora_backward(
                grad.to(x2.dtype), weight, lora_a, lora_b, slots, s, 1.0, layout, ctx.backend, optional[2]
            )
            dx = dx_i if dx is None else dx + dx_i
            ds.append(ds_i)
            d_bs.append(d_b)
        num_slots = operands[1].shape[0]
        x = kept_x if ctx.normed else x2
        d_a = torch.ops.xla_lora.bgmv_weight_grad(torch.cat(ds, dim=1), x, slots, num_slots, 1.0, ctx.backend)
        flat = []  # per projection: weight, lora_a, lora_b, then its optional operands (no gradients)
        for (_, lora_a, _, *optional, _, _), d_a_i, d_b in zip(
            unpacked, torch.split(d_a, [d.shape[1] for d in ds], dim=1), d_bs, strict=True
        ):
            flat += [None, d_a_i.to(lora_a.dtype), d_b] + [None] * sum(t is not None for t in optional)
        d_x2, d_row, d_col = dx, None, None
        if ctx.normed:  # the norm's derivative, once, on the summed dx
            d_x2, d_row, d_col = _norm_grads(dx, x2, row, col)
        return (d_x2, None, None, None, None, d_row, d_col, *flat)


def _norm_grads(grad: torch.Tensor, inputs: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None):
    """The gradients of ``_linear_fused.prologue(inputs, None, row, col)`` (``x = inputs * row[:, None]``, rounded
    to inputs' dtype, then ``x * col``, rounded) given ``grad`` of its output: (d inputs, d row, d col), each
    product's derivative taken in float32 (float64 for float64 inputs) and rounded where autograd of the prologue
    rounds it. Written out rather than left to autograd, so that ``torch.compile`` traces this backward whole."""
    dtype = inputs.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g, d_row, d_col = grad.to(acc), None, None
    if col is not None:
        x = inputs if row is None else (inputs.to(acc) * row.to(acc)[:, None]).to(dtype)
        d_col = (g * x.to(acc)).sum(0).to(col.dtype)
        g = (g * col.to(acc)).to(dtype).to(acc)
    if row is not None:
        d_row = (g * inputs.to(acc)).sum(-1).to(row.dtype)
        g = g * row.to(acc)[:, None]
    return g.to(dtype), d_row, d_col
