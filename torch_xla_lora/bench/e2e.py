"""End-to-end benchmark: prefill throughput of a Llama with and without LoRA.

``python -m torch_xla_lora.bench e2e`` measures, on one model:

- a grid of (batch size, input length): tokens/s of one prefill forward with
  no adapter set (base), with a different adapter per request through this
  library's layers (LoRA), and with the same layers' LoRA ops swapped for the
  one-hot einsum formulation (vLLM's TPU end state, :func:`onehot_formulation`);
- a sweep of slot counts (``max_loras``): the same batch and the same adapters
  with more device slots.

Timing is device time only: each step is traced in lazy mode, compiled once
during warm-up, then run ``repeats`` times with a sync after each; the time of
a run is torch_xla's ``ExecuteTime`` metric (the executions of the step), the
wall time from sync to ``wait_device_ops`` if the metric is missing. The
formulations run back to back within each repetition (in a rotating order),
so a change in machine load hits them alike. Throughput is tokens over the
median time; slowdown = 1 - LoRA / base throughput, in percent, taken per
repetition (the two runs of one repetition) and then the median over
repetitions: on a shared machine whose speed drifts between repetitions,
that pairing keeps the drift out of the ratio.

Results go to ``--out`` (default ``bench_out/``): ``e2e.json``, ``e2e.md``
(the tables) and PNG heatmaps (:mod:`torch_xla_lora.bench.e2e_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

FORMULATIONS = ("base", "lora", "onehot")
_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    """What to measure. Defaults: the real run (Llama, hidden 2048, float32); see :meth:`quick`.

    Attributes:
      hidden, intermediate, layers, heads, kv_heads, vocab: the Llama (TinyLlama's widths).
      rank: LoRA rank of every adapter, on every linear layer of the decoder.
      num_adapters: distinct adapters; request i of a batch uses adapter i mod num_adapters.
      seq_lens, batch_sizes: the grid (prefill input lengths, requests per batch).
      slot_counts: ``max_loras`` values of the slot sweep, run at (slot_batch, slot_seq).
      repeats: timed runs per formulation and cell (after one warm-up run each).
      backend: the library's op backend ("auto", "xla", "pallas").
      grouping: "host": batches are set with ``set_batch(names, seq_len)``, which
        builds the kernels' token grouping on the host (the serving path when
        the input length is known; host time is not device time, so it is not
        counted); "device": ``set_batch(names)``, each layer groups on the device.
      base_fusion: LoRAConfig.base_fusion: "auto", "on" or "off".
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
    batch_sizes: tuple[int, ...] = (1, 2)  # 4 would take the CPU run past 15 minutes
    slot_counts: tuple[int, ...] = (8, 16, 32, 64)
    slot_batch: int = 8
    slot_seq: int = 128
    repeats: int = 7
    backend: str = "auto"
    grouping: str = "host"
    base_fusion: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.slot_counts, default=self.num_adapters) < self.num_adapters:
            raise ValueError(f"slot_counts {self.slot_counts} must all be at least num_adapters={self.num_adapters}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.grouping not in ("host", "device"):
            raise ValueError(f"grouping must be 'host' or 'device', got {self.grouping!r}")
        if self.base_fusion not in ("auto", "on", "off"):
            raise ValueError(f"base_fusion must be 'auto', 'on' or 'off', got {self.base_fusion!r}")

    @classmethod
    def quick(cls) -> E2EConfig:
        """A tiny grid for the test suite (seconds, not minutes)."""
        return cls(
            hidden=64,
            intermediate=128,
            layers=1,
            heads=4,
            kv_heads=2,
            vocab=128,
            rank=4,
            seq_lens=(16, 32),
            batch_sizes=(1, 2),
            slot_counts=(8, 16),
            slot_batch=8,
            slot_seq=8,
            repeats=2,
        )


@dataclasses.dataclass
class Cell:
    """Throughput (tokens/s) of each formulation at one (batch, seq, slots) point."""

    batch: int
    seq: int
    slots: int
    tokens_per_s: dict[str, float]
    seconds: dict[str, list[float]]  # every timed run, per formulation
    recompiles: int  # compilations during the timed runs (should be 0)

    def slowdown(self, formulation: str) -> float:
        """Percent of base throughput lost, 100 * (1 - formulation / base): median over repetitions of the pair."""
        pairs = zip(self.seconds["base"], self.seconds[formulation], strict=True)
        return 100.0 * (1.0 - statistics.median(base / other for base, other in pairs))

    def to_json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "slowdown_pct": {f: self.slowdown(f) for f in self.tokens_per_s if f != "base"},
        }


