"""``python -m torch_xla_lora.bench.slot_assembly``: building the slot tensors from trainable adapters, on TPU.

A layer with trainable adapters builds the slot tensors its kernels read in the graph, from the adapters'
parameters (``LinearWithLoRA.slot_factors``: each adapter's f32 A and B padded to ``max_rank``, B transposed
and scaled, cast to the slots' dtype, then stacked where every slot holds a trainable adapter, or put into the
slot buffers where some do not); the backward carries the slot tensors' gradients back to the parameters.
This measures both for one projection as the library builds them:

1. a child process runs the library on the CPU device (torch_xla, ``--emit``): a ``gate_proj`` of the given
   widths patched with ``max_rank`` 64, one trainable adapter per tenant (``create_adapter``, ranks 8, 8,
   16, 16, 32, 32, 64, 64), and writes torch_xla's HLO of ``slot_factors()`` and of the parameters' gradients
   from bf16 slot gradients;
2. this process compiles each HLO module with libtpu's TPU compiler, no TPU (deviceless, as ``bench
   tpu_compile``), and counts the HBM bytes of the compiled program (:func:`hbm_bytes`): each op's operands
   read and results written where libtpu placed them in HBM (memory space 0; VMEM-resident buffers cost
   nothing more), a fusion's operand at the bytes of the slices it reads of it, an in-place update at the
   update's bytes, and copies between HBM and VMEM once.

Two cases: ``every slot`` (8 tenants in 8 slots: the slot tensors are the stacked parameters, as the training
model assumes) and ``half the slots`` (the same 8 tenants in 16 slots: their rows put into the slot buffers).
Each row gives the forward's and backward's HBM bytes beside ``tpu_train_model.slot_assembly_bytes``, and
libtpu's own ``bytes accessed`` (which also counts VMEM-resident traffic, so it is larger for the forward).

Runs JAX on the CPU in its own process (``JAX_PLATFORMS=cpu``, set here before JAX starts) and torch_xla
only in the child. Needs libtpu. ``--quick``: widths 256 -> 512 instead of Llama-3-8B's 4096 -> 14336.
"""

from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from torch_xla_lora.bench.hlo_traffic import hbm_bytes  # noqa: E402

CHIPS = ("v5e", "v6e")
RANKS = (8, 8, 16, 16, 32, 32, 64, 64)
MAX_RANK = 64
CASES = {"every slot": len(RANKS), "half the slots": 2 * len(RANKS)}  # case -> max_loras


def emit(directory: Path, hidden: int, out_dim: int, max_loras: int) -> None:
    """Write ``forward.pb`` and ``backward.pb``: torch_xla's HLO of one projection's ``slot_factors()`` and of
    its trainable parameters' gradients (see the module doc). Runs torch_xla: call it in a process of its own."""
    import torch
    import torch_xla
    from peft import LoraConfig
    from torch import nn

    import torch_xla_lora as tl

    class Projection(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(hidden, out_dim, bias=False)

    device = torch_xla.device()
    model = Projection().to(torch.bfloat16).to(device)
    config = tl.LoRAConfig(max_loras=max_loras, max_rank=MAX_RANK, target_modules=["gate_proj"], dtype=torch.bfloat16)
    lora = tl.patch_model(model, config)
    for i, rank in enumerate(RANKS):
        lora.create_adapter(f"t{i}", LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["gate_proj"]))
    torch_xla.sync()
    hlo = torch_xla._XLAC._get_xla_tensors_hlo_proto
    lora_a, lora_b = model.gate_proj.slot_factors()
    (directory / "forward.pb").write_bytes(hlo([lora_a, lora_b]))
    grad_a = torch.randn(lora_a.shape, dtype=lora_a.dtype, device=device)
    grad_b = torch.randn(lora_b.shape, dtype=lora_b.dtype, device=device)
    torch_xla.sync()  # the slot gradients as the program's inputs
    params = [p for i in range(len(RANKS)) for p in lora.trainable_parameters(f"t{i}").values()]
    grads = torch.autograd.grad(model.gate_proj.slot_factors(), params, [grad_a, grad_b])
    (directory / "backward.pb").write_bytes(hlo(list(grads)))


