"""The Mosaic IR version the kernels are serialised at, and how it is enforced.

A ``pallas_call`` lowered for TPU becomes a ``tpu_custom_call`` carrying the
kernel as serialised Mosaic IR; libtpu's compiler deserialises it and refuses
a version newer than it knows. jax 0.7.1 writes version 8 unless it runs on a
Cloud TPU VM whose libtpu was built before 2025-08-14 (it reads the build date
from the backend's platform version). libtpu 0.0.21, the release torch_xla
2.9.0 pins, reads versions up to 7, yet was built on 2025-08-15: on a TPU VM
with the stock stack jax would write version 8 and every kernel would fail to
deserialise ("Unsupported version: expected <= 7 but got 8"). libtpu 0.0.23
reads 8 and still reads 7. Both are checked by ``python -m torch_xla_lora.bench
tpu_compile`` (pinned) and the same with ``--no-ir-pin`` (jax's version 8): with
the pinned libtpu in the suite (``tests/test_tpu_compile.py``), and with 0.0.23 by
running the command with that release first on the path
(``pip install --no-deps --target DIR libtpu==0.0.23``, then ``PYTHONPATH=DIR``).

So the kernels are always written at version 7 (:data:`IR_VERSION`), which
both releases read: the ops lower their JAX functions inside
:func:`pinned_ir_version`, and so does the TPU compile check. Nothing else in
the process is affected: outside the block jax chooses as it always does.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

# Read by libtpu 0.0.21 (the `tpu` extra's pin) and by libtpu 0.0.23.
IR_VERSION = 7

_forced: contextvars.ContextVar[int | None] = contextvars.ContextVar("mosaic_ir_version", default=None)


@functools.cache
def _install() -> None:
    """Wrap jax's version choice once: the forced version inside the block, jax's own outside it.

    jax 0.7.1 exposes no parameter for the version (``tpu_custom_call.get_ir_version``
    picks it per lowering), hence the wrapper; it only changes anything while a
    :func:`pinned_ir_version` block is active in the current thread or task.
    """
    from jax._src import tpu_custom_call

    original = tpu_custom_call.get_ir_version

    def get_ir_version(ctx):
        forced = _forced.get()
        chosen = original(ctx)
        if forced is None:
            return chosen
        return forced if chosen is None else min(chosen, forced)

    tpu_custom_call.get_ir_version = get_ir_version


@contextlib.contextmanager
def pinned_ir_version(version: int = IR_VERSION) -> Iterator[None]:
    """Serialise every Mosaic kernel lowered inside the block at ``version`` (or older, if jax asks for older)."""
    _install()
    token = _forced.set(version)
    try:
        yield
    finally:
        _forced.reset(token)
