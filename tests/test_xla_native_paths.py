"""Each algorithm of the XLA-native ops, called as jax functions with jax arrays (fast: no torch_xla graph),
against float64 numpy math written here, token by token.

The grouped ops (shrink, expand, shrink_expand) choose their algorithm from device values: the direct one
(prefill), laned (one mixing token block, with every slot in one chunk or the distinct slots numbered over
several chunks; several mixing blocks with few distinct slots) or sorted (several mixing blocks, many distinct
slots). Each layout below names the algorithm it must take, and a spy checks it took that one (a wrong choice is
correct but slow). Every layout has unused slots full of Inf / NaN, and where it mixes slots one used slot with a
NaN in A and another with an Inf in B: their rows must come out non-finite, every other row as the float64 math
gives it (rows without adapter: exactly zero or the base). The rank-true pooled decode path runs with its packed
rows filling 1, 2 and 3 chunks of 128 columns (lanes of rank 0 between used lanes, lanes straddling a chunk
boundary, row-table entries naming the zero row inside a rank), the weight gradient and the XLA-native training
forward and backward with extra visits in every block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torch_xla_lora.kernels import visits
from torch_xla_lora.ops import _lora_grads_jax, _xla_native

SCALING = 0.5
D, DOUT = 24, 40
NAN_A, INF_B = "nan_a", "inf_b"


def _layout(name: str) -> tuple[list[int], int, int, int, dict, str]:
    """(indices, L, R, block_tokens, {slot: poison}, algorithm); slots no token uses are filled with Inf / NaN.
    Rank 64: 2 lanes a chunk."""
    if name == "direct":  # runs of one slot changing inside blocks 0 to 2 (block 1: the smaller slot second, then
        # rows without adapter, which sort last: block 2, on slot 0 first, must still get its own visit)
        idx = [0] * 5 + [2] * 6 + [-1] * 3 + [1] * 2 + [0] * 4 + [1] * 4 + [3] * 8
        return idx, 8, 64, 8, {2: NAN_A, 1: INF_B}, "direct"
    if name == "laned_blocks":  # 4 blocks of 8 mixing 4 slots: 2 chunks (slots 0, 2 | 5, 7)
        return [[0, 5, -1, 2, 7][t % 5] for t in range(32)], 8, 64, 8, {5: NAN_A, 2: INF_B}, "laned"
    if name == "sorted":  # 4 blocks mixing 6 slots: 3 chunks
        idx = [[7, 1, 3, -1, 4, 6, 0, 1][(t * 5) % 8] for t in range(32)]
        return idx, 8, 64, 8, {3: NAN_A, 6: INF_B}, "sorted"
    if name == "one_block_chunks":  # one block (decode) of 5 slots: 3 chunks, numbered on the device
        idx = [0, 2, 6, -1, 5, 3, 0, 2, 6, 5, 3, -1, 3, 0, 2, 6]
        return idx, 8, 64, 16, {2: NAN_A, 5: INF_B}, "laned"
    if name == "one_block_one_slot":
        return [2, -1, 2, 2, -1, 2, 2, 2] * 2, 8, 64, 16, {}, "direct"
    if name == "one_block_no_slot":
        return [-1] * 16, 8, 64, 16, {}, "direct"
    if name == "one_block_every_slot":  # rank 8: every slot in one chunk, lane = slot
        return [3, 0, -1, 1, 3, 2, 0, -1] * 2, 5, 8, 16, {3: NAN_A, 1: INF_B}, "laned"
    raise ValueError(name)


LAYOUTS = [
    "direct",
    "laned_blocks",
    "sorted",
    "one_block_chunks",
    "one_block_one_slot",
    "one_block_no_slot",
    "one_block_every_slot",
]
# The functions whose run shows the algorithm taken (sorted: the direct functions on the sorted rows too).
ALGORITHMS = {
    "laned": ("_laned_shrink", "_laned_expand", "_laned_shrink_expand"),
    "sorted": ("_sorted_plan",),
    "direct": ("_direct_shrink", "_direct_expand", "_direct_shrink_expand"),
}


def _tensors(name: str, seed: int = 0):
    idx, num_slots, rank, block, poison, _ = _layout(name)
    rng = np.random.default_rng(seed)
    tokens = len(idx)
    x = rng.standard_normal((tokens, D)).astype(np.float32)
    s = rng.standard_normal((tokens, rank)).astype(np.float32)
    a = (rng.standard_normal((num_slots, rank, D)) / D**0.5).astype(np.float32)
    b = (rng.standard_normal((num_slots, rank, DOUT)) / rank**0.5).astype(np.float32)
    base = rng.standard_normal((tokens, DOUT)).astype(np.float32)
    clean_a, clean_b = a.astype(np.float64), b.astype(np.float64)
    for slot in set(range(num_slots)) - set(idx):  # unused: every entry non-finite
        a[slot], b[slot] = np.inf, np.nan
    for slot, kind in poison.items():  # used: one entry; the reference reads that slot's poisoned weights as zeros
        if kind == NAN_A:
            a[slot, 1, 3], clean_a[slot] = np.nan, 0
        else:
            b[slot, 1, 3], clean_b[slot] = np.inf, 0
    return np.array(idx, np.int32), x, s, a, b, base, clean_a, clean_b, block


def _ops(x, s, a, b, base, idx, block: int):
    vis = visits.build(idx, a.shape[0], block)
    shrink = _xla_native.shrink(x, a, idx, vis, scaling=SCALING, block_tokens=block)
    expand = _xla_native.expand(s, b, base, idx, vis, add_inputs=True, block_tokens=block)
    fused = _xla_native.shrink_expand(x, a, b, base, idx, vis, scaling=SCALING, block_tokens=block)
    return shrink, expand, fused


def _expected(x, s, base, clean_a, clean_b, idx):
    """float64, token by token: (shrink, expand, shrink_expand)."""
    shrink = np.zeros((len(idx), clean_a.shape[1]))
    expand, fused = base.astype(np.float64), base.astype(np.float64)
    for t, slot in enumerate(idx.tolist()):
        if slot >= 0:
            shrink[t] = SCALING * clean_a[slot] @ x[t].astype(np.float64)
            expand[t] += s[t].astype(np.float64) @ clean_b[slot]
            fused[t] += shrink[t] @ clean_b[slot]
    return shrink, expand, fused


def _as_pool(weights: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool [L * R + 18, W + 8], rows [L, R]): the slots' rows scattered over a pool, with 16 rows no slot owns
    (Inf), then the zero row and a scratch row (NaN); 8 columns past the layer's W hold NaN (a pool wider than
    its layer): the pool a row table reads a slot layout from."""
    num_slots, rank, width = weights.shape
    data_rows = num_slots * rank + 16
    rows = np.random.default_rng(seed).permutation(data_rows)[: num_slots * rank].astype(np.int32)
    pool = np.full((data_rows + 2, width + 8), np.inf, np.float32)
    pool[:, width:] = np.nan
    pool[rows, :width] = weights.reshape(-1, width)
    pool[data_rows, :width], pool[data_rows + 1] = 0, np.nan
    return pool, rows.reshape(num_slots, rank)


