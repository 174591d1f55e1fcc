"""The training demo: three tenants' adapters fine-tuned together in mixed batches, checked against PEFT.

``python -m torch_xla_lora train-demo`` runs, on any PJRT device (the CPU by default):

1. a small random-weight Llama built from a transformers config (nothing is downloaded),
   patched with :func:`torch_xla_lora.patch_model` and moved to the device;
2. three new adapters of different ranks (``lora.create_adapter`` with a
   ``peft.LoraConfig``), one per tenant, each with its own toy task on token sequences:
   ``copy``, ``reverse`` and ``shift`` (every symbol + 1, modulo the alphabet). A sequence
   is ``<bos> p_1 .. p_k <sep> a_1 .. a_k``: a prompt of k symbols, a separator, then the
   answer; the loss is on the answer tokens only (teacher forcing);
3. the documented training loop (docs/training.md): every step is one batch whose rows
   belong to different tenants (the mix changes every step; sometimes a tenant sits out),
   ``lora.set_batch(tenants)``, one forward, a per-tenant mean loss, one ``backward``, then
   per tenant its gradient norm clipped and its own AdamW step. ``lora.warmup(..., training=True)``
   compiles the forward and backward, the first two steps each tenant's optimizer update; after
   that nothing compiles (counted with :class:`torch_xla_lora.CompileCounter`);
4. per-tenant losses as training goes, and a loss-curve PNG per tenant (with matplotlib);
5. each adapter saved with ``lora.save_adapter`` and loaded with PEFT's
   ``PeftModel.from_pretrained`` on a fresh base built from the same seed; every tenant's
   greedy answers to held-out prompts (never trained on), from the patched model on the
   device, must solve its task and equal PEFT's ``generate`` token for token.

The demo exits 1 if a tenant's held-out accuracy is below :data:`MIN_ACCURACY`, if PEFT's
tokens differ, or if anything compiled after warm-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torch_xla_lora.random_models import random_llama

if TYPE_CHECKING:
    from torch_xla_lora.patching import LoRAModel

PAD, BOS, SEP = 0, 1, 2  # special tokens; symbol s is token FIRST_SYMBOL + s
FIRST_SYMBOL = 3
IGNORE = -100  # cross_entropy's ignore_index: no loss on the prompt

#: Held-out answer tokens a tenant must get right. Guessing gives 1 / alphabet (12.5% for 8 symbols), and a
#: model that learned its task gets every token: 90% leaves room for a rare miss, not for a task half-learned.
MIN_ACCURACY = 0.9

#: Task name -> answer of a prompt (symbols, given the alphabet's size). Each tenant learns the task of its name.
TASKS: dict[str, Callable[[Sequence[int], int], list[int]]] = {
    "copy": lambda prompt, alphabet: list(prompt),
    "reverse": lambda prompt, alphabet: list(reversed(prompt)),
    "shift": lambda prompt, alphabet: [(s + 1) % alphabet for s in prompt],
}
_TASK_TEXT = {"copy": "the prompt as is", "reverse": "the prompt backwards", "shift": "each symbol + 1, mod {alphabet}"}

_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass(frozen=True)
class Tenant:
    """One tenant: its task (:data:`TASKS`, by name) and its adapter's ``peft.LoraConfig`` fields."""

    name: str
    rank: int
    alpha: int
    targets: tuple[str, ...]

    def lora_config(self) -> Any:
        """The adapter's ``peft.LoraConfig`` (PEFT's default initialisation: B zeros, the adapter starts as a no-op)."""
        import peft

        return peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0)

    def describe(self) -> str:
        targets = list(self.targets)
        if set(_ATTENTION) <= set(targets):
            targets = ["attention"] + [t for t in targets if t not in _ATTENTION]
        return f"r={self.rank} alpha={self.alpha} on {' + '.join(targets)}"


TENANTS = (
    Tenant("copy", 4, 8, tuple(_ATTENTION + ["lm_head"])),
    Tenant("reverse", 16, 32, tuple(_ATTENTION + ["lm_head"])),
    Tenant("shift", 8, 16, tuple(_ATTENTION + ["lm_head"])),
)


