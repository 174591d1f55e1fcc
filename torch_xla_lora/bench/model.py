"""``python -m torch_xla_lora.bench model``: the TPU cost model of one LoRA layer, side by side.

For each chip (v5e, v6e), token count T and slot count L, with D = Dout and
rank R in bfloat16, the table gives the estimated time of

- ours: the fused shrink-expand kernel, walked step by step from its own grid
  and BlockSpecs (see ``tpu_model``);
- onehot: the one-hot einsum (every slot's weights read, L times the MXU work);
- floor: read x, base and the adapters in use once, write the output once;

as ratios to the floor, for a batch of ``--in-use`` requests with contiguous
tokens (prefill), a decode batch (one token per request) and the worst case
(every slot in use).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from torch_xla_lora.bench import tpu_model


def batches(num_tokens: int, num_slots: int, in_use: int) -> dict[str, np.ndarray]:
    """Token -> slot layouts: contiguous requests, and every slot in use."""

    def spread(used: int) -> np.ndarray:
        used = max(1, min(used, num_tokens, num_slots))
        return ((np.arange(num_tokens) * used // num_tokens) * (num_slots // used)).astype(np.int32)

    out = {f"{in_use} in use": spread(in_use)}
    if num_slots <= num_tokens and num_slots != in_use:
        out["every slot in use"] = spread(num_slots)
    return out


def run(chips: Sequence[str], tokens: Sequence[int], slots: Sequence[int], hidden: int, rank: int, in_use: int):
    rows = []
    for chip_name in chips:
        chip = tpu_model.CHIPS[chip_name]
        for num_tokens in tokens:
            for num_slots in slots:
                for case, indices in batches(num_tokens, num_slots, in_use).items():
                    ours = tpu_model.fused_cost(chip, indices, hidden, hidden, rank, num_slots)
                    onehot = tpu_model.onehot_cost(chip, num_tokens, hidden, hidden, rank, num_slots)
                    floor = tpu_model.floor_cost(chip, indices, hidden, hidden, rank)
                    rows.append(
                        {
                            "chip": chip_name,
                            "T": num_tokens,
                            "L": num_slots,
                            "case": case,
                            "floor_us": floor.seconds * 1e6,
                            "ours_us": ours.seconds * 1e6,
                            "onehot_us": onehot.seconds * 1e6,
                            "ours_ratio": ours.seconds / floor.seconds,
                            "onehot_ratio": onehot.seconds / floor.seconds,
                            "ours_steps": ours.steps,
                            "ours_bytes": ours.pipelined_bytes + ours.manual_bytes,
                        }
                    )
    return rows


def run_fused_base(chips: Sequence[str], tokens: Sequence[int], slots: Sequence[int], rank: int, in_use: int):
    """The base matmul with LoRA: one K = N = 4096 projection, and one Llama-3-8B decoder layer (7 projections).

    Each row gives the base (XLA's matmuls at roofline) in us and what each LoRA formulation adds to it, in %.
    """
    rows = []
    for chip_name in chips:
        chip = tpu_model.CHIPS[chip_name]
        for num_tokens in tokens:
            for num_slots in slots:
                indices = batches(num_tokens, num_slots, in_use)[f"{in_use} in use"]
                base = tpu_model.matmul_cost(chip, num_tokens, 4096, 4096).seconds
                fused = tpu_model.fused_base_cost(chip, indices, 4096, 4096, rank, num_slots).seconds
                plain = tpu_model.fused_base_cost(chip, indices * 0 - 1, 4096, 4096, rank, num_slots).seconds
                lora = tpu_model.fused_cost(chip, indices, 4096, 4096, rank, num_slots).seconds
                layer = tpu_model.layer_costs(chip, indices, rank, num_slots)
                rows.append(
                    {
                        "chip": chip_name,
                        "T": num_tokens,
                        "L": num_slots,
                        "proj_base_us": base * 1e6,
                        "proj_fused_pct": 100 * (fused / base - 1),
                        "proj_fused_no_adapter_pct": 100 * (plain / base - 1),
                        "proj_separate_pct": 100 * lora / base,
                        "layer_base_us": layer["base"] * 1e6,
                        **{
                            f"layer_{k}_pct": 100 * (layer[k] / layer["base"] - 1)
                            for k in ("fused", "fused_no_adapter", "separate", "onehot")
                        },
                    }
                )
    return rows


def format_fused_base_table(rows: list[dict]) -> str:
    lines = [
        "| chip | T | L | proj base (us) | proj fused | proj fused, no adapter | proj separate | "
        "layer base (us) | layer fused | layer fused, no adapter | layer separate | layer one-hot |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chip']} | {r['T']} | {r['L']} | {r['proj_base_us']:.1f} | {r['proj_fused_pct']:+.1f}% | "
            f"{r['proj_fused_no_adapter_pct']:+.1f}% | {r['proj_separate_pct']:+.1f}% | {r['layer_base_us']:.1f} | "
            f"{r['layer_fused_pct']:+.1f}% | {r['layer_fused_no_adapter_pct']:+.1f}% | "
            f"{r['layer_separate_pct']:+.1f}% | {r['layer_onehot_pct']:+.1f}% |"
        )
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    lines = [
        "| chip | T | L | batch | floor (us) | ours (us) | ours / floor | one-hot / floor | grid steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chip']} | {r['T']} | {r['L']} | {r['case']} | {r['floor_us']:.2f} | {r['ours_us']:.2f} | "
            f"{r['ours_ratio']:.2f} | {r['onehot_ratio']:.2f} | {r['ours_steps']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench model", description=__doc__)
    parser.add_argument("--chips", nargs="+", default=["v5e", "v6e"], choices=sorted(tpu_model.CHIPS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 256, 1024, 4096])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 16, 64, 128])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--in-use", type=int, default=8, help="distinct adapters per batch")
    parser.add_argument("--quick", action="store_true", help="one small configuration, for a smoke run")
    parser.add_argument(
        "--fused-base",
        action="store_true",
        help="model the base matmul with LoRA instead: one K=N=4096 projection and a Llama-3-8B layer",
    )
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.chips, args.tokens, args.slots = ["v6e"], [256], [8, 64]
    if args.fused_base:
        rows = run_fused_base(args.chips, args.tokens, args.slots, args.rank, args.in_use)
        print(
            f"TPU cost model, base matmul + LoRA (R={args.rank}, {args.in_use} adapters in use, bfloat16): "
            "the base in us, and what LoRA adds to it (fused: linear_lora's kernel; separate: XLA's matmul "
            "then today's fused LoRA op; layer: the 7 projections of a Llama-3-8B layer with the passes XLA "
            "can no longer fuse)"
        )
        print(format_fused_base_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
        return 0
    rows = run(args.chips, args.tokens, args.slots, args.hidden, args.rank, args.in_use)
    print(f"TPU cost model, one LoRA layer (fused shrink-expand), D=Dout={args.hidden}, R={args.rank}, bfloat16")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
