"""The Pallas kernels at the JAX level: visit grouping, interpret-mode results, TPU lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export as jax_export

from torch_xla_lora.kernels import block_sizes, expand, reference, shrink, tuning, visits


def _numpy_visits(indices, num_slots, block_tokens):
    """Visits by a plain loop: each block's distinct valid slots in order, or one -1 visit."""
    out = []
    for block in range(len(indices) // block_tokens):
        rows = indices[block * block_tokens : (block + 1) * block_tokens]
        slots = sorted({int(i) for i in rows if 0 <= i < num_slots})
        out += [(block, s) for s in slots] or [(block, -1)]
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("num_tokens", "num_slots", "block_tokens"), [(64, 3, 16), (32, 64, 8), (8, 1, 8)])
def test_visits_match_plain_loop(num_tokens, num_slots, block_tokens, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(-2, num_slots + 2, num_tokens).astype(np.int32)
    got = visits.build(jnp.asarray(idx), num_slots, block_tokens)
    expected = _numpy_visits(idx, num_slots, block_tokens)
    count = int(got.count[0])
    assert count == len(expected)
    assert (
        list(zip(np.asarray(got.block[:count]).tolist(), np.asarray(got.slot[:count]).tolist(), strict=True))
        == expected
    )
    # Padding entries repeat the last visit, so a fixed-size grid would fetch nothing new.
    assert set(np.asarray(got.block[count:]).tolist()) <= {expected[-1][0]}
    assert set(np.asarray(got.slot[count:]).tolist()) <= {expected[-1][1]}


def test_visits_reject_unaligned_tokens():
    with pytest.raises(ValueError, match="not a multiple of block_tokens=8"):
        visits.build(jnp.zeros((12,), jnp.int32), 2, 8)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"tokens": 12, "hidden": 128, "out": 128}, "multiple of 8"),
        ({"tokens": 0, "hidden": 1, "out": 1}, "positive"),
    ],
)
def test_block_sizes_check_themselves(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        block_sizes.BlockSizes(**kwargs)


def test_block_sizes_reject_tile_not_dividing_dim():
    with pytest.raises(ValueError, match="hidden=384 must span the dim 1024"):
        block_sizes.BlockSizes(8, 384, 128).check(1024, 128)


@pytest.mark.parametrize("generation", ["v4", "v5e", "v6e"])
@pytest.mark.parametrize("dim", [1024, 3072, 5632, 5760, 11008, 14336, 18944, 2880])
def test_tiles_are_the_widest_lane_multiple_dividing_the_dim(dim, generation):
    """A dimension above the generation's maximum tile gets the widest multiple of 128 that divides it and is at
    most the maximum (and ``tuning.MAX_TILED_WIDTH``): any lane multiple, so gpt-oss's 5,760 columns get 1,920,
    not 128; a dimension no lane multiple divides spans one block; one within the maximum is one tile."""
    sizes = block_sizes.choose(64, dim, dim, generation)
    limits = (tuning.MAX_HIDDEN_TILE[generation], tuning.MAX_OUT_TILE[generation])
    for tile, limit in zip((sizes.hidden, sizes.out), limits, strict=True):
        widest = [w for w in range(128, min(limit, tuning.MAX_TILED_WIDTH) + 1, 128) if dim % w == 0]
        assert tile == (dim if dim <= limit or not widest else widest[-1])
        sizes.check(dim, dim)


def _kernel_case(num_tokens, hidden, rank, num_slots, out_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(num_tokens, hidden)), dtype)
    a = jnp.asarray(rng.normal(size=(num_slots, rank, hidden)) / np.sqrt(hidden), dtype)
    b = jnp.asarray(rng.normal(size=(num_slots, rank, out_dim)) / np.sqrt(rank), dtype)
    base = jnp.asarray(rng.normal(size=(num_tokens, out_dim)), dtype)
    idx = jnp.asarray(rng.integers(-1, num_slots, num_tokens), jnp.int32)
    return x, a, b, base, idx


@pytest.mark.parametrize("sizes", [block_sizes.BlockSizes(16, 256, 128), block_sizes.BlockSizes(32, 128, 384)])
def test_tiled_kernels_match_jnp_loop(sizes):
    """Hidden and output tiling (several grid steps per visit) in interpret mode."""
    x, a, b, base, idx = _kernel_case(64, 256, 16, 5, 384, jnp.float32)
    vis = visits.build(idx, 5, sizes.tokens)
    s = shrink.shrink(x, a, idx, vis, scaling=0.5, block_sizes=sizes, interpret=True)
    np.testing.assert_allclose(s, reference.shrink(x, a, idx, 0.5), atol=1e-4, rtol=1e-4)
    y = expand.expand(s, b, base, idx, vis, add_inputs=True, block_sizes=sizes, interpret=True)
    np.testing.assert_allclose(y, reference.expand(s, b, base, idx, True), atol=1e-4, rtol=1e-4)