# -- the one-hot einsum formulation ----------------------------------------------------------------


def _one_hot(slots: torch.Tensor, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[T] int32 slots -> [T, L] one-hot; a slot outside [0, L) (e.g. -1, base) is an all-zero row."""
    return (slots[:, None] == torch.arange(num_slots, dtype=slots.dtype, device=slots.device)).to(dtype)


def _onehot_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A LoRA linear layer's forward as vLLM's TPU einsums: every token against every slot's factors.

    Semantics (per token t, one-hot row h_t over the L slots):
      s[t] = sum_X h_t[X] * A[X] @ x[t]          einsum("td,tX,Xrd->tr")
      y[t] = base(x)[t] + sum_X h_t[X] * s[t] @ B[X]   einsum("tr,tX,Xrd->td")
    The cost is O(T * L * R * D): it grows with the number of slots L.
    ``lora_b`` spans every output slice, so one expand also covers fused QKV / gate_up.
    """
    y = layer.base_layer(x)
    slots = layer.context.token_slots(x)
    if slots is None:
        return y
    x2 = x.reshape(-1, layer.in_features)  # [T, D]
    hot = _one_hot(slots, layer.lora_a.shape[0], x2.dtype)  # [T, L]
    s = torch.einsum("td,tX,Xrd->tr", x2, hot, layer.lora_a)  # [T, R]
    delta = torch.einsum("tr,tX,Xrd->td", s, hot, layer.lora_b)  # [T, Dout]
    return y + delta.reshape(y.shape).to(y.dtype)


@contextlib.contextmanager
def onehot_formulation(lora) -> Iterator[None]:
    """Within the block, every LoRA linear layer of ``lora`` (a LoRAModel) runs :func:`_onehot_forward`.

    The swap is an instance attribute on each layer, removed on exit; library
    code is untouched. Trace (call the model) inside the block.

    Raises:
      TypeError: the model has a LoRA layer that is not a linear kind (e.g. embeddings).
    """
    from torch_xla_lora.layers import LinearWithLoRA

    layers = list(lora.layers.values())
    for layer in layers:
        if not isinstance(layer, LinearWithLoRA):
            raise TypeError(f"onehot_formulation supports linear LoRA layers only, got {type(layer).__name__}")
    for layer in layers:
        layer.forward = types.MethodType(_onehot_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


# -- model and adapters ----------------------------------------------------------------------------


def build_model(config: E2EConfig, device: torch.device) -> nn.Module:
    """A random-weight float32 ``LlamaForCausalLM`` in eval mode on ``device``."""
    import transformers

    torch.manual_seed(config.seed)
    llama = transformers.LlamaConfig(
        vocab_size=config.vocab,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=max(4096, max(config.seq_lens)),
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(llama).eval().to(device)


def random_adapter(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> tuple[dict, dict]:
    """A PEFT-format (state dict, config) of rank ``rank`` on every module of ``shapes`` (name -> (in, out))."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (fan_in, fan_out) in shapes.items():
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) / rank**0.5
    return state, {"r": rank, "lora_alpha": rank, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in shapes})}


def patch(model: nn.Module, config: E2EConfig, slots: int):
    """Patch every linear layer of the decoder with ``slots`` slots; load the adapters; return the handle."""
    import torch_xla_lora as tl

    lora_config = tl.LoRAConfig(
        max_loras=slots,
        max_rank=config.rank,
        target_modules=_LINEAR_TARGETS,
        max_cpu_adapters=max(slots, config.num_adapters),
        backend=config.backend,
        base_fusion={"auto": "auto", "on": True, "off": False}[config.base_fusion],
    )
    lora = tl.patch_model(model, lora_config)
    shapes = {name: (layer.in_features, layer.out_features) for name, layer in lora.layers.items()}
    for number in range(config.num_adapters):
        state, adapter_config = random_adapter(shapes, config.rank, config.seed + 1 + number)
        lora.load_adapter(f"adapter{number}", state_dict=state, config=adapter_config)
    return lora


# -- timing ----------------------------------------------------------------------------------------


def _execute_ns() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("ExecuteTime")
    return int(data[1]) if data else 0


def device_seconds(run: Callable[[], torch.Tensor]) -> float:
    """Device seconds of one step: trace ``run`` (untimed), then sync and wait for the device.

    The output is kept alive until the sync: a lazy graph whose outputs are
    dropped is never executed.
    """
    import torch_xla
    import torch_xla.core.xla_model as xm

    with torch.no_grad():
        out = run()
        before_ns, start = _execute_ns(), time.perf_counter()
        torch_xla.sync()
        xm.wait_device_ops()
    wall = time.perf_counter() - start
    del out
    executed = (_execute_ns() - before_ns) / 1e9
    return executed if executed > 0 else wall


def _step(lora, model: nn.Module, ids: torch.Tensor, formulation: str, names: Sequence[str], grouping: str):
    """A closure running one prefill forward of ``formulation``; only the last position's logits are kept."""
    seq_len = ids.shape[1] if grouping == "host" else None

    def run() -> torch.Tensor:
        if formulation == "base":
            lora.clear_batch()
        else:
            lora.set_batch(names, seq_len=seq_len)
        swap = onehot_formulation(lora) if formulation == "onehot" else contextlib.nullcontext()
        with swap:
            return model(ids, logits_to_keep=1).logits  # prefill: serving needs the last position only

    return run


def measure(lora, model: nn.Module, batch: int, seq: int, config: E2EConfig, formulations: Sequence[str]) -> Cell:
    """Warm up and time every formulation at one (batch, seq); interleaved, rotating the order per repetition."""
    import torch_xla_lora as tl

    g = torch.Generator().manual_seed(config.seed + batch * 100_003 + seq)
    ids = torch.randint(0, config.vocab, (batch, seq), generator=g).to(lora.device)
    names = [f"adapter{i % config.num_adapters}" for i in range(batch)]
    runs = {f: _step(lora, model, ids, f, names, config.grouping) for f in formulations}
    for run in runs.values():  # warm-up: one compilation each
        device_seconds(run)
    seconds: dict[str, list[float]] = {f: [] for f in formulations}
    counter = tl.CompileCounter()
    for repeat in range(config.repeats):
        order = list(formulations[repeat % len(formulations) :]) + list(formulations[: repeat % len(formulations)])
        for f in order:
            seconds[f].append(device_seconds(runs[f]))
    lora.clear_batch()
    tokens = batch * seq
    rates = {f: tokens / statistics.median(seconds[f]) for f in formulations}
    return Cell(batch, seq, lora.config.max_loras, rates, seconds, counter.count)


def _progress(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)


def run_grid(model: nn.Module, config: E2EConfig, start: float) -> list[Cell]:
    """Every (batch, seq) of the grid, with ``num_adapters`` slots."""
    lora = patch(model, config, config.num_adapters)
    cells = []
    try:
        points = [(b, s) for b in config.batch_sizes for s in config.seq_lens]
        for number, (batch, seq) in enumerate(points, 1):
            cell = measure(lora, model, batch, seq, config, FORMULATIONS)
            cells.append(cell)
            _progress(
                f"grid {number}/{len(points)}: batch {batch} x seq {seq}: "
                + ", ".join(f"{f} {cell.tokens_per_s[f]:,.0f} tok/s" for f in FORMULATIONS)
                + f"; LoRA slowdown {cell.slowdown('lora'):+.1f}%, one-hot {cell.slowdown('onehot'):+.1f}%",
                start,
            )
    finally:
        lora.unpatch()
    return cells


def run_slot_sweep(model: nn.Module, config: E2EConfig, start: float) -> list[Cell]:
    """The same batch and adapters at (slot_batch, slot_seq), patched with each slot count in turn."""
    cells = []
    for slots in config.slot_counts:
        lora = patch(model, config, slots)
        try:
            cell = measure(lora, model, config.slot_batch, config.slot_seq, config, FORMULATIONS)
        finally:
            lora.unpatch()
        cells.append(cell)
        _progress(
            f"slots {slots}: batch {config.slot_batch} x seq {config.slot_seq}: "
            f"LoRA {cell.tokens_per_s['lora']:,.0f} tok/s ({cell.slowdown('lora'):+.1f}%), "
            f"one-hot {cell.tokens_per_s['onehot']:,.0f} tok/s ({cell.slowdown('onehot'):+.1f}%)",
            start,
        )
    return cells


def run(config: E2EConfig, out_dir: Path, command: str = "") -> dict:
    """Run the grid and the slot sweep, write the results to ``out_dir``; return the JSON document."""
    import torch_xla

    from torch_xla_lora.bench import e2e_report
    from torch_xla_lora.ops import device_generation

    start = time.perf_counter()
    device = torch_xla.device()
    _progress(
        f"building a random Llama: {config.layers} layer(s), hidden {config.hidden}, "
        f"intermediate {config.intermediate}, vocab {config.vocab}, float32, on {device} ({device_generation()})",
        start,
    )
    model = build_model(config, device)
    grid = run_grid(model, config, start)
    slots = run_slot_sweep(model, config, start)
    result = e2e_report.document(config, grid, slots, time.perf_counter() - start, command)
    paths = e2e_report.write(result, out_dir)
    print()
    print(e2e_report.markdown(result))
    _progress("wrote " + ", ".join(str(p) for p in paths), start)
    return result


def parse_args(argv: Sequence[str] | None) -> tuple[E2EConfig, Path]:
    """The command line: ``--quick`` or the real run, with overrides."""
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and grid (the test suite's)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory (default bench_out/)")
    parser.add_argument("--layers", type=int, help="decoder layers")
    parser.add_argument("--hidden", type=int, help="hidden size")
    parser.add_argument("--intermediate", type=int, help="MLP size")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--kv-heads", type=int, dest="kv_heads", help="key/value heads")
    parser.add_argument("--vocab", type=int, help="vocabulary size")
    parser.add_argument("--rank", type=int, help="LoRA rank")
    parser.add_argument("--adapters", type=int, dest="num_adapters", help="distinct adapters")
    parser.add_argument("--seq-lens", type=_ints, dest="seq_lens", help="input lengths, e.g. 128,256")
    parser.add_argument("--batch-sizes", type=_ints, dest="batch_sizes", help="batch sizes, e.g. 1,4")
    parser.add_argument("--slots", type=_ints, dest="slot_counts", help="slot counts of the sweep, e.g. 8,64")
    parser.add_argument("--slot-batch", type=int, dest="slot_batch", help="batch size of the slot sweep")
    parser.add_argument("--slot-seq", type=int, dest="slot_seq", help="input length of the slot sweep")
    parser.add_argument("--repeats", type=int, help="timed runs per formulation and cell")
    parser.add_argument("--backend", choices=("auto", "xla", "pallas"), help="op backend")
    parser.add_argument("--grouping", choices=("host", "device"), help="where the token grouping is built")
    parser.add_argument(
        "--base-fusion", choices=("auto", "on", "off"), dest="base_fusion", help="LoRAConfig.base_fusion"
    )
    parser.add_argument("--seed", type=int)
    args = vars(parser.parse_args(argv))
    quick, out = args.pop("quick"), args.pop("out")
    base = E2EConfig.quick() if quick else E2EConfig()
    return dataclasses.replace(base, **{k: v for k, v in args.items() if v is not None}), out


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m torch_xla_lora.bench e2e``; 0 when every run completed without recompiling."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, out_dir = parse_args(argv)
    result = run(config, out_dir, " ".join(["python -m torch_xla_lora.bench e2e", *argv]))
    return 0 if result["recompiles_during_timing"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    sys.exit(main())
