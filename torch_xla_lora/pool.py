"""Rank-true adapter storage: a pool of rank rows per layer, bounded by bytes (``LoRAConfig.memory_budget``).

With padded slots (the default) every device slot holds ``max_rank`` rank rows
of every patched layer, whatever the adapter's rank. With a memory budget each
layer instead keeps one *pool* per slot buffer: ``rows`` rank rows (plus a zero
row and a scratch row) along the buffer's rank axis, and an adapter of rank r
owns r rows, the same row numbers in every layer. Which adapters are resident
is bounded by bytes alone (:class:`PoolManager`, least recently used first);
``max_loras`` keeps its meaning for a batch: the distinct adapters one batch
may use, each given a *lane*.

Per batch, :meth:`PoolManager.batch_rows` lays out a table of ``max_loras x
max_rank`` row numbers (lane-major; rows past an adapter's rank point at the
zero row) and the context sends it to the device whole, like the slots. Linear
layers and routers read their lanes' rows from the pools through the table
(``ops.pooled_shrink_expand``: off TPU a decode batch reads only its used lanes'
true-rank rows, a longer batch the rows of the lanes its token blocks visit; on TPU only
each lane's true-rank pages, so there
the allocator places an adapter of rank r = 8q + t in q whole aligned pages of
:data:`KERNEL_PAGE_ROWS` rows and, if t > 0, t contiguous rows inside one aligned
page that other adapters' tails may share, or running on into the next; the kernel
DMAs those whole pages and uses only the tail's rows); other
layers gather their rows into the ``[max_loras, max_rank, ...]`` layout the
slot ops read (:func:`gather_slots`), dequantising int8 rows on the way. No
load, eviction or mix of ranks changes a compiled graph. Rows are written with one fixed-shape ``index_copy_``
per buffer (``max_rank`` rows: the adapter's own, the rest to the scratch row).

``weight_dtype="int8"`` stores the rows as int8 with one float32 scale per
rank row and buffer (symmetric, absmax / 127): A's row scales the shrink's
output channel and B's row the same channel on its way to the expand, so a
rank row's scale is exact to fold wherever the row is read.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from torch_xla_lora.adapters import LoRAAdapter, check_adapter
from torch_xla_lora.errors import AdapterNotFoundError, ConfigError, ConfigTypeError, NoFreeSlotError

if TYPE_CHECKING:
    from torch_xla_lora.layers.base import BaseLayerWithLoRA

__all__ = [
    "PoolFullError",
    "PoolManager",
    "parse_bytes",
    "layer_row_bytes",
    "factor_pairs",
    "gather_slots",
    "quantize_rows",
    "page_table",
    "kernel_pool_rows",
    "span_rows",
]

#: Rows a pool keeps beside its data rows: the zero row (padding lanes and ranks read it) and the
#: scratch row (the padding of a fixed-shape write lands there).
SPARE_ROWS = 2
#: Bytes of one int8 row's scale (float32), per buffer.
SCALE_BYTES = 4
#: Rows per page of the TPU pooled kernel (``kernels.fused.PAGE_ROWS``): it DMAs an adapter's rows an aligned page
#: at a time, so where it may run (:func:`granule_for`) an adapter of rank 8q + t owns q whole aligned pages and its
#: tail of t rows lies contiguous inside one aligned page, which other adapters' tails may share, or (t >= 5)
#: runs on into the next page (:meth:`PoolManager._tail_rows`).
KERNEL_PAGE_ROWS = 8

#: Rows of the HBM tile XLA gives a v6e int8 array whose row count is a multiple of it (else 8-row tiles): the
#: pooled kernel's 8-row page DMA out of such a pool does not compile there ("Failed to prove that a tile index
#: in dimension 0 is divisible by the tiling (32)"; ``python -m torch_xla_lora.bench.page_dma``), so int8 pools
#: the kernel may read never have a multiple of it as their row count (:func:`kernel_pool_rows`).
INT8_TILE_ROWS = 32

#: Rows of a page-scale tile (``kernels.fused.SCALE_TILE_ROWS``): an int8 pool's page scales are padded to whole
#: tiles, the unit the pooled kernel DMAs (the padding, at most 4 KiB a layer, counts against the budget).
PAGE_SCALE_TILE = 1024
#: Most stacked pools (an experts layer's) whose page scales interleave in one tile (``kernels.pages.scale_group``):
#: each tile then holds a block of PAGE_SCALE_TILE / 8 = 128 rows of each of 8 experts.
MAX_SCALE_GROUP = 8
#: The rows of such a block: no spilled tail runs across a multiple of it (its scales would leave the block).
SCALE_BLOCK_ROWS = PAGE_SCALE_TILE // MAX_SCALE_GROUP

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


class PoolFullError(NoFreeSlotError):
    """The adapters a call needs do not fit the memory budget (nothing is changed)."""


def parse_bytes(value: int | str, what: str = "memory_budget") -> int:
    """Bytes from an int or a string such as "6GiB", "512 MiB", "8e9" or "2GB" (decimal units)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigTypeError(f"{what} must be an int or a str such as '6GiB', got {type(value).__name__}")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", value.lower())
        if match is None or match.group(2) not in _UNITS:
            raise ConfigError(f"{what}: cannot read {value!r} as bytes (e.g. 6GiB, 512MiB, 8e9)")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value < 1:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return value


