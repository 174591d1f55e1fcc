"""``python -m torch_xla_lora.bench moe``: the LoRA slowdown of a small MoE model next to a dense one.

By default one run, one device, the same batch for every row:

- dense: a Llama, base against LoRA on every linear layer;
- moe: a Mixtral of the same width (``experts_implementation="batched_mm"``), base against LoRA on the
  attention only, and against LoRA on every linear layer *and* the fused experts and routers
  (what PEFT 0.21's ``"all-linear"`` trains on Mixtral).

Each row is the median of ``--reps`` warmed-up forward passes (one XLA graph each, compiled by
``LoRAModel.warmup``), the cases taken in turn, with the batch rows spread over every slot and the
base model. Slots hold zeros: the cost does not depend on the values. Times are this machine's; the
ratios are the result.

``--targets``: the grouped experts against transformers' own experts implementations, on a Mixtral
built with ``--hidden``, ``--experts``, ``--expert-width``, ``--top-k``, ``--layers`` (the same random
weights in every model), one batch of ``--batch`` x ``--seq`` tokens, paired in one process:

- ``batched_mm base``: unpatched, ``experts_implementation="batched_mm"`` (a weight gathered per routed
  row; skipped, with the size it would gather, past ``--gather-limit-gib``);
- ``eager base``: unpatched, ``experts_implementation="eager"`` (a loop over the experts hit);
- the model patched with expert LoRA only (``target_modules=["experts"]``), three ways: ``no batch``
  (no batch set: the grouped base path replaces ``batched_mm``), ``base-only batch`` (every row on the
  base model) and ``expert LoRA`` (rows spread over every slot and the base model).

Times are medians of ``--reps`` warmed-up forward passes taken in turn. Memory is the resident set of a
process of its own per case (Linux ``/proc/self/status``; one process holding every model would mix
their allocations, and XLA:CPU keeps some of an executable's buffers between calls). The baseline is
read once the XLA runtime started and JAX is imported (the library's ops use it, the bases do not),
after freed heap memory went back to the kernel (``malloc_trim``); the case is then built, compiled
and run once, the heap trimmed again and the resident set read: *resident* is its rise over the
baseline (weights and slot buffers on the XLA:CPU device, executables, runtime state). The peak is
reset (``/proc/self/clear_refs``) and one forward runs: *forward peak* is ``VmHWM`` over *resident*,
*total* the two together. The three targets of the grouped experts are checked on these figures and
printed with the table; the logits of every case are compared with the eager base's (the slots hold
zeros, so the LoRA case computes the base model too).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence

import torch

from torch_xla_lora import LoRAConfig, patch_model

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(kind: str, hidden: int, layers: int, experts: int, top_k: int) -> torch.nn.Module:
    import transformers

    common = {
        "vocab_size": 256,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "num_key_value_heads": max(1, hidden // 128),
    }
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dense":
            # The dense MLP does the work of the top_k experts a token visits.
            config = transformers.LlamaConfig(intermediate_size=2 * hidden * top_k, **common)
            return transformers.LlamaForCausalLM(config).eval()
        config = transformers.MixtralConfig(
            intermediate_size=2 * hidden, num_local_experts=experts, num_experts_per_tok=top_k, **common
        )
        config._experts_implementation = "batched_mm"  # what runs on XLA
        return transformers.MixtralForCausalLM(config).eval()


def prepare(kind: str, targets, args, device: torch.device):
    """A compiled forward step of the model, patched with ``targets`` (None: unpatched)."""
    import torch_xla

    model = build(kind, args.hidden, args.layers, args.experts, args.top_k).to(device)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        with torch.no_grad():
            out = model(ids, use_cache=False).logits
            torch_xla.sync()
        return out

    if targets is not None:
        lora = patch_model(model, LoRAConfig(max_loras=args.slots, max_rank=args.rank, target_modules=targets))
        lora.warmup([args.batch], [args.seq], step=lambda _: step(), progress=False)
        lora.set_batch([i % (args.slots + 1) - 1 for i in range(args.batch)])
    step()  # compiles the unpatched model; a no-op recompile check for the patched ones
    return step


def run(args) -> list[dict]:
    import torch_xla
    import torch_xla.core.xla_model as xm

    device = torch_xla.device()
    cases = [
        ("dense", "base", None),
        ("dense", "LoRA all-linear", "all-linear"),
        ("moe", "base", None),
        ("moe", "LoRA attention", ATTENTION),
        ("moe", "LoRA all-linear + experts + router", "all-linear"),
    ]
    steps = [prepare(kind, targets, args, device) for kind, _, targets in cases]
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(args.reps):  # round robin: load on a shared machine hits every case alike
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            xm.wait_device_ops()
            times[i].append(time.perf_counter() - start)
    rows, base = [], {}
    for (kind, label, _), samples in zip(cases, times, strict=True):
        seconds = statistics.median(samples)
        base.setdefault(kind, seconds)
        rows.append({"model": kind, "case": label, "ms": seconds * 1e3, "vs_base": seconds / base[kind]})
    return rows


# -- --targets: the grouped experts against transformers' implementations ---------------------------------


def build_sized(args, implementation: str) -> torch.nn.Module:
    """A random Mixtral of the ``--targets`` size; the same weights for every ``implementation``."""
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    config._experts_implementation = implementation
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.MixtralForCausalLM(config).eval()


def gathered_gib(args) -> float:
    """GiB of expert weights ``batched_mm`` gathers for the batch's routed rows (up and down projections)."""
    rows = args.batch * args.seq * args.top_k
    per_row = 2 * args.expert_width * args.hidden + args.hidden * args.expert_width  # gate_up, down
    return rows * per_row * 4 / 2**30


