"""The fused CoSENT / AnglE op: pairwise similarity, scale and the ranking logsumexp in O(B) memory.

Pairs p = 0 .. N-1 join anchor row ``a[p mod A]`` and ``b[p]`` (A = N for CoSENT; AnglE's n-tuples keep the
anchors once and stack the other columns, so the anchors are never repeated in memory). With halves
``x = (x1, x2)`` of ``H = ceil(D / 2)`` (x2 zero-padded for odd D) and ``x_hat = x / max(|x|, eps)``:
  dot    z_p = <a, b>
  cos    z_p = <a_hat, b_hat>
  angle  z_p = <a_hat, b_hat> + <a2_hat, b1_hat> - <a1_hat, b2_hat>,  sim_p = |z_p|   (else sim_p = z_p)
  s_p = scale * sim_p;  loss = log(1 + sum_{y_i < y_j} exp(s_i - s_j))
Sorting the labels (ties keep their order; the loss does not depend on it), with k the sorted position,
hi_k / lo_k the first position with a label > y_k / >= y_k:
  R_m = LSE_{j >= m}(-s_j) (R_N = -inf),   Q_m = LSE_{j < m}(s_j) (Q_0 = -inf),   t_k = s_k + R_{hi_k}
  loss = LSE(0, t_0, ..., t_{N-1}) = softplus(LSE(t))   (as softplus: in a well-ranked batch the sum of exp(t) is far
                                                           below 1's ulp, and log(1 + sum) would round it away)
  dloss/ds_k = exp(t_k - loss) - exp(Q_{lo_k} - s_k - loss)    (each term a share of the partition: <= 1)
The gradient w.r.t. the similarities is O(N) and comes out of the forward's ranking kernel; the backward is one
pass over the embeddings with the chain rule through the similarity (u, v: d z / d a_hat, d z / d b_hat):
  cos    u = b_hat, v = a_hat;   angle  u = (b1 - b2, b2 + b1) / |b|,  v = (a1 + a2, a2 - a1) / |a|
  da = G_p / max(|a|, eps) * (u - a_hat * z_p [|a| >= eps]),   G_p = grad * scale * dloss/ds_p * dsim/dz
and likewise for db (dot: da = G_p b, db = G_p a); da sums over the pairs that share an anchor.

Kernels: ``cosent_sim_fwd_kernel`` (row blocks: z, |a|, |b| per pair), ``cosent_rank_kernel`` (one program: a
backward pass for R and the loss, a forward pass for Q and dloss/ds; O(N) scratch) and ``cosent_sim_bwd_kernel``
(anchor row blocks, the D tiles outside and the pairs of each anchor inside). ``cosent_fwd_torch`` /
``cosent_bwd_torch`` are the same maths in closed form with torch ops (row dots, norms, logcumsumexp, addcmul):
about half the B x D memory passes of autograd through sentence-transformers' code, the CPU fallback.
``cosent_fwd_native`` / ``cosent_bwd_native`` call fastloss._C (csrc/cosent.cpp): one parallel pass over the
pairs, the ranking scans in fp64, one parallel pass over the anchors for the gradients; the CPU default once built.
The custom ops take the implementation by name (``impl``: "triton" | "native" | "closed_form"). Every one returns
loss, aux and gsim in fp32, or fp64 for fp64 inputs (native and closed_form then compute in fp64: gradcheck).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastloss import _backend
from fastloss.ops._custom_op import custom_op
from fastloss.ops.mnrl import _softplus as _softplus_torch
from fastloss.similarity import NORM_EPS

try:
    import triton
    import triton.language as tl

    from fastloss.ops.sim_lse import _log_sum, _rebase
except ImportError:  # no triton (e.g. macOS): the closed-form torch implementation still works
    triton = tl = None


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


KIND_DOT, KIND_COS, KIND_ANGLE = 0, 1, 2  # the kernels' KIND constexpr
KINDS = {"dot": KIND_DOT, "cos": KIND_COS, "angle": KIND_ANGLE}


def _sim_config(half: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for the similarity kernels."""
    block_d = min(triton.next_power_of_2(max(half, 1)), 64)
    return 32, block_d, 4


