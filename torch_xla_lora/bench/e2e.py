"""End-to-end benchmark: whole generation (prefill + decode with a KV cache) of a Llama with and without LoRA.

``python -m torch_xla_lora.bench e2e`` measures, on one random-weight Llama
with transformers' ``StaticCache``, three formulations side by side:

- base: no adapter set (``lora.clear_batch()``);
- LoRA: every request of a batch on another adapter, through this library's layers;
- one-hot: the same layers with their LoRA ops swapped for vLLM's TPU one-hot
  einsums (:func:`~torch_xla_lora.bench.e2e_model.onehot_formulation`);
- with ``--compare-fusion``, fused: the LoRA layers with ``base_fusion`` on
  (the base matmul and the LoRA as one ``linear_lora`` op,
  :func:`~torch_xla_lora.bench.e2e_model.fused_formulation`), so the two
  LoRA paths are paired in the same repetitions;
- with ``--compare-pool``, pool and pool int8: the same adapters in
  rank-true storage (``LoRAConfig.memory_budget``, float rows and
  ``weight_dtype="int8"``) on a second patch of the model sharing its
  weights (:func:`~torch_xla_lora.bench.e2e_model.patch_pool`), the budget
  exactly what the pools' accounting needs for every adapter, so nothing is
  evicted; each is reported per cell as its time over LoRA's (padded slots),
  paired repetition by repetition.

Three parts:

- the generation grid: for every (batch size, input length), the prefill
  forward (cache written, last position's logits) and a decode step (one token
  per request, the cache as long as the input plus the longest output) are
  timed; a generation of ``out`` tokens takes prefill + out x decode step
  (a static cache has the same shapes at every position, so every decode
  step runs the same graph); throughput and slowdown per (batch, input,
  output length);
- the slot sweep: the decode step of ``decode_batch`` requests whose
  ``num_adapters`` adapters interleave row by row, and a prefill of
  ``slot_batch`` x ``slot_seq``, with each number of device slots
  (``max_loras``);
- a correctness check on fresh caches: prefill then one decode step equals a
  full forward without cache, for every formulation but base; and with
  ``--compare-pool`` the int8 pool's cached logits against the float pool's
  full forward, at a tolerance relative to the adapters' effect on the logits
  (int8 rows are rounded: :data:`~torch_xla_lora.bench.e2e_report.MAX_INT8_REL_ERROR`).

Each timed step is the host's batch update (``set_batch``, or
``clear_batch`` for base: the serving loop does it every step) plus the
device's execution (torch_xla's ``ExecuteTime``; tracing is excluded, as
under ``torch.compile``). The formulations run in turn within each
repetition, in a rotating order; a slowdown is taken per repetition (the runs
of one repetition against each other) and then the median, which keeps a
shared machine's drift out of the ratio. Results go to ``--out`` (default
``bench_out/``): ``e2e.json``, ``e2e.md`` and PNG heatmaps
(:mod:`torch_xla_lora.bench.e2e_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from torch_xla_lora.bench import e2e_report
from torch_xla_lora.bench.e2e_model import (  # noqa: F401
    POOLS,
    _one_hot,
    build_model,
    fused_formulation,
    onehot_formulation,
    patch,
    patch_all,
    unpatch_all,
)

FORMULATIONS = ("base", "lora", "onehot")
FUSED = "fused"  # with --compare-fusion
POOL, POOL_INT8 = POOLS  # with --compare-pool: "pool", "pool int8"
INT8_VS_POOL = e2e_report.INT8_VS_POOL  # the cache check's int8 entry (relative to the adapters' effect)


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    """What to measure. Defaults: the CPU run (about 15 minutes); see :meth:`quick` and :meth:`full`.

    Attributes:
      hidden, intermediate, layers, heads, kv_heads, vocab: the Llama (TinyLlama's widths).
      rank: LoRA rank of every adapter, on every linear layer of the decoder.
      num_adapters: distinct adapters; request i of a batch uses adapter i mod num_adapters.
      seq_lens, out_lens, batch_sizes: the generation grid (input lengths, output lengths, requests).
      decode_batch: requests of the slot sweep's decode step (adapters interleaved row by row).
      slot_counts: ``max_loras`` values of the slot sweep; slot_batch x slot_seq: its prefill.
      repeats: timed runs per formulation and cell (after one warm-up run each).
      decode_steps: decode steps timed per run (their mean is the run's step time).
      backend: the library's op backend ("auto", "xla", "pallas").
      grouping: "host": ``set_batch(names, seq_len)`` builds the kernels' token
        grouping on the host; "device": ``set_batch(names)``, each layer groups on the device.
      base_fusion: LoRAConfig.base_fusion: "auto", "on" or "off".
      compare_fusion: also time "fused", the LoRA layers with base_fusion on.
      compare_pool: also time "pool" and "pool int8", the adapters in rank-true storage (float, int8).
      check: run the cache correctness check first.
      isolate: run the check, the grid and each slot count of the sweep in a process of its own (spawned;
        each builds the same random model): one process holds only so many compiled XLA:CPU graphs, and
        the default grid with ``compare_pool`` compiles more than that (LLVM: "Cannot allocate memory").
    """

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 1
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    rank: int = 16
    num_adapters: int = 8
    seq_lens: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    out_lens: tuple[int, ...] = (16, 64, 256)
    batch_sizes: tuple[int, ...] = (1, 4)
    decode_batch: int = 32
    slot_counts: tuple[int, ...] = (8, 16, 32, 64)
    slot_batch: int = 8
    slot_seq: int = 128
    repeats: int = 3
    decode_steps: int = 3
    backend: str = "auto"
    grouping: str = "host"
    base_fusion: str = "auto"
    compare_fusion: bool = False
    compare_pool: bool = False
    seed: int = 0
    check: bool = True
    isolate: bool = True

    def __post_init__(self) -> None:
        if min(self.slot_counts, default=self.num_adapters) < self.num_adapters:
            raise ValueError(f"slot_counts {self.slot_counts} must all be at least num_adapters={self.num_adapters}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps must be at least 1, got {self.decode_steps}")
        if self.grouping not in ("host", "device"):
            raise ValueError(f"grouping must be 'host' or 'device', got {self.grouping!r}")
        if self.base_fusion not in ("auto", "on", "off"):
            raise ValueError(f"base_fusion must be 'auto', 'on' or 'off', got {self.base_fusion!r}")
        if self.compare_fusion and self.base_fusion == "on":
            raise ValueError("compare_fusion compares base_fusion on against the configured one: not with 'on'")

    @property
    def formulations(self) -> tuple[str, ...]:
        """The formulations timed side by side."""
        fused = (FUSED,) if self.compare_fusion else ()
        return (*FORMULATIONS, *fused, *(POOLS if self.compare_pool else ()))

    @property
    def max_cache_len(self) -> int:
        """Positions the model must support: the longest input plus the longest output."""
        return max(*self.seq_lens, self.slot_seq) + max(self.out_lens, default=1)

    @classmethod
    def quick(cls) -> E2EConfig:
        """A tiny grid for the test suite (seconds, not minutes)."""
        return cls(
            hidden=64,
            intermediate=128,
            heads=4,
            kv_heads=2,
            vocab=128,
            rank=4,
            seq_lens=(16, 32),
            out_lens=(4, 8),
            batch_sizes=(2,),
            decode_batch=8,
            slot_counts=(8, 16),
            slot_seq=8,
            repeats=2,
            decode_steps=1,
            isolate=False,
        )

    @classmethod
    def full(cls) -> E2EConfig:
        """The whole grid (batch sizes 1, 4, 16; 5 repetitions): about an hour on a 2-core CPU."""
        return cls(batch_sizes=(1, 4, 16), repeats=5)


@dataclasses.dataclass
class Cell:
    """Time of one step kind ("prefill" or "decode") per formulation at one (batch, seq, slots) point.

    ``seq`` is the input length (for decode: the tokens already in the cache);
    ``seconds[f][r]``: the step time of formulation f in repetition r;
    ``page_faults[f][r]``: the process's minor page faults per step in that repetition
    (host preparation, tracing and execution; see :func:`minor_page_faults`).
    """

    kind: str
    batch: int
    seq: int
    slots: int
    seconds: dict[str, list[float]]
    recompiles: int  # compilations during the timed runs (should be 0)
    page_faults: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Tokens a step processes."""
        return self.batch * self.seq if self.kind == "prefill" else self.batch

    @property
    def tokens_per_s(self) -> dict[str, float]:
        return {f: self.tokens / statistics.median(s) for f, s in self.seconds.items()}

    def slowdown(self, formulation: str) -> float:
        """Percent of base throughput lost, 100 * (1 - formulation / base): median over repetitions of the pair."""
        return slowdown(self.seconds["base"], self.seconds[formulation])

    def ratio_to_lora(self, formulation: str) -> float:
        """Time of ``formulation`` over LoRA's (padded slots): median over repetitions of the pair."""
        return paired_ratio(self.seconds[formulation], self.seconds["lora"])

    def to_json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "tokens_per_s": self.tokens_per_s,
            "slowdown_pct": {f: self.slowdown(f) for f in self.seconds if f != "base"},
            "ratio_to_lora": {f: self.ratio_to_lora(f) for f in self.seconds if f in POOLS},
        }


def slowdown(base: Sequence[float], other: Sequence[float]) -> float:
    """100 * (1 - median over repetitions of base time / other time)."""
    return 100.0 * (1.0 - statistics.median(b / o for b, o in zip(base, other, strict=True)))


# -- timing ----------------------------------------------------------------------------------------


def _execute_ns() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("ExecuteTime")
    return int(data[1]) if data else 0


def step_seconds(prepare: Callable[[], None], forward: Callable[[], torch.Tensor]) -> float:
    """Host seconds of ``prepare()`` plus device seconds of ``forward()`` (traced untimed, then synced).

    The output is kept alive until the sync: a lazy graph whose outputs are
    dropped is never executed. Without an ``ExecuteTime`` metric the device
    part is the wall time from sync to ``wait_device_ops``.
    """
    import torch_xla
    import torch_xla.core.xla_model as xm

    with torch.no_grad():
        start = time.perf_counter()
        prepare()
        host = time.perf_counter() - start
        out = forward()
        before_ns, start = _execute_ns(), time.perf_counter()
        torch_xla.sync()
        xm.wait_device_ops()
        wall = time.perf_counter() - start
    del out
    executed = (_execute_ns() - before_ns) / 1e9
    return host + (executed if executed > 0 else wall)


def paired_seconds(steps: dict[str, tuple[Callable, Callable]], repeats: int) -> dict[str, list[float]]:
    """Each case's :func:`step_seconds` over ``repeats`` rounds, the cases in rotating order (after two
    untimed rounds that compile): name -> seconds per round, for ratios paired round by round."""
    for _ in range(2):
        for closures in steps.values():
            step_seconds(*closures)
    seconds = {name: [] for name in steps}
    for order in _rotations(list(steps), repeats):
        for name in order:
            seconds[name].append(step_seconds(*steps[name]))
    return seconds


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator / denominator (times paired round by round)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def minor_page_faults() -> int:
    """The process's minor page faults so far (every thread): fresh memory the kernel had to map."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# -- steps -----------------------------------------------------------------------------------------


class _Steps:
    """Prefill and decode closures of one (batch, input length) with one static cache, per formulation.

    ``loras``: formulation -> patched handle (:func:`patch_all`); formulations without one run on "lora"'s.
    """

    def __init__(self, loras: dict, batch: int, seq: int, cache_len: int, config: E2EConfig) -> None:
        import transformers

        self.loras, self.lora = loras, loras["lora"]
        model, device = self.lora.model, self.lora.device
        g = torch.Generator().manual_seed(config.seed + batch * 100_003 + seq)
        self.seq, self.grouping = seq, config.grouping
        self.ids = torch.randint(0, config.vocab, (batch, seq), generator=g).to(device)
        self.next_ids = torch.randint(0, config.vocab, (batch, 1), generator=g).to(device)
        self.names = [f"adapter{i % config.num_adapters}" for i in range(batch)]
        self.cache = transformers.StaticCache(config=model.config, max_cache_len=cache_len)
        self.prefill_positions = torch.arange(seq, device=device)
        self.decode_position = torch.tensor([seq], device=device)

    def prepare(self, formulation: str, seq_len: int) -> Callable[[], None]:
        # The one-hot einsums read only the slots: they get no host-built grouping to pay for.
        host_grouping = self.grouping == "host" and formulation in ("lora", FUSED, *POOLS)
        lora = self.handle(formulation)

        def run() -> None:
            if formulation == "base":
                lora.clear_batch()
            else:
                lora.set_batch(self.names, seq_len=seq_len if host_grouping else None)

        return run

    def handle(self, formulation: str):
        """The patched handle ``formulation`` runs on."""
        return self.loras.get(formulation, self.lora)

    def _forward(self, formulation: str, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        lora = self.handle(formulation)
        with _formulation(lora, formulation):
            out = lora.model(
                ids, past_key_values=self.cache, cache_position=positions, use_cache=True, logits_to_keep=1
            )
        return out.logits

    def prefill(self, formulation: str) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
        return self.prepare(formulation, self.seq), lambda: self._forward(formulation, self.ids, self.prefill_positions)

    def decode(self, formulation: str) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
        # A static cache runs the same graph at every position: repeating the
        # step at one position times every step of the generation.
        return self.prepare(formulation, 1), lambda: self._forward(formulation, self.next_ids, self.decode_position)


def _formulation(lora, formulation: str) -> contextlib.AbstractContextManager:
    """The layers' swap for ``formulation`` (trace the model inside it)."""
    if formulation == "onehot":
        return onehot_formulation(lora)
    if formulation == FUSED:
        return fused_formulation(lora)
    return contextlib.nullcontext()


def _rotations(formulations: Sequence[str], repeats: int):
    for repeat in range(repeats):
        shift = repeat % len(formulations)
        yield list(formulations[shift:]) + list(formulations[:shift])


def measure(steps: _Steps, kinds: Sequence[str], config: E2EConfig):
    """Warm up and time each step kind of ``steps``: {kind: Cell}, ``config.formulations`` in rotating order."""
    import torch_xla_lora as tl

    formulations = config.formulations
    closures = {(k, f): getattr(steps, k)(f) for k in kinds for f in formulations}
    for _ in range(2):  # warm-up, the only compilations: the first run also builds the cache's buffers
        for prepare, forward in closures.values():
            step_seconds(prepare, forward)
    counter = tl.CompileCounter()
    seconds = {k: {f: [] for f in formulations} for k in kinds}
    faults = {k: {f: [] for f in formulations} for k in kinds}
    for order in _rotations(formulations, config.repeats):
        for f in order:
            for k in kinds:
                runs = config.decode_steps if k == "decode" else 1
                before = minor_page_faults()
                seconds[k][f].append(statistics.mean(step_seconds(*closures[k, f]) for _ in range(runs)))
                faults[k][f].append((minor_page_faults() - before) // runs)
    for lora in steps.loras.values():
        lora.clear_batch()
    batch, slots = len(steps.names), steps.lora.config.max_loras
    return {k: Cell(k, batch, steps.seq, slots, seconds[k], counter.count, faults[k]) for k in kinds}


# -- the three parts -------------------------------------------------------------------------------


def _progress(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)


def _rates(cell: Cell) -> str:
    tps = cell.tokens_per_s
    text = f"base {tps['base']:,.0f} tok/s, LoRA {cell.slowdown('lora'):+.1f}%, one-hot {cell.slowdown('onehot'):+.1f}%"
    text += f", fused {cell.slowdown(FUSED):+.1f}%" if FUSED in cell.seconds else ""
    return text + "".join(f", {f} / LoRA {cell.ratio_to_lora(f):.3f}" for f in POOLS if f in cell.seconds)


def run_grid(model: nn.Module, config: E2EConfig, start: float) -> list[dict[str, Cell]]:
    """Prefill and decode cells of every (batch, input length), with ``num_adapters`` slots."""
    loras = patch_all(model, config, config.num_adapters)
    cells = []
    try:
        points = [(b, s) for b in config.batch_sizes for s in config.seq_lens]
        for number, (batch, seq) in enumerate(points, 1):
            steps = _Steps(loras, batch, seq, seq + max(config.out_lens), config)
            cell = measure(steps, ("prefill", "decode"), config)
            cells.append(cell)
            _progress(
                f"grid {number}/{len(points)}: batch {batch} x input {seq}: prefill {_rates(cell['prefill'])}; "
                f"decode {_rates(cell['decode'])}",
                start,
            )
    finally:
        unpatch_all(loras)
    return cells


def run_slot_sweep(model: nn.Module, config: E2EConfig, start: float) -> list[dict[str, Cell]]:
    """Per slot count: the decode step of ``decode_batch`` interleaved requests and a prefill of ``slot_batch``."""
    cells = []
    for slots in config.slot_counts:
        loras = patch_all(model, config, slots)
        try:
            decode = _Steps(loras, config.decode_batch, config.slot_seq, config.max_cache_len, config)
            prefill = _Steps(loras, config.slot_batch, config.slot_seq, config.max_cache_len, config)
            cell = {**measure(decode, ("decode",), config), **measure(prefill, ("prefill",), config)}
        finally:
            unpatch_all(loras)
        cells.append(cell)
        _progress(f"slots {slots}: decode {_rates(cell['decode'])}; prefill {_rates(cell['prefill'])}", start)
    return cells


def check_cache(model: nn.Module, config: E2EConfig) -> dict[str, float]:
    """Max |logits difference| of prefill + one decode step (fresh cache) against one full forward, per formulation.

    Four requests on distinct adapters (one on the base model), 16 input tokens. With ``compare_pool`` also
    ``INT8_VS_POOL``: the int8 pool's cached logits against the float pool's full forward, as a fraction of
    the adapters' effect (the float pool's largest |logits difference| from the base model's), since int8
    rows are rounded.
    """
    import torch_xla
    import transformers

    loras = patch_all(model, config, config.num_adapters)
    errors, cached, full = {}, {}, {}
    try:
        steps = _Steps(loras, 4, 16, 32, config)
        steps.names[-1] = None
        whole = torch.cat([steps.ids, steps.next_ids], dim=1)
        for formulation in [f for f in config.formulations if f != "base"]:
            lora = steps.handle(formulation)
            steps.cache = transformers.StaticCache(config=lora.model.config, max_cache_len=32)
            with torch.no_grad():
                for prepare, forward in (steps.prefill(formulation), steps.decode(formulation)):
                    prepare()
                    out = forward()
                    torch_xla.sync()
                cached[formulation] = out.cpu()
                lora.set_batch(steps.names)
                with _formulation(lora, formulation):
                    full[formulation] = lora.model(whole, logits_to_keep=1).logits.cpu()
            errors[formulation] = float((cached[formulation] - full[formulation]).abs().max())
        if config.compare_pool:
            loras[POOL].clear_batch()
            with torch.no_grad():
                base = loras[POOL].model(whole, logits_to_keep=1).logits.cpu()
            effect = (full[POOL] - base).abs().max()
            errors[INT8_VS_POOL] = float((cached[POOL_INT8] - full[POOL]).abs().max() / effect)
    finally:
        unpatch_all(loras)
    return errors


def _part(part: str, config: E2EConfig, slot_counts: tuple[int, ...], start: float, model: nn.Module | None = None):
    """One part of :func:`run`: "check", "grid" or "slots" (the sweep at ``slot_counts``), on ``model`` (None:
    built here, from the config's seed)."""
    import torch_xla

    if model is None:
        model = build_model(config, torch_xla.device())
    if part == "check":
        return check_cache(model, config)
    if part == "grid":
        return run_grid(model, config, start)
    return run_slot_sweep(model, dataclasses.replace(config, slot_counts=slot_counts), start)


def _isolated(part: str, config: E2EConfig, slot_counts: tuple[int, ...], start: float):
    """:func:`_part` in a spawned process of its own (its compiled graphs leave with it). ``start`` is a
    ``perf_counter`` time, a system-wide monotonic clock, so the child's progress lines count from it too."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_part, (part, config, slot_counts, start))


def run(config: E2EConfig, out_dir: Path, command: str = "") -> dict:
    """Run the check, the grid and the slot sweep (each part in a process of its own where ``config.isolate``);
    write the results to ``out_dir``; return the JSON document."""
    import torch_xla

    from torch_xla_lora.ops import device_generation

    start = time.perf_counter()
    device = torch_xla.device()
    _progress(
        f"building a random Llama: {config.layers} layer(s), hidden {config.hidden}, "
        f"intermediate {config.intermediate}, vocab {config.vocab}, float32, on {device} ({device_generation()})",
        start,
    )
    model = None if config.isolate else build_model(config, device)

    def part(name: str, slot_counts: tuple[int, ...] = ()):
        if model is None:
            return _isolated(name, config, slot_counts, start)
        return _part(name, config, slot_counts, start, model)

    check = {}
    if config.check:
        check = part("check")
        _progress("cached decode vs full forward, max |logits diff|: " + str(check), start)
    grid = part("grid")
    sweeps = [(count,) for count in config.slot_counts] if config.isolate else [config.slot_counts]
    slots = [cell for counts in sweeps for cell in part("slots", counts)]
    result = e2e_report.document(config, grid, slots, check, time.perf_counter() - start, command)
    paths = e2e_report.write(result, out_dir)
    print()
    print(e2e_report.markdown(result))
    _progress("wrote " + ", ".join(str(p) for p in paths), start)
    return result


def parse_args(argv: Sequence[str] | None) -> tuple[E2EConfig, Path]:
    """The command line: ``--quick``, the default run or ``--full``, with overrides."""
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench e2e", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model and grid (the test suite's)")
    size.add_argument("--full", action="store_true", help="batch sizes 1, 4, 16 and 5 repetitions (about an hour)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory (default bench_out/)")
    ints = {
        "layers": "decoder layers",
        "hidden": "hidden size",
        "intermediate": "MLP size",
        "heads": "attention heads",
        "kv-heads": "key/value heads",
        "vocab": "vocabulary size",
        "rank": "LoRA rank",
        "adapters": "distinct adapters",
        "decode-batch": "requests of the slot sweep's decode step",
        "slot-batch": "batch size of the slot sweep's prefill",
        "slot-seq": "input length of the slot sweep",
        "repeats": "timed runs per formulation and cell",
        "decode-steps": "decode steps timed per run",
        "seed": "random seed",
    }
    for flag, help_text in ints.items():
        dest = "num_adapters" if flag == "adapters" else flag.replace("-", "_")
        parser.add_argument(f"--{flag}", type=int, dest=dest, help=help_text)
    parser.add_argument("--seq-lens", type=_ints, dest="seq_lens", help="input lengths, e.g. 128,256")
    parser.add_argument("--out-lens", type=_ints, dest="out_lens", help="output lengths, e.g. 16,64")
    parser.add_argument("--batch-sizes", type=_ints, dest="batch_sizes", help="batch sizes, e.g. 1,4")
    parser.add_argument("--slots", type=_ints, dest="slot_counts", help="slot counts of the sweep, e.g. 8,64")
    parser.add_argument("--backend", choices=("auto", "xla", "pallas"), help="op backend")
    parser.add_argument("--grouping", choices=("host", "device"), help="where the token grouping is built")
    parser.add_argument(
        "--base-fusion", choices=("auto", "on", "off"), dest="base_fusion", help="LoRAConfig.base_fusion"
    )
    parser.add_argument(
        "--compare-fusion",
        dest="compare_fusion",
        action="store_const",
        const=True,
        help="also time the LoRA layers with base_fusion on, paired with the others",
    )
    parser.add_argument(
        "--compare-pool",
        dest="compare_pool",
        action="store_const",
        const=True,
        help="also time the adapters in rank-true pools (float and int8), as ratios to padded slots",
    )
    parser.add_argument("--skip-check", dest="check", action="store_const", const=False, help="no cache check")
    parser.add_argument(
        "--one-process",
        dest="isolate",
        action="store_const",
        const=False,
        help="run every part in this process (by default the check, the grid and each slot count get their own)",
    )
    args = vars(parser.parse_args(argv))
    quick, full, out = args.pop("quick"), args.pop("full"), args.pop("out")
    # (--skip-check stores False; absent, None keeps the default)
    base = E2EConfig.quick() if quick else E2EConfig.full() if full else E2EConfig()
    return dataclasses.replace(base, **{k: v for k, v in args.items() if v is not None}), out


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m torch_xla_lora.bench e2e``; 0 when nothing recompiled and the check passed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, out_dir = parse_args(argv)
    result = run(config, out_dir, " ".join(["python -m torch_xla_lora.bench e2e", *argv]))
    checked = result["cache_check"]["met"] or not config.check
    return 0 if result["recompiles_during_timing"] == 0 and checked else 1


if __name__ == "__main__":
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    sys.exit(main())
