"""The ops' backward formulas, registered with ``torch.library.register_autograd``.

Every backward is made of the library's own custom ops (plus a few plain
torch ops: slicing, a cast, the base layer's dense products), so under
``torch.compile(backend="openxla")`` the backward graph holds opaque nodes as
the forward does, and nothing traces into JAX. With ``i_t`` the slot of token
t and ``g`` the output gradient:

- inputs: the existing shrink and expand with the roles of A and B swapped:
  ``g[t] @ B[i_t]^T`` is ``bgmv_shrink(g, B)`` (B is stored rank-first,
  [L, R, Dout], which is shrink's layout of A) and ``s[t] @ A[i_t]`` is
  ``bgmv_expand(s, A)``. They run on the op's ``backend``.
- slot weights: ``bgmv_weight_grad``, each slot's sum of outer products of its
  tokens' rows, on the op's ``backend``.
- base output (``base``) and, for ``linear_lora``, the base weight and bias as
  torch's own linear backward computes them.

Tokens whose index is outside [0, L) get their input gradient from the base
path only, and add nothing to any slot; a slot no token uses gets exact zeros.
The rounding of the rank intermediate to lora_b's dtype (shrink_expand,
linear_lora) is treated as the identity (straight-through), as autograd does
for a dtype cast; the intermediate is recomputed by a shrink when ``lora_b``
needs its gradient, except after ``bgmv_shrink_expand_train`` (the training
forward the layers run on the XLA-native backend), ``linear_lora_train`` (``linear_lora``'s training
variant, whose fused base kernel writes it on TPU) and ``linear_lora_fused_train`` (``linear_lora_fused``'s,
``ops/_linear_fused.py``), which return it and whose backwards hand it to ``bgmv_lora_grads``. The host ``metadata``
of the fused ops is not used by the backward: its shrinks and expands group the
tokens on the device.

The fused backward. When both slot weights need their gradients (training),
``bgmv_shrink_expand`` and ``linear_lora`` run their LoRA backward as one op,
``bgmv_lora_grads`` (:mod:`torch_xla_lora.ops._lora_grads`): on TPU ds and dB
in one pass over g, then dA (and dx) in the pass over x; off TPU the tokens
grouped by slot once for all five products. A double backward
(``create_graph=True``, grad mode on in the backward) runs the separate ops,
which are differentiable; so does ``FUSED_BACKWARD = False``.
"""

from __future__ import annotations

import torch

from torch_xla_lora.ops import _lora_grads as _fused  # noqa: F401  (registers xla_lora::bgmv_lora_grads)

_ops = torch.ops.xla_lora

#: Run the LoRA projections' backward as the one fused op (see the module doc); False: the separate ops.
FUSED_BACKWARD = True


def _scaled(tensor: torch.Tensor, scaling: float) -> torch.Tensor:
    return tensor if scaling == 1.0 else tensor * scaling


def _no_grads(count: int) -> tuple[None, ...]:
    return (None,) * count


def _needs(ctx, *positions: int) -> bool:
    """Whether any of the op's arguments at ``positions`` needs its gradient (the dispatcher drops trailing
    arguments equal to their defaults, None scales among them, from ``needs_input_grad``)."""
    return any(k < len(ctx.needs_input_grad) and ctx.needs_input_grad[k] for k in positions)


# -- bgmv_shrink(inputs, lora_a, lora_indices, scaling, backend) -------------------------------------


def _shrink_setup(ctx, inputs, output) -> None:
    x, lora_a, indices, scaling, backend = inputs
    ctx.save_for_backward(x, lora_a, indices)
    ctx.scaling, ctx.backend = scaling, backend


def _shrink_backward(ctx, grad: torch.Tensor):
    x, lora_a, indices = ctx.saved_tensors
    dx = d_a = None
    if ctx.needs_input_grad[0]:  # dx[t] = scaling * g[t] @ A[i_t]
        dx = _ops.bgmv_expand(_scaled(grad, ctx.scaling), lora_a, torch.zeros_like(x), indices, False, ctx.backend)
    if ctx.needs_input_grad[1]:  # dA[l] = scaling * sum_{i_t = l} outer(g[t], x[t])
        d_a = _ops.bgmv_weight_grad(grad, x, indices, lora_a.shape[0], ctx.scaling, ctx.backend)
    return dx, d_a, *_no_grads(3)


# -- bgmv_expand(inputs, lora_b, base, lora_indices, add_inputs, backend) ----------------------------
# -- bgmv_expand_slice(inputs, lora_b, base, lora_indices, slice_offset, add_inputs, backend) --------


