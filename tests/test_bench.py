"""The TPU cost model on hand-computed cases, and smoke runs of the kernel benchmarks."""

import numpy as np
import pytest

from torch_xla_lora.bench import kernels, model, tpu_model

# Round numbers so the expected costs can be worked out by hand.
CHIP = tpu_model.Chip("test", "v6e", hbm_bytes_per_s=1e9, peak_flops=1e12, mxu_width=256, step_overhead_s=1e-6)


def test_mxu_flops_pad_k_and_n_to_whole_tiles():
    # 2 * M * ceil(K/W)*W * ceil(N/W)*W
    assert tpu_model.mxu_flops([(10, 300, 16)], 256) == 2 * 10 * 512 * 256


def test_fused_cost_one_block_one_adapter():
    # T=256, D=Dout=256, R=16, L=1, bf16 on "v6e": one 256-token block, one output tile, one lane.
    cost = tpu_model.fused_cost(CHIP, np.zeros(256, np.int32), hidden=256, out_dim=256, rank=16, num_slots=1)
    codes, x, base, out = 256 * 4, 256 * 256 * 2, 256 * 256 * 2, 256 * 256 * 2
    assert cost.pipelined_bytes == codes + x + base + out
    assert cost.manual_bytes == 16 * 256 * 2 * 2  # A tile and B tile of the one adapter
    assert cost.mxu_flops == 2 * 256 * 256 * 256 + 2 * 256 * 256 * 256  # shrink and expand, padded to tiles
    assert cost.steps == 1
    expected = max(cost.pipelined_bytes / 1e9, cost.mxu_flops / 1e12) + cost.manual_bytes / 1e9 + 1e-6
    assert cost.seconds == pytest.approx(expected)


def test_fused_cost_skips_blocks_without_adapter():
    # Two 256-token blocks, the first all base rows: only the second is visited.
    indices = np.concatenate([np.full(256, -1), np.zeros(256)]).astype(np.int32)
    one_block = tpu_model.fused_cost(CHIP, np.zeros(256, np.int32), 256, 256, 16, 1)
    two_blocks = tpu_model.fused_cost(CHIP, indices, 256, 256, 16, 1)
    assert (two_blocks.steps, two_blocks.pipelined_bytes) == (one_block.steps, one_block.pipelined_bytes)


