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


def check(x, g, tol, scaled=False):
    """With ``scaled`` the kernel takes inv * g (the row-block op's accumulators) and skips the final factor inv."""
    out = torch.full_like(x, float("nan"))
    inv = inv_norms(x)
    got = l2norm.l2norm_bwd(x, inv, g * inv[:, None] if scaled else g, out, scaled=scaled)
    assert got is out and out.dtype == x.dtype
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


@pytest.mark.parametrize("scaled", [False, True], ids=["dx_hat", "scaled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_zero_tiny_and_huge_rows(dtype, scaled):
    """A zero row (gradient g / eps, no projection), a row shorter than eps, and rows of norm 7e-6, 7e4 and (fp32)
    7e15: equal to autograd (and finite), given dx_hat or inv * dx_hat."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 50, generator=gen)
    x[0] = 0.0
    x[1] *= 1e-14
    x[2] *= 1e-6
    x[3] *= 1e4
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


def test_bad_arguments():
    x = torch.randn(4, 3, device=DEVICE)
    g = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="grad and out of its shape"):
        l2norm.l2norm_bwd(x, inv_norms(x), g[:3], torch.empty_like(x))
    with pytest.raises(ValueError, match="must be fp32 and grad contiguous"):
        l2norm.l2norm_bwd(x, inv_norms(x), g.t().contiguous().t(), torch.empty_like(x))
    with pytest.raises(ValueError, match="out must have x's dtype"):
        l2norm.l2norm_bwd(x, inv_norms(x), g, torch.empty_like(x, dtype=torch.float16))


def test_empty():
    x = torch.empty(0, 5, device=DEVICE)
    out = torch.empty_like(x)
    assert l2norm.l2norm_bwd(x, inv_norms(x), torch.empty(0, 5, device=DEVICE), out) is out
