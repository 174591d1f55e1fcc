"""What building the slot tensors from trainable adapters costs on TPU, from libtpu's compile of torch_xla's own
graphs (deviceless; ``bench.slot_assembly``), against the training model's price (``tpu_train_model``).

A layer with trainable adapters builds its slot tensors from their parameters in the graph (``slot_factors``),
and the backward carries the slot gradients back. The training model prices both by
``tpu_train_model.slot_assembly_bytes``; the compiled programs must move those bytes through HBM. One child
process writes the HLO (torch_xla on the CPU device) and the bench compiles it for a v6e: about 25 seconds.
"""

import json
import subprocess
import sys

import pytest

from torch_xla_lora.bench import hlo_traffic, slot_assembly, tpu_model, tpu_train_model


@pytest.fixture(scope="module")
def rows():
    command = [sys.executable, "-m", "torch_xla_lora.bench.slot_assembly", "--quick", "--json", "--chips", "v6e"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(row["case"], row["direction"]): row for row in out}


@pytest.mark.parametrize("case", list(slot_assembly.CASES))
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_compiled_program_moves_the_bytes_the_model_prices(rows, case, direction):
    row = rows[case, direction]
    assert row["hbm_bytes"] == pytest.approx(row["model_bytes"], rel=0.02), row


def test_every_slot_trainable_backward_reads_only_the_adapters_rows(rows):
    """With every slot trainable the gradient of each parameter is a slice of the slot gradient, and XLA reads
    only that slice: below one read of the whole gradient, and what libtpu's own cost analysis counts (this
    program keeps nothing in VMEM, so its count is the HBM traffic, an independent check of ``hbm_bytes``)."""
    row = rows["every slot", "backward"]
    hidden, out_dim = row["widths"]
    whole_gradient = 2 * row["slots"] * slot_assembly.MAX_RANK * (hidden + out_dim)
    written = 4 * sum(row["ranks"]) * (hidden + out_dim)
    assert row["hbm_bytes"] < whole_gradient + written
    assert row["hbm_bytes"] == pytest.approx(row["libtpu_bytes_accessed"], rel=0.01)


def test_the_training_model_prices_its_slot_assembly_from_these_bytes():
    """``slot_assembly_seconds`` (what ``projection_train_costs`` charges) is the every-slot case's bytes at HBM
    bandwidth, and a layer with untrained slots costs more in both directions."""
    args = (4096, 14336, 64, 8, 240)
    every = tpu_train_model.slot_assembly_bytes(*args)
    scattered = tpu_train_model.slot_assembly_bytes(*args, every_slot=False)
    chip = tpu_model.CHIPS["v6e"]
    seconds = tpu_train_model.slot_assembly_seconds(chip, *args)
    assert seconds >= (every["forward"] + every["backward"]) / chip.hbm_bytes_per_s
    assert scattered["forward"] > every["forward"] and scattered["backward"] > every["backward"]


HLO = """\
%fused_computation (param_0: bf16[4,8,128], param_1: f32[]) -> f32[2,8,128] {
  %param_0 = bf16[4,8,128]{2,1,0} parameter(0)
  %slice.1 = bf16[2,8,128]{2,1,0} slice(%param_0), slice={[1:3], [0:8], [0:128]}
  %convert.1 = f32[2,8,128]{2,1,0} convert(%slice.1)
  %param_1 = f32[]{:S(6)} parameter(1)
  %broadcast.1 = f32[2,8,128]{2,1,0} broadcast(%param_1), dimensions={}
  ROOT %multiply.1 = f32[2,8,128]{2,1,0} multiply(%convert.1, %broadcast.1)
}

ENTRY %main (p0: bf16[4,8,128], p1: f32[], p2: f32[64,128]) -> (f32[2,8,128], f32[64,128]) {
  %p0 = bf16[4,8,128]{2,1,0} parameter(0)
  %p1 = f32[]{:T(128)} parameter(1)
  %p2 = f32[64,128]{1,0} parameter(2)
  %copy.1 = f32[]{:S(6)} copy(%p1)
  %fusion = f32[2,8,128]{2,1,0} fusion(%p0, %copy.1), kind=kLoop, calls=%fused_computation
  %copy-start = (f32[64,128]{1,0:S(1)}, f32[64,128]{1,0}, u32[]{:S(2)}) copy-start(%p2)
  %copy-done = f32[64,128]{1,0:S(1)} copy-done(%copy-start)
  %negate = f32[64,128]{1,0} negate(%copy-done)
  ROOT %tuple = (f32[2,8,128]{2,1,0}, f32[64,128]{1,0}) tuple(%fusion, %negate)
}
"""


def test_hbm_bytes_counts_slices_read_copies_once_and_nothing_in_vmem():
    sliced_read, fusion_write = 2 * 2 * 8 * 128, 4 * 2 * 8 * 128  # the fusion reads rows 1-2 of p0 only
    scalar_copy = 4  # p1 read from HBM, its copy written to SMEM
    prefetch = 4 * 64 * 128  # p2 into VMEM: one HBM read
    negate = 4 * 64 * 128  # reads VMEM (free), writes HBM
    assert slot_assembly.hbm_bytes(HLO) == sliced_read + fusion_write + scalar_copy + prefetch + negate


KERNEL_HLO = """HloModule kernels

%select_computation (param_0: f32[16,128], param_1: f32[16,128], param_2: pred[16,128]) -> f32[16,128] {
  %param_0 = f32[16,128]{1,0} parameter(0)
  %param_1 = f32[16,128]{1,0} parameter(1)
  %param_2 = pred[16,128]{1,0} parameter(2)
  ROOT %select.1 = f32[16,128]{1,0} select(%param_2, %param_0, %param_1)
}

ENTRY %main (p0: f32[16,128], p1: f32[16,128], p2: pred[16,128]) -> (f32[16,128], f32[16,128]) {
  %p0 = f32[16,128]{1,0} parameter(0)
  %p1 = f32[16,128]{1,0} parameter(1)
  %p2 = pred[16,128]{1,0} parameter(2)
  %shrink = f32[16,128]{1,0} custom-call(%p0), custom_call_target="tpu_custom_call"
  %bitcast.1 = f32[16,128]{1,0} bitcast(%shrink)
  %expand = f32[16,128]{1,0} custom-call(%bitcast.1, %p1), custom_call_target="tpu_custom_call"
  %other = f32[16,128]{1,0} custom-call(%p1), custom_call_target="SomethingElse"
  %fusion = f32[16,128]{1,0} fusion(%expand, %p1, %p2), kind=kLoop, calls=%select_computation
  %negate = f32[16,128]{1,0} negate(%other)
  ROOT %tuple = (f32[16,128]{1,0}, f32[16,128]{1,0}) tuple(%fusion, %negate)
}
"""


def test_after_kernels_names_the_ops_a_kernel_s_result_reaches():
    """What a program runs on a Pallas kernel's result: the next kernel through a view, a fusion by its body's ops;
    an op reading only a non-Mosaic custom call's result, or only parameters, is not counted."""
    assert hlo_traffic.after_kernels(KERNEL_HLO) == {"custom-call", "select"}
    selects_parameters = KERNEL_HLO.replace("fusion(%expand,", "fusion(%p0,")
    assert hlo_traffic.after_kernels(selects_parameters) == {"custom-call"}  # the shrink's result reaches the expand
