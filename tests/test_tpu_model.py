"""The fused base kernel's planner and the layer-level TPU cost model (``bench model --fused-base``).

The planner prices a tiling with a closed form (``fused_base.modelled_seconds``); these tests judge its
plans with the cost model's step-by-step walk of the kernel's own grid (``tpu_model.fused_base_cost``),
which it does not call, and the XLA-native model against hand-computed fusions.
"""

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from torch_xla_lora.bench import model, tpu_model
from torch_xla_lora.kernels import fused_base, tuning

# Round numbers so the expected costs can be worked out by hand.
CHIP = tpu_model.Chip("test", "v6e", hbm_bytes_per_s=1e9, peak_flops=1e12, mxu_width=256, step_overhead_s=1e-6)


@pytest.mark.parametrize("chip", ["v5e", "v6e"])
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "out_dim", "rank"),
    [(1024, 14336, 4096, 16), (4096, 14336, 4096, 16), (1024, 4096, 14336, 64), (8, 14336, 4096, 8)]
    + [(1024, 4096, 14336, 4), (1024, 3584, 18944, 16)],
)
def test_plan_cost_does_not_rise_with_slots(chip, num_tokens, hidden, out_dim, rank):
    """More slots, the same batch (one adapter, or 8, in use): the walked cost of the planned kernel does not
    rise at all, since the batch reads the same adapters. Catches a planner that ranks tilings by HBM bytes
    alone (at 16 slots it took a 128-wide reduction tile for down_proj: 2.4x the base on v6e, against 1.12x
    at 8 and 64 slots), and one that tiles at each slot count's own lanes (the adapter tiles' VMEM at one
    more lane pushed the best tiling out: Llama-3-8B gate_proj at rank 4 on v6e, 13 -> 14 slots, +0.8% of
    the base; Qwen2-7B up_proj at rank 16, 8 -> 9 slots, +3.8% under the earlier 90 MiB budget)."""
    tpu = tpu_model.CHIPS[chip]
    base = tpu_model.matmul_cost(tpu, num_tokens, hidden, out_dim).seconds
    for in_use in (1, 8):
        costs = []
        for num_slots in (s for s in (1, 2, 7, 8, 9, 13, 14, 16, 17, 32, 64, 128) if s >= in_use):
            indices = tpu_model.contiguous_requests(num_tokens, num_slots, in_use)
            costs.append(tpu_model.fused_base_cost(tpu, indices, hidden, out_dim, rank, num_slots).seconds)
        for before, after in itertools.pairwise(costs):
            assert after - before <= 1e-9 * base, (in_use, costs)


def test_plan_keeps_the_mxu_full_where_a_wider_tile_fits():
    """v6e's MXU is 256 wide: a plan with a 128-wide reduction or output tile doubles the base product's
    MXU passes. Every Llama-3-8B projection at prefill fits wider tiles."""
    for num_slots in (8, 16, 64, 128):
        for hidden, out_dim, _ in tpu_model.LLAMA3_8B_LAYER.values():
            sizes, _ = fused_base.plan(1024, hidden, out_dim, 16, num_slots, jnp.bfloat16, "v6e", False)
            assert min(sizes.hidden, sizes.out) >= tuning.MXU_WIDTH["v6e"], (num_slots, hidden, out_dim, sizes)


def test_planner_closed_form_equals_the_walk_for_one_adapter_per_block():
    """The planner's closed form and the grid walk agree where the walk has nothing to add (one adapter
    per token block, fetched while the base product runs): a drift between the two would make the
    planner rank tilings by a cost the kernel does not have."""
    sizes, lanes = fused_base.plan(1024, 4096, 4096, 16, 8, jnp.bfloat16, "v6e", False)
    indices = np.zeros(1024, np.int32)
    walked = tpu_model.fused_base_cost(tpu_model.CHIPS["v6e"], indices, 4096, 4096, 16, 8)
    closed = fused_base.modelled_seconds(1024, 4096, 4096, 16, sizes, lanes, jnp.bfloat16, "v6e")
    # The walk adds the block's token codes (4 bytes a token) and the adapter tiles to the pipelined bytes.
    assert closed == pytest.approx(walked.seconds, rel=0.02)