@dataclasses.dataclass(frozen=True)
class TrainDemoConfig:
    """Sizes of the demo. ``quick()`` is the test suite's smaller variant."""

    alphabet: int = 8  # symbols of the tasks
    # k: symbols per prompt and per answer. At 4, "reverse" (each answer position must find its mirror in the
    # prompt) is learned by this model within the time budget for some seeds only; at 3, for every seed tried.
    length: int = 3
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    rows: int = 48  # rows per training batch, shared among the tenants
    steps: int = 400
    lr: float = 5e-3
    # Per tenant. Without it, AdamW at this rate sometimes throws "reverse" off after it has learned
    # (its loss back near chance within a few steps).
    max_grad_norm: float = 1.0
    log_every: int = 25
    held_out: int = 32  # held-out prompts, answered by every tenant
    shown: int = 3  # held-out prompts printed
    tenants: tuple[Tenant, ...] = TENANTS

    @property
    def vocab(self) -> int:
        return FIRST_SYMBOL + self.alphabet

    @property
    def seq_len(self) -> int:
        """Tokens a training row feeds the model: the whole sequence but its last token."""
        return 2 * self.length + 1

    @classmethod
    def quick(cls) -> TrainDemoConfig:
        return dataclasses.replace(cls(), rows=24, steps=300)


def encode(prompt: Sequence[int], answer: Sequence[int]) -> list[int]:
    """``<bos> prompt <sep> answer`` as token ids."""
    return [BOS, *(FIRST_SYMBOL + s for s in prompt), SEP, *(FIRST_SYMBOL + s for s in answer)]


def decode(tokens: Sequence[int]) -> list[int | None]:
    """Symbols of answer tokens (None for a token that is not a symbol)."""
    return [t - FIRST_SYMBOL if t >= FIRST_SYMBOL else None for t in tokens]


def random_prompt(config: TrainDemoConfig, gen: torch.Generator) -> list[int]:
    """``length`` random symbols."""
    return torch.randint(0, config.alphabet, (config.length,), generator=gen).tolist()


class Batches:
    """Training batches: random prompts (never a held-out one) and a mix of tenants that changes every step."""

    def __init__(self, config: TrainDemoConfig, tenants: Sequence[str], held_out: set[tuple[int, ...]], seed: int):
        self.config, self.tenants, self.held_out = config, list(tenants), held_out
        self.gen = torch.Generator().manual_seed(seed)

    def mix(self, step: int) -> list[str]:
        """Each row's tenant. The first two steps have every tenant (warm-up: each optimizer's first two
        updates); later, every third step one tenant (in turn) sits out."""
        present = list(self.tenants)
        if step >= 2 and step % 3 == 2:
            present.pop((step // 3) % len(present))
        rows = [present[i % len(present)] for i in range(self.config.rows)]  # every present tenant has rows
        order = torch.randperm(len(rows), generator=self.gen).tolist()
        return [rows[i] for i in order]

    def prompt(self) -> list[int]:
        while True:
            prompt = random_prompt(self.config, self.gen)
            if tuple(prompt) not in self.held_out:
                return prompt

    def batch(self, step: int) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mix, ids [rows, seq_len], targets [rows, seq_len] with IGNORE off the answer, row weights [rows]).

        A row's weight is 1 / (its tenant's rows), so the loss is the sum over tenants of each tenant's mean.
        """
        config, mix = self.config, self.mix(step)
        ids, targets = [], []
        for name in mix:
            prompt = self.prompt()
            sequence = encode(prompt, TASKS[name](prompt, config.alphabet))
            ids.append(sequence[:-1])
            targets.append([IGNORE] * (config.length + 1) + sequence[config.length + 2 :])
        weights = [1.0 / mix.count(name) for name in mix]
        return mix, torch.tensor(ids), torch.tensor(targets), torch.tensor(weights)


def held_out_prompts(config: TrainDemoConfig, seed: int) -> list[list[int]]:
    """Distinct prompts that training never sees."""
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    prompts: dict[tuple[int, ...], None] = {}
    while len(prompts) < config.held_out:
        prompts[tuple(random_prompt(config, gen))] = None
    return [list(p) for p in prompts]


def per_row_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row's answer tokens ([rows]); positions marked IGNORE count nothing."""
    per_token = nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return per_token.sum(dim=1) / (targets != IGNORE).sum(dim=1)


