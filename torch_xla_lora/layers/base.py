"""The interface every LoRA layer implements, and the slot buffers they share.

A layer wraps its base module, keeps ``max_loras`` adapter slots in stacked
device buffers (A rank-padded to ``max_rank``, B stored rank-first), and adds
the LoRA product of each token's slot to the base output. Only the adapter
manager writes slots (:meth:`set_adapter`, :meth:`reset_adapter`); the
forward only reads them and the shared :class:`BatchContext`.

Slot writes are ``index_copy_`` with the slot as a device tensor: the same
fixed-shape graph for every slot and every adapter, so loading an adapter
after the first compiles nothing new.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_xla_lora.adapters import ModuleLoRA
from torch_xla_lora.context import BatchContext
from torch_xla_lora.errors import InvalidAdapterError, RankTooLargeError


class BaseLayerWithLoRA(nn.Module):
    """Base LoRA layer: ``y = base(x) + B[slot] A[slot] x`` per token (scaling folded into B).

    Subclasses define ``in_features``, ``out_features``, ``can_replace`` and
    ``forward``; the buffers are ``lora_a`` [L, R, in] and ``lora_b`` [L, R, out].
    """

    in_features: int
    out_features: int
    #: Placement on an SPMD mesh (a ``sharding.LayerSharding``, set by ``patch_model(mesh=...)``),
    #: whose ``forward(layer, x)`` runs the layer per shard; None on one device.
    tensor_parallel = None

    def __init__(
        self,
        base_layer: nn.Module,
        context: BatchContext,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.max_loras, self.max_rank = max_loras, max_rank
        self.backend = backend
        device = _device_of(base_layer)
        # Not persistent: adapters are not part of the model's state_dict.
        a_shape = (max_loras, *self._a_slot_shape())
        self.register_buffer("lora_a", torch.zeros(a_shape, dtype=dtype, device=device), False)
        b_shape = (max_loras, max_rank, self.out_features)
        self.register_buffer("lora_b", torch.zeros(b_shape, dtype=dtype, device=device), False)

    def _a_slot_shape(self) -> tuple[int, int]:
        """Shape of one slot of ``lora_a``: [R, in] (rank-major)."""
        return self.max_rank, self.in_features

    @classmethod
    def can_replace(cls, module: nn.Module) -> bool:
        """Whether this layer kind can wrap ``module``."""
        raise NotImplementedError

    def set_adapter(self, slot: int, weights: ModuleLoRA) -> None:
        """Write one adapter's factors (host tensors, scaling folded into B) into ``slot``."""
        a, b = self._padded(weights)
        self._write(slot, a, b)

    def reset_adapter(self, slot: int) -> None:
        """Zero ``slot``: tokens using it get exactly the base output from this layer."""
        a = torch.zeros(self.lora_a.shape[1:], dtype=self.lora_a.dtype)
        b = torch.zeros(self.lora_b.shape[1:], dtype=self.lora_b.dtype)
        self._write(slot, a, b)

    def _padded(self, weights: ModuleLoRA) -> tuple[torch.Tensor, torch.Tensor]:
        """A [R, in] and rank-first B [R, out], zero-padded to max_rank, in the buffers' dtype."""
        rank = weights.a.shape[0]
        if rank > self.max_rank:
            raise RankTooLargeError(f"rank {rank} exceeds max_rank {self.max_rank}")
        expected = ((rank, self.in_features), (self.out_features, rank))
        if (tuple(weights.a.shape), tuple(weights.b.shape)) != expected:
            raise InvalidAdapterError(
                f"factors of shapes {tuple(weights.a.shape)}, {tuple(weights.b.shape)}; expected {expected}"
            )
        a = torch.zeros(self.max_rank, self.in_features, dtype=self.lora_a.dtype)
        b = torch.zeros(self.max_rank, self.out_features, dtype=self.lora_b.dtype)
        a[:rank] = weights.a
        b[:rank] = weights.b.T
        return a, b

    def _write(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        device = self.lora_a.device
        index = torch.tensor([slot], dtype=torch.int64, device=device)
        with torch.no_grad():
            self.lora_a.index_copy_(0, index, a[None].to(device))
            self.lora_b.index_copy_(0, index, b[None].to(device))


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
