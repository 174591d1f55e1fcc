"""``torch.ops.xla_lora.grouped_matmul``: rows sorted into contiguous groups, each group by its own weight.

The base projection of a mixture-of-experts layer: the N x K routed rows,
sorted by expert, times their expert's weight, without ever gathering a weight
per row. ``grouped_matmul_weight_grad`` is the weights' gradient (each group's
``left^T right``); both are functional custom ops with fakes and registered
backwards, so ``torch.compile(backend="openxla")`` sees opaque nodes and
autograd differentiates through them.

Dispatch by device, as the other ops (see :mod:`torch_xla_lora.ops`):

- other tensors: the plain-torch reference below (a loop over the groups, float32
  accumulation, float64 for float64 tensors).
- XLA tensors: a JAX function through torch_xla's ``call_jax``, by ``method``:

  - ``"ragged_dot"``: ``jax.lax.ragged_dot_general``. XLA:TPU runs it natively
    (libtpu 0.0.21 only with the weight's contracting dimension first, i.e.
    ``[E, in, out]``; an ``[E, out, in]`` weight is transposed first, a copy of
    the whole weight). JAX lowers it off TPU and GPU to a masked dense product
    over every group ([E, S, in] temporaries, E times the FLOPs).
  - ``"gmm"``: the Pallas grouped matmul of ``jax.experimental.pallas.ops.tpu.megablox``
    (Mosaic on TPU, interpret mode elsewhere), which reads an ``[E, out, in]``
    weight as it is (``transpose_rhs``).
  - ``"tiled"``: the same algorithm in plain XLA ops: for each group, its row
    tiles of ``block_rows`` rows (a ``fori_loop`` per group, a device trip count)
    times the group's weight, written into the output by a select; a tile shared by
    two groups is computed once per group. FLOPs: the rows' own plus at most one
    tile per group boundary; temporaries: one expert weight and one tile.
  - ``"auto"``: on TPU ``"ragged_dot"`` for ``[E, in, out]`` weights and ``"gmm"``
    for ``[E, out, in]`` ones; ``"tiled"`` elsewhere.

Every JAX function is built once per static configuration (``functools.lru_cache``):
``call_jax`` caches its traced computations by the function object.
"""

from __future__ import annotations

import functools
import importlib
import reprlib
from collections.abc import Callable

import torch

from torch_xla_lora.errors import ArgumentTypeError, ShapeError
from torch_xla_lora.ops import _validate

__all__ = ["grouped_matmul", "grouped_matmul_weight_grad", "METHODS"]

METHODS = ("auto", "ragged_dot", "gmm", "tiled")
_CACHE_SIZE = 64
# Most rows per tile of the "tiled" method: of 32, 64, 128 and 256, the fastest on XLA:CPU for 2048 rows
# of the `bench moe` model (hidden 1024, 8 experts, gate_up width 5632), 64 close behind.
_BLOCK_ROWS = 128


# -- checks -------------------------------------------------------------------------------------------


def _tensors(op: str, **arguments: object) -> None:
    """Every argument a ``torch.Tensor``: checked before the dispatcher, which has its own error for a list."""
    for name, value in arguments.items():
        if not isinstance(value, torch.Tensor):
            raise ArgumentTypeError(
                f"{op}: {name} must be a torch.Tensor, got {type(value).__name__} {reprlib.repr(value)}"
            )


def _method(name: str) -> None:
    if name not in METHODS:
        raise ShapeError(f"method must be one of {METHODS}, got {name!r}")


def _group_sizes(group_sizes: torch.Tensor, groups: int, device: torch.device) -> None:
    if group_sizes.dim() != 1 or group_sizes.shape[0] != groups:
        raise ShapeError(f"group_sizes must be [E] = [{groups}] (E of weights), got shape {tuple(group_sizes.shape)}")
    if group_sizes.dtype != torch.int32:
        raise ShapeError(f"group_sizes must be int32, got {group_sizes.dtype}")
    if group_sizes.device != device:
        raise ShapeError(f"group_sizes must be on {device}, got {group_sizes.device}")