CASES = ("batched_mm base", "eager base", "patched, no batch", "patched, base-only batch", "patched, expert LoRA")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M).group(1))


def _trimmed_rss_kib() -> int:
    """The resident set after freed heap memory went back to the kernel (``malloc_trim``)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_kib("VmRSS")


def prepare_cases(args, names, outputs: dict) -> list[tuple[str, object]]:
    """(name, step) of each case of ``names``, compiled: one forward on the XLA device storing its logits."""
    import torch_xla

    device = torch_xla.device()
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def stepper(name: str, model: torch.nn.Module, before=None):
        def step():
            if before is not None:
                before()
            with torch.no_grad():
                outputs[name] = model(ids, use_cache=False).logits
                torch_xla.sync()

        return step

    cases, lora = [], None
    for name in names:
        if name.endswith(" base"):
            model = build_sized(args, name.removesuffix(" base")).to(device)
            cases.append((name, stepper(name, model)))
            continue
        if lora is None:  # one patched model for its three cases
            patched = build_sized(args, "batched_mm").to(device)
            config = LoRAConfig(max_loras=args.slots, max_rank=args.rank, target_modules=["experts"])
            lora = patch_model(patched, config)
            lora.warmup([args.batch], [args.seq], step=lambda _, m=patched: stepper("warmup", m)(), progress=False)
        if name == "patched, no batch":
            before = lora.clear_batch
        elif name == "patched, base-only batch":
            before = functools.partial(lora.set_batch, [None] * args.batch)
        else:  # rows spread over every slot and the base model
            before = functools.partial(lora.set_batch, [i % (args.slots + 1) - 1 for i in range(args.batch)])
        cases.append((name, stepper(name, patched, before)))
    for _, step in cases:
        step()  # compiles what warmup did not (the unpatched models, the patched model without a batch)
    return cases


def measure_memory(args) -> dict:
    """The ``--memory-case`` process: MiB of one case's model and runtime state, and of its forward's peak."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    torch_xla.device()
    import jax.numpy  # noqa: F401  (the library's ops bring JAX in: in every case's baseline alike)

    baseline = _trimmed_rss_kib()  # the runtime started, no model yet
    ((_, step),) = prepare_cases(args, [args.memory_case], {})
    step()
    before = _trimmed_rss_kib()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set
    step()
    xm.wait_device_ops()
    peak = _status_kib("VmHWM")
    return {
        "resident_mib": (before - baseline) / 1024,
        "forward_peak_mib": (peak - before) / 1024,
        "total_mib": (peak - baseline) / 1024,
    }


