"""F.normalize(x, eps)'s inverse norms and its backward as Triton kernels: the flash MNRL path's prologue and epilogue.

inverse_norms: inv_i = 1 / max(|x_i|, eps) of several tensors into one fp32 vector (each at its offset; the padding
between them 1), and MNRL's positive pairs' similarities <x_i, y_i> inv_i inv_y_i over a range of rows of the first
tensor and the same rows of the second, one launch per tensor: the torch ops took ~10 launches for two tensors (a norm
per tensor, its clamp and reciprocal, the pairs' product in fp32, its sum, its copy and two scalings). Sums of squares
and of products in fp32 (each row in one program), the square root and the division correctly rounded, as torch's
ops are; the summation order is Triton's, so a norm may differ from torch.linalg.vector_norm's in its last bit.

For the gradient g = dL/dx_hat (fp32 [M, D]) of x_hat = x / max(|x|, eps) and inv = 1 / max(|x|, eps) (fp32 [M]):
    dx = (g - x_hat <x_hat, g>) * inv,    with no projection where |x| < eps (the clamp passes no gradient to the norm)
or, ``scaled``, given a = inv * g (the row-block op's accumulators): dx = a - x_hat <x_hat, a>.
Each program takes BLOCK_R rows: one pass over D sums <x_hat, g> in fp32, a second writes dx in x's dtype (rounded
once). Nothing is allocated beyond dx, against the torch ops' fp32 temporaries of x_hat and the product
(fastloss.ops.mnrl._norm_backward), and x and g are read twice (the second time mostly from L2) instead of over
several passes. x and dx may have any strides; g is contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastloss.ops.sim_lse import _on_device
from fastloss.similarity import NORM_EPS

TILE_ELEMENTS = 4096  # per program and step: BLOCK_R rows x BLOCK_D columns
BLOCK_D_MAX = 256


@triton.jit
def inverse_norms_kernel(
    x,
    inv,
    M,
    n_out,  # entries of inv this launch writes: x's rows and the padding after them
    D,
    stride_xr,
    stride_xd,
    y,  # SIMS: the pairs' second tensor, whose inverse norms y_inv holds already (an earlier launch)
    y_inv,
    sims,
    first,  # SIMS: the pairs are rows first .. last - 1 of x and of y, sims[i - first]
    last,
    stride_yr,
    stride_yd,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SIMS: tl.constexpr,
):
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < M
    m_p = m_r & (o_r >= first) & (o_r < last)
    b_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    b_dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if NORMALIZE or SIMS:
        for start_d in range(0, D, BLOCK_D):
            o_d = start_d + tl.arange(0, BLOCK_D)
            m_d = o_d[None, :] < D
            b_x = tl.load(x + o_r[:, None] * stride_xr + o_d[None, :] * stride_xd, mask=m_r[:, None] & m_d, other=0.0)
            b_x = b_x.to(tl.float32)
            if NORMALIZE:
                b_sq += tl.sum(b_x * b_x, axis=1)
            if SIMS:
                m_y = m_p[:, None] & m_d
                b_y = tl.load(y + o_r[:, None] * stride_yr + o_d[None, :] * stride_yd, mask=m_y, other=0.0)
                b_dot += tl.sum(b_x * b_y.to(tl.float32), axis=1)
    b_inv = tl.zeros((BLOCK_R,), dtype=tl.float32) + 1.0
    if NORMALIZE:  # 1 / max(|x|, eps), NaN kept (as torch's clamp_min keeps it)
        b_norm = tl.maximum(tl.sqrt_rn(b_sq), eps, propagate_nan=tl.PropagateNan.ALL)
        b_inv = tl.where(m_r, tl.div_rn(b_inv, b_norm), 1.0)  # the padding after the rows: 1
    tl.store(inv + o_r, b_inv, mask=o_r < n_out)
    if SIMS:
        b_y_inv = tl.load(y_inv + o_r, mask=m_p, other=0.0)
        tl.store(sims + (o_r - first), b_dot * b_inv * b_y_inv, mask=m_p)


@triton.jit
def _load_x_g(
    x, g, y, b_w, o_r, o_p, m_r, m_p, o_d, D, stride_xr, stride_xd, stride_yr, stride_yd, POSITIVE: tl.constexpr
):
    """x's rows (fp32) and g's, with the positive term where POSITIVE, at columns o_d."""
    m_d = o_d[None, :] < D
    m_x = m_r[:, None] & m_d
    b_x = tl.load(x + o_r[:, None] * stride_xr + o_d[None, :] * stride_xd, mask=m_x, other=0.0).to(tl.float32)
    b_g = tl.load(g + o_r[:, None] * D + o_d[None, :], mask=m_x, other=0.0)
    if POSITIVE:
        b_y = tl.load(y + o_p[:, None] * stride_yr + o_d[None, :] * stride_yd, mask=m_p[:, None] & m_d, other=0.0)
        b_g = b_g + b_y.to(tl.float32) * b_w[:, None]
    return b_x, b_g


@triton.jit
def l2norm_bwd_kernel(
    x,
    inv,
    g,
    dx,
    M,
    D,
    stride_xr,
    stride_xd,
    stride_dxr,
    stride_dxd,
    inv_max,  # 1 / eps: rows whose inv reaches it are shorter than eps and get no projection
    y,  # POSITIVE: g's rows lo .. lo + n_pos - 1 take coef_j * y_inv_j * y_j (times inv, SCALED) first, or with
    # WEIGHTS coef_j * y_j (coef the whole weight)
    y_inv,
    coef,
    lo,
    n_pos,
    stride_yr,
    stride_yd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCALED: tl.constexpr = False,  # g holds inv * dL/dx_hat: dx without the final factor inv
    POSITIVE: tl.constexpr = False,
    WEIGHTS: tl.constexpr = False,
):
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < M
    b_inv = tl.load(inv + o_r, mask=m_r, other=0.0)
    o_p = o_r - lo
    m_p = m_r & (o_p >= 0) & (o_p < n_pos)
    b_w = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if POSITIVE:  # rounded as the torch ops round it: (coef * y_inv) [* inv], then added to g
        b_w = tl.load(coef + o_p, mask=m_p, other=0.0)
        if not WEIGHTS:
            b_w = b_w * tl.load(y_inv + o_p, mask=m_p, other=0.0)
            if SCALED:
                b_w = b_w * b_inv
    b_dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start_d in range(0, D, BLOCK_D):
        o_d = start_d + tl.arange(0, BLOCK_D)
        b_x, b_g = _load_x_g(
            x, g, y, b_w, o_r, o_p, m_r, m_p, o_d, D, stride_xr, stride_xd, stride_yr, stride_yd, POSITIVE
        )
        b_dot += tl.sum(b_x * b_inv[:, None] * b_g, axis=1)
    b_proj = tl.where(b_inv < inv_max, b_dot, 0.0)
    for start_d in range(0, D, BLOCK_D):
        o_d = start_d + tl.arange(0, BLOCK_D)
        m_x = m_r[:, None] & (o_d[None, :] < D)
        b_x, b_g = _load_x_g(
            x, g, y, b_w, o_r, o_p, m_r, m_p, o_d, D, stride_xr, stride_xd, stride_yr, stride_yd, POSITIVE
        )
        b_dx = b_g - b_x * b_inv[:, None] * b_proj[:, None]
        if not SCALED:
            b_dx = b_dx * b_inv[:, None]
        tl.store(dx + o_r[:, None] * stride_dxr + o_d[None, :] * stride_dxd, b_dx.to(dx.dtype.element_ty), mask=m_x)


def _blocks(dim: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of the row kernels for rows of ``dim``."""
    block_d = min(BLOCK_D_MAX, triton.next_power_of_2(max(1, dim)))
    return TILE_ELEMENTS // block_d, block_d