def layer_row_bytes(
    buffer_shapes: Mapping[str, tuple[int, ...]],
    rank_axes: Mapping[str, int],
    max_loras: int,
    max_rank: int,
    itemsize: int,
    int8: bool,
) -> int:
    """Device bytes of one rank row of a layer's buffers (the pool's unit), from the padded slot shapes.

    ``buffer_shapes``: name -> ``[L * k, *slot]`` (k entries per slot, e.g. experts); ``rank_axes``:
    name -> the rank axis within ``slot``. int8 rows cost one byte per element and a float32 scale
    per entry, and where the pooled kernel reads a pair of factors (:func:`factor_pairs`) one more
    float32 per entry, the row's page scale (``a_scale * b_scale``, kept beside the pools).
    """
    pairs = factor_pairs(buffer_shapes, rank_axes, max_loras) if int8 else {}
    total = SCALE_BYTES * sum(entries for _, _, entries in pairs.values())
    for name, shape in buffer_shapes.items():
        entries, slot = shape[0] // max_loras, list(shape[1:])
        if slot[rank_axes[name]] != max_rank:
            raise ValueError(f"{name}: rank axis {rank_axes[name]} of {tuple(shape)} is not max_rank {max_rank}")
        width = entries * int(torch.Size(slot).numel()) // max_rank
        total += width * (1 if int8 else itemsize) + (entries * SCALE_BYTES if int8 else 0)
    return total


