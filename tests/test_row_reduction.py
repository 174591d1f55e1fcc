"""A row-parallel LoRA layer reduces once: the base's all-reduce of [T, out] carries the LoRA too.

docs/distributed.md: each shard adds ``(x_k A_k^T) B`` to its partial ``x_k W_k^T`` and the
shards' sum is one all-reduce; left to the partitioner, the op's shrink products (rank-sized:
[T, R], or [T, lanes * R] when adapters share a tile) would each be all-reduced on their own.
Both are counted here in the compiled HLO after SPMD partitioning, with their shapes.

SPMD is process-global, so the mesh runs in a subprocess: this file is also its worker
(``python test_row_reduction.py WORKDIR``, 4 virtual CPU devices).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import warnings

TOKENS, IN, OUT, SLOTS, RANK = 16, 128, 64, 2, 8


def _reduced_shapes(hlo: str) -> list[list[int]]:
    """The shape of every tensor an all-reduce sums (a combined all-reduce counts each operand)."""
    shapes = []
    for result in re.findall(r"= (.*?) all-reduce(?:-start)?\(", hlo):
        shapes += [[int(d) for d in dims.split(",") if d] for dims in re.findall(r"\w+\[([\d,]*)\]", result)]
    return shapes


def _worker(workdir: str) -> dict:
    import numpy as np
    import torch
    import torch_xla
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr
    from torch import nn

    import torch_xla_lora as tl

    xr.use_spmd()
    mesh = xs.Mesh(np.arange(4), (4,), ("model",))
    model = nn.ModuleDict({"down": nn.Linear(IN, OUT)})
    model = model.to(torch_xla.device())
    lora = tl.patch_model(
        model,
        tl.LoRAConfig(max_loras=SLOTS, max_rank=RANK, target_modules=["down"]),
        mesh=mesh,
        sharding_plan={"down": "row"},
    )
    lora.load_adapter("a", os.path.join(workdir, "adapter"))  # as PEFT's save_pretrained wrote it
    layer = lora.layers["down"]
    x = xs.mark_sharding(torch.randn(TOKENS, IN).to(torch_xla.device()), mesh, (None, "model")).global_tensor
    torch_xla.sync()

    def reduced() -> list[list[int]]:
        pattern = os.path.join(workdir, "*SyncTensorsGraph*after_optimizations.txt")
        before = set(glob.glob(pattern))
        with torch.no_grad():
            out = layer(x)  # alive through the sync, which compiles and runs only live tensors' graphs
            torch_xla.sync()
        del out
        (path,) = set(glob.glob(pattern)) - before  # one new graph: the layer's
        with open(path) as f:
            return _reduced_shapes(f.read())

    result = {}
    lora.set_token_adapters(["a" if i % 3 else None for i in range(TOKENS)])
    result["lora"] = reduced()
    placement, layer.tensor_parallel = layer.tensor_parallel, None  # the one-device forward, partitioned by XLA
    result["partitioner"] = reduced()
    layer.tensor_parallel = placement
    lora.clear_batch()
    result["base"] = reduced()
    return result


def test_row_parallel_lora_rides_on_the_base_all_reduce(tmp_path):
    import peft
    import torch
    from torch import nn

    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=["down"], init_lora_weights=False, r=RANK, lora_alpha=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(nn.ModuleDict({"down": nn.Linear(IN, OUT)}), config).save_pretrained(tmp_path / "adapter")
    from conftest import cpu_compile_env

    env = cpu_compile_env(dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4"), f"--xla_dump_to={tmp_path}",
                          "--xla_dump_hlo_as_text")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    output = [TOKENS, OUT]
    # The base layer alone, and with LoRA per shard: one all-reduce, of the output.
    assert result["base"] == [output]
    assert result["lora"] == [output]
    # The control: the same output reduction, plus rank-sized ones the shrink products need on their own.
    # Were the per-shard region to leave the LoRA to the partitioner, "lora" would look like this.
    control = result["partitioner"]
    assert control.count(output) == 1, control
    extra = [shape for shape in control if shape != output]
    assert extra, control
    for shape in extra:
        assert TOKENS in shape and shape[-1] <= SLOTS * RANK, control


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))
