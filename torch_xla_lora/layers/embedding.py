"""LoRA on token embeddings (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``)."""

from __future__ import annotations

import torch
from torch import nn

from torch_xla_lora import pool
from torch_xla_lora.adapters import ModuleLoRA
from torch_xla_lora.layers.base import BaseLayerWithLoRA


def embed_scale(module: nn.Module) -> torch.Tensor | float | None:
    """The scalar a scaled word embedding multiplies its rows by (Gemma, Gemma2/3, XGLM, BART...), or None.

    Such modules carry ``embed_scale`` (a one-element tensor or a number) and
    scale their own output; the LoRA term is scaled alike, as PEFT does. A
    tensor with more than one element is not a scalar scale and is ignored (PEFT
    ignores it too, with a warning).
    """
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, bool):
        return None
    if isinstance(scale, (int, float)):
        return float(scale)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None


def scaled(tensor: torch.Tensor, scale: torch.Tensor | float | None) -> torch.Tensor:
    """``tensor`` times an :func:`embed_scale` (None: unchanged), in ``tensor``'s dtype.

    A tensor scale is cast to ``tensor``'s dtype first, as transformers' scaled
    embeddings (``* embed_scale.to(weight.dtype)``) and PEFT do; a number multiplies as is.
    """
    if scale is None:
        return tensor
    return tensor * (scale.to(tensor.dtype) if isinstance(scale, torch.Tensor) else scale)


class EmbeddingWithLoRA(BaseLayerWithLoRA):
    """``y = E[id_t] + B[slot_t] A[slot_t][:, id_t]``, times the base's ``embed_scale`` if it has one.

    A is stored token-major, ``lora_a`` [L, vocab, R], so the per-token rows
    are one gather at ``slot * vocab + id``: O(T * R), whatever the number of
    slots, with no transpose of the buffer per step.
    """

    def __init__(self, base_layer: nn.Embedding, *args, **kwargs) -> None:
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        super().__init__(base_layer, *args, **kwargs)

    @classmethod
    def can_replace(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def _a_slot_shape(self) -> tuple[int, int]:
        return self.in_features, self.max_rank  # token-major: [vocab, R]

    def _rank_axes(self) -> dict[str, int]:
        return {"lora_a": 1, "lora_b": 0}

    def _pooled_rows(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """[N, R]: each token's A row (its id's column of its lane's rank rows), gathered from the pool."""
        lane_rows = self.context.rows.reshape(self.max_loras, self.max_rank)[slots.clamp(min=0).long()]  # [N, R]
        stride = self.pool_rows + pool.SPARE_ROWS
        flat = ids.reshape(-1, 1).long() * stride + lane_rows.long()
        s = self.lora_a_pool.reshape(-1)[flat]
        scale = getattr(self, "lora_a_scale", None)
        if scale is None:
            return s
        return (s.to(torch.float32) * scale[0][lane_rows.long()]).to(self.adapter_dtype)

    def _padded(self, weights: ModuleLoRA) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = super()._padded(weights)
        return a.T.contiguous(), b

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tensor_parallel is not None:  # on a mesh the lookups run per shard: see sharding.py
            return self.tensor_parallel.forward(self, ids)
        y = self.base_layer(ids)
        slots = self.context.token_slots(ids[..., None])
        if slots is None:
            return y
        base = y.reshape(-1, self.out_features).to(self.adapter_dtype)  # adapter dtype may differ
        # The base output is already scaled; the LoRA term is scaled as PEFT does.
        scale = embed_scale(self.base_layer)
        if self.pool_rows is None or self.trainable:  # (trainable adapters' rows are put in the lanes' layout)
            lora_a, lora_b = self.slot_factors()
            rows = slots.clamp(min=0) * self.in_features + ids.reshape(-1).to(slots.dtype)  # -1 slots add zero
            s = scaled(lora_a.reshape(-1, self.max_rank).index_select(0, rows), scale)  # [N, R]
            out = torch.ops.xla_lora.bgmv_expand(s, lora_b, base, slots, True, self.backend)
        else:  # the tokens' A rows straight from the pool: O(T * R), no lane layout of the vocabulary
            out = self._pooled_expand(scaled(self._pooled_rows(ids, slots), scale), base, slots)
        return out.reshape(y.shape).to(y.dtype)

    def _pooled_expand(self, s: torch.Tensor, base: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """base [N, out] + each token's ``s`` [N, R] times its lane's B read from the pool at its true rank
        (``pooled_expand``, whose backward gives an unfrozen embedding's output its gradient)."""
        scale = getattr(self, "lora_b_scale", None)
        rows = self.context.rows.reshape(self.max_loras, self.max_rank)
        b_scale = None if scale is None else scale[0]
        return torch.ops.xla_lora.pooled_expand(s, self.lora_b_pool[0], base, slots, rows, b_scale, self.backend)
