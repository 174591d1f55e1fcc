"""The BGMV ops: ``torch.ops.xla_lora.bgmv_shrink``, ``bgmv_expand``, ``bgmv_expand_slice``
the fused ``bgmv_shrink_expand``, its rank-true ``pooled_shrink_expand`` (reading adapters from a
rank-row pool through a row table) and that op's expand alone (``pooled_expand``), and
``linear_lora`` (the base layer's matmul and the LoRA in one op), plus ``bgmv_weight_grad``,
the slot weights' gradient their backward uses.

Each op is a functional ``torch.library.custom_op`` (no argument is mutated)
with a fake implementation, so ``torch.compile(backend="openxla")`` sees one
opaque node and never traces into JAX. The functions this module exports
(``bgmv_shrink``, ...) are thin wrappers with the ops' signatures that first
check that every tensor argument is a ``torch.Tensor`` (``ArgumentTypeError``
instead of the dispatcher's own error for, say, a list of indices), then call
``torch.ops.xla_lora.<name>``. Dispatch by device:

- XLA tensors: a JAX function through torch_xla's ``call_jax``, with
  ``backend`` "pallas" (Mosaic on TPU, Pallas interpret mode elsewhere) or
  "xla" (the same grouped algorithm in plain jax ops). "auto" picks Pallas on
  TPU and XLA elsewhere.
- other tensors: the plain-torch reference in :mod:`torch_xla_lora.reference`.

Contracts, with a ``Semantics:`` block each, are in the functions below and in
``docs/ops.md``. Every op but the pooled ones (pools hold adapters that are served, not trained)
is differentiable: the backward formulas, themselves made of these custom ops, are registered in
:mod:`torch_xla_lora.ops._autograd`.
"""

from __future__ import annotations

import functools

import torch

from torch_xla_lora import reference
from torch_xla_lora.ops import _validate

__all__ = [
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "bgmv_shrink_expand",
    "pooled_shrink_expand",
    "pooled_expand",
    "linear_lora",
    "bgmv_weight_grad",
    "batch_metadata",
    "device_generation",
]


@functools.cache
def device_generation() -> str:
    """The tuning-table key of the XLA device: "v4", "v5e", "v5p", "v6e" (TPU) or "cpu" (any non-TPU PJRT device).

    Read from the PJRT device kind ("TPU v5 lite", "TPU v6 lite", ...); TPUs newer than
    the table use its newest entry, see :func:`generation_of_device_kind`.
    """
    import torch_xla.runtime as xr

    if xr.device_type() != "TPU":
        return "cpu"
    import torch_xla.core.xla_model as xm

    return generation_of_device_kind(xm.xla_device_kind())


def generation_of_device_kind(kind: str) -> str:
    """Tuning-table key of a TPU PJRT device kind.

    "TPU v4" -> "v4", "TPU v5 lite" / "TPU v5e" -> "v5e", "TPU v5" / "TPU v5p" -> "v5p",
    "TPU v6 lite" / "TPU v6e" -> "v6e"; a newer chip ("TPU7x", "TPU v7") -> "v6e" (the
    newest entry: 256-wide MXU); an unparsable kind -> "v4" (the smallest VMEM).
    """
    import re

    from torch_xla_lora.kernels import tuning

    match = re.search(r"v?(\d+)\s*([a-z]*)", kind.lower().removeprefix("tpu").strip())
    if not match:
        return "v4"
    version, suffix = int(match.group(1)), match.group(2)
    return tuning.generation_for(version, lite=suffix in ("e", "lite") or "lite" in kind.lower())


def _backend(requested: str) -> tuple[str, str]:
    generation = device_generation()
    if requested == "auto":
        return ("pallas" if generation != "cpu" else "xla"), generation
    return requested, generation


def _call_jax(fn, *args: torch.Tensor) -> torch.Tensor:
    # Imported here, not at module top: JAX must start after torch_xla on a TPU
    # host, and users of CPU tensors never need it (see ops/_jax.py).
    from torch_xla.core import xla_builder

    from torch_xla_lora.kernels import mosaic_version

    # call_jax lowers fn on its first call with these shapes: Mosaic kernels are
    # then written at the IR version the pinned libtpu reads (see mosaic_version).
    with mosaic_version.pinned_ir_version():
        return xla_builder.call_jax(fn, args)


def _jax_module():
    # Imported on first XLA call, for the same reason (ops/_jax.py imports jax).
    from torch_xla_lora.ops import _jax

    return _jax


