"""LoRA on fused projections whose output is several equal slices: packed gate_up, fused QKV.

PEFT trains one LoRA for the whole fused module: A is shared by the slices and
B spans all of them. So the forward is the column-parallel one, unchanged: one
fused ``bgmv_shrink_expand`` over every output column, all slices at once. On a
mesh B's columns are sharded like the base weight's, so each shard holds the
B columns of its own base columns, whichever slices they belong to, and one op
per shard covers them. The kinds record that the output is ``num_slices`` equal slices; a fused module
whose width does not split so (multi-query ``query_key_value``) is patched as a
plain :class:`ColumnParallelLinearWithLoRA`, with the same result.
"""

from __future__ import annotations

from torch import nn

from torch_xla_lora.layers.linear import ColumnParallelLinearWithLoRA, linear_features


class _SlicedLinearWithLoRA(ColumnParallelLinearWithLoRA):
    num_slices: int

    @classmethod
    def can_replace(cls, module: nn.Module) -> bool:
        """A linear layer whose output splits into ``num_slices`` equal slices."""
        return super().can_replace(module) and linear_features(module)[1] % cls.num_slices == 0


class MergedColumnParallelLinearWithLoRA(_SlicedLinearWithLoRA):
    """Packed gate_up projection: two output slices, one fused op over both."""

    num_slices = 2


class QKVParallelLinearWithLoRA(_SlicedLinearWithLoRA):
    """Fused q/k/v projection (e.g. GPT-2's ``c_attn`` Conv1D): three output slices, one fused op over all."""

    num_slices = 3
