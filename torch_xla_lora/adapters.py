"""Read PEFT LoRA adapters into host tensors ready for device slots.

An adapter comes either from a directory written by PEFT's ``save_pretrained``
(``adapter_config.json`` plus ``adapter_model.safetensors``, or
``adapter_model.bin``) or from memory (a state dict plus a config).  The result
holds, per base-model module, ``a`` (PEFT's ``lora_A`` layout, ``[r, in]``) and
``b`` (``[out, r]``) with PEFT's scaling already folded into ``b``, so that
``b @ a`` is the weight delta in ``nn.Linear`` layout.  Host only: torch,
safetensors and json, no XLA.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _load_safetensors

from torch_xla_lora.errors import (
    AdapterFileError,
    ArgumentError,
    ArgumentTypeError,
    InvalidAdapterError,
    RankTooLargeError,
    UnknownModuleError,
    UnsupportedAdapterError,
)

__all__ = [
    "ExpertsLoRA",
    "LoRAAdapter",
    "ModuleLoRA",
    "check_adapter",
    "check_name",
    "load_adapter",
    "read_source",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# PeftModel wraps LoraModel wraps the base model, so every saved key carries this prefix.
_KEY_PREFIX = "base_model.model."
# Saved-key suffix -> (factor, is_embedding).  Embedding factors are bare Parameters, hence no ".weight".
_SUFFIXES = {
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
}
# Keys that carry no information for inference and are skipped:
# - "<embedding>.base_layer.weight": save_pretrained copies the frozen base embedding / lm_head weights whenever
#   an embedding layer is targeted; they equal the base model's (a resized vocab shows up as a shape mismatch
#   of the LoRA factors in check_adapter).
# - VeLoRA / MonteCLoRA state: both only alter training; their eval forward is plain LoRA.
_IGNORED_KEY = re.compile(r"\.base_layer\.(weight|bias)$|\.lora_velora_embed$|\.lora_monteclora_sampler\.")

# LoraConfig fields that change the forward (or need weights this module does not carry) when set to anything
# but the default.  Fields that only affect training (dropout, velora, monteclora, mica/eva/orthogonal init)
# or placement (layers_to_transform, megatron_config) are accepted.
_UNSUPPORTED_IF_SET = (
    "use_dora",  # adds a magnitude vector and renormalises W + dW
    "lora_bias",  # adds a bias to lora_B
    "modules_to_save",  # whole replacement modules
    "trainable_token_indices",  # per-token embedding deltas
    "alora_invocation_tokens",  # activated only after invocation tokens
    "use_qalora",  # pools the input before lora_A
    "use_bdlora",  # block-diagonal factors
    "arrow_config",  # routing between experts
    "kasa_config",  # extra singular-value diagonal between A and B
    "layer_replication",  # changes the base model's layer stack
)
# These initialisations rewrite the base weights; the adapter is only valid on that residual model (unless PEFT
# converted it on save, which resets init_lora_weights to True).
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields make generated __eq__ ambiguous
class ModuleLoRA:
    """LoRA factors of one module.

    ``a``: ``[r, in_features]`` (embeddings: ``[r, num_embeddings]``).
    ``b``: ``[out_features, r]`` (embeddings: ``[embedding_dim, r]``), already multiplied by ``scaling``.
    """

    a: torch.Tensor
    b: torch.Tensor
    rank: int
    scaling: float
    is_embedding: bool


@dataclass(frozen=True, eq=False)
class ExpertsLoRA:
    """LoRA factors of a mixture-of-experts module's fused expert weights (PEFT ``target_parameters``).

    ``params`` maps a parameter name of the experts module (``gate_up_proj``, ``down_proj``...) to a
    :class:`ModuleLoRA` whose factors carry a leading expert axis: ``a`` ``[E, r, in]`` and ``b``
    ``[E, out, r]`` (scaling folded in), so that expert ``e``'s delta is ``b[e] @ a[e]`` in ``nn.Linear``
    layout (``[out, in]``) whatever the parameter's storage layout.
    """

    params: dict[str, ModuleLoRA]

    @property
    def rank(self) -> int:
        """Largest rank over the parameters."""
        return max(p.rank for p in self.params.values())


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """A validated adapter: module name (as in ``base_model.named_modules()``) -> factors.

    An experts module targeted through ``target_parameters`` maps to one :class:`ExpertsLoRA`.
    """

    name: str
    modules: dict[str, ModuleLoRA | ExpertsLoRA]
    config: dict

    @property
    def max_rank(self) -> int:
        """Largest rank over all modules."""
        return max((m.rank for m in self.modules.values()), default=0)


def load_adapter(
    name: str,
    path: str | os.PathLike | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    config: Mapping | Any | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoRAAdapter:
    """Load and validate a PEFT LoRA adapter.

    Pass either ``path`` (a ``save_pretrained`` directory) or both ``state_dict`` (keys as produced by
    ``get_peft_model_state_dict``) and ``config`` (a dict or a ``peft.LoraConfig``).  ``a`` and ``b`` come back
    on CPU, contiguous, in ``dtype``; the scaling is folded into ``b`` in float32 before the cast.

    Raises:
        TypeError: neither or both sources given.
        AdapterFileError: missing directory/config/weights, or unparsable files.
        UnsupportedAdapterError: not plain LoRA (DoRA, bias, modules_to_save, ...).
        InvalidAdapterError: NaN/Inf, unpaired or non-2-D factors, ranks inconsistent with each other or the config.
    """
    config_dict, tensors = read_source(name, path, state_dict=state_dict, config=config)
    factors = _group_factors(name, tensors)
    if not factors:
        raise InvalidAdapterError(f"adapter {name!r}: no lora_A/lora_B weights found")
    modules: dict[str, ModuleLoRA | ExpertsLoRA] = {}
    for module, pairs in sorted(_param_targets(name, factors, config_dict).items()):
        modules[module] = _build_experts(name, module, pairs, config_dict, dtype)
    for module, pair in sorted(factors.items()):
        modules[module] = _build_module(name, module, pair, config_dict, dtype)
    return LoRAAdapter(name=name, modules=modules, config=config_dict)


def read_source(
    name: str,
    path: str | os.PathLike | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    config: Mapping | Any | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter's config (as a dict, checked to be plain LoRA) and its raw tensors, from a directory or
    from memory, as :func:`load_adapter` takes them (same errors)."""
    check_name(name)
    from_dir = path is not None and state_dict is None and config is None
    if not from_dir and (path is not None or state_dict is None or config is None):
        raise ArgumentTypeError(f"adapter {name!r}: pass either path, or both state_dict and config")
    if from_dir and not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"adapter {name!r}: path must be a str or os.PathLike, got {type(path).__name__}")
    if not from_dir and not isinstance(state_dict, Mapping):
        raise ArgumentTypeError(f"adapter {name!r}: state_dict must be a mapping, got {type(state_dict).__name__}")
    if from_dir:
        config_dict, tensors = _read_dir(name, Path(path))
    else:
        config_dict, tensors = _config_to_dict(config), dict(state_dict)
    _check_config(name, config_dict)
    return config_dict, tensors


