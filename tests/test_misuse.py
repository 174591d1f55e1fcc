"""Misuse of the public API: every bad call raises a typed LoRAError (that is also the built-in type a user
would catch) and leaves the adapter table, the slots and the current batch's outputs as they were.

Runs on CPU tensors with the one-layer Llama and the PEFT adapters of tests/test_manager.py.
"""

from __future__ import annotations

import copy
import threading
import types
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import assert_close
from test_manager import SPECS, Bank, one_layer_llama, peft_model_of, saved, serve

import torch_xla_lora as tl


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Bank:
    clean = one_layer_llama()
    peft_model = peft_model_of(clean, SPECS)
    return Bank(clean, peft_model, saved(peft_model, tmp_path_factory.mktemp("bank")))


def _overflowing_a(bank: Bank) -> dict:
    """A PEFT adapter whose A holds a value beyond float16's range (finite in float32)."""
    source = bank.source("a")
    key = next(k for k in source["state_dict"] if k.endswith("q_proj.lora_A.weight"))
    tensor = source["state_dict"][key].clone()
    tensor[0, 0] = 1e6
    return {**source, "state_dict": {**source["state_dict"], key: tensor}}


def _with_tensor(bank: Bank, kind: str) -> dict:
    """Adapter "c" with its first tensor replaced by a sparse or a meta (data-less) copy."""
    source = bank.source("c")
    key = next(iter(source["state_dict"]))
    tensor = source["state_dict"][key]
    bad = tensor.to_sparse() if kind == "sparse" else torch.empty_like(tensor, device="meta")
    return {**source, "state_dict": {**source["state_dict"], key: bad}}


