"""Swapping LoRA layers into any torch model, and the handle users hold.

Modules are matched by PEFT's ``target_modules`` rules and replaced in place;
:func:`patch_model` returns a :class:`LoRAModel` that owns all state (batch
context, slots, host cache), so two patched models never share anything.
"""

from __future__ import annotations

import operator
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torch_xla_lora import adapters as adapters_io
from torch_xla_lora import ops, training
from torch_xla_lora.compile import CompileCounter
from torch_xla_lora.config import LoRAConfig
from torch_xla_lora.context import BatchContext
from torch_xla_lora.errors import (
    AdapterNotFoundError,
    AlreadyPatchedError,
    ArgumentError,
    ArgumentTypeError,
    ConfigError,
    ShapeError,
    ShardingError,
    UnpatchedError,
)
from torch_xla_lora.formulation import assign_roles
from torch_xla_lora.layers import (
    BaseLayerWithLoRA,
    ColumnParallelLinearWithLoRA,
    EmbeddingWithLoRA,
    LinearWithLoRA,
    LogitsWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from torch_xla_lora.layers.experts import ExpertsWithLoRA, RouterWithLoRA
from torch_xla_lora.layers.linear import is_quantized_linear, linear_features
from torch_xla_lora.layers.names import COLUMN_NAMES, MERGED_NAMES, QKV_NAMES, ROW_NAMES
from torch_xla_lora.manager import AdapterManager
from torch_xla_lora.pool import SPARE_ROWS, PoolManager, granule_for, kernel_pool_rows, page_table, span_rows

if TYPE_CHECKING:
    from torch_xla.distributed.spmd import Mesh


def _check_int4_bases(layers: Mapping[str, BaseLayerWithLoRA]) -> None:
    """Refuse torch_xla int4 quantized layers on a non-TPU XLA device, before the model is changed.

    torch_xla's quantized matmul casts an int4 weight (int4 values in an int8 container) to XLA's s4
    element type; the CPU and GPU XLA compilers reject s4 ("does not support custom element sizes on
    non-sub-byte types"), so such a model fails at its first execution there, patched or not. On a TPU,
    and for weights on the torch CPU device (computed in their int8 container), it runs.
    """
    for name, layer in layers.items():
        base = layer.base_layer
        if not is_quantized_linear(base) or not getattr(base, "int4_weight", False):
            continue
        if base.weight.device.type == "xla" and ops.device_generation() == "cpu":
            raise ConfigError(
                f"module {name!r}: torch_xla's int4 weights (XlaQuantizedLinear(int4_weight=True)) run only on a "
                "TPU: its quantized matmul casts them to XLA's s4 type, which this XLA device's compiler rejects "
                "(custom element sizes are TPU-only), patched or not; use int8 weights off TPU"
            )


def _is_target(name: str, target_modules: str | tuple[str, ...], linear: bool, is_head: bool) -> bool:
    if target_modules == "all-linear":
        return linear and not is_head
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith("." + key) for key in target_modules)


def _layer_class(name: str, module: nn.Module, is_head: bool) -> type[BaseLayerWithLoRA]:
    short = name.rsplit(".", 1)[-1]
    if EmbeddingWithLoRA.can_replace(module):
        return EmbeddingWithLoRA
    if is_head:
        return LogitsWithLoRA
    # A fused projection whose slices are not equal (multi-query attention: q wider than
    # k and v) is one column-parallel output; the fused op covers every slice anyway.
    if short in QKV_NAMES and QKVParallelLinearWithLoRA.can_replace(module):
        return QKVParallelLinearWithLoRA
    if short in MERGED_NAMES and MergedColumnParallelLinearWithLoRA.can_replace(module):
        return MergedColumnParallelLinearWithLoRA
    if short in QKV_NAMES | MERGED_NAMES:
        return ColumnParallelLinearWithLoRA
    if short in ROW_NAMES:
        return RowParallelLinearWithLoRA
    if short in COLUMN_NAMES:
        return ColumnParallelLinearWithLoRA
    return LinearWithLoRA


