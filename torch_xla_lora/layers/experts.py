"""LoRA on mixture-of-experts models: the fused expert weights and the router.

transformers 5 keeps a MoE layer's experts as one module with 3-D parameters
(``gate_up_proj`` or ``up_proj``, ``down_proj``: ``[E, out, in]``, or
``[E, in, out]`` when ``is_transposed``) called as
``experts(hidden [N, D], top_k_index [N, K], top_k_weights [N, K])``, and the
router as a module whose logits are ``F.linear(hidden, weight [E, D])``. PEFT
adapts both through ``target_parameters`` (see :class:`~torch_xla_lora.adapters.ExpertsLoRA`).

:class:`ExpertsWithLoRA` computes the experts grouped: the N x K routed rows
(one per (token, k) pair) are sorted by expert once per forward, each
projection runs as one grouped matmul over the contiguous expert groups
(:func:`~torch_xla_lora.ops._grouped.grouped_matmul`, group sizes as device
data), and each row gets the LoRA of its (adapter slot, expert) pair in the
same sorted order; the rows are put back in token order once, before the
routing weights. No weight is gathered per row: the temporaries follow rows x
width. The slot buffers hold ``max_loras * E`` entries (slot-major: entry
``slot * E + e``), so the row index ``slot * E + expert`` feeds the same BGMV
ops as a dense layer: the cost depends on the rows, not on slots x experts,
and every adapter mix reuses one compiled graph.

:class:`RouterWithLoRA` adds the LoRA of each token's slot to the router's
logits, leaving the rest of the router (softmax, top-k, normalisation, which
differ per architecture) to the router itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from torch_xla_lora import pool
from torch_xla_lora.adapters import ExpertsLoRA, ModuleLoRA
from torch_xla_lora.context import BatchContext
from torch_xla_lora.errors import InvalidAdapterError, RankTooLargeError
from torch_xla_lora.layers.base import BaseLayerWithLoRA, fused_lora, kernel_runs, to_width
from torch_xla_lora.ops._grouped import grouped_matmul

__all__ = ["ExpertsWithLoRA", "RouterWithLoRA"]


def _token_slots(context: BatchContext, hidden: torch.Tensor) -> torch.Tensor | None:
    """Slot of each of the N flattened tokens of ``hidden`` ([N, D], as MoE blocks pass it): [N] int32, or None."""
    return context.token_slots(hidden)


class ExpertsWithLoRA(BaseLayerWithLoRA):
    """Fused experts with per-(slot, expert) LoRA on the up (``gate_up_proj``/``up_proj``) and down projections.

    For each token t, routed to experts e_1..e_K with weights w_k, and slot s = slot(t)::

        h_k = x_t W_up[e_k]^T + x_t A_up[s, e_k]^T B_up[s, e_k]^T      (+ bias)
        y_t = sum_k w_k * (gate(h_k) W_down[e_k]^T + gate(h_k) A_down[s, e_k]^T B_down[s, e_k]^T)

    (scaling folded into B; s = -1 adds nothing), computed over the rows sorted by expert (see the
    module). Buffers: ``lora_a`` [L*E, R, in_up], ``lora_b`` [L*E, R, out_up], ``lora_a_down``
    [L*E, R, in_down], ``lora_b_down`` [L*E, R, out_down], the widths rounded up to whole 128-lane tiles
    where the TPU fused kernel may run (``lane_padded``, see the base class). Without a batch the wrapped module runs as
    configured, except ``experts_implementation="batched_mm"`` (a weight gathered per routed row), which
    the grouped base path replaces.
    """

    lane_padding = True  # the one-device forward reads the slots only through the fused op

    def __init__(self, base_layer: nn.Module, *args, **kwargs) -> None:
        self.up_name = "gate_up_proj" if getattr(base_layer, "has_gate", True) else "up_proj"
        self.transposed = bool(getattr(base_layer, "is_transposed", False))
        self.num_experts = getattr(base_layer, self.up_name).shape[0]
        #: parameter name -> (num_experts, in_features, out_features), what adapters are checked against.
        self.factor_shapes = {}
        for param in (self.up_name, "down_proj"):
            experts, d1, d2 = getattr(base_layer, param).shape
            self.factor_shapes[param] = (experts, d1, d2) if self.transposed else (experts, d2, d1)
        self.in_features = self.factor_shapes[self.up_name][1]
        self.out_features = self.factor_shapes["down_proj"][2]
        super().__init__(base_layer, *args, **kwargs)

    def _buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        """``lora_a``, ``lora_b`` (up projection), ``lora_a_down``, ``lora_b_down``: [L * E, R, in or out]."""
        entries, shapes = self.max_loras * self.num_experts, {}
        for suffix, param in (("", self.up_name), ("_down", "down_proj")):
            _, d_in, d_out = self.factor_shapes[param]
            shapes[f"lora_a{suffix}"] = (entries, self.max_rank, d_in)
            shapes[f"lora_b{suffix}"] = (entries, self.max_rank, d_out)
        return shapes

    @classmethod
    def can_replace(cls, module: nn.Module) -> bool:
        """A transformers 5 experts module: 3-D up and down weights behind ``use_experts_implementation``."""
        if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
            return False
        up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
        down = getattr(module, "down_proj", None)
        return all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in (up, down))

    # -- slots -------------------------------------------------------------------------------------

    def set_adapter(self, slot: int, weights: ExpertsLoRA) -> None:
        """Write one adapter's expert factors (host tensors, scaling folded into B) into ``slot``."""
        if not isinstance(weights, ExpertsLoRA):
            raise InvalidAdapterError(
                f"weights: expected ExpertsLoRA for an experts module, got {type(weights).__name__}"
            )
        unknown = set(weights.params) - set(self.factor_shapes)
        if unknown:
            raise InvalidAdapterError(
                f"weights: parameters {sorted(unknown)}: expected among {sorted(self.factor_shapes)}"
            )
        up = self._padded(self.up_name, weights.params.get(self.up_name))
        down = self._padded("down_proj", weights.params.get("down_proj"))
        self._write(slot, up, down)

    def reset_adapter(self, slot: int) -> None:
        """Zero ``slot`` for every expert: tokens using it get exactly the base experts."""
        self._write(slot, self._padded(self.up_name, None), self._padded("down_proj", None))

    def _rank_axes(self) -> dict[str, int]:
        return dict.fromkeys(self._buffer_shapes(), 0)  # [E, R, d] per slot

    def _slot_arrays(self, weights: ExpertsLoRA | None) -> dict[str, torch.Tensor]:
        """The four buffers' entries of one slot, [E, R, in or out] each (for the pool's rows)."""
        params = {} if weights is None else weights.params
        up, down = (
            self._padded(self.up_name, params.get(self.up_name)),
            self._padded("down_proj", params.get("down_proj")),
        )
        return dict(zip(self._buffer_shapes(), (*up, *down), strict=True))

    def _padded(self, param: str, factors: ModuleLoRA | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A [E, R, in] and rank-first B [E, R, out], zero-padded to max_rank, in the buffers' dtype."""
        experts, d_in, d_out = self.factor_shapes[param]
        a = torch.zeros(experts, self.max_rank, d_in, dtype=self.adapter_dtype)
        b = torch.zeros(experts, self.max_rank, d_out, dtype=self.adapter_dtype)
        if factors is None:
            return a, b
        rank = factors.a.shape[1]
        if rank > self.max_rank:
            raise RankTooLargeError(f"{param} rank: expected <= {self.max_rank} (max_rank), got {rank}")
        expected = ((experts, rank, d_in), (experts, d_out, rank))
        if (tuple(factors.a.shape), tuple(factors.b.shape)) != expected:
            raise InvalidAdapterError(
                f"{param} factors: expected shapes {expected}, got {tuple(factors.a.shape)}, {tuple(factors.b.shape)}"
            )
        a[:, :rank] = factors.a
        b[:, :rank] = factors.b.transpose(1, 2)
        return a, b

    def _write(self, slot: int, up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor]) -> None:
        # The slot's E entries as one device index: one fixed-shape write graph for every slot.
        device = self.lora_a.device
        first = slot * self.num_experts
        index = torch.arange(first, first + self.num_experts, dtype=torch.int64).to(device)
        with torch.no_grad():
            for buffer, value in zip(
                (self.lora_a, self.lora_b, self.lora_a_down, self.lora_b_down), (*up, *down), strict=True
            ):
                buffer.index_copy_(0, index, to_width(value, buffer.shape[-1]).to(device))  # lane-padded: zeros

    def slot_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four slot buffers a forward reads (``lora_a``, ``lora_b``, ``lora_a_down``, ``lora_b_down``).

        A trainable adapter's slot (its ``E`` entries ``slot * E + e``) is replaced by its parameters here,
        in the graph (see :mod:`torch_xla_lora.training`), so that gradients reach the parameters.
        """
        buffers = tuple(self.slot_buffers().values())  # lora_a, lora_b, lora_a_down, lora_b_down
        if not self.trainable:
            return buffers
        slots = sorted(self.trainable)
        shapes = {param: shape[1:] for param, shape in self.factor_shapes.items()}
        dtype = self.adapter_dtype
        rows = [self.trainable[slot].slot_rows(self.up_name, shapes, self.max_rank, dtype) for slot in slots]
        experts = torch.arange(self.num_experts, dtype=torch.long)
        index = torch.cat([slot * self.num_experts + experts for slot in slots]).to(self.adapter_device)
        return tuple(
            buffer.index_put((index,), to_width(torch.cat([entry[i] for entry in rows]), buffer.shape[-1]))
            for i, buffer in enumerate(buffers)
        )

    # -- forward -----------------------------------------------------------------------------------------

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [N, D], top_k_index [N, K] (int), top_k_weights [N, K] -> [N, D]."""
        slots = _token_slots(self.context, hidden_states)
        if slots is None and not _gathers(self.base_layer):
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        return self._grouped(hidden_states, top_k_index, top_k_weights, slots)

    def _grouped(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        slots: torch.Tensor | None,
    ) -> torch.Tensor:
        """The experts over the N * K routed rows sorted by expert, with each row's LoRA if ``slots`` is given."""
        base = self.base_layer
        num_tokens, top_k = top_k_index.shape
        experts = self.num_experts
        expert_ids = top_k_index.reshape(-1)  # row r = (token r // K, k r % K), as transformers orders them
        # One stable sort per forward: rows of expert 0 first, each expert's rows in token order.
        expert_sorted, order = torch.sort(expert_ids, stable=True)
        rows = torch.arange(order.shape[0], device=order.device)
        # Group sizes as device data (no host sync): a scatter-add of ones, which XLA lowers without a fallback.
        group_sizes = torch.zeros(experts, dtype=torch.int32, device=order.device).scatter_add_(
            0, expert_sorted, torch.ones_like(expert_sorted, dtype=torch.int32)
        )
        token_of_row = order // top_k
        x = hidden_states[token_of_row]  # [N * K, D]: a gather of rows, never of weights
        lora_rows, pooled = None, False
        if slots is not None:
            # Index into the [L * E] buffers; a token without adapter (slot -1) lands in [-E, -1]: no LoRA.
            lora_rows = (slots[token_of_row] * experts + expert_sorted).to(torch.int32)
            # Each (lane, expert) at its true rank; on one device whatever autograd records (the op's backward).
            one_device = self.tensor_parallel is None
            if self._reads_pool(x, self.backend, hidden_states, differentiable=one_device):
                pooled = True
                lora_a, lora_b, lora_a_down, lora_b_down = "lora_a", "lora_b", "lora_a_down", "lora_b_down"
            else:
                lora_a, lora_b, lora_a_down, lora_b_down = self.slot_factors()
        else:
            lora_a = lora_b = lora_a_down = lora_b_down = None
        up = self._project(self.up_name, x, group_sizes, expert_sorted, lora_rows, lora_a, lora_b, pooled)
        # With an expert axis on a mesh, up is [n, N * K, width]: each expert shard's rows, stacked (see
        # sharding.LayerSharding.expert_projection); the gate is elementwise over the last dimension.
        h = base._apply_gate(up) if base.has_gate else base.act_fn(up)
        down = self._project("down_proj", h, group_sizes, expert_sorted, lora_rows, lora_a_down, lora_b_down, pooled)
        if getattr(base, "has_post_expert_norm", False):
            down = base.post_expert_norm(down)
        # Back to token-major order once: row order[i] of the original order is sorted row i.
        inverse = torch.empty_like(order).scatter_(0, order, rows)
        weighted = down[inverse] * top_k_weights.reshape(-1, 1).to(down.dtype)
        return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _project(
        self,
        param: str,
        rows: torch.Tensor,
        group_sizes: torch.Tensor,
        expert_sorted: torch.Tensor,
        lora_rows: torch.Tensor | None,
        lora_a: torch.Tensor | str | None,
        lora_b: torch.Tensor | str | None,
        pooled: bool = False,
    ) -> torch.Tensor:
        """One projection (``param``) of the sorted ``rows``: grouped base matmul, bias, each row's LoRA: from the
        slot tensors ``lora_a``, ``lora_b``, or ``pooled`` from the pools of the buffers so named, through the
        entries' row and page tables of this projection (:meth:`_entry_tables`)."""
        base = self.base_layer
        bias = getattr(base, f"{param}_bias") if getattr(base, "has_bias", False) else None
        table, pages = self._entry_tables(self._suffix(lora_a)) if pooled else (None, None)
        if self.tensor_parallel is not None:  # on a mesh: per-shard regions, see sharding.py
            placement = self.tensor_parallel
            out = placement.expert_projection(self, param, rows, group_sizes, lora_a, lora_b, lora_rows, table, pages)
            return out if bias is None else out + bias[expert_sorted]
        out = grouped_matmul(rows, getattr(base, param), group_sizes, self.transposed)
        if bias is not None:
            out = out + bias[expert_sorted]
        if lora_rows is None:
            return out
        if pooled:
            return self._pooled_lora(rows, out, lora_rows, lora_a, lora_b, table, pages)
        return fused_lora(rows, out, lora_a, lora_b, lora_rows, self.backend)

    # -- rank-true storage (torch_xla_lora.pool) ---------------------------------------------------------

    def _reads_pool(
        self, x: torch.Tensor, backend: str, *operands: torch.Tensor | None, differentiable: bool = False
    ) -> bool:
        """Whether the forward reads each (lane, expert) entry's true-rank rows straight from the pools
        (``pooled_shrink_expand`` on the stacked pools, rows numbered as ``[E * (P + 2), width]``,
        :meth:`_entry_tables`) instead of
        gathering ``[L * E, R, width]`` slot buffers per step: a pooled layer without trainable adapters (on a
        mesh, each shard reads its slices of the pools), on one device (``differentiable``: the op's backward) whatever
        autograd records, on a mesh (its regions have none) autograd recording no gradient for the rows or the
        experts' weights; where the Pallas kernel runs, pools whose per-expert stride (P + 2) and placement
        are whole aligned pages of :data:`pool.KERNEL_PAGE_ROWS` rows (the allocator keeps it so,
        ``pool.kernel_pool_rows``), which the kernel reads stacked, in place."""
        if not self._serves_pool(x, *operands, differentiable=differentiable):
            return False
        if not kernel_runs(x, backend):
            return True
        aligned = (self.pool_rows + pool.SPARE_ROWS) % pool.KERNEL_PAGE_ROWS == 0
        return aligned and self.pool_page_rows % pool.KERNEL_PAGE_ROWS == 0

    def _entry_tables(self, suffix: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(row table, page table or None) of the ``L * E`` (lane, expert) entries in the pools of the pair
        ``suffix`` ("" up, "_down") seen as ``[E * (P + 2), width]``, from one cut of the batch's lane tables
        (``context.rows`` and ``context.pages`` cut to the rank each lane's adapter has in this projection,
        :meth:`_pool_tables`).

        The row table is int32 ``[L * E, R]``: entry ``l * E + e`` = expert e's block (offset ``e * (P + 2)``) at
        lane l's rows, the padding past it at the last block's zero row (the flattened pool's ``E * (P + 2) - 2``,
        the row the pooled ops take for zero). The page table (``pool.page_table`` of the row table, int32
        ``[L * E * pages(R) + L * E]``) is made from the batch's host-built one by a few small ops: each entry's
        page starts its lane's in the expert's block, its rank its lane's in this projection; None where the
        batch has none."""
        rows, pages = self._pool_tables(suffix)
        if pages is None:
            return self._to_entries(rows), None
        lanes = self.max_loras
        starts, ranks = pages[:-lanes].reshape(lanes, -1), pages[-lanes:]
        entry_ranks = ranks[:, None].expand(lanes, self.num_experts).reshape(-1)
        entry_pages = torch.cat([self._to_entries(starts).reshape(-1), entry_ranks.to(torch.int32)])
        return self._to_entries(rows), entry_pages

    @staticmethod
    def _suffix(name_a: torch.Tensor | str | None) -> str:
        """The :meth:`factor_pairs` suffix of the A buffer named ``name_a`` ("" for slot tensors)."""
        return name_a.removeprefix("lora_a") if isinstance(name_a, str) else ""

    def pair_ranks(self, weights: ExpertsLoRA | None) -> dict[str, int]:
        """The rank of the adapter's up (``""``) and down (``"_down"``) factors (0 where not targeted)."""
        params = {} if weights is None else weights.params
        ranks = {}
        for suffix, param in (("", self.up_name), ("_down", "down_proj")):
            ranks[suffix] = params[param].rank if param in params else 0
        return ranks

    def _to_entries(self, table: torch.Tensor) -> torch.Tensor:
        """A lane table of pool rows [L, n] as the ``L * E`` entries' [L * E, n] in the flattened pools: each
        row in expert e's block (offset ``e * (P + 2)``), the zero row at the last block's."""
        stride, experts = self.pool_rows + pool.SPARE_ROWS, self.num_experts
        rows = table.reshape(self.max_loras, 1, -1).to(torch.int32)
        offsets = torch.arange(experts, dtype=torch.int32, device=rows.device)[None, :, None] * stride
        zero = torch.full((), experts * stride - 2, dtype=torch.int32, device=rows.device)
        return torch.where(rows == self.pool_rows, zero, rows + offsets).reshape(self.max_loras * experts, -1)

    def _pooled_lora(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        lanes: torch.Tensor,
        name_a: str,
        name_b: str,
        table: torch.Tensor,
        pages: torch.Tensor | None,
    ) -> torch.Tensor:
        """y [N, out] + each row's LoRA of x [N, in] read from the ``name_a`` and ``name_b`` pools at the entry
        ``lanes`` [N] names (outside [0, L * E): none), by ``pooled_shrink_expand``, in y's dtype: the kernel
        reads the entries' row ``table`` and page table ``pages`` (:meth:`_entry_tables`) and an int8 pool's
        kept page scales."""
        dtype = self.adapter_dtype
        pools = [getattr(self, f"{name}_pool") for name in (name_a, name_b)]  # stacked: [E, P + 2, width]
        scales = [getattr(self, f"{name}_scale", None) for name in (name_a, name_b)]
        suffix = self._suffix(name_a)
        page_scales = getattr(self, f"lora_page_scale{suffix}", None)
        out = torch.ops.xla_lora.pooled_shrink_expand(
            x.to(dtype),
            *pools,
            y.to(dtype),
            lanes,
            table,
            *(None if scale is None else scale.flatten() for scale in scales),
            1.0,
            self.backend,
            None,
            pages,
            page_scales,
        )
        return out.to(y.dtype)


def _gathers(experts: nn.Module) -> bool:
    """Whether the wrapped module, run as configured, would gather a full expert weight per routed row
    (transformers' ``batched_mm``); the layer's grouped path replaces it then, even without a batch."""
    if getattr(experts, "_is_expert_parallel", False):
        return False  # expert-parallel sentinels are the module's own business
    config = getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None) == "batched_mm"


