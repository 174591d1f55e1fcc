"""Autograd of every op: float64 gradcheck and opcheck on CPU tensors, gradients on the XLA device against
torch.autograd on plain per-token einsum formulations in float64, exact zeros for unused slots and padded
ranks, and one compiled training step.

The plain formulations below gather each token's slot weights (zero where the index is outside [0, L)) and
never call the library, so a wrong backward formula, a gradient leaking into a slot no token uses, or a
token without adapter contributing to a slot makes these tests fail.
"""

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
from conftest import assert_close
from torch.nn import functional as F

import torch_xla_lora  # noqa: F401  (registers torch.ops.xla_lora)
from torch_xla_lora.ops import _linear_fused  # noqa: F401  (registers xla_lora::linear_lora_fused)

OPS = torch.ops.xla_lora
T, D, R, L, DOUT, SLICE, OFFSET = 7, 10, 3, 5, 12, 5, 4
SCALING = 0.5
# Slots 1 and 3 unused; -1 (no adapter), -3 (an experts row of a token without adapter: slot * E + e < 0)
# and L + 1 (out of range) contribute nothing.
INDICES = {"mixed": [0, 2, -1, L + 1, 2, -3, 4], "one_token": [2]}
# On the XLA device also several token blocks (the weight gradient's blocks are 8 tokens here) that
# mix slots, with runs of one slot across a block boundary; slots 1 and 3 unused again.
INDICES["blocks"] = [0, 0, 2, 4, -1, 4, 4, 0, 2, 2, 2, L + 1, 4, 0, -1, 2, 2, 0, 0, -3, 4, 4, 4, 2, 0, 0, -1]
# int8 weights (frozen constants of the cases, moved to the inputs' device by _call) and their float32 scales: per
# output channel of an [out, in] weight (torch_xla's per-channel layer) and per input channel of an [in, out] one
# (the transposed read the first one's backward makes).
_G8 = torch.Generator().manual_seed(8)
Q8 = torch.randint(-127, 128, (DOUT, D), generator=_G8, dtype=torch.int8)
Q8_SCALE = torch.rand(DOUT, generator=_G8) / 127 + 1e-3
Q8_IN = torch.randint(-127, 128, (D, DOUT), generator=_G8, dtype=torch.int8)
Q8_IN_SCALE = torch.rand(D, generator=_G8) / 127 + 1e-3


@pytest.fixture(scope="module", autouse=True)
def _xla_device_before_any_backward(xla_device):
    """torch's autograd engine sizes its per-device queues at the first backward of the process: a backward
    on CPU tensors before the XLA device exists makes every later backward on XLA tensors fail
    ("device_ready_queues_ ... INTERNAL ASSERT FAILED"). The device is created first."""
    return xla_device