def check_name(name: Any) -> None:
    """Adapter names are non-empty strings (``None`` and ints mean "base" and "slot" in a batch).

    Raises:
        ArgumentTypeError: ``name`` is not a str.
        ArgumentError: ``name`` is empty.
    """
    if not isinstance(name, str):
        raise ArgumentTypeError(f"adapter name must be a non-empty str, got {type(name).__name__} {name!r}")
    if not name:
        raise ArgumentError("adapter name must be a non-empty str, got ''")


def check_adapter(
    adapter: LoRAAdapter,
    module_shapes: Mapping[str, tuple[int, int] | Mapping[str, tuple[int, int, int]]],
    max_rank: int,
) -> None:
    """Check that ``adapter`` fits the patched model.

    ``module_shapes`` maps every LoRA-capable module name to ``(in_features, out_features)``
    (embeddings: ``(num_embeddings, embedding_dim)``), or, for an experts module, to
    ``{parameter name: (num_experts, in_features, out_features)}``.

    Raises:
        UnknownModuleError: the adapter targets a module not in ``module_shapes``.
        RankTooLargeError: a module's rank exceeds ``max_rank``.
        InvalidAdapterError: ``a``'s in-features or ``b``'s out-features differ (adapter for another model),
            or expert factors meet a plain module (or the reverse).
    """
    for module, lora in adapter.modules.items():
        if module not in module_shapes:
            raise UnknownModuleError(
                f"adapter {adapter.name!r}: module {module!r} is not a LoRA target of this model "
                f"(expected one of {len(module_shapes)} known modules, e.g. {sorted(module_shapes)[:3]})"
            )
        expected = module_shapes[module]
        is_experts = isinstance(expected, Mapping)
        if isinstance(lora, ExpertsLoRA) != is_experts:
            kinds = ("plain module", "experts module (target_parameters)")
            raise InvalidAdapterError(
                f"adapter {adapter.name!r}: module {module!r}: expected factors for a {kinds[is_experts]}, "
                f"got factors for a {kinds[not is_experts]}"
            )
        if not is_experts:
            _check_factors(adapter.name, module, lora, expected, max_rank)
            continue
        for param, factors in lora.params.items():
            if param not in expected:
                raise UnknownModuleError(
                    f"adapter {adapter.name!r}: parameter {param!r} of {module!r}: expected one of {sorted(expected)}"
                )
            num_experts, in_features, out_features = expected[param]
            if factors.a.shape[0] != num_experts:
                raise InvalidAdapterError(
                    f"adapter {adapter.name!r}: {module}.{param} experts: expected {num_experts}, "
                    f"got {factors.a.shape[0]} (adapter trained for a different base model?)"
                )
            _check_factors(adapter.name, f"{module}.{param}", factors, (in_features, out_features), max_rank)


