"""``xla_lora::linear_lora_fused``: ``linear_lora`` with x's producer and the residual add taken in.

A Pallas call is opaque to XLA: what XLA fuses into its own dot (a norm's scale or SiLU(gate) * up
into the operand read, the residual add into the output write) would become passes of their own
around ``linear_lora``. This op takes them into the kernel (``kernels/fused_base.py``'s
:class:`~torch_xla_lora.kernels.fused_base.Fusion`); on the XLA-native backend, and where no tiling
fits, it is the same arithmetic as XLA ops, which XLA fuses into its dot. CPU tensors run
:func:`reference`. Differentiable: the backward recomputes x's producer in torch (elementwise) and
differentiates it, and takes the projection's gradients as ``linear_lora``'s backward does
(``_autograd.linear_grads``): dx of the base and the LoRA in one swapped pass over the output gradient,
the slot weights' gradients from ``bgmv_lora_grads``.

With ``weight_scale`` the base weight is int8, quantized per output channel and symmetric
(``W = weight * weight_scale``, torch_xla's ``XlaQuantizedLinear`` with ``block_size=-1`` and no zero
point): the kernel reads the int8 weight and applies the scales to its f32 base product
(``Fusion.weight_scale``); the XLA-native path computes ``(x @ weight^T) * weight_scale``. With
``weight_in_scale`` the int8 weight's scales are per *input* channel, as such a weight's are when read
transposed: the backward's ``dy W`` is this op on ``dy`` with the layout swapped and ``weight_scale`` passed
as ``weight_in_scale``, so the backward reads the int8 weight too, never a float copy of it. The kernel
dequantises each weight chunk as it converts it in VMEM (``Fusion.weight_in_scale``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from torch_xla_lora.errors import ShapeError
from torch_xla_lora.ops import _validate


def dequantize(
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    dtype: torch.dtype,
    layout: str,
    weight_in_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float weight ``weight * weight_scale`` (per output channel) or ``weight * weight_in_scale`` (per input
    channel) in ``dtype``; ``weight`` when unscaled."""
    if weight_scale is None and weight_in_scale is None:
        return weight
    acc = torch.promote_types(dtype, torch.float32)
    per_row = (weight_scale if layout == "out_in" else weight_in_scale) is not None  # out_in rows: outputs
    scale = (weight_scale if weight_scale is not None else weight_in_scale).to(acc)
    return (weight.to(acc) * (scale[:, None] if per_row else scale)).to(dtype)


