"""Training adapters in mixed batches equals training each alone with PEFT (docs/training.md).

The reference is PEFT: one PeftModel holding every tenant's adapter with the same starting weights,
each adapter trained alone (``set_adapter``) on its own rows, eager, on CPU tensors. The patched model
trains all tenants at once, each row of a batch on its own adapter.
"""

import functools
import warnings

import pytest
import torch
import torch_xla
import transformers
from conftest import assert_close, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import torch_xla_lora as tl

# Three tenants: different ranks, rsLoRA, rank/alpha patterns, dropout off (equality needs it off).
TENANTS = {
    "t0": {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"},
    "t1": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"],
        "rank_pattern": {"down_proj": 8},
        "alpha_pattern": {"v_proj": 3},
    },
    "t2": {"r": 8, "lora_alpha": 16, "target_modules": ["gate_proj", "up_proj", "o_proj", "k_proj"]},
}
MAX_RANK = 8
VOCAB, SEQ = 64, 6


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # training mode: the base's own dropout off
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_qwen2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config).eval()


# Architecture -> (base model builder, patched targets, tenants' LoRA configs).
ARCHS = {
    "llama": (tiny_llama, TARGETS, TENANTS),
    # One decoder: the XLA-device cases with base fusion, whose Pallas kernels (interpret mode) are most of their
    # compile time, meet every arrangement and group in it once.
    "llama-1": (functools.partial(tiny_llama, num_hidden_layers=1), TARGETS, TENANTS),
    # GPT-2's Conv1D stores its weight [in, out]: PEFT's fan_in_fan_out.
    "gpt2": (
        tiny_gpt2,
        ["c_attn", "c_proj", "c_fc"],
        {
            "t0": {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True},
            "t1": {"r": 8, "lora_alpha": 8, "target_modules": ["c_proj", "c_fc"], "fan_in_fan_out": True},
        },
    ),
    # Qwen2's q/k/v carry biases.
    "qwen2": (
        tiny_qwen2,
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        {
            "t0": {"r": 1, "lora_alpha": 2, "target_modules": ["q_proj", "k_proj", "v_proj"]},
            "t1": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["v_proj", "o_proj"]},
        },
    ),
}


def _patched(device: torch.device, max_loras: int = 4, arch: str = "llama", **config) -> tl.LoRAModel:
    build, targets, _ = ARCHS[arch]
    config = tl.LoRAConfig(max_loras=max_loras, max_rank=MAX_RANK, target_modules=targets, **config)
    return tl.patch_model(build().to(device), config)


def _create(lora: tl.LoRAModel, tenants=TENANTS) -> None:
    torch.manual_seed(1)
    for name, kwargs in tenants.items():
        # init False: B non-zero, so that A's gradients are not all zero.
        lora.create_adapter(name, LoraConfig(init_lora_weights=False, **kwargs))


