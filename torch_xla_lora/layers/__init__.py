"""LoRA layers: one kind a file, on a small shared base (see ``base.py``)."""

from torch_xla_lora.layers.base import BaseLayerWithLoRA
from torch_xla_lora.layers.embedding import EmbeddingWithLoRA
from torch_xla_lora.layers.experts import ExpertsWithLoRA, RouterWithLoRA
from torch_xla_lora.layers.linear import (
    ColumnParallelLinearWithLoRA,
    LinearWithLoRA,
    LogitsWithLoRA,
    RowParallelLinearWithLoRA,
)
from torch_xla_lora.layers.sliced import MergedColumnParallelLinearWithLoRA, QKVParallelLinearWithLoRA

__all__ = [
    "BaseLayerWithLoRA",
    "LinearWithLoRA",
    "ColumnParallelLinearWithLoRA",
    "MergedColumnParallelLinearWithLoRA",
    "QKVParallelLinearWithLoRA",
    "RowParallelLinearWithLoRA",
    "LogitsWithLoRA",
    "EmbeddingWithLoRA",
    "ExpertsWithLoRA",
    "RouterWithLoRA",
]