def _model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in model.parameters():
        if tensor.dtype.is_floating_point:
            return tensor.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def _as_int(value: Any, what: str) -> int:
    """``value`` as an int (Python or NumPy integers); bools, floats and the rest raise ArgumentTypeError."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ArgumentTypeError(f"{what}, got {type(value).__name__} {value!r}")


def _sizes(values: Any, what: str) -> list[int]:
    """``values`` (a non-empty sequence of ints >= 1) as a list; else ArgumentTypeError / ArgumentError."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ArgumentTypeError(f"warmup: {what} must be a sequence of ints, got {type(values).__name__} {values!r}")
    sizes = [_as_int(value, f"warmup: {what} must hold ints") for value in values]
    if not sizes:
        raise ArgumentError(f"warmup: {what} must hold at least one size, got {values!r}")
    for size in sizes:
        if size < 1:
            raise ArgumentError(f"warmup: {what} must all be at least 1, got {size} in {values!r}")
    return sizes


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class LoRAModel:
    """Handle of a patched model: load adapters, choose each row's adapter, unpatch.

    Not created directly: :func:`patch_model` returns it.
    """

    def __init__(self, model: nn.Module, config: LoRAConfig, layers: dict[str, BaseLayerWithLoRA]) -> None:
        self.model, self.config = model, config
        self.layers = layers
        self.context = next(iter(layers.values())).context
        self.dtype = next(iter(layers.values())).adapter_dtype
        self.device = _model_device(model)
        rows = next(iter(layers.values())).pool_rows
        if rows is None:
            self.manager = AdapterManager(layers, config.max_loras, config.max_rank, config.max_cpu_adapters)
        else:
            row_bytes = sum(lay.pool_row_bytes(config.weight_dtype == "int8") for lay in layers.values())
            self.manager = PoolManager(
                layers, config.max_loras, config.max_rank, config.max_cpu_adapters, rows, row_bytes, config.budget_bytes
            )
        self._patched = True
        self._trainable: dict[str, training.TrainableAdapter] = {}
        self._head = next((name for name, lay in layers.items() if isinstance(lay, LogitsWithLoRA)), None)
        self._base_frozen = False

    # -- adapters ----------------------------------------------------------------------------------

    def load_adapter(
        self,
        name: str,
        path: str | os.PathLike | None = None,
        *,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        config: Mapping | Any | None = None,
        trainable: bool = False,
        param_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Load a PEFT adapter from a directory PEFT wrote, or from a state dict and config.

        Loading a name again replaces it (in its slot too, if resident). Any thread
        may call it: files are read and checked outside the manager's lock, and the
        slot write is staged for the serving thread's next ``set_batch`` (a current
        batch that uses ``name`` keeps the old weights until the batch changes).

        Args:
          trainable: make the adapter trainable (see docs/training.md): its factors become
            parameters (:meth:`trainable_parameters`, in ``param_dtype``) that the forward
            reads, and it stays resident in a slot until :meth:`freeze` or :meth:`remove`.
            The first trainable adapter freezes the base model's parameters.

        Raises:
          ArgumentTypeError, ArgumentError: ``name`` is not a non-empty str, or the
            sources are not one of the two accepted combinations.
          AdapterFileError, InvalidAdapterError, UnsupportedAdapterError,
          UnknownModuleError, RankTooLargeError: nothing is changed.
          NoFreeSlotError: ``trainable`` and no slot can hold it (nothing is changed).
        """
        self._check_patched()
        adapters_io.check_name(name)
        if not isinstance(trainable, bool):
            raise ArgumentTypeError(f"load_adapter: trainable must be a bool, got {type(trainable).__name__}")
        if trainable:
            config_dict, tensors = adapters_io.read_source(name, path, state_dict=state_dict, config=config)
            self._add_trainable(name, tensors, config_dict, param_dtype)
            return
        adapter = adapters_io.load_adapter(name, path, state_dict=state_dict, config=config, dtype=self.dtype)
        with self.manager.lock:
            if name in self._trainable:  # replaced by a frozen one
                self.manager.freeze(adapter)
                self._drop_trainable(name)
            else:
                self.manager.add(adapter)

    # -- training ----------------------------------------------------------------------------------

    def create_adapter(self, name: str, config: Any, *, param_dtype: torch.dtype = torch.float32) -> None:
        """Create a new trainable adapter from a ``peft.LoraConfig`` (or its dict), initialised as PEFT does.

        The modules are those of the patched model that the config targets, by PEFT's rules;
        ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``lora_dropout`` and
        ``init_lora_weights`` (True, "gaussian" or False) apply as in PEFT. Draws from torch's global
        generator. The adapter is trainable: see :meth:`load_adapter` (``trainable=True``).

        Raises:
          UnsupportedAdapterError: a LoRA variant or initialisation this library does not run.
          UnknownModuleError: the config targets no LoRA layer of this model.
          RankTooLargeError: a rank exceeds ``max_rank``.
          NoFreeSlotError: no slot can hold it. In every case nothing is changed.
        """
        self._check_patched()
        adapters_io.check_name(name)
        config_dict = training.config_dict(config)
        adapters_io.read_source(name, state_dict={}, config=config_dict)  # plain LoRA only
        state = training.initial_state_dict(config_dict, self.layers, self._head)
        self._add_trainable(name, state, config_dict, param_dtype)

    def trainable_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """A trainable adapter's parameters, keyed as ``peft.get_peft_model_state_dict`` keys them
        (``base_model.model.<module>.lora_A.weight``: A ``[r, in]``, B ``[out, r]``, unscaled)."""
        return self._trainable_adapter(name).parameters()

    def save_adapter(self, name: str, directory: str | os.PathLike) -> None:
        """Write a trainable adapter as PEFT's ``save_pretrained`` does (``adapter_config.json``,
        ``adapter_model.safetensors``): ``PeftModel.from_pretrained`` and :meth:`load_adapter` read it."""
        if not isinstance(directory, (str, os.PathLike)):
            raise ArgumentTypeError(f"save_adapter: directory must be a path, got {type(directory).__name__}")
        training.save_adapter(self._trainable_adapter(name), directory)

    def freeze(self, name: str) -> None:
        """Make a trainable adapter an ordinary one with its current weights (written to its slot at the
        next ``set_batch``); it may be evicted again. Its parameters are no longer read.

        Raises:
          InvalidAdapterError: its weights are not finite (it stays trainable).
        """
        adapter = self._trainable_adapter(name)
        snapshot = adapter.snapshot(self.dtype)
        with self.manager.lock:
            self.manager.freeze(snapshot)
            self._drop_trainable(name)

    def _trainable_adapter(self, name: str) -> training.TrainableAdapter:
        self._check_patched()
        adapters_io.check_name(name)
        adapter = self._trainable.get(name)
        if adapter is None:
            if name in self.manager.adapters():
                raise ArgumentError(f"adapter {name!r} is loaded but not trainable (load_adapter(trainable=True))")
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded (trainable: {sorted(self._trainable)})")
        return adapter

    def _add_trainable(self, name: str, state: Mapping, config: dict, param_dtype: torch.dtype) -> None:
        """Make ``name`` a trainable adapter starting from PEFT-keyed ``state``; all or nothing."""
        if not isinstance(param_dtype, torch.dtype) or not param_dtype.is_floating_point:
            raise ArgumentTypeError(f"param_dtype must be a floating torch.dtype, got {param_dtype!r}")
        adapter = training.from_state_dict(name, state, config, self.layers, self.device, param_dtype)
        snapshot = adapter.snapshot(self.dtype)
        with self.manager.lock:
            slot = self.manager.add_trainable(snapshot)  # raises before any change
            self._drop_trainable(name)
            for module, factors in adapter.modules.items():
                self.layers[module].trainable[slot] = factors
            self._trainable[name] = adapter
            adapter.in_batch = name in self.manager.batch_names()
        if not self._base_frozen:  # as PEFT's get_peft_model: only the adapters train
            for param in self.model.parameters():
                param.requires_grad_(False)
            self._base_frozen = True

    def _drop_trainable(self, name: str) -> None:
        """The layers stop reading ``name``'s parameters (its slot holds its frozen weights or is freed)."""
        adapter = self._trainable.pop(name, None)
        if adapter is None:
            return
        for module, factors in adapter.modules.items():
            table = self.layers[module].trainable
            for slot in [s for s, f in table.items() if f is factors]:
                del table[slot]

    def remove(self, name: str) -> None:
        """Forget an adapter (any thread): new batches cannot name it any more.

        A current batch that uses it keeps running it until the next ``set_batch``,
        which zeroes its slot; its eviction protection ends now.
        """
        self._check_patched()
        adapters_io.check_name(name)
        with self.manager.lock:
            self.manager.remove(name)
            self._drop_trainable(name)

    def pin(self, name: str) -> int:
        """Keep an adapter in its device slot until :meth:`unpin` (any thread); returns the slot.

        The slot is written at the serving thread's next ``set_batch`` (or :meth:`apply_pending`).
        """
        self._check_patched()
        adapters_io.check_name(name)
        return self.manager.pin(name)

    def unpin(self, name: str) -> None:
        """Let a pinned adapter be evicted again (any thread)."""
        self._check_patched()
        adapters_io.check_name(name)
        self.manager.unpin(name)

    def apply_pending(self) -> int:
        """Run staged slot writes now (serving thread), except into slots the current batch reads.

        ``set_batch``, ``set_token_adapters`` and ``warmup`` do this themselves; call it
        only to have pins and loads reach the device before the next batch. Returns the
        number of slots written.
        """
        self._check_patched()
        return self.manager.apply()

    def adapters(self) -> dict[str, dict]:
        """Loaded adapters: name -> {"slot", "pinned", "rank", "trainable"}; with a memory budget also
        "resident" and "bytes" (and "slot" is None: adapters live in the pool, see :meth:`memory`)."""
        return self.manager.adapters()

    def memory(self) -> dict:
        """The adapter storage's accounting: ``{"budget_bytes", "used_bytes", "adapters": {name: bytes}}``.

        With a memory budget: the budget, the bytes resident adapters occupy (their rank rows over every
        layer) and each resident adapter's. With padded slots: the slot buffers' bytes as the budget, and
        each resident adapter's slot (``max_rank`` rows whatever its rank).
        """
        self._check_patched()
        if isinstance(self.manager, PoolManager):
            return self.manager.memory()
        slot_bytes = sum(
            buffer.numel() * buffer.element_size() // self.config.max_loras
            for layer in self.layers.values()
            for buffer in layer.slot_buffers().values()
        )
        resident = {name: slot_bytes for name, info in self.manager.adapters().items() if info["slot"] is not None}
        return {
            "budget_bytes": slot_bytes * self.config.max_loras,
            "used_bytes": sum(resident.values()),
            "adapters": resident,
        }

    # -- batches -----------------------------------------------------------------------------------

    def set_batch(self, names: Sequence[str | None], seq_len: int | None = None) -> None:
        """Adapter of each batch row (``None`` = base model) for the following forward passes.

        Args:
          names: one entry per row: an adapter name, ``None`` (base) or a slot number (an
            empty slot runs the base model; one that this batch would load an adapter into
            is refused).
          seq_len: tokens per row in the coming forward passes. When given, the
            kernels' token grouping is built here, once, on the host, and shared
            by every layer (otherwise each layer sorts the slots on the device).
            Forwards with another sequence length still work, grouping on the device.

        Call it from the serving thread: it runs the slot writes that other threads
        staged, then sends the slots. Every row of the following forwards runs the
        adapter named here, whatever other threads load, reload or remove meanwhile.

        Raises:
          ArgumentTypeError, ArgumentError, ShapeError, AdapterNotFoundError,
          NoFreeSlotError: nothing is changed (the current batch stays).
        """
        self._set(names, per_token=False, seq_len=seq_len)

    def set_token_adapters(self, names_or_slots: Sequence[str | int | None] | torch.Tensor) -> None:
        """Adapter of each flattened token, for ragged or packed batches.

        Entries are adapter names, ``None`` (base), or slot numbers (ints, -1 = base).
        """
        if isinstance(names_or_slots, torch.Tensor):
            if names_or_slots.dtype.is_floating_point or names_or_slots.dtype.is_complex or names_or_slots.dim() != 1:
                raise ArgumentTypeError(
                    f"set_token_adapters: a tensor must be 1-D integer slots, got {names_or_slots.dtype} "
                    f"of shape {tuple(names_or_slots.shape)}"
                )
            names_or_slots = names_or_slots.tolist()
        self._set(names_or_slots, per_token=True, seq_len=1)

    def clear_batch(self) -> None:
        """Run the base model only (no LoRA) until the next batch is set; the old batch's
        adapters lose their eviction protection."""
        self._check_patched()
        with self.manager.lock:
            self.context.set(None, per_token=False)
            self.manager.release_batch()
            self._mark_batch(set())

    def _mark_batch(self, names: set[str]) -> None:
        """Tell each trainable adapter whether the batch has rows on it (its gradient hooks read it)."""
        for name, adapter in self._trainable.items():
            adapter.in_batch = name in names

    def _check_entries(self, entries: Any, seq_len: Any) -> tuple[list[str | int | None], int | None]:
        """Validate a batch before anything changes; return its entries as a list."""
        if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
            raise ArgumentTypeError(
                f"a batch must be a sequence of adapter names, None or slot ints, got {type(entries).__name__}"
            )
        entries = [
            e
            if e is None or isinstance(e, str)
            else _as_int(e, "batch entries must be adapter names, None or slot ints")
            for e in entries
        ]
        if len(entries) == 0:
            raise ShapeError("a batch needs at least one entry")
        for entry in entries:
            if entry == "":
                raise ArgumentError("batch entries: adapter names must be non-empty, got ''")
            if isinstance(entry, int) and not -1 <= entry < self.config.max_loras:
                raise ShapeError(f"slot {entry} is outside [-1, max_loras={self.config.max_loras})")
        if seq_len is not None:
            seq_len = _as_int(seq_len, "seq_len must be None or an int")
            if seq_len < 1:
                raise ArgumentError(f"seq_len must be at least 1, got {seq_len}")
        return entries, seq_len

    def _set(self, entries: Sequence[str | int | None], per_token: bool, seq_len: int | None) -> None:
        self._check_patched()
        entries, seq_len = self._check_entries(entries, seq_len)
        names = [e for e in entries if isinstance(e, str)]
        pooled = isinstance(self.manager, PoolManager)
        if pooled and any(isinstance(e, int) and e >= 0 for e in entries):
            raise ArgumentError(
                "with LoRAConfig.memory_budget adapters have no fixed slot: name them (or None for base rows)"
            )
        # One critical section from the plan to the send: no other thread's remove, pin or
        # load can land between choosing the slots, writing them and sending them.
        with self.manager.lock:
            # Adapters named by slot number belong to the batch too: protect them from eviction.
            names += self.manager.names_in_slots([e for e in entries if isinstance(e, int) and e >= 0])
            plan = self.manager.plan(names, for_batch=True)  # raises before anything changes
            numbered = {e for e in entries if isinstance(e, int) and e >= 0}
            taken = sorted({slot for slot, name in plan.writes if slot in numbered})
            if taken:
                # An empty slot named by number serves the base model; loading a named adapter
                # into it in the same batch would silently give those rows that adapter.
                raise ArgumentError(
                    f"slot {taken[0]} is named by number and empty, and this batch would load "
                    f"{dict(plan.writes)[taken[0]]!r} into it: name that adapter, or use None for base rows"
                )
            slots = torch.tensor(
                [plan.slot_of[e] if isinstance(e, str) else (-1 if e is None else e) for e in entries],
                dtype=torch.int32,
            )
            metadata = self._host_metadata(slots, seq_len)
            rows = self.manager.batch_rows(plan) if pooled else None
            module_ranks = self.manager.batch_module_ranks(plan) if pooled else None
            self.manager.commit(plan)
            self.manager.apply(batch_slots={int(s) for s in slots.tolist() if s >= 0})
            self._send(slots, per_token, seq_len, metadata=metadata, rows=rows, module_ranks=module_ranks)
            self._mark_batch(set(plan.wanted))

    def _host_metadata(self, slots: torch.Tensor, seq_len: int | None) -> dict:
        """The kernels' grouping of a batch, built on the host (XLA only): key -> CPU int32 tensor."""
        metadata = {}
        if seq_len is not None and self.device.type == "xla":
            token_slots = slots.repeat_interleave(seq_len)
            fused = [lay for lay in self.layers.values() if isinstance(lay, LinearWithLoRA) and not lay.tensor_parallel]
            if fused:
                lay = fused[0]
                shapes = [(lay.in_features, lay.out_features) for lay in fused]
                linear = [lay.linear_metadata_shape() for lay in fused]  # layers running linear_lora's kernel
                linear = [shape for shape in linear if shape is not None]
                arrays = ops.batch_metadata(
                    token_slots, shapes, lay.max_rank, lay.max_loras, lay.adapter_dtype, linear_shapes=linear
                )
                for shape, array in arrays.items():
                    metadata[(len(token_slots), *shape)] = array
        return metadata

    def _send(
        self,
        slots: torch.Tensor,
        per_token: bool,
        seq_len: int | None = None,
        metadata: dict | None = None,
        rows: torch.Tensor | None = None,
        module_ranks: torch.Tensor | None = None,
    ) -> None:
        """Give the layers a batch's slots, built on the host and sent whole (int32: TPUs have no
        64-bit integer units), with the kernels' grouping when the token count is known, and with a
        memory budget the lanes' pool rows and their adapters' rank in each module (default: every lane
        reads the zero row, at rank 0)."""
        if isinstance(self.manager, PoolManager):
            if rows is None:
                rows = torch.full((self.config.max_loras * self.config.max_rank,), self.manager.zero_row)
                module_ranks = self.manager.batch_module_ranks(None)
            rows = rows.to(torch.int32)
        pages = None  # the pooled kernel's page table of the rows, built here once per batch (pool.page_table)
        if rows is not None:
            pages = page_table(rows, self.config.max_loras, self.manager.zero_row)
        if any(lay.tensor_parallel is not None for lay in self.layers.values()):
            from torch_xla_lora import sharding  # on a mesh: per-shard metadata (see sharding.send_batch)

            device_slots, on_device = sharding.send_batch(self.layers, slots, per_token, seq_len, self.device)
            if rows is not None:  # sent replicated: the pools' row axis is never split, so every shard reads
                # its slice of the same rows through the same page table
                rows, pages, module_ranks = (
                    sharding.send_replicated(t, self.device, self.layers) for t in (rows, pages, module_ranks)
                )
            self.context.set(device_slots, per_token, on_device, rows, pages, module_ranks)
            return
        pages = None if pages is None else pages.to(self.device)
        rows = None if rows is None else rows.to(self.device)
        module_ranks = None if module_ranks is None else module_ranks.to(self.device)
        if metadata is None:
            metadata = self._host_metadata(slots, seq_len)
        sent = {}  # layers with the same plan share one array: send it once
        on_device = {}
        for key, array in metadata.items():
            if id(array) not in sent:
                sent[id(array)] = array.to(self.device)
            on_device[key] = sent[id(array)]
        self.context.set(slots.to(self.device), per_token, on_device, rows, pages, module_ranks)

    # -- compilation -------------------------------------------------------------------------------

    def _formulation_summary(self, num_tokens: int, training: bool = False) -> str:
        """What ``base_fusion="auto"`` chose on TPU for the linear layers' serving (``training``: training)
        calls of ``num_tokens`` tokens, as "; fused: q_proj x32, ...; xla: down_proj x32" (layers by their last
        name), or "" if it chose nothing."""
        chosen: dict[str, dict[str, int]] = {}
        record = "training_formulations" if training else "formulations"
        for name, layer in self.layers.items():
            choice = getattr(layer, record, {}).get(num_tokens)
            if choice is not None:
                short = name.rpartition(".")[2]
                chosen.setdefault(choice, {}).setdefault(short, 0)
                chosen[choice][short] += 1
        return "".join(
            f"; {choice}: " + ", ".join(f"{short} x{count}" for short, count in names.items())
            for choice, names in sorted(chosen.items())
        )

    def warmup(
        self,
        batch_sizes: Sequence[int],
        seq_lens: Sequence[int],
        step: Callable[[torch.Tensor], Any] | None = None,
        progress: bool = True,
        host_metadata: bool = False,
        training: bool = False,
    ) -> int:
        """Compile ``step`` for every (batch size, sequence length) bucket, and the slot-write graph.

        Each bucket runs once with every slot in use (rows cycle through the
        slots and the base model), whatever the slots hold: the compiled graph
        reads the slot buffers as data, so it serves every adapter mix and every
        later load. The number of compilations is one per bucket plus one for
        slot writes, independent of ``max_loras``; no adapter is loaded.

        Args:
          batch_sizes, seq_lens: the buckets; inputs are [batch, seq] token ids.
          step: what to compile, called with the ids (default: ``model(ids)``);
            pass your ``torch.compile``d step to warm that.
          progress: print one line per bucket.
          host_metadata: warm the graphs that serve batches set with
            ``set_batch(..., seq_len=...)`` or ``set_token_adapters`` (host-built
            grouping) rather than plain ``set_batch(names)``.
          training: warm the training graphs: ``step`` runs with gradients on, and
            the default step is the forward plus a backward of its logits' mean. Pass
            your own forward, loss and backward as ``step`` (without the optimizer
            update: warm-up runs it for real); trainable adapters' gradients are
            put back as they were (docs/training.md).

        Returns:
          the number of XLA compilations warm-up made.

        Raises (before anything runs or changes):
          ArgumentTypeError, ArgumentError: sizes that are not non-empty sequences of ints >= 1
            (a bool is refused), a ``step`` that is not callable, flags that are not bools.
          ShardingError: on a mesh, a bucket's tokens do not split evenly over the data axis.
        """
        self._check_patched()
        buckets = self._check_warmup(batch_sizes, seq_lens, step, progress, host_metadata)
        if not isinstance(training, bool):
            raise ArgumentTypeError(f"warmup: training must be a bool, got {type(training).__name__} {training!r}")
        step = step or (self._training_step if training else self.model)
        counter = CompileCounter()
        self.manager.warm_writes()
        context = self.context
        saved = (context.slots, context.per_token, context.metadata, context.rows, context.pages, context.module_ranks)
        params = [p for adapter in self._trainable.values() for p in adapter.parameters().values()]
        grads = [p.grad for p in params]
        try:
            for number, (batch, seq) in enumerate(buckets, 1):
                start = time.perf_counter()
                rows = torch.arange(batch, dtype=torch.int32) % (self.config.max_loras + 1) - 1
                self._send(rows, per_token=False, seq_len=seq if host_metadata else None)
                with torch.set_grad_enabled(training):
                    # Kept alive until the sync: a lazy graph whose outputs are dropped is never compiled.
                    out = step(torch.zeros(batch, seq, dtype=torch.long).to(self.device))
                    _sync(self.device)
                if any(lay.tensor_parallel is not None for lay in self.layers.values()):
                    from torch_xla_lora import sharding  # a sharded result recompiles at every fetch: say so, once

                    sharding.warn_if_sharded(out, "warmup: the step")
                del out
                for param, grad in zip(params, grads, strict=True):
                    param.grad = grad
                if progress:
                    print(
                        f"warm-up {number}/{len(buckets)}: batch {batch} x seq {seq} "
                        f"in {time.perf_counter() - start:.1f} s{self._formulation_summary(batch * seq, training)}",
                        flush=True,
                    )
            # Again, now that the buckets ran: on a mesh, a slot write after a torch.compile'd
            # forward hashes to another graph than one before any forward (same HLO).
            self.manager.warm_writes()
        finally:
            self.context.set(*saved)
        return counter.count

    def _training_step(self, ids: torch.Tensor) -> torch.Tensor:
        """Warm-up's default training step: the forward and a backward of the mean of its logits."""
        out = self.model(ids)
        logits = getattr(out, "logits", out)
        loss = logits.float().mean()
        loss.backward()
        return loss.detach()

    def _check_warmup(self, batch_sizes, seq_lens, step, progress, host_metadata) -> list[tuple[int, int]]:
        """Validate :meth:`warmup`'s arguments before anything runs; return its (batch, seq) buckets."""
        batches, seqs = _sizes(batch_sizes, "batch_sizes"), _sizes(seq_lens, "seq_lens")
        buckets = [(b, s) for b in batches for s in seqs]
        if step is not None and not callable(step):
            raise ArgumentTypeError(f"warmup: step must be None or callable, got {type(step).__name__} {step!r}")
        for what, flag in (("progress", progress), ("host_metadata", host_metadata)):
            if not isinstance(flag, bool):
                raise ArgumentTypeError(f"warmup: {what} must be a bool, got {type(flag).__name__} {flag!r}")
        placement = next((lay.tensor_parallel for lay in self.layers.values() if lay.tensor_parallel), None)
        for batch, seq in buckets if placement is not None else ():  # a forward on a mesh splits its tokens
            if batch * seq % placement.data_shards:
                raise ShardingError(
                    f"warmup: bucket batch {batch} x seq {seq} = {batch * seq} tokens does not split evenly "
                    f"over data axis {placement.data_axis!r} of size {placement.data_shards}"
                )
        return buckets

    # -- lifecycle ---------------------------------------------------------------------------------

    def unpatch(self) -> nn.Module:
        """Put the original modules back; the handle is unusable afterwards. Returns the model."""
        self._check_patched()
        from torch_xla_lora.layers import fusion

        fusion.unpatch(getattr(self, "fused_decoders", []))
        for name, layer in self.layers.items():
            _set_submodule(self.model, name, layer.base_layer)
        self._patched = False
        return self.model

    def _check_patched(self) -> None:
        if not self._patched:
            raise UnpatchedError("this model was unpatched; patch it again to use LoRA")


