"""``python -m torch_xla_lora.bench.fused_base_vmem``: the fused base kernel's VMEM estimate against libtpu's compiler.

For the plans of a Llama-3-8B decoder layer's seven projections, as the decoder arrangement calls the
kernel (``tpu_model.KERNEL_FUSION``: RMSNorm's factors on q/k/v/gate/up's read, SiLU(gate) * up on
down_proj's, the residual in o/down_proj's write; ``--plain``: no fusion), compiles the kernel deviceless
for each chip (as ``bench tpu_compile``'s worker: JAX on the CPU, libtpu's compiler, nothing runs) at its
declared scoped VMEM limit, then bisects the least limit, in whole MiB, it still compiles at, and prints
it beside ``fused_base.vmem_bytes``: the plans' budget (``tuning.BASE_VMEM_BUDGET_BYTES``) is only safe
while the estimate stays above it. Run in a process of its own. Exits 1 when a plan does not compile at
its declared limit or needs more than its estimate.

````--int8-base``: the int8 base's plans (every weight int8 per output channel, ``Fusion.weight_scale``).

``--layer``: the kernel among XLA's ops. Compiles, per (chip, T, L), a whole decoder layer in one program, the
seven planned kernels between XLA's RMSNorms, attention and a following dot (:func:`layer_case`), at the declared
limit; with ``--highest`` also bisects the most MiB up to the chip's VMEM capacity it still compiles at, the room
the declared limit leaves XLA. Exits 1 when a layer does not compile at the declared limit. ``--limit`` and
``--budget`` ask what if: another declared limit and plan budget (MiB) for ``--chips``, in this process only.

A least limit far below the estimate is not slack in the estimate alone: below a block's double buffers
the compiler may single-buffer it (o_proj's plan at T = 1024 on v5e, tiles (512, 4096, 4096): estimate
107.88 MiB, least limit 61 MiB, less than its 32 MiB weight tile's double buffer and the other blocks'); the
estimate counts every block double-buffered.
"""

from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

MIB = 1024 * 1024


def _compile_error(fn, args, chip: str, limit: int) -> str | None:
    """None when ``fn`` compiles for ``chip`` with the kernel's scoped VMEM limit set to ``limit`` bytes, else the
    compiler's error."""
    import jax

    from torch_xla_lora.bench import tpu_compile_worker
    from torch_xla_lora.kernels import fused_base, mosaic_version

    declared = fused_base.vmem_limit
    fused_base.vmem_limit = lambda generation: limit  # tpu_compile_case's fn reads it when traced
    try:
        sharding = jax.sharding.SingleDeviceSharding(tpu_compile_worker.topology_device(chip))
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
        with mosaic_version.pinned_ir_version():
            # A new function each time: jax caches the trace of ``fn`` itself, with the limit it first read.
            jax.jit(lambda *operands: fn(*operands)).trace(*args).lower(lowering_platforms=("tpu",)).compile()
        return None
    except Exception as exc:  # the compiler's refusal (scoped VMEM exceeded) is the finding
        return f"{type(exc).__name__}: {exc}"
    finally:
        fused_base.vmem_limit = declared


def _compiles(fn, args, chip: str, limit: int) -> bool:
    """Whether ``fn`` compiles for ``chip`` with the kernel's scoped VMEM limit set to ``limit`` bytes."""
    return _compile_error(fn, args, chip, limit) is None


