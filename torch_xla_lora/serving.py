"""A small continuous-batching server for a patched transformers model: static KV cache, fixed buckets.

The demo (:mod:`torch_xla_lora.demo`) runs it; it is meant to be read and copied.

Why the library's own cache rather than transformers' ``StaticCache``: a
``StaticCache`` layer keeps one write position for the whole batch (one
``cumulative_length`` counter in transformers 5), so every row must sit at the
same position. Continuous batching puts each row at its own position: a row is
refilled by a new request while its neighbours are mid-generation. So
:class:`RowCache` is a transformers ``Cache`` whose ``update`` writes each
row's new keys and values at that row's own positions, with one ``index_put``
at device-tensor indices (rows [B], positions [B, q]): the compiled graph is
the same for every mix of positions. The model gets a per-row 4D attention
mask and per-row ``position_ids`` (transformers uses a 4D mask as given), both
built on the host and sent whole, so nothing about positions is a Python value
the graph depends on.

Two compiled steps, each one fixed bucket:

- prefill: one request, its prompt right-padded to ``prefill_len`` tokens,
  batch 1, writing cache row ``row`` at positions ``0 .. prefill_len-1``
  (causal attention keeps the padding invisible to the real tokens; the
  padding's cache entries are masked until decode overwrites them);
- decode: every row at once, one token each at its own position; idle rows run
  the base model on a dummy token at position 0 and are ignored.

Before each step the loop calls ``lora.set_batch`` with each row's adapter
(``None`` = base), so a decode batch mixes adapters token by token.

The cache fits transformers decoders whose attention calls ``cache.update``
and which take a 4D mask and ``position_ids`` (Llama, Qwen2, Mistral without a
sliding window...); full attention only, fp32 or bf16.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin


class _RowLayer(CacheLayerMixin):
    """One decoder layer's keys and values: [rows, kv_heads, max_len, head_dim] each, allocated up front."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated in RowCache.allocate

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError("RowCache.update writes the rows")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0  # positions are per row: the caller always passes position_ids

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class RowCache(Cache):
    """A static KV cache whose rows each sit at their own position.

    ``allocate`` makes the storage once; ``bind`` (called inside the compiled
    step) gives a view that knows where this forward writes: ``rows`` [B]
    (int64, which cache rows the batch rows are) and ``positions`` [B, q]
    (int64, the position of every input token). With ``prefill`` the attention
    sees only the forward's own keys (a new request starts at position 0);
    otherwise it sees the whole cache and the mask selects each row's past.
    """

    def __init__(
        self,
        layers: list[_RowLayer],
        rows: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        prefill: bool = False,
    ) -> None:
        super().__init__(layers=layers)
        self.rows, self.positions, self.prefill = rows, positions, prefill

    @classmethod
    def allocate(cls, config, rows: int, max_len: int, device: torch.device, dtype: torch.dtype) -> RowCache:
        """Zero storage for a transformers ``config`` (num_hidden_layers, num_key_value_heads, head_dim)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (rows, config.num_key_value_heads, max_len, head_dim)
        layers = [
            _RowLayer(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        return cls(layers)

    def bind(self, rows: torch.Tensor, positions: torch.Tensor, prefill: bool) -> RowCache:
        """A view on the same storage for one forward: rows [B] and positions [B, q] (device, int64)."""
        return RowCache(self.layers, rows, positions, prefill)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write key/value states [B, H, q, d] at (rows[b], positions[b, t]); return what attention reads."""
        layer = self.layers[layer_idx]
        where = (self.rows[:, None], slice(None), self.positions)  # indexes [B, q, H, d]
        layer.keys[where] = key_states.transpose(1, 2)
        layer.values[where] = value_states.transpose(1, 2)
        if self.prefill:
            return key_states, value_states
        return layer.keys, layer.values


def causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, length, length]: 0 where token i may see token j (j <= i), else the dtype's min."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    return _additive(allowed, dtype)[None, None]