@torch.library.custom_op("xla_lora::bgmv_shrink", mutates_args=())
def _bgmv_shrink(
    inputs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_indices: torch.Tensor,
    scaling: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``torch.ops.xla_lora.bgmv_shrink``: see :func:`bgmv_shrink`."""
    _validate.shrink(inputs, lora_a, lora_indices)
    _validate.backend(backend)
    _validate.scaling(scaling)
    if inputs.device.type != "xla":
        return reference.bgmv_shrink(inputs, lora_a, lora_indices, scaling)
    if _validate.degenerate(*lora_a.shape):  # L, R or D is 0: nothing to project (kernels need tiles)
        return inputs.new_zeros((inputs.shape[0], lora_a.shape[1]))
    name, generation = _backend(backend)
    return _call_jax(_jax_module().shrink_fn(name, generation, float(scaling)), inputs, lora_a, lora_indices)


@_bgmv_shrink.register_fake
def _(inputs, lora_a, lora_indices, scaling=1.0, backend="auto"):
    _validate.shrink(inputs, lora_a, lora_indices)
    _validate.backend(backend)
    _validate.scaling(scaling)
    return inputs.new_empty((inputs.shape[0], lora_a.shape[1]))


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_indices: torch.Tensor,
    scaling: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Batched gather matrix-vector shrink: project each token by its adapter's A.

    Args:
      inputs: [T, D] floating.
      lora_a: [L, R, D], inputs' dtype: A of every slot.
      lora_indices: [T] int32 (int64 also off XLA): slot of each token; any
        value outside [0, L), e.g. -1, means "no adapter".
      scaling: multiplies the result.
      backend: "auto", "pallas" or "xla" (XLA tensors only).

    Returns:
      [T, R] in inputs' dtype (accumulated in float32).

    Semantics:
      for t in range(T):
          i = lora_indices[t]
          out[t] = scaling * lora_a[i] @ inputs[t] if 0 <= i < L else 0

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor (a list of
        indices, a numpy array).
      ShapeError (a ValueError): wrong rank, shape, dtype or device of an argument.
      ArgumentError (a ValueError): a non-finite ``scaling``.
    """
    _validate.tensor_arguments("bgmv_shrink", inputs=inputs, lora_a=lora_a, lora_indices=lora_indices)
    return torch.ops.xla_lora.bgmv_shrink(inputs, lora_a, lora_indices, scaling, backend)


@torch.library.custom_op("xla_lora::bgmv_expand", mutates_args=())
def _bgmv_expand(
    inputs: torch.Tensor,
    lora_b: torch.Tensor,
    base: torch.Tensor,
    lora_indices: torch.Tensor,
    add_inputs: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``torch.ops.xla_lora.bgmv_expand``: see :func:`bgmv_expand`."""
    _validate.expand(inputs, lora_b, base, lora_indices)
    _validate.expand_full(lora_b, base)
    _validate.backend(backend)
    if inputs.device.type != "xla":
        return reference.bgmv_expand(inputs, lora_b, base, lora_indices, add_inputs)
    if _validate.degenerate(*lora_b.shape):  # L, R or Dout is 0: nothing to add
        return base.clone() if add_inputs else torch.zeros_like(base)
    name, generation = _backend(backend)
    fn = _jax_module().expand_fn(name, generation, bool(add_inputs), None)
    return _call_jax(fn, inputs, lora_b, base, lora_indices)


@_bgmv_expand.register_fake
def _(inputs, lora_b, base, lora_indices, add_inputs=True, backend="auto"):
    _validate.expand(inputs, lora_b, base, lora_indices)
    _validate.expand_full(lora_b, base)
    _validate.backend(backend)
    return torch.empty_like(base)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b: torch.Tensor,
    base: torch.Tensor,
    lora_indices: torch.Tensor,
    add_inputs: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Batched gather matrix-vector expand: add each token's adapter B product to the base.

    Args:
      inputs: [T, R] floating (usually bgmv_shrink's output).
      lora_b: [L, R, Dout], base's dtype: B of every slot, stored rank-first
        (pre-transposed) so a kernel reads contiguous output tiles.
      base: [T, Dout]: the base layer's output.
      lora_indices: [T] int32: slot of each token; outside [0, L) adds nothing.
      add_inputs: add to ``base`` (True) or to zeros (False).
      backend: "auto", "pallas" or "xla" (XLA tensors only).

    Returns:
      [T, Dout] in base's dtype (accumulated in float32).

    Semantics:
      for t in range(T):
          i = lora_indices[t]
          out[t] = (base[t] if add_inputs else 0) + (inputs[t] @ lora_b[i] if 0 <= i < L else 0)

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor (a list of
        indices, a numpy array).
      ShapeError (a ValueError): wrong rank, shape, dtype or device of an argument.
    """
    _validate.tensor_arguments("bgmv_expand", inputs=inputs, lora_b=lora_b, base=base, lora_indices=lora_indices)
    return torch.ops.xla_lora.bgmv_expand(inputs, lora_b, base, lora_indices, add_inputs, backend)


@torch.library.custom_op("xla_lora::bgmv_expand_slice", mutates_args=())
def _bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b: torch.Tensor,
    base: torch.Tensor,
    lora_indices: torch.Tensor,
    slice_offset: int,
    add_inputs: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``torch.ops.xla_lora.bgmv_expand_slice``: see :func:`bgmv_expand_slice`."""
    _validate.expand(inputs, lora_b, base, lora_indices)
    _validate.expand_slice(lora_b, base, slice_offset)
    _validate.backend(backend)
    if inputs.device.type != "xla":
        return reference.bgmv_expand_slice(inputs, lora_b, base, lora_indices, slice_offset, add_inputs)
    if _validate.degenerate(*lora_b.shape):  # L, R or the slice width is 0: nothing to add
        return base.clone() if add_inputs else torch.zeros_like(base)
    name, generation = _backend(backend)
    fn = _jax_module().expand_fn(name, generation, bool(add_inputs), int(slice_offset))
    return _call_jax(fn, inputs, lora_b, base, lora_indices)


@_bgmv_expand_slice.register_fake
def _(inputs, lora_b, base, lora_indices, slice_offset, add_inputs=True, backend="auto"):
    _validate.expand(inputs, lora_b, base, lora_indices)
    _validate.expand_slice(lora_b, base, slice_offset)
    _validate.backend(backend)
    return torch.empty_like(base)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b: torch.Tensor,
    base: torch.Tensor,
    lora_indices: torch.Tensor,
    slice_offset: int,
    add_inputs: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """As :func:`bgmv_expand`, into the columns of one output slice (a part of QKV or gate_up).

    Args:
      inputs: [T, R] floating.
      lora_b: [L, R, S], base's dtype: B of every slot for this slice.
      base: [T, Dout] with slice_offset + S <= Dout.
      lora_indices: [T] int32.
      slice_offset: first output column of the slice.
      add_inputs: add to ``base`` (True) or to zeros (False).
      backend: "auto", "pallas" or "xla" (XLA tensors only).

    Returns:
      [T, Dout] in base's dtype.

    Semantics:
      out = base.clone() if add_inputs else zeros_like(base)
      for t in range(T):
          i = lora_indices[t]
          if 0 <= i < L:
              out[t, slice_offset : slice_offset + S] += inputs[t] @ lora_b[i]

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor (a list of
        indices, a numpy array).
      ShapeError (a ValueError): wrong rank, shape, dtype or device, or a slice outside base.
    """
    _validate.tensor_arguments("bgmv_expand_slice", inputs=inputs, lora_b=lora_b, base=base, lora_indices=lora_indices)
    return torch.ops.xla_lora.bgmv_expand_slice(inputs, lora_b, base, lora_indices, slice_offset, add_inputs, backend)


@torch.library.custom_op("xla_lora::bgmv_shrink_expand", mutates_args=())
def _bgmv_shrink_expand(
    inputs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    base: torch.Tensor,
    lora_indices: torch.Tensor,
    scaling: float = 1.0,
    backend: str = "auto",
    metadata: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.xla_lora.bgmv_shrink_expand``: see :func:`bgmv_shrink_expand`."""
    _validate.shrink_expand(inputs, lora_a, lora_b, base, lora_indices)
    _validate.backend(backend)
    _validate.scaling(scaling)
    _validate.metadata(metadata, inputs.device, inputs, lora_b, base.shape[1])
    if inputs.device.type != "xla":  # the buffers' first D / Dout columns (wider ones are padded)
        lora_a, lora_b = lora_a[:, :, : inputs.shape[1]], lora_b[:, :, : base.shape[1]]
        return reference.bgmv_shrink_expand(inputs, lora_a, lora_b, base, lora_indices, scaling)
    if _validate.degenerate(*lora_a.shape[:2], *inputs.shape[1:], *base.shape[1:]):  # L, R, D or Dout is 0
        return base.clone()
    name, generation = _backend(backend)
    fn = _jax_module().shrink_expand_fn(name, generation, float(scaling), metadata is not None)
    extra = () if metadata is None else (metadata,)
    return _call_jax(fn, inputs, lora_a, lora_b, base, lora_indices, *extra)


@_bgmv_shrink_expand.register_fake
def _(inputs, lora_a, lora_b, base, lora_indices, scaling=1.0, backend="auto", metadata=None):
    _validate.shrink_expand(inputs, lora_a, lora_b, base, lora_indices)
    _validate.backend(backend)
    _validate.scaling(scaling)
    _validate.metadata(metadata, inputs.device, inputs, lora_b, base.shape[1])
    return torch.empty_like(base)


def bgmv_shrink_expand(
    inputs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    base: torch.Tensor,
    lora_indices: torch.Tensor,
    scaling: float = 1.0,
    backend: str = "auto",
    metadata: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused shrink and expand: a whole LoRA layer's update in one op.

    The [T, R] intermediate never leaves the chip on TPU, and ``lora_b`` covers
    every output slice of a fused projection (QKV, gate_up) at once.

    Args:
      inputs: [T, D] floating.
      lora_a: [L, R, D'], inputs' dtype, D' >= D, the columns past D zero. The TPU fused kernel runs
        widths that are not multiples of 128 on buffers padded to whole 128-lane tiles (D' = D rounded
        up to a multiple of 128, as the layers allocate them where it may run); with unpadded buffers
        such widths run the separate shrink and expand kernels.
      lora_b: [L, R, Dout'], base's dtype, rank-first, Dout' >= Dout, the columns past Dout zero: as lora_a.
      base: [T, Dout]: the base layer's output.
      lora_indices: [T] int32: slot of each token; outside [0, L) adds nothing.
      scaling: multiplies the LoRA product.
      backend: "auto", "pallas" or "xla" (XLA tensors only).
      metadata: optional int32 [K]: the batch's token grouping built on the host
        by :func:`batch_metadata` (XLA tensors only); without it the op sorts
        the indices on the device.

    Returns:
      [T, Dout] in base's dtype. The intermediate is rounded to lora_b's dtype
      before the expand, as two separate ops (or PEFT) would.

    Semantics:
      for t in range(T):
          i = lora_indices[t]
          out[t] = base[t] + (scaling * (lora_a[i, :, :D] @ inputs[t])) @ lora_b[i, :, :Dout]   if 0 <= i < L
          out[t] = base[t]                                                 otherwise

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor (a list of
        indices, a numpy array).
      ShapeError (a ValueError): wrong rank, shape, dtype or device of an argument.
      ArgumentError (a ValueError): a non-finite ``scaling``.
    """
    _validate.tensor_arguments(
        "bgmv_shrink_expand",
        optional=("metadata",),
        inputs=inputs,
        lora_a=lora_a,
        lora_b=lora_b,
        base=base,
        lora_indices=lora_indices,
        metadata=metadata,
    )
    return torch.ops.xla_lora.bgmv_shrink_expand(inputs, lora_a, lora_b, base, lora_indices, scaling, backend, metadata)


@torch.library.custom_op("xla_lora::pooled_shrink_expand", mutates_args=())
def _pooled_shrink_expand(
    inputs: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    base: torch.Tensor,
    lanes: torch.Tensor,
    rows: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    scaling: float = 1.0,
    backend: str = "auto",
    metadata: torch.Tensor | None = None,
    pages: torch.Tensor | None = None,
    page_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.xla_lora.pooled_shrink_expand``: see :func:`pooled_shrink_expand`."""
    flat_a, flat_b = _check_pooled(inputs, a_pool, b_pool, base, lanes, rows, a_scale, b_scale, scaling, backend)
    _validate.pooled_metadata(metadata, inputs, rows, flat_b.shape[1])
    _validate.pooled_pages(pages, inputs, rows)
    _validate.pooled_page_scales(page_scales, inputs, a_pool)
    if inputs.device.type != "xla":
        return reference.pooled_shrink_expand(inputs, flat_a, flat_b, base, lanes, rows, a_scale, b_scale, scaling)
    if _validate.degenerate(*rows.shape, inputs.shape[1], flat_b.shape[1]):  # L, R, D or Dout is 0
        return base.clone()
    name, generation = _backend(backend)
    int8 = a_scale is not None
    fn = _jax_module().pooled_shrink_expand_fn(
        name,
        generation,
        float(scaling),
        int8,
        metadata is not None,
        with_pages=pages is not None,
        with_page_scales=page_scales is not None,
    )
    scales = (a_scale, b_scale) if int8 else ()
    extra = tuple(t for t in (metadata, pages, page_scales) if t is not None)
    return _call_jax(fn, inputs, a_pool, b_pool, base, lanes, rows, *scales, *extra)


@_pooled_shrink_expand.register_fake
def _(
    inputs,
    a_pool,
    b_pool,
    base,
    lanes,
    rows,
    a_scale=None,
    b_scale=None,
    scaling=1.0,
    backend="auto",
    metadata=None,
    pages=None,
    page_scales=None,
):
    flat_a, flat_b = _check_pooled(inputs, a_pool, b_pool, base, lanes, rows, a_scale, b_scale, scaling, backend)
    _validate.pooled_metadata(metadata, inputs, rows, flat_b.shape[1])
    _validate.pooled_pages(pages, inputs, rows)
    _validate.pooled_page_scales(page_scales, inputs, a_pool)
    return torch.empty_like(base)


def _check_pooled(inputs, a_pool, b_pool, base, lanes, rows, a_scale, b_scale, scaling, backend):
    """``pooled_shrink_expand``'s checks of its pools, operands, scaling and backend; the pools as [rows, W]."""
    flat_a, flat_b = _validate.flat_pools(a_pool, b_pool)
    _validate.pooled_shrink_expand(inputs, flat_a, flat_b, base, lanes, rows, a_scale, b_scale)
    _validate.backend(backend)
    _validate.scaling(scaling)
    return flat_a, flat_b


def pooled_shrink_expand(
    inputs: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    base: torch.Tensor,
    lanes: torch.Tensor,
    rows: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    scaling: float = 1.0,
    backend: str = "auto",
    metadata: torch.Tensor | None = None,
    pages: torch.Tensor | None = None,
    page_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`bgmv_shrink_expand` reading each adapter from a rank-row pool at its true rank.

    The adapters of a batch are its *lanes*: lane l's rank rows are the pool rows ``rows[l, :r]``, r its
    true rank (the position after the last entry of ``rows[l]`` that is not the zero row P; entries past
    it name the zero row), the layout of ``context.rows`` with a memory budget (see ``torch_xla_lora.pool``).
    Rows past a lane's rank, and rows of lanes no token uses, are neither read nor multiplied: on TPU
    ("pallas") the fused laned kernel DMAs each used lane's rows straight from the pools, an aligned page of
    ``kernels.fused.PAGE_ROWS`` (8) rows at a time (of a tail's page using only the lane's rows), int8 rows
    converted in VMEM. The "xla" backend does the same for a batch of at most
    ``_xla_native.PACKED_MAX_TOKENS`` (64) tokens (a decode step): the used lanes' true-rank rows numbered side
    by side and taken 128 at a time (at most 32 of them: one chunk of 32), one shrink and one expand per chunk;
    for longer batches it runs the slot op's algorithm on the pools, reading for each visit of a token block the
    R table rows of the lane it visits (never all L x R entries). Differentiable in ``inputs`` and ``base``: the
    inputs' gradient is this op on the output's gradient with the pools' roles swapped (both rank-first), the
    base's the output's; the pools and scales are served adapters and take no gradient.

    Args:
      inputs: [T, D] floating: the compute dtype.
      a_pool: [P + 2, D]: A's rank rows (P data rows, then the zero row P and a scratch row), inputs'
        dtype or int8. Or E stacked pools [E, P + 2, D] (an experts layer's, one per expert): ``rows`` and the
        scales then number their rows as if flattened to [E * (P + 2), D], and the zero row is the last
        pool's row P. On the "pallas" backend the kernel reads a stacked pool in place (P + 2 a multiple of
        8, every entry's pages inside one pool), where an int8 pool flattened to a multiple of 32 rows is
        tiled 32 rows deep on a v6e.
      b_pool: [P + 2, Dout] (or [E, P + 2, Dout]), a_pool's dtype: B's rank rows (rank-first).
      base: [T, Dout], inputs' dtype.
      lanes: [T] int32: each token's lane; outside [0, L) adds nothing.
      rows: [L, R] int32: each lane's pool rows. On the "pallas" backend a lane of rank r = 8q + t comes in
        q aligned pages and a tail: for p < q entry ``8p`` is a multiple of 8 and entries ``8p .. 8p + 7``
        are that row and the next seven; entries ``8q .. r - 1`` (t > 0) are contiguous rows from any
        in-page offset o, inside one aligned page (o + t <= 8) or, where q + 2 <= ceil(R / 8), running on
        into the next without crossing a multiple of 128 rows (the pages' other rows may be other lanes'
        or adapters' and are never used for this lane). ``PoolManager`` with ``granule`` 8 allocates so.
      a_scale, b_scale: [P + 2] float32 per-row scales of int8 pools, else None.
      scaling: multiplies the LoRA product.
      backend: "auto", "pallas" or "xla" (XLA tensors only).
      metadata: optional host-built grouping (XLA only): :func:`batch_metadata`'s entry for the slots the
        pool stands for (``rank`` = R, ``num_slots`` = L, the inputs' dtype).
      pages: optional [L * pages(R) + L] int32, the page table of ``rows`` built on the host
        (``pool.page_table``: each lane's page starts, then its true rank; ``context.pages`` with a memory
        budget). Given, the "pallas" kernel reads it and not ``rows``; else it is derived from ``rows`` in
        the graph, which then reads the whole [L, R] table per call. It must describe ``rows``.
      page_scales: optional (int8 pools) [N] float32, ``a_scale * b_scale`` of every row, zero past row
        P + 1, N a multiple of 1024 (``kernels.fused.padded_scale_rows``; a pooled layer keeps it beside its
        pool); for stacked pools E times ``padded_scale_rows(P + 2, E)``, pool e's row r at
        ``kernels.pages.scale_index(e, r, N / E, scale_group(E))`` (G pools' blocks of 1024 / G rows to a
        tile, ``kernels.pages.page_scales_of``; an experts layer keeps one per projection). Given, the
        "pallas" kernel reads of it only the 4 KiB tiles of the used pages, each once for a chunk of lanes
        (or the whole array where that is fewer tiles) and neither ``a_scale`` nor ``b_scale``; else it is
        computed in the graph from both. It must equal their product.

    Returns:
      [T, Dout] in base's dtype (accumulated in float32).

    Semantics:
      for t in range(T):
          l = lanes[t]
          if 0 <= l < L and rank(l) > 0:
              r = rows[l, :rank(l)]
              s = scaling * (a_pool[r] @ inputs[t])                 (float32)
              if int8: s *= a_scale[r] * b_scale[r]                 (per rank channel, exact per row)
              out[t] = base[t] + s.to(inputs.dtype) @ b_pool[r]
          else:
              out[t] = base[t]

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor.
      ShapeError (a ValueError): wrong rank, shape, dtype or device of an argument, scales missing for
        int8 pools or given for float ones.
      ArgumentError (a ValueError): a non-finite ``scaling``.
    """
    _validate.tensor_arguments(
        "pooled_shrink_expand",
        optional=("a_scale", "b_scale", "metadata", "pages", "page_scales"),
        inputs=inputs,
        a_pool=a_pool,
        b_pool=b_pool,
        base=base,
        lanes=lanes,
        rows=rows,
        a_scale=a_scale,
        b_scale=b_scale,
        metadata=metadata,
        pages=pages,
        page_scales=page_scales,
    )
    return torch.ops.xla_lora.pooled_shrink_expand(
        inputs, a_pool, b_pool, base, lanes, rows, a_scale, b_scale, scaling, backend, metadata, pages, page_scales
    )


@torch.library.custom_op("xla_lora::pooled_expand", mutates_args=())
def _pooled_expand(
    inputs: torch.Tensor,
    b_pool: torch.Tensor,
    base: torch.Tensor,
    lanes: torch.Tensor,
    rows: torch.Tensor,
    b_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``torch.ops.xla_lora.pooled_expand``: see :func:`pooled_expand`."""
    _validate.pooled_expand(inputs, b_pool, base, lanes, rows, b_scale)
    _validate.backend(backend)
    if inputs.device.type != "xla":
        return reference.pooled_expand(inputs, b_pool, base, lanes, rows, b_scale)
    if _validate.degenerate(*rows.shape, base.shape[1]):  # L, R or Dout is 0
        return base.clone()
    name, generation = _backend(backend)
    fn = _jax_module().pooled_expand_fn(name, generation, b_scale is not None)
    return _call_jax(fn, inputs, b_pool, base, lanes, rows, *(() if b_scale is None else (b_scale,)))


@_pooled_expand.register_fake
def _(inputs, b_pool, base, lanes, rows, b_scale=None, backend="auto"):
    _validate.pooled_expand(inputs, b_pool, base, lanes, rows, b_scale)
    _validate.backend(backend)
    return torch.empty_like(base)


def pooled_expand(
    inputs: torch.Tensor,
    b_pool: torch.Tensor,
    base: torch.Tensor,
    lanes: torch.Tensor,
    rows: torch.Tensor,
    b_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`bgmv_expand` (adding into ``base``) reading each adapter's B from a rank-row pool at its true rank.

    The expand of :func:`pooled_shrink_expand` alone, for layers that form each token's rank rows ``s``
    themselves (the embedding: its A row per token, read from its own pool). A batch of at most
    ``_xla_native.PACKED_MAX_TOKENS`` (64) tokens, on every backend, reads only the used lanes' true-rank rows of
    ``b_pool``, packed side by side 128 at a time (one chunk of 32 for at most 32 rows), each row once for all
    the tokens; a longer batch, on "pallas", runs the pooled kernel's expand (``kernels.fused.pooled_expand``:
    each lane's true-rank pages of B through the page table, Mosaic-compiled on TPU; every lane's rows gathered
    into slots for the slot kernel only where Dout is not a multiple of 128), on "xla" the slot expand's
    algorithm on the pool (the tiles of the lanes its token blocks visit). Differentiable in ``base`` (the
    output's gradient) and ``inputs`` (the slot shrink of the gradient by the lanes' B rows, gathered into
    slots: asked for only where the rank values carry a gradient); the pool is served, not trained.

    Args:
      inputs: [T, R] floating: each token's values of its lane's rank rows (entries past the lane's true rank
        are ignored).
      b_pool: [P + 2, Dout], inputs' dtype or int8: B's rank rows (rank-first), row P the zero row.
      base: [T, Dout], inputs' dtype.
      lanes: [T] int32: each token's lane; outside [0, L) adds nothing.
      rows: [L, R] int32: each lane's pool rows, as :func:`pooled_shrink_expand`'s.
      b_scale: [P + 2] float32 per-row scales of an int8 pool, else None.
      backend: "auto", "pallas" or "xla" (XLA tensors only).

    Returns:
      [T, Dout] in base's dtype (accumulated in float32).

    Semantics:
      for t in range(T):
          l = lanes[t]
          if 0 <= l < L and rank(l) > 0:
              r = rows[l, :rank(l)]
              s = inputs[t, :rank(l)]                               (float32)
              if int8: s = (s * b_scale[r]).to(inputs.dtype)         (per rank channel, exact per row)
              out[t] = base[t] + s @ b_pool[r]
          else:
              out[t] = base[t]

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor.
      ShapeError (a ValueError): wrong rank, shape, dtype or device of an argument, a scale missing for an int8
        pool or given for a float one.
    """
    _validate.tensor_arguments(
        "pooled_expand",
        optional=("b_scale",),
        inputs=inputs,
        b_pool=b_pool,
        base=base,
        lanes=lanes,
        rows=rows,
        b_scale=b_scale,
    )
    return torch.ops.xla_lora.pooled_expand(inputs, b_pool, base, lanes, rows, b_scale, backend)


@torch.library.custom_op("xla_lora::linear_lora", mutates_args=())
def _linear_lora(
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
) -> torch.Tensor:
    """``torch.ops.xla_lora.linear_lora``: see :func:`linear_lora`."""
    _validate.linear_lora_call(
        inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout, backend, metadata
    )
    if inputs.device.type != "xla":
        return reference.linear_lora(inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout)
    from torch_xla_lora.ops import _linear

    args = (inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout, backend, metadata, own_metadata)
    return _run_linear(_linear.linear_lora_fn, *args)


def _run_linear(
    factory, inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout, backend, metadata, own_metadata
):
    """Run the JAX function ``factory`` (``_linear.linear_lora_fn`` or ``linear_lora_train_fn``) builds for a
    ``linear_lora`` call on XLA tensors, through ``call_jax``."""
    name, generation = _backend(backend)
    with_metadata = metadata is not None
    fn = factory(
        name, generation, float(scaling), weight_layout, bias is not None, with_metadata, with_metadata and own_metadata
    )
    args = (inputs, weight) + ((bias,) if bias is not None else ()) + (lora_a, lora_b, lora_indices)
    return _call_jax(fn, *args, *(() if metadata is None else (metadata,)))


@_linear_lora.register_fake
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
    return inputs.new_empty((inputs.shape[0], lora_b.shape[2]))


def linear_lora(
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
) -> torch.Tensor:
    """A linear layer and its multi-LoRA update in one op: x read once, the output written once.

    On TPU ("pallas") one kernel tiles the base matmul and accumulates the
    LoRA shrink while x's tiles are in VMEM, adding the expand and the bias to
    each output tile before its single write (``kernels/fused_base.py``).

    Args:
      inputs: [T, K] floating.
      weight: the base weight in its own layout, inputs' dtype: [N, K] for
        ``weight_layout="out_in"`` (nn.Linear) or [K, N] for "in_out" (GPT-2's Conv1D).
      bias: [N] or None.
      lora_a: [L, R, K], lora_b: [L, R, N] (rank-first), inputs' dtype.
      lora_indices: [T] int32: slot of each token; outside [0, L) adds nothing.
      scaling: multiplies the LoRA product.
      weight_layout: "out_in" or "in_out".
      backend: "auto", "pallas" or "xla" (XLA tensors only).
      metadata: optional host-built grouping from :func:`batch_metadata` (XLA only):
        its ``(in, out)`` entry, used when its plan matches this op's (else the op
        groups on the device), or, with ``own_metadata``, its ``(in, out, "linear",
        has_bias)`` entry, built for this op's own plan.
      own_metadata: ``metadata`` is a ``"linear"`` entry of :func:`batch_metadata`.

    Returns:
      [T, N] in inputs' dtype, accumulated in float32 and rounded once.

    Semantics:
      for t in range(T):
          i = lora_indices[t]
          out[t] = inputs[t] @ W^T + bias                                  (W as [N, K])
          if 0 <= i < L:
              out[t] += (scaling * (lora_a[i] @ inputs[t])) @ lora_b[i]    (intermediate in lora_b's dtype)

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor (a list of
        indices, a numpy array).
      ShapeError (a ValueError): wrong rank, shape, dtype or device of an argument, or an unknown layout.
      ArgumentError (a ValueError): a non-finite ``scaling``.
    """
    _validate.tensor_arguments(
        "linear_lora",
        optional=("bias", "metadata"),
        inputs=inputs,
        weight=weight,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_indices=lora_indices,
        bias=bias,
        metadata=metadata,
    )
    return torch.ops.xla_lora.linear_lora(
        inputs, weight, bias, lora_a, lora_b, lora_indices, scaling, weight_layout, backend, metadata, own_metadata
    )


@torch.library.custom_op("xla_lora::bgmv_weight_grad", mutates_args=())
def _bgmv_weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    lora_indices: torch.Tensor,
    num_slots: int,
    scaling: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``torch.ops.xla_lora.bgmv_weight_grad``: see :func:`bgmv_weight_grad`."""
    _validate.weight_grad(left, right, lora_indices, num_slots)
    _validate.scaling(scaling)
    _validate.backend(backend)
    if left.device.type != "xla":
        return reference.bgmv_weight_grad(left, right, lora_indices, num_slots, scaling)
    if _validate.degenerate(num_slots, left.shape[0], left.shape[1], right.shape[1]):
        return right.new_zeros((num_slots, left.shape[1], right.shape[1]))
    resolved, generation = _backend(backend)
    fn = _jax_module().weight_grad_fn(int(num_slots), float(scaling), resolved, generation)
    return _call_jax(fn, left, right, lora_indices)


@_bgmv_weight_grad.register_fake
def _(left, right, lora_indices, num_slots, scaling=1.0, backend="auto"):
    _validate.weight_grad(left, right, lora_indices, num_slots)
    _validate.scaling(scaling)
    _validate.backend(backend)
    return right.new_empty((num_slots, left.shape[1], right.shape[1]))


def bgmv_weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    lora_indices: torch.Tensor,
    num_slots: int,
    scaling: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Gradient of stacked slot weights: each slot's sum of its tokens' outer products.

    The weight gradient of every op's ``lora_a`` (``left`` = the rank-sized
    gradient, ``right`` = the inputs) and ``lora_b`` (``left`` = the rank-sized
    intermediate, ``right`` = the output gradient).

    Args:
      left: [T, P] floating.
      right: [T, Q] floating, on left's device.
      lora_indices: [T] int32 (int64 also off XLA): slot of each token; a value
        outside [0, num_slots), e.g. -1, contributes nothing.
      num_slots: L, the number of slots of the result.
      scaling: multiplies the result.
      backend: on XLA tensors, "pallas" (the slot-major Pallas kernel,
        ``kernels/weight_grad.py``: Mosaic on TPU, interpret mode elsewhere),
        "xla" (the XLA-native segmented outer product, ``ops/_xla_native.py``)
        or "auto" (Pallas on TPU, XLA-native elsewhere).

    Returns:
      [L, P, Q] in right's dtype, accumulated in float32 (float64 for float64
      tensors off XLA).

    Semantics:
      out = zeros(L, P, Q)
      for t in range(T):
          i = lora_indices[t]
          if 0 <= i < L:
              out[i] += scaling * outer(left[t], right[t])

    A slot no token uses is exactly zero, whatever the values of the tokens
    that use no slot.

    Raises:
      ArgumentTypeError (a TypeError): a tensor argument that is not a torch.Tensor (a list of
        indices, a numpy array).
      ShapeError (a ValueError): wrong rank, shape, dtype or device of an argument.
      ArgumentError (a ValueError): a non-finite ``scaling``.
    """
    _validate.tensor_arguments("bgmv_weight_grad", left=left, right=right, lora_indices=lora_indices)
    return torch.ops.xla_lora.bgmv_weight_grad(left, right, lora_indices, num_slots, scaling, backend)


def batch_metadata(
    slots: torch.Tensor, layer_shapes, rank: int, num_slots: int, dtype: torch.dtype, linear_shapes=()
) -> dict[tuple, torch.Tensor]:
    """Host-built grouping of one batch for :func:`bgmv_shrink_expand`, per layer shape (CPU int32 tensors).

    Built once per batch and shared by every layer with the same plan: the
    device then skips the per-layer sort of the indices.

    Args:
      slots: [N] int32 (CPU): each token's slot, -1 = none.
      layer_shapes: (in_features, out_features) of the layers that run the fused op.
      rank, num_slots, dtype: of the layers' buffers (``lora_b.shape[1:]`` and dtype).
      linear_shapes: (in_features, out_features, has_bias) of layers that run
        :func:`linear_lora` on the Pallas backend (each also in ``layer_shapes``).
        The result then also has ``(in_features, out_features, "linear", has_bias)``
        entries, for ``linear_lora(..., own_metadata=True)``: the kernel's own
        grouping where it plans another token block or lane count than the fused
        op (prefill on TPU), else the ``(in, out)`` entry's tensor.
    """
    generation = device_generation()
    dtype_name = str(dtype).removeprefix("torch.")
    numpy_slots = slots.cpu().numpy()
    arrays = _jax_module().batch_metadata(numpy_slots, layer_shapes, rank, num_slots, dtype_name, generation)
    if linear_shapes:
        from torch_xla_lora.ops import _linear

        own = _linear.linear_batch_metadata(numpy_slots, linear_shapes, rank, num_slots, dtype_name, generation)
        for hidden, out, bias in linear_shapes:
            array = own.get((hidden, out, bias), arrays.get((hidden, out)))
            if array is not None:
                arrays[(hidden, out, "linear", bias)] = array
    shared: dict[int, torch.Tensor] = {}  # one tensor per distinct plan, shared by its layers
    return {shape: shared.setdefault(id(array), torch.from_numpy(array)) for shape, array in arrays.items()}


# Registers every op's backward (imported last: it refers to the ops above).
from torch_xla_lora.ops import _autograd, _grouped  # noqa: E402, F401
