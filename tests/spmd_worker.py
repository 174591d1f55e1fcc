"""Runs one SPMD scenario in its own process for tests/test_sharding.py.

SPMD is process-global and the number of virtual CPU devices is fixed when
torch_xla starts, so every mesh needs a fresh process. The parent sets
``PJRT_DEVICE=CPU``, ``CPU_NUM_DEVICES`` (and ``XLA_FLAGS`` to dump the
compiled HLO for the collectives scenario), writes ``inputs.pt`` into a work
directory and reads ``result.pt`` back.

Usage: ``python spmd_worker.py {llama,layers,grads} WORKDIR``
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import os
import re
import sys

import numpy as np
import torch
import torch_xla
import torch_xla.debug.metrics as met
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr
from torch import nn

import torch_xla_lora as tl
from torch_xla_lora import regions, sharding

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> xs.Mesh:
    return xs.Mesh(np.arange(int(np.prod(shape))), shape, names)


def _spec(tensor: torch.Tensor) -> str:
    return torch_xla._XLAC._get_xla_sharding_spec(tensor)


def _transfers_from_device() -> int:
    data = met.metric_data("TransferFromDeviceTime")
    return int(data[0]) if data else 0


# -- a patched Llama on a mesh -------------------------------------------------------------------


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {"weight": layer.base_layer.weight, "lora_a": layer.lora_a, "lora_b": layer.lora_b}


def _buffer_specs(lora: tl.LoRAModel, names: dict[str, str]) -> dict[str, dict[str, str]]:
    """Short name -> {"weight", "lora_a", "lora_b"} -> sharding spec text."""
    return {short: {key: _spec(t) for key, t in _tensors(lora.layers[name]).items()} for short, name in names.items()}


def _spec_texts(mesh: xs.Mesh, lora: tl.LoRAModel, names: dict[str, str], expected: dict) -> dict:
    """The spec text that tensors of the same shapes marked with the ``expected`` partition specs get."""
    texts = {}
    for short, specs in expected.items():
        tensors = _tensors(lora.layers[names[short]])
        texts[short] = {}
        for key, spec in specs.items():
            probe = torch.zeros(tensors[key].shape, device=torch_xla.device())
            texts[short][key] = _spec(xs.mark_sharding(probe, mesh, spec).global_tensor)
    return texts


def _patched_llama(inputs: dict, mesh: xs.Mesh, dp_axis: str | None = None, fully_sharded: bool = False):
    """(model, handle): the Llama of ``inputs`` on the XLA device, patched on ``mesh`` by the default plan."""
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**inputs["model_config"]))
    model.load_state_dict(inputs["state_dict"])
    model = model.to(torch_xla.device()).eval()
    config = tl.LoRAConfig(**inputs["lora_config"])
    lora = tl.patch_model(model, config, mesh=mesh, tp_axis="model", dp_axis=dp_axis, fully_sharded=fully_sharded)
    return model, lora


def run_llama(inputs: dict) -> dict:
    device = torch_xla.device()
    mesh = _mesh(inputs["mesh_shape"], inputs["axis_names"])
    model, lora = _patched_llama(inputs, mesh, inputs["dp_axis"], inputs["fully_sharded"])
    layers = {"q_proj": "model.layers.0.self_attn.q_proj", "o_proj": "model.layers.0.self_attn.o_proj"}
    layers |= {"down_proj": "model.layers.1.mlp.down_proj", "lm_head": "lm_head", "embed_tokens": "model.embed_tokens"}
    result = {"specs_patched": _buffer_specs(lora, layers)}
    result["expected_spec_text"] = _spec_texts(mesh, lora, layers, inputs["expected_specs"])
    # Replicated on the device: fetching a sharded tensor compiles a gather graph on every fetch.
    forward = lambda ids: sharding.replicated(model(ids).logits, mesh)
    ids = inputs["ids"]
    result["warmup_compiles"] = lora.warmup([ids.shape[0]], [ids.shape[1]], step=forward, progress=False)
    counter = tl.CompileCounter()
    _load_all(lora, inputs["adapters"])
    lora.set_batch(inputs["batch"])
    with torch.no_grad():
        logits = forward(ids.to(device))
        torch_xla.sync()
    result["logits"] = logits.cpu()
    result["specs_loaded"] = _buffer_specs(lora, layers)
    before = _transfers_from_device()
    _serve(lora, forward, ids.to(device), inputs["adapters"], inputs["more_batches"])
    result["loop_transfers_from_device"] = _transfers_from_device() - before
    result["compiles_after_warmup"] = counter.count
    result["compiled"] = _run_compiled(inputs, mesh)
    return result


def _run_compiled(inputs: dict, mesh: xs.Mesh) -> dict:
    """The same Llama under ``torch.compile(backend="openxla")``, batches set with host-built metadata.

    A fresh model, so the lazy run above leaves nothing behind; the LoRA ops'
    calls are recorded while the graph is traced (at warm-up) to show what
    runs per shard.
    """
    import torch._dynamo

    device = torch_xla.device()
    model, lora = _patched_llama(inputs, mesh, inputs["dp_axis"], inputs["fully_sharded"])
    step = torch.compile(lambda ids: sharding.replicated(model(ids).logits, mesh), backend="openxla")
    ids, seq_len = inputs["ids"], inputs["ids"].shape[1]
    with _recording_op_calls() as calls:
        warmup = lora.warmup([ids.shape[0]], [seq_len], step=step, progress=False, host_metadata=True)
    result = {"warmup_compiles": warmup, "op_calls": calls}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    counter = tl.CompileCounter()
    _load_all(lora, inputs["adapters"])
    lora.set_batch(inputs["batch"], seq_len=seq_len)
    with torch.no_grad():
        result["logits"] = step(ids.to(device)).cpu()
    _serve(lora, step, ids.to(device), inputs["adapters"], inputs["more_batches"], seq_len=seq_len)
    result["compiles_after_warmup"] = counter.count
    result["graphs_after_warmup"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    result["metadata"] = _metadata_check(lora, mesh, inputs["batch"], seq_len, inputs["dp_axis"])
    # Per-token slots (sent split over the data axis): the same batch, one entry per token (a new graph).
    lora.set_token_adapters([name for name in inputs["batch"] for _ in range(seq_len)])
    with torch.no_grad():
        result["per_token_logits"] = step(ids.to(device)).cpu()
    return result


def _metadata_check(lora: tl.LoRAModel, mesh: xs.Mesh, batch: list, seq_len: int, dp_axis: str | None) -> dict:
    """Per metadata tensor of a batch: its global shape, whether it is split over the data axis
    like a tensor marked (dp_axis, None), and whether row k is the host grouping of data shard k's tokens."""
    from torch_xla_lora import ops

    lora.set_batch(batch, seq_len=seq_len)
    token_slots = lora.context.slots.cpu().repeat_interleave(seq_len)
    layer = next(iter(lora.layers.values()))
    checks = {}
    for (tokens, hidden, out), sent in lora.context.metadata.items():
        chunks = token_slots.reshape(-1, tokens)
        rows = [
            ops.batch_metadata(chunk, [(hidden, out)], layer.max_rank, layer.max_loras, layer.lora_b.dtype)
            for chunk in chunks
        ]
        expected = torch.stack([row[(hidden, out)] for row in rows])
        probe = xs.mark_sharding(torch.zeros(sent.shape, device=torch_xla.device()), mesh, (dp_axis, None))
        split_like_probe = _spec(sent) == _spec(probe.global_tensor)
        checks[(tokens, hidden, out)] = (tuple(sent.shape), split_like_probe, torch.equal(sent.cpu(), expected))
    return checks


