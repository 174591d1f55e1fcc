"""The Pallas weight-gradient kernel (``kernels.weight_grad``, the backward's dA and dB) in interpret mode,
through the op's JAX function (padding as the op pads), against float64 NumPy."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from torch_xla_lora.kernels import block_sizes, weight_grad  # noqa: E402
from torch_xla_lora.ops import _jax  # noqa: E402


def _reference(left, right, indices, num_slots, scaling):
    out = np.zeros((num_slots, left.shape[1], right.shape[1]))
    for t, slot in enumerate(indices):
        if 0 <= slot < num_slots:
            out[slot] += scaling * np.outer(left[t].astype(np.float64), right[t].astype(np.float64))
    return out


def _indices(pattern: str, num_tokens: int, num_slots: int, rng) -> np.ndarray:
    if pattern == "per_token":  # every block mixes slots, -1 and an out-of-range slot
        return rng.integers(-1, num_slots + 1, num_tokens).astype(np.int32)
    # Rows of 40 tokens on one adapter (runs cross block boundaries); slot 0 unused.
    rows = rng.integers(1, num_slots, -(-num_tokens // 40))
    rows[1] = -1
    return np.repeat(rows, 40)[:num_tokens].astype(np.int32)


@pytest.mark.parametrize(
    "num_tokens,num_slots,rank,width,pattern",
    [(200, 5, 16, 576, "per_token"), (1100, 4, 8, 320, "rows"), (7, 3, 4, 128, "per_token")],
)
def test_kernel_equals_float64(num_tokens, num_slots, rank, width, pattern):
    rng = np.random.default_rng(num_tokens)
    idx = _indices(pattern, num_tokens, num_slots, rng)
    left = rng.standard_normal((num_tokens, rank)).astype(np.float32)
    right = rng.standard_normal((num_tokens, width)).astype(np.float32)
    fn = _jax.weight_grad_fn(num_slots, 0.5, "pallas", "cpu")
    out = np.asarray(fn(jnp.asarray(left), jnp.asarray(right), jnp.asarray(idx)))
    expected = _reference(left, right, idx, num_slots, 0.5)
    np.testing.assert_allclose(out, expected, atol=1e-5 * np.abs(expected).max(), rtol=1e-5)
    unused = [s for s in range(num_slots) if s not in idx]
    assert (out[unused] == 0).all()


@pytest.mark.parametrize(
    "width,rank,itemsize,limit_mib",
    [
        (14336, 64, 2, 64),
        (14336, 64, 2, 10),
        (4096, 192, 4, 10),
        (2304, 256, 2, 16),
        (576, 16, 4, 64),
        (14336, 512, 4, 1),
    ],
)
def test_width_tile_is_the_widest_plan_its_vmem_limit_holds(width, rank, itemsize, limit_mib):
    """The Q tile divides the padded width in whole lanes (or is the whole width), its plan fits the limit, and
    every wider candidate's plan does not; where none fits (1 MiB), the narrowest."""
    wide = weight_grad.padded_width(width)
    limit = limit_mib << 20
    tile = weight_grad.width_tile(wide, 256, rank, itemsize, limit)
    candidates = [wide] + [t for t in range(128, wide, 128) if wide % 128 == 0 and wide % t == 0]
    assert tile in candidates
    fits = [t for t in candidates if weight_grad.vmem_bytes(256, rank, t, itemsize) <= limit]
    assert tile == (max(fits) if fits else min(candidates))
    # The estimate grows with the tile: the double-buffered right and output blocks at least.
    assert weight_grad.vmem_bytes(256, rank, 2 * tile, itemsize) - weight_grad.vmem_bytes(
        256, rank, tile, itemsize
    ) >= 2 * tile * (256 * itemsize + rank * 4)