# id -> (error, built-in type it must also be, the failing call (served, bank))
CASES: dict[str, tuple[type[tl.LoRAError], type[Exception], Callable]] = {
    "load_name_zero": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.load_adapter(0, **b.source("c"))),
    "load_name_none": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.load_adapter(None, **b.source("c"))),
    "load_name_true": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.load_adapter(True, **b.source("c"))),
    "load_name_empty": (tl.ArgumentError, ValueError, lambda s, b: s.lora.load_adapter("", **b.source("c"))),
    "load_no_source": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.load_adapter("c")),
    "load_path_and_state": (
        tl.ArgumentTypeError,
        TypeError,
        lambda s, b: s.lora.load_adapter("c", b.dirs["c"], **b.source("c")),
    ),
    "load_path_int": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.load_adapter("c", 17)),
    "load_state_dict_list": (
        tl.ArgumentTypeError,
        TypeError,
        lambda s, b: s.lora.load_adapter("c", state_dict=[1], config=b.source("c")["config"]),
    ),
    "load_config_int": (
        tl.ArgumentTypeError,
        TypeError,
        lambda s, b: s.lora.load_adapter("c", state_dict=b.source("c")["state_dict"], config=3),
    ),
    "pin_int": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.pin(0)),
    "unpin_none": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.unpin(None)),
    "remove_empty": (tl.ArgumentError, ValueError, lambda s, b: s.lora.remove("")),
    "batch_str": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.set_batch("ab")),
    "batch_generator": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.set_batch(n for n in ["c"])),
    "batch_bool_slot": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.set_batch([True, None])),
    "batch_float": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.set_batch([0.0, None])),
    "batch_empty_name": (tl.ArgumentError, ValueError, lambda s, b: s.lora.set_batch(["", None])),
    # A bad seq_len must fail before the new batch's "c" and "d" evict the current batch's "a" and "b".
    "seq_len_str": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.set_batch(["c", "d"], seq_len="5")),
    "seq_len_float": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.set_batch(["c", "d"], seq_len=5.0)),
    "seq_len_bool": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.set_batch(["c", "d"], seq_len=True)),
    "seq_len_zero": (tl.ArgumentError, ValueError, lambda s, b: s.lora.set_batch(["c", "d"], seq_len=0)),
    "seq_len_negative": (tl.ArgumentError, ValueError, lambda s, b: s.lora.set_batch(["c", "d"], seq_len=-3)),
    "tokens_float_tensor": (
        tl.ArgumentTypeError,
        TypeError,
        lambda s, b: s.lora.set_token_adapters(torch.zeros(15)),
    ),
    "tokens_bool_entry": (tl.ArgumentTypeError, TypeError, lambda s, b: s.lora.set_token_adapters([False] * 15)),
    "load_sparse_tensor": (
        tl.InvalidAdapterError,
        ValueError,
        lambda s, b: s.lora.load_adapter("c", **_with_tensor(b, "sparse")),
    ),
    "load_meta_tensor": (
        tl.InvalidAdapterError,
        ValueError,
        lambda s, b: s.lora.load_adapter("c", **_with_tensor(b, "meta")),
    ),
    "a_overflows_float16": (
        tl.InvalidAdapterError,
        ValueError,
        lambda s, b: s.lora.load_adapter("a", **_overflowing_a(b)),
    ),
    "patch_patched_model": (tl.AlreadyPatchedError, ValueError, lambda s, b: tl.patch_model(s.model)),
    "patch_config_dict": (tl.ArgumentTypeError, TypeError, lambda s, b: tl.patch_model(copy.deepcopy(b.clean), {})),
    "patch_no_match": (
        tl.ConfigError,
        ValueError,
        lambda s, b: tl.patch_model(copy.deepcopy(b.clean), tl.LoRAConfig(target_modules=["nothing"])),
    ),
    "patch_options_without_mesh": (
        tl.ArgumentTypeError,
        TypeError,
        lambda s, b: tl.patch_model(copy.deepcopy(b.clean), fully_sharded=True),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_misuse_raises_a_typed_error_and_changes_nothing(bank, case):
    error, builtin, call = CASES[case]
    # float16 adapters (the overflow case); max_loras=2: a and b fill the slots, so c and d would evict them.
    served = serve(bank, load=("a", "b", "c", "d"), dtype=torch.float16)
    served.lora.set_batch(["a", None, "b"])
    adapters, modules = list(served.lora.adapters().items()), dict(served.model.named_modules())
    outputs = served.outputs(3)
    with pytest.raises(tl.LoRAError) as err:
        call(served, bank)
    assert type(err.value) is error, repr(err.value)
    assert isinstance(err.value, builtin)
    assert list(served.lora.adapters().items()) == adapters
    assert dict(served.model.named_modules()) == modules
    assert torch.equal(served.outputs(3), outputs)
    served.lora.set_batch(["a", None, "b"])  # nothing was staged either: the slots still hold a and b
    assert torch.equal(served.outputs(3), outputs)


# id -> (error, built-in type it must also be, warmup's keyword arguments; "step" is added when not given)
WARMUP_CASES: dict[str, tuple[type[tl.LoRAError], type[Exception], dict]] = {
    "batch_sizes_int": (tl.ArgumentTypeError, TypeError, {"batch_sizes": 4, "seq_lens": [5]}),
    "batch_sizes_str": (tl.ArgumentTypeError, TypeError, {"batch_sizes": "4", "seq_lens": [5]}),
    "batch_sizes_set": (tl.ArgumentTypeError, TypeError, {"batch_sizes": {4}, "seq_lens": [5]}),
    "batch_sizes_bool": (tl.ArgumentTypeError, TypeError, {"batch_sizes": [True], "seq_lens": [5]}),
    "batch_sizes_float": (tl.ArgumentTypeError, TypeError, {"batch_sizes": [2, 4.0], "seq_lens": [5]}),
    "batch_sizes_empty": (tl.ArgumentError, ValueError, {"batch_sizes": [], "seq_lens": [5]}),
    "batch_sizes_zero": (tl.ArgumentError, ValueError, {"batch_sizes": [2, 0], "seq_lens": [5]}),
    "seq_lens_none": (tl.ArgumentTypeError, TypeError, {"batch_sizes": [2], "seq_lens": None}),
    "seq_lens_bool": (tl.ArgumentTypeError, TypeError, {"batch_sizes": [2], "seq_lens": [False]}),
    "seq_lens_tensor_entry": (tl.ArgumentTypeError, TypeError, {"batch_sizes": [2], "seq_lens": [torch.tensor(5.0)]}),
    "seq_lens_empty": (tl.ArgumentError, ValueError, {"batch_sizes": [2], "seq_lens": ()}),
    "seq_lens_negative": (tl.ArgumentError, ValueError, {"batch_sizes": [2], "seq_lens": [5, -1]}),
    "step_not_callable": (tl.ArgumentTypeError, TypeError, {"batch_sizes": [2], "seq_lens": [5], "step": 3}),
    "progress_str": (tl.ArgumentTypeError, TypeError, {"batch_sizes": [2], "seq_lens": [5], "progress": "no"}),
    "host_metadata_int": (tl.ArgumentTypeError, TypeError, {"batch_sizes": [2], "seq_lens": [5], "host_metadata": 1}),
}


@pytest.mark.parametrize("case", WARMUP_CASES)
def test_warmup_misuse_raises_a_typed_error_and_runs_nothing(bank, case):
    error, builtin, kwargs = WARMUP_CASES[case]
    served = serve(bank, load=("a", "b", "c"))
    served.lora.set_batch(["a", None])
    served.lora.pin("c")  # evicts b from slot 1: a staged write that warm-up would run
    manager = served.lora.manager
    adapters, applied, slots = served.lora.adapters(), list(manager._applied), served.lora.context.slots
    outputs, calls = served.outputs(2), []
    with pytest.raises(tl.LoRAError) as err:
        served.lora.warmup(**{"step": calls.append, "progress": False, **kwargs})
    assert type(err.value) is error, repr(err.value)
    assert isinstance(err.value, builtin)
    assert calls == []  # no bucket ran
    assert all(now is before for now, before in zip(manager._applied, applied, strict=True))  # write still staged
    assert served.lora.adapters() == adapters and served.lora.context.slots is slots
    assert torch.equal(served.outputs(2), outputs)


def test_warmup_refuses_a_bucket_that_does_not_split_over_the_data_axis(bank):
    """On a mesh every forward splits its tokens over the data axis: a bucket of 3 x 1 tokens cannot run on 2
    data shards. The placement is stood in for here (only its data axis is read); tests/test_sharding.py runs
    real meshes."""
    served = serve(bank, load=("a",))
    layer = next(iter(served.lora.layers.values()))
    layer.tensor_parallel = types.SimpleNamespace(data_shards=2, data_axis="data")
    calls = []
    with pytest.raises(tl.ShardingError, match="3 tokens does not split evenly over data axis 'data' of size 2"):
        served.lora.warmup([2, 3], [1], step=calls.append, progress=False)
    assert calls == []


@pytest.mark.parametrize("sizes", [(2,), range(1, 3), (np.int64(2),)], ids=["tuple", "range", "numpy_int"])
def test_warmup_accepts_sequences_of_ints(bank, sizes):
    served = serve(bank, load=("a",))
    calls = []
    assert served.lora.warmup(sizes, [5], step=calls.append, progress=False) == 0  # nothing compiles on CPU
    assert [tuple(ids.shape) for ids in calls] == [(size, 5) for size in sizes]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("max_loras", True, tl.ConfigTypeError),
        ("max_rank", 2.0, tl.ConfigTypeError),
        ("max_cpu_adapters", "8", tl.ConfigTypeError),
        ("max_rank", 0, tl.ConfigError),
        ("dtype", "float16", tl.ConfigTypeError),
        ("dtype", torch.int8, tl.ConfigError),
        ("target_modules", "q_proj(", tl.ConfigError),
        ("target_modules", [3], tl.ConfigTypeError),
        ("target_modules", [], tl.ConfigError),
        ("target_modules", 5, tl.ConfigTypeError),
        ("backend", None, tl.ConfigTypeError),
    ],
)
def test_config_misuse_raises_a_typed_error(field, value, error):
    with pytest.raises(tl.ConfigError) as err:
        tl.LoRAConfig(**{field: value})
    assert type(err.value) is error, repr(err.value)
    assert isinstance(err.value, TypeError if error is tl.ConfigTypeError else ValueError)


