"""``torch.ops.xla_lora.bgmv_lora_grads``: the fused backward of one LoRA projection.

For ``y = base + (scaling * A[i_t] x[t]) @ B[i_t]`` (``bgmv_shrink_expand``, the
LoRA part of ``linear_lora``) and the output gradient ``g``, one op gives the
slot weights' gradients and, when asked, the LoRA's input gradient::

    s[t]  = scaling * A[i_t] x[t]       (rounded to B's dtype, as the forward rounds it)
    ds[t] = B[i_t] g[t]
    dA[l] = scaling * sum_{i_t = l} outer(ds[t], x[t])
    dB[l] = sum_{i_t = l} outer(s[t], g[t])
    dx[t] = scaling * ds[t] @ A[i_t]     (with_dx)

Tokens whose index is outside [0, L) add nothing; a slot no token uses gets exact
zeros. The backward registered in :mod:`torch_xla_lora.ops._autograd` calls it
instead of five separate shrink, expand and weight-gradient ops, each of which
groups the tokens by slot and reads the activations again (see
``ops/_lora_grads_jax.py`` for the XLA and Pallas formulations). It is not
itself differentiable: a double backward (``create_graph=True``) runs the
separate ops, which are.
"""

from __future__ import annotations

import torch

from torch_xla_lora import reference
from torch_xla_lora.errors import ShapeError
from torch_xla_lora.ops import _validate


def _check(grad, inputs, lora_a, lora_b, lora_indices, backend, scaling, saved_s=None) -> None:
    _validate.shrink_expand(inputs, lora_a, lora_b, grad, lora_indices)  # grad has base's shape and dtype
    _validate.backend(backend)
    _validate.scaling(scaling)
    if saved_s is not None:
        expected = (inputs.shape[0], lora_b.shape[1])
        if tuple(saved_s.shape) != expected or saved_s.dtype != lora_b.dtype or saved_s.device != inputs.device:
            raise ShapeError(
                f"saved_s must be [T, R] = {list(expected)} in lora_b's dtype {lora_b.dtype} on {inputs.device}, "
                f"got {list(saved_s.shape)} {saved_s.dtype} on {saved_s.device}"
            )


def _reference(
    grad, inputs, lora_a, lora_b, lora_indices, scaling: float, with_dx: bool, saved_s=None
) -> list[torch.Tensor]:
    num_slots = lora_a.shape[0]
    s = reference.bgmv_shrink(inputs, lora_a, lora_indices, scaling).to(lora_b.dtype) if saved_s is None else saved_s
    ds = reference.bgmv_shrink(grad, lora_b, lora_indices, 1.0)
    out = [
        reference.bgmv_weight_grad(ds, inputs, lora_indices, num_slots, scaling).to(lora_a.dtype),
        reference.bgmv_weight_grad(s, grad, lora_indices, num_slots, 1.0).to(lora_b.dtype),
    ]
    if with_dx:
        scaled = (ds * scaling).to(lora_a.dtype)
        out.append(reference.bgmv_expand(scaled, lora_a, torch.zeros_like(inputs), lora_indices, False))
    return out