def test_kernel_in_several_q_tiles_equals_float64():
    """A width walked in several Q tiles (a VMEM limit that holds only 256 columns): every tile's visits add their
    own columns, each slot's f32 tile zeroed at its first visit and scaled at its last."""
    rng = np.random.default_rng(7)
    num_tokens, num_slots, rank, width = 600, 4, 16, 1024
    limit = weight_grad.vmem_bytes(128, rank, 256, 4)
    assert weight_grad.width_tile(width, 128, rank, 4, limit) == 256
    idx = _indices("per_token", num_tokens, num_slots, rng)
    idx[idx >= num_slots] = -1
    padded = 640
    left = np.zeros((padded, rank), np.float32)
    right = np.zeros((padded, width), np.float32)
    left[:num_tokens] = rng.standard_normal((num_tokens, rank))
    right[:num_tokens] = rng.standard_normal((num_tokens, width))
    indices = np.full(padded, -1, np.int32)
    indices[:num_tokens] = idx
    out = weight_grad.weight_grad(
        *map(jnp.asarray, (left, right, indices)),
        num_slots=num_slots,
        scaling=0.5,
        tokens=128,
        interpret=True,
        vmem_limit_bytes=limit,
    )
    expected = _reference(left, right, indices, num_slots, 0.5)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5 * np.abs(expected).max(), rtol=1e-5)


def test_non_finite_rows_stay_in_their_slot():
    """An Inf or NaN in one slot's rows (both operands) reaches that slot only: rows are selected, not
    multiplied by a zero mask."""
    rng = np.random.default_rng(0)
    idx = _indices("per_token", 256, 4, rng)
    left = rng.standard_normal((256, 8)).astype(np.float32)
    right = rng.standard_normal((256, 256)).astype(np.float32)
    poisoned = np.flatnonzero(idx == 2)
    left[poisoned[0]] = np.inf
    right[poisoned[1]] = np.nan
    right[np.flatnonzero(idx == -1)[0]] = np.inf  # a row without adapter
    out = np.asarray(_jax.weight_grad_fn(4, 1.0, "pallas", "cpu")(*map(jnp.asarray, (left, right, idx))))
    assert not np.isfinite(out[2]).all()
    clean_left, clean_right = left.copy(), right.copy()
    clean_left[idx == 2], clean_right[idx == 2] = 0, 0
    clean_right[idx == -1] = 0
    expected = _reference(clean_left, clean_right, idx, 4, 1.0)
    for slot in (0, 1, 3):
        np.testing.assert_allclose(out[slot], expected[slot], atol=1e-5 * np.abs(expected).max(), rtol=1e-5)


def test_bfloat16_against_float64():
    rng = np.random.default_rng(1)
    idx = _indices("rows", 300, 3, rng)
    left = jnp.asarray(rng.standard_normal((300, 16)), jnp.bfloat16)
    right = jnp.asarray(rng.standard_normal((300, 256)), jnp.bfloat16)
    out = np.asarray(_jax.weight_grad_fn(3, 1.0, "pallas", "cpu")(left, right, jnp.asarray(idx)), np.float64)
    expected = _reference(np.asarray(left, np.float64), np.asarray(right, np.float64), idx, 3, 1.0)
    # f32 accumulation of exact bf16 products; the result rounded to bfloat16 once.
    np.testing.assert_allclose(out, expected, atol=1e-2 * np.abs(expected).max(), rtol=1e-2)