def _peft(lora: tl.LoRAModel, arch: str = "llama") -> PeftModel:
    """A PeftModel on a fresh copy of the base holding each tenant's current weights."""
    build, _, tenants = ARCHS[arch]
    peft_model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out and embedding-saving notices
        for name, kwargs in tenants.items():
            config = LoraConfig(**kwargs)
            if peft_model is None:
                peft_model = get_peft_model(build(), config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
            state = {k: v.detach().cpu().clone() for k, v in lora.trainable_parameters(name).items()}
            result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
            assert not [k for k in result.unexpected_keys if "lora" in k]
    return peft_model


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of each row's mean cross-entropy: rows are independent, so each tenant's gradient is
    its own rows' loss's gradient."""
    per_token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return per_token.mean(dim=1).sum()


def _batch(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    return ids, torch.randint(0, VOCAB, (rows, SEQ), generator=gen)


def _peft_grads(peft_model: PeftModel, name: str, ids, targets) -> dict[str, torch.Tensor]:
    peft_model.set_adapter(name)
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    _loss(peft_model(ids).logits, targets).backward()
    grads = {}
    for key, param in peft_model.named_parameters():
        if f".{name}." in key or key.endswith(f".{name}"):
            grads[key.replace(f".{name}", "")] = param.grad
    return grads


MIX = ["t0", "t1", None, "t2", "t1", "t0"]


@pytest.mark.parametrize(
    "arch,on_xla",
    [("llama", False), ("gpt2", False), ("qwen2", False), ("llama-1", "fused"), ("llama-1", "pallas"),
     ("llama-1", "pallas-compile"), ("llama-1", "pallas-norms-outside")],
    ids=["llama-cpu", "gpt2-cpu", "qwen2-cpu", "llama-xla-base-fusion", "llama-pallas-base-fusion",
         "llama-pallas-base-fusion-compile", "llama-pallas-norms-outside"],
)  # fmt: skip
def test_one_step_gradients_equal_peft_alone(arch, on_xla, xla_device, monkeypatch):
    """``llama-xla-base-fusion``: every projection runs base and LoRA as one op (``base_fusion=True``, the decoders
    arranged), in training the ops' training forwards, whose backwards take the s the forward kept: o_proj the
    arrangement's ``linear_lora_fused`` with ``keep_s``, the attention's residual taken in, and down_proj the same
    with SiLU(gate) * up and the MLP's residual taken in (its backward recomputes x for dA); the others
    ``linear_lora_train`` on the norms' outputs (the arrangement declines a norm in training, before building the
    slot factors: each layer builds them once). (The separate formulation on the XLA device: the
    "lazy" and "compile" steps of test_steps_on_changing_mixes_equal_peft_alone.) ``llama-pallas-base-fusion``: the
    same on the Pallas backend (the kernels in interpret mode), where every projection's backward takes dx, ds and dB
    in its one pass over g (``linear_lora_backward``) and none runs ``bgmv_lora_grads``, and each decoder's q/k/v and
    gate/up run as groups whose dA is one weight gradient over their shared input (``layers/shared_input.py``), the
    norm before each group in its kernels; the same step under ``torch.compile(backend="openxla")`` too ("-compile":
    one graph, no break); and the groups on the normed tensor, as where a norm's weight is not in x's dtype
    ("-norms-outside")."""
    device = xla_device if on_xla else torch.device("cpu")
    tenants = ARCHS[arch][2]
    mix = [n if n is None or n in tenants else "t0" for n in MIX]
    config = {"base_fusion": True, "backend": "xla" if on_xla == "fused" else "pallas"} if on_xla else {}
    compiled = on_xla == "pallas-compile"
    lora = _patched(device, arch=arch, **config)
    keeps, arranged, built, backward_ops, groups = [], [], [], [], []
    norms_outside = on_xla == "pallas-norms-outside"
    if norms_outside:
        from torch_xla_lora.layers import fusion

        monkeypatch.setattr(fusion._Norm, "takes_in", property(lambda norm: False))
        on_xla = "pallas"
    if on_xla == "pallas":  # (not under dynamo: a spy's side effects would break the graph)
        from torch_xla_lora.ops import _linear_fused

        def backward_spy(*args, **kwargs):
            backward_ops.append(args[1].shape)
            return linear_lora_backward(*args, **kwargs)

        def no_lora_grads(*args, **kwargs):
            raise AssertionError("a projection ran bgmv_lora_grads where its backward takes dB in its pass over g")

        def group_spy(projections, x, *norm):
            groups.append(([type(p).__name__ for p in projections], len(norm)))
            return run_group(projections, x, *norm)

        from torch_xla_lora.layers import shared_input

        linear_lora_backward, run_group = _linear_fused.linear_lora_backward, shared_input.run
        monkeypatch.setattr(_linear_fused, "linear_lora_backward", backward_spy)
        monkeypatch.setattr(shared_input, "run", group_spy)
        monkeypatch.setattr(torch.ops.xla_lora, "bgmv_lora_grads", no_lora_grads, raising=False)
    if on_xla == "fused":
        from torch_xla_lora.layers import base, linear
        from torch_xla_lora.ops import _linear_fused

        def spy(*args, **kwargs):
            keeps.append(linear_keeps_s(*args, **kwargs))
            return keeps[-1]

        def fused_spy(*args, **kwargs):
            taken = {k for k in ("up", "row_scale", "col_scale", "residual") if kwargs.get(k) is not None}
            arranged.append((kwargs.get("keep_s", False), frozenset(taken)))
            return linear_lora_fused(*args, **kwargs)

        def factors_spy(layer):
            built.append(layer)
            return slot_factors(layer)

        linear_keeps_s, linear_lora_fused = linear._keeps_s, _linear_fused.linear_lora_fused
        slot_factors = base.BaseLayerWithLoRA.slot_factors
        monkeypatch.setattr(linear, "_keeps_s", spy)
        monkeypatch.setattr(_linear_fused, "linear_lora_fused", fused_spy)
        monkeypatch.setattr(base.BaseLayerWithLoRA, "slot_factors", factors_spy)
    _create(lora, tenants)
    peft_model = _peft(lora, arch)
    ids, targets = _batch(0, len(mix))
    lora.model.train()
    lora.set_batch(mix)

    def loss_of(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _loss(lora.model(ids).logits, targets)

    if compiled:
        from torch._dynamo.utils import counters

        counters.clear()
        loss_of = torch.compile(loss_of, backend="openxla")
    loss = loss_of(ids.to(device), targets.to(device))
    loss.backward()
    if on_xla:
        torch_xla.sync()
    if compiled:
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    if on_xla == "fused":  # every layer kept s; o_proj took the residual in, down_proj SiLU(gate) * up too
        from torch_xla_lora.layers.linear import LinearWithLoRA

        linears = [layer for layer in lora.layers.values() if isinstance(layer, LinearWithLoRA)]
        assert lora.fused_decoders and all(keeps) and len(keeps) >= len(linears), keeps
        expected = [(True, frozenset({"residual"})), (True, frozenset({"up", "residual"}))]
        assert arranged == expected * len(lora.fused_decoders), arranged
        assert sorted(map(id, built)) == sorted(map(id, lora.layers.values())), "each layer builds its factors once"
    if on_xla == "pallas":
        from torch_xla_lora.layers.linear import LinearWithLoRA

        linears = [layer for layer in lora.layers.values() if isinstance(layer, LinearWithLoRA)]
        assert len(backward_ops) == len(linears), backward_ops
        decoders = len(lora.fused_decoders)
        # Each group took its RMSNorm in (the row factor and the weight: two arguments more), or not (-norms-outside).
        taken = 0 if norms_outside else 2
        assert sorted((len(names), n) for names, n in groups) == [(2, taken)] * decoders + [(3, taken)] * decoders
    for name in tenants:
        rows = [i for i, n in enumerate(mix) if n == name]
        expected = _peft_grads(peft_model, name, ids[rows], targets[rows])
        params = lora.trainable_parameters(name)
        assert set(params) == set(expected)
        for key, param in params.items():
            assert param.grad is not None, key
            assert_close(param.grad, expected[key])
    # The base stays frozen, as PEFT leaves it.
    assert not any(p.requires_grad for p in lora.model.parameters())


def test_keys_shapes_and_initialisation_match_peft():
    lora = _patched(torch.device("cpu"))
    for init in (True, "gaussian", False):
        name = f"init-{init}"
        torch.manual_seed(0)
        lora.create_adapter(name, LoraConfig(init_lora_weights=init, **TENANTS["t1"]))
        torch.manual_seed(0)
        peft_model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=init, **TENANTS["t1"]))
        expected = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        params = lora.trainable_parameters(name)
        assert set(params) == set(expected)
        for key, value in expected.items():
            ours = params[key].detach()
            assert ours.shape == value.shape, key
            if value.abs().max() == 0:  # B of True / "gaussian", A of an embedding under True
                assert ours.abs().max() == 0, key
            else:  # same distribution: same bound (uniform) or spread (normal) within sampling error
                ratio = ours.std() / value.std()
                assert 0.6 < ratio < 1.6, (key, ratio)
        lora.remove(name)


STEPS = [["t0", "t1", None, "t2"], ["t2", "t2", None, "t0"], ["t1", "t0", "t1", "t1"]]  # t1 sits out step 2


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    # eps well above float32 rounding of the gradients: Adam divides by sqrt(v), so for gradient elements
    # near zero a default eps would turn 1e-7 rounding differences into full-size update differences.
    return torch.optim.AdamW(params, lr=0.01, eps=1e-5, weight_decay=0.1)


def _train_peft_alone(lora: tl.LoRAModel, kind: str, steps) -> dict[str, dict[str, torch.Tensor]]:
    """Each tenant trained alone with PEFT on its own rows of each step (skipping steps without rows)."""
    peft_model = _peft(lora)
    weights = {}
    for name in TENANTS:
        peft_model.set_adapter(name)
        peft_model.train()
        params = [p for key, p in peft_model.named_parameters() if f".{name}." in key or key.endswith(f".{name}")]
        optimizer = _optimizer(kind, params)
        for number, mix in enumerate(steps):
            rows = [i for i, n in enumerate(mix) if n == name]
            if not rows:
                continue
            ids, targets = _batch(100 + number, len(mix))
            optimizer.zero_grad(set_to_none=True)
            _loss(peft_model(ids[rows]).logits, targets[rows]).backward()
            optimizer.step()
        weights[name] = {
            key.replace(f".{name}", ""): p.detach().clone()
            for key, p in peft_model.named_parameters()
            if f".{name}." in key or key.endswith(f".{name}")
        }
    return weights


@pytest.mark.parametrize(
    "mode,kind",
    [("cpu", "sgd"), ("cpu", "adamw"), ("lazy", "adamw"), ("compile", "adamw"), ("pool", "adamw")],
)
def test_steps_on_changing_mixes_equal_peft_alone(mode, kind, xla_device):
    """Several optimizer steps over mixes that change (a tenant sits one out): every tenant's weights equal
    its own PEFT run; the sitting-out tenant's gradients are None, so AdamW leaves it exactly as it was.
    "pool": rank-true int8 storage (``memory_budget``, CPU tensors): trainable adapters keep lanes of their own
    and read their parameters there, whatever the pool holds."""
    device = torch.device("cpu") if mode in ("cpu", "pool") else xla_device
    pooled = {"memory_budget": 10**6, "weight_dtype": "int8"} if mode == "pool" else {}
    lora = _patched(device, **pooled)
    _create(lora)
    expected = _train_peft_alone(lora, kind, STEPS)
    params = [p for name in TENANTS for p in lora.trainable_parameters(name).values()]
    optimizer = _optimizer(kind, params)
    lora.model.train()

    def loss_of(ids, targets):
        return _loss(lora.model(ids).logits, targets)

    step_loss = torch.compile(loss_of, backend="openxla") if mode == "compile" else loss_of
    for number, mix in enumerate(STEPS):
        ids, targets = _batch(100 + number, len(mix))
        lora.set_batch(mix)
        optimizer.zero_grad(set_to_none=True)
        step_loss(ids.to(device), targets.to(device)).backward()
        for name in TENANTS:
            grads = [p.grad for p in lora.trainable_parameters(name).values()]
            if name in mix:
                assert all(g is not None for g in grads)
            else:
                assert all(g is None for g in grads), name
        optimizer.step()
        if device.type == "xla":
            torch_xla.sync()
    for name in TENANTS:
        for key, param in lora.trainable_parameters(name).items():
            _assert_weights_close(param, expected[name][key])


def _assert_weights_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Weights after several steps: relative 1e-4 (of the largest magnitude, and elementwise), float32 rounding
    of one formulation against another growing with each step (a wrong gradient moves them by ~1e-1)."""
    magnitude = expected.abs().max().item()
    torch.testing.assert_close(actual.detach().cpu(), expected, atol=1e-4 * magnitude, rtol=1e-4)


