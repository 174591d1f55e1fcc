"""The concurrency contract under stress: loader threads load, reload, pin, unpin and remove adapters while
the serving thread sets mixed batches and runs forwards (CPU, and the XLA device lazily and compiled).

Every row of every forward must equal PEFT's output for the adapter named for that row at its ``set_batch``
(or the base model); no thread may fail, none may hang (joins are bounded), the final adapter table must be
what each loader's own operations leave, and on XLA nothing compiles after warm-up.

Each loader thread owns its adapter names, so the final state of every name follows from that thread's own
sequence of operations, whatever the interleaving. Adapter "x" is reloaded alternately from two different
PEFT adapters; its rows must match one of the two, the same one for every "x" row of a forward.
The run is bounded by iteration counts (about ten seconds per mode on two cores).
"""

from __future__ import annotations

import collections
import copy
import random
import threading
import time
import warnings

import pytest
import torch
from conftest import tiny_llama, tolerance
from peft import LoraConfig, get_peft_model

import torch_xla_lora as tl

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
VERSIONS = {"a": 0, "b": 1, "c": 2, "d": 3, "x": 4, "x_v2": 5}  # adapter -> seed offset
OWNERS = (("a", "b", "x"), ("c", "d"))  # the names each loader thread works on
BATCH, SEQ, MAX_LORAS = 4, 6, 3
IDS = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
JOIN_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(clean model, adapter dirs, reference logits: name -> [B, S, vocab]; None = base)."""
    clean = tiny_llama(num_hidden_layers=1)
    peft_model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, offset in VERSIONS.items():
            torch.manual_seed(300 + offset)
            config = LoraConfig(target_modules=TARGETS, init_lora_weights=False, r=2 + offset, lora_alpha=8)
            if peft_model is None:
                peft_model = get_peft_model(copy.deepcopy(clean), config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
        peft_model.eval()
        path = tmp_path_factory.mktemp("concurrency")
        peft_model.save_pretrained(path)
        with torch.no_grad():
            reference = {name: peft_model(IDS, adapter_names=[name] * BATCH).logits for name in [*VERSIONS, "__base__"]}
    reference[None] = reference.pop("__base__")
    return clean, {name: path / name for name in VERSIONS}, reference


class Loader(threading.Thread):
    """Random loads, reloads, pins, unpins and removals of its own names until stopped."""

    def __init__(self, lora: tl.LoRAModel, names: tuple[str, ...], dirs: dict, seed: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.lora, self.names, self.dirs, self.stop = lora, names, dirs, stop
        self.rng = random.Random(seed)
        self.loaded: set[str] = set()
        self.pinned: str | None = None  # at most one pin per thread: batches always find a slot
        self.operations, self.errors = 0, []
        self.progress = threading.Condition()  # notified after every operation (and on failure)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step(self.rng.choice(self.names))
                with self.progress:
                    self.operations += 1
                    self.progress.notify_all()
                time.sleep(self.rng.random() * 0.002)
        except BaseException as exc:  # reported by the test: a thread's exception would otherwise be lost
            with self.progress:
                self.errors.append(exc)
                self.progress.notify_all()

    def wait_for_operation(self, done: int) -> None:
        """Block until this thread has finished more than ``done`` operations (or failed)."""
        with self.progress:
            self.progress.wait_for(lambda: self.operations > done or self.errors, JOIN_TIMEOUT)

    def step(self, name: str) -> None:
        op = self.rng.choice(["load", "load", "remove", "pin", "unpin"])
        if op == "load" or name not in self.loaded:
            source = "x_v2" if name == "x" and self.rng.random() < 0.5 else name
            self.lora.load_adapter(name, self.dirs[source])
            self.loaded.add(name)
        elif op == "remove":
            self.lora.remove(name)
            self.loaded.discard(name)
            if self.pinned == name:
                self.pinned = None
        elif op == "pin" and self.pinned is None:
            try:
                self.lora.pin(name)
                self.pinned = name
            except tl.NoFreeSlotError:  # the other thread's pin and the current batch hold every slot
                pass
        elif op == "unpin" and self.pinned is not None:
            self.lora.unpin(self.pinned)
            self.pinned = None


def _check_rows(logits: torch.Tensor, batch: list[str | None], reference: dict, x_version: str | None) -> str | None:
    """Assert every row is its adapter's output; return the version of "x" the rows ran (None: no "x" row).

    ``x_version``, when given, is the only acceptable one: the version earlier forwards of the batch ran.
    """
    for row, name in enumerate(batch):
        candidates = [x_version] if name == "x" and x_version else ["x", "x_v2"] if name == "x" else [name]
        expected = {c: reference[c][row] for c in candidates}
        matches = [c for c, e in expected.items() if torch.allclose(logits[row], e, **tolerance(e))]
        assert matches, f"row {row} of batch {batch} is not adapter {name!r}'s output (candidates {candidates})"
        if name == "x":
            x_version = matches[0]
    return x_version


def _stress(lora: tl.LoRAModel, step, dirs: dict, reference: dict, device, iterations: int) -> None:
    """``iterations`` steps of: try a random batch, let every loader run an operation, run a forward.

    A ``set_batch`` that fails (an adapter removed meanwhile, slots pinned or too few) must raise one of
    the two typed errors and change nothing: the forward then runs the batch set before, with the same
    version of "x". Waiting, between ``set_batch`` and the forward, until each loader has run an operation
    that started after ``set_batch`` returned puts a load, reload, removal, pin or unpin into that window
    at every step, however busy the machine (the loaders also run during the forwards).
    """
    stop = threading.Event()
    loaders = [Loader(lora, names, dirs, seed, stop) for seed, names in enumerate(OWNERS)]
    for loader in loaders:  # start loaded, so that batches use adapters from the first iteration
        for name in loader.names:
            lora.load_adapter(name, dirs[name])
            loader.loaded.add(name)
    batch = ["a", None, "c", "x"]  # set before the loaders start: every forward below has a batch
    lora.set_batch(batch)
    x_version = None
    rng, ids, failed = random.Random(11), IDS.to(device), collections.Counter()
    for loader in loaders:
        loader.start()
    try:
        for _ in range(iterations):
            names = list(lora.adapters())
            candidate = [rng.choice([*names, None]) for _ in range(BATCH)]
            sent = lora.context.slots
            try:
                lora.set_batch(candidate)
                assert len(set(candidate) - {None}) <= MAX_LORAS, f"{candidate} needs more than {MAX_LORAS} slots"
                batch, x_version = candidate, None
            except (tl.AdapterNotFoundError, tl.NoFreeSlotError) as error:
                assert lora.context.slots is sent, "a failed set_batch replaced the current batch"
                failed[type(error).__name__] += 1
            for loader in loaders:  # the second operation from now starts after set_batch returned
                loader.wait_for_operation(loader.operations + 1)
            with torch.no_grad():
                logits = step(ids)
                if device.type == "xla":
                    import torch_xla

                    torch_xla.sync()
                logits = logits.cpu()
            x_version = _check_rows(logits, batch, reference, x_version)
    finally:
        stop.set()
        for loader in loaders:
            loader.join(JOIN_TIMEOUT)
    assert not any(loader.is_alive() for loader in loaders), "a loader thread did not finish (deadlock?)"
    assert [error for loader in loaders for error in loader.errors] == []
    # Each forward waited for two operations of every loader: the threads interleaved at every step.
    assert all(loader.operations >= 2 * iterations for loader in loaders)
    assert failed.total() < iterations, f"every set_batch failed ({dict(failed)}): no new batch was served"
    # Nothing lost: the table is what each thread's own operations left.
    table = lora.adapters()
    assert set(table) == set().union(*(loader.loaded for loader in loaders))
    assert {n for n, info in table.items() if info["pinned"]} == {lo.pinned for lo in loaders} - {None}


def _patched(clean, device):
    model = copy.deepcopy(clean).to(device)
    config = tl.LoRAConfig(max_loras=MAX_LORAS, max_rank=8, target_modules=TARGETS, max_cpu_adapters=8)
    return model, tl.patch_model(model, config)


def test_loader_threads_never_change_a_running_batch_on_cpu(world):
    clean, dirs, reference = world
    model, lora = _patched(clean, torch.device("cpu"))
    _stress(lora, lambda ids: model(ids).logits, dirs, reference, torch.device("cpu"), iterations=60)


@pytest.mark.parametrize("mode", ["lazy", "compiled"])
def test_loader_threads_never_change_a_running_batch_on_xla(world, mode, xla_device):
    clean, dirs, reference = world
    model, lora = _patched(clean, xla_device)
    forward = lambda ids: model(ids).logits
    step = forward if mode == "lazy" else torch.compile(forward, backend="openxla")
    lora.warmup([BATCH], [SEQ], step=step, progress=False)
    with tl.assert_no_recompile():
        _stress(lora, step, dirs, reference, xla_device, iterations=30)


def _pooled(clean, device, rows: int = 20):
    """Patched with rank-true storage of ``rows`` rank rows: batches and pins evict by bytes, and a reload of
    "x" at another rank (x: 6, x_v2: 7) moves it out of the pool while a batch may still read its rows."""
    model = copy.deepcopy(clean).to(device)
    probe = tl.patch_model(copy.deepcopy(clean), tl.LoRAConfig(max_rank=8, target_modules=TARGETS, memory_budget=10**7))
    budget = (rows + 2) * probe.manager.row_bytes
    config = tl.LoRAConfig(  # backend "xla": rows allocated one by one on any device, as the budget assumes
        max_loras=MAX_LORAS, max_rank=8, target_modules=TARGETS, max_cpu_adapters=8, memory_budget=budget, backend="xla"
    )
    return model, tl.patch_model(model, config)


@pytest.mark.parametrize("mode", ["cpu", "compiled"])
def test_loader_threads_never_change_a_running_batch_in_a_pool(world, mode, xla_device):
    clean, dirs, reference = world
    device = torch.device("cpu") if mode == "cpu" else xla_device
    model, lora = _pooled(clean, device)
    forward = lambda ids: model(ids).logits
    if mode == "cpu":
        _stress(lora, forward, dirs, reference, device, iterations=60)
        return
    step = torch.compile(forward, backend="openxla")
    lora.warmup([BATCH], [SEQ], step=step, progress=False)
    with tl.assert_no_recompile():
        _stress(lora, step, dirs, reference, device, iterations=30)
