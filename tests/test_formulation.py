"""``base_fusion="auto"`` on TPU: each linear layer's formulation chosen by the TPU cost model.

No TPU is needed: the choice is a function of static shapes and the device generation, so the tests
read it with the generation set to a TPU's, and run the one formulation that runs on the CPU device
(the XLA-native backend) through a whole model against PEFT.
"""

import peft
import pytest
import torch
from conftest import assert_close
from test_layers import LLAMA_LORA, gpt2_case, llama_case, logits, patch, peft_logits  # noqa: F401

from torch_xla_lora import formulation, ops
from torch_xla_lora.bench import tpu_model
from torch_xla_lora.formulation import FusionRole


@pytest.mark.parametrize("chip", ["v5e", "v6e"])
@pytest.mark.parametrize("num_tokens", [8, 64, 1024, 4096])
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_choice_is_the_cheapest_formulation_of_the_model(chip, num_tokens, int8):
    """Every Llama-3-8B projection: the chosen formulation's modelled cost is the least of the three
    (a chooser that ignored the layer's role, or the token count, would pick a dearer one somewhere in
    this grid: the model's own table has fused, separate and XLA-native winners), on a float and on an
    int8 per-channel base (a chooser pricing the int8 base as bf16 picks the fused kernel where the
    separate op is cheaper, e.g. v6e decode of q_proj)."""
    seen = set()
    for name, (residual, share) in tpu_model.llama_roles().items():
        hidden, out_dim, _ = tpu_model.LLAMA3_8B_LAYER[name]
        role = FusionRole(residual, share)
        choice = formulation.choose(chip, num_tokens, hidden, out_dim, 16, 64, False, role, int8_weight=int8)
        indices = tpu_model.contiguous_requests(num_tokens, 64, min(64, num_tokens, 8))
        costs = tpu_model.projection_costs(
            tpu_model.CHIPS[chip], indices, hidden, out_dim, 16, 64, residual, share, int8_weight=int8
        )
        priced = {"fused": costs["fused"], "separate": costs["separate"], "xla": costs["xla_native"]}
        assert priced[choice] == min(priced.values()), (name, choice, priced)
        seen.add(choice)
    assert "fused" in seen


#: (chip, T, in, out, R, L, int8 pool): cells where a pooled layer's cheapest formulation is not the padded one's.
POOLED_CELLS = [
    ("v5e", 512, 4096, 4096, 128, 16, False),  # the pooled kernel does not run it: separate gathers every lane
    ("v5e", 512, 4096, 14336, 64, 16, True),  # int8 pages: the pooled kernel reads half the bytes
    ("v6e", 8, 1024, 1024, 16, 64, True),  # a decode of a small projection: the pooled kernel's int8 pages
]


@pytest.mark.parametrize("cell", POOLED_CELLS, ids=lambda c: "-".join(map(str, c)))
def test_a_pooled_layer_is_priced_as_it_reads_its_pool(cell):
    """A layer reading a rank-true pool (``memory_budget``) is priced as it runs each formulation
    (``tpu_model.PoolSpec``: the one-pass kernel on the pool's pages, ``pooled_shrink_expand`` by its kernel or,
    where that does not run the shape, its lanes gathered into slots; int8 rows at a byte): its choice is the
    cheapest of that model, and in these cells differs from the padded slots' (a chooser pricing the pool as
    padded slots, as before, picks a dearer formulation there)."""
    chip, tokens, hidden, out_dim, rank, slots, int8 = cell
    role, rows = FusionRole(input_share=1 / 3), 20000
    padded = formulation.choose(chip, tokens, hidden, out_dim, rank, slots, False, role)
    pooled = formulation.choose(chip, tokens, hidden, out_dim, rank, slots, False, role, pool=(int8, rows))
    indices = tpu_model.contiguous_requests(tokens, slots, min(slots, tokens, 8))
    pool = tpu_model.PoolSpec((rank,) * slots, int8, rows)
    costs = tpu_model.projection_costs(
        tpu_model.CHIPS[chip], indices, hidden, out_dim, rank, slots, False, 1 / 3, pool=pool
    )
    priced = {"fused": costs["fused"], "separate": costs["separate"], "xla": costs["xla_native"]}
    assert priced[pooled] == min(priced.values()), priced
    assert pooled != padded