def test_new_mixes_compile_nothing_new(xla_device):
    """The documented training loop on the XLA device (docs/training.md): a sync after backward, one
    optimizer per tenant with a sync after each step: once every tenant has taken two steps (an optimizer's
    first step also creates its state), new adapter mixes compile nothing."""
    lora = _patched(xla_device)
    _create(lora)
    optimizers = {name: _optimizer("adamw", lora.trainable_parameters(name).values()) for name in TENANTS}
    lora.model.train()

    def step(mix, seed):
        ids, targets = _batch(seed, len(mix))
        lora.set_batch(mix)
        _loss(lora.model(ids.to(xla_device)).logits, targets.to(xla_device)).backward()
        torch_xla.sync()
        for optimizer in optimizers.values():
            optimizer.step()  # a tenant without rows has no gradients: nothing to do
            torch_xla.sync()
            optimizer.zero_grad(set_to_none=True)

    for seed, mix in enumerate([["t0", "t1", "t2", None], ["t1", "t2", None, "t0"]]):
        step(mix, seed)
    with tl.assert_no_recompile():
        for seed, mix in enumerate([["t2", "t2", "t2", "t2"], [None, "t0", "t2", "t0"], ["t1", None, None, "t1"]]):
            step(mix, 10 + seed)


def test_save_reload_and_freeze(tmp_path):
    """save_adapter writes what PeftModel.from_pretrained loads (same outputs); load_adapter(trainable=True)
    reloads it bit-exactly; freeze keeps the outputs and ends training."""
    lora = _patched(torch.device("cpu"))
    _create(lora)
    with torch.no_grad():  # move the weights off their initial values
        for param in lora.trainable_parameters("t1").values():
            param.add_(0.01 * torch.randn_like(param))
    lora.save_adapter("t1", tmp_path / "t1")
    ids, _ = _batch(3, 3)
    lora.set_batch(["t1"] * 3)
    with torch.no_grad():
        ours = lora.model(ids).logits
        peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "t1")
        assert_close(ours, peft_model(ids).logits)

    lora.load_adapter("again", tmp_path / "t1", trainable=True)
    saved, reloaded = lora.trainable_parameters("t1"), lora.trainable_parameters("again")
    assert list(saved) == list(reloaded)
    for key in saved:
        assert torch.equal(saved[key], reloaded[key]), key

    lora.freeze("t1")
    assert lora.adapters()["t1"]["trainable"] is False
    lora.set_batch(["t1"] * 3)
    with torch.no_grad():
        assert_close(lora.model(ids).logits, ours)
    with pytest.raises(tl.ArgumentError, match="not trainable"):
        lora.trainable_parameters("t1")


