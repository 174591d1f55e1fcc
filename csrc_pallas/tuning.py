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
