"""The main-job demo: continuous batching of PEFT adapters with a KV cache, checked against PEFT.

``python -m torch_xla_lora demo`` runs, on any PJRT device (the CPU by default):

1. a small random-weight Llama built from a transformers config (nothing is downloaded);
2. four adapters written by PEFT's ``save_pretrained`` to a temporary directory
   (ranks 4, 8, 16 and 8 with rsLoRA; different target modules, embeddings and
   ``lm_head`` included);
3. :func:`torch_xla_lora.patch_model` and ``load_adapter`` of three of them from
   those files, and the warm-up of two ``torch.compile(backend="openxla")``
   buckets (prefill: one prompt; decode: every row, one token each);
4. a serving loop (:func:`torch_xla_lora.serving.serve`): requests with different
   adapters, or the base model, arrive over time and finish at different lengths;
   each new request is prefilled into a free row of a static KV cache, and one
   decode step runs all rows together, each row at its own position with its own
   adapter; the fourth adapter is loaded from another thread while serving.
   Nothing compiles after warm-up (checked with :func:`torch_xla_lora.assert_no_recompile`);
5. every request again through PEFT's ``generate(..., adapter_names=[...])``, one
   request at a time (no padding: PEFT's own answer): the greedy tokens must be
   the same and the logits of every generated token within 1e-4.

The cache, the buckets and the scheduler are in :mod:`torch_xla_lora.serving`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from torch_xla_lora.random_models import random_llama
from torch_xla_lora.serving import Request, Steps, serve

_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]
_TOLERANCE = 1e-4  # float32 logits


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
THREAD_LOADED = "math"  # loaded from another thread while the server runs


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """A demo request: adapter (None = base), prompt length, tokens to generate, arrival step."""

    adapter: str | None
    prompt_len: int
    new_tokens: int
    arrival: int


def _schedule(
    adapters: Sequence[str | None], prompt_lens: Sequence[int], new_tokens: Sequence[int], arrivals: Sequence[int]
) -> tuple[RequestSpec, ...]:
    """Requests given column by column: request i has the i-th entry of each."""
    columns = (adapters, prompt_lens, new_tokens, arrivals)
    return tuple(RequestSpec(*fields) for fields in zip(*columns, strict=True))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``quick()`` is the test suite's smaller variant."""

    vocab: int = 1024
    hidden: int = 512
    intermediate: int = 1024
    layers: int = 2
    heads: int = 8
    kv_heads: int = 4
    rows: int = 4  # decode bucket: rows served together
    prefill_len: int = 16  # prefill bucket: prompts are right-padded to it
    max_len: int = 32  # KV cache length per row
    requests: tuple[RequestSpec, ...] = _schedule(
        adapters=("sql", None, "chat", "code", "math", None, "code", "sql", "chat", "math"),
        prompt_lens=(6, 9, 5, 12, 7, 10, 4, 8, 11, 3),
        new_tokens=(8, 5, 12, 6, 10, 4, 9, 7, 5, 6),
        arrivals=(0, 0, 0, 1, 2, 3, 4, 6, 8, 10),
    )

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            vocab=256,
            hidden=64,
            intermediate=128,
            layers=1,
            heads=4,
            kv_heads=2,
            rows=3,
            prefill_len=8,
            max_len=16,
            requests=_schedule(
                adapters=("sql", None, "code", "math", "chat", None),
                prompt_lens=(5, 7, 3, 6, 8, 4),
                new_tokens=(4, 2, 5, 3, 4, 3),
                arrivals=(0, 0, 0, 1, 2, 3),
            ),
        )


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
    """A random-weight ``LlamaForCausalLM`` (float32, eval mode) on the host; generation stops only at length."""
    model = random_llama(config, seed)
    model.generation_config.eos_token_id = None  # random weights: an end token would stop PEFT's generate early
    model.generation_config.pad_token_id = 0
    return model


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