def test_trainable_adapters_are_never_evicted():
    """Trainable adapters hold their slots: a batch or a new trainable adapter that needs one of them fails
    with NoFreeSlotError and changes nothing."""
    lora = _patched(torch.device("cpu"), max_loras=3)
    _create(lora)
    slots = {name: info["slot"] for name, info in lora.adapters().items()}
    peft_state = {k: v.detach().clone() for k, v in lora.trainable_parameters("t0").items()}
    lora.load_adapter("frozen", state_dict=peft_state, config=TENANTS["t0"])
    with pytest.raises(tl.NoFreeSlotError, match="trainable"):
        lora.set_batch(["frozen", "t0"])
    with pytest.raises(tl.NoFreeSlotError):
        lora.create_adapter("t3", LoraConfig(**TENANTS["t0"]))
    assert "t3" not in lora.adapters()
    assert {n: i["slot"] for n, i in lora.adapters().items() if n != "frozen"} == slots
    lora.remove("t2")  # removing frees its slot
    lora.set_batch(["frozen", "t0"])
    with pytest.raises(tl.AdapterNotFoundError):
        lora.trainable_parameters("t2")


def test_dropout_in_training_mode_only():
    """model.train() drops the LoRA input of an adapter's rows at its lora_dropout, as PEFT does; base rows and
    rows of an adapter without dropout are untouched; model.eval() drops nothing."""
    lora = _patched(torch.device("cpu"))
    torch.manual_seed(1)
    lora.create_adapter("drop", LoraConfig(init_lora_weights=False, lora_dropout=0.5, **TENANTS["t2"]))
    lora.create_adapter("keep", LoraConfig(init_lora_weights=False, **TENANTS["t0"]))
    ids, _ = _batch(4, 3)
    lora.set_batch(["drop", "keep", None])
    with torch.no_grad():
        lora.model.eval()
        evaluated = lora.model(ids).logits
        lora.model.train()
        trained = [lora.model(ids).logits for _ in range(2)]
    for out in trained:
        assert_close(out[1:], evaluated[1:])
        assert not torch.allclose(out[0], evaluated[0], atol=1e-3)
    assert not torch.allclose(trained[0][0], trained[1][0], atol=1e-3)


