"""What the TPU compile check compiles: chips, layer shapes of real models, kernel entries, sampling.

Plain data and Python (no JAX): the test imports it to name its cases, the
worker (``tpu_compile_worker``) builds and compiles them.

To check one more kernel, add a :class:`KernelEntry` to :data:`KERNELS` and a
builder of the same name in ``tpu_compile_worker.BUILDERS``.

Mixture-of-experts layers (:data:`MOE_MODELS`, :func:`moe_grid`) are compiled whole
(kernel ``"moe"``: ``bench.moe_layer``'s expert layer, base grouped matmuls and expert LoRA),
apart from the kernel sample.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

# Chip -> deviceless topology name known to libtpu 0.0.21 and 0.0.23.
CHIPS = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v4": "v4:2x2x1", "v5p": "v5p:2x2x1"}

# (model, projection, in_features, out_features) from the models' published configs.
# Qwen2-0.5B and SmolLM-135M bring widths that are not powers of two (896 = 7*128,
# 4864 = 19*256) and not multiples of 128 at all (576, 192).
LAYERS = (
    ("llama3-8b", "q_proj", 4096, 4096),
    ("llama3-8b", "k_proj", 4096, 1024),
    ("llama3-8b", "gate_proj", 4096, 14336),
    ("llama3-8b", "down_proj", 14336, 4096),
    ("llama3-8b", "qkv_fused", 4096, 6144),
    ("llama3-8b", "lm_head", 4096, 128256),
    ("llama3-70b", "q_proj", 8192, 8192),
    ("llama3-70b", "k_proj", 8192, 1024),
    ("llama3-70b", "gate_up_fused", 8192, 57344),
    ("llama3-70b", "down_proj", 28672, 8192),
    ("qwen2-0.5b", "q_proj", 896, 896),
    ("qwen2-0.5b", "k_proj", 896, 128),
    ("qwen2-0.5b", "gate_proj", 896, 4864),
    ("qwen2-0.5b", "down_proj", 4864, 896),
    ("qwen2-7b", "k_proj", 3584, 512),
    ("qwen2-7b", "down_proj", 18944, 3584),
    ("mistral-7b", "o_proj", 4096, 4096),
    ("mistral-7b", "up_proj", 4096, 14336),
    ("gemma-7b", "q_proj", 3072, 4096),
    ("gemma-7b", "down_proj", 24576, 3072),
    ("gemma-2b", "k_proj", 2048, 256),
    ("smollm-135m", "q_proj", 576, 576),
    ("smollm-135m", "k_proj", 576, 192),
    ("smollm-135m", "down_proj", 1536, 576),
)

DTYPES = ("bfloat16", "float32")
# Decode (1, 8, 16 tokens) and prefill (a ragged 100, 512, 2048) token counts.
TOKENS = (1, 8, 16, 100, 512, 2048)
SLOTS = (1, 4, 16, 64)
RANKS = (8, 16, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    """One kernel the check compiles: its name (a builder in the worker) and the variants of its call."""

    name: str
    variants: tuple[str, ...]
    description: str


KERNELS = (
    KernelEntry(
        "fused",
        ("device_metadata", "host_metadata"),
        "bgmv_shrink_expand: shrink_expand_fn('pallas', chip, ...), lane metadata built in-graph or on the host",
    ),
    KernelEntry("shrink", ("plain",), "bgmv_shrink: shrink_fn('pallas', chip, ...)"),
    KernelEntry(
        "expand",
        ("add", "no_add", "slice"),
        "bgmv_expand(_slice): expand_fn('pallas', chip, add_inputs, slice_offset); 'slice' writes the "
        "second half of a [T, 2 * out] base",
    ),
    KernelEntry(
        "linear",
        ("out_in_host_metadata", "in_out_bias"),
        "linear_lora: linear_lora_fn('pallas', chip, ...), nn.Linear's weight layout with host metadata, "
        "or Conv1D's with a bias",
    ),
    KernelEntry(
        "weight_grad",
        ("lora_a", "lora_b", "g_pass"),
        "bgmv_weight_grad (the backward's dA, dB): weight_grad_fn(L, scaling, 'pallas', chip); 'lora_a' takes "
        "[T, R] x [T, in], 'lora_b' [T, R] x [T, out]; 'g_pass': the fused backward's ds and dB in one pass "
        "over g [T, out] (ops/_lora_grads_jax.g_pass, kernels.weight_grad.shrink_weight_grad)",
    ),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """One compilation: a kernel call as the op wrapper makes it, for one chip."""

    chip: str
    kernel: str
    variant: str
    dtype: str
    tokens: int
    slots: int
    rank: int
    model: str
    layer: str
    in_features: int
    out_features: int

    @property
    def name(self) -> str:
        return (
            f"{self.chip}-{self.kernel}-{self.variant}-{self.dtype}-T{self.tokens}-L{self.slots}-R{self.rank}"
            f"-{self.model}.{self.layer}"
        )


def _entry(name: str) -> KernelEntry:
    return next(entry for entry in KERNELS if entry.name == name)


def sample(per_cell: int = 6, chips=tuple(CHIPS), kernels=None) -> list[Config]:
    """A deterministic sample: ``per_cell`` configurations for every (chip, kernel) cell.

    Configuration j of a cell takes value ``(j + offset) % len(axis)`` of each axis
    (token counts, ranks, slot counts, dtypes, variants), with a different offset per
    axis and cell, so with ``per_cell`` >= the longest of these axes (6) every cell
    covers every value of each of them. Layer shapes advance by one per
    configuration across the cells of a kernel, so each kernel meets every shape
    once its cells hold ``len(LAYERS)`` configurations (4 chips x 6 >= 24).
    """
    kernels = [_entry(name) for name in (kernels or [entry.name for entry in KERNELS])]
    configs = []
    for k, entry in enumerate(kernels):
        for c, chip in enumerate(chips):
            for j in range(per_cell):
                model, layer, d_in, d_out = LAYERS[(c * per_cell + j + 7 * k) % len(LAYERS)]
                configs.append(
                    Config(
                        chip=chip,
                        kernel=entry.name,
                        variant=entry.variants[(j + c) % len(entry.variants)],
                        dtype=DTYPES[(j + c + k) % len(DTYPES)],
                        tokens=TOKENS[j % len(TOKENS)],
                        slots=SLOTS[(j + 3 * c + k) % len(SLOTS)],
                        rank=RANKS[(j + 2 * c + k) % len(RANKS)],
                        model=model,
                        layer=layer,
                        in_features=d_in,
                        out_features=d_out,
                    )
                )
    return configs


def full(chips=tuple(CHIPS), kernels=None) -> Iterator[Config]:
    """Every combination of every axis (230,400 configurations with the axes above: filter it)."""
    for entry in (_entry(name) for name in (kernels or [e.name for e in KERNELS])):
        for chip, variant, dtype, tokens, slots, rank, layer in itertools.product(
            chips, entry.variants, DTYPES, TOKENS, SLOTS, RANKS, LAYERS
        ):
            yield Config(chip, entry.name, variant, dtype, tokens, slots, rank, *layer)


# The pooled kernel (``pooled_shrink_expand``, rank-true storage) is compiled apart from the sample: decode
# batches whose distinct adapters have mixed true ranks read from pools at ``max_rank`` R and ``max_loras`` L.
POOLED_VARIANTS = ("bfloat16", "int8")  # the pools' dtype (the compute dtype is bfloat16)
POOLED_RANKS = (8, 16, 64)  # true ranks of a batch's distinct adapters, in turn
POOLED_POOL_ROWS = 4096  # data rows of the compiled pools (4 to 117 MB a pool at Llama-3-8B widths)


def pooled_ranks(distinct: int, max_rank: int) -> tuple[int, ...]:
    """True ranks of a batch's ``distinct`` adapters: :data:`POOLED_RANKS` in turn, at most ``max_rank``."""
    return tuple(min(POOLED_RANKS[i % len(POOLED_RANKS)], max_rank) for i in range(distinct))


