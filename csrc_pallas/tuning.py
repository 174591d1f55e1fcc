"""Block-size tuning table and per-generation hardware facts (data only).

Keyed by generation ("v4", "v5e", "v5p", "v6e", "cpu"). Each token-block entry
lists rules tried in order: the token block for a token-count bucket; the
hidden/output tile maxima keep the double-buffered blocks within the VMEM
budget of the generation.

The token block is the dominant knob: per visit the kernel multiplies a whole
token block, so a block much larger than a request wastes MXU work, and a
block much smaller multiplies grid steps (each costs about 0.35 us on TPU).

Hardware facts, per TensorCore (the unit a Pallas kernel runs on):

- MXU width. 128x128 systolic arrays on v4, v5e and v5p, 256x256 on v6e
  (Trillium). Sources: the Cloud TPU system-architecture pages (v5e, v5p: four
  MXUs per TensorCore; v6e: 256x256 MXUs) and "How to Scale Your Model", part
  "How to think about TPUs" (jax-ml.github.io/scaling-book/tpus: one
  bf16[8,128] @ bf16[128,128] pass every 8 cycles on most generations).
- VMEM capacity, as libtpu's own compiler enforces it (a kernel whose scratch
  exceeds it fails with "Allocation ... would exceed memory (size=N)"):
  v4 16 MiB, v5e 128 MiB, v5p 64 MiB, v6e 128 MiB. ``python -m
  torch_xla_lora.bench vmem`` probes it without a TPU, with the pinned libtpu,
  and checks this table and the declared limits below against it. The scaling
  book quotes 128 MiB for v5e.
"""

MIB = 1024 * 1024

# Generations the table knows, oldest first.
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")

# Token-block candidates per token-count bucket: (max_tokens, token_block).
# Decode batches (a few tokens) use the smallest block the dtype's sublane
# packing allows; prefill uses MXU-height blocks.
TOKEN_BLOCKS = {
    "v4": ((8, 8), (16, 16), (64, 32), (None, 128)),
    "v5e": ((8, 8), (16, 16), (64, 32), (128, 128), (None, 256)),
    "v5p": ((8, 8), (16, 16), (64, 32), (128, 128), (None, 256)),
    "v6e": ((8, 8), (16, 16), (64, 32), (128, 128), (1024, 256), (None, 512)),
    "cpu": ((8, 8), (16, 16), (64, 32), (512, 64), (None, 128)),
}

# Largest hidden tile (shrink reduction dim) and output tile (expand) in
# elements. A full-width tile is used when the dimension is at most this.
MAX_HIDDEN_TILE = {"v4": 2048, "v5e": 4096, "v5p": 4096, "v6e": 8192, "cpu": 1 << 30}
MAX_OUT_TILE = {"v4": 1024, "v5e": 2048, "v5p": 2048, "v6e": 4096, "cpu": 1 << 30}

# Widest tile of a dimension above the maxima above: the widest multiple of 128 at most this
# (and the maximum) dividing the dimension (``block_sizes.lane_tile``).
MAX_TILED_WIDTH = 2048

# MXU width in elements: laning packs this many columns of adapter ranks.
MXU_WIDTH = {"v4": 128, "v5e": 128, "v5p": 128, "v6e": 256, "cpu": 128}

# VMEM per TensorCore (see the module docstring).
VMEM_CAPACITY_BYTES = {"v4": 16 * MIB, "v5e": 128 * MIB, "v5p": 64 * MIB, "v6e": 128 * MIB}

# Scoped VMEM a kernel may ask for (its vmem_limit_bytes), and what the plans
# budget against: three quarters of the capacity, capped at 64 MiB, so Mosaic's
# internal scratch and the estimate's slack always fit; v4 10 MiB, below three
# quarters, because at 12 MiB a kernel of the compile grid left XLA too little
# VMEM around it (docs/performance.md, "Compiled for TPU"). "cpu" (interpret
# mode) uses the v5e figure so its plans equal a TPU's.
VMEM_LIMIT_BYTES = {
    "v4": 10 * MIB,
    "v5e": 64 * MIB,
    "v5p": 48 * MIB,
    "v6e": 64 * MIB,
    "cpu": 64 * MIB,
}


