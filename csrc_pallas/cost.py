"""Modelled TPU time of the shrink-expand kernels (host-only numpy), shared by the fused op's planner
(:func:`fused_is_cheaper`, called by ``fused.plan_call``) and the bench's cost model (``bench/tpu_model.py``).

Both kernels are priced the same way, from the grid each would run for a batch (the real visit and
lane metadata, built by the code the op uses) and the BlockSpecs of its kernel:

- pipelined HBM bytes: a block is fetched (the output: written back) when its block index changes
  between consecutive grid steps, as the TPU pipeline does;
- bytes of manual DMAs (the fused kernel's adapter tiles, ``fused.step_work``), which the kernel waits for;
- MXU flops, every matmul's K and N padded to whole W x W tiles at MXU width W;
- grid steps, each with a fixed overhead;
- passes XLA runs around the call on its own (x and base padded to the buffers' widths), serial.

Time = max(pipelined bytes / HBM bandwidth, MXU flops / peak) + (manual + padding bytes) / bandwidth
+ steps * step overhead. The per-chip figures are the tuning table's (:func:`figures`).

Importing this module does not import JAX (the bench's model imports it at its top).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import numpy as np

from . import block_sizes, tuning


class Figures(NamedTuple):
    """What the model prices with: HBM bytes/s, peak MXU flops/s, MXU width, seconds per grid step."""

    hbm_bytes_per_s: float
    peak_flops: float
    mxu_width: int
    step_overhead_s: float


def figures(generation: str) -> Figures:
    """The tuning table's figures of ``generation`` ("cpu", interpret mode, plans like v5e)."""
    key = generation if generation in tuning.HBM_BYTES_PER_S else block_sizes.known(generation)
    return Figures(tuning.HBM_BYTES_PER_S[key], tuning.PEAK_FLOPS[key], tuning.MXU_WIDTH[key], tuning.STEP_OVERHEAD_S)


@dataclasses.dataclass(frozen=True)
class Cost:
    """One call's modelled traffic and work, and its seconds (see the module docstring)."""

    pipelined_bytes: int
    manual_bytes: int
    mxu_flops: float
    steps: int
    seconds: float
    padding_bytes: int = 0


def mxu_flops(matmuls, width: int) -> float:
    """Flops the MXU spends on (M, K, N) matmuls, K and N padded to whole W x W tiles."""
    return sum(2.0 * m * math.ceil(k / width) * width * math.ceil(n / width) * width for m, k, n in matmuls)


def seconds(chip, pipelined: int, manual: int, flops: float, steps: int, padding: int = 0) -> float:
    """The model's time on ``chip`` (any object with :class:`Figures`' attributes)."""
    bandwidth = chip.hbm_bytes_per_s
    return (
        max(pipelined / bandwidth, flops / chip.peak_flops)
        + (manual + padding) / bandwidth
        + (steps * chip.step_overhead_s)
    )