def _pooled_ops(x, s, a_pool, b_pool, rows, base, idx, block: int):
    """The grouped ops on pool tiles: ``PoolTiles`` in place of the slot arrays (the pooled op's prefill path),
    read at the layer's widths."""
    a = _xla_native.PoolTiles(a_pool, None, rows, a_pool.dtype, D)
    b = _xla_native.PoolTiles(b_pool, None, rows, b_pool.dtype, DOUT)
    return _ops(x, s, a, b, base, idx, block)


@pytest.fixture(scope="module")
def grouped_ops():
    """(the three ops jitted on slot arrays, the same on pool tiles, the algorithms their last run took): every
    algorithm's functions report, through a debug callback, when the branch holding them runs (only the branch
    ``lax.switch`` / ``cond`` chose does)."""
    taken: set[str] = set()

    def spy(real, algorithm: str):
        def run(*args, **kwargs):
            jax.debug.callback(lambda: taken.add(algorithm))
            return real(*args, **kwargs)

        return run

    with pytest.MonkeyPatch.context() as patch:
        for algorithm, functions in ALGORITHMS.items():
            for function in functions:
                patch.setattr(_xla_native, function, spy(getattr(_xla_native, function), algorithm))
        yield jax.jit(_ops, static_argnums=6), jax.jit(_pooled_ops, static_argnums=7), taken