def compile_hlo(proto: bytes, chip: str) -> tuple[str, float]:
    """libtpu's compile of an HLO module (torch_xla's serialized ``HloModuleProto``) for ``chip``, deviceless:
    the optimized HLO text and libtpu's ``bytes accessed``. JAX lowers a stand-in of the module's signature,
    whose StableHLO module is then replaced by the given one (converted by jaxlib) before compiling."""
    import jax
    import jax.numpy as jnp
    from jax._src.interpreters import mlir
    from jax._src.lib import xla_client
    from jax._src.lib.mlir import ir

    from torch_xla_lora.bench.tpu_compile_worker import topology_device
    from torch_xla_lora.kernels import mosaic_version

    jax.config.update("jax_enable_x64", True)  # torch_xla's int64 indices stay int64
    dtypes = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "i64": jnp.int64, "i32": jnp.int32,
              "ui32": jnp.uint32, "i8": jnp.int8, "i1": jnp.bool_}  # fmt: skip
    module_text = xla_client._xla.mlir.hlo_to_stablehlo(proto)

    def main_function(module):
        return next(op for op in module.body.operations if ir.StringAttr(op.attributes["sym_name"]).value == "main")

    def signature(types) -> list[tuple[tuple[int, ...], object]]:
        return [(tuple(ir.RankedTensorType(t).shape), dtypes[str(ir.RankedTensorType(t).element_type)]) for t in types]

    sharding = jax.sharding.SingleDeviceSharding(topology_device(chip))
    with mosaic_version.pinned_ir_version():
        with mlir.make_ir_context():
            main = main_function(ir.Module.parse(module_text))
            function_type = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
            inputs, results = signature(function_type.inputs), signature(function_type.results)

        def stand_in(*args):
            return tuple(jnp.zeros(shape, dtype) for shape, dtype in results)

        args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in inputs]
        lowered = jax.jit(stand_in, keep_unused=True).trace(*args).lower(lowering_platforms=("tpu",))
        with lowered._lowering._hlo.context:
            module = ir.Module.parse(module_text)
            main_function(module).attributes["sym_visibility"] = ir.StringAttr.get("public")
        lowered._lowering._hlo = module
        compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled.as_text(), float(cost.get("bytes accessed", 0.0))


def measure(chips: Sequence[str], hidden: int, out_dim: int) -> list[dict]:
    """One row per (chip, case, direction): the compiled program's HBM bytes, libtpu's bytes accessed and the
    training model's bytes (``tpu_train_model.slot_assembly_bytes``)."""
    from torch_xla_lora.bench import tpu_train_model

    rows = []
    for case, max_loras in CASES.items():
        with tempfile.TemporaryDirectory() as directory:
            command = [sys.executable, "-m", "torch_xla_lora.bench.slot_assembly", "--emit", directory,
                       "--widths", str(hidden), str(out_dim), "--max-loras", str(max_loras)]  # fmt: skip
            env = {**os.environ, "PJRT_DEVICE": "CPU"}
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"the HLO child failed:\n{proc.stderr[-3000:]}")
            protos = {d: (Path(directory) / f"{d}.pb").read_bytes() for d in ("forward", "backward")}
        every = max_loras == len(RANKS)
        model = tpu_train_model.slot_assembly_bytes(hidden, out_dim, MAX_RANK, max_loras, sum(RANKS), every)
        for chip in chips:
            for direction, proto in protos.items():
                text, accessed = compile_hlo(proto, chip)
                rows.append({"chip": chip, "case": case, "direction": direction, "widths": [hidden, out_dim],
                             "slots": max_loras, "ranks": list(RANKS), "hbm_bytes": hbm_bytes(text),
                             "libtpu_bytes_accessed": accessed, "model_bytes": model[direction]})  # fmt: skip
    return rows


def table(rows: Sequence[dict]) -> str:
    """The markdown table of :func:`measure`'s rows."""
    lines = [
        "| chip | case | slots | widths | direction | compiled HBM MB | model MB | libtpu MB accessed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        widths = " -> ".join(map(str, r["widths"]))
        lines.append(
            f"| {r['chip']} | {r['case']} | {r['slots']} | {widths} | {r['direction']} | {r['hbm_bytes'] / 1e6:.1f} "
            f"| {r['model_bytes'] / 1e6:.1f} | {r['libtpu_bytes_accessed'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench.slot_assembly", description=__doc__)
    parser.add_argument("--chips", nargs="+", default=list(CHIPS), choices=CHIPS)
    parser.add_argument("--quick", action="store_true", help="widths 256 -> 512 instead of 4096 -> 14336")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--emit", type=Path, help=argparse.SUPPRESS)  # the child: write the HLO modules there
    parser.add_argument("--widths", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--max-loras", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.emit is not None:
        emit(args.emit, *args.widths, args.max_loras)
        return 0
    hidden, out_dim = (256, 512) if args.quick else (4096, 14336)
    rows = measure(args.chips, hidden, out_dim)
    print(json.dumps(rows) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