def inverse_norms(
    xs: Sequence[Tensor], offsets: Sequence[int], length: int, normalize: bool, pairs: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor | None]:
    """(inv, sims): 1 / max(|x_i|, eps) of each tensor of ``xs`` ([n_k, D] each, one dtype and device) at its offset
    in one fp32 vector of ``length`` (``offsets`` ascending, each at least the previous one plus its tensor's rows;
    every other entry 1; all 1 without ``normalize``), and with ``pairs`` = (first, count) the fp32 similarities
    <x_i, y_i> inv_x_i inv_y_i of rows first .. first + count - 1 of x = xs[0] and y = xs[1] (None without)."""
    ends = [*offsets[1:], length]  # each launch writes its tensor's rows and the padding after them
    fits = all(a + x.shape[0] <= b for x, a, b in zip(xs, offsets, ends))
    if not xs or len(xs) != len(offsets) or offsets[0] < 0 or not fits:
        raise ValueError(
            f"inverse_norms: ascending offsets, one per tensor, each with room for its rows within length {length}, "
            f"got {list(offsets)} for {[x.shape[0] for x in xs]} rows"
        )
    if any(x.ndim != 2 or x.shape[1] != xs[0].shape[1] for x in xs):
        raise ValueError(f"inverse_norms: tensors [n, D] of one D, got {[tuple(x.shape) for x in xs]}")
    first, count = pairs if pairs is not None else (0, 0)
    if pairs is not None and (len(xs) < 2 or first < 0 or first + count > min(x.shape[0] for x in xs[:2])):
        raise ValueError(f"inverse_norms: pairs {pairs} must be rows of the first two tensors")
    inv = torch.empty(length, device=xs[0].device, dtype=torch.float32)
    sims = torch.empty(count, device=xs[0].device, dtype=torch.float32) if pairs is not None else None
    block_r, block_d = _blocks(xs[0].shape[1])
    if offsets[0]:  # none in the flash op, whose offsets start at 0
        inv[: offsets[0]] = 1.0
    with _on_device(xs[0]):
        # the second tensor first: the pairs' launch reads its inverse norms
        for k in [*range(1, len(xs)), 0]:
            x, a, b = xs[k], offsets[k], ends[k]
            with_sims = k == 0 and pairs is not None
            if b == a:  # an empty tensor at the end
                continue
            y = xs[1] if with_sims else x
            y_inv = inv[offsets[1] :] if with_sims else inv
            # 8 warps: with 4 the pairs' launch spilled registers at D = 100 (two 32 x 128 fp32 tiles, sm_90;
            # scripts/triton_aot.py), as the one-tensor launches did not
            inverse_norms_kernel[(triton.cdiv(b - a, block_r),)](
                x, inv[a:], x.shape[0], b - a, x.shape[1], *x.stride(), y, y_inv, sims if with_sims else inv,
                first, first + count, *y.stride(), NORM_EPS, block_r, block_d, normalize, with_sims, num_warps=8,
            )  # fmt: skip
    return inv, sims


