"""The backward of F.normalize(x, eps) as one Triton kernel: the flash MNRL path's epilogue.

For the gradient g = dL/dx_hat (fp32 [M, D]) of x_hat = x / max(|x|, eps) and inv = 1 / max(|x|, eps) (fp32 [M]):
    dx = (g - x_hat <x_hat, g>) * inv,    with no projection where |x| < eps (the clamp passes no gradient to the norm)
or, ``scaled``, given a = inv * g (the row-block op's accumulators): dx = a - x_hat <x_hat, a>.
Each program takes BLOCK_R rows: one pass over D sums <x_hat, g> in fp32, a second writes dx in x's dtype (rounded
once). Nothing is allocated beyond dx, against the torch ops' fp32 temporaries of x_hat and the product
(fastloss.ops.mnrl._norm_backward), and x and g are read twice (the second time mostly from L2) instead of over
several passes. x and dx may have any strides; g is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastloss.ops.sim_lse import _on_device
from fastloss.similarity import NORM_EPS

TILE_ELEMENTS = 4096  # per program and step: BLOCK_R rows x BLOCK_D columns
BLOCK_D_MAX = 256


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
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCALED: tl.constexpr = False,  # g holds inv * dL/dx_hat: dx without the final factor inv
):
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < M
    b_inv = tl.load(inv + o_r, mask=m_r, other=0.0)
    b_dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start_d in range(0, D, BLOCK_D):
        o_d = start_d + tl.arange(0, BLOCK_D)
        m_x = m_r[:, None] & (o_d[None, :] < D)
        b_x = tl.load(x + o_r[:, None] * stride_xr + o_d[None, :] * stride_xd, mask=m_x, other=0.0)
        b_g = tl.load(g + o_r[:, None] * D + o_d[None, :], mask=m_x, other=0.0)
        b_dot += tl.sum(b_x.to(tl.float32) * b_inv[:, None] * b_g, axis=1)
    b_proj = tl.where(b_inv < inv_max, b_dot, 0.0)
    for start_d in range(0, D, BLOCK_D):
        o_d = start_d + tl.arange(0, BLOCK_D)
        m_x = m_r[:, None] & (o_d[None, :] < D)
        b_x = tl.load(x + o_r[:, None] * stride_xr + o_d[None, :] * stride_xd, mask=m_x, other=0.0)
        b_g = tl.load(g + o_r[:, None] * D + o_d[None, :], mask=m_x, other=0.0)
        b_dx = b_g - b_x.to(tl.float32) * b_inv[:, None] * b_proj[:, None]
        if not SCALED:
            b_dx = b_dx * b_inv[:, None]
        tl.store(dx + o_r[:, None] * stride_dxr + o_d[None, :] * stride_dxd, b_dx.to(dx.dtype.element_ty), mask=m_x)


def l2norm_bwd(x: Tensor, inv: Tensor, grad: Tensor, out: Tensor, scaled: bool = False) -> Tensor:
    """Write the backward of F.normalize(x, eps=1e-12) for ``grad`` (fp32 [M, D], contiguous; with ``scaled`` inv *
    the gradient) into ``out`` (x's shape and dtype), given inv = 1 / max(|x_i|, eps) (fp32 [M]); returns ``out``."""
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
    if M == 0 or D == 0:
        return out
    block_d = min(BLOCK_D_MAX, triton.next_power_of_2(D))
    block_r = TILE_ELEMENTS // block_d
    with _on_device(x):
        l2norm_bwd_kernel[(triton.cdiv(M, block_r),)](
            x, inv.contiguous(), grad, out, M, D, *x.stride(), *out.stride(), 1.0 / NORM_EPS, block_r, block_d, scaled
        )
    return out