def test_warmup_training_compiles_the_training_graph(xla_device):
    """warmup(training=True) with the user's forward, loss and backward compiles the graph that training
    steps then reuse for any mix; the adapters' gradients are as before warm-up."""
    lora = _patched(xla_device)
    _create(lora)
    lora.model.train()
    _, targets = _batch(5, 4)
    targets = targets.to(xla_device)

    def forward_backward(ids):
        loss = _loss(lora.model(ids).logits, targets)
        loss.backward()
        return loss.detach()

    lora.warmup([4], [SEQ], step=forward_backward, progress=False, training=True)
    assert all(p.grad is None for name in TENANTS for p in lora.trainable_parameters(name).values())
    losses = []
    with tl.assert_no_recompile():
        for seed, mix in enumerate([["t0", "t1", "t2", None], ["t2", None, None, "t2"]]):
            ids, _ = _batch(seed, 4)
            lora.set_batch(mix)
            losses.append(forward_backward(ids.to(xla_device)))  # kept to the sync, as warm-up keeps it
            torch_xla.sync()
            q_proj_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
            for name in ("t0", "t1"):  # the tenants with LoRA on q_proj
                assert (lora.trainable_parameters(name)[q_proj_b].grad is None) == (name not in mix)
            for param in (p for name in TENANTS for p in lora.trainable_parameters(name).values()):
                param.grad = None
    assert all(torch.isfinite(loss.cpu()) for loss in losses)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
        {"target_modules": r".*\.(k|v)_proj"},
    ],
    ids=["all-linear-exclude", "layers-to-transform", "regex"],
)
def test_targets_follow_peft_rules(kwargs):
    """create_adapter targets exactly the modules PEFT's get_peft_model targets for the same config."""
    lora = _patched(torch.device("cpu"))
    lora.create_adapter("t", LoraConfig(r=2, **kwargs))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, **kwargs))
    assert set(lora.trainable_parameters("t")) == set(get_peft_model_state_dict(peft_model))


