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

Expert LoRA (PEFT ``target_parameters`` on a mixture-of-experts module's fused
expert weights) is kept as PEFT's nested ``ParamWrapper`` keeps it: per targeted
parameter one ``lora_A`` ``[r * E, in]`` (rows expert-major) and one ``lora_B``
``[out, r * E]`` (columns rank-major), keyed ``<module>.lora_A.weight`` for the
outermost wrapper and ``<module>.base_layer.lora_A.weight`` one level in
(:class:`TrainableExperts`); the experts layer scatters them into its
``slot * E + e`` entries in the graph (``ExpertsWithLoRA.slot_factors``). A
router's LoRA (``target_parameters=["gate.weight"]``) is a plain module's.
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
from torch_xla_lora.adapters import ExpertsLoRA, LoRAAdapter
from torch_xla_lora.errors import ArgumentTypeError, UnknownModuleError, UnsupportedAdapterError

__all__ = [
    "TrainableAdapter",
    "TrainableExperts",
    "TrainableModule",
    "initial_state_dict",
    "peft_keys",
    "save_adapter",
]

_PREFIX = "base_model.model."


def peft_keys(module: str, is_embedding: bool) -> tuple[str, str]:
    """The keys ``peft.get_peft_model_state_dict`` gives module ``module``'s A and B."""
    if is_embedding:
        return f"{_PREFIX}{module}.lora_embedding_A", f"{_PREFIX}{module}.lora_embedding_B"
    return f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"


