"""The batch-hard backward kernels: fastloss._C.batch_hard_triplet_bwd (CPU) and batch_hard_triplet_bwd_cuda (CUDA,
gpu-marked) against the torch-ops path of fastloss.ops.triplet.batch_hard_bwd, on mined and on synthetic selections
(no pair, self pairs, rows selected by many others, zero distances), every metric and dtype, odd shapes; then the
public losses with the native backward against the fp64 reference, gradcheck, opcheck, determinism, dispatch and
bad input."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from _helpers import leaf  # noqa: E402

import fastloss.functional as FF  # noqa: E402
from fastloss import _backend  # noqa: E402
from fastloss.ops import triplet as ops  # noqa: E402
from fastloss.reference import triplet as ref  # noqa: E402

METRICS = {"euclidean": ops.EUCLIDEAN, "squared": ops.SQUARED_EUCLIDEAN, "cosine": ops.COSINE}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
# (rtol, atol) of the kernels against the torch path (fp64 inputs: against the same formula in fp64, since the torch
# path sums in fp32). Both sum in fp32 in different orders and round to x's dtype, so fp16 / bf16 may differ by an
# ulp of the output.
TOL = {
    torch.float32: (2e-5, 2e-6),
    torch.float64: (1e-10, 1e-12),
    torch.float16: (2e-3, 2e-4),
    torch.bfloat16: (1.6e-2, 2e-3),
}
SIZES = [1, 7, 63, 129]
DIMS = [1, 33]
REF_FNS = {  # the public losses' metric names
    "euclidean": ref.euclidean_distance,
    "squared_euclidean": lambda e: ref.euclidean_distance(e, squared=True),
    "cosine": ref.cosine_distance,
}

needs_native = pytest.mark.skipif(
    not _backend.native_has("batch_hard_triplet_bwd"),
    reason="fastloss._C lacks batch_hard_triplet_bwd (not built, or built before it)",
)
_CUDA_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here"),
    pytest.mark.skipif(
        not _backend.native_has("batch_hard_triplet_bwd_cuda"),
        reason="fastloss._C was built without CUDA (FASTLOSS_BUILD_CUDA)",
    ),
)


def needs_cuda_kernel(fn):
    for mark in _CUDA_MARKS:
        fn = mark(fn)
    return fn


def _x(batch, dim, dtype=torch.float32, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, dim, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _grads(batch, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1000)
    return tuple(torch.randn(batch, generator=g).to(device) for _ in range(2))


def _mined(x, labels, metric):
    """Selections as the losses get them (the blocked torch mining, on the CPU)."""
    _, _, sel_idx, sel_d = ops._batch_hard_fwd_blocked(x.cpu(), labels, metric)
    return sel_idx.to(x.device), sel_d.to(x.device)


def _synthetic(x, metric, seed):
    """Selections the mining can produce and a few it rarely does: -1 (no pair), self pairs, rows 0 and 1 chosen by
    about half of the batch each, and zero distances, with the true distances of x elsewhere."""
    batch = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    sel_idx = torch.randint(0, batch, (3, batch), generator=g)
    hub = torch.rand(3, batch, generator=g)
    sel_idx[hub < 0.3] = 0
    sel_idx[(hub >= 0.3) & (hub < 0.5)] = min(1, batch - 1)
    sel_idx[torch.rand(3, batch, generator=g) < 0.2] = -1
    sel_idx[2, ::3] = torch.arange(0, batch, 3)  # self pairs
    xf = x.detach().cpu().float()
    rows = torch.arange(batch).expand(3, batch)
    cols = sel_idx.clamp_min(0)
    if metric == ops.COSINE:
        xh = torch.nn.functional.normalize(xf, dim=1)
        sel_d = 1 - (xh[rows] * xh[cols]).sum(-1)
    else:
        sel_d = (xf[rows] - xf[cols]).square().sum(-1)
        sel_d = sel_d.sqrt() if metric == ops.EUCLIDEAN else sel_d
    sel_d[torch.rand(3, batch, generator=g) < 0.1] = 0.0
    sel_d = torch.where(sel_idx >= 0, sel_d, 0.0)
    return sel_idx.to(x.device), sel_d.to(x.device)


def _oracle_fp64(grad_hp, grad_hn, x, sel_idx, sel_d, metric):
    """The torch path's formula (module docstring of fastloss.ops.triplet) in fp64: the truth for fp64 inputs."""
    batch = x.shape[0]
    rows = torch.arange(batch, device=x.device).repeat(3)
    cols = sel_idx.reshape(-1)
    valid = cols >= 0
    cols = torch.where(valid, cols, rows)
    coef = torch.where(valid, torch.cat([grad_hp, grad_hn, grad_hn]).double(), 0.0)
    if metric == ops.COSINE:
        x_hat = torch.nn.functional.normalize(x, dim=1).double()
        dx_hat = torch.zeros_like(x_hat).index_add_(0, rows, -coef[:, None] * x_hat[cols])
        dx_hat.index_add_(0, cols, -coef[:, None] * x_hat[rows])
        return ops._normalize_backward(x.double(), dx_hat)
    d = sel_d.reshape(-1).double()
    weight = coef / torch.where(d > 0, d, 1.0) if metric == ops.EUCLIDEAN else 2.0 * coef
    weight = torch.where(d > 0, weight, 0.0)
    g = weight[:, None] * (x.double()[rows] - x.double()[cols])
    return torch.zeros_like(x.double()).index_add_(0, rows, g).index_add_(0, cols, -g)


