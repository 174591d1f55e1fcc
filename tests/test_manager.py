"""The adapter slots of a patched model: LRU eviction, pins, removal, reloads, the host cache, errors, threads.

Runs on CPU tensors (the slot logic is device-independent) with a one-layer random Llama; every output is
compared to PEFT's mixed-batch forward over the same adapters, or to the unpatched model.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_close, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

import torch_xla_lora as tl

TARGETS = ["q_proj", "v_proj"]
SPECS = {  # name -> LoraConfig kwargs; all share one PEFT model, the reference
    "a": {"r": 4, "lora_alpha": 8},
    "b": {"r": 8, "lora_alpha": 4},
    "c": {"r": 2, "lora_alpha": 8, "use_rslora": True},
    "d": {"r": 6, "lora_alpha": 12},
    "a_v2": {"r": 2, "lora_alpha": 16},  # new weights for "a"
    "big": {"r": 16, "lora_alpha": 16},  # above max_rank
    "with_k": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"]},  # k_proj is not patched
}
LORA = {"max_loras": 2, "max_rank": 8, "target_modules": TARGETS, "max_cpu_adapters": 8}
IDS = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(1))


def one_layer_llama(hidden: int = 32) -> nn.Module:
    return tiny_llama(hidden_size=hidden, num_hidden_layers=1)


def peft_model_of(clean: nn.Module, specs: dict[str, dict], seed: int = 100) -> PeftModel:
    peft_model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for offset, (name, kwargs) in enumerate(specs.items()):
            torch.manual_seed(seed + offset)
            config = LoraConfig(init_lora_weights=False, **{"target_modules": TARGETS, **kwargs})
            if peft_model is None:
                peft_model = get_peft_model(copy.deepcopy(clean), config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
    return peft_model.eval()


def saved(peft_model: PeftModel, path: Path) -> dict[str, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(path)
    return {name: path / name for name in peft_model.peft_config}


def state_dict_and_config(peft_model: PeftModel, name: str) -> dict:
    """load_adapter keyword arguments for an in-memory adapter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state_dict = get_peft_model_state_dict(peft_model, adapter_name=name)
    return {"state_dict": dict(state_dict), "config": peft_model.peft_config[name]}


@dataclass
class Bank:
    clean: nn.Module
    peft: PeftModel
    dirs: dict[str, Path]

    def source(self, name: str) -> dict:
        return state_dict_and_config(self.peft, name)

    @torch.no_grad()
    def expected(self, names: list[str | None]) -> torch.Tensor:
        adapter_names = ["__base__" if n is None else n for n in names]
        return self.peft(IDS[: len(names)], adapter_names=adapter_names).logits


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Bank:
    clean = one_layer_llama()
    peft_model = peft_model_of(clean, SPECS)
    return Bank(clean, peft_model, saved(peft_model, tmp_path_factory.mktemp("bank")))


@dataclass
class Served:
    model: nn.Module
    lora: tl.LoRAModel
    bank: Bank

    def load(self, name: str, source: str | None = None) -> None:
        """Load adapter ``source`` (default: ``name``) of the bank under ``name``, from memory."""
        self.lora.load_adapter(name, **self.bank.source(source or name))

    @torch.no_grad()
    def outputs(self, rows: int) -> torch.Tensor:
        return self.model(IDS[:rows]).logits

    def run(self, names: list[str | None]) -> torch.Tensor:
        self.lora.set_batch(names)
        return self.outputs(len(names))

    def resident(self) -> set[str]:
        return {name for name, info in self.lora.adapters().items() if info["slot"] is not None}


def serve(bank: Bank, load: tuple[str, ...] = ("a", "b", "c", "d"), **config) -> Served:
    model = copy.deepcopy(bank.clean)
    served = Served(model, tl.patch_model(model, tl.LoRAConfig(**{**LORA, **config})), bank)
    for name in load:
        served.load(name)
    return served


@torch.no_grad()
def base_outputs(bank: Bank, rows: int) -> torch.Tensor:
    return bank.clean(IDS[:rows]).logits


# --- LRU eviction --------------------------------------------------------------------------------------------