def factor_pairs(
    buffer_shapes: Mapping[str, tuple[int, ...]], rank_axes: Mapping[str, int], max_loras: int
) -> dict[str, tuple[str, str, int]]:
    """The pairs of rank-first factors ``lora_a<s>`` and ``lora_b<s>`` of as many entries a layer's pools hold,
    which the pooled ops read at each lane's true rank: suffix ``s`` -> (A buffer, B buffer, entries per slot).
    A linear layer has one (``""``), an experts layer two of E entries (its up and down projections, ``""``
    and ``"_down"``); other layouts none (the embedding's A is rank-second). An int8 layer keeps a page-scale
    array for each (``lora_page_scale<s>``)."""
    pairs = {}
    for name_a, shape in buffer_shapes.items():
        if not name_a.startswith("lora_a"):
            continue
        suffix = name_a.removeprefix("lora_a")
        name_b = f"lora_b{suffix}"
        b_shape = buffer_shapes.get(name_b)
        if b_shape is None or b_shape[0] != shape[0] or rank_axes[name_a] != 0 or rank_axes[name_b] != 0:
            continue
        pairs[suffix] = (name_a, name_b, shape[0] // max_loras)
    return pairs


def page_scale_rows(rows: int, entries: int = 1) -> int:
    """Length of the page-scale array of a pool of ``rows`` data rows (and the spare rows), per entry: whole
    tiles of :data:`PAGE_SCALE_TILE` rows, the pooled kernel's DMA unit of it; stacked pools (``entries`` of
    them): whole blocks of ``PAGE_SCALE_TILE / scale_group(entries)`` rows, which :func:`page_scale_index` lays
    out ``scale_group(entries)`` to a tile (``kernels.pages.page_scales_of``)."""
    block = PAGE_SCALE_TILE // scale_group(entries)
    return -(-(rows + SPARE_ROWS) // block) * block


def scale_group(entries: int) -> int:
    """How many of ``entries`` stacked pools interleave their page scales in a tile: the largest power of two up to
    :data:`MAX_SCALE_GROUP` that divides ``entries`` (``kernels.pages.scale_group``)."""
    group = MAX_SCALE_GROUP
    while entries % group:
        group //= 2
    return group


def page_scale_index(entry: torch.Tensor, row: torch.Tensor, rows: int, entries: int) -> torch.Tensor:
    """The page-scale entry of pool row ``row`` of stacked pool ``entry`` (pools of ``rows`` data rows, ``entries``
    of them; ``kernels.pages.scale_index``): tiles holding a block of ``B = PAGE_SCALE_TILE / G`` rows of each of
    G = :func:`scale_group` pools, so one adapter's rows on G neighbouring experts share their tiles."""
    group = scale_group(entries)
    block, stride = PAGE_SCALE_TILE // group, page_scale_rows(rows, entries)
    tile = (entry // group) * (stride // block) + row // block
    return tile * PAGE_SCALE_TILE + (entry % group) * block + row % block


def pool_shape(slot_shape: tuple[int, ...], max_loras: int, rank_axis: int, rows: int) -> tuple[int, ...]:
    """``[k, *slot]`` with the rank axis holding ``rows`` data rows and the spare rows."""
    entries, slot = slot_shape[0] // max_loras, list(slot_shape[1:])
    slot[rank_axis] = rows + SPARE_ROWS
    return (entries, *slot)


def quantize_rows(values: torch.Tensor, rank_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 scales [k, R] of ``values`` [k, *slot], symmetric per (entry, rank row)."""
    axis = 1 + rank_axis
    dims = [d for d in range(1, values.dim()) if d != axis]
    amax = values.float().abs().amax(dim=dims, keepdim=True) if dims else values.float().abs()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(values.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.reshape(values.shape[0], values.shape[axis])


def gather_slots(
    pool: torch.Tensor,
    scale: torch.Tensor | None,
    rows: torch.Tensor,
    rank_axis: int,
    max_loras: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The ``[L * k, *slot]`` slot layout of the lanes' rows: pool [k, *slot with P rows], rows [L * R]."""
    axis = 1 + rank_axis
    picked = pool.index_select(axis, rows)  # [k, ..., L * R, ...]
    if scale is not None:
        shape = [1] * picked.dim()
        shape[0], shape[axis] = picked.shape[0], rows.shape[0]
        picked = (picked.to(torch.float32) * scale.index_select(1, rows).reshape(shape)).to(dtype)
    lanes = picked.reshape(*picked.shape[:axis], max_loras, -1, *picked.shape[axis + 1 :])
    lanes = lanes.movedim(axis, 0)  # [L, k, ..., R, ...]
    return lanes.reshape(-1, *lanes.shape[2:])


def page_table(rows: torch.Tensor, max_loras: int, zero_row: int) -> torch.Tensor:
    """The page table of a row table (host int32 ``[max_loras * max_rank]``, :meth:`PoolManager.batch_rows`):
    int32 ``[L * pages(R) + L]``, each lane's page starts (entries ``0, 8, 16, ...`` of its rows; lane l's
    page p at ``l * pages(R) + p``), then each lane's true rank (the position after its last entry that is
    not the zero row). Built once per batch on the host and sent whole beside the row table: what the pooled
    kernel reads, so no layer derives it from the row table in its graph."""
    table = rows.reshape(max_loras, -1).to(torch.int32)
    starts = table[:, ::KERNEL_PAGE_ROWS].reshape(-1)
    position = torch.arange(1, table.shape[1] + 1, dtype=torch.int32)
    named = torch.where(table != zero_row, position, 0)
    ranks = named.amax(dim=1) if table.shape[1] else torch.zeros(max_loras, dtype=torch.int32)
    return torch.cat([starts, ranks.to(torch.int32)])


def kernel_pool_rows(rows: int, int8: bool, granule: int, stacked: bool = False) -> int:
    """Data rows of the pools given the ``rows`` a budget holds, where the TPU pooled kernel may read them
    (``granule`` > 1, :func:`granule_for`; else ``rows``):

    - ``stacked`` (some layer keeps several entries per pool, an experts layer's ``[E, P + 2, width]``): fewer,
      down to a whole number of :data:`KERNEL_PAGE_ROWS` pages with the spare rows, so that each expert's
      block of the pool seen as ``[E * (P + 2), width]`` starts on an aligned page (the kernel reads it so);
    - int8: never a multiple of :data:`INT8_TILE_ROWS` with the spare rows (the kernel would not compile for
      such a pool on a v6e): one row fewer, or a page fewer where ``stacked``."""
    if granule == 1:
        return rows
    if stacked:
        rows -= (rows + SPARE_ROWS) % KERNEL_PAGE_ROWS
    if int8 and (rows + SPARE_ROWS) % INT8_TILE_ROWS == 0:
        rows -= KERNEL_PAGE_ROWS if stacked else 1
    return rows


def span_rows(rank: int, granule: int) -> int:
    """Rows of the pages of ``granule`` rows an adapter of ``rank`` touches: ``rank`` rounded up to whole pages.

    At granule :data:`KERNEL_PAGE_ROWS` these are the rows the pooled kernel DMAs for the adapter (its tail's
    whole page), not what it is allocated: it owns its ``rank`` rows, its tail sharing a page with others'."""
    return -(-rank // granule) * granule


def granule_for(layers: Mapping[str, BaseLayerWithLoRA]) -> int:
    """The page the allocator places adapters in: :data:`KERNEL_PAGE_ROWS` where a layer may run the pooled
    Pallas kernel (backend "pallas", or "auto" on a TPU), else 1 (any rows: the ops gather them). At 8 an
    adapter of rank 8q + t gets q whole aligned pages and t contiguous rows inside one aligned page (which
    other adapters' tails may share) or running on into the next; either way it owns exactly ``rank`` rows."""
    from torch_xla_lora import ops

    for layer in layers.values():
        if layer.backend == "pallas" or (layer.backend == "auto" and ops.device_generation() != "cpu"):
            return KERNEL_PAGE_ROWS
    return 1


class PoolPlan(NamedTuple):
    """What :meth:`PoolManager.plan` decided: adapters to evict, (adapter, rows) to write, each wanted
    name's lane in a batch (-1 outside one) and the free rows afterwards."""

    wanted: list[str]
    writes: list[tuple[str, list[int]]]
    evict: list[str]
    slot_of: dict[str, int]
    free: list[int]
    for_batch: bool


class PoolManager:
    """Resident adapters in a rank-row pool bounded by bytes, behind a host cache (see the module).

    The same contract as :class:`~torch_xla_lora.manager.AdapterManager` (its docstring): public methods
    take the lock and change nothing unless they succeed; any thread stages writes, the serving thread
    runs them with :meth:`apply` at each batch; rows the current batch reads are neither rewritten nor
    reused until the batch changes. A trainable adapter holds no rows: it keeps a lane of its own in every
    batch (the layers read its parameters there, see ``BaseLayerWithLoRA.slot_factors``), never evicted,
    until frozen or removed.

    Args:
      layers: module name -> LoRA layer (pooled, see :meth:`BaseLayerWithLoRA.allocate_pool`).
      max_loras: lanes per batch (the most distinct adapters one batch uses).
      max_rank: the largest rank.
      max_cpu_adapters: adapters kept on the host (LRU); resident ones always stay.
      rows: data rows of every layer's pool.
      row_bytes: device bytes of one row over all layers.
      budget_bytes: the configured budget.
      granule: the allocator's page (default: :func:`granule_for` the layers): 1, any rows; 8, an adapter of
        rank 8q + t gets q whole aligned pages (entries 8p .. 8p + 7 of its rows one page) and its t tail rows
        contiguous (:meth:`_place`, :meth:`_tail_rows`). Either way it owns ``rank`` rows: the rows of a shared
        page no adapter owns are free.
    """

    pooled = True

    def __init__(
        self,
        layers: Mapping[str, BaseLayerWithLoRA],
        max_loras: int,
        max_rank: int,
        max_cpu_adapters: int,
        rows: int,
        row_bytes: int,
        budget_bytes: int,
        granule: int | None = None,
    ) -> None:
        self._layers = dict(layers)
        self.granule = granule_for(self._layers) if granule is None else granule
        for layer in self._layers.values():
            layer.pool_page_rows = self.granule
        self._module_shapes = {name: lay.adapter_shapes for name, lay in self._layers.items()}
        self._rank_keys: list[tuple[str, str]] = []  # (module, factor pair) of each row of batch_module_ranks
        for name, layer in self._layers.items():
            layer.rank_rows = {}
            for suffix in layer.factor_pairs():
                layer.rank_rows[suffix] = len(self._rank_keys)
                self._rank_keys.append((name, suffix))
        self._ranks_of: dict[str, tuple[LoRAAdapter, list[int]]] = {}  # adapter -> its ranks per _rank_keys
        self.max_loras, self.max_rank, self.max_cpu_adapters = max_loras, max_rank, max_cpu_adapters
        self.rows, self.row_bytes, self.budget_bytes = rows, row_bytes, budget_bytes
        self.zero_row, self.scratch_row = rows, rows + 1
        self.lock = threading.RLock()
        self._host: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self._rows: dict[str, list[int]] = {}  # resident adapters -> their rows (what new batches read)
        self._free: list[int] = list(range(rows - rows % self.granule))  # whole pages only
        self._held: list[int] = []  # freed while the current batch reads them: free once it changes
        self._staged: dict[str, LoRAAdapter] = {}  # what each resident adapter's rows hold once writes run
        self._applied: dict[str, LoRAAdapter] = {}  # what they hold on the device now
        self._use: OrderedDict[str, None] = OrderedDict()  # resident adapters, LRU first
        self._pinned: set[str] = set()
        self._trainable: dict[str, int] = {}  # trainable adapter -> its reserved lane
        self._batch: set[str] = set()
        self._batch_rows: set[int] = set()
        self._batch_lanes: set[int] = set()  # lanes the current batch's tokens use

    # -- queries -----------------------------------------------------------------------------------

    def adapters(self) -> dict[str, dict]:
        """Loaded adapters: name -> {"slot": None, "pinned", "rank", "trainable", "resident", "bytes"}."""
        with self.lock:
            return {
                name: {
                    "slot": None,
                    "pinned": name in self._pinned,
                    "rank": adapter.max_rank,
                    "trainable": name in self._trainable,
                    "resident": name in self._rows or name in self._trainable,
                    "bytes": self.adapter_bytes(adapter),
                }
                for name, adapter in self._host.items()
            }

    def adapter_bytes(self, adapter: LoRAAdapter) -> int:
        """Device bytes ``adapter`` occupies when resident: its rank rows over every layer (a tail sharing a
        page counts its own rows only)."""
        return adapter.max_rank * self.row_bytes

    def memory(self) -> dict:
        """{"budget_bytes", "used_bytes", "adapters": {resident name: bytes}} (see ``LoRAModel.memory``)."""
        with self.lock:
            resident = {name: len(rows) * self.row_bytes for name, rows in self._rows.items()}
            return {"budget_bytes": self.budget_bytes, "used_bytes": sum(resident.values()), "adapters": resident}

    def batch_names(self) -> set[str]:
        with self.lock:
            return set(self._batch)

    def names_in_slots(self, slots: Sequence[int]) -> list[str]:
        """No adapter has a fixed slot in a pool: always empty (batches name their adapters)."""
        return []

    def batch_rows(self, plan: PoolPlan) -> torch.Tensor:
        """The row table of a batch plan: int32 [max_loras * max_rank], lane-major, the zero row as padding."""
        table = torch.full((self.max_loras, self.max_rank), self.zero_row, dtype=torch.int32)
        for name, lane in plan.slot_of.items():
            if name in self._trainable:  # its parameters stand in for its lane
                continue
            rows = plan_rows(plan, name, self._rows)  # its rank rows: q whole pages, then its tail
            table[lane, : len(rows)] = torch.tensor(rows, dtype=torch.int32)
        return table.reshape(-1)

    def batch_module_ranks(self, plan: PoolPlan | None) -> torch.Tensor:
        """int32 [K, max_loras]: the rank of each lane's adapter in each pair of factors of each layer (row k
        of the layer's ``rank_rows``), 0 for lanes without one, trainable adapters (they hold no rows) and
        modules an adapter does not target: the layers cut the row table to it (``context.module_ranks``).
        ``plan`` None: every lane at rank 0."""
        table = torch.zeros(len(self._rank_keys), self.max_loras, dtype=torch.int32)
        for name, lane in ({} if plan is None else plan.slot_of).items():
            if name not in self._trainable:
                table[:, lane] = torch.tensor(self._module_ranks(self._host[name]), dtype=torch.int32)
        return table

    def _module_ranks(self, adapter: LoRAAdapter) -> list[int]:
        """``adapter``'s rank in each (module, factor pair) of :attr:`_rank_keys`, cached per adapter object."""
        cached = self._ranks_of.get(adapter.name)
        if cached is None or cached[0] is not adapter:
            pairs = {
                module: layer.pair_ranks(adapter.modules.get(module))
                for module, layer in self._layers.items()
                if layer.rank_rows
            }
            cached = self._ranks_of[adapter.name] = (adapter, [pairs[m][s] for m, s in self._rank_keys])
        return cached[1]

    # -- loading -----------------------------------------------------------------------------------

    def add(self, adapter: LoRAAdapter) -> None:
        """Validate ``adapter`` against the model and the budget, and cache it (replacing one of the same
        name). A resident adapter reloaded at the same rank is rewritten in place at the next apply; at another
        rank it leaves the pool (the next batch naming it brings it back).

        Raises:
          PoolFullError: its rank rows exceed the whole pool.
        """
        check_adapter(adapter, self._module_shapes, self.max_rank)
        if span_rows(adapter.max_rank, self.granule) > self.rows - self.rows % self.granule:
            raise PoolFullError(
                f"adapter {adapter.name!r}: rank {adapter.max_rank} needs {self.adapter_bytes(adapter)} bytes, more "
                f"than the whole memory budget holds ({self.rows} rows of {self.row_bytes} bytes)"
            )
        with self.lock:
            self._host[adapter.name] = adapter
            self._host.move_to_end(adapter.name)
            rows = self._rows.get(adapter.name)
            if rows is not None and len(rows) == adapter.max_rank:  # its rows hold it: rewrite
                self._staged[adapter.name] = adapter
            elif rows is not None:
                self._release(adapter.name)
            self._trim_host(keep=adapter.name)

    def remove(self, name: str) -> None:
        """Forget ``name``; its rows are freed (once the current batch, if it reads them, is done)."""
        with self.lock:
            self._require(name)
            if name in self._rows:
                self._release(name)
            self._pinned.discard(name)
            self._trainable.pop(name, None)
            self._batch.discard(name)
            del self._host[name]
            self._ranks_of.pop(name, None)

    def add_trainable(self, adapter: LoRAAdapter) -> int:
        """Cache ``adapter`` (a trainable adapter's current weights) and reserve it a lane of its own, not one
        the current batch uses, until :meth:`freeze` or :meth:`remove`; return the lane. All or nothing.

        Raises:
          NoFreeSlotError: every lane is reserved or used by the current batch (nothing is changed).
        """
        check_adapter(adapter, self._module_shapes, self.max_rank)
        with self.lock:
            lane = self._trainable.get(adapter.name)
            if lane is None:
                taken = set(self._trainable.values()) | self._batch_lanes
                free = [lane for lane in range(self.max_loras) if lane not in taken]
                if not free:
                    raise NoFreeSlotError(
                        f"no lane for trainable adapter {adapter.name!r}: of max_loras={self.max_loras} lanes, "
                        f"trainable adapters hold {sorted(self._trainable.values())} and the current batch "
                        f"uses {sorted(self._batch_lanes)}"
                    )
                lane = free[0]
            self._host[adapter.name] = adapter
            self._host.move_to_end(adapter.name)
            if adapter.name in self._rows:  # its parameters are read now, not rows
                self._release(adapter.name)
            self._trainable[adapter.name] = lane
            return lane

    def freeze(self, adapter: LoRAAdapter) -> None:
        """A trainable adapter becomes an ordinary one holding ``adapter``'s weights; the next batch that names
        it brings it into the pool (until then, a current batch's rows on its lane read zeros: the base).

        Raises:
          PoolFullError: its rank rows exceed the whole pool (it stays trainable, its lane reserved).
        """
        with self.lock:
            self._require(adapter.name)
            lane = self._trainable.pop(adapter.name, None)
            try:
                self.add(adapter)
            except Exception:
                if lane is not None:
                    self._trainable[adapter.name] = lane
                raise

    # -- residency ---------------------------------------------------------------------------------

    def activate(self, names: Sequence[str], *, for_batch: bool = False) -> dict[str, int]:
        """Make every adapter of ``names`` resident (staging writes); return name -> lane (-1 outside a batch).

        Raises:
          AdapterNotFoundError: a name is not loaded.
          NoFreeSlotError: more distinct adapters than ``max_loras`` in a batch.
          PoolFullError: their rows do not fit beside the pinned ones and the current batch's.
        """
        with self.lock:
            plan = self.plan(names, for_batch=for_batch)
            self.commit(plan)
            return plan.slot_of

    def plan(self, names: Sequence[str], *, for_batch: bool = False) -> PoolPlan:
        """Decide rows and evictions for ``names`` without changing anything (raises as :meth:`activate`)."""
        with self.lock:
            wanted = list(dict.fromkeys(names))
            for name in wanted:
                self._require(name)
            reserved = set(self._trainable.values())
            ordinary = [name for name in wanted if name not in self._trainable]
            if for_batch and len(ordinary) > self.max_loras - len(reserved):
                raise NoFreeSlotError(
                    f"the batch uses {len(wanted)} distinct adapters but max_loras is {self.max_loras}"
                    + (f" and trainable adapters reserve {len(reserved)} lanes" if reserved else "")
                )
            protected = set() if for_batch else self._batch
            free = set(self._free + (self._held if for_batch else []))
            missing = [name for name in ordinary if name not in self._rows]
            ranks = [self._host[name].max_rank for name in missing]
            candidates = [
                name
                for name in self._use  # least recently used first
                if name not in self._pinned and name not in wanted and name not in protected
            ]
            evict = []
            while (placed := self._place(free, ranks)) is None:  # evict until they can be placed, not until
                if len(evict) == len(candidates):  # enough rows are free: tails and pages need their own
                    need = sum(ranks)
                    raise PoolFullError(
                        f"adapters {missing} need {need * self.row_bytes} bytes ({need} rows"
                        + (f": their tails inside one page of {self.granule} rows each" if self.granule > 1 else "")
                        + f") but they cannot be placed in the {len(free)} rows that can be freed of the "
                        f"{self.budget_bytes}-byte budget (pinned: {sorted(self._pinned)}, in the current batch: "
                        f"{sorted(protected)})"
                    )
                name = candidates[len(evict)]
                evict.append(name)
                free.update(r for r in self._rows[name] if for_batch or r not in self._batch_rows)
            writes = list(zip(missing, placed, strict=True))
            free = sorted(free.difference(*placed))
            open_lanes = iter(lane for lane in range(self.max_loras) if lane not in reserved)
            lanes = {
                name: self._trainable.get(name) if name in self._trainable else next(open_lanes) for name in wanted
            }
            if not for_batch:
                lanes = dict.fromkeys(wanted, -1)
            return PoolPlan(wanted, writes, evict, lanes, free, for_batch)

    def commit(self, plan: PoolPlan) -> None:
        """Apply ``plan``'s evictions and row assignments (staging the writes); hold :attr:`lock` since the plan."""
        with self.lock:
            held = [] if plan.for_batch else self._held  # a batch plan counted the held rows free
            for name in plan.evict:
                rows = self._rows.pop(name)
                held += [r for r in rows if not plan.for_batch and r in self._batch_rows]
                self._use.pop(name, None)
                self._staged.pop(name, None)
                self._applied.pop(name, None)
            self._held, self._free = held, list(plan.free)
            for name, rows in plan.writes:
                self._rows[name], self._staged[name] = rows, self._host[name]
            for name in plan.wanted:
                if name not in self._trainable:
                    self._use[name] = None
                    self._use.move_to_end(name)
                self._host.move_to_end(name)
            if plan.for_batch:
                self._batch, self._batch_lanes = set(plan.wanted), set(plan.slot_of.values())

    def release_batch(self) -> None:
        with self.lock:
            self._batch, self._batch_rows, self._batch_lanes = set(), set(), set()
            self._free, self._held = sorted(self._free + self._held), []

    def apply(self, batch_slots: set[int] | None = None) -> int:
        """Run the staged row writes (serving thread only); return how many adapters were written.

        Args:
          batch_slots: given when a new batch is about to be sent (its lanes; the rows it reads are those
            of the committed batch's adapters): every staged write runs and those rows become protected.
            None: writes into rows the current batch reads wait.
        """
        with self.lock:
            pending = [name for name, adapter in self._staged.items() if self._applied.get(name) is not adapter]
            if batch_slots is None:
                pending = [name for name in pending if not self._batch_rows.intersection(self._rows[name])]
            if pending:
                _flush(self._layers.values())
                for name in pending:
                    self._write(self._rows[name], self._staged[name])
                    self._applied[name] = self._staged[name]
                    _flush(self._layers.values())
            if batch_slots is not None:
                self._batch_rows = {row for name in self._batch for row in self._rows.get(name, ())}
            return len(pending)

    def pin(self, name: str) -> int:
        """Keep ``name`` resident until unpinned (making it resident now); returns -1 (no fixed slot)."""
        with self.lock:
            self.activate([name])
            self._pinned.add(name)
            return -1

    def unpin(self, name: str) -> None:
        with self.lock:
            self._require(name)
            self._pinned.discard(name)

    def warm_writes(self) -> None:
        """Compile the one row-write graph now (zeros into the scratch row)."""
        with self.lock:
            self.apply()
            self._write([], None)
            _flush(self._layers.values())

    # -- internals ---------------------------------------------------------------------------------

    def _place(self, free: set[int], ranks: Sequence[int]) -> list[list[int]] | None:
        """Rows for adapters of ``ranks`` out of ``free`` (not changed), or None where they cannot all be placed.

        Granule 1: the lowest free rows. Granule g > 1: an adapter of rank r = g * q + t takes the q highest whole
        free aligned pages and, if t > 0, t contiguous free rows, low in the pool (:meth:`_tail_rows`): tails
        gather at the bottom, where they can share pages and run on from one page into the next, whole pages at
        the top. Tails are placed longest first; each adapter's rows come whole pages first, then the tail (its
        row-table layout)."""
        g = self.granule
        if g == 1:
            rows = sorted(free)
            if sum(ranks) > len(rows):
                return None
            out, start = [], 0
            for rank in ranks:
                out.append(rows[start : start + rank])
                start += rank
            return out
        offsets: dict[int, set[int]] = {}  # page -> its free in-page offsets
        for row in free:
            offsets.setdefault(row // g, set()).add(row % g)
        out: list[list[int] | None] = [None] * len(ranks)
        for i in sorted(range(len(ranks)), key=lambda i: -(ranks[i] % g)):
            full, tail = divmod(ranks[i], g)
            whole = sorted((p for p, free_rows in offsets.items() if len(free_rows) == g), reverse=True)[:full]
            if len(whole) < full:
                return None
            rows = [p * g + k for p in whole for k in range(g)]
            for p in whole:
                del offsets[p]
            if tail:
                found = self._tail_rows(offsets, tail, spill=self._may_spill(full, tail))
                if found is None:
                    return None
                rows += found
                for row in found:
                    offsets[row // g].discard(row % g)
            out[i] = rows
        return out

    def _may_spill(self, full: int, tail: int) -> bool:
        """Whether the tail of an adapter with ``full`` whole pages may run on into the next aligned page: tails
        of more than half a page (two of which never share one), where the pooled kernel's VMEM rows of a lane
        (``pages(max_rank)`` pages) have room for the extra page it then DMAs."""
        return tail > self.granule // 2 and (full + 2) * self.granule <= span_rows(self.max_rank, self.granule)

    def _tail_rows(self, offsets: dict[int, set[int]], tail: int, *, spill: bool) -> list[int] | None:
        """``tail`` contiguous free rows for a tail (``offsets``: page -> free in-page rows; not changed), or None.

        In order: the shortest free run of ``tail`` or more rows inside a page other rows of which are taken
        (best fit, the run's first rows; lowest page and offset among equals); where ``spill``, a page's free
        rows up to its end continued by the next page's first free rows (next pages that are partly taken
        first, then the lowest), never across a multiple of :data:`SCALE_BLOCK_ROWS` (the kernel reads a
        tail's scales from one block of a tile);
        else the lowest wholly free page's first rows."""
        g = self.granule
        best = None
        for page in sorted(offsets):
            free_rows = offsets[page]
            if len(free_rows) == g:
                continue
            run = 0
            for k in range(g + 1):
                if k < g and k in free_rows:
                    run += 1
                    continue
                if run >= tail and (best is None or run < best[0]):
                    best = (run, page * g + k - run)
                run = 0
        if best is not None:
            return list(range(best[1], best[1] + tail))
        if spill:
            spills = []
            for page in sorted(offsets):
                free_rows, after = offsets[page], offsets.get(page + 1, set())
                end = next((k for k in range(g, 0, -1) if k - 1 not in free_rows), 0)  # its free run to the end
                if len(free_rows) == g or end == g or (page + 1) * g % SCALE_BLOCK_ROWS == 0:
                    continue
                if all(k in after for k in range(tail - (g - end))):
                    spills.append((len(after) == g, page * g + end))
            if spills:
                first = min(spills)[1]
                return list(range(first, first + tail))
        whole = [p for p, free_rows in offsets.items() if len(free_rows) == g]
        return None if not whole else list(range(min(whole) * g, min(whole) * g + tail))

    def _write(self, rows: list[int], adapter: LoRAAdapter | None) -> None:
        """Write ``adapter``'s rows (None: zeros) in every layer: ``max_rank`` rows, padding to the scratch row."""
        rows = rows[: self.max_rank]  # its own rank rows only (a shared tail page's other rows are not its)
        index = torch.tensor(rows + [self.scratch_row] * (self.max_rank - len(rows)), dtype=torch.int64)
        for module, layer in self._layers.items():
            weights = None if adapter is None else adapter.modules.get(module)
            layer.write_rows(index, weights)

    def _release(self, name: str) -> None:
        """``name`` leaves the pool: rows the current batch reads are held until it changes, the rest freed."""
        rows = self._rows.pop(name)
        self._held += [r for r in rows if r in self._batch_rows]
        self._free = sorted(self._free + [r for r in rows if r not in self._batch_rows])
        self._use.pop(name, None)
        self._staged.pop(name, None)
        self._applied.pop(name, None)

    def _trim_host(self, keep: str) -> None:
        for name in list(self._host):
            if len(self._host) <= self.max_cpu_adapters:
                break
            if name not in self._rows and name not in self._pinned and name not in self._trainable and name != keep:
                del self._host[name]
                self._ranks_of.pop(name, None)

    def _require(self, name: str) -> None:
        if name not in self._host:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded (loaded: {sorted(self._host)})")


def plan_rows(plan: PoolPlan, name: str, resident: Mapping[str, list[int]]) -> list[int]:
    """The rows ``name`` has once ``plan`` is committed."""
    return dict(plan.writes).get(name) or resident[name]


def _flush(layers) -> None:
    from torch_xla_lora.manager import _flush as flush

    flush(layers)