class _AddLoRAToLinear(TorchFunctionMode):
    """Adds a layer's LoRA to the first ``F.linear`` called while active (a router's logits)."""

    def __init__(self, layer: RouterWithLoRA, slots: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.slots, self.done = layer, slots, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and not self.done:
            self.done = True  # the mode is off inside its own handler: the op below is not intercepted
            x = args[0] if args else kwargs["input"]
            placement = self.layer.tensor_parallel
            if placement is not None:  # on a mesh: per shard, replicated weights (see sharding.py)
                return placement.router_lora(self.layer, x, out, self.slots)
            out = self.layer.add_lora(x, out, self.slots)
        return out


class RouterWithLoRA(BaseLayerWithLoRA):
    """A MoE router whose logits ``F.linear(x, weight [E, D])`` get ``B[slot_t] A[slot_t] x_t`` added.

    The router's own code runs unchanged (softmax, top-k, grouping, biases);
    the LoRA is added to the one ``F.linear`` it calls, as PEFT's
    ``target_parameters=["gate.weight"]`` adds it to that weight.
    """

    def __init__(self, base_layer: nn.Module, *args, **kwargs) -> None:
        self.out_features, self.in_features = base_layer.weight.shape
        super().__init__(base_layer, *args, **kwargs)

    @classmethod
    def can_replace(cls, module: nn.Module) -> bool:
        """A module named ``...Router`` with a 2-D ``weight`` (transformers' MoE routers)."""
        weight = getattr(module, "weight", None)
        return (
            type(module).__name__.lower().endswith("router") and isinstance(weight, torch.Tensor) and weight.dim() == 2
        )

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        slots = _token_slots(self.context, hidden_states)
        if slots is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        with _AddLoRAToLinear(self, slots):
            return self.base_layer(hidden_states, *args, **kwargs)