def _expand_grads(ctx, grad: torch.Tensor, columns: torch.Tensor):
    """(d inputs, d lora_b) of an expand whose LoRA product landed in ``columns`` of the output."""
    s, lora_b, indices = ctx.saved_tensors
    ds = d_b = None
    if ctx.needs_input_grad[0]:  # ds[t] = g[t] @ B[i_t]^T: a shrink by B
        ds = _ops.bgmv_shrink(columns, lora_b, indices, 1.0, ctx.backend).to(s.dtype)
    if ctx.needs_input_grad[1]:  # dB[l] = sum_{i_t = l} outer(s[t], g[t])
        d_b = _ops.bgmv_weight_grad(s, columns, indices, lora_b.shape[0], 1.0, ctx.backend)
    d_base = grad if ctx.add_inputs and ctx.needs_input_grad[2] else None
    return ds, d_b, d_base


def _expand_setup(ctx, inputs, output) -> None:
    s, lora_b, _, indices, add_inputs, backend = inputs
    ctx.save_for_backward(s, lora_b, indices)
    ctx.add_inputs, ctx.backend = add_inputs, backend


def _expand_backward(ctx, grad: torch.Tensor):
    return *_expand_grads(ctx, grad, grad), *_no_grads(3)


def _expand_slice_setup(ctx, inputs, output) -> None:
    s, lora_b, _, indices, slice_offset, add_inputs, backend = inputs
    ctx.save_for_backward(s, lora_b, indices)
    ctx.slice_offset, ctx.add_inputs, ctx.backend = slice_offset, add_inputs, backend


def _expand_slice_backward(ctx, grad: torch.Tensor):
    width = ctx.saved_tensors[1].shape[2]
    columns = grad[:, ctx.slice_offset : ctx.slice_offset + width]
    return *_expand_grads(ctx, grad, columns), *_no_grads(4)


# -- the LoRA part of bgmv_shrink_expand and linear_lora ---------------------------------------------


def _lora_grads(ctx, grad, x, lora_a, lora_b, indices, dx_base, need_x: bool, need_a: bool, need_b: bool, saved_s=None):
    """(dx, dA, dB) of ``base + (scaling * A[i_t] x[t]) @ B[i_t]``; dx adds into ``dx_base`` (None: zeros);
    ``saved_s``: the forward's rank intermediate in lora_b's dtype (None: recomputed where needed)."""
    if FUSED_BACKWARD and need_a and need_b and not torch.is_grad_enabled():
        g = grad.to(lora_b.dtype)
        grads = _ops.bgmv_lora_grads(g, x, lora_a, lora_b, indices, ctx.scaling, need_x, ctx.backend, saved_s)
        dx = grads[2] if need_x else None
        if dx is not None and dx_base is not None:
            dx = dx_base + dx
        return dx, grads[0], grads[1]
    dx = d_a = d_b = None
    if need_x or need_a:
        ds = _ops.bgmv_shrink(grad.to(lora_b.dtype), lora_b, indices, 1.0, ctx.backend)  # g[t] @ B[i_t]^T
        if need_x:  # dx[t] = scaling * ds[t] @ A[i_t]
            start = torch.zeros_like(x) if dx_base is None else dx_base
            dx = _ops.bgmv_expand(_scaled(ds, ctx.scaling), lora_a, start, indices, dx_base is not None, ctx.backend)
        if need_a:  # dA[l] = scaling * sum_{i_t = l} outer(ds[t], x[t])
            d_a = _ops.bgmv_weight_grad(ds, x, indices, lora_a.shape[0], ctx.scaling, ctx.backend)
    elif need_x:
        dx = dx_base
    if need_b:  # dB[l] = sum_{i_t = l} outer(s[t], g[t]), s as the forward rounded it (kept or recomputed)
        # (A double backward recomputes it: the kept s is not differentiable.)
        if saved_s is None or torch.is_grad_enabled():
            saved_s = _ops.bgmv_shrink(x, lora_a, indices, ctx.scaling, ctx.backend)
        s = saved_s.to(lora_b.dtype)
        d_b = _ops.bgmv_weight_grad(s, grad.to(lora_b.dtype), indices, lora_b.shape[0], 1.0, ctx.backend)
    return dx, d_a, d_b


# -- bgmv_shrink_expand(inputs, lora_a, lora_b, base, lora_indices, scaling, backend, metadata) -------


def _shrink_expand_setup(ctx, inputs, output) -> None:
    x, lora_a, lora_b, _, indices, scaling, backend, _ = inputs
    ctx.save_for_backward(x, lora_a, lora_b, indices)
    ctx.scaling, ctx.backend = scaling, backend