def _check_matmul(inputs: torch.Tensor, weights: torch.Tensor, group_sizes: torch.Tensor, transposed: bool) -> int:
    """Checks of ``grouped_matmul``; returns the output width."""
    if inputs.dim() != 2:
        raise ShapeError(f"inputs must be 2-D [S, in], got shape {tuple(inputs.shape)}")
    layout = "[E, in, out]" if transposed else "[E, out, in]"
    if weights.dim() != 3:
        raise ShapeError(f"weights must be 3-D {layout}, got shape {tuple(weights.shape)}")
    if not inputs.dtype.is_floating_point:
        raise ShapeError(f"inputs must be a floating tensor, got dtype {inputs.dtype}")
    if weights.dtype != inputs.dtype:
        raise ShapeError(f"weights must have the dtype of inputs ({inputs.dtype}), got {weights.dtype}")
    in_axis = 1 if transposed else 2
    if weights.shape[in_axis] != inputs.shape[1]:
        raise ShapeError(
            f"weights {layout} dim {in_axis} must equal in of inputs = {inputs.shape[1]}, "
            f"got shape {tuple(weights.shape)}"
        )
    if weights.device != inputs.device:
        raise ShapeError(f"weights must be on the device of inputs ({inputs.device}), got {weights.device}")
    _group_sizes(group_sizes, weights.shape[0], inputs.device)
    return weights.shape[2 if transposed else 1]


