"""Argument checks shared by the ops' real and fake implementations.

They run before anything is traced, so a bad call fails with a message that
names the argument, the expected and the actual value, instead of deep inside
XLA or Pallas.
"""

from __future__ import annotations

import math
import reprlib

import torch

from torch_xla_lora.errors import ArgumentError, ArgumentTypeError, ShapeError

BACKENDS = ("auto", "pallas", "xla")


def tensor_arguments(op: str, optional: tuple[str, ...] = (), **arguments: object) -> None:
    """Every argument a ``torch.Tensor`` (those named in ``optional`` may be None): the exported ops check
    this before torch's dispatcher, which would otherwise refuse a list of indices with its own error."""
    for name, value in arguments.items():
        if isinstance(value, torch.Tensor) or (value is None and name in optional):
            continue
        expected = "a torch.Tensor or None" if name in optional else "a torch.Tensor"
        raise ArgumentTypeError(f"{op}: {name} must be {expected}, got {type(value).__name__} {reprlib.repr(value)}")


def _rank(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ShapeError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def _floating(name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ShapeError(f"{name} must be a floating tensor, got dtype {t.dtype}")


def _dim(name: str, t: torch.Tensor, axis: int, expected: int, what: str) -> None:
    if t.shape[axis] != expected:
        raise ShapeError(f"{name} dim {axis} must equal {what} = {expected}, got shape {tuple(t.shape)}")


def _same_dtype(name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if t.dtype != other.dtype:
        raise ShapeError(f"{name} must have the dtype of {other_name} ({other.dtype}), got {t.dtype}")


def indices(lora_indices: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    """int32 [T] on ``device`` (int64 also accepted off XLA)."""
    _rank("lora_indices", lora_indices, 1, "[T]")
    _dim("lora_indices", lora_indices, 0, num_tokens, "T")
    allowed = (torch.int32,) if device.type == "xla" else (torch.int32, torch.int64)
    if lora_indices.dtype not in allowed:
        # TPUs have no 64-bit integer units; int64 on XLA would be emulated or rejected.
        raise ShapeError(
            f"lora_indices must be {' or '.join(map(str, allowed))} on device {device.type}, got {lora_indices.dtype}"
        )
    if lora_indices.device != device:
        raise ShapeError(f"lora_indices must be on {device}, got {lora_indices.device}")


def scaling(value: float) -> None:
    """A finite scaling: an Inf or NaN one would give NaN to rows without an adapter (0 * Inf) on XLA devices."""
    if not math.isfinite(value):
        raise ArgumentError(f"scaling must be a finite number, got {value}")


def backend(name: str) -> None:
    if name not in BACKENDS:
        raise ShapeError(f"backend must be one of {BACKENDS}, got {name!r}")


def _at_least(name: str, t: torch.Tensor, axis: int, least: int, what: str) -> None:
    if t.shape[axis] < least:
        raise ShapeError(f"{name} dim {axis} must be at least {what} = {least}, got shape {tuple(t.shape)}")


def shrink(inputs: torch.Tensor, lora_a: torch.Tensor, lora_indices: torch.Tensor, wider: bool = False) -> None:
    """``wider``: lora_a may be wider than D (the fused op uses its first D columns)."""
    _rank("inputs", inputs, 2, "[T, D]")
    _rank("lora_a", lora_a, 3, "[L, R, D]")
    _floating("inputs", inputs)
    _same_dtype("lora_a", lora_a, "inputs", inputs)
    (_at_least if wider else _dim)("lora_a", lora_a, 2, inputs.shape[1], "D of inputs")
    _device("lora_a", lora_a, inputs)
    indices(lora_indices, inputs.shape[0], inputs.device)


def expand(inputs: torch.Tensor, lora_b: torch.Tensor, base: torch.Tensor, lora_indices: torch.Tensor) -> None:
    _rank("inputs", inputs, 2, "[T, R]")
    _rank("lora_b", lora_b, 3, "[L, R, Dout]")
    _rank("base", base, 2, "[T, Dout]")
    _floating("inputs", inputs)
    _floating("base", base)
    _same_dtype("lora_b", lora_b, "base", base)
    _dim("lora_b", lora_b, 1, inputs.shape[1], "R of inputs")
    _dim("base", base, 0, inputs.shape[0], "T of inputs")
    _device("lora_b", lora_b, inputs)
    _device("base", base, inputs)
    indices(lora_indices, inputs.shape[0], inputs.device)


def expand_full(lora_b: torch.Tensor, base: torch.Tensor) -> None:
    _dim("lora_b", lora_b, 2, base.shape[1], "Dout of base")


def expand_slice(lora_b: torch.Tensor, base: torch.Tensor, slice_offset: int) -> None:
    width, out_dim = lora_b.shape[2], base.shape[1]
    if not 0 <= slice_offset or slice_offset + width > out_dim:
        raise ShapeError(
            f"slice [slice_offset, slice_offset + S) = [{slice_offset}, {slice_offset + width}) "
            f"must lie within base's Dout = {out_dim}"
        )


def _device(name: str, t: torch.Tensor, inputs: torch.Tensor) -> None:
    if t.device != inputs.device:
        raise ShapeError(f"{name} must be on the device of inputs ({inputs.device}), got {t.device}")


def shrink_expand(
    inputs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    base: torch.Tensor,
    lora_indices: torch.Tensor,
) -> None:
    """The fused op's arguments; the adapter buffers may be wider than D and Dout (padded to whole lane
    tiles by the layers: only their first D / Dout columns are used)."""
    shrink(inputs, lora_a, lora_indices, wider=True)
    _rank("lora_b", lora_b, 3, "[L, R, Dout]")
    _rank("base", base, 2, "[T, Dout]")
    _floating("base", base)
    _same_dtype("lora_b", lora_b, "base", base)
    _dim("lora_b", lora_b, 0, lora_a.shape[0], "L of lora_a")
    _dim("lora_b", lora_b, 1, lora_a.shape[1], "R of lora_a")
    _dim("base", base, 0, inputs.shape[0], "T of inputs")
    _at_least("lora_b", lora_b, 2, base.shape[1], "Dout of base")
    _device("lora_b", lora_b, inputs)
    _device("base", base, inputs)


def degenerate(*dims: int) -> bool:
    """Whether a product has a zero-size dimension (L, R, D, Dout or a slice width): the ops then
    skip the kernels (which need positive tiles) and return what the CPU reference returns."""
    return any(dim == 0 for dim in dims)


def metadata(
    meta: torch.Tensor | None,
    device: torch.device,
    inputs: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    out_dim: int | None = None,
) -> None:
    """Packed host metadata of the fused op: 1-D int32 on the XLA device, of the length that the
    plan for ``inputs`` [T, D] and ``lora_b`` [L, R, Dout'] expects (checked when they are given),
    ``out_dim`` the layer's Dout (default Dout')."""
    if meta is None:
        return
    if device.type != "xla":
        raise ShapeError(f"metadata is for XLA tensors only; inputs are on {device}")
    if meta.dim() != 1 or meta.dtype != torch.int32:
        raise ShapeError(f"metadata must be a 1-D int32 tensor, got {meta.dtype} of shape {tuple(meta.shape)}")
    if meta.device != device:
        raise ShapeError(f"metadata must be on {device}, got {meta.device}")
    if inputs is None or lora_b is None or degenerate(inputs.shape[0], *inputs.shape[1:], *lora_b.shape):
        return
    # Imported here: JAX stays unimported until an XLA op runs (see ops/_jax.py).
    from torch_xla_lora.ops import _jax, device_generation

    num_slots, rank, width = lora_b.shape
    out_dim = width if out_dim is None else out_dim
    dtype = str(lora_b.dtype).removeprefix("torch.")
    expected = _jax.metadata_size(
        inputs.shape[0], inputs.shape[1], out_dim, rank, num_slots, dtype, device_generation()
    )
    if meta.shape[0] != expected:
        raise ShapeError(
            f"metadata must have {expected} entries for T={inputs.shape[0]}, D={inputs.shape[1]}, "
            f"Dout={out_dim}, R={rank}, L={num_slots} (build it with batch_metadata), got {meta.shape[0]}"
        )


def pooled_shrink_expand(
    inputs: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    base: torch.Tensor,
    lanes: torch.Tensor,
    rows: torch.Tensor,
    a_scale: torch.Tensor | None,
    b_scale: torch.Tensor | None,
) -> None:
    """Checks of ``pooled_shrink_expand``: x [T, D] floating, pools [P + 2, D] and [P + 2, Dout] in x's dtype
    or int8 (then float32 scales [P + 2] for both), base [T, Dout] in x's dtype, lanes [T], rows [L, R] int32."""
    _rank("inputs", inputs, 2, "[T, D]")
    int8 = _pooled_operands(inputs, a_pool, "a_pool", "[P + 2, D]", base, lanes, rows)
    _dim("a_pool", a_pool, 1, inputs.shape[1], "D of inputs")
    _rank("b_pool", b_pool, 2, "[P + 2, Dout]")
    _same_dtype("b_pool", b_pool, "a_pool", a_pool)
    _dim("b_pool", b_pool, 0, a_pool.shape[0], "the rows of a_pool")
    _dim("b_pool", b_pool, 1, base.shape[1], "Dout of base")
    _device("b_pool", b_pool, inputs)
    _row_scale("a_scale", a_scale, int8, a_pool, "a_pool", inputs)
    _row_scale("b_scale", b_scale, int8, a_pool, "a_pool", inputs)


def flat_pools(a_pool: torch.Tensor, b_pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pooled_shrink_expand``'s pools as [rows, W] views: 2-D pools as they are, stacked ones [E, P + 2, W]
    (an experts layer's; both stacked alike, P + 2 >= 2) flattened, their rows numbered so."""
    if a_pool.dim() != 3 and b_pool.dim() != 3:
        return a_pool, b_pool
    for name, pool in (("a_pool", a_pool), ("b_pool", b_pool)):
        _rank(name, pool, 3, "[E, P + 2, W] (stacked pools: both 3-D)")
        _at_least(name, pool, 1, 2, "the zero and scratch rows")
    if b_pool.shape[:2] != a_pool.shape[:2]:
        raise ShapeError(
            f"b_pool's [E, P + 2] must equal a_pool's {tuple(a_pool.shape[:2])}, got {tuple(b_pool.shape)}"
        )
    return a_pool.flatten(0, 1), b_pool.flatten(0, 1)


def pooled_expand(
    inputs: torch.Tensor,
    b_pool: torch.Tensor,
    base: torch.Tensor,
    lanes: torch.Tensor,
    rows: torch.Tensor,
    b_scale: torch.Tensor | None,
) -> None:
    """Checks of ``pooled_expand``: s [T, R] floating, b_pool [P + 2, Dout] in s's dtype or int8 (then float32
    scales [P + 2]), base [T, Dout] in s's dtype, lanes [T], rows [L, R] int32."""
    _rank("inputs", inputs, 2, "[T, R]")
    int8 = _pooled_operands(inputs, b_pool, "b_pool", "[P + 2, Dout]", base, lanes, rows)
    _dim("b_pool", b_pool, 1, base.shape[1], "Dout of base")
    _dim("rows", rows, 1, inputs.shape[1], "R of inputs")
    _row_scale("b_scale", b_scale, int8, b_pool, "b_pool", inputs)


def _pooled_operands(
    inputs: torch.Tensor,
    pool: torch.Tensor,
    name: str,
    layout: str,
    base: torch.Tensor,
    lanes: torch.Tensor,
    rows: torch.Tensor,
) -> bool:
    """The operands the pooled ops share: floating inputs, ``pool`` [P + 2, W] in their dtype or int8 (P >= 0),
    base [T, Dout] in their dtype, lanes [T], rows [L, R] int32, all on the inputs' device. Returns whether
    the pool is int8."""
    _rank(name, pool, 2, layout)
    _rank("base", base, 2, "[T, Dout]")
    _rank("rows", rows, 2, "[L, R]")
    _floating("inputs", inputs)
    _same_dtype("base", base, "inputs", inputs)
    int8 = pool.dtype == torch.int8
    if not int8:
        _same_dtype(name, pool, "inputs", inputs)
    if pool.shape[0] < 2:
        shape = tuple(pool.shape)
        raise ShapeError(f"{name} must hold its data rows, the zero row and the scratch row, got shape {shape}")
    _dim("base", base, 0, inputs.shape[0], "T of inputs")
    if rows.dtype != torch.int32:
        raise ShapeError(f"rows must be int32, got {rows.dtype}")
    for label, tensor in ((name, pool), ("base", base), ("rows", rows)):
        _device(label, tensor, inputs)
    indices(lanes, inputs.shape[0], inputs.device)
    return int8


def _row_scale(
    name: str, scale: torch.Tensor | None, int8: bool, pool: torch.Tensor, pool_name: str, inputs: torch.Tensor
) -> None:
    """An int8 pool's float32 per-row scales [P + 2] (``pool``'s rows), on the inputs' device; None otherwise."""
    if (scale is None) == int8:
        expected = "float32 scales [P + 2]" if int8 else "None (the pools are not int8)"
        raise ShapeError(f"{name} must be {expected}, got {None if scale is None else tuple(scale.shape)}")
    if scale is not None:
        _rank(name, scale, 1, "[P + 2]")
        _dim(name, scale, 0, pool.shape[0], f"the rows of {pool_name}")
        if scale.dtype != torch.float32:
            raise ShapeError(f"{name} must be float32, got {scale.dtype}")
        _device(name, scale, inputs)


def pooled_pages(pages: torch.Tensor | None, inputs: torch.Tensor, rows: torch.Tensor) -> None:
    """The host-built page table of ``pooled_shrink_expand``: int32 [L * pages(R) + L] (``pool.page_table``)."""
    if pages is None:
        return
    num_slots, rank = rows.shape
    _rank("pages", pages, 1, "[L * pages(R) + L]")
    _dim("pages", pages, 0, num_slots * (-(-rank // 8) + 1), "L * pages(R) + L of rows")
    if pages.dtype != torch.int32:
        raise ShapeError(f"pages must be int32, got {pages.dtype}")
    _device("pages", pages, inputs)


def pooled_page_scales(page_scales: torch.Tensor | None, inputs: torch.Tensor, a_pool: torch.Tensor) -> None:
    """An int8 pool's page scales of ``pooled_shrink_expand``: float32 [N], N >= P + 2 a multiple of 1024; for
    stacked pools ``a_pool`` [E, P + 2, W], E times S entries, S >= P + 2 whole blocks of ``1024 / G`` rows laid out
    G pools to a tile (``pool.scale_group``, ``kernels.pages.page_scales_of``)."""
    from torch_xla_lora import pool

    if page_scales is None:
        return
    if a_pool.dtype != torch.int8:
        raise ShapeError(f"page_scales must be None for a {a_pool.dtype} pool (they scale int8 rows)")
    _rank("page_scales", page_scales, 1, "[N]")
    pools, rows = (a_pool.shape[0], a_pool.shape[1]) if a_pool.dim() == 3 else (1, a_pool.shape[0])
    length, block = page_scales.shape[0], pool.PAGE_SCALE_TILE // pool.scale_group(pools)
    if length % pools or (length // pools) % block or length // pools < rows:
        per_pool = f"{pools} blocks of " if pools > 1 else ""
        unit = f"{block}-row tiles" if block == pool.PAGE_SCALE_TILE else f"{block}-row blocks"
        raise ShapeError(f"page_scales must hold {per_pool}whole {unit} covering the {rows} rows, got {length}")
    if page_scales.dtype != torch.float32:
        raise ShapeError(f"page_scales must be float32, got {page_scales.dtype}")
    _device("page_scales", page_scales, inputs)


def pooled_metadata(meta: torch.Tensor | None, inputs: torch.Tensor, rows: torch.Tensor, out_dim: int) -> None:
    """Packed host metadata of ``pooled_shrink_expand``: the ``bgmv_shrink_expand`` metadata of the slots the
    pool stands for (L, R from ``rows``, the inputs' dtype), see :func:`metadata`."""
    if meta is None:
        return
    num_slots, rank = rows.shape
    slots_like = torch.empty((num_slots, rank, out_dim), dtype=inputs.dtype, device="meta")
    metadata(meta, inputs.device, inputs, slots_like)


WEIGHT_LAYOUTS = ("out_in", "in_out")


def linear_lora(inputs, weight, bias, lora_a, lora_b, lora_indices, weight_layout: str) -> None:
    """Checks of ``linear_lora``: x [T, K], weight [N, K] or [K, N], bias [N] or None, A [L, R, K], B [L, R, N]."""
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ShapeError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}")
    shrink(inputs, lora_a, lora_indices)
    _rank("weight", weight, 2, "[N, K]" if weight_layout == "out_in" else "[K, N]")
    _rank("lora_b", lora_b, 3, "[L, R, N]")
    _same_dtype("weight", weight, "inputs", inputs)
    _same_dtype("lora_b", lora_b, "inputs", inputs)
    in_axis = 1 if weight_layout == "out_in" else 0
    _dim("weight", weight, in_axis, inputs.shape[1], "K of inputs")
    out_dim = weight.shape[1 - in_axis]
    _dim("lora_b", lora_b, 0, lora_a.shape[0], "L of lora_a")
    _dim("lora_b", lora_b, 1, lora_a.shape[1], "R of lora_a")
    _dim("lora_b", lora_b, 2, out_dim, "N of weight")
    _device("weight", weight, inputs)
    _device("lora_b", lora_b, inputs)
    if bias is not None:
        _rank("bias", bias, 1, "[N]")
        _dim("bias", bias, 0, out_dim, "N of weight")
        _same_dtype("bias", bias, "inputs", inputs)
        _device("bias", bias, inputs)


def linear_lora_call(
    inputs, weight, bias, lora_a, lora_b, lora_indices, scaling_: float, weight_layout: str, backend_: str, meta
) -> None:
    """Every check of a ``linear_lora`` or ``linear_lora_train`` call (the ops and their fake implementations):
    the operands (:func:`linear_lora`), the backend, the scaling and the host metadata."""
    linear_lora(inputs, weight, bias, lora_a, lora_b, lora_indices, weight_layout)
    backend(backend_)
    scaling(scaling_)
    metadata(meta, inputs.device)


def weight_grad(left: torch.Tensor, right: torch.Tensor, lora_indices: torch.Tensor, num_slots: int) -> None:
    """Checks of ``bgmv_weight_grad``: left [T, P], right [T, Q], both floating on one device, num_slots >= 0."""
    _rank("left", left, 2, "[T, P]")
    _rank("right", right, 2, "[T, Q]")
    _floating("left", left)
    _floating("right", right)
    _dim("right", right, 0, left.shape[0], "T of left")
    if right.device != left.device:
        raise ShapeError(f"right must be on the device of left ({left.device}), got {right.device}")
    indices(lora_indices, left.shape[0], left.device)
    if num_slots < 0:
        raise ShapeError(f"num_slots must be >= 0, got {num_slots}")


def linear_lora_pooled(
    inputs, weight, bias, a_pool, b_pool, lanes, rows, a_scale, b_scale, weight_layout: str, weight_scale
) -> None:
    """Checks of ``linear_lora_pooled``'s base and pools: x [T, K] floating, weight [N, K] or [K, N] in x's dtype
    (int8 with float32 ``weight_scale`` [N]), bias [N] or None, and the pools, lanes, rows and row scales as
    :func:`pooled_shrink_expand` checks them against an output [T, N]."""
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ShapeError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}")
    _rank("inputs", inputs, 2, "[T, K]")
    _rank("weight", weight, 2, "[N, K]" if weight_layout == "out_in" else "[K, N]")
    _floating("inputs", inputs)
    in_axis = 1 if weight_layout == "out_in" else 0
    _dim("weight", weight, in_axis, inputs.shape[1], "K of inputs")
    _device("weight", weight, inputs)
    if weight_scale is None:
        _same_dtype("weight", weight, "inputs", inputs)
    elif weight.dtype != torch.int8:
        raise ShapeError(f"with weight_scale the weight must be int8, got {weight.dtype}")
    out_dim = weight.shape[1 - in_axis]
    base = inputs.new_zeros(()).expand(inputs.shape[0], out_dim)  # the output's stand-in (no copy)
    pooled_shrink_expand(inputs, a_pool, b_pool, base, lanes, rows, a_scale, b_scale)
    if bias is not None:
        _rank("bias", bias, 1, "[N]")
        _dim("bias", bias, 0, out_dim, "N of weight")
        _same_dtype("bias", bias, "inputs", inputs)
        _device("bias", bias, inputs)
