"""fastloss.ops._custom_op: eager calls on plain tensors run an autograd.Function around the op's implementation,
everything else (dispatch modes, fake tensors, functorch, torch.compile) the torch.library op, and the two agree:
on a toy op (every rule) and on every loss's ops through the public functions."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from _helpers import available_backends, leaf
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from fastloss.functional import (
    angle_loss,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    batch_semi_hard_triplet_loss,
    cosent_loss,
    mnrl_loss,
)
from fastloss.ops._custom_op import custom_op


class Through(TorchDispatchMode):
    """Sees every op and changes nothing: the calls under it take the torch.library op."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _toy(x: Tensor, ys: list[Tensor], k: float) -> tuple[Tensor, Tensor, Tensor]:
    # (x * k + sum(ys), (x * x).sum(), a saved tensor)
    return x * k + sum(ys), (x * x).sum(), x.clone()


def _toy_fake(x, ys, k):
    return torch.empty_like(x), x.new_empty(()), torch.empty_like(x)


def _toy_setup(ctx, inputs, output):
    x, ys, k = inputs
    ctx.save_for_backward(x)
    ctx.k, ctx.n = k, len(ys)


SAVED_GRADS = []  # what the toy's backward got for the output it does not read


def _toy_backward(ctx, g_out, g_sq, g_saved):
    (x,) = ctx.saved_tensors
    SAVED_GRADS.append(g_saved)
    return g_out * ctx.k + 2 * x * g_sq, [g_out] * ctx.n, None


TOY = custom_op("_test_toy", _toy, fake=_toy_fake, setup_context=_toy_setup, backward=_toy_backward, reads=2)


def _triple(x: Tensor) -> Tensor:
    return x * 3


TOY_NO_GRAD = custom_op("_test_toy_no_grad", _triple, fake=torch.empty_like)


def _run(fn, *inputs):
    """fn's output and the gradients of its sum over the inputs (None where an input gets none)."""
    leaves = [leaf(x) for x in inputs]
    out = fn(*leaves)
    torch.autograd.backward([o.sum() for o in out if o.requires_grad])
    return [o.detach() for o in out], [x.grad for x in leaves], out


def _toy_call(x, y0, y1):
    return TOY(x, [y0, y1], 1.5)[:2]


def test_eager_call_is_a_function_and_matches_the_op():
    inputs = [torch.randn(3, 4) for _ in range(3)]
    out, grads, raw = _run(_toy_call, *inputs)
    assert type(raw[0].grad_fn).__name__ == "fastloss__test_toyBackward"
    assert SAVED_GRADS[-1] is None  # not materialised: the op's wrapper gives zeros
    with Through() as mode:
        out_op, grads_op, raw_op = _run(_toy_call, *inputs)
    assert "fastloss._test_toy.default" in mode.seen
    assert type(raw_op[0].grad_fn).__name__.startswith("GeneratedBackwardFor_fastloss__test_toy")
    for a, b in zip(out + grads, out_op + grads_op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x, y0, y1 = inputs
    torch.testing.assert_close(grads[0], 1.5 + 2 * x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], torch.ones_like(y0), rtol=0, atol=0)
    torch.testing.assert_close(grads[2], torch.ones_like(y1), rtol=0, atol=0)


def test_gradcheck_and_undefined_gradients():
    inputs = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(_toy_call, inputs)
    x = leaf(inputs[0])
    TOY(x, [], 2.0)[1].backward()  # the first output unused: its gradient is materialised as zeros for the formula
    torch.testing.assert_close(x.grad, 2 * inputs[0].detach(), rtol=0, atol=0)


def test_fake_and_meta_tensors_take_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(3, 4)
        out = TOY(x, [x], 2.0)
    assert out[0].shape == (3, 4) and out[1].shape == ()
    meta = torch.empty(3, 4, device="meta")
    assert TOY(meta, [meta], 2.0)[0].device.type == "meta"


def test_compile_fullgraph():
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    fn = torch.compile(lambda a, b: TOY(a, [b], 2.0)[0], fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, y), 2 * x + y, rtol=0, atol=0)


def test_op_without_backward():
    x = leaf(torch.randn(4))
    with torch.no_grad():
        torch.testing.assert_close(TOY_NO_GRAD(x), 3 * x.detach(), rtol=0, atol=0)
    out = TOY_NO_GRAD(x)  # with grad: the op, whose missing formula raises on backward rather than giving nothing
    with pytest.raises(RuntimeError, match="autograd"):
        out.sum().backward()


def _gram(x: Tensor) -> Tensor:
    return x @ x.t()


GRAM = custom_op("_test_gram", _gram, fake=lambda x: x.new_empty((x.shape[0], x.shape[0])))


@pytest.mark.parametrize("path", ["eager", "op"])
def test_autocast_is_off_inside(path):
    x = torch.randn(5, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Through() if path == "op" else nullcontext():
        assert (x @ x.t()).dtype == torch.bfloat16  # what the op would give without its guard
        got = GRAM(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x @ x.t(), rtol=0, atol=0)


def test_custom_op_needs_backward_and_setup_together():
    with pytest.raises(ValueError, match="together"):
        custom_op("_test_bad", _toy, fake=_toy_fake, backward=_toy_backward)


# every loss's ops: the public functions give the same values and gradients through both paths

_G = torch.Generator().manual_seed(0)


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_G).to(dtype)