def test_config_error_is_importable_from_both_modules():
    from torch_xla_lora.config import ConfigError

    assert ConfigError is tl.ConfigError and issubclass(ConfigError, tl.LoRAError)


def test_unpatched_handle_raises_a_typed_error(bank):
    served = serve(bank, load=("a",))
    served.lora.unpatch()
    with pytest.raises(tl.UnpatchedError):
        served.lora.set_batch(["a"])


# --- eviction protection ends with the batch -----------------------------------------------------------------


def test_clear_batch_releases_the_batch_protection(bank):
    served = serve(bank)
    served.lora.set_batch(["a", "b"])  # max_loras=2: both slots protected
    served.lora.clear_batch()
    served.lora.pin("c")  # evicts a (least recently used)
    assert_close(served.run(["c", None, "b"]), bank.expected(["c", None, "b"]))


def test_remove_releases_the_adapters_protection_but_not_its_rows(bank):
    served = serve(bank)
    served.lora.set_batch(["a", None, "b"])
    served.lora.remove("a")
    slot = served.lora.pin("c")  # takes a's slot: staged, written at the next set_batch
    assert slot == 0 and served.lora.adapters()["c"]["slot"] == 0
    assert_close(served.outputs(3), bank.expected(["a", None, "b"]))  # a's rows still run a
    assert_close(served.run(["c", None, "b"]), bank.expected(["c", None, "b"]))


