"""LoRA on linear layers: replicated, column-parallel, row-parallel and the output head.

All wrap ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's ``fan_in_fan_out``
layout, weight [in, out]); on one device they compute the same thing. They
differ in how :mod:`torch_xla_lora.sharding` places their buffers on a mesh.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from torch_xla_lora.formulation import FusionRole
from torch_xla_lora.layers.base import BaseLayerWithLoRA, _keeps_s


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear, a transformers Conv1D or a torch_xla quantized
    linear layer, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        in_features, out_features = module.weight.shape  # Conv1D stores [in, out]
        return int(in_features), int(out_features)
    if is_quantized_linear(module):
        return int(module.input_dim), int(module.output_dim)
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is torch_xla's weight-only quantized linear layer
    (``torch_xla.experimental.xla_quantized_matmul.XlaQuantizedLinear``: int8 per-channel or blockwise,
    int4 in an int8 container). Its forward stays torch_xla's quantized matmul; the LoRA is added to it."""
    return (
        type(module).__name__ == "XlaQuantizedLinear"
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and hasattr(module, "input_dim")
        and hasattr(module, "output_dim")
    )


def int8_channel_scale(module: nn.Module) -> torch.Tensor | None:
    """The float32 [out] scales of a torch_xla quantized linear layer whose weight is int8, per output channel
    and symmetric (``W = weight * scale[:, None]``: ``block_size == -1``, no zero point, no int4, no
    activation quantization), which ``linear_lora_fused`` reads as int8; None for any other layer or scheme."""
    if not is_quantized_linear(module) or module.block_size != -1 or module.zero_point is not None:
        return None
    if getattr(module, "int4_weight", False) or getattr(module, "quantize_activation", False):
        return None
    if module.weight.dtype != torch.int8 or module.weight.shape != (module.output_dim, module.input_dim):
        return None
    return module.weight_scaler.to(torch.float32)


def _weight_layout(module: nn.Module) -> str | None:
    """ "out_in" for a plain nn.Linear, "in_out" for a Conv1D, None for anything whose forward is not a plain matmul."""
    if type(module).forward is nn.Linear.forward:
        return "out_in"
    if type(module).__name__ == "Conv1D" and getattr(module, "nf", None) is not None:
        return "in_out"
    return None


def dequantized_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight a torch_xla quantized linear layer computes with, in ``dtype``."""
    scaler, zero_point = module.weight_scaler.to(dtype), module.zero_point
    if module.block_size == -1:  # per channel: out = x (w * s)^T - sum(x) * zp
        weight = module.weight.to(dtype) * scaler[:, None]
        return weight if zero_point is None else weight - zero_point.to(dtype)[:, None]
    # Blockwise: w [in / bs, bs, out], s and zp [in / bs, out].
    weight = module.weight.to(dtype) * scaler[:, None, :]
    if zero_point is not None:
        weight = weight - zero_point.to(dtype)[:, None, :]
    return weight.reshape(-1, weight.shape[-1]).T


class _QuantizedLinear(torch.autograd.Function):
    """torch_xla's quantized matmul with a gradient for its input (it registers none): ``dx = dy W``, W the
    dequantized weight (straight through an activation quantization, if the layer has one). The base is
    frozen: no gradient for the quantized weight."""

    @staticmethod
    def forward(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        return module(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.module = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ dequantized_weight(ctx.module, grad.dtype), None


def base_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, differentiable in x also when ``module`` is a quantized linear layer."""
    if is_quantized_linear(module) and torch.is_grad_enabled() and x.requires_grad:
        return _QuantizedLinear.apply(x, module)
    return module(x)