@contextlib.contextmanager
def _recording_op_calls():
    """Yield a list that gets (op, [argument shapes]) of every LoRA op that reaches JAX, on the shapes it sees.

    Inside a per-shard region these are the local shard shapes. The fused op
    with host metadata has 6 arguments (the last the metadata), without 5;
    ``linear_lora`` ("linear") is told apart by its JAX function.
    """
    from torch_xla_lora import ops

    calls, call_jax = [], ops._call_jax

    def record(fn, *args):
        if fn.__qualname__.startswith("linear_lora_fn"):  # x, weight, [bias,] a, b, indices[, metadata]
            op = "linear+metadata" if not args[-2].dtype.is_floating_point else "linear"
        else:
            op = {3: "shrink", 4: "expand", 5: "fused", 6: "fused+metadata"}[len(args)]
        calls.append((op, [tuple(arg.shape) for arg in args]))
        return call_jax(fn, *args)

    ops._call_jax = record
    try:
        yield calls
    finally:
        ops._call_jax = call_jax


def _load_all(lora: tl.LoRAModel, adapters: dict) -> None:
    for name, (state_dict, config) in adapters.items():
        lora.load_adapter(name, state_dict=state_dict, config=config)


def _serve(lora: tl.LoRAModel, forward, ids: torch.Tensor, adapters: dict, batches: list, seq_len=None) -> None:
    """One reload and one new adapter mix (slot writes, evictions) per step; outputs stay on the device."""
    names = list(adapters)
    for step, batch in enumerate(batches):
        name = names[step % len(names)]
        lora.load_adapter(name, state_dict=adapters[name][0], config=adapters[name][1])
        lora.set_batch(batch, seq_len=seq_len)
        with torch.no_grad():
            out = forward(ids)
            torch_xla.sync()
        del out


# -- single layers: collectives in the compiled HLO ----------------------------------------------


class Toy(nn.Module):
    """Not a transformers model (its plan comes from ``sharding_plan``), with one module of each kind.

    ``down`` is a GPT-2-style Conv1D (weight [in, out]) with a bias, to cover that layout.
    """

    def __init__(self, vocab: int = 128, hidden: int = 64, inner: int = 128) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, inner)
        self.down = Conv1D(hidden, inner)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.mix(self.embed(ids))))))


TOY_PLAN = {"embed": "vocab", "mix": "replicated", "up": "column", "down": "row", "head": "vocab"}


def _graph_files(dump_dir: str) -> set[str]:
    return set(glob.glob(os.path.join(dump_dir, "*SyncTensorsGraph*after_optimizations.txt")))


