"""LoRA bytes per decode step from XLA's cost analysis (``python -m torch_xla_lora.bench memory --decode-bytes``).

A random-weight Llama (built from a config and a seed; nothing is downloaded) on
the XLA device, patched with adapters on all seven projections, runs one decode
step: ``rows`` batch rows of one token each (no KV cache: the cache's bytes are
the same with and without LoRA). The step's graph is taken from torch_xla as an
HLO module (``torch_xla._XLAC._get_xla_tensors_hlo_proto`` of the logits),
compiled by XLA:CPU through JAX's CPU client, and the compiled executable's
``cost_analysis()["bytes accessed"]`` read; the same for the unpatched model.
The difference is the LoRA bytes of the step.

Layouts: padded slots (no memory budget), the rank-true pool in float32, and
the pool in int8 (``weight_dtype="int8"``), each for several ``(max_loras,
max_rank)``, with 1, 8 or 16 distinct adapters of mixed ranks in the batch
(ranks drawn 70% 8, 20% 16, 10% 64 as in ``bench memory``, capped at
``max_rank``; rows assigned round robin). Beside each figure: the true-rank bytes
of the distinct adapters (their rank rows over every patched layer, in the
layout's storage dtype, int8 scales included) and the ratio. A pool holds
exactly the 16 adapters' rows.

The compiled graph does not depend on which adapters a batch uses (that is what
makes loads and evictions compile nothing); the command checks it by comparing
the HLO of the batches, and reports whether they were identical.

``--floor``: what this measure counts for the least a formulation can do, a few rank rows of a pool read
and multiplied (:func:`floor`): a dynamic slice of the rows and a dot is counted 3x the rows' bytes (the
slice reads and writes them, the dot reads them), a gather of the same rows as the whole pool.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import warnings
from collections.abc import Sequence

import torch

from torch_xla_lora.bench.int8_quality import TARGETS, QualitySizes
from torch_xla_lora.bench.memory import fleet

LAYOUTS = ("padded", "pool float32", "pool int8")


def compiled_bytes(tensors: Sequence[torch.Tensor]) -> float:
    """``bytes accessed`` of the compiled XLA:CPU executable computing ``tensors`` (pending XLA tensors)."""
    import jax
    import torch_xla
    from jax._src.lib import xla_client

    proto = torch_xla._XLAC._get_xla_tensors_hlo_proto(list(tensors))
    module = xla_client._xla.mlir.hlo_to_stablehlo(proto)
    cpu = jax.devices("cpu")[0]
    executable = cpu.client.compile_and_load(module, xla_client.DeviceList((cpu,)), xla_client.CompileOptions())
    return float(executable.cost_analysis()["bytes accessed"])


def floor(hidden: int = 512, pool_rows: int = 1024, rank: int = 16, tokens: int = 16) -> dict[str, float]:
    """XLA:CPU's ``bytes accessed`` for ``x @ rows.T`` with ``rank`` rows of a float32 ``[pool_rows, hidden]`` pool,
    less x's, the output's and the start row's (row numbers') bytes, over the rows' bytes: per way of reading
    the rows ("dynamic slice": from a start row; "gather": by row numbers)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def sliced(x, pool, start):
        return x @ lax.dynamic_slice_in_dim(pool, start, rank).T

    def gathered(x, pool, index):
        return x @ pool[index].T

    x = jax.ShapeDtypeStruct((tokens, hidden), jnp.float32)
    pool = jax.ShapeDtypeStruct((pool_rows, hidden), jnp.float32)
    index = {"dynamic slice": jax.ShapeDtypeStruct((), jnp.int32), "gather": jax.ShapeDtypeStruct((rank,), jnp.int32)}
    out = {}
    for name, fn in (("dynamic slice", sliced), ("gather", gathered)):
        compiled = jax.jit(fn, backend="cpu").lower(x, pool, index[name]).compile()
        operands = 4 * tokens * (hidden + rank) + 4 * max(1, len(index[name].shape) and rank)  # x, out, index
        counted = compiled.cost_analysis()["bytes accessed"] - operands
        out[name] = counted / (4 * rank * hidden)
    return out


def _step(model: torch.nn.Module, rows: int, device: torch.device) -> torch.Tensor:
    ids = torch.zeros(rows, 1, dtype=torch.long).to(device)
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _templates(base: torch.nn.Module, ranks: set[int], seed: int) -> dict[int, tuple[dict, object]]:
    """A PEFT adapter (random A and B) of each rank: state dict and config."""
    import peft

    out = {}
    for rank in sorted(ranks):
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), init_lora_weights=False)
        torch.manual_seed(seed + rank)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(copy.deepcopy(base), config)
        out[rank] = ({k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}, config)
    return out