def _truth(*args):
    """fp64 inputs: the fp64 oracle (the torch path sums in fp32); else the torch path itself."""
    x = args[2]
    return _oracle_fp64(*args) if x.dtype == torch.float64 else ops._batch_hard_bwd_torch(*args)


def _assert_bwd_close(got, want, dtype, atol_scale: float = 1.0):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * atol_scale)


def _assert_cuda_close(got, args, dtype):
    """The CUDA kernel's result against the truth. The torch path adds with atomics on CUDA (index_add_), in no fixed
    order, so its fp32 sums are no reference to within fp32's tolerance: fp32 and fp64 take the fp64 oracle, fp32 with
    atol relative to the largest entry (squared distances' gradients reach ~400 at these shapes, and cancel: against
    the oracle the CPU kernel, the same sums in the same order, is within 0.28 of that bound; an unscaled atol fails
    it by 5x). Half dtypes take the torch path, whose order moves nothing beyond their rounding."""
    if dtype in (torch.float32, torch.float64):
        want = _oracle_fp64(*args)
        scale = max(1.0, float(want.abs().max())) if dtype == torch.float32 else 1.0
        _assert_bwd_close(got, want.to(dtype), dtype, atol_scale=scale)
    else:
        _assert_bwd_close(got, ops._batch_hard_bwd_torch(*args), dtype)


@pytest.fixture
def native_ops(monkeypatch):
    """CPU tensors as they run without the interpreter, on the default backend rule; records the native calls."""
    monkeypatch.setattr(ops, "_interpret", lambda: False)
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    calls = []
    native = ops._batch_hard_bwd_native

    def spy(*args):
        calls.append(args[-1])
        return native(*args)

    monkeypatch.setattr(ops, "_batch_hard_bwd_native", spy)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# CPU kernel against the torch path


