"""Rank-true storage (``LoRAConfig(memory_budget=...)``, docs/layers.md "Rank-true storage").

References: PEFT's own mixed batch (``adapter_names``) on the same random Llama; the byte accounting
against the model's module shapes; int8 rows against PEFT run with factors rounded to int8 by plain
torch here (symmetric, one scale per rank row).
"""

import copy
import threading
import warnings

import peft
import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
from conftest import assert_close, tiny_llama
from torch import nn

import torch_xla_lora as tl
from torch_xla_lora import pool
from torch_xla_lora.pool import PoolFullError, parse_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]
RANKS = {"a": 8, "b": 4, "c": 2, "d": 6}
MAX_RANK = 8


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def peft_model(base_model):
    """One PeftModel holding adapters a-d (ranks 8, 4, 2, 6; c without the embedding), random B."""
    model = None
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, rank in RANKS.items():
            targets = [t for t in TARGETS if not (name == "c" and t == "embed_tokens")]
            config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
            if model is None:
                model = peft.get_peft_model(copy.deepcopy(base_model), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
    return model.eval()


def _state(peft_model, name):
    return peft.get_peft_model_state_dict(peft_model, adapter_name=name), peft_model.peft_config[name]


def _row_bytes(model: nn.Module, itemsize: int) -> int:
    """One rank row over every patched module, from the model's own shapes: (in + out) elements each."""
    total = 0
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in TARGETS and isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.weight
            total += weight.shape[0] + weight.shape[1]
    return total * itemsize


def _expected(peft_model, ids, rows):
    with torch.no_grad():
        return peft_model(ids, adapter_names=[r or "__base__" for r in rows]).logits


def _patched(base_model, device, rows_budget: int, **config):
    model = copy.deepcopy(base_model).to(device)
    budget = (rows_budget + 2) * _row_bytes(base_model, 4)  # + the zero and scratch rows
    # The XLA-native backend: rows allocated one by one on any device (with the Pallas backend, and "auto" on a
    # TPU, the pool allocates aligned pages of 8 rows for the pooled kernel: tests/test_pooled_kernel.py).
    config = {"backend": "xla", **config}
    return tl.patch_model(
        model, tl.LoRAConfig(max_loras=3, max_rank=MAX_RANK, target_modules=TARGETS, memory_budget=budget, **config)
    )


def _forward(lora, ids, device):
    with torch.no_grad():
        out = lora.model(ids.to(device))  # kept whole until the sync: the graph warm-up compiled
    if device.type == "xla":
        torch_xla.sync()
    return out.logits.cpu()


IDS = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("on_xla", [False, True])
def test_mixed_ranks_equal_peft_and_evict_by_bytes(base_model, peft_model, on_xla, xla_device, monkeypatch):
    """A 14-row pool (every layer) holds a (8) + b (4) + c (2) exactly; d (6) then evicts by bytes, least
    recently used first; every batch equals PEFT's mixed batch, base rows included. No layer gathers its lanes
    into slots: the linear layers and the embedding (its A rows per token, its B by ``pooled_expand``) read the
    pools at the adapters' true ranks."""

    def gathered(*args, **kwargs):
        raise AssertionError("a layer gathered its lanes into slots")

    monkeypatch.setattr(pool, "gather_slots", gathered)
    device = xla_device if on_xla else torch.device("cpu")
    lora = _patched(base_model, device, rows_budget=14)
    for name in RANKS:
        lora.load_adapter(name, state_dict=_state(peft_model, name)[0], config=_state(peft_model, name)[1])
    row_bytes = _row_bytes(base_model, 4)
    for rows in (["a", None, "b", "c"], ["c", "b", None, "b"], ["d", "c", "d", None], ["a", "d", None, "a"]):
        lora.set_batch(rows)
        assert_close(_forward(lora, IDS, device), _expected(peft_model, IDS, rows))
        memory = lora.memory()
        assert memory["budget_bytes"] == 16 * row_bytes
        assert set(rows) - {None} <= set(memory["adapters"])
        assert memory["adapters"] == {n: RANKS[n] * row_bytes for n in memory["adapters"]}
        assert memory["used_bytes"] == sum(memory["adapters"].values()) <= 14 * row_bytes
    # After the last batch: a (8) and d (6) resident, b and c evicted by the rows they needed.
    assert set(lora.memory()["adapters"]) == {"a", "d"}
    info = lora.adapters()
    assert [info[n]["resident"] for n in "abcd"] == [True, False, False, True]


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: adapter -> (PEFT config, its rank in each projection; 0 where it does not target it)
MODULE_RANKS = {
    "qv": (
        {"r": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 4}},
        {"q_proj": 8, "v_proj": 4},
    ),
    "mlp": (
        {"r": 6, "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"], "rank_pattern": {"down_proj": 2}},
        {"q_proj": 6, "gate_proj": 6, "up_proj": 6, "down_proj": 2},
    ),
}