def _allocate_pools(layers: Mapping[str, BaseLayerWithLoRA], config: LoRAConfig) -> None:
    """Give every layer a pool of as many rank rows as the memory budget holds (see torch_xla_lora.pool)."""
    int8 = config.weight_dtype == "int8"
    row_bytes = sum(layer.pool_row_bytes(int8) for layer in layers.values())
    rows = config.budget_bytes // row_bytes - SPARE_ROWS
    while rows > 0 and sum(layer.pool_bytes(rows, int8) for layer in layers.values()) > config.budget_bytes:
        rows -= 1  # int8 page scales are padded to whole tiles (at most 4 KiB a layer): the budget holds them too
    granule = granule_for(layers)
    # Several entries per slot (experts): the pooled ops read the pools as [entries * (P + 2), width].
    stacked = any(shape[0] > layer.max_loras for layer in layers.values() for shape in layer._buffer_shapes().values())
    rows = kernel_pool_rows(rows, int8, granule, stacked)  # pools the TPU kernel reads: see the function
    need = span_rows(config.max_rank, granule)  # where the pooled kernel may run: whole pages of 8 rows
    if rows - rows % granule < need:
        raise ConfigError(
            f"LoRAConfig.memory_budget={config.memory_budget!r} holds {max(rows, 0)} rank rows of "
            f"{row_bytes} bytes (every patched layer), fewer than one adapter of max_rank {config.max_rank} "
            f"needs ({need} rows in pages of {granule}): at least {(need + SPARE_ROWS) * row_bytes} bytes"
        )
    for layer in layers.values():
        layer.allocate_pool(rows, int8)