def make_requests(config: DemoConfig, seed: int) -> list[Request]:
    """The requests of ``config`` with random prompts (token 0 is kept for padding)."""
    g = torch.Generator().manual_seed(seed)
    return [
        Request(
            spec.adapter,
            torch.randint(1, config.vocab, (spec.prompt_len,), generator=g).tolist(),
            spec.new_tokens,
            spec.arrival,
        )
        for spec in config.requests
    ]


def peft_generate(peft_model: nn.Module, prompt: Sequence[int], adapter: str | None, new_tokens: int):
    """PEFT's greedy answer for one request: (tokens, logits [new_tokens, V]) from ``generate``."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = peft_model.generate(
            input_ids=torch.tensor([list(prompt)]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            adapter_names=[adapter or "__base__"],
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits)


@dataclasses.dataclass
class Check:
    """One request against PEFT: same greedy tokens, largest logit difference."""

    same_tokens: bool
    max_diff: float

    @property
    def ok(self) -> bool:
        return self.same_tokens and self.max_diff <= _TOLERANCE


def check_request(peft_model: nn.Module, request: Request, adapter: str | None = None) -> Check:
    """Compare a served request with PEFT's ``generate`` under ``adapter`` (default: the request's own)."""
    adapter = request.adapter if adapter is None else adapter
    tokens, logits = peft_generate(peft_model, request.prompt, adapter, request.max_new_tokens)
    ours = torch.stack(request.logits)
    diff = (ours - logits).abs().max().item() if ours.shape == logits.shape else float("inf")
    return Check(tokens == request.tokens, diff)


@dataclasses.dataclass
class DemoResult:
    """What the demo did: its requests (served), the PEFT checks, compilations, the reference model."""

    requests: list[Request]
    checks: list[Check]
    recompiles: int
    peft_model: nn.Module
    seconds: float

    @property
    def exit_code(self) -> int:
        return 0 if self.recompiles == 0 and all(c.ok for c in self.checks) else 1


def _prepare(config: DemoConfig, seed: int, device: torch.device, tmp: Path):
    """(PEFT reference, patched model on ``device``, its LoRAModel handle, adapter paths)."""
    import torch_xla_lora as tl

    specs = list(ADAPTERS)
    with _step(f"building a random Llama ({config.layers} layers, hidden {config.hidden}, vocab {config.vocab})"):
        base = build_base_model(config, seed)
    with _step(f"writing {len(specs)} PEFT adapters with save_pretrained"):
        paths = write_adapters(base, specs, tmp, seed)
    with _step("loading them into a PeftModel (the reference)"):
        peft_model = load_peft_model(base, paths)
    with _step(f"patching the model, loading all but {THREAD_LOADED!r} from the same files"):
        model = copy.deepcopy(base).to(device)
        targets = _ATTENTION + _MLP + ["lm_head", "embed_tokens"]
        max_rank = max(spec.rank for spec in specs)
        lora = tl.patch_model(model, tl.LoRAConfig(max_loras=len(specs), max_rank=max_rank, target_modules=targets))
        for name, path in paths.items():
            if name != THREAD_LOADED:
                lora.load_adapter(name, path)
    return peft_model, model, lora, paths


def _serve(config: DemoConfig, lora, steps: Steps, requests: list[Request], path: Path) -> tuple[float, int, int]:
    """Serve while a thread loads the last adapter; returns (seconds, decode steps, compilations)."""
    import torch_xla_lora as tl

    def load() -> None:
        # From another thread, through the public API, after the first decode step, while the
        # server runs. Requests for this adapter wait in the queue until the load is done (serve
        # admits a request only when lora.adapters() lists its adapter): the first step that uses
        # the adapter comes after the load, and the serving thread writes its slot (set_batch).
        lora.load_adapter(THREAD_LOADED, path)
        print(f"  * loader thread: {THREAD_LOADED!r} loaded", flush=True)

    print(f"\nserving {len(requests)} requests on {config.rows} rows (greedy; step: row request adapter@position):")
    loader = threading.Thread(target=load, name="adapter-loader")
    start = time.perf_counter()
    try:
        with tl.assert_no_recompile() as counter:
            decodes = serve(steps, lora, requests, on_step=lambda n: n == 0 and loader.start())
            loader.join()  # started at the first decode step (the demo's requests need one)
    except tl.RecompilationError:
        pass
    return time.perf_counter() - start, decodes, counter.count


def _report(requests: list[Request], checks: list[Check], seconds: float, decodes: int, recompiles: int) -> bool:
    print("\nadapters (written by PEFT, loaded from its files):")
    for spec in ADAPTERS:
        print(f"  {spec.name:5s} {spec.describe()}")
    print("\nrequest adapter  prompt  output  TTFT ms  tokens/s  same tokens as PEFT  max |logit - PEFT|")
    for number, (request, check) in enumerate(zip(requests, checks, strict=True)):
        decode_s = request.done - request.first_token
        rate = (
            f"{(len(request.tokens) - 1) / decode_s:8.1f}" if len(request.tokens) > 1 and decode_s > 0 else "       -"
        )
        print(
            f"  #{number:<4d} {request.adapter or 'base':7s} {len(request.prompt):6d}  {len(request.tokens):6d}  "
            f"{1000 * (request.first_token - request.arrived):7.0f}  {rate}  "
            f"{'yes' if check.same_tokens else 'NO':>19s}  {check.max_diff:.1e}"
        )
    total = sum(len(r.tokens) for r in requests)
    print("  (tokens/s: a request's decode rate after its first token; TTFT from its arrival)")
    print(f"\n{total} tokens in {seconds:.1f} s ({total / seconds:.1f} tokens/s, {decodes} decode steps)")
    print(f"largest |logit - PEFT| over every generated token: {max(c.max_diff for c in checks):.2e} (tolerance 1e-4)")
    print(f"requests whose greedy tokens equal PEFT's generate: {sum(c.same_tokens for c in checks)}/{len(checks)}")
    print(f"XLA compilations after warm-up: {recompiles}")
    ok = recompiles == 0 and all(c.ok for c in checks)
    print("OK: every request matches PEFT, nothing recompiled" if ok else "FAILED")
    return ok


def run_demo(seed: int = 0, quick: bool = False) -> DemoResult:
    """Run the demo, print its progress and report, and return what it did."""
    import torch_xla

    from torch_xla_lora.ops import device_generation

    config = DemoConfig.quick() if quick else DemoConfig()
    logging.getLogger("absl").setLevel(logging.ERROR)  # JAX's notice that TensorFlow is absent
    device = torch_xla.device()
    begin = time.perf_counter()
    print(f"torch_xla_lora demo on {device} ({device_generation()}), seed {seed}")
    with tempfile.TemporaryDirectory(prefix="torch_xla_lora_demo_") as tmp:
        peft_model, model, lora, paths = _prepare(config, seed, device, Path(tmp))
        steps = Steps(model, config.rows, config.max_len, config.prefill_len, device)
        print(
            f"warming up torch.compile(backend='openxla'): prefill [1, {config.prefill_len}], "
            f"decode [{config.rows}, 1], cache {config.rows} x {config.max_len}"
        )
        compiles = steps.warmup(lora)
        print(f"warm-up made {compiles} XLA compilations")
        requests = make_requests(config, seed)
        seconds, decodes, recompiles = _serve(config, lora, steps, requests, paths[THREAD_LOADED])
    with _step("\nPEFT reference: generate(..., adapter_names=[...]) per request (host, eager)"):
        checks = [check_request(peft_model, request) for request in requests]
    _report(requests, checks, seconds, decodes, recompiles)
    print(f"demo took {time.perf_counter() - begin:.0f} s")
    return DemoResult(requests, checks, recompiles, peft_model, seconds)


def run(seed: int = 0, quick: bool = False) -> int:
    """Run the demo; 0 when every request matches PEFT and nothing recompiled after warm-up."""
    return run_demo(seed, quick).exit_code
