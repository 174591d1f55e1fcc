"""The end-to-end benchmark: the one-hot formulation, the report, and a --quick run end to end."""

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


@pytest.mark.parametrize("name", ["e2e.json", "e2e.md", "e2e_slowdown.png", "e2e_slots.png"])
def test_quick_run_writes(quick_run, name):
    path = quick_run[1] / name
    assert path.stat().st_size > 0
    if name.endswith(".png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_json_covers_grid_and_sweep(quick_run):
    result = json.loads((quick_run[1] / "e2e.json").read_text())
    config = e2e.E2EConfig.quick()
    points = {(cell["batch"], cell["seq"]) for cell in result["grid"]}
    assert points == {(b, s) for b in config.batch_sizes for s in config.seq_lens}
    assert [cell["slots"] for cell in result["slot_sweep"]] == list(config.slot_counts)
    for cell in result["grid"] + result["slot_sweep"]:
        assert set(cell["tokens_per_s"]) == set(e2e.FORMULATIONS)
        assert all(rate > 0 for rate in cell["tokens_per_s"].values())
        assert len(cell["seconds"]["lora"]) == config.repeats
    assert result["recompiles_during_timing"] == 0
    assert set(result["targets"]) == {"lora_slowdown", "third_of_onehot", "slot_drift"}
    assert result["command"] == f"python -m torch_xla_lora.bench e2e --quick --out {quick_run[1]}"


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


def test_one_hot_gives_zero_rows_for_base_tokens():
    hot = e2e._one_hot(torch.tensor([2, -1, 0], dtype=torch.int32), 3, torch.float32)
    assert hot.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]


def _cell(batch, seq, slots, base, lora, onehot):
    rates = {"base": base, "lora": lora, "onehot": onehot}
    return e2e.Cell(batch, seq, slots, rates, {f: [batch * seq / r] for f, r in rates.items()}, 0).to_json()


@pytest.mark.parametrize(
    ("lora", "onehot", "met"),
    [(99.0, 80.0, True), (96.0, 90.0, False), (90.0, 95.0, False)],
    ids=["both-met", "slowdown-over-a-third", "slowdown-over-5pct"],
)
def test_targets_per_cell(lora, onehot, met):
    targets = e2e_report.targets({"grid": [_cell(1, 8, 8, 100.0, lora, onehot)], "slot_sweep": []})
    assert (targets["lora_slowdown"]["met"] and targets["third_of_onehot"]["met"]) == met


@pytest.mark.parametrize(("base64", "lora64", "met"), [(100.0, 98.0, True), (100.0, 95.0, False), (90.0, 88.2, True)])
def test_slot_target_normalises_by_base(base64, lora64, met):
    sweep = [_cell(8, 8, 8, 100.0, 98.0, 50.0), _cell(8, 8, 64, base64, lora64, 10.0)]
    targets = e2e_report.targets({"grid": [sweep[0]], "slot_sweep": sweep})
    assert targets["slot_drift"]["met"] == met


def test_slowdown_pairs_runs_of_one_repetition():
    """A machine twice as slow in the second repetition: the pairs still say 10%."""
    seconds = {"base": [1.0, 2.0, 1.0], "lora": [1.0 / 0.9, 2.0 / 0.9, 1.0 / 0.9]}
    cell = e2e.Cell(1, 8, 8, {"base": 8.0, "lora": 7.2}, seconds, 0)
    assert cell.slowdown("lora") == pytest.approx(10.0)


def test_dispatcher_names_a_missing_benchmark(monkeypatch, capsys):
    import torch_xla_lora.bench.__main__ as dispatcher

    monkeypatch.setitem(dispatcher.COMMANDS, "model", ("torch_xla_lora.bench.no_such_module", ""))
    assert bench_main(["model"]) == 2
    assert "torch_xla_lora/bench/no_such_module.py does not exist yet" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("grouping", "gpu", "grouping must be 'host' or 'device'"), ("repeats", 0, "repeats must be at least 1")],
)
def test_config_rejects(field, value, message):
    with pytest.raises(ValueError, match=message):
        e2e.E2EConfig(**{field: value})