def _gathered(weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[T, ...]: each token's slot weights, zero where its index is outside [0, L)."""
    valid = (idx >= 0) & (idx < weights.shape[0])
    rows = weights[idx.long().clamp(0, weights.shape[0] - 1)]
    return torch.where(valid.reshape(-1, *[1] * (rows.dim() - 1)), rows, torch.zeros_like(rows))


def _lora(x, a, b, idx, scaling):
    s = scaling * torch.einsum("trd,td->tr", _gathered(a, idx), x)
    return torch.einsum("tr,tro->to", s, _gathered(b, idx))


#: Keys of one-element shapes that are not per token.
NOT_PER_TOKEN = ("bias", "col")


def _prologue(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """linear_lora_fused's x: SiLU(x) * up * col."""
    return F.silu(t["x"]) * t["up"] * t["col"]


def _dequantized(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An int8 weight times its scales per row (an [out, in] weight's outputs, an [in, out] one's inputs)."""
    return q.to(dtype) * scale.to(dtype)[:, None]


def _fused_args(up=None, col=None, weight="w", bias=None, res=None, layout="out_in", scale=None, in_scale=None):
    """linear_lora_fused's arguments for a case (names of its tensors, or constants)."""
    head = ("x", up, None, col, weight, bias, "a", "b", "idx", res, SCALING, layout, "backend")
    return (*head, None, False, scale, in_scale)


class Case(NamedTuple):
    shapes: dict[str, tuple[int, ...]]  # one-element shapes but NOT_PER_TOKEN's are per token: [T, n]
    op: Callable
    args: tuple  # the op's arguments: names of ``shapes`` entries, "idx", "backend", or values
    plain: Callable  # (tensors, idx) -> the op's output, in plain torch


_FUSED_CASES = {
    "linear_lora_fused": Case(  # x's producer (SiLU(x) * up * col) and a residual taken in
        {"x": (D,), "up": (D,), "col": (D,), "w": (DOUT, D), "bias": (DOUT,), "a": (L, R, D), "b": (L, R, DOUT)}
        | {"res": (DOUT,)},
        OPS.linear_lora_fused,
        _fused_args(up="up", col="col", weight="w", bias="bias", res="res"),
        lambda t, idx: _prologue(t) @ t["w"].T + t["bias"] + t["res"] + _lora(_prologue(t), t["a"], t["b"], idx, 0.5),
    ),
    "linear_lora_fused_int8": Case(  # an int8 weight, per output channel
        {"x": (D,), "a": (L, R, D), "b": (L, R, DOUT)},
        OPS.linear_lora_fused,
        _fused_args(weight=Q8, scale=Q8_SCALE),
        lambda t, idx: t["x"] @ _dequantized(Q8, Q8_SCALE, t["x"].dtype).T + _lora(t["x"], t["a"], t["b"], idx, 0.5),
    ),
}

CASES = {
    "bgmv_shrink": Case(
        {"x": (D,), "a": (L, R, D)},
        OPS.bgmv_shrink,
        ("x", "a", "idx", SCALING, "backend"),
        lambda t, idx: SCALING * torch.einsum("trd,td->tr", _gathered(t["a"], idx), t["x"]),
    ),
    "bgmv_expand": Case(
        {"s": (R,), "b": (L, R, DOUT), "base": (DOUT,)},
        OPS.bgmv_expand,
        ("s", "b", "base", "idx", True, "backend"),
        lambda t, idx: t["base"] + torch.einsum("tr,tro->to", t["s"], _gathered(t["b"], idx)),
    ),
    "bgmv_expand_slice": Case(  # add_inputs=False: base gets no gradient
        {"s": (R,), "b": (L, R, SLICE), "base": (DOUT,)},
        OPS.bgmv_expand_slice,
        ("s", "b", "base", "idx", OFFSET, False, "backend"),
        lambda t, idx: F.pad(
            torch.einsum("tr,tro->to", t["s"], _gathered(t["b"], idx)), (OFFSET, DOUT - OFFSET - SLICE)
        ),
    ),
    "bgmv_shrink_expand": Case(
        {"x": (D,), "a": (L, R, D), "b": (L, R, DOUT), "base": (DOUT,)},
        OPS.bgmv_shrink_expand,
        ("x", "a", "b", "base", "idx", SCALING, "backend", None),
        lambda t, idx: t["base"] + _lora(t["x"], t["a"], t["b"], idx, SCALING),
    ),
    "bgmv_shrink_expand_train": Case(  # its output; s (not differentiable) is checked in its own test
        {"x": (D,), "a": (L, R, D), "b": (L, R, DOUT), "base": (DOUT,)},
        OPS.bgmv_shrink_expand_train,
        ("x", "a", "b", "base", "idx", SCALING, "backend"),
        lambda t, idx: t["base"] + _lora(t["x"], t["a"], t["b"], idx, SCALING),
    ),
    "linear_lora_out_in": Case(
        {"x": (D,), "w": (DOUT, D), "bias": (DOUT,), "a": (L, R, D), "b": (L, R, DOUT)},
        OPS.linear_lora,
        ("x", "w", "bias", "a", "b", "idx", SCALING, "out_in", "backend", None, False),
        lambda t, idx: t["x"] @ t["w"].T + t["bias"] + _lora(t["x"], t["a"], t["b"], idx, SCALING),
    ),
    "linear_lora_in_out": Case(  # GPT-2's Conv1D layout, no bias
        {"x": (D,), "w": (D, DOUT), "a": (L, R, D), "b": (L, R, DOUT)},
        OPS.linear_lora,
        ("x", "w", None, "a", "b", "idx", SCALING, "in_out", "backend", None, False),
        lambda t, idx: t["x"] @ t["w"] + _lora(t["x"], t["a"], t["b"], idx, SCALING),
    ),
    "linear_lora_train": Case(  # its output; s (not differentiable) is checked in its own test
        {"x": (D,), "w": (DOUT, D), "bias": (DOUT,), "a": (L, R, D), "b": (L, R, DOUT)},
        OPS.linear_lora_train,
        ("x", "w", "bias", "a", "b", "idx", SCALING, "out_in", "backend", None, False),
        lambda t, idx: t["x"] @ t["w"].T + t["bias"] + _lora(t["x"], t["a"], t["b"], idx, SCALING),
    ),
    **_FUSED_CASES,
    "linear_lora_fused_int8_in": Case(  # an int8 weight [in, out] per input channel: the transposed read
        {"x": (D,), "a": (L, R, D), "b": (L, R, DOUT)},
        OPS.linear_lora_fused,
        _fused_args(weight=Q8_IN, layout="in_out", in_scale=Q8_IN_SCALE),
        lambda t, idx: (
            t["x"] @ _dequantized(Q8_IN, Q8_IN_SCALE, t["x"].dtype) + _lora(t["x"], t["a"], t["b"], idx, SCALING)
        ),
    ),
    # The training forwards of the two fused cases above: their output, s checked in its own test.
    **{f"{name}_train": c._replace(op=OPS.linear_lora_fused_train) for name, c in _FUSED_CASES.items()},
    "bgmv_weight_grad": Case(
        {"left": (R,), "right": (D,)},
        OPS.bgmv_weight_grad,
        ("left", "right", "idx", L, SCALING),
        lambda t, idx: (
            SCALING * torch.einsum("tl,tp,tq->lpq", _one_hot(idx).to(t["left"].dtype), t["left"], t["right"])
        ),
    ),
}


def _one_hot(idx: torch.Tensor) -> torch.Tensor:
    """[T, L] bool: token t uses slot l (no column for an index outside [0, L))."""
    return idx.long()[:, None] == torch.arange(L, device=idx.device)


def _call(case: Case, tensors: dict[str, torch.Tensor], idx: torch.Tensor, backend: str | None = "auto"):
    """The case's op on ``tensors``, or with ``backend`` None its plain formulation."""
    if backend is None:
        return case.plain(tensors, idx)
    out = _run(case, tensors, idx, backend)
    return out[0] if isinstance(out, tuple) else out  # the training forwards: (out, s)


def _run(case: Case, tensors: dict[str, torch.Tensor], idx: torch.Tensor, backend: str):
    """The case's op on ``tensors``, its outputs as the op returns them."""
    named = {**tensors, "idx": idx, "backend": backend}
    args = [a.to(idx.device) if isinstance(a, torch.Tensor) else a for a in case.args]  # the cases' constants
    return case.op(*(named[a] if isinstance(a, str) and a in named else a for a in args))


def _tensors(name: str, num_tokens: int, dtype=torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """CPU tensors of one case (per-token ones get ``num_tokens`` rows); rank R - 1 is padding: zero in A and B."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in CASES[name].shapes.items():
        full = (num_tokens, *shape) if len(shape) == 1 and key not in NOT_PER_TOKEN else shape
        value = torch.randn(full, generator=g, dtype=torch.float64)
        if key in ("a", "b"):
            value[:, R - 1] = 0
        out[key] = value.to(dtype)
    return out


def _indices(pattern: str) -> torch.Tensor:
    return torch.tensor(INDICES[pattern], dtype=torch.int32)


# CPU tensors run the torch references, which have no token blocks: "blocks" (27 tokens, a Jacobian four times
# "mixed"'s, ~200 s of finite differences) is checked on the XLA device, where the blocks are, against float64
# plain math (test_xla_gradients_match_float64_plain).
@pytest.mark.parametrize("pattern", ["mixed", "one_token"])
@pytest.mark.parametrize("name", CASES)
def test_gradcheck_cpu_float64(name, pattern):
    """Analytic gradients, and their own gradients, match finite differences of the op for every input."""
    case, tensors, idx = CASES[name], _tensors(name, len(INDICES[pattern])), _indices(pattern)
    keys = list(tensors)

    def fn(*values):
        return _call(case, dict(zip(keys, values, strict=True)), idx)

    inputs = tuple(t.requires_grad_() for t in tensors.values())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)  # random projections: a third of the time


@pytest.mark.parametrize("name", CASES)
def test_opcheck_cpu(name):
    """Schema, fake implementation, autograd registration and AOT dispatch (dynamic shapes) agree with the op."""
    case = CASES[name]
    named = {k: v.requires_grad_() for k, v in _tensors(name, T, torch.float32).items()}
    named |= {"idx": _indices("mixed"), "backend": "auto"}
    args = tuple(named[a] if isinstance(a, str) and a in named else a for a in case.args)
    torch.library.opcheck(case.op, args)


def _grads(case: Case, tensors: dict, idx: torch.Tensor, grad_out: torch.Tensor, backend: str | None) -> dict:
    """The gradients of ``sum(out * grad_out)`` for every tensor of ``tensors`` (zeros where the op gives
    none); ``backend`` None: of the plain formulation."""
    leaves = {k: v.detach().requires_grad_() for k, v in tensors.items()}
    out = _call(case, leaves, idx, backend)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads, strict=True)}


def _expected(case: Case, tensors: dict, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(grad_out in the tensors' dtype, the float64 gradients of the plain formulation at that grad_out)."""
    t64 = {k: v.double() for k, v in tensors.items()}
    shape = case.plain(t64, idx).shape
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out = grad_out.to(next(iter(tensors.values())).dtype)
    return grad_out, _grads(case, t64, idx, grad_out.double(), None)


def _on(tensors: dict, device) -> dict:
    return {k: v.to(device) for k, v in tensors.items()}


# XLA:CPU has no float64 path through the ops: JAX's 64-bit mode is off in the process (call_jax then
# lowers float32 computations for float64 arguments and fails), and TPUs have no float64 matmul. The
# device's float32 (and bfloat16) gradients are compared with the float64 ones of the plain formulation
# instead, at a tolerance relative to each gradient's magnitude.
@pytest.mark.parametrize(
    ("pattern", "dtype"),
    [("blocks", torch.float32), ("one_token", torch.float32), ("blocks", torch.bfloat16)],
    ids=["blocks-f32", "one_token-f32", "blocks-bf16"],
)
@pytest.mark.parametrize("name", CASES)
def test_xla_gradients_match_float64_plain(name, pattern, dtype, xla_device):
    case, idx = CASES[name], _indices(pattern)
    tensors = _tensors(name, len(idx), dtype)
    grad_out, expected = _expected(case, tensors, idx)
    actual = _grads(case, _on(tensors, xla_device), idx.to(xla_device), grad_out.to(xla_device), "xla")
    for key, grad in actual.items():
        assert grad.dtype == dtype and grad.shape == tensors[key].shape, key
        assert_close(grad, expected[key], dtype)


@pytest.mark.parametrize("name", CASES)
def test_opcheck_xla(name, xla_device):
    """As test_opcheck_cpu on the device; torch's autograd-registration check is not implemented for XLA
    tensors ("NYI devices other than CPU/CUDA/XPU"): the registration is per op, not per device, and is
    checked on CPU tensors above."""
    case = CASES[name]
    named = {k: v.to(xla_device).requires_grad_() for k, v in _tensors(name, T, torch.float32).items()}
    named |= {"idx": _indices("mixed").to(xla_device), "backend": "xla"}
    constants = [a.to(xla_device) if isinstance(a, torch.Tensor) else a for a in case.args]
    args = tuple(named[a] if isinstance(a, str) and a in named else a for a in constants)
    torch.library.opcheck(case.op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("on_xla", [False, True], ids=["cpu", "xla"])
@pytest.mark.parametrize("name", ["bgmv_shrink_expand", "bgmv_shrink_expand_train", "linear_lora_out_in"])
def test_unused_slots_and_padded_ranks_get_exact_zeros(name, on_xla, request):
    """A slot no token uses (here full of NaN) and the zero-padded rank of every slot get gradients of exactly
    zero, and nothing from them (nor, in the fused op, an Inf in a row without adapter) reaches another
    gradient. Would catch a weight gradient that multiplies by a mask instead of selecting, or a token outside
    [0, L) that lands in a slot."""
    device = request.getfixturevalue("xla_device") if on_xla else torch.device("cpu")
    case, idx = CASES[name], _indices("blocks")
    tensors = _tensors(name, len(idx), torch.float32)
    unused, used = [1, 3], [0, 2, 4]
    tensors["a"][unused] = float("nan")
    tensors["b"][unused] = float("nan")
    without = (idx < 0) | (idx >= L)
    if name.startswith("bgmv_shrink_expand"):  # (linear_lora's base product reads every row of x)
        tensors["x"][without] = float("inf")
    grad_out = torch.randn(len(idx), DOUT, generator=torch.Generator().manual_seed(1)).to(device)
    grads = _grads(case, _on(tensors, device), idx.to(device), grad_out, "xla")
    grads = {k: g.cpu() for k, g in grads.items()}
    for key, grad in grads.items():
        assert torch.isfinite(grad).all(), key
    for key in ("a", "b"):
        assert (grads[key][unused] == 0).all(), f"unused slots of d{key}"
        assert (grads[key][:, R - 1] == 0).all(), f"padded rank of d{key}"
        assert (grads[key][used, : R - 1] != 0).any(dim=(1, 2)).all(), f"used slots of d{key}"
    if name.startswith("bgmv_shrink_expand"):  # no base path to x: a row without adapter gets exactly zero
        assert (grads["x"][without] == 0).all()


def test_xla_pallas_backend_with_host_metadata(xla_device):
    """The fused op on the Pallas backend (interpret mode off TPU) with the batch's host metadata, as the layers
    call it: its backward (whose shrinks and expands run on that backend too) gives the float64 gradients."""
    case, idx = CASES["bgmv_shrink_expand"], _indices("blocks")
    tensors = _tensors("bgmv_shrink_expand", len(idx), torch.float32)
    grad_out, expected = _expected(case, tensors, idx)
    meta = torch_xla_lora.ops.batch_metadata(idx, [(D, DOUT)], R, L, torch.float32)[(D, DOUT)].to(xla_device)
    leaves = {k: v.to(xla_device).requires_grad_() for k, v in tensors.items()}
    x, a, b, base = (leaves[k] for k in ("x", "a", "b", "base"))
    out = OPS.bgmv_shrink_expand(x, a, b, base, idx.to(xla_device), SCALING, "pallas", meta)
    out.backward(grad_out.to(xla_device))
    for key, leaf in leaves.items():
        assert_close(leaf.grad, expected[key], torch.float32)


def _compile_count() -> int:
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


def test_compiled_training_step_has_no_graph_break_fallback_or_recompile(xla_device):
    """torch.compile(backend="openxla") of a loss calling the fused op: one dynamo graph, the backward runs
    (the op's backward ops are opaque nodes too), gradients match float64 math, no CPU fallback, and new
    index values compile nothing new."""
    from torch._dynamo.utils import counters

    case = CASES["bgmv_shrink_expand"]

    def loss_fn(x, a, b, base, idx, grad_out):
        return (OPS.bgmv_shrink_expand(x, a, b, base, idx, SCALING, "xla", None) * grad_out).sum()

    step = torch.compile(loss_fn, backend="openxla")
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    compiles = None
    for pattern in (INDICES["blocks"], INDICES["blocks"][::-1]):  # the same shapes, new index values
        idx = torch.tensor(pattern, dtype=torch.int32)
        tensors = _tensors("bgmv_shrink_expand", len(idx), torch.float32)
        grad_out, expected = _expected(case, tensors, idx)
        leaves = {k: v.to(xla_device).requires_grad_() for k, v in tensors.items()}
        loss = step(*leaves.values(), idx.to(xla_device), grad_out.to(xla_device))
        loss.backward()
        for key, leaf in leaves.items():
            assert_close(leaf.grad, expected[key], torch.float32)
        torch_xla.sync()
        if compiles is None:
            compiles = _compile_count()
        else:
            assert _compile_count() == compiles, "new index values compiled a new graph"
    assert sum(counters["graph_break"].values()) == breaks
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert torch_xla._XLAC._get_executed_fallback_ops() == []


def test_embedding_path_gradients(xla_device):
    """The embedding layer's composition: token-major A rows gathered at ``clamp(slot, 0) * vocab + id``, then
    the expand. Tokens without adapter gather slot 0's rows (unused here) with a zero rank gradient, so slot 0
    still gets exact zeros; the other gradients match float64 math."""
    vocab, num_tokens = 11, 9
    g = torch.Generator().manual_seed(2)
    a = torch.randn(L, vocab, R, generator=g)  # token-major, as EmbeddingWithLoRA stores it
    b = torch.randn(L, R, DOUT, generator=g)
    base = torch.randn(num_tokens, DOUT, generator=g)
    ids = torch.randint(0, vocab, (num_tokens,), generator=g)
    slots = torch.tensor([2, -1, 4, 2, -1, 4, 4, 2, -1], dtype=torch.int32)
    grad_out = torch.randn(num_tokens, DOUT, generator=g)

    def layer(a, b, base, ids, slots):
        rows = slots.clamp(min=0) * vocab + ids.to(slots.dtype)
        s = a.reshape(-1, R).index_select(0, rows)
        return OPS.bgmv_expand(s, b, base, slots, True, "xla")

    leaves = [t.to(xla_device).requires_grad_() for t in (a, b, base)]
    layer(*leaves, ids.to(xla_device), slots.to(xla_device)).backward(grad_out.to(xla_device))
    valid = (slots >= 0)[:, None]
    plain = [t.double().requires_grad_() for t in (a, b, base)]
    s64 = torch.where(valid, plain[0][slots.long().clamp(min=0), ids], 0)
    out64 = plain[2] + torch.einsum("tr,tro->to", s64, _gathered(plain[1], slots))
    out64.backward(grad_out.double())
    for leaf, expected in zip(leaves, plain, strict=True):
        assert_close(leaf.grad, expected.grad, torch.float32)
    for grad in (leaves[0].grad.cpu(), leaves[1].grad.cpu()):
        assert (grad[[0, 1, 3]] == 0).all()


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_xla_weight_grad_many_slots_and_blocks(backend, xla_device):
    """The weight-gradient op alone at a size with 16-token blocks (XLA-native) and more slots than blocks,
    most blocks holding several slots' runs (the loop over extra runs; on the Pallas kernel, several slots'
    visits per block), against float64 one-hot math."""
    num_tokens, num_slots, p, q = 300, 40, 4, 16
    g = torch.Generator().manual_seed(3)
    left, right = torch.randn(num_tokens, p, generator=g), torch.randn(num_tokens, q, generator=g)
    idx = torch.randint(-2, num_slots + 2, (num_tokens,), generator=g, dtype=torch.int32)
    idx[(idx == 7) | (idx == 31)] = -1  # two unused slots
    hot = (idx.long()[:, None] == torch.arange(num_slots)).double()
    expected = 0.25 * torch.einsum("tl,tp,tq->lpq", hot, left.double(), right.double())
    args = (left.to(xla_device), right.to(xla_device), idx.to(xla_device), num_slots, 0.25, backend)
    out = OPS.bgmv_weight_grad(*args)
    assert_close(out, expected, torch.float32)
    assert (out.cpu()[[7, 31]] == 0).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda lt, rt, i, n: (lt[:-1], rt, i, n), "right dim 0 must equal T of left"),
        (lambda lt, rt, i, n: (lt, rt.long(), i, n), "right must be a floating tensor"),
        (lambda lt, rt, i, n: (lt, rt, i.float(), n), "lora_indices must be"),
        (lambda lt, rt, i, n: (lt, rt, i, -1), "num_slots must be >= 0"),
    ],
)
def test_weight_grad_rejects_bad_arguments(change, message):
    """The new op names the bad argument, as the others do (and its fake implementation runs the same checks)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torch_xla_lora.errors import ShapeError

    def args():
        return torch.zeros(T, R), torch.zeros(T, D), _indices("mixed"), L

    with pytest.raises(ShapeError, match=message):
        OPS.bgmv_weight_grad(*change(*args()))
    with FakeTensorMode(), pytest.raises(ShapeError, match=message):
        OPS.bgmv_weight_grad(*change(*args()))


# -- the fused backward: bgmv_lora_grads ------------------------------------------------------------------


def _lora_grads_expected(tensors: dict, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(grad_out, float64 gradients of the plain shrink-expand) for the fused backward op's checks."""
    return _expected(CASES["bgmv_shrink_expand"], tensors, idx)


@pytest.mark.parametrize(
    ("with_dx", "saved_s"), [(True, False), (False, False), (True, True)], ids=["dx", "no_dx", "dx-s"]
)
@pytest.mark.parametrize("backend", ["cpu", "xla", "pallas"])
def test_lora_grads_op_matches_float64_plain(backend, with_dx, saved_s, request):
    """The fused backward op alone (CPU tensors: the torch reference; XLA: the XLA-native formulation and the
    Pallas kernels in interpret mode): dA, dB (and dx) equal the float64 gradients of the plain per-token
    formulation, slots no token uses get exact zeros, and a row without adapter holding Inf reaches nothing.
    ``saved_s``: an s handed in that is not x's (random): dB must be its outer products with g, which a
    backward recomputing s from x instead would not give; dA and dx do not read s."""
    idx = _indices("blocks")
    tensors = _tensors("bgmv_shrink_expand", len(idx), torch.float32)
    grad_out, expected = _lora_grads_expected(tensors, idx)
    without = (idx < 0) | (idx >= L)
    tensors["x"][without] = float("inf")
    device = torch.device("cpu") if backend == "cpu" else request.getfixturevalue("xla_device")
    extra = ()
    if saved_s:
        s = torch.randn(len(idx), R, generator=torch.Generator().manual_seed(2))
        hot = _one_hot(idx).double()
        expected["b"] = torch.einsum("tl,tr,to->lro", hot, s.double(), grad_out.double())
        extra = (s.to(device),)
    t = _on(tensors, device)
    args = (grad_out.to(device), t["x"], t["a"], t["b"], idx.to(device), SCALING, with_dx)
    out = OPS.bgmv_lora_grads(*args, "auto" if backend == "cpu" else backend, *extra)
    assert len(out) == (3 if with_dx else 2)
    assert_close(out[0], expected["a"], torch.float32)
    assert_close(out[1], expected["b"], torch.float32)
    for grad in out[:2]:
        assert (grad.cpu()[[1, 3]] == 0).all()
    if with_dx:
        assert_close(out[2], expected["x"], torch.float32)  # no base path to x: the LoRA's dx


def test_opcheck_lora_grads_cpu():
    """Schema, fake implementation and AOT dispatch of the fused backward op (it has no autograd of its own)."""
    tensors = _tensors("bgmv_shrink_expand", T, torch.float32)
    args = (tensors["base"], tensors["x"], tensors["a"], tensors["b"], _indices("mixed"), SCALING, True, "auto")
    torch.library.opcheck(
        OPS.bgmv_lora_grads, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    )


@pytest.mark.parametrize("on_xla", [False, True], ids=["cpu", "xla"])
def test_train_forward_keeps_s(on_xla, request):
    """bgmv_shrink_expand_train's s is scaling * A[i_t] x[t] (float64 math; exact zeros for rows outside
    [0, L), even where x holds Inf there), its output equals bgmv_shrink_expand's, and its backward hands s
    to the fused backward op rather than recomputing it (one bgmv_lora_grads given s, no shrink)."""
    device = request.getfixturevalue("xla_device") if on_xla else torch.device("cpu")
    idx = _indices("blocks")
    tensors = _tensors("bgmv_shrink_expand", len(idx), torch.float32)
    without = (idx < 0) | (idx >= L)
    tensors["x"][without] = float("inf")
    t = _on(tensors, device)
    backend = "xla" if on_xla else "auto"
    out, s = OPS.bgmv_shrink_expand_train(t["x"], t["a"], t["b"], t["base"], idx.to(device), SCALING, backend)
    served = OPS.bgmv_shrink_expand(t["x"], t["a"], t["b"], t["base"], idx.to(device), SCALING, backend)
    t64 = {k: v.double() for k, v in tensors.items()}
    expected_s = SCALING * torch.einsum("trd,td->tr", _gathered(t64["a"], idx), t64["x"].nan_to_num(posinf=0.0))
    assert s.shape == (len(idx), R) and s.dtype == torch.float32
    assert (s.cpu()[without] == 0).all()
    assert_close(s.cpu()[~without], expected_s[~without], torch.float32)
    assert_close(out.cpu(), served.cpu().double(), torch.float32)
    assert not s.requires_grad
    leaves = {k: v.detach().requires_grad_() for k, v in tensors.items()}
    leaves["x"] = leaves["x"].detach().nan_to_num(posinf=0.0).requires_grad_()
    out, _ = OPS.bgmv_shrink_expand_train(*leaves.values(), idx, SCALING, "auto")  # x, a, b, base
    log = _OpLog()
    with log:
        torch.autograd.grad(out.sum(), list(leaves.values()))
    assert log.names.count("xla_lora.bgmv_lora_grads") == 1 and "xla_lora.bgmv_shrink" not in log.names, log.names


#: The training forwards of linear_lora and linear_lora_fused (x's producer and a residual; an int8 weight) and the
#: serving op each runs in place of.
TRAIN_FORWARDS = {
    "linear_lora_train": "linear_lora_out_in",
    "linear_lora_fused_train": "linear_lora_fused",
    "linear_lora_fused_int8_train": "linear_lora_fused_int8",
}


@pytest.mark.parametrize("train", TRAIN_FORWARDS)
@pytest.mark.parametrize(("on_xla", "backend"), [(False, "auto"), (True, "xla"), (True, "pallas")])
def test_linear_train_forwards_keep_s_and_their_gradients_are_the_serving_ops(train, on_xla, backend, request):
    """A training forward's s is scaling * A[i_t] x[t] (x the producer's output; float64 math; exact zeros for
    rows outside [0, L)) and its output is the serving op's; its gradients equal the serving op's (which
    recomputes s) and float64 math, and its backward hands s to the fused backward op rather than recomputing
    it (one bgmv_lora_grads, no shrink). "pallas": the fused base kernel writing s (interpret mode off TPU), and
    the training forward's backward one pass over g giving dx, ds and dB (``linear_lora_backward``, handed the
    forward's s) and dA by ``bgmv_weight_grad``. ``linear_lora_fused_train`` with x's producer taken in also
    returns x as the product read it, which its backward's dA reads (not a recomputed x); without one, nothing."""
    device = request.getfixturevalue("xla_device") if on_xla else torch.device("cpu")
    serving = TRAIN_FORWARDS[train]
    case, idx = CASES[train], _indices("blocks")
    tensors = _tensors(train, len(idx), torch.float32)
    grad_out, expected = _expected(case, tensors, idx)
    t, dev_idx = _on(tensors, device), idx.to(device)
    out, s, *kept = _run(case, t, dev_idx, backend)
    without = (idx < 0) | (idx >= L)
    t64 = {k: v.double() for k, v in tensors.items()}
    x_read = _prologue(t64) if "up" in t64 else t64["x"]
    if train != "linear_lora_train":  # the fused op's third output: x where a producer is taken in
        (kept_x,) = kept
        if "up" in t64:
            assert kept_x.shape == x_read.shape and not kept_x.requires_grad
            assert_close(kept_x.cpu(), x_read, torch.float32)
        else:
            assert kept_x.numel() == 0
    expected_s = SCALING * torch.einsum("trd,td->tr", _gathered(t64["a"], idx), x_read)
    assert s.shape == (len(idx), R) and s.dtype == torch.float32 and not s.requires_grad
    assert (s.cpu()[without] == 0).all()
    assert_close(s.cpu(), expected_s, torch.float32)
    assert_close(out.cpu(), _call(CASES[serving], t, dev_idx, backend).cpu().double(), torch.float32)
    grads = {}
    for name in (train, serving):
        leaves = {k: v.detach().requires_grad_() for k, v in t.items()}
        outputs = _run(CASES[name], leaves, dev_idx, backend)
        out = outputs[0] if isinstance(outputs, tuple) else outputs
        log = _OpLog()
        with log:
            grads[name] = torch.autograd.grad(out, list(leaves.values()), grad_out.to(device))
        assert "xla_lora.bgmv_shrink" not in log.names, log.names
        if name == train and backend == "pallas":
            (call,) = [args for op, args in log.calls if op == "xla_lora.linear_lora_backward"]
            assert "xla_lora.bgmv_lora_grads" not in log.names, log.names
            saved_s = call[5]  # (grad, weight, a, b, indices, saved_s, ...)
        else:
            (call,) = [args for op, args in log.calls if op == "xla_lora.bgmv_lora_grads"]
            assert "xla_lora.linear_lora_backward" not in log.names, log.names
            saved_s = call[8] if len(call) > 8 else None  # (grad, inputs, a, b, indices, scaling, with_dx, backend, s)
        if name == train:  # the forward's own s, not a recomputed one
            assert saved_s is s or torch.equal(saved_s.cpu(), s.cpu()), log.names
            if "up" in t64 and backend == "pallas":  # dA against this forward's kept x itself
                (x_used,) = [args[1] for op, args in log.calls if op == "xla_lora.bgmv_weight_grad"]
                same = [torch_xla._XLAC._xla_get_tensor_id(v) for v in (x_used, outputs[2])] if on_xla else None
                assert x_used is outputs[2] or (same is not None and same[0] == same[1])
        else:
            assert saved_s is None
    for key, kept, recomputed in zip(t, *grads.values(), strict=True):
        assert_close(kept.cpu(), recomputed.cpu().double(), torch.float32)
        assert_close(kept.cpu(), expected[key], torch.float32)


@pytest.mark.parametrize("weight", ["float", "int8", "conv1d"])
@pytest.mark.parametrize(("on_xla", "backend"), [(False, "auto"), (True, "xla"), (True, "pallas")])
def test_linear_lora_backward_is_dx_ds_and_db_of_one_pass_over_g(on_xla, backend, weight, request):
    """linear_lora_backward's (dx, ds, dB) against float64 math of the forward's gradients: dx = g W + ds A,
    ds = scaling * g B^T, dB = s^T g per slot (exact zeros for the unused slots 1 and 3, nothing from rows outside
    [0, L)); an int8 weight read per output channel; a Conv1D ([in, out]) weight. An Inf in slot 0's rows of g
    stays in slot 0: the other slots' dB and the other tokens' dx and ds are unchanged ("pallas": the fused base
    kernel taking dB while g's tiles are in VMEM, interpret mode off TPU). opcheck on CPU tensors."""
    device = request.getfixturevalue("xla_device") if on_xla else torch.device("cpu")
    idx = _indices("blocks")
    g64 = torch.Generator().manual_seed(3)
    int8 = weight == "int8"
    layout = "in_out" if weight == "conv1d" else "out_in"
    w, scale = (Q8.double(), Q8_SCALE) if int8 else (torch.randn(DOUT, D, generator=g64, dtype=torch.float64), None)
    w_real = w * scale.double()[:, None] if int8 else w
    a, b = (torch.randn(L, R, n, generator=g64, dtype=torch.float64) for n in (D, DOUT))
    grad = torch.randn(len(idx), DOUT, generator=g64, dtype=torch.float64)
    s = torch.randn(len(idx), R, generator=g64, dtype=torch.float64)
    valid = (idx >= 0) & (idx < L)
    s[~valid] = 0  # as the forward keeps it
    ds = SCALING * torch.einsum("to,tro->tr", grad, _gathered(b, idx))
    dx = grad @ w_real + torch.einsum("tr,trd->td", ds, _gathered(a, idx))
    d_b = torch.stack([s[idx == slot].T @ grad[idx == slot] for slot in range(L)])
    assert (d_b[[1, 3]] == 0).all()

    stored = Q8 if int8 else (w.T.contiguous() if layout == "in_out" else w).float()

    def run(g):
        scales = (scale.to(device), None) if int8 else (None, None)
        f32 = [t.float().to(device) for t in (g, a, b, s)]
        return _linear_fused.linear_lora_backward(
            f32[0], stored.to(device), f32[1], f32[2], idx.to(device), f32[3], SCALING, layout, backend, *scales
        )

    got = run(grad)
    for actual, expected in zip(got, (dx, ds, d_b), strict=True):
        assert actual.dtype == torch.float32 and actual.shape == expected.shape
        assert_close(actual.cpu(), expected, torch.float32)
    assert (got[2].cpu()[[1, 3]] == 0).all()
    poisoned = grad.clone()
    poisoned[idx == 0] = float("inf")
    got = [t.cpu() for t in run(poisoned)]
    others = (idx != 0).tolist()
    assert torch.isfinite(got[2][1:]).all() and not torch.isfinite(got[2][0]).all()
    assert_close(got[2][1:], d_b[1:], torch.float32)
    assert_close(got[0][others], dx[others], torch.float32)
    assert_close(got[1][others], ds[others], torch.float32)
    if not on_xla:
        args = (grad.float(), stored, a.float(), b.float(), idx, s.float(), SCALING, layout, "auto", scale, None)
        torch.library.opcheck(OPS.linear_lora_backward, args)


def test_linear_grads_take_the_one_pass_only_where_its_kernel_holds_db_and_pays(xla_device, monkeypatch):
    """``linear_lora_backward`` is taken where its kernel runs and pays: the Pallas backend, a plan whose VMEM
    holds dB's f32 [L, R, N] sum and, on a TPU, a modelled time no worse than the two passes (Llama-3-8B
    gate_proj's backward at T = 8192, rank 64 on v6e: 8 slots take it; 32 slots plan only 128 x 256 x 256 tiles,
    modelled 18x slower than the two passes; 64 slots' 235 MB sum has no plan; never on "xla"). Where it is not
    taken, the backward is ``bgmv_lora_grads`` as before (checked on the pallas backend with the choice refused)."""
    from torch_xla_lora.bench import tpu_model, tpu_train_model

    takes = _linear_fused.takes_one_pass_backward
    with monkeypatch.context() as patch:
        patch.setattr(torch_xla_lora.ops, "device_generation", lambda: "v6e")
        assert takes(8192, 14336, 4096, 64, 8, torch.bfloat16, "pallas")
        assert not takes(8192, 14336, 4096, 64, 32, torch.bfloat16, "pallas")
        assert not takes(8192, 14336, 4096, 64, 64, torch.bfloat16, "pallas")
        assert not takes(8192, 14336, 4096, 64, 8, torch.bfloat16, "xla")
    indices = tpu_model.contiguous_requests(8192, 32, 8)
    planned = tpu_model.fused_base_cost(  # (the 32-slot pass plans: it is refused for its price)
        tpu_model.CHIPS["v6e"], indices, 14336, 4096, 64, 32, layout="in_out", keep_s=True, a_grad=True
    )
    assert planned is not None
    assert tpu_train_model.one_pass_backward_cost(tpu_model.CHIPS["v6e"], indices, 4096, 14336, 64, 32) is None
    monkeypatch.setattr(_linear_fused, "takes_one_pass_backward", lambda *args, **kwargs: False)
    idx = _indices("blocks").to(xla_device)
    case = CASES["linear_lora_train"]
    tensors = _on(_tensors("linear_lora_train", len(idx), torch.float32), xla_device)
    leaves = {k: v.detach().requires_grad_() for k, v in tensors.items()}
    out = _call(case, leaves, idx, "pallas")
    log = _OpLog()
    with log:
        torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
    assert "xla_lora.bgmv_lora_grads" in log.names and "xla_lora.linear_lora_backward" not in log.names, log.names


def test_layers_run_the_train_forward_with_grad_only(xla_device):
    """On the XLA-native backend the layers' LoRA runs bgmv_shrink_expand_train when grad is enabled and the
    slot tensors need gradients, and the serving op otherwise (no_grad, frozen slots, or CPU tensors)."""
    from torch_xla_lora.layers.base import fused_lora

    idx = _indices("blocks")
    tensors = _tensors("bgmv_shrink_expand", len(idx), torch.float32)
    for device, trainable, grad, expected in (
        (xla_device, True, True, "bgmv_shrink_expand_train"),
        (xla_device, True, False, "bgmv_shrink_expand"),
        (xla_device, False, True, "bgmv_shrink_expand"),
        (torch.device("cpu"), True, True, "bgmv_shrink_expand"),
    ):
        t = _on(tensors, device)
        a, b = (t[k].requires_grad_(trainable) for k in ("a", "b"))
        log = _OpLog()
        with log, torch.set_grad_enabled(grad):
            fused_lora(t["x"], t["base"], a, b, idx.to(device), "auto")
        assert [n for n in log.names if n.startswith("xla_lora.")] == [f"xla_lora.{expected}"], (
            device,
            trainable,
            grad,
        )


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the ops dispatched within it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.calls: list[tuple[str, tuple]] = []  # (name, positional arguments)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        self.calls.append((self.names[-1], args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["bgmv_shrink_expand", "linear_lora_out_in"])
def test_backward_runs_the_fused_op_and_double_backward_the_separate_ones(name):
    """A training backward (dA and dB needed, no create_graph) runs one bgmv_lora_grads and no separate
    weight-gradient op; with create_graph=True it runs the separate, differentiable ops instead. Would catch the
    fused backward silently falling back (or a double backward through the non-differentiable op)."""
    case, idx = CASES[name], _indices("mixed")
    tensors = _tensors(name, T, torch.float32)
    for create_graph, fused in ((False, 1), (True, 0)):
        leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
        out = _call(case, leaves, idx)
        log = _OpLog()
        with log:
            torch.autograd.grad(out.sum(), list(leaves.values()), create_graph=create_graph)
        assert log.names.count("xla_lora.bgmv_lora_grads") == fused, log.names
        assert ("xla_lora.bgmv_weight_grad" in log.names) == (not fused), log.names


# The XLA-native training ops on several sorted token blocks (64 tokens each from T = 64 on), in token order
# shuffled: sorted, slot 0's run crosses a block boundary, the second block holds three slots (two runs start
# inside it: the extra visits), the last block starts on slot 4 and ends in rows without adapter and padding.
MANY_BLOCKS = [0] * 70 + [2] * 3 + [4] * 60 + [-1] * 12 + [L + 1] * 5


@pytest.mark.parametrize("saved_s", [False, True], ids=["s-recomputed", "s-kept"])
def test_xla_native_training_ops_on_several_blocks(saved_s, xla_device):
    """bgmv_shrink_expand_train's (out, s) and bgmv_lora_grads's dA, dB and dx on the XLA-native backend, where
    runs of one slot start inside token blocks, against float64 plain math; slots no token uses get exact
    zeros and rows without adapter, holding Inf in x, reach nothing."""
    order = torch.randperm(len(MANY_BLOCKS), generator=torch.Generator().manual_seed(3))
    idx = torch.tensor(MANY_BLOCKS, dtype=torch.int32)[order]
    tensors = _tensors("bgmv_shrink_expand", len(idx), torch.float32)
    grad_out, expected = _lora_grads_expected(tensors, idx)
    without = (idx < 0) | (idx >= L)
    tensors["x"][without] = float("inf")
    t = _on(tensors, xla_device)
    out, s = OPS.bgmv_shrink_expand_train(t["x"], t["a"], t["b"], t["base"], idx.to(xla_device), SCALING, "xla")
    t64 = {k: v.double() for k, v in tensors.items()}
    x64 = t64["x"].nan_to_num(posinf=0.0)
    assert_close(out.cpu(), t64["base"] + _lora(x64, t64["a"], t64["b"], idx, SCALING), torch.float32)
    assert (s.cpu()[without] == 0).all()
    assert_close(s.cpu(), SCALING * torch.einsum("trd,td->tr", _gathered(t64["a"], idx), x64), torch.float32)
    extra = (s,) if saved_s else ()
    grads = OPS.bgmv_lora_grads(
        grad_out.to(xla_device), t["x"], t["a"], t["b"], idx.to(xla_device), SCALING, True, "xla", *extra
    )
    for got, key in zip(grads, ("a", "b", "x"), strict=True):
        assert_close(got.cpu(), expected[key], torch.float32)
    for grad in grads[:2]:
        assert (grad.cpu()[[1, 3]] == 0).all()


@pytest.mark.parametrize("num_slots", [4, 20], ids=["selected", "scattered"])
def test_partial_weight_grads_summed_per_slot(num_slots):
    """The XLA-native backward's per-slot sum of the blocks' partial weight gradients, both ways it is taken
    (selection up to SELECT_SUM_MAX_SLOTS slots, a scatter-add beyond): each slot gets the sum of its blocks,
    a slot without blocks exact zeros, blocks without slot (-1) nothing, and an Inf in one slot's partial sum
    no other slot."""
    import jax.numpy as jnp

    from torch_xla_lora.ops import _lora_grads_jax

    assert (num_slots > _lora_grads_jax.SELECT_SUM_MAX_SLOTS) == (num_slots == 20)
    partial = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(4))
    partial[1, 2, 4] = float("inf")
    primary = torch.tensor([0, 2, 2, 3, -1, 3], dtype=torch.int32)
    out = _lora_grads_jax._sum_by_slot(jnp.asarray(partial.numpy()), jnp.asarray(primary.numpy()), num_slots)
    out = torch.from_numpy(out.__array__().copy())
    expected = torch.zeros(num_slots, 3, 5)
    for block, slot in enumerate(primary.tolist()):
        if slot >= 0:
            expected[slot] += partial[block]
    assert out.shape == expected.shape
    assert torch.isinf(out[2, 2, 4]) and torch.equal(out[[0, 3]], expected[[0, 3]])
    others = [slot for slot in range(num_slots) if slot not in (0, 2, 3)]
    assert (out[others] == 0).all() and torch.isfinite(out[others]).all()