def test_bad_training_calls_raise_typed_errors_and_change_nothing(tmp_path):
    lora = _patched(torch.device("cpu"))
    lora.create_adapter("ok", LoraConfig(r=2, target_modules=["q_proj"]))
    before = lora.adapters()
    q_proj = {"target_modules": ["q_proj"]}
    cases = [
        (tl.ArgumentTypeError, lambda: lora.create_adapter("x", "r=2")),
        (tl.UnknownModuleError, lambda: lora.create_adapter("x", LoraConfig(r=2, target_modules=["nope"]))),
        (tl.RankTooLargeError, lambda: lora.create_adapter("x", LoraConfig(r=MAX_RANK * 2, **q_proj))),
        (tl.UnsupportedAdapterError, lambda: lora.create_adapter("x", LoraConfig(use_dora=True, **q_proj))),
        (tl.UnsupportedAdapterError, lambda: lora.create_adapter("x", LoraConfig(init_lora_weights="pissa", **q_proj))),
        (tl.ArgumentTypeError, lambda: lora.load_adapter("x", tmp_path, trainable="yes")),
        (tl.AdapterNotFoundError, lambda: lora.trainable_parameters("x")),
        (tl.AdapterNotFoundError, lambda: lora.freeze("x")),
        (tl.ArgumentTypeError, lambda: lora.save_adapter("ok", 3)),
    ]  # fmt: skip
    for error, call in cases:
        with pytest.raises(error):
            call()
        assert lora.adapters() == before
    lora.freeze("ok")
    with pytest.raises(tl.ArgumentError, match="not trainable"):
        lora.save_adapter("ok", tmp_path)