def l2norm_bwd(
    x: Tensor,
    inv: Tensor,
    grad: Tensor,
    out: Tensor,
    scaled: bool = False,
    positive: tuple[Tensor, Tensor | None, Tensor, int] | None = None,
) -> Tensor:
    """Write the backward of F.normalize(x, eps=1e-12) for ``grad`` (fp32 [M, D], contiguous; with ``scaled`` inv *
    the gradient) into ``out`` (x's shape and dtype), given inv = 1 / max(|x_i|, eps) (fp32 [M]); returns ``out``.
    ``positive`` = (y [n, D], y_inv [n], coef [n], lo) (fp32 vectors): grad's rows lo .. lo + n - 1 taken with
    coef_j * y_inv_j * y_j added (times inv with ``scaled``; y_inv None: coef_j * y_j), MNRL's positive pair's term,
    as fastloss.ops.mnrl._add_rows adds it (grad itself unchanged)."""
    if x.ndim != 2 or grad.shape != x.shape or out.shape != x.shape or inv.shape != x.shape[:1]:
        raise ValueError(
            f"l2norm_bwd: x [M, D], grad and out of its shape, inv [M], got {tuple(x.shape)}, {tuple(grad.shape)}, "
            f"{tuple(out.shape)}, {tuple(inv.shape)}"
        )
    if grad.dtype != torch.float32 or inv.dtype != torch.float32 or not grad.is_contiguous():
        raise ValueError(f"l2norm_bwd: grad and inv must be fp32 and grad contiguous, got {grad.dtype}, {inv.dtype}")
    if out.dtype != x.dtype:
        raise ValueError(f"l2norm_bwd: out must have x's dtype {x.dtype}, got {out.dtype}")
    M, D = x.shape
    if positive is not None:
        y, y_inv, coef, lo = positive
        n = y.shape[0]
        y_inv = coef if y_inv is None else y_inv  # unread (WEIGHTS)
        if y.ndim != 2 or y.shape[1] != D or y_inv.shape != (n,) or coef.shape != (n,) or lo < 0 or lo + n > M:
            raise ValueError(
                f"l2norm_bwd: positive = (y [n, D], y_inv [n], coef [n], lo) with lo + n <= {M}, got "
                f"{tuple(y.shape)}, {tuple(y_inv.shape)}, {tuple(coef.shape)}, {lo}"
            )
        if y_inv.dtype != torch.float32 or coef.dtype != torch.float32:
            raise ValueError(f"l2norm_bwd: positive's y_inv and coef must be fp32, got {y_inv.dtype}, {coef.dtype}")
        pos_args = (y, y_inv.contiguous(), coef.contiguous(), lo, n, *y.stride())
    else:
        pos_args = (x, inv, inv, 0, 0, 0, 0)  # unread
    if M == 0 or D == 0:
        return out
    block_r, block_d = _blocks(D)
    with _on_device(x):
        l2norm_bwd_kernel[(triton.cdiv(M, block_r),)](
            x, inv.contiguous(), grad, out, M, D, *x.stride(), *out.stride(), 1.0 / NORM_EPS, *pos_args,
            block_r, block_d, scaled, positive is not None, positive is not None and positive[1] is None,
            num_warps=8 if positive is not None else 4,  # with 4 the positive term spilled at D = 100 (sm_90)
        )  # fmt: skip
    return out