@torch.library.custom_op("xla_lora::bgmv_lora_grads", mutates_args=())
def _bgmv_lora_grads(
    grad: torch.Tensor,
    inputs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    scaling: float = 1.0,
    with_dx: bool = False,
    backend: str = "auto",
    saved_s: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``torch.ops.xla_lora.bgmv_lora_grads``: see :func:`bgmv_lora_grads`."""
    _check(grad, inputs, lora_a, lora_b, lora_indices, backend, scaling, saved_s)
    if inputs.device.type != "xla" or _validate.degenerate(*lora_a.shape, *lora_b.shape):
        return _reference(grad, inputs, lora_a, lora_b, lora_indices, scaling, with_dx, saved_s)
    from torch_xla_lora.ops import _backend, _call_jax
    from torch_xla_lora.ops._lora_grads_jax import lora_grads_fn

    name, generation = _backend(backend)
    fn = lora_grads_fn(name, generation, float(scaling), bool(with_dx), saved_s is not None)
    extra = () if saved_s is None else (saved_s,)
    return list(_call_jax(fn, grad, inputs, lora_a, lora_b, lora_indices, *extra))


@_bgmv_lora_grads.register_fake
def _(grad, inputs, lora_a, lora_b, lora_indices, scaling=1.0, with_dx=False, backend="auto", saved_s=None):
    _check(grad, inputs, lora_a, lora_b, lora_indices, backend, scaling, saved_s)
    out = [torch.empty_like(lora_a), torch.empty_like(lora_b)]
    return out + [torch.empty_like(inputs)] if with_dx else out


def bgmv_lora_grads(
    grad: torch.Tensor,
    inputs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    scaling: float = 1.0,
    with_dx: bool = False,
    backend: str = "auto",
    saved_s: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """A LoRA projection's backward in one op: ``[dA, dB]``, or ``[dA, dB, dx]`` with ``with_dx``.

    Args:
      grad: [T, Dout], lora_b's dtype: the output gradient.
      inputs: [T, D]: the forward's inputs.
      lora_a: [L, R, D], inputs' dtype; lora_b: [L, R, Dout] (rank-first).
      lora_indices: [T] int32: slot of each token; outside [0, L) adds nothing.
      scaling: the forward's scaling.
      with_dx: also return the LoRA's input gradient (the base's is not in it).
      backend: "auto", "pallas" or "xla" (XLA tensors only).
      saved_s: [T, R] in lora_b's dtype: ``s`` as the forward computed it (``bgmv_shrink_expand_train``);
        None: recomputed from ``inputs`` (one more pass over them).

    Returns:
      dA in lora_a's dtype, dB in lora_b's, dx in inputs' (accumulated in float32).

    Semantics: see the module doc.

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor.
      ShapeError (a ValueError): wrong rank, shape, dtype or device of an argument.
      ArgumentError (a ValueError): a non-finite ``scaling``.
    """
    _validate.tensor_arguments(
        "bgmv_lora_grads", grad=grad, inputs=inputs, lora_a=lora_a, lora_b=lora_b, lora_indices=lora_indices
    )
    return torch.ops.xla_lora.bgmv_lora_grads(
        grad, inputs, lora_a, lora_b, lora_indices, scaling, with_dx, backend, saved_s
    )


# -- the training forward that keeps s ------------------------------------------------------------------


@torch.library.custom_op("xla_lora::bgmv_shrink_expand_train", mutates_args=())
def _bgmv_shrink_expand_train(
    inputs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    base: torch.Tensor,
    lora_indices: torch.Tensor,
    scaling: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.xla_lora.bgmv_shrink_expand_train``: ``bgmv_shrink_expand``'s output and the rank
    intermediate ``s[t] = scaling * A[i_t] x[t]`` ([T, R], lora_b's dtype, zero for tokens outside [0, L)),
    which its backward (``ops/_autograd.py``) hands to ``bgmv_lora_grads`` instead of recomputing it.

    The layers run it in training (grad enabled, slot weights that need gradients) where the XLA-native
    formulation runs: there it sorts the tokens by slot and computes ``s`` and the expand on the sorted rows
    (``_lora_grads_jax.xla_forward``). With backend "pallas" it runs the fused op and the shrink kernel (no
    faster than recomputing ``s`` in the backward: the layers do not choose it there). ``s`` is not
    differentiable (its autograd marks it so). Arguments and checks: those of ``bgmv_shrink_expand``
    without ``metadata`` (the rows are sorted on the device: an int32 argsort of T entries).
    """
    _validate.shrink_expand(inputs, lora_a, lora_b, base, lora_indices)
    _validate.backend(backend)
    _validate.scaling(scaling)
    if inputs.device.type != "xla" or _validate.degenerate(*lora_a.shape[:2], *inputs.shape[1:], *base.shape[1:]):
        lora_a, lora_b = lora_a[:, :, : inputs.shape[1]], lora_b[:, :, : base.shape[1]]
        s = reference.bgmv_shrink(inputs, lora_a, lora_indices, scaling).to(lora_b.dtype)
        out = reference.bgmv_shrink_expand(inputs, lora_a, lora_b, base, lora_indices, scaling)
        return out, s
    from torch_xla_lora.ops import _backend, _call_jax

    name, _ = _backend(backend)
    if name == "pallas":
        out = torch.ops.xla_lora.bgmv_shrink_expand(inputs, lora_a, lora_b, base, lora_indices, scaling, backend)
        s = torch.ops.xla_lora.bgmv_shrink(inputs, lora_a[:, :, : inputs.shape[1]], lora_indices, scaling, backend)
        return out, s.to(lora_b.dtype)
    from torch_xla_lora.ops._lora_grads_jax import train_forward_fn

    out, s = _call_jax(train_forward_fn(float(scaling)), inputs, lora_a, lora_b, base, lora_indices)
    return out, s