# The fused base + LoRA kernel (fused_base.py) tiles the base matmul itself, so
# its token block sets how often the weight is re-read from HBM (once per
# block): prefill uses blocks as tall as VMEM allows. Same rule format as
# TOKEN_BLOCKS. Its reduction and output tiles are chosen per call (the
# fitting tiling with the least HBM traffic), each at most BASE_MAX_TILE.
BASE_TOKEN_BLOCKS = {
    "v4": ((8, 8), (16, 16), (32, 32), (64, 64), (None, 128)),
    "v5e": ((8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (None, 512)),
    "v5p": ((8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (None, 512)),
    "v6e": ((8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (512, 512), (None, 1024)),
    "cpu": ((8, 8), (16, 16), (64, 32), (512, 64), (None, 128)),
}
# v5e and v6e (120 MiB declared, below) take tiles up to 8192 wide: an int8
# weight's 4096 x 7168 tile (28 MiB) is what lets a decode step of Llama-3-8B's
# gate/up/down_proj run in 2 grid steps instead of 4. A bf16 tile that wide
# fits the budget only without the decoder arrangement's extra operands and at
# fewer lanes (a plain kernel at decode: 2 lanes), where the planner's model
# prefers it (python -m torch_xla_lora.bench.fused_base_vmem compiles both).
BASE_MAX_TILE = {"v4": 2048, "v5e": 8192, "v5p": 4096, "v6e": 8192, "cpu": 1 << 30}
# The fused base kernel's scoped VMEM limit per generation, and what
# fused_base.vmem_bytes may reach below it. On v5e and v6e (128 MiB of VMEM)
# the kernel declares 120 MiB, 8 MiB below the capacity; the compiler enforces
# it and lets a kernel fill it, alone and with XLA's ops around it in one
# program (``python -m torch_xla_lora.bench vmem``, libtpu 0.0.21: a copy
# kernel taking 120 MiB less 64 KiB compiles between an RMSNorm and a dot,
# one taking 64 KiB more is refused; even at the 128 MiB capacity such a
# program compiles, so XLA keeps nothing of its own in VMEM across the call).
# A whole Llama-3-8B decoder layer, its seven planned kernels between XLA's
# RMSNorms, attention and a following dot, compiles at the declared limit and
# at every limit up to 128 MiB (``python -m
# torch_xla_lora.bench.fused_base_vmem --layer --highest --tokens 1024 4096``:
# v6e at 8 and 128 slots, v5e at 8, whose plans 128 slots share). XLA does
# place buffers around the call in VMEM (memory space 1 in the compiled HLO)
# and fits them to what the kernel's limit leaves: a compile shows that the
# program fits, not how much XLA's own ops lose with less room. The layer
# check has teeth for plans outgrowing the limit: at 60 MiB it is refused
# ("Ran out of memory in memory space vmem", down_proj's call); alone,
# down_proj's plan is refused at 100 and 110 MiB where the layer compiles.
# vmem_bytes counts every block double-buffered and the kernel's values of one
# row chunk, and stays above the least limit libtpu compiles the planned
# kernel at (``python -m torch_xla_lora.bench.fused_base_vmem --tokens 1024
# 4096``: the fullest plan, Llama-3-8B's down_proj with SiLU * up and the
# residual on v6e at 16 lanes, tiles (1024, 1792, 4096), estimate 109.50 MiB,
# least limit 106 MiB; the smallest margin, v5e k_proj at T = 1024, 39.88
# against 38 MiB), so these two budget it up to 114 MiB, 6 MiB below the
# limit. A 118 MiB budget (limit 124) would change one plan more (v6e
# down_proj at 16 lanes: 7 reduction tiles instead of 8, one grid step per
# 1024-token block), not worth halving the headroom. v4 and v5p use the limits
# of VMEM_LIMIT_BYTES and budget 9 of 10 MiB and 42 of 48 MiB (the same
# command with --chips v4 v5p: every plan compiles, each estimate above its
# least limit). "cpu" (interpret mode) plans like v5e.
BASE_VMEM_LIMIT_BYTES = {"v4": 10 * MIB, "v5e": 120 * MIB, "v5p": 48 * MIB, "v6e": 120 * MIB, "cpu": 120 * MIB}
BASE_VMEM_BUDGET_BYTES = {"v4": 9 * MIB, "v5e": 114 * MIB, "v5p": 42 * MIB, "v6e": 114 * MIB, "cpu": 114 * MIB}

# Throughput per chip, bf16, from the Cloud TPU documentation's per-chip figures:
# HBM bandwidth (bytes/s) and peak MXU flops/s. v4: 1228 GB/s, 275 TFLOP/s; v5e:
# 819 GB/s, 197 TFLOP/s; v5p: 2765 GB/s, 459 TFLOP/s; v6e: 1640 GB/s, 918 TFLOP/s.
# With the fixed cost of a Pallas grid step (about 0.35 us, the figure commonly
# quoted for Mosaic pipelines) they price a tiling for the fused base kernel's
# planner (fused_base.plan) and the TPU cost model (bench/tpu_model.py).
# "cpu" (interpret mode) plans like v5e.
HBM_BYTES_PER_S = {"v4": 1228e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9, "cpu": 819e9}
PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12, "cpu": 197e12}
STEP_OVERHEAD_S = 0.35e-6


def generation_for(version: int, lite: bool) -> str:
    """The table key of a TPU of major ``version`` (4, 5, 6, 7, ...), ``lite`` for the e variants.

    v5 splits into v5e (lite) and v5p. Newer generations than the table knows use
    the newest entry (v6e: 256-wide MXU); older ones use v4, the smallest VMEM.
    """
    if version <= 4:
        return "v4"
    if version == 5:
        return "v5e" if lite else "v5p"
    return "v6e"