@pytest.mark.parametrize("pattern", ["per_token", "rows"])
def test_visits_are_slot_major_and_cover_every_slot(pattern):
    """The host (NumPy) and device (jnp) builders agree, every slot has a visit, a slot's visits are
    consecutive, and the real visits are exactly the (slot, block) pairs some token makes plus one empty
    visit per unused slot."""
    rng = np.random.default_rng(2)
    num_slots, tokens = 6, 128
    idx = _indices(pattern, 1024, num_slots, rng)
    idx[idx >= num_slots] = -1  # the kernel's indices are in [-1, L), as the op pads them
    host = weight_grad.build_slot_visits(idx, num_slots, tokens, xp=np)
    device = weight_grad.build_slot_visits(jnp.asarray(idx), num_slots, tokens)
    for a, b in zip(host, device, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    count = int(host.count[0])
    pairs = list(zip(host.slot[:count].tolist(), host.block[:count].tolist(), strict=True))
    blocks = 1024 // tokens
    made = {(int(s), t // tokens) for t, s in enumerate(idx) if s >= 0}
    empty = {(s, blocks) for s in range(num_slots) if s not in idx}
    assert set(pairs) == made | empty and len(pairs) == len(made | empty)
    assert pairs == sorted(pairs)


# -- one pass over g: ds and dB (weight_grad.shrink_weight_grad, through the fused backward's g_pass) --------


def _g_pass_reference(s, g, b, indices):
    num_slots = b.shape[0]
    ds = np.zeros((len(indices), b.shape[1]))
    for t, slot in enumerate(indices):
        if 0 <= slot < num_slots:
            ds[t] = b[slot].astype(np.float64) @ g[t].astype(np.float64)
    return ds, _reference(s, g, indices, num_slots, 1.0)


@pytest.mark.parametrize(
    "num_tokens,num_slots,rank,width,pattern",
    # per-token slots in every block; rows across block boundaries with a width of two Q tiles; one token;
    # L * R too large for every slot's dB tile in VMEM (the separate kernels' fallback).
    [
        (200, 5, 16, 576, "per_token"),
        (1100, 4, 8, 2304, "rows"),
        (1, 3, 4, 128, "per_token"),
        (120, 160, 256, 256, "rows"),
    ],
)
def test_fused_g_pass_equals_float64(num_tokens, num_slots, rank, width, pattern):
    from torch_xla_lora.ops import _lora_grads_jax

    rng = np.random.default_rng(num_tokens)
    idx = _indices(pattern, num_tokens, num_slots, rng)
    s = rng.standard_normal((num_tokens, rank)).astype(np.float32)
    g = rng.standard_normal((num_tokens, width)).astype(np.float32)
    b = rng.standard_normal((num_slots, rank, width)).astype(np.float32)
    budget = weight_grad.fused_vmem_budget(block_sizes.vmem_limit("cpu"))
    tile = weight_grad.fused_width_tile(weight_grad.padded_width(width), 128, rank, num_slots, 4, budget)
    # Every slot's f32 dB tile of 128 columns, double-buffered, past the budget: the separate kernels.
    assert (tile is None) == (2 * num_slots * rank * 128 * 4 > budget)
    ds, d_b = _lora_grads_jax.g_pass(*map(jnp.asarray, (s, g, b, idx)), "cpu")
    expected_ds, expected_db = _g_pass_reference(s, g, b, idx)
    np.testing.assert_allclose(np.asarray(ds), expected_ds, atol=1e-5 * np.abs(expected_ds).max(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(d_b), expected_db, atol=1e-5 * np.abs(expected_db).max(), rtol=1e-5)
    unused = [slot for slot in range(num_slots) if slot not in idx]
    assert (np.asarray(d_b)[unused] == 0).all()


def test_fused_g_pass_keeps_non_finite_rows_in_their_slot():
    """An Inf in one slot's rows of g and s, and in a row without adapter, reaches only that slot's dB and its
    own rows of ds: both products select their rows (the kernel's shrink of g by every visit's B too)."""
    from torch_xla_lora.ops import _lora_grads_jax

    rng = np.random.default_rng(5)
    idx = _indices("per_token", 256, 4, rng)
    s = rng.standard_normal((256, 8)).astype(np.float32)
    g = rng.standard_normal((256, 256)).astype(np.float32)
    b = rng.standard_normal((4, 8, 256)).astype(np.float32)
    poisoned = np.flatnonzero(idx == 2)
    g[poisoned[0]] = np.inf
    s[poisoned[1]] = np.inf
    g[np.flatnonzero(idx == -1)[0]] = np.inf
    ds, d_b = (np.asarray(a) for a in _lora_grads_jax.g_pass(*map(jnp.asarray, (s, g, b, idx)), "cpu"))
    clean = idx != 2
    expected_ds, expected_db = _g_pass_reference(s, np.where((idx >= 0)[:, None], g, 0), b, np.where(clean, idx, -1))
    assert not np.isfinite(d_b[2]).all()
    for slot in (0, 1, 3):
        np.testing.assert_allclose(d_b[slot], expected_db[slot], atol=1e-5 * np.abs(expected_db).max(), rtol=1e-5)
    np.testing.assert_allclose(ds[clean], expected_ds[clean], atol=1e-5 * np.abs(expected_ds).max(), rtol=1e-5)
