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
CPU runs the same structure, so the tests cover it. Each per-shard region is
an opaque custom op (:mod:`torch_xla_lora.regions`), so the model compiles
under ``torch.compile(backend="openxla")`` too; linear layers run the fused
op there, with the batch's host-built metadata for their local shapes
(:func:`send_batch`). With ``LoRAConfig.base_fusion`` on, the base matmul
joins the region: each shard runs ``linear_lora`` on its local weight shard
(column layers: their output columns, with the bias; row layers: their K
slice, the bias added once after the reduction).

Row-parallel layers (and vocab-parallel embeddings) compute the base matmul
(lookup) on the local slice themselves, add the LoRA partial product to it,
and leave the manual region as partial results stacked on the model axis,
whose sum is the layer's single all-reduce: LoRA adds no collective.
Column-parallel layers add none either (the base output is already sharded
like B). ``fully_sharded`` also shards column layers' A along the rank and
pays one all-gather of the [T, R] intermediate per layer.

Mixture-of-experts expert layers are tensor parallel inside every expert (the expert width over the
model axis) and, given ``ep_axis``, expert parallel: the experts split over that axis, each device
running the grouped matmul over its own experts' rows; the down projection's partials (base and LoRA)
are summed over both axes in one reduction (see :func:`torch_xla_lora.regions.sharded_grouped_matmul`).

With rank-true storage (``LoRAConfig.memory_budget``) the pools are split as the slot buffers they stand
for (:meth:`LayerSharding.pool_specs`) and each shard gathers its slice of the batch's rows in a region of
its own. torch_xla's int8 quantized linear layers keep their weights, scales and zero points split as the
float weight would be; row layers run torch_xla's quantized matmul per shard inside their region.

