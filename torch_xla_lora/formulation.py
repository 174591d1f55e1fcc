"""How a linear LoRA layer runs on a TPU under ``LoRAConfig(base_fusion="auto")``: chosen per layer and
token count by the TPU cost model.

Three formulations compute the same thing:

- ``"fused"``: ``linear_lora``'s kernel, the base matmul and the LoRA in one pass over x and the output;
- ``"separate"``: XLA's matmul, then the fused LoRA kernel (``bgmv_shrink_expand``, Pallas);
- ``"xla"``: XLA's matmul, then ``bgmv_shrink_expand`` with the XLA-native backend.

A Pallas call is opaque to XLA: what XLA would fuse into its own dot (the producer of x, a norm's
scale or SiLU(gate) * up, into the operand read; the residual add into the output write) becomes
passes of their own. Which formulation is cheapest therefore depends on the layer's place in the
model as well as its shape: the model (``bench/tpu_model.py: projection_costs``) prices each for a
typical batch (``min(L, T, 8)`` requests of equal length, each on its own adapter) with the layer's
:class:`FusionRole`, and the cheapest wins. The choice is a function of static shapes, so it is made
once per traced graph and never causes a recompilation (under ``torch.compile`` dynamo takes it as a
constant); ``LoRAModel.warmup(progress=True)`` prints it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

#: The formulations, in the order ties are broken (the cost model's ``tpu_model.FORMULATIONS``, by these names).
FORMULATIONS = ("fused", "separate", "xla")
# Adapters in use in the typical batch the choice is priced on.
TYPICAL_IN_USE = 8


@dataclasses.dataclass(frozen=True)
class FusionRole:
    """A linear layer's place in its model, as the cost model needs it.

    Attributes:
      residual_output: the output is added to the residual stream (o_proj, down_proj): a Pallas
        call makes that add a pass of its own.
      input_share: the share of writing x that falls to this layer when it runs a Pallas call (1/n
        for n layers reading the output of one fusable producer, e.g. q/k/v after a norm; 0 where x
        is materialised anyway, e.g. attention's output into o_proj).
      prologue, residual_in_kernel: what the fused formulation's kernel takes in instead of paying
        those passes (``tpu_model.projection_costs``).
    """

    residual_output: bool = False
    input_share: float = 1.0
    # What the fused kernel takes in of x's producer ("", "silu_mul", "norm") and whether it adds the
    # residual in its write: set by ``layers/fusion.py`` on the projections of the decoders it arranges
    # (q/k/v, o, gate/up, down).
    # An arrangement of the layer, not its place in the model: left out of equality.
    prologue: str = dataclasses.field(default="", compare=False)
    residual_in_kernel: bool = dataclasses.field(default=False, compare=False)


def choose(
    generation: str,
    num_tokens: int,
    in_features: int,
    out_features: int,
    rank: int,
    num_slots: int,
    has_bias: bool,
    role: FusionRole,
    int8_weight: bool = False,
    pool: tuple[bool, int] | None = None,
    training: bool = False,
) -> str:
    """The cheapest formulation (one of :data:`FORMULATIONS`) of one linear layer on TPU ``generation``.

    Priced in bfloat16 by ``bench/tpu_model.projection_costs`` on a typical batch of
    ``min(num_slots, num_tokens, 8)`` equal requests; ``int8_weight``: the base is int8 per channel
    (its weight read at one byte an element by the base matmul and by the fused kernel). ``pool``: (int8, data
    rows) of the rank-true pool the layer reads its adapters from (``memory_budget``), priced as each formulation
    reads it (``tpu_model.PoolSpec``), every adapter at ``rank`` (the true ranks are the batch's, and a choice
    that followed them would compile a graph per rank mix); None: padded slots. ``training``: a training call
    (trainable slots, ``s`` kept for the backward; padded slots only), priced by its forward and its backward
    (``bench/tpu_train_model.projection_train_costs``: the forward as training runs it, then dx, ds and dB, which
    ``linear_lora``'s backward takes in its one pass over g and the other formulations in two), since a
    formulation dearer to run forward may be cheaper to train (the bench Llama's down_proj at T = 8192 on v6e).
    """
    if training and pool is not None:
        raise ValueError("a training call reads padded slots: trainable adapters hold no pool rows")
    args = (generation, num_tokens, in_features, out_features, rank, num_slots, has_bias)
    role_args = (role.residual_output, role.input_share, role.prologue, role.residual_in_kernel)
    pool_args = (None, 0) if pool is None else (bool(pool[0]), int(pool[1]))
    return _constant_choice(*args, *role_args, int8_weight, *pool_args, training)


@torch.compiler.assume_constant_result  # under torch.compile: a constant, the cost model is never traced
def _constant_choice(*args) -> str:
    return _cheapest(*args)


@functools.lru_cache(maxsize=4096)
def _cheapest(
    generation: str,
    num_tokens: int,
    in_features: int,
    out_features: int,
    rank: int,
    num_slots: int,
    has_bias: bool,
    residual_output: bool,
    input_share: float,
    prologue: str = "",
    residual_in_kernel: bool = False,
    int8_weight: bool = False,
    pool_int8: bool | None = None,
    pool_rows: int = 0,
    training: bool = False,
) -> str:
    from torch_xla_lora.bench import tpu_model

    chip = tpu_model.CHIPS.get(generation, tpu_model.CHIPS["v6e"])  # newer chips tune as v6e
    in_use = min(num_slots, num_tokens, TYPICAL_IN_USE)
    indices = tpu_model.contiguous_requests(num_tokens, num_slots, in_use)
    if training:
        from torch_xla_lora.bench import tpu_train_model

        costs = tpu_train_model.projection_train_costs(
            chip, indices, in_features, out_features, rank, num_slots, residual_output, input_share,
            prologue=prologue, residual_in_kernel=residual_in_kernel, int8_weight=int8_weight,
        )  # fmt: skip
        return FORMULATIONS[tpu_model.FORMULATIONS.index(costs["forward_choice"])]
    pool = None if pool_int8 is None else tpu_model.PoolSpec((rank,) * num_slots, pool_int8, pool_rows)
    costs = tpu_model.projection_costs(
        chip,
        indices,
        in_features,
        out_features,
        rank,
        num_slots,
        residual_output,
        input_share,
        has_bias,
        prologue,
        residual_in_kernel,
        int8_weight,
        pool=pool,
    )
    return FORMULATIONS[tpu_model.FORMULATIONS.index(tpu_model.cheapest(costs))]


def assign_roles(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Set ``fusion_role`` on every linear LoRA layer of ``model`` from its kind and its siblings.

    Row-parallel layers (o_proj, down_proj, ...) add to the residual stream; under an attention
    module their input is attention's output (already in memory), elsewhere (an MLP) a fusable
    SiLU(gate) * up. Column-parallel layers share their input with the column-parallel siblings of
    the same module and width (q, k, v after a norm: 1/3 each). Other linear layers (the head) read
    a norm's output alone.
    """
    from torch_xla_lora.layers.linear import ColumnParallelLinearWithLoRA, LinearWithLoRA, RowParallelLinearWithLoRA

    for name, layer in layers.items():
        if not isinstance(layer, LinearWithLoRA):
            continue
        parent_name = name.rpartition(".")[0]
        if isinstance(layer, RowParallelLinearWithLoRA):
            parent = model.get_submodule(parent_name)
            attention = "attention" in type(parent).__name__.lower() or "attn" in parent_name.rpartition(".")[2]
            layer.fusion_role = FusionRole(residual_output=True, input_share=0.0 if attention else 1.0)
        elif isinstance(layer, ColumnParallelLinearWithLoRA):
            siblings = [
                other
                for other_name, other in layers.items()
                if isinstance(other, ColumnParallelLinearWithLoRA)
                and other_name.rpartition(".")[0] == parent_name
                and other.in_features == layer.in_features
            ]
            layer.fusion_role = FusionRole(input_share=1.0 / len(siblings))