def _check_factors(name: str, module: str, lora: ModuleLoRA, expected: tuple[int, int], max_rank: int) -> None:
    if lora.rank > max_rank:
        raise RankTooLargeError(
            f"adapter {name!r}: module {module!r} rank: expected <= {max_rank} (max_rank), got {lora.rank}"
        )
    in_features, out_features = expected
    for field, want, actual in (
        ("in_features (a.shape[-1])", in_features, lora.a.shape[-1]),
        ("out_features (b.shape[-2])", out_features, lora.b.shape[-2]),
    ):
        if want != actual:
            raise InvalidAdapterError(
                f"adapter {name!r}: module {module!r} {field}: expected {want}, got {actual} "
                "(adapter trained for a different base model?)"
            )


# --- reading ---------------------------------------------------------------------------------------------


def _read_dir(name: str, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_dir():
        raise AdapterFileError(f"adapter {name!r}: directory {str(path)!r} does not exist")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"adapter {name!r}: {CONFIG_NAME} missing in {str(path)!r}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"adapter {name!r}: cannot parse {str(config_path)!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFileError(
            f"adapter {name!r}: {str(config_path)!r}: expected a JSON object, got {type(config).__name__}"
        )
    return config, _read_weights(name, path)


def _read_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    # Same preference as PEFT: safetensors first, the pickle format only as fallback.
    st_path, bin_path = path / SAFETENSORS_NAME, path / BIN_NAME
    if st_path.is_file():
        try:
            return _load_safetensors(str(st_path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFileError(f"adapter {name!r}: cannot read {str(st_path)!r}: {exc}") from exc
    if not bin_path.is_file():
        raise AdapterFileError(
            f"adapter {name!r}: no weights file in {str(path)!r}: expected {SAFETENSORS_NAME} or {BIN_NAME}"
        )
    try:
        weights = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign pickles raise many unrelated exception types
        raise AdapterFileError(f"adapter {name!r}: cannot read {str(bin_path)!r}: {exc}") from exc
    if not isinstance(weights, Mapping):
        raise AdapterFileError(
            f"adapter {name!r}: {str(bin_path)!r}: expected a state dict, got {type(weights).__name__}"
        )
    return dict(weights)


def _config_to_dict(config: Mapping | Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # peft.LoraConfig
        return dict(config.to_dict())
    raise ArgumentTypeError(f"config must be a mapping or have .to_dict(), got {type(config).__name__}")


# --- validation ------------------------------------------------------------------------------------------


def _check_config(name: str, config: Mapping) -> None:
    # LoraConfig.to_dict() keeps the PeftType enum, the JSON file has its string value.
    raw_type = config.get("peft_type", "LORA")
    peft_type = getattr(raw_type, "value", raw_type)
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"adapter {name!r}: peft_type: expected 'LORA', got {peft_type!r}")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterError(f"adapter {name!r}: bias: expected 'none', got {config['bias']!r}")
    for field in _UNSUPPORTED_IF_SET:
        value = config.get(field)
        if value:  # every default is None/False/empty
            raise UnsupportedAdapterError(f"adapter {name!r}: {field}: expected unset (plain LoRA), got {value!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise UnsupportedAdapterError(
            f"adapter {name!r}: init_lora_weights: expected a mode that leaves the base weights intact, "
            f"got {init!r} (convert with save_pretrained(path_initial_model_for_weight_conversion=...))"
        )


def _group_factors(name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, tuple]]:
    """Map module name -> {"a"/"b": (saved key, tensor, is_embedding)}, rejecting unknown keys."""
    factors: dict[str, dict[str, tuple]] = {}
    for key, tensor in tensors.items():
        if _IGNORED_KEY.search(key):
            continue
        for suffix, (factor, is_embedding) in _SUFFIXES.items():
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix(_KEY_PREFIX)
                if factor in factors.setdefault(module, {}):
                    raise InvalidAdapterError(f"adapter {name!r}: module {module!r} has two lora_{factor.upper()}")
                factors[module][factor] = (key, tensor, is_embedding)
                break
        else:
            raise UnsupportedAdapterError(
                f"adapter {name!r}: tensor {key!r}: expected only lora_A/lora_B weights, got an extra tensor "
                "(DoRA magnitude, LoRA bias, trainable tokens or a saved module?)"
            )
    return factors


def _check_tensor(name: str, key: str, tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidAdapterError(f"adapter {name!r}: {key!r}: expected a tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.is_meta:
        what = "a meta tensor (no data)" if tensor.is_meta else f"a {tensor.layout} tensor"
        raise InvalidAdapterError(f"adapter {name!r}: tensor {key!r}: expected a dense tensor with data, got {what}")
    if not tensor.is_floating_point() or tensor.dim() != 2:
        got = f"{tensor.dtype} {tuple(tensor.shape)}"
        raise InvalidAdapterError(f"adapter {name!r}: tensor {key!r}: expected a 2-D float tensor, got {got}")
    if not torch.isfinite(tensor).all():
        raise InvalidAdapterError(f"adapter {name!r}: tensor {key!r}: expected finite values, got NaN or Inf")


def _pattern_value(name: str, field: str, patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # A key applies when, as a regex, it matches the module name or a dot-separated suffix of it: the rule of
    # peft.utils.other.get_pattern_key.  PEFT then takes the first applying key in dict order, but it writes
    # adapter_config.json with sort_keys=True, so that order is lost on save and PEFT's own reload disagrees with
    # training.  We therefore refuse keys that overlap with different values instead of guessing.
    hits = {}
    for pattern, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                hits[pattern] = value
        except re.error as exc:
            raise InvalidAdapterError(f"adapter {name!r}: {field} key {pattern!r} is not a regex: {exc}") from exc
    if len(set(hits.values())) > 1:
        raise InvalidAdapterError(
            f"adapter {name!r}: module {module!r} {field}: expected one value, got {hits} from overlapping keys "
            "(PEFT saves these keys sorted, so which one applied in training is unknown)"
        )
    return next(iter(hits.values()), default)


def _module_scaling(name: str, module: str, config: Mapping) -> tuple[int, float]:
    """(expected rank, scaling) for ``module`` exactly as PEFT's LoraModel._create_and_replace computes them."""
    r = _pattern_value(name, "rank_pattern", config.get("rank_pattern"), module, config.get("r", 8))
    alpha = _pattern_value(name, "alpha_pattern", config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InvalidAdapterError(f"adapter {name!r}: module {module!r} r: expected a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise InvalidAdapterError(f"adapter {name!r}: module {module!r} lora_alpha: expected a number, got {alpha!r}")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return r, float(scaling)


def _build_module(name: str, module: str, pair: Mapping[str, tuple], config: Mapping, dtype: torch.dtype) -> ModuleLoRA:
    if len(pair) != 2:
        (key, _, _), missing = next(iter(pair.values())), "B" if "a" in pair else "A"
        raise InvalidAdapterError(f"adapter {name!r}: tensor {key!r} has no matching lora_{missing}")
    (a_key, a, a_emb), (b_key, b, b_emb) = pair["a"], pair["b"]
    if a_emb != b_emb:
        raise InvalidAdapterError(f"adapter {name!r}: module {module!r} mixes embedding and linear LoRA factors")
    _check_tensor(name, a_key, a)
    _check_tensor(name, b_key, b)
    a, b = a.detach(), b.detach()
    if a.shape[0] != b.shape[1]:
        raise InvalidAdapterError(
            f"adapter {name!r}: module {module!r} rank: lora_A has {a.shape[0]} rows, lora_B has {b.shape[1]} "
            "columns; expected equal"
        )
    rank, scaling = _module_scaling(name, pattern_name(module, config), config)
    if a.shape[0] != rank:
        raise InvalidAdapterError(
            f"adapter {name!r}: module {module!r} rank: expected {rank} (config r/rank_pattern), "
            f"got {a.shape[0]} in the weights"
        )
    # Fold in float32 so that bf16/fp16 outputs see one rounding, as PEFT's get_delta_weight does on CPU.
    a_cast = a.to(device="cpu", dtype=dtype, copy=True)
    if not torch.isfinite(a_cast).all():
        raise InvalidAdapterError(
            f"adapter {name!r}: tensor {a_key!r}: expected finite values in {dtype}, got overflow"
        )
    b_scaled = (b.to(device="cpu", dtype=torch.float32) * scaling).to(dtype)
    if not torch.isfinite(b_scaled).all():
        raise InvalidAdapterError(
            f"adapter {name!r}: tensor {b_key!r}: expected finite values after scaling by {scaling} in {dtype}, "
            "got overflow"
        )
    return ModuleLoRA(
        # copy=True: an in-memory state dict may alias live PEFT parameters that keep training.
        a=a_cast.contiguous(),
        b=b_scaled.contiguous(),
        rank=rank,
        scaling=scaling,
        is_embedding=a_emb,
    )


# --- target_parameters (fused MoE expert weights) ----------------------------------------------------------

# PEFT wraps each targeted parameter of a module in its own ParamWrapper, nesting them in the order the module
# registers its parameters, so the saved keys say only how deep a wrapper sits ("experts.base_layer.lora_A" is
# the first parameter of two). transformers' experts modules register the up projection before the down one;
# this is that order. Other parameter names are refused rather than guessed.
_EXPERT_PARAM_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
_WRAPPER = ".base_layer"


def _targeted_params(module: str, targets: list[str]) -> list[str]:
    """Parameter names of ``module`` that ``target_parameters`` names, by PEFT's suffix rule."""
    params = []
    for target in targets:
        param = target.rpartition(".")[2]
        key = f"{module}.{param}"
        if (key == target or key.endswith("." + target)) and param not in params:
            params.append(param)
    return params


def pattern_name(module: str, config: Mapping) -> str:
    """The name PEFT matches ``rank_pattern``/``alpha_pattern`` keys against for ``module``: its ``weight``
    (``<module>.weight``) when that linear weight was targeted through ``target_parameters`` (a router's
    ``gate.weight``, wrapped by PEFT's ParamWrapper), else the module's own name."""
    targets = list(config.get("target_parameters") or [])
    if "weight" in _targeted_params(module, targets) and not _is_target_module(module, config.get("target_modules")):
        return f"{module}.weight"
    return module


def _is_target_module(module: str, target_modules: Any) -> bool:
    """PEFT's target_modules rule: a regex matching the whole name, or a name / dotted suffix in a list."""
    if not target_modules:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == key or module.endswith("." + key) for key in target_modules)


def _param_targets(
    name: str, factors: dict[str, dict[str, tuple]], config: Mapping
) -> dict[str, list[tuple[str, str, dict[str, tuple]]]]:
    """Take the expert-parameter factors out of ``factors``: experts module -> [(param, saved module, pair)].

    A targeted parameter named ``weight`` (a router's ``gate.weight``) is a 2-D linear weight: it stays in
    ``factors`` and loads like a linear module's LoRA, which is what PEFT computes for it.
    """
    targets = list(config.get("target_parameters") or [])
    if not targets:
        return {}
    by_module: dict[str, dict[int, str]] = {}
    for saved in factors:
        module, depth = saved, 0
        while module.endswith(_WRAPPER):
            module, depth = module[: -len(_WRAPPER)], depth + 1
        by_module.setdefault(module, {})[depth] = saved
    result = {}
    for module, depths in by_module.items():
        if list(depths) == [0] and _is_target_module(module, config.get("target_modules")):
            continue  # a target_modules module: plain LoRA
        params = _targeted_params(module, targets)
        if not params or ("weight" in params and list(depths) == [0]):
            continue  # a router's (or any linear's) 2-D weight: plain LoRA
        params = [p for p in params if p not in ("weight", "bias")]
        unknown = [p for p in params if p not in _EXPERT_PARAM_ORDER]
        if unknown:
            raise UnsupportedAdapterError(
                f"adapter {name!r}: target_parameters {unknown} of {module!r}: expected expert weights among "
                f"{list(_EXPERT_PARAM_ORDER)}"
            )
        params.sort(key=_EXPERT_PARAM_ORDER.index)
        if sorted(depths) != list(range(len(params))):
            raise InvalidAdapterError(
                f"adapter {name!r}: module {module!r}: expected {len(params)} nested parameter wrappers "
                f"for {params}, got factors at depths {sorted(depths)}"
            )
        # The outermost wrapper (depth 0) holds the last parameter.
        result[module] = [(params[-1 - d], depths[d], factors.pop(depths[d])) for d in range(len(params))]
    return result


def _build_experts(
    name: str, module: str, entries: list[tuple[str, str, dict[str, tuple]]], config: Mapping, dtype: torch.dtype
) -> ExpertsLoRA:
    """Per-expert factors from PEFT's ParamWrapper layout.

    PEFT keeps one ``lora_A`` ``[r * E, in]`` whose rows are expert-major (``(E, r)``) and one ``lora_B``
    ``[out, r * E]`` whose columns are rank-major (``(r, E)``); expert ``e``'s delta is
    ``scaling * B[:, :, e] @ A[e]``.
    """
    params = {}
    for param, saved, pair in entries:
        key = f"{module}.{param}"
        if len(pair) != 2:
            (tensor_key, _, _), missing = next(iter(pair.values())), "B" if "a" in pair else "A"
            raise InvalidAdapterError(f"adapter {name!r}: tensor {tensor_key!r} has no matching lora_{missing}")
        (a_key, a, a_emb), (b_key, b, _) = pair["a"], pair["b"]
        if a_emb:
            raise InvalidAdapterError(f"adapter {name!r}: {a_key!r}: expected lora_A.weight for an expert weight")
        _check_tensor(name, a_key, a)
        _check_tensor(name, b_key, b)
        a, b = a.detach(), b.detach()
        rank, scaling = _module_scaling(name, key, config)
        if a.shape[0] != b.shape[1] or a.shape[0] % rank:
            raise InvalidAdapterError(
                f"adapter {name!r}: {key!r} (saved as {saved!r}) rank x experts: expected lora_A rows == lora_B "
                f"columns == a multiple of r={rank}, got {a.shape[0]} and {b.shape[1]}"
            )
        experts = a.shape[0] // rank
        a3 = a.to(device="cpu", dtype=torch.float32).reshape(experts, rank, a.shape[1])
        b3 = b.to(device="cpu", dtype=torch.float32).reshape(b.shape[0], rank, experts).permute(2, 0, 1)
        b_scaled = (b3 * scaling).to(dtype)
        if not torch.isfinite(b_scaled).all():
            raise InvalidAdapterError(
                f"adapter {name!r}: tensor {b_key!r}: expected finite values after scaling by {scaling} in {dtype}"
            )
        params[param] = ModuleLoRA(
            a=a3.to(dtype).contiguous(), b=b_scaled.contiguous(), rank=rank, scaling=scaling, is_embedding=False
        )
    return ExpertsLoRA(params=params)
