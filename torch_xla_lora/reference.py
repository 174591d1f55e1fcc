"""Plain-torch definitions of every op: the CPU path and the tests' reference.

Each function loops over the adapter slots present in the batch, so it is
exact and readable but has data-dependent shapes: use it eagerly, never inside
an XLA graph. Accumulation is float32; outputs have the op's output dtype.
"""

from __future__ import annotations

import torch


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
    out = inputs.new_zeros((inputs.shape[0], lora_a.shape[1]), dtype=torch.float32)
    for slot, rows in _slot_rows(lora_indices, lora_a.shape[0]):
        out[rows] = inputs[rows].float() @ lora_a[slot].float().T
    return (out * scaling).to(inputs.dtype)


def bgmv_expand(
    inputs: torch.Tensor,  # [T, R]
    lora_b: torch.Tensor,  # [L, R, Dout]
    base: torch.Tensor,  # [T, Dout]
    lora_indices: torch.Tensor,  # [T]
    add_inputs: bool = True,
) -> torch.Tensor:  # [T, Dout], base.dtype
    """``out[t] = (base[t] if add_inputs else 0) + inputs[t] @ lora_b[i_t]``."""
    out = base.to(torch.float32, copy=True) if add_inputs else torch.zeros_like(base, dtype=torch.float32)
    for slot, rows in _slot_rows(lora_indices, lora_b.shape[0]):
        out[rows] += inputs[rows].float() @ lora_b[slot].float()
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
    out = base.to(torch.float32, copy=True) if add_inputs else torch.zeros_like(base, dtype=torch.float32)
    columns = slice(slice_offset, slice_offset + lora_b.shape[2])
    for slot, rows in _slot_rows(lora_indices, lora_b.shape[0]):
        out[rows, columns] += inputs[rows].float() @ lora_b[slot].float()
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
    out = base.to(torch.float32, copy=True)
    for slot, rows in _slot_rows(lora_indices, lora_a.shape[0]):
        shrunk = (scaling * (inputs[rows].float() @ lora_a[slot].float().T)).to(lora_b.dtype)
        out[rows] += shrunk.float() @ lora_b[slot].float()
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
    w = weight.float() if weight_layout == "in_out" else weight.float().T
    out = inputs.float() @ w
    if bias is not None:
        out = out + bias.float()
    for slot, rows in _slot_rows(lora_indices, lora_a.shape[0]):
        shrunk = (scaling * (inputs[rows].float() @ lora_a[slot].float().T)).to(lora_b.dtype)
        out[rows] += shrunk.float() @ lora_b[slot].float()
    return out.to(inputs.dtype)