def decode_mask(positions: Sequence[int], max_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, max_len]: row b sees cache positions 0 .. positions[b]."""
    allowed = torch.arange(max_len)[None, :] <= torch.tensor(positions)[:, None]
    return _additive(allowed, dtype)[:, None, None, :]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Additive rather than boolean: eager and SDPA attention both add a float mask.
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def cache_keyword(model: nn.Module) -> str:
    """The forward's cache argument: ``cache`` in recent transformers 5, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Steps:
    """The two compiled forwards of a model on a :class:`RowCache`, one fixed bucket each.

    Args:
      model: a transformers causal LM (patched or not) on ``device``.
      rows, max_len, prefill_len: the buckets: decode is [rows, 1] against a
        cache of [rows, max_len] tokens, prefill [1, prefill_len].
      backend: the ``torch.compile`` backend; ``None`` runs eagerly (tests on the host).

    On a mesh (a model patched with ``patch_model(..., mesh=...)``) both steps return the logits
    replicated (:func:`torch_xla_lora.sharding.replicated`, inside the compiled graph): the
    vocabulary-sharded logits of a vocab-parallel head would make every host fetch compile a new
    gather graph in torch_xla 2.9, i.e. a compilation per generated token.
    """

    def __init__(
        self,
        model: nn.Module,
        rows: int,
        max_len: int,
        prefill_len: int,
        device: torch.device,
        backend: str | None = "openxla",
    ) -> None:
        dtype = next(model.parameters()).dtype
        self.rows, self.max_len, self.prefill_len = rows, max_len, prefill_len
        self.device, self.dtype = device, dtype
        self.cache = RowCache.allocate(model.config, rows, max_len, device, dtype)
        # Constant inputs live on the device once; per-step inputs are sent whole (no graph op).
        self.prefill_mask = causal_mask(prefill_len, dtype).to(device)
        self.prefill_positions = torch.arange(prefill_len)[None].to(device)
        self.all_rows = torch.arange(rows).to(device)
        keyword = cache_keyword(model)
        mesh = _mesh_of(model)

        def forward(ids, rows, positions, mask, prefill: bool):
            cache = self.cache.bind(rows, positions, prefill)
            kwargs = {keyword: cache}
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs).logits
            if mesh is None:
                return logits
            from torch_xla_lora import sharding

            return sharding.replicated(logits, mesh)

        def prefill(ids, row):  # ids [1, prefill_len], row [1]
            return forward(ids, row, self.prefill_positions, self.prefill_mask, True)

        def decode(ids, positions, mask):  # ids and positions [rows, 1], mask [rows, 1, 1, max_len]
            return forward(ids, self.all_rows, positions, mask, False)

        compile_ = (lambda fn: torch.compile(fn, backend=backend)) if backend else (lambda fn: fn)
        self._prefill, self._decode = compile_(prefill), compile_(decode)

    def prefill(self, prompt: Sequence[int], row: int) -> torch.Tensor:
        """Run one prompt (at most ``prefill_len`` tokens) into cache row ``row``; logits [V] of its last token."""
        ids = torch.zeros(1, self.prefill_len, dtype=torch.long)
        ids[0, : len(prompt)] = torch.tensor(prompt)
        with torch.no_grad():
            logits = self._prefill(ids.to(self.device), torch.tensor([row]).to(self.device))
            _sync(self.device)
        return logits.cpu()[0, len(prompt) - 1]

    def decode(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One token per row (ids ``tokens``) at its own position ``positions``; logits [rows, V]."""
        ids = torch.tensor(tokens, dtype=torch.long)[:, None].to(self.device)
        where = torch.tensor(positions)[:, None].to(self.device)
        mask = decode_mask(positions, self.max_len, self.dtype).to(self.device)
        with torch.no_grad():
            logits = self._decode(ids, where, mask)
            _sync(self.device)
        return logits.cpu()[:, 0]

    def warmup(self, lora) -> int:
        """Compile both buckets through ``lora.warmup`` (every slot in use); returns the compilations made."""
        row = torch.tensor([0]).to(self.device)
        count = lora.warmup([1], [self.prefill_len], step=lambda ids: self._prefill(ids, row), host_metadata=True)
        zeros = torch.zeros(self.rows, 1, dtype=torch.long).to(self.device)
        mask = decode_mask([0] * self.rows, self.max_len, self.dtype).to(self.device)
        count += lora.warmup([self.rows], [1], step=lambda ids: self._decode(ids, zeros, mask), host_metadata=True)
        return count


def _mesh_of(model: nn.Module):
    """The SPMD mesh the model was patched on, or None (one device; torch_xla's SPMD module not imported)."""
    from torch_xla_lora.layers import BaseLayerWithLoRA

    if not any(isinstance(m, BaseLayerWithLoRA) and m.tensor_parallel is not None for m in model.modules()):
        return None
    from torch_xla_lora import sharding

    return sharding.model_mesh(model)


def _sync(device: torch.device) -> None:
    """Run the pending lazy graph (XLA); outputs must stay alive until then."""
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


@dataclasses.dataclass
class Request:
    """One generation request; ``serve`` fills the fields after ``arrival``.

    Attributes:
      adapter: adapter name, or ``None`` for the base model.
      prompt: token ids (at most the prefill bucket).
      max_new_tokens: greedy tokens to generate (the request finishes then).
      arrival: the decode step at which the request arrives.
      tokens, logits: generated ids, and the logits [V] each was chosen from.
      arrived, first_token, done: ``time.perf_counter()`` stamps.
    """

    adapter: str | None
    prompt: list[int]
    max_new_tokens: int
    arrival: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)
    arrived: float | None = None
    first_token: float | None = None
    done: float | None = None

    @property
    def finished(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens

    def take(self, logits: torch.Tensor) -> None:
        """Record the greedy choice from ``logits`` [V]."""
        self.logits.append(logits)
        self.tokens.append(int(logits.argmax()))
        now = time.perf_counter()
        self.first_token = self.first_token or now
        if self.finished:
            self.done = now


def serve(
    steps: Steps,
    lora,
    requests: Sequence[Request],
    progress: Callable[[str], None] | None = print,
    on_step: Callable[[int], None] | None = None,
) -> int:
    """Continuous batching: serve ``requests`` on the fixed rows of ``steps``; returns the decode steps run.

    Every iteration admits arrived requests into free rows (one prefill each),
    then runs one decode step for all rows. A request waits while its adapter is
    not loaded yet (``lora.adapters()``), so adapters may be loaded from another
    thread while this runs. A finished request frees its row for the next one.
    """
    for request in requests:
        if not 0 < len(request.prompt) <= steps.prefill_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens; the prefill bucket is {steps.prefill_len}")
        if len(request.prompt) + request.max_new_tokens - 1 > steps.max_len:
            raise ValueError(f"prompt + max_new_tokens - 1 exceeds the cache length {steps.max_len}")
    say = progress or (lambda _: None)
    waiting = sorted(requests, key=lambda r: r.arrival)  # stable: ties keep their order
    active: dict[int, Request] = {}  # row -> request
    step = decodes = 0  # step: the clock of arrivals
    while waiting or active:
        now = time.perf_counter()
        for request in waiting:
            if request.arrival <= step and request.arrived is None:
                request.arrived = now
        loaded = lora.adapters()
        for request in list(waiting):
            free = [row for row in range(steps.rows) if row not in active]
            if not free:
                break
            if request.arrived is None or (request.adapter is not None and request.adapter not in loaded):
                continue
            waiting.remove(request)
            lora.set_batch([request.adapter], seq_len=steps.prefill_len)
            request.take(steps.prefill(request.prompt, free[0]))
            say(
                f"  + {_label(requests, request)} {request.adapter or 'base'} ({len(request.prompt)} prompt tokens) "
                f"in row {free[0]}, "
                f"first token after {1000 * (request.first_token - request.arrived):.0f} ms"
            )
            if not request.finished:
                active[free[0]] = request
        if not active:
            if any(r.arrived is None for r in waiting):
                step = min(r.arrival for r in waiting if r.arrived is None)  # idle until the next arrival
            else:
                time.sleep(0.01)  # every arrived request waits for its adapter to finish loading
            continue
        names = [active[row].adapter if row in active else None for row in range(steps.rows)]
        lora.set_batch(names, seq_len=1)  # every step: rows change adapters as requests come and go
        tokens = [active[row].tokens[-1] if row in active else 0 for row in range(steps.rows)]
        positions = [
            len(active[row].prompt) + len(active[row].tokens) - 1 if row in active else 0 for row in range(steps.rows)
        ]
        logits = steps.decode(tokens, positions)
        decodes += 1
        say(
            f"step {step:3d}  "
            + " | ".join(
                f"{_label(requests, active[row])} {active[row].adapter or 'base'}@{positions[row]}"
                if row in active
                else "idle"
                for row in range(steps.rows)
            )
        )
        for row, request in list(active.items()):
            request.take(logits[row])
            if request.finished:
                say(f"  - {_label(requests, request)} done: {len(request.tokens)} tokens, row {row} free")
                del active[row]
        if on_step:
            on_step(decodes - 1)
        step += 1
    return decodes


def _label(requests: Sequence[Request], request: Request) -> str:
    return f"#{next(i for i, r in enumerate(requests) if r is request)}"