def _padded_slots(indices: np.ndarray, num_slots: int, block: int) -> np.ndarray:
    """[T_pad] int32: ``indices`` padded to whole token blocks with -1, entries outside [0, L) made -1."""
    indices = np.asarray(indices)
    padded = np.full(-(-max(len(indices), 1) // block) * block, -1, np.int32)
    padded[: len(indices)] = np.where((indices >= 0) & (indices < num_slots), indices, -1)
    return padded


def fused_walk(
    indices: np.ndarray, hidden: int, out_dim: int, rank: int, num_slots: int, dtype, generation: str, chip=None
) -> Cost:
    """The fused kernel (``fused.shrink_expand``) on the batch whose token slots are ``indices``, as
    ``fused.plan`` tiles it on ``generation``: its grid walked step by step with its own ``grid_spec``
    (pipelined blocks) and ``fused.step_work`` (the adapter tiles' DMAs, at their lane-padded widths,
    and the matmuls). ``chip``: the figures to price with (default :func:`figures` of ``generation``)."""
    import jax.numpy as jnp

    from . import fused, visits

    chip = chip or figures(generation)
    itemsize = jnp.dtype(dtype).itemsize
    sizes, lanes = fused.plan(len(indices), hidden, out_dim, rank, num_slots, dtype, generation)
    padded = _padded_slots(indices, num_slots, sizes.tokens)
    meta = visits.build_lanes(padded, num_slots, sizes.tokens, lanes, xp=np)
    spec = fused.grid_spec(len(padded), hidden, out_dim, rank, num_slots, dtype, sizes, lanes)
    prefetch = (meta.active, meta.chunks, meta.slots, meta.uniform)
    specs = [*spec.in_specs, spec.out_specs]
    last = [None] * len(specs)
    pipelined = manual = 0
    flops = 0.0
    steps = int(meta.num_active[0]) * spec.grid[1]
    for i in range(int(meta.num_active[0])):
        for n in range(spec.grid[1]):
            for k, block_spec in enumerate(specs):
                if block_spec.block_shape is None:  # memory_space=ANY: moved by manual DMAs
                    continue
                index = tuple(int(v) for v in block_spec.index_map(i, n, *prefetch))
                if index != last[k]:
                    pipelined += math.prod(block_spec.block_shape) * (4 if k == 0 else itemsize)
                    last[k] = index
            dma, matmuls = fused.step_work(i, n, meta, rank, hidden, lanes, sizes, itemsize)
            manual += dma
            flops += mxu_flops(matmuls, chip.mxu_width)
    return Cost(pipelined, manual, flops, steps, seconds(chip, pipelined, manual, flops, steps))


def _fetches(*coords: np.ndarray) -> int:
    """Blocks a BlockSpec fetches over a grid whose steps give it the block index ``coords`` (one array per
    index dimension, in grid order): one at the first step, then one at every change."""
    changed = np.zeros(len(coords[0]), bool)
    changed[0] = True
    for c in coords:
        changed[1:] |= c[1:] != c[:-1]
    return int(changed.sum())


def separate_walk(
    indices: np.ndarray,
    hidden: int,
    out_dim: int,
    rank: int,
    num_slots: int,
    dtype,
    generation: str,
    chip=None,
    lane_padded: bool = False,
) -> Cost:
    """The separate shrink then expand kernels (``shrink.shrink``, ``expand.expand`` with the base added), as
    ``ops._jax.shrink_expand_fn`` runs them where the fused kernel does not: the tuning table's token block
    and tiles (``block_sizes.choose``), the batch's visits (``visits.build``: one per token block and slot
    present in it, a block without adapter once), every grid step of both kernels' BlockSpecs:

    - shrink, grid (visits, D / bd): the x block at (block, k), A's [1, R, bd] tile at (slot, k), the
      [bt, R] products written at (block, 0); a (bt, bd, R) matmul at the steps of a visit with a slot;
    - expand, grid (Dout / bn, visits): the codes and products at (block, 0), B's tile at (slot, n),
      the base read and the output written at (block, n); a (bt, R, bn) matmul at the steps with a slot.

    ``lane_padded``: the adapter buffers are padded to whole 128-lane tiles (``fused.padded_width``, as the
    expert layer stores its slots): at widths that are not multiples of 128 the kernels then run at the
    padded widths, and x and base are first padded with zero columns to them (XLA passes, serial).
    """
    import jax.numpy as jnp

    from . import fused, visits

    chip = chip or figures(generation)
    itemsize = jnp.dtype(dtype).itemsize
    num_tokens = len(indices)
    wide_in = fused.padded_width(hidden) if lane_padded else hidden
    wide_out = fused.padded_width(out_dim) if lane_padded else out_dim
    bt = block_sizes.choose(num_tokens, hidden, out_dim, generation).tokens
    sizes = block_sizes.choose(num_tokens, wide_in, wide_out, generation)
    padded = _padded_slots(indices, num_slots, bt)
    vis = visits.build(padded, num_slots, bt, xp=np)
    count = int(vis.count[0])
    block, slot = vis.block[:count].astype(np.int64), np.maximum(vis.slot[:count], 0).astype(np.int64)
    used = int((vis.slot[:count] >= 0).sum())
    k_tiles, n_tiles = wide_in // sizes.hidden, wide_out // sizes.out
    bd, bn = sizes.hidden, sizes.out

    # Shrink: visit-major, the reduction tile inner.
    sv, sk = np.repeat(block, k_tiles), np.tile(np.arange(k_tiles), count)
    s_slot = np.repeat(slot, k_tiles)
    shrink_bytes = (
        _fetches(np.repeat(block, k_tiles)) * bt * 4  # codes
        + _fetches(sv, sk) * bt * bd * itemsize  # x
        + _fetches(s_slot, sk) * rank * bd * itemsize  # A
        + _fetches(np.repeat(block, k_tiles)) * bt * rank * itemsize  # products out
    )
    # Expand: the output tile outer, visits inner.
    ev, en = np.tile(block, n_tiles), np.repeat(np.arange(n_tiles), count)
    e_slot = np.tile(slot, n_tiles)
    expand_bytes = (
        _fetches(ev) * bt * (4 + rank * itemsize)  # codes and products
        + _fetches(e_slot, en) * rank * bn * itemsize  # B
        + 2 * _fetches(ev, en) * bt * bn * itemsize  # base in, output out
    )
    flops = used * (
        k_tiles * mxu_flops([(bt, bd, rank)], chip.mxu_width) + n_tiles * mxu_flops([(bt, rank, bn)], chip.mxu_width)
    )
    steps = count * (k_tiles + n_tiles)
    rows = len(padded)
    padding = itemsize * rows * (hidden + wide_in) * (wide_in != hidden)  # x, read and written padded
    padding += itemsize * rows * (out_dim + wide_out) * (wide_out != out_dim)  # base
    pipelined = shrink_bytes + expand_bytes
    return Cost(pipelined, 0, flops, steps, seconds(chip, pipelined, 0, flops, steps, padding), padding)


def typical_slots(num_tokens: int, num_slots: int) -> np.ndarray:
    """[T] slots of the batch a plan is priced on: every token on an adapter, as many of the L slots as T
    allows, each on an equal contiguous run of tokens (a prefill batch of requests on every slot; the expert
    layer's rows sorted by expert under balanced routing, whose (slot, expert) entries come in such runs)."""
    used = max(1, min(num_tokens, num_slots))
    return ((np.arange(num_tokens) * used // max(num_tokens, 1)) * (num_slots // used)).astype(np.int32)


@functools.lru_cache(maxsize=4096)
def fused_is_cheaper(
    num_tokens: int, hidden: int, out_dim: int, rank: int, num_slots: int, dtype: str, generation: str
) -> bool:
    """Whether the fused kernel's modelled time is no worse than the separate shrink and expand's on
    ``generation``, both priced (:func:`fused_walk`, :func:`separate_walk` on lane-padded buffers, what the
    op runs where the fused kernel may) on :func:`typical_slots`. The fused kernel's plan must fit VMEM."""
    slots = typical_slots(num_tokens, num_slots)
    fused = fused_walk(slots, hidden, out_dim, rank, num_slots, dtype, generation)
    separate = separate_walk(slots, hidden, out_dim, rank, num_slots, dtype, generation, lane_padded=True)
    return fused.seconds <= separate.seconds