class LinearWithLoRA(BaseLayerWithLoRA):
    """``y = base(x) + B[slot_t] A[slot_t] x_t`` for a replicated linear layer."""

    #: LoRAConfig.base_fusion: "auto", True or False (set by patch_model).
    base_fusion: bool | str = False
    #: The layer's place in its model, for the "auto" choice on TPU (set by patch_model; see formulation.py).
    fusion_role: FusionRole = FusionRole()
    #: For one call, what an arranged decoder layer (``layers/fusion.py``) lets this layer take in: an object
    #: whose ``run(layer, x)`` gives the output, or None to compute it as usual.
    pending: object | None = None

    def __init__(self, base_layer: nn.Module, *args, **kwargs) -> None:
        self.in_features, self.out_features = linear_features(base_layer)
        super().__init__(base_layer, *args, **kwargs)
        #: Token count -> the formulation "auto" chose for a serving call of it on TPU (filled as calls are traced).
        self.formulations: dict[int, str] = {}
        #: The same for training calls (those keeping ``s``): a token count's choice may differ between the two.
        self.training_formulations: dict[int, str] = {}

    @classmethod
    def can_replace(cls, module: nn.Module) -> bool:
        return linear_features(module) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:  # an arranged decoder layer's norm or residual: see layers/fusion.py
            out = self.pending.run(self, x)
            if out is not None:
                return out
        if self.tensor_parallel is not None:  # on a mesh the ops run per shard: see sharding.py
            return self.tensor_parallel.forward(self, x)
        slots = self.context.token_slots(x)
        if slots is None:
            return base_output(self.base_layer, x)
        formulation = self.formulation(x)
        x_lora = self.lora_input(x, slots)  # x, or x through trainable adapters' lora_dropout
        if formulation == "fused" and x_lora is x:
            return self._forward_base_fused(x, slots)
        y = base_output(self.base_layer, x)
        # One fused op: x [N, in] -> [N, R] (on chip) -> + y [N, out]; B spans every output slice.
        return self.add_lora(x_lora, y, slots, self._metadata(x), self.lora_backend(formulation))

    def _metadata(self, x: torch.Tensor) -> torch.Tensor | None:
        """The batch's host-built grouping for x's token count and this layer's shape, if set_batch made it."""
        return self.context.metadata.get(
            (x.reshape(-1, self.in_features).shape[0], self.in_features, self.out_features)
        )

    @property
    def weight_layout(self) -> str | None:
        """The base weight's layout for ``linear_lora`` ("out_in", "in_out"), or None if it cannot run it."""
        return _weight_layout(self.base_layer)

    def _fuses_base(self, x: torch.Tensor) -> bool:
        """Whether this call runs the base matmul and the LoRA as one ``linear_lora`` op.

        On a mesh too: the placement runs it per shard (see ``LayerSharding.fuses_base``).
        """
        return self.formulation(x) == "fused" and self.weight_layout is not None  # no int8 base on a mesh

    def formulation(self, x: torch.Tensor) -> str:
        """How this call runs: "fused" (``linear_lora``), "separate" (the base layer, then the fused LoRA
        op with the layer's backend) or "xla" (the same with the XLA-native backend).

        ``base_fusion=True``: fused wherever the layer can run it (a plain weight layout, one dtype, or an
        int8 per-channel symmetric quantized base: :func:`int8_channel_scale`); False: separate. "auto":
        separate off TPU; on a TPU with ``backend="auto"``, the cheapest of the three by the TPU cost model
        for this layer's shape, role and token count (:func:`torch_xla_lora.formulation.choose`; a layer that
        reads a rank-true pool priced as it reads it, int8 rows included), recorded in :attr:`formulations` (a
        training call's in :attr:`training_formulations`); with another backend, fused. A training call (one that
        keeps ``s``) of an arranged decoder's projection is priced with what it takes in as it runs: down_proj's
        SiLU(gate) * up, and the norm of q/k/v and gate/up, which train as groups taking it into their kernels
        (:mod:`.shared_input`; without it where x needs no gradient: no group then, the norm computed outside), and
        by its backward too (``formulation.choose(training=True)``).
        """
        fusion = self.base_fusion
        int8 = int8_channel_scale(self.base_layer) is not None
        if fusion is False or (self.weight_layout is None and not int8):
            return "separate"
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        dtype = self.adapter_dtype
        if x.dtype != dtype or (weight.dtype != dtype and not int8) or (bias is not None and bias.dtype != dtype):
            return "separate"
        if fusion is True:
            return "fused"
        if x.device.type != "xla":
            return "separate"
        from torch_xla_lora import formulation, ops

        generation = ops.device_generation()
        if generation == "cpu":
            return "separate"
        if self.backend != "auto":
            return "fused"
        x2 = x.reshape(-1, self.in_features)
        role = self.fusion_role
        # A pooled call over a float base reads its pools with gradients recorded too, its producer declined then.
        pooled = self._reads_pool(x2, self.backend, differentiable=not int8)
        declines = pooled and not self._reads_pool(x2, self.backend)
        training = not pooled and _keeps_s(x2, self.factors_need_grad(), self.backend, fused_base=True)
        if role.prologue and (declines or (training and role.prologue == "norm" and not x.requires_grad)):
            # A call that takes no producer in (a training call alone, outside a group): priced as it runs.
            role = dataclasses.replace(role, prologue="")
        num_tokens = x2.shape[0]
        pool = (self.lora_a_pool.dtype == torch.int8, self.pool_rows) if pooled else None
        choice = formulation.choose(
            generation,
            num_tokens,
            self.in_features,
            self.out_features,
            self.max_rank,
            self.max_loras,
            bias is not None,
            role,
            int8_weight=int8,
            pool=pool,
            training=training,
        )
        (self.training_formulations if training else self.formulations)[num_tokens] = choice
        return choice

    def lora_backend(self, formulation: str) -> str:
        """The shrink-expand op's backend for a ``formulation`` other than "fused"."""
        return "xla" if formulation == "xla" else self.backend

    def linear_metadata_shape(self) -> tuple[int, int, bool] | None:
        """(in, out, has_bias) if this layer will run ``linear_lora``'s Pallas kernel (for host metadata), else None.

        Read at ``set_batch``: base fusion on, a plain layout, the weight and bias in
        the adapters' dtype (the inputs' dtype is only known at the forward), the
        Pallas backend.
        """
        from torch_xla_lora import ops

        if self.weight_layout is None:  # e.g. a quantized base: no linear_lora kernel
            return None
        weight, bias = self.base_layer.weight, self.base_layer.bias
        dtype, generation = self.adapter_dtype, ops.device_generation()
        if self.base_fusion is False or (self.base_fusion == "auto" and generation == "cpu"):
            return None
        if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
            return None
        if self.backend == "xla" or (self.backend == "auto" and generation == "cpu"):
            return None
        return self.in_features, self.out_features, bias is not None

    def forward_fused_with(
        self,
        x: torch.Tensor,
        *,
        up: torch.Tensor | None = None,
        row_scale: torch.Tensor | None = None,
        col_scale: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """This layer on x's producer, with a residual added, as one ``linear_lora_fused`` op; None where it
        would not run the fused formulation (the caller then computes the producer and the add itself).

        ``x`` [..., in] is the gate when ``up`` is given (the layer's input is ``SiLU(x) * up``); ``row_scale``
        [...] float32 and ``col_scale`` [in] scale x as RMSNorm does; ``residual`` [..., out] is added to the
        output. Used by :mod:`torch_xla_lora.layers.fusion` for Llama-family decoder layers: off a mesh,
        when this call's :meth:`formulation` is "fused" and no trainable adapter's dropout changes the
        LoRA's input. A training forward that keeps ``s`` (:func:`_keeps_s`) runs ``linear_lora_fused_train``
        (its backward takes that ``s``) and takes in the residual and SiLU(gate) * up, whose x the kernel writes
        beside its output for the backward's dA (``fused_base.keeps_x``). A norm's factors are declined in
        training here: the arranged decoder's q/k/v and gate/up train as groups (:mod:`.shared_input`, which takes
        the norm into its members' kernels), one pass over x for their dA; where they cannot, the caller computes
        the norm.
        """
        if self.tensor_parallel is not None:
            return None
        slots = self.context.token_slots(x)
        if slots is None or self.formulation(x) != "fused":
            return None
        if self.training and any(m.dropout > 0 for m in self.trainable.values()):
            return None
        if col_scale is not None and col_scale.dtype != x.dtype:
            return None
        x2 = x.reshape(-1, self.in_features)
        weight_scale = int8_channel_scale(self.base_layer)

        def rows(t: torch.Tensor | None, width: int | None) -> torch.Tensor | None:
            return None if t is None else t.reshape(-1) if width is None else t.reshape(-1, width)

        metadata, own = self._linear_metadata(x2)
        fusion = {
            "up": rows(up, self.in_features),
            "row_scale": rows(row_scale, None),
            "col_scale": col_scale,
            "residual": rows(residual, self.out_features),
        }
        # A pooled layer (no trainable adapters: no s to keep) with autograd recording nothing takes in anything;
        # with gradients recorded the pooled op's backward is the plain layer's (a float base, the residual alone):
        # a producer is declined then, and the caller's plain call reads the pools.
        pooled = self._reads_pool(x2, self.backend, *fusion.values())
        if not pooled and weight_scale is None and self._reads_pool(x2, self.backend, differentiable=True):
            if any(fusion[name] is not None for name in ("up", "row_scale", "col_scale")):
                return None
            pooled = True
        if pooled:
            out = self._pooled_linear(x2, slots, metadata, own, weight_scale, **fusion)
            return out.reshape(*x.shape[:-1], self.out_features)
        keep_s = _keeps_s(x2, self.factors_need_grad(), self.backend, fused_base=True)
        if keep_s and any(t is not None for t in (row_scale, col_scale)):
            return None  # training: the norm is computed outside (see above)
        lora_a, lora_b = self.slot_factors()
        out = self._fused_linear(x2, slots, lora_a, lora_b, keep_s, metadata, own, weight_scale, **fusion)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _fused_linear(
        self,
        x2: torch.Tensor,
        slots: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        keep_s: bool,
        metadata: torch.Tensor | None,
        own: bool,
        weight_scale: torch.Tensor | None,
        **fusion: torch.Tensor | None,
    ) -> torch.Tensor:
        """``linear_lora_fused`` on x2 [N, in] and the slot weights; with ``keep_s`` (a training forward:
        :func:`_keeps_s`) its training forward, ``linear_lora_fused_train``, whose backward takes ``s`` instead
        of recomputing it."""
        from torch_xla_lora.ops import _linear_fused

        bias = None if weight_scale is not None else getattr(self.base_layer, "bias", None)
        layout = self.weight_layout or "out_in"
        args = (x2, self.base_layer.weight, bias, lora_a, lora_b, slots, 1.0, layout, self.backend)
        kwargs = {"metadata": metadata, "own_metadata": own, "weight_scale": weight_scale, **fusion}
        if keep_s:
            out, _ = _linear_fused.linear_lora_fused(*args, **kwargs, keep_s=True)
            return out
        return _linear_fused.linear_lora_fused(*args, **kwargs)

    def _linear_metadata(self, x2: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """(the batch's host metadata for ``linear_lora`` on x2 [N, in], whether it was built for the one-pass
        kernel's own plan (see ``ops.batch_metadata``) rather than the shrink-expand op's)."""
        shape = (x2.shape[0], self.in_features, self.out_features)
        metadata = self.context.metadata.get((*shape, "linear", getattr(self.base_layer, "bias", None) is not None))
        if metadata is not None:
            return metadata, True
        return self.context.metadata.get(shape), False

    def _pooled_linear(
        self,
        x2: torch.Tensor,
        slots: torch.Tensor,
        metadata: torch.Tensor | None,
        own: bool,
        weight_scale: torch.Tensor | None,
        **fusion: torch.Tensor | None,
    ) -> torch.Tensor:
        """``linear_lora_pooled`` on x2 [N, in]: the base and each token's adapter read straight from this layer's
        pools at its true rank (``context.rows`` and the host-built ``context.pages``; an int8 pool's row scales
        from ``lora_page_scale``), what :meth:`BaseLayerWithLoRA._pooled_lora` does for the separate LoRA op."""
        from torch_xla_lora.ops._linear_fused import linear_lora_pooled

        a_scale, b_scale = (getattr(self, f"{name}_scale", None) for name in ("lora_a", "lora_b"))
        rows, pages = self._pool_tables()  # each lane at its adapter's rank in this module
        return linear_lora_pooled(
            x2,
            self.base_layer.weight,
            None if weight_scale is not None else getattr(self.base_layer, "bias", None),
            self.lora_a_pool[0],
            self.lora_b_pool[0],
            slots,
            rows,
            None if a_scale is None else a_scale[0],
            None if b_scale is None else b_scale[0],
            1.0,
            self.weight_layout or "out_in",
            self.backend,
            metadata=metadata,
            own_metadata=own,
            pages=pages,
            page_scales=getattr(self, "lora_page_scale", None),
            weight_scale=weight_scale,
            **fusion,
        )

    def _forward_base_fused(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # x [N, in] -> y [N, out] = x W^T + bias + B[slot] A[slot] x, in one op; W in its own layout.
        x2 = x.reshape(-1, self.in_features)
        metadata, own = self._linear_metadata(x2)
        weight_scale = int8_channel_scale(self.base_layer)
        # A pooled layer: the kernel reads the pools, no slots gathered (with gradients recorded, over a float base).
        if self._reads_pool(x2, self.backend, differentiable=weight_scale is None):
            out = self._pooled_linear(x2, slots, metadata, own, weight_scale)
            return out.reshape(*x.shape[:-1], self.out_features)
        lora_a, lora_b = self.slot_factors()
        keep_s = _keeps_s(x2, lora_a.requires_grad and lora_b.requires_grad, self.backend, fused_base=True)
        if weight_scale is not None:  # an int8 base: read as int8 by the one-pass kernel, the scales in its write
            out = self._fused_linear(x2, slots, lora_a, lora_b, keep_s, metadata, own, weight_scale)
            return out.reshape(*x.shape[:-1], self.out_features)
        operands = (x2, self.base_layer.weight, self.base_layer.bias, lora_a, lora_b, slots, 1.0, self.weight_layout)
        if keep_s:  # training: s kept for the backward
            out, _ = torch.ops.xla_lora.linear_lora_train(*operands, self.backend, metadata, own)
        else:
            out = torch.ops.xla_lora.linear_lora(*operands, self.backend, metadata, own)
        return out.reshape(*x.shape[:-1], self.out_features)


class ColumnParallelLinearWithLoRA(LinearWithLoRA):
    """Column-parallel linear (q, k, v, gate, up): B sharded on output features like the base, A replicated."""


class RowParallelLinearWithLoRA(LinearWithLoRA):
    """Row-parallel linear (o, down): A sharded on input features like the base, B replicated."""


class LogitsWithLoRA(LinearWithLoRA):
    """The output head (lm_head). A tied embedding stays tied: the base weight is wrapped, never copied."""
