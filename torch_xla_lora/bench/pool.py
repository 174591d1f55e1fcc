"""Padded slots against rank-true pools, paired: ``python -m torch_xla_lora.bench pool``.

One random Llama (the e2e benchmark's sizes, ``--layers``), patched three times on
the XLA device: padded slots (the default), a float pool (``memory_budget``) and an
int8 pool (``weight_dtype="int8"``), each with ``--max-loras`` lanes of ``--max-rank``
rows, all holding the same random adapters. Per scenario (a decode step of
``--decode-batch`` rows, a prefill of ``--prefill`` tokens over 4 rows) the three
run in rotating order, ``--repeats`` times, each timed as ``bench e2e`` times a
step (host preparation plus device execution); reported as the median ratio to
the padded step. Scenarios: uniform rank 16 with 8 distinct adapters, and a
mixed fleet (ranks 8/16/64 at 70/20/10%) with 1, 8 and 16 distinct adapters.

``--moe``: the same on a random Mixtral (``bench moe``'s, ``--moe-hidden`` wide, ``--experts`` experts,
top-2), every linear layer, expert and router adapted (PEFT's ``"all-linear"``, adapters written by PEFT
with random factors at each scenario's ranks): the experts layer reads its pools through its (lane,
expert) entry table, where it used to gather ``[max_loras * E, max_rank, width]`` slots per step.

``--tokens-sweep``: the two XLA-native paths a pooled LoRA op chooses between by its token count
(``_xla_native.PACKED_MAX_TOKENS``), paired on one projection at each count of ``SWEEP_TOKENS``: the
packed path (the used lanes' true-rank rows side by side, ``_xla_native.pooled_shrink_expand``) and
the slot op on the pool's tiles (``_xla_native.PoolTiles``), as jitted JAX functions on the XLA
device's backend, each token on lane ``t mod adapters``. Their outputs are checked equal before timing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
from collections.abc import Sequence

import torch

from torch_xla_lora.bench.e2e import E2EConfig, paired_ratio, paired_seconds
from torch_xla_lora.bench.e2e_model import LINEAR_TARGETS, build_model, random_adapter
from torch_xla_lora.bench.memory import fleet

LAYOUTS = ("padded", "pool", "pool int8")
#: Token counts of ``--tokens-sweep``: decode batches to short prefills, either side of PACKED_MAX_TOKENS.
SWEEP_TOKENS = (8, 16, 32, 64, 128, 256)
#: Scenarios of ``--quick`` (the test suite's): 16 adapters of mixed ranks (several 128-wide chunks at decode).
QUICK_SCENARIOS = ("mixed ranks, 16 adapters",)


def _patched(model, layout: str, max_loras: int, max_rank: int, adapters: dict, padded=None, targets=LINEAR_TARGETS):
    """``model`` patched in ``layout`` (on ``targets``) with ``adapters`` loaded; a pool holds them all (sized
    from ``padded``'s layers by the pool's accounting), so no step evicts."""
    import torch_xla_lora as tl

    pooled = {}
    if layout != "padded":
        int8 = layout == "pool int8"
        row_bytes = sum(layer.pool_row_bytes(int8) for layer in padded.layers.values())
        ranks = [max([config["r"], *(config.get("rank_pattern") or {}).values()]) for _, config in adapters.values()]
        rows = sum(ranks) + max_rank + 2
        pooled = {"memory_budget": rows * row_bytes, "weight_dtype": "int8" if int8 else None}
    config = tl.LoRAConfig(
        max_loras=max_loras,
        max_rank=max_rank,
        target_modules=targets,
        max_cpu_adapters=max(len(adapters), max_loras),
        **pooled,
    )
    lora = tl.patch_model(copy.deepcopy(model), config)
    for name, (state, adapter_config) in adapters.items():
        lora.load_adapter(name, state_dict=state, config=adapter_config)
    return lora


def _closures(lora, batch: list[str], ids: torch.Tensor):
    """(prepare, forward) of one step: set the batch, run the model on ``ids`` without a cache."""
    return (lambda: lora.set_batch(batch)), (lambda: lora.model(ids, use_cache=False).logits)


def _check_agree(steps: dict, what: str) -> None:
    """Refuse to time layouts that compute different logits: the float pool must equal the padded slots (float32
    rounding), the int8 pool stay finite (its rounding error is measured by ``bench memory --quality``)."""
    logits = {}
    for layout, (prepare, forward) in steps.items():
        prepare()
        logits[layout] = forward().float().cpu()
    padded, pool = logits["padded"], logits["pool"]
    scale = padded.abs().max().item()
    if not torch.allclose(pool, padded, rtol=1e-4, atol=1e-4 * scale):
        error = (pool - padded).abs().max().item() / scale
        raise AssertionError(f"{what}: the pool and the padded slots disagree (max error {error:.2e} of the logits)")
    if not torch.isfinite(logits["pool int8"]).all():
        raise AssertionError(f"{what}: the int8 pool's logits are not finite")


def scenarios() -> dict[str, list[int]]:
    """Scenario name -> the ranks of its distinct adapters."""
    mixed = fleet({8: 0.7, 16: 0.2, 64: 0.1}, 16)
    out = {"uniform r16, 8 adapters": [16] * 8}
    for count in (1, 8, 16):
        out[f"mixed ranks, {count} adapter{'s' * (count > 1)}"] = mixed[:count] if count > 1 else [64]
    return out


def _llama(config: E2EConfig):
    """(model, adapter(rank, seed) -> PEFT-format (state, config), targets): the e2e benchmark's Llama."""
    model = build_model(config, torch.device("cpu"))
    shapes = {
        f"model.layers.{i}.{kind}.{name}": dims
        for i in range(config.layers)
        for kind, name, dims in (
            ("self_attn", "q_proj", (config.hidden, config.hidden)),
            ("self_attn", "k_proj", (config.hidden, config.hidden * config.kv_heads // config.heads)),
            ("self_attn", "v_proj", (config.hidden, config.hidden * config.kv_heads // config.heads)),
            ("self_attn", "o_proj", (config.hidden, config.hidden)),
            ("mlp", "gate_proj", (config.hidden, config.intermediate)),
            ("mlp", "up_proj", (config.hidden, config.intermediate)),
            ("mlp", "down_proj", (config.intermediate, config.hidden)),
        )
    }
    return model, lambda rank, seed: random_adapter(shapes, rank, seed), LINEAR_TARGETS


def _mixtral(hidden: int, layers: int, experts: int):
    """(model, adapter(rank, seed), targets): ``bench moe``'s random Mixtral (top-2), adapters written by PEFT on
    ``"all-linear"`` (attention, experts and routers) with random factors."""
    import warnings

    import peft

    from torch_xla_lora.bench.moe import build

    model = build("moe", hidden, layers, experts, top_k=2)

    def adapter(rank: int, seed: int) -> tuple[dict, dict]:
        torch.manual_seed(seed)
        # As PEFT makes them: its "all-linear" gives the experts' gate_up_proj twice the rank (its rank_pattern).
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapted = peft.get_peft_model(copy.deepcopy(model), config)
        return peft.get_peft_model_state_dict(adapted), adapted.peft_config["default"].to_dict()

    return model, adapter, "all-linear"


def run(
    config: E2EConfig,
    max_loras: int,
    max_rank: int,
    decode_batch: int,
    prefill: int,
    repeats: int,
    moe: tuple[int, int] | None = None,
    only: Sequence[str] | None = None,
) -> list:
    """Rows ``{scenario, step, padded_ms, pool_ratio, pool int8_ratio}``: on the e2e Llama, or with ``moe``
    (hidden, experts) on a Mixtral of ``config.layers`` layers; ``only``: these scenarios (default: all)."""
    import torch_xla

    device = torch_xla.device()
    model, adapter, targets = _llama(config) if moe is None else _mixtral(moe[0], config.layers, moe[1])
    vocab = model.config.vocab_size
    rows = []
    for name, ranks in scenarios().items():
        if only is not None and name not in only:
            continue
        adapters = {f"a{i}": adapter(rank, i) for i, rank in enumerate(ranks)}
        model = model.to(device)
        models = {"padded": _patched(model, "padded", max_loras, max_rank, adapters, targets=targets)}
        for layout in LAYOUTS[1:]:
            models[layout] = _patched(model, layout, max_loras, max_rank, adapters, models["padded"], targets)
        names = list(adapters)
        g = torch.Generator().manual_seed(0)
        inputs = {
            "decode": torch.randint(0, vocab, (decode_batch, 1), generator=g).to(device),
            "prefill": torch.randint(0, vocab, (4, prefill // 4), generator=g).to(device),
        }
        for kind, ids in inputs.items():
            batch = [names[i % len(names)] for i in range(ids.shape[0])]

            steps = {layout: _closures(models[layout], batch, ids) for layout in LAYOUTS}
            _check_agree(steps, f"{name}, {kind}")
            seconds = paired_seconds(steps, repeats)
            ratios = {layout: paired_ratio(seconds[layout], seconds["padded"]) for layout in LAYOUTS[1:]}
            rows.append(
                {
                    "scenario": name,
                    "step": kind,
                    "padded_ms": 1000 * statistics.median(seconds["padded"]),
                    **{f"{layout}_ratio": ratio for layout, ratio in ratios.items()},
                }
            )
            print(
                f"{name}, {kind}: padded {rows[-1]['padded_ms']:.2f} ms; pool {ratios['pool']:.3f}x; "
                f"pool int8 {ratios['pool int8']:.3f}x",
                flush=True,
            )
        for lora in models.values():
            lora.unpatch()
    return rows


def _sweep_pools(hidden: int, out_dim: int, ranks: list[int], max_loras: int, max_rank: int, seed: int):
    """(a_pool [P + 2, hidden], b_pool [P + 2, out_dim], rows [max_loras, max_rank]) in bf16: lane l < len(ranks)
    holds rank ranks[l] in rows of its own, the others none (every entry the zero row P)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    total = sum(ranks)
    rows = np.full((max_loras, max_rank), total, np.int32)
    start = 0
    for lane, rank in enumerate(ranks):
        rows[lane, :rank] = np.arange(start, start + rank)
        start += rank
    key_a, key_b = jax.random.split(jax.random.PRNGKey(seed))
    a_pool = (jax.random.normal(key_a, (total + 2, hidden)) / hidden**0.5).at[total:].set(0)
    b_pool = (jax.random.normal(key_b, (total + 2, out_dim)) / 4).at[total:].set(0)
    return a_pool.astype(jnp.bfloat16), b_pool.astype(jnp.bfloat16), jnp.asarray(rows)


def _timed(fn, args, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of the compiled ``fn`` (after one untimed call)."""
    import time

    fn(*args).block_until_ready()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        out.append(time.perf_counter() - start)
    return out


def tokens_sweep(
    hidden: int = 2048,
    out_dim: int = 5632,
    max_loras: int = 16,
    max_rank: int = 64,
    tokens: Sequence[int] = SWEEP_TOKENS,
    repeats: int = 5,
    calls: int = 20,
    fleets: Sequence[str] | None = None,
) -> list[dict]:
    """Rows ``{fleet, tokens, packed_ms, tiles_ms, packed_over_tiles}``: per fleet (uniform rank 16 with 8 adapters,
    the mixed fleet with 8 and 16; ``fleets``: those named only) and token count, the two paths' median call times
    over ``repeats`` rounds of ``calls`` calls each, taken in rotating order, and the median of the rounds'
    ratios."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from torch_xla_lora.ops import _jax, _xla_native

    scaling = 0.5
    slot_op = _jax.shrink_expand_fn("xla", "cpu", scaling, False)

    def packed(x, a_pool, b_pool, base, lanes, rows):
        return _xla_native.pooled_shrink_expand(x, a_pool, b_pool, base, lanes, rows, None, scaling=scaling)

    def tiles(x, a_pool, b_pool, base, lanes, rows):
        lora_a, lora_b = _jax.pool_slot_weights("xla", a_pool, b_pool, None, None, rows, x.dtype, hidden, out_dim)
        return slot_op(x, lora_a, lora_b, base, lanes).astype(jnp.float32)

    mixed = fleet({8: 0.7, 16: 0.2, 64: 0.1}, 16)
    named = {"uniform r16, 8 adapters": [16] * 8, "mixed ranks, 8 adapters": mixed[:8]}
    named["mixed ranks, 16 adapters"] = mixed
    paths = {"packed": jax.jit(packed), "tiles": jax.jit(tiles)}
    out = []
    for seed, (name, ranks) in enumerate(named.items()):
        if fleets is not None and name not in fleets:
            continue
        pools = _sweep_pools(hidden, out_dim, ranks, max_loras, max_rank, seed)
        for num_tokens in tokens:
            key = jax.random.PRNGKey(100 + num_tokens)
            x = jax.random.normal(key, (num_tokens, hidden)).astype(jnp.bfloat16)
            base = jnp.zeros((num_tokens, out_dim), jnp.float32)
            lanes = jnp.arange(num_tokens, dtype=jnp.int32) % len(ranks)
            args = (x, *pools[:2], base, lanes, pools[2])
            results = {path: np.asarray(fn(*args), np.float32) for path, fn in paths.items()}
            scale = float(np.abs(results["tiles"]).max())
            if not np.allclose(results["packed"], results["tiles"], atol=2e-2 * scale, rtol=2e-2):
                raise AssertionError(f"{name}, T = {num_tokens}: the packed and pool-tile paths disagree")
            seconds = {path: [] for path in paths}
            ratios = []
            for round_ in range(repeats):
                order = list(paths) if round_ % 2 == 0 else list(paths)[::-1]
                times = {path: statistics.median(_timed(paths[path], args, calls)) for path in order}
                for path, value in times.items():
                    seconds[path].append(value)
                ratios.append(times["packed"] / times["tiles"])
            row = {"fleet": name, "tokens": num_tokens, "hidden": hidden, "out_dim": out_dim}
            row |= {f"{path}_ms": 1000 * statistics.median(v) for path, v in seconds.items()}
            row["packed_over_tiles"] = statistics.median(ratios)
            out.append(row)
            print(
                f"{name}, T = {num_tokens}: packed {row['packed_ms']:.3f} ms, tiles {row['tiles_ms']:.3f} ms, "
                f"packed / tiles {row['packed_over_tiles']:.3f}",
                flush=True,
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_xla_lora.bench pool", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--max-loras", type=int, default=16)
    parser.add_argument(
        "--max-rank", type=int, default=None, help="default 64; with --moe 128 (PEFT's gate_up_proj at twice r)"
    )
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=512, help="prefill tokens (4 rows)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--moe", action="store_true", help="a random Mixtral, experts and routers adapted too")
    parser.add_argument("--moe-hidden", type=int, default=1024, help="--moe: the Mixtral's hidden size")
    parser.add_argument("--experts", type=int, default=8, help="--moe: experts per layer")
    parser.add_argument(
        "--tokens-sweep",
        action="store_true",
        help="pair the pooled op's two XLA-native paths (packed rows, pool tiles) at each token count of one "
        "gate_proj-sized projection, to check the threshold between them (PACKED_MAX_TOKENS)",
    )
    args = parser.parse_args(argv)
    if args.max_rank is None:
        args.max_rank = 128 if args.moe else 64
    config = dataclasses.replace(E2EConfig(), layers=args.layers)
    if args.quick:
        config = dataclasses.replace(config, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128)
    if args.tokens_sweep:
        from torch_xla_lora.ops import _xla_native

        sizes = (config.hidden, config.intermediate, args.max_loras, args.max_rank)
        quick = {"tokens": (8,), "fleets": ["mixed ranks, 16 adapters"]} if args.quick else {}
        sweep = tokens_sweep(*sizes, repeats=args.repeats, **quick)
        if args.json:
            print(json.dumps(sweep, indent=1))
            return 0
        print(
            f"\none projection {config.hidden} -> {config.intermediate}, max_loras {args.max_loras}, max_rank "
            f"{args.max_rank}; the op runs the packed path up to PACKED_MAX_TOKENS = {_xla_native.PACKED_MAX_TOKENS}"
        )
        print("| fleet | T | packed (ms) | pool tiles (ms) | packed / tiles |\n|---|---|---|---|---|")
        for r in sweep:
            print(
                f"| {r['fleet']} | {r['tokens']} | {r['packed_ms']:.3f} | {r['tiles_ms']:.3f} | "
                f"{r['packed_over_tiles']:.3f} |"
            )
        return 0
    moe = None
    if args.moe:
        moe = (64 if args.quick else args.moe_hidden, args.experts)
    only = QUICK_SCENARIOS if args.quick else None
    rows = run(config, args.max_loras, args.max_rank, args.decode_batch, args.prefill, args.repeats, moe, only)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    model = f"Llama (hidden {config.hidden})" if moe is None else f"Mixtral (hidden {moe[0]}, {moe[1]} experts, top-2)"
    print(f"\n{config.layers}-layer {model}, max_loras {args.max_loras}, max_rank {args.max_rank}")
    print("| scenario | step | padded (ms) | pool / padded | pool int8 / padded |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scenario']} | {r['step']} | {r['padded_ms']:.2f} | {r['pool_ratio']:.3f} | "
            f"{r['pool int8_ratio']:.3f} |"
        )
    return 0