LABELS = torch.tensor([0, 1, 0, 2, 1, 2, 0, 3, 3])
GTE_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
CASES = {
    "mnrl": (lambda q, p, n: mnrl_loss(q, [p, n], 20.0), 3),
    "gte": (lambda q, p: mnrl_loss(q, p, 20.0, directions=GTE_DIRECTIONS), 2),
    "cosent": (lambda a, b: cosent_loss(a, b, torch.linspace(0, 1, a.shape[0], device=a.device), 20.0), 2),
    "angle": (lambda a, b: angle_loss(a, b, torch.linspace(0, 1, a.shape[0], device=a.device), 20.0), 2),
    "batch_hard": (lambda x: batch_hard_triplet_loss(x, LABELS.to(x.device), 0.5), 1),
    "batch_all": (lambda x: batch_all_triplet_loss(x, LABELS.to(x.device), 0.5), 1),
    "semi_hard": (lambda x: batch_semi_hard_triplet_loss(x, LABELS.to(x.device), 0.5), 1),
}


# the MNRL cases with dot-product similarity: what they compute on unit vectors under autocast
AS_DOT = {
    "mnrl": lambda q, p, n: mnrl_loss(q, [p, n], 20.0, similarity="dot"),
    "gte": lambda q, p: mnrl_loss(q, p, 20.0, similarity="dot", directions=GTE_DIRECTIONS),
}


def _graph(x: Tensor) -> set[str]:
    """The names of the autograd nodes x comes from."""
    seen, todo = {}, [x.grad_fn]  # seen holds the nodes: a freed node's id may come back for another
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            todo.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen.values()}


@pytest.mark.parametrize("backend", ["default", "native", "triton", "blocked"])
@pytest.mark.parametrize("case", list(CASES))
def test_losses_match_through_the_op(case, backend, monkeypatch):
    if backend == "blocked":
        if not case.startswith(("mnrl", "gte")):
            pytest.skip("the row-block op is MNRL's")
        monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    elif backend != "default":
        if backend not in available_backends():
            pytest.skip(f"{backend} does not run here (not built, or no Triton interpreter)")
        monkeypatch.setenv("FASTLOSS_BACKEND", backend)
    fn, n_inputs = CASES[case]
    inputs = [_x(9, 8) for _ in range(n_inputs)]

    def loss(*xs):
        return (fn(*xs),)

    out, grads, raw = _run(loss, *inputs)
    with Through() as mode:
        out_op, grads_op, raw_op = _run(loss, *inputs)
    assert any(name.startswith("fastloss.") for name in mode.seen)
    assert any(name.startswith("fastloss_") for name in _graph(raw[0]))
    assert any(name.startswith("GeneratedBackwardFor_fastloss_") for name in _graph(raw_op[0]))
    for a, b in zip(out + grads, out_op + grads_op):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


AUTOCAST = [
    pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}", marks=[pytest.mark.gpu] if device == "cuda" else [])
    for device in ("cpu", "cuda")
    for dtype in (torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("device, dtype", AUTOCAST)
@pytest.mark.parametrize("backend", ["default", "blocked"])
@pytest.mark.parametrize("case", list(CASES))
def test_losses_under_autocast(case, backend, device, dtype, monkeypatch):
    """Under the caller's autocast the MNRL family computes as on its similarity's operands (cosine: the unit
    vectors) cast to autocast's dtype (where sentence-transformers' similarity matmul runs under it:
    fastloss.functional.mnrl.autocast_dtype), the other fused losses as without autocast (ATen's matmuls in the C++
    and torch-op paths would otherwise run in half precision), values and gradients bit for bit. Except batch-hard's
    gradient on CUDA, whose default backward (torch ops; fastloss._C's gathering kernel only with
    FASTLOSS_CUDA_KERNELS=1) scatters with index_add_: its atomic adds make two runs of one call differ in the last
    bits (seen on an H200: 3e-8 absolute, 1.6e-6 relative), far below the ~1e-3 of a half-precision product."""
    if backend == "blocked":
        if not case.startswith(("mnrl", "gte")):
            pytest.skip("the row-block op is MNRL's")
        monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    fn, n_inputs = CASES[case]
    inputs = [_x(9, 8).to(device) for _ in range(n_inputs)]

    def loss(*xs):
        return (fn(*xs),)

    def as_autocast(*xs):  # sentence-transformers' cos_sim under autocast: unit vectors (fp32) multiplied in dtype
        units = [torch.nn.functional.normalize(x, dim=-1).to(dtype) for x in xs]
        return (AS_DOT[case](*units),)

    out, grads, _ = _run(as_autocast if case in AS_DOT else loss, *inputs)
    with torch.autocast(device, dtype=dtype):
        out_ac, grads_ac, _ = _run(loss, *inputs)
    for a, b in zip(out + grads, out_ac + grads_ac):
        loose = case == "batch_hard" and device == "cuda" and a is not out[0]
        torch.testing.assert_close(a, b, rtol=1e-5 if loose else 0, atol=1e-7 if loose else 0)
