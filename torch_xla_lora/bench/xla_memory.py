"""``python -m torch_xla_lora.bench xla_memory``: the compiled temporaries of the XLA-native fused op.

XLA:CPU gives all the temporaries of a compiled function (those of every branch
of a ``lax.switch`` included) one allocation, made afresh on every call; past
glibc's mmap threshold (32 MiB by default) each call maps it and page-faults it
anew (see docs/performance.md). This command compiles the JAX function behind
``bgmv_shrink_expand`` for backend "xla", grouping on the device, with JAX's
CPU backend (the XLA of jaxlib, as in ``memory_analysis()`` of any jitted
function), for each number of slots given, and prints its temporaries,
arguments and output.

``--commit REV`` measures the tree of another commit instead: its
``torch_xla_lora`` and ``csrc_pallas`` are extracted with ``git archive`` into
a temporary directory and the measurement runs there (the figures of
docs/performance.md before and after a change were produced this way).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


def measure(tokens: int, hidden: int, out_dim: int, rank: int, slots: int, dtype: str) -> dict[str, int]:
    """``memory_analysis()`` sizes in bytes of the compiled XLA-native shrink-expand for these shapes."""
    import inspect

    import jax
    import jax.numpy as jnp

    from torch_xla_lora.ops import _jax

    # Older trees' builder had no host-metadata flag (3 parameters instead of 4).
    flag = [False] if len(inspect.signature(_jax.shrink_expand_fn).parameters) == 4 else []
    fn = _jax.shrink_expand_fn("xla", "cpu", 1.0, *flag)
    dt = jnp.dtype(dtype)
    shapes = [
        ((tokens, hidden), dt),  # inputs
        ((slots, rank, hidden), dt),  # lora_a
        ((slots, rank, out_dim), dt),  # lora_b
        ((tokens, out_dim), dt),  # base
        ((tokens,), jnp.int32),  # lora_indices
    ]
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])  # XLA:CPU even where JAX also sees a TPU
    specs = [jax.ShapeDtypeStruct(shape, dtype, sharding=cpu) for shape, dtype in shapes]
    analysis = jax.jit(fn).lower(*specs).compile().memory_analysis()
    return {key: int(getattr(analysis, f"{key}_size_in_bytes")) for key in ("temp", "argument", "output")}


@contextlib.contextmanager
def _tree(commit: str | None) -> Iterator[str | None]:
    """None for this tree, else a temporary directory holding ``commit``'s package, importable as it installs."""
    if commit is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as root:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "torch_xla_lora", "csrc_pallas"],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", root], input=archive.stdout, check=True)
        # setup.py installs csrc_pallas as torch_xla_lora.kernels.
        os.symlink(os.path.join("..", "csrc_pallas"), os.path.join(root, "torch_xla_lora", "kernels"))
        yield root


def run(args: argparse.Namespace) -> list[dict]:
    """One row per slot count, measured in a worker process on this tree or on ``args.commit``'s."""
    with _tree(args.commit) as root:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        if root is not None:
            env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        request = {k: getattr(args, k) for k in ("tokens", "hidden", "out", "rank", "slots", "dtype")}
        # This file run from a neutral directory (not as a module of the package, which an older
        # tree lacks, nor as a script, whose folder would lead sys.path) imports the tree PYTHONPATH names.
        script = f"import runpy; runpy.run_path({os.path.abspath(__file__)!r}, run_name='__main__')"
        proc = subprocess.run(
            [sys.executable, "-c", script, "--worker", json.dumps(request)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),
        )
    if proc.returncode:
        raise RuntimeError(f"the worker failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _worker(request: dict) -> None:
    for slots in request["slots"]:
        shape = {k: request[k] for k in ("tokens", "hidden", "rank", "dtype")} | {"out": request["out"], "slots": slots}
        sizes = measure(request["tokens"], request["hidden"], request["out"], request["rank"], slots, request["dtype"])
        print(json.dumps(shape | sizes), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench xla_memory", description=__doc__)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--commit", help="measure this commit's tree (git archive) instead of this one")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    rows = run(args)
    print(f"tree: {args.commit or 'this checkout'}; bgmv_shrink_expand, backend xla, grouping on the device")
    print("| T | D | Dout | R | L | dtype | temporaries (MiB) | arguments (MiB) | output (MiB) |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['hidden']} | {r['out']} | {r['rank']} | {r['slots']} | {r['dtype']} | "
            f"{r['temp'] / MIB:.1f} | {r['argument'] / MIB:.1f} | {r['output'] / MIB:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
