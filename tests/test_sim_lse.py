"""The Triton masked scaled-similarity logsumexp (fastloss.ops.sim_lse) against a dense fp64 oracle.

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (fp32 / fp16: the interpreter's bf16
tl.dot is wrong, so bf16 is upcast there and covered for real by the GPU class).
"""

import functools
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from _helpers import force_configs, two_part_value, two_parts  # noqa: E402

from fastloss import _backend  # noqa: E402
from fastloss.ops import sim_lse  # noqa: E402
from fastloss.ops.sim_lse import sim_lse_bwd, sim_lse_fwd  # noqa: E402
from fastloss.ops.two_part import exact, logsumexp2  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# max error relative to the largest reference magnitude of each output
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-4}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
PEN_IDS = ["none", "in_batch_negatives", "hard_negatives", "all_negatives"]


def oracle(r, c, r_inv, c_inv, scale, g, *, period, offset, mask_own, pen_mode, alpha, pos_val=None):
    """The contract, densely in fp64: (lse [M], dr_hat [M, D], dc_hat [N, D], dscale [M], nlse [M]), with P at
    column i + offset replaced by pos_val_i where that is not +inf."""
    r, c, r_inv, c_inv, g = (x.double() for x in (r, c, r_inv, c_inv, g))
    M, N = r.shape[0], c.shape[0]
    s = (r @ c.T) * r_inv[:, None] * c_inv[None, :]
    i = torch.arange(M, device=r.device)[:, None]
    j = torch.arange(N, device=r.device)[None, :]
    own = (j % period) == (i + offset)
    first = j < period
    pen = [torch.zeros_like(own), ~own, own & ~first, ~(own & first)][pen_mode].double()
    logit = scale * s + alpha * pen * s
    if mask_own:
        logit = logit.masked_fill(own, float("-inf"))
    lse = torch.logsumexp(logit, dim=1)
    positive = j == i + offset
    nlse = torch.logsumexp(logit.masked_fill(positive, float("-inf")), dim=1)
    p = torch.where(torch.isfinite(lse)[:, None], torch.exp(logit - lse[:, None]), torch.zeros_like(logit))
    if pos_val is not None:
        pos_val = pos_val.double()[:, None]
        p = torch.where(positive & (pos_val != float("inf")), pos_val, p)
    grad = g[:, None] * p * scale
    dr = (grad * c_inv[None, :]) @ c
    dc = (grad * r_inv[:, None]).T @ r
    return lse, dr, dc, g * (p * s).sum(dim=1), nlse