def build_base_model(config: TrainDemoConfig, seed: int) -> nn.Module:
    """A random-weight ``LlamaForCausalLM`` (float32, eval mode) on the host; generation stops only at length."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = random_llama(config, seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


@dataclasses.dataclass
class Answers:
    """One tenant's greedy answers to the held-out prompts: ours (patched model) and PEFT's."""

    tenant: str
    prompts: list[list[int]]
    ours: list[list[int]]
    peft: list[list[int]]
    alphabet: int

    def expected(self, prompt: Sequence[int]) -> list[int]:
        return [FIRST_SYMBOL + s for s in TASKS[self.tenant](prompt, self.alphabet)]

    @property
    def accuracy(self) -> float:
        """Fraction of answer tokens equal to the task's."""
        pairs = zip(self.prompts, self.ours, strict=True)
        right = sum(a == e for prompt, ours in pairs for a, e in zip(ours, self.expected(prompt), strict=True))
        return right / sum(len(p) for p in self.prompts)

    @property
    def solved(self) -> int:
        """Prompts answered exactly."""
        return sum(ours == self.expected(p) for p, ours in zip(self.prompts, self.ours, strict=True))

    @property
    def same_as_peft(self) -> bool:
        return self.ours == self.peft


def greedy_on_device(
    model: nn.Module,
    lora: LoRAModel,
    prompts: list[list[int]],
    tenants: list[str],
    config: TrainDemoConfig,
    device: torch.device,
) -> dict[str, list[list[int]]]:
    """Greedy answers (``length`` tokens) of the patched model: tenant -> one answer per prompt.

    One batch holds a row per (tenant, prompt), each on its tenant's adapter. Each token recomputes the
    rows whole, in the training shape ``[rows, seq_len]`` right-padded: causal attention keeps the padding
    invisible, so one compiled graph serves every token.
    """
    rows = [(tenant, prompt) for tenant in tenants for prompt in prompts]
    start = config.length + 2  # <bos> prompt <sep>
    ids = torch.full((len(rows), config.seq_len + 1), PAD, dtype=torch.long)
    for row, (_, prompt) in enumerate(rows):
        ids[row, :start] = torch.tensor(encode(prompt, []))
    lora.set_batch([tenant for tenant, _ in rows], seq_len=config.seq_len)
    with torch.no_grad():
        for position in range(start - 1, config.seq_len):
            best = model(ids[:, :-1].to(device)).logits.argmax(dim=-1).cpu()  # [rows, seq_len]
            ids[:, position + 1] = best[:, position]
    answers = ids[:, start:].tolist()
    return {tenant: answers[i * len(prompts) : (i + 1) * len(prompts)] for i, tenant in enumerate(tenants)}


def peft_answers(peft_model: nn.Module, tenant: str, prompts: list[list[int]], length: int) -> list[list[int]]:
    """PEFT's ``generate`` (greedy, ``length`` new tokens) on every prompt with ``tenant``'s adapter."""
    ids = torch.tensor([encode(p, []) for p in prompts])
    peft_model.set_adapter(tenant)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = peft_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, do_sample=False
        )
    return out[:, ids.shape[1] :].tolist()


