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

``--moe``: one routed expert layer of real MoE models instead (``tpu_model.moe_layer_costs``): the
base grouped matmuls against the same with expert LoRA, as a ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence

import numpy as np

from torch_xla_lora.bench import tpu_model


def batches(num_tokens: int, num_slots: int, in_use: int) -> dict[str, np.ndarray]:
    """Token -> slot layouts: contiguous requests, and every slot in use."""

    out = {f"{in_use} in use": tpu_model.contiguous_requests(num_tokens, num_slots, in_use)}
    if num_slots <= num_tokens and num_slots != in_use:
        out["every slot in use"] = tpu_model.contiguous_requests(num_tokens, num_slots, num_slots)
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


def run_fused_base(
    chips: Sequence[str],
    tokens: Sequence[int],
    slots: Sequence[int],
    rank: int,
    in_use: int,
    unfused_passes: bool = True,
    int8_base: bool = False,
):
    """The base matmul with LoRA: one K = N = 4096 projection, and one Llama-3-8B decoder layer (7 projections).

    Each row gives the base (XLA's matmuls at roofline) in us and what each LoRA formulation adds to it, in %.
    ``int8_base``: also the same with int8 per-channel base weights (keys ``int8_*``: the int8 base in us,
    the fused kernel reading int8 and the separate path against it, in %).
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
                layer = tpu_model.layer_costs(chip, indices, rank, num_slots, unfused_passes)
                unarranged = tpu_model.layer_costs(chip, indices, rank, num_slots, unfused_passes, False)
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
                            for k in ("fused", "fused_no_adapter", "separate", "onehot", "xla_native", "chosen")
                        },
                        "layer_chosen": chosen_label(layer["choices"]),
                        # The decoder not arranged (layers/fusion.py off): every Pallas call pays its passes.
                        "layer_fused_unarranged_pct": 100 * (unarranged["fused"] / layer["base"] - 1),
                        "layer_chosen_unarranged_pct": 100 * (unarranged["chosen"] / layer["base"] - 1),
                    }
                )
                if int8_base:
                    rows[-1].update(_int8_row(chip, indices, rank, num_slots, unfused_passes, layer))
    return rows


def pooled_layer_costs(chip, indices: np.ndarray, rank: int, num_slots: int, unfused_passes: bool = True) -> dict:
    """Seconds of one Llama-3-8B layer's projections with the adapters in a rank-true pool (``memory_budget``),
    each projection in the formulation ``base_fusion="auto"`` would choose, priced as a pooled layer runs it
    (:func:`tpu_model.layer_costs` with a :class:`tpu_model.PoolSpec`): fused reads the pool's pages
    (``linear_lora_pooled``), separate runs the pooled shrink-expand kernel, XLA-native gathers into slots.

    Keys ``(int8_base, int8_adapters)``: an int8 per-channel or bf16 base, an int8 (one byte an element and
    its page scales) or bf16 pool of a 6 GiB budget (:func:`pooled_model.pool_rows`); every adapter in use at
    its true rank ``rank``.
    """
    from torch_xla_lora.bench import pooled_model

    ranks = np.zeros(num_slots, np.int64)
    ranks[np.unique(indices[indices >= 0])] = rank
    out = {}
    for int8_base, int8_adapters in itertools.product((False, True), repeat=2):
        pool = tpu_model.PoolSpec(tuple(int(r) for r in ranks), int8_adapters, pooled_model.pool_rows(int8_adapters))
        costs = tpu_model.layer_costs(chip, indices, rank, num_slots, unfused_passes, int8_weight=int8_base, pool=pool)
        out[int8_base, int8_adapters] = costs["chosen"]
    return out


def _int8_row(
    chip, indices: np.ndarray, rank: int, num_slots: int, unfused_passes: bool, bf16_layer: dict | None = None
) -> dict:
    """The --int8-base keys of one --fused-base row: the projection and the layer on int8 per-channel bases,
    and LoRA's overhead over the int8 base beside the bf16 base's (``bf16_layer``: the row's bf16
    :func:`tpu_model.layer_costs`), with padded bf16 slots and with bf16 or int8 pools."""
    base = tpu_model.matmul_cost(chip, len(indices), 4096, 4096, int8_weight=True).seconds
    fused = tpu_model.fused_base_cost(chip, indices, 4096, 4096, rank, num_slots, int8_weight=True).seconds
    lora = tpu_model.fused_cost(chip, indices, 4096, 4096, rank, num_slots).seconds
    layer = tpu_model.layer_costs(chip, indices, rank, num_slots, unfused_passes, int8_weight=True)
    if bf16_layer is None:
        bf16_layer = tpu_model.layer_costs(chip, indices, rank, num_slots, unfused_passes)
    pooled = pooled_layer_costs(chip, indices, rank, num_slots, unfused_passes)
    bases = {False: bf16_layer["base"], True: layer["base"]}
    pooled_pct = {key: 100 * (seconds / bases[key[0]] - 1) for key, seconds in pooled.items()}
    chosen_pct = {
        int8: 100 * (costs["chosen"] / costs["base"] - 1) for int8, costs in ((False, bf16_layer), (True, layer))
    }
    return {
        # LoRA's overhead over the int8 base no larger than over the bf16 base (the Step 13b target), per row:
        # the chosen formulations with padded bf16 slots, and int8 pools on the int8 base vs bf16 pools on bf16.
        "int8_chosen_overhead_met": bool(chosen_pct[True] <= chosen_pct[False]),
        "layer_pooled_bf16_pct": pooled_pct[False, False],
        "layer_pooled_int8_pct": pooled_pct[False, True],
        "int8_layer_pooled_bf16_pct": pooled_pct[True, False],
        "int8_layer_pooled_int8_pct": pooled_pct[True, True],
        "int8_pooled_int8_overhead_met": bool(pooled_pct[True, True] <= pooled_pct[False, False]),
        "int8_proj_base_us": base * 1e6,
        "int8_proj_fused_pct": 100 * (fused / base - 1),
        "int8_proj_separate_pct": 100 * lora / base,
        "int8_layer_base_us": layer["base"] * 1e6,
        "int8_layer_fused_pct": 100 * (layer["fused"] / layer["base"] - 1),
        "int8_layer_separate_pct": 100 * (layer["separate"] / layer["base"] - 1),
        "int8_layer_chosen_pct": 100 * (layer["chosen"] / layer["base"] - 1),
        "int8_layer_chosen": chosen_label(layer["choices"]),
    }


def format_int8_table(rows: list[dict]) -> str:
    lines = [
        "| chip | T | L | int8 proj base (us) | proj fused | proj separate | int8 layer base (us) | layer fused | "
        "layer separate | layer chosen | chosen (q k v o gate up down) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chip']} | {r['T']} | {r['L']} | {r['int8_proj_base_us']:.1f} | {r['int8_proj_fused_pct']:+.1f}% | "
            f"{r['int8_proj_separate_pct']:+.1f}% | {r['int8_layer_base_us']:.1f} | "
            f"{r['int8_layer_fused_pct']:+.1f}% | {r['int8_layer_separate_pct']:+.1f}% | "
            f"{r['int8_layer_chosen_pct']:+.1f}% | {r['int8_layer_chosen']} |"
        )
    return "\n".join(lines)


def format_int8_overhead_table(rows: list[dict]) -> str:
    lines = [
        "| chip | T | L | bf16 layer base (us) | int8 layer base (us) | chosen over bf16 | chosen over int8 | "
        "no larger | pooled bf16 over bf16 | pooled int8 over bf16 | pooled bf16 over int8 | pooled int8 over int8 "
        "| int8 over int8 no larger than bf16 over bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    yes = {True: "yes", False: "NO"}
    for r in rows:
        lines.append(
            f"| {r['chip']} | {r['T']} | {r['L']} | {r['layer_base_us']:.1f} | {r['int8_layer_base_us']:.1f} | "
            f"{r['layer_chosen_pct']:+.1f}% | {r['int8_layer_chosen_pct']:+.1f}% | "
            f"{yes[r['int8_chosen_overhead_met']]} | {r['layer_pooled_bf16_pct']:+.1f}% | "
            f"{r['layer_pooled_int8_pct']:+.1f}% | {r['int8_layer_pooled_bf16_pct']:+.1f}% | "
            f"{r['int8_layer_pooled_int8_pct']:+.1f}% | {yes[r['int8_pooled_int8_overhead_met']]} |"
        )
    return "\n".join(lines)


# Projection shapes (in, out) of real models, for the plan sweep: Llama-3-8B's seven (Mistral-7B has
# the same), Qwen2-7B's and Gemma-7B's (16 heads of 256: q is wider than the hidden size).
SWEEP_SHAPES = {
    "llama3-8b": sorted({(k, n) for k, n, _ in tpu_model.LLAMA3_8B_LAYER.values()}),
    "qwen2-7b": [(3584, 3584), (3584, 512), (3584, 18944), (18944, 3584)],
    "gemma-7b": [(3072, 4096), (4096, 3072), (3072, 24576), (24576, 3072)],
}


def slot_sweep(
    chips: Sequence[str], tokens: Sequence[int], ranks: Sequence[int], slots: Sequence[int], in_use: int
) -> list[dict]:
    """How the fused base kernel's modelled cost moves as the slot count grows, the batch fixed.

    For each (chip, T, rank, model, shape) and each batch size b in (1, ``in_use``): b requests on b
    adapters, walked over every slot count L >= b of ``slots``. The same adapters are read whatever
    L is, so any rise from one slot count to the next is the plan's doing (lanes, VMEM, tiling). A
    row gives the worst such rise (in % of the base matmul) and where it happens.
    """
    rows = []
    cases = [(model, shape) for model, shapes in SWEEP_SHAPES.items() for shape in shapes]
    for chip_name, num_tokens, rank, (model, (hidden, out_dim)) in itertools.product(chips, tokens, ranks, cases):
        chip = tpu_model.CHIPS[chip_name]
        base = tpu_model.matmul_cost(chip, num_tokens, hidden, out_dim).seconds
        worst, at = 0.0, None
        for used in sorted({1, min(in_use, num_tokens)}):
            previous = None
            for num_slots in (s for s in slots if s >= used):
                indices = tpu_model.contiguous_requests(num_tokens, num_slots, used)
                cost = tpu_model.fused_base_cost(chip, indices, hidden, out_dim, rank, num_slots)
                if cost is None:
                    continue
                if previous is not None and cost.seconds - previous[0] > worst:
                    worst, at = cost.seconds - previous[0], (used, previous[1], num_slots)
                previous = (cost.seconds, num_slots)
        rows.append(
            {
                "chip": chip_name,
                "T": num_tokens,
                "R": rank,
                "model": model,
                "K": hidden,
                "N": out_dim,
                "worst_rise_pct": 100 * worst / base,
                "worst_at": at,  # (adapters in use, L before, L after)
            }
        )
    return rows


def run_moe(chips: Sequence[str], tokens: Sequence[int], slots: Sequence[int], rank: int, in_use: int) -> list[dict]:
    """One routed expert layer of each ``tpu_grid.MOE_MODELS`` model: the base grouped matmuls and what the
    expert LoRA adds (``tpu_model.moe_layer_costs``), T tokens routed top-k over a balanced routing, with the
    kernel the op plans per projection and, beside it, both projections on the fused or the separate kernels."""
    from torch_xla_lora.bench import tpu_grid
    from torch_xla_lora.kernels import fused

    rows = []
    for chip_name, (model, shape), num_tokens, num_slots in itertools.product(
        chips, tpu_grid.MOE_MODELS.items(), tokens, slots
    ):
        chip = tpu_model.CHIPS[chip_name]
        cost = tpu_model.moe_layer_costs(
            chip, num_tokens, shape.hidden, shape.intermediate, shape.experts, shape.top_k, rank, num_slots, in_use
        )
        aligned = fused.lane_aligned(shape.hidden, 2 * shape.intermediate) and fused.lane_aligned(
            shape.intermediate, shape.hidden
        )  # else the kernels read the layer's lane-padded slots (tpu_model.expert_lora_cost)
        up, down = cost["kernels"]
        kernel = up if up == down else f"up {up}, down {down}"
        rows.append(
            {
                "chip": chip_name,
                "model": model,
                "T": num_tokens,
                "L": num_slots,
                "routed_rows": cost["rows"],
                "pairs": cost["pairs"],
                "lora_kernel": kernel if aligned else f"{kernel}, padded rows",
                "base_us": cost["base"] * 1e6,
                "lora_us": cost["lora"] * 1e6,
                "with_lora_ratio": (cost["base"] + cost["lora"]) / cost["base"],
                "fused_ratio": (cost["base"] + cost["lora_fused"]) / cost["base"],
                "separate_ratio": (cost["base"] + cost["lora_separate"]) / cost["base"],
            }
        )
    return rows


def format_moe_table(rows: list[dict]) -> str:
    lines = [
        "| chip | model | T | routed rows | (slot, expert) pairs | LoRA kernel (planned) | base (us) "
        "| + expert LoRA (us) | with LoRA / base | all fused / base | all separate / base |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chip']} | {r['model']} | {r['T']} | {r['routed_rows']:,} | {r['pairs']} | {r['lora_kernel']} | "
            f"{r['base_us']:.1f} | {r['lora_us']:.1f} | {r['with_lora_ratio']:.2f} | {r['fused_ratio']:.2f} | "
            f"{r['separate_ratio']:.2f} |"
        )
    return "\n".join(lines)


_SHORT = {"fused": "F", "separate": "S", "xla_native": "X"}


def chosen_label(choices: dict[str, str]) -> str:
    """One letter per projection in layer order (F fused, S separate, X XLA-native), e.g. "XXXFFFF"."""
    return "".join(_SHORT[choices[name]] for name in tpu_model.LLAMA3_8B_LAYER)


def format_fused_base_table(rows: list[dict]) -> str:
    lines = [
        "| chip | T | L | proj base (us) | proj fused | proj fused, no adapter | proj separate | "
        "layer base (us) | layer fused | layer fused, no adapter | layer separate | layer XLA-native | "
        "layer one-hot | layer chosen | chosen (q k v o gate up down) | layer fused, chosen: decoder not arranged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chip']} | {r['T']} | {r['L']} | {r['proj_base_us']:.1f} | {r['proj_fused_pct']:+.1f}% | "
            f"{r['proj_fused_no_adapter_pct']:+.1f}% | {r['proj_separate_pct']:+.1f}% | {r['layer_base_us']:.1f} | "
            f"{r['layer_fused_pct']:+.1f}% | {r['layer_fused_no_adapter_pct']:+.1f}% | "
            f"{r['layer_separate_pct']:+.1f}% | {r['layer_xla_native_pct']:+.1f}% | {r['layer_onehot_pct']:+.1f}% | "
            f"{r['layer_chosen_pct']:+.1f}% | {r['layer_chosen']} | "
            f"{r['layer_fused_unarranged_pct']:+.1f}%, {r['layer_chosen_unarranged_pct']:+.1f}% |"
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


def _write_json(args: argparse.Namespace, rows: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


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
    parser.add_argument(
        "--slot-sweep",
        action="store_true",
        help="sweep the fused base kernel's plan over every slot count (--slots default 1-128), ranks 4-64 and "
        "real models' projection shapes, batches of 1 and --in-use adapters; report the worst rise in modelled "
        "cost as slots grow",
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="ranks of --slot-sweep")
    parser.add_argument(
        "--without-unfused-passes",
        action="store_true",
        help="--fused-base: price the Pallas formulations as if they took x's producer (norm scale, SiLU*up) and "
        "the residual add in, as XLA's own dot does (what a decoder-level kernel would cost)",
    )
    parser.add_argument(
        "--moe",
        action="store_true",
        help="model one routed expert layer of Mixtral-8x7B, Qwen3-30B-A3B, gpt-oss-20b and DeepSeek-V2-Lite: "
        "the base grouped matmuls vs with expert LoRA (--tokens default 16 128 1024 4096, --slots default 8)",
    )
    parser.add_argument(
        "--int8-base",
        action="store_true",
        help="--fused-base: also price int8 per-channel base weights (the fused kernel reads them as int8), "
        "in a second table and the rows' int8_* keys",
    )
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.moe:
        if args.tokens == parser.get_default("tokens"):
            args.tokens = [16, 128, 1024, 4096]
        if args.slots == parser.get_default("slots"):
            args.slots = [8]
        if args.quick:
            args.chips, args.tokens = ["v6e"], [128]
        rows = run_moe(args.chips, args.tokens, args.slots, args.rank, args.in_use)
        print(
            f"TPU cost model, one routed expert layer (bfloat16): the up and down grouped matmuls at their roofline "
            f"(each expert's weight read once), and the expert LoRA (R={args.rank}, {args.in_use} adapters in use, "
            "every (slot, expert) entry of the sorted rows) the layer adds, on the kernel the op plans per projection "
            "(the cheaper of fused and separate by this model), and with both projections on either; balanced routing"
        )
        print(format_moe_table(rows))
        _write_json(args, rows)
        return 0
    if args.slot_sweep:
        slots = list(range(1, 129)) if args.slots == parser.get_default("slots") else args.slots
        if args.quick:
            args.chips, args.tokens, args.ranks, slots = ["v6e"], [1024], [16], [8, 16, 64]
        rows = slot_sweep(args.chips, args.tokens, args.ranks, slots, args.in_use)
        worst = max(rows, key=lambda r: r["worst_rise_pct"])
        where = "no case rises"
        if worst["worst_at"] is not None:
            where = (
                f"{worst['chip']}, T={worst['T']}, R={worst['R']}, {worst['model']} K={worst['K']} N={worst['N']}; "
                f"adapters in use, L from, L to: {worst['worst_at']}"
            )
        print(
            f"Fused base kernel plans over slot counts {slots[0]}-{slots[-1]} ({len(rows)} chip/T/rank/shape "
            f"cases; batches of 1 and {args.in_use} adapters): worst rise as slots grow "
            f"{worst['worst_rise_pct']:.2f}% of the base matmul ({where})"
        )
        _write_json(args, rows)
        return 0
    if args.quick:
        args.chips, args.tokens, args.slots = ["v6e"], [256], [8, 64]
    if args.fused_base:
        rows = run_fused_base(
            args.chips, args.tokens, args.slots, args.rank, args.in_use, not args.without_unfused_passes, args.int8_base
        )
        print(
            f"TPU cost model, base matmul + LoRA (R={args.rank}, {args.in_use} adapters in use, bfloat16): "
            "the base in us, and what LoRA adds to it (fused: linear_lora's kernel; separate: XLA's matmul "
            "then today's fused LoRA op; layer: the 7 projections of a Llama-3-8B layer with the passes XLA "
            "can no longer fuse)"
        )
        print(format_fused_base_table(rows))
        if args.int8_base:
            print("\nThe same on int8 per-channel base weights (torch_xla's quantized matmul at its roofline as base):")
            print(format_int8_table(rows))
            print(
                "\nLoRA's overhead over the int8 base beside the bf16 base (Llama-3-8B layer): the chosen formulations "
                "with padded bf16 slots, and with the adapters in a rank-true pool of bf16 or int8 rows, each "
                "projection's formulation chosen as a pooled layer runs it (fused: the one-pass kernel reading the "
                "pool's pages; every adapter at rank R)"
            )
            print(format_int8_overhead_table(rows))
        _write_json(args, rows)
        return 0
    rows = run(args.chips, args.tokens, args.slots, args.hidden, args.rank, args.in_use)
    print(f"TPU cost model, one LoRA layer (fused shrink-expand), D=Dout={args.hidden}, R={args.rank}, bfloat16")
    print(format_table(rows))
    _write_json(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