def make(M, N, D, dtype, *, normalize=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(M, D, generator=gen)
    c = torch.randn(N, D, generator=gen)
    if not normalize:
        r, c = r / D**0.5, c / D**0.5
    g = torch.randn(M, generator=gen)
    r, c, g = r.to(DEVICE, dtype), c.to(DEVICE, dtype), g.to(DEVICE)
    return r, c, inv_norms(r, normalize), inv_norms(c, normalize), g


def inv_norms(x, normalize=True):
    if not normalize:
        return torch.ones(x.shape[0], device=x.device)
    return torch.linalg.vector_norm(x.float(), dim=1).clamp_min(1e-12).reciprocal()


def assert_close(actual, expected, tol, name):
    assert not torch.isnan(actual).any(), f"{name}: NaN in the output (unwritten or 0 * inf)"
    finite = expected[torch.isfinite(expected)]
    ref = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, atol=tol * ref + 1e-9, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def poison(monkeypatch):
    """torch.empty returns NaN-filled float tensors, so an output element the kernels never write fails."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)


def positive_values(M: int, seed: int = 0) -> torch.Tensor:
    """pos_val for the fold: values in [-2, 1] (MNRL passes [-1, 0]), every third row +inf (P kept there)."""
    vals = torch.rand(M, generator=torch.Generator().manual_seed(seed)) * 3 - 2
    vals[::3] = float("inf")
    return vals.to(DEVICE)


def check(r, c, r_inv, c_inv, scale, g, tol, positive=False, **opts):
    """The kernels against the oracle; with ``positive`` also nlse and the backward with a pos_val fold."""
    pos_val = positive_values(r.shape[0]) if positive else None
    expected = oracle(r, c, r_inv, c_inv, float(scale), g, pos_val=pos_val, **opts)
    scale_t = torch.tensor(float(scale), device=r.device)
    lse, nlse = sim_lse_fwd(r, c, r_inv, c_inv, scale_t, positive_col=positive, **opts)
    assert lse.shape == (2, r.shape[0])
    assert_close(two_part_value(lse), expected[0], tol, "lse")
    if positive:
        assert nlse.shape == (2, r.shape[0])
        assert_close(two_part_value(nlse), expected[4], tol, "nlse")
    else:
        assert nlse is None
    dr, dc, dscale = sim_lse_bwd(r, c, r_inv, c_inv, scale_t, lse, g, need_dscale=True, pos_val=pos_val, **opts)
    assert dr.shape == r.shape and dc.shape == c.shape and dscale.shape == (r.shape[0],)
    assert dr.dtype == dc.dtype == dscale.dtype == torch.float32
    for name, actual, want in zip(("dr_hat", "dc_hat", "dscale"), (dr, dc, dscale), expected[1:4]):
        assert_close(actual, want, tol, name)
    return two_part_value(lse), dr, dc, dscale


def shape_id(shape):
    return "M{}N{}D{}".format(*shape)


SHAPES = [(1, 1, 1), (7, 13, 33), (16, 48, 64), (5, 40, 20), (40, 72, 16)]


def test_oracle_matches_autograd():
    """The oracle's backward is the gradient of sum_i g_i lse_i w.r.t. r_hat, c_hat and scale, penalty detached."""
    M, N, D, period, offset, alpha, scale = 5, 12, 9, 4, 1, 0.6, 7.0
    gen = torch.Generator().manual_seed(3)
    r, c, g = torch.randn(M, D, generator=gen), torch.randn(N, D, generator=gen), torch.randn(M, generator=gen)
    r_inv, c_inv = inv_norms(r), inv_norms(c)
    r_hat = (r.double() * r_inv.double()[:, None]).requires_grad_()
    c_hat = (c.double() * c_inv.double()[:, None]).requires_grad_()
    scale_t = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    s = r_hat @ c_hat.T
    j, i = torch.arange(N)[None, :], torch.arange(M)[:, None]
    own = (j % period) == (i + offset)
    logit = (scale_t * s + alpha * (own & (j >= period)).double() * s.detach()).masked_fill(own, -torch.inf)
    lse = torch.logsumexp(logit, dim=1)
    (lse * g.double()).sum().backward()
    want = oracle(r, c, r_inv, c_inv, scale, g, period=period, offset=offset, mask_own=True, pen_mode=2, alpha=alpha)
    assert want[4].isfinite().all()  # every row has candidates besides column i + offset
    torch.testing.assert_close(lse.detach(), want[0])
    torch.testing.assert_close(r_hat.grad, want[1])
    torch.testing.assert_close(c_hat.grad, want[2])
    torch.testing.assert_close(scale_t.grad, want[3].sum())


@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_shapes(poison, shape, dtype, normalize):
    M, N, D = shape
    r, c, r_inv, c_inv, g = make(M, N, D, dtype, normalize=normalize)
    check(r, c, r_inv, c_inv, 20.0, g, TOL[dtype], period=N, offset=0, mask_own=False, pen_mode=0, alpha=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("offset", [0, 3, 6], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("mask_own", [False, True], ids=["keep_own", "mask_own"])
@pytest.mark.parametrize("pen_mode", range(4), ids=PEN_IDS)
def test_masks_and_penalties(poison, pen_mode, mask_own, offset, dtype):
    """W = 8 gathered rows, 5 local rows at ``offset`` (rows past W - offset have no own column), 3 doc columns."""
    r, c, r_inv, c_inv, g = make(5, 24, 20, dtype, seed=1)
    check(
        r,
        c,
        r_inv,
        c_inv,
        20.0,
        g,
        TOL[dtype],
        period=8,
        offset=offset,
        mask_own=mask_own,
        pen_mode=pen_mode,
        alpha=0.7,
        positive=True,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask_own", [False, True], ids=["keep_own", "mask_own"])
@pytest.mark.parametrize("pen_mode", [0, 2, 3], ids=lambda m: PEN_IDS[m])
@pytest.mark.parametrize("bounds", [(8, 16), (5, 13, 19)], ids=["columns", "uneven"])
def test_candidate_blocks(poison, bounds, pen_mode, mask_own, dtype):
    """The candidates as separate blocks (MNRL's doc columns, not concatenated), each launched with the global index
    ``base`` of its first row: the blocks' LSEs combined by logsumexp2, their rows' dr_hat and dscale summed (the
    second block on adds with accumulate) and their dc_hat side by side equal the oracle on the whole candidates,
    with masks, penalties and the positive fold at their global columns. The uneven split cuts the positive column's
    tiles, the first period and a 16-candidate interpreter tile."""
    r, c, r_inv, c_inv, g = make(5, 24, 20, dtype, seed=7)
    opts = dict(period=8, offset=3, mask_own=mask_own, pen_mode=pen_mode, alpha=0.7)
    pos_val = positive_values(5, seed=7)
    lse_w, dr_w, dc_w, dscale_w, nlse_w = oracle(r, c, r_inv, c_inv, 20.0, g, pos_val=pos_val, **opts)
    edges = [0, *bounds, c.shape[0]]
    blocks = [(c[a:b], c_inv[a:b], a) for a, b in zip(edges, edges[1:])]
    stats = [sim_lse_fwd(r, cb, r_inv, ib, 20.0, positive_col=True, base=a, **opts) for cb, ib, a in blocks]
    assert_close(two_part_value(logsumexp2(torch.stack([lse for lse, _ in stats], dim=1), 1)), lse_w, TOL[dtype], "lse")
    assert_close(
        two_part_value(logsumexp2(torch.stack([nlse for _, nlse in stats], dim=1), 1)), nlse_w, TOL[dtype], "nlse"
    )
    dr = torch.empty(5, 20, device=DEVICE)
    dc = torch.empty(24, 20, device=DEVICE)
    dscale = torch.zeros(5, device=DEVICE)
    for k, (cb, ib, a) in enumerate(blocks):
        bwd = sim_lse.SimLseBackward(r, cb, r_inv, ib, 20.0, two_parts(lse_w), g, pos_val=pos_val, base=a, **opts)
        part = torch.empty(5, device=DEVICE)
        bwd.rows(dr, 0, 5, accumulate=k > 0, dscale=part)
        dscale += part
        bwd.candidates(dc[a : a + cb.shape[0]], 0, cb.shape[0], accumulate=False)
    for name, actual, want in (("dr_hat", dr, dr_w), ("dc_hat", dc, dc_w), ("dscale", dscale, dscale_w)):
        assert_close(actual, want, TOL[dtype], name)


def test_fully_masked_rows(poison):
    """Row 0 (and the only candidate's whole column) is masked: lse -inf, zero gradients, no NaN."""
    r, c, r_inv, c_inv, g = make(3, 1, 5, torch.float32, seed=2)
    lse, dr, dc, dscale = check(
        r, c, r_inv, c_inv, 20.0, g, TOL[torch.float32], period=1, offset=0, mask_own=True, pen_mode=0, alpha=0.0
    )
    assert lse[0] == float("-inf") and torch.isfinite(lse[1:]).all()
    assert (dr[0] == 0).all() and dscale[0] == 0


@pytest.mark.parametrize("pen_mode", [0, 3], ids=["none", "all_negatives"])
def test_every_row_masked(poison, pen_mode):
    r, c, r_inv, c_inv, g = make(1, 1, 1, torch.float32, seed=4)
    lse, dr, dc, dscale = check(
        r, c, r_inv, c_inv, 20.0, g, TOL[torch.float32], period=1, offset=0, mask_own=True, pen_mode=pen_mode, alpha=0.5
    )
    assert lse.item() == float("-inf")
    assert (dr == 0).all() and (dc == 0).all() and (dscale == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_zero_and_tiny_vectors(poison, dtype):
    """Zero rows / candidates carry r_inv = 1e12 (the clamped norm): s = 0, gradients finite; rows of norm ~5e-3
    (inverse norm ~200, folded into P) are exact."""
    r, c, r_inv, c_inv, g = make(7, 13, 33, dtype, seed=5)
    r[2] = 0
    c[[0, 9]] = 0
    r[4] *= 1e-3
    c[5] *= 1e-3
    r_inv, c_inv = inv_norms(r), inv_norms(c)
    assert r_inv[2] == 1e12 and c_inv[9] == 1e12 and r_inv[4] > 100 and c_inv[5] > 100
    check(r, c, r_inv, c_inv, 20.0, g, TOL[dtype], True, period=13, offset=0, mask_own=False, pen_mode=0, alpha=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_duplicate_rows(poison, dtype):
    r, c, r_inv, c_inv, g = make(9, 16, 20, dtype, seed=6)
    r[4] = r[1]
    c[[5, 11]] = c[3].clone()
    r_inv, c_inv = inv_norms(r), inv_norms(c)
    check(r, c, r_inv, c_inv, 20.0, g, TOL[dtype], period=8, offset=0, mask_own=False, pen_mode=1, alpha=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_extreme_scale(poison, dtype):
    r, c, r_inv, c_inv, g = make(16, 48, 64, dtype, seed=7)
    check(r, c, r_inv, c_inv, 1e3, g, TOL[dtype], True, period=16, offset=0, mask_own=True, pen_mode=3, alpha=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("D", [33, 64], ids=lambda d: f"D{d}")
def test_chunked_d(poison, monkeypatch, D, dtype):
    """D looped in 16-wide chunks, the gradients accumulated in the output (the path of D > 256)."""
    monkeypatch.setattr(sim_lse, "SINGLE_D_MAX", 16)
    monkeypatch.setattr(sim_lse, "SINGLE_D_MAX_FP32", 16)
    monkeypatch.setattr(sim_lse, "CHUNK_D", 16)
    r, c, r_inv, c_inv, g = make(21, 40, D, dtype, seed=8)
    check(r, c, r_inv, c_inv, 20.0, g, TOL[dtype], True, period=20, offset=3, mask_own=True, pen_mode=2, alpha=0.5)


def _gpu_tiles():
    """The distinct tiles of the GPU autotune lists (the interpreter's own list is one 16 x 32 tile)."""
    tiles = {}
    for cfg in [*sim_lse._FWD_CONFIGS, *sim_lse._BWD_CONFIGS]:
        tiles.setdefault((cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps), cfg)
    return list(tiles.values())


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the autotuner runs every tile of its lists itself")
@pytest.mark.parametrize("cfg", _gpu_tiles(), ids=lambda c: "{}x{}w{}".format(*c.kwargs.values(), c.num_warps))
@pytest.mark.parametrize("D", [40, 300], ids=["single-D", "chunked-D"])
def test_every_gpu_tile(poison, monkeypatch, cfg, D):
    """Each tile the GPU may pick, forced on all three kernels, with rows and candidates that end in a partial tile
    and D that ends in a partial chunk (fp16, as on the GPU; the interpreter runs the tile's logic, not its speed)."""
    for name in ("sim_lse_fwd_kernel", "sim_lse_bwd_dr_kernel", "sim_lse_bwd_dc_kernel"):
        force_configs(monkeypatch, getattr(sim_lse, name), [cfg])
    r, c, r_inv, c_inv, g = make(130, 200, D, torch.float16, seed=17)
    opts = dict(period=100, offset=3, mask_own=True, pen_mode=3, alpha=0.5)
    check(r, c, r_inv, c_inv, 20.0, g, TOL[torch.float16], positive=True, **opts)
    for name in ("sim_lse_fwd_kernel", "sim_lse_bwd_dr_kernel", "sim_lse_bwd_dc_kernel"):
        assert getattr(sim_lse, name).best_config is cfg  # the tile really ran


def test_autotune_key_has_size_classes(monkeypatch):
    """The tile is chosen again per size class of M and N (fastloss.ops._autotune.tune_bucket): a small first call
    (a parity check, a test) does not fix the tile of a large batch, and sizes within a class share one tuning."""
    import triton

    from fastloss.ops._autotune import TUNE_ROWS_MAX, tune_bucket

    assert [tune_bucket(n) for n in (1, 1024, 1025, 4096, TUNE_ROWS_MAX, 10**7)] == [0, 0, 11, 13, 16, 16]
    kernel = sim_lse.sim_lse_fwd_kernel
    tunings = []
    force_configs(monkeypatch, kernel, [triton.Config({"BLOCK_M": bm, "BLOCK_N": 32}) for bm in (16, 32)])
    monkeypatch.setattr(kernel, "_bench", lambda *a, config, **k: tunings.append(config) or config.kwargs["BLOCK_M"])
    for M, N in [(40, 50), (60, 70), (1100, 50), (1500, 60), (40, 3000)]:
        r, c, r_inv, c_inv, _ = make(M, N, 16, torch.float32, seed=M)
        sim_lse_fwd(r, c, r_inv, c_inv, 20.0, period=N, offset=0, mask_own=False, pen_mode=0, alpha=0.0)
    assert len(tunings) == 2 * 3  # two configurations timed for each of the classes (0, 0), (11, 0), (0, 12)


def test_large_d(poison):
    r, c, r_inv, c_inv, g = make(5, 9, 300, torch.float32, seed=9)
    check(r, c, r_inv, c_inv, 20.0, g, TOL[torch.float32], period=9, offset=0, mask_own=False, pen_mode=0, alpha=0.0)


def test_strided_inputs(poison):
    """A row slice of a wider buffer and a column-major candidate matrix."""
    M, N, D = 7, 13, 33
    gen = torch.Generator().manual_seed(10)
    r = torch.randn(2 * M, D + 5, generator=gen).to(DEVICE)[::2, 2 : D + 2]
    c = torch.randn(D, N, generator=gen).to(DEVICE).T
    g = torch.randn(M, generator=gen).to(DEVICE)
    assert not r.is_contiguous() and not c.is_contiguous()
    check(
        r,
        c,
        inv_norms(r),
        inv_norms(c),
        20.0,
        g,
        TOL[torch.float32],
        period=N,
        offset=0,
        mask_own=False,
        pen_mode=0,
        alpha=0.0,
    )


@pytest.mark.parametrize(
    "scale",
    [torch.tensor([20.0], dtype=torch.float16), torch.tensor(20.0, dtype=torch.float64), 20.0],
    ids=["fp16_shape1", "fp64_0d", "python_float"],
)
def test_scale_forms(scale):
    r, c, r_inv, c_inv, g = make(7, 13, 33, torch.float32, seed=11)
    opts = dict(period=13, offset=0, mask_own=False, pen_mode=0, alpha=0.0)
    want, _ = sim_lse_fwd(r, c, r_inv, c_inv, torch.tensor(20.0, device=DEVICE), **opts)
    scale = scale.to(DEVICE) if isinstance(scale, torch.Tensor) else scale
    torch.testing.assert_close(sim_lse_fwd(r, c, r_inv, c_inv, scale, **opts)[0], want)


def test_without_dscale():
    r, c, r_inv, c_inv, g = make(7, 13, 33, torch.float32, seed=12)
    opts = dict(period=13, offset=0, mask_own=True, pen_mode=1, alpha=0.4)
    scale = torch.tensor(20.0, device=DEVICE)
    lse, _ = sim_lse_fwd(r, c, r_inv, c_inv, scale, **opts)
    dr, dc, dscale = sim_lse_bwd(r, c, r_inv, c_inv, scale, lse, g, need_dscale=False, **opts)
    dr_ref, dc_ref, _ = sim_lse_bwd(r, c, r_inv, c_inv, scale, lse, g, need_dscale=True, **opts)
    assert dscale is None
    torch.testing.assert_close(dr, dr_ref, rtol=0, atol=0)
    torch.testing.assert_close(dc, dc_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=DTYPE_IDS.get)
def test_other_dtypes(poison, dtype):
    """fp64 is computed in fp32; bf16 runs the kernels in bf16 on a GPU (upcast under the interpreter)."""
    r, c, r_inv, c_inv, g = make(7, 13, 33, dtype, seed=13)
    check(r, c, r_inv, c_inv, 20.0, g, TOL[dtype], True, period=13, offset=0, mask_own=True, pen_mode=0, alpha=0.0)


@pytest.mark.parametrize("M, N", [(0, 5), (4, 0)], ids=["no_rows", "no_candidates"])
def test_empty(M, N):
    """No candidates: lse = -inf and zero gradients; no rows: empty outputs and zero candidate gradients."""
    r, c, r_inv, c_inv, g = make(M, N, 8, torch.float32)
    opts = dict(period=max(N, 1), offset=0, mask_own=False, pen_mode=0, alpha=0.0)
    lse, nlse = sim_lse_fwd(r, c, r_inv, c_inv, 20.0, positive_col=True, **opts)
    dr, dc, dscale = sim_lse_bwd(r, c, r_inv, c_inv, 20.0, lse, g, need_dscale=True, pos_val=g, **opts)
    for x in (lse, nlse):
        assert x.shape == (2, M) and (x[0] == float("-inf")).all() and (x[1] == 0).all()
    assert dr.shape == (M, 8) and dc.shape == (N, 8) and dscale.shape == (M,)
    assert (dr == 0).all() and (dc == 0).all() and (dscale == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(period=0), "period"),
        (dict(pen_mode=4), "pen_mode"),
        (dict(alpha=-1.0), "alpha"),
        (dict(base=-1), "base"),
    ],
    ids=["period", "pen_mode", "alpha", "base"],
)
def test_invalid_options(kwargs, match):
    r, c, r_inv, c_inv, _ = make(3, 4, 5, torch.float32)
    opts = dict(period=4, offset=0, mask_own=False, pen_mode=0, alpha=0.0) | kwargs
    with pytest.raises(ValueError, match=match):
        sim_lse_fwd(r, c, r_inv, c_inv, 20.0, **opts)


@pytest.fixture
def torch_tf32():
    """Sets torch's fp32 matmul precision for CUDA (the new API's flag) and restores it."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision

    def set_(on: bool) -> None:
        matmul.fp32_precision = "tf32" if on else before

    yield set_
    matmul.fp32_precision = before


@pytest.mark.parametrize(
    "env,tf32,want",
    [
        ({}, False, "ieee"),
        ({}, True, "tf32"),
        ({"FASTLOSS_ALLOW_TF32": "1"}, False, "tf32"),
        ({"FASTLOSS_ALLOW_TF32": "0"}, True, "ieee"),
        ({"FASTLOSS_FP32_DOT": "tf32x3"}, False, "tf32x3"),
        ({"FASTLOSS_FP32_DOT": "ieee"}, True, "ieee"),
        ({"FASTLOSS_FP32_DOT": " IEEE ", "FASTLOSS_ALLOW_TF32": "1"}, False, "ieee"),
    ],
    ids=["default", "torch_tf32", "allow_tf32", "disallow_tf32", "tf32x3", "ieee_over_torch", "explicit_wins"],
)
def test_fp32_dot_precision_rule(monkeypatch, torch_tf32, env, tf32, want):
    """FASTLOSS_FP32_DOT picks tl.dot's precision for fp32 operands (FASTLOSS_ALLOW_TF32=1 is tf32, =0 ieee); unset,
    torch's own fp32 matmul precision for CUDA decides (TF32 where a script allowed it, as for its cuBLAS matmuls); it
    reaches the kernel launch for fp32 inputs only, and the interpreter always gets ieee."""
    for name in ("FASTLOSS_FP32_DOT", "FASTLOSS_ALLOW_TF32"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    torch_tf32(tf32)
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)
    assert (_backend.dot_precision(torch.float32), _backend.dot_precision(torch.bfloat16)) == (want, "ieee")
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs["DOT_PRECISION"])

    monkeypatch.setattr(sim_lse, "sim_lse_fwd_kernel", Recorder())
    opts = dict(period=4, offset=0, mask_own=False, pen_mode=0, alpha=0.0)
    for dtype in (torch.float32, torch.float16):
        r, c, r_inv, c_inv, _ = make(3, 4, 5, dtype)
        sim_lse_fwd(r, c, r_inv, c_inv, 20.0, **opts)
    assert launches == [want, "ieee"]
    monkeypatch.setattr(_backend, "triton_interpret", lambda: True)
    assert _backend.dot_precision(torch.float32) == "ieee"


def test_torch_fp32_matmul_precision(torch_tf32):
    """Each way a script allows TF32 for torch's CUDA matmuls reads as tf32, and back as ieee."""
    read = _backend.torch_fp32_matmul_precision
    assert read() == "ieee"
    torch_tf32(True)
    assert read() == "tf32"
    torch_tf32(False)
    assert read() == "ieee"
    # the root flag, which the matmul flag inherits while unset: transformers' TrainingArguments(tf32=True) sets it
    root = torch.backends.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"
        assert read() == "tf32"
    finally:
        torch.backends.fp32_precision = root
    assert read() == "ieee"
    before = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")):
            torch.set_float32_matmul_precision(setting)
            assert read() == want, setting
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fp32_dot_precision_bad_value(monkeypatch, dtype):
    monkeypatch.setenv("FASTLOSS_FP32_DOT", "bf16x3")
    r, c, r_inv, c_inv, _ = make(3, 4, 5, dtype)
    with pytest.raises(
        ValueError, match=r"FASTLOSS_FP32_DOT must be one of \('ieee', 'tf32x3', 'tf32'\), got 'bf16x3'"
    ):
        sim_lse_fwd(r, c, r_inv, c_inv, 20.0, period=4, offset=0, mask_own=False, pen_mode=0, alpha=0.0)


def test_shape_mismatch():
    r, _, r_inv, _, _ = make(3, 4, 5, torch.float32)
    c = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="share D"):
        sim_lse_fwd(r, c, r_inv, inv_norms(c), 20.0, period=4, offset=0, mask_own=False, pen_mode=0, alpha=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device (compiled kernels)")
class TestGPU:
    """Compiled kernels on CUDA: GPU-sized shapes, the chunked-D path, bf16, determinism."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
    @pytest.mark.parametrize("shape", [(64, 256, 384), (129, 1000, 768), (33, 130, 4096), (300, 301, 1)], ids=shape_id)
    def test_matches_oracle(self, poison, shape, dtype):
        M, N, D = shape
        r, c, r_inv, c_inv, g = make(M, N, D, dtype, seed=14)
        period = N if N % 2 else N // 2
        check(
            r,
            c,
            r_inv,
            c_inv,
            20.0,
            g,
            TOL[dtype],
            period=period,
            offset=min(3, M),
            mask_own=True,
            pen_mode=3,
            alpha=0.5,
            positive=True,
        )

    @pytest.mark.parametrize("D", [100, 384], ids=lambda d: f"D{d}")
    @pytest.mark.parametrize(
        "env,tol",
        [
            ("FASTLOSS_ALLOW_TF32=1", 2e-2),
            ("FASTLOSS_FP32_DOT=tf32", 2e-2),
            ("FASTLOSS_FP32_DOT=tf32x3", TOL[torch.float32]),
        ],
    )
    def test_fp32_dot_precision(self, monkeypatch, env, tol, D):
        """tf32 / tf32x3 against the oracle, and not the ieee result (the setting reaches the kernels)."""
        r, c, r_inv, c_inv, g = make(100, 300, D, torch.float32, seed=16)
        opts = dict(period=100, offset=0, mask_own=False, pen_mode=0, alpha=0.0)
        ieee, _ = sim_lse_fwd(r, c, r_inv, c_inv, 20.0, **opts)
        monkeypatch.setenv(*env.split("="))
        check(r, c, r_inv, c_inv, 20.0, g, tol, **opts)
        assert not torch.equal(sim_lse_fwd(r, c, r_inv, c_inv, 20.0, **opts)[0], ieee)

    @pytest.mark.parametrize("D", [64, 1024], ids=lambda d: f"D{d}")
    def test_deterministic(self, D):
        r, c, r_inv, c_inv, g = make(200, 513, D, torch.float16, seed=15)
        opts = dict(period=513, offset=0, mask_own=False, pen_mode=0, alpha=0.0)
        scale = torch.tensor(20.0, device=DEVICE)
        lse, _ = sim_lse_fwd(r, c, r_inv, c_inv, scale, **opts)
        first = sim_lse_bwd(r, c, r_inv, c_inv, scale, lse, g, need_dscale=True, **opts)
        second = sim_lse_bwd(r, c, r_inv, c_inv, scale, lse, g, need_dscale=True, **opts)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("pen_mode", [0, 2, 3], ids=lambda m: PEN_IDS[m])
def test_transposed_direction(poison, pen_mode, dtype):
    """lse_t: one pair of launches gives a direction's gradients and those of its transpose, whose rows are the
    candidates offset .. offset + n_t - 1 against these rows (doc_to_query beside query_to_doc, the same g), with both
    positives folded into their shared entry: the sums of the two directions' separate oracles (their dscales summed
    over all rows). Rows in two windows, the second added; candidates in one window and in two."""
    M, N, D, offset = 5, 24, 20, 3
    r, c, r_inv, c_inv, _ = make(M, N, D, dtype, seed=9)
    g = torch.full((M,), 0.37, device=r.device)
    gen = torch.Generator().manual_seed(9)
    pv_a, pv_b = (-torch.rand(M, generator=gen)).to(r.device), (-torch.rand(M, generator=gen)).to(r.device)
    opts = dict(period=8, offset=offset, mask_own=False, pen_mode=pen_mode, alpha=0.7)
    lse_a, dr_a, dc_a, dscale_a, _ = oracle(r, c, r_inv, c_inv, 20.0, g, pos_val=pv_a, **opts)
    t_rows, t_inv = c[offset : offset + M], c_inv[offset : offset + M]
    lse_b, dr_b, dc_b, dscale_b, _ = oracle(
        t_rows, r, t_inv, r_inv, 20.0, g, pos_val=pv_b, period=M, offset=0, mask_own=False, pen_mode=0, alpha=0.0
    )
    bwd = sim_lse.SimLseBackward(
        r, c, r_inv, c_inv, 20.0, two_parts(lse_a), g, pos_val=pv_a + pv_b, lse_t=two_parts(lse_b), **opts
    )
    dr, dscale = torch.empty(M, D, device=DEVICE), torch.empty(M, device=DEVICE)
    bwd.rows(dr, 0, 2, accumulate=False, dscale=dscale)
    dr[2:] = 0.0
    bwd.rows(dr[2:], 2, M, accumulate=True, dscale=dscale)
    dc_want = dc_a.clone()
    dc_want[offset : offset + M] += dr_b
    for split in (N, 6):
        dc = torch.empty(N, D, device=DEVICE)
        bwd.candidates(dc[:split], 0, split, accumulate=False)
        bwd.candidates(dc[split:], split, N, accumulate=False)
        assert_close(dc, dc_want, TOL[dtype], f"dc_hat, split {split}")
    assert_close(dr, dr_a + dc_b, TOL[dtype], "dr_hat")
    assert_close(dscale.sum().reshape(1), (dscale_a.sum() + dscale_b.sum()).reshape(1), TOL[dtype], "dscale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("offset,M,N", [(0, 7, 7), (3, 5, 12), (0, 40, 40), (17, 23, 45)])
def test_gram_block(poison, offset, M, N, dtype):
    """lse_t with mask_own over a Gram block (the rows r = c[offset : offset + M] themselves as candidates, base
    offset; query_to_query against the local queries): rows() alone gives the rows' whole gradient from that block,
    direct and transposed (each row's own entry masked both ways), and dscale counts each entry twice; with the
    candidates before and after it as blocks of their own (rows and candidates launches), the sums of the
    direction's oracle over every candidate: dr_hat + dc_hat of the rows' own vectors, dc_hat of the others."""
    c, _, c_inv, _, _ = make(N, 1, 24, dtype, seed=13)
    r, r_inv = c[offset : offset + M], c_inv[offset : offset + M]
    g = torch.full((M,), 0.29, device=c.device)
    opts = dict(period=N, offset=offset, mask_own=True, pen_mode=0, alpha=0.0)
    lse, dr_want, dc_want, dscale_want, _ = oracle(r, c, r_inv, c_inv, 20.0, g, **opts)
    dr_want = dr_want + dc_want[offset : offset + M]
    dr, dc, dscale = torch.empty(M, 24, device=DEVICE), torch.zeros(N, 24, device=DEVICE), torch.empty(M, device=DEVICE)
    lse = two_parts(lse)
    gram = sim_lse.SimLseBackward(r, r, r_inv, r_inv, 20.0, lse, g, base=offset, lse_t=lse, **opts)
    gram.rows(dr, 0, 2, accumulate=False, dscale=dscale)  # two windows of rows, the second added to
    dr[2:] = 0.0
    gram.rows(dr[2:], 2, M, accumulate=True, dscale=dscale)
    total = dscale.sum() / 2
    for a, b in ((0, offset), (offset + M, N)):
        if b > a:
            rest = sim_lse.SimLseBackward(r, c[a:b], r_inv, c_inv[a:b], 20.0, lse, g, base=a, **opts)
            rest.rows(dr, 0, M, accumulate=True, dscale=dscale)
            rest.candidates(dc[a:b], 0, b - a, accumulate=False)
            total += dscale.sum()
    dc_want[offset : offset + M] = 0.0
    assert_close(dr, dr_want, TOL[dtype], "dr_hat")
    assert_close(dc, dc_want, TOL[dtype], "dc_hat")
    assert_close(total.reshape(1), dscale_want.sum().reshape(1), TOL[dtype], "dscale")


@pytest.mark.parametrize(
    "shape,base",
    [((5,), 0), ((5, 2), 0), ((2, 22), 0), ((2, 5), 4)],
    ids=["one-part", "transposed", "past-the-end", "before-block"],
)
def test_transposed_rows_must_lie_in_the_block(shape, base):
    r, c, r_inv, c_inv, g = make(5, 24, 20, torch.float32, seed=9)
    opts = dict(period=8, offset=3, mask_own=False, pen_mode=0, alpha=0.0, base=base)
    lse = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="lse_t"):
        sim_lse.SimLseBackward(
            r, c[base:], r_inv, c_inv[base:], 20.0, lse, g, lse_t=torch.zeros(shape, device=DEVICE), **opts
        )
    with pytest.raises(ValueError, match="nlse_t"):
        sim_lse_fwd(r, c[base:], r_inv, c_inv[base:], 20.0, nlse_t=torch.zeros(shape, device=DEVICE), **opts)


def test_transposed_statistics_must_be_fp32():
    r, c, r_inv, c_inv, _ = make(5, 24, 20, torch.float32, seed=9)
    opts = dict(period=8, offset=3, mask_own=False, pen_mode=0, alpha=0.0)
    with pytest.raises(ValueError, match="^sim_lse: nlse_t must be fp32"):
        sim_lse_fwd(r, c, r_inv, c_inv, 20.0, nlse_t=torch.zeros(2, 5, dtype=torch.float64, device=DEVICE), **opts)


# (M, N, offset, n_t, base): the transposed rows as many as the rows (MNRL's symmetric loss), fewer, more (rows t >= M
# have no positive among the rows), rows over several programs with tiles that cut the transposed columns, one row
# that is its column's only entry (-inf), and a block of candidates that starts at base
TRANSPOSED_FWD_SHAPES = {
    "square": (5, 24, 3, 5, 0),
    "fewer": (5, 24, 3, 2, 0),
    "more": (5, 40, 10, 12, 0),
    "programs": (37, 90, 41, 37, 0),
    "alone": (1, 8, 2, 1, 0),
    "block": (7, 30, 12, 7, 9),
}


@pytest.mark.parametrize("tiles", ["default", "wide-programs"])
@pytest.mark.parametrize("shape", TRANSPOSED_FWD_SHAPES.values(), ids=TRANSPOSED_FWD_SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_transposed_forward(poison, monkeypatch, dtype, shape, tiles):
    """nlse_t: the transposed direction's NLSE from the forward's own tiles (doc_to_query's over the local queries,
    beside query_to_doc): the fp64 oracle's nlse of rows c[offset .. offset + n_t - 1] against r as candidates,
    unpenalised (the forward's own lse and nlse, with the penalty, unchanged). "wide-programs": 32-row programs with
    partial statistics per 8 rows, so each program also writes the -inf of the rows it covers beyond its first (every
    buffer row a grid covers is written whatever tile the autotuner picks; poison catches one left unwritten)."""
    M, N, offset, n_t, base = shape
    if tiles == "wide-programs":
        force_configs(monkeypatch, sim_lse.sim_lse_fwd_kernel, [sim_lse._config(32, 32, 4, 1)])
        monkeypatch.setattr(sim_lse, "transposed_rows", lambda: 8)
    r, c, r_inv, c_inv, g = make(M, N + base, 20, dtype, seed=11)
    opts = dict(period=N + base, offset=offset, mask_own=False, pen_mode=3, alpha=0.5)
    lse_want, *_, nlse_want = oracle(r, c, r_inv, c_inv, 20.0, g, **opts)
    t_rows, t_inv = c[offset : offset + n_t], c_inv[offset : offset + n_t]
    t_opts = dict(period=M, offset=0, mask_own=False, pen_mode=0, alpha=0.0)
    *_, want = oracle(t_rows, r, t_inv, r_inv, 20.0, torch.ones(n_t, device=r.device), **t_opts)
    if base:  # the same candidates as a block from row base on
        c, c_inv = c[base:], c_inv[base:]
    nlse_t = torch.empty(2, n_t, device=r.device)
    lse, nlse = sim_lse_fwd(r, c, r_inv, c_inv, 20.0, positive_col=True, base=base, nlse_t=nlse_t, **opts)
    assert_close(two_part_value(nlse_t), want, TOL[dtype], "nlse_t")
    if not base:
        assert_close(two_part_value(lse), lse_want, TOL[dtype], "lse")
        assert_close(two_part_value(nlse), nlse_want, TOL[dtype], "nlse")


@pytest.mark.parametrize("joint", [True, False], ids=["joint", "per_direction"])
@pytest.mark.parametrize("b", [1, 7, 1024, 2500])
def test_one_direction_terms(joint, b):
    """MNRL's query_to_doc alone, in one launch: pos_val = -sigmoid(x) (joint: +inf where x > 0) and the mean of
    softplus(x), x = NLSE - scale s, against fp64 over x from -200 to 200 (confident rows, whose loss ~e^x needs
    log1p, and wrong ones), over one and several chunks of 1024 rows, NLSE in two parts (fp64 values). On a GPU tl.exp
    is ex2.approx after rounding x log2(e) (a relative error up to ~|x| 6e-8) and x may be one fused multiply-add:
    bounds of (|x| + 8) 2^-23."""
    g = torch.Generator().manual_seed(b)
    nlse = two_parts(torch.randn(b, generator=g, dtype=torch.float64) * 60)
    sims = torch.rand(b, generator=g) * 2 - 1
    scale = torch.tensor(20.0)
    loss, pos_val = sim_lse.one_direction_terms(nlse.to(DEVICE), sims.to(DEVICE), scale.to(DEVICE), joint)
    x = two_part_value(nlse) - scale.double() * sims.double()
    err = (x.abs() + 8) * 2**-23  # relative
    want = -torch.sigmoid(x)
    if joint:
        want = torch.where(x > 0, torch.inf, want)
    assert pos_val.shape == (1, b) and loss.shape == () and loss.dtype == pos_val.dtype == torch.float32
    got = pos_val[0].cpu().double()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert ((got - want).abs()[finite] <= (err * want.abs())[finite] + 1.5e-45).all()  # to fp32's subnormals
    softplus = torch.nn.functional.softplus(x, threshold=1000)  # no threshold: log1p(e^x) exactly in fp64
    assert abs(float(loss) - float(softplus.mean())) <= float((err * softplus).mean()) + 1e-6 * float(softplus.mean())
    confident = x < -30  # loss ~e^x: a log(1 + a) would give 0 there
    if confident.any():
        one = sim_lse.one_direction_terms(nlse[:, confident].to(DEVICE), sims[confident].to(DEVICE), scale, joint)[0]
        part = softplus[confident]
        assert abs(float(one) - float(part.mean())) <= float((err[confident] * part).mean()) + 1e-6 * float(part.mean())


@pytest.mark.parametrize("joint", [True, False], ids=["joint", "per_direction"])
@pytest.mark.parametrize("b", [1, 7, 1100])
@pytest.mark.parametrize(
    "names",
    [
        ("query_to_doc", "doc_to_query"),  # the symmetric loss: both hold the positive
        ("query_to_doc", "query_to_query"),  # one holder among two directions (log k = 0)
        ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),  # GTE's four
    ],
    ids=["symmetric", "q2d_q2q", "gte"],
)
@pytest.mark.parametrize("derive", [False, True], ids=["lse_given", "lse_derived"])
def test_directions_terms(joint, b, names, derive):
    """MNRL with several directions, the flash forward's loss, log_z and pos_val in one launch (in place of
    fastloss.ops.mnrl.positive_terms and a logsumexp2 / mean over the directions), against those formulas in fp64,
    over one and several chunks of 512 rows: logits up to ~200 (two-part LSEs of fp64 values, each holder's LSE its
    NLSE plus the positive), confident rows (x << 0, pos_val ~ -e^x, down to fp32's subnormals, which torch.sigmoid
    flushes to 0), wrong ones (x > log k: the -1 stays separate, +inf), and directions whose every candidate is masked
    in some rows (NLSE -inf). Bounds as test_one_direction_terms', (|v| + 8) 2^-23 relative (tl.exp on a GPU), v the
    largest exponent's magnitude. ``derive``: the last holder's LSE (doc_to_query's where selected) is formed in the
    launch from its NLSE and the positive, its entries NaN before (read before written, they would spread), written
    as torch's logsumexp2 of the two (to 2^-22; the split between the parts may differ) and within 2^-21 of fp64."""
    from fastloss.ops import mnrl

    p = mnrl.MNRLParams(0, b, sum(mnrl.DIRECTION_BITS[name] for name in names), joint=joint)
    shares = mnrl.positive_shares(p)
    n_dir = len(names)
    g = torch.Generator().manual_seed(b + 17 * n_dir)
    positive = ((torch.rand(b, generator=g, dtype=torch.float64) * 2 - 1) * 60).float().double()  # fp32 values
    nlse = positive + torch.randn(n_dir, b, generator=g, dtype=torch.float64) * 40
    nlse[-1, ::5] = -torch.inf
    holds = torch.tensor([bool(s) or not joint for s in shares])[:, None]
    lse2, nlse2 = two_parts(torch.where(holds, torch.logaddexp(nlse, positive), nlse)), two_parts(nlse)
    derived = [max(k for k, s in enumerate(shares) if s)] if derive else []
    lse_in = lse2.clone()
    lse_in[:, derived] = torch.nan
    lse_in = lse_in.to(DEVICE)
    loss, log_z, pos_val = sim_lse.directions_terms(
        lse_in, nlse2.to(DEVICE), positive.float().to(DEVICE), shares, joint, derived
    )
    assert (loss.shape, log_z.shape, pos_val.shape) == ((), (2, b), (n_dir, b))
    if derive:
        k = derived[0]
        written = lse_in[:, k].cpu()
        pair = torch.stack([nlse2[:, k], exact(positive.float())], dim=1)
        value = two_part_value(written)  # the split may differ by an ulp of hi (exp and log's last bits)
        assert (value - two_part_value(logsumexp2(pair, dim=1))).abs().max() <= 2**-22
        assert (value - torch.logaddexp(nlse[k], positive)).abs().max() <= 2**-21
        lse2 = lse_in.cpu()
    assert not lse_in.isnan().any()
    lse, nlse = two_part_value(lse2), two_part_value(nlse2)  # the values the kernel reads, in fp64

    def softplus(v):
        return torch.nn.functional.softplus(v, threshold=1000)  # log1p(e^v) exactly in fp64

    if joint:
        share = max(shares)
        log_k = -math.log(share)
        x = torch.where(holds, nlse, lse).logsumexp(dim=0) - positive
        z = lse.logsumexp(dim=0)
        folded = torch.where(x <= log_k, -torch.sigmoid(x - log_k) * share, torch.inf)
        want_pv = torch.where(holds, folded / torch.exp(lse - z), torch.inf)
        rows, exponents = log_k + softplus(x - log_k), torch.cat([x[None], lse - z])
    else:
        x = nlse - positive
        z = lse.mean(dim=0)
        want_pv, rows, exponents = -torch.sigmoid(x), softplus(x).mean(dim=0), x
    bound = (float(exponents.abs().nan_to_num(posinf=0.0).max()) + 8) * 2**-23
    got = pos_val.cpu().double()
    assert torch.equal(torch.isinf(got), torch.isinf(want_pv))
    finite = torch.isfinite(want_pv)
    assert ((got - want_pv).abs()[finite] <= bound * want_pv.abs()[finite] + 1.5e-45).all()  # fp32's subnormals
    assert abs(float(loss) - float(rows.mean())) <= bound * float(rows.mean()) + 1e-6 * float(rows.mean())
    z_got = two_part_value(log_z.cpu())
    assert torch.equal(torch.isinf(z_got), torch.isinf(z))
    assert ((z_got - z).abs()[torch.isfinite(z)] <= bound * z.abs()[torch.isfinite(z)] + 2**-40).all()
    if not joint:  # each part the mean of the directions' (torch's lse.mean(dim=1)), to a few ulps of fp32 division
        torch.testing.assert_close(log_z.cpu(), lse2.mean(dim=1), rtol=2**-21, atol=0.0)


def test_directions_terms_rejects_bad_input():
    lse = torch.zeros(2, 2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="derive must list directions that hold the positive"):
        sim_lse.directions_terms(lse, lse, torch.zeros(5, device=DEVICE), [1.0, 0.0], True, [1])
    with pytest.raises(ValueError, match="derive must list directions that hold the positive"):
        sim_lse.directions_terms(lse, lse, torch.zeros(5, device=DEVICE), [0.5, 0.5], True, [2])
    with pytest.raises(ValueError, match=r"nlse must be fp32 \[2, 2, 5\]"):
        sim_lse.directions_terms(lse, lse[:, :, :4], torch.zeros(5, device=DEVICE), [0.5, 0.5], True)
    with pytest.raises(ValueError, match="shares must give each of the 2 directions"):
        sim_lse.directions_terms(lse, lse, torch.zeros(5, device=DEVICE), [0.0, 0.0], True)
    with pytest.raises(ValueError, match=r"positive must have shape \[5\]"):
        sim_lse.directions_terms(lse, lse, torch.zeros(4, device=DEVICE), [0.5, 0.5], True)


@pytest.mark.parametrize("joint", [True, False], ids=["joint", "per_direction"])
@pytest.mark.parametrize("b", [1, 7, 1100])
@pytest.mark.parametrize(
    ("names", "back"),
    [
        (("query_to_doc",), 0),  # the drop-ins' default
        (("query_to_doc", "doc_to_query"), 1),  # the symmetric loss, doc_to_query in query_to_doc's launch
        (("query_to_doc", "query_to_query"), 0),
        (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), 2),  # GTE's four
        (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), 0),  # FASTLOSS_FLASH_MERGE=0
    ],
    ids=["q2d", "symmetric", "q2d_q2q", "gte", "gte_unmerged"],
)
def test_backward_weights(joint, b, names, back):
    """The flash backward's per-row weights in one launch, against their formulas in fp64 on the values the kernel
    reads (over one and three chunks of 512 rows; grad 0.75 and B = 7 make h inexact): h = grad / B as torch's fp32
    division; each direction's weight joint h exp(LSE - log_z) (0 where a direction's every candidate is masked:
    LSE and log_z -inf), per direction h / n_dir, query_to_doc alone h, exactly; the merged launch's positive
    coefficient (joint: each pos_val times its share, +inf where query_to_doc's is; per direction their sum); joint,
    the separate -1's coefficient -h scale on the rows with pos_val +inf (0 elsewhere) and its dL/dscale part
    h sum(sims) over them. Relative bounds (|e| + 8) 2^-23 of the exponentials, e their exponent (terms tests')."""
    n_dir = len(names)
    g = torch.Generator().manual_seed(b + 31 * n_dir + back)
    lse = torch.randn(n_dir, b, generator=g, dtype=torch.float64) * 30
    if n_dir > 1:
        lse[-1, ::4] = -torch.inf
    z = lse.logsumexp(dim=0) if joint else lse.mean(dim=0)
    if n_dir == 1:
        z = lse[0].clone()
    if n_dir > 1 and joint:
        z[::12] = -torch.inf  # a row whose every direction is masked (the weights' NaN -> 0)
        lse[:, ::12] = -torch.inf
    lse2, z2 = two_parts(lse), two_parts(z)
    pos_val = -torch.rand(n_dir, b, generator=g, dtype=torch.float64).float()
    pos_val[:, ::3] = torch.inf  # the separate -1 (joint: both directions' at once)
    sims = (torch.rand(b, generator=g, dtype=torch.float64) * 2 - 1).float()
    grad, scale = torch.tensor(0.75), torch.tensor(20.0)
    to = functools.partial(torch.Tensor.to, device=DEVICE)
    weights, h_rows, pair_pv, coef, separate_dot = (
        x if x is None else x.cpu()
        for x in sim_lse.backward_weights(to(grad), to(scale), to(lse2), to(z2), to(pos_val), to(sims), joint, back)
    )
    h = grad / b  # fp32, as the autograd of a mean divides
    assert torch.equal(h_rows, h.expand(b))
    lse_v, z_v = two_part_value(lse2), two_part_value(z2)
    e = lse_v - z_v
    share = torch.exp(e).nan_to_num(nan=0.0)
    bound = (e.abs().nan_to_num(nan=0.0, posinf=0.0).max() + 8) * 2**-23
    if n_dir == 1:
        assert torch.equal(weights, h.expand(1, b))
    elif joint:
        want = h.double() * share
        assert ((weights.double() - want).abs() <= bound * want + 1e-45).all()
        assert torch.equal(weights[:, ::12], torch.zeros_like(weights[:, ::12]))
    else:
        assert torch.equal(weights, (h / n_dir).expand(n_dir, b))
    if back:
        pv = pos_val.double()
        if joint:
            want = torch.where(pv[0] == torch.inf, torch.inf, pv[0] * share[0] + pv[back] * share[back])
        else:
            want = pv[0] + pv[back]
        assert torch.equal(torch.isinf(pair_pv), torch.isinf(want))
        finite = torch.isfinite(want)
        err = (pair_pv.double() - want).abs()[finite]
        assert (err <= bound * (pv[0].abs() + pv[back].abs())[finite] + 2**-24 * want.abs()[finite] + 1e-45).all()
    else:
        assert pair_pv is None
    if joint:
        separate = pos_val[0] == torch.inf
        assert torch.equal(coef, torch.where(separate, -h * scale, 0.0))
        want = float(h) * float(sims.double()[separate].sum())
        assert abs(float(separate_dot) - want) <= 1e-6 * (abs(want) + float(h) * float(sims.abs().sum()))
    else:
        assert coef is None and separate_dot is None


def test_backward_weights_rejects_bad_input():
    lse, z, pv = torch.zeros(2, 2, 5, device=DEVICE), torch.zeros(2, 5, device=DEVICE), torch.zeros(2, 5, device=DEVICE)
    one = torch.ones((), device=DEVICE)
    with pytest.raises(ValueError, match=r"lse and log_z must be fp32 \[2, 2, 5\] and \[2, 5\]"):
        sim_lse.backward_weights(one, one, lse, z[:, :4], pv, torch.zeros(5, device=DEVICE), True, 1)
    with pytest.raises(ValueError, match="back must be doc_to_query's index among the 2 directions or 0, got 2"):
        sim_lse.backward_weights(one, one, lse, z, pv, torch.zeros(5, device=DEVICE), True, 2)
    with pytest.raises(ValueError, match=r"sims must have shape \[5\]"):
        sim_lse.backward_weights(one, one, lse, z, pv, torch.zeros(4, device=DEVICE), True, 1)


def test_softmax_exact_at_large_logits(poison):
    """The backward's softmax entries from the LSE's two parts at fp32 logits of 2e4 .. 4e4, each row's top entries
    5 .. 10 apart (dot similarity on values whose products and logits fp32 holds exactly): dr_hat, dc_hat and dscale
    within 2e-6 of the fp64 oracle's size. From the rounded LSE alone, exp(logit - hi), an entry carries hi's
    rounding, up to ulp(4e4) / 2 = 2e-3 of it: the same computation in torch errs by more than 1e-4 here."""
    M, N = 8, 40
    r = (1.0 + torch.arange(M, dtype=torch.float32) / 8)[:, None]
    c = (1000.0 + torch.arange(N, dtype=torch.float32) / 4)[:, None]
    g = torch.linspace(0.5, 1.5, M)
    ones_r, ones_c = torch.ones(M), torch.ones(N)
    opts = dict(period=N, offset=0, mask_own=False, pen_mode=0, alpha=0.0)
    lse_w, *want = oracle(r, c, ones_r, ones_c, 20.0, g, **opts)[:4]
    logits = 20.0 * (r.double() @ c.double().T)
    assert torch.equal(logits.float().double(), logits) and logits.max() < 4e4  # exact in fp32
    one_part = torch.exp(logits.float() - lse_w.float()[:, None]).double()
    assert float((one_part - torch.softmax(logits, dim=1)).abs().max()) > 1e-4
    r, c, ones_r, ones_c, g = (x.to(DEVICE) for x in (r, c, ones_r, ones_c, g))
    lse, _ = sim_lse_fwd(r, c, ones_r, ones_c, 20.0, **opts)
    assert (two_part_value(lse).cpu() - lse_w).abs().max() <= 1e-6
    got = sim_lse_bwd(r, c, ones_r, ones_c, 20.0, lse, g, need_dscale=True, **opts)
    for name, actual, expected in zip(("dr_hat", "dc_hat", "dscale"), got, want):
        assert_close(actual.cpu(), expected, 2e-6, name)