LRU_SEQUENCES = {  # batches run one after the other with max_loras=2 -> adapters no longer resident
    "oldest_goes": ([["a"], ["b"], ["c"]], {"a", "d"}),
    "reuse_refreshes": ([["a"], ["b"], ["a"], ["c"]], {"b", "d"}),
    "two_at_once": ([["a", None, "b"], ["c"]], {"a", "d"}),
    "wanted_is_kept": ([["a"], ["b"], ["c", "a"]], {"b", "d"}),
    "full_turnover": ([["a", "b"], ["c", "d"]], {"a", "b"}),
}


@pytest.mark.parametrize("case", LRU_SEQUENCES)
def test_least_recently_used_adapter_is_evicted(bank, case):
    batches, evicted = LRU_SEQUENCES[case]
    served = serve(bank)
    for batch in batches:
        served.lora.set_batch(batch)
    assert served.resident() == {"a", "b", "c", "d"} - evicted
    assert set(served.lora.adapters()) == {"a", "b", "c", "d"}  # evicted from a slot, still loaded


@pytest.mark.parametrize("case", LRU_SEQUENCES)
def test_every_batch_matches_peft_while_slots_are_reused(bank, case):
    served = serve(bank)
    for batch in LRU_SEQUENCES[case][0]:
        assert_close(served.run(batch), bank.expected(batch))


def test_evicted_adapter_comes_back_with_its_weights(bank):
    served = serve(bank)
    for batch in (["a", None], ["b"], ["c"], ["d", "c"], [None, "a", "b"]):
        assert_close(served.run(batch), bank.expected(batch))


# --- pins ----------------------------------------------------------------------------------------------------


def test_pin_returns_the_slot_and_marks_it(bank):
    served = serve(bank)
    slot = served.lora.pin("c")
    assert served.lora.adapters()["c"] == {"slot": slot, "pinned": True, "rank": SPECS["c"]["r"], "trainable": False}
    served.lora.unpin("c")
    assert served.lora.adapters()["c"] == {"slot": slot, "pinned": False, "rank": SPECS["c"]["r"], "trainable": False}
    served.lora.pin("c")
    served.lora.remove("c")
    served.load("c")
    assert not served.lora.adapters()["c"]["pinned"]  # the pin went with the removed adapter


def test_pinned_adapter_is_never_evicted(bank):
    served = serve(bank)
    slot = served.lora.pin("a")
    for batch in (["b"], ["c"], ["d", None], ["b", "a"], ["c"]):
        assert_close(served.run(batch), bank.expected(batch))
        assert served.lora.adapters()["a"]["slot"] == slot


def test_unpinned_adapter_becomes_evictable(bank):
    served = serve(bank)
    served.lora.pin("a")
    served.lora.pin("b")
    served.lora.unpin("a")
    assert_close(served.run(["c"]), bank.expected(["c"]))
    assert served.resident() == {"b", "c"}


BATCH_FORMS = {  # the batch [a, b] as names, as raw slot numbers per row, as a per-token slot tensor
    "names": lambda lora, slot: lora.set_batch(["a", "b"]),
    "slot_ints": lambda lora, slot: lora.set_batch([slot["a"], slot["b"]]),
    "token_slot_tensor": lambda lora, slot: lora.set_token_adapters(
        torch.tensor([slot["a"], slot["b"]]).repeat_interleave(IDS.shape[1])
    ),
}


@pytest.mark.parametrize("form", BATCH_FORMS)
def test_current_batch_is_not_evicted_by_a_pin(bank, form):
    served = serve(bank)
    slot = {name: served.lora.pin(name) for name in ("a", "b")}
    served.lora.unpin("a")
    served.lora.unpin("b")
    BATCH_FORMS[form](served.lora, slot)
    outputs = served.outputs(2)
    with pytest.raises(tl.NoFreeSlotError):
        served.lora.pin("c")  # every slot holds an adapter of the current batch
    assert torch.equal(served.outputs(2), outputs)
    assert_close(outputs, bank.expected(["a", "b"]))
    served.lora.clear_batch()  # no batch: a and b are no longer protected
    assert served.lora.pin("c") in slot.values()


# --- remove and reload ---------------------------------------------------------------------------------------