def _check_weight_grad(left: torch.Tensor, right: torch.Tensor, group_sizes: torch.Tensor, groups: int) -> None:
    for name, t in (("left", left), ("right", right)):
        if t.dim() != 2:
            raise ShapeError(f"{name} must be 2-D [S, {'P' if name == 'left' else 'Q'}], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ShapeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if right.shape[0] != left.shape[0]:
        raise ShapeError(f"right dim 0 must equal S of left = {left.shape[0]}, got shape {tuple(right.shape)}")
    if right.device != left.device:
        raise ShapeError(f"right must be on the device of left ({left.device}), got {right.device}")
    if groups < 0:
        raise ShapeError(f"num_groups must be >= 0, got {groups}")
    _group_sizes(group_sizes, groups, left.device)


# -- the plain-torch reference (CPU tensors) ----------------------------------------------------------------


def _acc(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _groups(group_sizes: torch.Tensor, rows: int):
    """Yield (group, first row, end row) of every non-empty group, clipped to ``rows``."""
    start = 0
    for group, size in enumerate(group_sizes.tolist()):
        end = min(start + size, rows)
        if end > start:
            yield group, start, end
        start = max(end, start)


def reference_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, group_sizes: torch.Tensor, transposed: bool = False
) -> torch.Tensor:
    """Plain torch: ``out[rows of group e] = inputs[rows] @ W[e]^T`` (``W[e]`` if transposed), rows past the
    groups zero; accumulated in float32 (float64 for float64 tensors), returned in inputs' dtype."""
    acc = _acc(inputs, weights)
    out_dim = weights.shape[2 if transposed else 1]
    out = inputs.new_zeros((inputs.shape[0], out_dim), dtype=acc)
    for group, start, end in _groups(group_sizes, inputs.shape[0]):
        weight = weights[group].to(acc)
        out[start:end] = inputs[start:end].to(acc) @ (weight if transposed else weight.T)
    return out.to(inputs.dtype)


def reference_weight_grad(left: torch.Tensor, right: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``out[e] = left[rows of e]^T @ right[rows of e]`` ([E, P, Q], zero for an empty group),
    accumulated in float32 (float64 for float64 tensors), in right's dtype."""
    acc = _acc(left, right)
    out = right.new_zeros((group_sizes.shape[0], left.shape[1], right.shape[1]), dtype=acc)
    for group, start, end in _groups(group_sizes, left.shape[0]):
        out[group] = left[start:end].to(acc).T @ right[start:end].to(acc)
    return out.to(right.dtype)


# -- JAX functions (XLA tensors) ------------------------------------------------------------------------


def _resolve(method: str, transposed: bool) -> str:
    if method != "auto":
        return method
    from torch_xla_lora.ops import device_generation

    if device_generation() == "cpu":
        return "tiled"
    return "ragged_dot" if transposed else "gmm"


def block_rows(rows: int, groups: int) -> int:
    """Rows per tile of the "tiled" method for ``rows`` rows in ``groups`` groups.

    Each group computes whole tiles, so up to one tile per group is wasted: the tile is the power of two
    (8 to ``_BLOCK_ROWS``) at most ``rows / groups``, keeping the waste within about the rows' own work.
    (128 routed rows over 8 experts: 16-row tiles, about 2x the rows' FLOPs, where 128-row tiles cost 8x.)
    """
    share = max(rows // max(groups, 1), 1)
    return min(_BLOCK_ROWS, max(8, 1 << (share.bit_length() - 1)))


def _bounds(jnp, group_sizes, rows: int):
    """(start, end) rows of every group, clipped to ``rows`` (int32 [E] each)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes), rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


@functools.lru_cache(maxsize=_CACHE_SIZE)
def matmul_fn(method: str, transposed: bool, generation: str = "cpu") -> Callable:
    """``fn(inputs [S, in], weights, group_sizes [E]) -> [S, out]`` in inputs' dtype, for one configuration."""
    import jax.numpy as jnp
    from jax import lax

    def ragged_dot(x, w, sizes):
        acc = jnp.promote_types(x.dtype, jnp.float32)
        # XLA:TPU (libtpu 0.0.21) takes the weight's contracting dimension first only: [E, in, out].
        rhs = w if transposed else jnp.swapaxes(w, 1, 2)
        return lax.ragged_dot(x, rhs, sizes, preferred_element_type=acc).astype(x.dtype)

    def gmm(x, w, sizes):
        # The kernel's module (the package's ``gmm`` attribute is its custom-VJP wrapper).
        megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

        rows, k = x.shape
        n = w.shape[2] if transposed else w.shape[1]
        tm = min(128, -(-rows // 8) * 8)
        padded = -(-rows // tm) * tm
        tiling = (tm, k if k <= 512 else 512, n if n <= 512 else 512)
        out = megablox.gmm(
            jnp.pad(x, [(0, padded - rows), (0, 0)]),
            w,
            sizes,
            preferred_element_type=x.dtype,  # the kernel accumulates in a float32 scratch tile
            tiling=tiling,
            transpose_rhs=not transposed,
            interpret=generation == "cpu",
        )[:rows]
        covered = jnp.arange(rows) < jnp.sum(sizes)  # the kernel leaves rows of no group unwritten
        return jnp.where(covered[:, None], out, 0)

    def tiled(x, w, sizes):
        rows = x.shape[0]
        out_dim = w.shape[2] if transposed else w.shape[1]
        block = block_rows(rows, w.shape[0])
        padded = -(-rows // block) * block
        x_pad = jnp.pad(x, [(0, padded - rows), (0, 0)])
        acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
        starts, ends = _bounds(jnp, sizes, rows)

        def group(e, out):
            start, end = starts[e], ends[e]
            # [in, out] either way: XLA:CPU multiplies [rows, in] x [in, out] about 2x faster than
            # contracting both operands' last dimension; the transpose copies one expert's weight.
            weight = w[e] if transposed else w[e].T

            def tile(t, out):
                offset = t * block
                product = jnp.dot(
                    lax.dynamic_slice_in_dim(x_pad, offset, block), weight, preferred_element_type=acc_dtype
                )
                position = offset + jnp.arange(block)
                mine = (position >= start) & (position < end)
                current = lax.dynamic_slice_in_dim(out, offset, block)
                update = jnp.where(mine[:, None], product.astype(out.dtype), current)
                return lax.dynamic_update_slice_in_dim(out, update, offset, 0)

            last = jnp.where(end > start, (end - 1) // block + 1, 0)
            return lax.fori_loop(start // block, last, tile, out)

        out = jnp.zeros((padded, out_dim), x.dtype)
        return lax.fori_loop(0, w.shape[0], group, out)[:rows]

    return {"ragged_dot": ragged_dot, "gmm": gmm, "tiled": tiled}[method]


@functools.lru_cache(maxsize=_CACHE_SIZE)
def weight_grad_fn(method: str) -> Callable:
    """``fn(left [S, P], right [S, Q], group_sizes [E]) -> [E, P, Q]`` in right's dtype."""
    import jax.numpy as jnp
    from jax import lax

    def ragged_dot(left, right, sizes):
        acc = jnp.promote_types(jnp.promote_types(left.dtype, right.dtype), jnp.float32)
        numbers = lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
        )
        out = lax.ragged_dot_general(left, right, sizes, numbers, preferred_element_type=acc)
        return out.astype(right.dtype)

    def tiled(left, right, sizes):
        rows = left.shape[0]
        block = block_rows(rows, sizes.shape[0])
        padded = -(-rows // block) * block
        left_pad = jnp.pad(left, [(0, padded - rows), (0, 0)])
        right_pad = jnp.pad(right, [(0, padded - rows), (0, 0)])
        acc_dtype = jnp.promote_types(jnp.promote_types(left.dtype, right.dtype), jnp.float32)
        starts, ends = _bounds(jnp, sizes, rows)

        def group(e, out):
            start, end = starts[e], ends[e]

            def tile(t, acc):
                offset = t * block
                position = offset + jnp.arange(block)
                mine = ((position >= start) & (position < end))[:, None]
                # Rows of other groups selected out, never multiplied by zero (an Inf there would give NaN).
                lhs = jnp.where(mine, lax.dynamic_slice_in_dim(left_pad, offset, block), 0)
                rhs = jnp.where(mine, lax.dynamic_slice_in_dim(right_pad, offset, block), 0)
                return acc + lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)

            last = jnp.where(end > start, (end - 1) // block + 1, 0)
            zero = jnp.zeros((left.shape[1], right.shape[1]), acc_dtype)
            total = lax.fori_loop(start // block, last, tile, zero)
            return lax.dynamic_update_index_in_dim(out, total.astype(out.dtype), e, 0)

        out = jnp.zeros((sizes.shape[0], left.shape[1], right.shape[1]), right.dtype)
        return lax.fori_loop(0, sizes.shape[0], group, out)

    # The weights' gradient has no Pallas kernel here: "gmm" runs XLA:TPU's ragged dot.
    return {"ragged_dot": ragged_dot, "gmm": ragged_dot, "tiled": tiled}[method]


def _call_jax(fn: Callable, *args: torch.Tensor) -> torch.Tensor:
    from torch_xla_lora.ops import _call_jax as call

    return call(fn, *args)


# -- the ops ------------------------------------------------------------------------------------------------


@torch.library.custom_op("xla_lora::grouped_matmul", mutates_args=())
def _grouped_matmul(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    group_sizes: torch.Tensor,
    transposed: bool = False,
    method: str = "auto",
) -> torch.Tensor:
    """``torch.ops.xla_lora.grouped_matmul``: see :func:`grouped_matmul`."""
    out_dim = _check_matmul(inputs, weights, group_sizes, transposed)
    _method(method)
    if inputs.device.type != "xla":
        return reference_matmul(inputs, weights, group_sizes, transposed)
    if _validate.degenerate(inputs.shape[0], inputs.shape[1], out_dim, weights.shape[0]):
        return inputs.new_zeros((inputs.shape[0], out_dim))
    from torch_xla_lora.ops import device_generation

    fn = matmul_fn(_resolve(method, transposed), bool(transposed), device_generation())
    return _call_jax(fn, inputs, weights, group_sizes)


@_grouped_matmul.register_fake
def _(inputs, weights, group_sizes, transposed=False, method="auto"):
    out_dim = _check_matmul(inputs, weights, group_sizes, transposed)
    _method(method)
    return inputs.new_empty((inputs.shape[0], out_dim))


def grouped_matmul(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    group_sizes: torch.Tensor,
    transposed: bool = False,
    method: str = "auto",
) -> torch.Tensor:
    """Grouped matrix multiplication: contiguous groups of rows, each by its own weight.

    Args:
      inputs: [S, in] floating, rows sorted by group: group 0's ``group_sizes[0]``
        rows first, then group 1's, ...
      weights: [E, out, in] (an ``nn.Linear`` weight per group), or [E, in, out]
        with ``transposed`` (GPT-OSS's experts), inputs' dtype.
      group_sizes: [E] int32 on inputs' device, non-negative, summing to at most S
        (the rows past the sum belong to no group).
      transposed: the layout of ``weights``.
      method: "auto", "ragged_dot", "gmm" or "tiled" (XLA tensors only; see the module).

    Returns:
      [S, out] in inputs' dtype, accumulated in float32 (float64 for float64 tensors off XLA).

    Semantics:
      start = 0
      for e in range(E):
          rows = slice(start, start + group_sizes[e])
          out[rows] = inputs[rows] @ (weights[e] if transposed else weights[e].T)
          start += group_sizes[e]
      out[start:] = 0

    Differentiable in ``inputs`` (a grouped matmul of the output gradient by the
    same weights, transposed) and ``weights`` (:func:`grouped_matmul_weight_grad`).

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor.
      ShapeError (a ValueError): wrong rank, shape, dtype or device of an argument, or an unknown method.
    """
    _tensors("grouped_matmul", inputs=inputs, weights=weights, group_sizes=group_sizes)
    return torch.ops.xla_lora.grouped_matmul(inputs, weights, group_sizes, transposed, method)


@torch.library.custom_op("xla_lora::grouped_matmul_weight_grad", mutates_args=())
def _grouped_matmul_weight_grad(
    left: torch.Tensor, right: torch.Tensor, group_sizes: torch.Tensor, method: str = "auto"
) -> torch.Tensor:
    """``torch.ops.xla_lora.grouped_matmul_weight_grad``: see :func:`grouped_matmul_weight_grad`."""
    _check_weight_grad(left, right, group_sizes, group_sizes.shape[0] if group_sizes.dim() == 1 else -1)
    _method(method)
    if left.device.type != "xla":
        return reference_weight_grad(left, right, group_sizes)
    shape = (group_sizes.shape[0], left.shape[1], right.shape[1])
    if _validate.degenerate(*shape):
        return right.new_zeros(shape)
    if left.shape[0] == 0:
        return right.new_zeros(shape)
    fn = weight_grad_fn(_resolve(method, True))
    return _call_jax(fn, left, right, group_sizes)


@_grouped_matmul_weight_grad.register_fake
def _(left, right, group_sizes, method="auto"):
    _check_weight_grad(left, right, group_sizes, group_sizes.shape[0] if group_sizes.dim() == 1 else -1)
    _method(method)
    return right.new_empty((group_sizes.shape[0], left.shape[1], right.shape[1]))


def grouped_matmul_weight_grad(
    left: torch.Tensor, right: torch.Tensor, group_sizes: torch.Tensor, method: str = "auto"
) -> torch.Tensor:
    """Each group's ``left^T right``: the gradient of :func:`grouped_matmul`'s weights.

    Args:
      left: [S, P] floating, right: [S, Q] floating, on one device, rows grouped as
        in :func:`grouped_matmul`.
      group_sizes: [E] int32, non-negative, summing to at most S.
      method: as :func:`grouped_matmul`'s ("gmm" runs "ragged_dot" here).

    Returns:
      [E, P, Q] in right's dtype (accumulated in float32, float64 for float64 tensors off XLA);
      an empty group's entry is zero.

    Semantics:
      start = 0
      for e in range(E):
          rows = slice(start, start + group_sizes[e])
          out[e] = left[rows].T @ right[rows]
          start += group_sizes[e]

    For ``grouped_matmul(x, W, sizes, transposed)`` with output gradient ``g``:
    ``dW = grouped_matmul_weight_grad(g, x, sizes)`` ([E, out, in]) or, transposed,
    ``grouped_matmul_weight_grad(x, g, sizes)`` ([E, in, out]).

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor.
      ShapeError (a ValueError): wrong rank, shape, dtype or device of an argument, or an unknown method.
    """
    _tensors("grouped_matmul_weight_grad", left=left, right=right, group_sizes=group_sizes)
    return torch.ops.xla_lora.grouped_matmul_weight_grad(left, right, group_sizes, method)


# -- autograd -----------------------------------------------------------------------------------------------


def _matmul_setup(ctx, inputs, output) -> None:
    x, weights, sizes, transposed, method = inputs
    ctx.save_for_backward(x, weights, sizes)
    ctx.transposed, ctx.method = transposed, method


def _matmul_backward(ctx, grad: torch.Tensor):
    x, weights, sizes = ctx.saved_tensors
    dx = d_weights = None
    if ctx.needs_input_grad[0]:  # dx[rows of e] = g[rows] @ W[e] ([E, out, in]): the other layout, same tensor
        dx = torch.ops.xla_lora.grouped_matmul(grad, weights, sizes, not ctx.transposed, ctx.method)
    if ctx.needs_input_grad[1]:
        left, right = (x, grad) if ctx.transposed else (grad, x)
        d_weights = torch.ops.xla_lora.grouped_matmul_weight_grad(left, right, sizes, ctx.method).to(weights.dtype)
    return dx, d_weights, None, None, None


def _weight_grad_setup(ctx, inputs, output) -> None:
    left, right, sizes, method = inputs
    ctx.save_for_backward(left, right, sizes)
    ctx.method = method


def _weight_grad_backward(ctx, grad: torch.Tensor):
    left, right, sizes = ctx.saved_tensors
    d_left = d_right = None
    if ctx.needs_input_grad[0]:  # d left[t] = G[e] @ right[t]: right's rows by G [E, P, Q] read as [E, out, in]
        d_left = torch.ops.xla_lora.grouped_matmul(right, grad.to(right.dtype), sizes, False, ctx.method)
        d_left = d_left.to(left.dtype)
    if ctx.needs_input_grad[1]:  # d right[t] = left[t] @ G[e]: G read as [E, in, out]
        d_right = torch.ops.xla_lora.grouped_matmul(left, grad.to(left.dtype), sizes, True, ctx.method)
        d_right = d_right.to(right.dtype)
    return d_left, d_right, None, None


torch.library.register_autograd("xla_lora::grouped_matmul", _matmul_backward, setup_context=_matmul_setup)
torch.library.register_autograd(
    "xla_lora::grouped_matmul_weight_grad", _weight_grad_backward, setup_context=_weight_grad_setup
)