def measure(
    sizes: QualitySizes,
    shapes: Sequence[tuple[int, int]] = ((16, 64), (16, 16), (32, 64)),
    distinct: Sequence[int] = (1, 8, 16),
    rows: int = 16,
    layouts: Sequence[str] = LAYOUTS,
    seed: int = 0,
) -> dict:
    """The figures of the module's table: ``{"base_bytes", "rows": [...]}``, one row per (shape, layout, distinct)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # JAX compiles for XLA:CPU only (no TPU runtime probed)
    import torch_xla

    import torch_xla_lora as tl
    from torch_xla_lora.random_models import random_llama

    device = torch_xla.device()
    base = random_llama(sizes, seed)
    base_bytes = compiled_bytes([_step(copy.deepcopy(base).to(device), rows, device)])
    most = max(distinct)
    out = []
    for max_loras, max_rank in shapes:
        ranks = [min(r, max_rank) for r in fleet({8: 0.7, 16: 0.2, 64: 0.1}, most)]
        templates = _templates(base, set(ranks), seed)
        for layout in layouts:
            int8 = layout == "pool int8"
            elements = sum(
                m.in_features + m.out_features for n, m in base.named_modules() if n.rpartition(".")[2] in TARGETS
            )
            budget = None if layout == "padded" else (sum(ranks) + 2) * elements * 4
            config = tl.LoRAConfig(
                max_loras=max_loras,
                max_rank=max_rank,
                max_cpu_adapters=max(max_loras, most),
                target_modules=list(TARGETS),
                memory_budget=budget,
                weight_dtype="int8" if int8 else None,
            )
            lora = tl.patch_model(copy.deepcopy(base).to(device), config)
            for i, rank in enumerate(ranks):
                state, peft_config = templates[rank]
                lora.load_adapter(f"a{i}", state_dict=state, config=peft_config)
            row_bytes = sum(layer.pool_row_bytes(int8) for layer in lora.layers.values())
            graphs: dict[str, float] = {}
            for d in distinct:
                lora.set_batch([f"a{i % d}" for i in range(rows)])
                torch_xla.sync()  # the staged adapter writes run here, outside the step's graph
                logits = _step(lora.model, rows, device)
                key = hashlib.sha256(torch_xla._XLAC._get_xla_tensors_hlo_proto([logits])).hexdigest()
                if key not in graphs:
                    graphs[key] = compiled_bytes([logits]) - base_bytes
                torch_xla.sync()
                true_bytes = sum(ranks[:d]) * row_bytes
                out.append(
                    {
                        "max_loras": max_loras,
                        "max_rank": max_rank,
                        "layout": layout,
                        "distinct": d,
                        "ranks": ranks[:d],
                        "lora_bytes": graphs[key],
                        "true_rank_bytes": true_bytes,
                        "ratio": graphs[key] / true_bytes,
                        "padded_bytes": max_loras * max_rank * row_bytes,
                        "graphs_so_far": len(graphs),
                    }
                )
            del lora
    return {"base_bytes": base_bytes, "rows": out}


def main(argv: Sequence[str] | None = None) -> int:
    """``bench memory --decode-bytes [options]``: the table (or its figures with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench memory --decode-bytes", description=__doc__)
    defaults = QualitySizes()
    fields = ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads")
    for name in fields:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--shapes", nargs="+", default=["16x64", "16x16", "32x64"], help="max_loras x max_rank")
    parser.add_argument("--distinct", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--rows", type=int, default=16, help="decode rows (one token each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--floor", action="store_true", help="instead: the rows' bytes a slice or gather is counted")
    args = parser.parse_args(argv)
    if args.floor:
        counted = floor()
        print(
            json.dumps(counted)
            if args.json
            else "\n".join(f"{k}: {v:.2f}x the rows' bytes" for k, v in counted.items())
        )
        return 0
    sizes = QualitySizes(**{k: getattr(args, k) for k in fields})
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    result = measure(sizes, shapes, args.distinct, args.rows, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"random Llama (hidden {sizes.hidden}, intermediate {sizes.intermediate}, {sizes.layers} layers, vocab "
        f"{sizes.vocab}), float32, all seven projections; decode step of {args.rows} rows x 1 token; XLA:CPU "
        f"cost analysis, bytes accessed, LoRA model minus base ({result['base_bytes'] / 2**20:.1f} MiB)"
    )
    print(
        "| max_loras x max_rank | layout | distinct adapters (ranks) | LoRA bytes per step | "
        "true-rank bytes of the batch's adapters | ratio | max_loras x max_rank rows |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for r in result["rows"]:
        ranks = ",".join(str(k) for k in r["ranks"]) if len(r["ranks"]) <= 3 else _summary(r["ranks"])
        print(
            f"| {r['max_loras']} x {r['max_rank']} | {r['layout']} | {r['distinct']} ({ranks}) | "
            f"{r['lora_bytes'] / 2**20:.2f} MiB | {r['true_rank_bytes'] / 2**20:.2f} MiB | {r['ratio']:.1f}x | "
            f"{r['padded_bytes'] / 2**20:.2f} MiB |"
        )
    same = all(r["graphs_so_far"] == 1 for r in result["rows"])
    print(f"\none compiled graph per (max_loras, max_rank, layout) whatever the batch's adapters: {same}")
    return 0


def _summary(ranks: Sequence[int]) -> str:
    return " ".join(f"{ranks.count(r)}x r{r}" for r in sorted(set(ranks)))