@_bgmv_shrink_expand_train.register_fake
def _(inputs, lora_a, lora_b, base, lora_indices, scaling=1.0, backend="auto"):
    _validate.shrink_expand(inputs, lora_a, lora_b, base, lora_indices)
    _validate.backend(backend)
    _validate.scaling(scaling)
    return torch.empty_like(base), inputs.new_empty((inputs.shape[0], lora_b.shape[1]), dtype=lora_b.dtype)


@torch.library.custom_op("xla_lora::linear_lora_train", mutates_args=())
def _linear_lora_train(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_indices: torch.Tensor,
    scaling: float = 1.0,
    weight_layout: str = "out_in",
    backend: str = "auto",
    metadata: torch.Tensor | None = None,
    own_metadata: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.xla_lora.linear_lora_train``: ``linear_lora``'s output and the rank intermediate
    ``s[t] = scaling * A[i_t] x[t]`` ([T, R], lora_b's dtype, zero for tokens outside [0, L)), which its
    backward (``ops/_autograd.py``) hands to ``bgmv_lora_grads`` instead of recomputing it.

    The layers run it in training (grad enabled, slot weights that need gradients) where ``linear_lora``
    would run. With backend "pallas" the fused base kernel writes ``s`` beside the output
    (``kernels/fused_base.py``, ``keep_s``: [T, R] more written, no pass of its own); on "xla" (and where
    no tiling fits) the base product, then the XLA-native training forward on rows sorted by slot, as
    ``bgmv_shrink_expand_train`` runs it. ``s`` is not differentiable (its autograd marks it so).
    Arguments and checks: those of ``linear_lora``.
    """
    _validate.linear_lora_call(
        inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout, backend, metadata
    )
    if inputs.device.type != "xla" or _validate.degenerate(*lora_a.shape, *lora_b.shape):
        out = reference.linear_lora(inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout)
        return out, reference.bgmv_shrink(inputs, lora_a, lora_indices, scaling).to(lora_b.dtype)
    from torch_xla_lora.ops import _linear, _run_linear

    args = (inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout, backend, metadata, own_metadata)
    out, s = _run_linear(_linear.linear_lora_train_fn, *args)
    return out, s


@_linear_lora_train.register_fake
def _(
    inputs,
    weight,
    bias,
    lora_a,
    lora_b,
    lora_indices,
    scaling=1.0,
    weight_layout="out_in",
    backend="auto",
    metadata=None,
    own_metadata=False,
):
    _validate.linear_lora_call(
        inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout, backend, metadata
    )
    out = inputs.new_empty((inputs.shape[0], lora_b.shape[2]))
    return out, inputs.new_empty((inputs.shape[0], lora_b.shape[1]), dtype=lora_b.dtype)