# --- the race of the issue: remove(x) and pin(z) landing inside set_batch ---------------------------------------


def test_remove_and_pin_during_set_batch_never_give_a_row_another_adapter(bank, monkeypatch):
    """Another thread's remove("a") + pin("c") issued while set_batch(["a", ...]) is between its slot choice and
    its send must wait for the send: a's rows run a, never c."""
    served = serve(bank)
    served.lora.set_batch(["b", None])
    done, errors = threading.Event(), []

    def intruder() -> None:
        try:
            served.lora.remove("a")
            served.lora.pin("c")
        except BaseException as exc:  # reported below
            errors.append(exc)
        done.set()

    original = served.lora._host_metadata

    def metadata_then_race(slots, seq_len):  # inside set_batch, after the slots were chosen
        thread = threading.Thread(target=intruder, daemon=True)
        thread.start()
        assert not done.wait(0.2), "another thread changed the manager inside set_batch"
        return original(slots, seq_len)

    monkeypatch.setattr(served.lora, "_host_metadata", metadata_then_race)
    served.lora.set_batch(["a", None, "b"])
    monkeypatch.undo()
    assert done.wait(10) and errors == []
    assert_close(served.outputs(3), bank.expected(["a", None, "b"]))
    assert served.lora.adapters()["c"]["pinned"] and "a" not in served.lora.adapters()
    assert_close(served.run(["c", "b", None]), bank.expected(["c", "b", None]))


def test_set_batch_refuses_a_batch_before_evicting_the_current_one(bank):
    served = serve(bank)
    served.lora.set_batch(["a", "b"])
    before = served.lora.adapters()
    with pytest.raises(tl.ArgumentError):
        served.lora.set_batch(["c", "d"], seq_len=0)
    assert served.lora.adapters() == before
    assert_close(served.outputs(2), bank.expected(["a", "b"]))


@pytest.mark.parametrize("seq_len", [None, 5, np.int64(5)], ids=["none", "int", "numpy_int"])
def test_set_batch_accepts_a_valid_seq_len_on_cpu(bank, seq_len):
    served = serve(bank)
    served.lora.set_batch(["a", None, "b"], seq_len=seq_len)
    assert_close(served.outputs(3), bank.expected(["a", None, "b"]))


# --- apply_pending: staged writes reach the device before the next batch, except under the current batch -----


def test_apply_pending_writes_staged_slots_now_but_not_those_the_batch_reads(bank):
    """Catches an apply_pending that writes nothing (the pinned slot stays zero, the count is 0) and one that
    also writes the slots the current batch reads (a's rows would switch to the reloaded weights)."""
    served = serve(bank)
    served.lora.set_batch(["a", None])  # a in slot 0; slot 1 empty (max_loras=2)
    outputs = served.outputs(2)
    slot = served.lora.pin("c")  # staged into the free slot
    served.load("a", "a_v2")  # a reload, staged into slot 0, which the current batch reads
    layer = served.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert slot == 1 and not layer.lora_b[slot].any()  # nothing written yet

    assert served.lora.apply_pending() == 1
    # The slot now holds c: B^T A (scaling folded into B) is PEFT's own delta weight of c for this module.
    expected = bank.peft.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").get_delta_weight("c")
    assert_close(layer.lora_b[slot].T @ layer.lora_a[slot], expected)
    assert torch.equal(served.outputs(2), outputs)  # a's rows still run the old a
    assert served.lora.apply_pending() == 0  # the reload waits for the batch to change
    assert_close(served.run(["a", "c", None]), bank.expected(["a_v2", "c", None]))


