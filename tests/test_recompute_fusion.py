"""What recomputing down_proj's input x = SiLU(gate) * up in the backward costs on TPU, from libtpu's compiler
(deviceless; ``bench.recompute_fusion``), against the training model's price.

In training the arranged decoder's down_proj takes SiLU(gate) * up into its kernel. The backward recomputed x for
dA, at one write of x on the claim that XLA computes x in the fusion that differentiates the product, which reads
gate, up and dx anyway (and which the frozen base's backward runs too). libtpu must agree: the derivative alone is
one fusion writing two [T, I] arrays, the recompute the same fusion writing a third (x), and its bytes one [T, I]
array more. The training kernel now writes x itself, beside its output (``fused_base.keeps_x``), a write the
training model prices in the kernel's walk instead (``recompute_x`` 0).
"""

import json
import subprocess
import sys

import pytest

from torch_xla_lora.bench import tpu_model, tpu_train_model


@pytest.fixture(scope="module")
def rows():
    command = [sys.executable, "-m", "torch_xla_lora.bench.recompute_fusion", "--quick", "--json", "--chips", "v6e"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {row["program"]: row for row in json.loads(proc.stdout.strip().splitlines()[-1])}


def test_the_recompute_is_x_written_by_the_derivatives_fusion(rows):
    derivative, recomputed = rows["derivative"], rows["recomputed"]
    assert [f["outputs"] for f in derivative["fusions"]] == [2]  # d gate, d up: reading gate, up and dx
    assert [f["outputs"] for f in recomputed["fusions"]] == [3]  # and x, in the same fusion
    extra = recomputed["arrays"] - derivative["arrays"]
    assert 1.0 <= extra <= 1.15, extra  # x's write (and the small ds, dA of the Pallas call around it)


def test_the_training_model_prices_x_kept_by_the_kernel():
    """``projection_train_costs``: down_proj (SiLU(gate) * up taken in, x read by down alone) pays x's write in its
    training kernel (the walk of the kernel that keeps x: x's [T, I] and s's [T, R] writes more than the serving
    kernel's), none outside it, and no pass over gate and up: less than with the product a pass of its own."""
    chip = tpu_model.CHIPS["v6e"]
    indices = tpu_train_model.interleaved_rows(16, 512, 8)
    hidden, out_dim = 5632, 2048
    args = (chip, indices, hidden, out_dim, 64, 8, True, 1.0, None, 2)
    taken = tpu_train_model.projection_train_costs(*args, prologue="silu_mul", residual_in_kernel=True)
    outside = tpu_train_model.projection_train_costs(*args, residual_in_kernel=True)
    assert taken["forward_choice"] == outside["forward_choice"] == "fused"
    assert taken["recompute_x"] == outside["recompute_x"] == 0.0
    kernel = {"prologue": "silu_mul", "residual": True}
    kept = tpu_model.fused_base_cost(chip, indices, hidden, out_dim, 64, 8, **kernel, keep_s=True)
    serving = tpu_model.fused_base_cost(chip, indices, hidden, out_dim, 64, 8, **kernel)
    assert kept.pipelined_bytes - serving.pipelined_bytes == 2 * len(indices) * (hidden + 64)
    assert taken["lora_forward_s_kept"] + taken["recompute_x"] < outside["lora_forward_s_kept"]
    assert tpu_train_model.TRAINING_KERNEL_FUSION["down_proj"] == ("silu_mul", True)
    assert tpu_train_model.TRAINING_KERNEL_FUSION == tpu_model.KERNEL_FUSION  # the norms taken in by the groups
