"""Compile cost flat in the number of slots: the step's HLO does not grow with max_loras.

The graphs are traced, not compiled: the HLO text of the forward is what XLA would
compile, and tracing it executes nothing (checked below), so the step is that one graph.
"""

import copy
import re

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
from conftest import tiny_llama

import torch_xla_lora as tl

RANK = 16
LANE_SLOTS = 128 // RANK  # at most this many slots, the XLA-native mixing blocks use the slot buffers as lanes
SLOT_COUNTS = (LANE_SLOTS, LANE_SLOTS + 1, 64)


def _executions() -> int:
    data = met.metric_data("ExecuteTime")
    return int(data[0]) if data else 0


def _step_hlo(base_model, max_loras: int, device) -> tuple[str, int]:
    """(HLO text of one forward with every slot and the base model in the batch, graphs executed while tracing it)."""
    model = copy.deepcopy(base_model).to(device)
    target = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]
    lora = tl.patch_model(
        model,
        tl.LoRAConfig(max_loras=max_loras, max_rank=RANK, target_modules=target, max_cpu_adapters=max(max_loras, 16)),
    )
    lora.set_token_adapters(torch.arange(32, dtype=torch.int32) % (max_loras + 1) - 1)
    ids = torch.zeros(4, 8, dtype=torch.long).to(device)
    torch_xla.sync()  # the patching's pending writes, so that the count below sees the forward alone
    before = _executions()
    with torch.no_grad():
        logits = model(ids).logits
    executed = _executions() - before
    return torch_xla._XLAC._get_xla_tensors_hlo([logits]), executed


def _instructions(hlo: str) -> int:
    return sum(1 for line in hlo.splitlines() if re.match(r"\s+(ROOT )?%?[\w.\-]+ = ", line))


@pytest.fixture(scope="module")
def steps(xla_device) -> dict[int, tuple[str, int]]:
    base_model = tiny_llama()
    return {slots: _step_hlo(base_model, slots, xla_device) for slots in SLOT_COUNTS}


def test_step_is_one_graph_whatever_the_slots(steps):
    """Tracing the forward runs no graph: no layer reads a device value on the host (a ``.item()``, a
    ``.cpu()``) or syncs part-way, which would cut the step into several graphs, some per slot count."""
    for slots, (hlo, executed) in steps.items():
        assert executed == 0, (slots, executed)
        assert _instructions(hlo) > 1000, slots  # the parse found the whole patched model's graph


def test_step_hlo_flat_in_slots(steps):
    """Above 128 // R slots the graph does not grow with the slots (within 5% from 9 to 64): no
    per-slot unrolling, no one-hot over the slots. A formulation whose graph grows with L fails here."""
    sizes = {slots: _instructions(hlo) for slots, (hlo, _) in steps.items()}
    assert abs(sizes[64] - sizes[LANE_SLOTS + 1]) <= 0.05 * sizes[LANE_SLOTS + 1], sizes


def test_step_hlo_smaller_with_gather_free_lanes(steps):
    """At most 128 // R slots (8 at rank 16) the XLA-native backend's mixing blocks take the slot
    buffers as lanes without a gather: the graph is about a fifth smaller than with one slot more
    (docs/performance.md). Fails if the lane path is lost (same size) or taken past 128 // R slots."""
    sizes = {slots: _instructions(hlo) for slots, (hlo, _) in steps.items()}
    ratio = sizes[LANE_SLOTS] / sizes[LANE_SLOTS + 1]
    assert 0.7 <= ratio <= 0.9, sizes