def test_remove_frees_the_slot_and_forgets_the_adapter(bank):
    served = serve(bank)
    served.lora.set_batch(["b"])
    served.lora.set_batch(["a"])  # b is now the least recently used
    slot_a = served.lora.adapters()["a"]["slot"]
    served.lora.remove("a")
    assert "a" not in served.lora.adapters()
    for call in (
        lambda: served.lora.set_batch(["a"]),
        lambda: served.lora.pin("a"),
        lambda: served.lora.unpin("a"),
        lambda: served.lora.remove("a"),
    ):
        with pytest.raises(tl.AdapterNotFoundError):
            call()
    assert_close(served.run(["c", None]), bank.expected(["c", None]))
    assert served.lora.adapters()["c"]["slot"] == slot_a  # the free slot, not an eviction of b
    assert served.resident() == {"b", "c"}


def test_removed_slot_is_zeroed(bank):
    served = serve(bank)
    slot = served.lora.pin("a")
    served.lora.remove("a")
    served.lora.set_batch([slot, None])  # a raw slot number, nothing in it
    assert torch.equal(served.outputs(2), base_outputs(bank, 2))


def test_removing_an_adapter_of_the_current_batch_is_deferred_until_the_batch_changes(bank):
    served = serve(bank)
    served.lora.set_batch(["a", None, "b"])
    served.lora.remove("a")
    assert "a" not in served.lora.adapters()
    assert_close(served.outputs(3), bank.expected(["a", None, "b"]))  # the current batch keeps its adapter
    with pytest.raises(tl.AdapterNotFoundError):
        served.lora.set_batch(["a"])
    assert_close(served.run([None, "b", "c"]), bank.expected([None, "b", "c"]))


@pytest.mark.parametrize("state", ["in_current_batch", "pinned", "evicted", "never_resident"])
def test_reload_replaces_the_weights(bank, state):
    served = serve(bank)
    prepare = {
        "in_current_batch": lambda: served.lora.set_batch(["a", None]),
        "pinned": lambda: served.lora.pin("a"),
        "evicted": lambda: (served.lora.set_batch(["a"]), served.lora.set_batch(["b", "c"])),
        "never_resident": lambda: None,
    }[state]
    prepare()
    served.load("a", source="a_v2")
    assert served.lora.adapters()["a"]["rank"] == SPECS["a_v2"]["r"]
    assert_close(served.run(["a", None, "b"]), bank.expected(["a_v2", None, "b"]))


def test_reload_of_an_adapter_in_the_current_batch_takes_effect_at_the_next_set_batch(bank):
    served = serve(bank)
    served.lora.set_batch(["b", "a", None])
    served.load("a", source="a_v2")
    assert served.lora.apply_pending() == 0  # not into a slot the current batch reads
    assert_close(served.outputs(3), bank.expected(["b", "a", None]))  # deferred: the batch keeps the old weights
    assert_close(served.run(["b", "a", None]), bank.expected(["b", "a_v2", None]))


# --- trainable adapters --------------------------------------------------------------------------------------


