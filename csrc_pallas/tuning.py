"""Block-size tuning table (data only).

Keyed by ``(generation, kind)``; each entry lists rules tried in order. A rule
gives the token block for a token-count bucket and the widest hidden/output
tile that keeps the double-buffered blocks within the VMEM budget.

The token block is the dominant knob: per visit the kernel multiplies a whole
token block, so a block much larger than a request wastes MXU work, and a
block much smaller multiplies grid steps (each costs about 0.35 us on TPU).
"""

# Token-block candidates per token-count bucket: (max_tokens, token_block).
# Decode batches (a few tokens) use the smallest block the dtype's sublane
# packing allows; prefill uses MXU-height blocks.
TOKEN_BLOCKS = {
    "v5e": ((8, 8), (16, 16), (64, 32), (128, 128), (None, 256)),
    "v6e": ((8, 8), (16, 16), (64, 32), (128, 128), (1024, 256), (None, 512)),
    "cpu": ((8, 8), (16, 16), (64, 32), (512, 64), (None, 128)),
}

# Largest hidden tile (shrink reduction dim) and output tile (expand) in
# elements. A full-width tile is used when the dimension is at most this.
MAX_HIDDEN_TILE = {"v5e": 4096, "v6e": 8192, "cpu": 1 << 30}
MAX_OUT_TILE = {"v5e": 2048, "v6e": 4096, "cpu": 1 << 30}

# Tiles tried, widest first, for dimensions above the maxima above.
TILE_CANDIDATES = (2048, 1024, 512, 256, 128)

# MXU width in elements: laning packs this many columns of adapter ranks.
MXU_WIDTH = {"v5e": 128, "v6e": 256, "cpu": 128}

# Scoped VMEM the fused kernel may use (both generations have 128 MiB of VMEM;
# the compiler's default scoped limit is smaller).
VMEM_LIMIT_BYTES = 64 * 1024 * 1024

# The fused base + LoRA kernel (fused_base.py) tiles the base matmul itself, so
# its token block sets how often the weight is re-read from HBM (once per
# block): prefill uses blocks as tall as VMEM allows. Same rule format as
# TOKEN_BLOCKS. Its reduction and output tiles are chosen per call (the
# fitting tiling with the least HBM traffic), each at most BASE_MAX_TILE.
BASE_TOKEN_BLOCKS = {
    "v5e": ((8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (None, 512)),
    "v6e": ((8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (512, 512), (None, 1024)),
    "cpu": ((8, 8), (16, 16), (64, 32), (512, 64), (None, 128)),
}
BASE_MAX_TILE = {"v5e": 4096, "v6e": 8192, "cpu": 1 << 30}
# The fused base kernel's scoped VMEM limit (v5e and v6e have 128 MiB), and what
# fused_base.vmem_bytes may reach below it, leaving room for the compiler's own
# internal scratch (checked with libtpu's compiler for v5e and v6e).
BASE_VMEM_LIMIT_BYTES = 96 * 1024 * 1024
BASE_VMEM_BUDGET_BYTES = 72 * 1024 * 1024
