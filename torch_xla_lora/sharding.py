"""Tensor parallelism for patched models on a torch_xla SPMD mesh.

:func:`torch_xla_lora.patch_model` with ``mesh=`` shards every base weight
by a *plan* (module name -> "column" | "row" | "vocab" | "replicated") and
every LoRA layer consistently with its base weight:

=================  ==========================  ============================  ==================
kind               base weight                 lora_a                        lora_b [L, R, out]
=================  ==========================  ============================  ==================
column, vocab      output features             replicated (rank if fully)    output features
(linear)
row                input features              input features                replicated
vocab (embedding)  vocabulary rows             vocabulary (token-major)      replicated
replicated         replicated                  replicated                    replicated
=================  ==========================  ============================  ==================

The LoRA ops run *per shard*, between ``enable_manual_sharding`` and
``disable_manual_sharding``: on TPU a Pallas kernel is a Mosaic custom call
that the SPMD partitioner cannot split, so it must see local shapes only.
CPU runs the same structure, so the tests cover it.

Row-parallel layers (and vocab-parallel embeddings) compute the base matmul
(lookup) on the local slice themselves, add the LoRA partial product to it,
and leave the manual region as partial results stacked on the model axis,
whose sum is the layer's single all-reduce: LoRA adds no collective.
Column-parallel layers add none either (the base output is already sharded
like B). ``fully_sharded`` also shards column layers' A along the rank and
pays one all-gather of the [T, R] intermediate per layer.

Inference only: the manual regions are not differentiable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch_xla.distributed.spmd as xs
from torch import nn

from torch_xla_lora.errors import ShardingError
from torch_xla_lora.layers import BaseLayerWithLoRA, EmbeddingWithLoRA
from torch_xla_lora.layers.linear import linear_features

# One source of truth for transformers' projection names: the patcher's.
from torch_xla_lora.layers.names import COLUMN_NAMES, MERGED_NAMES, QKV_NAMES, ROW_NAMES

if TYPE_CHECKING:
    from torch_xla.distributed.spmd import Mesh

__all__ = [
    "KINDS",
    "ShardingError",
    "ShardingPlan",
    "LayerSharding",
    "ModelSharding",
    "default_plan",
    "plan_model",
    "replicated",
]

KINDS = ("column", "row", "vocab", "replicated")

Spec = tuple[str | None, ...]
ShardingPlan = Mapping[str, str] | Callable[[str, nn.Module], str | None]


# -- plans ---------------------------------------------------------------------------------------


def default_plan(model: nn.Module) -> dict[str, str]:
    """Module name -> kind for Llama, Qwen2, Mistral and similar transformers models.

    q, k, v, gate, up (and fused qkv / gate_up) are column-parallel, o and down
    row-parallel, the output head and the input embeddings vocab-parallel;
    everything else (norms, position embeddings) stays replicated.
    """
    head = _call_or_none(model, "get_output_embeddings")
    embed = _call_or_none(model, "get_input_embeddings")
    plan = {}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if module is head or (module is embed and isinstance(module, nn.Embedding)):
            plan[name] = "vocab"
        elif linear_features(module) is None:
            continue
        elif short in COLUMN_NAMES | QKV_NAMES | MERGED_NAMES:
            plan[name] = "column"
        elif short in ROW_NAMES:
            plan[name] = "row"
    return plan


def _call_or_none(model: nn.Module, method: str) -> nn.Module | None:
    get = getattr(model, method, None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:  # transformers' base class for models without one
        return None


def _resolve(model: nn.Module, plan: ShardingPlan | None) -> dict[str, str]:
    """Kind of every shardable module (linear, Conv1D, embedding) that the plan names."""
    if plan is None:
        return default_plan(model)
    shardable = {
        name: module
        for name, module in model.named_modules()
        if linear_features(module) is not None or isinstance(module, nn.Embedding)
    }
    if callable(plan):
        kinds = {name: plan(name, module) for name, module in shardable.items()}
        return {name: kind for name, kind in kinds.items() if kind is not None}
    kinds, used = {}, set()
    for name in shardable:
        # The longest key that names the module (whole name or a dotted suffix) wins.
        keys = [key for key in plan if name == key or name.endswith("." + key)]
        if keys:
            key = max(keys, key=len)
            kinds[name], used = plan[key], used | {key}
    unused = sorted(set(plan) - used)
    if unused:
        raise ShardingError(
            f"sharding_plan keys {unused} match no linear or embedding module of {type(model).__name__}"
        )
    return kinds


# -- one layer -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerSharding:
    """How one module is placed on the mesh, and (for LoRA layers) how it runs per shard.

    Attributes:
      mesh: the SPMD mesh.
      axis: mesh axis of tensor parallelism.
      kind: "column", "row", "vocab" or "replicated".
      data_axis: mesh axis the tokens are split on (data parallelism), or None.
      fully_sharded: also shard column layers' A along the rank.
    """

    mesh: Mesh
    axis: str
    kind: str
    data_axis: str | None = None
    fully_sharded: bool = False

    @property
    def shards(self) -> int:
        return int(self.mesh.shape()[self.axis])

    @property
    def _out_axis(self) -> str | None:
        return self.axis if self.kind in ("column", "vocab") else None

    def base_specs(self, module: nn.Module) -> dict[str, Spec]:
        """Partition spec of the base module's ``weight`` and ``bias``, like Megatron's layers."""
        axis = self.axis
        if isinstance(module, nn.Embedding):
            return {"weight": (axis if self.kind == "vocab" else None, None)}
        transposed = not isinstance(module, nn.Linear)  # Conv1D stores [in, out]
        if self.kind in ("column", "vocab"):
            out_dim, in_dim, bias = axis, None, axis
        elif self.kind == "row":
            out_dim, in_dim, bias = None, axis, None  # the bias is added once, after the reduction
        else:
            out_dim, in_dim, bias = None, None, None
        weight = (in_dim, out_dim) if transposed else (out_dim, in_dim)
        return {"weight": weight, "bias": (bias,)}

    def lora_specs(self, layer: BaseLayerWithLoRA) -> dict[str, Spec]:
        """Partition spec of ``lora_a`` and ``lora_b``, consistent with the base weight."""
        axis = self.axis
        if isinstance(layer, EmbeddingWithLoRA):  # lora_a is token-major [L, vocab, R]
            return {"lora_a": (None, axis if self.kind == "vocab" else None, None), "lora_b": (None, None, None)}
        if self.kind == "row":
            return {"lora_a": (None, None, axis), "lora_b": (None, None, None)}
        rank = axis if self.fully_sharded and self._out_axis else None
        return {"lora_a": (None, rank, None), "lora_b": (None, None, self._out_axis)}

    def check(self, name: str, module: nn.Module, layer: BaseLayerWithLoRA | None) -> None:
        """Raise :class:`ShardingError` if ``module`` cannot be sharded as ``kind``.

        LoRA layers run on local shapes, so their sharded dimensions must divide evenly.
        """
        if self.kind not in KINDS:
            raise ShardingError(f"module {name!r}: sharding kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(module, nn.Embedding):
            if self.kind not in ("vocab", "replicated"):
                raise ShardingError(f"embedding {name!r} can be 'vocab' or 'replicated', got {self.kind!r}")
            if layer is not None and module.max_norm is not None:
                raise ShardingError(f"embedding {name!r}: max_norm is not supported on a mesh")
        if layer is None:
            return  # the partitioner handles any base shape
        sizes = {"column": layer.out_features, "vocab": layer.out_features, "row": layer.in_features}
        if isinstance(layer, EmbeddingWithLoRA):
            sizes["vocab"] = layer.in_features
        if self.kind in sizes and sizes[self.kind] % self.shards:
            raise ShardingError(
                f"module {name!r}: {self.kind}-parallel dimension {sizes[self.kind]} does not divide "
                f"into {self.shards} shards of mesh axis {self.axis!r}"
            )
        if self.lora_specs(layer)["lora_a"][1] is not None and layer.max_rank % self.shards:
            raise ShardingError(
                f"module {name!r}: fully_sharded splits the rank, but max_rank {layer.max_rank} does not "
                f"divide into {self.shards} shards of mesh axis {self.axis!r}"
            )

    def apply(self, module: nn.Module, layer: BaseLayerWithLoRA | None) -> None:
        """Mark the base weights (and the LoRA buffers, which then run per shard) on the mesh."""
        for tensor_name, spec in self.base_specs(module).items():
            tensor = getattr(module, tensor_name, None)
            if tensor is not None:
                xs.mark_sharding(tensor, self.mesh, spec)
        if layer is not None:
            for tensor_name, spec in self.lora_specs(layer).items():
                xs.mark_sharding(getattr(layer, tensor_name), self.mesh, spec)
            layer.tensor_parallel = self

    # -- forward, per shard ----------------------------------------------------------------------

    def forward(self, layer: BaseLayerWithLoRA, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward on the mesh (same result as on one device)."""
        if isinstance(layer, EmbeddingWithLoRA):
            return self._embedding_forward(layer, x)
        if self.kind == "row":
            return self._row_forward(layer, x)
        return self._output_sharded_forward(layer, x)

    def _enter(self, tensor: torch.Tensor, spec: Spec) -> torch.Tensor:
        """The local shard of ``tensor`` split by ``spec``; ops on it are not partitioned."""
        return xs.enable_manual_sharding(tensor, spec, mesh=self.mesh).global_tensor

    def _leave(self, tensor: torch.Tensor, spec: Spec, shape: tuple[int, ...]) -> torch.Tensor:
        """The global tensor of ``shape`` whose shards (split by ``spec``) are ``tensor``."""
        return xs.disable_manual_sharding(tensor, spec, tuple(shape), mesh=self.mesh).global_tensor

    def _token_axis(self, num_tokens: int) -> str | None:
        if self.data_axis is not None and num_tokens % self.mesh.shape()[self.data_axis]:
            raise ShardingError(
                f"{num_tokens} tokens do not split evenly over data axis {self.data_axis!r} "
                f"of size {self.mesh.shape()[self.data_axis]}"
            )
        return self.data_axis

    def _output_sharded_forward(self, layer: BaseLayerWithLoRA, x: torch.Tensor) -> torch.Tensor:
        """Column, vocab (lm_head) and replicated linear layers.

        The base output is already split like B's columns, so the shrink runs
        on replicated x and A, and the expand on each shard's own columns. A
        fused layer's slices share A, and its B columns follow the base
        weight's, so one expand over the local columns covers every slice part.
        """
        y = layer.base_layer(x)
        slots = layer.context.token_slots(x)
        if slots is None:
            return y
        # [N, in], [N, out], in the adapter's dtype (LoRAConfig.dtype may differ from the model's)
        x2 = x.reshape(-1, layer.in_features).to(layer.lora_a.dtype)
        y2 = y.reshape(-1, layer.out_features).to(layer.lora_b.dtype)
        tokens, out_axis = self._token_axis(x2.shape[0]), self._out_axis
        specs = self.lora_specs(layer)
        idx = self._enter(slots, (tokens,))
        s = torch.ops.xla_lora.bgmv_shrink(
            self._enter(x2, (tokens, None)), self._enter(layer.lora_a, specs["lora_a"]), idx, 1.0, layer.backend
        )  # [N_local, R_local]
        rank_axis = specs["lora_a"][1]
        if rank_axis is not None:
            # Each shard holds R / n ranks; the expand needs all R: gather the small [N, R] intermediate.
            s = self._enter(self._leave(s, (tokens, rank_axis), (x2.shape[0], layer.max_rank)), (tokens, None))
        out = torch.ops.xla_lora.bgmv_expand(
            s, self._enter(layer.lora_b, specs["lora_b"]), self._enter(y2, (tokens, out_axis)), idx, True, layer.backend
        )
        return self._leave(out, (tokens, out_axis), y2.shape).reshape(y.shape).to(y.dtype)

    def _row_forward(self, layer: BaseLayerWithLoRA, x: torch.Tensor) -> torch.Tensor:
        """Row-parallel linear: base and LoRA partial products share the layer's one reduction.

        Left to the partitioner, the base matmul would be reduced on its own
        and the LoRA shrink's [N, R] partial sum would need a second
        all-reduce, so the base matmul runs here on the local input slice.
        """
        slots = layer.context.token_slots(x)
        if slots is None:
            return layer.base_layer(x)
        base = layer.base_layer
        x2 = x.reshape(-1, layer.in_features)  # [N, in]
        tokens = self._token_axis(x2.shape[0])
        specs = self.base_specs(base)
        x_local, idx = self._enter(x2, (tokens, self.axis)), self._enter(slots, (tokens,))
        weight = self._enter(base.weight, specs["weight"])
        partial = x_local @ weight.T if isinstance(base, nn.Linear) else x_local @ weight  # [N_local, out]
        lora = self.lora_specs(layer)
        a, b = self._enter(layer.lora_a, lora["lora_a"]), self._enter(layer.lora_b, lora["lora_b"])
        s = torch.ops.xla_lora.bgmv_shrink(x_local.to(a.dtype), a, idx, 1.0, layer.backend)
        # expand is linear in s: the sum over shards of these partials is the full output.
        lora_partial = torch.ops.xla_lora.bgmv_expand(s, b, partial.to(b.dtype), idx, True, layer.backend)
        # Reduced in the model's dtype, as the base layer alone would be.
        y = self._reduce(lora_partial.to(partial.dtype), tokens, x2.shape[0])
        if base.bias is not None:
            y = y + base.bias
        return y.reshape(*x.shape[:-1], layer.out_features)

    def _reduce(self, partial: torch.Tensor, tokens: str | None, num_tokens: int) -> torch.Tensor:
        """Sum of every shard's ``partial`` [N_local, D]: partials stacked on the model axis, then summed.

        The partitioner lowers the sum over the sharded stack axis to one all-reduce.
        """
        stacked = self._leave(partial[None], (self.axis, tokens, None), (self.shards, num_tokens, partial.shape[1]))
        return stacked.sum(0)

    def _embedding_forward(self, layer: EmbeddingWithLoRA, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel (or replicated) embedding: masked local lookups, one reduction.

        Each shard looks up the ids in its vocabulary range, base row and A row
        alike, and zeroes the others; summing the shards' partial outputs (base
        plus LoRA expand) is then the layer's one all-reduce, as for a row layer.
        """
        slots = layer.context.token_slots(ids[..., None])
        if slots is None:
            return layer.base_layer(ids)
        flat = ids.reshape(-1)
        tokens = self._token_axis(flat.shape[0])
        vocab_axis = self.axis if self.kind == "vocab" else None
        shards = self.shards if vocab_axis else 1
        vocab = layer.in_features // shards  # rows per shard
        lora = self.lora_specs(layer)
        idx = self._enter(slots, (tokens,))
        weight = self._enter(layer.base_layer.weight, self.base_specs(layer.base_layer)["weight"])
        lora_a = self._enter(layer.lora_a, lora["lora_a"])  # [L, vocab_local, R]
        # This shard's first vocabulary row: the shard's element of an iota split over the axis.
        shard = self._enter(torch.arange(shards, dtype=torch.int32, device=ids.device), (vocab_axis,))
        local = self._enter(flat, (tokens,)).to(torch.int32) - shard * vocab  # [N_local]
        inside = ((local >= 0) & (local < vocab))[:, None]
        local = local.clamp(0, vocab - 1)
        base = torch.where(inside, weight.index_select(0, local), 0)  # [N_local, D]
        rows = idx.clamp(min=0) * vocab + local  # -1 slots add zero in expand
        s = torch.where(inside, lora_a.reshape(-1, layer.max_rank).index_select(0, rows), 0)  # [N_local, R]
        lora_b = self._enter(layer.lora_b, lora["lora_b"])
        partial = torch.ops.xla_lora.bgmv_expand(s, lora_b, base.to(lora_b.dtype), idx, True, layer.backend)
        partial = partial.to(base.dtype)  # reduced in the model's dtype, as the base lookup alone would be
        if vocab_axis is None:
            y = self._leave(partial, (tokens, None), (flat.shape[0], layer.out_features))
        else:
            y = self._reduce(partial, tokens, flat.shape[0])
        return y.reshape(*ids.shape, layer.out_features)


def replicated(tensor: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """``tensor`` replicated on every device of ``mesh``: do this to what you fetch to the host.

    torch_xla 2.9 compiles a new gather graph on every host fetch of a sharded
    tensor (never cached); a replicated one is read from one device. Reduce
    first (e.g. the next token ids, not the logits) to keep the gather small.
    """
    return xs.mark_sharding(tensor, mesh, (None,) * tensor.dim()).global_tensor


# -- the whole model -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSharding:
    """A checked plan for one model: module name -> (module, its placement). Apply once."""

    placements: dict[str, tuple[nn.Module, LayerSharding]]

    @property
    def kinds(self) -> dict[str, str]:
        return {name: placement.kind for name, (_, placement) in self.placements.items()}

    def apply(self, layers: Mapping[str, BaseLayerWithLoRA]) -> None:
        for name, (module, placement) in self.placements.items():
            placement.apply(module, layers.get(name))


def plan_model(
    model: nn.Module,
    layers: Mapping[str, BaseLayerWithLoRA],
    mesh: Mesh,
    tp_axis: str,
    *,
    plan: ShardingPlan | None = None,
    dp_axis: str | None = None,
    fully_sharded: bool = False,
) -> ModelSharding:
    """Resolve and check the sharding of ``model`` (not yet patched) and its future LoRA ``layers``.

    Nothing is changed; :meth:`ModelSharding.apply` marks the tensors.

    Raises:
      ShardingError: an axis is not in the mesh, a plan key or kind is wrong,
        or a LoRA layer's sharded dimension does not divide over the axis.
    """
    names = tuple(mesh.axis_names or ())
    for what, axis in (("tp_axis", tp_axis), ("dp_axis", dp_axis)):
        if axis is not None and axis not in names:
            raise ShardingError(f"{what} {axis!r} is not an axis of the mesh (axes: {names})")
    if dp_axis == tp_axis:
        raise ShardingError(f"dp_axis and tp_axis must differ, both are {tp_axis!r}")
    modules = dict(model.named_modules())
    # LoRA layers the plan leaves out are replicated, but still run per shard (tokens may be split).
    kinds = dict.fromkeys(layers, "replicated") | _resolve(model, plan)
    placements = {}
    for name, kind in kinds.items():
        placement = LayerSharding(mesh, tp_axis, kind, dp_axis, fully_sharded)
        placement.check(name, modules[name], layers.get(name))
        placements[name] = (modules[name], placement)
    return ModelSharding(placements)
