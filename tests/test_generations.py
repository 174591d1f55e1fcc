"""TPU generations: device kinds, the tuning table per generation, VMEM limits in plans, cost estimates."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export as jax_export

from torch_xla_lora.kernels import block_sizes, fused, mosaic_version, tuning
from torch_xla_lora.ops import _jax, generation_of_device_kind

TABLES = ["TOKEN_BLOCKS", "MAX_HIDDEN_TILE", "MAX_OUT_TILE", "MXU_WIDTH", "VMEM_LIMIT_BYTES"]


@pytest.mark.parametrize(
    ("kind", "generation"),
    [
        ("TPU v4", "v4"),
        ("TPU v5 lite", "v5e"),
        ("TPU v5e", "v5e"),
        ("TPU v5", "v5p"),
        ("TPU v5p", "v5p"),
        ("TPU v6 lite", "v6e"),
        ("TPU v6e", "v6e"),
        ("TPU7x", "v6e"),  # newer than the table: its newest entry
        ("TPU v3", "v4"),  # older: the smallest VMEM
        ("something else", "v4"),
    ],
)
def test_generation_of_device_kind(kind, generation):
    assert generation_of_device_kind(kind) == generation


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("generation", [*tuning.TPU_GENERATIONS, "cpu"])
def test_every_generation_has_every_table(generation, table):
    assert generation in getattr(tuning, table)


@pytest.mark.parametrize("generation", tuning.TPU_GENERATIONS)
def test_vmem_limit_leaves_room_below_capacity(generation):
    assert block_sizes.vmem_limit(generation) <= tuning.VMEM_CAPACITY_BYTES[generation] * 3 // 4


def test_unknown_generation_uses_the_smallest_vmem():
    assert block_sizes.vmem_limit("v9x") == tuning.VMEM_LIMIT_BYTES["v4"]
    assert block_sizes.choose(512, 4096, 4096, "v9x") == block_sizes.choose(512, 4096, 4096, "v4")


@pytest.mark.parametrize("generation", tuning.TPU_GENERATIONS)
def test_largest_fused_call_is_fused_and_shrunk_only_while_it_did_not_fit(generation):
    """Llama-3-70B's down projection, prefill, float32, rank 64: the largest fused call of the grid.

    The kernel fits every generation once shrunk (down to 8 tokens, a 128-wide output tile and one lane on v4),
    so the planner must plan it: a planner that refuses it (or swallows a planning error) fails here (whether
    ``plan_call`` then runs it fused is its cost choice: on v4 the separate kernels are modelled cheaper). The plan
    starts from the tuning table's token block and output tile and the laning of the rank, and halves tokens,
    then the output tile, then lanes, while the kernel exceeds the limit: the step before the plan must not fit,
    which fails for a planner that shrinks more than it needs to.
    """
    num_tokens, hidden, out_dim, rank, num_slots, dtype = 2048, 28672, 8192, 64, 16, jnp.float32
    sizes, lanes = fused.plan(num_tokens, hidden, out_dim, rank, num_slots, dtype, generation)
    table = block_sizes.choose(num_tokens, hidden, out_dim, generation)
    full_lanes = fused.lanes_for(rank, num_slots, dtype, generation)
    assert sizes.hidden == hidden  # the kernel DMAs whole adapter rows
    assert sizes.tokens <= table.tokens and sizes.out <= table.out and lanes <= full_lanes
    if lanes < full_lanes:
        previous, previous_lanes = sizes, lanes * 2
    elif sizes.out < table.out:
        previous, previous_lanes = dataclasses.replace(sizes, out=sizes.out * 2), lanes
    elif sizes.tokens < table.tokens:
        previous, previous_lanes = dataclasses.replace(sizes, tokens=sizes.tokens * 2), lanes
    else:
        pytest.fail(f"the table's own plan {table} should not fit at this size on {generation}")
    assert fused.vmem_bytes(previous, rank, num_slots, previous_lanes, dtype) > block_sizes.vmem_limit(generation)


def test_v4_plan_is_smaller_than_v6e_plan():
    v4, _, _ = fused.plan_call(1024, 4096, 14336, 16, 16, jnp.bfloat16, "v4")
    v6e, _, _ = fused.plan_call(1024, 4096, 14336, 16, 16, jnp.bfloat16, "v6e")
    assert v4.tokens * v4.out < v6e.tokens * v6e.out


def test_full_width_adapter_tile_beyond_vmem_runs_separate_kernels():
    _, _, run_fused = fused.plan_call(2048, 28672, 8192, 256, 16, jnp.float32, "v4")
    assert not run_fused


@pytest.mark.parametrize(("hidden", "out_dim"), [(576, 576), (576, 192), (1536, 576)])
def test_widths_not_lane_aligned_plan_fused_on_padded_rows(hidden, out_dim):
    """The kernel reads lane-padded adapter rows (whole 128-lane tiles) at widths that are not multiples of 128;
    an unaligned Dout is one output tile."""
    sizes, _, run_fused = fused.plan_call(64, hidden, out_dim, 16, 4, jnp.bfloat16, "v6e")
    assert run_fused and (out_dim % 128 == 0 or sizes.out == out_dim)
    assert fused.padded_width(hidden) % 128 == 0 and 0 <= fused.padded_width(hidden) - hidden < 128


def _cost_estimates(fn, *shapes) -> list[dict]:
    with mosaic_version.pinned_ir_version():
        text = jax_export.export(jax.jit(fn), platforms=["tpu"])(*shapes).mlir_module()
    text = text.replace("\\22", '"')  # the backend config is an escaped JSON string in the module text
    return [json.loads(m) for m in re.findall(r'"cost_estimate": (\{[^}]*\})', text)]


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


T, D, R, L = 256, 4096, 16, 8


def test_shrink_declares_its_cost():
    fn = _jax.shrink_fn("pallas", "v6e", 1.0)
    (cost,) = _cost_estimates(fn, _sds((T, D)), _sds((L, R, D)), _sds((T,), jnp.int32))
    assert cost["flops"] == 2 * T * D * R
    assert cost["transcendentals"] == 0
    assert cost["bytes_accessed"] >= T * D * 2


def test_expand_declares_its_cost():
    fn = _jax.expand_fn("pallas", "v6e", True, None)
    (cost,) = _cost_estimates(fn, _sds((T, R)), _sds((L, R, D)), _sds((T, D)), _sds((T,), jnp.int32))
    assert cost["flops"] == 2 * T * R * D
    assert cost["bytes_accessed"] >= 2 * T * D * 2


def test_fused_declares_its_cost():
    fn = _jax.shrink_expand_fn("pallas", "v6e", 1.0, False)
    shapes = [_sds((T, D)), _sds((L, R, D)), _sds((L, R, D)), _sds((T, D)), _sds((T,), jnp.int32)]
    (cost,) = _cost_estimates(fn, *shapes)
    sizes, lanes, _ = fused.plan_call(T, D, D, R, L, jnp.bfloat16, "v6e")
    assert cost["flops"] == 2 * T * lanes * fused.rank_stride(R, jnp.bfloat16) * 2 * D
    assert cost["bytes_accessed"] >= 3 * T * D * 2