@needs_native
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch", SIZES)
@pytest.mark.parametrize("selection", ["mined", "synthetic"])
@pytest.mark.parametrize("metric", list(METRICS.values()), ids=list(METRICS))
def test_native_equals_torch_path(metric, selection, batch, dim, dtype):
    x = _x(batch, dim, dtype, seed=batch + dim)
    labels = torch.arange(batch) % max(1, batch // 3)
    sel_idx, sel_d = _mined(x, labels, metric) if selection == "mined" else _synthetic(x, metric, seed=batch)
    grad_hp, grad_hn = _grads(batch, seed=batch)
    args = (grad_hp, grad_hn, x, sel_idx, sel_d, metric)
    _assert_bwd_close(ops._batch_hard_bwd_native(*args), _truth(*args), dtype)
    if dtype == torch.float32:  # the fp64 oracle is the torch path's formula
        torch.testing.assert_close(ops._batch_hard_bwd_torch(*args).double(), _oracle_fp64(*args), rtol=1e-4, atol=1e-5)


@needs_native
@pytest.mark.parametrize("metric", list(METRICS.values()), ids=list(METRICS))
def test_native_many_rows_select_one(metric):
    """Every row picks rows 0 and 5 (a long incoming list), row 0 also picks itself."""
    batch = 300
    x = _x(batch, 33, seed=4)
    sel_idx = torch.stack([torch.zeros(batch, dtype=torch.long), torch.full((batch,), 5), torch.full((batch,), -1)])
    sel_idx[2, 0] = 0
    _, sel_d = _synthetic(x, metric, seed=1)
    sel_d = sel_d.abs() + 0.5
    grad_hp, grad_hn = _grads(batch, seed=4)
    args = (grad_hp, grad_hn, x, sel_idx, sel_d, metric)
    _assert_bwd_close(ops._batch_hard_bwd_native(*args), ops._batch_hard_bwd_torch(*args), torch.float32)


@needs_native
@pytest.mark.parametrize("metric", list(METRICS.values()), ids=list(METRICS))
@pytest.mark.parametrize("case", ["zeros", "duplicates", "tiny", "huge"])
def test_native_degenerate_inputs_are_finite(metric, case):
    batch = 37
    x = _x(batch, 20, seed=5)
    if case == "zeros":
        x[::4] = 0.0
    elif case == "duplicates":
        x[1::2] = x[0::2][: batch // 2]
    else:
        x = x * (1e-18 if case == "tiny" else 1e15)
    labels = torch.arange(batch) % 5
    sel_idx, sel_d = _mined(x, labels, metric)
    grad_hp, grad_hn = _grads(batch, seed=5)
    args = (grad_hp, grad_hn, x, sel_idx, sel_d, metric)
    got, want = ops._batch_hard_bwd_native(*args), ops._batch_hard_bwd_torch(*args)
    assert torch.isfinite(got).all()
    scale = float(want.abs().max().clamp_min(1e-30))  # the gradients' own scale (1e-18 inputs: 1/d ~ 1e18)
    torch.testing.assert_close(got / scale, want / scale, rtol=2e-5, atol=2e-6)


@needs_native
def test_native_is_deterministic_across_thread_counts():
    batch = 257
    x = _x(batch, 65, seed=6)
    sel_idx, sel_d = _synthetic(x, ops.EUCLIDEAN, seed=6)
    grad_hp, grad_hn = _grads(batch, seed=6)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            outs.append(ops._batch_hard_bwd_native(grad_hp, grad_hn, x, sel_idx, sel_d, ops.EUCLIDEAN))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@needs_native
@pytest.mark.parametrize("metric", list(METRICS.values()), ids=list(METRICS))
def test_native_empty_and_strided_inputs(metric):
    x = _x(0, 4)
    empty = torch.zeros(0)
    out = ops._batch_hard_bwd_native(empty, empty, x, torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0), metric)
    assert out.shape == (0, 4)
    # expanded (stride-0) gradients, as the backward of mean() hands them over, and a non-contiguous x
    batch = 9
    xt = _x(12, batch, seed=7).t()[:, :11]
    sel_idx, sel_d = _synthetic(xt, metric, seed=7)
    grad = torch.full((), 0.25).expand(batch)
    args = (grad, grad, xt, sel_idx, sel_d, metric)
    _assert_bwd_close(ops._batch_hard_bwd_native(*args), ops._batch_hard_bwd_torch(*args), torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# the public losses with the native backward


def _check_loss_against_reference(kind, metric, x, labels):
    fn = getattr(FF, "batch_hard_triplet_loss" if kind == "hard" else "batch_hard_soft_margin_triplet_loss")
    ref_fn = getattr(ref, fn.__name__)
    margin = (1.5,) if kind == "hard" else ()
    xo = leaf(x)
    loss = fn(xo, labels, *margin, distance_metric=metric)
    loss.backward()
    xr = leaf(x.double())  # half rows too: the losses compute in fp32 (cosine normalises them in fp32, ad5f050)
    truth = ref_fn(xr, labels, *margin, REF_FNS[metric])
    truth.backward()
    torch.testing.assert_close(loss.double(), truth, rtol=TOL[torch.float32][0], atol=TOL[torch.float32][1])
    rtol, atol = TOL[torch.float32] if x.dtype == torch.float64 else TOL[x.dtype]  # the gradients are in x's dtype
    torch.testing.assert_close(xo.grad.double(), xr.grad, rtol=rtol, atol=atol)


@needs_native
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("batch", [1, 7, 63, 129])
@pytest.mark.parametrize("metric", list(REF_FNS))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_losses_with_native_backward_match_reference(native_ops, kind, metric, batch, dtype):
    labels = torch.arange(batch) % max(1, batch // 4)
    labels[-1:] = 1000  # an anchor without a positive
    _check_loss_against_reference(kind, metric, _x(batch, 33, dtype, seed=batch), labels)
    assert native_ops == [ops.METRIC_NAMES[metric]]


@needs_native
@pytest.mark.parametrize("metric", list(REF_FNS))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_gradcheck_fp64_native(monkeypatch, kind, metric):
    """fp64 gradcheck through the public loss with FASTLOSS_BACKEND=native (mining and backward in fastloss._C, both
    in fp64, the loss fp64) at gradcheck's own step and tolerances; the data keep every selection far from a tie."""
    monkeypatch.setattr(ops, "_interpret", lambda: False)
    monkeypatch.setenv("FASTLOSS_BACKEND", "native")
    labels = torch.tensor([0, 1, 0, 1, 2, 0, 2])
    x = leaf(_x(len(labels), 5, torch.float64, seed=9))
    fn = getattr(FF, "batch_hard_triplet_loss" if kind == "hard" else "batch_hard_soft_margin_triplet_loss")
    margin = (0.8,) if kind == "hard" else ()
    calls = []
    native = ops._batch_hard_bwd_native
    monkeypatch.setattr(ops, "_batch_hard_bwd_native", lambda *a: calls.append(a[-1]) or native(*a))
    assert torch.autograd.gradcheck(lambda e: fn(e, labels, *margin, distance_metric=metric), (x,))
    assert calls


@needs_native
@pytest.mark.parametrize("metric", list(METRICS.values()), ids=list(METRICS))
def test_opcheck_bwd_op_native(native_ops, metric):
    batch = 9
    x = _x(batch, 5, seed=1)
    sel_idx, sel_d = _synthetic(x, metric, seed=2)
    grad_hp, grad_hn = _grads(batch, seed=3)
    torch.library.opcheck(torch.ops.fastloss.batch_hard_triplet_bwd, (grad_hp, grad_hn, x, sel_idx, sel_d, metric))
    assert native_ops


@needs_native
def test_dispatch_native_and_forced_torch(native_ops, monkeypatch):
    batch = 11
    x = _x(batch, 6, seed=2)
    sel_idx, sel_d = _synthetic(x, ops.EUCLIDEAN, seed=2)
    grad_hp, grad_hn = _grads(batch, seed=2)
    args = (grad_hp, grad_hn, x, sel_idx, sel_d, ops.EUCLIDEAN)
    native = ops.batch_hard_bwd(*args)
    assert native_ops == [ops.EUCLIDEAN]
    monkeypatch.setenv("FASTLOSS_BACKEND", "torch")
    torch_path = ops.batch_hard_bwd(*args)
    assert native_ops == [ops.EUCLIDEAN]
    monkeypatch.setenv("FASTLOSS_CUDA_KERNELS", "1")  # a CUDA switch: CPU tensors ignore it
    monkeypatch.delenv("FASTLOSS_BACKEND")
    ops.batch_hard_bwd(*args)
    assert native_ops == [ops.EUCLIDEAN] * 2
    _assert_bwd_close(native, torch_path, torch.float32)


def test_bad_metric_is_a_value_error_before_any_kernel():
    x = _x(4, 3)
    g = torch.zeros(4)
    with pytest.raises(ValueError, match="metric must be 0"):
        ops.batch_hard_bwd(g, g, x, torch.full((3, 4), -1), torch.zeros(3, 4), 7)


@needs_native
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(grad_hp=torch.zeros(4)), "grad_hp and grad_hn must hold 5 values"),
        (dict(x=_x(5, 3)[0]), "x must be 2-D"),
        (dict(x=_x(5, 3).long()), "x must be float16"),
        (dict(sel_idx=torch.zeros(2, 5, dtype=torch.long)), r"sel_idx must be int64 \[3, 5\]"),
        (dict(sel_idx=torch.zeros(3, 5, dtype=torch.int32)), r"sel_idx must be int64 \[3, 5\]"),
        (dict(sel_idx=torch.full((3, 5), 5)), r"sel_idx must hold row indices in \[-1, 5\)"),
        (dict(sel_d=torch.zeros(3, 4)), r"sel_d must be a floating \[3, 5\]"),
        (dict(metric=3), "metric must be 0"),
    ],
    ids=["grad_count", "x_1d", "x_int", "sel_rows", "sel_dtype", "sel_range", "sel_d_shape", "metric"],
)
def test_native_rejects_bad_input(change, match):
    args = dict(
        grad_hp=torch.zeros(5),
        grad_hn=torch.zeros(5),
        x=_x(5, 3),
        sel_idx=torch.full((3, 5), -1),
        sel_d=torch.zeros(3, 5),
        metric=0,
    )
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        _backend.native_module().batch_hard_triplet_bwd(*args.values())


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernel (fastloss._C.batch_hard_triplet_bwd_cuda, opt-in with FASTLOSS_CUDA_KERNELS=1) against the torch path


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("dim", [1, 33, 384, 1000])
@pytest.mark.parametrize("batch", [1, 7, 129, 1031])
@pytest.mark.parametrize("selection", ["mined", "synthetic"])
@pytest.mark.parametrize("metric", list(METRICS.values()), ids=list(METRICS))
def test_cuda_equals_torch_path(metric, selection, batch, dim, dtype):
    x = _x(batch, dim, dtype, seed=batch + dim, device="cuda")
    labels = torch.arange(batch) % max(1, batch // 3)
    sel_idx, sel_d = _mined(x, labels, metric) if selection == "mined" else _synthetic(x, metric, seed=batch)
    grad_hp, grad_hn = _grads(batch, seed=batch, device="cuda")
    args = (grad_hp, grad_hn, x, sel_idx, sel_d, metric)
    _assert_cuda_close(ops._batch_hard_bwd_cuda(*args), args, dtype)


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("metric", list(METRICS.values()), ids=list(METRICS))
def test_cuda_many_rows_select_one_and_wide_rows(metric, dtype):
    """A long incoming list (every row picks rows 0 and 5), and D = 16384: cosine's dx^ no longer fits the shared
    memory cache, so the kernel recomputes it in its second pass."""
    for batch, dim in ((3000, 64), (70, 16384)):
        x = _x(batch, dim, dtype, seed=4, device="cuda")
        sel_idx = torch.stack([torch.zeros(batch, dtype=torch.long), torch.full((batch,), 5), torch.arange(batch)])
        sel_idx[2, 1::2] = -1
        sel_d = (torch.rand(3, batch, generator=torch.Generator().manual_seed(batch)) + 0.5).cuda()
        grad_hp, grad_hn = _grads(batch, seed=4, device="cuda")
        args = (grad_hp, grad_hn, x, sel_idx.cuda(), sel_d, metric)
        _assert_cuda_close(ops._batch_hard_bwd_cuda(*args), args, dtype)


@needs_cuda_kernel
@pytest.mark.parametrize("metric", list(METRICS.values()), ids=list(METRICS))
def test_cuda_skips_out_of_range_columns(metric):
    """A column outside [0, B) is never read: the CUDA op treats it as -1 (the CPU op raises; see the .cu header)."""
    x = _x(40, 33, seed=6, device="cuda")
    sel_idx, sel_d = _synthetic(x, metric, seed=6)
    grad_hp, grad_hn = _grads(40, seed=6, device="cuda")
    bad = sel_idx.clone()
    bad[0, ::3], bad[1, 1::5], bad[2, 2::4] = 40, 1 << 40, -7
    none = torch.where((bad < 0) | (bad >= 40), -1, bad)
    got = ops._batch_hard_bwd_cuda(grad_hp, grad_hn, x, bad, sel_d, metric)
    want = ops._batch_hard_bwd_cuda(grad_hp, grad_hn, x, none, sel_d, metric)
    assert torch.equal(got, want)


@needs_cuda_kernel
@pytest.mark.parametrize("metric", list(REF_FNS))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_cuda_switch_through_the_losses(monkeypatch, kind, metric):
    """FASTLOSS_CUDA_KERNELS=1 routes the losses' backward through the kernel: same loss, same gradient, and the
    kernel's result is bitwise reproducible."""
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    # only this kernel: the l2norm kernel behind the same switch could move a cosine distance by an ulp and flip a
    # near-tied selection, which is not what this test is about (tests/test_cuda_kernels.py covers it)
    enabled = _backend.cuda_kernel_enabled
    monkeypatch.setattr(_backend, "cuda_kernel_enabled", lambda op: op == "batch_hard_triplet_bwd_cuda" and enabled(op))
    calls = []
    kernel = ops._batch_hard_bwd_cuda
    monkeypatch.setattr(ops, "_batch_hard_bwd_cuda", lambda *a: calls.append(a[-1]) or kernel(*a))
    fn = getattr(FF, "batch_hard_triplet_loss" if kind == "hard" else "batch_hard_soft_margin_triplet_loss")
    labels = (torch.arange(2053) % 500).cuda()
    x = _x(2053, 384, seed=3, device="cuda")
    grads = []
    for switch in ("0", "1", "1"):
        monkeypatch.setenv("FASTLOSS_CUDA_KERNELS", switch)
        xo = leaf(x)
        loss = fn(xo, labels, distance_metric=metric)
        loss.backward()
        grads.append((loss.detach(), xo.grad))
    assert len(calls) == 2
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-5, atol=2e-7)
    assert torch.equal(grads[1][1], grads[2][1])


@needs_cuda_kernel
@pytest.mark.parametrize("metric", list(METRICS.values()), ids=list(METRICS))
def test_cuda_opcheck(monkeypatch, metric):
    monkeypatch.setenv("FASTLOSS_CUDA_KERNELS", "1")
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    x = _x(9, 5, seed=1, device="cuda")
    sel_idx, sel_d = _synthetic(x, metric, seed=2)
    grad_hp, grad_hn = _grads(9, seed=3, device="cuda")
    torch.library.opcheck(torch.ops.fastloss.batch_hard_triplet_bwd, (grad_hp, grad_hn, x, sel_idx, sel_d, metric))
