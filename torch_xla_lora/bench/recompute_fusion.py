"""``python -m torch_xla_lora.bench.recompute_fusion``: what recomputing x = SiLU(gate) * up in the backward costs.

In training, down_proj's kernel takes its input's producer in (``linear_lora_fused_train`` reads gate and up),
so x is never written in the forward; the backward needs it for dA (``bgmv_weight_grad(ds, x)``, a Pallas call)
and recomputes it in torch. The backward also differentiates the product (d gate, d up from dx), which reads
gate, up and dx whether or not x is recomputed, and which the frozen base's backward runs too. This compiles,
with libtpu's TPU compiler and no TPU (deviceless, as ``bench tpu_compile``), three programs of the shapes
``[tokens, width]``:

- ``derivative``: d gate and d up from dx (what the base's backward runs);
- ``kept``: the same and a Pallas call reading a kept x (what a forward that wrote x would leave);
- ``recomputed``: the same with x recomputed from gate and up for the Pallas call;

and prints libtpu's bytes accessed for each (in [tokens, width] bf16 arrays) and its fusions with their
[tokens, width] operands and outputs. XLA computes x in the derivative's fusion (one fusion, three outputs):
the recompute costs x's write, one array, which is what ``tpu_train_model`` prices (``recompute_x``). The
Pallas call's own traffic is not in libtpu's count (it declares none here) and is the same in both.

Runs JAX on the CPU in its own process (``JAX_PLATFORMS=cpu``, set here before JAX starts): never import it
into a process running torch_xla. Needs libtpu. ``--quick``: 1024 x 2048 instead of Llama-3-8B's 8192 x 14336.
"""

from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from collections.abc import Sequence  # noqa: E402

CHIPS = ("v5e", "v6e")
PROGRAMS = ("derivative", "kept", "recomputed")
RANK = 64
TOKEN_BLOCK = 256


def _programs(tokens: int, width: int) -> dict:
    """The three programs (see the module doc) and their argument shapes."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def weight_grad_kernel(ds_ref, x_ref, out_ref):  # dA = ds^T x, summed over the token blocks
        @pl.when(pl.program_id(0) == 0)
        def _zero():
            out_ref[...] = jnp.zeros_like(out_ref)

        contract = (((0,), (0,)), ((), ()))
        out_ref[...] += jax.lax.dot_general(ds_ref[...], x_ref[...], contract, preferred_element_type=jnp.float32)

    def weight_grad(ds, x):
        block = min(TOKEN_BLOCK, tokens)
        return pl.pallas_call(
            weight_grad_kernel,
            grid=(tokens // block,),
            in_specs=[pl.BlockSpec((block, RANK), lambda t: (t, 0)), pl.BlockSpec((block, width), lambda t: (t, 0))],
            out_specs=pl.BlockSpec((RANK, width), lambda t: (0, 0)),
            out_shape=jax.ShapeDtypeStruct((RANK, width), jnp.float32),
        )(ds, x)

    def producer(gate, up):
        return jax.nn.silu(gate) * up

    def derivative(gate, up, dx):
        return jax.vjp(producer, gate, up)[1](dx)

    def kept(x, gate, up, dx, ds):
        return weight_grad(ds, x), *derivative(gate, up, dx)

    def recomputed(gate, up, dx, ds):
        x, vjp = jax.vjp(producer, gate, up)
        return weight_grad(ds, x), *vjp(dx)

    array, rows = (tokens, width), (tokens, RANK)
    return {
        "derivative": (derivative, [array] * 3),
        "kept": (kept, [array] * 4 + [rows]),
        "recomputed": (recomputed, [array] * 3 + [rows]),
    }


def _fusions(hlo: str, tokens: int, width: int) -> list[dict]:
    """The entry computation's fusions: how many [tokens, width] arrays each reads and writes."""
    shape = rf"bf16\[{tokens},{width}\]"
    entry = hlo[hlo.index("ENTRY") :]
    out = []
    for line in entry.splitlines()[1:]:
        match = re.match(r"\s*%[\w.\-]+ = (.*?) fusion\((.*?)\)", line)
        if match is None:
            continue
        results, operands = match.groups()
        outputs = len(re.findall(shape, results))
        out.append({"outputs": outputs, "operands": len([o for o in operands.split(",") if o.strip()])})
    return out


def measure(chip: str, tokens: int, width: int) -> list[dict]:
    """One row per program: libtpu's bytes accessed, in [tokens, width] bf16 arrays, and its fusions."""
    import jax
    import jax.numpy as jnp

    from torch_xla_lora.bench.tpu_compile_worker import topology_device
    from torch_xla_lora.kernels import mosaic_version

    sharding = jax.sharding.SingleDeviceSharding(topology_device(chip))
    array_bytes = tokens * width * 2
    rows = []
    for name, (fn, shapes) in _programs(tokens, width).items():
        args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding) for shape in shapes]
        with mosaic_version.pinned_ir_version():
            compiled = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        accessed = float(cost.get("bytes accessed", 0.0))
        fusions = _fusions(compiled.as_text(), tokens, width)
        rows.append({"chip": chip, "program": name, "tokens": tokens, "width": width,
                     "bytes_accessed": accessed, "arrays": accessed / array_bytes, "fusions": fusions})  # fmt: skip
    return rows


def table(rows: Sequence[dict]) -> str:
    """The markdown table of :func:`measure`'s rows."""
    lines = [
        "| chip | program | [T, I] | libtpu MB accessed | in [T, I] arrays | fusions (outputs of [T, I]) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        fusions = ", ".join(str(f["outputs"]) for f in r["fusions"]) or "none"
        lines.append(
            f"| {r['chip']} | {r['program']} | {r['tokens']} x {r['width']} | {r['bytes_accessed'] / 1e6:.0f} "
            f"| {r['arrays']:.2f} | {len(r['fusions'])} ({fusions}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench.recompute_fusion", description=__doc__)
    parser.add_argument("--chips", nargs="+", default=list(CHIPS), choices=CHIPS)
    parser.add_argument("--quick", action="store_true", help="1024 x 2048 arrays instead of 8192 x 14336")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    tokens, width = (1024, 2048) if args.quick else (8192, 14336)
    rows = [row for chip in args.chips for row in measure(chip, tokens, width)]
    print(json.dumps(rows) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
