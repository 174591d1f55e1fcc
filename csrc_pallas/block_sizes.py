"""Block sizes for the BGMV kernels, and how they are chosen from the tuning table."""

from __future__ import annotations

import dataclasses

from . import tuning

# Mosaic tiles a block's last two dims in (sublane, lane) = (8, 128) units;
# bfloat16 packs two rows per sublane, so token blocks are multiples of 8 and
# tiled hidden/output dims multiples of 128 (unless a block spans the dim).
SUBLANE = 8
LANE = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of one kernel call.

    Attributes:
      tokens: rows of the token block; the token count is padded to a multiple.
      hidden: shrink's reduction tile over D (equal to D when D is not tiled).
      out: expand's output tile over Dout (equal to Dout when not tiled).
    """

    tokens: int
    hidden: int
    out: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{field.name} must be a positive int, got {value!r}")
        if self.tokens % SUBLANE:
            raise ValueError(f"BlockSizes.tokens must be a multiple of {SUBLANE}, got {self.tokens}")

    def check(self, hidden_dim: int, out_dim: int) -> None:
        """Raise ValueError unless the tiles divide the dims (or span them)."""
        for name, tile, dim in (("hidden", self.hidden, hidden_dim), ("out", self.out, out_dim)):
            if tile == dim:
                continue
            count, rest = divmod(dim, tile)
            if rest or tile % LANE or count == 0:
                raise ValueError(
                    f"BlockSizes.{name}={tile} must span the dim {dim} or be a multiple of {LANE} dividing it"
                )

    def padded_tokens(self, num_tokens: int) -> int:
        """The token count rounded up to a whole number of token blocks."""
        return -(-max(num_tokens, 1) // self.tokens) * self.tokens


def known(generation: str) -> str:
    """``generation`` if the tuning table has it, else "v4" (the smallest VMEM)."""
    return generation if generation in tuning.TOKEN_BLOCKS else "v4"


def vmem_limit(generation: str) -> int:
    """The scoped VMEM limit (bytes) kernels declare and plans budget against on ``generation``."""
    return tuning.VMEM_LIMIT_BYTES[known(generation)]


def lane_tile(dim: int, at_most: int) -> int | None:
    """The widest multiple of :data:`LANE` dividing ``dim`` that is at most ``at_most``, or None.

    Any lane multiple, not only powers of two: gpt-oss's 5,760 columns (45 lane tiles) take 1,920-wide
    tiles here, where a power of two would leave 128."""
    for lanes in range(min(at_most, dim) // LANE, 0, -1):
        if dim % (lanes * LANE) == 0:
            return lanes * LANE
    return None


def _tile(dim: int, max_tile: int) -> int:
    if dim <= max_tile:
        return dim
    tile = lane_tile(dim, min(max_tile, tuning.MAX_TILED_WIDTH))
    return dim if tile is None else tile  # no lane-aligned divisor: one full-width block


def choose(num_tokens: int, hidden_dim: int, out_dim: int, generation: str = "cpu") -> BlockSizes:
    """Block sizes for ``num_tokens`` tokens from the tuning table of ``generation``.

    ``generation`` is a key of :data:`tuning.TOKEN_BLOCKS` ("v4", "v5e", "v5p",
    "v6e", "cpu"); unknown generations use the v4 table, the most conservative in VMEM.
    """
    generation = known(generation)
    tokens = tuning.TOKEN_BLOCKS[generation][-1][1]
    for max_tokens, block in tuning.TOKEN_BLOCKS[generation]:
        if max_tokens is None or num_tokens <= max_tokens:
            tokens = block
            break
    sizes = BlockSizes(
        tokens=tokens,
        hidden=_tile(hidden_dim, tuning.MAX_HIDDEN_TILE[generation]),
        out=_tile(out_dim, tuning.MAX_OUT_TILE[generation]),
    )
    sizes.check(hidden_dim, out_dim)
    return sizes


def typical_adapters(num_tokens: int, num_slots: int, block_tokens: int, per_block: int = 1) -> int:
    """Distinct adapters a typical batch touches, for cost estimates: ``per_block`` per token block, at most L."""
    return min(num_slots, max(1, num_tokens // block_tokens) * per_block)
