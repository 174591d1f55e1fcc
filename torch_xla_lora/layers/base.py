"""The interface every LoRA layer implements, and the slot buffers they share.

A layer wraps its base module, keeps ``max_loras`` adapter slots in stacked
device buffers (A rank-padded to ``max_rank``, B stored rank-first), and adds
the LoRA product of each token's slot to the base output. Only the adapter
manager writes slots (:meth:`set_adapter`, :meth:`reset_adapter`); the
forward only reads them and the shared :class:`BatchContext`.

Slot writes are ``index_copy_`` with the slot as a device tensor: the same
fixed-shape graph for every slot and every adapter, so loading an adapter
after the first compiles nothing new.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from torch_xla_lora import pool
from torch_xla_lora.adapters import ModuleLoRA
from torch_xla_lora.context import BatchContext
from torch_xla_lora.errors import InvalidAdapterError, RankTooLargeError

if TYPE_CHECKING:
    from torch_xla_lora.training import TrainableModule


class BaseLayerWithLoRA(nn.Module):
    """Base LoRA layer: ``y = base(x) + B[slot] A[slot] x`` per token (scaling folded into B).

    Subclasses define ``in_features``, ``out_features``, ``can_replace`` and
    ``forward``; the buffers are ``lora_a`` [L, R, in] and ``lora_b`` [L, R, out] (in and out rounded up
    to whole 128-lane tiles where :attr:`lane_padded`).
    """

    in_features: int
    out_features: int
    #: Placement on an SPMD mesh (a ``sharding.LayerSharding``, set by ``patch_model(mesh=...)``),
    #: whose ``forward(layer, x)`` runs the layer per shard; None on one device.
    tensor_parallel = None
    #: With a memory budget, the rows an adapter's pool allocation is rounded to (set by the ``PoolManager``):
    #: the pooled Pallas kernel needs whole aligned pages of ``pool.KERNEL_PAGE_ROWS``.
    pool_page_rows = 1
    #: With a memory budget, :meth:`factor_pairs` suffix -> this layer's row of the batch's per-module lane ranks
    #: (``context.module_ranks``, set by the ``PoolManager``).
    rank_rows: dict[str, int] = {}
    #: Whether this layer kind may store its slot buffers lane-padded (see :meth:`_pads_lanes`): layers whose
    #: forward reads the slots only through the fused shrink-expand op, which takes buffers wider than the layer.
    lane_padding = False

    def __init__(
        self,
        base_layer: nn.Module,
        context: BatchContext,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        backend: str = "auto",
        *,
        allocate: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.max_loras, self.max_rank = max_loras, max_rank
        self.backend = backend
        #: The adapters' compute dtype and device (the slot buffers', or the pool's once dequantised).
        self.adapter_dtype, self.adapter_device = dtype, _device_of(base_layer)
        #: Rank-true storage (see torch_xla_lora.pool): data rows of this layer's pools, None with padded slots.
        self.pool_rows: int | None = None
        #: Slot -> the trainable adapter's factors that the forward reads in place of the slot (see training.py).
        self.trainable: dict[int, TrainableModule] = {}
        #: Whether the slot buffers' widths are padded with zeros to whole 128-lane tiles (:meth:`_pads_lanes`).
        self.lane_padded = False
        if allocate:  # padded slots; patch_model allocates pools instead when there is a memory budget
            self.lane_padded = self._pads_lanes()
            self._allocate_slots()

    def _allocate_slots(self) -> None:
        """Zero slot buffers of :meth:`slot_shapes` (not persistent: adapters are not part of the state_dict)."""
        for name, shape in self.slot_shapes().items():
            self.register_buffer(name, torch.zeros(shape, dtype=self.adapter_dtype, device=self.adapter_device), False)

    def _pads_lanes(self) -> bool:
        """Whether this layer stores its slot buffers lane-padded: a layer kind that allows it
        (:attr:`lane_padding`), on an XLA device, where the TPU fused kernel may run: backend "pallas"
        (interpret mode on the CPU device), or "auto" on a TPU; not under SPMD (a mesh's per-shard paths
        read the layer's exact widths). The kernel DMAs whole adapter rows, which Mosaic slices only at
        widths of whole 128-lane tiles; with the rows padded in place it runs any layer width without
        copying the buffers per call (``ops.bgmv_shrink_expand``)."""
        if not self.lane_padding or self.adapter_device.type != "xla":
            return False
        import torch_xla.runtime as xr

        if xr.is_spmd():
            return False
        if self.backend == "pallas":
            return True
        if self.backend != "auto":
            return False
        from torch_xla_lora import ops

        return ops.device_generation() != "cpu"

    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each slot buffer as allocated: :meth:`_buffer_shapes`, the last (width) dimension
        rounded up to whole 128-lane tiles where :attr:`lane_padded` (the factors fill its leading columns)."""
        shapes = self._buffer_shapes()
        if not self.lane_padded:
            return shapes
        return {name: (*shape[:-1], lane_width(shape[-1])) for name, shape in shapes.items()}

    def _buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each slot buffer: ``lora_a`` [L, *a slot] and ``lora_b`` [L, R, out]."""
        b_shape = (self.max_loras, self.max_rank, self.out_features)
        return {"lora_a": (self.max_loras, *self._a_slot_shape()), "lora_b": b_shape}

    def _a_slot_shape(self) -> tuple[int, int]:
        """Shape of one slot of ``lora_a``: [R, in] (rank-major)."""
        return self.max_rank, self.in_features

    @property
    def adapter_shapes(self) -> tuple[int, int] | dict[str, tuple[int, int, int]]:
        """What an adapter's factors for this layer are checked against (``adapters.check_adapter``):
        (in, out), or an experts layer's per-parameter ``factor_shapes``."""
        return getattr(self, "factor_shapes", (self.in_features, self.out_features))

    def _rank_axes(self) -> dict[str, int]:
        """Buffer name -> the rank axis within one slot of it (after the slot axis)."""
        return {"lora_a": 0, "lora_b": 0}

    # -- rank-true storage (torch_xla_lora.pool) --------------------------------------------------------

    def pool_row_bytes(self, int8: bool) -> int:
        """Device bytes of one rank row of this layer's pools (buffers in the adapter dtype, or int8 + scales)."""
        itemsize = torch.empty((), dtype=self.adapter_dtype).element_size()
        return pool.layer_row_bytes(
            self._buffer_shapes(), self._rank_axes(), self.max_loras, self.max_rank, itemsize, int8
        )

    def allocate_pool(self, rows: int, int8: bool) -> None:
        """Keep ``rows`` rank rows per buffer (``<name>_pool``, int8 with ``<name>_scale`` if ``int8``) in place
        of the padded slots; the forward gathers the batch's lanes from them (:func:`pool.gather_slots`), or
        reads them with the pooled kernel, an int8 pool's row scales then from its page-scale arrays
        (``lora_page_scale``, an experts layer's ``lora_page_scale_down`` too: ``a_scale * b_scale`` of each
        row, each entry's whole tiles, :func:`pool.page_scale_rows`)."""
        self.pool_rows = rows
        for name, shape in self._buffer_shapes().items():
            shape = pool.pool_shape(shape, self.max_loras, self._rank_axes()[name], rows)
            dtype = torch.int8 if int8 else self.adapter_dtype
            self.register_buffer(f"{name}_pool", torch.zeros(shape, dtype=dtype, device=self.adapter_device), False)
            if int8:
                scale = torch.zeros(shape[0], rows + pool.SPARE_ROWS, dtype=torch.float32, device=self.adapter_device)
                self.register_buffer(f"{name}_scale", scale, False)
        for name, (_, _, entries) in self._page_scale_pairs(int8).items():
            length = entries * pool.page_scale_rows(rows, entries)
            self.register_buffer(name, torch.zeros(length, dtype=torch.float32, device=self.adapter_device), False)

    def _page_scale_pairs(self, int8: bool) -> dict[str, tuple[str, str, int]]:
        """An int8 pool's page-scale arrays: name -> (A buffer, B buffer, entries), one per
        :meth:`factor_pairs` pair."""
        return {f"lora_page_scale{s}": pair for s, pair in self.factor_pairs().items()} if int8 else {}

    def factor_pairs(self) -> dict[str, tuple[str, str, int]]:
        """The pairs of factors the pooled ops read at true rank: suffix -> (A, B, entries)
        (:func:`pool.factor_pairs`)."""
        return pool.factor_pairs(self._buffer_shapes(), self._rank_axes(), self.max_loras)

    def pair_ranks(self, weights: ModuleLoRA | None) -> dict[str, int]:
        """suffix -> the rank one adapter's factors for this module (``weights``; None: the module is not
        targeted, 0) have in each :meth:`factor_pairs` pair: what the pooled reads cut each lane to."""
        return dict.fromkeys(self.factor_pairs(), 0 if weights is None else weights.rank)

    def _pool_tables(self, suffix: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(row table [L, R], page table or None) of the batch as this layer's pair ``suffix`` reads it: each lane
        cut to the rank its adapter has in this module (``context.module_ranks``, row :attr:`rank_rows`
        [suffix]; the entries past it name the zero row, and the page table carries the cut ranks), so rows an
        adapter holds only for its other modules (a larger rank elsewhere, or modules it does not target) are
        neither read nor multiplied here."""
        rows, pages = self.context.rows.reshape(self.max_loras, -1), self.context.pages
        ranks, row = self.context.module_ranks, self.rank_rows.get(suffix)
        if ranks is None or row is None:
            return rows, pages
        lane_ranks = ranks[row]  # [L] int32
        position = torch.arange(rows.shape[1], dtype=torch.int32, device=rows.device)
        rows = torch.where(position[None, :] < lane_ranks[:, None], rows, self.pool_rows)
        if pages is not None:
            pages = torch.cat([pages[: -self.max_loras], lane_ranks])
        return rows, pages

    def pool_bytes(self, rows: int, int8: bool) -> int:
        """Device bytes :meth:`allocate_pool` allocates for ``rows`` data rows: the rows (and the spare rows) at
        :meth:`pool_row_bytes`, plus the page-scale arrays' padding to whole tiles."""
        total = (rows + pool.SPARE_ROWS) * self.pool_row_bytes(int8)
        for _, _, entries in self._page_scale_pairs(int8).values():
            total += pool.SCALE_BYTES * entries * (pool.page_scale_rows(rows, entries) - rows - pool.SPARE_ROWS)
        return total

    def slot_buffers(self, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Name -> the slot buffer a forward reads (``names``, default all): the padded buffer, or the current
        batch's lanes gathered from the pool (``context.rows``; int8 rows dequantised)."""
        names = names or tuple(self._buffer_shapes())
        if self.pool_rows is None:
            return {name: getattr(self, name) for name in names}
        if self.tensor_parallel is not None:  # on a mesh each shard gathers its slice (see sharding.py)
            return self.tensor_parallel.slot_buffers(self, names)
        rows, axes = self.context.rows, self._rank_axes()
        return {
            name: pool.gather_slots(
                getattr(self, f"{name}_pool"),
                getattr(self, f"{name}_scale", None),
                rows,
                axes[name],
                self.max_loras,
                self.adapter_dtype,
            )
            for name in names
        }

    def write_rows(self, index: torch.Tensor, weights: ModuleLoRA | None) -> None:
        """Write one adapter's factors (None: zeros) into pool rows ``index`` [max_rank] (host int64)."""
        device = self.adapter_device
        index = index.to(device)
        row_scales = {}
        with torch.no_grad():
            for name, values in self._slot_arrays(weights).items():
                target, axis = getattr(self, f"{name}_pool"), 1 + self._rank_axes()[name]
                scale = getattr(self, f"{name}_scale", None)
                if scale is not None:
                    values, row_scales[name] = pool.quantize_rows(values, axis - 1)
                    scale.index_copy_(1, index, row_scales[name].to(device))
                target.index_copy_(axis, index, values.to(device))
            for name, (name_a, name_b, entries) in self._page_scale_pairs(bool(row_scales)).items():
                # The product the pooled kernel reads, exact as the kernel would form it; each entry's block.
                product = (row_scales[name_a] * row_scales[name_b]).to(device)  # [entries, rows written]
                entry = torch.arange(entries, device=index.device)[:, None]
                at = pool.page_scale_index(entry, index[None, :], self.pool_rows, entries)
                getattr(self, name).index_copy_(0, at.reshape(-1), product.reshape(-1))

    def _slot_arrays(self, weights: ModuleLoRA | None) -> dict[str, torch.Tensor]:
        """Name -> one slot of each buffer, ``[k, *slot]`` host tensors (zeros for None), padded to max_rank."""
        if weights is None:
            shapes = self._buffer_shapes()
            return {name: torch.zeros(shapes[name][1:], dtype=self.adapter_dtype)[None] for name in shapes}
        a, b = self._padded(weights)
        return {"lora_a": a[None], "lora_b": b[None]}

    def add_lora(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        slots: torch.Tensor,
        metadata: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """y [..., out] + each token's LoRA of x [..., in], in y's dtype (one fused op, see :func:`fused_lora`),
        with ``backend`` (default: the layer's)."""
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        backend = backend or self.backend
        if self._reads_pool(x2, backend, y2, differentiable=True):
            return self._pooled_lora(x2, y2, slots, backend, metadata).reshape(y.shape)
        lora_a, lora_b = self.slot_factors()
        return fused_lora(x2, y2, lora_a, lora_b, slots, backend, metadata).reshape(y.shape)

    def _reads_pool(
        self, x: torch.Tensor, backend: str, *operands: torch.Tensor | None, differentiable: bool = False
    ) -> bool:
        """Whether the layer reads the adapters straight from the pools (``pooled_shrink_expand``, or with
        ``base_fusion`` ``linear_lora_pooled``: each lane at its true rank) instead of gathering the lanes into
        slots: a pooled layer of one entry per slot (A [1, P + 2, in], B [1, P + 2, out]) without trainable
        adapters, and where the Pallas kernel runs, a pool allocated in its aligned pages. ``differentiable``:
        the call runs a pooled op whose backward covers it (``pooled_shrink_expand``; ``linear_lora_pooled`` for
        a plain layer), so it may while autograd records gradients; otherwise (the mesh's regions: no backward)
        never while autograd records a gradient for ``x``, the op's other ``operands`` or the base layer's
        parameters (unfrozen)."""
        if not self._serves_pool(x, *operands, differentiable=differentiable):
            return False
        if set(self._buffer_shapes()) != {"lora_a", "lora_b"}:
            return False
        if self.lora_a_pool.shape[0] != 1 or self._rank_axes() != {"lora_a": 0, "lora_b": 0}:
            return False
        return self.pool_page_rows % pool.KERNEL_PAGE_ROWS == 0 or not kernel_runs(x, backend)

    def _serves_pool(self, x: torch.Tensor, *operands: torch.Tensor | None, differentiable: bool = False) -> bool:
        """A pooled layer without trainable adapters where a pooled op may run: ``differentiable`` (an op whose
        backward reaches the call's inputs, base output and, if unfrozen, the base's parameters) whatever autograd
        records, else autograd recording no gradient for ``x``, the other ``operands`` or the base's parameters."""
        if self.pool_rows is None or self.trainable:
            return False
        return differentiable or not needs_grad(x, *operands, *self.base_layer.parameters())

    def _pooled_lora(
        self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, backend: str, metadata: torch.Tensor | None
    ) -> torch.Tensor:
        """y [N, out] + each token's LoRA of x [N, in] read from the pools by ``pooled_shrink_expand``, in y's dtype."""
        dtype = self.adapter_dtype
        a_scale, b_scale = (getattr(self, f"{name}_scale", None) for name in ("lora_a", "lora_b"))
        rows, pages = self._pool_tables()  # each lane at its adapter's rank in this module
        out = torch.ops.xla_lora.pooled_shrink_expand(
            x.to(dtype),
            self.lora_a_pool[0],
            self.lora_b_pool[0],
            y.to(dtype),
            slots,
            rows,
            None if a_scale is None else a_scale[0],
            None if b_scale is None else b_scale[0],
            1.0,
            backend,
            metadata,
            pages,  # the host-built page table: the kernel reads it, not the row table
            getattr(self, "lora_page_scale", None),  # int8: the kernel reads its used pages' tiles, not the scales
        )
        return out.to(y.dtype)

    def slot_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot tensors a forward reads: ``lora_a`` and ``lora_b`` as the slots hold them.

        Trainable adapters (see :mod:`torch_xla_lora.training`) replace their slots' rows by their
        parameters here, in the graph, so that gradients reach the parameters.
        """
        buffers = self.slot_buffers()
        lora_a, lora_b = buffers["lora_a"], buffers["lora_b"]
        if not self.trainable:
            return lora_a, lora_b
        slots = sorted(self.trainable)
        rows = [self.trainable[slot].slot_rows(self.max_rank, self.adapter_dtype) for slot in slots]
        index = torch.tensor(slots, dtype=torch.long, device=self.adapter_device)
        a_rows = to_width(torch.stack([a for a, _ in rows]), lora_a.shape[-1])  # lane-padded slots: zero columns
        b_rows = to_width(torch.stack([b for _, b in rows]), lora_b.shape[-1])
        if len(slots) == lora_a.shape[0]:  # every slot trainable: the stacked rows are the slots (no scatter)
            return a_rows, b_rows
        lora_a, lora_b = lora_a.index_put((index,), a_rows), lora_b.index_put((index,), b_rows)
        return lora_a, lora_b

    def factors_need_grad(self) -> bool:
        """Whether both tensors :meth:`slot_factors` would give now need gradients (grad mode on, a trainable
        adapter's A and one's B requiring them), known without building them."""
        modules = self.trainable.values()
        return (
            torch.is_grad_enabled()
            and any(m.a.requires_grad for m in modules)
            and any(m.b.requires_grad for m in modules)
        )

    def lora_input(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [..., in] as the LoRA product reads it: in training mode (``model.train()``), the rows of each
        trainable adapter with a ``lora_dropout`` go through that dropout, as PEFT drops the input of
        ``lora_A``; the base product always reads x itself. Returns x when nothing drops."""
        rates = {slot: m.dropout for slot, m in self.trainable.items() if m.dropout > 0}
        if not self.training or not rates:
            return x
        table = torch.zeros(self.max_loras + 1, dtype=torch.float32)  # slot + 1 -> rate (-1: base rows)
        for slot, rate in rates.items():
            table[slot + 1] = rate
        x2 = x.reshape(-1, x.shape[-1])
        rate = table.to(x.device)[(slots + 1).long()][:, None]  # [N, 1]
        keep = torch.rand(x2.shape, dtype=torch.float32, device=x.device) >= rate
        dropped = torch.where(keep, x2 / (1 - rate).to(x2.dtype), torch.zeros((), dtype=x2.dtype, device=x.device))
        return dropped.reshape(x.shape)

    @classmethod
    def can_replace(cls, module: nn.Module) -> bool:
        """Whether this layer kind can wrap ``module``."""
        raise NotImplementedError

    def set_adapter(self, slot: int, weights: ModuleLoRA) -> None:
        """Write one adapter's factors (host tensors, scaling folded into B) into ``slot``."""
        a, b = self._padded(weights)
        self._write(slot, a, b)

    def reset_adapter(self, slot: int) -> None:
        """Zero ``slot``: tokens using it get exactly the base output from this layer."""
        a = torch.zeros(self.lora_a.shape[1:], dtype=self.lora_a.dtype)
        b = torch.zeros(self.lora_b.shape[1:], dtype=self.lora_b.dtype)
        self._write(slot, a, b)

    def _padded(self, weights: ModuleLoRA) -> tuple[torch.Tensor, torch.Tensor]:
        """A [R, in] and rank-first B [R, out], zero-padded to max_rank, in the buffers' dtype."""
        rank = weights.a.shape[0]
        if rank > self.max_rank:
            raise RankTooLargeError(f"rank {rank} exceeds max_rank {self.max_rank}")
        expected = ((rank, self.in_features), (self.out_features, rank))
        if (tuple(weights.a.shape), tuple(weights.b.shape)) != expected:
            raise InvalidAdapterError(
                f"factors of shapes {tuple(weights.a.shape)}, {tuple(weights.b.shape)}; expected {expected}"
            )
        a = torch.zeros(self.max_rank, self.in_features, dtype=self.adapter_dtype)
        b = torch.zeros(self.max_rank, self.out_features, dtype=self.adapter_dtype)
        a[:rank] = weights.a
        b[:rank] = weights.b.T
        return a, b

    def _write(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        device = self.lora_a.device
        index = torch.tensor([slot], dtype=torch.int64, device=device)
        a, b = to_width(a, self.lora_a.shape[-1]), to_width(b, self.lora_b.shape[-1])  # lane-padded: zero columns
        with torch.no_grad():
            self.lora_a.index_copy_(0, index, a[None].to(device))
            self.lora_b.index_copy_(0, index, b[None].to(device))


def lane_width(width: int) -> int:
    """``width`` rounded up to whole 128-lane tiles: a lane-padded slot buffer's width."""
    return -(-width // 128) * 128


def to_width(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` [..., w] with zero columns appended up to ``width`` (itself when w == width)."""
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def fused_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    backend: str,
    metadata: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [N, out] + B[slot_t] A[slot_t] x_t for x [N, in], by the fused shrink-expand op, in y's dtype.

    The adapter dtype may differ from the model's (``LoRAConfig.dtype``): the op
    runs in the adapter's. ``slots`` [N] int32; ``metadata``: the batch's
    host-built grouping for this shape, or None (grouped on the device).
    """
    need_grad = lora_a.requires_grad and lora_b.requires_grad
    if _keeps_s(x, need_grad, backend):  # training on the XLA-native backend: s kept for the backward
        out, _ = torch.ops.xla_lora.bgmv_shrink_expand_train(
            x.to(lora_a.dtype), lora_a, lora_b, y.to(lora_b.dtype), slots, 1.0, backend
        )
        return out.to(y.dtype)
    out = torch.ops.xla_lora.bgmv_shrink_expand(
        x.to(lora_a.dtype), lora_a, lora_b, y.to(lora_b.dtype), slots, 1.0, backend, metadata
    )
    return out.to(y.dtype)


#: Run the training forwards (``bgmv_shrink_expand_train``, ``linear_lora_train``) where :func:`_keeps_s` says
#: so; False: the serving ops (``s`` recomputed in the backward), as ``python -m torch_xla_lora.bench train``
#: measures for comparison.
TRAIN_FORWARD = True


def kernel_runs(x: torch.Tensor, backend: str) -> bool:
    """Whether an op on ``x`` with ``backend`` runs the Pallas kernels (XLA tensors, "pallas", or "auto" on a TPU),
    not the XLA-native formulation or the torch reference."""
    from torch_xla_lora import ops

    if x.device.type != "xla":
        return False
    return backend == "pallas" or (backend == "auto" and ops.device_generation() != "cpu")


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a gradient for any of ``tensors`` (None: skipped) in this forward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _keeps_s(x: torch.Tensor, need_grad: bool, backend: str, fused_base: bool = False) -> bool:
    """Whether the layer's LoRA runs its training forward, which keeps ``s`` for the backward: grad enabled,
    both slot tensors needing gradients (``need_grad``: trainable adapters), on the XLA device, and

    - for :func:`fused_lora` (``bgmv_shrink_expand_train``), the XLA-native formulation (off TPU, or
      ``backend="xla"``), where sorting the rows by slot and keeping ``s`` beats the serving forward plus a
      recomputed ``s`` (on TPU the serving fused kernel does not write ``s``, and a shrink of its own costs
      what the backward's recompute does);
    - for ``linear_lora`` (``fused_base``: ``linear_lora_train``), every backend: on TPU its kernel writes
      ``s`` beside the output ([T, R] more, no pass over x of its own), elsewhere the XLA-native forward
      as above.
    """
    if not TRAIN_FORWARD or x.device.type != "xla":
        return False
    if not (torch.is_grad_enabled() and need_grad):
        return False
    return fused_base or not kernel_runs(x, backend)


def _device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter, or buffer (a quantized layer keeps its weights as buffers)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
