"""The training demo: three tenants trained together in mixed batches learn their tasks; PEFT agrees."""

import contextlib
import dataclasses
import io
import json
import re
import sys

import pytest
import torch

from torch_xla_lora import __main__ as cli
from torch_xla_lora import train_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(result, printed report) of one quick demo, shared by the tests below."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train_demo.run_demo(quick=True, out=tmp_path_factory.mktemp("train_demo"))
    return result, out.getvalue()


def _expected(tenant: str, prompt: list[int], alphabet: int) -> list[int]:
    """The task's answer as token ids, written out here rather than taken from the demo."""
    first_symbol = 3  # <pad> <bos> <sep>, then the symbols
    answer = {"copy": prompt, "reverse": prompt[::-1], "shift": [(s + 1) % alphabet for s in prompt]}[tenant]
    return [first_symbol + s for s in answer]


def test_train_demo_exits_zero(demo_run):
    result, text = demo_run
    assert result.exit_code == 0, text


@pytest.mark.parametrize(
    "line",
    [
        f", 0 in the {train_demo.TrainDemoConfig.quick().steps - 2} training steps after it\n",
        "OK: every tenant learned its task, PEFT agrees on every token, nothing compiled after warm-up",
    ],
)
def test_train_demo_report_has(demo_run, line):
    assert line in demo_run[1]


def test_every_tenant_solves_its_task_on_held_out_prompts(demo_run):
    """Checked here against the tasks written out independently: at least the demo's threshold per tenant,
    and the three tenants answer the same prompts differently (each learned its own task, on its own rows)."""
    result, text = demo_run
    config = train_demo.TrainDemoConfig.quick()
    assert set(result.answers) == {"copy", "reverse", "shift"}
    for name, answers in result.answers.items():
        assert len(answers.prompts) == config.held_out
        right = total = 0
        for prompt, ours in zip(answers.prompts, answers.ours, strict=True):
            expected = _expected(name, prompt, config.alphabet)
            right += sum(a == e for a, e in zip(ours, expected, strict=True))
            total += len(expected)
        assert right / total >= train_demo.MIN_ACCURACY, (name, right / total)
        assert f"  {name:8s} {right / total:18.1%}" in text
    assert result.answers["copy"].ours != result.answers["reverse"].ours != result.answers["shift"].ours


def test_peft_generate_on_the_saved_adapters_gives_the_same_tokens(demo_run):
    result, text = demo_run
    for name, answers in result.answers.items():
        assert answers.ours == answers.peft, name
        assert re.search(rf"^  {name} +[\d.]+% +\d+/\d+ +yes$", text, re.MULTILINE), name


def test_the_checks_have_teeth(demo_run):
    """Another tenant's answers fail both the accuracy threshold and the PEFT comparison, and so would the demo
    (exit code 1, with the reason printed); so would a compilation after warm-up."""
    result, _ = demo_run
    copy, reverse = result.answers["copy"], result.answers["reverse"]
    wrong = train_demo.Answers("reverse", copy.prompts, copy.ours, reverse.peft, copy.alphabet)
    assert wrong.accuracy < train_demo.MIN_ACCURACY
    assert not wrong.same_as_peft
    failed = dataclasses.replace(result, answers={**result.answers, "reverse": wrong})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_demo._report(failed)
    assert failed.exit_code == 1
    assert "FAILED: tenant 'reverse' got" in out.getvalue()
    assert "FAILED: tenant 'reverse': PEFT's generate on the saved adapter gives other tokens" in out.getvalue()
    assert dataclasses.replace(result, recompiles=1).exit_code == 1


def test_no_compilation_after_warmup(demo_run):
    result, _ = demo_run
    assert result.recompiles == 0
    assert result.warmup_compiles > 0  # the counter counts: warm-up and the first steps did compile


def test_mixes_change_and_tenants_sit_out(demo_run):
    """Every tenant has a loss curve that falls, and each sat out some steps (its curve has gaps)."""
    result, _ = demo_run
    steps = train_demo.TrainDemoConfig.quick().steps
    for name, curve in result.curves.items():
        assert 0 < len(curve) < steps, name
        first, last = curve[0][1], curve[-1][1]
        assert last < first / 10, (name, first, last)


def test_outputs_saved_adapters_and_pngs(demo_run):
    result, text = demo_run
    for name in result.answers:
        directory = result.out / "adapters" / name
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        assert (directory / "adapter_model.safetensors").stat().st_size > 0
    assert sorted(p.name for p in result.pngs) == ["loss_copy.png", "loss_reverse.png", "loss_shift.png"]
    for png in result.pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"output directory: {result.out}" in text


def test_training_batches_never_hold_a_held_out_prompt():
    config = train_demo.TrainDemoConfig.quick()
    held_out = train_demo.held_out_prompts(config, seed=0)
    assert len({tuple(p) for p in held_out}) == config.held_out
    batches = train_demo.Batches(config, ["copy", "reverse", "shift"], {tuple(p) for p in held_out}, seed=0)
    for step in range(60):
        mix, ids, targets, weights = batches.batch(step)
        prompts = {tuple((ids[row, 1 : config.length + 1] - 3).tolist()) for row in range(config.rows)}
        assert not prompts & {tuple(p) for p in held_out}
        # Each tenant's rows weigh 1 in total: the loss is the sum of the tenants' means.
        for name in set(mix):
            rows = [i for i, n in enumerate(mix) if n == name]
            assert torch.isclose(weights[rows].sum(), torch.tensor(1.0))
        assert ((targets != train_demo.IGNORE).sum(dim=1) == config.length).all()


def test_cli_passes_its_options(monkeypatch):
    calls = []
    monkeypatch.setattr(train_demo, "run", lambda **kwargs: calls.append(kwargs) or 0)
    assert cli.main(["train-demo", "--quick", "--seed", "3", "--out", "somewhere"]) == 0
    assert calls == [{"seed": 3, "quick": True, "out": "somewhere"}]


def test_without_matplotlib_the_pngs_are_skipped_with_a_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    message = train_demo.plot_losses(train_demo.TENANTS, {t.name: [(0, 1.0)] for t in train_demo.TENANTS}, tmp_path)
    assert message == "matplotlib is not installed: no loss-curve PNGs (pip install matplotlib)"
    assert not list(tmp_path.iterdir())