# TPU configuration from the issue: bfloat16, T=128, D=4096, R=16, L=8.
T, D, R, L = 128, 4096, 16, 8


def _export_tpu(fn, *shapes):
    exported = jax_export.export(jax.jit(fn), platforms=["tpu"])(*shapes)
    return exported.mlir_module()


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_shrink_lowers_to_mosaic(generation):
    sizes = block_sizes.choose(T, D, R, generation)

    def fn(x, a, idx):
        vis = visits.build(idx, L, sizes.tokens)
        return shrink.shrink(x, a, idx, vis, scaling=1.0, block_sizes=sizes, interpret=False)

    assert "tpu_custom_call" in _export_tpu(fn, _sds((T, D)), _sds((L, R, D)), _sds((T,), jnp.int32))


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_lowers_to_mosaic(generation, add_inputs):
    sizes = block_sizes.choose(T, R, D, generation)

    def fn(s, b, base, idx):
        vis = visits.build(idx, L, sizes.tokens)
        return expand.expand(s, b, base, idx, vis, add_inputs=add_inputs, block_sizes=sizes, interpret=False)

    module = _export_tpu(fn, _sds((T, R)), _sds((L, R, D)), _sds((T, D)), _sds((T,), jnp.int32))
    assert "tpu_custom_call" in module


def test_export_rejects_block_mosaic_cannot_tile():
    """The export check has teeth: a token block of 4 rows is not a legal TPU tile."""

    def fn(x, a, idx):
        vis = visits.build(idx, L, 8)
        sizes = block_sizes.BlockSizes(8, 4096, 128)
        object.__setattr__(sizes, "tokens", 4)  # bypass the dataclass check on purpose
        return shrink.shrink(x, a, idx, vis, scaling=1.0, block_sizes=sizes, interpret=False)

    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        _export_tpu(fn, _sds((T, D)), _sds((L, R, D)), _sds((T,), jnp.int32))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("num_tokens", "num_slots", "block_tokens", "lanes"), [(64, 5, 16, 4), (48, 64, 8, 16)])
def test_host_metadata_equals_device_metadata(num_tokens, num_slots, block_tokens, lanes, seed):
    """The numpy (host) and jax (in-graph) runs of the one builder agree, field by field, after packing."""
    idx = np.random.default_rng(seed).integers(-2, num_slots + 2, num_tokens).astype(np.int32)
    idx = np.where((idx >= 0) & (idx < num_slots), idx, -1).astype(np.int32)
    host = visits.pack(
        visits.build_lanes(idx, num_slots, block_tokens, lanes, xp=np),
        visits.build(idx, num_slots, block_tokens, xp=np),
        xp=np,
    )
    device = visits.pack(
        visits.build_lanes(jnp.asarray(idx), num_slots, block_tokens, lanes),
        visits.build(jnp.asarray(idx), num_slots, block_tokens),
    )
    assert host.dtype == np.int32 and len(host) == visits.packed_size(num_tokens, num_slots, block_tokens, lanes)
    np.testing.assert_array_equal(host, np.asarray(device))
    lane_blocks, vis = visits.unpack(host, num_tokens, num_slots, block_tokens, lanes)
    np.testing.assert_array_equal(vis.count, [len(_numpy_visits(idx, num_slots, block_tokens))])
    assert lane_blocks.code.shape == (num_tokens,)


@settings(max_examples=25, deadline=None)
@given(
    blocks=st.integers(1, 4),
    block_tokens=st.sampled_from([8, 16]),
    num_slots=st.integers(1, 20),
    lanes=st.sampled_from([1, 2, 8]),
    data=st.data(),
)
def test_lane_metadata_property(blocks, block_tokens, num_slots, lanes, data):
    """For any slots, every token's code names its slot in its block's list, and chunks cover the list."""
    num_tokens = blocks * block_tokens
    idx = np.array(data.draw(st.lists(st.integers(-2, num_slots + 1), min_size=num_tokens, max_size=num_tokens)))
    idx = np.where((idx >= 0) & (idx < num_slots), idx, -1).astype(np.int32)
    meta = visits.build_lanes(idx, num_slots, block_tokens, lanes, xp=np)
    per_block = visits.max_chunks(block_tokens, num_slots, lanes) * lanes
    for t, slot in enumerate(idx):
        block = t // block_tokens
        if slot < 0:
            assert meta.code[t] == -1
            continue
        assert meta.slots[block * per_block + meta.code[t]] == slot
        assert meta.code[t] < meta.chunks[block] * lanes
    assert int(meta.num_active[0]) == len({t // block_tokens for t in range(num_tokens) if idx[t] >= 0})