def pooled_config(chip: str, variant: str, tokens: int, slots: int, rank: int, model: str, layer: str) -> Config:
    """One pooled-kernel compilation: ``tokens`` decode tokens on min(tokens, slots) distinct adapters
    (:func:`pooled_ranks`), pools of ``variant`` rows, ``slots`` lanes of ``rank`` table entries."""
    (d_in, d_out) = next((i, o) for m, proj, i, o in LAYERS if (m, proj) == (model, layer))
    return Config(chip, "pooled", variant, "bfloat16", tokens, slots, rank, model, layer, d_in, d_out)


def pooled_expand_configs() -> list[Config]:
    """The token embedding's B read from its pool (``pooled_expand``) at Llama-3-8B's hidden size, 16 lanes of
    max_rank 64: a v6e decode (16 tokens: XLA ops over the packed true-rank rows) and prefill (256 tokens: the
    pooled kernel's expand), each beside what the embedding ran before on it (variant "gathered": every lane's rows
    gathered, the slot expand kernel), and a v5e prefill of an int8 pool (the pooled kernel's expand)."""
    shape = ("llama3-8b", "embed_tokens", 64, 4096)
    return [
        Config("v6e", "pooled_expand", variant, "bfloat16", tokens, 16, 64, *shape)
        for tokens in (16, 256)
        for variant in ("float", "gathered")
    ] + [Config("v5e", "pooled_expand", "int8", "bfloat16", 256, 16, 64, *shape)]