Training works through the same regions: each one's backward is a per-shard
region too (see :mod:`torch_xla_lora.regions`), and the slot tensors are read
through ``layer.slot_factors()``, so gradients reach trainable adapters'
parameters. The backward adds collectives only to reduce the gradients that
several shards compute parts of (docs/distributed.md, "Training on a mesh").
"""

from __future__ import annotations

import ast
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch_xla
import torch_xla.distributed.spmd as xs
from torch import nn

from torch_xla_lora import regions  # noqa: F401  (registers the per-shard region ops)
from torch_xla_lora.errors import ShardingError
from torch_xla_lora.layers import BaseLayerWithLoRA, EmbeddingWithLoRA
from torch_xla_lora.layers.embedding import embed_scale
from torch_xla_lora.layers.experts import ExpertsWithLoRA
from torch_xla_lora.layers.linear import is_quantized_linear, linear_features

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
    "model_mesh",
    "replicated",
    "send_batch",
    "send_replicated",
    "warn_if_sharded",
]

KINDS = ("column", "row", "vocab", "replicated")
#: The kind of mixture-of-experts expert layers (``ExpertsWithLoRA``): tensor parallel inside every expert.
EXPERTS = "experts"

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
      expert_axis: mesh axis the experts of MoE expert layers are split over (expert parallelism), or
        None; other layers replicate over it.
      shards, data_shards, expert_shards: sizes of ``axis``, ``data_axis`` and ``expert_axis`` (1 without one).
      key: the placement as a string, passed to the per-shard region ops
        (:mod:`torch_xla_lora.regions`), which rebuild it with :meth:`from_key`.
    """

    mesh: Mesh
    axis: str
    kind: str
    data_axis: str | None = None
    fully_sharded: bool = False
    expert_axis: str | None = None
    shards: int = dataclasses.field(init=False, repr=False, compare=False)
    data_shards: int = dataclasses.field(init=False, repr=False, compare=False)
    expert_shards: int = dataclasses.field(init=False, repr=False, compare=False)
    key: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Plain attributes, computed once: the forward that dynamo traces only reads them.
        sizes = self.mesh.shape()
        object.__setattr__(self, "shards", int(sizes[self.axis]))
        object.__setattr__(self, "data_shards", int(sizes[self.data_axis]) if self.data_axis else 1)
        object.__setattr__(self, "expert_shards", int(sizes[self.expert_axis]) if self.expert_axis else 1)
        fields = (str(self.mesh), self.axis, self.kind, self.data_axis, self.fully_sharded, self.expert_axis)
        object.__setattr__(self, "key", repr(fields))

    @classmethod
    def from_key(cls, key: str) -> LayerSharding:
        """The placement whose :attr:`key` is ``key`` (an equal mesh, not the same object)."""
        from torch_xla.distributed.spmd import Mesh

        mesh, axis, kind, data_axis, fully_sharded, expert_axis = ast.literal_eval(key)
        return cls(Mesh.from_str(mesh), axis, kind, data_axis, fully_sharded, expert_axis)

    @property
    def out_axis(self) -> str | None:
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
        if is_quantized_linear(module):
            return self._quantized_specs(module, out_dim, in_dim)
        weight = (in_dim, out_dim) if transposed else (out_dim, in_dim)
        return {"weight": weight, "bias": (bias,)}

    @staticmethod
    def _quantized_specs(module: nn.Module, out_dim: str | None, in_dim: str | None) -> dict[str, Spec]:
        """A torch_xla quantized linear layer's int8 weight, scales and zero points, split as the float weight
        would be: per channel, the weight [out, in] on its own dims and the scales and zero points [out]
        with the output; blockwise, the weight [in / bs, bs, out] on the blocks and the output, the scales
        and zero points [in / bs, out] on both (row layers: whole blocks per shard)."""
        if module.block_size == -1:
            weight, per_output = (out_dim, in_dim), (out_dim,)
        else:
            weight, per_output = (in_dim, None, out_dim), (in_dim, out_dim)
        return {"weight": weight, "weight_scaler": per_output, "zero_point": per_output}

    def lora_specs(self, layer: BaseLayerWithLoRA) -> dict[str, Spec]:
        """Partition spec of ``lora_a`` and ``lora_b``, consistent with the base weight."""
        if isinstance(layer, EmbeddingWithLoRA):  # lora_a is token-major [L, vocab, R]
            vocab = self.axis if self.kind == "vocab" else None
            return {"lora_a": (None, vocab, None), "lora_b": (None, None, None)}
        if isinstance(layer, ExpertsWithLoRA):
            return self.expert_specs(layer)[1]
        return self.lora_specs_linear()

    def expert_specs(self, layer: ExpertsWithLoRA) -> tuple[dict[str, Spec], dict[str, Spec]]:
        """(base module's tensors, LoRA buffers) -> partition spec of an expert layer: the expert width
        (the up projection's output, the down projection's input) over the model axis, and with an
        expert axis the experts over it.

        ``gate_up_proj``/``up_proj`` [E, out, in] is split on out ([E, in, out] when transposed) with its
        bias [E, out], ``down_proj`` [E, D, width] on width ([E, width, D]), both on E over the expert
        axis (:meth:`expert_weight_spec`); the up projection's ``lora_b`` [L * E, R, out] follows its
        output, the down projection's ``lora_a_down`` [L * E, R, width] its input; ``lora_a`` and
        ``lora_b_down`` (and ``down_proj_bias``) are replicated. The slot buffers and the biases (small
        beside the expert weights) are replicated over the expert axis."""
        axis = self.axis if self.kind == EXPERTS else None
        up, down = layer.up_name, "down_proj"
        base = {
            up: self.expert_weight_spec(layer.transposed, row_parallel=False),
            down: self.expert_weight_spec(layer.transposed, row_parallel=True),
            f"{up}_bias": (None, axis),
            f"{down}_bias": (None, None),
        }
        lora = {
            "lora_a": (None, None, None),
            "lora_b": (None, None, axis),
            "lora_a_down": (None, None, axis),
            "lora_b_down": (None, None, None),
        }
        return base, lora

    def expert_weight_spec(self, transposed: bool, row_parallel: bool) -> Spec:
        """Partition spec of an expert weight [E, out, in] ([E, in, out] if ``transposed``): E over the expert
        axis (None without one), the expert width (the up projection's out, the down projection's in,
        ``row_parallel``) over the model axis."""
        if self.kind != EXPERTS:
            return (None, None, None)
        width_last = transposed != row_parallel
        return (self.expert_axis, None, self.axis) if width_last else (self.expert_axis, self.axis, None)

    def lora_specs_linear(self) -> dict[str, Spec]:
        """:meth:`lora_specs` of a linear layer (A [L, R, in], B [L, R, out])."""
        axis = self.axis
        if self.kind == "row":
            return {"lora_a": (None, None, axis), "lora_b": (None, None, None)}
        rank = axis if self.fully_sharded and self.out_axis else None
        return {"lora_a": (None, rank, None), "lora_b": (None, None, self.out_axis)}

    def metadata_shape(self, layer: BaseLayerWithLoRA) -> tuple[int, int] | None:
        """(in, out) features of the fused op each shard runs, or None if it runs none.

        Local shapes: a column layer's shard has out / n columns, a row
        layer's in / n input features. Fully sharded column layers (shrink,
        gather, expand) and embeddings (lookup, expand) run no fused op.
        """
        if isinstance(layer, (EmbeddingWithLoRA, ExpertsWithLoRA)) or self.lora_specs_linear()["lora_a"][1] is not None:
            return None  # expert layers group their rows on the device (sorted by expert inside the forward)
        if self.kind == "row":
            return layer.in_features // self.shards, layer.out_features
        if self.out_axis is not None:
            return layer.in_features, layer.out_features // self.shards
        return layer.in_features, layer.out_features

    def check(self, name: str, module: nn.Module, layer: BaseLayerWithLoRA | None) -> None:
        """Raise :class:`ShardingError` if ``module`` cannot be sharded as ``kind``.

        LoRA layers run on local shapes, so their sharded dimensions must divide evenly.
        """
        if isinstance(layer, ExpertsWithLoRA) or self.kind == EXPERTS:
            self._check_experts(name, layer)
            return
        if self.kind not in KINDS:
            raise ShardingError(f"module {name!r}: sharding kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(module, nn.Embedding):
            if self.kind not in ("vocab", "replicated"):
                raise ShardingError(f"embedding {name!r} can be 'vocab' or 'replicated', got {self.kind!r}")
            if layer is not None and module.max_norm is not None:
                raise ShardingError(f"embedding {name!r}: max_norm is not supported on a mesh")
        if is_quantized_linear(module):
            self._check_quantized(name, module)
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
        axes, specs = layer._rank_axes(), self.lora_specs(layer)
        if layer.pool_rows is not None and any(spec[1 + axes[buffer]] is not None for buffer, spec in specs.items()):
            raise ShardingError(
                f"module {name!r}: fully_sharded splits column layers' A along the rank, but with "
                "LoRAConfig.memory_budget the rank rows live in a pool that any batch reads in any order: gathering "
                "a batch's rows from rank-split pools would need a collective per layer. Use fully_sharded=False "
                "with a memory budget"
            )
        if self.lora_specs(layer)["lora_a"][1] is not None and layer.max_rank % self.shards:
            raise ShardingError(
                f"module {name!r}: fully_sharded splits the rank, but max_rank {layer.max_rank} does not "
                f"divide into {self.shards} shards of mesh axis {self.axis!r}"
            )

    def _check_quantized(self, name: str, module: nn.Module) -> None:
        """Quantized bases on a mesh: int8 weights (per channel or blockwise), float activations."""
        if module.int4_weight or module.quantize_activation:
            what = "int4 weights" if module.int4_weight else "quantize_activation"
            raise ShardingError(
                f"module {name!r}: a quantized linear layer with {what} is not supported on a mesh (int8 weights "
                "with float activations are, per channel or blockwise)"
            )
        blocks = module.input_dim // module.block_size if module.block_size != -1 else None
        if self.kind == "row" and blocks is not None and blocks % self.shards:
            raise ShardingError(
                f"module {name!r}: a row-parallel blockwise quantized layer splits its {blocks} blocks of "
                f"{module.block_size} input features, which do not divide into {self.shards} shards of mesh axis "
                f"{self.axis!r}"
            )

    def _check_experts(self, name: str, layer: BaseLayerWithLoRA | None) -> None:
        if not isinstance(layer, ExpertsWithLoRA) or self.kind not in (EXPERTS, "replicated"):
            raise ShardingError(
                f"module {name!r}: kind {EXPERTS!r} is for MoE expert layers with LoRA, and such a layer is "
                f"{EXPERTS!r} or 'replicated', got {self.kind!r}"
            )
        width = layer.factor_shapes["down_proj"][1]  # the expert width; the up projection's output is 1 or 2x it
        if self.kind == EXPERTS and width % self.shards:
            raise ShardingError(
                f"module {name!r}: expert width {width} does not divide into {self.shards} shards of mesh axis "
                f"{self.axis!r}"
            )
        if self.kind == EXPERTS and layer.num_experts % self.expert_shards:
            raise ShardingError(
                f"module {name!r}: {layer.num_experts} experts do not divide into {self.expert_shards} shards of "
                f"mesh axis {self.expert_axis!r} (ep_axis)"
            )

    def apply(self, module: nn.Module, layer: BaseLayerWithLoRA | None) -> None:
        """Mark the base weights (and the LoRA buffers, which then run per shard) on the mesh."""
        if isinstance(layer, ExpertsWithLoRA):
            base, lora = self.expert_specs(layer)
            for tensor_name, spec in base.items():
                tensor = getattr(module, tensor_name, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == len(spec):
                    xs.mark_sharding(tensor, self.mesh, spec)
            self._mark_lora(layer, lora)
            layer.tensor_parallel = self
            return
        for tensor_name, spec in self.base_specs(module).items():
            tensor = getattr(module, tensor_name, None)
            if tensor is not None:
                xs.mark_sharding(tensor, self.mesh, spec)
        if layer is not None:
            self._mark_lora(layer, self.lora_specs(layer))
            layer.tensor_parallel = self

    def _mark_lora(self, layer: BaseLayerWithLoRA, specs: Mapping[str, Spec]) -> None:
        """Mark the slot buffers by ``specs``, or with a memory budget the pools standing for them
        (:meth:`pool_specs`)."""
        if layer.pool_rows is None:
            for tensor_name, spec in specs.items():
                xs.mark_sharding(getattr(layer, tensor_name), self.mesh, spec)
            return
        for tensor_name, (pool_spec, scale_spec) in self.pool_specs(layer).items():
            xs.mark_sharding(getattr(layer, f"{tensor_name}_pool"), self.mesh, pool_spec)
            scale = getattr(layer, f"{tensor_name}_scale", None)
            if scale is not None:
                xs.mark_sharding(scale, self.mesh, scale_spec)
        for name in layer._page_scale_pairs(True):  # an int8 pool's kept a_scale * b_scale per row: replicated
            page_scales = getattr(layer, name, None)
            if page_scales is not None:
                xs.mark_sharding(page_scales, self.mesh, (None,))

    def pool_specs(self, layer: BaseLayerWithLoRA) -> dict[str, tuple[Spec, Spec]]:
        """Slot buffer name -> (partition spec of its pool, of its int8 scales), for rank-true storage.

        A pool ``[k, *slot]`` (k entries per slot, the rank axis holding the pool's rows, see
        :mod:`torch_xla_lora.pool`) is split as the slot buffer ``[L * k, *slot]`` it stands for: the slot
        axis's spec (never split) goes to the entry axis, the rank axis's (never split with a pool, see
        :meth:`check`) to the row axis, every feature axis keeps its own. So each shard's pool holds exactly
        the features its slot buffer would, and a batch's rows are gathered on the local shard. The scales
        [k, rows] have no feature axis: replicated, like the rows table.
        """
        specs = self.lora_specs(layer)
        axes = layer._rank_axes()
        out = {}
        for name, spec in specs.items():
            if spec[0] is not None or spec[1 + axes[name]] is not None:
                raise ShardingError(f"{name}: a pool cannot be split on its slot or rank axis, got spec {spec}")
            out[name] = (spec, (None, None))
        return out

    def slot_buffers(self, layer: BaseLayerWithLoRA, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Name -> the slot buffer a forward reads, gathered from the pool on each shard's local slice
        (``xla_lora::sharded_gather_slots``): the batch's rows, split as the slot buffer, no collective."""
        specs, axes = self.lora_specs(layer), layer._rank_axes()
        return {
            name: torch.ops.xla_lora.sharded_gather_slots(
                getattr(layer, f"{name}_pool"),
                getattr(layer, f"{name}_scale", None),
                layer.context.rows,
                axes[name],
                layer.max_loras,
                layer.adapter_dtype,
                repr(specs[name]),
                self.key,
            )
            for name in names
        }

    # -- forward: what dynamo traces; the per-shard regions are opaque ops (regions.py) ------------

    def forward(self, layer: BaseLayerWithLoRA, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward on the mesh (same result as on one device)."""
        if isinstance(layer, EmbeddingWithLoRA):
            return self._embedding_forward(layer, x)
        slots = layer.context.token_slots(x)
        if slots is None:
            return layer.base_layer(x)
        if layer.training and any(module.dropout > 0 for module in layer.trainable.values()):
            # One device drops the LoRA input of such adapters' rows (layer.lora_input); the regions do not yet.
            raise ShardingError(
                "lora_dropout of trainable adapters is not applied on a mesh yet: train them with "
                "lora_dropout=0, or call model.eval() (no dropout)"
            )
        # [N, in], in the adapter's dtype (LoRAConfig.dtype may differ from the model's)
        x2 = x.reshape(-1, layer.in_features)
        base = layer.base_layer
        fused = self.fuses_base(layer, x)
        backend = layer.backend if fused else layer.lora_backend(layer.formulation(x))
        metadata, own = self._metadata(layer, x2.shape[0], fused)
        quantized = is_quantized_linear(base)
        if layer._reads_pool(x2, backend):
            return self._pooled_forward(layer, x, x2, slots, backend, fused)
        lora_a, lora_b = layer.slot_factors()  # the buffers, or trainable adapters' rows put in, in the graph
        if quantized and torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_a, lora_b)):
            raise ShardingError("training on a quantized base is not supported on a mesh yet (one device only)")
        if self.kind == "row":
            # The base matmul runs inside the region, so base and LoRA share the one reduction.
            transposed, scales = _row_base(base)
            y = torch.ops.xla_lora.sharded_row_linear(
                x2,
                base.weight,
                lora_a,
                lora_b,
                slots,
                metadata,
                transposed,
                self.key,
                backend,
                fused,
                own,
                *scales,
            )
            if getattr(base, "bias", None) is not None:
                y = y + base.bias
            return y.reshape(*x.shape[:-1], layer.out_features)
        if fused:  # base matmul, bias and LoRA in one op on each shard's columns
            y = torch.ops.xla_lora.sharded_linear_lora(
                x2,
                base.weight,
                base.bias,
                lora_a,
                lora_b,
                slots,
                metadata,
                layer.weight_layout,
                self.key,
                layer.backend,
                own,
            )
            return y.reshape(*x.shape[:-1], layer.out_features)
        y = layer.base_layer(x)
        out = torch.ops.xla_lora.sharded_linear(
            x2.to(lora_a.dtype),
            lora_a,
            lora_b,
            y.reshape(-1, layer.out_features).to(lora_b.dtype),
            slots,
            metadata,
            self.key,
            backend,
        )
        return out.reshape(y.shape).to(y.dtype)

    def _pooled_forward(
        self,
        layer: BaseLayerWithLoRA,
        x: torch.Tensor,
        x2: torch.Tensor,
        slots: torch.Tensor,
        backend: str,
        fused: bool = False,
    ) -> torch.Tensor:
        """A layer with a memory budget reading its lanes' true-rank rows from its pools on each shard: a column,
        vocab or replicated layer adds its shard's columns of the LoRA to the base layer's output
        (``xla_lora::sharded_pooled_lora``), or with ``fused`` (``base_fusion``) runs base and LoRA in one op on
        them (``xla_lora::sharded_pooled_linear_lora``); a row-parallel layer adds its input slice's LoRA partial
        to its base partial (``fused``: in one op), reduced together (``xla_lora::sharded_pooled_row_linear``)."""
        base = layer.base_layer
        if self.kind == "row":
            transposed, scales = _row_base(base)
            operands, pages = self._pool_operands(layer, slots)
            y = torch.ops.xla_lora.sharded_pooled_row_linear(
                x2, base.weight, *operands, layer.adapter_dtype, transposed, self.key, backend, *scales, *pages, fused
            )
            if getattr(base, "bias", None) is not None:
                y = y + base.bias
            return y.reshape(*x.shape[:-1], layer.out_features)
        if fused:
            (a_pool, b_pool, *rest), pages = self._pool_operands(layer, slots)
            y = torch.ops.xla_lora.sharded_pooled_linear_lora(
                x2, base.weight, base.bias, a_pool, b_pool, *rest, layer.weight_layout, self.key, backend, *pages
            )
            return y.reshape(*x.shape[:-1], layer.out_features)
        y = layer.base_layer(x)
        out = self._pooled_columns(layer, x2, y.reshape(-1, layer.out_features), slots, backend)
        return out.reshape(y.shape).to(y.dtype)

    def _pooled_columns(
        self, layer: BaseLayerWithLoRA, x2: torch.Tensor, base: torch.Tensor, slots: torch.Tensor, backend: str
    ) -> torch.Tensor:
        """base [N, out] + each token's LoRA of x2 [N, in] read from the pools on each shard's columns
        (``xla_lora::sharded_pooled_lora``), in the adapters' dtype."""
        dtype = layer.adapter_dtype
        (a_pool, b_pool, *rest), pages = self._pool_operands(layer, slots)
        return torch.ops.xla_lora.sharded_pooled_lora(
            x2.to(dtype), a_pool, b_pool, base.to(dtype), *rest, self.key, backend, *pages
        )

    @staticmethod
    def _pool_operands(layer: BaseLayerWithLoRA, slots: torch.Tensor) -> tuple[tuple, tuple]:
        """What the pooled linear regions take: (A's pool, B's pool, slots, the batch's row table, A's scales,
        B's scales, max_loras), in their order, and the pooled kernel's page inputs as one device passes them
        (the batch's host-built page table; an int8 pool's kept page scales, ``lora_page_scale``, else None),
        both replicated: the pools' row axis is never split and an int8 row's scales are over the whole row. The
        tables are cut once, to each lane's rank in this module."""
        scales = (getattr(layer, f"{name}_scale", None) for name in ("lora_a", "lora_b"))
        rows, pages = layer._pool_tables()
        operands = (layer.lora_a_pool, layer.lora_b_pool, slots, rows.reshape(-1), *scales, layer.max_loras)
        return operands, (pages, getattr(layer, "lora_page_scale", None))

    def fuses_base(self, layer: BaseLayerWithLoRA, x: torch.Tensor) -> bool:
        """Whether ``layer`` runs ``linear_lora`` (base matmul and LoRA in one op) on each shard.

        As on one device (``LoRAConfig.base_fusion``, a plain weight layout, one
        dtype), except fully sharded column layers: their shards hold a slice
        of A's rank, so they keep the base layer, shrink, gather and expand.
        """
        if isinstance(layer, EmbeddingWithLoRA) or self.lora_specs_linear()["lora_a"][1] is not None:
            return False
        return layer._fuses_base(x)

    def _metadata(
        self, layer: BaseLayerWithLoRA, num_tokens: int, fused: bool = False
    ) -> tuple[torch.Tensor | None, bool]:
        """The batch's host-built metadata for this layer's local shapes, if :func:`batch_metadata` made it,
        and whether it is ``linear_lora``'s own (``fused``: the layer runs it; see :func:`send_batch`)."""
        if num_tokens % self.data_shards:
            raise ShardingError(
                f"{num_tokens} tokens do not split evenly over data axis {self.data_axis!r} of size {self.data_shards}"
            )
        shape = self.metadata_shape(layer)
        if shape is None:
            return None, False
        key = (num_tokens // self.data_shards, *shape)
        if fused:
            has_bias = self.kind != "row" and layer.base_layer.bias is not None  # row: added after the reduction
            own = layer.context.metadata.get((*key, "linear", has_bias))
            if own is not None:
                return own, True
        return layer.context.metadata.get(key), False

    def _embedding_forward(self, layer: EmbeddingWithLoRA, ids: torch.Tensor) -> torch.Tensor:
        slots = layer.context.token_slots(ids[..., None])
        if slots is None:
            return layer.base_layer(ids)
        flat = ids.reshape(-1)
        self._metadata(layer, flat.shape[0])  # checks the token split
        module = layer.base_layer
        if module.weight.requires_grad and torch.is_grad_enabled() and (module.scale_grad_by_freq or module.sparse):
            raise ShardingError("an embedding's scale_grad_by_freq or sparse gradient is not supported on a mesh")
        # The base module's forward does not run: its embed_scale (if any) is applied in the region.
        scale = embed_scale(module)
        tensor, value = (scale, None) if isinstance(scale, torch.Tensor) else (None, scale)
        pooled = ()
        if layer.pool_rows is not None and not layer.trainable:
            # As on one device: the tokens' A rows straight from the pool on each shard (O(T * R)), and the
            # lanes' true-rank rows of B's pool (pooled_expand).
            lora_a, lora_b = layer.lora_a_pool, layer.lora_b_pool
            rows = layer.context.rows.reshape(layer.max_loras, layer.max_rank)
            scales = (getattr(layer, f"{name}_scale", None) for name in ("lora_a", "lora_b"))
            pooled = (rows, *scales, layer.adapter_dtype)
        else:
            lora_a, lora_b = layer.slot_factors()
        y = torch.ops.xla_lora.sharded_embedding(
            flat,
            module.weight,
            lora_a,
            lora_b,
            slots,
            tensor,
            value,
            self.key,
            layer.backend,
            module.padding_idx,
            *pooled,
        )
        return y.reshape(*ids.shape, layer.out_features)

    def expert_projection(
        self,
        layer: ExpertsWithLoRA,
        param: str,
        rows: torch.Tensor,
        group_sizes: torch.Tensor,
        lora_a: torch.Tensor | str | None,
        lora_b: torch.Tensor | str | None,
        lora_rows: torch.Tensor | None,
        table: torch.Tensor | None = None,
        pages: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One projection of an expert layer on the mesh: the grouped matmul of the routed ``rows`` [S, in]
        (sorted by expert, ``group_sizes`` [E]) and each row's (slot, expert) LoRA, per shard; bias not added.
        With a pool ``table`` and the entries' page table ``pages`` (``ExpertsWithLoRA._entry_tables``),
        ``lora_a`` and ``lora_b`` name the buffers whose pools each shard reads in place, each entry at its true
        rank (an int8 layer's kept page scales of the projection beside them).

        The up projection (``param`` = ``layer.up_name``) is column-parallel inside every expert: each
        shard multiplies all rows by its slice of the expert width and adds the LoRA expand into its
        columns of B. The down projection is row-parallel: each shard reads its slice of the width
        (of h, of the weight and of A), and base and LoRA partials share the one reduction. The routed rows
        are replicated over every other mesh axis (a data axis included): the sort by expert is global.

        With an expert axis each device holds E / n of the experts and runs the grouped matmul over their
        rows only (rows of other experts give zeros, their LoRA entries none): the up projection returns
        the partials stacked on the expert axis, [n, S, width] (the gate runs on it elementwise), and the
        down projection sums base and LoRA partials over the expert and model axes in one reduction.

        Differentiable (expert LoRA, the rows, the expert weights): the backward is a region too
        (``xla_lora::sharded_grouped_matmul_backward``), reducing only what several shards compute parts of.
        """
        weight = getattr(layer.base_layer, param)
        pooled = ()
        if table is not None:
            names = (lora_a, lora_b)
            lora_a, lora_b = (getattr(layer, f"{name}_pool") for name in names)
            scales = (getattr(layer, f"{name}_scale", None) for name in names)
            page_scales = getattr(layer, f"lora_page_scale{layer._suffix(names[0])}", None)
            pooled = (table, *scales, layer.adapter_dtype, pages, page_scales)
        return torch.ops.xla_lora.sharded_grouped_matmul(
            rows,
            weight,
            group_sizes,
            lora_a,
            lora_b,
            lora_rows,
            layer.transposed,
            param == "down_proj",
            self.key,
            layer.backend,
            *pooled,
        )

    def router_lora(
        self, layer: BaseLayerWithLoRA, x: torch.Tensor, logits: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """A router's logits [..., E] plus each token's LoRA of x [..., D], per shard (replicated weights:
        every shard computes all E logits of its tokens, as the separate path of a replicated linear layer)."""
        x2 = x.reshape(-1, layer.in_features)
        metadata, _ = self._metadata(layer, x2.shape[0])
        if layer._reads_pool(x2, layer.backend, logits):  # rank-true pools, read in place on each shard
            out = self._pooled_columns(layer, x2, logits.reshape(-1, layer.out_features), slots, layer.backend)
            return out.reshape(logits.shape).to(logits.dtype)
        lora_a, lora_b = layer.slot_factors()
        out = torch.ops.xla_lora.sharded_linear(
            x2.to(lora_a.dtype),
            lora_a,
            lora_b,
            logits.reshape(-1, layer.out_features).to(lora_b.dtype),
            slots,
            metadata,
            self.key,
            layer.backend,
        )
        return out.reshape(logits.shape).to(logits.dtype)

    # -- inside the regions ------------------------------------------------------------------------

    def enter(self, tensor: torch.Tensor, spec: Spec, placed: bool = False) -> torch.Tensor:
        """The local shard of ``tensor`` split by ``spec``; ops on it are not partitioned.

        ``placed``: ``tensor`` is device data already sharded by ``spec`` (a weight
        or buffer marked by :meth:`apply`, slots or metadata sent by
        :func:`send_batch`), so it is not marked again: marking device data
        changes the input tensor itself, which a region should not do.
        """
        if placed:  # what xs.enable_manual_sharding does, without its mark_sharding
            return torch_xla._XLAC._spmd_full_to_shard_shape(tensor)
        return xs.enable_manual_sharding(tensor, spec, mesh=self.mesh).global_tensor

    def leave(self, tensor: torch.Tensor, spec: Spec, shape: tuple[int, ...]) -> torch.Tensor:
        """The global tensor of ``shape`` whose shards (split by ``spec``) are ``tensor``."""
        return xs.disable_manual_sharding(tensor, spec, tuple(shape), mesh=self.mesh).global_tensor

    def reduce(self, partial: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Sum of every shard's ``partial`` [N_local, D]: partials stacked on the model axis, then summed.

        The partitioner lowers the sum over the sharded stack axis to one all-reduce.
        """
        spec = (self.axis, self.data_axis, None)
        return self.leave(partial[None], spec, (self.shards, num_tokens, partial.shape[1])).sum(0)


def replicated(tensor: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """``tensor`` replicated on every device of ``mesh``: do this to what you fetch to the host.

    torch_xla 2.9 compiles a new gather graph on every host fetch of a sharded
    tensor (never cached); a replicated one is read from one device. Reduce
    first (e.g. the next token ids, not the logits) to keep the gather small.
    Works in lazy mode and inside ``torch.compile`` (an opaque op); ``mesh``
    is not needed for that (replication is the same on any mesh) but names
    what the result is replicated over.
    """
    del mesh
    return torch.ops.xla_lora.replicated(tensor)


def model_mesh(model: nn.Module) -> Mesh | None:
    """The mesh ``model``'s LoRA layers were patched on (``patch_model(..., mesh=...)``), or None."""
    for module in model.modules():
        placement = getattr(module, "tensor_parallel", None)
        if isinstance(module, BaseLayerWithLoRA) and placement is not None:
            return placement.mesh
    return None


_warned_sharded_output = False


def warn_if_sharded(out: object, where: str) -> bool:
    """Warn (once per process) if ``out`` (a tensor, or a model output with ``.logits``) is sharded over
    the mesh, e.g. vocabulary-sharded logits: torch_xla 2.9 compiles a new gather graph at every host
    fetch of such a tensor. Returns whether it is sharded."""
    global _warned_sharded_output
    tensor = getattr(out, "logits", out)
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "xla":
        return False
    spec = torch_xla._XLAC._get_xla_sharding_spec(tensor)
    sharded = bool(spec) and "replicated" not in spec and "maximal" not in spec
    if sharded and not _warned_sharded_output:
        _warned_sharded_output = True
        warnings.warn(
            f"{where} returns a tensor sharded over the mesh ({spec}): torch_xla compiles a new gather graph "
            "at every host fetch (.cpu(), .item()) of it, i.e. every step recompiles. Return "
            "torch_xla_lora.sharding.replicated(t, mesh) from the step instead, after reducing what you can "
            "(e.g. argmax(-1), or the last position's logits)",
            stacklevel=3,
        )
    return sharded


# -- a batch's host-built metadata, per shard ----------------------------------------------------


def send_batch(
    layers: Mapping[str, BaseLayerWithLoRA], slots: torch.Tensor, per_token: bool, seq_len: int | None, device
) -> tuple[torch.Tensor, dict[tuple[int, int, int], torch.Tensor]]:
    """A batch's device slots and, when the token count is known, the fused op's metadata per shard.

    Each shard runs the fused op on its local shapes (see
    :meth:`LayerSharding.metadata_shape`) and its own tokens: the data axis
    splits the N tokens into ``dp`` contiguous chunks, so the metadata is built
    on the host per chunk and sent as one [dp, K] int32 tensor split over the
    data axis, whose local row each shard reads. Per-token slots are sent split
    over the data axis too (the regions read them so), per-row slots replicated.

    Args:
      layers: the handle's LoRA layers (all placed on one mesh).
      slots: [B] per row or [N] per token, int32 on the host.
      seq_len: tokens per row, or None (the kernels group on the device).

    Returns:
      (slots on the device, (N / dp, in, out) -> metadata on the device).
    """
    from torch_xla_lora import ops

    placement = next(lay.tensor_parallel for lay in layers.values())
    by_shape = {lay.tensor_parallel.metadata_shape(lay): lay for lay in layers.values()}
    by_shape.pop(None, None)
    dp = placement.data_shards
    split = per_token and len(slots) % dp == 0
    sent_slots = _send_split(slots, device, placement.mesh, (placement.data_axis if split else None,))
    if seq_len is None or not by_shape:
        return sent_slots, {}
    token_slots = slots.repeat_interleave(seq_len)
    if len(token_slots) % dp:
        return sent_slots, {}  # the forward raises ShardingError
    lay, shapes = next(iter(by_shape.values())), list(by_shape)
    # Layers that will run linear_lora's kernel per shard: its own plan's grouping where it differs (prefill on TPU).
    linear = []
    for layer in layers.values():
        shape = layer.tensor_parallel.metadata_shape(layer)
        if shape is not None and getattr(layer, "linear_metadata_shape", lambda: None)() is not None:
            linear.append((*shape, layer.tensor_parallel.kind != "row" and layer.base_layer.bias is not None))
    chunks = [
        ops.batch_metadata(chunk, shapes, lay.max_rank, lay.max_loras, lay.adapter_dtype, linear_shapes=linear)
        for chunk in token_slots.reshape(dp, -1)
    ]
    sent, metadata = {}, {}
    for shape, array in chunks[0].items():
        if id(array) not in sent:  # layers with the same plan share one array: send it once
            stacked = torch.stack([chunk[shape] for chunk in chunks])  # [dp, K]
            sent[id(array)] = _send_split(stacked, device, placement.mesh, (placement.data_axis, None))
        metadata[(len(token_slots) // dp, *shape)] = sent[id(array)]
    return sent_slots, metadata


def send_replicated(
    tensor: torch.Tensor, device: torch.device, layers: Mapping[str, BaseLayerWithLoRA]
) -> torch.Tensor:
    """``tensor`` (host) replicated on the mesh of ``layers``, marked as it is sent (e.g. a batch's pool rows):
    the regions then read it as placed data, never marking device data again (which would copy it back)."""
    placement = next(lay.tensor_parallel for lay in layers.values())
    return _send_split(tensor, device, placement.mesh, (None,) * tensor.dim())


def _send_split(tensor: torch.Tensor, device, mesh: Mesh, spec: Spec) -> torch.Tensor:
    """``tensor`` (host) on the mesh, split by ``spec``: one host-to-device transfer, nothing fetched back.

    Marked before it is ever used, so the transfer is made sharded (torch_xla 2.9's
    ``send_cpu_data_to_device`` fails on 1-D partially replicated specs).
    """
    out = tensor.to(device)
    xs.mark_sharding(out, mesh, spec)
    return out


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
    ep_axis: str | None = None,
) -> ModelSharding:
    """Resolve and check the sharding of ``model`` (not yet patched) and its future LoRA ``layers``.

    Nothing is changed; :meth:`ModelSharding.apply` marks the tensors. ``ep_axis``: the mesh axis MoE
    expert layers split their experts over (expert parallelism), or None.

    Raises:
      ShardingError: an axis is not in the mesh (or ``ep_axis`` is ``tp_axis`` or ``dp_axis``), a plan key
        or kind is wrong, or a LoRA layer's sharded dimension (the experts: their number) does not divide
        over its axis.
    """
    names = tuple(mesh.axis_names or ())
    for what, axis in (("tp_axis", tp_axis), ("dp_axis", dp_axis), ("ep_axis", ep_axis)):
        if axis is not None and axis not in names:
            raise ShardingError(f"{what} {axis!r} is not an axis of the mesh (axes: {names})")
    if dp_axis == tp_axis:
        raise ShardingError(f"dp_axis and tp_axis must differ, both are {tp_axis!r}")
    if ep_axis is not None and ep_axis in (tp_axis, dp_axis):
        raise ShardingError(f"ep_axis must differ from tp_axis and dp_axis, got {ep_axis!r} (axes: {names})")
    modules = dict(model.named_modules())
    # LoRA layers the plan leaves out are replicated, but still run per shard (tokens may be split).
    kinds = dict.fromkeys(layers, "replicated") | _resolve(model, plan)
    # Expert layers are tensor parallel inside every expert (routers, small, stay replicated).
    kinds |= {name: EXPERTS for name, layer in layers.items() if isinstance(layer, ExpertsWithLoRA)}
    placements = {}
    for name, kind in kinds.items():
        placement = LayerSharding(mesh, tp_axis, kind, dp_axis, fully_sharded, ep_axis)
        placement.check(name, modules[name], layers.get(name))
        placements[name] = (modules[name], placement)
    return ModelSharding(placements)


def _row_base(base: nn.Module) -> tuple[bool, tuple]:
    """How a row-parallel region takes ``base``'s weight: (transposed: a Conv1D's [in, out], the quantized
    matmul's (weight_scale, zero_point, block_size) of a torch_xla quantized layer, else (None, None, -1))."""
    if is_quantized_linear(base):
        return False, (base.weight_scaler, base.zero_point, base.block_size)
    return not isinstance(base, nn.Linear), (None, None, -1)
