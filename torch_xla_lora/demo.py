"""The main-job demo: four PEFT adapters served in one mixed batch, checked against PEFT.

``python -m torch_xla_lora demo`` runs, on any PJRT device (the CPU by default):

1. a small random-weight Llama built from a transformers config (nothing is downloaded);
2. four adapters written by PEFT's ``save_pretrained`` to a temporary directory
   (ranks 4, 8, 16 and 8 with rsLoRA; different target modules, embeddings and
   ``lm_head`` included);
3. :func:`torch_xla_lora.patch_model`, ``load_adapter`` from those directories,
   ``warmup`` of the ``torch.compile(backend="openxla")`` step;
4. greedy generation for a batch of requests, each with its own adapter or the
   base model, under :func:`torch_xla_lora.CompileCounter`;
5. the same requests through ``PeftModel(ids, adapter_names=[...])`` on the
   host: the logits at every real position of every request must agree.

Generation keeps one static shape: the token ids live in a fixed [B, S_max]
buffer, right-padded, and each step re-runs the whole forward on it (no KV
cache). Causal attention makes the padding invisible to the real positions,
and a fixed shape means one compiled graph for the whole run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]
_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}  # float32


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One demo adapter: PEFT ``LoraConfig`` fields."""

    name: str
    rank: int
    alpha: int
    targets: tuple[str, ...]
    rslora: bool = False

    def describe(self) -> str:
        kind = "rsLoRA" if self.rslora else "LoRA"
        return f"{kind} r={self.rank} alpha={self.alpha} on {_targets_label(self.targets)}"


ADAPTERS = (
    AdapterSpec("sql", 4, 8, tuple(_ATTENTION)),
    AdapterSpec("chat", 8, 16, tuple(_ATTENTION + _MLP)),
    AdapterSpec("code", 16, 16, tuple(_ATTENTION + _MLP + ["lm_head", "embed_tokens"])),
    AdapterSpec("math", 8, 16, tuple(_ATTENTION + _MLP), rslora=True),
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``quick()`` is the test suite's smaller variant."""

    vocab: int = 1024
    hidden: int = 512
    intermediate: int = 1024
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    new_tokens: int = 8
    seq_bucket: int = 32  # S_max: prompt + generated tokens must fit
    prompt_lens: tuple[int, ...] = (6, 9, 5, 12, 7, 10, 4, 8)
    requests: tuple[str | None, ...] = ("sql", None, "chat", "code", "math", None, "code", "sql")
    timing_repeats: int = 3

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            vocab=256,
            hidden=64,
            intermediate=128,
            layers=1,
            heads=4,
            kv_heads=2,
            new_tokens=3,
            seq_bucket=16,
            timing_repeats=1,
        )


@dataclasses.dataclass
class Generation:
    """Result of greedy generation: the final id buffer, real lengths, new tokens per request."""

    ids: torch.Tensor  # [B, S_max] int64, host, right-padded with 0
    lengths: list[int]  # real tokens per row
    new_tokens: list[list[int]]
    seconds: float


def _targets_label(targets: Sequence[str]) -> str:
    names = set(targets)
    parts = []
    if set(_ATTENTION) <= names:
        parts.append("attention")
    if set(_MLP) <= names:
        parts.append("MLP")
    parts += [t for t in targets if t not in _ATTENTION + _MLP]
    return " + ".join(parts)