def pooled_experts_configs() -> list[Config]:
    """An experts layer's pools read through its (lane, expert) entry tables as the layer calls
    ``pooled_shrink_expand`` (``ExpertsWithLoRA._entry_tables``): Qwen3-30B-A3B's gate_up_proj on a v6e, 16 lanes x
    128 experts = 2,048 entries (a 72 KiB page table), 16 decode tokens x top-8 = 128 routed rows, the
    ``[E, P + 2, width]`` pools stacked and read in place; bfloat16 and int8 pools (128 x 4,104 rows, an int8 layer's
    kept page scales)."""
    shape = ("qwen3-30b-a3b", "experts.gate_up_proj", 2048, 1536)
    return [
        Config("v6e", "pooled_experts", variant, "bfloat16", 128, 2048, 64, *shape) for variant in ("bfloat16", "int8")
    ]


@dataclasses.dataclass(frozen=True)
class MoeShape:
    """One MoE model's routed expert layer, from its published config (transformers' experts module layout)."""

    hidden: int  # hidden_size
    intermediate: int  # the routed experts' intermediate size (moe_intermediate_size where the config has one)
    experts: int  # routed experts
    top_k: int  # experts per token
    transposed: bool = False  # weights [E, in, out] (GPT-OSS) instead of [E, out, in]
    bias: bool = False  # per-expert biases on both projections (GPT-OSS)
    gate: str = "silu"  # "silu": SiLU(gate) * up over the concatenated [gate; up]; "gpt_oss": interleaved, clamped


# Mixtral-8x7B: hidden_size 4096, intermediate_size 14336, num_local_experts 8, num_experts_per_tok 2.
# Qwen3-30B-A3B: hidden_size 2048, moe_intermediate_size 768, num_experts 128, num_experts_per_tok 8.
# gpt-oss-20b: hidden_size 2880, intermediate_size 2880, num_local_experts 32, num_experts_per_tok 4 (biases,
# SwiGLU clamped at 7 with alpha 1.702, [E, in, out] weights).
# DeepSeek-V2-Lite: hidden_size 2048, moe_intermediate_size 1408, n_routed_experts 64, num_experts_per_tok 6
# (its 2 shared experts are a dense MLP beside the routed layer, not part of it).
MOE_MODELS = {
    "mixtral-8x7b": MoeShape(4096, 14336, 8, 2),
    "qwen3-30b-a3b": MoeShape(2048, 768, 128, 8),
    "gpt-oss-20b": MoeShape(2880, 2880, 32, 4, transposed=True, bias=True, gate="gpt_oss"),
    "deepseek-v2-lite": MoeShape(2048, 1408, 64, 6),
}
MOE_CHIPS = ("v5e", "v6e")
MOE_ROWS = (1024, 8192)  # routed rows (tokens x top-k) of the compile table
MOE_VARIANTS = ("base", "lora")  # the grouped base path alone, and with every row's expert LoRA
MOE_SLOTS, MOE_RANK = 8, 16