def prologue(
    inputs: torch.Tensor,
    up: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x's producer in torch: ``SiLU(inputs) * up`` when ``up`` is given, then ``* row_scale[:, None]``, then
    ``* col_scale``, each computed in float32 (float64 for float64 inputs) and rounded to inputs' dtype, as
    transformers' SiLU and RMSNorm round them."""
    dtype = inputs.dtype
    acc = torch.promote_types(dtype, torch.float32)
    x = inputs
    if up is not None:
        x = F.silu(x.to(acc)).to(dtype)
        x = (x.to(acc) * up.to(acc)).to(dtype)
    if row_scale is not None:
        x = (x.to(acc) * row_scale.to(acc)[:, None]).to(dtype)
    if col_scale is not None:
        x = (x.to(acc) * col_scale.to(acc)).to(dtype)
    return x


def reference(
    inputs: torch.Tensor,
    up: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    col_scale: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    residual: torch.Tensor | None,
    scaling: float = 1.0,
    weight_layout: str = "out_in",
    weight_scale: torch.Tensor | None = None,
    weight_in_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch: ``x = prologue(...)``; ``out = x W^T + bias + scaling * (x A[i]^T) B[i] + residual``,
    accumulated in float32 (float64 for float64 inputs) and rounded once; the rank intermediate rounded
    to lora_b's dtype. With ``weight_scale``, W is the int8 ``weight`` times it per output channel; with
    ``weight_in_scale``, times it per input channel, rounded to inputs' dtype (as the kernel dequantises)."""
    x = prologue(inputs, up, row_scale, col_scale)
    acc = torch.promote_types(inputs.dtype, torch.float32)
    if weight_in_scale is not None:
        weight = dequantize(weight, None, inputs.dtype, weight_layout, weight_in_scale)
    weight = dequantize(weight, weight_scale, acc, weight_layout)
    w = weight.to(acc) if weight_layout == "in_out" else weight.to(acc).T
    out = x.to(acc) @ w
    if bias is not None:
        out = out + bias.to(acc)
    if residual is not None:
        out = out + residual.to(acc)
    for slot in torch.unique(lora_indices).tolist():
        if 0 <= slot < lora_a.shape[0]:
            rows = lora_indices == slot
            shrunk = (scaling * (x[rows].to(acc) @ lora_a[slot].to(acc).T)).to(lora_b.dtype)
            out[rows] += shrunk.to(acc) @ lora_b[slot].to(acc)
    return out.to(inputs.dtype)


def _check(
    inputs, up, row_scale, col_scale, weight, bias, lora_a, lora_b, lora_indices, residual, layout, weight_scale=None,
    weight_in_scale=None,
) -> None:  # fmt: skip
    if weight_scale is not None and weight_in_scale is not None:
        raise ShapeError("linear_lora_fused: an int8 weight takes weight_scale or weight_in_scale, not both")
    if weight_scale is not None or weight_in_scale is not None:
        if weight.dtype != torch.int8 or weight.device != inputs.device:
            which = "weight_scale" if weight_scale is not None else "weight_in_scale"
            raise ShapeError(
                f"linear_lora_fused: with {which} the weight must be int8 on {inputs.device}, got "
                f"{weight.dtype} on {weight.device}"
            )
        # The float weight's checks on a stand-in of its shape in inputs' dtype (no copy: a broadcast scalar).
        weight = inputs.new_zeros(()).expand(weight.shape)
    _validate.linear_lora(inputs, weight, bias, lora_a, lora_b, lora_indices, layout)
    _check_fusion(
        "linear_lora_fused", inputs, lora_b.shape[2], up, row_scale, col_scale, residual, weight_scale, weight_in_scale
    )


def _check_fusion(
    op: str, inputs, out_dim: int, up, row_scale, col_scale, residual, weight_scale, weight_in_scale=None
) -> None:
    """The fusion operands' shapes, dtypes and devices (each may be None)."""
    num_tokens, hidden = inputs.shape
    expected = {
        "up": (up, (num_tokens, hidden), inputs.dtype),
        "row_scale": (row_scale, (num_tokens,), torch.float32),
        "col_scale": (col_scale, (hidden,), inputs.dtype),
        "residual": (residual, (num_tokens, out_dim), inputs.dtype),
        "weight_scale": (weight_scale, (out_dim,), torch.float32),
        "weight_in_scale": (weight_in_scale, (hidden,), torch.float32),
    }
    for name, (tensor, shape, dtype) in expected.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.device != inputs.device:
            raise ShapeError(
                f"{op}: {name} must be {list(shape)} {dtype} on {inputs.device}, got "
                f"{list(tensor.shape)} {tensor.dtype} on {tensor.device}"
            )


def _run(
    keep_s, inputs, up, row_scale, col_scale, weight, bias, lora_a, lora_b, lora_indices, residual, scaling=1.0,
    weight_layout="out_in", backend="auto", metadata=None, own_metadata=False, weight_scale=None,
    weight_in_scale=None,
):  # fmt: skip
    """``linear_lora_fused`` (``keep_s``: ``linear_lora_fused_train``, also returning s) on its checked operands."""
    _check(
        inputs, up, row_scale, col_scale, weight, bias, lora_a, lora_b, lora_indices, residual, weight_layout,
        weight_scale, weight_in_scale,
    )  # fmt: skip
    _validate.backend(backend)
    _validate.scaling(scaling)
    _validate.metadata(metadata, inputs.device)
    if inputs.device.type != "xla":
        operands = (inputs, up, row_scale, col_scale, weight, bias, lora_a, lora_b, lora_indices, residual)
        out = reference(*operands, scaling, weight_layout, weight_scale, weight_in_scale)
        if not keep_s:
            return out
        from torch_xla_lora import reference as torch_reference

        x = prologue(inputs, up, row_scale, col_scale)
        s = torch_reference.bgmv_shrink(x, lora_a, lora_indices, scaling).to(lora_b.dtype)
        return out, s, _kept_x(x, inputs, up, row_scale, col_scale)
    from torch_xla_lora import ops
    from torch_xla_lora.kernels import fused_base
    from torch_xla_lora.ops import _linear

    name, generation = ops._backend(backend)
    scales = (weight_scale, weight_in_scale)
    fusion = fused_base.Fusion(*(t is not None for t in (up, row_scale, col_scale, residual, *scales)))
    with_metadata = metadata is not None
    fn = _linear.linear_lora_fused_fn(
        name,
        generation,
        float(scaling),
        weight_layout,
        bias is not None,
        fusion,
        with_metadata,
        with_metadata and own_metadata,
        keep_s,
    )
    args = [inputs, weight, *(() if bias is None else (bias,)), lora_a, lora_b, lora_indices]
    args += [t for t in (up, row_scale, col_scale, residual, *scales) if t is not None]
    return ops._call_jax(fn, *args, *(() if metadata is None else (metadata,)))


def _linear_lora_fused(
    inputs: torch.Tensor,
    up: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    col_scale: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    residual: torch.Tensor | None,
    scaling: float = 1.0,
    weight_layout: str = "out_in",
    backend: str = "auto",
    metadata: torch.Tensor | None = None,
    own_metadata: bool = False,
    weight_scale: torch.Tensor | None = None,
    weight_in_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.xla_lora.linear_lora_fused``: see :func:`linear_lora_fused`."""
    return _run(
        False, inputs, up, row_scale, col_scale, weight, bias, lora_a, lora_b, lora_indices, residual, scaling,
        weight_layout, backend, metadata, own_metadata, weight_scale, weight_in_scale,
    )  # fmt: skip


_SCHEMA = torch.library.infer_schema(_linear_lora_fused, mutates_args=())
_serving_op = torch.library.custom_op("xla_lora::linear_lora_fused", _linear_lora_fused, mutates_args=())
# ``torch.ops.xla_lora.linear_lora_fused_train``: ``linear_lora_fused``'s output, the rank intermediate
# ``s[t] = scaling * A[i_t] x[t]`` of the producer's output x ([T, R], lora_b's dtype, zero for tokens outside [0, L)),
# which its backward hands to ``bgmv_lora_grads`` instead of recomputing it, and x itself where a producer is taken
# in ([T, K] as the product read it, which the backward's dA reads instead of recomputing it; else an empty [0]
# tensor): what ``linear_lora_train`` is to ``linear_lora``. The layers run it where ``linear_lora_fused`` would run
# in training (grad enabled, slot weights that need gradients). With backend "pallas" the fused base kernel writes
# ``s`` (and x) beside the output (``keep_s``), its prologue, residual and int8 scales as the serving op's; on "xla"
# (and where no tiling fits) the XLA-native training forward on rows sorted by slot. ``s`` and x are not
# differentiable. Arguments and checks: ``linear_lora_fused``'s.
_train_op = torch.library.custom_op(
    "xla_lora::linear_lora_fused_train",
    functools.partial(_run, True),
    mutates_args=(),
    schema=_SCHEMA.replace("-> Tensor", "-> (Tensor, Tensor, Tensor)"),
)


def _kept_x(x: torch.Tensor, inputs: torch.Tensor, *producer: torch.Tensor | None) -> torch.Tensor:
    """The training op's third output: x where a producer was taken in, else an empty [0] tensor (the op may not
    return its input itself)."""
    return x if any(t is not None for t in producer) else inputs.new_empty((0,))


def _fake(
    keep_s, inputs, up, row_scale, col_scale, weight, bias, lora_a, lora_b, lora_indices, residual, scaling=1.0,
    weight_layout="out_in", backend="auto", metadata=None, own_metadata=False, weight_scale=None,
    weight_in_scale=None,
):  # fmt: skip
    _check(
        inputs, up, row_scale, col_scale, weight, bias, lora_a, lora_b, lora_indices, residual, weight_layout,
        weight_scale, weight_in_scale,
    )  # fmt: skip
    out = inputs.new_empty((inputs.shape[0], lora_b.shape[2]))
    if not keep_s:
        return out
    s = inputs.new_empty((inputs.shape[0], lora_b.shape[1]), dtype=lora_b.dtype)
    return out, s, _kept_x(torch.empty_like(inputs), inputs, up, row_scale, col_scale)


_serving_op.register_fake(functools.partial(_fake, False))
_train_op.register_fake(functools.partial(_fake, True))


def _setup(ctx, inputs, output, s: torch.Tensor | None = None, kept_x: torch.Tensor | None = None) -> None:
    x, up, row, col, weight, bias, lora_a, lora_b, indices, residual, scaling, layout, backend = inputs[:13]
    w_scale, w_in_scale = inputs[15:]
    kept_x = None if kept_x is None or kept_x.numel() == 0 else kept_x
    ctx.save_for_backward(x, up, row, col, weight, bias, lora_a, lora_b, indices, w_scale, w_in_scale, s, kept_x)
    ctx.scaling, ctx.layout, ctx.backend = scaling, layout, backend
    ctx.has_residual = residual is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad: torch.Tensor):
    """x's producer differentiated in torch (cheap, elementwise); x itself as the training op kept it (else
    recomputed); the projection's gradients from its parts (``_autograd.linear_grads``: dx in one swapped pass over
    ``grad``, an int8 weight read as int8).
    The quantized weight and its scales are frozen (no gradient). In a double backward (grad mode on) every
    part is a differentiable op of the saved tensors, so the gradients are themselves differentiable."""
    from torch_xla_lora.ops import _autograd

    inputs, up, row, col, weight, bias, lora_a, lora_b, indices, w_scale, w_in_scale, saved_s, kept_x = (
        ctx.saved_tensors
    )
    need = ctx.needs_input_grad
    again = torch.is_grad_enabled()  # create_graph: the gradients as a graph of the saved tensors
    producer = [
        t if t is None or not t.is_floating_point() or again else t.detach().requires_grad_(bool(need[i]))
        for i, t in enumerate((inputs, up, row, col))
    ]
    wanted = [(i, t) for i, t in enumerate(producer) if t is not None and need[i] and t.requires_grad]
    x = None
    if wanted or kept_x is None or again:  # the producer's graph: its derivative, or x where none was kept
        with torch.enable_grad():
            x = prologue(*producer)
    flags = (bool(wanted), bool(need[4]), bool(need[5]), bool(need[6]), bool(need[7]))
    x_read = x if again else kept_x if kept_x is not None else x.detach()
    dx, d_weight, d_bias, d_a, d_b = _autograd.linear_grads(
        ctx, grad, x_read, weight, lora_a, lora_b, indices, flags, saved_s, weight_scales=(w_scale, w_in_scale)
    )
    result = [None] * 17
    result[4:8] = d_weight, d_bias, d_a, d_b
    if wanted:
        grads = torch.autograd.grad(x, [t for _, t in wanted], dx, create_graph=again)
        for (i, _), g in zip(wanted, grads, strict=True):
            result[i] = g
    if ctx.has_residual and need[9]:
        result[9] = grad
    return tuple(result)


def _setup_train(ctx, inputs, output) -> None:
    _setup(ctx, inputs, output[0], output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])  # s and x: intermediates kept for the backward, not results


def _backward_train(ctx, grad: torch.Tensor, _grad_s: torch.Tensor | None, _grad_x: torch.Tensor | None):
    return _backward(ctx, grad)


torch.library.register_autograd("xla_lora::linear_lora_fused", _backward, setup_context=_setup)
torch.library.register_autograd("xla_lora::linear_lora_fused_train", _backward_train, setup_context=_setup_train)


# -- the backward's one pass over the output gradient: dx, ds and dB ------------------------------------------


def _backward_roles(weight_layout: str, weight_scale, weight_in_scale):
    """The swapped pass's layout and (weight_scale, weight_in_scale): a weight scaled per output channel is scaled
    per input channel when read transposed, and the other way round."""
    return ("in_out" if weight_layout == "out_in" else "out_in"), weight_in_scale, weight_scale


def _check_backward(grad, weight, lora_a, lora_b, lora_indices, saved_s, weight_layout, weight_scale, weight_in_scale):
    layout, out_scale, in_scale = _backward_roles(weight_layout, weight_scale, weight_in_scale)
    _check(grad, None, None, None, weight, None, lora_b, lora_a, lora_indices, None, layout, out_scale, in_scale)
    expected = (grad.shape[0], lora_b.shape[1])
    if tuple(saved_s.shape) != expected or saved_s.dtype != lora_b.dtype or saved_s.device != grad.device:
        raise ShapeError(
            f"linear_lora_backward: saved_s must be [T, R] = {list(expected)} in lora_b's dtype {lora_b.dtype} on "
            f"{grad.device}, got {list(saved_s.shape)} {saved_s.dtype} on {saved_s.device}"
        )


def takes_one_pass_backward(
    num_tokens: int,
    grad_width: int,
    dx_width: int,
    rank: int,
    num_slots: int,
    dtype: torch.dtype,
    backend: str,
    weight_scales: tuple[bool, bool] = (False, False),
) -> bool:
    """Whether a projection's backward takes dx, ds and dB in ``linear_lora_backward``'s one pass over g (the
    Pallas backend; ``grad_width``/``dx_width``: the layer's out/in features). It must run its kernel: a plan of
    the swapped pass that holds dB's f32 [L, R, N] sum in VMEM beside it (``fused_base.plan(..., keep_s=True,
    a_grad=True)``). On a TPU that pass must also be modelled no slower than the two passes that replace it
    (``bench/tpu_train_model.one_pass_backward_cost``, on ``formulation``'s typical batch); in interpret mode
    (the CPU), which checks the kernel, its plan alone decides. ``weight_scales``: whether the forward's int8
    weight has its scales per output channel / per input channel. Where this is False the op would still run
    (the training forward's path and a weight gradient), but ``bgmv_lora_grads``' two passes are cheaper: the
    layers take those."""
    from torch_xla_lora import ops

    name, generation = ops._backend(backend)
    if name != "pallas":
        return False
    dtype_name = str(dtype).removeprefix("torch.")
    return _constant_choice(num_tokens, grad_width, dx_width, rank, num_slots, dtype_name, generation, *weight_scales)


@torch.compiler.assume_constant_result  # under torch.compile: a constant, the planner is never traced
def _constant_choice(*args) -> bool:
    return _one_pass(*args)


@functools.lru_cache(maxsize=1024)
def _one_pass(
    num_tokens: int,
    grad_width: int,
    dx_width: int,
    rank: int,
    num_slots: int,
    dtype_name: str,
    generation: str,
    out_scale: bool,
    in_scale: bool,
) -> bool:
    from torch_xla_lora.kernels import fused_base

    fusion = fused_base.Fusion(weight_scale=in_scale, weight_in_scale=out_scale)  # the backward's swapped roles
    planned = fused_base.plan(num_tokens, grad_width, dx_width, rank, num_slots, dtype_name, generation, False,
                              fusion, True, True)  # fmt: skip
    if planned is None or generation == "cpu":  # interpret mode: the kernel runs wherever it plans
        return planned is not None
    from torch_xla_lora import formulation
    from torch_xla_lora.bench import tpu_model, tpu_train_model

    chip = tpu_model.CHIPS.get(generation, tpu_model.CHIPS["v6e"])  # newer chips tune as v6e
    in_use = min(num_slots, num_tokens, formulation.TYPICAL_IN_USE)
    indices = tpu_model.contiguous_requests(num_tokens, num_slots, in_use)
    int8 = out_scale or in_scale
    cost = tpu_train_model.one_pass_backward_cost(chip, indices, dx_width, grad_width, rank, num_slots, int8)
    return cost is not None


@torch.library.custom_op("xla_lora::linear_lora_backward", mutates_args=())
def _linear_lora_backward(
    grad: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    saved_s: torch.Tensor,
    scaling: float = 1.0,
    weight_layout: str = "out_in",
    backend: str = "auto",
    weight_scale: torch.Tensor | None = None,
    weight_in_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.xla_lora.linear_lora_backward``: see :func:`linear_lora_backward`."""
    _check_backward(grad, weight, lora_a, lora_b, lora_indices, saved_s, weight_layout, weight_scale, weight_in_scale)
    _validate.backend(backend)
    _validate.scaling(scaling)
    layout, out_scale, in_scale = _backward_roles(weight_layout, weight_scale, weight_in_scale)
    if grad.device.type != "xla":
        from torch_xla_lora import reference as torch_reference

        dx = reference(grad, None, None, None, weight, None, lora_b, lora_a, lora_indices, None, scaling, layout,
                       out_scale, in_scale)  # fmt: skip
        ds = torch_reference.bgmv_shrink(grad, lora_b, lora_indices, scaling).to(lora_a.dtype)
        d_b = torch_reference.bgmv_weight_grad(saved_s, grad, lora_indices, lora_b.shape[0], 1.0)
        return dx, ds, d_b.to(lora_b.dtype)
    from torch_xla_lora import ops
    from torch_xla_lora.kernels import fused_base
    from torch_xla_lora.ops import _linear

    name, generation = ops._backend(backend)
    fusion = fused_base.Fusion(weight_scale=out_scale is not None, weight_in_scale=in_scale is not None)
    fn = _linear.linear_lora_fused_fn(name, generation, float(scaling), layout, False, fusion, False, False, True, True)
    scales = [t for t in (out_scale, in_scale) if t is not None]
    return ops._call_jax(fn, grad, weight, lora_b, lora_a, lora_indices, *scales, saved_s)


@_linear_lora_backward.register_fake
def _(grad, weight, lora_a, lora_b, lora_indices, saved_s, scaling=1.0, weight_layout="out_in", backend="auto",
      weight_scale=None, weight_in_scale=None):  # fmt: skip
    _check_backward(grad, weight, lora_a, lora_b, lora_indices, saved_s, weight_layout, weight_scale, weight_in_scale)
    dx = grad.new_empty((grad.shape[0], lora_a.shape[2]))
    return dx, grad.new_empty((grad.shape[0], lora_a.shape[1]), dtype=lora_a.dtype), torch.empty_like(lora_b)


def linear_lora_backward(
    grad: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    saved_s: torch.Tensor,
    scaling: float = 1.0,
    weight_layout: str = "out_in",
    backend: str = "auto",
    weight_scale: torch.Tensor | None = None,
    weight_in_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``linear_lora`` (``y = x W^T + scaling * (x A[i_t]^T) B[i_t]``) in one pass over ``grad``.

    Returns ``(dx, ds, dB)``:

    - ``dx = g W + ds A[i_t]`` [T, K] in grad's dtype (``linear_lora`` with the roles swapped, accumulated in
      float32 and rounded once; W dequantised as it is read when int8);
    - ``ds = scaling * g B[i_t]^T`` [T, R] rounded to lora_a's dtype, as the pass's expand reads it, so that
      ``dA[l] = sum_{i_t = l} outer(ds[t], x[t])`` (``bgmv_weight_grad(ds, x, ...)``, the one gradient that needs x);
    - ``dB[l] = sum_{i_t = l} outer(saved_s[t], g[t])`` [L, R, N] in lora_b's dtype (accumulated in float32), exact
      zeros for a slot no token uses.

    On TPU (backend "pallas") the fused base kernel takes all three while each tile of g is in VMEM: dB's f32
    [L, R, N] sum stays resident over the grid and is written once, so g is read once for the base's dx and the
    LoRA's three products (``kernels/fused_base.py``, ``a_grad_rows``); where no tiling fits, and on "xla", dx and
    ds by ``linear_lora_fused_train``'s path and dB by ``bgmv_weight_grad``'s. Tokens of other slots are selected
    out of both of dB's operands, so a non-finite row stays in its own slot. Not differentiable (the layers'
    backward calls it with grad mode off; a double backward runs the separate ops).

    Args:
      grad: [T, N]: the output gradient, in x's dtype.
      weight, lora_a, lora_b, lora_indices, scaling, weight_layout, backend: the forward's (``linear_lora``'s).
      saved_s: [T, R] in lora_b's dtype: the forward's ``s = scaling * x A[i_t]^T`` as its expand read it
        (``linear_lora_train``'s second output).
      weight_scale, weight_in_scale: the forward's int8 weight scales (``linear_lora_fused``'s), at most one.

    Raises:
      ShapeError: a wrong shape, dtype or device (as ``linear_lora``'s on the swapped roles, and of ``saved_s``).
      ArgumentError: a non-finite ``scaling`` or an unknown backend.
    """
    _validate.tensor_arguments(
        "linear_lora_backward", grad=grad, weight=weight, lora_a=lora_a, lora_b=lora_b, lora_indices=lora_indices,
        saved_s=saved_s,
    )  # fmt: skip
    return torch.ops.xla_lora.linear_lora_backward(
        grad, weight, lora_a, lora_b, lora_indices, saved_s, scaling, weight_layout, backend, weight_scale,
        weight_in_scale,
    )  # fmt: skip


def linear_lora_fused(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    scaling: float = 1.0,
    weight_layout: str = "out_in",
    backend: str = "auto",
    *,
    up: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    metadata: torch.Tensor | None = None,
    own_metadata: bool = False,
    weight_scale: torch.Tensor | None = None,
    weight_in_scale: torch.Tensor | None = None,
    keep_s: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`~torch_xla_lora.ops.linear_lora` reading x through its producer and adding a residual in its write.

    On TPU ("pallas") the fused base kernel applies the producer to every x tile it reads (the base
    product and the LoRA's shrink both read the result, as PEFT applies the LoRA to the projection's
    input) and adds the residual to each output tile before its single write.

    Args:
      inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout, backend, metadata,
        own_metadata: as :func:`~torch_xla_lora.ops.linear_lora`; ``inputs`` is the gate when ``up`` is given.
      up: [T, K]: x is ``SiLU(inputs) * up`` (a Llama MLP's down projection).
      row_scale: [T] float32: x times it per row (RMSNorm's ``rsqrt(mean(x^2) + eps)``).
      col_scale: [K]: x times it per column (RMSNorm's weight).
      residual: [T, N]: added to the output before its rounding.
      weight_scale: [N] float32: ``weight`` is int8, quantized per output channel and symmetric, and the
        base weight is ``weight * weight_scale`` (per row of "out_in", per column of "in_out").
      weight_in_scale: [K] float32: ``weight`` is int8 with its scales per input channel (per column of
        "out_in", per row of "in_out"): the base weight is ``weight * weight_in_scale`` rounded to inputs'
        dtype, dequantised as it is read (the backward's transposed read of a ``weight_scale`` weight). Not
        with ``weight_scale``.
      keep_s: run the training forward, ``torch.ops.xla_lora.linear_lora_fused_train``, which also returns the
        rank intermediate ``s`` [T, R] of x for the backward (the layers' choice in training, as
        ``linear_lora_train`` is ``linear_lora``'s).

    Returns:
      [T, N] in inputs' dtype, accumulated in float32 and rounded once (see :func:`reference`); with
      ``keep_s``, ``(out, s)`` (the op's third output, the kept x, stays with its backward).

    Raises:
      ShapeError: a wrong shape, dtype or device (as ``linear_lora``'s, and of the fusion operands), or both
        weight scales given.
    """
    op = torch.ops.xla_lora.linear_lora_fused_train if keep_s else torch.ops.xla_lora.linear_lora_fused
    out = op(
        inputs,
        up,
        row_scale,
        col_scale,
        weight,
        bias,
        lora_a,
        lora_b,
        lora_indices,
        residual,
        scaling,
        weight_layout,
        backend,
        metadata,
        own_metadata,
        weight_scale,
        weight_in_scale,
    )
    return out[:2] if keep_s else out


# -- pooled adapters: linear_lora reading each lane from rank-row pools at its true rank ----------------------


def pooled_reference(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    lanes: torch.Tensor,
    rows: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    scaling: float = 1.0,
    weight_layout: str = "out_in",
    up: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch: ``x = prologue(...)``; ``out = x W^T + bias + residual`` accumulated in float32 (float64 for
    float64 inputs), plus each token's LoRA read from the pools as ``reference.pooled_shrink_expand`` reads it
    (lane l's first r rows of ``rows[l]``, r its true rank; int8: ``s * a_scale * b_scale`` per rank channel),
    rounded once."""
    from torch_xla_lora import reference as torch_reference

    x = prologue(inputs, up, row_scale, col_scale)
    acc = torch.promote_types(inputs.dtype, torch.float32)
    w = dequantize(weight, weight_scale, acc, weight_layout).to(acc)
    out = x.to(acc) @ (w if weight_layout == "in_out" else w.T)
    if bias is not None:
        out = out + bias.to(acc)
    if residual is not None:
        out = out + residual.to(acc)
    out = torch_reference.pooled_shrink_expand(x, a_pool, b_pool, out, lanes, rows, a_scale, b_scale, scaling)
    return out.to(inputs.dtype)


def _check_pooled(
    inputs, weight, bias, a_pool, b_pool, lanes, rows, a_scale, b_scale, scaling, layout, backend, metadata,
    pages, page_scales, up, row_scale, col_scale, residual, weight_scale,
) -> None:  # fmt: skip
    _validate.linear_lora_pooled(
        inputs, weight, bias, a_pool, b_pool, lanes, rows, a_scale, b_scale, layout, weight_scale
    )
    out_dim = b_pool.shape[1]
    _check_fusion("linear_lora_pooled", inputs, out_dim, up, row_scale, col_scale, residual, weight_scale)
    _validate.backend(backend)
    _validate.scaling(scaling)
    _validate.metadata(metadata, inputs.device)
    _validate.pooled_pages(pages, inputs, rows)
    _validate.pooled_page_scales(page_scales, inputs, a_pool)


@torch.library.custom_op("xla_lora::linear_lora_pooled", mutates_args=())
def _linear_lora_pooled(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    lanes: torch.Tensor,
    rows: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    scaling: float = 1.0,
    weight_layout: str = "out_in",
    backend: str = "auto",
    metadata: torch.Tensor | None = None,
    own_metadata: bool = False,
    pages: torch.Tensor | None = None,
    page_scales: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.xla_lora.linear_lora_pooled``: see :func:`linear_lora_pooled`."""
    fusion_operands = (up, row_scale, col_scale, residual, weight_scale)
    _check_pooled(
        inputs, weight, bias, a_pool, b_pool, lanes, rows, a_scale, b_scale, scaling, weight_layout, backend,
        metadata, pages, page_scales, *fusion_operands,
    )  # fmt: skip
    if inputs.device.type != "xla" or _validate.degenerate(*rows.shape):  # (L or R is 0: no tiles, the base alone)
        return pooled_reference(
            inputs, weight, bias, a_pool, b_pool, lanes, rows, a_scale, b_scale, scaling, weight_layout,
            *fusion_operands,
        )  # fmt: skip
    from torch_xla_lora import ops
    from torch_xla_lora.kernels import fused_base
    from torch_xla_lora.ops import _linear

    name, generation = ops._backend(backend)
    fusion = fused_base.Fusion(*(t is not None for t in fusion_operands))
    int8 = a_scale is not None
    with_metadata = metadata is not None
    fn = _linear.linear_lora_pooled_fn(
        name,
        generation,
        float(scaling),
        weight_layout,
        bias is not None,
        fusion,
        int8,
        with_metadata,
        with_metadata and own_metadata,
        pages is not None,
        page_scales is not None,
    )
    args = [inputs, weight, *(() if bias is None else (bias,)), a_pool, b_pool, lanes, rows]
    args += [a_scale, b_scale] if int8 else []
    args += [t for t in (*fusion_operands, metadata, pages, page_scales) if t is not None]
    return ops._call_jax(fn, *args)


@_linear_lora_pooled.register_fake
def _(
    inputs,
    weight,
    bias,
    a_pool,
    b_pool,
    lanes,
    rows,
    a_scale=None,
    b_scale=None,
    scaling=1.0,
    weight_layout="out_in",
    backend="auto",
    metadata=None,
    own_metadata=False,
    pages=None,
    page_scales=None,
    up=None,
    row_scale=None,
    col_scale=None,
    residual=None,
    weight_scale=None,
):
    _check_pooled(
        inputs, weight, bias, a_pool, b_pool, lanes, rows, a_scale, b_scale, scaling, weight_layout, backend,
        metadata, pages, page_scales, up, row_scale, col_scale, residual, weight_scale,
    )  # fmt: skip
    return inputs.new_empty((inputs.shape[0], b_pool.shape[1]))


def linear_lora_pooled(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    lanes: torch.Tensor,
    rows: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    scaling: float = 1.0,
    weight_layout: str = "out_in",
    backend: str = "auto",
    *,
    metadata: torch.Tensor | None = None,
    own_metadata: bool = False,
    pages: torch.Tensor | None = None,
    page_scales: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`linear_lora_fused` reading each token's adapter from rank-row pools at its true rank.

    The base product (x's producer, the bias, an int8 base's scales, the residual) is
    :func:`linear_lora_fused`'s; the LoRA is :func:`~torch_xla_lora.ops.pooled_shrink_expand`'s: lane l's rank
    rows are the pool rows ``rows[l, :r]``, r its true rank. On TPU ("pallas") the one-pass kernel
    (``kernels.fused_base.linear_lora(..., page_table=)``) DMAs each used lane's true-rank pages straight from
    the pools (an int8 page converted in VMEM, its rows' ``a_scale * b_scale`` folded into the shrink), so the
    adapter bytes a call reads follow the true ranks of the batch's adapters, at one byte an element for int8
    pools; rows that are not a lane's own (past its rank, another adapter's rows of a shared tail page) are
    selected out, never multiplied. Where the pooled kernel has no plan (``fused_base.pooled_plan``), and on
    the XLA-native backend ("xla", the CPU), :func:`linear_lora_fused`'s JAX function runs on the lanes: on
    "xla" its slot op reads from the pools the tiles of the lanes its visits name (int8 rows dequantised), on
    "pallas" the lanes' rows are gathered into the [L, R, ...] slot layout (all L x R table entries) first.
    Not differentiable: pools hold adapters that are served, not trained. CPU tensors run :func:`pooled_reference`.

    Args:
      inputs, weight, bias, scaling, weight_layout, backend, metadata, own_metadata, up, row_scale, col_scale,
        residual, weight_scale: as :func:`linear_lora_fused` (``metadata``: the batch's host metadata for the
        slots the pool stands for, L and R from ``rows``).
      a_pool, b_pool, lanes, rows, a_scale, b_scale, pages, page_scales: as
        :func:`~torch_xla_lora.ops.pooled_shrink_expand` (``lanes`` [T]: each token's lane; ``pages``: the
        host-built page table, ``context.pages``; ``page_scales``: an int8 pool's ``lora_page_scale``). A page
        start may be unaligned (an adapter's tail rows inside a page shared with other adapters): the kernel
        reads the aligned page and only the lane's rows of it.

    Returns:
      [T, N] in inputs' dtype, accumulated in float32 and rounded once (see :func:`pooled_reference`).

    Raises:
      ShapeError: a wrong shape, dtype or device of an operand (as ``pooled_shrink_expand``'s and
        ``linear_lora_fused``'s checks).
      ArgumentError: a non-finite ``scaling`` or an unknown backend.
    """
    _validate.tensor_arguments(
        "linear_lora_pooled",
        optional=("bias", "a_scale", "b_scale", "metadata", "pages", "page_scales", "up", "row_scale", "col_scale",
                  "residual", "weight_scale"),
        inputs=inputs, weight=weight, bias=bias, a_pool=a_pool, b_pool=b_pool, lanes=lanes, rows=rows,
        a_scale=a_scale, b_scale=b_scale, metadata=metadata, pages=pages, page_scales=page_scales, up=up,
        row_scale=row_scale, col_scale=col_scale, residual=residual, weight_scale=weight_scale,
    )  # fmt: skip
    return torch.ops.xla_lora.linear_lora_pooled(
        inputs, weight, bias, a_pool, b_pool, lanes, rows, a_scale, b_scale, scaling, weight_layout, backend,
        metadata, own_metadata, pages, page_scales, up, row_scale, col_scale, residual, weight_scale,
    )  # fmt: skip


# -- linear_lora_pooled's backward -------------------------------------------------------------------------------
#: Argument positions of linear_lora_pooled: x, weight, bias; the pools and their scales; the producer's operands
#: (up, row_scale, col_scale), the residual, an int8 weight's scales.
_X, _WEIGHT, _BIAS, _RESIDUAL = 0, 1, 2, 19
_SERVED = (3, 4, 7, 8)
_PRODUCER = (16, 17, 18, 20)


def _pooled_setup(ctx, inputs, output) -> None:
    x, weight, bias, a_pool, b_pool, lanes, rows, a_scale, b_scale, scaling, layout, backend, *rest = inputs
    _, _, pages, page_scales, up, row_scale, col_scale, _, weight_scale = rest
    ctx.save_for_backward(x, weight, a_pool, b_pool, lanes, rows, a_scale, b_scale, pages, page_scales)
    ctx.scaling, ctx.layout, ctx.backend = scaling, layout, backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.plain = all(t is None for t in (up, row_scale, col_scale, weight_scale))


def _pooled_backward(ctx, grad: torch.Tensor):
    """The plain layer's gradients (no producer taken in, a float weight; the layers read the pools with gradients
    recorded only so): dx = g W + scaling * (g B_l^T) A_l is this op with the roles swapped (g for x, W read in the
    other layout, B's pool as A's and A's as B's: both rank-first, an int8 row's a_scale * b_scale the same
    product), on the same row and page tables, one pass over g; dW and d bias as torch's linear backward; d
    residual = g. The pools are served adapters and take none."""
    from torch_xla_lora.ops._autograd import _needs

    if _needs(ctx, *_SERVED, *_PRODUCER) or (_needs(ctx, _X, _WEIGHT) and not ctx.plain):
        raise NotImplementedError("linear_lora_pooled: gradients of a plain layer's x, weight, bias and residual only")
    x, weight, a_pool, b_pool, lanes, rows, a_scale, b_scale, pages, page_scales = ctx.saved_tensors
    out_in = ctx.layout == "out_in"
    dx = d_weight = d_bias = None
    if _needs(ctx, _X):
        swapped = "in_out" if out_in else "out_in"
        dx = torch.ops.xla_lora.linear_lora_pooled(
            grad.to(weight.dtype), weight, None, b_pool, a_pool, lanes, rows, b_scale, a_scale, ctx.scaling,
            swapped, ctx.backend, None, False, pages, page_scales,
        ).to(x.dtype)  # fmt: skip
    if _needs(ctx, _WEIGHT):
        d_weight = grad.T @ x if out_in else x.T @ grad
    if _needs(ctx, _BIAS) and ctx.bias_dtype is not None:
        d_bias = grad.sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)).to(ctx.bias_dtype)
    return dx, d_weight, d_bias, *(None,) * 16, grad if _needs(ctx, _RESIDUAL) else None, None


torch.library.register_autograd("xla_lora::linear_lora_pooled", _pooled_backward, setup_context=_pooled_setup)
