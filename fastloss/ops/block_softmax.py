"""The row passes of the row-block MNRL op (fastloss.ops.mnrl_blocked) over a block of raw products S [m, N] as two
Triton kernels, so that the block's logits cross memory three times (written by the GEMM, read for the row
statistics, read again to write G in the input dtype) instead of the eight or so passes of the same maths in torch
ops. The logits are sim_lse's (``_logits``: scale, hardness penalty, own-column mask), of the similarities
t_ij = r_inv_i S_ij c_inv_j, for the block's rows i (global row ``offset + i``):
    row_stats:  top_i = max_j logit_ij (0 for a fully masked row, whose sum is 0), sum_i = sum_j exp(logit_ij - top_i),
                with positive_col also neg_i, the same sum without column offset + i (the positive's), and pos_i =
                scale t_i,offset+i, the positive's logit (never penalised nor masked); with ``terms`` (query_to_doc
                alone) the row's loss term, softmax weight and positive coefficient from those (row_stats)
    row_grad:   G_ij = exp(logit_ij - top_i) c_inv_j (c_inv capped at 32752 for fp16), in G's dtype; with ``fold``
                the positive's coefficient written into its entry (mnrl_blocked._fold_positive's rule), with
                ``pos_w`` also the weight of the positive's separate term where it was not folded; for fp16 G with
                ``scaled`` also G_r, each row of G times the power of two rs_i that takes its largest entry into
                [2^14, 2^15) (from row_stats' ``gmax`` and the positive's entry), the query rows' GEMM operand
S may be G's storage (fp32 G in place: each element is read before it is written, by the same program). What these
kernels compute besides the passes (the positive's logit, its folded entry) saves the row-block op a few small torch
ops per block and direction: each a launch on CUDA, where a block's GEMMs take about as long as ~50 launches at small
blocks (fastloss.ops.mnrl_blocked's docstring).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastloss.ops.sim_lse import _fold, _half_scale, _logits, _positive_coefficient, _rebase, _softplus

BLOCK_N = 1024  # columns per step of a row: 4 KiB of fp32 per load, a warp-friendly size for a streaming pass


@triton.jit
def _row_logits(s, r_inv, c_inv, scale, row, o_n, N, period, offset, alpha, stride_s, MASK_OWN, PEN_MODE):
    m_n = o_n < N
    b_s = tl.load(s + row * stride_s + o_n, mask=m_n, other=0.0)
    b_t = b_s * tl.load(r_inv + row) * tl.load(c_inv + o_n, mask=m_n, other=0.0)
    return _logits(b_t, row, o_n, N, period, offset, tl.load(scale), alpha, MASK_OWN, PEN_MODE)


@triton.jit
def _mantissa(b_w):
    """A positive normal fp32 w's mantissa m in [0.5, 1) (w / m is a power of two, exactly); 1 for anything else."""
    b_m = ((b_w.to(tl.int32, bitcast=True) & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    return tl.where((b_w >= 1.1754943508222875e-38) & (b_w < float("inf")), b_m, 1.0)


@triton.jit
def _own_entry(c_inv, pos_val, total, row, own, DTYPE: tl.constexpr):
    """(c_inv_own, the positive's coefficient in E units times it: the entry row_grad's fold writes, in fp32, and
    whether it is folded: G's DTYPE holds it rounded (not NaN either) and, in fp16, c_inv_own is not capped), the rule
    of mnrl_blocked._fold_positive."""
    inv = tl.load(c_inv + own)
    value = inv * (tl.load(pos_val + row) * tl.load(total + row))
    folded = tl.abs(value.to(DTYPE).to(tl.float32)) < float("inf")  # False for NaN too
    if DTYPE == tl.float16:
        folded = folded & (inv <= 65504.0)
    return inv, value, folded


@triton.jit
def row_stats_kernel(
    s,
    r_inv,
    c_inv,
    scale,
    top,
    total,
    neg,
    pos,
    x_out,
    pos_val,
    weight,
    rw,
    srw,
    sims,
    gmax,
    mant,
    dsc,
    h,
    N,
    period,
    offset,
    alpha,
    stride_s,
    MASK_OWN: tl.constexpr,
    PEN_MODE: tl.constexpr,
    POS_COL: tl.constexpr,
    TERMS: tl.constexpr,
    JOINT: tl.constexpr,
    GMAX: tl.constexpr,
    MANT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    own = offset + row
    # the positive's logit in the order of _row_logits and _logits (t = s r_inv c_inv, then scale t)
    b_t_own = tl.load(s + row * stride_s + own) * tl.load(r_inv + row) * tl.load(c_inv + own)
    b_pos = tl.load(scale) * b_t_own
    tl.store(pos + row, b_pos)
    b_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    b_nsum = tl.zeros((BLOCK,), dtype=tl.float32)  # POS_COL: without column offset + row
    b_gmax = tl.zeros((BLOCK,), dtype=tl.float32)  # GMAX: max exp(logit - max) c_inv (fp16's cap), POS_COL's apart
    b_dsc = tl.zeros((BLOCK,), dtype=tl.float32)  # TERMS: sum of exp(logit - max) (t - t_own), the positive's apart
    for start in range(0, N, BLOCK):
        o_n = start + tl.arange(0, BLOCK).to(tl.int64)
        b_logit = _row_logits(s, r_inv, c_inv, scale, row, o_n, N, period, offset, alpha, stride_s, MASK_OWN, PEN_MODE)
        b_new = tl.maximum(b_max, b_logit)  # a running max and sum per lane, combined at the end
        b_ref, b_rescale = _rebase(b_max, b_new)
        b_e = tl.exp(b_logit - b_ref)
        b_sum = b_sum * b_rescale + b_e
        if POS_COL:
            b_nsum = b_nsum * b_rescale + tl.where(o_n == offset + row, 0.0, b_e)
        if GMAX:
            b_g = b_e * _fold(tl.load(c_inv + o_n, mask=o_n < N, other=0.0), tl.float16)
            if POS_COL:
                b_g = tl.where(o_n == offset + row, 0.0, b_g)
            b_gmax = tl.maximum(b_gmax * b_rescale, b_g)
        if TERMS:  # dL/dscale's row term, sum_j p_j (t_j - t_own): d logit / d scale = t (the penalty is alpha t)
            m_n = o_n < N
            b_t = tl.load(s + row * stride_s + o_n, mask=m_n, other=0.0) * tl.load(r_inv + row)
            b_t = b_t * tl.load(c_inv + o_n, mask=m_n, other=0.0)
            b_dsc = b_dsc * b_rescale + tl.where(o_n == own, 0.0, b_e * (b_t - b_t_own))
        b_max = b_new
    b_top = tl.max(b_max, axis=0)
    b_top_ref = tl.where(b_top == float("-inf"), 0.0, b_top)
    b_lane = tl.where(b_max == float("-inf"), 0.0, tl.exp(b_max - b_top_ref))
    b_total = tl.sum(b_sum * b_lane, axis=0)
    tl.store(top + row, b_top_ref)
    tl.store(total + row, b_total)
    if GMAX:
        tl.store(gmax + row, tl.max(b_gmax * b_lane, axis=0))
    if POS_COL:
        b_neg = tl.sum(b_nsum * b_lane, axis=0)
        tl.store(neg + row, b_neg)
        if TERMS:  # query_to_doc alone: mnrl.one_direction_terms and the row's weights, in their torch order
            b_x = (b_top_ref + tl.log(b_neg)) - b_pos
            b_c = 1.0 / b_total
            b_rw = b_c * tl.load(r_inv + row)
            if MANT:  # half GEMMs: the weight's mantissa goes into G's row (row_grad), rw keeps its power of two
                b_w = b_rw
                if MANT == 2:  # fp16: the inverse norm capped, as mnrl_blocked._cap
                    b_w = b_c * tl.minimum(tl.load(r_inv + row), 65504.0)
                b_m = _mantissa(b_w)
                tl.store(mant + row, b_m)
                b_rw = b_rw / b_m
            tl.store(dsc + row, tl.sum(b_dsc * b_lane, axis=0) * b_c)
            tl.store(x_out + row, _softplus(b_x))  # the row's loss
            tl.store(pos_val + row, _positive_coefficient(b_x, JOINT))
            tl.store(weight + row, b_c)
            tl.store(rw + row, b_rw)
            tl.store(srw + row, (tl.load(scale) * h) * b_rw)
            tl.store(sims + row, b_t_own)


@triton.jit
def row_grad_kernel(
    s,
    r_inv,
    c_inv,
    scale,
    top,
    g,
    pos_val,
    total,
    left,
    share,
    pos_w,
    gmax,
    rs,
    g_r,
    mant,
    h,
    N,
    period,
    offset,
    alpha,
    stride_s,
    stride_g,
    MASK_OWN: tl.constexpr,
    PEN_MODE: tl.constexpr,
    FOLD: tl.constexpr,
    POS_W: tl.constexpr,
    SCALE: tl.constexpr,
    OWN_APART: tl.constexpr,
    MANT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * BLOCK
    o_n = first + tl.arange(0, BLOCK)
    b_logit = _row_logits(s, r_inv, c_inv, scale, row, o_n, N, period, offset, alpha, stride_s, MASK_OWN, PEN_MODE)
    b_top = tl.load(top + row)
    b_cinv = _fold(tl.load(c_inv + o_n, mask=o_n < N, other=0.0), g.dtype.element_ty)
    b_e = tl.exp(b_logit - b_top) * b_cinv
    if MANT:  # the mantissa of the row's weight in the candidates' GEMM (row_stats)
        b_m = tl.load(mant + row)
        b_e = b_e * b_m
    b_g = b_e.to(g.dtype.element_ty)
    own = offset + row
    if SCALE:  # fp16 G_r: the row's power of two from its largest entry, the positive's as the fold will write it
        b_bound = tl.load(gmax + row)
        if OWN_APART:  # row_stats left the positive's column out
            own_entry = _fold(tl.load(c_inv + own), g.dtype.element_ty)  # E <= 1 where not folded
            if FOLD:  # the entry the fold below writes
                _, value, own_folded = _own_entry(c_inv, pos_val, total, row, own, g.dtype.element_ty)
                own_entry = tl.where(own_folded, tl.abs(value), own_entry)
                # its E c_inv scaled for a small folded entry could pass fp16's range (a cast to inf, overwritten)
                b_e = tl.where(o_n == own, tl.where(own_folded, 0.0, b_e), b_e)
            b_bound = tl.maximum(b_bound, own_entry)
        b_rs = _half_scale(b_bound)
        if first == 0:
            tl.store(rs + row, b_rs)
        b_gr = (b_e * b_rs).to(g.dtype.element_ty)
    if FOLD:  # the positive's coefficient into its entry where G's dtype holds it, else its share to ``left``
        if (own >= first) & (own < first + BLOCK):
            inv, value, folded = _own_entry(c_inv, pos_val, total, row, own, g.dtype.element_ty)
            if MANT:  # whether it is folded is decided without
                value = value * b_m
            entry = value.to(g.dtype.element_ty)
            b_g = tl.where(o_n == own, tl.where(folded, entry, b_g), b_g)
            if SCALE:
                b_gr = tl.where(o_n == own, tl.where(folded, (value * b_rs).to(g.dtype.element_ty), b_gr), b_gr)
            b_left = tl.load(left + row) + tl.where(folded, 0.0, share)
            tl.store(left + row, b_left)
            if POS_W:  # the weight of the row's separate positive term, -scale h left c_inv r_inv (mnrl._add_rows)
                tl.store(pos_w + row, ((-(tl.load(scale) * h) * b_left) * inv) * tl.load(r_inv + row))
    if SCALE:
        tl.store(g_r + row * stride_g + o_n, b_gr, mask=o_n < N)
    tl.store(g + row * stride_g + o_n, b_g, mask=o_n < N)


def _on_device(x: Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def row_stats(
    s,
    r_inv,
    c_inv,
    scale,
    *,
    period,
    offset,
    mask_own,
    pen_mode,
    alpha,
    positive_col=False,
    terms=None,
    gmax=None,
    mant=None,
) -> tuple:
    """(top [m], sum [m], neg [m] or None, pos [m]) in fp32 of the logits of the block S [m, N] (fp32, rows
    contiguous); top is 0 for a fully masked row; neg (with ``positive_col``) the sum without each row's column
    offset + i; pos the logit scale t of that column as it is (neither penalised nor masked). With ``terms`` = (x
    [m], rw [m], sims [m], h, joint, dsc [m]) for query_to_doc alone (and ``positive_col``) also what the row-block
    op takes from them: the row loss softplus(x) with x = top + log neg - pos, rw = r_inv / sum and the positive's
    similarity t written into those, and (pos_val, weight, srw) [m] each returned after the four: pos_val =
    -sigmoid(x) (joint: +inf where x > 0), weight = 1 / sum, srw = scale h rw; in the torch ops' order of operations
    but softplus's log1p (sim_lse._softplus; mnrl.one_direction_terms; mnrl_blocked._block_terms), one launch instead
    of seventeen. Into dsc each row's dL/dscale term sum_j p_j (t_j - t_own) (the logits' derivative by the scale is
    t, the penalty's alpha t apart; the positive's column taken out of the sum rather than its -1 added: no
    cancellation), in fp32 from the products themselves, where the half dtypes' G C carried G's rounding into it
    (2^-9 of the terms in bf16, the sum 1000x worse than the flash path's).
    With ``gmax`` [m] (fp32) also each row's max of exp(logit - top) c_inv (c_inv at fp16's cap; with ``positive_col``
    that column apart) written into it: row_grad's ``scaled``. With ``terms`` and ``mant`` = (m [m], fp16), for half
    GEMM operands: the mantissa in [0.5, 1) of each row's weight w = rw (fp16: c min(r_inv, 65504)) written into m,
    and rw, srw divided by it, so that rw is w's power of two (mnrl_blocked: the candidates' GEMM then takes the query
    rows times a power of two, exact, and G's rows times m: row_grad's ``mant``)."""
    m, n = s.shape
    rows = (4 if positive_col else 3) + (3 if terms is not None else 0)
    out = torch.empty((rows, m), device=s.device, dtype=torch.float32)  # one allocation
    top, total, pos = out[0], out[1], out[3 if positive_col else 2]
    neg = out[2] if positive_col else None
    if terms is not None and not positive_col:
        raise ValueError("row_stats: terms are query_to_doc's, which holds the positive (positive_col)")
    x, rw, sims, h, joint, dsc = terms if terms is not None else (top, top, top, 0.0, False, top)
    if mant is not None and terms is None:
        raise ValueError("row_stats: mant is the mantissa of the terms' row weight")
    m_out, m_fp16 = mant if mant is not None else (top, False)
    pos_val, weight, srw = (out[4], out[5], out[6]) if terms is not None else (top, top, top)
    with _on_device(s):
        row_stats_kernel[(m,)](
            s,
            r_inv,
            c_inv,
            scale,
            top,
            total,
            total if neg is None else neg,
            pos,
            x,
            pos_val,
            weight,
            rw,
            srw,
            sims,
            top if gmax is None else gmax,
            m_out,
            dsc,
            float(h),
            n,
            period,
            offset,
            float(alpha),
            s.stride(0),
            MASK_OWN=bool(mask_own),
            PEN_MODE=pen_mode,
            POS_COL=bool(positive_col),
            TERMS=terms is not None,
            JOINT=bool(joint),
            GMAX=gmax is not None,
            MANT=0 if mant is None else 2 if m_fp16 else 1,
            BLOCK=BLOCK_N,
        )
    if terms is not None:
        return top, total, neg, pos, pos_val, weight, srw
    return top, total, neg, pos


def row_grad(
    s,
    r_inv,
    c_inv,
    scale,
    top,
    out,
    *,
    period,
    offset,
    mask_own,
    pen_mode,
    alpha,
    fold=None,
    pos_w=None,
    scaled=None,
    mant=None,
) -> Tensor:
    """``out`` [m, N] (fp32, which may be S itself, or fp16/bf16) = exp(logit - top) c_inv, for ``top`` from
    row_stats. With ``fold`` = (pos_val [m], sum [m], share, left [m]), all fp32 but ``share`` (a float): the entry of
    row i's column offset + i becomes c_inv (pos_val sum) rounded to G's dtype where that is finite (and, in fp16, c_inv
    at most 65504), and ``left`` gains ``share`` in the rows where it is not (mnrl_blocked._fold_positive). With
    ``pos_w`` = (w [m], h) as well, w = -scale h left c_inv_own r_inv: the weight of the positive's separate term in
    the row's gradient (mnrl._add_rows; 0 where it was folded). With ``scaled`` = (gmax [m] from row_stats, positive_col
    as row_stats had it, rs [m], out_r [m, N]), fp16 ``out`` only, also out_r = G with each row times the power of two
    rs_i written into ``rs``, which takes the row's largest entry (gmax's, or the positive's, folded or not) into [2^14,
    2^15), so that entries far below the row's top keep the bits that fp16 flushes (below 2^-24) or rounds coarsely
    (below 2^-14): mnrl_blocked's query rows' product takes out_r, its candidates' product ``out``. With ``mant`` [m]
    (row_stats'), each row of G (and G_r, whose scale is chosen without it) times it, the folded entry too."""
    m, n = s.shape
    if scaled is not None and out.dtype != torch.float16:
        raise ValueError(f"row_grad: scaled rows are fp16 G's, got {out.dtype}")
    gmax, own_apart, rs, out_r = scaled if scaled is not None else (top, False, top, out)
    if out_r.stride() != out.stride():
        raise ValueError("row_grad: out_r must be laid out as out")
    pos_val, total, share, left = fold if fold is not None else (top, top, 0.0, top)
    if pos_w is not None and fold is None:
        raise ValueError("row_grad: pos_w is the weight of what fold leaves")
    w, h = pos_w if pos_w is not None else (top, 0.0)
    with _on_device(s):
        row_grad_kernel[(m, triton.cdiv(n, BLOCK_N))](
            s,
            r_inv,
            c_inv,
            scale,
            top,
            out,
            pos_val,
            total,
            left,
            float(share),
            w,
            gmax,
            rs,
            out_r,
            top if mant is None else mant,
            float(h),
            n,
            period,
            offset,
            float(alpha),
            s.stride(0),
            out.stride(0),
            MASK_OWN=bool(mask_own),
            PEN_MODE=pen_mode,
            FOLD=fold is not None,
            POS_W=pos_w is not None,
            SCALE=scaled is not None,
            OWN_APART=bool(own_apart),
            MANT=mant is not None,
            BLOCK=BLOCK_N,
        )
    return out