def moe_tokens(model: str, rows: int) -> int:
    """Tokens whose top-k routing gives ``rows`` routed rows (rounded up: DeepSeek's top-6 gives 1,026 for 1,024)."""
    return -(-rows // MOE_MODELS[model].top_k)


def moe_config(chip: str, model: str, rows: int, variant: str) -> Config:
    """The compile configuration of one expert layer: ``tokens`` is the routed rows' token count."""
    shape = MOE_MODELS[model]
    return Config(
        chip=chip,
        kernel="moe",
        variant=variant,
        dtype="bfloat16",
        tokens=moe_tokens(model, rows),
        slots=MOE_SLOTS,
        rank=MOE_RANK,
        model=model,
        layer="experts",
        in_features=shape.hidden,
        out_features=shape.intermediate,
    )


def moe_grid(chips=MOE_CHIPS, models=tuple(MOE_MODELS), rows=MOE_ROWS, variants=MOE_VARIANTS) -> list[Config]:
    """Every (chip, model, routed rows, variant) expert layer (32 with the defaults)."""
    return [moe_config(*combo) for combo in itertools.product(chips, models, rows, variants)]


# The expert LoRA of gpt-oss-20b's routed layer as the fused shrink-expand kernel runs it: widths that are not
# multiples of 128 (hidden and expert width 2880; gate_up 5760), so the expert layer stores its slots lane-padded
# (2944 columns) and the kernel reads the padded rows. Compiled apart from the sample (kernel "fused", variant
# "lane_padded"): 1,024 routed rows, L * E = 8 * 32 entries, rank 16, bf16, host metadata.
EXPERT_LORA_LAYERS = (("gpt-oss-20b", "experts_up", 2880, 5760), ("gpt-oss-20b", "experts_down", 2880, 2880))


def expert_lora_config(chip: str, layer: str, rows: int = 1024) -> Config:
    """One compilation of the fused kernel over an expert layer's lane-padded slots (:data:`EXPERT_LORA_LAYERS`)."""
    model, _, d_in, d_out = next(entry for entry in EXPERT_LORA_LAYERS if entry[1] == layer)
    slots = MOE_SLOTS * MOE_MODELS[model].experts
    return Config(chip, "fused", "lane_padded", "bfloat16", rows, slots, MOE_RANK, model, layer, d_in, d_out)


def expert_lora_grid(chips=MOE_CHIPS) -> list[Config]:
    """Both gpt-oss-20b expert projections on each chip (4 compilations with the defaults)."""
    return [expert_lora_config(chip, layer) for chip in chips for _, layer, _, _ in EXPERT_LORA_LAYERS]


def lane_padded(cfg: Config) -> bool:
    """Whether the configuration's adapter buffers are lane-padded (an expert layer's slots where the fused kernel
    may run); the sample's layers keep their own widths, as linear layers do."""
    return cfg.variant == "lane_padded"


# linear_lora with what layers/fusion.py has its kernel take in (kernels.fused_base.Fusion), compiled apart from
# the sample: a Llama MLP's down projection ("mlp_down": SiLU(gate) * up read from two x tiles, the residual added
# in the output write) and its gate/up projections ("norm": RMSNorm's row and column factors on the x read);
# "int8": a per-channel symmetric int8 base read as int8, its scales applied in the output write; "int8_dx": that
# base's backward pass for dx (the output gradient through the int8 weight read transposed, its scales per input
# channel, dequantised in VMEM).
LINEAR_FUSED_VARIANTS = ("mlp_down", "norm", "int8", "int8_dx")


def linear_fused_config(chip: str, variant: str, tokens: int, slots: int, model: str, layer: str) -> Config:
    """One compilation of ``linear_lora_fused`` as the decoder arrangement calls it (bf16, rank 16, host metadata
    of the plain kernel's plan), or as the int8 base's backward calls it ("int8_dx": no host metadata)."""
    (d_in, d_out) = next((i, o) for m, proj, i, o in LAYERS if (m, proj) == (model, layer))
    return Config(chip, "linear_fused", variant, "bfloat16", tokens, slots, 16, model, layer, d_in, d_out)


#: Llama-3-8B's projections, (in, out), as the TPU training model prices them (``tpu_model.LLAMA3_8B_LAYER``).
LLAMA3_8B_PROJECTIONS = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "v_proj": (4096, 1024),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 14336),
    "up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
#: The training kernel's variant (``tpu_compile_worker.LINEAR_TRAIN_FUSIONS``) of each projection in the decoder
#: arranged as the layers train it (``tpu_train_model.TRAINING_KERNEL_FUSION``): q/k/v and gate/up apply their
#: RMSNorm to x as they read it (keeping the normed x), o_proj adds the residual, down_proj reads SiLU(gate) * up
#: and adds the residual (keeping x).
TRAINING_VARIANTS = {
    "q_proj": "keep_s_norm",
    "k_proj": "keep_s_norm",
    "v_proj": "keep_s_norm",
    "o_proj": "keep_s_residual",
    "gate_proj": "keep_s_norm",
    "up_proj": "keep_s_norm",
    "down_proj": "keep_s_mlp_down",
}


def linear_train_configs(
    chips: tuple[str, ...] = ("v5e", "v6e"), tokens: int = 8192, slots: int = 8, rank: int = 64
) -> list[Config]:
    """The training step's kernels at the TPU training model's shape (``python -m torch_xla_lora.bench train
    --model``: T = 8192, 8 slots of ``max_rank`` 64): per chip and distinct Llama-3-8B projection (v_proj is
    k_proj's shape, up_proj gate_proj's), the forward's kernel keeping s (and down_proj's x) and the backward's one
    pass over g ("backward": ``in_features`` g's width, ``out_features`` dx's)."""
    distinct = {"q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"}
    configs = []
    for chip in chips:
        for name, (d_in, d_out) in LLAMA3_8B_PROJECTIONS.items():
            if name not in distinct:
                continue
            forward = TRAINING_VARIANTS.get(name, "keep_s")
            configs.append(
                Config(chip, "linear_train", forward, "bfloat16", tokens, slots, rank, "llama3-8b", name, d_in, d_out)
            )
            configs.append(
                Config(
                    chip, "linear_train", "backward", "bfloat16", tokens, slots, rank, "llama3-8b", name, d_out, d_in
                )
            )
    return configs
