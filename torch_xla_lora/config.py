"""User configuration of a patched model."""

from __future__ import annotations

import dataclasses
import re

import torch

from torch_xla_lora.errors import ConfigError, ConfigTypeError

__all__ = ["LoRAConfig", "ConfigError", "ConfigTypeError"]  # ConfigError: also importable from here


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """How :func:`torch_xla_lora.patch_model` patches a model.

    Attributes:
      max_loras: device slots, i.e. the most distinct adapters one batch may use.
      max_rank: the largest adapter rank; smaller ranks are zero-padded to it.
      target_modules: PEFT's rule: a list of module-name suffixes, a regex that
        must match the whole module name, or "all-linear" (every linear layer
        but the output head). Name "lm_head" or the embedding in a list to
        patch those too.
      max_cpu_adapters: adapters cached on the host (LRU), resident ones included.
      dtype: dtype of the adapter buffers; None means the model's.
      backend: op backend on XLA devices: "auto", "pallas" or "xla".
      base_fusion: run each linear layer's base matmul and its LoRA as one op
        (``ops.linear_lora``: x read once, the output written once). "auto": off
        the TPU the separate path; on a TPU (with ``backend="auto"``) each layer
        and token count takes the cheapest of the fused op, the separate Pallas
        op and the XLA-native op by the TPU cost model, given the layer's place
        in the model (``torch_xla_lora.formulation``; printed by ``warmup``; see
        docs/performance.md). True or False force it. Layers whose base weight
        dtype differs from the adapters', and fully sharded column layers on a
        mesh, always use the separate path.
      memory_budget: device bytes for the adapters of every patched layer (an int, or a
        str such as "6GiB"): adapters are then stored at their own rank in a pool of rank
        rows bounded by this budget (``torch_xla_lora.pool``; evicted least recently
        used by bytes), and ``max_loras`` bounds only the distinct adapters of one batch.
        None (default): ``max_loras`` padded slots of ``max_rank`` rows each, the fastest
        layout while they fit (docs/layers.md, "Rank-true storage").
      weight_dtype: how the pool stores adapter rows: None (``dtype``) or "int8" (one
        float32 scale per rank row; needs ``memory_budget``).
    """

    max_loras: int = 4
    max_rank: int = 16
    target_modules: str | tuple[str, ...] | list[str] = "all-linear"
    max_cpu_adapters: int = 16
    dtype: torch.dtype | None = None
    backend: str = "auto"
    base_fusion: bool | str = "auto"
    memory_budget: int | str | None = None
    weight_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_rank", "max_cpu_adapters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigTypeError(f"LoRAConfig.{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ConfigError(f"LoRAConfig.{name} must be a positive int, got {value!r}")
        if self.max_cpu_adapters < self.max_loras:
            raise ConfigError(
                f"LoRAConfig.max_cpu_adapters ({self.max_cpu_adapters}) must be at least "
                f"max_loras ({self.max_loras}): resident adapters stay cached"
            )
        if not isinstance(self.backend, str):
            raise ConfigTypeError(f"LoRAConfig.backend must be a str, got {type(self.backend).__name__}")
        if self.backend not in ("auto", "pallas", "xla"):
            raise ConfigError(f"LoRAConfig.backend must be 'auto', 'pallas' or 'xla', got {self.backend!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise (ConfigError if isinstance(self.dtype, torch.dtype) else ConfigTypeError)(
                f"LoRAConfig.dtype must be None or a floating torch.dtype, got {self.dtype!r}"
            )
        if not (isinstance(self.base_fusion, bool) or self.base_fusion == "auto"):
            raise ConfigError(f"LoRAConfig.base_fusion must be 'auto', True or False, got {self.base_fusion!r}")
        self._check_target_modules()
        if self.memory_budget is not None:
            from torch_xla_lora.pool import parse_bytes

            parse_bytes(self.memory_budget)
        if self.weight_dtype not in (None, "int8"):
            raise (ConfigError if isinstance(self.weight_dtype, str) else ConfigTypeError)(
                f"LoRAConfig.weight_dtype must be None or 'int8', got {self.weight_dtype!r}"
            )
        if self.weight_dtype is not None and self.memory_budget is None:
            raise ConfigError("LoRAConfig.weight_dtype='int8' stores adapters in the pool: set memory_budget too")

    @property
    def budget_bytes(self) -> int | None:
        """``memory_budget`` in bytes, or None."""
        from torch_xla_lora.pool import parse_bytes

        return None if self.memory_budget is None else parse_bytes(self.memory_budget)

    def _check_target_modules(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ConfigError("LoRAConfig.target_modules must not be empty, got ''")
            if targets != "all-linear":
                try:
                    re.compile(targets)
                except re.error as exc:
                    raise ConfigError(f"LoRAConfig.target_modules: invalid regex {targets!r}: {exc}") from None
            return
        if not isinstance(targets, (list, tuple)):
            raise ConfigTypeError(
                f"LoRAConfig.target_modules must be a str, list or tuple of str, got {type(targets).__name__}"
            )
        bad = [key for key in targets if not isinstance(key, str)]
        if bad:
            raise ConfigTypeError(f"LoRAConfig.target_modules entries must be str, got {bad!r}")
        if not targets or "" in targets:
            raise ConfigError(f"LoRAConfig.target_modules must list non-empty module names, got {targets!r}")
        if isinstance(targets, list):
            object.__setattr__(self, "target_modules", tuple(targets))