def _shrink_expand_backward(ctx, grad: torch.Tensor):
    x, lora_a, lora_b, indices = ctx.saved_tensors
    need = ctx.needs_input_grad
    widths = lora_a.shape[2], lora_b.shape[2]  # buffers wider than the layer (lane-padded): its columns only
    lora_a, lora_b = lora_a[:, :, : x.shape[1]], lora_b[:, :, : grad.shape[1]]
    dx, d_a, d_b = _lora_grads(ctx, grad, x, lora_a, lora_b, indices, None, need[0], need[1], need[2])
    d_a = d_a if d_a is None else torch.nn.functional.pad(d_a, (0, widths[0] - d_a.shape[2]))
    d_b = d_b if d_b is None else torch.nn.functional.pad(d_b, (0, widths[1] - d_b.shape[2]))
    return dx, d_a, d_b, grad if need[3] else None, *_no_grads(4)


# -- bgmv_shrink_expand_train(inputs, lora_a, lora_b, base, lora_indices, scaling, backend) -> (out, s) ----


def _shrink_expand_train_setup(ctx, inputs, output) -> None:
    x, lora_a, lora_b, _, indices, scaling, backend = inputs
    ctx.save_for_backward(x, lora_a, lora_b, indices, output[1])
    ctx.scaling, ctx.backend = scaling, backend
    ctx.mark_non_differentiable(output[1])  # s: an intermediate kept for the backward, not a result


def _shrink_expand_train_backward(ctx, grad: torch.Tensor, _grad_s: torch.Tensor | None):
    x, lora_a, lora_b, indices, s = ctx.saved_tensors
    need = ctx.needs_input_grad
    widths = lora_a.shape[2], lora_b.shape[2]
    lora_a, lora_b = lora_a[:, :, : x.shape[1]], lora_b[:, :, : grad.shape[1]]
    dx, d_a, d_b = _lora_grads(ctx, grad, x, lora_a, lora_b, indices, None, need[0], need[1], need[2], s)
    d_a = d_a if d_a is None else torch.nn.functional.pad(d_a, (0, widths[0] - d_a.shape[2]))
    d_b = d_b if d_b is None else torch.nn.functional.pad(d_b, (0, widths[1] - d_b.shape[2]))
    return dx, d_a, d_b, grad if need[3] else None, *_no_grads(3)


# -- linear_lora(inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout, backend,
#                metadata, own_metadata) -------------------------------------------------------------


def _linear_setup(ctx, inputs, output, s: torch.Tensor | None = None) -> None:
    x, weight, bias, lora_a, lora_b, indices, scaling, layout, backend, _, _ = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, indices, s)  # s: linear_lora_train's, else None
    ctx.scaling, ctx.layout, ctx.backend = scaling, layout, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def linear_grads(
    ctx,
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    need: tuple[bool, bool, bool, bool, bool],
    saved_s: torch.Tensor | None = None,
    weight_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> tuple[torch.Tensor | None, ...]:
    """(dx, d_weight, d_bias, dA, dB) of ``y = x W^T + bias + scaling * (x A[i_t]^T) B[i_t]``, each where ``need``
    asks for it (and the bias exists: ``ctx.bias_dtype``); ``ctx`` carries ``scaling``, ``layout``, ``backend``.

    dx = g W + scaling * (g B[i_t]^T) A[i_t] is linear_lora itself with the roles swapped: g for x, W read in
    the other layout, B (rank-first [L, R, N]) as A and A ([L, R, K]) as B. One pass over g: the base's dx and
    the LoRA's, written once. ``weight_scales``: an int8 W's scales per output channel and per input channel
    (one of them given): the swapped pass is ``linear_lora_fused`` reading the int8 weight with the two
    exchanged (a per-output-channel weight read transposed is per input channel), never a float copy of it;
    W gets no gradient. ``saved_s``: the forward's rank intermediate (None: recomputed where needed).

    Training on TPU (the Pallas backend, both slot weights and x needing gradients, ``s`` kept): dB and ds come
    out of that same pass over g (``linear_lora_backward``: the kernel takes them while g's tiles are in VMEM),
    and dA = ds^T x is the one product left, by ``bgmv_weight_grad``.
    """
    need_x, need_w, need_bias, need_a, need_b = need
    out_in = ctx.layout == "out_in"  # weight [N, K]; else [K, N]
    swapped = "in_out" if out_in else "out_in"
    int8 = any(scale is not None for scale in weight_scales)
    dx = d_weight = d_bias = None
    one_pass = need_x and need_a and need_b and saved_s is not None
    one_pass = one_pass and _one_pass_backward(ctx, grad, x, lora_b, weight_scales)
    if one_pass:
        from torch_xla_lora.ops._linear_fused import linear_lora_backward

        dx, ds, d_b = linear_lora_backward(
            grad.to(x.dtype), weight, lora_a, lora_b, indices, saved_s, ctx.scaling, ctx.layout, ctx.backend,
            *weight_scales,
        )  # fmt: skip
        d_a = _ops.bgmv_weight_grad(ds, x, indices, lora_a.shape[0], 1.0, ctx.backend).to(lora_a.dtype)
    elif need_x and int8:
        from torch_xla_lora.ops._linear_fused import linear_lora_fused

        per_output, per_input = weight_scales
        dx = linear_lora_fused(
            grad.to(x.dtype), weight, None, lora_b, lora_a, indices, ctx.scaling, swapped, ctx.backend,
            weight_scale=per_input, weight_in_scale=per_output,
        )  # fmt: skip
    elif need_x:
        dx = _ops.linear_lora(
            grad.to(weight.dtype), weight, None, lora_b, lora_a, indices, ctx.scaling, swapped, ctx.backend
        ).to(x.dtype)
    if need_w and not int8:
        d_weight = grad.T @ x if out_in else x.T @ grad
    if need_bias and ctx.bias_dtype is not None:
        d_bias = grad.sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)).to(ctx.bias_dtype)
    if not one_pass:
        _, d_a, d_b = _lora_grads(ctx, grad, x, lora_a, lora_b, indices, None, False, need_a, need_b, saved_s)
    return dx, d_weight, d_bias, d_a, d_b


