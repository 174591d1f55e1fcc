"""The fused shrink-expand op's choice between its fused kernel and the separate shrink and expand kernels by
modelled cost (``fused.plan_call`` through ``kernels.cost``), the separate kernels' walk worked out by hand,
and the separate kernels on lane-padded buffers (a choice the cost rule makes reachable) against float64."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from test_reference import _lora64

import torch_xla_lora as tl
from torch_xla_lora.bench import tpu_model
from torch_xla_lora.kernels import block_sizes, cost, fused, shrink

# Round figures so the walk can be worked out by hand; plans are v5e's (output tiles of at most 2048,
# reduction tiles of at most 4096, 256-token blocks from 129 tokens).
FIGURES = cost.Figures(hbm_bytes_per_s=1e9, peak_flops=1e12, mxu_width=256, step_overhead_s=1e-6)

# (T, D, Dout, R, L, dtype, generation): shapes the two kernels are modelled far apart on, both ways.
CASES = [
    (8192, 4096, 4096, 64, 1, jnp.bfloat16, "v5e"),  # one adapter over 32 blocks: fused re-reads it per block
    (2048, 28672, 8192, 64, 16, jnp.float32, "v4"),  # fused shrunk to 8-token blocks to fit v4's VMEM
    (256, 72, 2048, 64, 1, jnp.float32, "cpu"),  # the interpret-mode case below
    (256, 4096, 4096, 16, 8, jnp.bfloat16, "v6e"),  # 8 adapters in one block: one laned pass vs 8 visits
    (16384, 2880, 5760, 16, 256, jnp.bfloat16, "v5e"),  # gpt-oss-20b's up projection, 4,096 tokens top-4
    (1024, 4096, 14336, 16, 16, jnp.bfloat16, "v6e"),
]


def test_plan_call_runs_the_kernel_of_least_modelled_cost():
    """The planner's flag is the comparison of the two kernels' modelled times on the batch it prices
    (every slot on an equal contiguous run of tokens); the cases hold shapes each way, so a planner that
    always fuses where the plan fits (the earlier rule) or never does fails here."""
    choices = []
    for num_tokens, hidden, out_dim, rank, num_slots, dtype, generation in CASES:
        slots = cost.typical_slots(num_tokens, num_slots)
        fused_s = cost.fused_walk(slots, hidden, out_dim, rank, num_slots, dtype, generation).seconds
        separate_s = cost.separate_walk(
            slots, hidden, out_dim, rank, num_slots, dtype, generation, lane_padded=True
        ).seconds
        sizes, lanes, run_fused = fused.plan_call(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
        assert run_fused == (fused_s <= separate_s), (num_tokens, hidden, out_dim, generation, fused_s, separate_s)
        if not run_fused:  # the separate kernels' plan: the tuning table's tiles, one lane
            assert lanes == 1 and sizes.tokens == block_sizes.choose(num_tokens, hidden, out_dim, generation).tokens
        choices.append(run_fused)
    assert True in choices and False in choices


def test_typical_slots_spread_every_slot_in_equal_runs():
    assert cost.typical_slots(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert cost.typical_slots(4, 8).tolist() == [0, 2, 4, 6]  # fewer tokens than slots: one token each
    assert cost.typical_slots(5, 1).tolist() == [0] * 5


def test_separate_walk_by_hand_with_reduction_and_output_tiles():
    """512 tokens (two 256-token blocks on v5e): block 0 on slots 0 and 1, block 1 on slot 1, so 3 visits.
    D = 8192 is reduced in 4 tiles of 2048 and Dout = 4096 written in 2 tiles of 2048 (v5e's maxima).

    Shrink, grid (visits, k): the x block and A's tile change at every step (12 each), the codes and the
    [256, R] products at each of the 2 blocks. Expand, grid (n, visits): visit blocks 0, 0, 1 under each tile,
    so the codes, products, base and output change 4 times; B's (slot, n) 0, 1, 1 | 0, 1, 1 changes 4 times.
    A walk that counts one step per visit and kernel (the earlier model) fails on the steps and the bytes."""
    rank, itemsize = 16, 2
    slots = np.array([0] * 128 + [1] * 384, np.int32)
    walked = cost.separate_walk(slots, 8192, 4096, rank, 2, jnp.bfloat16, "v5e", FIGURES)
    shrink_bytes = 2 * 256 * 4 + 12 * 256 * 2048 * itemsize + 12 * rank * 2048 * itemsize + 2 * 256 * rank * itemsize
    expand_bytes = 4 * 256 * (4 + rank * itemsize) + 4 * rank * 2048 * itemsize + 2 * 4 * 256 * 2048 * itemsize
    assert walked.pipelined_bytes == shrink_bytes + expand_bytes
    assert walked.steps == 3 * 4 + 2 * 3
    # R = 16 pads to a 256-wide MXU tile; every visit has a slot.
    flops = 3 * (4 * 2 * 256 * 2048 * 256 + 2 * 2 * 256 * 256 * 2048)
    assert walked.mxu_flops == flops and walked.manual_bytes == 0 and walked.padding_bytes == 0
    assert walked.seconds == pytest.approx(max(walked.pipelined_bytes / 1e9, flops / 1e12) + 18e-6)


def test_separate_walk_on_lane_padded_buffers_pays_the_padding_passes():
    """D = 200 and Dout = 72 on buffers of 256 and 128 columns: the kernels run at the padded widths and x and
    base are first padded to them (read the layer's columns, write the padded ones), serially."""
    slots = np.array([0] * 8 + [1] * 8, np.int32)  # one 16-token block on v5e
    padded = cost.separate_walk(slots, 200, 72, 16, 2, jnp.float32, "v5e", FIGURES, lane_padded=True)
    at_widths = cost.separate_walk(slots, 256, 128, 16, 2, jnp.float32, "v5e", FIGURES)
    assert padded.padding_bytes == 4 * 16 * ((200 + 256) + (72 + 128))
    assert (padded.pipelined_bytes, padded.mxu_flops, padded.steps) == (
        at_widths.pipelined_bytes,
        at_widths.mxu_flops,
        at_widths.steps,
    )
    assert padded.seconds == pytest.approx(at_widths.seconds + padded.padding_bytes / 1e9)
    aligned = cost.separate_walk(slots, 256, 128, 16, 2, jnp.float32, "v5e", FIGURES, lane_padded=True)
    assert aligned == at_widths  # nothing to pad at lane-aligned widths


def test_expert_lora_is_priced_on_the_planned_kernel():
    """``bench model --moe`` prices each expert projection with the kernel the op plans: at gpt-oss's widths
    on v5e the up projection's separate kernels (45 output tiles of 128 columns per visit) are modelled far
    slower, and the row is the fused walk's and the smaller of the two."""
    rows = tpu_model.moe_sorted_rows(tpu_model.moe_routing(4096, 32, 4), tpu_model.contiguous_requests(4096, 8, 8), 32)[
        1
    ]
    chip = tpu_model.CHIPS["v5e"]
    priced = tpu_model.expert_lora_cost(chip, rows, 2880, 5760, 16, 256).seconds
    both = [
        tpu_model.fused_cost(chip, rows, 2880, 5760, 16, 256).seconds,
        tpu_model.separate_lora_cost(chip, rows, 2880, 5760, 16, 256, lane_padded=True).seconds,
    ]
    assert priced == min(both)


def test_separate_kernels_on_lane_padded_buffers(xla_device, monkeypatch):
    """Where the planner picks the separate kernels at a width that is not a multiple of 128 (72 -> 2048, one
    rank-64 adapter over four 64-token blocks on the CPU's plan), lane-padded buffers (as the expert layer stores
    its slots) go through shrink then expand with x padded to their width, with the device's grouping and with
    host metadata. The op's buffers are zero past D (the layers write them so); here the padding columns hold a
    large finite value, which x's padding columns must meet with exact zeros (the fused kernel does not read
    them at all: Inf there is tested with it in test_fused.py). On a TPU the op runs whichever kernel that
    generation's plan picks; the result is the same."""
    num_tokens, hidden, out_dim, rank, num_slots = 256, 72, 2048, 64, 1
    assert not fused.plan_call(num_tokens, hidden, out_dim, rank, num_slots, jnp.float32, "cpu")[2]
    planned = fused.plan_call(num_tokens, hidden, out_dim, rank, num_slots, jnp.float32, tl.ops.device_generation())
    g = torch.Generator().manual_seed(7)
    x, base = torch.randn(num_tokens, hidden, generator=g), torch.randn(num_tokens, out_dim, generator=g)
    a = torch.randn(num_slots, rank, hidden, generator=g) / math.sqrt(hidden)
    b = torch.randn(num_slots, rank, out_dim, generator=g) / 8
    idx = torch.randint(-1, num_slots, (num_tokens,), generator=g, dtype=torch.int32)
    wide_a = torch.full((num_slots, rank, fused.padded_width(hidden)), 1e3)
    wide_a[:, :, :hidden] = a
    traced = {"fused": [], "shrink": []}
    fused_kernel, shrink_kernel = fused.shrink_expand, shrink.shrink

    def fused_spy(x, a, *rest, **kw):
        traced["fused"].append(a.shape)
        return fused_kernel(x, a, *rest, **kw)

    def shrink_spy(x, a, *rest, **kw):
        traced["shrink"].append(x.shape)
        return shrink_kernel(x, a, *rest, **kw)

    monkeypatch.setattr(fused, "shrink_expand", fused_spy)
    monkeypatch.setattr(shrink, "shrink", shrink_spy)
    expected = (base.double() + _lora64(x, a, b, idx, 0.5, b.dtype)).to(base.dtype)
    args = [t.to(xla_device) for t in (x, wide_a, b, base, idx)]
    meta = tl.ops.batch_metadata(idx, [(hidden, out_dim)], rank, num_slots, torch.float32)[(hidden, out_dim)]
    for metadata in (None, meta.to(xla_device)):
        out = tl.bgmv_shrink_expand(*args, 0.5, "pallas", metadata).cpu()
        assert_close(out, expected)
        assert torch.equal(out[idx < 0], base[idx < 0])
    if planned[2]:
        assert traced == {"fused": [wide_a.shape] * 2, "shrink": []}
    else:  # x padded to the buffers' 128 columns for the shrink kernel
        assert traced == {"fused": [], "shrink": [(num_tokens, fused.padded_width(hidden))] * 2}


def test_bench_model_moe_rows_are_no_worse_than_either_kernel():
    """``bench model --moe --quick``: each row's expert LoRA is on the planned kernel per projection, which on
    these balanced batches (the planner's own batch shape) is no worse than all-fused or all-separate."""
    from torch_xla_lora.bench import model

    rows = model.run_moe(["v6e"], [128], [8], 16, 8)
    assert len(rows) == 4
    for r in rows:
        assert r["with_lora_ratio"] <= min(r["fused_ratio"], r["separate_ratio"]) * (1 + 1e-9), r
        assert r["lora_kernel"].split(",")[0] in ("fused", "separate") or r["lora_kernel"].startswith("up ")
