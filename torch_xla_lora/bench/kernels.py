"""``python -m torch_xla_lora.bench kernels``: wall-clock of the BGMV formulations, side by side.

One process, one device (the XLA device, CPU PJRT by default), the same shapes
for every formulation; times are device execution of an already compiled
graph (each call is synchronised; results stay on the device) and reported as
ratios to the floor, since the machine is shared and noisy:

- ours: the library's ops with the device's default backend;
- gather: gather each token's weights, then einsum (``x`` with ``W[idx]``);
- onehot: the one-hot einsum over every slot (vLLM's TPU formulation);
- floor: one dense matmul of the same tokens by a single adapter.

Two op kinds: ``shrink`` ([T, D] -> [T, R]) and ``layer`` (shrink + expand
added to a base output, the fused op; gather is left out there: its [T, R,
Dout] gathered weights do not fit in memory at large T).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

FORMULATIONS = ("ours", "gather", "onehot", "floor")


def batch_indices(num_tokens: int, num_slots: int, in_use: int) -> torch.Tensor:
    """Slots of ``in_use`` contiguous requests (prefill layout), spread over the ``num_slots`` slots."""
    request = torch.arange(num_tokens) * in_use // num_tokens
    return (request * (num_slots // in_use)).to(torch.int32)


def _shrink_formulations(x, a, idx) -> dict[str, Callable[[], torch.Tensor]]:
    import torch_xla_lora as tl

    num_slots = a.shape[0]
    valid = ((idx >= 0) & (idx < num_slots))[:, None]
    one_hot = torch.nn.functional.one_hot(idx.long().clamp(0, num_slots - 1), num_slots).to(x.dtype) * valid
    return {
        "ours": lambda: tl.bgmv_shrink(x, a, idx),
        "gather": lambda: torch.einsum("td,trd->tr", x, a[idx.long().clamp(0, num_slots - 1)]) * valid,
        "onehot": lambda: torch.einsum("td,tl,lrd->tr", x, one_hot, a),
        "floor": lambda: x @ a[0].T,
    }


def _layer_formulations(x, a, b, base, idx) -> dict[str, Callable[[], torch.Tensor]]:
    import torch_xla_lora as tl

    num_slots = a.shape[0]
    valid = ((idx >= 0) & (idx < num_slots))[:, None]
    one_hot = torch.nn.functional.one_hot(idx.long().clamp(0, num_slots - 1), num_slots).to(x.dtype) * valid

    def onehot():
        s = torch.einsum("td,tl,lrd->tr", x, one_hot, a)
        return base + torch.einsum("tr,tl,lro->to", s, one_hot, b)

    return {
        "ours": lambda: tl.bgmv_shrink_expand(x, a, b, base, idx),
        "onehot": onehot,
        "floor": lambda: base + (x @ a[0].T) @ b[0],
    }


def time_device(fn: Callable[[], torch.Tensor], repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` on the XLA device, each call synchronised, after ``warmup`` calls."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    def once() -> float:
        start = time.perf_counter()
        out = fn()
        torch_xla.sync()
        xm.wait_device_ops()
        del out
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


def run(
    tokens: Sequence[int], slots: Sequence[int], hidden: int, rank: int, in_use: int, repeats: int, progress=print
) -> list[dict]:
    """One row per (op, T, L, case): seconds per formulation and ratios to the floor."""
    import torch_xla

    device = torch_xla.device()
    g = torch.Generator().manual_seed(0)
    rows = []
    for num_tokens in tokens:
        x = torch.randn(num_tokens, hidden, generator=g)
        base = torch.randn(num_tokens, hidden, generator=g)
        for num_slots in slots:
            a = torch.randn(num_slots, rank, hidden, generator=g) / hidden**0.5
            b = torch.randn(num_slots, rank, hidden, generator=g) / rank**0.5
            cases = {f"{in_use} in use": min(in_use, num_slots)}
            if num_slots > in_use:
                cases["every slot in use"] = num_slots
            for case, used in cases.items():
                idx = batch_indices(num_tokens, num_slots, min(used, num_tokens))
                dev = [t.to(device) for t in (x, a, b, base, idx)]
                ops = {
                    "shrink": _shrink_formulations(dev[0], dev[1], dev[4]),
                    "layer": _layer_formulations(*dev),
                }
                for op, formulations in ops.items():
                    times = {name: time_device(fn, repeats) for name, fn in formulations.items()}
                    row = {"op": op, "T": num_tokens, "L": num_slots, "case": case, "seconds": times}
                    row["ratio_to_floor"] = {k: v / times["floor"] for k, v in times.items()}
                    rows.append(row)
                    progress(_format_row(row))
    return rows


def _format_row(row: dict) -> str:
    ratios = "  ".join(f"{k} {row['ratio_to_floor'][k]:5.2f}x" for k in FORMULATIONS if k in row["ratio_to_floor"])
    floor_ms = row["seconds"]["floor"] * 1e3
    return f"{row['op']:6s} T={row['T']:5d} L={row['L']:3d} {row['case']:18s} floor {floor_ms:7.3f} ms  {ratios}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench kernels", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--in-use", type=int, default=8, help="distinct adapters per batch")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.slots, args.hidden, args.repeats = [64], [8], 256, 2
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    import torch_xla_lora as tl

    print(f"device: {tl.ops.device_generation()}; D={args.hidden} R={args.rank}; times are medians of {args.repeats}")
    rows = run(args.tokens, args.slots, args.hidden, args.rank, args.in_use, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
