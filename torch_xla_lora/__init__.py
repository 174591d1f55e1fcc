"""torch_xla_lora: multi-LoRA serving for PyTorch/XLA.

Importing the package registers the ``torch.ops.xla_lora`` ops.
"""

from torch_xla_lora.compile import CompileCounter, assert_no_recompile, compile_count
from torch_xla_lora.config import LoRAConfig
from torch_xla_lora.errors import *  # noqa: F403
from torch_xla_lora.errors import __all__ as _errors_all
from torch_xla_lora.ops import (
    bgmv_expand,
    bgmv_expand_slice,
    bgmv_shrink,
    bgmv_shrink_expand,
    bgmv_weight_grad,
    linear_lora,
)
from torch_xla_lora.patching import LoRAModel, patch_model

__all__ = [
    *_errors_all,
    "LoRAConfig",
    "assert_no_recompile",
    "compile_count",
    "CompileCounter",
    "LoRAModel",
    "patch_model",
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "bgmv_shrink_expand",
    "bgmv_weight_grad",
    "linear_lora",
]
