"""Host-built batch metadata: built once per batch, shared by every layer, same results, no device sort."""

import copy

import peft
import pytest
import torch
import torch_xla
from conftest import tiny_llama

import torch_xla_lora as tl

BATCH, SEQ = 4, 8


@pytest.fixture(scope="module")
def llama_and_adapters():
    base = tiny_llama()
    adapters, peft_model = {}, None
    for i, rank in enumerate((4, 8)):
        config = peft.LoraConfig(target_modules="all-linear", init_lora_weights=False, r=rank, lora_alpha=8)
        if peft_model is None:
            peft_model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=f"a{i}")
        else:
            peft_model.add_adapter(f"a{i}", config)
        adapters[f"a{i}"] = (peft.get_peft_model_state_dict(peft_model, adapter_name=f"a{i}"), config)
    return base, adapters, peft_model.eval()


def _patched(llama_and_adapters, device, backend, base_fusion=False):
    base, adapters, _ = llama_and_adapters
    model = copy.deepcopy(base).to(device)
    lora = tl.patch_model(model, tl.LoRAConfig(max_loras=3, max_rank=8, backend=backend, base_fusion=base_fusion))
    for name, (state_dict, config) in adapters.items():
        lora.load_adapter(name, state_dict=state_dict, config=config)
    return model, lora


def _ids():
    return torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_host_metadata_matches_device_grouping_and_peft(llama_and_adapters, xla_device, backend):
    model, lora = _patched(llama_and_adapters, xla_device, backend)
    mix = ["a0", None, "a1", "a0"]
    with torch.no_grad():
        lora.set_batch(mix)
        on_device = model(_ids().to(xla_device)).logits.cpu()
        lora.set_batch(mix, seq_len=SEQ)
        assert lora.context.metadata, "seq_len must make the host build the grouping"
        from_host = model(_ids().to(xla_device)).logits.cpu()
        expected = llama_and_adapters[2](_ids(), adapter_names=[n or "__base__" for n in mix]).logits
    torch.testing.assert_close(from_host, on_device, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_host, expected, atol=1e-4, rtol=1e-4)


def _sorts_in_step(model, xla_device) -> int:
    """Counts the sorts in one step's graph without compiling or running it.

    The adapters' pending loads run first, so the step's graph is all that is left pending, and it is dropped
    with the logits (nothing else holds it).
    """
    torch_xla.sync()
    with torch.no_grad():
        logits = model(_ids().to(xla_device)).logits
    return torch_xla._XLAC._get_xla_tensors_hlo([logits]).count(" sort(")


@pytest.mark.parametrize("backend, base_fusion", [("xla", False), ("xla", True), ("pallas", True)])
def test_host_metadata_removes_every_device_sort(llama_and_adapters, xla_device, backend, base_fusion):
    """base_fusion: linear_lora takes the host grouping too (off TPU its kernel plans like the shrink-expand op)."""
    model, lora = _patched(llama_and_adapters, xla_device, backend, base_fusion)
    lora.set_batch(["a0", "a1", None, "a1"])
    assert _sorts_in_step(model, xla_device) >= 14  # one per LoRA layer: 7 per decoder layer
    lora.set_batch(["a0", "a1", None, "a1"], seq_len=SEQ)
    assert _sorts_in_step(model, xla_device) == 0


def test_layers_with_the_same_plan_share_one_metadata_tensor(llama_and_adapters, xla_device):
    _, lora = _patched(llama_and_adapters, xla_device, "xla")
    lora.set_batch(["a0", "a1", None, "a1"], seq_len=SEQ)
    tensors = {id(t) for t in lora.context.metadata.values()}
    assert len(lora.context.metadata) >= 3 and len(tensors) == 1


def test_token_adapters_use_host_metadata(llama_and_adapters, xla_device):
    model, lora = _patched(llama_and_adapters, xla_device, "xla")
    lora.set_token_adapters(["a0"] * 16 + [None] * 8 + ["a1"] * 8)
    assert _sorts_in_step(model, xla_device) == 0


def test_warmup_with_host_metadata_serves_without_recompiling(llama_and_adapters, xla_device):
    model, lora = _patched(llama_and_adapters, xla_device, "xla")

    def step(ids):  # served and warmed alike: a graph's outputs are part of its identity (logits, not the cache)
        return model(ids).logits

    lora.warmup([BATCH], [SEQ], step=step, progress=False, host_metadata=True)
    with tl.assert_no_recompile():
        for mix in (["a0", None, "a1", "a0"], [None] * 4, ["a1"] * 4):
            lora.set_batch(mix, seq_len=SEQ)
            with torch.no_grad():
                logits = step(_ids().to(xla_device))
                torch_xla.sync()
            del logits


def test_metadata_rejected_off_xla():
    with pytest.raises(tl.ShapeError, match="metadata is for XLA tensors only"):
        tl.bgmv_shrink_expand(
            torch.zeros(2, 8),
            torch.zeros(1, 2, 8),
            torch.zeros(1, 2, 4),
            torch.zeros(2, 4),
            torch.zeros(2, dtype=torch.int32),
            1.0,
            "auto",
            torch.zeros(5, dtype=torch.int32),
        )


# Batches that fit one token block (decode) take a shortcut on the host: np.unique
# instead of the general sorts. Sampled: one row per kind of block (mixed with base
# rows, one adapter, only base, every slot distinct), at token blocks 8 and 128.
ONE_BLOCK = {
    "mixed": [3, -1, 0, 3, 7, 0, -1, 5],
    "one adapter": [2] * 5,
    "base only": [-1] * 6,
    "all distinct": list(range(8)),
    "out of range": [9, 1, -4, 1],
}


@pytest.mark.parametrize("block", [8, 128])
@pytest.mark.parametrize("lanes", [1, 4, 8])
@pytest.mark.parametrize("case", list(ONE_BLOCK))
def test_one_block_metadata_equals_the_general_builders(case, lanes, block):
    import numpy as np

    from torch_xla_lora.kernels import visits
    from torch_xla_lora.ops import _jax

    num_slots = 8
    padded = np.full(block, -1, np.int32)
    slots = np.array(ONE_BLOCK[case], np.int32)
    padded[: len(slots)] = np.where((slots >= 0) & (slots < num_slots), slots, -1)
    general = visits.pack(
        visits.build_lanes(padded, num_slots, block, lanes, xp=np), visits.build(padded, num_slots, block, xp=np), xp=np
    )
    got = _jax._one_block_packed(padded, num_slots, lanes)
    assert got.dtype == general.dtype
    np.testing.assert_array_equal(got, general)
