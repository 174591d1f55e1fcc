"""``python -m torch_xla_lora.bench kernels``: wall-clock of the BGMV formulations, side by side.

One process, one device (the XLA device, CPU PJRT by default), the same shapes
for every formulation; times are device execution of an already compiled
graph (each call is synchronised; results stay on the device) and reported as
ratios to the floor, since the machine is shared and noisy:

- ours: the library's ops with the device's default backend;
- gather: gather each token's weights, then einsum (``x`` with ``W[idx]``);
- onehot: the one-hot einsum over every slot (vLLM's TPU formulation);
- floor: one dense matmul of the same tokens by a single adapter.

Batches (``case``): "N in use" = N requests of contiguous tokens (prefill);
"N interleaved" = token t on request t mod N (decode: every row another
request); "every slot in use" = L contiguous requests (the worst prefill).

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
LAYOUTS = ("contiguous", "interleaved", "every")


def batch_indices(num_tokens: int, num_slots: int, in_use: int, interleaved: bool = False) -> torch.Tensor:
    """Slots of ``in_use`` requests spread over the ``num_slots`` slots.

    Contiguous (prefill layout: each request's tokens together) or, with
    ``interleaved``, token t on request t mod ``in_use`` (decode layout).
    """
    tokens = torch.arange(num_tokens)
    request = tokens % in_use if interleaved else tokens * in_use // num_tokens
    return (request * (num_slots // in_use)).to(torch.int32)


def _cases(num_tokens: int, num_slots: int, in_use: int, layouts: Sequence[str]) -> dict[str, torch.Tensor]:
    used = min(in_use, num_slots, num_tokens)
    cases = {}
    if "contiguous" in layouts:
        cases[f"{used} in use"] = batch_indices(num_tokens, num_slots, used)
    if "interleaved" in layouts:
        cases[f"{used} interleaved"] = batch_indices(num_tokens, num_slots, used, interleaved=True)
    if "every" in layouts and num_slots > in_use:
        cases["every slot in use"] = batch_indices(num_tokens, num_slots, min(num_slots, num_tokens))
    return cases


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


def _once(fn: Callable[[], torch.Tensor]) -> float:
    import torch_xla
    import torch_xla.core.xla_model as xm

    start = time.perf_counter()
    out = fn()
    torch_xla.sync()
    xm.wait_device_ops()
    del out
    return time.perf_counter() - start


def time_side_by_side(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, the functions run in turn within each repetition.

    On a shared machine whose speed drifts, running them in turn (rather than
    all repetitions of one, then the next) keeps the drift out of the ratios.
    """
    for fn in fns.values():
        for _ in range(warmup):
            _once(fn)
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds[name].append(_once(fn))
    return {name: statistics.median(values) for name, values in seconds.items()}


def run(
    tokens: Sequence[int],
    slots: Sequence[int],
    hidden: int,
    rank: int,
    in_use: int,
    repeats: int,
    progress=print,
    layouts: Sequence[str] = LAYOUTS,
    ops: Sequence[str] = ("shrink", "layer"),
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
            for case, idx in _cases(num_tokens, num_slots, in_use, layouts).items():
                dev = [t.to(device) for t in (x, a, b, base, idx)]
                kinds = {
                    "shrink": lambda dev=dev: _shrink_formulations(dev[0], dev[1], dev[4]),
                    "layer": lambda dev=dev: _layer_formulations(*dev),
                }
                for op in ops:
                    formulations = kinds[op]()
                    times = time_side_by_side(formulations, repeats)
                    row = {"op": op, "T": num_tokens, "L": num_slots, "case": case, "seconds": times}
                    row["ratio_to_floor"] = {k: v / times["floor"] for k, v in times.items()}
                    rows.append(row)
                    progress(_format_row(row))
    return rows


def _format_row(row: dict) -> str:
    ratios = "  ".join(f"{k} {row['ratio_to_floor'][k]:5.2f}x" for k in FORMULATIONS if k in row["ratio_to_floor"])
    floor_ms = row["seconds"]["floor"] * 1e3
    vs_onehot = row["seconds"]["ours"] / row["seconds"]["onehot"]
    return (
        f"{row['op']:6s} T={row['T']:5d} L={row['L']:3d} {row['case']:18s} floor {floor_ms:7.3f} ms  {ratios}"
        f"  ours/onehot {vs_onehot:5.2f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench kernels", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--in-use", type=int, default=8, help="distinct adapters per batch")
    parser.add_argument(
        "--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="batch layouts (default: all)"
    )
    parser.add_argument("--ops", nargs="+", choices=("shrink", "layer"), default=["shrink", "layer"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.slots, args.hidden, args.repeats = [64], [8], 256, 2
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    import torch_xla_lora as tl

    print(f"device: {tl.ops.device_generation()}; D={args.hidden} R={args.rank}; times are medians of {args.repeats}")
    rows = run(
        args.tokens, args.slots, args.hidden, args.rank, args.in_use, args.repeats, layouts=args.layouts, ops=args.ops
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