def load_peft_model(config: TrainDemoConfig, seed: int, directories: dict[str, Path]) -> nn.Module:
    """Every saved adapter loaded by PEFT into a fresh base built from the same seed (host, eval mode)."""
    import peft

    names = list(directories)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = build_base_model(config, seed)
        model = peft.PeftModel.from_pretrained(base, directories[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(directories[name], adapter_name=name)
    return model.eval()


def plot_losses(tenants: Sequence[Tenant], curves: dict[str, list[tuple[int, float]]], out: Path) -> list[Path] | str:
    """One loss-curve PNG per tenant in ``out``; a message instead if matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no loss-curve PNGs (pip install matplotlib)"
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = []
    for tenant in tenants:
        name = tenant.name
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([step for step, _ in curves[name]], [loss for _, loss in curves[name]], linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("answer cross-entropy")
        ax.set_title(f"tenant {name!r}: {tenant.describe()}", fontsize=9)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        paths.append(out / f"loss_{name}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


@dataclasses.dataclass
class TrainDemoResult:
    """What the demo did: per-tenant answers and loss curves, compilations after warm-up, where it wrote."""

    answers: dict[str, Answers]
    curves: dict[str, list[tuple[int, float]]]
    steps: int
    warmup_compiles: int
    recompiles: int
    out: Path
    pngs: list[Path]
    seconds: float

    @property
    def learned(self) -> bool:
        return all(a.accuracy >= MIN_ACCURACY for a in self.answers.values())

    @property
    def peft_agrees(self) -> bool:
        return all(a.same_as_peft for a in self.answers.values())

    @property
    def exit_code(self) -> int:
        return 0 if self.learned and self.peft_agrees and self.recompiles == 0 else 1


@contextlib.contextmanager
def _timed(message: str) -> Iterator[None]:
    """Print ``message`` and, when the block ends, how long it took."""
    print(f"{message} ...", end="", flush=True)
    start = time.perf_counter()
    yield
    print(f" {time.perf_counter() - start:.1f} s", flush=True)


def _seconds(start: float) -> str:
    return f"{time.perf_counter() - start:6.1f} s"


def train(
    config: TrainDemoConfig, lora: LoRAModel, model: nn.Module, batches: Batches, device: torch.device
) -> tuple[dict[str, list[tuple[int, float]]], int, int]:
    """The training loop; returns (loss curves: tenant -> [(step, loss)], compilations in warm-up,
    compilations after warm-up)."""
    import torch_xla

    import torch_xla_lora as tl

    names = [t.name for t in config.tenants]
    params = {n: list(lora.trainable_parameters(n).values()) for n in names}
    optimizers = {n: torch.optim.AdamW(params[n], lr=config.lr) for n in names}
    model.train()

    def forward_backward(ids: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        losses = per_row_loss(model(ids).logits, targets)
        (losses * weights).sum().backward()
        return losses.detach()  # kept alive until the sync: a graph output, as in warm-up

    print(f"\nwarm-up: lora.warmup(batch_sizes=[{config.rows}], seq_lens=[{config.seq_len}], training=True)")
    # Any targets and weights of the training shapes: warm-up compiles the graph, the values are data.
    dummy_targets = torch.zeros(config.rows, config.seq_len, dtype=torch.long).to(device)
    dummy_weights = torch.ones(config.rows).to(device)
    warmup_compiles = lora.warmup(
        [config.rows],
        [config.seq_len],
        step=lambda ids: forward_backward(ids, dummy_targets, dummy_weights),
        host_metadata=True,
        training=True,
    )

    curves: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    window: dict[str, list[float]] = {n: [] for n in names}
    counter = tl.CompileCounter()
    start = time.perf_counter()
    print(f"training {config.steps} steps of {config.rows} rows (mean answer loss per tenant since the last line)")
    for step in range(config.steps):
        if step == 2:  # every optimizer has made its first two updates (the first also creates its state)
            warmup_compiles += counter.count
            counter = tl.CompileCounter()
        mix, ids, targets, weights = batches.batch(step)
        lora.set_batch(mix, seq_len=config.seq_len)  # seq_len: the kernels' grouping is built on the host
        losses = forward_backward(ids.to(device), targets.to(device), weights.to(device))
        torch_xla.sync()
        for name, optimizer in optimizers.items():
            # Each tenant's own recipe, as in its own training run: here its gradient norm clipped, then AdamW.
            # A tenant without rows this step has .grad None: clipping and its optimizer skip it.
            nn.utils.clip_grad_norm_(params[name], config.max_grad_norm)
            optimizer.step()
            torch_xla.sync()
            optimizer.zero_grad(set_to_none=True)
        losses = losses.cpu().tolist()
        for name in names:
            mine = [loss for loss, row in zip(losses, mix, strict=True) if row == name]
            if mine:
                curves[name].append((step, sum(mine) / len(mine)))
                window[name].append(curves[name][-1][1])
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            parts = [f"{n} {sum(w) / len(w):7.4f}" if w else f"{n}       -" for n, w in window.items()]
            print(f"  step {step + 1:4d}  " + "  ".join(parts) + f"  {_seconds(start)}", flush=True)
            window = {n: [] for n in names}
    return curves, warmup_compiles, counter.count


def _print_examples(config: TrainDemoConfig, answers: dict[str, Answers]) -> None:
    print("\nheld-out prompts (never trained on), greedy answers of the patched model, each tenant on its adapter:")
    for number, prompt in enumerate(next(iter(answers.values())).prompts[: config.shown]):
        print(f"  prompt {' '.join(map(str, prompt))}")
        for name, a in answers.items():
            symbols = decode(a.ours[number])
            shown = " ".join("?" if s is None else str(s) for s in symbols)
            verdict = "right" if a.ours[number] == a.expected(prompt) else "WRONG"
            print(f"    {name:8s} -> {shown:{2 * config.length}s} {verdict}")


def _report(result: TrainDemoResult) -> None:
    print(f"\ntenant   answer tokens right  prompts solved  same tokens as PEFT (accuracy needed: {MIN_ACCURACY:.0%})")
    for name, a in result.answers.items():
        print(
            f"  {name:8s} {a.accuracy:18.1%}  {a.solved:6d}/{len(a.prompts):<6d}  "
            f"{'yes' if a.same_as_peft else 'NO':>8s}"
        )
    print(
        f"XLA compilations: {result.warmup_compiles} in warm-up (lora.warmup, then each optimizer's first two steps), "
        f"{result.recompiles} in the {result.steps - 2} training steps after it"
    )
    for name, a in result.answers.items():
        if a.accuracy < MIN_ACCURACY:
            print(f"FAILED: tenant {name!r} got {a.accuracy:.1%} of held-out answer tokens (needs {MIN_ACCURACY:.0%})")
        if not a.same_as_peft:
            print(f"FAILED: tenant {name!r}: PEFT's generate on the saved adapter gives other tokens")
    if result.recompiles:
        print(f"FAILED: {result.recompiles} XLA compilations after warm-up")
    if result.exit_code == 0:
        print("OK: every tenant learned its task, PEFT agrees on every token, nothing compiled after warm-up")


def run_demo(
    seed: int = 0, quick: bool = False, out: str | Path | None = None, config: TrainDemoConfig | None = None
) -> TrainDemoResult:
    """Run the training demo, print its progress and report, and return what it did.

    ``config`` replaces the sizes ``quick`` selects.
    """
    import torch_xla

    import torch_xla_lora as tl
    from torch_xla_lora.ops import device_generation

    config = config or (TrainDemoConfig.quick() if quick else TrainDemoConfig())
    logging.getLogger("absl").setLevel(logging.ERROR)  # JAX's notice that TensorFlow is absent
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="torch_xla_lora_train_demo_"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch_xla.device()
    begin = time.perf_counter()
    print(f"torch_xla_lora train-demo on {device} ({device_generation()}), seed {seed}")
    print(
        f"random Llama: {config.layers} layers, hidden {config.hidden}, vocab {config.vocab} "
        f"(<pad> <bos> <sep> and {config.alphabet} symbols)"
    )
    print(f"tasks on prompts of {config.length} symbols: <bos> prompt <sep> answer, loss on the answer only")
    build = time.perf_counter()
    model = build_base_model(config, seed).to(device)
    tenants = config.tenants
    targets = sorted({t for tenant in tenants for t in tenant.targets}, key=(_ATTENTION + _MLP + ["lm_head"]).index)
    max_rank = max(t.rank for t in tenants)
    lora = tl.patch_model(model, tl.LoRAConfig(max_loras=len(tenants), max_rank=max_rank, target_modules=targets))
    torch.manual_seed(seed + 1)  # create_adapter initialises as PEFT does, from torch's generator
    for tenant in tenants:
        lora.create_adapter(tenant.name, tenant.lora_config())
        task = _TASK_TEXT[tenant.name].format(alphabet=config.alphabet)
        print(f"  tenant {tenant.name!r:9s} {tenant.describe():36s} learns to answer {task}")
    print(f"model built, patched, adapters created in {time.perf_counter() - build:.1f} s")

    prompts = held_out_prompts(config, seed)
    batches = Batches(config, [t.name for t in tenants], {tuple(p) for p in prompts}, seed)
    curves, warmup_compiles, recompiles = train(config, lora, model, batches, device)

    directories = {t.name: out / "adapters" / t.name for t in tenants}
    for name, directory in directories.items():
        lora.save_adapter(name, directory)
    print(f"\nadapters saved with lora.save_adapter in {out / 'adapters'}")
    model.eval()
    rows = len(prompts) * len(tenants)
    with _timed(f"greedy answers to {len(prompts)} held-out prompts, {rows} rows each on its tenant's adapter"):
        ours = greedy_on_device(model, lora, prompts, list(directories), config, device)
    with _timed("PEFT: PeftModel.from_pretrained on a fresh base (same seed), generate per tenant (host)"):
        peft_model = load_peft_model(config, seed, directories)
        theirs = {name: peft_answers(peft_model, name, prompts, config.length) for name in directories}
    answers = {name: Answers(name, prompts, ours[name], theirs[name], config.alphabet) for name in directories}
    pngs = plot_losses(tenants, curves, out)
    if isinstance(pngs, str):
        print(pngs)
        pngs = []
    else:
        print("loss curves: " + ", ".join(str(p) for p in pngs))
    _print_examples(config, answers)
    seconds = time.perf_counter() - begin
    result = TrainDemoResult(answers, curves, config.steps, warmup_compiles, recompiles, out, pngs, seconds)
    _report(result)
    print(f"output directory: {out}")
    print(f"train-demo took {result.seconds:.0f} s")
    return result


def run(seed: int = 0, quick: bool = False, out: str | Path | None = None) -> int:
    """Run the training demo; 0 when every tenant learned, PEFT agrees and nothing compiled after warm-up."""
    return run_demo(seed, quick, out).exit_code
