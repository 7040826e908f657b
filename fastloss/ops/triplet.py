"""The batch triplet family as fused ops: no B x B distance matrix for batch-hard, no B^3 triplets for the others.

Distances from the Gram tile G_ij = <x_i, x_j> (x_hat = F.normalize(x) for cosine, of x promoted to fp32 when it is
fp16 / bf16, as sentence-transformers' cos_sim promotes it), as sentence-transformers does:
    euclidean          d_ij = sqrt(max(|x_j|^2 - 2 G_ij + |x_i|^2, 0)),  d_ii = 0
    squared_euclidean  d_ij = max(|x_j|^2 - 2 G_ij + |x_i|^2, 0),        d_ii = 0
    cosine             d_ij = max(1 - <x_hat_i, x_hat_j>, 0),            d_ii = 0   (6.3's; 6.0 .. 6.2: 1 - <.,.>)
except that a near pair, t_ij = |x_j|^2 - 2 G_ij + |x_i|^2 <= NEAR_FRACTION (|x_i|^2 + |x_j|^2) (2^-12: cos > 0.99976 at
equal norms), gets t_ij = |x_i - x_j|^2 from the rows' difference: the Gram formula rounds t by ~eps (|x_i|^2 +
|x_j|^2), which is all of a duplicate's distance (fp32, norms ~100: 0.03 .. 0.1 where the distance is 0). On CPU the
rows' distances are refined before the selections; on the Triton path refine_selected_kernel refines the mining
kernel's selected pairs after them (for fp64 x the selected pairs' fp64 recompute, _selected_distances; differences
per near pair inside the tiles would cost a collapsed batch its tensor cores). sentence-transformers' CPU GEMM happens
to give its duplicates exactly 0 (each entry summed in the same order); a near duplicate's distance is its rounding.
Labels y; positives P_i = {j != i : y_j = y_i}, negatives N_i = {j : y_j != y_i}, same S_i = {j : y_j = y_i}.

batch-hard (Triton ``batch_hard_fwd_kernel`` on CUDA; CPU tensors: fastloss._C.batch_hard_triplet_mine, else the
same selections in torch over blocks of rows): one pass over column tiles per row block keeps, per row,
    hp_i = max(0, max_{j in P_i} d_ij)                 (its index, or -1 when no positive beats 0)
    n_i  = argmin_{j in N_i} d_ij,  s_i = argmin_{j in S_i} d_ij,  m_i = argmax_j d_ij
    hn_i = d_{i n_i} if d_{i n_i} < d_{i s_i} + d_{i m_i} (or equal with n_i < s_i) else d_{i s_i} + d_{i m_i}
(sentence-transformers' min_j (d_ij + rowmax_i [y_j = y_i]), with its first-index tie-breaking). The loss is then
mean_i max(hp_i - hn_i + margin, 0) or mean_i softplus(hp_i - hn_i) in torch on [B] vectors. The backward touches
only the (at most 3B) selected pairs, with c = dL/dd of the pair:
    euclidean: dx_i += c / d_ij (x_i - x_j), dx_j -= the same (0 where d_ij = 0)
    squared:   dx_i += 2 c (x_i - x_j),       dx_j -= the same (0 where d_ij = 0)
    cosine:    dx_hat_i -= c x_hat_j, dx_hat_j -= c x_hat_i, then the backward of F.normalize (none for j = i:
               d_ii is a constant 0, as sentence-transformers 6.3's fill_diagonal_)
A row's pairs on one entry (its hardest positive also its row max: a row without negatives) are merged first, their
coefficients added, as autograd merges them on sentence-transformers' distance matrix (_merge_same_entries).
Every pair adds its term to both of its rows, so grouping the pairs by selected column (a counting sort on CPU, a
stable sort on CUDA) turns the scatter into a gather: fastloss._C.batch_hard_triplet_bwd runs one parallel,
deterministic gather per output row on CPU tensors (cosine with F.normalize's backward fused in), its CUDA twin
batch_hard_triplet_bwd_cuda one thread block per row (opt-in: FASTLOSS_CUDA_KERNELS=1); otherwise torch ops do a
gather and an index_add_. With FASTLOSS_CUDA_KERNELS=1 the cosine normalisation of CUDA tensors also takes
fastloss._C.l2norm_fwd (on the fp32/fp64 rows, outside autograd) and l2norm_bwd. Memory O(B*D) beyond the inputs
(the CPU mining: O(rows * B)).

batch-all and semi-hard (CPU tensors: fastloss._C.batch_all_triplet_fused / batch_semi_hard_triplet_fused, which
compute the gradient inside the forward; CUDA tensors, FASTLOSS_BACKEND=torch|triton or no extension: torch streamed
over blocks of anchor rows. Both O(rows * B) memory, O(B^2 log B) time at most):
  batch-all: h_apn = (d_ap - d_an) + margin in the distances' dtype, in sentence-transformers' order (d_ap + margin
    first rounds differently: a duplicate's d_ap = 6e-8 vanishes in 1 + 6e-8). h falls with d_an and rises with d_ap,
    so with the negatives of anchor a sorted, s_1 <= s_2 <= ..., binary searches on h itself give
    sum_n max(h, 0) = k (d_ap + margin) - (s_1 + ... + s_k),  k = #{n : h > 0}      (prefix sums in fp64)
    loss = sum_{a, p in P_a} of that / (#{(a, p, n) : h > 1e-16} + 1e-16)
    dL/dd_ap = #{n : h >= 0} / norm,  dL/dd_an = -#{p : h >= 0} / norm   (the gradient at h = 0, as ST passes it)
  semi-hard: n*(a, p) = the first negative with d_an > d_ap in the sorted row (else sentence-transformers'
    masked maximum of the row), loss = sum_{a, p in P_a} max(d_ap - d_an* + margin, 0) / max(|P|, 1e-16).
  The gradient applies the weights above through the Gram matrix, per block of anchor rows A:
    dx_A += rowsum(C) x_A - C x,  dx += colsum(C) x - C^T x_A   (C: the per-pair coefficients as above).
  The torch path recomputes each block in its backward. The weights do not depend on the normaliser (it only scales
  them), so the native op accumulates the gradient in the forward (three GEMMs per step, no recompute) unless the
  forward runs without grad, and the backward scales it by grad_output. Per anchor it evaluates the sums directly
  (one pass over the negatives per positive) when the anchor has few positives, else by sort + prefix sums.
  Neither keeps more than a block of rows: at B = 16384 the B^2 sort and prefix sums would need gigabytes.

Precision: tl.dot on the input dtype with fp32 accumulation (for fp32 "ieee", or "tf32x3" / "tf32" with
FASTLOSS_FP32_DOT); distances, selections and the loss in fp32. Cosine distances are those of the fp32 unit rows
for every input dtype (sentence-transformers' cos_sim promotes half inputs): the torch paths multiply those rows;
the Triton kernel multiplies half rows as they are (bf16 scaled by powers of two), whose products are exact in fp32,
and scales each dot by the two inverse norms (_cosine_operand), so half inputs keep their tensor cores. fp64
inputs keep fp64 everywhere except in the Triton kernel, which selects in fp32 (the selected pairs' distances, hence
the loss and its gradient, are then recomputed in fp64); under TRITON_INTERPRET=1 bf16 runs in fp32 (the
interpreter's bf16 tl.dot is wrong).
Limits: as in sentence-transformers, euclidean needs |x|^2 to fit in fp32 (|x| < ~1e19).
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fastloss import _backend
from fastloss.ops._autotune import drop_fp32_tiles, first_only, tune_bucket
from fastloss.ops._custom_op import custom_op
from fastloss.similarity import promote_half

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton (e.g. macOS): the blocked torch path still works
    triton = tl = None

EUCLIDEAN, SQUARED_EUCLIDEAN, COSINE = 0, 1, 2
METRIC_NAMES = {"euclidean": EUCLIDEAN, "squared_euclidean": SQUARED_EUCLIDEAN, "cosine": COSINE}
NORM_EPS = 1e-12
# elements of one [rows, B] block of the streamed ops (a few fp32/fp64/int64 temporaries of this size live at once)
STREAM_BLOCK_ELEMS = 1 << 22
# A squared distance t_ij <= NEAR_FRACTION (|x_i|^2 + |x_j|^2) from the Gram matrix is recomputed as |x_i - x_j|^2: the
# Gram formula's rounding, ~eps (|x_i|^2 + |x_j|^2), is all of a duplicate's distance. csrc's kNearFraction is the same.
NEAR_FRACTION = 2.0**-12
REFINE_BLOCK_M, REFINE_BLOCK_D = 32, 64  # refine_selected_kernel's rows per program and columns per chunk


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


def _autotuned(fn):
    if triton is None:
        return fn
    prune = {"early_config_prune": _prune}
    return triton.autotune(configs=_configs(), key=["D", "METRIC", "DOT_PRECISION", "TUNE_B"], prune_configs_by=prune)(
        triton.jit(fn, do_not_specialize=["TUNE_B"])
    )


def _tile(bm: int, bn: int, bd: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=warps, num_stages=3)


# Two tiles for fp32 inputs only: their ieee dots spill 570-820 B of stack in the first three on sm_90 and 40-70 B in
# these (scripts/triton_aot.py); half dtypes spill in none of the first three and do not compile or time these.
_FP32_TILES, _TILES = [], []
if triton is not None:
    _FP32_TILES = [_tile(64, 64, 32, 8), _tile(32, 64, 32, 4)]
    _TILES = [_tile(64, 64, 64, 4), _tile(128, 64, 64, 8), _tile(128, 128, 32, 8), *_FP32_TILES]


def _configs() -> list[triton.Config]:
    if _interpret():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
    if os.environ.get("FASTLOSS_AUTOTUNE", "0") == "1":
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bm, bn, bd, w, s in itertools.product((64, 128), (32, 64, 128), (32, 64), (4, 8), (2, 3, 4))
        ]
    return _TILES


def _prune(configs, named_args, **kwargs):
    return first_only(drop_fp32_tiles(configs, named_args["x"], _FP32_TILES))


# ---------------------------------------------------------------------------------------------------------------
# kernels


@_jit
def _load_rows(p, o_row, o_d, n_rows, D, stride_row, stride_d):
    """x[o_row, o_d] as a [len(o_row), len(o_d)] tile, zeros outside the matrix."""
    m_x = (o_row[:, None] < n_rows) & (o_d[None, :] < D)
    return tl.load(p + o_row[:, None] * stride_row + o_d[None, :] * stride_d, mask=m_x, other=0.0)


@_jit
def _keep_max(b_best, b_best_i, b_tile, start):
    """Running (max, first argmax) per row over column tiles, given one [BM, BN] tile starting at column start."""
    b_val, b_arg = tl.max(b_tile, axis=1, return_indices=True, return_indices_tie_break_left=True)
    m_new = b_val > b_best
    return tl.where(m_new, b_val, b_best), tl.where(m_new, b_arg.to(tl.int64) + start, b_best_i)


@_jit
def _keep_min(b_best, b_best_i, b_tile, start):
    b_val, b_arg = tl.min(b_tile, axis=1, return_indices=True, return_indices_tie_break_left=True)
    m_new = b_val < b_best
    return tl.where(m_new, b_val, b_best), tl.where(m_new, b_arg.to(tl.int64) + start, b_best_i)


@_jit
def _refine_selected(
    x,
    sq,
    o_m,
    b_sq_m,
    b_col,
    b_val,
    B,
    D,
    stride_row,
    stride_d,
    NEAR: tl.constexpr,
    METRIC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """b_val (the distances of the pairs (o_m, b_col), b_col -1 for none) with each near pair's (NEAR_FRACTION)
    recomputed from the rows' difference in fp32; the loop over D runs only where some row of the block has one."""
    m_col = (o_m < B) & (b_col >= 0)
    col = tl.where(m_col, b_col, 0)
    b_sq_c = tl.load(sq + col, mask=m_col, other=0.0)
    b_t = b_val
    if METRIC == 0:
        b_t = b_val * b_val
    m_near = m_col & (col != o_m) & (b_t <= NEAR * (b_sq_m + b_sq_c))
    b_out = b_val
    if tl.max(m_near.to(tl.int32), axis=0) > 0:
        b_acc = tl.zeros_like(b_val)
        for start_d in range(0, D, BLOCK_D):
            o_d = start_d + tl.arange(0, BLOCK_D).to(tl.int64)
            m_d = m_near[:, None] & (o_d[None, :] < D)
            b_a = tl.load(x + o_m[:, None] * stride_row + o_d[None, :] * stride_d, mask=m_d, other=0.0)
            b_b = tl.load(x + col[:, None] * stride_row + o_d[None, :] * stride_d, mask=m_d, other=0.0)
            b_diff = b_a.to(tl.float32) - b_b.to(tl.float32)
            b_acc += tl.sum(b_diff * b_diff, axis=1)
        if METRIC == 0:
            b_acc = tl.sqrt_rn(b_acc)
        b_out = tl.where(m_near, b_acc, b_val)
    return b_out