def _rank_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for the single-program ranking kernel."""
    block = min(triton.next_power_of_2(max(n, 16)), 4096)
    return block, 4 if block <= 512 else (8 if block <= 2048 else 16)


@_jit
def _logaddexp(x, y):
    b_max = tl.maximum(x, y)
    b_min = tl.minimum(x, y)
    return tl.where(b_min == float("-inf"), b_max, b_max + tl.log(1.0 + tl.exp(b_min - b_max)))


@_jit
def _softplus(x):
    """log(1 + e^x) = LSE(0, x), with the digits of a tiny e^x kept: log1p(y) as log(1 + y) * y / ((1 + y) - 1),
    which cancels the rounding of 1 + y (Goldberg), y where 1 + y rounds to 1."""
    b_y = tl.exp(-tl.abs(x))
    b_u = 1.0 + b_y
    b_log1p = tl.where(b_u == 1.0, b_y, tl.log(b_u) * b_y / tl.where(b_u == 1.0, 1.0, b_u - 1.0))
    return tl.maximum(x, 0.0) + b_log1p


@_jit
def cosent_sim_fwd_kernel(
    p_a,
    p_b,
    p_aux,
    n_pairs,
    n_anchor,
    dim,
    half,
    stride_a,
    stride_b,
    KIND: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < n_pairs
    o_a = o_n % n_anchor
    b_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_sin = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_aa = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_bb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, half, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        m_1 = m_n[:, None] & (o_d < half)[None, :]
        m_2 = m_n[:, None] & (o_d + half < dim)[None, :]
        p_a1 = p_a + o_a[:, None] * stride_a + o_d[None, :]
        p_b1 = p_b + o_n[:, None] * stride_b + o_d[None, :]
        b_a1 = tl.load(p_a1, mask=m_1, other=0.0).to(tl.float32)  # [BN, BD]
        b_a2 = tl.load(p_a1 + half, mask=m_2, other=0.0).to(tl.float32)
        b_b1 = tl.load(p_b1, mask=m_1, other=0.0).to(tl.float32)
        b_b2 = tl.load(p_b1 + half, mask=m_2, other=0.0).to(tl.float32)
        b_dot += tl.sum(b_a1 * b_b1 + b_a2 * b_b2, axis=1)
        if KIND == 2:
            b_sin += tl.sum(b_a2 * b_b1 - b_a1 * b_b2, axis=1)
        if KIND != 0:
            b_aa += tl.sum(b_a1 * b_a1 + b_a2 * b_a2, axis=1)
            b_bb += tl.sum(b_b1 * b_b1 + b_b2 * b_b2, axis=1)
    if KIND == 0:
        b_z = b_dot
        b_na = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
        b_nb = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    else:
        b_na = tl.sqrt(b_aa)
        b_nb = tl.sqrt(b_bb)
        b_z = (b_dot + b_sin) / (tl.maximum(b_na, EPS) * tl.maximum(b_nb, EPS))
    tl.store(p_aux + 0 * n_pairs + o_n, b_z, mask=m_n)
    tl.store(p_aux + 1 * n_pairs + o_n, b_na, mask=m_n)
    tl.store(p_aux + 2 * n_pairs + o_n, b_nb, mask=m_n)


@_jit
def cosent_rank_kernel(
    p_aux,
    p_scale,
    p_order,
    p_lo,
    p_hi,
    p_scratch,
    p_loss,
    p_gsim,
    n_pairs,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # scratch rows: R [N + 1], Q [N + 1], s in sorted order [N]
    p_r = p_scratch
    p_q = p_scratch + (n_pairs + 1)
    p_s = p_scratch + 2 * (n_pairs + 1)
    scale = tl.load(p_scale).to(tl.float32)
    o_blk = tl.arange(0, BLOCK).to(tl.int64)
    m_first = o_blk == 0
    tl.store(p_r + n_pairs + o_blk, tl.full((BLOCK,), float("-inf"), tl.float32), mask=m_first)
    tl.store(p_q + o_blk, tl.full((BLOCK,), float("-inf"), tl.float32), mask=m_first)

    # backward pass over sorted positions: suffix LSE of -s, then t_k = s_k + R[hi_k] into a running LSE
    b_carry = tl.full((), float("-inf"), tl.float32)
    b_m = tl.full((), float("-inf"), tl.float32)  # LSE(t) as a running max and sum; the loss is its softplus
    b_l = tl.full((), 0.0, tl.float32)
    for start in range(0, n_pairs, BLOCK):
        o_rev = start + o_blk
        m_k = o_rev < n_pairs
        o_k = n_pairs - 1 - o_rev
        o_src = tl.load(p_order + o_k, mask=m_k, other=0)
        b_z = tl.load(p_aux + o_src, mask=m_k, other=0.0)
        if KIND == 2:
            b_z = tl.abs(b_z)
        b_s = scale * b_z
        tl.store(p_s + o_k, b_s, mask=m_k)
        b_x = tl.where(m_k, -b_s, float("-inf"))
        b_r = _logaddexp(tl.associative_scan(b_x, 0, _logaddexp), b_carry)  # R[o_k]
        tl.store(p_r + o_k, b_r, mask=m_k)
        b_carry = tl.max(tl.where(m_k, b_r, float("-inf")), axis=0)
        tl.debug_barrier()
        o_hi = tl.load(p_hi + o_k, mask=m_k, other=0)
        b_t = tl.where(m_k, b_s + tl.load(p_r + o_hi, mask=m_k, other=float("-inf")), float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_t, axis=0))
        b_ref, b_rescale = _rebase(b_m, b_m_new)
        b_l = b_l * b_rescale + tl.sum(tl.exp(b_t - b_ref), axis=0)
        b_m = b_m_new
    b_loss = _softplus(_log_sum(b_m, b_l))

    # forward pass: prefix LSE of s, then dloss/ds_k scattered back to the pair order, and sum_k dloss/ds_k * sim_k
    b_carry = tl.full((), float("-inf"), tl.float32)
    b_gs = tl.full((), 0.0, tl.float32)
    for start in range(0, n_pairs, BLOCK):
        o_k = start + o_blk
        m_k = o_k < n_pairs
        b_s = tl.load(p_s + o_k, mask=m_k, other=0.0)
        b_x = tl.where(m_k, b_s, float("-inf"))
        b_q = _logaddexp(tl.associative_scan(b_x, 0, _logaddexp), b_carry)  # Q[o_k + 1]
        tl.store(p_q + o_k + 1, b_q, mask=m_k)
        b_carry = tl.max(tl.where(m_k, b_q, float("-inf")), axis=0)
        tl.debug_barrier()
        o_hi = tl.load(p_hi + o_k, mask=m_k, other=0)
        o_lo = tl.load(p_lo + o_k, mask=m_k, other=0)
        b_t = b_s + tl.load(p_r + o_hi, mask=m_k, other=float("-inf"))
        b_p = tl.load(p_q + o_lo, mask=m_k, other=float("-inf")) - b_s
        b_g = tl.exp(b_t - b_loss) - tl.exp(b_p - b_loss)
        b_g = tl.where(m_k, b_g, 0.0)
        o_src = tl.load(p_order + o_k, mask=m_k, other=0)
        tl.store(p_aux + 3 * n_pairs + o_src, b_g, mask=m_k)
        b_gs += tl.sum(b_g * b_s, axis=0)
    tl.store(p_loss, b_loss)
    tl.store(p_gsim, b_gs / scale)


@_jit
def cosent_sim_bwd_kernel(
    p_a,
    p_b,
    p_aux,
    p_grad,
    p_scale,
    p_da,
    p_db,
    n_pairs,
    n_anchor,
    n_rep,
    dim,
    half,
    stride_a,
    stride_b,
    stride_da,
    stride_db,
    KIND: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_a = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_a = o_a < n_anchor
    b_coef = tl.load(p_grad).to(tl.float32) * tl.load(p_scale).to(tl.float32)
    for d0 in range(0, half, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        m_1 = m_a[:, None] & (o_d < half)[None, :]
        m_2 = m_a[:, None] & (o_d + half < dim)[None, :]
        p_a1 = p_a + o_a[:, None] * stride_a + o_d[None, :]
        b_a1 = tl.load(p_a1, mask=m_1, other=0.0).to(tl.float32)  # [BN, BD]
        b_a2 = tl.load(p_a1 + half, mask=m_2, other=0.0).to(tl.float32)
        b_da1 = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        b_da2 = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for r in range(0, n_rep):
            o_p = r * n_anchor + o_a
            b_z = tl.load(p_aux + 0 * n_pairs + o_p, mask=m_a, other=0.0)
            b_g = b_coef * tl.load(p_aux + 3 * n_pairs + o_p, mask=m_a, other=0.0)
            if KIND == 2:
                b_g = tl.where(b_z > 0, b_g, tl.where(b_z < 0, -b_g, 0.0))
            p_b1 = p_b + o_p[:, None] * stride_b + o_d[None, :]
            b_b1 = tl.load(p_b1, mask=m_1, other=0.0).to(tl.float32)
            b_b2 = tl.load(p_b1 + half, mask=m_2, other=0.0).to(tl.float32)
            if KIND == 0:
                b_da1 += b_g[:, None] * b_b1
                b_da2 += b_g[:, None] * b_b2
                b_db1 = b_g[:, None] * b_a1
                b_db2 = b_g[:, None] * b_a2
            else:
                b_na = tl.load(p_aux + 1 * n_pairs + o_p, mask=m_a, other=1.0)
                b_nb = tl.load(p_aux + 2 * n_pairs + o_p, mask=m_a, other=1.0)
                b_ia = 1.0 / tl.maximum(b_na, EPS)
                b_ib = 1.0 / tl.maximum(b_nb, EPS)
                b_pa = tl.where(b_na >= EPS, b_z * b_ia, 0.0)  # projection on a_hat, already over |a|
                b_pb = tl.where(b_nb >= EPS, b_z * b_ib, 0.0)
                if KIND == 2:
                    b_u1, b_u2 = b_b1 - b_b2, b_b2 + b_b1
                    b_v1, b_v2 = b_a1 + b_a2, b_a2 - b_a1
                else:
                    b_u1, b_u2 = b_b1, b_b2
                    b_v1, b_v2 = b_a1, b_a2
                b_ga = (b_g * b_ia)[:, None]
                b_gb = (b_g * b_ib)[:, None]
                b_da1 += b_ga * (b_u1 * b_ib[:, None] - b_a1 * b_pa[:, None])
                b_da2 += b_ga * (b_u2 * b_ib[:, None] - b_a2 * b_pa[:, None])
                b_db1 = b_gb * (b_v1 * b_ia[:, None] - b_b1 * b_pb[:, None])
                b_db2 = b_gb * (b_v2 * b_ia[:, None] - b_b2 * b_pb[:, None])
            p_db1 = p_db + o_p[:, None] * stride_db + o_d[None, :]
            tl.store(p_db1, b_db1.to(p_db.dtype.element_ty), mask=m_1)
            tl.store(p_db1 + half, b_db2.to(p_db.dtype.element_ty), mask=m_2)
        p_da1 = p_da + o_a[:, None] * stride_da + o_d[None, :]
        tl.store(p_da1, b_da1.to(p_da.dtype.element_ty), mask=m_1)
        tl.store(p_da1 + half, b_da2.to(p_da.dtype.element_ty), mask=m_2)


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def cosent_fwd(a: Tensor, b: Tensor, labels: Tensor, scale: Tensor, kind: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss [], aux [4, N]: z, |a|, |b|, dloss/ds per pair, gsim [] = sum_p dloss/ds_p * sim_p), computed in fp32;
    returned in fp64 for fp64 inputs (the op's contract; the kernels compute fp32 all the same)."""
    a, b = _rows_contiguous(a), _rows_contiguous(b)
    n_pairs, dim = b.shape
    half = (dim + 1) // 2
    aux = torch.empty((4, n_pairs), device=b.device, dtype=torch.float32)
    block_n, block_d, warps = _sim_config(half)
    cosent_sim_fwd_kernel[(triton.cdiv(n_pairs, block_n),)](
        a,
        b,
        aux,
        n_pairs,
        a.shape[0],
        dim,
        half,
        a.stride(0),
        b.stride(0),
        KIND=kind,
        EPS=NORM_EPS,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    order, lo, hi = _sorted_ranks(labels, b.device)
    scratch = torch.empty((3 * n_pairs + 2,), device=b.device, dtype=torch.float32)
    loss = torch.empty((), device=b.device, dtype=torch.float32)
    gsim = torch.empty((), device=b.device, dtype=torch.float32)
    block, warps = _rank_config(n_pairs)
    cosent_rank_kernel[(1,)](
        aux,
        scale,
        order,
        lo,
        hi,
        scratch,
        loss,
        gsim,
        n_pairs,
        KIND=kind,
        BLOCK=block,
        num_warps=warps,
    )
    acc = _backend.accumulation_dtype(b)
    return loss.to(acc), aux.to(acc), gsim.to(acc)


def cosent_bwd(
    grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, aux: Tensor, gsim: Tensor, kind: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(da, db, dscale) for the incoming scalar ``grad``."""
    a, b = _rows_contiguous(a), _rows_contiguous(b)
    n_pairs, dim = b.shape
    n_anchor = a.shape[0]
    half = (dim + 1) // 2
    da = torch.empty_like(a)
    db = torch.empty_like(b)
    grad32 = grad.reshape(()).float()
    aux = aux.float()
    block_n, block_d, warps = _sim_config(half)
    cosent_sim_bwd_kernel[(triton.cdiv(n_anchor, block_n),)](
        a,
        b,
        aux,
        grad32,
        scale,
        da,
        db,
        n_pairs,
        n_anchor,
        n_pairs // n_anchor,
        dim,
        half,
        a.stride(0),
        b.stride(0),
        da.stride(0),
        db.stride(0),
        KIND=kind,
        EPS=NORM_EPS,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    dscale = (grad32 * gsim).to(scale.dtype).reshape(scale.shape)
    return da, db, dscale


def _pair_stats_torch(a: Tensor, b: Tensor, kind: int) -> tuple[Tensor, Tensor, Tensor]:
    """z, |a|, |b| per pair ([N], fp32 or fp64) from row dots and norms: no normalised copies of the embeddings."""
    a32, b32 = a.to(_backend.accumulation_dtype(a)), b.to(_backend.accumulation_dtype(b))
    n_pairs, dim = b.shape
    n_rep = n_pairs // a.shape[0]
    b3 = b32.reshape(n_rep, a.shape[0], dim)
    a3 = a32.unsqueeze(0)
    z = torch.linalg.vecdot(a3, b3).reshape(n_pairs)
    if kind == KIND_DOT:
        ones = torch.ones_like(z)
        return z, ones, ones
    if kind == KIND_ANGLE:
        half = (dim + 1) // 2
        rest = dim - half  # x2 has ``rest`` columns; its zero padding adds nothing
        sin = torch.linalg.vecdot(a3[..., half:], b3[..., :rest]) - torch.linalg.vecdot(a3[..., :rest], b3[..., half:])
        z = z + sin.reshape(n_pairs)
    na = torch.linalg.vector_norm(a32, dim=1).repeat(n_rep)
    nb = torch.linalg.vector_norm(b32, dim=1)
    return z / (na.clamp_min(NORM_EPS) * nb.clamp_min(NORM_EPS)), na, nb


def _sorted_ranks(labels: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(order, lo, hi): the stable label sort and, per sorted position, the first position with a label >= / >."""
    labels = labels.reshape(-1).to(device)
    if labels.dtype == torch.bool:
        labels = labels.int()
    sorted_labels, order = torch.sort(labels, stable=True)
    lo = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    hi = torch.searchsorted(sorted_labels, sorted_labels, right=True)
    return order, lo, hi


def cosent_fwd_torch(a: Tensor, b: Tensor, labels: Tensor, scale: Tensor, kind: int) -> tuple[Tensor, Tensor, Tensor]:
    """``cosent_fwd`` in closed form with torch ops (the CPU path): the same outputs, O(N) memory beyond inputs."""
    z, na, nb = _pair_stats_torch(a, b, kind)
    scale32 = scale.detach().to(z.dtype).reshape(())
    sim = z.abs() if kind == KIND_ANGLE else z
    order, lo, hi = _sorted_ranks(labels, b.device)
    s = scale32 * sim[order]
    ninf = s.new_full((1,), float("-inf"))
    suffix = torch.cat((torch.logcumsumexp(-s.flip(0), dim=0).flip(0), ninf))  # R
    prefix = torch.cat((ninf, torch.logcumsumexp(s, dim=0)))  # Q
    t = s + suffix[hi]
    loss = _softplus_torch(torch.logsumexp(t, dim=0))  # LSE(0, t) as softplus(LSE(t)): a tiny sum keeps its digits
    g_sorted = torch.exp(t - loss) - torch.exp(prefix[lo] - s - loss)
    g = torch.empty_like(g_sorted).index_copy_(0, order, g_sorted)
    gsim = (g_sorted * s).sum() / scale32
    return loss, torch.stack((z, na, nb, g)), gsim


def cosent_bwd_torch(
    grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, aux: Tensor, gsim: Tensor, kind: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``cosent_bwd`` in closed form with torch ops: da = sum_r c_ab * u(b) - c_aa * a, db = c_ba * v(a) - c_bb * b."""
    acc = _backend.accumulation_dtype(a)
    a32, b32 = a.to(acc), b.to(acc)
    n_anchor, dim = a.shape
    n_rep = b.shape[0] // n_anchor
    grad32 = grad.reshape(()).to(acc)
    z, na, nb, g = aux.unbind(0)
    big_g = grad32 * scale.detach().to(acc).reshape(()) * g
    if kind == KIND_ANGLE:
        big_g = big_g * torch.sign(z)
    if kind == KIND_DOT:
        c_ab = c_ba = big_g
        c_aa = c_bb = torch.zeros_like(big_g)
        u_b, v_a = b32, a32
    else:
        ia, ib = na.clamp_min(NORM_EPS).reciprocal(), nb.clamp_min(NORM_EPS).reciprocal()
        c_ab = c_ba = big_g * ia * ib
        c_aa = big_g * ia * torch.where(na >= NORM_EPS, z * ia, 0.0)
        c_bb = big_g * ib * torch.where(nb >= NORM_EPS, z * ib, 0.0)
        u_b, v_a = b32, a32
        if kind == KIND_ANGLE:
            half = (dim + 1) // 2
            rest = dim - half
            u_b, v_a = b32.clone(), a32.clone()
            u_b[:, :rest] -= b32[:, half:]
            u_b[:, half:] += b32[:, :rest]
            v_a[:, :rest] += a32[:, half:]
            v_a[:, half:] -= a32[:, :rest]
    c_ab, c_aa = c_ab.view(n_rep, n_anchor), c_aa.view(n_rep, n_anchor)
    u_b3 = u_b.reshape(n_rep, n_anchor, dim)
    da = a32 * (-c_aa.sum(0))[:, None]
    for r in range(n_rep):
        da.addcmul_(u_b3[r], c_ab[r][:, None])
    db = b32 * (-c_bb)[:, None]
    db.view(n_rep, n_anchor, dim).addcmul_(v_a.unsqueeze(0), c_ba.view(n_rep, n_anchor, 1))
    dscale = (grad32 * gsim).to(scale.dtype).reshape(scale.shape)
    return da.to(a.dtype), db.to(b.dtype), dscale


def cosent_fwd_native(a: Tensor, b: Tensor, labels: Tensor, scale: Tensor, kind: int) -> tuple[Tensor, Tensor, Tensor]:
    """``cosent_fwd`` in fastloss._C (csrc/cosent.cpp): one parallel pass over the pairs, the ranking in fp64."""
    from fastloss._backend import native_module

    return native_module().cosent_fwd(a, b, labels.reshape(-1), scale.detach(), kind)


def cosent_bwd_native(
    grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, aux: Tensor, gsim: Tensor, kind: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``cosent_bwd`` in fastloss._C: parallel over anchors, each anchor's gradient summed over its repeats."""
    from fastloss._backend import native_module

    da, db, dscale = native_module().cosent_bwd(grad, a, b, scale.detach(), aux, gsim, kind)
    return da, db, dscale.to(scale.dtype).reshape(scale.shape)


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration

IMPLS = ("triton", "native", "closed_form")
# host functions by name, looked up when the op runs (so a test can wrap one with monkeypatch)
_FWD = {"triton": "cosent_fwd", "native": "cosent_fwd_native", "closed_form": "cosent_fwd_torch"}
_BWD = {"triton": "cosent_bwd", "native": "cosent_bwd_native", "closed_form": "cosent_bwd_torch"}


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _cosent_fwd(
    a: Tensor, b: Tensor, labels: Tensor, scale: Tensor, kind: int, impl: str
) -> tuple[Tensor, Tensor, Tensor]:
    _check_impl(impl)
    return globals()[_FWD[impl]](a, b, labels, scale, kind)


def _cosent_fwd_fake(a, b, labels, scale, kind, impl):
    acc = _backend.accumulation_dtype(b)
    return b.new_empty((), dtype=acc), b.new_empty((4, b.shape[0]), dtype=acc), b.new_empty((), dtype=acc)


def _cosent_bwd(
    grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, aux: Tensor, gsim: Tensor, kind: int, impl: str
) -> tuple[Tensor, Tensor, Tensor]:
    _check_impl(impl)
    return globals()[_BWD[impl]](grad, a, b, scale, aux, gsim, kind)


def _cosent_bwd_fake(grad, a, b, scale, aux, gsim, kind, impl):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


_cosent_bwd_op = custom_op("cosent_bwd", _cosent_bwd, fake=_cosent_bwd_fake)


def _setup_context(ctx, inputs, output):
    a, b, _labels, scale, kind, impl = inputs
    _, aux, gsim = output
    ctx.save_for_backward(a, b, scale, aux, gsim)
    ctx.kind, ctx.impl = kind, impl


def _backward(ctx, grad_loss, _grad_aux, _grad_gsim):
    a, b, scale, aux, gsim = ctx.saved_tensors
    da, db, dscale = _cosent_bwd_op(grad_loss, a, b, scale, aux, gsim, ctx.kind, ctx.impl)
    return da, db, None, dscale, None, None


_cosent_fwd_op = custom_op(
    "cosent_fwd", _cosent_fwd, fake=_cosent_fwd_fake, setup_context=_setup_context, backward=_backward
)


def cosent(a: Tensor, b: Tensor, labels: Tensor, scale: Tensor, kind: int, impl: str = "triton") -> Tensor:
    """The CoSENT loss of pairs (a[p mod A], b[p]) under the labels [N] (fp32 scalar; fp64 for fp64 inputs) on
    ``impl``: "triton" (the kernels above), "native" (fastloss._C, the CPU default once built) or "closed_form"
    (the same maths with torch ops, the CPU fallback)."""
    _check_impl(impl)
    return _cosent_fwd_op(a, b, labels, scale, kind, impl)[0]