def test_fused_cost_flat_in_slots_onehot_not():
    indices = (np.arange(1024) * 8 // 1024).astype(np.int32)
    ours = [tpu_model.fused_cost(CHIP, indices * (L // 8), 4096, 4096, 16, L).seconds for L in (8, 128)]
    onehot = [tpu_model.onehot_cost(CHIP, 1024, 4096, 4096, 16, L).seconds for L in (8, 128)]
    assert ours[1] == pytest.approx(ours[0])
    assert onehot[1] > 2 * onehot[0]


def test_floor_counts_adapters_in_use_once():
    cost = tpu_model.floor_cost(CHIP, np.array([0, 0, 3, -1], np.int32), hidden=128, out_dim=64, rank=8)
    assert cost.pipelined_bytes == 2 * (4 * 128 + 2 * 4 * 64 + 2 * 8 * (128 + 64))


def test_model_command_quick(capsys):
    assert model.main(["--quick"]) == 0
    table = capsys.readouterr().out
    assert "| v6e | 256 | 64 | 8 in use |" in table


def test_kernels_command_quick(capsys, tmp_path):
    assert kernels.main(["--quick", "--json", str(tmp_path / "k.json")]) == 0
    out = capsys.readouterr().out
    assert "shrink T=   64 L=  8" in out and "layer  T=   64 L=  8" in out
    assert (tmp_path / "k.json").stat().st_size > 0


def test_warmup_command_quick(capsys):
    from torch_xla_lora.bench import warmup

    assert warmup.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "max_loras   1:" in out and "max_loras   4:" in out and "in 2 compilations" in out


@pytest.mark.parametrize(
    ("environ", "argv", "restarts"),
    [
        ({}, ["e2e", "--quick"], True),
        ({}, ["--system-malloc", "e2e"], False),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, ["e2e"], False),
        ({}, ["e2e", "--system-malloc"], True),  # after the command it is the command's option, not ours
    ],
)
def test_malloc_environment(environ, argv, restarts):
    import platform
    import sys

    from torch_xla_lora.bench.__main__ import REUSE_MALLOC, malloc_environment

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        assert malloc_environment(environ, argv) is None
        return
    env = malloc_environment(environ, argv)
    assert (env is not None) == restarts
    if restarts:
        assert env == {**environ, "GLIBC_TUNABLES": REUSE_MALLOC}


def test_every_command_names_a_module_with_main():
    """The dispatcher imports COMMANDS[command][0] and calls its main(argv): a command registered
    without its module, or a module without main, would fail only when a user runs it."""
    import importlib

    from torch_xla_lora.bench.__main__ import COMMANDS

    for name, (module_name, help_text) in COMMANDS.items():
        assert help_text, name
        assert callable(importlib.import_module(module_name).main), name


def test_command_line_restarts_with_reused_memory():
    # On glibc the command line says it restarts with the tunables, then runs the command.
    import os
    import platform
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    for argv, notice in ((["model", "--help"], True), (["--system-malloc", "model", "--help"], False)):
        done = subprocess.run(
            [sys.executable, "-m", "torch_xla_lora.bench", *argv], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout
        expected = notice and sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
        assert ("restarting with GLIBC_TUNABLES=" in done.stderr) == expected


def test_pool_pairs_the_layouts_and_checks_they_agree(capsys):
    """``bench pool --quick``: a row per scenario (its quick one) and step with the padded step's time and
    both pools' ratios; the layouts' logits are compared before timing (a float pool off by 1e-3 of the logits is
    refused)."""
    import json

    import torch

    from torch_xla_lora.bench import pool

    argv = ["--quick", "--repeats", "1", "--decode-batch", "4", "--prefill", "16", "--max-rank", "64", "--json"]
    assert pool.main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("\n[") :])
    assert [(r["scenario"], r["step"]) for r in rows] == [
        (s, k) for s in pool.QUICK_SCENARIOS for k in ("decode", "prefill")
    ]
    assert all(r["padded_ms"] > 0 and r["pool_ratio"] > 0 and r["pool int8_ratio"] > 0 for r in rows)
    logits = torch.randn(2, 3, 8)

    def steps(pool_logits):
        return {
            name: ((lambda: None), (lambda t=t: t))
            for name, t in (("padded", logits), ("pool", pool_logits), ("pool int8", logits))
        }

    pool._check_agree(steps(logits + 1e-6 * logits.abs().max()), "close")
    with pytest.raises(AssertionError, match="disagree"):
        pool._check_agree(steps(logits + 1e-3 * logits.abs().max()), "off")


def test_pool_tokens_sweep_pairs_the_two_paths_and_checks_they_agree(capsys, monkeypatch):
    """``bench pool --tokens-sweep``: a row per fleet and token count with both paths' times and their ratio; the
    sweep refuses to time two paths whose outputs differ (the packed one made to double the scaling here)."""
    import json

    from torch_xla_lora.bench import pool
    from torch_xla_lora.ops import _xla_native

    assert pool.main(["--tokens-sweep", "--quick", "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("\n[") :])
    assert [(r["fleet"], r["tokens"]) for r in rows] == [("mixed ranks, 16 adapters", 8)]
    assert all(r["packed_ms"] > 0 and r["tiles_ms"] > 0 and r["packed_over_tiles"] > 0 for r in rows)
    unscaled = _xla_native.pooled_shrink_expand

    def wrong(*args, scaling):
        return unscaled(*args, scaling=2 * scaling)

    monkeypatch.setattr(_xla_native, "pooled_shrink_expand", wrong)
    with pytest.raises(AssertionError, match="disagree"):
        pool.tokens_sweep(64, 128, 16, 64, tokens=(8,), repeats=1, calls=1, fleets=["uniform r16, 8 adapters"])