def _one_pass_backward(ctx, grad: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, weight_scales) -> bool:
    """Whether ``linear_grads`` takes dx, ds and dB in one pass (``linear_lora_backward``): the fused backward
    (not a double backward) of an XLA tensor where the op runs its kernel and it pays (the Pallas backend, a plan
    that holds dB's sum in VMEM and, on a TPU, is modelled no slower than the two passes:
    ``_linear_fused.takes_one_pass_backward``). Elsewhere ``bgmv_lora_grads``' two passes."""
    if not FUSED_BACKWARD or torch.is_grad_enabled() or grad.device.type != "xla":
        return False
    from torch_xla_lora.ops._linear_fused import takes_one_pass_backward

    num_slots, rank, width = lora_b.shape
    scales = tuple(scale is not None for scale in weight_scales)
    return takes_one_pass_backward(grad.shape[0], width, x.shape[1], rank, num_slots, x.dtype, ctx.backend, scales)


def _linear_backward(ctx, grad: torch.Tensor):
    """``linear_lora``'s backward (and ``linear_lora_train``'s, which saved its s: not recomputed)."""
    x, weight, lora_a, lora_b, indices, saved_s = ctx.saved_tensors
    need = tuple(bool(flag) for flag in ctx.needs_input_grad[:5])
    grads = linear_grads(ctx, grad, x, weight, lora_a, lora_b, indices, need, saved_s)
    return *grads, *_no_grads(6)


# -- linear_lora_train(the arguments of linear_lora) -> (out, s) ----------------------------------------


def _linear_train_setup(ctx, inputs, output) -> None:
    _linear_setup(ctx, inputs, output[0], output[1])
    ctx.mark_non_differentiable(output[1])  # s: an intermediate kept for the backward, not a result


def _linear_train_backward(ctx, grad: torch.Tensor, _grad_s: torch.Tensor | None):
    return _linear_backward(ctx, grad)


# -- bgmv_weight_grad(left, right, lora_indices, num_slots, scaling, backend): differentiable too ----


def _weight_grad_setup(ctx, inputs, output) -> None:
    left, right, indices, _, scaling, backend = inputs
    ctx.save_for_backward(left, right, indices)
    ctx.scaling, ctx.backend = scaling, backend


def _weight_grad_backward(ctx, grad: torch.Tensor):
    left, right, indices = ctx.saved_tensors
    d_left = d_right = None
    if ctx.needs_input_grad[0]:  # d left[t] = scaling * G[i_t] @ right[t]: a shrink by G [L, P, Q]
        d_left = _ops.bgmv_shrink(right, grad, indices, ctx.scaling, ctx.backend).to(left.dtype)
    if ctx.needs_input_grad[1]:  # d right[t] = scaling * left[t] @ G[i_t]: an expand by G
        scaled = _scaled(left, ctx.scaling)
        d_right = _ops.bgmv_expand(scaled, grad, torch.zeros_like(right), indices, False, ctx.backend)
    return d_left, d_right, *_no_grads(4)


