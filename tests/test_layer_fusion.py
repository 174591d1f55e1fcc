"""x's producer and the residual add taken into ``linear_lora``'s kernel: the op, its kernel, and the
Llama-family decoder layers arranged to use it (``torch_xla_lora/layers/fusion.py``).

References are plain float64 torch (the op) and PEFT's own forward with ``adapter_names`` (the models).
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import assert_close, tiny_llama
from test_layers import LLAMA_LORA, make_case, patch, peft_logits, token_ids

import torch_xla_lora as tl
from torch_xla_lora import formulation
from torch_xla_lora.bench import tpu_model
from torch_xla_lora.kernels import fused_base, visits
from torch_xla_lora.kernels.block_sizes import BlockSizes
from torch_xla_lora.layers import fusion
from torch_xla_lora.layers.linear import LinearWithLoRA
from torch_xla_lora.ops import _linear_fused


def _expected(x, w, b, a, lb, idx, scaling, up=None, row_scale=None, col_scale=None, residual=None):
    """float64: x = SiLU(x) * up, * row, * col; x W^T + b + scaling (x A_i^T) B_i + residual."""
    x = x.double()
    if up is not None:
        x = F.silu(x) * up.double()
    if row_scale is not None:
        x = x * row_scale.double()[:, None]
    if col_scale is not None:
        x = x * col_scale.double()
    out = x @ w.double().T
    out = out + (0 if b is None else b.double()) + (0 if residual is None else residual.double())
    for t, slot in enumerate(idx.tolist()):
        if 0 <= slot < a.shape[0]:
            out[t] += scaling * (x[t] @ a[slot].double().T) @ lb[slot].double()
    return out


def _operands(num_tokens, hidden, out_dim, rank, num_slots, dtype, bias, fused, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x, w = randn(num_tokens, hidden), randn(out_dim, hidden, scale=1 / math.sqrt(hidden))
    a, lb = randn(num_slots, rank, hidden, scale=1 / math.sqrt(hidden)), randn(num_slots, rank, out_dim, scale=0.5)
    b = randn(out_dim) if bias else None
    idx = torch.randint(-1, num_slots + 1, (num_tokens,), generator=g, dtype=torch.int32)
    extra = {}
    if fused == "mlp":  # down_proj: SiLU(gate) * up, the residual stream added
        extra = {"up": randn(num_tokens, hidden), "residual": randn(num_tokens, out_dim)}
    elif fused == "norm":  # gate/up: RMSNorm's factors
        extra = {
            "row_scale": torch.rand(num_tokens, generator=g) + 0.5,
            "col_scale": randn(hidden),
        }
    return (x, w, b, a, lb, idx), extra


OP_CASES = [  # (T, K, N, L, dtype, bias, fused, backend)
    (40, 256, 128, 4, torch.float32, True, "mlp", "pallas"),  # two token blocks, a residual, a bias
    (40, 256, 128, 4, torch.float32, True, "mlp", "xla"),
    (24, 256, 384, 6, torch.float32, False, "norm", "xla"),  # the norm's factors (the kernel's: below)
    (48, 256, 128, 4, torch.bfloat16, False, "mlp", "pallas"),  # bf16: SiLU and the product rounded as transformers
]


@pytest.mark.parametrize("case", OP_CASES)
def test_op_matches_float64(case, xla_device):
    """Both backends (pallas: the kernel in interpret mode) against float64 math; catches a prologue the
    shrink does not read, a residual left out or added twice, scales applied on the wrong axis."""
    num_tokens, hidden, out_dim, num_slots, dtype, bias, fused, backend = case
    args, extra = _operands(num_tokens, hidden, out_dim, 8, num_slots, dtype, bias, fused)
    moved = [None if t is None else t.to(xla_device) for t in args]
    out = _linear_fused.linear_lora_fused(
        *moved, 0.5, "out_in", backend, **{k: v.to(xla_device) for k, v in extra.items()}
    ).cpu()
    assert out.dtype == dtype
    assert_close(out, _expected(*args, 0.5, **extra), dtype)


@pytest.mark.parametrize("keep_s", [False, True])
def test_kernel_with_every_fusion_and_tiled_reduction(keep_s):
    """All four fusions at once over two reduction and three output tiles: the x tile is transformed at
    every k and the residual added once per output tile (the jnp kernel, no torch). The training kernel
    (``keep_s``) gives the same output, each token's shrink, and x as the prologue made it: its tiles written
    at the first output tile and kept (the later output tiles rewrite the last one) over four token blocks."""
    rng = np.random.default_rng(0)
    num_tokens, hidden, out_dim, rank, num_slots, lanes = 32, 256, 384, 8, 6, 4

    def arr(*shape, scale=1.0):
        return rng.standard_normal(shape) * scale

    x, up, w = arr(num_tokens, hidden), arr(num_tokens, hidden), arr(out_dim, hidden, scale=1 / 16)
    a, lb = arr(num_slots, rank, hidden, scale=1 / 16), arr(num_slots, rank, out_dim, scale=0.5)
    row, col, res = rng.uniform(0.5, 1.5, num_tokens), arr(hidden), arr(num_tokens, out_dim)
    idx = rng.integers(-1, num_slots + 1, num_tokens).astype(np.int32)
    idx[8:16] = 2
    meta = visits.build_lanes(visits.valid_slots(jnp.asarray(idx), num_slots), num_slots, 8, lanes)

    def f32(v):
        return jnp.asarray(v, jnp.float32)

    outputs = fused_base.linear_lora(
        f32(x),
        f32(w),
        None,
        f32(a),
        f32(lb),
        meta,
        scaling=0.5,
        block_sizes=BlockSizes(tokens=8, hidden=128, out=128),
        lanes=lanes,
        layout="out_in",
        interpret=True,
        up=f32(up),
        row_scale=f32(row),
        col_scale=f32(col),
        residual=f32(res),
        keep_s=keep_s,
    )
    out = outputs[0] if keep_s else outputs
    t = torch.from_numpy
    expected = _expected(t(x), t(w), None, t(a), t(lb), t(idx), 0.5, t(up), t(row), t(col), t(res))
    assert_close(torch.from_numpy(np.array(out)), expected, torch.float32)
    if keep_s:
        _, s, x_kept = outputs
        x_in = F.silu(t(x)) * t(up) * t(row)[:, None] * t(col)  # float64
        assert x_kept.shape == (num_tokens, hidden) and x_kept.dtype == jnp.float32
        assert_close(torch.from_numpy(np.array(x_kept)), x_in, torch.float32)
        own = (idx >= 0) & (idx < num_slots)
        shrink = 0.5 * torch.einsum("tk,trk->tr", x_in, t(a)[np.where(own, idx, 0)]) * t(own)[:, None]
        assert_close(torch.from_numpy(np.array(s)), shrink, torch.float32)


def test_gradients_equal_plain_torch():
    """The op's backward (CPU tensors) against autograd through the same math written in torch."""
    args, extra = _operands(12, 32, 16, 4, 3, torch.float64, True, "mlp", seed=3)
    x, w, b, a, lb, idx = args
    leaves = [t.clone().requires_grad_() for t in (x, extra["up"], lb, extra["residual"])]
    out = _linear_fused.linear_lora_fused(leaves[0], w, b, a, leaves[2], idx, 0.5, up=leaves[1], residual=leaves[3])
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    plain = [t.clone().requires_grad_() for t in (x, extra["up"], lb, extra["residual"])]
    expected = _expected(plain[0], w, b, a, plain[2], idx, 0.5, up=plain[1], residual=plain[3])
    (expected * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    for got, want in zip(leaves, plain, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_group_norm_gradients_equal_autograd_through_the_rmsnorm(dtype):
    """The norm a training group takes into its kernels (``layers/shared_input.py``) is differentiated by hand
    (``_norm_grads``: d h through the product, d row factor, d weight; the row factor's own graph back to h is
    autograd's, as the arranged decoder computes it in torch): together equal to autograd through transformers'
    RMSNorm (float32 to summation order; bfloat16 within its rounding, the two rounding the sum of h's two paths at
    different points)."""
    from torch_xla_lora.layers import shared_input

    generator = torch.Generator().manual_seed(11)
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=generator) + 0.5)
    h = (3 * torch.randn(10, 48, generator=generator)).to(dtype).requires_grad_()
    grad = torch.randn(10, 48, generator=generator).to(dtype)
    expected_h, expected_weight = torch.autograd.grad(norm(h), [h, norm.weight], grad)
    row = torch.rsqrt(h.float().pow(2).mean(-1) + norm.variance_epsilon)  # as fusion._Norm computes it
    d_h, d_row, d_weight = shared_input._norm_grads(grad, h.detach(), row.detach(), norm.weight.detach())
    (through_row,) = torch.autograd.grad(row, h, d_row)
    assert d_h.dtype == dtype and d_row.dtype == torch.float32 and d_weight.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close((d_h + through_row).float(), expected_h.float(), **tolerance)
    torch.testing.assert_close(d_weight.float(), expected_weight.float(), **tolerance)


