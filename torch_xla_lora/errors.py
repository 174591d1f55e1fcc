"""The exceptions this library raises.

Every error derives from :class:`LoRAError`, so a server can catch one type.
Messages name the adapter, module or argument, the expected and the actual
value.  Subclasses that describe bad input also derive from ``ValueError``
(or ``KeyError``/``FileNotFoundError``) so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "LoRAError",
    "ArgumentError",
    "ArgumentTypeError",
    "ConfigError",
    "ConfigTypeError",
    "AlreadyPatchedError",
    "UnpatchedError",
    "ShapeError",
    "AdapterNotFoundError",
    "AdapterFileError",
    "InvalidAdapterError",
    "UnsupportedAdapterError",
    "RankTooLargeError",
    "UnknownModuleError",
    "NoFreeSlotError",
    "RecompilationError",
    "ShardingError",
]


class LoRAError(Exception):
    """Base class of every error raised by torch_xla_lora."""


class ArgumentError(LoRAError, ValueError):
    """A public call's argument has a value outside what it accepts (an empty adapter name, seq_len < 1)."""


class ArgumentTypeError(LoRAError, TypeError):
    """A public call's argument has the wrong type (or a wrong combination of arguments)."""


class ConfigError(LoRAError, ValueError):
    """A :class:`~torch_xla_lora.LoRAConfig` field is out of range, or target_modules matches nothing."""


class ConfigTypeError(ConfigError, ArgumentTypeError):
    """A :class:`~torch_xla_lora.LoRAConfig` field has the wrong type (a bool for an int, a str for a dtype)."""


class AlreadyPatchedError(LoRAError, ValueError):
    """``patch_model`` was given a model that is already patched."""


class UnpatchedError(LoRAError, RuntimeError):
    """The handle's model was unpatched; the handle cannot be used any more."""


class ShapeError(LoRAError, ValueError):
    """An op argument has the wrong rank, shape or dtype."""


class AdapterNotFoundError(LoRAError, KeyError):
    """An adapter name is not loaded (or not known to the manager)."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class AdapterFileError(LoRAError, FileNotFoundError):
    """Adapter files are missing, unreadable or corrupt."""


class InvalidAdapterError(LoRAError, ValueError):
    """Adapter weights are malformed: wrong shapes for this model, NaN/Inf values."""


class UnsupportedAdapterError(LoRAError, ValueError):
    """The adapter uses a PEFT feature this library does not implement."""


class RankTooLargeError(InvalidAdapterError):
    """An adapter module's rank exceeds ``LoRAConfig.max_rank``."""


class UnknownModuleError(InvalidAdapterError):
    """An adapter targets a module that the patched model does not have."""


class NoFreeSlotError(LoRAError, RuntimeError):
    """A batch needs more distinct adapters than there are free device slots."""


class RecompilationError(LoRAError, RuntimeError):
    """XLA compiled a new graph inside :func:`assert_no_recompile`."""


class ShardingError(LoRAError, ValueError):
    """A mesh, axis or sharding plan does not fit the model."""
