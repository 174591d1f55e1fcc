"""Compilation accounting: count XLA compilations, and fail loudly on unexpected ones.

On TPU a recompilation costs seconds to minutes, so a serving loop must never
trigger one after warm-up. :func:`assert_no_recompile` wraps such a loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch_xla_lora.errors import RecompilationError


def compile_count() -> int:
    """XLA compilations so far in this process (torch_xla's "CompileTime" metric)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


class CompileCounter:
    """Compilations since this counter was made: read :attr:`count`."""

    def __init__(self) -> None:
        self._start = compile_count()

    @property
    def count(self) -> int:
        return compile_count() - self._start


@contextlib.contextmanager
def assert_no_recompile(sync: bool = True) -> Iterator[CompileCounter]:
    """Raise :class:`RecompilationError` if XLA compiles anything inside the block.

    Args:
      sync: run ``torch_xla.sync()`` on exit so pending lazy work is compiled
        (and counted) inside the block.

    Yields:
      a :class:`CompileCounter` whose ``count`` can be read inside the block.
    """
    import torch_xla

    counter = CompileCounter()
    yield counter
    if sync:
        torch_xla.sync()
    if counter.count:
        raise RecompilationError(
            f"{counter.count} XLA compilation(s) happened inside assert_no_recompile(); "
            "see docs/recompilation.md for the usual causes (new shapes outside the warmed buckets, "
            "host syncs, Python branches on device values)"
        )