def test_rejects_a_fusion_operand_of_wrong_shape():
    args, extra = _operands(6, 32, 16, 4, 2, torch.float32, False, "mlp")
    with pytest.raises(tl.ShapeError, match="up must be"):
        _linear_fused.linear_lora_fused(*args, up=extra["up"][:, :8])


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "out_dim", "fusion_kind"),
    [
        (1024, 14336, 4096, fused_base.Fusion(silu_mul=True, residual=True)),  # Llama-3-8B down_proj, prefill
        (8, 4096, 14336, fused_base.Fusion(row_scale=True, col_scale=True)),  # gate/up at decode
    ],
    ids=["down_prefill", "gate_decode"],
)
def test_fused_variants_lower_to_mosaic(num_tokens, hidden, out_dim, fusion_kind, generation):
    import jax
    from jax import export as jax_export

    fn, args = fused_base.tpu_compile_case(
        num_tokens, hidden, out_dim, 16, 8, jnp.bfloat16, generation, fusion=fusion_kind
    )
    assert "tpu_custom_call" in jax_export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


# --- decoder layers ---------------------------------------------------------------------------------------------

FAMILIES = {
    "llama": lambda: tiny_llama(seed=5),
    "qwen2": lambda: _random(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": lambda: _random(transformers.MistralConfig, transformers.MistralForCausalLM),
}
SPECS = {"d0": {"r": 8, "lora_alpha": 16}, "d1": {"r": 4, "lora_alpha": 4, "use_rslora": True}}


def _random(config_cls, model_cls):
    torch.manual_seed(7)
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return model_cls(config).eval()


MIX = ["d0", None, "d1"]  # base rows between two adapters' rows
# What each fused call takes in, per decoder layer: q, k, v (the input norm's factors), o (the attention's
# residual), gate, up (the post-attention norm's factors), down (SiLU(gate) * up and the MLP's residual).
NORM, RESIDUAL, SILU_MUL = ("col_scale", "row_scale"), ("residual",), ("residual", "up")
ARRANGED = [NORM, NORM, NORM, RESIDUAL, NORM, NORM, SILU_MUL]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """family -> its Case (a random model, PEFT holding SPECS, ids [3, 5]), built once per module."""
    made = {}

    def case(family: str):
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            made[family] = make_case(FAMILIES[family](), SPECS, path, token_ids(3, 5))
        return made[family]

    return case


@pytest.fixture
def fused_calls(monkeypatch) -> list[tuple[str, ...]]:
    """The fusion operands (by name) of every linear_lora_fused call made while the test runs (traced, under
    torch.compile)."""
    calls = []
    op = _linear_fused.linear_lora_fused

    def spy(*args, **kwargs):
        names = ("up", "row_scale", "col_scale", "residual")
        calls.append(tuple(sorted(k for k in names if kwargs.get(k) is not None)))
        return op(*args, **kwargs)

    monkeypatch.setattr(_linear_fused, "linear_lora_fused", spy)
    return calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_layers_take_norms_silu_and_residuals_into_the_op(family, cases, fused_calls):
    """On CPU tensors (the op's reference path): the patched decoder equals PEFT's mixed batch; q/k/v and gate/up
    run with their norm's factors, o_proj with the attention's residual, down with SiLU * up and the MLP's
    residual; and unpatch restores the forwards. A decoder left on transformers' forward makes no fused call;
    one that drops a norm or adds a residual twice differs from PEFT. With k_proj and o_proj of the first
    layer on the separate formulation, k reads the normed tensor and the decoder adds the residual itself."""
    case = cases(family)
    model, lora = patch(case, torch.device("cpu"), max_loras=2, max_rank=8, base_fusion=True)
    decoders = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert lora.fused_decoders == decoders and len(decoders) == 2
    lora.set_batch(MIX)
    with torch.no_grad():
        out = model(case.inputs).logits
    assert_close(out, peft_logits(case, MIX))
    assert fused_calls == ARRANGED * 2
    attn = decoders[0].self_attn
    attn.k_proj.base_fusion = attn.o_proj.base_fusion = False
    fused_calls.clear()
    with torch.no_grad():
        assert_close(model(case.inputs).logits, peft_logits(case, MIX))
    assert fused_calls == [NORM, NORM, NORM, NORM, SILU_MUL] + ARRANGED
    assert all(m.pending is None for m in model.modules() if isinstance(m, LinearWithLoRA))
    lora.unpatch()
    assert all("forward" not in vars(m) for m in decoders)
    with torch.no_grad():
        assert torch.equal(model(case.inputs).logits, case.clean(case.inputs).logits)


@pytest.mark.parametrize(("family", "mode"), [("llama", "lazy"), ("qwen2", "compile")])
def test_arranged_decoders_on_the_xla_device_equal_peft(family, mode, cases, fused_calls, xla_device):
    """The XLA device, lazy and under torch.compile(openxla) (Qwen2: q/k/v with biases): PEFT's mixed batch,
    and every q/k/v takes the input norm in and o_proj the residual. Under dynamo the pending calls are traced:
    the normed tensor's identity survives tracing (else q/k/v would read it: no norm factors in their calls),
    in one graph with no break, and no projection is left with a pending call. Lazily, the output's graph holds
    one rsqrt per norm (each arranged norm's row factor, and the final norm's): a normed tensor that some
    projection still read would add its own."""
    import torch_xla
    from torch._dynamo.utils import counters

    case = cases(family)
    model, lora = patch(case, xla_device, max_loras=2, max_rank=8, base_fusion=True)

    def step(ids):
        return model(ids).logits

    if mode == "compile":
        counters.clear()
        step = torch.compile(step, backend="openxla")
    lora.set_batch(MIX)
    with torch.no_grad():
        out = step(case.inputs.to(xla_device))
    if mode == "lazy":
        assert torch_xla._XLAC._get_xla_tensors_text([out]).count("aten::rsqrt") == 2 * 2 + 1
    assert_close(out.cpu(), peft_logits(case, MIX))
    assert fused_calls == ARRANGED * 2
    if mode == "compile":
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert all(m.pending is None for m in model.modules() if isinstance(m, LinearWithLoRA))


def test_default_base_fusion_off_tpu_leaves_the_decoders_alone(xla_device):
    """base_fusion="auto" never runs the fused formulation off a TPU: the model keeps its own forwards there
    (a CPU-device model on any host; an XLA device unless it is a TPU)."""
    import torch_xla.runtime as xr

    model = tiny_llama(seed=5)
    assert fusion.wanted("auto", torch.device("cpu")) is False
    assert fusion.wanted(False, xla_device) is False
    assert fusion.wanted("auto", xla_device) == (xr.device_type() == "TPU")
    lora = tl.patch_model(model, tl.LoRAConfig(**LLAMA_LORA))
    assert lora.fused_decoders == []
    assert all("forward" not in vars(m) for m in model.modules())


# --- the cost model -----------------------------------------------------------------------------------------

CHIP = tpu_model.Chip("test", "v6e", hbm_bytes_per_s=1e9, peak_flops=1e12, mxu_width=256, step_overhead_s=1e-6)


@pytest.mark.parametrize(
    ("prologue", "residual", "extra_bytes"), [("silu_mul", True, 2 * 256 * 256 * 2), ("norm", False, 256 * 4 + 256 * 2)]
)
def test_cost_model_prices_what_the_kernel_takes_in(prologue, residual, extra_bytes):
    """One grid step (T = K = N = 256): the walk reads exactly the fusion's operands more (up and the residual
    tile; the row and column factors), and the fused formulation is charged no pass for what it took in, while
    the separate one still is."""
    indices = np.zeros(256, np.int32)
    plain = tpu_model.fused_base_cost(CHIP, indices, 256, 256, rank=16, num_slots=1)
    taken = tpu_model.fused_base_cost(CHIP, indices, 256, 256, 16, 1, prologue=prologue, residual=residual)
    assert taken.steps == plain.steps == 1
    assert taken.pipelined_bytes - plain.pipelined_bytes == extra_bytes
    operands = 2 if prologue == "silu_mul" else 1  # x's producer's [T, K] inputs: gate and up, or the norm's input
    unarranged = tpu_model.projection_costs(CHIP, indices, 256, 256, 16, 1, True, 1.0, operands=operands)
    arranged = tpu_model.projection_costs(CHIP, indices, 256, 256, 16, 1, True, 1.0, False, prologue, residual)
    assert arranged["fused"] == pytest.approx(taken.seconds + (0 if residual else 2 * 256 * 256 * 2 / 1e9))
    passes = (operands * 256 * 256 * 2 + 2 * 256 * 256 * 2) / 1e9
    assert unarranged["fused"] == pytest.approx(plain.seconds + passes)
    assert arranged["separate"] == unarranged["separate"]


def test_the_training_kernel_writes_the_kept_x_once():
    """The training kernel with a prologue writes x once: over a grid of several token blocks, output tiles and
    reduction tiles, the walk of its BlockSpecs (each block moved when its index changes, as the pipeline moves it)
    counts x's [T, K] and s's [T, R] writes more than the serving kernel's, not x once per output tile; the
    kernel's declared traffic (``hbm_bytes``, which libtpu reads) agrees, and its plan makes room for the block."""
    num_tokens, hidden, out_dim, rank = 4096, 14336, 8192, 64  # 4 token blocks, 2 output tiles, 8 reduction tiles
    indices = np.arange(num_tokens, dtype=np.int32) // 512 % 8
    chip = tpu_model.CHIPS["v6e"]
    args = (chip, indices, hidden, out_dim, rank, 8)
    serving = tpu_model.fused_base_cost(*args, prologue="silu_mul", residual=True)
    training = tpu_model.fused_base_cost(*args, prologue="silu_mul", residual=True, keep_s=True)
    plain_training = tpu_model.fused_base_cost(*args, residual=True, keep_s=True)
    plain_serving = tpu_model.fused_base_cost(*args, residual=True)
    sizes, _ = fused_base.plan(num_tokens, hidden, out_dim, rank, 8, jnp.bfloat16, "v6e", False,
                               fused_base.Fusion(silu_mul=True, residual=True), True)  # fmt: skip
    assert sizes.out < out_dim and sizes.hidden < hidden and sizes.tokens < num_tokens  # several tiles of each
    kept = 2 * num_tokens * (hidden + rank)
    assert training.pipelined_bytes - serving.pipelined_bytes == kept
    assert plain_training.pipelined_bytes - plain_serving.pipelined_bytes == 2 * num_tokens * rank  # no x kept
    fusion = fused_base.Fusion(silu_mul=True, residual=True)
    declared = fused_base.hbm_bytes(
        num_tokens, hidden, out_dim, sizes, 2, fusion, rank, fused_base.keeps_x(fusion, True)
    )
    assert declared - fused_base.hbm_bytes(num_tokens, hidden, out_dim, sizes, 2, fusion) == kept


def test_auto_prices_the_arranged_projections(cases):
    """The decoder arrangement marks gate/up (the norm) and down (SiLU * up, the residual) for the chooser, which
    then picks the cheapest of the model's arranged costs; unpatch unmarks them. The marks are what the TPU
    model's layer figures assume (KERNEL_FUSION)."""
    model, lora = patch(cases("llama"), torch.device("cpu"), max_loras=2, max_rank=8, base_fusion=True)
    layer = model.model.layers[0]
    modules = {name: getattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    modules.update({name: getattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj")})
    roles = {name: m.fusion_role for name, m in modules.items()}
    assert [(r.prologue, r.residual_in_kernel) for r in roles.values()] == [
        ("norm", False),
        ("norm", False),
        ("norm", False),
        ("", True),
        ("norm", False),
        ("norm", False),
        ("silu_mul", True),
    ]
    assert {name: (r.prologue, r.residual_in_kernel) for name, r in roles.items()} == tpu_model.KERNEL_FUSION
    for num_tokens in (8, 4096):
        indices = tpu_model.contiguous_requests(num_tokens, 64, 8)
        costs = tpu_model.projection_costs(
            tpu_model.CHIPS["v6e"], indices, 14336, 4096, 16, 64, True, 1.0, False, "silu_mul", True
        )
        priced = {"fused": costs["fused"], "separate": costs["separate"], "xla": costs["xla_native"]}
        choice = formulation.choose("v6e", num_tokens, 14336, 4096, 16, 64, False, roles["down_proj"])
        assert priced[choice] == min(priced.values())
    lora.unpatch()
    assert all((m.fusion_role.prologue, m.fusion_role.residual_in_kernel) == ("", False) for m in modules.values())


def test_training_through_the_arranged_decoders_equals_peft_alone(fused_calls):
    """One step of three tenants' gradients (CPU tensors) with the decoders arranged (attention and MLP): the
    fused op's backward (the producer recomputed in torch, through linear_lora's own backward) gives each tenant
    PEFT's gradients, both norms' factors (into the embedding's gradient), SiLU * up and the residuals included."""
    from test_training import ARCHS, MIX, _batch, _create, _loss, _patched, _peft, _peft_grads

    lora = _patched(torch.device("cpu"), base_fusion=True)
    assert lora.fused_decoders
    _create(lora, ARCHS["llama"][2])
    peft_model = _peft(lora)
    ids, targets = _batch(0, len(MIX))
    lora.model.train()
    lora.set_batch(MIX)
    _loss(lora.model(ids).logits, targets).backward()
    assert fused_calls == ARRANGED * 2
    for name in ARCHS["llama"][2]:
        rows = [i for i, n in enumerate(MIX) if n == name]
        expected = _peft_grads(peft_model, name, ids[rows], targets[rows])
        for key, param in lora.trainable_parameters(name).items():
            assert_close(param.grad, expected[key])