def _run_and_count(
    dump_dir: str, module: nn.Module, x: torch.Tensor, graphs: int | None = 1
) -> tuple[torch.Tensor, dict[str, int]]:
    """``module(x)`` synced, and the collectives of the ``graphs`` graphs it compiled (None: any number, e.g. a
    first call's host checks of the base model too), after SPMD partitioning."""
    before = _graph_files(dump_dir)
    with torch.no_grad():
        out = module(x)
        torch_xla.sync()
    files = _graph_files(dump_dir) - before
    if graphs is not None and len(files) != graphs:
        raise RuntimeError(f"expected {graphs} new compiled graph(s), found {sorted(files)}")
    hlo = ""
    for file in sorted(files):
        with open(file) as f:
            hlo += f.read()
    return out, {op: len(re.findall(rf"= [^=]*\b{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


# (layer, variant, with LoRA): each runs alone, on an input sharded as inside the toy model. The variant
# is fully_sharded (False, True) or "fused" (base_fusion=True: linear_lora per shard; without LoRA the
# layer is its base alone, as in the False variant).
LAYER_CASES = [(name, False, with_lora) for name in TOY_PLAN for with_lora in (False, True)]
LAYER_CASES += [("up", True, True), ("head", True, True)]
LAYER_CASES += [(name, "fused", True) for name in ("mix", "up", "down", "head")]


def run_layers(inputs: dict) -> dict:
    """Collectives per layer and variant, and what the parent compares with PEFT: each layer's output with
    the input it got (as inside the model), and the whole toy's logits per variant."""
    mesh = _mesh((4,), ("model",))
    toy_cpu = Toy()
    toy_cpu.load_state_dict(inputs["toy_state"])
    result = {"collectives": {}, "layer_outputs": {}, "model_outputs": {}}
    for fully in (False, True, "fused"):
        config = dataclasses.replace(_toy_config(), base_fusion=fully == "fused")
        toy = copy.deepcopy(toy_cpu).to(torch_xla.device())
        lora = tl.patch_model(toy, config, mesh=mesh, sharding_plan=TOY_PLAN, fully_sharded=fully is True)
        lora.load_adapter("a", state_dict=inputs["adapter"][0], config=inputs["adapter"][1])
        lora.set_token_adapters(inputs["token_adapters"])
        result["model_outputs"][fully] = _toy_logits(toy, inputs["ids"], mesh)
        layer_inputs = _layer_inputs(toy, inputs["ids"], mesh)
        for name, _, with_lora in [case for case in LAYER_CASES if case[1] == fully]:
            if with_lora:
                lora.set_token_adapters(inputs["token_adapters"])
            else:
                lora.clear_batch()
            out, counts = _run_and_count(inputs["dump_dir"], lora.layers[name], layer_inputs[name])
            result["collectives"][(name, fully, with_lora)] = counts
            if with_lora:
                result["layer_outputs"][(name, fully)] = (layer_inputs[name].cpu(), out.cpu())
        if fully is False:
            lora.set_token_adapters(inputs["token_adapters"])
            control = _partitioner_control(lora.layers["down"], layer_inputs["down"], inputs["dump_dir"])
            result["collectives"]["down/partitioner"] = control
    # The Pallas kernels (interpret mode here, Mosaic on TPU) per shard; adapters in another dtype than the model.
    result["model_outputs"]["pallas"] = _toy_variant(toy_cpu, inputs, mesh, torch.float32, backend="pallas")
    result["model_outputs"]["bf16"] = _toy_variant(toy_cpu, inputs, mesh, torch.bfloat16, dtype=torch.float32)
    # linear_lora per shard through the fused base kernel (interpret mode here).
    fused = {"base_fusion": True, "backend": "pallas"}
    result["model_outputs"]["pallas-fused"] = _toy_variant(toy_cpu, inputs, mesh, torch.float32, **fused)
    result["model_collectives"] = _llama_collectives(inputs["llama"], mesh, inputs["dump_dir"])
    result["scaled_embedding"] = {kind: _scaled_embedding_logits(case, mesh) for kind, case in inputs["scaled"].items()}
    result["divisibility_error"] = _divisibility_error(mesh)
    result["pool"] = run_pool(inputs["pool"], mesh, inputs["dump_dir"])
    result["quantized"] = run_quantized(inputs["quantized"], _mesh((2, 2), ("data", "model")), inputs["dump_dir"])
    result["serving"] = _serving_compiles(inputs["llama"], mesh)
    return result


def run_moe_meshes(inputs: dict) -> dict:
    """The MoE scenarios (test_sharding_moe.py): the tiny Mixtral on a (1, 4) data x model mesh, then on a (2, 2)
    expert x model mesh with the tiny GPT-OSS."""
    result = {"moe": run_moe(inputs["moe"], _mesh((1, 4), ("data", "model")), inputs["dump_dir"])}
    ep_mesh = _mesh((2, 2), ("expert", "model"))
    result["moe_ep"] = run_moe_expert_parallel(inputs["moe"], ep_mesh, inputs["dump_dir"])
    result["moe_ep"]["gpt_oss"] = _gpt_oss_expert_parallel(inputs["moe_gpt_oss"], ep_mesh, inputs["dump_dir"])
    return result


def _llama_collectives(inputs: dict, mesh: xs.Mesh, dump_dir: str) -> dict[str, dict[str, int]]:
    """Collectives of the whole patched Llama's forward: a mixed batch ("lora") and no adapter ("base")."""
    model, lora = _patched_llama(inputs, mesh)
    _load_all(lora, inputs["adapters"])
    lora.set_batch(inputs["batch"])
    logits = lambda ids: model(ids).logits
    ids = inputs["ids"].to(torch_xla.device())
    counts = {"lora": _run_and_count(dump_dir, logits, ids)[1]}
    lora.clear_batch()
    counts["base"] = _run_and_count(dump_dir, logits, ids)[1]
    # base_fusion=True: every projection and the head run linear_lora per shard.
    model, lora = _patched_llama(dict(inputs, lora_config={**inputs["lora_config"], "base_fusion": True}), mesh)
    _load_all(lora, inputs["adapters"])
    lora.set_batch(inputs["batch"])
    counts["lora-fused"] = _run_and_count(dump_dir, lambda ids: model(ids).logits, ids)[1]
    return counts


def _scaled_embedding_logits(case: dict, mesh: xs.Mesh) -> tuple[str, torch.Tensor]:
    """(embedding's sharding kind, logits) of a model whose word embedding scales its rows (Gemma, XGLM),
    with LoRA on the embedding and q_proj, on the mesh by the default plan, for a mixed batch."""
    model = case["model"].to(torch_xla.device())
    lora = tl.patch_model(model, tl.LoRAConfig(**case["lora_config"]), mesh=mesh)
    _load_all(lora, case["adapters"])
    lora.set_batch(case["batch"])
    embedding = next(layer for name, layer in lora.layers.items() if name.endswith("embed_tokens"))
    with torch.no_grad():
        logits = sharding.replicated(model(case["ids"].to(torch_xla.device())).logits, mesh)
        torch_xla.sync()
    return embedding.tensor_parallel.kind, logits.cpu()


def _toy_variant(toy_cpu: Toy, inputs: dict, mesh: xs.Mesh, model_dtype: torch.dtype, **changes) -> torch.Tensor:
    """The toy's logits on the mesh for a variant of the LoRA config and the model dtype."""
    config = dataclasses.replace(_toy_config(), **changes)
    toy = copy.deepcopy(toy_cpu).to(torch_xla.device(), model_dtype)
    lora = tl.patch_model(toy, config, mesh=mesh, sharding_plan=TOY_PLAN)
    lora.load_adapter("a", state_dict=inputs["adapter"][0], config=inputs["adapter"][1])
    lora.set_token_adapters(inputs["token_adapters"])
    return _toy_logits(toy, inputs["ids"], mesh)


def _toy_logits(toy: Toy, ids: torch.Tensor, mesh: xs.Mesh) -> torch.Tensor:
    with torch.no_grad():
        logits = sharding.replicated(toy(ids.to(torch_xla.device())), mesh)
        torch_xla.sync()
    return logits.cpu()


def _layer_inputs(toy: Toy, ids: torch.Tensor, mesh: xs.Mesh) -> dict[str, torch.Tensor]:
    """Each layer's input, sharded as inside the model, as device data (so a layer's graph holds it alone)."""
    with torch.no_grad():
        ids = ids.to(torch_xla.device())
        embedded = toy.embed(ids)
        mixed = toy.mix(embedded)
        hidden = xs.mark_sharding(torch.relu(toy.up(mixed)), mesh, (None, "model")).global_tensor
        torch_xla.sync()
    return {"embed": ids, "mix": embedded, "up": mixed, "down": hidden, "head": embedded}


def _partitioner_control(layer: nn.Module, x: torch.Tensor, dump_dir: str) -> dict[str, int]:
    """Collectives of the one-device forward on the same sharded tensors, left to the partitioner.

    The control for the counts above: it shows the counting sees a collective that LoRA adds.
    """
    placement, layer.tensor_parallel = layer.tensor_parallel, None
    try:
        return _run_and_count(dump_dir, layer, x)[1]
    finally:
        layer.tensor_parallel = placement


def _toy_config() -> tl.LoRAConfig:
    return tl.LoRAConfig(max_loras=2, max_rank=8, target_modules=tuple(TOY_PLAN))


def _divisibility_error(mesh: xs.Mesh) -> str:
    model = nn.Sequential(nn.Linear(8, 6))
    layers = {"0": tl.patching.LinearWithLoRA(model[0], None, 2, 4, torch.float32)}
    try:
        sharding.plan_model(model, layers, mesh, "model", plan={"0": "column"})
    except sharding.ShardingError as error:
        return str(error)
    return ""


# -- rank-true storage (LoRAConfig.memory_budget) on a mesh ------------------------------------------

#: Pool buffers checked for their placement, per layer of each kind (the Llama's names).
POOL_LAYERS = {
    "q_proj": "model.layers.0.self_attn.q_proj",
    "o_proj": "model.layers.0.self_attn.o_proj",
    "lm_head": "lm_head",
    "embed_tokens": "model.embed_tokens",
}


def _pool_specs(lora: tl.LoRAModel, mesh: xs.Mesh, expected: dict) -> dict:
    """Short name -> buffer -> (its spec text, the text a tensor of its shape marked by ``expected`` gets)."""
    device, specs = torch_xla.device(), {}
    for short, name in POOL_LAYERS.items():
        layer = lora.layers[name]
        for buffer, spec in expected[short].items():
            tensor = getattr(layer, buffer)
            probe = xs.mark_sharding(torch.zeros(tensor.shape, device=device), mesh, spec).global_tensor
            specs[(short, buffer)] = (_spec(tensor), _spec(probe))
    return specs


def run_pool(inputs: dict, mesh: xs.Mesh, dump_dir: str) -> dict:
    """The Llama with a memory budget on ``mesh``: pool placements; a mixed batch of mixed ranks, lazy (float and
    int8 rows) and compiled; compilations and host transfers over loads and evictions after warm-up; the
    collectives of the forward with a batch; the refusal of ``fully_sharded``."""
    device = torch_xla.device()
    model, lora = _patched_llama(inputs, mesh)
    result = {"specs": _pool_specs(lora, mesh, inputs["pool_specs"])}
    forward = lambda ids: sharding.replicated(model(ids).logits, mesh)
    ids = inputs["ids"].to(device)
    result["warmup_compiles"] = lora.warmup([ids.shape[0]], [ids.shape[1]], step=forward, progress=False)
    counter = tl.CompileCounter()
    _load_all(lora, inputs["adapters"])
    lora.set_batch(inputs["batch"])
    with torch.no_grad():
        result["logits"] = forward(ids).cpu()
    before = _transfers_from_device()
    _serve(lora, forward, ids, inputs["adapters"], inputs["more_batches"])
    result["loop_transfers_from_device"] = _transfers_from_device() - before
    result["compiles_after_warmup"] = counter.count
    result["evictions"] = len(inputs["adapters"]) - len(lora.memory()["adapters"])
    result["specs_loaded"] = _pool_specs(lora, mesh, inputs["pool_specs"])
    lora.set_batch(inputs["batch"])
    logits = lambda ids: model(ids).logits
    # (The base alone is the same graph as _llama_collectives' "base": compiled already, compared there.)
    calls = {}
    with _capturing_regions(calls, "pool", POOL_READERS):
        result["collectives"] = _run_and_count(dump_dir, logits, ids)[1]
        # Where autograd records a gradient a layer gathers its lanes into slots instead (traced, not run).
        with torch.enable_grad():
            lora.layers["model.layers.0.self_attn.q_proj"](model.model.embed_tokens(ids))
    result["pool_reads"] = _pool_reads(lora, lambda: logits(ids))
    result["patched_layers"] = list(lora.layers)
    # base_fusion: each shard runs base and LoRA in one op, reading the pools.
    fused = dict(inputs, lora_config={**inputs["lora_config"], "base_fusion": True})
    model, lora = _patched_llama(fused, mesh)
    _load_all(lora, inputs["adapters"])
    lora.set_batch(inputs["batch"])
    with _capturing_regions(calls, "pool-fused", POOL_READERS), torch.no_grad():
        result["fused_logits"] = sharding.replicated(model(ids).logits, mesh).cpu()
    result["fused_pool_reads"] = _pool_reads(lora, lambda: model(ids).logits)
    result["opcheck"] = _opchecks(calls)
    # int8 rows: the same batch, read through the replicated scales.
    int8 = dict(inputs, lora_config={**inputs["lora_config"], "weight_dtype": "int8"})
    model, lora = _patched_llama(int8, mesh)
    _load_all(lora, inputs["adapters"])
    lora.set_batch(inputs["batch"])
    with torch.no_grad():
        result["int8_logits"] = sharding.replicated(model(ids).logits, mesh).cpu()
    result["int8_pool_reads"] = _pool_reads(lora, lambda: model(ids).logits)
    result["compiled"] = _pool_compiled(inputs, mesh, ids)
    try:
        _patched_llama(inputs, mesh, fully_sharded=True)
        result["fully_sharded_error"] = ""
    except sharding.ShardingError as error:
        result["fully_sharded_error"] = str(error)
    return result


#: The regions a pooled layer's forward may read its pools in: gathered into slots, or read in place.
POOL_READERS = (
    "sharded_gather_slots",
    "sharded_pooled_lora",
    "sharded_pooled_linear_lora",
    "sharded_pooled_row_linear",
    "sharded_embedding",
    "sharded_grouped_matmul",
)


def _pool_reads(lora: tl.LoRAModel, forward) -> dict[str, list[str]]:
    """Region op -> ``layer.buffer`` of every pool and kept page-scale array (``lora_page_scale``) ``forward()``
    passes it (of :data:`POOL_READERS`), and ``layer.pages`` where the call passes a page table; traced without
    running."""
    names = {}
    for name, layer in lora.layers.items():
        for buffer_name, buffer in layer.named_buffers(recurse=False):
            if buffer_name.endswith("_pool") or buffer_name.startswith("lora_page_scale"):
                names[id(buffer)] = f"{name}.{buffer_name}"
    namespace, reads = torch.ops.xla_lora, {op: [] for op in POOL_READERS}
    originals = {op: getattr(namespace, op) for op in POOL_READERS}

    def recording(op):
        arguments = [argument.name for argument in originals[op].default._schema.arguments]
        at = next((arguments.index(n) for n in ("pages", "pool_pages") if n in arguments), len(arguments))

        def call(*args):
            passed = [names[id(arg)] for arg in args if id(arg) in names]
            if len(args) > at and args[at] is not None:
                passed += [f"{layer}.pages" for layer in {name.rpartition(".")[0] for name in passed}]
            reads[op] += passed
            return originals[op](*args)

        return call

    try:
        for op in POOL_READERS:
            setattr(namespace, op, recording(op))
        with torch.no_grad():
            forward()
    finally:
        for op, original in originals.items():
            setattr(namespace, op, original)
    return reads


def reads_by_layer(names) -> dict[str, set[str]]:
    """``layer.what`` names of :func:`_pool_reads` grouped: layer -> the set of what each call passed it."""
    out: dict[str, set[str]] = {}
    for name in names:
        layer, _, what = name.rpartition(".")
        out.setdefault(layer, set()).add(what)
    return out


def _pool_compiled(inputs: dict, mesh: xs.Mesh, ids: torch.Tensor) -> dict:
    """The pooled Llama under ``torch.compile(backend="openxla")``, batches with host metadata: logits,
    compilations and dynamo graphs after warm-up over loads and evictions."""
    import torch._dynamo

    model, lora = _patched_llama(inputs, mesh)
    step = torch.compile(lambda ids: sharding.replicated(model(ids).logits, mesh), backend="openxla")
    seq_len = ids.shape[1]
    result = {"warmup_compiles": lora.warmup([ids.shape[0]], [seq_len], step=step, progress=False, host_metadata=True)}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    counter = tl.CompileCounter()
    _load_all(lora, inputs["adapters"])
    lora.set_batch(inputs["batch"], seq_len=seq_len)
    with torch.no_grad():
        result["logits"] = step(ids).cpu()
    _serve(lora, step, ids, inputs["adapters"], inputs["more_batches"], seq_len=seq_len)
    result["compiles_after_warmup"] = counter.count
    result["graphs_after_warmup"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    return result


# -- quantized bases (torch_xla's XlaQuantizedLinear) on a mesh -------------------------------------


def run_quantized(inputs: dict, mesh: xs.Mesh, dump_dir: str) -> dict:
    """Per scheme (per channel with zero points, blockwise): a tiny Llama whose projections are torch_xla's
    int8 quantized layers, patched on ``mesh`` (data x model, tokens split over "data"), a mixed batch's logits
    lazy and compiled, the int8 weights' and scales' placements; for the first scheme, the collectives of the
    forward with and without a batch."""
    cases = list(inputs.items())
    return {scheme: _quantized_case(case, mesh, dump_dir if case is cases[0][1] else None) for scheme, case in cases}


def _quantized_case(case: dict, mesh: xs.Mesh, dump_dir: str | None) -> dict:
    device = torch_xla.device()
    model = copy.deepcopy(case["model"]).to(device).eval()
    lora = tl.patch_model(model, tl.LoRAConfig(**case["lora_config"]), mesh=mesh, dp_axis="data")
    _load_all(lora, case["adapters"])
    lora.set_batch(case["batch"])
    ids = case["ids"].to(device)
    with torch.no_grad():
        out = {"logits": sharding.replicated(model(ids).logits, mesh).cpu(), "specs": {}}
    if "memory_budget" in case["lora_config"]:  # which region reads each pool (traced, not run)
        out["pool_reads"] = _pool_reads(lora, lambda: model(ids).logits)
    for short, name in case["placed"].items():
        module = lora.layers[name].base_layer
        for tensor_name, spec in case["expected_specs"][short].items():
            tensor = getattr(module, tensor_name)
            probe = xs.mark_sharding(torch.zeros(tensor.shape, device=device), mesh, spec).global_tensor
            out["specs"][(short, tensor_name)] = (_spec(tensor), _spec(probe))
    if dump_dir is not None:
        logits = lambda ids: model(ids).logits
        out["collectives"] = {"lora": _run_and_count(dump_dir, logits, ids)[1]}
        lora.clear_batch()
        out["collectives"]["base"] = _run_and_count(dump_dir, logits, ids)[1]
        lora.set_batch(case["batch"])
    step = torch.compile(lambda ids: sharding.replicated(model(ids).logits, mesh), backend="openxla")
    with torch.no_grad():
        out["compiled_logits"] = step(ids).cpu()
    return out


# -- mixture of experts on a mesh ------------------------------------------------------------------


def run_moe(inputs: dict, mesh: xs.Mesh, dump_dir: str) -> dict:
    """A tiny Mixtral with attention, router and expert LoRA on ``mesh`` (the default plan, experts tensor
    parallel): logits of a mixed batch lazy and compiled, placements, compilations after warm-up over other
    adapter mixes, the collectives of the forward with and without a batch, the warm-up warning, and a training
    step of trainable tenants through one expert layer of the same model (:func:`moe_layer_training_step`)."""
    import warnings

    device = torch_xla.device()

    def patched():
        model = copy.deepcopy(inputs["model"]).to(device).eval()
        lora = tl.patch_model(model, tl.LoRAConfig(**inputs["lora_config"]), mesh=mesh)
        _load_all(lora, inputs["adapters"])
        return model, lora

    ids = inputs["ids"].to(device)
    model, lora = patched()
    experts = lora.layers["model.layers.0.mlp.experts"]
    result = {"kinds": {name: layer.tensor_parallel.kind for name, layer in lora.layers.items()}}
    tensors = {"gate_up_proj": experts.base_layer.gate_up_proj, "down_proj": experts.base_layer.down_proj}
    tensors |= {name: getattr(experts, name) for name in ("lora_a", "lora_b", "lora_a_down", "lora_b_down")}
    result["specs"] = {name: _spec(t) for name, t in tensors.items()}
    result["expected_specs"] = {
        name: _spec(xs.mark_sharding(torch.zeros(t.shape, device=device), mesh, inputs["specs"][name]).global_tensor)
        for name, t in tensors.items()
    }
    logits = lambda ids: model(ids, use_cache=False).logits
    forward = lambda ids: sharding.replicated(logits(ids), mesh)
    result["warmup_compiles"] = lora.warmup([ids.shape[0]], [ids.shape[1]], step=forward, progress=False)
    counter = tl.CompileCounter()
    lora.set_batch(inputs["batch"])
    with torch.no_grad():
        result["logits"] = forward(ids).cpu()
    _serve(lora, forward, ids, inputs["adapters"], inputs["more_batches"])
    result["compiles_after_warmup"] = counter.count
    lora.set_batch(inputs["batch"])
    calls = {}
    with _capturing_regions(calls, "moe", ("sharded_grouped_matmul",)):
        result["collectives"] = {"lora": _run_and_count(dump_dir, logits, ids)[1]}
    result["opcheck"] = _opchecks(calls)
    lora.clear_batch()
    result["collectives"]["base"] = _run_and_count(dump_dir, logits, ids)[1]
    with warnings.catch_warnings(record=True) as caught:  # a step returning the vocabulary-sharded logits
        warnings.simplefilter("always")
        lora.warmup([ids.shape[0]], [ids.shape[1]], step=logits, progress=False)
    result["warnings"] = [str(w.message) for w in caught]
    result["training"] = moe_layer_training_step(model, lora, inputs["training"], dump_dir)
    result["compiled"] = _moe_compiled(inputs, patched, ids, mesh)
    return result


def _moe_compiled(inputs: dict, patched, ids: torch.Tensor, mesh: xs.Mesh) -> dict:
    """The same under ``torch.compile(backend="openxla")``, a fresh model: logits, compilations and dynamo graphs
    after warm-up."""
    import torch._dynamo

    model, lora = patched()
    step = torch.compile(lambda ids: sharding.replicated(model(ids, use_cache=False).logits, mesh), backend="openxla")
    result = {"warmup_compiles": lora.warmup([ids.shape[0]], [ids.shape[1]], step=step, progress=False)}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    counter = tl.CompileCounter()
    lora.set_batch(inputs["batch"])
    with torch.no_grad():
        result["logits"] = step(ids).cpu()
    _serve(lora, step, ids, inputs["adapters"], inputs["more_batches"])
    result["compiles_after_warmup"] = counter.count
    result["graphs_after_warmup"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    return result


def _marked_spec(like: torch.Tensor, mesh: xs.Mesh, spec: tuple) -> str:
    """The sharding text a tensor of ``like``'s shape gets when marked with ``spec`` on ``mesh``."""
    return _spec(xs.mark_sharding(torch.zeros(like.shape, device=torch_xla.device()), mesh, spec).global_tensor)


def run_moe_expert_parallel(inputs: dict, mesh: xs.Mesh, dump_dir: str) -> dict:
    """The tiny Mixtral of ``run_moe`` with its experts split over the mesh's "expert" axis and their width over
    "model" (``ep_axis="expert"``): placements, the mixed batch's logits lazy and compiled, the collectives of the
    lazy forward with and without a batch, compilations after the compiled step's warm-up over the batch and
    another adapter mix, a model whose experts do not divide over the expert axis refused, and a training step of
    trainable tenants (:func:`moe_training_step`, the expert backward region's first call recorded for opcheck).
    Few graphs: the compiled step and the training step run on the same model."""
    device = torch_xla.device()
    model = copy.deepcopy(inputs["model"]).to(device).eval()
    lora = tl.patch_model(model, tl.LoRAConfig(**inputs["lora_config"]), mesh=mesh, ep_axis="expert")
    _load_all(lora, inputs["adapters"])
    ids = inputs["ids"].to(device)
    experts = lora.layers["model.layers.0.mlp.experts"]
    tensors = {"gate_up_proj": experts.base_layer.gate_up_proj, "down_proj": experts.base_layer.down_proj}
    tensors |= {name: getattr(experts, name) for name in ("lora_a", "lora_b", "lora_a_down", "lora_b_down")}
    result = {"kind": experts.tensor_parallel.kind, "specs": {name: _spec(t) for name, t in tensors.items()}}
    result["expected_specs"] = {name: _marked_spec(t, mesh, inputs["ep_specs"][name]) for name, t in tensors.items()}
    logits = lambda ids: sharding.replicated(model(ids, use_cache=False).logits, mesh)
    lora.set_batch(inputs["batch"])
    torch_xla.sync()  # the slot writes, before the forward's graphs are counted
    out, counts = _run_and_count(dump_dir, logits, ids, graphs=None)  # with the base model's first host checks
    result["logits"], result["collectives"] = out.cpu(), {"lora": counts}
    lora.clear_batch()
    result["collectives"]["base"] = _run_and_count(dump_dir, logits, ids)[1]
    # Compiled (the same model): after warm-up, the mixed batch and another mix with a reload compile nothing.
    step = torch.compile(lambda ids: sharding.replicated(model(ids, use_cache=False).logits, mesh), backend="openxla")
    lora.warmup([ids.shape[0]], [ids.shape[1]], step=step, progress=False)
    counter = tl.CompileCounter()
    lora.set_batch(inputs["batch"])
    with torch.no_grad():
        result["compiled_logits"] = step(ids).cpu()
    _serve(lora, step, ids, inputs["adapters"], inputs["more_batches"][:1])
    result["compiled_compiles_after_warmup"] = counter.count
    # Six experts over an expert axis of four shards: refused before the model changes.
    config = copy.deepcopy(inputs["model"].config)
    config.num_local_experts = 6
    odd = type(inputs["model"])(config)
    try:
        tl.patch_model(
            odd, tl.LoRAConfig(**inputs["lora_config"]), mesh=_mesh((4, 1), ("expert", "model")), ep_axis="expert"
        )
        result["indivisible_error"] = None
    except sharding.ShardingError as error:
        result["indivisible_error"] = (type(error).__name__, str(error))
    result["indivisible_untouched"] = not any(isinstance(m, tl.layers.BaseLayerWithLoRA) for m in odd.modules())
    calls = {}
    result["training"] = moe_training_step(model, lora, inputs["training"], dump_dir, calls)
    result["opcheck"] = _opchecks(calls)
    result["pool"] = _moe_pooled(inputs, mesh)
    return result


def _moe_pooled(inputs: dict, mesh: xs.Mesh) -> dict:
    """The same Mixtral expert parallel on ``mesh`` with rank-true storage (``inputs["memory_budget"]``): the
    expert layer's pools' placements (as the slot buffers they stand for) and the mixed batch's logits (lazy)."""
    device = torch_xla.device()
    model = copy.deepcopy(inputs["model"]).to(device).eval()
    config = tl.LoRAConfig(**inputs["lora_config"], memory_budget=inputs["memory_budget"])
    lora = tl.patch_model(model, config, mesh=mesh, ep_axis="expert")
    _load_all(lora, inputs["adapters"])
    experts = lora.layers["model.layers.0.mlp.experts"]
    names = ("lora_a", "lora_b", "lora_a_down", "lora_b_down")
    pools = {name: getattr(experts, f"{name}_pool") for name in names}
    result = {"pooled": lora.manager.pooled, "specs": {name: _spec(t) for name, t in pools.items()}}
    result["expected_specs"] = {name: _marked_spec(t, mesh, inputs["ep_specs"][name]) for name, t in pools.items()}
    lora.set_batch(inputs["batch"])
    ids = inputs["ids"].to(device)
    with torch.no_grad():
        result["logits"] = sharding.replicated(model(ids, use_cache=False).logits, mesh).cpu()
    result["pool_reads"] = _pool_reads(lora, lambda: model(ids, use_cache=False).logits)
    result["patched_layers"] = list(lora.layers)
    # int8 pools: the experts' kept page scales (4 experts to a tile, replicated) read on every shard.
    model = copy.deepcopy(inputs["model"]).to(device).eval()
    lora = tl.patch_model(model, dataclasses.replace(config, weight_dtype="int8"), mesh=mesh, ep_axis="expert")
    _load_all(lora, inputs["adapters"])
    lora.set_batch(inputs["batch"])
    with torch.no_grad():
        result["int8_logits"] = sharding.replicated(model(ids, use_cache=False).logits, mesh).cpu()
    result["int8_pool_reads"] = _pool_reads(lora, lambda: model(ids, use_cache=False).logits)
    return result


#: The MoE layer whose expert and attention LoRA and expert weights the training steps train (the one before it
#: runs forward only: the backward stops at its output).
MOE_TRAINED_LAYER = "model.layers.1."


def _moe_tenants(model: nn.Module, lora: tl.LoRAModel, inputs: dict) -> dict:
    """The served adapters removed, the tenants of ``inputs["tenants"]`` made with ``create_adapter`` and set to
    the given weights, the trained layer's expert weights unfrozen, the training batch set: (tenant, PEFT key)
    and ("base", expert weight name) -> the parameter."""
    device = torch_xla.device()
    for name in list(lora.adapters()):
        lora.remove(name)
    for attribute, value in inputs["gate"].items():  # e.g. GPT-OSS's clamp limit, as the parent set it
        setattr(lora.layers[MOE_TRAINED_LAYER + "mlp.experts"].base_layer, attribute, value)
    keyed = {}
    for name, (config, weights) in inputs["tenants"].items():
        lora.create_adapter(name, config)
        params = lora.trainable_parameters(name)
        with torch.no_grad():
            for key, value in weights.items():
                params[key].copy_(value.to(device))
        keyed |= {(name, key): param for key, param in params.items()}
    for key, param in model.named_parameters():
        if key.startswith(MOE_TRAINED_LAYER + "mlp.experts."):
            keyed[("base", key.replace(".base_layer", ""))] = param.requires_grad_(True)
    lora.set_batch(inputs["train_batch"])
    torch_xla.sync()  # the parameter copies and the slot writes: graphs of their own
    return keyed


def _step_result(dump_dir: str, loss: torch.Tensor, keyed: dict, grads: tuple) -> dict:
    result = {"collectives": _synced_collectives(dump_dir), "loss": loss.cpu()}
    result["grads"] = {key: grad.cpu() for key, grad in zip(keyed, grads, strict=True)}
    return result


def moe_training_step(
    model: nn.Module, lora: tl.LoRAModel, inputs: dict, dump_dir: str, calls: dict | None = None
) -> dict:
    """One training step of the patched MoE ``model`` on its mesh (lazy mode): tenants with expert and attention
    LoRA (``create_adapter`` with ``target_parameters``/``target_modules``, see :func:`_moe_tenants`) and the
    expert weights of ``MOE_TRAINED_LAYER`` training, the mixed batch's loss sum(logits * loss_weights); the loss,
    the gradients keyed as :func:`_moe_tenants` keys the parameters, and the collectives of the step's compiled
    graph. ``calls``: record the expert backward region's first call for opcheck."""
    keyed = _moe_tenants(model, lora, inputs)
    ops = ("sharded_grouped_matmul_backward",) if calls is not None else ()
    with _capturing_regions({} if calls is None else calls, "moe-train", ops):
        logits = model(inputs["ids"].to(torch_xla.device()), use_cache=False).logits
        loss = (logits * inputs["loss_weights"].to(logits.device)).sum()
        grads = torch.autograd.grad(loss, list(keyed.values()))
    return _step_result(dump_dir, loss, keyed, grads)


def moe_layer_training_step(model: nn.Module, lora: tl.LoRAModel, inputs: dict, dump_dir: str) -> dict:
    """The same tenants' step through the trained layer's experts alone (``ExpertsWithLoRA`` called as the MoE
    block calls it: ``inputs["layer"]``'s hidden states [N, D], requiring grad, top-k experts and weights): the
    loss sum(out * weights), the gradients of the hidden states ("hidden"), of the tenants' expert parameters and
    of the expert weights, and the collectives of the step's graph (the expert regions' and the routing's only)."""
    device = torch_xla.device()
    keyed = _moe_tenants(model, lora, inputs)
    keyed = {key: param for key, param in keyed.items() if ".mlp.experts." in key[1]}
    case = inputs["layer"]
    hidden = case["hidden"].to(device).requires_grad_(True)
    experts = lora.layers[MOE_TRAINED_LAYER + "mlp.experts"]
    out = experts(hidden, case["top_k_index"].to(device), case["top_k_weights"].to(device))
    loss = (out * case["weights"].to(device)).sum()
    grads = torch.autograd.grad(loss, [hidden, *keyed.values()])
    return _step_result(dump_dir, loss, {("hidden", ""): hidden, **keyed}, grads)


def _gpt_oss_expert_parallel(inputs: dict, mesh: xs.Mesh, dump_dir: str) -> dict:
    """A tiny GPT-OSS (transposed expert weights with biases, interleaved clamped gate) expert parallel on
    ``mesh``: its expert weights' placements, the mixed batch's logits (lazy, one forward), and a training step of
    the same model (:func:`moe_training_step`: expert LoRA and the expert weights and biases training)."""
    device = torch_xla.device()
    model = copy.deepcopy(inputs["model"]).to(device).eval()
    lora = tl.patch_model(model, tl.LoRAConfig(max_loras=2, max_rank=8), mesh=mesh, ep_axis="expert")
    _load_all(lora, inputs["adapters"])
    experts = lora.layers["model.layers.0.mlp.experts"].base_layer
    expected = inputs["ep_specs"]
    tensors = {name: getattr(experts, name) for name in expected}
    result = {"specs": {name: _spec(t) for name, t in tensors.items()}}
    result["expected_specs"] = {name: _marked_spec(t, mesh, expected[name]) for name, t in tensors.items()}
    lora.set_batch(inputs["batch"])
    with torch.no_grad():
        result["logits"] = sharding.replicated(model(inputs["ids"].to(device), use_cache=False).logits, mesh).cpu()
    result["training"] = moe_training_step(model, lora, inputs["training"], dump_dir)
    return result


def _serving_compiles(inputs: dict, mesh: xs.Mesh) -> dict:
    """Compilations of the library's serving steps (``serving.Steps``: prefill and decode, compiled) on the mesh
    after their warm-up, over repeated calls; and the control: a compiled step returning the vocabulary-sharded
    logits, whose every host fetch compiles."""
    from torch_xla_lora import serving

    device = torch_xla.device()
    model, lora = _patched_llama(inputs, mesh)
    _load_all(lora, inputs["adapters"])
    steps = serving.Steps(model, rows=2, max_len=16, prefill_len=8, device=device)
    result = {"warmup_compiles": steps.warmup(lora)}
    counter = tl.CompileCounter()
    names = list(inputs["adapters"])
    for call in range(3):
        lora.set_batch([names[call % len(names)]], seq_len=8)
        prefill = steps.prefill([1, 2, 3 + call], row=call % 2)
        lora.set_batch([names[0], None], seq_len=1)
        decode = steps.decode([4, 5 + call], [3, call])
    result["compiles_after_warmup"] = counter.count
    result["shapes"] = (tuple(prefill.shape), tuple(decode.shape))
    raw = torch.compile(lambda ids: model(ids).logits, backend="openxla")
    ids = inputs["ids"].to(device)
    lora.set_batch(inputs["batch"])
    with torch.no_grad():
        raw(ids).cpu()
        counter = tl.CompileCounter()
        for _ in range(2):
            raw(ids).cpu()
    result["sharded_fetch_compiles"] = counter.count
    return result


# -- training on a mesh: gradients through the per-shard regions ------------------------------------

#: The toy's base tensors that the gradient scenario trains along with the slots (the head stays frozen).
TRAINED_BASE = ("embed.weight", "mix.weight", "up.weight", "up.bias", "down.weight")


def _collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(op, operand shape) of every collective of a compiled HLO module, each operand of a combined one apart."""
    found = []
    for op in COLLECTIVES:
        for result in re.findall(rf"= (.*?) {op}(?:-start)?\(", hlo):
            found += [
                (op, tuple(int(d) for d in dims.split(",") if d)) for dims in re.findall(r"\w+\[([\d,]*)\]", result)
            ]
    return sorted(found)


def _synced_collectives(dump_dir: str) -> list[tuple[str, tuple[int, ...]]]:
    """Sync the live tensors; the collectives of the one graph that compiles."""
    before = _graph_files(dump_dir)
    torch_xla.sync()
    files = _graph_files(dump_dir) - before
    if len(files) != 1:
        raise RuntimeError(f"expected one new compiled graph, found {sorted(files)}")
    with open(files.pop()) as f:
        return _collectives(f.read())


def _toy_step(toy: Toy, ids: torch.Tensor, weights: torch.Tensor, targets: list[torch.Tensor]):
    """(loss, d embedding output, d targets) of loss = sum(logits * weights), the embedding output standing for x."""
    embedded = toy.embed(ids)
    logits = toy.head(toy.down(torch.relu(toy.up(toy.mix(embedded)))))
    loss = (logits * weights).sum()
    grads = torch.autograd.grad(loss, [embedded, *targets])
    return loss, grads[0], list(grads[1:])


def _compiled_step(toy: Toy, ids: torch.Tensor, weights: torch.Tensor, targets: list[torch.Tensor]) -> dict:
    """The same loss under ``torch.compile(backend="openxla")``, ``loss.backward()`` into ``targets``' ``.grad``:
    the loss, the gradients, and the graph breaks and dynamo graphs it took."""
    from torch._dynamo.utils import counters

    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    step = torch.compile(lambda ids, weights: (toy(ids) * weights).sum(), backend="openxla")
    for target in targets:
        target.grad = None
    loss = step(ids, weights)
    loss.backward()
    torch_xla.sync()
    return {
        "loss": loss.cpu(),
        "grads": [target.grad.cpu() for target in targets],
        "graph_breaks": sum(counters["graph_break"].values()) - breaks,
        "graphs": counters["stats"]["unique_graphs"] - graphs,
    }


def _refusals(lora: tl.LoRAModel, toy: Toy, ids: torch.Tensor) -> dict[str, str]:
    """The errors of what the mesh refuses in training: a training-mode forward with a trainable adapter that
    has a lora_dropout ("dropout"), and an embedding table that requires grad with scale_grad_by_freq ("freq")."""
    import peft

    errors = dict.fromkeys(("dropout", "freq"), "")
    lora.create_adapter("dropped", peft.LoraConfig(r=2, target_modules=list(TOY_PLAN), lora_dropout=0.1))
    lora.set_batch(["dropped"] * ids.shape[0])
    toy.train()
    try:
        toy(ids)
    except sharding.ShardingError as error:
        errors["dropout"] = str(error)
    finally:
        toy.eval()
    table = toy.embed.base_layer
    table.scale_grad_by_freq = True
    table.weight.requires_grad_(True)
    try:
        toy.embed(ids)
    except sharding.ShardingError as error:
        errors["freq"] = str(error)
    finally:
        table.scale_grad_by_freq = False
        table.weight.requires_grad_(False)
    return errors


def run_grads(inputs: dict) -> dict:
    """Per variant (mesh, dp axis, fully_sharded, base_fusion, trainable): the toy's gradients on the mesh
    for a mixed batch, the slots the batch read, and the collectives of the step's compiled graph; per mesh,
    the collectives of the base model's step (no batch) on the same trained base tensors.

    Without ``trainable``, every slot tensor (``lora_a``/``lora_b`` buffers) and the base tensors of
    ``TRAINED_BASE`` require grad, and the slot contents are returned; with it, the adapters are trainable
    (``load_adapter(trainable=True)``: their parameters reach the regions through ``slot_factors()``)
    and the gradients are those of ``trainable_parameters``, keyed (adapter, PEFT key)."""
    device = torch_xla.device()
    toy_cpu = Toy()
    toy_cpu.load_state_dict(inputs["toy_state"])
    ids, weights = inputs["ids"].to(device), inputs["loss_weights"].to(device)
    result = {"variants": {}, "base_collectives": {}, "region_calls": {}}
    for name, (shape, dp_axis, fully, fusion, trainable) in inputs["variants"].items():
        mesh = _mesh(shape, ("data", "model"))
        config = dataclasses.replace(_toy_config(), max_loras=inputs["max_loras"], base_fusion=fusion)
        toy = copy.deepcopy(toy_cpu).to(device)
        lora = tl.patch_model(toy, config, mesh=mesh, sharding_plan=TOY_PLAN, dp_axis=dp_axis, fully_sharded=fully)
        for adapter, (state_dict, adapter_config) in inputs["adapters"].items():
            lora.load_adapter(adapter, state_dict=state_dict, config=adapter_config, trainable=trainable)
        lora.set_batch(inputs["batch"])
        params = {key.replace(".base_layer", ""): param for key, param in toy.named_parameters()}  # as unpatched
        keyed, factors = {}, []
        if trainable:
            for adapter in inputs["adapters"]:
                keyed |= {(adapter, key): param for key, param in lora.trainable_parameters(adapter).items()}
        else:
            for key, param in params.items():
                param.requires_grad_(key in TRAINED_BASE)
            keyed = {("base", key): params[key] for key in TRAINED_BASE}
            for layer_name, layer in lora.layers.items():
                keyed[("lora_a", layer_name)] = layer.lora_a.requires_grad_(True)
                keyed[("lora_b", layer_name)] = layer.lora_b.requires_grad_(True)
                factors += [layer.lora_a.detach(), layer.lora_b.detach()]
        torch_xla.sync()  # slot writes and sends: graphs of their own
        with _capturing_regions(result["region_calls"], name, inputs["opcheck"].get(name, ())):
            loss, d_embedded, grads = _toy_step(toy, ids, weights, list(keyed.values()))
        variant = {"collectives": _synced_collectives(inputs["dump_dir"]), "slots": lora.context.slots.cpu()}
        # Synced already: each sharded one is gathered to the host by a small graph of its own.
        fetched = [t.cpu() for t in (loss, d_embedded, *grads, *factors)]
        variant |= {"loss": fetched[0], "d_embedded": fetched[1]}
        variant["grads"] = dict(zip(keyed, fetched[2 : 2 + len(keyed)], strict=True))
        pairs = list(zip(fetched[2 + len(keyed) :: 2], fetched[3 + len(keyed) :: 2], strict=True))
        variant["factors"] = dict(zip(lora.layers, pairs, strict=True)) if factors else {}
        if name == inputs.get("compiled_variant"):
            compiled = _compiled_step(toy, ids, weights, list(keyed.values()))
            variant["compiled"] = compiled | {"grads": dict(zip(keyed, compiled["grads"], strict=True))}
        if trainable:
            variant["refusals"] = _refusals(lora, toy, ids)
        key = (shape, dp_axis)
        if not trainable and key not in result["base_collectives"]:  # the same model without a batch: the base alone
            lora.clear_batch()
            # The base alone, data-parallel as the regions make the LoRA step: its ids split over the data axis.
            split = xs.mark_sharding(inputs["ids"].to(device), mesh, (dp_axis, None)).global_tensor
            alive = _toy_step(toy, split, weights, [params[k] for k in TRAINED_BASE])  # a sync runs live tensors only
            result["base_collectives"][key] = _synced_collectives(inputs["dump_dir"])
            del alive
        result["variants"][name] = variant
    calls = result.pop("region_calls")
    # replicated (what a step returns for the host) on a sharded activation: the row layer's input.
    _, row_args = calls[("sharded_row_linear", "dp2xtp2")]
    calls[("replicated", "dp2xtp2")] = (torch.ops.xla_lora.replicated.default, (row_args[0],))
    result["opcheck"] = _opchecks(calls)
    return result


# -- opcheck of the region ops on the arguments a real step passed them ---------------------------

#: Every per-shard region op of ``torch_xla_lora.regions`` and the backward region ops, read from the module so
#: that a region op added there without an opcheck here fails ``test_region_ops_pass_opcheck_on_a_mesh``.
REGION_OPS = tuple(
    name
    for name, obj in vars(regions).items()
    if isinstance(obj, torch.library.CustomOpDef) and not name.startswith("_")
)
#: The expert regions, opchecked on the MoE worker's calls (test_sharding_moe.py); the others in test_sharding.py.
MOE_REGION_OPS = ("sharded_grouped_matmul", "sharded_grouped_matmul_backward")
#: Region ops without a backward: the backward regions (no double backward) and the serving-only pooled regions
#: (a layer reads its pools in place only where autograd records no gradient).
NO_BACKWARD = tuple(name for name in REGION_OPS if name.endswith("_backward") or name.startswith("sharded_pooled"))
#: torch's autograd-registration check is not implemented for XLA tensors ("NYI devices other than
#: CPU/CUDA/XPU"), and a region runs on an SPMD mesh only: the parent checks the registrations instead.
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@contextlib.contextmanager
def _capturing_regions(calls: dict, variant: str, ops: tuple[str, ...]):
    """Record the op and arguments of the first call of each region op of ``ops`` (``torch.ops.xla_lora.<op>``,
    the name the layers and the backward formulas call it by), keyed (op name, ``variant``).

    Arguments of the ops of NO_BACKWARD are recorded detached."""
    namespace = torch.ops.xla_lora
    originals = {name: getattr(namespace, name) for name in ops}

    def recording(name: str, op):
        def call(*args):
            kept = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            calls.setdefault((name, variant), (op.default, kept if name in NO_BACKWARD else args))
            return op(*args)

        return call

    for name, op in originals.items():
        setattr(namespace, name, recording(name, op))
    try:
        yield
    finally:
        for name, op in originals.items():
            setattr(namespace, name, op)


def _opchecks(calls: dict) -> dict:
    """(op name, variant) -> :func:`_opcheck` of the recorded call; and "seconds" -> the time they took."""
    import time

    start = time.perf_counter()
    checks = {call: _opcheck(*calls[call]) for call in calls}
    return checks | {"seconds": time.perf_counter() - start}


def _opcheck(op, args: tuple) -> str:
    """``torch.library.opcheck`` of ``op`` on ``args`` (the checks of OPCHECK_UTILS); "" or its error."""
    try:
        torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)
    except Exception as error:  # reported to the parent, which names the op
        return f"{type(error).__name__}: {error}"[:4000]
    return ""


def main() -> None:
    scenario, workdir = sys.argv[1], sys.argv[2]
    xr.use_spmd()
    inputs = torch.load(os.path.join(workdir, "inputs.pt"), weights_only=False)
    scenarios = {"llama": run_llama, "layers": run_layers, "moe": run_moe_meshes, "grads": run_grads}
    result = scenarios[scenario](inputs)
    result["num_devices"] = xr.global_runtime_device_count()
    torch.save(result, os.path.join(workdir, "result.pt"))


if __name__ == "__main__":
    main()
