"""The end-to-end benchmark: the one-hot formulation, the report, and a --quick run end to end."""

import dataclasses
import json

import pytest
import torch
from conftest import assert_close, tiny_llama

import torch_xla_lora as tl
from torch_xla_lora.bench import e2e, e2e_report
from torch_xla_lora.bench.__main__ import main as bench_main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(exit code, output dir) of one ``bench e2e --quick`` through the dispatcher."""
    out = tmp_path_factory.mktemp("bench_out")
    return bench_main(["e2e", "--quick", "--out", str(out)]), out


def test_quick_run_exits_zero(quick_run):
    assert quick_run[0] == 0


@pytest.mark.parametrize("name", ["e2e.json", "e2e.md", "e2e_generation.png", "e2e_steps.png", "e2e_slots.png"])
def test_quick_run_writes(quick_run, name):
    path = quick_run[1] / name
    assert path.stat().st_size > 0
    if name.endswith(".png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_json_covers_grid_and_sweep(quick_run):
    result = json.loads((quick_run[1] / "e2e.json").read_text())
    config = e2e.E2EConfig.quick()
    points = {(p["prefill"]["batch"], p["decode"]["seq"]) for p in result["grid"]}
    assert points == {(b, s) for b in config.batch_sizes for s in config.seq_lens}
    generations = {(g["batch"], g["seq"], g["out"]) for g in result["generation"]}
    assert generations == {(b, s, o) for b, s in points for o in config.out_lens}
    assert [p["decode"]["slots"] for p in result["slot_sweep"]] == list(config.slot_counts)
    assert all(p["decode"]["batch"] == config.decode_batch for p in result["slot_sweep"])
    for cell in [c for p in result["grid"] + result["slot_sweep"] for c in p.values()]:
        assert set(cell["tokens_per_s"]) == set(e2e.FORMULATIONS)
        assert all(rate > 0 for rate in cell["tokens_per_s"].values())
        assert len(cell["seconds"]["lora"]) == config.repeats
        runs_per_formulation = {f: len(runs) for f, runs in cell["page_faults"].items()}
        assert runs_per_formulation == dict.fromkeys(e2e.FORMULATIONS, config.repeats)
        assert all(count >= 0 for runs in cell["page_faults"].values() for count in runs)
    assert set(result["page_faults_per_step"]) == set(e2e.FORMULATIONS)
    assert "Minor page faults per step" in (quick_run[1] / "e2e.md").read_text()
    assert result["recompiles_during_timing"] == 0
    assert result["cache_check"]["met"]
    assert set(result["targets"]) == {
        "prefill_slowdown",
        "decode_fewest_slots",
        "decode_most_slots",
        "decode_flat_in_slots",
        "prefill_flat_in_slots",
    }
    assert result["command"] == f"python -m torch_xla_lora.bench e2e --quick --out {quick_run[1]}"


def test_isolated_parts_run_in_processes_of_their_own(tmp_path):
    """With ``isolate`` (the command line's default) the check, the grid and each slot count run in spawned
    processes (here the grid and one slot count, two processes): this process compiles nothing, and the
    results are whole (every formulation has its runs, nothing recompiled while timing)."""
    import torch_xla.debug.metrics as met

    config = dataclasses.replace(
        e2e.E2EConfig.quick(), isolate=True, check=False, batch_sizes=(2,), seq_lens=(16,), slot_counts=(8,), repeats=1
    )
    compiles = (met.metric_data("CompileTime") or (0,))[0]
    result = e2e.run(config, tmp_path)
    assert (met.metric_data("CompileTime") or (0,))[0] == compiles
    assert result["recompiles_during_timing"] == 0
    assert [p["decode"]["slots"] for p in result["slot_sweep"]] == [8]
    assert [(p["prefill"]["batch"], p["prefill"]["seq"]) for p in result["grid"]] == [(2, 16)]
    assert all(len(c["seconds"][f]) == 1 for p in result["grid"] for c in p.values() for f in e2e.FORMULATIONS)
    assert not e2e.parse_args(["--one-process"])[0].isolate and e2e.parse_args([])[0].isolate


@pytest.fixture(scope="module")
def llama_on_device(xla_device):
    return tiny_llama(num_hidden_layers=1).to(xla_device)


@pytest.mark.parametrize("batch", [["adapter0", None, "adapter1"], [None, None, None]])
def test_onehot_formulation_matches_the_layers(llama_on_device, xla_device, batch):
    config = e2e.E2EConfig.quick()
    lora = e2e.patch(llama_on_device, config, slots=8)
    try:
        lora.set_batch(batch)
        ids = torch.randint(0, 64, (3, 5)).to(xla_device)
        with torch.no_grad():
            expected = llama_on_device(ids).logits.cpu()
            with e2e.onehot_formulation(lora):
                actual = llama_on_device(ids).logits.cpu()
    finally:
        lora.unpatch()
    assert_close(actual, expected)


def test_onehot_formulation_is_undone_on_exit(llama_on_device):
    lora = e2e.patch(llama_on_device, e2e.E2EConfig.quick(), slots=8)
    try:
        with e2e.onehot_formulation(lora):
            pass
        assert all("forward" not in vars(layer) for layer in lora.layers.values())
    finally:
        lora.unpatch()


def test_onehot_formulation_rejects_embedding_layers(llama_on_device):
    lora = tl.patch_model(llama_on_device, tl.LoRAConfig(target_modules=["q_proj", "embed_tokens"]))
    try:
        with pytest.raises(TypeError, match="linear LoRA layers only, got EmbeddingWithLoRA"):
            with e2e.onehot_formulation(lora):
                pass
    finally:
        lora.unpatch()


@pytest.mark.parametrize("batch", [["adapter0", None, "adapter1"], [None, None, None]])
def test_fused_formulation_matches_the_layers(llama_on_device, xla_device, batch):
    config = e2e.E2EConfig.quick()
    lora = e2e.patch(llama_on_device, config, slots=8)
    try:
        before = {name: layer.base_fusion for name, layer in lora.layers.items()}
        assert set(before.values()) == {"auto"}  # off on the CPU device: the fused block changes the op
        lora.set_batch(batch)
        ids = torch.randint(0, 64, (3, 5)).to(xla_device)
        with torch.no_grad():
            expected = llama_on_device(ids).logits.cpu()
            with e2e.fused_formulation(lora):
                assert all(layer.base_fusion is True for layer in lora.layers.values())
                actual = llama_on_device(ids).logits.cpu()
        assert {name: layer.base_fusion for name, layer in lora.layers.items()} == before
    finally:
        lora.unpatch()
    assert_close(actual, expected)


def test_pool_formulations_hold_every_adapter_share_the_weights_and_match_padded_slots(llama_on_device, xla_device):
    """--compare-pool's handles: pools of exactly the run's rank rows (8 adapters x rank 4, nothing spare, all
    resident), the base weights shared with the padded model, the float pool computing what padded slots do and
    the int8 pool within its cache-check tolerance of it."""
    config = dataclasses.replace(e2e.E2EConfig.quick(), compare_pool=True)
    loras = e2e.patch_all(llama_on_device, config, slots=8)
    batch = ["adapter0", None, "adapter5"]
    ids = torch.randint(0, 64, (3, 32)).to(xla_device)  # a prefill's path: the pooled decode path compiles slower
    logits = {}
    try:
        assert set(loras) == {"lora", "pool", "pool int8"}
        padded = loras["lora"]
        steps = e2e._Steps(loras, 2, 4, 8, config)
        assert {f: steps.handle(f) for f in config.formulations} == {"base": padded, "onehot": padded, **loras}
        for name in e2e.POOLS:
            memory = loras[name].memory()
            assert sorted(memory["adapters"]) == [f"adapter{i}" for i in range(config.num_adapters)]
            assert {layer.pool_rows for layer in loras[name].layers.values()} == {config.num_adapters * config.rank}
            for layer_name, layer in loras[name].layers.items():
                assert layer.base_layer.weight is padded.layers[layer_name].base_layer.weight
        with torch.no_grad():
            padded.clear_batch()
            logits["base"] = llama_on_device(ids).logits.cpu()
            for name, lora in loras.items():
                lora.set_batch(batch)
                logits[name] = lora.model(ids).logits.cpu()
    finally:
        e2e.unpatch_all(loras)
    assert_close(logits["pool"], logits["lora"])
    effect = (logits["lora"] - logits["base"]).abs().max()
    assert effect > 0.1
    assert (logits["pool int8"] - logits["lora"]).abs().max() / effect <= e2e_report.MAX_INT8_REL_ERROR
    assert not any(isinstance(m, tl.layers.BaseLayerWithLoRA) for m in llama_on_device.modules())


def test_compare_pool_flag_adds_the_pool_formulations():
    config, _ = e2e.parse_args(["--quick", "--compare-pool", "--compare-fusion"])
    assert config.formulations == ("base", "lora", "onehot", "fused", "pool", "pool int8")
    assert e2e.parse_args(["--quick"])[0].formulations == e2e.FORMULATIONS


def test_report_has_pool_columns_and_target_with_compare_pool():
    def cell(kind, pool):
        seconds = {"base": [1.0, 1.0], "lora": [1.1, 1.2], "onehot": [1.3, 1.3], "pool": pool, "pool int8": [1.1, 1.2]}
        return e2e.Cell(kind, 2, 16, 8, seconds, 0).to_json()

    point = {"prefill": cell("prefill", [1.1, 1.2]), "decode": cell("decode", [1.1 * 1.02, 1.2 * 1.06])}
    assert point["decode"]["ratio_to_lora"] == pytest.approx({"pool": 1.04, "pool int8": 1.0})
    result = _result([point], [point]) | {"generation": [e2e_report.generation(point, 10)]}
    result["config"] |= {"compare_pool": True}
    assert e2e_report.generation(point, 10)["ratio_to_lora"]["pool"] == pytest.approx(
        ((1.1 + 10 * 1.122) / (1.1 + 11.0) + (1.2 + 10 * 1.272) / (1.2 + 12.0)) / 2
    )
    target = e2e_report.targets(result)["pool_vs_padded"]
    assert (target["worst"], target["cells"], target["cells_met"], target["met"]) == (pytest.approx(1.04), 4, 2, False)
    assert "| pool / LoRA | pool int8 / LoRA |" in e2e_report.generation_table(result)
    assert "| prefill pool / LoRA | prefill pool int8 / LoRA |" in e2e_report.steps_table(result)
    assert "| decode pool / LoRA | decode pool int8 / LoRA | prefill pool / LoRA |" in e2e_report.slot_table(result)
    assert "| 1.040 | 1.000 |" in e2e_report.steps_table(result)
    assert "pool" not in e2e_report.steps_table(result | {"config": {}})
    check = {"lora": 1e-6, "pool": 1e-6, "pool int8": 1e-6, e2e.INT8_VS_POOL: 0.9 * e2e_report.MAX_INT8_REL_ERROR}
    assert all(v <= e2e_report.cache_limit(k) for k, v in check.items())
    assert e2e_report.cache_limit(e2e.INT8_VS_POOL) > e2e_report.cache_limit("pool int8")


def test_one_hot_gives_zero_rows_for_base_tokens():
    hot = e2e._one_hot(torch.tensor([2, -1, 0], dtype=torch.int32), 3, torch.float32)
    assert hot.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]


def _cell(kind, slots, base, lora, onehot, batch=8, seq=8, fused=None):
    """A Cell whose formulations take the given seconds in one repetition."""
    seconds = {"base": [base], "lora": [lora], "onehot": [onehot]} | ({"fused": [fused]} if fused else {})
    return e2e.Cell(kind, batch, seq, slots, seconds, 0).to_json()


def _result(grid=(), sweep=(), compare_fusion=False):
    return {
        "config": {"compare_fusion": compare_fusion},
        "grid": list(grid),
        "slot_sweep": list(sweep),
        "cache_check": {"max_abs_logits_diff": {}, "met": True},
    }


@pytest.mark.parametrize(("lora", "met"), [(1.04, True), (1.06, False)], ids=["4pct", "6pct"])
def test_prefill_target_per_cell(lora, met):
    point = {"prefill": _cell("prefill", 8, 1.0, lora, 1.1), "decode": _cell("decode", 8, 1.0, 1.0, 1.0)}
    assert e2e_report.targets(_result(grid=[point]))["prefill_slowdown"]["met"] == met


@pytest.mark.parametrize(("fused", "met"), [(1.02, True), (1.03, False)], ids=["2pct", "3pct"])
def test_fused_prefill_target_covers_grid_and_sweep(fused, met):
    def point(slots, prefill_fused):
        return {
            "prefill": _cell("prefill", slots, 1.0, 1.01, 1.1, fused=prefill_fused),
            "decode": _cell("decode", slots, 1.0, 1.0, 1.0, fused=1.0),
        }

    # The worst cell in the grid, then in the sweep.
    for grid, sweep in (([point(8, fused)], [point(8, 1.0), point(64, 1.0)]), ([point(8, 1.0)], [point(8, fused)])):
        target = e2e_report.targets(_result(grid, sweep, compare_fusion=True))["fused_prefill_slowdown"]
        assert target["met"] == met
        assert target["cells"] == len(grid) + len(sweep)
    assert "fused_prefill_slowdown" not in e2e_report.targets(_result([point(8, fused)]))


def test_tables_have_fused_columns_with_compare_fusion():
    point = {
        "prefill": _cell("prefill", 8, 1.0, 1.01, 1.1, fused=1.02),
        "decode": _cell("decode", 8, 1.0, 1.0, 1.0, fused=1.0),
    }
    with_fused = _result([point], [point], compare_fusion=True)
    assert "| prefill fused |" in e2e_report.steps_table(with_fused)
    assert "| decode fused | prefill fused |" in e2e_report.slot_table(with_fused)
    assert "fused" not in e2e_report.steps_table(_result([point], [point]))


def _sweep(decode8, decode64):
    """Slot sweep points (8 and 64 slots) from (lora, onehot) decode seconds, base 1.0; prefill flat."""
    return [
        {"decode": _cell("decode", slots, 1.0, *times), "prefill": _cell("prefill", slots, 1.0, 1.01, 1.1)}
        for slots, times in ((8, decode8), (64, decode64))
    ]


@pytest.mark.parametrize(
    ("decode8", "decode64", "expected"),
    [
        ((1.05, 1.05), (1.05, 1.5), (True, True, True)),
        ((1.08, 1.05), (1.08, 1.5), (False, True, True)),  # 8 slots: 2.5 points over the one-hot's
        ((1.02, 1.02), (1.06, 1.08), (True, False, False)),  # 64 slots: more than half the one-hot's, drifts
    ],
    ids=["all-met", "over-onehot-at-8", "over-half-at-64"],
)
def test_decode_targets(decode8, decode64, expected):
    t = e2e_report.targets(_result(sweep=_sweep(decode8, decode64)))
    assert (
        t["decode_fewest_slots"]["met"],
        t["decode_most_slots"]["met"],
        t["decode_flat_in_slots"]["met"],
    ) == expected


def test_generation_is_prefill_plus_decode_steps():
    point = {
        "prefill": _cell("prefill", 8, 1.0, 1.1, 1.2, batch=2, seq=100),
        "decode": _cell("decode", 8, 0.1, 0.11, 0.2, batch=2, seq=100),
    }
    g = e2e_report.generation(point, out_len=10)
    assert g["seconds"] == pytest.approx({"base": 2.0, "lora": 2.2, "onehot": 3.2})
    assert g["output_tokens_per_s"]["base"] == pytest.approx(2 * 10 / 2.0)
    assert g["slowdown_pct"]["lora"] == pytest.approx(100 * (1 - 2.0 / 2.2))


def test_page_faults_per_step_is_the_median_over_every_run():
    cell = e2e.Cell("prefill", 1, 8, 8, {"base": [1.0] * 3, "lora": [1.0] * 3}, 0, {"base": [0, 9, 1], "lora": [5, 7]})
    older = e2e.Cell("decode", 1, 8, 8, {"base": [1.0]}, 0).to_json()  # no counts recorded
    per_step = e2e_report.page_faults_per_step([{"prefill": cell.to_json(), "decode": older}])
    assert per_step == {"base": 1, "lora": 6}


def test_slowdown_pairs_runs_of_one_repetition():
    """A machine twice as slow in the second repetition: the pairs still say 10%."""
    seconds = {"base": [1.0, 2.0, 1.0], "lora": [1.0 / 0.9, 2.0 / 0.9, 1.0 / 0.9]}
    cell = e2e.Cell("prefill", 1, 8, 8, seconds, 0)
    assert cell.slowdown("lora") == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("grouping", "gpu", "grouping must be 'host' or 'device'"),
        ("repeats", 0, "repeats must be at least 1"),
        ("decode_steps", 0, "decode_steps must be at least 1"),
        ("compare_fusion", True, "not with 'on'"),
    ],
)
def test_config_rejects(field, value, message):
    extra = {"base_fusion": "on"} if field == "compare_fusion" else {}
    with pytest.raises(ValueError, match=message):
        e2e.E2EConfig(**{field: value}, **extra)