def test_a_trainable_adapter_keeps_its_slot_until_frozen(bank):
    """A trainable adapter is resident until frozen, like a pin: batches evict the others around it, a batch
    needing its slot too is refused unchanged; once frozen it is evictable again. A create_adapter with no slot
    left changes nothing (the name is not loaded)."""
    served = serve(bank)
    served.lora.create_adapter("t", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    slot = served.lora.adapters()["t"]["slot"]
    for batch in (["a"], ["b"], ["c", None]):
        assert_close(served.run(batch), bank.expected(batch))
        assert served.lora.adapters()["t"]["slot"] == slot
    adapters = served.lora.adapters()
    with pytest.raises(tl.NoFreeSlotError):
        served.lora.set_batch(["a", "b"])
    assert served.lora.adapters() == adapters
    served.lora.pin("c")
    with pytest.raises(tl.NoFreeSlotError):  # t's slot and pinned c's
        served.lora.create_adapter("u", LoraConfig(r=2, target_modules=TARGETS))
    assert served.lora.adapters() == adapters | {"c": {**adapters["c"], "pinned": True}}
    served.lora.unpin("c")
    served.lora.freeze("t")
    assert_close(served.run(["a", "b"]), bank.expected(["a", "b"]))
    assert served.resident() == {"a", "b"}


# --- host cache ----------------------------------------------------------------------------------------------


def test_host_cache_drops_the_least_recently_used_adapter(bank):
    served = serve(bank, load=("a", "b", "c"), max_loras=1, max_cpu_adapters=2)
    assert list(served.lora.adapters()) == ["b", "c"]
    with pytest.raises(tl.AdapterNotFoundError):
        served.lora.set_batch(["a"])


def test_host_cache_keeps_resident_adapters(bank):
    served = serve(bank, load=("b", "c"), max_loras=1, max_cpu_adapters=2)
    served.lora.set_batch(["b"])  # b: resident and most recently used; c: least recently used
    served.load("d")
    assert set(served.lora.adapters()) == {"b", "d"}
    assert_close(served.run(["d", None]), bank.expected(["d", None]))


def test_a_load_into_a_cache_of_resident_adapters_keeps_it_one_over_the_limit(bank):
    """docs/layers.md: the adapter just loaded is never dropped, so when every other cached adapter is resident the
    cache holds one more than ``max_cpu_adapters`` until the next load can trim it. Fails for a load that is refused,
    one that drops a resident adapter (or itself) to make room, and a cache that the next load does not trim."""
    limit = 2
    served = serve(bank, load=("a", "b"), max_loras=2, max_cpu_adapters=limit)
    served.lora.set_batch(["a", "b"])  # every cached adapter is resident: none can be dropped
    served.load("c")
    assert set(served.lora.adapters()) == {"a", "b", "c"}  # limit + 1
    assert_close(served.run(["c"]), bank.expected(["c"]))  # c takes a slot: a or b is evicted from the device
    (evicted,) = {"a", "b"} - served.resident()
    served.load("d")  # the next load drops the evicted one; the other two and d stay: limit + 1 again
    assert set(served.lora.adapters()) == {"a", "b", "c", "d"} - {evicted}
    assert len(served.lora.adapters()) == limit + 1
    assert_close(served.run(["d", "c"]), bank.expected(["d", "c"]))


# --- errors are all-or-nothing -------------------------------------------------------------------------------


def _other_base_adapter() -> dict:
    peft_model = peft_model_of(one_layer_llama(hidden=48), {"other": {"r": 4}})
    return state_dict_and_config(peft_model, "other")


def _unsupported_dir(path: Path, **lora_kwargs) -> dict:
    peft_model = peft_model_of(one_layer_llama(), {"x": {"r": 4, **lora_kwargs}})
    return {"path": saved(peft_model, path)["x"]}


def _broken_dir(bank: Bank, path: Path, breaks: str) -> dict:
    peft_model = peft_model_of(bank.clean, {"a": SPECS["a"]})
    directory = saved(peft_model, path)["a"]
    weights, config = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    if breaks == "missing_weights":
        weights.unlink()
    elif breaks == "missing_config":
        config.unlink()
    elif breaks == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif breaks == "corrupt_config":
        config.write_text("{not json")
    return {"path": directory}


def _nan_adapter(bank: Bank) -> dict:
    source = bank.source("a")
    key = next(k for k in source["state_dict"] if k.endswith("v_proj.lora_B.weight"))
    tensor = source["state_dict"][key].clone()
    tensor[1, 2] = float("nan")
    return {**source, "state_dict": {**source["state_dict"], key: tensor}}


# id -> (error, what to do first, the failing call); failing loads reuse the name "a", which is resident and in
# the current batch, so that "unchanged" covers its slot contents too.
ERROR_CASES: dict[str, tuple[type[tl.LoRAError], Callable, Callable]] = {
    "unknown_name_in_batch": (
        tl.AdapterNotFoundError,
        lambda s, src: None,
        lambda s, src: s.lora.set_batch(["c", "nope", None]),
    ),
    "unknown_name_in_tokens": (
        tl.AdapterNotFoundError,
        lambda s, src: None,
        lambda s, src: s.lora.set_token_adapters(["c"] * 3 + ["nope"] * 2),
    ),
    "unknown_name_pin": (tl.AdapterNotFoundError, lambda s, src: None, lambda s, src: s.lora.pin("nope")),
    "unknown_name_unpin": (tl.AdapterNotFoundError, lambda s, src: None, lambda s, src: s.lora.unpin("nope")),
    "unknown_name_remove": (tl.AdapterNotFoundError, lambda s, src: None, lambda s, src: s.lora.remove("nope")),
    "more_adapters_than_slots": (
        tl.NoFreeSlotError,
        lambda s, src: None,
        lambda s, src: s.lora.set_batch(["c", "a", "b"]),
    ),
    "all_pinned_set_batch": (
        tl.NoFreeSlotError,
        lambda s, src: (s.lora.pin("a"), s.lora.pin("b")),
        lambda s, src: s.lora.set_batch(["c", None, "a"]),
    ),
    "all_pinned_pin": (
        tl.NoFreeSlotError,
        lambda s, src: (s.lora.pin("a"), s.lora.pin("b")),
        lambda s, src: s.lora.pin("c"),
    ),
    "slot_out_of_range": (tl.ShapeError, lambda s, src: None, lambda s, src: s.lora.set_batch([0, LORA["max_loras"]])),
    "empty_batch": (tl.ShapeError, lambda s, src: None, lambda s, src: s.lora.set_batch([])),
    **{
        case: (error, lambda s, src: None, lambda s, src: s.lora.load_adapter("a", **src))
        for case, error in {
            "rank_above_max_rank": tl.RankTooLargeError,
            "module_not_patched": tl.UnknownModuleError,
            "other_base_model_shapes": tl.InvalidAdapterError,
            "missing_dir": tl.AdapterFileError,
            "missing_weights": tl.AdapterFileError,
            "missing_config": tl.AdapterFileError,
            "truncated_weights": tl.AdapterFileError,
            "corrupt_config": tl.AdapterFileError,
            "nan_weights": tl.InvalidAdapterError,
            "use_dora": tl.UnsupportedAdapterError,
            "modules_to_save": tl.UnsupportedAdapterError,
            "bias_all": tl.UnsupportedAdapterError,
        }.items()
    },
}


@pytest.fixture(scope="module")
def bad_sources(bank, tmp_path_factory) -> dict[str, dict]:
    """load_adapter keyword arguments of every failing load of ERROR_CASES."""
    path = tmp_path_factory.mktemp("bad")
    broken = ("missing_weights", "missing_config", "truncated_weights", "corrupt_config")
    return {
        "rank_above_max_rank": bank.source("big"),
        "module_not_patched": bank.source("with_k"),
        "other_base_model_shapes": _other_base_adapter(),
        "missing_dir": {"path": path / "does-not-exist"},
        **{case: _broken_dir(bank, path / case, case) for case in broken},
        "nan_weights": _nan_adapter(bank),
        "use_dora": _unsupported_dir(path / "dora", use_dora=True),
        "modules_to_save": _unsupported_dir(path / "mts", modules_to_save=["lm_head"]),
        "bias_all": _unsupported_dir(path / "bias", bias="all"),
    }


@pytest.mark.parametrize("case", ERROR_CASES)
def test_failing_call_raises_its_error_and_changes_nothing(bank, bad_sources, case):
    error, prepare, call = ERROR_CASES[case]
    served = serve(bank, load=("a", "b", "c"))
    served.lora.set_batch(["a", None, "b"])
    prepare(served, None)
    adapters, outputs = list(served.lora.adapters().items()), served.outputs(3)
    with pytest.raises(tl.LoRAError) as err:
        call(served, bad_sources.get(case))
    assert type(err.value) is error, repr(err.value)
    assert list(served.lora.adapters().items()) == adapters
    assert torch.equal(served.outputs(3), outputs)
    assert_close(outputs, bank.expected(["a", None, "b"]))  # and the batch still is what it was


# --- threads -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("then_pin", [False, True], ids=["load", "load_and_pin"])
def test_concurrent_loads_from_four_threads(bank, then_pin):
    names = ["a", "b", "c", "d"]
    served = serve(bank, load=(), max_loras=4)
    sources = {name: {"path": bank.dirs[name]} if i % 2 else bank.source(name) for i, name in enumerate(names)}
    barrier, errors = threading.Barrier(len(names)), []

    def worker(name: str) -> None:
        try:
            barrier.wait()
            served.lora.load_adapter(name, **sources[name])
            if then_pin:
                served.lora.pin(name)
        except BaseException as exc:  # reported below: a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    adapters = served.lora.adapters()
    assert set(adapters) == set(names)
    if then_pin:
        assert sorted(info["slot"] for info in adapters.values()) == [0, 1, 2, 3]
    batch = ["d", "a", "c", "b"]
    assert_close(served.run(batch), bank.expected(batch))
