"""After warm-up, a serving loop compiles nothing: any adapter mix, loads, evictions, pins."""

import copy
import random

import peft
import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
from conftest import tiny_llama

import torch_xla_lora as tl

NUM_ADAPTERS, MAX_LORAS, BATCH, SEQ = 6, 3, 4, 8


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def adapters(base_model):
    """name -> (state_dict, LoraConfig) written by PEFT, on every linear layer, lm_head and embeddings."""
    out = {}
    for i in range(NUM_ADAPTERS):
        config = peft.LoraConfig(
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            + ["lm_head", "embed_tokens"],
            init_lora_weights=False,
            r=4 + 4 * (i % 3),
            lora_alpha=8,
        )
        model = peft.get_peft_model(copy.deepcopy(base_model), config)
        out[f"a{i}"] = (peft.get_peft_model_state_dict(model), config)
    return out


def _compilations() -> int:
    """XLA compilations so far, read from torch_xla's metrics (not through the library's counter)."""
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def _transfers_from_device() -> int:
    data = met.metric_data("TransferFromDeviceTime")
    return int(data[0]) if data else 0


@pytest.mark.parametrize("mode", ["lazy", "compiled"])
def test_serving_loop_compiles_nothing_after_warmup(mode, base_model, adapters, xla_device):
    """Warm-up compiles the bucket and the slot-write graph (the latter once per process), and reports what it
    compiled; then 32 steps of loads, pins, evictions and mixes compile nothing and copy nothing to the host.

    Warm-up must compile something here (this test's graph shapes are its own), which shows the counters see this
    test's compilations: a loop that compiled would fail, and so would a warm-up that compiled per slot or missed
    the graph the loop runs.
    """
    model = copy.deepcopy(base_model).to(xla_device)
    target = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]
    lora = tl.patch_model(model, tl.LoRAConfig(max_loras=MAX_LORAS, max_rank=16, target_modules=target))
    forward = lambda ids: model(ids).logits
    step = forward if mode == "lazy" else torch.compile(forward, backend="openxla")
    before = _compilations()
    made = lora.warmup([BATCH], [SEQ], step=step, progress=False)
    assert made == _compilations() - before
    assert 1 <= made <= 2
    rng = random.Random(0)
    names = list(adapters)
    with tl.assert_no_recompile() as counter:
        for i in range(32):
            name = names[i % NUM_ADAPTERS]
            lora.load_adapter(name, state_dict=adapters[name][0], config=adapters[name][1])  # load or reload
            if i % 7 == 3:
                lora.pin(name)
            if i % 7 == 5:
                lora.unpin(names[(i - 2) % NUM_ADAPTERS])
            if i % 11 == 10:
                lora.remove(names[(i + 1) % NUM_ADAPTERS])
            loaded = [n for n, info in lora.adapters().items() if not info["pinned"]] or list(lora.adapters())
            batch = [rng.choice(loaded + [None]) for _ in range(BATCH)]
            try:
                lora.set_batch(batch)
            except tl.NoFreeSlotError:  # more distinct adapters than free slots: serve them in two batches
                lora.set_batch([batch[0]] * BATCH)
            before = _transfers_from_device()
            with torch.no_grad():
                logits = step(torch.randint(0, 64, (BATCH, SEQ)).to(xla_device))
                torch_xla.sync()
            assert _transfers_from_device() == before, "the forward pass must not copy device data to the host"
            del logits
        assert counter.count == 0


def test_assert_no_recompile_raises_and_names_count(xla_device):
    x = torch.ones(3, device=xla_device)
    with pytest.raises(tl.RecompilationError, match=r"^1 XLA compilation\(s\) happened inside"):
        with tl.assert_no_recompile():
            y = x * 17.5 + torch.arange(3, device=xla_device)  # a graph this process has not compiled
            torch_xla.sync()
            del y


def test_compile_counter_counts(xla_device):
    counter = tl.CompileCounter()
    y = torch.full((5,), 3.25, device=xla_device).cumsum(0)
    torch_xla.sync()
    assert counter.count == 1
    del y