@pytest.mark.parametrize("scaling", [float("inf"), float("-inf"), float("nan")])
def test_ops_refuse_a_non_finite_scaling(scaling, xla_device):
    """On XLA devices a non-finite scaling gives NaN to rows without an adapter (0 * Inf): every op that
    takes one refuses it with ArgumentError, before anything runs, on CPU and XLA tensors alike."""
    x, a, b, base = torch.randn(3, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.randn(3, 6)
    w, idx = torch.randn(6, 8), torch.tensor([0, -1, 1], dtype=torch.int32)
    calls = {
        "shrink": lambda t: tl.bgmv_shrink(t["x"], t["a"], t["idx"], scaling),
        "shrink_expand": lambda t: tl.bgmv_shrink_expand(t["x"], t["a"], t["b"], t["base"], t["idx"], scaling),
        "linear_lora": lambda t: tl.linear_lora(t["x"], t["w"], None, t["a"], t["b"], t["idx"], scaling),
        "weight_grad": lambda t: tl.bgmv_weight_grad(t["x"], t["base"], t["idx"], 2, scaling),
    }
    for device in ("cpu", xla_device):
        tensors = {k: v.to(device) for k, v in {"x": x, "a": a, "b": b, "base": base, "w": w, "idx": idx}.items()}
        for call in calls.values():
            with pytest.raises(tl.ArgumentError, match="scaling must be a finite number"):
                call(tensors)


def test_an_empty_slot_named_by_number_never_runs_an_adapter_the_batch_loads(bank):
    """A row naming an empty slot by number runs the base model; if the same batch would load a named
    adapter into that slot, set_batch refuses (ArgumentError) and changes nothing, instead of giving
    the numbered row that adapter."""
    served = serve(bank, load=("a", "b"))
    served.lora.set_batch(["a"])  # "a" in slot 0, slot 1 empty
    (slot,) = {0, 1} - {served.lora.adapters()["a"]["slot"]}
    adapters, outputs = dict(served.lora.adapters()), served.outputs(1)
    with pytest.raises(tl.ArgumentError, match=f"slot {slot} is named by number and empty"):
        served.lora.set_batch([slot, "b"])
    assert dict(served.lora.adapters()) == adapters
    assert torch.equal(served.outputs(1), outputs)
    served.lora.set_batch([slot, "a"])  # no conflict: the numbered empty slot is a base row
    assert_close(served.outputs(2), bank.expected([None, "a"]))


def _op_arguments() -> dict[str, dict]:
    """A valid call of every exported op, by keyword, on CPU tensors."""
    g = torch.Generator().manual_seed(0)
    x, s, base = torch.randn(3, 8, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 6, generator=g)
    a, b = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 6, generator=g)
    w, bias = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    idx = torch.tensor([0, -1, 1], dtype=torch.int32)
    return {
        "bgmv_shrink": {"inputs": x, "lora_a": a, "lora_indices": idx, "scaling": 0.5},
        "bgmv_expand": {"inputs": s, "lora_b": b, "base": base, "lora_indices": idx},
        "bgmv_expand_slice": {"inputs": s, "lora_b": b[..., :3], "base": base, "lora_indices": idx, "slice_offset": 2},
        "bgmv_shrink_expand": {"inputs": x, "lora_a": a, "lora_b": b, "base": base, "lora_indices": idx},
        "linear_lora": {"inputs": x, "weight": w, "bias": bias, "lora_a": a, "lora_b": b, "lora_indices": idx},
        "bgmv_weight_grad": {"left": s, "right": x, "lora_indices": idx, "num_slots": 2, "scaling": 0.5},
    }


TENSOR_ARGUMENTS = [
    (op, name)
    for op, arguments in _op_arguments().items()
    for name, value in arguments.items()
    if isinstance(value, torch.Tensor)
]


@pytest.mark.parametrize(("op", "argument"), TENSOR_ARGUMENTS, ids=[f"{op}-{name}" for op, name in TENSOR_ARGUMENTS])
def test_ops_refuse_a_non_tensor_where_a_tensor_is_required(op, argument):
    """A Python list for a tensor argument (the indices, above all) raises ArgumentTypeError naming the argument
    and what was given, instead of the dispatcher's RuntimeError; a valid call gives what torch.ops gives."""
    valid = _op_arguments()[op]
    assert torch.equal(getattr(tl, op)(**valid), getattr(torch.ops.xla_lora, op)(**valid))
    bad = {**valid, argument: valid[argument].tolist()}
    message = rf"^{op}: {argument} must be a torch\.Tensor.*, got list \["
    with pytest.raises(tl.ArgumentTypeError, match=message) as error:
        getattr(tl, op)(**bad)
    assert isinstance(error.value, TypeError)
    with pytest.raises(RuntimeError, match="Expected a value of type"):  # what the raw op gives (torch's own)
        getattr(torch.ops.xla_lora, op)(**bad)