def test_xla_native_cost_one_block_one_adapter():
    # T=256, K=N=256, R=16, L=1: one 256-token block (the v6e table's block at T=256), one adapter, no
    # extra visit: a shrink fusion and an expand fusion that adds to the base.
    seconds = tpu_model.xla_native_cost(CHIP, np.zeros(256, np.int32), 256, 256, rank=16, num_slots=1)
    shrink_bytes = 2 * (256 * 256 + 16 * 256)  # x, the block's A
    shrink_flops = 2 * 256 * 256 * 256  # (256, 256, 16), rank padded to the MXU width
    expand_bytes = 2 * (256 * 16 + 16 * 256 + 2 * 256 * 256)  # s, B, base in, output out
    expand_flops = 2 * 256 * 256 * 256
    expected = sum(max(b / 1e9, f / 1e12) + tpu_model.XLA_FUSION_OVERHEAD_S for b, f in (
        (shrink_bytes, shrink_flops), (expand_bytes, expand_flops)))  # fmt: skip
    assert seconds == pytest.approx(expected)


def test_xla_native_cost_pays_per_extra_visit():
    """Blocks that hold two requests each cost one block-sized product pair per extra visit."""
    one = tpu_model.xla_native_cost(CHIP, np.zeros(512, np.int32), 256, 256, rank=16, num_slots=2)
    split = (np.arange(512) // 128 % 2).astype(np.int32)  # each 256-token block: slot 0 then slot 1
    two = tpu_model.xla_native_cost(CHIP, split, 256, 256, rank=16, num_slots=2)
    assert two > one + 2 * 2 * tpu_model.XLA_FUSION_OVERHEAD_S


@pytest.mark.parametrize("chip", ["v5e", "v6e"])
@pytest.mark.parametrize("num_tokens", [8, 4096])
def test_chosen_is_no_worse_than_any_formulation(chip, num_tokens):
    """The per-group choice never costs more than running every projection one way (fused, separate,
    XLA-native); and it names a formulation for every projection."""
    indices = model.batches(num_tokens, 64, 8)["8 in use"]
    costs = tpu_model.layer_costs(tpu_model.CHIPS[chip], indices, rank=16, num_slots=64)
    assert costs["chosen"] <= min(costs["fused"], costs["separate"], costs["xla_native"]) * (1 + 1e-12)
    assert costs["base"] < costs["chosen"]
    assert set(costs["choices"]) == set(tpu_model.LLAMA3_8B_LAYER)


def test_model_fused_base_json_keeps_keys_and_adds_the_layer_columns(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert model.main(["--fused-base", "--chips", "v6e", "--tokens", "8", "--slots", "8", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    for key in ("proj_base_us", "proj_fused_pct", "layer_base_us", "layer_fused_pct", "layer_onehot_pct"):
        assert key in row
    assert row["layer_chosen_pct"] <= min(row["layer_fused_pct"], row["layer_xla_native_pct"]) + 1e-9
    assert len(row["layer_chosen"]) == len(tpu_model.LLAMA3_8B_LAYER) and set(row["layer_chosen"]) <= set("FSX")
    assert f"| {row['layer_chosen']} |" in capsys.readouterr().out


def test_model_slot_sweep_quick(capsys):
    assert model.main(["--slot-sweep", "--quick"]) == 0
    assert "worst rise as slots grow" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("chip", "num_tokens", "hidden", "out_dim", "rank", "num_slots"),
    [("v6e", 1024, 4096, 4096, 16, 8), ("v5e", 4096, 14336, 4096, 16, 64), ("v6e", 8, 4096, 14336, 64, 128)],
)
def test_walk_and_the_kernel_s_cost_estimate_agree(chip, num_tokens, hidden, out_dim, rank, num_slots):
    """The kernel declares a ``pl.CostEstimate`` for XLA's scheduler (one laned chunk of adapters per
    token block); the model walks the grid. On a batch that fills one chunk per block, with no MXU
    padding, the two count the same flops and the same bytes. A change to the kernel's grid that one
    of them missed would part them."""
    sizes, lanes = fused_base.plan(num_tokens, hidden, out_dim, rank, num_slots, jnp.bfloat16, chip, False)
    blocks = sizes.padded_tokens(num_tokens) // sizes.tokens
    # Block b holds `lanes` distinct adapters (lanes * b ... lanes * b + lanes - 1, modulo the slots).
    per_block = np.arange(sizes.tokens) * lanes // sizes.tokens
    indices = np.concatenate([(per_block + b * lanes) % num_slots for b in range(blocks)])[:num_tokens]
    unpadded = tpu_model.Chip("unpadded", chip, 1e9, 1e12, mxu_width=1, step_overhead_s=0.0)
    walked = tpu_model.fused_base_cost(unpadded, indices.astype(np.int32), hidden, out_dim, rank, num_slots)
    estimate = fused_base.cost_estimate(
        sizes.padded_tokens(num_tokens), hidden, out_dim, rank, num_slots, jnp.bfloat16, sizes, lanes
    )
    assert walked.mxu_flops == estimate.flops
    assert walked.pipelined_bytes + walked.manual_bytes == estimate.bytes_accessed


@pytest.mark.parametrize("chip", ["v5e", "v6e"])
def test_without_unfused_passes_drops_exactly_the_passes(chip):
    """``--without-unfused-passes`` removes from the Pallas formulations exactly the passes a custom call
    costs around it: x's producer once per input group (norm1, norm2: x written, T x 4096 bf16 each; SiLU*up:
    gate and up read once more and x written, 2 x T x 14336) and the residual add after o_proj and down_proj
    (read y, write the sum: 2 x T x 4096 each); the base (which reads what XLA fuses) stays."""
    tpu = tpu_model.CHIPS[chip]
    indices = tpu_model.contiguous_requests(1024, 64, 8)
    # The layer unarranged (kernel_fusion=False): every Pallas call with its passes (test_layer_fusion prices the
    # arranged MLP).
    with_passes = tpu_model.layer_costs(tpu, indices, rank=16, num_slots=64, kernel_fusion=False)
    without = tpu_model.layer_costs(tpu, indices, rank=16, num_slots=64, unfused_passes=False, kernel_fusion=False)
    passes = 2 * (1024 * (4096 + 4096 + 2 * 14336) + 2 * 2 * 1024 * 4096) / tpu.hbm_bytes_per_s
    for key in ("fused", "separate"):
        assert with_passes[key] - without[key] == pytest.approx(passes)
    for key in ("base", "xla_native", "onehot"):
        assert with_passes[key] == without[key]


def test_moe_layer_cost_by_hand():
    """``bench model --moe``'s expert layer, one small case worked out by hand: 4 tokens routed top-2 over 4
    experts (balanced: token t to experts 2t mod 4 and 2t + 1 mod 4), 4 requests on slots 0, 2, 4, 6 of 8,
    hidden 192 and expert width 160 (not multiples of 128: the layer's slots are lane-padded to 256 and 384 / 256
    columns, and the fused kernel reads the padded rows; the separate shrink and expand, what the op runs on
    unpadded slots, worked out by hand too).

    Rows sorted by expert: expert 0 holds tokens 0 and 2 (slots 0 and 4: rows 0 * 4 + 0 = 0 and 4 * 4 + 0 = 16),
    expert 1 rows 1 and 17, expert 2 tokens 1 and 3 (rows 10, 26), expert 3 rows 11 and 27: 8 distinct
    (slot, expert) pairs, all in one 8-row token block (the tuning table's block at 8 tokens)."""
    hidden, width, experts, top_k, rank, slots = 192, 160, 4, 2, 16, 8
    costs = tpu_model.moe_layer_costs(CHIP, 4, hidden, width, experts, top_k, rank, slots, in_use=8)
    assert costs["rows"] == 8 and costs["pairs"] == 8

    def roofline(nbytes, flops):
        return max(nbytes / 1e9, flops / 1e12)

    # Base: rows in and out once, each of the 4 experts' weights once; 4 groups of 2 rows on a 256-wide MXU.
    up = roofline(2 * (8 * 192 + 4 * 192 * 320 + 8 * 320), 4 * 2 * 2 * 256 * 512)
    down = roofline(2 * (8 * 160 + 4 * 160 * 192 + 8 * 192), 4 * 2 * 2 * 256 * 256)
    assert costs["base"] == pytest.approx(up + down)

    # LoRA per projection: one block of 8 rows, 8 visits (one per pair), each a whole block's shrink and
    # expand (one tile each); x block and [8, R] products once, each visit's A and B, products in, base in,
    # output out once, the block's int32 slot codes once per kernel; 2 kernel steps per visit.
    def lora(d_in, d_out):
        pad = lambda d: -(-d // 256) * 256  # noqa: E731
        nbytes = 2 * (8 * (d_in + rank) + 8 * rank * (d_in + d_out) + 8 * (rank + 2 * d_out)) + 2 * 8 * 4
        flops = 8 * (2 * 8 * pad(d_in) * pad(rank) + 2 * 8 * pad(rank) * pad(d_out))
        return roofline(nbytes, flops) + 16 * 1e-6

    rows = np.array([0, 16, 1, 17, 10, 26, 11, 27], np.int32)
    separate = [
        tpu_model.separate_lora_cost(CHIP, rows, d_in, d_out, rank, 32) for d_in, d_out in ((192, 320), (160, 192))
    ]
    assert sum(cost.seconds for cost in separate) == pytest.approx(lora(192, 320) + lora(160, 192))

    # The fused walk over the padded slots: one block, one output tile spanning the unaligned Dout; each of the 8
    # entries' A and B rows DMA'd once at their padded widths (192 -> 256, 320 -> 384; 160 -> 256, 192 -> 256).
    fused = [tpu_model.fused_cost(CHIP, rows, d_in, d_out, rank, 32) for d_in, d_out in ((192, 320), (160, 192))]
    assert [cost.manual_bytes for cost in fused] == [8 * rank * (256 + 384) * 2, 8 * rank * (256 + 256) * 2]
    assert costs["lora"] == pytest.approx(sum(cost.seconds for cost in fused))


def test_moe_layer_lora_is_the_fused_op_on_the_sorted_rows():
    """Lane-aligned widths: the expert LoRA is priced as the fused kernel's walk over the sorted rows with
    L * E entries (the op the layer calls), and a batch without adapters adds nothing to the base."""
    costs = tpu_model.moe_layer_costs(CHIP, 4, 256, 128, 4, 2, 16, 8, in_use=8)
    rows = np.array([0, 16, 1, 17, 10, 26, 11, 27], np.int32)
    expected = tpu_model.fused_cost(CHIP, rows, 256, 256, 16, 32).seconds
    expected += tpu_model.fused_cost(CHIP, rows, 128, 256, 16, 32).seconds
    assert costs["lora"] == pytest.approx(expected)


def test_bench_model_moe_json(tmp_path):
    out = tmp_path / "moe.json"
    assert model.main(["--moe", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["args"]["moe"] is True
    rows = data["rows"]
    assert {r["model"] for r in rows} == {"mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v2-lite"}
    for r in rows:
        assert r["with_lora_ratio"] == pytest.approx((r["base_us"] + r["lora_us"]) / r["base_us"])
        assert r["with_lora_ratio"] > 1


def test_base_reads_what_xla_fuses_into_its_dots():
    """The base projection reads what XLA fuses into its dot: down_proj's operand read takes gate and up (one
    [T, 14336] array more than x) and its output write reads the residual ([T, 4096]); at decode the dot is
    HBM-bound, so the base costs exactly those bytes more (bf16) than the bare matmul."""
    tpu = tpu_model.CHIPS["v6e"]
    indices = tpu_model.contiguous_requests(8, 16, 8)
    bare = tpu_model.matmul_cost(tpu, 8, 14336, 4096)
    assert bare.seconds == bare.pipelined_bytes / tpu.hbm_bytes_per_s  # memory-bound: the bytes decide
    down = tpu_model.projection_costs(tpu, indices, 14336, 4096, 16, 16, True, 1.0, operands=2)
    assert down["base"] == pytest.approx(bare.seconds + 2 * 8 * (14336 + 4096) / tpu.hbm_bytes_per_s)
    plain = tpu_model.projection_costs(tpu, indices, 14336, 4096, 16, 16, residual_read=False, operands=1)
    assert plain["base"] == bare.seconds


def test_training_floor_by_hand():
    """The training model's floor: LoRA's six products at each slot's true rank on the test chip's 256-wide
    MXU (contraction and output widths padded to whole tiles, the weight gradients with the rank as M),
    worked out by hand for two slots and tokens outside the slots; and no modelled step goes below it."""
    from torch_xla_lora.bench import tpu_train_model

    indices = np.array([0] * 300 + [1] * 100 + [-1] * 20 + [5] * 4, np.int32)  # 5: outside the 2 slots
    hidden, out_dim, ranks = 1000, 300, np.array([8, 64])

    def tiles(d):
        return -(-d // 256) * 256

    flops = 0
    for n, r in ((300, 8), (100, 64)):
        # shrink (n, hidden, r), expand (n, r, out), ds (n, out, r), dx (n, r, hidden);
        # dA (r, n, hidden), dB (r, n, out)
        flops += 2 * n * (tiles(hidden) * tiles(r) + tiles(r) * tiles(out_dim)) * 2
        flops += 2 * r * tiles(n) * (tiles(hidden) + tiles(out_dim))
    got = tpu_train_model.lora_mxu_floor_seconds(CHIP, indices, hidden, out_dim, ranks)
    assert got == pytest.approx(flops / CHIP.peak_flops, rel=1e-12)

    without_da = tpu_train_model.lora_mxu_floor_seconds(CHIP, indices, hidden, out_dim, ranks, weight_grad_a=False)
    assert got - without_da == pytest.approx(
        sum(2 * r * tiles(n) * tiles(hidden) for n, r in ((300, 8), (100, 64))) / 1e12
    )

    for row in tpu_train_model.modelled_rows(chips=("v5e", "v6e")):
        assert 1.0 < row["ratio_floor"] < row["ratio_floor_with_x_pass"] < row["ratio_ours"], row["layer"]


def test_pooled_fused_walk_reads_whole_pages_of_the_true_ranks():
    """The one-pass kernel on a pool (``fused_base_cost(pool=)``): with every used lane at the pool's rank it
    walks exactly the slot kernel's traffic plus the page table; a rank-12 adapter reads two whole pages,
    as a rank-16 one; and an int8 pool reads fewer bytes than a bf16 one."""
    tpu = tpu_model.CHIPS["v6e"]
    indices = tpu_model.contiguous_requests(64, 16, 8)
    used = np.unique(indices)

    def pool(rank, int8=False):
        ranks = np.zeros(16, np.int64)
        ranks[used] = rank
        return tpu_model.PoolSpec(tuple(int(r) for r in ranks), int8, 4000)

    slots = tpu_model.fused_base_cost(tpu, indices, 4096, 4096, 16, 16)
    pooled = tpu_model.fused_base_cost(tpu, indices, 4096, 4096, 16, 16, pool=pool(16))
    assert pooled.pipelined_bytes == slots.pipelined_bytes and pooled.steps == slots.steps
    assert pooled.manual_bytes == slots.manual_bytes + 4 * (16 * 2 + 16)  # the page table: 2 starts a lane, ranks
    tail = tpu_model.fused_base_cost(tpu, indices, 4096, 4096, 16, 16, pool=pool(12))
    assert (tail.pipelined_bytes, tail.manual_bytes) == (pooled.pipelined_bytes, pooled.manual_bytes)
    int8 = tpu_model.fused_base_cost(tpu, indices, 4096, 4096, 16, 16, pool=pool(16, int8=True))
    assert int8.pipelined_bytes + int8.manual_bytes < pooled.pipelined_bytes + pooled.manual_bytes


@pytest.mark.parametrize(("chip", "num_tokens"), [("v5e", 8), ("v6e", 1024)])
def test_int8_base_plan_takes_no_more_grid_steps_than_bf16(chip, num_tokens):
    """Every Llama-3-8B projection (as the decoder arrangement calls the kernel, 8 adapters of 16 slots in use):
    the int8 base's plan walks no more grid steps than the bf16 base's for the same shape, nor more time. Its
    weight tile is half the bytes and is converted in VMEM one column chunk at a time
    (``fused_base.WEIGHT_CHUNK``). Counting the whole tile's f32 and bf16 copies, as the kernel once made them,
    planned q/o_proj at T = 8 on v5e in 2 steps against 1 (gate/up/down_proj at 1 lane against 8), and at
    T = 1024 on v6e q/o_proj in 4 against 2, gate/up_proj 8 against 7, down_proj 14 against 8. At decode every
    int8 plan on v5e takes one step per 8192 columns of its wider dimension (gate/up/down_proj two: 7168-wide
    tiles, which v5e's 4096-wide cap made four)."""
    tpu = tpu_model.CHIPS[chip]
    indices = tpu_model.contiguous_requests(num_tokens, 16, 8)
    for name, (hidden, out_dim, _) in tpu_model.LLAMA3_8B_LAYER.items():
        prologue, residual = tpu_model.KERNEL_FUSION[name]
        bf16, int8 = (
            tpu_model.fused_base_cost(
                tpu, indices, hidden, out_dim, 16, 16, prologue=prologue, residual=residual, int8_weight=int8_weight
            )
            for int8_weight in (False, True)
        )
        assert int8.steps <= bf16.steps, name
        assert int8.seconds <= bf16.seconds, name
        if num_tokens == 8:
            assert int8.steps == -(-max(hidden, out_dim) // 8192), name
