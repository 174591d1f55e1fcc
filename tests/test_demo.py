"""The main-job demo and its serving loop: KV-cache continuous batching that matches PEFT and compiles once."""

import contextlib
import io

import pytest
import torch
from conftest import tiny_llama

from torch_xla_lora import demo
from torch_xla_lora.serving import Request, Steps, serve


@pytest.fixture(scope="module")
def demo_run():
    """(result, printed report) of one quick demo, shared by the tests below."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = demo.run_demo(quick=True)
    return result, out.getvalue()


def test_demo_exits_zero(demo_run):
    result, text = demo_run
    assert result.exit_code == 0, text


@pytest.mark.parametrize(
    "line",
    [
        "largest |logit - PEFT| over every generated token",
        "requests whose greedy tokens equal PEFT's generate: 6/6",
        "loader thread: 'math' loaded",
        "XLA compilations after warm-up: 0",
        "OK: every request matches PEFT, nothing recompiled",
    ],
)
def test_demo_report_has(demo_run, line):
    assert line in demo_run[1]


def test_demo_report_lists_every_request(demo_run):
    for number, spec in enumerate(demo.DemoConfig.quick().requests):
        assert f"#{number:<4d} {spec.adapter or 'base':7s} {spec.prompt_len:6d}  {spec.new_tokens:6d}" in demo_run[1]


def test_demo_rows_mix_adapters_and_are_reused(demo_run):
    """More requests than rows, and some decode step serves different adapters side by side."""
    result, text = demo_run
    config = demo.DemoConfig.quick()
    assert len(result.requests) > config.rows
    # a step line: "step   3  #4 chat@8 | #5 base@4 | idle"
    rows = [line[9:].split("|") for line in text.splitlines() if line.startswith("step")]
    adapters = [{row.split()[-1].split("@")[0] for row in step if "@" in row} for step in rows]
    assert any(len(names) > 1 for names in adapters)


@pytest.mark.parametrize(("number", "wrong"), [(0, "chat"), (1, "sql"), (2, "__base__"), (3, "chat")])
def test_a_wrong_adapter_assignment_is_caught(demo_run, number, wrong):
    """The PEFT check has teeth: the same served tokens, checked against another adapter, fail."""
    result, _ = demo_run
    check = demo.check_request(result.peft_model, result.requests[number], adapter=wrong)
    assert not check.ok and check.max_diff > 1e-2


class _HostLoRA:
    """Stands in for the LoRAModel handle: records set_batch calls; adapters appear when loaded."""

    def __init__(self, loaded):
        self.loaded, self.calls = set(loaded), []

    def adapters(self):
        return {name: {} for name in self.loaded}

    def set_batch(self, names, seq_len=None):
        self.calls.append((list(names), seq_len))


def _greedy_by_recompute(model, prompt, new_tokens):
    """(tokens, logits [new_tokens, V]) re-running the whole sequence each token (no cache)."""
    seq, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits.append(model(torch.tensor([seq])).logits[0, -1])
            seq.append(int(logits[-1].argmax()))
    return seq[len(prompt) :], torch.stack(logits)


def _host_requests():
    g = torch.Generator().manual_seed(1)
    specs = [("a", 5, 4, 0), (None, 3, 2, 0), ("b", 6, 5, 1), ("a", 2, 3, 1), (None, 4, 1, 2)]
    return [Request(name, torch.randint(1, 64, (n,), generator=g).tolist(), new, at) for name, n, new, at in specs]


def test_serve_with_the_row_cache_equals_recompute_on_the_host():
    """Rows at different positions, refilled as requests finish: every request equals no-cache greedy decoding."""
    model = tiny_llama()
    steps = Steps(model, rows=2, max_len=12, prefill_len=6, device=torch.device("cpu"), backend=None)
    requests = _host_requests()
    serve(steps, _HostLoRA({"a", "b"}), requests, progress=None)
    for request in requests:
        tokens, logits = _greedy_by_recompute(model, request.prompt, request.max_new_tokens)
        assert request.tokens == tokens
        torch.testing.assert_close(torch.stack(request.logits), logits, atol=1e-5, rtol=1e-5)


def test_serve_sets_every_rows_adapter_every_step():
    model = tiny_llama()
    steps = Steps(model, rows=2, max_len=12, prefill_len=6, device=torch.device("cpu"), backend=None)
    lora = _HostLoRA({"a", "b"})
    decodes = serve(steps, lora, _host_requests(), progress=None)
    decode_calls = [names for names, seq_len in lora.calls if seq_len == 1]
    prefill_calls = [names for names, seq_len in lora.calls if seq_len == 6]
    assert len(decode_calls) == decodes and all(len(names) == 2 for names in decode_calls)
    assert prefill_calls == [["a"], [None], ["b"], ["a"], [None]]


def test_serve_admits_a_request_only_once_its_adapter_is_loaded():
    """An adapter loaded while serving (here after decode step 2): its request waits, the others go on."""
    model = tiny_llama()
    steps = Steps(model, rows=2, max_len=12, prefill_len=6, device=torch.device("cpu"), backend=None)
    lora = _HostLoRA({"a"})
    serve(steps, lora, _host_requests(), progress=None, on_step=lambda n: n == 2 and lora.loaded.add("b"))
    first_b = next(i for i, (names, seq_len) in enumerate(lora.calls) if names == ["b"])
    assert sum(seq_len == 1 for _, seq_len in lora.calls[:first_b]) >= 3


@pytest.mark.parametrize(
    ("prompt_len", "new_tokens", "message"),
    [(7, 1, "the prefill bucket is 6"), (0, 1, "the prefill bucket is 6"), (6, 8, "exceeds the cache length 12")],
)
def test_serve_rejects_requests_outside_the_buckets(prompt_len, new_tokens, message):
    steps = Steps(tiny_llama(), rows=2, max_len=12, prefill_len=6, device=torch.device("cpu"), backend=None)
    with pytest.raises(ValueError, match=message):
        serve(steps, _HostLoRA(set()), [Request(None, [1] * prompt_len, new_tokens)], progress=None)
