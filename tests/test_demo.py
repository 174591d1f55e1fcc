"""The main-job demo: a mixed batch of PEFT adapters, generated greedily, matches PEFT and compiles once."""

import contextlib
import io

import pytest
import torch

from torch_xla_lora import demo
from torch_xla_lora.__main__ import main


@pytest.fixture(scope="module")
def demo_run():
    """(exit code, printed report) of one quick demo, shared by the tests below."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--quick"])
    return code, out.getvalue()


def test_demo_exits_zero(demo_run):
    code, text = demo_run
    assert code == 0, text


@pytest.mark.parametrize(
    "line",
    [
        "largest |logit - PEFT|",
        "PEFT's greedy choice agrees on 24/24 generated tokens",
        "base throughput:",
        "LoRA throughput:",
        "XLA compilations after warm-up: 0",
        "OK: every request matches PEFT, nothing recompiled",
    ],
)
def test_demo_report_has(demo_run, line):
    assert line in demo_run[1]


def test_demo_report_lists_every_request(demo_run):
    requests = demo.DemoConfig.quick().requests
    for row, name in enumerate(requests):
        assert f"#{row} {name or 'base':5s} prompt" in demo_run[1]


def test_generate_matches_full_recompute_on_the_host():
    """Greedy decoding on the static buffer equals decoding by re-running the growing prompt."""
    torch.manual_seed(0)
    vocab = 11
    table = torch.randn(vocab, vocab)

    def step(ids):  # a causal "model": logits at t depend on ids[:, t] only
        return table[ids]

    generation = demo.generate(step, [[1, 2], [3]], seq_bucket=6, new_tokens=3, device=torch.device("cpu"))
    for prompt, tokens in zip([[1, 2], [3]], generation.new_tokens, strict=True):
        expected, seq = [], list(prompt)
        for _ in range(3):
            seq.append(int(table[seq[-1]].argmax()))
            expected.append(seq[-1])
        assert tokens == expected
    assert generation.lengths == [5, 4]


def test_generate_rejects_a_too_small_bucket():
    with pytest.raises(ValueError, match="seq_bucket 4 < longest prompt 3 \\+ new_tokens 2"):
        demo.generate(lambda ids: ids, [[1, 2, 3]], seq_bucket=4, new_tokens=2, device=torch.device("cpu"))