def least_limit(fn, args, chip: str, estimate: int) -> int | None:
    """The least whole MiB the kernel compiles at (searched up to its declared limit), or None if not even there."""
    from torch_xla_lora.kernels import fused_base

    declared = fused_base.vmem_limit(chip)
    error = _compile_error(fn, args, chip, declared)
    if error is not None:
        print(f"error at the declared limit ({chip}, {declared // MIB} MiB): {error[:2000]}", file=sys.stderr)
        return None
    high = min(math.ceil(estimate / MIB), declared // MIB)
    if not _compiles(fn, args, chip, high * MIB):
        high = declared // MIB
    low = 0  # fails
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if _compiles(fn, args, chip, middle * MIB) else (middle, high)
    return high


HEADER = (
    "| chip | T | L | projection | fusion | tiles (tokens, reduction, output) | lanes | estimate (MiB) "
    "| least limit (MiB) |\n|---|---|---|---|---|---|---|---|---|"
)


def rows(chips, token_counts, slot_counts, plain: bool, int8_base: bool = False):
    """One table row a distinct plan: (row text, whether it fails the check). ``int8_base``: every projection's
    weight int8 per output channel (``Fusion.weight_scale``), as the int8 base's kernel reads it."""
    import dataclasses

    import jax.numpy as jnp

    from torch_xla_lora.bench import tpu_model
    from torch_xla_lora.kernels import fused_base

    dtype, seen = jnp.bfloat16, set()
    for chip in chips:
        for tokens in token_counts:
            for slots in slot_counts:
                for name, (hidden, out_dim, _) in tpu_model.LLAMA3_8B_LAYER.items():
                    prologue, residual = ("", False) if plain else tpu_model.KERNEL_FUSION[name]
                    fusion = tpu_model.kernel_fusion(prologue, residual)
                    fusion = dataclasses.replace(fusion, weight_scale=int8_base)
                    sizes, lanes = fused_base.plan(tokens, hidden, out_dim, 16, slots, dtype, chip, False, fusion)
                    estimate = fused_base.vmem_bytes(sizes, 16, slots, lanes, dtype, False, fusion)
                    key = (chip, tokens, hidden, out_dim, fusion, sizes, lanes, estimate)
                    if key in seen:
                        continue
                    seen.add(key)
                    fn, shapes = fused_base.tpu_compile_case(
                        tokens, hidden, out_dim, 16, slots, dtype, chip, fusion=fusion
                    )
                    least = least_limit(fn, shapes, chip, estimate)
                    fields = ("silu_mul", "row_scale", "col_scale", "residual", "weight_scale")
                    taken = "+".join(f for f in fields if getattr(fusion, f)) or "-"
                    cells = [chip, tokens, slots, name, taken, f"({sizes.tokens}, {sizes.hidden}, {sizes.out})", lanes]
                    cells += [f"{estimate / MIB:.2f}", "does not compile" if least is None else least]
                    failed = least is None or least > math.ceil(estimate / MIB)
                    yield "| " + " | ".join(str(c) for c in cells) + " |", failed


def layer_case(chip: str, tokens: int, slots: int, plain: bool = False):
    """(fn, argument specs) of a whole Llama-3-8B decoder layer in one jitted program: the seven projections
    as planned fused base kernels (with ``tpu_model.KERNEL_FUSION``'s fusions unless ``plain``) between XLA's
    own ops, RMSNorm's factors before q/k/v and gate/up, causal GQA attention between v_proj and o_proj, and
    after down_proj the next layer's RMSNorm and a [4096, 4096] dot on its output (rank 16, bf16)."""
    import jax
    import jax.numpy as jnp

    from torch_xla_lora.bench import tpu_model
    from torch_xla_lora.kernels import fused_base

    dtype, f32 = jnp.bfloat16, jnp.float32
    kernels, weights = {}, []
    for name, (hidden, out_dim, _) in tpu_model.LLAMA3_8B_LAYER.items():
        prologue, residual = tpu_model.KERNEL_FUSION[name]
        fusion = tpu_model.kernel_fusion("" if plain else prologue, False if plain else residual)
        fn, shapes = fused_base.tpu_compile_case(tokens, hidden, out_dim, 16, slots, dtype, chip, fusion=fusion)
        kernels[name] = (fn, fusion)
        weights += shapes[1:4]  # the weight, lora_a, lora_b
    width, head = 4096, 128
    padded = shapes[0].shape[0]
    spec = jax.ShapeDtypeStruct
    specs = weights + [spec((padded, width), dtype), spec((padded,), jnp.int32)]
    specs += [spec((width,), dtype), spec((width,), dtype), spec((width, width), dtype)]

    def rms(v):
        return jax.lax.rsqrt(jnp.mean(jnp.square(v.astype(f32)), axis=-1) + 1e-5)

    def attention(q, k, v):
        q = q.reshape(padded, 8, 4, head).astype(f32)
        k, v = k.reshape(padded, 8, head).astype(f32), v.reshape(padded, 8, head).astype(f32)
        scores = jnp.einsum("tgqd,sgd->gqts", q, k) / head**0.5
        causal = jnp.arange(padded)[:, None] >= jnp.arange(padded)[None, :]
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        return jnp.einsum("gqts,sgd->tgqd", probs, v).reshape(padded, width).astype(dtype)

    def layer(*operands):
        h, indices, norm1, norm2, w_next = operands[len(weights) :]
        params = dict(zip(kernels, zip(*[iter(operands[: len(weights)])] * 3, strict=True), strict=True))

        def project(name, x, norm=None, factors=None, up=None, residual=None):
            fn, fusion = kernels[name]
            if norm is not None and not fusion.row_scale:  # plain: XLA applies the norm
                x = (x.astype(f32) * factors[:, None] * norm.astype(f32)).astype(dtype)
            if up is not None and not fusion.silu_mul:
                x = (jax.nn.silu(x.astype(f32)) * up.astype(f32)).astype(dtype)
            extra = [factors, norm] if fusion.row_scale else []
            extra += [up] if fusion.silu_mul else []
            extra += [residual] if fusion.residual else []
            out = fn(x, *params[name], indices, *extra)
            return out + residual if residual is not None and not fusion.residual else out

        factors = rms(h)
        q, k, v = (project(name, h, norm1, factors) for name in ("q_proj", "k_proj", "v_proj"))
        h2 = project("o_proj", attention(q, k, v), residual=h)
        factors = rms(h2)
        gate, up = (project(name, h2, norm2, factors) for name in ("gate_proj", "up_proj"))
        out = project("down_proj", gate, up=up, residual=h2)
        following = (out.astype(f32) * rms(out)[:, None]).astype(dtype) @ w_next
        return out, following

    return layer, specs


def highest_limit(fn, args, chip: str, low: int, high: int) -> int | None:
    """The most whole MiB in [low, high] the program compiles at with the kernels' declared limit set to it,
    bisected from ``low`` (None: not even at ``low``); the planned tilings stay as they are."""
    error = _compile_error(fn, args, chip, low * MIB)
    if error is not None:
        print(f"error at {low} MiB ({chip}): {error[:2000]}", file=sys.stderr)
        return None
    if _compiles(fn, args, chip, high * MIB):
        return high
    while high - low > 1:  # low compiles, high does not
        middle = (low + high) // 2
        low, high = (middle, high) if _compiles(fn, args, chip, middle * MIB) else (low, middle)
    return low


LAYER_HEADER = (
    "| chip | T | L | fusion | declared limit (MiB) | compiles | highest limit it compiles at (MiB) "
    "| capacity (MiB) |\n|---|---|---|---|---|---|---|---|"
)


def layer_rows(chips, token_counts, slot_counts, plain: bool, highest: bool):
    """One row per (chip, T, L) decoder layer program compiled at the declared limit, and with ``highest`` the
    most MiB up to the chip's VMEM capacity it compiles at: (row text, whether it fails to compile at the
    declared limit)."""
    from torch_xla_lora.kernels import fused_base, tuning

    for chip in chips:
        declared, capacity = fused_base.vmem_limit(chip) // MIB, tuning.VMEM_CAPACITY_BYTES[chip] // MIB
        for tokens in token_counts:
            for slots in slot_counts:
                fn, specs = layer_case(chip, tokens, slots, plain)
                if highest:
                    top = highest_limit(fn, specs, chip, declared, capacity)
                    ok = top is not None
                else:
                    error = _compile_error(fn, specs, chip, declared * MIB)
                    ok, top = error is None, None
                    if error is not None:
                        print(f"error ({chip}, T={tokens}, L={slots}): {error[:2000]}", file=sys.stderr)
                cells = [chip, tokens, slots, "none" if plain else "KERNEL_FUSION", declared]
                cells += ["yes" if ok else "no", "-" if top is None else top, capacity]
                yield "| " + " | ".join(str(c) for c in cells) + " |", not ok


def override(chips, limit_mib: int | None, budget_mib: int | None) -> None:
    """What if: set the fused base kernel's declared limit and plan budget of ``chips`` (and of "cpu", which
    plans like v5e) to these MiB, in this process only; the plans are recomputed."""
    from torch_xla_lora.kernels import fused_base, tuning

    for chip in [*chips, "cpu"]:
        if limit_mib is not None:
            tuning.BASE_VMEM_LIMIT_BYTES[chip] = limit_mib * MIB
        if budget_mib is not None:
            tuning.BASE_VMEM_BUDGET_BYTES[chip] = budget_mib * MIB
    fused_base.plan.cache_clear()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench.fused_base_vmem", description=__doc__)
    parser.add_argument("--chips", nargs="+", default=["v5e", "v6e"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 128], help="adapter slots L (rank 16, bf16)")
    parser.add_argument("--plain", action="store_true", help="the kernel without fusions")
    parser.add_argument(
        "--int8-base",
        action="store_true",
        help="every projection's weight int8 per output channel (weight_scale in the fusion column); not with --layer",
    )
    parser.add_argument(
        "--layer",
        action="store_true",
        help="compile each (chip, T, L) whole decoder layer program (the kernels among XLA's ops) instead",
    )
    parser.add_argument(
        "--highest", action="store_true", help="with --layer: bisect the most MiB up to the capacity it compiles at"
    )
    parser.add_argument("--limit", type=int, help="what if: the declared limit of --chips, MiB")
    parser.add_argument("--budget", type=int, help="what if: the plan budget of --chips, MiB")
    args = parser.parse_args(argv)
    if args.layer and args.int8_base:
        parser.error("--int8-base compiles the per-projection plans only, not with --layer")
    override(args.chips, args.limit, args.budget)
    if args.layer:
        print(LAYER_HEADER)
        found = layer_rows(args.chips, args.tokens, args.slots, args.plain, args.highest)
    else:
        print(HEADER)
        found = rows(args.chips, args.tokens, args.slots, args.plain, args.int8_base)
    failed = False
    for row, bad in found:
        print(row, flush=True)
        failed |= bad
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