def test_each_layer_reads_a_lane_at_its_adapters_rank_in_that_module(base_model, xla_device, monkeypatch):
    """An adapter holds its largest rank's rows in every layer (PEFT's ``rank_pattern`` and partial
    ``target_modules`` give it other ranks, or none, elsewhere), but each layer reads a lane only to the rank its
    adapter has in that module, 0 where the adapter does not target it: the row table and the page table every
    layer hands the pooled op say so (the entries past it name the zero row), and the mixed batch equals PEFT's."""
    torch.manual_seed(7)
    model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (kwargs, _) in MODULE_RANKS.items():
            config = peft.LoraConfig(lora_alpha=8, init_lora_weights=False, **kwargs)
            if model is None:
                model = peft.get_peft_model(copy.deepcopy(base_model), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
    model.eval()
    budget = (16 + 2) * _row_bytes(base_model, 4)
    config = tl.LoRAConfig(
        max_loras=3, max_rank=8, target_modules=PROJECTIONS, memory_budget=budget, backend="xla", base_fusion=False
    )  # the separate LoRA op on every device (on a TPU "xla" would fuse the base: linear_lora_pooled)
    lora = tl.patch_model(copy.deepcopy(base_model).to(xla_device), config)
    for name in MODULE_RANKS:
        state, adapter_config = _state(model, name)
        lora.load_adapter(name, state_dict=state, config=adapter_config)
    rows = ["qv", None, "mlp", "qv"]
    lora.set_batch(rows)
    lanes = lora.context.slots.cpu().tolist()
    current, seen = {}, {}
    for layer_name, layer in lora.layers.items():
        layer.register_forward_pre_hook(lambda module, args, name=layer_name: current.update(layer=name))
    original = torch.ops.xla_lora.pooled_shrink_expand

    def spy(*args):
        seen[current["layer"]] = (args[5], args[11])  # the row table and the page table
        return original(*args)

    monkeypatch.setattr(torch.ops.xla_lora, "pooled_shrink_expand", spy)
    logits = _forward(lora, IDS[: len(rows)], xla_device)
    assert set(seen) == set(lora.layers)
    zero = lora.manager.zero_row
    for layer_name, (table, pages) in seen.items():
        table, ranks = table.cpu(), pages.cpu()[-3:]
        for adapter, lane in ((rows[0], lanes[0]), (rows[2], lanes[2])):
            expected = MODULE_RANKS[adapter][1].get(layer_name.rpartition(".")[2], 0)
            assert int((table[lane] != zero).sum()) == int(ranks[lane]) == expected, (layer_name, adapter)
    assert_close(logits, _expected(model, IDS[: len(rows)], rows))


def test_pool_never_holds_more_than_its_budget(base_model):
    """The device buffers themselves (pools and int8 scales) fit the budget, and a rank row costs its elements'
    bytes: an adapter occupies its own rank's bytes, whatever max_rank."""
    for int8 in (False, True):
        budget = 200_000
        lora = tl.patch_model(
            copy.deepcopy(base_model),
            tl.LoRAConfig(
                max_rank=MAX_RANK,
                target_modules=TARGETS,
                memory_budget=budget,
                weight_dtype="int8" if int8 else None,
                backend="xla",
            ),
        )
        allocated = sum(
            b.numel() * b.element_size() for n, b in lora.model.named_buffers() if "_pool" in n or "_scale" in n
        )
        assert budget - 2 * lora.manager.row_bytes < allocated <= budget
        # int8: one byte per element and a float32 scale per rank row of each of a layer's two factors, and in
        # the linear layers (the pooled kernel's) the row's page scale, its two scales' product.
        linear = [layer for name, layer in lora.layers.items() if not name.endswith("embed_tokens")]
        scales = (2 * 4 * len(lora.layers) + 4 * len(linear)) if int8 else 0
        assert lora.manager.row_bytes == _row_bytes(base_model, 1 if int8 else 4) + scales
        if int8:  # the page scales hold whole 1024-row tiles, the padding inside the budget
            page_scales = [layer.lora_page_scale for layer in linear]
            assert all(t.shape == (1024,) for t in page_scales) and lora.manager.rows + 2 <= 1024


def test_int8_pools_the_tpu_kernel_reads_never_hold_a_multiple_of_32_rows(base_model):
    """On a v6e XLA tiles an int8 array of a multiple of 32 rows by 32 rows and the pooled kernel's 8-row page
    DMA from it does not compile (``tests/test_tpu_compile.py``, ``bench.page_dma``): a budget whose int8 pools
    would hold 62 data rows (64 with the zero and scratch rows) gets 61 where the Pallas kernel may read them,
    62 on the XLA-native backend, both within the budget."""

    def patch(budget: int, backend: str) -> tl.LoRAModel:
        config = tl.LoRAConfig(
            max_rank=MAX_RANK, target_modules=TARGETS, memory_budget=budget, weight_dtype="int8", backend=backend
        )
        return tl.patch_model(copy.deepcopy(base_model), config)

    probe = patch(200_000, "xla")
    linear = sum(not name.endswith("embed_tokens") for name in probe.layers)
    budget = 64 * probe.manager.row_bytes + 4 * (1024 - 64) * linear  # the page scales padded to one 1024-row tile
    for backend, rows in (("xla", 62), ("pallas", 61)):
        lora = patch(budget, backend)
        assert lora.manager.rows == rows
        pooled = [layer for name, layer in lora.layers.items() if not name.endswith("embed_tokens")]
        assert all(layer.lora_a_pool.shape[1] == layer.lora_b_pool.shape[1] == rows + 2 for layer in pooled)
        stored = [b for n, b in lora.model.named_buffers() if "_pool" in n or "_scale" in n]
        assert sum(b.numel() * b.element_size() for b in stored) <= budget


def test_stacked_pools_the_tpu_kernel_reads_start_each_entry_on_an_aligned_page():
    """Pools of several entries per slot (an experts layer's ``[E, P + 2, width]``), which the pooled kernel reads
    as ``[E * (P + 2), width]``, get the most data rows a budget holds such that P + 2 is a whole number of
    8-row pages (each expert's block starts on one), for int8 never a multiple of 32 (v6e's int8 tile); one-entry
    pools lose at most the one int8 row; with any-row placement (granule 1) nothing changes."""

    def fits(r: int, int8: bool) -> bool:
        return (r + 2) % 8 == 0 and not (int8 and (r + 2) % 32 == 0)

    for rows in range(40, 140):
        for int8 in (False, True):
            got = pool.kernel_pool_rows(rows, int8, pool.KERNEL_PAGE_ROWS, stacked=True)
            assert got <= rows and fits(got, int8) and not any(fits(r, int8) for r in range(got + 1, rows + 1))
            single = pool.kernel_pool_rows(rows, int8, pool.KERNEL_PAGE_ROWS)
            assert single == rows - (int8 and (rows + 2) % 32 == 0)
            assert pool.kernel_pool_rows(rows, int8, 1, stacked=True) == rows


def _int8_rounded(peft_model, name):
    """PEFT's state of ``name`` with A's rows and B's columns (rank rows) rounded to int8, symmetric absmax."""
    state, config = _state(peft_model, name)
    rounded = {}
    for key, value in state.items():
        if "lora_" not in key:  # the embedding's base weight, saved beside its adapter
            continue
        per_row = value if "lora_A" in key or "lora_embedding_A" in key else value.T  # [r, in or vocab], [r, out]
        scale = per_row.abs().amax(dim=1, keepdim=True) / 127
        q = torch.round(per_row / scale).clamp(-127, 127) * scale
        rounded[key] = q if per_row is value else q.T.contiguous()
    return rounded, config


def test_int8_rows_equal_peft_on_int8_rounded_factors(base_model, peft_model, xla_device):
    """int8 storage computes exactly the adapters with every rank row rounded to int8 (one scale per row), and
    stays close to the float adapters (the documented quality bound)."""
    lora = _patched(base_model, xla_device, rows_budget=30, weight_dtype="int8")
    rounded = copy.deepcopy(peft_model)
    for name in ("a", "b", "c"):
        state, config = _state(peft_model, name)
        lora.load_adapter(name, state_dict=state, config=config)
        peft.set_peft_model_state_dict(rounded, _int8_rounded(peft_model, name)[0], adapter_name=name)
    rows = ["a", "c", None, "b"]
    lora.set_batch(rows)
    out = _forward(lora, IDS, xla_device)
    assert_close(out, _expected(rounded, IDS, rows))
    exact = _expected(peft_model, IDS, rows)
    assert (out - exact).norm() / exact.norm() < 3e-2
    assert (out.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
    # What the pooled kernel reads of a linear layer's int8 pool in place of both scales: their product per row.
    for name, layer in lora.layers.items():
        if not name.endswith("embed_tokens"):
            product = layer.lora_a_scale[0].cpu() * layer.lora_b_scale[0].cpu()
            page_scale = layer.lora_page_scale.cpu()
            assert torch.equal(page_scale[: len(product)], product) and not page_scale[len(product) :].any()
            assert product[: lora.manager.rows].count_nonzero() >= 8 + 4 + 2  # the adapters' rows were written


def _compilations() -> int:
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def test_loads_and_evictions_of_any_rank_compile_nothing_after_warmup(base_model, peft_model, xla_device):
    lora = _patched(base_model, xla_device, rows_budget=12)
    for name in RANKS:
        lora.load_adapter(name, state_dict=_state(peft_model, name)[0], config=_state(peft_model, name)[1])
    lora.warmup([4], [6], progress=False)
    before = _compilations()
    for rows in (["a", "b", None, "a"], ["c", "d", "c", None], ["b", "a", "b", "b"], ["d", None, None, "c"]):
        lora.set_batch(rows)
        assert_close(_forward(lora, IDS, xla_device), _expected(peft_model, IDS, rows))
    assert _compilations() == before


def test_errors_leave_everything_as_it_was(base_model, peft_model):
    lora = _patched(base_model, torch.device("cpu"), rows_budget=14)
    for name in RANKS:
        lora.load_adapter(name, state_dict=_state(peft_model, name)[0], config=_state(peft_model, name)[1])
    lora.set_batch(["a", "b"])
    lora.pin("c")  # 14 rows: full
    q_proj = peft.LoraConfig(r=2, target_modules=["q_proj"])
    lora.create_adapter("t", q_proj)  # the one lane the batch leaves
    before = (lora.memory(), lora.adapters())
    with pytest.raises(PoolFullError):  # d (6) beside the batch's a (8) + b (4): no unprotected rows
        lora.pin("d")
    with pytest.raises(tl.NoFreeSlotError):  # PoolFullError is one: servers' handlers keep working
        lora.set_batch(["a", "b", "d"])
    with pytest.raises(tl.ArgumentError):  # no fixed slots to name
        lora.set_batch([0, None])
    with pytest.raises(tl.NoFreeSlotError):  # no lane left for a second trainable adapter
        lora.create_adapter("u", q_proj)
    assert (lora.memory(), lora.adapters()) == before
    assert_close(_forward(lora, IDS[:2], torch.device("cpu")), _expected(peft_model, IDS[:2], ["a", "b"]))


def test_config_errors():
    with pytest.raises(tl.ConfigError):
        tl.LoRAConfig(memory_budget="lots")
    with pytest.raises(tl.ConfigError):
        tl.LoRAConfig(memory_budget=0)
    with pytest.raises(tl.ConfigError):
        tl.LoRAConfig(weight_dtype="int8")  # int8 rows live in the pool
    with pytest.raises(tl.ConfigError):
        tl.LoRAConfig(memory_budget="1GiB", weight_dtype="fp8")
    assert parse_bytes("6GiB") == 6 * 2**30 and parse_bytes("2 GB") == 2 * 10**9 and parse_bytes(4096) == 4096
    assert parse_bytes("512 MiB") == 2**29 and parse_bytes("1.5KiB") == 1536 and parse_bytes("8e9") == 8 * 10**9
    assert parse_bytes("3kb") == 3000 and parse_bytes("2TiB") == 2**41 and parse_bytes(" 7 MB ") == 7 * 10**6
    with pytest.raises(tl.ConfigError):  # fewer rows than one max-rank adapter
        tl.patch_model(tiny_llama(), tl.LoRAConfig(max_rank=8, memory_budget=1000))
    # 14 rows hold a rank-12 adapter one row at a time, but in 8-row pages (the Pallas backend) only one whole page.
    row_bytes = tl.patch_model(tiny_llama(), tl.LoRAConfig(max_rank=12, memory_budget=10**6)).manager.row_bytes
    for backend, rows in (("xla", 14), ("pallas", 16)):
        config = {"max_rank": 12, "memory_budget": (rows + 2) * row_bytes, "backend": backend}
        assert tl.patch_model(tiny_llama(), tl.LoRAConfig(**config)).manager.rows == rows
    with pytest.raises(tl.ConfigError):
        tl.patch_model(tiny_llama(), tl.LoRAConfig(max_rank=12, memory_budget=16 * row_bytes, backend="pallas"))


def test_removal_under_a_batch_keeps_its_rows_until_the_batch_changes(base_model, peft_model):
    """The current batch keeps running a removed adapter; its rows are reused only by the next batch."""
    lora = _patched(base_model, torch.device("cpu"), rows_budget=12)
    for name in ("a", "b", "d"):
        lora.load_adapter(name, state_dict=_state(peft_model, name)[0], config=_state(peft_model, name)[1])
    lora.set_batch(["a", "b"])  # 12 rows: full
    thread = threading.Thread(target=lora.remove, args=("a",))
    thread.start()
    thread.join()
    with pytest.raises(PoolFullError):  # a's rows are still read by the current batch
        lora.pin("d")
    assert_close(_forward(lora, IDS[:2], torch.device("cpu")), _expected(peft_model, IDS[:2], ["a", "b"]))
    lora.set_batch(["d", "b"])
    assert_close(_forward(lora, IDS[:2], torch.device("cpu")), _expected(peft_model, IDS[:2], ["d", "b"]))


def test_bench_memory_uses_the_pools_accounting_at_llama_3_8b():
    """``bench memory``'s figures come from the accounting real pools are sized with: a Llama-3-8B built on
    the meta device (no memory) and patched with a 6 GiB budget has the bench's row bytes and rows, and the
    issue's capacity target holds for the mixed fleet in int8. ``bench.pooled_model --resident`` prices an
    adapter as these pools hold it (off TPU: its rank's rows, within 1.10x of its rank's elements, every rank
    from 4 to 64)."""
    import transformers

    from torch_xla_lora.bench import memory, pooled_model

    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    for int8 in (False, True):
        lora = tl.patch_model(
            copy.deepcopy(model),
            tl.LoRAConfig(max_rank=64, memory_budget="6GiB", weight_dtype="int8" if int8 else None),
        )
        row_bytes, rows = lora.manager.row_bytes, lora.manager.rows
        assert row_bytes == memory.row_bytes("llama-3-8b", 2, int8)
        elements = sum(sum(layer.base_layer.weight.shape) for layer in lora.layers.values())  # in + out, a rank row
        assert lora.manager.granule == 1
        for rank in range(4, 65):
            resident = pooled_model.resident_rows(rank, lora.manager.granule, int8)
            assert resident["resident_bytes"] == rank * row_bytes
            assert resident["true_bytes"] == rank * elements * (1 if int8 else 2)
            assert resident["resident_bytes"] <= 1.10 * resident["true_bytes"]
        if not int8:
            assert rows == 6 * 2**30 // row_bytes - 2
        else:  # the most rows whose pools fit with the 224 page-scale arrays padded to whole 1024-row tiles

            def allocated(rows: int, row_bytes: int = row_bytes) -> int:
                return (rows + 2) * row_bytes + 224 * 4 * (-(-(rows + 2) // 1024) * 1024 - rows - 2)

            assert allocated(rows) <= 6 * 2**30 < allocated(rows + 1)
            assert 6 * 2**30 // row_bytes - 2 - rows <= 1  # the padding costs at most a row here
    rows = {(r["fleet"], r["layout"]): r["adapters"] for r in memory.table("llama-3-8b", 6 * 2**30, 64, MIXES)}
    assert rows["mixed", "rank-true int8"] >= 140 and rows["mixed", "padded bf16"] <= 20
    assert rows["mixed", "rank-true bf16"] * 2 - 2 <= rows["mixed", "rank-true int8"]


MIXES = {"mixed": {8: 0.7, 16: 0.2, 64: 0.1}}


def test_fleet_keeps_its_shares():
    from torch_xla_lora.bench.memory import fleet

    ranks = fleet({8: 0.7, 16: 0.2, 64: 0.1}, 1000)
    assert [ranks.count(r) for r in (8, 16, 64)] == [700, 200, 100]
    assert all(abs(ranks[:n].count(64) - 0.1 * n) <= 1 for n in range(1, 1000))


def _gathering_layers(lora: tl.LoRAModel, monkeypatch) -> set[str]:
    """The names of the layers that gather their lanes into slots from now on (filled as they do)."""
    from torch_xla_lora.layers.base import BaseLayerWithLoRA

    names, gathered, original = (
        {id(layer): name for name, layer in lora.layers.items()},
        set(),
        BaseLayerWithLoRA.slot_buffers,
    )

    def recorded(self, *args, **kwargs):
        gathered.add(names[id(self)])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BaseLayerWithLoRA, "slot_buffers", recorded)
    return gathered


@pytest.mark.parametrize("base_fusion", ["auto", True])
def test_an_unfrozen_base_gets_its_gradient_beside_pooled_adapters(base_model, peft_model, monkeypatch, base_fusion):
    """Pooled adapters with part of the base unfrozen (the token embedding, whose LoRA reads its pool too): every
    layer reads its pools with gradients recorded (``pooled_shrink_expand``'s and ``pooled_expand``'s backward:
    the embedding's output gets its gradient through the latter), nothing is gathered into slots, and the base's
    and the activations' gradients equal PEFT's mixed batch. ``base_fusion``: the one-pass op reads the pools too
    (its backward is the plain layer's: the arranged decoder's norms and SiLU * up are computed outside it then, as
    in training). (The choice is the layers', the same on any device: CPU tensors here.)"""
    from torch_xla_lora.ops import _linear_fused

    lora = _patched(base_model, torch.device("cpu"), rows_budget=14, base_fusion=base_fusion)
    gathered = _gathering_layers(lora, monkeypatch)
    one_pass, original = [], _linear_fused.linear_lora_pooled

    def counted(*args, **kwargs):
        one_pass.append(args[0].requires_grad)
        return original(*args, **kwargs)

    monkeypatch.setattr(_linear_fused, "linear_lora_pooled", counted)
    for name in ("a", "b"):
        lora.load_adapter(name, state_dict=_state(peft_model, name)[0], config=_state(peft_model, name)[1])
    rows = ["a", None, "b", "a"]
    lora.set_batch(rows)
    reference = copy.deepcopy(peft_model)
    weights = []
    for model in (lora.model, reference):
        weight = model.get_input_embeddings().base_layer.weight
        weights.append(weight.requires_grad_(True))
        logits = (
            model(IDS).logits
            if model is lora.model
            else model(IDS, adapter_names=[r or "__base__" for r in rows]).logits
        )
        logits.float().pow(2).mean().backward()
    assert_close(weights[0].grad, weights[1].grad)
    assert weights[0].grad.abs().sum() > 0
    assert not gathered
    linear = len(lora.layers) - 1  # every layer but the embedding
    assert one_pass == ([True] * linear if base_fusion is True else [])


def test_an_adapter_training_on_some_layers_gets_peft_s_gradients_beside_pooled_adapters(
    base_model, peft_model, monkeypatch
):
    """A trainable adapter on q_proj only, in a mixed batch with pooled adapters on every layer: only the layers it
    targets gather their lanes into slots (its lane holds no rows); the others read their pools with gradients
    recorded for their activations (``pooled_shrink_expand``'s backward carries them through), and its gradients
    equal PEFT's on the same mixed batch."""
    lora = _patched(base_model, torch.device("cpu"), rows_budget=14)
    gathered = _gathering_layers(lora, monkeypatch)
    lora.load_adapter("a", state_dict=_state(peft_model, "a")[0], config=_state(peft_model, "a")[1])
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    lora.create_adapter("t", config)
    rows = ["a", "t", None, "t"]
    lora.set_batch(rows)
    lora.model(IDS).logits.float().pow(2).mean().backward()
    reference = copy.deepcopy(peft_model)
    reference.add_adapter("t", config)
    trained = lora.trainable_parameters("t")
    peft.set_peft_model_state_dict(reference, {k: v.detach() for k, v in trained.items()}, adapter_name="t")
    expected = {n: p for n, p in reference.named_parameters() if ".t." in n or n.endswith(".t.weight")}
    for p in expected.values():
        p.requires_grad_(True)
    reference(IDS, adapter_names=[r or "__base__" for r in rows]).logits.float().pow(2).mean().backward()
    grads = {n.replace(".t.weight", ".weight"): p.grad for n, p in expected.items()}
    assert set(grads) == set(trained)
    for key, param in trained.items():
        assert_close(param.grad, grads[key])
        assert param.grad.abs().sum() > 0
    assert gathered == {name for name in lora.layers if name.endswith("q_proj")}


def test_trainable_adapters_take_lanes_of_their_own_and_freeze_into_the_pool(base_model, peft_model):
    """A trainable adapter created under a running batch takes a lane that batch does not use (the batch's
    rows keep their adapter), trains beside pooled adapters, and once frozen serves from the pool as PEFT."""
    lora = _patched(base_model, torch.device("cpu"), rows_budget=16)
    for name in ("a", "b"):
        lora.load_adapter(name, state_dict=_state(peft_model, name)[0], config=_state(peft_model, name)[1])
    lora.set_batch(["a", None])
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    lora.create_adapter("t", config)
    assert lora.adapters()["t"]["trainable"] and "t" not in lora.memory()["adapters"]  # no rows: parameters
    assert_close(_forward(lora, IDS[:2], torch.device("cpu")), _expected(peft_model, IDS[:2], ["a", None]))
    lora.set_batch(["t", "a", "b", "t"])
    lora.model.train()
    lora.model(IDS).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.trainable_parameters("t").values())
    lora.model.eval()
    state = {k: v.detach().clone() for k, v in lora.trainable_parameters("t").items()}
    reference = copy.deepcopy(peft_model)
    reference.add_adapter("t", config)
    peft.set_peft_model_state_dict(reference, state, adapter_name="t")
    expected = _expected(reference.eval(), IDS, ["t", "a", "b", "t"])
    assert_close(_forward(lora, IDS, torch.device("cpu")), expected)
    lora.freeze("t")
    lora.set_batch(["t", "a", "b", "t"])  # t now takes 4 rows beside a (8) and b (4)
    assert_close(_forward(lora, IDS, torch.device("cpu")), expected)
    assert lora.memory()["adapters"]["t"] == 4 * _row_bytes(base_model, 4)


# -- the allocator where the TPU pooled kernel may run: 8-row aligned pages, tails sharing pages ---------------


class _Layer:
    """What the pool's allocator reads of a layer (it writes no rows here): its backend makes the granule 8."""

    backend, in_features, out_features = "pallas", 4, 4
    adapter_shapes = (in_features, out_features)
    adapter_device = torch.device("cpu")

    def __init__(self) -> None:
        self.writes: list[list[int]] = []  # the row index of every write

    def write_rows(self, index: torch.Tensor, weights) -> None:
        self.writes.append(index.tolist())

    def factor_pairs(self) -> dict:
        return {}  # no pool buffers: no per-module rank cut


def _adapter(name: str, rank: int):
    from torch_xla_lora.adapters import LoRAAdapter, ModuleLoRA

    factors = ModuleLoRA(torch.zeros(rank, 4), torch.zeros(4, rank), rank, 1.0, False)
    return LoRAAdapter(name=name, modules={"m": factors}, config={})


def _manager(rows: int, max_loras: int = 5, max_rank: int = 64, max_cpu_adapters: int = 16):
    from torch_xla_lora.pool import PoolManager

    manager = PoolManager(
        {"m": _Layer()}, max_loras, max_rank, max_cpu_adapters, rows=rows, row_bytes=10, budget_bytes=10 * rows
    )
    assert manager.granule == 8  # the layer's backend is "pallas"
    return manager


def _check_layout(rows: list[int], rank: int, spills: bool = False) -> bool:
    """The kernel's layout: entries 8p..8p+7 (p < rank // 8) one aligned page, the tail contiguous in one page, or
    where ``spills`` in one or two (never across a multiple of 128 rows). Returns whether the tail spilled."""
    assert len(rows) == rank
    for first in range(0, rank - rank % 8, 8):
        assert rows[first] % 8 == 0 and rows[first : first + 8] == list(range(rows[first], rows[first] + 8))
    tail = rows[rank - rank % 8 :]
    if not tail:
        return False
    assert tail == list(range(tail[0], tail[0] + len(tail)))
    spilled = tail[0] // 8 != tail[-1] // 8
    assert not spilled or (spills and tail[0] // 128 == tail[-1] // 128)
    return spilled


def test_tails_of_five_to_seven_rows_run_on_into_the_next_page():
    """Tails of more than half a page never share one, so they run on into the next (the kernel then DMAs one
    page more): rank-13 adapters fill a pool of 15 pages nine at a time (each 13 rows: 117 of 120, whole pages
    taken from the top, tails packed from the bottom; seven if each tail had a page), rank-5 adapters fill 1,040
    rows 203 at a time with no tail across a multiple of 128 rows (the block of a pool's rows an experts layer's
    page-scale tile holds: 207 where only the tile at row 1024 was kept clear). A tail spills only where a lane's
    pages(max_rank) pages have room for the extra page: rank 13 at max_rank 16 and rank 5 at max_rank 8 keep
    each tail in one page; tails of at most 4 rows never spill."""

    def fill(manager, rank: int) -> list[list[int]]:
        count = 0
        while True:
            manager.add(_adapter(str(count), rank))
            try:
                manager.pin(str(count))
            except PoolFullError:
                return [manager._rows[str(i)] for i in range(count)]
            count += 1

    for rows, rank, max_rank, expected, spills in (
        (120, 13, 64, 9, True),
        (1040, 5, 64, 203, True),
        (120, 13, 16, 7, False),
        (120, 5, 8, 15, False),
        (120, 4, 64, 30, False),
        (120, 11, 64, 10, False),  # 3-row tails two to a page: 10 whole pages and 5 tail pages
    ):
        placed = fill(_manager(rows, max_rank=max_rank), rank)
        assert len(placed) == expected, (rank, max_rank)
        everything = [row for adapter in placed for row in adapter]
        assert len(set(everything)) == len(everything) and max(everything) < rows
        spilled = [_check_layout(adapter, rank, spills) for adapter in placed]
        assert any(spilled) is spills


def test_tails_share_pages_and_adapters_cost_their_own_rows():
    """Ranks 4, 12, 20, 8, 64 in a pool of 14 whole pages (115 rows): 12 whole pages and the three 4-row tails
    in two pages, one shared at in-page offsets 0 and 4; every adapter costs its rank's rows; the host page table
    names the unaligned tail start; freed rows are reused, a freed tail's by a new tail (best fit)."""
    from torch_xla_lora.pool import page_table

    manager = _manager(115)
    ranks = {"a": 4, "b": 12, "c": 20, "d": 8, "e": 64}
    for name, rank in ranks.items():
        manager.add(_adapter(name, rank))
    plan = manager.plan(list(ranks), for_batch=True)
    manager.commit(plan)
    owned = dict(plan.writes)
    for name, rank in ranks.items():
        _check_layout(owned[name], rank)
    everything = [row for rows in owned.values() for row in rows]
    assert len(set(everything)) == len(everything) == 108 and max(everything) < 112
    tail_pages = {name: owned[name][-1] // 8 for name in ("a", "b", "c")}
    assert len(set(tail_pages.values())) == 2  # three tails of 4 in two pages
    assert manager.memory() == {
        "budget_bytes": 1150,
        "used_bytes": 1080,
        "adapters": {name: 10 * rank for name, rank in ranks.items()},
    }
    assert all(manager.adapter_bytes(_adapter(n, r)) == 10 * r for n, r in ranks.items())
    table = manager.batch_rows(plan)
    pages = page_table(table, 5, manager.zero_row)
    starts = pages[: 5 * 8].reshape(5, 8)
    by_lane = sorted((lane, name) for name, lane in plan.slot_of.items())
    assert pages[5 * 8 :].tolist() == [ranks[name] for _, name in by_lane]  # each lane's true rank
    tails = {name: int(starts[plan.slot_of[name], rank // 8]) for name, rank in ranks.items() if rank % 8}
    assert sorted(start % 8 for start in tails.values()) == [0, 0, 4]  # one tail at in-page offset 4
    # Free and reuse: a's 4 rows go back; f (rank 4) takes them (the only shared page with 4 free rows).
    manager.release_batch()
    manager.remove("a")
    assert manager.memory()["used_bytes"] == 1040
    manager.add(_adapter("f", 4))
    again = manager.plan(["f"])
    assert dict(again.writes) == {"f": owned["a"]} and not again.evict
    manager.commit(again)
    # All of e's rows freed: its 8 pages are whole again, and a rank-64 adapter takes exactly them.
    manager.remove("e")
    manager.add(_adapter("g", 64))
    assert sorted(dict(manager.plan(["g"]).writes)["g"]) == sorted(owned["e"])


def test_a_tail_that_fits_by_rows_but_not_by_placement_evicts_or_fails_unchanged():
    """Two pages: p (3), q (2), r (3) fill page 0 (tails sharing it), s (8) page 1. With p and r removed, 6 rows are
    free but no 4 contiguous in one page: a rank-4 adapter evicts (least recently used first) until it can be
    placed, here q, whose 2 rows make page 0 whole again, not s; with q and s pinned, PoolFullError and nothing
    changes. A whole page is never built from a page another adapter holds rows of."""
    manager = _manager(16, max_loras=4, max_rank=8)
    for name, rank in (("p", 3), ("q", 2), ("r", 3), ("s", 8), ("t", 4)):
        manager.add(_adapter(name, rank))
    for name in ("p", "q", "r", "s"):  # one by one: the tails share page 0 by best fit
        manager.activate([name])
    rows = {name: manager._rows[name] for name in "pqrs"}
    assert {row // 8 for name in "pqr" for row in rows[name]} == {0} and rows["s"] == list(range(8, 16))
    manager.remove("p")
    manager.remove("r")
    manager.activate(["s"])  # q is now the least recently used
    plan = manager.plan(["t"])
    assert plan.evict == ["q"] and dict(plan.writes)["t"] == [0, 1, 2, 3]
    manager.pin("q")
    manager.pin("s")
    before = (manager.memory(), manager.adapters(), sorted(manager._free))
    with pytest.raises(PoolFullError):
        manager.activate(["t"])
    manager.add(_adapter("w", 8))
    with pytest.raises(PoolFullError):  # a whole page: page 0 has q's rows, page 1 is s's
        manager.activate(["w"])
    manager.remove("w")
    assert (manager.memory(), manager.adapters(), sorted(manager._free)) == before


def test_batch_held_rows_in_shared_tail_pages_are_not_reused_until_the_batch_changes():
    """x (4) and y (4) share page 0; the current batch reads both. x removed under the batch: its rows are held,
    so z (4, pinned) goes to a fresh page, not into x's rows, and w (8) finds no whole page (page 0 holds y's
    rows and x's held ones): PoolFullError, nothing changed. The next batch ([y, w]) may reuse x's rows, but
    page 0 is never handed out whole while y holds rows of it: w evicts z (unpinned) instead."""
    manager = _manager(16, max_loras=3, max_rank=8)
    for name in ("x", "y", "z"):
        manager.add(_adapter(name, 4))
    manager.activate(["x", "y"], for_batch=True)
    manager.apply(batch_slots={0, 1})  # the batch is sent: its rows are protected
    x_rows, y_rows = manager._rows["x"], manager._rows["y"]
    assert {r // 8 for r in x_rows + y_rows} == {0}
    manager.remove("x")
    manager.pin("z")
    assert not set(manager._rows["z"]) & set(x_rows) and {r // 8 for r in manager._rows["z"]} == {1}
    manager.add(_adapter("w", 8))
    before = (manager.memory(), manager.adapters(), sorted(manager._free))
    with pytest.raises(PoolFullError):
        manager.activate(["w"])
    assert (manager.memory(), manager.adapters(), sorted(manager._free)) == before
    manager.unpin("z")
    plan = manager.plan(["y", "w"], for_batch=True)
    assert plan.evict == ["z"] and dict(plan.writes)["w"] == list(range(8, 16))
    manager.commit(plan)
    manager.apply(batch_slots={0, 1})
    manager.add(_adapter("v", 4))
    assert dict(manager.plan(["v"]).writes)["v"] == x_rows  # x's rows, free now the batch has changed


def test_quantize_rows_scales_each_entry_and_rank_row_by_its_absmax():
    """Against plain float64 math: one scale per (entry, rank row), absmax / 127, on either rank axis (A's rows,
    B's columns); the rounded values are within half a scale of the input, and an all-zero rank row (a fresh
    PEFT adapter's B) stays zero with a finite scale instead of dividing by zero."""
    from torch_xla_lora.pool import quantize_rows

    values = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(3))
    values[1, 2] = 0.0  # entry 1, rank row 2 (rank axis 0)
    values[0, :, 4] = 0.0  # entry 0, rank row 4 (rank axis 1)
    for rank_axis, reduce in ((0, 2), (1, 1)):
        q, scale = quantize_rows(values, rank_axis)
        assert q.dtype == torch.int8 and scale.dtype == torch.float32
        amax = values.double().abs().amax(dim=reduce)  # [entries, rank rows]
        assert scale.shape == amax.shape and torch.isfinite(scale).all()
        nonzero = amax > 0
        assert torch.allclose(scale[nonzero].double(), amax[nonzero] / 127, rtol=1e-6)
        restored = q.double() * (scale.double().unsqueeze(reduce))
        assert ((restored - values.double()).abs() <= scale.double().unsqueeze(reduce) / 2 + 1e-7).all()
        assert (q.abs().amax(dim=reduce) == torch.where(nonzero, 127, 0)).all()


def test_lru_refresh_and_the_current_batch_decide_what_a_pin_evicts():
    """Four whole-page adapters fill a 32-row pool; b is the current batch's. Using a again makes c the least
    recently used adapter that may go: a fifth adapter evicts c, not a (the oldest use) nor b (the batch's,
    whose rows could not even be reused under the batch); the next one evicts d."""
    manager = _manager(32, max_loras=2, max_rank=8)
    for name in "abcde":
        manager.add(_adapter(name, 8))
    manager.activate(["a"])
    manager.activate(["b"], for_batch=True)
    manager.apply(batch_slots={0})
    manager.activate(["c"])
    manager.activate(["d"])
    manager.activate(["a"])
    plan = manager.plan(["e"])
    assert plan.evict == ["c"] and dict(plan.writes)["e"] == manager._rows["c"]
    manager.commit(plan)
    manager.add(_adapter("f", 8))
    assert manager.plan(["f"]).evict == ["d"]  # then d: c, evicted, is no longer in the order


def test_rows_held_by_a_batch_are_freed_exactly_once():
    """x removed under the batch [x, y]: the next batch's w takes x's held rows; the batch after that, [y, v],
    must evict w for v (x's rows are w's now, not free twice). y removed under [y, v] and the batch cleared
    (``clear_batch``): y's held rows are free, so z takes them without evicting v."""
    manager = _manager(16, max_loras=2, max_rank=8)
    for name in "xywvz":
        manager.add(_adapter(name, 8))
    manager.activate(["x", "y"], for_batch=True)
    manager.apply(batch_slots={0, 1})
    x_rows, y_rows = manager._rows["x"], manager._rows["y"]
    manager.remove("x")
    plan = manager.plan(["y", "w"], for_batch=True)
    assert not plan.evict and dict(plan.writes) == {"w": x_rows}
    manager.commit(plan)
    manager.apply(batch_slots={0, 1})
    plan = manager.plan(["y", "v"], for_batch=True)
    assert plan.evict == ["w"] and dict(plan.writes) == {"v": x_rows}
    manager.commit(plan)
    manager.apply(batch_slots={0, 1})
    manager.remove("y")
    manager.release_batch()
    plan = manager.plan(["z"])
    assert not plan.evict and dict(plan.writes) == {"z": y_rows}


def test_placement_best_fit_whole_pages_and_the_pools_last_partial_page():
    """Page 0 holds p (6), page 1 q (4), page 2 w (8): r (2) takes the 2-row run of page 0 (best fit), so s (4)
    still fits page 1 without an eviction. With r removed no page is wholly free: a rank-12 adapter (a whole page
    and a 4-row run in another) evicts p, then q (whose rows 8-11 become its tail's run), least recently used
    first. A pool of 11 rows has one whole page: rows 8-10 are never handed out (the TPU kernel would DMA a page
    past the pool's end), and an adapter of rank 9 (two pages) is refused at load."""
    manager = _manager(24, max_loras=4, max_rank=16)
    for name, rank in (("p", 6), ("q", 4), ("w", 8), ("r", 2), ("s", 4), ("t", 12)):
        manager.add(_adapter(name, rank))
    for name in "pqwr":
        manager.activate([name])
    assert manager._rows["p"] == list(range(6)) and manager._rows["r"] == [6, 7]
    plan = manager.plan(["s"])
    assert not plan.evict and dict(plan.writes)["s"] == [12, 13, 14, 15]
    manager.commit(plan)
    manager.remove("r")  # page 0: p's 6 rows and a 2-row run; page 1 full, page 2 w's
    plan = manager.plan(["t"])
    assert plan.evict == ["p", "q"] and dict(plan.writes)["t"] == [*range(8), 8, 9, 10, 11]

    small = _manager(11, max_loras=3, max_rank=16)
    for name, rank in (("x", 4), ("y", 4), ("z", 2)):
        small.add(_adapter(name, rank))
    small.pin("x")
    small.pin("y")
    with pytest.raises(PoolFullError):  # page 0 is x's and y's; rows 8-10 are no page
        small.pin("z")
    assert max(row for rows in small._rows.values() for row in rows) < 8
    with pytest.raises(PoolFullError):
        small.add(_adapter("nine", 9))
    assert "nine" not in small.adapters()


def test_lanes_reloads_pins_and_the_host_cache_of_a_pool():
    """A trainable adapter's lane leaves max_loras - 1 lanes: a batch of max_loras other adapters is refused with
    NoFreeSlotError, unchanged. A resident adapter reloaded at another rank leaves the pool and comes back owning
    its new rank's rows. A removed pinned adapter loaded again is not pinned. The host cache keeps resident
    adapters whatever its limit."""
    manager = _manager(32, max_loras=2, max_rank=16)
    for name in ("a", "b"):
        manager.add(_adapter(name, 4))
    assert manager.add_trainable(_adapter("t", 4)) == 0
    before = (manager.memory(), manager.adapters())
    with pytest.raises(tl.NoFreeSlotError):
        manager.plan(["a", "b"], for_batch=True)
    assert (manager.memory(), manager.adapters()) == before
    assert manager.activate(["t", "a"], for_batch=True) == {"t": 0, "a": 1}
    manager.release_batch()
    manager.add(_adapter("a", 12))
    assert "a" not in manager.memory()["adapters"]
    manager.activate(["a"])
    assert manager.memory()["adapters"]["a"] == 12 * 10
    _check_layout(manager._rows["a"], 12)
    manager.pin("b")
    manager.remove("b")
    manager.add(_adapter("b", 4))
    assert not manager.adapters()["b"]["pinned"]

    cache = _manager(32, max_loras=2, max_rank=8, max_cpu_adapters=1)
    cache.add(_adapter("a", 8))
    cache.activate(["a"])
    cache.add(_adapter("b", 8))
    cache.add(_adapter("c", 8))
    assert list(cache.adapters()) == ["a", "c"]  # b (not resident, least recently used) dropped, a kept


def test_staged_rewrites_wait_for_the_batch_that_reads_their_rows():
    """A reload at the same rank of an adapter of the current batch is not written by ``apply()`` (the
    ``apply_pending`` path, rows the batch reads) but by the next batch's apply; other adapters' writes run."""
    manager = _manager(16, max_loras=2, max_rank=8)
    layer = manager._layers["m"]
    for name in ("a", "b"):
        manager.add(_adapter(name, 4))
    manager.activate(["a"], for_batch=True)
    assert manager.apply(batch_slots={0}) == 1
    manager.add(_adapter("a", 4))
    manager.pin("b")
    layer.writes.clear()
    assert manager.apply() == 1 and layer.writes == [manager._rows["b"] + [manager.scratch_row] * 4]
    assert manager.apply(batch_slots={0}) == 1 and layer.writes[-1][:4] == manager._rows["a"]


def test_a_batch_of_tails_is_placed_longest_first():
    """Page 0 with b (1) at row 2 and d (1) at row 7 pinned leaves runs {0, 1} and {3..6}: tails of 2, 1 and 3
    fit only if the 3 goes first (into the 4-row run): placed longest first, they take rows 3-5, 0-1 and 6."""
    manager = _manager(8, max_loras=4, max_rank=8)
    for name, rank in (("a", 2), ("b", 1), ("c", 4), ("d", 1), ("x", 2), ("y", 1), ("z", 3)):
        manager.add(_adapter(name, rank))
    for name in "abcd":
        manager.activate([name])
    assert [manager._rows[name] for name in "abcd"] == [[0, 1], [2], [3, 4, 5, 6], [7]]
    manager.pin("b")
    manager.pin("d")
    manager.remove("a")
    manager.remove("c")
    plan = manager.plan(["x", "y", "z"])
    assert not plan.evict and dict(plan.writes) == {"x": [0, 1], "y": [6], "z": [3, 4, 5]}


def test_a_freeze_that_cannot_fit_the_pool_leaves_the_adapter_trainable():
    """A pool of 14 rows at 8-row pages holds no rank-12 adapter (one whole page): freezing a trainable rank-12
    adapter raises PoolFullError and changes nothing, its lane stays reserved (a batch gets the other lane)."""
    manager = _manager(14, max_loras=2, max_rank=12)
    assert manager.add_trainable(_adapter("t", 12)) == 0
    manager.add(_adapter("u", 4))
    before = manager.adapters()
    with pytest.raises(PoolFullError):
        manager.freeze(_adapter("t", 12))
    assert manager.adapters() == before and before["t"]["trainable"]
    assert manager.activate(["u"], for_batch=True) == {"u": 1}


class _Embedder(nn.Module):
    """A token embedding alone, 256 wide: the Pallas pooled kernel's page DMAs take B's lane-aligned rows."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(96, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


def test_an_embedding_prefill_on_pallas_reads_b_through_the_page_table_and_equals_peft(xla_device, monkeypatch):
    """A 200-token batch (past the packed decode path) through a pooled embedding on the Pallas backend: its B is
    read by the pooled kernel's expand (interpret mode here), each lane's true-rank pages through the page table,
    never every lane gathered into slots; ranks 13, 5, 16 and 3 leave tails at in-page offsets (checked), and the
    mixed batch with a base row equals PEFT's own (``adapter_names``)."""
    from torch_xla_lora.kernels import fused
    from torch_xla_lora.ops import _jax, _xla_native

    def gathered(*args, **kwargs):
        raise AssertionError("the embedding gathered its lanes into slots")

    calls = []
    kernel = fused.pooled_expand

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(_xla_native, "gather_lanes", gathered)
    monkeypatch.setattr(fused, "pooled_expand", counted)
    _jax.pooled_expand_fn.cache_clear()  # traced afresh, through the counter
    torch.manual_seed(11)
    base = _Embedder()
    ranks = {"a": 13, "b": 5, "c": 16, "d": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = None
        for name, rank in ranks.items():
            config = peft.LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=["embed_tokens"], init_lora_weights=False
            )
            if reference is None:
                reference = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
            else:
                reference.add_adapter(name, config)
    reference.eval()
    config = tl.LoRAConfig(
        max_loras=4, max_rank=16, target_modules=["embed_tokens"], memory_budget=60 * (96 + 256) * 4, backend="pallas"
    )
    lora = tl.patch_model(copy.deepcopy(base).to(xla_device), config)
    for name in ranks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (PEFT: the model is not a transformers one)
            state = peft.get_peft_model_state_dict(reference, adapter_name=name)
        lora.load_adapter(name, state_dict=state, config=reference.peft_config[name])
    ids = torch.randint(0, 96, (5, 40), generator=torch.Generator().manual_seed(12))
    offsets = []  # the in-page offsets of the lanes' tails
    for rows in (["a", "b", None, "c", "d"], ["d", "d", "b", "a", None]):
        lora.set_batch(rows)
        for lane in lora.layers["embed_tokens"].context.rows.cpu().reshape(4, 16):
            rank = int((lane != lora.manager.rows).sum())  # entries past the rank name the zero row
            offsets += [int(lane[rank - rank % 8]) % 8] if rank % 8 else []
        with torch.no_grad():
            out = lora.model(ids.to(xla_device)).cpu()
            expected = reference(ids, adapter_names=[r or "__base__" for r in rows])
        assert_close(out, expected)
        assert not torch.allclose(expected, base(ids), atol=1e-3)  # the adapters matter
    assert calls and all(rows >= 200 and width == 4 * 16 for rows, width in calls)  # 4 lanes of 16 rows each
    assert any(offsets), "no tail at an in-page offset: the placement this test means to cover"
