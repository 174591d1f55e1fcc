"""Plain-torch definitions of every op: the CPU path and the tests' reference.

Each function loops over the adapter slots present in the batch, so it is
exact and readable but has data-dependent shapes: use it eagerly, never inside
an XLA graph. Accumulation is float32 (float64 for float64 tensors, so that
``torch.autograd.gradcheck`` can run on them); outputs have the op's output dtype.
"""

from __future__ import annotations

import torch


def _acc(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of ``tensors``: float32, or float64 if any of them is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _slot_rows(lora_indices: torch.Tensor, num_slots: int):
    """Yield (slot, row mask) for each slot in [0, num_slots) that some token uses."""
    for slot in torch.unique(lora_indices).tolist():
        if 0 <= slot < num_slots:
            yield slot, lora_indices == slot


def bgmv_shrink(
    inputs: torch.Tensor,  # [T, D]
    lora_a: torch.Tensor,  # [L, R, D]
    lora_indices: torch.Tensor,  # [T]
    scaling: float = 1.0,
) -> torch.Tensor:  # [T, R], inputs.dtype
    """``out[t] = scaling * lora_a[i_t] @ inputs[t]``, zero where ``i_t`` is not in [0, L)."""
    acc = _acc(inputs, lora_a)
    out = inputs.new_zeros((inputs.shape[0], lora_a.shape[1]), dtype=acc)
    for slot, rows in _slot_rows(lora_indices, lora_a.shape[0]):
        out[rows] = inputs[rows].to(acc) @ lora_a[slot].to(acc).T
    return (out * scaling).to(inputs.dtype)


def bgmv_expand(
    inputs: torch.Tensor,  # [T, R]
    lora_b: torch.Tensor,  # [L, R, Dout]
    base: torch.Tensor,  # [T, Dout]
    lora_indices: torch.Tensor,  # [T]
    add_inputs: bool = True,
) -> torch.Tensor:  # [T, Dout], base.dtype
    """``out[t] = (base[t] if add_inputs else 0) + inputs[t] @ lora_b[i_t]``."""
    acc = _acc(inputs, lora_b, base)
    out = base.to(acc, copy=True) if add_inputs else torch.zeros_like(base, dtype=acc)
    for slot, rows in _slot_rows(lora_indices, lora_b.shape[0]):
        out[rows] += inputs[rows].to(acc) @ lora_b[slot].to(acc)
    return out.to(base.dtype)


def bgmv_expand_slice(
    inputs: torch.Tensor,  # [T, R]
    lora_b: torch.Tensor,  # [L, R, S]
    base: torch.Tensor,  # [T, Dout]
    lora_indices: torch.Tensor,  # [T]
    slice_offset: int,
    add_inputs: bool = True,
) -> torch.Tensor:  # [T, Dout], base.dtype
    """As :func:`bgmv_expand` into columns ``[slice_offset, slice_offset + S)``; other columns
    equal ``base`` (or 0 when ``add_inputs`` is False)."""
    acc = _acc(inputs, lora_b, base)
    out = base.to(acc, copy=True) if add_inputs else torch.zeros_like(base, dtype=acc)
    columns = slice(slice_offset, slice_offset + lora_b.shape[2])
    for slot, rows in _slot_rows(lora_indices, lora_b.shape[0]):
        out[rows, columns] += inputs[rows].to(acc) @ lora_b[slot].to(acc)
    return out.to(base.dtype)


def bgmv_shrink_expand(
    inputs: torch.Tensor,  # [T, D]
    lora_a: torch.Tensor,  # [L, R, D]
    lora_b: torch.Tensor,  # [L, R, Dout]
    base: torch.Tensor,  # [T, Dout]
    lora_indices: torch.Tensor,  # [T]
    scaling: float = 1.0,
) -> torch.Tensor:  # [T, Dout], base.dtype
    """``out[t] = base[t] + scaling * (inputs[t] @ lora_a[i_t].T) @ lora_b[i_t]``.

    The rank-sized intermediate is rounded to lora_b's dtype before the expand,
    as separate shrink and expand ops (and PEFT) do.
    """
    acc = _acc(inputs, lora_a, lora_b, base)
    out = base.to(acc, copy=True)
    for slot, rows in _slot_rows(lora_indices, lora_a.shape[0]):
        shrunk = (scaling * (inputs[rows].to(acc) @ lora_a[slot].to(acc).T)).to(lora_b.dtype)
        out[rows] += shrunk.to(acc) @ lora_b[slot].to(acc)
    return out.to(base.dtype)


def pooled_shrink_expand(
    inputs: torch.Tensor,  # [T, D]
    a_pool: torch.Tensor,  # [P + 2, D]
    b_pool: torch.Tensor,  # [P + 2, Dout]
    base: torch.Tensor,  # [T, Dout]
    lanes: torch.Tensor,  # [T]
    rows: torch.Tensor,  # [L, R]
    a_scale: torch.Tensor | None = None,  # [P + 2]
    b_scale: torch.Tensor | None = None,  # [P + 2]
    scaling: float = 1.0,
) -> torch.Tensor:  # [T, Dout], base.dtype
    """``out[t] = base[t] + (scaling * s) @ B`` with A, B the pool rows of lane ``lanes[t]``'s true rank.

    A lane's true rank r is the position after the last entry of ``rows[lane]`` that is not the zero row
    (row P); only its first r rows are read. int8 pools: ``s = (x A_q^T) * a_scale * b_scale`` per rank
    channel and B_q unscaled, the scales exact per row. ``s`` is rounded to the inputs' dtype before the expand.
    """
    acc = _acc(inputs, base)
    zero_row = a_pool.shape[0] - 2
    out = base.to(acc, copy=True)
    for lane, tokens in _slot_rows(lanes, rows.shape[0]):
        picked = _true_rank_rows(rows, lane, zero_row)
        if picked is None:  # a lane with no rows: its tokens get the base
            continue
        shrunk = scaling * (inputs[tokens].to(acc) @ a_pool[picked].to(acc).T)
        if a_scale is not None:
            shrunk = shrunk * (a_scale[picked].to(acc) * b_scale[picked].to(acc))
        out[tokens] += shrunk.to(inputs.dtype).to(acc) @ b_pool[picked].to(acc)
    return out.to(base.dtype)


def _true_rank_rows(rows: torch.Tensor, lane: int, zero_row: int) -> torch.Tensor | None:
    """Lane ``lane``'s pool rows up to its true rank (int64), or None for a lane with no rows."""
    named = (rows[lane] != zero_row).nonzero()
    return None if named.numel() == 0 else rows[lane, : int(named.max()) + 1].long()


def pooled_expand(
    inputs: torch.Tensor,  # [T, R]
    b_pool: torch.Tensor,  # [P + 2, Dout]
    base: torch.Tensor,  # [T, Dout]
    lanes: torch.Tensor,  # [T]
    rows: torch.Tensor,  # [L, R]
    b_scale: torch.Tensor | None = None,  # [P + 2]
) -> torch.Tensor:  # [T, Dout], base.dtype
    """``out[t] = base[t] + s[t, :r] @ B`` with B the pool rows of lane ``lanes[t]``'s true rank r (as in
    :func:`pooled_shrink_expand`). int8 pools: each row's scale multiplies s's column, rounded to s's dtype."""
    acc = _acc(inputs, base)
    out = base.to(acc, copy=True)
    for lane, tokens in _slot_rows(lanes, rows.shape[0]):
        picked = _true_rank_rows(rows, lane, b_pool.shape[0] - 2)
        if picked is None:  # a lane with no rows: its tokens get the base
            continue
        s = inputs[tokens, : picked.numel()].to(acc)
        if b_scale is not None:
            s = s * b_scale[picked].to(acc)
        out[tokens] += s.to(inputs.dtype).to(acc) @ b_pool[picked].to(acc)
    return out.to(base.dtype)


def linear_lora(
    inputs: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K] ("out_in") or [K, N] ("in_out")
    bias: torch.Tensor | None,  # [N]
    lora_a: torch.Tensor,  # [L, R, K]
    lora_b: torch.Tensor,  # [L, R, N]
    lora_indices: torch.Tensor,  # [T]
    scaling: float = 1.0,
    weight_layout: str = "out_in",
) -> torch.Tensor:  # [T, N], inputs.dtype
    """``out[t] = inputs[t] @ W^T (+ bias) + scaling * (inputs[t] @ lora_a[i_t].T) @ lora_b[i_t]``.

    Accumulated in float32 and rounded once; the rank intermediate is rounded
    to lora_b's dtype, as in :func:`bgmv_shrink_expand`.
    """
    acc = _acc(inputs, weight, lora_a, lora_b)
    w = weight.to(acc) if weight_layout == "in_out" else weight.to(acc).T
    out = inputs.to(acc) @ w
    if bias is not None:
        out = out + bias.to(acc)
    for slot, rows in _slot_rows(lora_indices, lora_a.shape[0]):
        shrunk = (scaling * (inputs[rows].to(acc) @ lora_a[slot].to(acc).T)).to(lora_b.dtype)
        out[rows] += shrunk.to(acc) @ lora_b[slot].to(acc)
    return out.to(inputs.dtype)


def bgmv_weight_grad(
    left: torch.Tensor,  # [T, P]
    right: torch.Tensor,  # [T, Q]
    lora_indices: torch.Tensor,  # [T]
    num_slots: int,
    scaling: float = 1.0,
) -> torch.Tensor:  # [L, P, Q], right.dtype
    """``out[l] = scaling * sum over the tokens t with i_t == l of outer(left[t], right[t])``.

    The gradient of a slot weight: a slot no token uses is exactly zero, and a
    token whose index is outside [0, num_slots) contributes nothing.
    """
    acc = _acc(left, right)
    out = torch.zeros((num_slots, left.shape[1], right.shape[1]), dtype=acc, device=right.device)
    for slot, rows in _slot_rows(lora_indices, num_slots):
        out[slot] = left[rows].to(acc).T @ right[rows].to(acc)
    return (out * scaling).to(right.dtype)