def patch_model(
    model: nn.Module,
    config: LoRAConfig | None = None,
    *,
    mesh: Mesh | None = None,
    tp_axis: str = "model",
    dp_axis: str | None = None,
    sharding_plan: Mapping[str, str] | Callable[[str, nn.Module], str | None] | None = None,
    fully_sharded: bool = False,
    ep_axis: str | None = None,
) -> LoRAModel:
    """Replace the target modules of ``model`` with LoRA layers, in place; return the handle.

    Args:
      model: any torch model (transformers models included), on its final device.
      config: a :class:`LoRAConfig` (default: ``LoRAConfig()``).
      mesh: a ``torch_xla.distributed.spmd.Mesh`` (SPMD mode): shard the base
        weights and the LoRA buffers over ``tp_axis`` (see docs/distributed.md).
      tp_axis: the mesh axis of tensor parallelism.
      dp_axis: a mesh axis the batch is split on, if any.
      sharding_plan: module name (or dotted suffix) -> "column" | "row" |
        "vocab" | "replicated", or a callable ``(name, module) -> kind | None``;
        default :func:`torch_xla_lora.sharding.default_plan` (Llama, Qwen2, Mistral...).
      fully_sharded: also shard column-parallel layers' A along the rank.
      ep_axis: a mesh axis MoE expert layers split their experts over (expert parallelism), if any.

    Raises:
      LoRAError: no module matched ``config.target_modules``.
      ConfigError: a targeted torch_xla int4 quantized layer on a non-TPU XLA device, whose compiler cannot
        run int4 weights (nothing is changed).
      ShardingError: the mesh, an axis or the plan does not fit the model (nothing is changed).
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"patch_model: model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, LoRAConfig):
        raise ArgumentTypeError(f"patch_model: config must be a LoRAConfig, got {type(config).__name__}")
    config = config or LoRAConfig()
    if mesh is None and (dp_axis is not None or ep_axis is not None or sharding_plan is not None or fully_sharded):
        raise ArgumentTypeError("patch_model: dp_axis, ep_axis, sharding_plan and fully_sharded need a mesh")
    patched = next((name for name, m in model.named_modules() if isinstance(m, BaseLayerWithLoRA)), None)
    if patched is not None:
        raise AlreadyPatchedError(
            f"patch_model: {type(model).__name__} is already patched (module {patched or '<root>'!r} is a "
            f"{type(model.get_submodule(patched)).__name__}); unpatch it first"
        )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    dtype = config.dtype or _model_dtype(model)
    context = BatchContext()
    layers: dict[str, BaseLayerWithLoRA] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseLayerWithLoRA) or any(name.startswith(p + ".") for p in layers):
            continue
        # MoE experts and routers count as linear for "all-linear", as PEFT 0.21 targets them there.
        moe = next((c for c in (ExpertsWithLoRA, RouterWithLoRA) if c.can_replace(module)), None)
        linear = moe is not None or linear_features(module) is not None
        is_head = module is head and head is not None
        if not (linear or EmbeddingWithLoRA.can_replace(module)):
            continue
        if not _is_target(name, config.target_modules, linear, is_head):
            continue
        cls = moe or _layer_class(name, module, is_head)
        pooled = config.memory_budget is not None
        layers[name] = cls(
            module, context, config.max_loras, config.max_rank, dtype, config.backend, allocate=not pooled
        )
        layers[name].base_fusion = config.base_fusion
    if not layers:
        raise ConfigError(f"no module of {type(model).__name__} matches target_modules={config.target_modules!r}")
    _check_int4_bases(layers)  # nothing changed yet
    if config.memory_budget is not None:
        _allocate_pools(layers, config)
    placement = None
    if mesh is not None:
        # Imported here: it imports torch_xla's SPMD module, which one-device users never need.
        from torch_xla_lora import sharding

        placement = sharding.plan_model(
            model,
            layers,
            mesh,
            tp_axis,
            plan=sharding_plan,
            dp_axis=dp_axis,
            fully_sharded=fully_sharded,
            ep_axis=ep_axis,
        )  # checked before the model is changed
    assign_roles(model, layers)  # each linear layer's place in the model, for base_fusion="auto" on TPU
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    if placement is not None:
        placement.apply(layers)
    # Materialise the zero slot buffers now: while they are pending lazy IR, the
    # first slot write and forward would compile graphs that never recur.
    _sync(_model_device(model))
    handle = LoRAModel(model, config, layers)
    from torch_xla_lora.layers import fusion  # Llama-family decoder layers read x's producer in the fused kernel

    wanted = placement is None and fusion.wanted(config.base_fusion, handle.device)
    handle.fused_decoders = fusion.patch(model) if wanted else []
    return handle
