"""Trainable adapters: PEFT-layout parameters that the LoRA layers read in place of their slots.

A trainable adapter keeps, per targeted module, PEFT's own parameters: ``lora_A``
``[r, in]`` and ``lora_B`` ``[out, r]``, unscaled (``lora_embedding_A`` /
``lora_embedding_B`` for embeddings), keyed by exactly the keys
``peft.get_peft_model_state_dict`` gives. Any torch optimizer works on them.

The forward does not copy them into the device slots: each layer scatters its
trainable adapters' parameters (padded to ``max_rank``, scaling folded into B)
into its slot tensors *in the graph* (:meth:`BaseLayerWithLoRA.slot_factors`),
so the ops' autograd carries the gradients to the parameters. Every trainable
adapter takes part in every forward whether or not the batch uses it, so the
graph does not change with the adapter mix; an adapter with no rows in the
batch gets exact zeros from the ops, which a gradient hook turns into
``.grad = None`` (as its own separate training run would have it), keeping the
zeros alive aside so that the lazy graph's outputs stay the same.
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torch_xla_lora import adapters as adapters_io
from torch_xla_lora.adapters import LoRAAdapter, ModuleLoRA
from torch_xla_lora.errors import ArgumentTypeError, UnknownModuleError, UnsupportedAdapterError

__all__ = ["TrainableAdapter", "TrainableModule", "initial_state_dict", "peft_keys", "save_adapter"]

_PREFIX = "base_model.model."


def peft_keys(module: str, is_embedding: bool) -> tuple[str, str]:
    """The keys ``peft.get_peft_model_state_dict`` gives module ``module``'s A and B."""
    if is_embedding:
        return f"{_PREFIX}{module}.lora_embedding_A", f"{_PREFIX}{module}.lora_embedding_B"
    return f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"