@pytest.mark.parametrize("pooled", [False, True], ids=["slots", "pool"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_grouped_ops_take_the_layouts_algorithm_and_equal_float64_math(name, pooled, grouped_ops):
    """Same shapes share one compiled function: 3 compilations for the 7 layouts, 3 more for their pools (the
    slots' rows scattered over a pool beside rows no slot owns, all Inf, read through a row table)."""
    run, run_pooled, taken = grouped_ops
    idx, x, s, a, b, base, clean_a, clean_b, block = _tensors(name)
    taken.clear()
    if pooled:
        (a_pool, rows), (b_pool, _) = _as_pool(a, 0), _as_pool(b, 0)
        outs = jax.block_until_ready(run_pooled(x, s, a_pool, b_pool, rows, base, idx, block))
    else:
        outs = jax.block_until_ready(run(x, s, a, b, base, idx, block))
    jax.effects_barrier()
    want = _layout(name)[5]
    assert taken == ({"sorted", "direct"} if want == "sorted" else {want})
    poison = _layout(name)[4]
    reads = [(NAN_A,), (INF_B,), (NAN_A, INF_B)]  # the poisons each op's weights can hold
    for out, expected, kinds in zip(outs, _expected(x, s, base, clean_a, clean_b, idx), reads, strict=True):
        out = np.asarray(out)
        own = np.isin(idx, [slot for slot, kind in poison.items() if kind in kinds])
        assert np.isfinite(out[~own]).all()
        np.testing.assert_allclose(out[~own], expected[~own], rtol=2e-5, atol=2e-5)
        assert (~np.isfinite(out[own])).any(axis=1).all(), "a poisoned slot's rows must show it"
        none = idx < 0
        assert np.array_equal(out[none], expected[none].astype(np.float32))  # exactly zero (shrink) or the base


class _Recorded(_xla_native.PoolTiles):
    """Pool tiles that record how many slots each read names."""

    reads: list[int] = []

    def __getitem__(self, slots):
        self.reads.append(int(np.prod(jnp.shape(slots))))
        return super().__getitem__(slots)


@pytest.mark.parametrize("name", ["direct", "sorted"])
def test_pooled_prefill_reads_the_visits_tiles_not_every_lane(name, monkeypatch):
    """The pooled op's prefill path (``PoolTiles`` given to the grouped op) reads, per read, the tiles of at most
    one slot per token block (the direct pass's first visits) or one slot (an extra visit), whatever L: with 64
    lanes and 4 token blocks no read names more than 4 slots (gathering the lanes into slots names all 64)."""
    idx, _, rank, block, _, _ = _layout(name)
    rng = np.random.default_rng(0)
    tokens, num_slots = len(idx), 64
    pool_a = rng.standard_normal((num_slots * rank + 2, D)).astype(np.float32)
    pool_b = rng.standard_normal((num_slots * rank + 2, DOUT)).astype(np.float32)
    rows = jnp.arange(num_slots * rank, dtype=jnp.int32).reshape(num_slots, rank)
    monkeypatch.setattr(_Recorded, "reads", [])
    indices = jnp.array(idx, jnp.int32)
    vis = visits.build(indices, num_slots, block)

    def run(x, base):
        a = _Recorded(pool_a, None, rows, np.float32)
        b = _Recorded(pool_b, None, rows, np.float32)
        return _xla_native.shrink_expand(x, a, b, base, indices, vis, scaling=SCALING, block_tokens=block)

    jax.eval_shape(run, jax.ShapeDtypeStruct((tokens, D), np.float32), jax.ShapeDtypeStruct((tokens, DOUT), np.float32))
    assert _Recorded.reads and max(_Recorded.reads) <= tokens // block


# -- rank-true pooled decode ---------------------------------------------------------------------------------

POOLED = {  # chunks: (lane ranks, max_rank, unused lanes, poisoned lane)
    # 54 rows, a used lane of rank 0 between used lanes: 1 chunk (static width 128: no loop)
    1: ([5, 0, 32, 17], 32, set(), None),
    # 188 rows; lane 5 straddles column 128, lanes 1 and 8 (rank 0, 1) between used lanes, 3 lanes unused
    2: ([32, 0, 32, 20, 32, 30, 9, 3, 1, 32, 32, 12], 32, {7, 10, 11}, 3),
    # 271 rows: lanes 7 and 11 straddle 128 and 256, lane 4 unused, ranks 0 and 1 between used lanes
    3: ([32, 17, 0, 32, 25, 32, 1, 32, 30, 32, 32, 31], 32, {4}, 7),
}
_POOLED_FN = jax.jit(lambda *args: _xla_native.pooled_shrink_expand(*args, None, scaling=SCALING))


@pytest.mark.parametrize("chunks", POOLED)
def test_pooled_decode_reads_used_true_rank_rows_in_chunks(chunks):
    """Rows no used lane owns hold NaN (A) and Inf (B): reading one, or a lane's columns reaching another lane's
    tokens, shows. A used lane's tokens get NaN from an Inf in its own B rows, no other token does."""
    ranks, max_rank, unused, poisoned_lane = POOLED[chunks]
    rng = np.random.default_rng(chunks)
    num_lanes, data_rows, tokens = len(ranks), 400, 24
    zero = data_rows
    free = rng.permutation(data_rows).tolist()
    rows = np.full((num_lanes, max_rank), zero, np.int32)
    for lane, rank in enumerate(ranks):
        rows[lane, :rank] = [free.pop() for _ in range(rank)]
    rows[0, 1] = zero  # inside the rank: read, as zeros
    used = [lane for lane in range(num_lanes) if lane not in unused]
    assert -(-sum(ranks[lane] for lane in used) // 128) == chunks
    dense_a = rng.standard_normal((data_rows + 2, D)) / 4
    dense_b = rng.standard_normal((data_rows + 2, DOUT)) / 4
    dense_a[zero], dense_b[zero] = 0, 0
    a_pool, b_pool = dense_a.astype(np.float32), dense_b.astype(np.float32)
    read = {r for lane in used for r in rows[lane, : ranks[lane]].tolist()}
    unread = np.array([r not in read for r in range(data_rows)] + [False, True])
    a_pool[unread], b_pool[unread] = np.nan, np.inf
    if poisoned_lane is not None:
        b_pool[rows[poisoned_lane, 2], 5] = np.inf
    choices = used + [-1, num_lanes]
    lanes = np.array([choices[t % len(choices)] for t in range(tokens)], np.int32)
    rng.shuffle(lanes)
    out = np.asarray(
        _POOLED_FN(
            x := rng.standard_normal((tokens, D)).astype(np.float32),
            a_pool,
            b_pool,
            base := rng.standard_normal((tokens, DOUT)).astype(np.float32),
            lanes,
            rows,
        )
    )
    expected = base.astype(np.float64)
    for t, lane in enumerate(lanes.tolist()):
        if 0 <= lane < num_lanes:
            mine = rows[lane, : ranks[lane]]
            expected[t] += SCALING * (dense_a[mine] @ x[t].astype(np.float64)) @ dense_b[mine]
    own = lanes == poisoned_lane
    assert (~np.isfinite(out[own])).any(axis=1).all()
    assert np.isfinite(out[~own]).all()
    np.testing.assert_allclose(out[~own], expected[~own], rtol=2e-5, atol=2e-5)
    outside = (lanes < 0) | (lanes >= num_lanes)
    assert np.array_equal(out[outside], base[outside])


# -- gradients ---------------------------------------------------------------------------------------------


def _segmented_outer(left, right, idx, num_slots):
    out = np.zeros((num_slots, left.shape[1], right.shape[1]))
    for t, slot in enumerate(idx.tolist()):
        if 0 <= slot < num_slots:
            out[slot] += np.outer(left[t].astype(np.float64), right[t].astype(np.float64))
    return out


def test_weight_grad_sums_each_slots_rows_once():
    """48 tokens in blocks of 8 mixing 4 of 5 slots (extra visits in every block); rows without adapter hold
    Inf, and the unused slot stays exactly zero."""
    rng = np.random.default_rng(5)
    idx = rng.choice([0, 1, 3, 4, -1], size=48).astype(np.int32)
    left = rng.standard_normal((48, 6)).astype(np.float32)
    right = rng.standard_normal((48, 10)).astype(np.float32)
    left[idx < 0], right[idx < 0] = np.inf, np.nan
    fn = jax.jit(lambda *a: _xla_native.weight_grad(*a, 5, scaling=SCALING, block_tokens=8))
    out = np.asarray(fn(left, right, idx))
    np.testing.assert_allclose(out, SCALING * _segmented_outer(left, right, idx, 5), rtol=2e-5, atol=2e-5)
    assert np.array_equal(out[2], np.zeros_like(out[2]))


@pytest.mark.parametrize("num_slots", [5, _lora_grads_jax.SELECT_SUM_MAX_SLOTS + 3], ids=["select", "scatter"])
def test_xla_training_forward_and_grads_equal_float64_math(num_slots):
    """200 tokens (4 sorted blocks of 64) on random slots of which the last is unused (its weights Inf), -1 and
    out-of-range rows (their x Inf, their output gradient NaN: no slot's products may read them): out, s, dA, dB
    and dx, with s kept from the forward and recomputed."""
    rng = np.random.default_rng(num_slots)
    tokens, rank = 200, 4
    idx = rng.integers(-1, num_slots + 1, size=tokens).astype(np.int32)
    idx[idx == num_slots - 1] = 0
    x = rng.standard_normal((tokens, D)).astype(np.float32)
    g = rng.standard_normal((tokens, DOUT)).astype(np.float32)
    base = rng.standard_normal((tokens, DOUT)).astype(np.float32)
    a = (rng.standard_normal((num_slots, rank, D)) / 4).astype(np.float32)
    b = (rng.standard_normal((num_slots, rank, DOUT)) / 2).astype(np.float32)
    a[-1], b[-1] = np.inf, np.inf
    inside = (idx >= 0) & (idx < num_slots)
    x[~inside], g[~inside] = np.inf, np.nan  # rows without adapter: must reach no slot's gradient
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    a64[-1], b64[-1] = 0, 0
    s_want = np.zeros((tokens, rank))
    ds = np.zeros((tokens, rank))
    out_want = base.astype(np.float64)
    for t in np.flatnonzero(inside):
        s_want[t] = SCALING * a64[idx[t]] @ x[t]
        out_want[t] += s_want[t] @ b64[idx[t]]
        ds[t] = b64[idx[t]] @ g[t]
    safe = np.where(inside, idx, -1)
    d_a = SCALING * _segmented_outer(ds, x, safe, num_slots)
    d_b = _segmented_outer(s_want, g, safe, num_slots)
    dx = np.zeros((tokens, D))
    for t in np.flatnonzero(inside):
        dx[t] = SCALING * ds[t] @ a64[idx[t]]

    forward = jax.jit(lambda *args: _lora_grads_jax.xla_forward(*args, scaling=SCALING))
    out, s = (np.asarray(v) for v in forward(x, a, b, base, idx))
    np.testing.assert_allclose(out, out_want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(s, s_want, rtol=2e-5, atol=2e-5)
    assert np.array_equal(out[~inside], base[~inside])
    grads = jax.jit(lambda *args: _lora_grads_jax.xla_grads(*args, scaling=SCALING, with_dx=True))
    for kept in (s, None):
        got = [np.asarray(v) for v in grads(g, x, a, b, idx, kept)]
        for value, want in zip(got, (d_a, d_b, dx), strict=True):
            np.testing.assert_allclose(value, want, rtol=5e-5, atol=5e-5)