@_autotuned
def batch_hard_fwd_kernel(
    x,
    labels,
    sq,
    hp,
    hn,
    sel_idx,
    sel_d,
    B,
    D,
    stride_xb,
    stride_xd,
    TUNE_B,  # the autotune key's size class of B (tune_bucket); unused in the body
    METRIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_m = o_m < B
    b_lab_m = tl.load(labels + o_m, mask=m_m, other=0)
    b_sq_m = tl.load(sq + o_m, mask=m_m, other=0.0)
    inf = float("inf")
    b_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_pos_i = tl.full((BLOCK_M,), -1, dtype=tl.int64)
    b_neg = tl.full((BLOCK_M,), inf, dtype=tl.float32)
    b_neg_i = tl.full((BLOCK_M,), -1, dtype=tl.int64)
    b_same = tl.full((BLOCK_M,), inf, dtype=tl.float32)
    b_same_i = tl.full((BLOCK_M,), -1, dtype=tl.int64)
    b_max = tl.full((BLOCK_M,), -inf, dtype=tl.float32)
    b_max_i = tl.full((BLOCK_M,), -1, dtype=tl.int64)
    for start_n in range(0, B, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < B
        b_dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start_d in range(0, D, BLOCK_D):
            o_d = start_d + tl.arange(0, BLOCK_D).to(tl.int64)
            b_a = _load_rows(x, o_m, o_d, B, D, stride_xb, stride_xd)  # [BM, BD]
            b_b = _load_rows(x, o_n, o_d, B, D, stride_xb, stride_xd)  # [BN, BD]
            b_dot = tl.dot(b_a, tl.trans(b_b), b_dot, input_precision=DOT_PRECISION)
        m_diag = o_m[:, None] == o_n[None, :]
        if METRIC == 2:  # sq: the rows' inverse norms (_cosine_operand)
            b_r_n = tl.load(sq + o_n, mask=m_n, other=0.0)
            b_d = 1.0 - (b_dot * b_sq_m[:, None]) * b_r_n[None, :]
        else:
            b_sq_n = tl.load(sq + o_n, mask=m_n, other=0.0)
            b_d = (b_sq_n[None, :] - 2.0 * b_dot) + b_sq_m[:, None]  # sentence-transformers' order of terms
        b_d = tl.where((b_d < 0.0) | m_diag, 0.0, b_d)  # every metric: clamped at 0, d_ii = 0
        if METRIC == 0:
            b_d = tl.sqrt_rn(b_d)
        b_lab_n = tl.load(labels + o_n, mask=m_n, other=0)
        m_same = (b_lab_m[:, None] == b_lab_n[None, :]) & m_n[None, :]
        m_neg = (b_lab_m[:, None] != b_lab_n[None, :]) & m_n[None, :]
        b_pos, b_pos_i = _keep_max(b_pos, b_pos_i, tl.where(m_same & ~m_diag, b_d, -inf), start_n)
        b_max, b_max_i = _keep_max(b_max, b_max_i, tl.where(m_n[None, :], b_d, -inf), start_n)
        b_neg, b_neg_i = _keep_min(b_neg, b_neg_i, tl.where(m_neg, b_d, inf), start_n)
        b_same, b_same_i = _keep_min(b_same, b_same_i, tl.where(m_same, b_d, inf), start_n)
    b_shifted = b_same + b_max
    m_use_neg = (b_neg < b_shifted) | ((b_neg == b_shifted) & (b_neg_i < b_same_i))
    tl.store(hp + o_m, b_pos, mask=m_m)
    tl.store(hn + o_m, tl.where(m_use_neg, b_neg, b_shifted), mask=m_m)
    tl.store(sel_idx + o_m, b_pos_i, mask=m_m)
    tl.store(sel_idx + B + o_m, tl.where(m_use_neg, b_neg_i, b_same_i), mask=m_m)
    tl.store(sel_idx + 2 * B + o_m, tl.where(m_use_neg, -1, b_max_i), mask=m_m)
    tl.store(sel_d + o_m, b_pos, mask=m_m)
    tl.store(sel_d + B + o_m, tl.where(m_use_neg, b_neg, b_same), mask=m_m)
    tl.store(sel_d + 2 * B + o_m, tl.where(m_use_neg, 0.0, b_max), mask=m_m)


@_jit
def refine_selected_kernel(
    x,
    sq,
    hp,
    hn,
    sel_idx,
    sel_d,
    B,
    D,
    stride_xb,
    stride_xd,
    METRIC: tl.constexpr,
    NEAR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """After batch_hard_fwd_kernel (euclidean metrics): its selected pairs' distances, near ones (NEAR_FRACTION) from
    the rows' differences, and hp, hn and the hardest positive's index (-1 where its distance is now 0) from them. A
    launch of its own: as the mining kernel's epilogue it made the half-dtype tiles spill 500-600 B on sm_90."""
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_m = o_m < B
    b_sq_m = tl.load(sq + o_m, mask=m_m, other=0.0)
    b_col_0 = tl.load(sel_idx + o_m, mask=m_m, other=-1)
    b_col_1 = tl.load(sel_idx + B + o_m, mask=m_m, other=-1)
    b_col_2 = tl.load(sel_idx + 2 * B + o_m, mask=m_m, other=-1)
    b_d_0 = tl.load(sel_d + o_m, mask=m_m, other=0.0)
    b_d_1 = tl.load(sel_d + B + o_m, mask=m_m, other=0.0)
    b_d_2 = tl.load(sel_d + 2 * B + o_m, mask=m_m, other=0.0)
    b_d_0 = _refine_selected(x, sq, o_m, b_sq_m, b_col_0, b_d_0, B, D, stride_xb, stride_xd, NEAR, METRIC, BLOCK_D)
    b_d_1 = _refine_selected(x, sq, o_m, b_sq_m, b_col_1, b_d_1, B, D, stride_xb, stride_xd, NEAR, METRIC, BLOCK_D)
    b_d_2 = _refine_selected(x, sq, o_m, b_sq_m, b_col_2, b_d_2, B, D, stride_xb, stride_xd, NEAR, METRIC, BLOCK_D)
    tl.store(sel_idx + o_m, tl.where(b_d_0 > 0.0, b_col_0, -1), mask=m_m)
    tl.store(sel_d + o_m, b_d_0, mask=m_m)
    tl.store(sel_d + B + o_m, b_d_1, mask=m_m)
    tl.store(sel_d + 2 * B + o_m, b_d_2, mask=m_m)
    tl.store(hp + o_m, b_d_0, mask=m_m)
    tl.store(hn + o_m, b_d_1 + b_d_2, mask=m_m)  # the negative's distance, or same-label min + row max (b_d_2 = 0)


# ---------------------------------------------------------------------------------------------------------------
# host: shared pieces


def _check_metric(metric: int) -> None:
    if metric not in (EUCLIDEAN, SQUARED_EUCLIDEAN, COSINE):
        raise ValueError(f"triplet: metric must be 0 (euclidean), 1 (squared euclidean) or 2 (cosine), got {metric}")


def _normalize(x: Tensor) -> Tensor:
    """sentence-transformers' normalisation: its cos_sim promotes fp16 / bf16 rows to fp32 before F.normalize
    (util's _convert_to_float_tensor, 6.0.1 and 6.2), so x_hat is fp32 for half x (fp64 for fp64) and every distance
    comes from <x_hat_i, x_hat_j> in fp32, never rounded to the input dtype. fp32/fp64 CUDA tensors outside autograd
    take fastloss._C.l2norm_fwd with FASTLOSS_CUDA_KERNELS=1: the same maths."""
    x = promote_half(x)
    if (
        x.device.type == "cuda"
        and x.ndim == 2
        and not (torch.is_grad_enabled() and x.requires_grad)
        and _backend.cuda_kernel_enabled("l2norm_fwd")
    ):
        return _backend.native_module().l2norm_fwd(x, NORM_EPS)
    return F.normalize(x, p=2, dim=-1, eps=NORM_EPS)


def _normalize_backward(x: Tensor, dx_hat: Tensor) -> Tensor:
    """The backward of F.normalize(x, eps=1e-12) for the gradient ``dx_hat`` w.r.t. its output, summed in fp32 (fp64
    for fp64): fp32 (fp64) from torch ops; in x's dtype from fastloss._C.l2norm_bwd (CUDA tensors with
    FASTLOSS_CUDA_KERNELS=1, one pass, rounded once as the callers' cast to x's dtype would)."""
    if x.device.type == "cuda" and x.ndim == 2 and _backend.cuda_kernel_enabled("l2norm_bwd"):
        dx_hat = dx_hat.to(_backend.accumulation_dtype(x))
        return _backend.native_module().l2norm_bwd(x.detach(), dx_hat, NORM_EPS)
    return _normalize_backward_torch(x, dx_hat)


def _normalize_backward_torch(x: Tensor, dx_hat: Tensor) -> Tensor:
    """:func:`_normalize_backward` in torch ops on any device (fp32, fp64 for fp64)."""
    xf = x.to(_backend.accumulation_dtype(x))
    dx_hat = dx_hat.to(xf.dtype)
    norm = torch.linalg.vector_norm(xf, dim=1, keepdim=True)
    denom = norm.clamp_min(NORM_EPS)
    x_hat = xf / denom
    projection = torch.where(norm > NORM_EPS, (x_hat * dx_hat).sum(dim=1, keepdim=True), 0.0)
    return (dx_hat - x_hat * projection) / denom


def _labels(labels: Tensor, batch: int) -> Tensor:
    if labels.numel() != batch:
        raise ValueError(f"triplet: labels must hold {batch} values, got shape {tuple(labels.shape)}")
    return labels.reshape(-1).to(torch.int64).contiguous()


def _on_device(x: Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _stream_operand(x: Tensor, metric: int) -> Tensor:
    """The rows whose Gram matrix gives the distances: fp32 for half inputs (as ST's euclidean), x_hat for cosine
    (fp32 for half inputs too, as ST's cos_sim)."""
    if metric == COSINE:
        x = _normalize(x)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _block_rows(B: int) -> int:
    return max(1, min(B, STREAM_BLOCK_ELEMS // max(B, 1)))


def _squared_differences(xo: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """|x_r - x_c|^2 of the pairs (rows, cols), in chunks of at most STREAM_BLOCK_ELEMS gathered elements."""
    step = max(1, STREAM_BLOCK_ELEMS // max(xo.shape[1], 1))
    parts = [
        (xo[rows[k : k + step]] - xo[cols[k : k + step]]).square().sum(dim=1) for k in range(0, rows.numel(), step)
    ]
    return torch.cat(parts) if parts else xo.new_zeros(0)


def _refine_near(d2: Tensor, xo: Tensor, sq: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """d2, the Gram formula's squared distances of the pairs (rows, cols) (any matching shapes), with each near
    pair's (NEAR_FRACTION) recomputed from the rows' difference."""
    near = (d2 <= NEAR_FRACTION * (sq[rows] + sq[cols])) & (rows != cols)
    hit = near.nonzero(as_tuple=True)
    rows, cols = (index.expand(d2.shape)[hit] for index in (rows, cols))
    return d2.index_put(hit, _squared_differences(xo, rows, cols))


def _distance_rows(xo: Tensor, sq: Tensor, start: int, stop: int, metric: int) -> Tensor:
    """Rows start:stop of the distance matrix [stop - start, B], in xo's dtype (near pairs from their differences)."""
    gram = xo[start:stop] @ xo.t()
    rows = torch.arange(stop - start, device=xo.device)
    if metric == COSINE:
        d = (1 - gram).clamp_min(0.0)
        d[rows, rows + start] = 0.0
        return d
    d2 = (sq[None, :] - 2.0 * gram) + sq[start:stop, None]
    d2 = d2.clamp_min(0.0)
    d2[rows, rows + start] = 0.0
    cols = torch.arange(xo.shape[0], device=xo.device)
    d2 = _refine_near(d2, xo, sq, (rows + start)[:, None], cols[None, :])
    return d2.sqrt() if metric == EUCLIDEAN else d2


def _accumulate_distance_grad(
    dxo: Tensor, xo: Tensor, weight: Tensor, dist: Tensor, start: int, stop: int, metric: int
) -> None:
    """dxo += d(sum weight * dist)/dxo for distance rows start:stop (``weight``, ``dist``: [stop - start, B])."""
    xa = xo[start:stop]
    if metric == COSINE:
        rows = torch.arange(stop - start, device=xo.device)
        weight = weight.index_put((rows, rows + start), weight.new_zeros(()))  # the fixed 0 of d_ii
        dxo[start:stop] -= weight @ xo
        dxo -= weight.t() @ xa
        return
    positive = dist > 0.0
    if metric == EUCLIDEAN:
        coef = torch.where(positive, weight / torch.where(positive, dist, 1.0), 0.0)
    else:
        coef = torch.where(positive, 2.0 * weight, 0.0)
    dxo[start:stop] += coef.sum(dim=1, keepdim=True) * xa - coef @ xo
    dxo += coef.sum(dim=0)[:, None] * xo - coef.t() @ xa


def _masks(labels: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(same label [rows, B], positive = same label and not self [rows, B])."""
    same = labels[start:stop, None] == labels[None, :]
    rows = torch.arange(stop - start, device=labels.device)
    positive = same.clone()
    positive[rows, rows + start] = False
    return same, positive


def _prepare_stream(x: Tensor, labels: Tensor, metric: int) -> tuple[Tensor, Tensor, Tensor]:
    _check_metric(metric)
    if x.ndim != 2:
        raise ValueError(f"triplet: x must be 2-D [B, D], got shape {tuple(x.shape)}")
    labels = _labels(labels, x.shape[0]).to(x.device)
    xo = _stream_operand(x.detach(), metric)
    sq = xo.square().sum(dim=1) if metric != COSINE else xo.new_zeros(x.shape[0])
    return xo, sq, labels


def _finish_grad(x: Tensor, dxo: Tensor, metric: int) -> Tensor:
    if metric == COSINE:
        return _normalize_backward(x, dxo).to(x.dtype)
    return dxo.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# host: batch-hard


def _kernel_operand(x: Tensor, metric: int) -> tuple[Tensor, Tensor]:
    """The rows the kernel multiplies, in a dtype tl.dot handles here, and its ``sq`` vector: the squared norms
    (fp32) for the euclidean metrics, the inverse norms for cosine (:func:`_cosine_operand`)."""
    if x.dtype == torch.float64 or (x.dtype == torch.bfloat16 and _interpret()):
        x = x.float()
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triplet: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if metric == COSINE:
        return _cosine_operand(x)
    return x, x.float().square().sum(dim=1)


def _cosine_operand(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows and inverse norms r whose 1 - (<rows_i, rows_j> r_i) r_j are, to fp32 rounding, the cosine distances of
    sentence-transformers' fp32 unit rows x_hat = x / max(|x|, eps) (its cos_sim promotes half x to fp32), so that
    half inputs keep tl.dot's half-precision tensor cores: products of half entries are exact in fp32, where the dot
    accumulates. fp32 x: x_hat itself and r = 1. fp16 x: x as it is (its products stay in fp32's normal range) and
    r = 1 / max(|x|, eps), |x| summed in fp32 as F.normalize does. bf16 x, whose exponent range is fp32's: each row
    first scaled by the power of two 2^-e that brings its norm into [0.5, 1) (exact, in two steps that each stay in
    the normal range; only entries below 2^-126 of their row's norm lose bits, far below the sums' resolution) and
    r = 2^e / max(|x|, eps); a row whose fp32 norm is 0 or inf becomes a zero row with r = 0 (distance 1 to every
    row: sentence-transformers' x / eps, where every square underflowed, is ~0, and x / inf is 0; kept, a huge row's
    products would overflow to inf, and inf * 0 is NaN)."""
    if x.dtype == torch.float32:
        return _normalize(x).contiguous(), torch.ones(x.shape[0], device=x.device)
    norm = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
    r = norm.clamp_min(NORM_EPS).reciprocal()
    if x.dtype == torch.float16:
        return x, r
    finite = (norm > 0) & torch.isfinite(norm)
    e = torch.frexp(torch.where(finite, norm, 1.0)).exponent  # norm in [2^(e-1), 2^e)
    half = torch.div(e, 2, rounding_mode="floor")
    rows = x
    for k in (half, e - half):
        scale = torch.ldexp(torch.ones_like(norm), k)
        rows = rows * scale.reciprocal().to(x.dtype)[:, None]
        r = r * scale
    return torch.where(finite[:, None], rows, 0.0).contiguous(), torch.where(finite, r, 0.0)


def _batch_hard_fwd_blocked(x: Tensor, labels: Tensor, metric: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """batch_hard_fwd in plain torch over blocks of rows (O(rows * B) memory): CPU tensors without the interpreter."""
    xo, sq, labels = _prepare_stream(x, labels, metric)  # xo: fp32, fp64 for fp64 x
    B = x.shape[0]
    hp, hn = (torch.empty(B, device=x.device, dtype=xo.dtype) for _ in range(2))
    sel_idx = torch.empty((3, B), device=x.device, dtype=torch.int64)
    sel_d = torch.empty((3, B), device=x.device, dtype=xo.dtype)
    step = _block_rows(B)
    for start in range(0, B, step):
        stop = min(start + step, B)
        dist = _distance_rows(xo, sq, start, stop, metric)
        same, positive = _masks(labels, start, stop)
        pos, pos_i = dist.masked_fill(~positive, float("-inf")).max(dim=1)
        row_max, row_max_i = dist.max(dim=1)
        neg, neg_i = dist.masked_fill(same, float("inf")).min(dim=1)
        same_min, same_i = dist.masked_fill(~same, float("inf")).min(dim=1)
        shifted = same_min + row_max
        use_neg = (neg < shifted) | ((neg == shifted) & (neg_i < same_i))
        hp[start:stop] = pos.clamp_min(0.0)
        hn[start:stop] = torch.where(use_neg, neg, shifted)
        pos_i = torch.where(pos > 0.0, pos_i, -1)
        sel_idx[:, start:stop] = torch.stack(
            [pos_i, torch.where(use_neg, neg_i, same_i), torch.where(use_neg, -1, row_max_i)]
        )
        sel_d[:, start:stop] = torch.stack(
            [pos.clamp_min(0.0), torch.where(use_neg, neg, same_min), torch.where(use_neg, 0.0, row_max)]
        )
    return hp, hn, sel_idx, sel_d


def _native_mining() -> bool:
    """CPU tensors mine in fastloss._C when it has the op (the rule: :func:`fastloss._backend.native_enabled`)."""
    return _backend.native_enabled("batch_hard_triplet_mine")


def _batch_hard_fwd_native(x: Tensor, labels: Tensor, metric: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """batch_hard_fwd by fastloss._C.batch_hard_triplet_mine: the blocked path's selections with at::mm per block of
    rows and one parallel pass over them (O(rows * B) memory)."""
    labels = _labels(labels, x.shape[0])
    return _backend.native_module().batch_hard_triplet_mine(x.detach(), labels, metric)


def batch_hard_fwd(x: Tensor, labels: Tensor, metric: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mine the hardest pairs without a B x B matrix. Returns hp [B], hn [B], and the selected pairs: int64 sel_idx
    [3, B] (hardest positive, hardest negative or smallest same-label, row argmax when that was used; -1 for none)
    with their distances sel_d [3, B]; hp, hn and sel_d are fp32, fp64 for fp64 x. See the module docstring. The
    Triton kernel runs on CUDA (and on CPU under TRITON_INTERPRET=1); other CPU tensors take
    fastloss._C.batch_hard_triplet_mine, or the same selections in blocks of rows in torch where the extension lacks
    it."""
    _check_metric(metric)
    if x.ndim != 2:
        raise ValueError(f"triplet: x must be 2-D [B, D], got shape {tuple(x.shape)}")
    if x.device.type == "cpu" and not _interpret():
        if _native_mining():
            return _batch_hard_fwd_native(x, labels, metric)
        return _batch_hard_fwd_blocked(x, labels, metric)
    B, D = x.shape
    labels = _labels(labels, B).to(x.device)
    xo, sq = _kernel_operand(x, metric)
    hp = torch.empty(B, device=x.device, dtype=torch.float32)
    hn = torch.empty(B, device=x.device, dtype=torch.float32)
    sel_idx = torch.empty((3, B), device=x.device, dtype=torch.int64)
    sel_d = torch.empty((3, B), device=x.device, dtype=torch.float32)
    if B == 0:
        return hp, hn, sel_idx, sel_d
    precision = _backend.dot_precision(xo.dtype)
    with _on_device(x):
        batch_hard_fwd_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]),)](
            xo,
            labels,
            sq,
            hp,
            hn,
            sel_idx,
            sel_d,
            B,
            D,
            xo.stride(0),
            xo.stride(1),
            tune_bucket(B),
            METRIC=metric,
            DOT_PRECISION=precision,
        )
        if metric != COSINE and x.dtype != torch.float64:  # fp64: _selected_distances recomputes every pair
            refine_selected_kernel[(triton.cdiv(B, REFINE_BLOCK_M),)](
                xo,
                sq,
                hp,
                hn,
                sel_idx,
                sel_d,
                B,
                D,
                xo.stride(0),
                xo.stride(1),
                METRIC=metric,
                NEAR=NEAR_FRACTION,
                BLOCK_M=REFINE_BLOCK_M,
                BLOCK_D=REFINE_BLOCK_D,
            )
    if x.dtype == torch.float64:
        return _selected_distances(x, sel_idx, metric)
    return hp, hn, sel_idx, sel_d


def _selected_pairs(sel_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The 3B selected pairs of sel_idx [3, B] as (row, column, valid) vectors, pair e = k * B + r; a missing pair
    (-1) gets its own row as column, so that it can be gathered, and valid False."""
    B = sel_idx.shape[1]
    rows = torch.arange(B, device=sel_idx.device).repeat(3)
    cols = sel_idx.reshape(-1)
    valid = cols >= 0
    return rows, torch.where(valid, cols, rows), valid


def _selected_distances(x: Tensor, sel_idx: Tensor, metric: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """batch_hard_fwd's outputs for fp64 x after the Triton kernel, which selects in fp32: the selected pairs'
    distances recomputed in fp64 (the formulas of :func:`_distance_rows`, near pairs' too, O(B*D)), hp = sel_d[0],
    hn = sel_d[1] + sel_d[2] (sel_d[2] is 0 where the negative was used) and no hardest positive (-1) where its
    distance is at most 0, as the blocked path decides in fp64."""
    xo = _stream_operand(x.detach(), metric)
    B = x.shape[0]
    rows, cols, valid = _selected_pairs(sel_idx)
    gram = (xo[rows] * xo[cols]).sum(dim=1)
    if metric == COSINE:
        d = (1 - gram).clamp_min(0.0).masked_fill(rows == cols, 0.0)
    else:
        sq = xo.square().sum(dim=1)
        d = ((sq[cols] - 2.0 * gram) + sq[rows]).clamp_min(0.0).masked_fill(rows == cols, 0.0)
        d = _refine_near(d, xo, sq, rows, cols)
        d = d.sqrt() if metric == EUCLIDEAN else d
    sel_d = torch.where(valid, d, 0.0).view(3, B)
    sel_idx[0] = torch.where(sel_d[0] > 0.0, sel_idx[0], -1)
    return sel_d[0].clone(), sel_d[1] + sel_d[2], sel_idx, sel_d


def _native_bwd() -> bool:
    """CPU tensors take fastloss._C.batch_hard_triplet_bwd where the extension has it (the rule:
    :func:`fastloss._backend.native_enabled`)."""
    return _backend.native_enabled("batch_hard_triplet_bwd")


def _cuda_bwd() -> bool:
    """CUDA tensors take fastloss._C.batch_hard_triplet_bwd_cuda only when FASTLOSS_CUDA_KERNELS=1 opts in (the rule:
    :func:`fastloss._backend.cuda_kernel_enabled`)."""
    return _backend.cuda_kernel_enabled("batch_hard_triplet_bwd_cuda")


def _batch_hard_bwd_native(
    grad_hp: Tensor, grad_hn: Tensor, x: Tensor, sel_idx: Tensor, sel_d: Tensor, metric: int
) -> Tensor:
    """fastloss._C.batch_hard_triplet_bwd: the pairs grouped by selected column (counting sort), then one parallel
    gather per output row, F.normalize's backward fused for cosine; deterministic, O(B*D) memory."""
    return _backend.native_module().batch_hard_triplet_bwd(grad_hp, grad_hn, x.detach(), sel_idx, sel_d, metric)


def _batch_hard_bwd_cuda(
    grad_hp: Tensor, grad_hn: Tensor, x: Tensor, sel_idx: Tensor, sel_d: Tensor, metric: int
) -> Tensor:
    """fastloss._C.batch_hard_triplet_bwd_cuda: the same gather as the CPU kernel, one thread block per output row
    over the pairs grouped by column (a stable sort), no atomics: deterministic."""
    return _backend.native_module().batch_hard_triplet_bwd_cuda(grad_hp, grad_hn, x.detach(), sel_idx, sel_d, metric)


def batch_hard_bwd(grad_hp: Tensor, grad_hn: Tensor, x: Tensor, sel_idx: Tensor, sel_d: Tensor, metric: int) -> Tensor:
    """dx (x.dtype) for dL/dhp = ``grad_hp`` and dL/dhn = ``grad_hn``, through the selected pairs only: CPU tensors in
    fastloss._C.batch_hard_triplet_bwd, CUDA tensors in the CUDA kernel with FASTLOSS_CUDA_KERNELS=1, else torch
    ops (:func:`_batch_hard_bwd_torch`)."""
    _check_metric(metric)
    grad_hp, grad_hn, sel_idx = _merge_same_entries(grad_hp, grad_hn, sel_idx)
    if x.device.type == "cpu" and _native_bwd():
        return _batch_hard_bwd_native(grad_hp, grad_hn, x, sel_idx, sel_d, metric)
    if x.device.type == "cuda" and _cuda_bwd():
        return _batch_hard_bwd_cuda(grad_hp, grad_hn, x, sel_idx, sel_d, metric)
    return _batch_hard_bwd_torch(grad_hp, grad_hn, x, sel_idx, sel_d, metric)


def _merge_same_entries(grad_hp: Tensor, grad_hn: Tensor, sel_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hp, grad_hn, sel_idx) with a row's selected pairs that are one entry (row, column) merged into the first
    of them, coefficients added, the others -1, as autograd adds sentence-transformers' gradients on its distance
    matrix before they reach x: the hardest positive that is also the row's farthest point (a row without negatives,
    as in a batch of one class, whose loss then is constant: dL/dhp + dL/dhn = 0 exactly) got its two opposite
    coefficients' vectors added apart, in pair order, leaving rounding (1e-16 .. 1e-7 of the gradients' size, times
    1e12 for a zero row) where the gradient is exactly 0. The other coincidences (the negative's pair with either
    other) are merged alike; pair 2's coefficient is grad_hn, so 1 and 2 merge as 2 grad_hn. O(B), on every
    backend; every merge needs pair 2 (a row with a negative has hp's column a positive's, hn's a negative's), so CPU
    tensors skip the ~0.1 ms of small ops (B = 4096; a sixth of the native backward) when no row took its row max
    (CUDA tensors do not: the check would synchronise the host)."""
    hp_col, hn_col, max_col = sel_idx
    if sel_idx.device.type == "cpu" and not bool((max_col >= 0).any()):
        return grad_hp, grad_hn, sel_idx
    m01 = (hn_col >= 0) & (hn_col == hp_col)
    m02 = (max_col >= 0) & (max_col == hp_col)
    m12 = (max_col >= 0) & (max_col == hn_col) & ~m02  # not with m01 either: then max_col == hp_col
    zero = torch.zeros_like(grad_hn)
    grad_hp = grad_hp + torch.where(m01, grad_hn, zero) + torch.where(m02, grad_hn, zero)
    grad_hn = torch.where(m12, 2.0 * grad_hn, grad_hn)
    none = torch.full_like(hn_col, -1)
    sel_idx = torch.stack([hp_col, torch.where(m01, none, hn_col), torch.where(m02 | m12, none, max_col)])
    return grad_hp, grad_hn, sel_idx


def _batch_hard_bwd_torch(
    grad_hp: Tensor, grad_hn: Tensor, x: Tensor, sel_idx: Tensor, sel_d: Tensor, metric: int
) -> Tensor:
    """batch_hard_bwd in torch ops on any device: a gather over the 3B pairs and an index_add_ for the scatter."""
    _check_metric(metric)
    B = x.shape[0]
    acc = _backend.accumulation_dtype(x)
    rows, cols, valid = _selected_pairs(sel_idx)
    coef = torch.cat([grad_hp, grad_hn, grad_hn]).to(acc)
    coef = torch.where(valid, coef, 0.0)
    if metric == COSINE:
        coef = torch.where(rows != cols, coef, 0.0)  # a row's own pair: sentence-transformers 6.3's fixed 0
        x_hat = _normalize(x).to(acc)
        dx_hat = (-coef[:, None] * x_hat[cols]).view(3, B, -1).sum(dim=0)
        dx_hat.index_add_(0, cols, -coef[:, None] * x_hat[rows])
        return _normalize_backward(x, dx_hat).to(x.dtype)
    d = sel_d.reshape(-1).to(acc)
    if metric == EUCLIDEAN:
        coef = torch.where(d > 0.0, coef / torch.where(d > 0.0, d, 1.0), 0.0)
    else:
        coef = torch.where(d > 0.0, 2.0 * coef, 0.0)
    xf = x.to(acc)
    g = coef[:, None] * (xf[rows] - xf[cols])  # [3B, D]
    dx = g.view(3, B, -1).sum(dim=0)
    dx.index_add_(0, cols, -g)
    return dx.to(x.dtype)


def _mine(x: Tensor, labels: Tensor, metric: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return batch_hard_fwd(x, labels, metric)


def _mine_fake(x, labels, metric):
    B, acc = x.shape[0], _backend.accumulation_dtype(x)
    hp = x.new_empty((B,), dtype=acc)
    return hp, torch.empty_like(hp), x.new_empty((3, B), dtype=torch.int64), x.new_empty((3, B), dtype=acc)


def _mine_bwd(grad_hp: Tensor, grad_hn: Tensor, x: Tensor, sel_idx: Tensor, sel_d: Tensor, metric: int) -> Tensor:
    return batch_hard_bwd(grad_hp, grad_hn, x, sel_idx, sel_d, metric)


def _mine_bwd_fake(grad_hp, grad_hn, x, sel_idx, sel_d, metric):
    return torch.empty_like(x)


_mine_bwd_op = custom_op("batch_hard_triplet_bwd", _mine_bwd, fake=_mine_bwd_fake)


def _mine_setup_context(ctx, inputs, output):
    x, _, metric = inputs
    _, _, sel_idx, sel_d = output
    ctx.save_for_backward(x, sel_idx, sel_d)
    ctx.metric = metric
    ctx.mark_non_differentiable(sel_idx, sel_d)


def _mine_backward(ctx, grad_hp, grad_hn, _grad_idx, _grad_d):
    x, sel_idx, sel_d = ctx.saved_tensors  # grad_hp and grad_hn are tensors on both paths (zeros where undefined)
    return _mine_bwd_op(grad_hp, grad_hn, x, sel_idx, sel_d, ctx.metric), None, None


_mine_op = custom_op(
    "batch_hard_triplet_mine",
    _mine,
    fake=_mine_fake,
    setup_context=_mine_setup_context,
    backward=_mine_backward,
    reads=2,
)


def batch_hard_triplet(x: Tensor, labels: Tensor, margin: float, metric: int, soft_margin: bool = False) -> Tensor:
    """Batch-hard triplet loss (fp32 scalar, fp64 for fp64 x): mean max(hp - hn + margin, 0), or mean
    softplus(hp - hn)."""
    hp, hn, _, _ = _mine_op(x, labels, metric)
    if soft_margin:
        return F.softplus(hp - hn).mean()
    hinge = hp - hn + margin
    return torch.where(hinge < 0, torch.zeros_like(hinge), hinge).mean()  # gradient where hinge >= 0, as ST


# ---------------------------------------------------------------------------------------------------------------
# host: streamed batch-all and semi-hard


def _prefix_count(sorted_rows: Tensor, query: Tensor, keep) -> Tensor:
    """int64 [rows, B]: for each query[r, i], #{k : keep(query[r, i], sorted_rows[r, k])}, where keep holds on a
    prefix of each sorted row: a binary search on the predicate itself, so the count follows its floating-point
    arithmetic exactly (a searchsorted on a precomputed threshold would round differently)."""
    n = sorted_rows.shape[1]
    lo = torch.zeros(query.shape, dtype=torch.int64, device=query.device)
    hi = torch.full_like(lo, n)
    for _ in range(max(n, 1).bit_length()):
        mid = (lo + hi) // 2
        ok = keep(query, sorted_rows.gather(1, mid.clamp(max=max(n - 1, 0)))) & (lo < hi)
        lo = torch.where(ok, mid + 1, lo)
        hi = torch.where(ok, hi, mid)
    return lo


def _sorted_negatives(dist: Tensor, same: Tensor) -> Tensor:
    """Each anchor row's negative distances sorted ascending, inf in place of the same-label columns."""
    return dist.masked_fill(same, float("inf")).sort(dim=1).values


def _hinge(d_ap: Tensor, d_an: Tensor, margin: float) -> Tensor:
    """Batch-all's h = (d_ap - d_an) + margin in sentence-transformers' order of operations, in the distances' dtype."""
    return (d_ap - d_an) + margin


def batch_all_fwd(x: Tensor, labels: Tensor, margin: float, metric: int) -> tuple[Tensor, Tensor]:
    """(loss [] fp32 (fp64 for fp64 x), normaliser fp64 [] = #{positive triplets} + 1e-16), streamed over anchors."""
    xo, sq, labels = _prepare_stream(x, labels, metric)
    B = x.shape[0]
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    count = torch.zeros((), device=x.device, dtype=torch.float64)
    step = _block_rows(B)
    for start in range(0, B, step):
        stop = min(start + step, B)
        dist = _distance_rows(xo, sq, start, stop, metric)
        same, positive = _masks(labels, start, stop)
        sorted_neg = _sorted_negatives(dist, same)
        below = _prefix_count(sorted_neg, dist, lambda d, v: _hinge(d, v, margin) > 0)  # #{n : h > 0}
        prefix = F.pad(sorted_neg.masked_fill(torch.isinf(sorted_neg), 0.0).double().cumsum(dim=1), (1, 0))
        sums = below * (dist.double() + margin) - prefix.gather(1, below)
        total += sums.masked_fill(~positive, 0.0).sum()
        # sentence-transformers counts the triplets whose loss exceeds 1e-16
        counted = _prefix_count(sorted_neg, dist, lambda d, v: _hinge(d, v, margin) > 1e-16)
        count += counted.masked_fill(~positive, 0).sum()
    norm = count + 1e-16
    return (total / norm).to(_backend.accumulation_dtype(x)), norm


def batch_all_bwd(grad: Tensor, x: Tensor, labels: Tensor, norm: Tensor, margin: float, metric: int) -> Tensor:
    xo, sq, labels = _prepare_stream(x, labels, metric)
    B = x.shape[0]
    scale = (grad.double() / norm).to(xo.dtype)
    dxo = torch.zeros_like(xo)
    step = _block_rows(B)
    for start in range(0, B, step):
        stop = min(start + step, B)
        dist = _distance_rows(xo, sq, start, stop, metric)
        same, positive = _masks(labels, start, stop)
        sorted_neg = _sorted_negatives(dist, same)
        at_most = _prefix_count(sorted_neg, dist, lambda d, v: _hinge(d, v, margin) >= 0)  # #{n : h >= 0}, as ST
        sorted_pos = dist.masked_fill(~positive, float("-inf")).sort(dim=1).values
        reaching = B - _prefix_count(sorted_pos, dist, lambda d, p: _hinge(p, d, margin) < 0)  # #{p : h >= 0}
        weight = torch.where(positive, at_most.to(xo.dtype), 0.0) - torch.where(same, 0.0, reaching.to(xo.dtype))
        _accumulate_distance_grad(dxo, xo, weight * scale, dist, start, stop, metric)
    return _finish_grad(x, dxo, metric)


def _semi_hard_block(dist: Tensor, same: Tensor, positive: Tensor, margin: float):
    """Per block: hinge x_ap = (d_ap - d_an* + margin) on positives (0 elsewhere), and how n* was chosen."""
    B = dist.shape[1]
    negative = ~same
    sorted_neg, order = dist.masked_fill(same, float("inf")).sort(dim=1, stable=True)
    position = torch.searchsorted(sorted_neg, dist.contiguous(), right=True).clamp(max=B - 1)
    outside = sorted_neg.gather(1, position)
    row_min, arg_min = dist.min(dim=1, keepdim=True)
    inside, arg_inside = ((dist - row_min) * negative).max(dim=1, keepdim=True)
    inside = inside + row_min
    use_outside = torch.isfinite(outside)
    semi_hard = torch.where(use_outside, outside, inside)
    hinge = ((dist - semi_hard) + margin) * positive
    return hinge, use_outside, order.gather(1, position), arg_min, arg_inside


def batch_semi_hard_fwd(x: Tensor, labels: Tensor, margin: float, metric: int) -> tuple[Tensor, Tensor]:
    """(loss [] fp32 (fp64 for fp64 x), number of positive pairs fp64 [] clamped to 1e-16), streamed over anchors."""
    xo, sq, labels = _prepare_stream(x, labels, metric)
    B = x.shape[0]
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    n_pos = torch.zeros((), device=x.device, dtype=torch.float64)
    step = _block_rows(B)
    for start in range(0, B, step):
        stop = min(start + step, B)
        dist = _distance_rows(xo, sq, start, stop, metric)
        same, positive = _masks(labels, start, stop)
        hinge = _semi_hard_block(dist, same, positive, margin)[0]
        total += hinge.clamp_min(0.0).sum()
        n_pos += positive.sum()
    norm = n_pos.clamp_min(1e-16)
    return (total / norm).to(_backend.accumulation_dtype(x)), norm


def batch_semi_hard_bwd(grad: Tensor, x: Tensor, labels: Tensor, norm: Tensor, margin: float, metric: int) -> Tensor:
    xo, sq, labels = _prepare_stream(x, labels, metric)
    B = x.shape[0]
    scale = (grad.double() / norm).to(xo.dtype)
    dxo = torch.zeros_like(xo)
    step = _block_rows(B)
    for start in range(0, B, step):
        stop = min(start + step, B)
        dist = _distance_rows(xo, sq, start, stop, metric)
        same, positive = _masks(labels, start, stop)
        hinge, use_outside, outside_idx, arg_min, arg_inside = _semi_hard_block(dist, same, positive, margin)
        # torch.max(hinge, 0) passes the gradient where hinge > 0 and half of it where hinge == 0
        u = torch.where(hinge > 0, 1.0, torch.where(hinge == 0, 0.5, 0.0)).to(xo.dtype) * positive * scale
        weight = u.clone()
        weight.scatter_add_(1, outside_idx, -u * use_outside)
        inside_total = (u * ~use_outside).sum(dim=1, keepdim=True)
        inside_is_negative = (~same).gather(1, arg_inside)
        weight.scatter_add_(1, arg_inside, -inside_total * inside_is_negative)
        weight.scatter_add_(1, arg_min, -inside_total * ~inside_is_negative)
        _accumulate_distance_grad(dxo, xo, weight, dist, start, stop, metric)
    return _finish_grad(x, dxo, metric)


def _batch_all(x: Tensor, labels: Tensor, margin: float, metric: int) -> tuple[Tensor, Tensor]:
    return batch_all_fwd(x, labels, margin, metric)


def _semi_hard(x: Tensor, labels: Tensor, margin: float, metric: int) -> tuple[Tensor, Tensor]:
    return batch_semi_hard_fwd(x, labels, margin, metric)


def _batch_all_bwd(grad: Tensor, x: Tensor, labels: Tensor, norm: Tensor, margin: float, metric: int) -> Tensor:
    return batch_all_bwd(grad, x, labels, norm, margin, metric)


def _semi_hard_bwd(grad: Tensor, x: Tensor, labels: Tensor, norm: Tensor, margin: float, metric: int) -> Tensor:
    return batch_semi_hard_bwd(grad, x, labels, norm, margin, metric)


def _streamed_fake(x, labels, margin, metric):
    return x.new_empty((), dtype=_backend.accumulation_dtype(x)), x.new_empty((), dtype=torch.float64)


def _streamed_bwd_fake(grad, x, labels, norm, margin, metric):
    return torch.empty_like(x)


def _streamed_setup_context(ctx, inputs, output):
    x, labels, margin, metric = inputs
    ctx.save_for_backward(x, labels, output[1])
    ctx.options = (margin, metric)
    ctx.mark_non_differentiable(output[1])


def _streamed_autograd(bwd_op):
    def backward(ctx, grad_loss, _grad_norm):
        x, labels, norm = ctx.saved_tensors
        return bwd_op(grad_loss, x, labels, norm, *ctx.options), None, None, None

    return backward


def _streamed_op(name: str, fwd, bwd):
    bwd_op = custom_op(f"{name}_bwd", bwd, fake=_streamed_bwd_fake)
    backward = _streamed_autograd(bwd_op)
    return custom_op(name, fwd, fake=_streamed_fake, setup_context=_streamed_setup_context, backward=backward)


_batch_all_op = _streamed_op("batch_all_triplet", _batch_all, _batch_all_bwd)
_semi_hard_op = _streamed_op("batch_semi_hard_triplet", _semi_hard, _semi_hard_bwd)


NATIVE_BATCH_ALL = "batch_all_triplet_fused"
NATIVE_SEMI_HARD = "batch_semi_hard_triplet_fused"


def _native_streamed(x: Tensor, native_op: str) -> bool:
    """CPU tensors run fastloss._C's fused op when it has it (:func:`fastloss._backend.native_enabled`); otherwise
    the blocked torch path above, which is also the CUDA path."""
    return x.device.type == "cpu" and _backend.native_enabled(native_op)


def _need_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _native_fused(native_op: str, x: Tensor, labels: Tensor, margin: float, metric: int, need_grad: bool):
    _check_metric(metric)
    if x.ndim != 2:
        raise ValueError(f"triplet: x must be 2-D [B, D], got shape {tuple(x.shape)}")
    fn = getattr(_backend.native_module(), native_op)
    return fn(x.detach(), _labels(labels, x.shape[0]), margin, metric, need_grad)


def _batch_all_fused(
    x: Tensor, labels: Tensor, margin: float, metric: int, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _native_fused(NATIVE_BATCH_ALL, x, labels, margin, metric, need_grad)


def _semi_hard_fused(
    x: Tensor, labels: Tensor, margin: float, metric: int, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _native_fused(NATIVE_SEMI_HARD, x, labels, margin, metric, need_grad)


def _fused_fake(x, labels, margin, metric, need_grad):
    dtype = _backend.accumulation_dtype(x)
    return x.new_empty((), dtype=dtype), x.new_empty((), dtype=torch.float64), x.new_empty(x.shape, dtype=dtype)


def _fused_setup_context(ctx, inputs, output):
    x, _, _, _, need_grad = inputs
    _, norm, dx = output
    ctx.save_for_backward(dx)
    ctx.x_dtype = x.dtype
    ctx.need_grad = need_grad
    ctx.mark_non_differentiable(norm, dx)


def _fused_backward(ctx, grad_loss, _grad_norm, _grad_dx):
    if not ctx.need_grad:
        raise RuntimeError("triplet: backward through a fused op called with need_grad=False")
    (dx,) = ctx.saved_tensors
    return (grad_loss.to(dx.dtype) * dx).to(ctx.x_dtype), None, None, None, None


def _fused_op(name: str, fn):
    return custom_op(name, fn, fake=_fused_fake, setup_context=_fused_setup_context, backward=_fused_backward)


_batch_all_fused_op = _fused_op("batch_all_triplet_fused", _batch_all_fused)
_semi_hard_fused_op = _fused_op("batch_semi_hard_triplet_fused", _semi_hard_fused)


def batch_all_triplet(x: Tensor, labels: Tensor, margin: float, metric: int) -> Tensor:
    """Batch-all triplet loss (fp32 scalar; fp64 for fp64 x), O(rows * B) memory. See the module docstring."""
    if _native_streamed(x, NATIVE_BATCH_ALL):
        return _batch_all_fused_op(x, labels, float(margin), metric, _need_grad(x))[0]
    return _batch_all_op(x, labels, float(margin), metric)[0]


def batch_semi_hard_triplet(x: Tensor, labels: Tensor, margin: float, metric: int) -> Tensor:
    """Batch-semi-hard triplet loss (fp32 scalar; fp64 for fp64 x), O(rows * B) memory. See the module docstring."""
    if _native_streamed(x, NATIVE_SEMI_HARD):
        return _semi_hard_fused_op(x, labels, float(margin), metric, _need_grad(x))[0]
    return _semi_hard_op(x, labels, float(margin), metric)[0]