def test_the_choice_depends_on_role_and_token_count():
    """The cases the model's table shows: at prefill on v6e the fused kernel wins for q_proj; at 4096
    tokens down_proj, which adds to the residual stream, goes XLA-native (a Pallas call would make the
    residual add and SiLU(gate) * up passes of their own); at decode down_proj runs the separate op."""
    residual_mlp = FusionRole(residual_output=True, input_share=1.0)
    assert formulation.choose("v6e", 1024, 4096, 4096, 16, 64, False, FusionRole(input_share=1 / 3)) == "fused"
    assert formulation.choose("v6e", 4096, 14336, 4096, 16, 64, False, residual_mlp) == "xla"
    assert formulation.choose("v6e", 8, 14336, 4096, 16, 64, False, residual_mlp) == "separate"
    # Without the residual pass and the materialised input, the fused kernel is the cheapest there too.
    assert formulation.choose("v6e", 4096, 14336, 4096, 16, 64, False, FusionRole(input_share=0.0)) == "fused"
    # An int8 base: the fused kernel converts the int8 tile in column chunks, so its plan takes the bf16
    # base's tiles and steps, and at v6e decode q_proj stays fused (when the whole tile's f32 and bf16 copies
    # were counted, its plan took twice the steps and the separate op was the cheaper one).
    q_role = FusionRole(input_share=1 / 3)
    assert formulation.choose("v6e", 8, 4096, 4096, 16, 16, False, q_role) == "fused"
    assert formulation.choose("v6e", 8, 4096, 4096, 16, 16, False, q_role, int8_weight=True) == "fused"


def test_a_training_call_is_chosen_by_its_forward_and_backward():
    """``choose(training=True)`` takes the formulation of least training cost by the TPU training model
    (``tpu_train_model.projection_train_costs``: the forward as training runs it, then dx, ds and dB), which can
    differ from the serving choice: the bench Llama's down_proj at T = 8192 on v6e goes XLA-native to serve but
    trains on ``linear_lora`` (its backward's one pass over g gives dx, ds and dB, where the XLA-native forward's
    backward pays dx's expand and a pass over g of its own); checked against the model's parts summed here. A
    pooled training call is refused (trainable adapters hold no pool rows)."""
    from torch_xla_lora.bench import tpu_train_model

    role = FusionRole(residual_output=True, input_share=1.0)
    args = ("v6e", 8192, 5632, 2048, 64, 8, False, role)
    assert formulation.choose(*args) == "xla"
    assert formulation.choose(*args, training=True) == "fused"
    chip, indices = tpu_model.CHIPS["v6e"], tpu_model.contiguous_requests(8192, 8, 8)
    forward = tpu_model.projection_costs(chip, indices, 5632, 2048, 64, 8, True, 1.0)
    base_backward = tpu_model.matmul_cost(chip, 8192, 2048, 5632).seconds
    kept = tpu_model.fused_base_cost(chip, indices, 5632, 2048, 64, 8, keep_s=True).seconds
    serving = tpu_model.fused_base_cost(chip, indices, 5632, 2048, 64, 8).seconds
    one_pass = tpu_model.fused_base_cost(chip, indices, 2048, 5632, 64, 8, "in_out", keep_s=True, a_grad=True)
    fused = forward["fused"] + kept - serving + one_pass.seconds - base_backward
    dx = tpu_train_model.expand_seconds(chip, indices, 64, 5632, 8)  # ds A, added to the base's dx
    g_pass = tpu_train_model.g_pass_kernel_cost(chip, indices, 64, 2048, 8).seconds
    xla = forward["xla_native"] + dx + g_pass
    assert fused < xla and forward["xla_native"] < forward["fused"]
    with pytest.raises(ValueError, match="pool"):
        formulation.choose(*args, pool=(False, 1000), training=True)