def _memory_in_own_process(args, name: str) -> dict:
    keys = ("hidden", "expert_width", "experts", "top_k", "layers", "batch", "seq", "slots", "rank")
    options = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in keys]
    command = [sys.executable, "-m", "torch_xla_lora.bench", "moe", "--targets", *options, f"--memory-case={name}"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_targets(args) -> tuple[list[dict], dict]:
    """(one row per case, the targets): see the module docstring."""
    import torch_xla.core.xla_model as xm

    names = [name for name in CASES if name != "batched_mm base" or gathered_gib(args) <= args.gather_limit_gib]
    outputs: dict[str, torch.Tensor] = {}
    cases = prepare_cases(args, names, outputs)
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(args.reps):  # round robin: load on a shared machine hits every case alike
        for i, (_, step) in enumerate(cases):
            start = time.perf_counter()
            step()
            xm.wait_device_ops()
            times[i].append(time.perf_counter() - start)
    reference = outputs["eager base"].cpu()
    rows = []
    for name, samples in zip(names, times, strict=True):
        row = {"case": name, "ms": statistics.median(samples) * 1e3}
        # Every case against the eager base: the LoRA case's slots hold zeros, so its output is the base's too.
        row["max_abs_diff_vs_eager"] = float((outputs[name].cpu() - reference).abs().max())
        rows.append(row | _memory_in_own_process(args, name))
    by_case = {row["case"]: row for row in rows}
    lora_row = by_case["patched, expert LoRA"]
    batched = by_case.get("batched_mm base")
    targets = {
        "gathered_gib": gathered_gib(args),
        "skipped": not batched,
        "lora_vs_batched_mm_speedup": batched["ms"] / lora_row["ms"] if batched else None,
        "lora_total_vs_eager_total": lora_row["total_mib"] / by_case["eager base"]["total_mib"],
        "lora_vs_base_only": lora_row["ms"] / by_case["patched, base-only batch"]["ms"],
    }
    return rows, targets


def format_targets(rows: list[dict], targets: dict) -> str:
    lines = [
        "| case | ms / forward | resident MiB | forward peak MiB | total MiB | max abs diff vs eager |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['ms']:.1f} | {r['resident_mib']:.0f} | {r['forward_peak_mib']:.0f} "
        f"| {r['total_mib']:.0f} | {r['max_abs_diff_vs_eager']:.1e} |"
        for r in rows
    ]
    lines.append("")
    gathered = f"{targets['gathered_gib']:.1f} GiB of expert weights"
    lines.append(f"batched_mm base: skipped, it would gather {gathered}" if targets["skipped"] else
                 f"batched_mm base gathers {gathered} per forward")  # fmt: skip
    speedup = targets["lora_vs_batched_mm_speedup"]
    if speedup is not None:
        verdict = "met" if speedup >= 2 else "MISSED"
        lines.append(f"expert LoRA vs batched_mm base: {speedup:.1f}x faster (target >= 2x: {verdict})")
    memory = targets["lora_total_vs_eager_total"]
    verdict = "met" if memory <= 1.1 else "MISSED"
    lines.append(f"expert LoRA total memory vs eager base: {memory:.2f}x (target <= 1.10x: {verdict})")
    overhead = targets["lora_vs_base_only"]
    verdict = "met" if overhead <= 1.1 else "MISSED"
    lines.append(f"expert LoRA vs patched base-only batch: {overhead:.2f}x (target <= 1.10x: {verdict})")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    lines = ["| model | LoRA | ms / forward | vs base |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['case']} | {r['ms']:.2f} | {r['vs_base']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench moe", description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=None, help="default 128 (1024 with --targets)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="default 32 (256 with --targets)")
    parser.add_argument("--slots", type=int, default=4, help="max_loras")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=None, help="default 10 (3 with --targets)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--targets",
        action="store_true",
        help="the grouped experts against transformers' batched_mm and eager bases (see the module docstring)",
    )
    parser.add_argument("--expert-width", type=int, default=2816, help="expert intermediate size (--targets)")
    parser.add_argument("--gather-limit-gib", type=float, default=6.0, help="skip batched_mm past this (--targets)")
    parser.add_argument("--memory-case", choices=CASES, help=argparse.SUPPRESS)  # the per-case memory process
    args = parser.parse_args(argv)
    defaults = {"hidden": (128, 1024), "seq": (32, 256), "reps": (10, 3)}
    for name, (default, sized) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, sized if args.targets else default)
    if args.memory_case:
        print(json.dumps(measure_memory(args)))
        return 0
    if args.targets:
        rows, targets = run_targets(args)
        print(json.dumps({"rows": rows, "targets": targets}, indent=1) if args.json else format_targets(rows, targets))
        return 0
    rows = run(args)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
