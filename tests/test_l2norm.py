"""The Triton backward of F.normalize (fastloss.ops.l2norm) against autograd through F.normalize in fp64.

Without CUDA the kernel runs on CPU tensors under TRITON_INTERPRET=1.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastloss.ops import l2norm  # noqa: E402
from fastloss.similarity import NORM_EPS  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def inv_norms(x):
    return torch.linalg.vector_norm(x.float(), dim=1).clamp_min(NORM_EPS).reciprocal()


def truth(x, g):
    """dL/dx through F.normalize(x, eps=1e-12) in fp64, for dL/dx_hat = g."""
    x64 = x.detach().double().requires_grad_(True)
    F.normalize(x64, dim=1, eps=NORM_EPS).backward(g.double())
    return x64.grad


def check(x, g, tol, scaled=False, positive=None):
    """With ``scaled`` the kernel takes inv * g (the row-block op's accumulators) and skips the final factor inv; with
    ``positive`` = (y, y_inv, coef, lo) it adds coef_j * y_inv_j * y_j to rows lo + j of g (times inv, scaled; y_inv
    None: coef_j * y_j to the kernel's input, g or inv * g)."""
    out = torch.full_like(x, float("nan"))
    inv = inv_norms(x)
    grad = g * inv[:, None] if scaled else g.clone()
    got = l2norm.l2norm_bwd(x, inv, grad, out, scaled=scaled, positive=positive)
    assert got is out and out.dtype == x.dtype
    assert torch.equal(grad, g * inv[:, None] if scaled else g)  # grad itself unchanged
    if positive is not None:  # the gradient w.r.t. x_hat that the term makes
        y, y_inv, coef, lo = positive
        rows = slice(lo, lo + y.shape[0])
        term = (coef if y_inv is None else coef * y_inv).double()[:, None] * y.double()
        if scaled and y_inv is None:  # added to inv * g
            term /= inv[rows].double()[:, None]
        g = g.double()
        g[rows] += term
    want = truth(x, g)
    assert torch.isfinite(out).all()
    # each row to its own scale |g| / max(|x|, eps): rows of tiny vectors carry large gradients, and where the exact
    # gradient vanishes (D = 1) the rounding of g - x_hat <x_hat, g> is what remains
    scale = g.double().abs().amax(dim=1) * inv_norms(x).double()
    size = torch.maximum(want.abs().amax(dim=1), scale)[:, None].clamp_min(1e-30)
    err = (out.double() - want).abs() / size
    assert err.max() <= tol, f"error {err.max():.2e} of the row's gradient scale > {tol:.1e} (rows {err.amax(1)})"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("M,D", [(1, 1), (5, 3), (37, 130), (300, 257), (17, 600)], ids=str)
def test_matches_autograd(M, D, dtype):
    """Odd shapes: D below, at and across BLOCK_D (256, looped), rows across programs."""
    gen = torch.Generator().manual_seed(M * D)
    x = torch.randn(M, D, generator=gen).to(DEVICE, dtype)
    g = torch.randn(M, D, generator=gen).to(DEVICE)
    check(x, g, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_strided_x_and_out(dtype):
    """A transposed x (elements of a row apart) and a row slice of wider rows: dx takes x's strides."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 24, generator=gen).to(DEVICE, dtype)
    g = torch.randn(24, 40, generator=gen).to(DEVICE)
    check(base.t(), g, 1e-5 if dtype == torch.float32 else 1e-2)
    check(base[:, 3:20], torch.randn(40, 17, generator=gen).to(DEVICE), 1e-5 if dtype == torch.float32 else 1e-2)


def _rows_of_every_size(n: int, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """n >= 4 random rows of 50 (fp32, CPU), the first four a zero row, one shorter than eps, and rows of norm ~7e-6 and
    ~7e4; and the generator, for more."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 50, generator=gen)
    x[0] = 0.0
    x[1] *= 1e-14
    x[2] *= 1e-6
    x[3] *= 1e4
    return x, gen


@pytest.mark.parametrize("scaled", [False, True], ids=["dx_hat", "scaled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_zero_tiny_and_huge_rows(dtype, scaled):
    """A zero row (gradient g / eps, no projection), a row shorter than eps, and rows of norm 7e-6, 7e4 and (fp32)
    7e15: equal to autograd (and finite), given dx_hat or inv * dx_hat."""
    x, gen = _rows_of_every_size(6, seed=5)
    x[4] *= 1e15 if dtype == torch.float32 else 1.0  # its squares stay in fp32 range (the inverse norm needs them)
    x = x.to(dtype)
    # gradients of a size that dx can hold in fp16 too: g / eps for rows shorter than eps, g / 7e-6 for row 2
    g = torch.randn(6, 50, generator=gen) * torch.tensor([1e-13, 1e-13, 1e-2, 1.0, 1.0, 1.0])[:, None]
    check(x.to(DEVICE), g.to(DEVICE), 1e-5 if dtype == torch.float32 else 1e-2, scaled)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_scaled_gradient(dtype):
    """Given inv * dx_hat (``scaled``), odd shapes across BLOCK_D: the same dx."""
    gen = torch.Generator().manual_seed(11)
    for M, D in ((5, 3), (37, 300)):
        x = torch.randn(M, D, generator=gen).to(DEVICE, dtype)
        check(x, torch.randn(M, D, generator=gen).to(DEVICE), 1e-5 if dtype == torch.float32 else 1e-2, scaled=True)


@pytest.mark.parametrize("weights", [False, True], ids=["coef", "weights"])
@pytest.mark.parametrize("scaled", [False, True], ids=["dx_hat", "scaled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("M,D,n,lo", [(1, 1, 1, 0), (37, 130, 20, 9), (300, 257, 7, 293), (17, 600, 17, 0)], ids=str)
def test_positive_term(M, D, n, lo, dtype, scaled, weights):
    """MNRL's positive pair's term (coef_j * y_hat_j added to rows lo + j, as the flash backward adds it to a window
    of q's or the positives' rows; ``weights``: coef_j * y_j, the row-block op's weights from its row pass) inside the
    kernel: the backward of F.normalize for the gradient with the term, against fp64 autograd. Rows before, inside and
    after the range, across programs and BLOCK_D; a strided y."""
    gen = torch.Generator().manual_seed(M * D + n)
    x = torch.randn(M, D, generator=gen).to(DEVICE, dtype)
    g = torch.randn(M, D, generator=gen).to(DEVICE)
    y = torch.randn(D, n, generator=gen).to(DEVICE, dtype).t()  # elements of a row apart
    y_inv = inv_norms(y)
    coef = torch.randn(n, generator=gen).to(DEVICE)
    positive = (y, None if weights else y_inv, coef, lo)
    check(x, g, 1e-5 if dtype == torch.float32 else 1e-2, scaled, positive=positive)


def test_bad_arguments():
    x = torch.randn(4, 3, device=DEVICE)
    g = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="grad and out of its shape"):
        l2norm.l2norm_bwd(x, inv_norms(x), g[:3], torch.empty_like(x))
    with pytest.raises(ValueError, match="must be fp32 and grad contiguous"):
        l2norm.l2norm_bwd(x, inv_norms(x), g.t().contiguous().t(), torch.empty_like(x))
    with pytest.raises(ValueError, match="out must have x's dtype"):
        l2norm.l2norm_bwd(x, inv_norms(x), g, torch.empty_like(x, dtype=torch.float16))
    y, ones = torch.randn(2, 3, device=DEVICE), torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match=r"positive = \(y \[n, D\], y_inv \[n\], coef \[n\], lo\) with lo \+ n <= 4"):
        l2norm.l2norm_bwd(x, inv_norms(x), g, torch.empty_like(x), positive=(y, ones, ones, 3))
    with pytest.raises(ValueError, match="positive = "):
        l2norm.l2norm_bwd(x, inv_norms(x), g, torch.empty_like(x), positive=(y[:, :2], ones, ones, 0))
    with pytest.raises(ValueError, match="y_inv and coef must be fp32"):
        l2norm.l2norm_bwd(x, inv_norms(x), g, torch.empty_like(x), positive=(y, ones.double(), ones, 0))


def test_empty():
    x = torch.empty(0, 5, device=DEVICE)
    out = torch.empty_like(x)
    assert l2norm.l2norm_bwd(x, inv_norms(x), torch.empty(0, 5, device=DEVICE), out) is out


def _offsets(rows, pad):
    """Offsets of tensors of ``rows`` rows in one vector, ``pad`` entries of padding after each; and its length."""
    offsets = [0]
    for n in rows:
        offsets.append(offsets[-1] + n + pad)
    return offsets[:-1], offsets[-1]


def _truth_inv(x):
    return 1.0 / torch.linalg.vector_norm(x.double(), dim=1).clamp_min(NORM_EPS)


@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize(
    "rows,D,pad,pairs",
    [([1, 1], 1, 0, (0, 1)), ([13, 26], 9, 3, (2, 9)), ([37, 74, 37], 300, 27, (0, 37)), ([5, 6, 0], 257, 1, None)],
    ids=["1x1", "odd", "three-looped", "no-pairs"],
)
def test_inverse_norms(rows, D, pad, pairs, dtype, normalize):
    """Each tensor's 1 / max(|x_i|, eps) at its offset (within 2^-22 of fp64's, i.e. the square root and division
    correctly rounded), the padding exactly 1, all 1 for dot similarity; the pairs' similarities <x_i, y_i> inv inv
    within 1e-6 of fp64's relative to |x_i| |y_i| inv inv (the sums of products in fp32). Odd shapes, D across
    BLOCK_D (looped), a strided tensor, an empty last one, a zero row."""
    gen = torch.Generator().manual_seed(sum(rows) * D)
    xs = [torch.randn(n, D, generator=gen).to(DEVICE, dtype) for n in rows]
    xs[1] = torch.randn(D, rows[1], generator=gen).to(DEVICE, dtype).t()  # elements of a row apart
    xs[1][min(1, rows[1] - 1)] = 0.0
    offsets, length = _offsets(rows, pad)
    inv, sims = l2norm.inverse_norms(xs, offsets, length, normalize, pairs)
    assert inv.shape == (length,) and inv.dtype == torch.float32
    padding = torch.ones(length, dtype=torch.bool)
    for x, a in zip(xs, offsets):
        got = inv[a : a + x.shape[0]].cpu().double()
        padding[a : a + x.shape[0]] = False
        if not normalize:
            assert torch.equal(got, torch.ones_like(got))
            continue
        want = _truth_inv(x.cpu())
        assert ((got - want).abs() <= 2**-22 * want).all()
    assert torch.equal(inv[padding.to(inv.device)], torch.ones(int(padding.sum()), device=inv.device))
    if pairs is None:
        assert sims is None
        return
    first, count = pairs
    x, y = (t[first : first + count].cpu().double() for t in xs[:2])
    inv_x, inv_y = (_truth_inv(t) if normalize else torch.ones(count, dtype=torch.float64) for t in (x, y))
    want = (x * y).sum(dim=1) * inv_x * inv_y
    size = x.norm(dim=1) * y.norm(dim=1) * inv_x * inv_y
    assert sims.shape == (count,) and sims.dtype == torch.float32
    assert ((sims.cpu().double() - want).abs() <= 1e-6 * size + 1e-30).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_inverse_norms_zero_tiny_huge_and_non_finite_rows(dtype):
    """As torch's norm, clamp and reciprocal: 1 / eps for a zero row and one shorter than eps, 1 / |x| for norms of
    7e-6 and 7e4, 0 where the sum of squares overflows fp32 (torch's norm is inf there too) or a value is inf, NaN for
    a NaN; the pairs (each row with itself) from those inverse norms."""
    x, _ = _rows_of_every_size(7, seed=6)
    x[4] = 1e20 if dtype == torch.float32 else 6e4  # squares beyond fp32 (fp32); |x| = 4.2e5 (half)
    x[5, 3] = float("inf")
    x[6, 7] = float("nan")
    x = x.to(DEVICE, dtype)
    inv, sims = l2norm.inverse_norms([x, x], [0, 7], 14, True, (0, 7))
    want = torch.linalg.vector_norm(x.float(), dim=1).clamp_min(NORM_EPS).reciprocal()
    for got in (inv[:7], inv[7:]):
        torch.testing.assert_close(got, want, rtol=2**-22, atol=0.0, equal_nan=True)
    assert inv[4] == (0.0 if dtype == torch.float32 else want[4]) and inv[5] == 0.0 and inv[6].isnan()
    assert torch.equal(inv[:2], torch.full((2,), 1.0 / NORM_EPS, device=inv.device))
    # each row with itself: |x|^2 inv^2 (0 for the zero row, 0.005 for the one shorter than eps), NaN for the NaN
    want_sims = x[:4].double().square().sum(dim=1) * want[:4].double().square()
    assert ((sims[:4].double() - want_sims).abs() <= 1e-6 * want_sims).all() and sims[0] == 0.0 and sims[6].isnan()


def test_inverse_norms_bad_arguments():
    x = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="room for its rows"):
        l2norm.inverse_norms([x, x], [0, 3], 8, True)
    with pytest.raises(ValueError, match="room for its rows"):
        l2norm.inverse_norms([x, x], [0, 4], 7, True)
    with pytest.raises(ValueError, match="room for its rows"):
        l2norm.inverse_norms([x], [0, 4], 8, True)
    with pytest.raises(ValueError, match="one D"):
        l2norm.inverse_norms([x, torch.randn(4, 2, device=DEVICE)], [0, 4], 8, True)
    with pytest.raises(ValueError, match=r"pairs \(2, 3\) must be rows of the first two tensors"):
        l2norm.inverse_norms([x, x], [0, 4], 8, True, (2, 3))
    with pytest.raises(ValueError, match="pairs"):
        l2norm.inverse_norms([x], [0], 4, True, (0, 1))