def test_roles_of_llama_and_gpt2_layers(llama_case, gpt2_case, xla_device):  # noqa: F811
    """q/k/v share the norm's output (1/3 each), gate/up (1/2); o_proj adds to the residual stream from
    attention's output (nothing to materialise), down_proj from SiLU(gate) * up; GPT-2's two c_proj are
    told apart by their parent module."""
    model, _ = patch(llama_case, xla_device, **LLAMA_LORA)
    layer = model.model.layers[0]
    roles = {name: getattr(layer.self_attn, name).fusion_role for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    roles |= {name: getattr(layer.mlp, name).fusion_role for name in ("gate_proj", "up_proj", "down_proj")}
    assert roles["q_proj"] == roles["k_proj"] == roles["v_proj"] == FusionRole(False, 1 / 3)
    assert roles["gate_proj"] == roles["up_proj"] == FusionRole(False, 1 / 2)
    assert roles["o_proj"] == FusionRole(True, 0.0)
    assert roles["down_proj"] == FusionRole(True, 1.0)
    gpt2, _ = patch(gpt2_case, xla_device, max_loras=2, max_rank=8, target_modules=["c_attn", "c_proj", "c_fc"])
    block = gpt2.transformer.h[0]
    assert block.attn.c_attn.fusion_role == FusionRole(False, 1.0)
    assert block.attn.c_proj.fusion_role == FusionRole(True, 0.0)
    assert block.mlp.c_proj.fusion_role == FusionRole(True, 1.0)


def test_layer_asks_the_model_on_tpu_and_keeps_today_s_rules_elsewhere(llama_case, xla_device, monkeypatch):  # noqa: F811
    model, _ = patch(llama_case, xla_device, **LLAMA_LORA)
    down = model.model.layers[0].mlp.down_proj
    x = torch.zeros(3, 5, down.in_features, device=xla_device)
    generation = ops.device_generation()
    if generation == "cpu":  # off TPU: the separate op, and no choice recorded
        assert down.base_fusion == "auto" and down.formulation(x) == "separate"
        assert down.formulations == {}
    else:  # on a TPU host: the model's choice for this device
        role = down.fusion_role
        expected = formulation.choose(generation, 15, down.in_features, down.out_features, 64, 4, False, role)
        assert down.formulation(x) == expected and down.formulations == {15: expected}
    monkeypatch.setattr(ops, "device_generation", lambda: "v6e")
    expected = formulation.choose("v6e", 15, down.in_features, down.out_features, 64, 4, False, down.fusion_role)
    assert down.formulation(x) == expected and down.formulations == {15: expected}
    assert down.formulation(x.cpu()) == "separate"  # CPU tensors run the reference
    down.base_fusion = True
    assert down.formulation(x) == "fused"
    down.base_fusion, down.backend = "auto", "xla"
    assert down.formulation(x) == "fused"  # an explicit backend keeps today's rule: fused on TPU
    down.base_fusion = False
    assert down.formulation(x) == "separate"


def test_xla_formulation_through_a_model_equals_peft(llama_case, xla_device, monkeypatch, capsys):  # noqa: F811
    """Every layer told to run "xla" (as the model chooses for o/down at long prefill) computes PEFT's
    mixed batch through the XLA-native backend, and warm-up prints the choice per layer."""
    model, lora = patch(llama_case, xla_device, **LLAMA_LORA)
    monkeypatch.setattr(ops, "device_generation", lambda: "v6e")
    calls = []

    def choose(*args, **kwargs):
        calls.append(args)
        return "xla"

    monkeypatch.setattr(formulation, "choose", choose)
    mix = ["a0", None, "a1", "a2"]
    lora.set_batch(mix)
    assert_close(logits(model, llama_case.inputs), peft_logits(llama_case, mix))
    assert len(calls) == 14  # 7 projections x 2 layers, each asked once
    lora.warmup([2], [3], progress=True)
    assert "xla: q_proj x2, k_proj x2, v_proj x2, o_proj x2, gate_proj x2, up_proj x2, down_proj x2" in (
        capsys.readouterr().out
    )


def test_choice_under_torch_compile_is_a_constant(llama_case, xla_device, monkeypatch):  # noqa: F811
    """Dynamo takes the choice as a constant: one graph, no break. Tracing into the cost model (numpy,
    argsort, data-dependent loops) broke the graph 27 times."""
    model, _ = patch(llama_case, xla_device, **LLAMA_LORA)
    layer = model.model.layers[0].mlp.down_proj
    monkeypatch.setattr(ops, "device_generation", lambda: "v6e")

    def step(x):
        return x + (1.0 if layer.formulation(x) == "fused" else 2.0)

    explained = torch._dynamo.explain(step)(torch.zeros(6, layer.in_features, device=xla_device))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert list(layer.formulations) == [6]


def test_a_training_call_is_priced_as_it_runs(llama_case, xla_device, monkeypatch):  # noqa: F811
    """An arranged decoder's down_proj takes SiLU(gate) * up into its kernel when serving and in training; gate_proj
    takes the post-attention norm in when serving, and in training where gate and up train as a group (x needing a
    gradient: ``layers/shared_input.py`` takes the norm into the group's kernels), not where x needs none (no
    group: the norm computed outside): each call's formulation is priced with what it takes in (down's residual
    add in both), and the training call by its backward too (``training=True``)."""
    monkeypatch.setattr(ops, "device_generation", lambda: "v6e")
    model, lora = patch(llama_case, xla_device, **LLAMA_LORA)  # base_fusion="auto" on a "TPU": arranged
    lora.create_adapter("t", peft.LoraConfig(r=8, target_modules="all-linear"))
    mlp = model.model.layers[0].mlp
    down, gate = mlp.down_proj, mlp.gate_proj
    assert down.fusion_role.prologue == "silu_mul" and down.fusion_role.residual_in_kernel
    assert gate.fusion_role.prologue == "norm"
    roles, trained, choose = [], [], formulation.choose

    def spy(*args, **kwargs):
        roles.append(args[7])
        trained.append(kwargs)
        return choose(*args, **kwargs)

    monkeypatch.setattr(formulation, "choose", spy)
    for layer in (down, gate):
        x = torch.zeros(3, 5, layer.in_features, device=xla_device)
        with torch.no_grad():
            layer.formulation(x)
        layer.formulation(x)  # gradients recorded for the trainable adapter: a training call, x needing none
        layer.formulation(x.requires_grad_())  # and x needing a gradient
    assert [role.prologue for role in roles] == ["silu_mul"] * 3 + ["norm", "", "norm"]
    assert all(role == down.fusion_role for role in roles[:3])
    assert [kwargs.get("training") for kwargs in trained] == [False, True, True] * 2


def test_serving_and_training_calls_keep_their_own_record(llama_case, xla_device, monkeypatch):  # noqa: F811
    """A token count's serving and training calls may choose differently (the bench Llama's down_proj at 8192
    tokens: "xla" serving, "fused" in training, above): each is kept in its own record, and warm-up prints the
    record of the calls it ran."""
    monkeypatch.setattr(ops, "device_generation", lambda: "v6e")
    model, lora = patch(llama_case, xla_device, **LLAMA_LORA)
    lora.create_adapter("t", peft.LoraConfig(r=8, target_modules="all-linear"))
    monkeypatch.setattr(formulation, "choose", lambda *args, training=False, **kwargs: "fused" if training else "xla")
    down = model.model.layers[0].mlp.down_proj
    x = torch.zeros(3, 5, down.in_features, device=xla_device)
    with torch.no_grad():
        assert down.formulation(x) == "xla"
    assert down.formulation(x) == "fused"  # gradients recorded for the trainable adapter: a training call
    assert down.formulations == {15: "xla"} and down.training_formulations == {15: "fused"}
    assert lora._formulation_summary(15) == "; xla: down_proj x1"  # what warm-up prints after a bucket
    assert lora._formulation_summary(15, training=True) == "; fused: down_proj x1"


@pytest.mark.parametrize("weight_dtype", [None, "int8"])
def test_a_pooled_layer_hands_the_chooser_its_pool(llama_case, xla_device, monkeypatch, weight_dtype):  # noqa: F811
    """With ``memory_budget`` every projection asks the chooser with its pool (int8 or not, its data rows), so the
    choice prices what the layer reads, with gradients recorded for x too (the pooled ops' backward), its
    producer then priced outside the kernel, as the call declines it; a call that gathers its lanes into slots (a
    trainable adapter's layer) is priced as padded slots, as it runs."""
    monkeypatch.setattr(ops, "device_generation", lambda: "v6e")  # (first: the pools take the TPU kernel's pages)
    config = {**LLAMA_LORA, "memory_budget": 2_000_000, "weight_dtype": weight_dtype}
    model, lora = patch(llama_case, xla_device, **config)
    pools, choose = [], formulation.choose

    def spy(*args, **kwargs):
        pools.append(kwargs.get("pool"))
        return choose(*args, **kwargs)

    monkeypatch.setattr(formulation, "choose", spy)
    projections = [layer for name, layer in lora.layers.items() if not name.endswith(("lm_head", "embed_tokens"))]
    x = torch.zeros(2, 3, projections[0].in_features, device=xla_device)
    for layer in projections:
        with torch.no_grad():
            layer.formulation(torch.zeros(6, layer.in_features, device=xla_device))
    assert pools == [(weight_dtype == "int8", lora.manager.rows)] * len(projections)
    q = model.model.layers[0].self_attn.q_proj
    assert q.fusion_role.prologue == "norm"  # the arranged decoder: q takes its norm in when serving
    roles = []
    monkeypatch.setattr(formulation, "choose", lambda *args, **kwargs: roles.append(args[7]) or spy(*args, **kwargs))
    q.formulation(x.requires_grad_())
    assert pools[-1] == (weight_dtype == "int8", lora.manager.rows) and roles[-1].prologue == ""
    lora.create_adapter("t", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    q.formulation(x)
    assert pools[-1] is None  # its lane holds no rows: the layer gathers into slots
