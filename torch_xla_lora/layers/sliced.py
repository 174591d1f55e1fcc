"""LoRA on fused projections whose output is several slices: packed gate_up, fused QKV.

One shrink (A is shared by the slices, as PEFT stores one LoRA per module),
then one expand per slice into its own columns. Keeping the slices apart lets
each be sharded like its part of the base weight.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_xla_lora.errors import ShapeError
from torch_xla_lora.layers.linear import ColumnParallelLinearWithLoRA, linear_features


class _SlicedLinearWithLoRA(ColumnParallelLinearWithLoRA):
    num_slices: int

    @classmethod
    def can_replace(cls, module: nn.Module) -> bool:
        """A linear layer whose output splits into ``num_slices`` equal slices."""
        return super().can_replace(module) and linear_features(module)[1] % cls.num_slices == 0

    def __init__(self, base_layer: nn.Module, *args, slice_sizes: tuple[int, ...] | None = None, **kwargs):
        super().__init__(base_layer, *args, **kwargs)
        if slice_sizes is None:
            size, rest = divmod(self.out_features, self.num_slices)
            if rest:
                raise ShapeError(
                    f"{type(self).__name__}: out_features {self.out_features} does not split into "
                    f"{self.num_slices} equal slices; pass slice_sizes"
                )
            slice_sizes = (size,) * self.num_slices
        if len(slice_sizes) != self.num_slices or sum(slice_sizes) != self.out_features:
            raise ShapeError(
                f"{type(self).__name__}: slice_sizes {slice_sizes} must be {self.num_slices} sizes "
                f"adding up to out_features {self.out_features}"
            )
        offsets = [0]
        for size in slice_sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.slices = tuple(zip(offsets, slice_sizes, strict=True))

    def _expand(self, s: torch.Tensor, y: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        for offset, size in self.slices:
            b = self.lora_b[:, :, offset : offset + size]
            y = torch.ops.xla_lora.bgmv_expand_slice(s, b, y, slots, offset, True, self.backend)
        return y


class MergedColumnParallelLinearWithLoRA(_SlicedLinearWithLoRA):
    """Packed gate_up projection: two output slices."""

    num_slices = 2


class QKVParallelLinearWithLoRA(_SlicedLinearWithLoRA):
    """Fused q/k/v projection (e.g. GPT-2's ``c_attn`` Conv1D): three output slices."""

    num_slices = 3
