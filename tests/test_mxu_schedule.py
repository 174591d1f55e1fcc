"""The TPU cost model's MXU padding rule against libtpu's own schedule (deviceless; ``bench.mxu_schedule``).

``kernels.cost.mxu_flops`` pads a matmul's contraction and output widths to whole MXU tiles, so a rank-16
shrink or expand is priced as a full tile's width: the rule behind every modelled TPU figure and the
training floor. Here libtpu compiles the product at rank 16 and at the full width and its scheduled machine
code must issue the same number of MXU matmul instructions, as the model says; the static schedule is
allowed to be a little shorter (fewer vector pops and pushes of the narrow operand), not much.
"""

import pytest

from torch_xla_lora.bench import mxu_schedule


@pytest.fixture(scope="module")
def results():
    return mxu_schedule.rows(narrow=(16,), progress=False)


@pytest.mark.parametrize("chip", mxu_schedule.CHIPS)
@pytest.mark.parametrize("kind", ["shrink", "expand"])
def test_rank_16_takes_a_full_tile_of_mxu_work(results, chip, kind):
    (row,) = [r for r in results if r["chip"] == chip and r["kind"] == kind and r["narrow"] == 16]
    assert row["model_ratio"] == 1.0
    assert row["matmuls"] > 0
    assert row["matmuls_ratio"] == row["model_ratio"]
    assert 0.85 <= row["cycles_ratio"] <= 1.0
