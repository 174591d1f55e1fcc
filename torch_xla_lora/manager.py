"""Adapter slots: which adapter lives in which device slot, a host cache, LRU eviction, pins.

Concurrency (see docs/layers.md, "Concurrency contract"): every public method
takes the lock and is all-or-nothing: it validates and plans first, and
changes slots, cache and pins only once nothing can fail any more. Methods that
any thread may call (``add``, ``remove``, ``activate``, ``pin``, ``unpin``,
queries) only change host-side state and *stage* slot writes; they never touch
the device buffers the model reads. The serving thread runs the staged writes
with :meth:`apply` (at each ``set_batch``), as their own graph. Slots that the
current batch reads are not written until the batch changes, so a reload or a
removal of an adapter in use is deferred, never half applied.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from torch_xla_lora.adapters import LoRAAdapter, check_adapter
from torch_xla_lora.errors import AdapterNotFoundError, NoFreeSlotError
from torch_xla_lora.layers.base import BaseLayerWithLoRA


class Plan(NamedTuple):
    """What :meth:`AdapterManager.plan` decided: (slot, adapter) writes and the slot of each wanted name."""

    wanted: list[str]
    writes: list[tuple[int, str]]
    slot_of: dict[str, int]
    for_batch: bool


class AdapterManager:
    """Adapters in ``max_loras`` device slots, backed by a host cache of ``max_cpu_adapters``.

    Args:
      layers: module name -> LoRA layer, for every patched module.
      max_loras: device slots.
      max_rank: the largest rank a slot holds.
      max_cpu_adapters: adapters kept on the host (LRU); adapters in device slots
        are never dropped from it, so it holds at least the resident ones.
    """

    def __init__(
        self,
        layers: Mapping[str, BaseLayerWithLoRA],
        max_loras: int,
        max_rank: int,
        max_cpu_adapters: int,
    ) -> None:
        self._layers = dict(layers)
        self._module_shapes = {name: lay.adapter_shapes for name, lay in self._layers.items()}
        self.max_loras, self.max_rank, self.max_cpu_adapters = max_loras, max_rank, max_cpu_adapters
        self.lock = threading.RLock()  # re-entrant: callers may hold it across several calls
        self._host: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self._slots: list[str | None] = [None] * max_loras  # the adapter each slot holds for new batches
        self._staged: list[LoRAAdapter | None] = [None] * max_loras  # slot contents once pending writes run
        self._applied: list[LoRAAdapter | None] = [None] * max_loras  # slot contents on the device now
        self._slot_use: OrderedDict[str, None] = OrderedDict()  # resident adapters, LRU first
        self._pinned: set[str] = set()
        self._trainable: set[str] = set()  # resident until frozen or removed, like pins
        self._batch: set[str] = set()  # adapters of the current batch: never evicted under it
        self._batch_slots: set[int] = set()  # slots the current batch reads: not written until it changes

    # -- queries -----------------------------------------------------------------------------------

    def adapters(self) -> dict[str, dict]:
        """Loaded adapters: name -> {"slot": int | None, "pinned": bool, "rank": int, "trainable": bool}."""
        with self.lock:
            return {
                name: {
                    "slot": self._slot_of(name),
                    "pinned": name in self._pinned,
                    "rank": adapter.max_rank,
                    "trainable": name in self._trainable,
                }
                for name, adapter in self._host.items()
            }

    def batch_names(self) -> set[str]:
        """Adapters of the current batch."""
        with self.lock:
            return set(self._batch)

    def names_in_slots(self, slots: Sequence[int]) -> list[str]:
        """Adapters resident in ``slots`` (empty slots skipped)."""
        with self.lock:
            return [self._slots[s] for s in dict.fromkeys(slots) if self._slots[s] is not None]

    def _slot_of(self, name: str) -> int | None:
        return self._slots.index(name) if name in self._slots else None

    # -- loading -----------------------------------------------------------------------------------

    def add(self, adapter: LoRAAdapter) -> None:
        """Validate ``adapter`` against the model and cache it (replacing one of the same name)."""
        check_adapter(adapter, self._module_shapes, self.max_rank)
        with self.lock:
            self._host[adapter.name] = adapter
            self._host.move_to_end(adapter.name)
            slot = self._slot_of(adapter.name)
            if slot is not None:  # a reload rewrites the resident copy (at the next apply)
                self._staged[slot] = adapter
            self._trim_host(keep=adapter.name)

    def remove(self, name: str) -> None:
        """Forget ``name``: its slot is freed (zeroed at the next apply), its pin and cache entry dropped.

        A current batch that uses it keeps running it until the batch changes.
        """
        with self.lock:
            self._require(name)
            slot = self._slot_of(name)
            if slot is not None:
                self._clear(slot)
            self._pinned.discard(name)
            self._trainable.discard(name)
            self._batch.discard(name)
            del self._host[name]

    def add_trainable(self, adapter: LoRAAdapter) -> int:
        """Cache ``adapter`` (a trainable adapter's current weights) and keep it resident until
        :meth:`freeze` or :meth:`remove`; return its slot. All or nothing.

        Raises:
          NoFreeSlotError: no slot is free or evictable (nothing is changed).
        """
        check_adapter(adapter, self._module_shapes, self.max_rank)
        with self.lock:
            previous = self._host.get(adapter.name)
            self._host[adapter.name] = adapter  # the plan looks it up
            try:
                plan = self.plan([adapter.name])
            except Exception:
                if previous is None:
                    del self._host[adapter.name]
                else:
                    self._host[adapter.name] = previous
                raise
            self.add(adapter)
            self.commit(plan)
            self._trainable.add(adapter.name)
            return plan.slot_of[adapter.name]

    def freeze(self, adapter: LoRAAdapter) -> None:
        """A trainable adapter becomes an ordinary one holding ``adapter``'s weights (written at the next apply)."""
        with self.lock:
            self._require(adapter.name)
            self.add(adapter)
            self._trainable.discard(adapter.name)

    # -- slots -------------------------------------------------------------------------------------

    def activate(self, names: Sequence[str], *, for_batch: bool = False) -> dict[str, int]:
        """Make every adapter of ``names`` resident (staging writes); return name -> slot.

        Missing ones take free slots, then evict the least recently used
        unpinned adapters that neither ``names`` nor the current batch needs.
        With ``for_batch``, ``names`` become the current batch's adapters.

        Raises:
          AdapterNotFoundError: a name is not loaded.
          NoFreeSlotError: more distinct adapters than slots, or not enough unpinned slots.
        """
        with self.lock:
            plan = self.plan(names, for_batch=for_batch)
            self.commit(plan)
            return plan.slot_of

    def plan(self, names: Sequence[str], *, for_batch: bool = False) -> Plan:
        """Decide the slots of ``names`` without changing anything (raises as :meth:`activate`).

        Commit it with :meth:`commit` while holding :attr:`lock` since the plan.
        """
        with self.lock:
            wanted = list(dict.fromkeys(names))
            for name in wanted:
                self._require(name)
            writes = self._plan(wanted, replacing_batch=for_batch)
            slot_of = {name: self._slot_of(name) for name in wanted}
            slot_of.update({name: slot for slot, name in writes})
            return Plan(wanted, writes, slot_of, for_batch)

    def commit(self, plan: Plan) -> None:
        """Stage ``plan``'s writes and record its adapters as recently used (and as the batch's)."""
        with self.lock:
            for slot, name in plan.writes:
                self._stage(slot, name)
            for name in plan.wanted:
                self._slot_use[name] = None
                self._slot_use.move_to_end(name)
                self._host.move_to_end(name)
            if plan.for_batch:
                self._batch = set(plan.wanted)

    def release_batch(self) -> None:
        """The current batch is gone (``clear_batch``): its adapters and slots are no longer protected."""
        with self.lock:
            self._batch, self._batch_slots = set(), set()

    def apply(self, batch_slots: set[int] | None = None) -> int:
        """Run the staged slot writes (serving thread only); return how many slots were written.

        Args:
          batch_slots: the slots of the batch about to be sent: the batch changes, so
            every staged write runs, and these slots become the protected ones.
            None (no new batch): slots the current batch reads are skipped.
        """
        with self.lock:
            skip = set() if batch_slots is not None else self._batch_slots
            pending = [s for s in range(self.max_loras) if self._staged[s] is not self._applied[s] and s not in skip]
            if pending:
                _flush(self._layers.values())  # a forward left pending must not merge into the writes' graph
                for slot in pending:  # one graph per slot: the same graph for any number of writes
                    self._write(slot, self._staged[slot])
                    _flush(self._layers.values())
            if batch_slots is not None:
                self._batch_slots = set(batch_slots)
            return len(pending)

    def pin(self, name: str) -> int:
        """Keep ``name`` resident until unpinned (activating it now); return its slot."""
        with self.lock:
            slot = self.activate([name])[name]
            self._pinned.add(name)
            return slot

    def unpin(self, name: str) -> None:
        with self.lock:
            self._require(name)
            self._pinned.discard(name)

    def _plan(self, wanted: list[str], replacing_batch: bool) -> list[tuple[int, str]]:
        """(slot, adapter) writes that make ``wanted`` resident; raises before any change.

        The current batch's adapters are protected unless ``wanted`` is the next batch.
        """
        protected = set() if replacing_batch else self._batch
        missing = [name for name in wanted if name not in self._slots]
        if len(wanted) > self.max_loras:
            raise NoFreeSlotError(f"the batch uses {len(wanted)} distinct adapters but max_loras is {self.max_loras}")
        free = [slot for slot, name in enumerate(self._slots) if name is None]
        evictable = [
            self._slots.index(name)
            for name in self._slot_use
            if name not in self._pinned and name not in self._trainable and name not in wanted and name not in protected
        ]
        candidates = free + evictable
        if len(missing) > len(candidates):
            raise NoFreeSlotError(
                f"adapters {missing} need {len(missing)} slots but only {len(candidates)} of {self.max_loras} "
                f"can be freed (pinned: {sorted(self._pinned)}, trainable: {sorted(self._trainable)}, "
                f"in the current batch: {sorted(protected)})"
            )
        return list(zip(candidates, missing, strict=False))

    def _stage(self, slot: int, name: str) -> None:
        previous = self._slots[slot]
        if previous is not None and previous != name:
            self._slot_use.pop(previous, None)
        self._slots[slot], self._staged[slot] = name, self._host[name]

    def _write(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Write ``adapter`` (None: zeros) into ``slot`` of every layer; the caller flushes."""
        for module, layer in self._layers.items():
            weights = None if adapter is None else adapter.modules.get(module)
            if weights is None:
                layer.reset_adapter(slot)
            else:
                layer.set_adapter(slot, weights)
        self._applied[slot] = adapter

    def _clear(self, slot: int) -> None:
        name = self._slots[slot]
        self._slots[slot], self._staged[slot] = None, None
        self._slot_use.pop(name, None)

    def warm_writes(self) -> None:
        """Compile the one slot-write graph now: run staged writes, rewrite a slot with what it holds."""
        with self.lock:
            self.apply()
            self._write(0, self._applied[0])
            _flush(self._layers.values())

    def _trim_host(self, keep: str) -> None:
        """Drop least recently used adapters beyond ``max_cpu_adapters``.

        Resident and pinned adapters, and ``keep`` (the one just loaded), are
        never dropped, so the cache may hold more when all others are resident.
        """
        resident = set(self._slots)
        for name in list(self._host):
            if len(self._host) <= self.max_cpu_adapters:
                break
            if name not in resident and name not in self._pinned and name != keep:
                del self._host[name]

    def _require(self, name: str) -> None:
        if name not in self._host:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded (loaded: {sorted(self._host)})")


def _flush(layers) -> None:
    """Run pending slot writes as their own graph on XLA devices.

    Each write is one fixed-shape graph (index_copy_ at a device index) that
    compiles once; left pending, it would merge into the next forward's graph
    and make that graph differ with every load, i.e. recompile.
    """
    layer = next(iter(layers), None)
    if layer is not None and layer.adapter_device.type == "xla":
        import torch_xla

        torch_xla.sync()