@dataclass(eq=False)
class TrainableModule:
    """One module's trainable factors, as PEFT keeps them.

    ``a``: ``[r, in]`` (embeddings ``[r, num_embeddings]``); ``b``: ``[out, r]``
    (embeddings ``[embedding_dim, r]``); unscaled: the layer multiplies B by
    ``scaling`` in the forward, as PEFT multiplies B A x.
    """

    a: nn.Parameter
    b: nn.Parameter
    scaling: float
    dropout: float
    is_embedding: bool
    adapter: TrainableAdapter

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def slot_rows(self, max_rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This module's slot contents as the layers store them: A ``[R, in]`` (embeddings ``[vocab, R]``)
        and rank-first B ``[R, out]`` with the scaling folded in, zero-padded to ``max_rank``, in ``dtype``.

        Differentiable: gradients of the slots reach :attr:`a` and :attr:`b`.
        """
        pad = max_rank - self.rank
        a = nn.functional.pad(self.a, (0, 0, 0, pad))  # [R, in]
        b = nn.functional.pad((self.b * self.scaling).T, (0, 0, 0, pad))  # [R, out]
        if self.is_embedding:
            a = a.T  # token-major [vocab, R]
        return a.to(dtype), b.to(dtype)


@dataclass(eq=False)
class TrainableAdapter:
    """A trainable adapter: its PEFT config (as a dict) and its modules' parameters.

    ``in_batch`` says whether the current batch has rows on it (set by ``set_batch``);
    the gradient hooks read it.
    """

    name: str
    config: dict
    modules: dict[str, TrainableModule] = field(default_factory=dict)
    in_batch: bool = False
    #: Zero gradients of the last backward in which the adapter had no rows, kept alive (see the module doc).
    parked: dict[str, torch.Tensor] = field(default_factory=dict)

    def parameters(self) -> dict[str, nn.Parameter]:
        """PEFT key -> parameter, in module order (A then B)."""
        params = {}
        for module, factors in self.modules.items():
            key_a, key_b = peft_keys(module, factors.is_embedding)
            params[key_a], params[key_b] = factors.a, factors.b
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT key -> detached host copy, as ``get_peft_model_state_dict`` gives it."""
        return {key: p.detach().to("cpu").clone().contiguous() for key, p in self.parameters().items()}

    def snapshot(self, dtype: torch.dtype) -> LoRAAdapter:
        """The adapter's current weights as a frozen :class:`LoRAAdapter` (the slot write of serving)."""
        return adapters_io.load_adapter(self.name, state_dict=self.state_dict(), config=self.config, dtype=dtype)

    def install_hooks(self) -> None:
        """Gradient hooks: ``.grad`` stays None for a parameter whose adapter had no rows in the batch."""
        for key, param in self.parameters().items():
            had_grad = {}

            def before(grad: torch.Tensor, param: nn.Parameter = param, had_grad: dict = had_grad) -> torch.Tensor:
                had_grad["value"] = param.grad is not None
                return grad

            def after(param: nn.Parameter, key: str = key, had_grad: dict = had_grad) -> None:
                if not self.in_batch and not had_grad.get("value", False):
                    self.parked[key] = param.grad  # exact zeros; kept so the graph keeps its outputs
                    param.grad = None

            param.register_hook(before)
            param.register_post_accumulate_grad_hook(after)


def from_state_dict(
    name: str,
    state_dict: Mapping[str, torch.Tensor],
    config: dict,
    layers: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> TrainableAdapter:
    """A trainable adapter whose parameters (``dtype``, on ``device``) start from ``state_dict``.

    The state dict is validated as a loaded adapter is (call :func:`adapters.load_adapter` first).
    """
    adapter = TrainableAdapter(name=name, config=config_dict(config))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    validated = adapters_io.load_adapter(name, state_dict=state_dict, config=config, dtype=torch.float32)
    factors = adapters_io._group_factors(name, state_dict)  # module -> {"a"/"b": (key, tensor, is_embedding)}
    for module, lora in validated.modules.items():
        if not isinstance(lora, ModuleLoRA):
            raise UnsupportedAdapterError(
                f"adapter {name!r}: module {module!r}: training expert LoRA (target_parameters) is not supported"
            )
        if module not in layers:
            raise UnknownModuleError(f"adapter {name!r}: module {module!r} is not a LoRA layer of this model")
        a = factors[module]["a"][1].detach().to(device="cpu", dtype=dtype)
        b = factors[module]["b"][1].detach().to(device="cpu", dtype=dtype)
        adapter.modules[module] = TrainableModule(
            a=nn.Parameter(a.clone().to(device)),
            b=nn.Parameter(b.clone().to(device)),
            scaling=lora.scaling,
            dropout=dropout,
            is_embedding=lora.is_embedding,
            adapter=adapter,
        )
    adapter.install_hooks()
    return adapter


def config_dict(config: Any) -> dict:
    """A ``peft.LoraConfig`` (or a mapping) as a JSON-ready dict: sets as sorted lists, enums as values."""
    if isinstance(config, Mapping):
        raw = dict(config)
    elif hasattr(config, "to_dict"):
        raw = dict(config.to_dict())
    else:
        raise ArgumentTypeError(f"config must be a peft.LoraConfig or a mapping, got {type(config).__name__}")
    return {key: _jsonable(value) for key, value in raw.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def targeted_modules(config: dict, layers: Mapping[str, Any], head: str | None) -> list[str]:
    """The patched modules a LoRA config targets, by PEFT's rules (``target_modules`` as a regex, names or
    "all-linear"; ``exclude_modules``; ``layers_to_transform`` with ``layers_pattern``).

    Raises:
      UnsupportedAdapterError: the config targets parameters (``target_parameters``).
      UnknownModuleError: the config targets no patched module.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if config.get("target_parameters"):
        raise UnsupportedAdapterError("create_adapter: target_parameters (expert LoRA) cannot be trained yet")
    targets = config.get("target_modules")
    fields = {k: config[k] for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")}
    if targets == "all-linear":  # PEFT: every linear layer but the output head
        fields["target_modules"] = sorted(
            {name.rpartition(".")[2] for name, lay in layers.items() if name != head and not _is_embedding(lay)}
        )
    peft_config = LoraConfig(**{k: v for k, v in fields.items() if v is not None})
    modules = [name for name in layers if check_target_module_exists(peft_config, name)]
    if targets == "all-linear":
        modules = [name for name in modules if name != head and not _is_embedding(layers[name])]
    if not modules:
        raise UnknownModuleError(
            f"create_adapter: target_modules={targets!r} matches no LoRA layer of this model "
            f"(layers: {sorted(layers)[:3]}...)"
        )
    return modules


def _is_embedding(layer: Any) -> bool:
    from torch_xla_lora.layers import EmbeddingWithLoRA

    return isinstance(layer, EmbeddingWithLoRA)


def initial_state_dict(config: dict, layers: Mapping[str, Any], head: str | None) -> dict[str, torch.Tensor]:
    """PEFT's initial factors for ``config`` on the patched ``layers`` (host, float32), PEFT-keyed.

    ``init_lora_weights``: True, A as ``nn.Linear`` initialises its weight (Kaiming-uniform, a = sqrt 5) and
    B zeros (embeddings: A zeros, B standard normal); "gaussian", A normal with std 1/r, B zeros; False, both
    random (``nn.Linear``'s initialisation; embeddings standard normal), so the adapter is not a no-op.
    Draws from torch's global generator, in module order.
    """
    init = config.get("init_lora_weights", True)
    if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
        raise UnsupportedAdapterError(f"create_adapter: init_lora_weights={init!r}: expected True, False or 'gaussian'")
    state = {}
    for module in targeted_modules(config, layers, head):
        layer = layers[module]
        rank, _ = adapters_io._module_scaling("create_adapter", module, config)
        embedding = _is_embedding(layer)
        a = torch.empty(rank, layer.in_features)
        b = torch.empty(layer.out_features, rank)
        if embedding:
            if init is False:
                a.normal_(), b.normal_()
            else:
                a.zero_(), b.normal_()
        else:
            if isinstance(init, str):  # "gaussian"
                nn.init.normal_(a, std=1 / rank)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                b.zero_()
        key_a, key_b = peft_keys(module, embedding)
        state[key_a], state[key_b] = a, b
    return state


def save_adapter(adapter: TrainableAdapter, directory: str | os.PathLike) -> None:
    """Write ``adapter`` as ``PeftModel.save_pretrained`` does: ``adapter_config.json`` and
    ``adapter_model.safetensors`` in ``directory`` (created if missing)."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", **adapter.config}
    (path / adapters_io.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    save_file(adapter.state_dict(), str(path / adapters_io.SAFETENSORS_NAME), metadata={"format": "pt"})