@contextlib.contextmanager
def _step(message: str) -> Iterator[None]:
    """Print ``message`` and, when the block ends, how long it took.

    Library warnings inside the block (transformers' deprecation notices) are
    silenced: they would break the progress line and are not the user's concern.
    """
    print(f"{message} ...", end="", flush=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    print(f" {time.perf_counter() - start:.1f} s", flush=True)


def build_base_model(config: DemoConfig, seed: int) -> nn.Module:
    """A random-weight ``LlamaForCausalLM`` (float32, eval mode) on the host."""
    import transformers

    torch.manual_seed(seed)
    llama = transformers.LlamaConfig(
        vocab_size=config.vocab,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(llama).eval()


def write_adapters(base: nn.Module, specs: Sequence[AdapterSpec], directory: Path, seed: int) -> dict[str, Path]:
    """Train-free adapters: PEFT with random A and B, saved with ``save_pretrained``; name -> directory."""
    import peft

    paths = {}
    for number, spec in enumerate(specs):
        torch.manual_seed(seed + 1 + number)
        config = peft.LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=list(spec.targets),
            use_rslora=spec.rslora,
            init_lora_weights=False,  # random B too, so every adapter changes the output
        )
        model = peft.get_peft_model(copy.deepcopy(base), config)
        paths[spec.name] = directory / spec.name
        # The frozen embedding and head are the base model's: no need to save copies.
        model.save_pretrained(paths[spec.name], save_embedding_layers=False)
    return paths


def load_peft_model(base: nn.Module, paths: dict[str, Path]) -> nn.Module:
    """The reference: every adapter loaded into one ``PeftModel`` on the host, in eval mode."""
    import peft

    names = list(paths)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    return model.eval()


def make_prompts(config: DemoConfig, seed: int) -> list[list[int]]:
    """One random prompt per request, of the configured lengths (token 0 is kept for padding)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, config.vocab, (n,), generator=g).tolist() for n in config.prompt_lens]


def generate(
    step: Callable[[torch.Tensor], torch.Tensor],
    prompts: Sequence[Sequence[int]],
    seq_bucket: int,
    new_tokens: int,
    device: torch.device,
) -> Generation:
    """Greedy decoding on a static [B, seq_bucket] buffer: one full forward per new token.

    ``step`` maps ids [B, S] (device) to logits [B, S, V]; the next token of row
    b is the argmax at its last real position. The buffer goes to the device
    whole every step, so every step runs the same compiled graph.
    """
    import torch_xla

    lengths = [len(p) for p in prompts]
    if max(lengths) + new_tokens > seq_bucket:
        raise ValueError(f"seq_bucket {seq_bucket} < longest prompt {max(lengths)} + new_tokens {new_tokens}")
    ids = torch.zeros(len(prompts), seq_bucket, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    generated: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = step(ids.to(device))  # [B, S, V]; alive until the sync
            torch_xla.sync()
        rows = torch.arange(len(prompts))
        last = torch.tensor(lengths) - 1
        next_ids = logits.cpu()[rows, last].argmax(-1)
        del logits
        for row, token in enumerate(next_ids.tolist()):
            ids[row, lengths[row]] = token
            lengths[row] += 1
            generated[row].append(token)
    return Generation(ids, lengths, generated, time.perf_counter() - start)


def forward_logits(
    step: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Logits [B, S, V] of one step on ``ids``, on the host."""
    import torch_xla

    with torch.no_grad():
        logits = step(ids.to(device))
        torch_xla.sync()
    return logits.cpu()


def compare_with_peft(
    logits: torch.Tensor,  # [B, S, V]
    peft_logits: torch.Tensor,  # [B, S, V]
    lengths: Sequence[int],
) -> tuple[list[float], bool]:
    """Largest |difference| per request over its real positions, and whether all are within tolerance."""
    diffs, ok = [], True
    for row, n in enumerate(lengths):
        ours, ref = logits[row, :n], peft_logits[row, :n]
        diffs.append((ours - ref).abs().max().item())
        ok &= torch.allclose(ours, ref, **_TOLERANCE)
    return diffs, ok


def peft_agreement(peft_logits: torch.Tensor, generation: Generation, prompt_lens: Sequence[int]) -> int:
    """How many generated tokens are also PEFT's greedy choice."""
    agree = 0
    for row, tokens in enumerate(generation.new_tokens):
        for k, token in enumerate(tokens):
            agree += int(peft_logits[row, prompt_lens[row] - 1 + k].argmax().item() == token)
    return agree


def _median_generation(run: Callable[[], Generation], repeats: int) -> tuple[Generation, float]:
    results = [run() for _ in range(repeats)]
    return results[0], statistics.median(r.seconds for r in results)


def _print_requests(config: DemoConfig, specs: dict[str, AdapterSpec], generation: Generation) -> None:
    print("\nadapters (written by PEFT, loaded from its files):")
    for spec in specs.values():
        print(f"  {spec.name:5s} {spec.describe()}")
    print(f"requests (one batch of {len(config.requests)}, greedy, static buffer of {config.seq_bucket} tokens):")
    for row, name in enumerate(config.requests):
        print(
            f"  #{row} {name or 'base':5s} prompt {config.prompt_lens[row]:2d} tokens -> {generation.new_tokens[row]}"
        )


@dataclasses.dataclass
class Served:
    """What serving produced: the LoRA batch's generation and final logits, timings, compilations."""

    generation: Generation
    logits: torch.Tensor  # [B, S_max, V] host: one forward on the final buffer
    lora_seconds: float
    base_seconds: float
    recompiles: int


def _prepare(config: DemoConfig, seed: int, device: torch.device, tmp: Path):
    """(PEFT reference model, patched model on ``device``, its LoRAModel handle), adapters loaded from files."""
    import torch_xla_lora as tl

    specs = list(ADAPTERS)
    with _step(f"building a random Llama ({config.layers} layers, hidden {config.hidden}, vocab {config.vocab})"):
        base = build_base_model(config, seed)
    with _step(f"writing {len(specs)} PEFT adapters with save_pretrained"):
        paths = write_adapters(base, specs, tmp, seed)
    with _step("loading them into a PeftModel (the reference)"):
        peft_model = load_peft_model(base, paths)
    with _step("patching the model and loading the adapters from the same files"):
        model = copy.deepcopy(base).to(device)
        targets = _ATTENTION + _MLP + ["lm_head", "embed_tokens"]
        max_rank = max(spec.rank for spec in specs)
        lora = tl.patch_model(model, tl.LoRAConfig(max_loras=len(specs), max_rank=max_rank, target_modules=targets))
        for name, path in paths.items():
            lora.load_adapter(name, path)
    return peft_model, model, lora


def _warm_up(lora, step: Callable, batch: int, config: DemoConfig, device: torch.device) -> int:
    """Compile the LoRA graph (``lora.warmup``) and the base graph; return the compilations made."""
    import torch_xla_lora as tl

    print(f"warming up torch.compile(backend='openxla') for batch {batch} x {config.seq_bucket} tokens:")
    counter = tl.CompileCounter()
    # host_metadata: the graphs for batches set with their sequence length (grouping built on the host).
    lora.warmup([batch], [config.seq_bucket], step=step, host_metadata=True)
    with _step("warm-up of the base-model graph (no adapter set)"):
        lora.clear_batch()
        forward_logits(step, torch.zeros(batch, config.seq_bucket, dtype=torch.long), device)
    return counter.count


def _serve(lora, step: Callable, config: DemoConfig, seed: int, device: torch.device) -> Served:
    """Generate for the mixed batch, then for the same prompts as base, counting compilations."""
    import torch_xla_lora as tl

    prompts = make_prompts(config, seed)
    counter = tl.CompileCounter()

    def run() -> Generation:
        return generate(step, prompts, config.seq_bucket, config.new_tokens, device)

    with _step(f"serving: greedy generation of {config.new_tokens} tokens per request, LoRA batch then base"):
        lora.set_batch(list(config.requests), seq_len=config.seq_bucket)  # every step runs the full buffer
        generation, lora_seconds = _median_generation(run, config.timing_repeats)
        logits = forward_logits(step, generation.ids, device)
        lora.clear_batch()
        _, base_seconds = _median_generation(run, config.timing_repeats)
    return Served(generation, logits, lora_seconds, base_seconds, counter.count)


def _report(config: DemoConfig, served: Served, peft_logits: torch.Tensor) -> bool:
    """Print the requests, the comparison with PEFT, throughput and compilations; return success."""
    generation = served.generation
    diffs, match = compare_with_peft(served.logits, peft_logits, generation.lengths)
    agree = peft_agreement(peft_logits, generation, config.prompt_lens)
    _print_requests(config, {spec.name: spec for spec in ADAPTERS}, generation)
    batch = len(config.requests)
    total = batch * config.new_tokens
    print("\nreport:")
    print(f"  largest |logit - PEFT| over all requests and positions: {max(diffs):.2e} (tolerance 1e-4)")
    print(f"  PEFT's greedy choice agrees on {agree}/{total} generated tokens")
    for label, seconds in (("base", served.base_seconds), ("LoRA", served.lora_seconds)):
        forwarded = total * config.seq_bucket / seconds
        print(
            f"  {label:4s} throughput: {total / seconds:7.1f} new tokens/s "
            f"({forwarded:,.0f} tokens/s through the {batch}x{config.seq_bucket} forward)"
        )
    print("  (a tiny model: LoRA's share of the work is large; `python -m torch_xla_lora.bench e2e` measures at 2048)")
    print(f"  XLA compilations after warm-up: {served.recompiles}")
    ok = match and served.recompiles == 0
    print("OK: every request matches PEFT, nothing recompiled" if ok else "FAILED")
    return ok


def run(seed: int = 0, quick: bool = False) -> int:
    """Run the demo and print its report; 0 when every logit matches PEFT and nothing recompiled."""
    import torch_xla

    from torch_xla_lora.ops import device_generation

    config = DemoConfig.quick() if quick else DemoConfig()
    logging.getLogger("absl").setLevel(logging.ERROR)  # JAX's notice that TensorFlow is absent
    device = torch_xla.device()
    print(f"torch_xla_lora demo on {device} ({device_generation()}), seed {seed}")
    with tempfile.TemporaryDirectory(prefix="torch_xla_lora_demo_") as tmp:
        peft_model, model, lora = _prepare(config, seed, device, Path(tmp))
    step = torch.compile(lambda ids: model(ids).logits, backend="openxla")
    compiles = _warm_up(lora, step, len(config.requests), config, device)
    print(f"warm-up made {compiles} XLA compilations")
    served = _serve(lora, step, config, seed, device)
    with _step("PEFT reference forward (host, eager)"), torch.no_grad():
        names = [name or "__base__" for name in config.requests]
        peft_logits = peft_model(served.generation.ids, adapter_names=names).logits
    return 0 if _report(config, served, peft_logits) else 1