def expert_keys(module: str, params: list[str]) -> dict[str, tuple[str, str]]:
    """The keys ``peft.get_peft_model_state_dict`` gives the A and B of each of ``params`` (expert weights of
    experts module ``module``): PEFT nests one ``ParamWrapper`` per parameter, the last parameter in
    registration order outermost, each level in adding ``.base_layer``."""
    ordered = sorted(params, key=adapters_io._EXPERT_PARAM_ORDER.index)
    keys = {}
    for depth, param in enumerate(reversed(ordered)):
        keys[param] = peft_keys(module + adapters_io._WRAPPER * depth, False)
    return keys


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

    def named_parameters(self, module: str) -> dict[str, nn.Parameter]:
        """PEFT key -> parameter (A then B) for this module named ``module``."""
        key_a, key_b = peft_keys(module, self.is_embedding)
        return {key_a: self.a, key_b: self.b}

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
class ExpertFactors:
    """One expert weight's factors, as PEFT's ``ParamWrapper`` keeps them: ``a`` ``[r * E, in]`` (rows
    expert-major: expert ``e``'s rows are ``e * r`` to ``e * r + r - 1``), ``b`` ``[out, r * E]`` (columns
    rank-major: expert ``e``'s are ``e``, ``e + E``, ...), unscaled; ``in``/``out`` in ``nn.Linear`` terms
    whatever the weight's storage layout."""

    a: nn.Parameter
    b: nn.Parameter
    scaling: float
    num_experts: int

    @property
    def rank(self) -> int:
        return self.a.shape[0] // self.num_experts

    def slot_rows(self, max_rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``[E, R, in]`` and rank-first B ``[E, R, out]`` with the scaling folded in, zero-padded to
        ``max_rank``, in ``dtype``: the experts layer's slot entries. Differentiable."""
        experts, rank, pad = self.num_experts, self.rank, max_rank - self.rank
        a = self.a.reshape(experts, rank, -1)  # [E, r, in]
        b = (self.b * self.scaling).reshape(-1, rank, experts).permute(2, 1, 0)  # [out, r, E] -> [E, r, out]
        a = nn.functional.pad(a, (0, 0, 0, pad))
        b = nn.functional.pad(b, (0, 0, 0, pad))
        return a.to(dtype), b.to(dtype)


@dataclass(eq=False)
class TrainableExperts:
    """An experts module's trainable expert LoRA (PEFT ``target_parameters``): one :class:`ExpertFactors`
    per targeted weight (``gate_up_proj``/``up_proj``, ``down_proj``), with the keys PEFT gives them."""

    params: dict[str, ExpertFactors]
    keys: dict[str, tuple[str, str]]
    adapter: TrainableAdapter
    #: PEFT refuses lora_dropout on parameter targets: never any here.
    dropout: float = 0.0
    is_embedding: bool = False

    @property
    def rank(self) -> int:
        return max(factors.rank for factors in self.params.values())

    def named_parameters(self, module: str) -> dict[str, nn.Parameter]:
        """PEFT key -> parameter, innermost wrapper first (A then B), as PEFT's state dict orders them."""
        out = {}
        for param in sorted(self.params, key=adapters_io._EXPERT_PARAM_ORDER.index):
            key_a, key_b = self.keys[param]
            out[key_a], out[key_b] = self.params[param].a, self.params[param].b
        return out

    def slot_rows(
        self, up_name: str, shapes: Mapping[str, tuple[int, int]], max_rank: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries of the experts layer's four slot buffers for this adapter's slot: A and rank-first B
        of the up projection (``up_name``), then of ``down_proj``, each ``[E, R, in or out]``; zeros for a
        weight the adapter does not target. ``shapes``: weight -> (in, out). Differentiable."""
        rows = []
        for param in (up_name, "down_proj"):
            factors = self.params.get(param)
            if factors is not None:
                rows.extend(factors.slot_rows(max_rank, dtype))
                continue
            experts = next(iter(self.params.values())).num_experts
            device = next(iter(self.params.values())).a.device
            rows.extend(torch.zeros(experts, max_rank, d, dtype=dtype, device=device) for d in shapes[param])
        return tuple(rows)


@dataclass(eq=False)
class TrainableAdapter:
    """A trainable adapter: its PEFT config (as a dict) and its modules' parameters.

    ``in_batch`` says whether the current batch has rows on it (set by ``set_batch``);
    the gradient hooks read it.
    """

    name: str
    config: dict
    modules: dict[str, TrainableModule | TrainableExperts] = field(default_factory=dict)
    in_batch: bool = False
    #: Zero gradients of the last backward in which the adapter had no rows, kept alive (see the module doc).
    parked: dict[str, torch.Tensor] = field(default_factory=dict)

    def parameters(self) -> dict[str, nn.Parameter]:
        """PEFT key -> parameter, in module order (A then B)."""
        params = {}
        for module, factors in self.modules.items():
            params.update(factors.named_parameters(module))
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
    if dropout and config.get("target_parameters"):
        raise UnsupportedAdapterError(
            f"adapter {name!r}: lora_dropout={dropout} with target_parameters: PEFT refuses dropout on parameter "
            "targets (it cannot be factored out of the weight delta); use lora_dropout=0"
        )
    validated = adapters_io.load_adapter(name, state_dict=state_dict, config=config, dtype=torch.float32)
    factors = adapters_io._group_factors(name, state_dict)  # module -> {"a"/"b": (key, tensor, is_embedding)}
    # experts module -> [(weight, saved module, {"a"/"b": (key, tensor, is_embedding)})], taken from a copy.
    expert_entries = adapters_io._param_targets(name, dict(factors), config)
    for module, lora in validated.modules.items():
        if module not in layers:
            raise UnknownModuleError(f"adapter {name!r}: module {module!r} is not a LoRA layer of this model")
        if isinstance(lora, ExpertsLoRA):
            params = {}
            for param, _, pair in expert_entries[module]:
                params[param] = ExpertFactors(
                    a=nn.Parameter(pair["a"][1].detach().to(device="cpu", dtype=dtype).clone().to(device)),
                    b=nn.Parameter(pair["b"][1].detach().to(device="cpu", dtype=dtype).clone().to(device)),
                    scaling=lora.params[param].scaling,
                    num_experts=lora.params[param].a.shape[0],
                )
            adapter.modules[module] = TrainableExperts(
                params=params, keys=expert_keys(module, list(params)), adapter=adapter
            )
            continue
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
    # The model's module order, as PEFT's state dict has it.
    adapter.modules = {module: adapter.modules[module] for module in layers if module in adapter.modules}
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
    """The patched plain modules a LoRA config targets, by PEFT's rules (``target_modules`` as a regex, names or
    "all-linear"; ``exclude_modules``; ``layers_to_transform`` with ``layers_pattern``; and a module whose
    ``weight`` ``target_parameters`` names, such as a MoE router's ``gate.weight``).

    Raises:
      UnsupportedAdapterError: "all-linear" on a model with expert or router layers (PEFT rewrites it per
        architecture into ``target_parameters``: name the targets).
      UnknownModuleError: the config targets no patched module.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config.get("target_modules")
    modules = []
    if targets:
        fields = {k: config[k] for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")}
        if targets == "all-linear":  # PEFT: every linear layer but the output head
            moe = sorted(name for name, lay in layers.items() if _is_moe(lay))
            if moe:
                raise UnsupportedAdapterError(
                    f"create_adapter: target_modules='all-linear' on a mixture-of-experts model ({moe[0]}, ...): "
                    "PEFT rewrites it per architecture; name target_modules and target_parameters explicitly"
                )
            fields["target_modules"] = sorted(
                {name.rpartition(".")[2] for name, lay in layers.items() if name != head and not _is_embedding(lay)}
            )
        peft_config = LoraConfig(**{k: v for k, v in fields.items() if v is not None})
        modules = [name for name in layers if check_target_module_exists(peft_config, name)]
        if targets == "all-linear":
            modules = [name for name in modules if name != head and not _is_embedding(layers[name])]
    parameters = list(config.get("target_parameters") or [])
    for name, layer in layers.items():  # a targeted 2-D weight (a router's): PEFT's LoRA of a linear layer
        targeted = adapters_io._targeted_params(name, parameters)
        if name not in modules and not _is_experts(layer) and "weight" in targeted:
            modules.append(name)
    if not modules and not targeted_experts(config, layers):
        raise UnknownModuleError(
            f"create_adapter: target_modules={targets!r}, target_parameters={parameters!r} match no LoRA layer "
            f"of this model (layers: {sorted(layers)[:3]}...)"
        )
    return modules


def targeted_experts(config: dict, layers: Mapping[str, Any]) -> dict[str, list[str]]:
    """Experts module -> the expert weights of it that ``target_parameters`` names (PEFT's suffix rule on
    ``<module>.<weight>``), in PEFT's nesting order (innermost first)."""
    parameters = list(config.get("target_parameters") or [])
    result = {}
    for name, layer in layers.items():
        if _is_experts(layer):
            params = [p for p in adapters_io._targeted_params(name, parameters) if p in layer.factor_shapes]
            if params:
                result[name] = sorted(params, key=adapters_io._EXPERT_PARAM_ORDER.index)
    return result


def _is_embedding(layer: Any) -> bool:
    from torch_xla_lora.layers import EmbeddingWithLoRA

    return isinstance(layer, EmbeddingWithLoRA)


def _is_experts(layer: Any) -> bool:
    from torch_xla_lora.layers import ExpertsWithLoRA

    return isinstance(layer, ExpertsWithLoRA)


def _is_moe(layer: Any) -> bool:
    from torch_xla_lora.layers import ExpertsWithLoRA, RouterWithLoRA

    return isinstance(layer, (ExpertsWithLoRA, RouterWithLoRA))


def _init_factors(a: torch.Tensor, b: torch.Tensor, rank: int, init: bool | str, embedding: bool) -> None:
    """Fill A and B in place as PEFT initialises them (see :func:`initial_state_dict`)."""
    if embedding:
        if init is False:
            a.normal_(), b.normal_()
        else:
            a.zero_(), b.normal_()
        return
    if isinstance(init, str):  # "gaussian"
        nn.init.normal_(a, std=1 / rank)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        b.zero_()


def initial_state_dict(config: dict, layers: Mapping[str, Any], head: str | None) -> dict[str, torch.Tensor]:
    """PEFT's initial factors for ``config`` on the patched ``layers`` (host, float32), PEFT-keyed.

    ``init_lora_weights``: True, A as ``nn.Linear`` initialises its weight (Kaiming-uniform, a = sqrt 5) and
    B zeros (embeddings: A zeros, B standard normal); "gaussian", A normal with std 1/r, B zeros; False, both
    random (``nn.Linear``'s initialisation; embeddings standard normal), so the adapter is not a no-op.
    Expert weights (``target_parameters``) get the same rules on PEFT's ``[r * E, in]`` A and ``[out, r * E]``
    B. Draws from torch's global generator, in module order.
    """
    init = config.get("init_lora_weights", True)
    if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
        raise UnsupportedAdapterError(f"create_adapter: init_lora_weights={init!r}: expected True, False or 'gaussian'")
    state = {}
    for module in targeted_modules(config, layers, head):
        layer = layers[module]
        rank, _ = adapters_io._module_scaling("create_adapter", adapters_io.pattern_name(module, config), config)
        embedding = _is_embedding(layer)
        a = torch.empty(rank, layer.in_features)
        b = torch.empty(layer.out_features, rank)
        _init_factors(a, b, rank, init, embedding)
        key_a, key_b = peft_keys(module, embedding)
        state[key_a], state[key_b] = a, b
    for module, params in targeted_experts(config, layers).items():
        keys = expert_keys(module, params)
        for param in params:
            experts, d_in, d_out = layers[module].factor_shapes[param]
            rank, _ = adapters_io._module_scaling("create_adapter", f"{module}.{param}", config)
            a, b = torch.empty(rank * experts, d_in), torch.empty(d_out, rank * experts)
            _init_factors(a, b, rank, init, False)
            state[keys[param][0]], state[keys[param][1]] = a, b
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