# -- pooled_shrink_expand(inputs, a_pool, b_pool, base, lanes, rows, a_scale, b_scale, scaling, backend, metadata,
#    pages, page_scales) -----------------------------------------------------------------------------------------


def _pooled_setup(ctx, inputs, output) -> None:
    x, a_pool, b_pool, _, lanes, rows, a_scale, b_scale, scaling, backend, _, pages, page_scales = inputs
    ctx.save_for_backward(x, a_pool, b_pool, lanes, rows, a_scale, b_scale, pages, page_scales)
    ctx.scaling, ctx.backend = scaling, backend


def _pooled_backward(ctx, grad: torch.Tensor):
    """The pools hold served adapters (buffers, no gradient). d inputs[t] = scaling * (g[t] @ B_l^T) @ A_l over lane
    l's true-rank rows: the same op with the pools' roles swapped (both are rank-first: B's rows are what the
    shrink reads as A; an int8 row's ``a_scale * b_scale`` is the same product either way), on the same row and page
    tables, the batch's metadata dropped (it was built for the forward's widths). d base = g."""
    x, a_pool, b_pool, lanes, rows, a_scale, b_scale, pages, page_scales = ctx.saved_tensors
    if _needs(ctx, 1, 2, 6, 7):
        raise NotImplementedError("pooled_shrink_expand: the pools and their scales are served, not trained")
    d_inputs = None
    if ctx.needs_input_grad[0]:
        zeros = torch.zeros_like(x)
        d_inputs = _ops.pooled_shrink_expand(
            grad.to(x.dtype), b_pool, a_pool, zeros, lanes, rows, b_scale, a_scale, ctx.scaling, ctx.backend,
            None, pages, page_scales,
        )  # fmt: skip
    return d_inputs, None, None, grad if ctx.needs_input_grad[3] else None, *_no_grads(9)


# -- pooled_expand(inputs, b_pool, base, lanes, rows, b_scale, backend) -------------------------------------------


def _pooled_expand_setup(ctx, inputs, output) -> None:
    s, b_pool, _, lanes, rows, b_scale, backend = inputs
    ctx.save_for_backward(b_pool, lanes, rows, b_scale)
    ctx.backend, ctx.dtype = backend, s.dtype


def _pooled_expand_backward(ctx, grad: torch.Tensor):
    """d base = g (an unfrozen embedding's weight gradient flows through it). d inputs[t] = g[t] @ B_l^T over lane
    l's rows, asked for only where the rank values themselves carry a gradient (a learnable ``embed_scale``): the
    lanes' B rows then gathered into slots (entries past a lane's rank name the zero row: exact zeros) for the slot
    shrink. The pool and its scales are served adapters and take none."""
    b_pool, lanes, rows, b_scale = ctx.saved_tensors
    if _needs(ctx, 1, 5):
        raise NotImplementedError("pooled_expand: the pool and its scales are served, not trained")
    d_inputs = None
    if ctx.needs_input_grad[0]:
        from torch_xla_lora import pool

        scale = None if b_scale is None else b_scale[None]
        lora_b = pool.gather_slots(b_pool[None], scale, rows.reshape(-1), 0, rows.shape[0], ctx.dtype)  # [L, R, Dout]
        d_inputs = _ops.bgmv_shrink(grad.to(ctx.dtype), lora_b.to(ctx.dtype), lanes, 1.0, ctx.backend)
    return d_inputs, None, grad if ctx.needs_input_grad[2] else None, *_no_grads(4)


for _name, _backward, _setup in (
    ("pooled_shrink_expand", _pooled_backward, _pooled_setup),
    ("pooled_expand", _pooled_expand_backward, _pooled_expand_setup),
    ("bgmv_shrink", _shrink_backward, _shrink_setup),
    ("bgmv_expand", _expand_backward, _expand_setup),
    ("bgmv_expand_slice", _expand_slice_backward, _expand_slice_setup),
    ("bgmv_shrink_expand", _shrink_expand_backward, _shrink_expand_setup),
    ("bgmv_shrink_expand_train", _shrink_expand_train_backward, _shrink_expand_train_setup),
    ("linear_lora", _linear_backward, _linear_setup),
    ("linear_lora_train", _linear_train_backward, _linear_train_setup),
    ("bgmv_weight_grad", _weight_grad_backward, _weight_grad_setup),
):
    torch.library.register_autograd(f"xla_lora::{_name}", _backward, setup_context=_setup)
