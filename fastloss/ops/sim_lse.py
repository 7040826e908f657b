"""Masked scaled-similarity logsumexp: the core primitive of the contrastive losses, as Triton kernels.

Rows r [M, D], candidates c [N, D], inverse norms r_inv [M], c_inv [N] (ones for dot product), period W:
    s_ij     = r_inv_i * c_inv_j * <r_i, c_j>
    own_ij   = (j mod W) == i + offset,        first_j = j < W
    pen_ij   = 0 | !own | own & !first | !(own & first)              (pen_mode 0 | 1 | 2 | 3)
    logit_ij = scale * s_ij + alpha * pen_ij * s_ij,  -inf where mask_own and own_ij
    lse_i    = log sum_j exp(logit_ij)                                (-inf when the whole row is masked)
    nlse_i   = log sum_{j != i + offset} exp(logit_ij)                 (positive_col: the row without its own first
                                                                        column, the positive pair of MNRL)
Every LSE is kept in two fp32 parts (fastloss.ops.two_part): hi_i, lse_i rounded, and lo_i, what the rounding left
off, from the row's running max and sum, so that a softmax entry recomputed from them, exp((logit_ij - hi_i) - lo_i),
is as exact at large logits as the forward's exp(logit_ij - max_i) / sum_i (exp(logit_ij - hi_i) alone would carry
hi_i's rounding, ulp(|lse_i|) / 2: 1e-3 of the entry at logits of 2e4).
Backward for g_i = dL/dlse_i, the penalty a stop-gradient term, P_ij = exp(logit_ij - lse_i) (0 where masked),
x_hat = x * x_inv:
    dr_hat_i = scale * g_i * sum_j P_ij c_hat_j
    dc_hat_j = scale * sum_i g_i P_ij r_hat_i
    dscale_i = g_i * sum_j P_ij s_ij
With pos_val (one value per row, +inf for none), P at column i + offset is replaced by pos_val_i in all three sums:
the caller folds its positive's -1 into that entry, formed from nlse without cancellation (fastloss.ops.mnrl).
With nlse_t the forward also gives the transposed direction's NLSE from its tiles, for rows the candidates
offset .. offset + n_t - 1 against these rows (logits scale * s_ij, its positive i = j - offset left out): each
program writes its rows' log-sum-exp of each such column, and the host reduces them (MNRL's symmetric loss).
The forward keeps a running max and sum per row over candidate tiles (no M x N matrix); the backward recomputes
the logits tile by tile, once over row blocks (dr_hat, dscale) and once over candidate blocks (dc_hat), without
atomics. When D fits one BLOCK_D the gradient accumulator stays in registers; otherwise it lives in the fp32
output, updated per D chunk by the program that owns those rows. Each backward launch covers a window of rows or of
candidates (SimLseBackward) and writes, or adds to, an fp32 output that holds that window only. The candidates may
come in blocks (separate tensors, such as MNRL's doc columns, not copied into one): a launch takes one block and the
global index base of its first row, for the masks and the positive column.

Precision: tl.dot on the input dtype with fp32 accumulation (for fp32 inputs "ieee", or "tf32x3" / "tf32" with
FASTLOSS_FP32_DOT); logits, LSE and accumulators in fp32. The backward products take the raw tiles of r and c
with the inverse norms folded into P before its cast to the input dtype: P_ij c_inv_j in dr, P_ij r_inv_i g_i / max|g|
in dc (g_i and scale are applied in fp32 afterwards), so that fp16 stays in range; in fp16 the folded inverse norm is
capped at 32752 (P is at most 2: a direct and a transposed entry), which only affects the terms of vectors of norm
< 3.1e-5 (in every gradient row they enter; zero vectors, whose term is 0, are exact). In fp16 each row of the operand
(a row of r in dr, a candidate in dc) is also scaled by a power of two that puts its max in [2^14, 2^15) before the
cast (_half_scale; SINGLE_D keeps a running max and rescales its accumulator when it grows, D chunks scale per tile)
and unscaled in fp32 after the GEMM: unscaled, a row whose every entry was below 2^-24 (a doc far from every query, a
confident query) lost its gradient.
fp64 inputs are computed in fp32; under TRITON_INTERPRET=1 so are bf16 inputs (the interpreter's bf16 tl.dot is
wrong). Operands need contiguous rows (a row stride is fine); others are made contiguous.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastloss import _backend
from fastloss.ops._autotune import drop_fp32_tiles, first_only, tune_bucket, without_tiles
from fastloss.ops.two_part import logsumexp2

# D up to this stays in one BLOCK_D tile (accumulator in registers); above it D is looped in CHUNK_D chunks. fp32
# operands hold twice the bytes per element (and tf32x3 dots split each tile in three): with one tile up to D = 256
# the sm_90 kernels needed 0.4-7 KB of stack per thread in some configurations (Triton 3.8 and the GPU image's 3.6,
# scripts/triton_aot.py), in chunks above D = 128 at most 16 B (ieee) / 136 B (tf32x3), so fp32 chunks above 128.
SINGLE_D_MAX = 256
SINGLE_D_MAX_FP32 = 128
CHUNK_D = 64
# One fp16/bf16 tile of D up to 256 takes more shared memory than GPUs with ~100 KB a thread block have: at D = 256 no
# configuration of the backward fits sm_86 (A10, RTX 30xx; sm_89, L4 and RTX 40xx, alike: 107-109 KB needed, 99 KB
# there), nor of the forward sm_75 (T4: 96 KB needed, 64 KB there; scripts/triton_aot.py --arch 86 / 75). There half
# dtypes chunk D above SINGLE_D_MAX_FP32, as fp32 does; one tile up to SINGLE_D_MAX wants this much (sm_80: 163 KB,
# sm_90: 227 KB).
SINGLE_D_MIN_SHARED = 160 * 2**10


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _device_shared(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def shared_memory(device: torch.device) -> int | None:
    """The shared memory one thread block may use on ``device`` (bytes), None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    return _device_shared(torch.cuda.current_device() if device.index is None else device.index)


def _single_d(D: int, x: Tensor) -> bool:
    """Whether D stays in one tile for operands like ``x``: its dtype, and its GPU's shared memory."""
    if x.dtype == torch.float32:
        return D <= SINGLE_D_MAX_FP32
    shared = shared_memory(x.device)
    return D <= (SINGLE_D_MAX if shared is None or shared >= SINGLE_D_MIN_SHARED else SINGLE_D_MAX_FP32)


def _block_d(D: int, x: Tensor) -> int:
    return max(16, triton.next_power_of_2(D)) if _single_d(D, x) else CHUNK_D


def _config(bm: int, bn: int, warps: int, stages: int = 3) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Tile shapes picked from the resources ptxas reports for sm_90 (scripts/triton_aot.py, triton 3.8): for each kernel,
# dtype and D regime some of them need no stack (no spilled registers). fp32 operands get more: with ieee dots (FMA,
# operands held per thread) all five shared backward tiles spilled at D in (64, 256] in one tile, and with tf32x3 dots
# at D = 256 only the 32 x 32 forward tile fitted in shared memory (before fp32 chunked D above 128, which spills
# less still). Half dtypes do not compile or time the fp32 tiles (every tile
# costs a compile on the first call for a given D, dot precision and dtypes, when the kernel autotunes).
_FP32_FWD = [_config(32, 32, 4)]
_FP32_BWD = [_config(32, 32, 4), _config(32, 64, 8), _config(64, 32, 8)]
# Wider tiles for fp16/bf16 when D is looped in chunks (D > SINGLE_D_MAX, the GPU targets' D = 768..4096). There each
# tile of the similarity is a GEMM over D whose operands come from L2: BLOCK_M * BLOCK_N / (BLOCK_M + BLOCK_N) FLOP
# per byte (32 at 64 x 64, 43 at 128 x 64, 64 at 128 x 128), and the backward's read-modify-write of the fp32 gradient
# rows costs one pass over them per tile of the other side. With bf16/fp16 at D = 768 and 1024 they compile without a
# stack on sm_90 (wgmma; Triton 3.6 and 3.8) and sm_80 (at D = 1000, not a multiple of BLOCK_D, some need 24-472 B);
# at D <= 256 they spill or do not fit in shared memory, so they are dropped there, and for fp32 operands.
_WIDE_FWD = [_config(128, 128, 8), _config(128, 64, 8), _config(64, 128, 8)]
_WIDE_BWD = [_config(128, 64, 8), _config(64, 128, 8)]
_FWD_CONFIGS = [
    _config(64, 64, 8),
    _config(128, 32, 8),
    _config(64, 32, 4),
    _config(32, 64, 4),
    *_FP32_FWD,
    *_WIDE_FWD,
]
_BWD_CONFIGS = [
    _config(64, 64, 8),
    _config(128, 32, 8),
    _config(64, 32, 4),
    _config(32, 64, 4),
    _config(64, 64, 4),
    *_FP32_BWD,
    *_WIDE_BWD,
]


def _configs(kind: str) -> list[triton.Config]:
    if _interpret():
        return [_config(16, 32, 4, 1)]
    if os.environ.get("FASTLOSS_AUTOTUNE", "0") == "1":
        return [_config(*c) for c in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
    return _FWD_CONFIGS if kind == "fwd" else _BWD_CONFIGS


def _drop_wide_tiles(configs: list[triton.Config], named_args: dict, wide: list[triton.Config]) -> list:
    """``configs`` without the tiles of ``wide`` unless the operands are fp16/bf16 and D is looped in chunks."""
    dtype = named_args["r"].dtype
    if dtype in (torch.float16, torch.bfloat16) and not _single_d(named_args["D"], named_args["r"]):
        return configs
    return without_tiles(configs, wide)


def _prune_fwd(configs, named_args, **kwargs):
    return first_only(_drop_wide_tiles(drop_fp32_tiles(configs, named_args["r"], _FP32_FWD), named_args, _WIDE_FWD))


def _prune_bwd(configs, named_args, **kwargs):
    """Also drop tiles whose [BLOCK, BLOCK_D] fp32 gradient accumulator would spill (2048 elements per warp)."""
    block_d = _block_d(named_args["D"], named_args["r"])
    kept = [
        cfg
        for cfg in _drop_wide_tiles(drop_fp32_tiles(configs, named_args["r"], _FP32_BWD), named_args, _WIDE_BWD)
        if max(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]) * block_d <= 2048 * cfg.num_warps
    ]
    return first_only(kept or configs[:1])


_HEURISTICS = {
    "BLOCK_D": lambda args: _block_d(args["D"], args["r"]),
    "SINGLE_D": lambda args: _single_d(args["D"], args["r"]),
    "EVEN_D": lambda args: args["D"] % _block_d(args["D"], args["r"]) == 0,
}


def _autotuned(kind: str, restore: str | None = None):
    """``restore``: the output an ACCUMULATE launch adds into, restored after each timed tile while tuning."""
    prune = {"early_config_prune": _prune_bwd if kind == "bwd" else _prune_fwd}

    def wrap(fn):
        return triton.autotune(
            configs=_configs(kind),
            key=["D", "DOT_PRECISION", "TUNE_M", "TUNE_N"],
            prune_configs_by=prune,
            restore_value=[restore] if restore else None,
        )(triton.heuristics(_HEURISTICS)(fn))

    return wrap


@triton.jit
def _load_rows(
    p, start, n_rows, start_d, D, stride_row, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr
):
    """x[start : start + BLOCK, start_d : start_d + BLOCK_D] of a D-contiguous matrix, zeros outside it."""
    o_row = tl.arange(0, BLOCK)
    o_d = tl.arange(0, BLOCK_D)
    p_x = p + (tl.cast(start, tl.int64) * stride_row + start_d) + (o_row[:, None] * stride_row + o_d[None, :])
    m_x = o_row[:, None] < n_rows - start
    if not EVEN_D:
        m_x = m_x & (o_d[None, :] < D - start_d)
    return tl.load(p_x, mask=m_x, other=0.0)


@triton.jit
def _store_rows(p, b_x, start, n_rows, start_d, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[start : start + BLOCK, start_d : start_d + BLOCK_D] = b_x for a contiguous fp32 [n_rows, D] output."""
    o_row = tl.arange(0, BLOCK)
    o_d = tl.arange(0, BLOCK_D)
    p_x = p + (tl.cast(start, tl.int64) * D + start_d) + (o_row[:, None] * D + o_d[None, :])
    tl.store(p_x, b_x, mask=(o_row[:, None] < n_rows - start) & (o_d[None, :] < D - start_d))


@triton.jit
def _add_rows(p, b_x, accumulate, start, n_rows, start_d, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[tile] += b_x (out[tile] = b_x unless ``accumulate``): a read-modify-write of rows this program owns."""
    o_row = tl.arange(0, BLOCK)
    o_d = tl.arange(0, BLOCK_D)
    p_x = p + (tl.cast(start, tl.int64) * D + start_d) + (o_row[:, None] * D + o_d[None, :])
    m_x = (o_row[:, None] < n_rows - start) & (o_d[None, :] < D - start_d)
    b_prev = tl.load(p_x, mask=m_x & accumulate, other=0.0)
    tl.store(p_x, b_prev + b_x, mask=m_x)
    tl.debug_barrier()  # the next update of this tile may read it from other threads


@triton.jit
def _write_rows(p, b_x, ACCUMULATE: tl.constexpr, start, n_rows, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """A one-tile-D program's result: out[start : start + BLOCK] = b_x, or += b_x with ACCUMULATE."""
    if ACCUMULATE:
        _add_rows(p, b_x, True, start, n_rows, 0, D, BLOCK, BLOCK_D)
    else:
        _store_rows(p, b_x, start, n_rows, 0, D, BLOCK, BLOCK_D)


@triton.jit
def _dot_rows(
    a,
    b,
    start_a,
    start_b,
    n_a,
    n_b,
    D,
    stride_a,
    stride_b,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """<a_i, b_j> for the row tiles at start_a, start_b, over D in BLOCK_D chunks: fp32 [BLOCK_A, BLOCK_B]."""
    b_acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for start_d in range(0, D, BLOCK_D):
        b_a = _load_rows(a, start_a, n_a, start_d, D, stride_a, BLOCK_A, BLOCK_D, EVEN_D)
        b_b = _load_rows(b, start_b, n_b, start_d, D, stride_b, BLOCK_B, BLOCK_D, EVEN_D)
        b_acc = tl.dot(b_a, tl.trans(b_b), b_acc, input_precision=DOT_PRECISION)
    return b_acc


@triton.jit
def _logits(b_s, i, j, N, period, offset, b_scale, alpha, MASK_OWN: tl.constexpr, PEN_MODE: tl.constexpr):
    """The logits of a tile of similarities ``b_s``; ``i`` (row) and ``j`` (candidate) broadcast to its shape."""
    m_own = (j % period) == (i + offset)
    if PEN_MODE == 0:
        b_logit = b_scale * b_s
    else:
        m_first = j < period
        if PEN_MODE == 1:
            m_pen = ~m_own
        elif PEN_MODE == 2:
            m_pen = m_own & ~m_first
        else:
            m_pen = ~(m_own & m_first)
        b_logit = b_scale * b_s + tl.where(m_pen, alpha * b_s, 0.0)
    m_keep = j < N
    if MASK_OWN:
        m_keep = m_keep & ~m_own
    return tl.where(m_keep, b_logit, float("-inf"))


@triton.jit
def _fold(b_inv, DTYPE: tl.constexpr):
    """An inverse norm to fold into P before the cast to DTYPE: capped for fp16 at half its maximum, so P * inv stays
    finite where P sums a direct and a transposed softmax entry (up to 2: TRANSPOSED); at the maximum itself a zero
    query's capped 1 / eps times such a sum overflowed to inf, and inf times its zero row was NaN in its positive's
    gradient (the symmetric loss in fp16, until 2026-12-02)."""
    if DTYPE == tl.float16:
        return tl.minimum(b_inv, 32752.0)
    return b_inv


@triton.jit
def _half_scale(b_amax):
    """Per row, the power of two s with |a| s in [2^14, 2^15) at the row's max |a| = b_amax (1 where that is 0): an fp16
    GEMM operand scaled so keeps the row's small entries, which unscaled fell below fp16's subnormals (2^-24) and
    vanished, normal down to 2^-28 of the max (2^-38 as subnormals). Exact: built from the exponent bits."""
    b_e = ((b_amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 b_amax) (subnormals: -127)
    b_e = tl.maximum(b_e, -113)  # s at most 2^127
    b_s = ((127 + 14 - b_e) << 23).to(tl.float32, bitcast=True)
    return tl.where(b_amax > 0.0, b_s, 1.0)


@triton.jit
def _half_rescale(b_x, b_run, b_hs, b_acc):
    """A running _half_scale over tiles of rows b_x whose scaled products accumulate in b_acc: (the rows' max |x| so
    far, their power of two now, b_acc moved to it). The ratio of two powers of two rescales b_acc exactly."""
    b_run = tl.maximum(b_run, tl.max(tl.abs(b_x), axis=1))
    b_new = _half_scale(b_run)
    return b_run, b_new, b_acc * (b_new / b_hs)[:, None]


@triton.jit
def _by_global_index(c, c_inv, N, base, stride_c):
    """A block of candidates addressed by their global index j = base .. base + N - 1: (c and c_inv shifted back by
    base rows, the end of the block), so that masks, penalty and positive read j as they are."""
    return c - tl.cast(base, tl.int64) * stride_c, c_inv - base, N + base


@triton.jit
def _reference(b_max):
    """A max as the reference point of exp(x - max): 0 where every x is -inf, so that exp(-inf - 0) = 0, not NaN."""
    return tl.where(b_max == float("-inf"), 0.0, b_max)


@triton.jit
def _rebase(b_max, b_new):
    """A running sum of exp(x - max) whose max moves from b_max to b_new: (the new reference point, the factor that
    rescales the sum so far)."""
    b_ref = _reference(b_new)
    return b_ref, tl.exp(b_max - b_ref)


@triton.jit
def _log_sum(b_max, b_sum):
    """max + log(sum) of a row's running max and sum of exp(logit - max): -inf where the sum is 0 (the value alone, as
    CoSENT's loss takes it; _log_sum_parts' hi)."""
    b_hi, _ = _log_sum_parts(b_max, b_sum)
    return b_hi


@triton.jit
def _log_sum_parts(b_max, b_sum):
    """max + log(sum) of a row's running max and sum of exp(logit - max) in two parts (fastloss.ops.two_part): hi,
    the value rounded, and lo = (max - hi) + log(sum), what the rounding left off (max - hi is exact where it matters:
    hi lies within log(sum) of max); (-inf, 0) where the sum is 0."""
    m_any = b_sum > 0.0
    b_log = tl.log(tl.where(m_any, b_sum, 1.0))
    b_ref = tl.where(m_any, b_max, 0.0)  # finite: no -inf - -inf
    b_hi = b_ref + b_log
    return tl.where(m_any, b_hi, float("-inf")), tl.where(m_any, (b_ref - b_hi) + b_log, 0.0)


@triton.jit
def _store_log_sum(hi, lo, o, mask, b_max, b_sum):
    """Store _log_sum_parts' two parts at o of hi and lo."""
    b_hi, b_lo = _log_sum_parts(b_max, b_sum)
    tl.store(hi + o, b_hi, mask=mask)
    tl.store(lo + o, b_lo, mask=mask)


@triton.jit
def _softplus(b_x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), log1p(a) as log(u) a / (u - 1) with u = 1 + a rounded (that step exact
    to a few ulps for a tiny a, where log(1 + a) would lose it: the loss of a confident row; on a GPU e^-|x| carries
    tl.exp's approximation, a relative error up to ~|x| 6e-8, as in the other kernels)."""
    b_a = tl.exp(-tl.abs(b_x))
    b_u = 1.0 + b_a
    b_log1p = tl.where(b_u == 1.0, b_a, tl.log(b_u) * (b_a / tl.where(b_u == 1.0, 1.0, b_u - 1.0)))
    return tl.maximum(b_x, 0.0) + b_log1p


@triton.jit
def _positive_coefficient(b_x, JOINT: tl.constexpr):
    """query_to_doc alone, x = NLSE - the positive's logit: the positive's p - 1 = -sigmoid(x), from e^-|x| (no
    overflow; e^x / (1 + e^x) for x < 0 keeps a confident row's tiny coefficient); joint: +inf where x > 0, where the
    -1 stays a separate term (fastloss.ops.mnrl.one_direction_terms)."""
    b_e = tl.exp(-tl.abs(b_x))
    b_coef = -(tl.where(b_x >= 0.0, 1.0, b_e) / (1.0 + b_e))
    if JOINT:
        b_coef = tl.where(b_x > 0.0, float("inf"), b_coef)
    return b_coef


@triton.jit
def _fold_positive(b_p, m_pos, b_pv):
    """P with pos_val at each row's positive entry ``m_pos`` (rows whose pos_val is +inf keep P)."""
    return tl.where(m_pos & (b_pv != float("inf")), b_pv, b_p)


@triton.jit
def _transposed_p(b_s, b_scale, lse_t, lse_t_lo, o_t, n_t, m_r, b_logit, MASK_OWN: tl.constexpr):
    """The softmax of the transposed direction (doc_to_query beside query_to_doc; a Gram block's own rows) at a
    tile's entries: its rows are the candidates whose index less offset, ``o_t`` (broadcast to the tile's shape), is
    in 0 .. n_t - 1, with LSE lse_t[o_t] + lse_t_lo[o_t] and logits scale * s, unpenalised, against the tile's rows
    where ``m_r`` (the rows that exist); 0 at every other entry, and with MASK_OWN also where the direct logit
    ``b_logit`` is masked (a Gram block: the transposed row's own entry is the row's own entry). A row past the end has
    s = 0, whose exp(0 - LSE) overflows to inf where the LSE is below -88.7 (a candidate scored far below every row),
    and inf times its weight 0 is NaN in the gradient GEMM."""
    m_t = (o_t >= 0) & (o_t < n_t)
    b_lt = tl.load(lse_t + o_t, mask=m_t, other=float("inf"))  # one value per candidate: m_r joins after the loads
    b_lt_lo = tl.load(lse_t_lo + o_t, mask=m_t, other=0.0)
    m_t = m_t & m_r
    if MASK_OWN:  # after the load: a load masked by the dot's result breaks sm_90's pipeliner (Triton 3.8)
        m_t = m_t & (b_logit != float("-inf"))
    return tl.where(m_t, tl.exp((b_scale * b_s - b_lt) - b_lt_lo), 0.0)


@triton.jit
def _transposed_part(
    b_s, b_scale, nlse_t, nlse_t_lo, o_m, o_t, M, n_t, rows_t, BLOCK_M: tl.constexpr, PART_M: tl.constexpr
):
    """The forward's share of the transposed direction (doc_to_query beside query_to_doc): its rows are the
    candidates whose index less offset, ``o_t``, is in 0 .. n_t - 1, with logits scale * s (unpenalised) against
    these rows o_m as candidates, their own positive (o_m == o_t) left out. Writes this tile's log-sum-exp of each
    such column over the program's rows, in two parts, into row pid * R of nlse_t and nlse_t_lo [rows_t, n_t] and
    (-inf, 0) into the next R - 1 (R = BLOCK_M / PART_M), so that every row a grid covers is written whatever BLOCK_M
    the autotuner chose, and the host's logsumexp down the columns gives the transposed rows' NLSE over all of r."""
    m_t = (o_t >= 0) & (o_t < n_t)
    m_in = (o_m[:, None] < M) & m_t[None, :] & (o_m[:, None] != o_t[None, :])
    b_lt = tl.where(m_in, b_scale * b_s, float("-inf"))
    b_tmax = tl.max(b_lt, axis=0)
    b_tsum = tl.sum(tl.exp(b_lt - _reference(b_tmax)[None, :]), axis=0)
    o_p = tl.arange(0, BLOCK_M // PART_M)
    row = tl.program_id(0).to(tl.int64) * (BLOCK_M // PART_M) + o_p
    b_sums = tl.where(o_p[:, None] == 0, b_tsum[None, :], 0.0)  # a sum of 0: (-inf, 0) in the other R - 1 rows
    o_part = row[:, None] * n_t + o_t[None, :]
    m_part = (row[:, None] < rows_t) & m_t[None, :]
    _store_log_sum(nlse_t, nlse_t_lo, o_part, m_part, tl.broadcast_to(b_tmax[None, :], b_sums.shape), b_sums)


@triton.jit
def _load_lse(lse, lse_lo, o_m, M):
    """The two parts of the LSE of rows o_m, rows that carry no probability (fully masked, or past M) as (+inf, 0), so
    that P = exp((logit - hi) - lo) = 0 there."""
    b_lse = tl.load(lse + o_m, mask=o_m < M, other=float("-inf"))
    return tl.where(b_lse == float("-inf"), float("inf"), b_lse), tl.load(lse_lo + o_m, mask=o_m < M, other=0.0)


@_autotuned("fwd")
@triton.jit(do_not_specialize=["base", "TUNE_M", "TUNE_N"])
def sim_lse_fwd_kernel(
    r,
    c,
    r_inv,
    c_inv,
    scale,
    lse,  # the rows' LSE in two parts (fastloss.ops.two_part): hi and lo, each [M]
    lse_lo,
    nlse,
    nlse_lo,
    nlse_t,  # TRANSPOSED: [rows_t, n_t] partial NLSE of the transposed rows, one row per PART_M rows of r (and its lo)
    nlse_t_lo,
    M,
    N,
    D,
    period,
    offset,
    base,  # the global index of c's first row (c is a block of the candidates), for the masks and the positive
    alpha,
    stride_r,
    stride_c,
    n_t,
    rows_t,
    TUNE_M,  # the autotune key's size classes of M and N (tune_bucket); unused in the body
    TUNE_N,
    MASK_OWN: tl.constexpr,
    PEN_MODE: tl.constexpr,
    POS_COL: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    PART_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    c, c_inv, N = _by_global_index(c, c_inv, N, base, stride_c)
    start_m = tl.program_id(0).to(tl.int64) * BLOCK_M
    o_m = start_m + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    b_scale = tl.load(scale).to(tl.float32)
    b_rinv = tl.load(r_inv + o_m, mask=m_m, other=0.0)
    if SINGLE_D:
        b_r = _load_rows(r, start_m, M, 0, D, stride_r, BLOCK_M, BLOCK_D, EVEN_D)  # [BM, BD]
    b_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_nsum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # POS_COL: the sum without column i + offset
    for start_n in range(base, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        b_cinv = tl.load(c_inv + o_n, mask=o_n < N, other=0.0)
        if SINGLE_D:
            b_c = _load_rows(c, start_n, N, 0, D, stride_c, BLOCK_N, BLOCK_D, EVEN_D)  # [BN, BD]
            b_dot = tl.dot(b_r, tl.trans(b_c), input_precision=DOT_PRECISION)
        else:
            b_dot = _dot_rows(
                r, c, start_m, start_n, M, N, D, stride_r, stride_c, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION
            )
        b_s = b_dot * b_rinv[:, None] * b_cinv[None, :]  # [BM, BN]
        b_logit = _logits(b_s, o_m[:, None], o_n[None, :], N, period, offset, b_scale, alpha, MASK_OWN, PEN_MODE)
        b_new = tl.maximum(b_max, tl.max(b_logit, axis=1))
        b_ref, b_rescale = _rebase(b_max, b_new)
        b_e = tl.exp(b_logit - b_ref[:, None])
        b_sum = b_sum * b_rescale + tl.sum(b_e, axis=1)
        if POS_COL:
            m_pos = o_n[None, :] == o_m[:, None] + offset
            b_nsum = b_nsum * b_rescale + tl.sum(tl.where(m_pos, 0.0, b_e), axis=1)
        b_max = b_new
        if TRANSPOSED:
            if (start_n < offset + n_t) & (start_n + BLOCK_N > offset):
                _transposed_part(b_s, b_scale, nlse_t, nlse_t_lo, o_m, o_n - offset, M, n_t, rows_t, BLOCK_M, PART_M)
    _store_log_sum(lse, lse_lo, o_m, m_m, b_max, b_sum)
    if POS_COL:
        _store_log_sum(nlse, nlse_lo, o_m, m_m, b_max, b_nsum)


@_autotuned("bwd", restore="dr")
@triton.jit(do_not_specialize=["first", "base", "TUNE_M", "TUNE_N"])
def sim_lse_bwd_dr_kernel(
    r,
    c,
    r_inv,
    c_inv,
    scale,
    lse,  # the rows' LSE in two parts: hi and lo
    lse_lo,
    g,
    pos_val,
    lse_t,  # TRANSPOSED: the LSE of the rows of the transposed direction (candidates offset .. offset + n_t - 1)
    lse_t_lo,
    dr,
    dscale,
    first,  # the rows first .. M - 1: dr holds them from its row 0 (dscale, like the inputs, from row first)
    n_t,
    M,
    N,
    D,
    period,
    offset,
    base,  # the global index of c's first row (c is a block of the candidates), for the masks and the positive
    alpha,
    stride_r,
    stride_c,
    TUNE_M,  # the autotune key's size classes of M and N (tune_bucket); unused in the body
    TUNE_N,
    MASK_OWN: tl.constexpr,
    PEN_MODE: tl.constexpr,
    FOLD_POS: tl.constexpr,
    TRANSPOSED: tl.constexpr,  # P also holds the transposed direction's softmax (same g): SimLseBackward
    NEED_DSCALE: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add into dr instead of writing it
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    c, c_inv, N = _by_global_index(c, c_inv, N, base, stride_c)
    start_m = first + tl.program_id(0).to(tl.int64) * BLOCK_M
    o_m = start_m + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    b_scale = tl.load(scale).to(tl.float32)
    b_rinv = tl.load(r_inv + o_m, mask=m_m, other=0.0)
    b_lse, b_lse_lo = _load_lse(lse, lse_lo, o_m, M)
    b_g = tl.load(g + o_m, mask=m_m, other=0.0)
    b_coef = b_g * b_scale  # [BM]: dr_hat = coef * P c_hat
    if FOLD_POS:
        b_pv = tl.load(pos_val + o_m, mask=m_m, other=float("inf"))
    b_ps = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_run = tl.zeros((BLOCK_M,), dtype=tl.float32)  # fp16: each row's max |P c_inv| so far
    b_hs = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)  # fp16: the power of two the row's products carry
    if SINGLE_D:
        b_r = _load_rows(r, start_m, M, 0, D, stride_r, BLOCK_M, BLOCK_D, EVEN_D)  # [BM, BD]
        b_dr = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(base, N, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        b_cinv = tl.load(c_inv + o_n, mask=o_n < N, other=0.0)
        if SINGLE_D:
            b_c = _load_rows(c, start_n, N, 0, D, stride_c, BLOCK_N, BLOCK_D, EVEN_D)  # [BN, BD]
            b_dot = tl.dot(b_r, tl.trans(b_c), input_precision=DOT_PRECISION)
        else:
            b_dot = _dot_rows(
                r, c, start_m, start_n, M, N, D, stride_r, stride_c, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION
            )
        b_s = b_dot * b_rinv[:, None] * b_cinv[None, :]  # [BM, BN]
        b_logit = _logits(b_s, o_m[:, None], o_n[None, :], N, period, offset, b_scale, alpha, MASK_OWN, PEN_MODE)
        b_p = tl.exp((b_logit - b_lse[:, None]) - b_lse_lo[:, None])  # [BM, BN]
        if TRANSPOSED:
            b_p += _transposed_p(
                b_s, b_scale, lse_t, lse_t_lo, o_n[None, :] - offset, n_t, m_m[:, None], b_logit, MASK_OWN
            )
        if FOLD_POS:
            b_p = _fold_positive(b_p, o_n[None, :] == o_m[:, None] + offset, b_pv[:, None])
        if NEED_DSCALE:
            b_ps += tl.sum(b_p * b_s, axis=1)
        b_p = b_p * _fold(b_cinv, r.dtype.element_ty)[None, :]  # P_ij c_inv_j
        b_unscale = b_coef
        # fp16: each row scaled by a power of two into fp16's range (_half_scale); the sums carry it until the end
        if r.dtype.element_ty == tl.float16:
            if SINGLE_D:
                b_run, b_hs, b_dr = _half_rescale(b_p, b_run, b_hs, b_dr)
            else:
                b_hs = _half_scale(tl.max(tl.abs(b_p), axis=1))  # this tile's chunks are added as they come
                b_unscale = b_coef / b_hs
            b_p = b_p * b_hs[:, None]
        b_p = b_p.to(r.dtype.element_ty)
        if SINGLE_D:
            b_dr = tl.dot(b_p, b_c, b_dr, input_precision=DOT_PRECISION)  # [BM, BD]
        else:
            for start_d in range(0, D, BLOCK_D):
                b_c = _load_rows(c, start_n, N, start_d, D, stride_c, BLOCK_N, BLOCK_D, EVEN_D)
                b_part = tl.dot(b_p, b_c, input_precision=DOT_PRECISION) * b_unscale[:, None]  # [BM, BD]
                _add_rows(
                    dr, b_part, (start_n > base) | ACCUMULATE, start_m - first, M - first, start_d, D, BLOCK_M, BLOCK_D
                )
    if SINGLE_D:
        if r.dtype.element_ty == tl.float16:
            b_coef = b_coef / b_hs
        _write_rows(dr, b_dr * b_coef[:, None], ACCUMULATE, start_m - first, M - first, D, BLOCK_M, BLOCK_D)
    if NEED_DSCALE:
        tl.store(dscale + o_m, b_ps * b_g, mask=m_m)


@_autotuned("bwd", restore="dc")
@triton.jit(do_not_specialize=["first", "base", "TUNE_M", "TUNE_N"])
def sim_lse_bwd_dc_kernel(
    r,
    c,
    r_inv,
    c_inv,
    scale,
    lse,  # the rows' LSE in two parts: hi and lo
    lse_lo,
    g,
    g_max,
    pos_val,
    lse_t,  # TRANSPOSED: as in sim_lse_bwd_dr_kernel
    lse_t_lo,
    dc,
    first,  # the candidates first .. N - 1: dc holds them from its row 0
    n_t,
    M,
    N,
    D,
    period,
    offset,
    base,  # the global index of c's first row (c is a block of the candidates), for the masks and the positive
    alpha,
    stride_r,
    stride_c,
    TUNE_M,  # the autotune key's size classes of M and N (tune_bucket); unused in the body
    TUNE_N,
    MASK_OWN: tl.constexpr,
    PEN_MODE: tl.constexpr,
    FOLD_POS: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add into dc instead of writing it
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    c, c_inv, N = _by_global_index(c, c_inv, N, base, stride_c)
    first = first + base
    start_n = first + tl.program_id(0).to(tl.int64) * BLOCK_N
    o_n = start_n + tl.arange(0, BLOCK_N)
    b_scale = tl.load(scale).to(tl.float32)
    b_gmax = tl.load(g_max)
    b_gmax = tl.where(b_gmax > 0.0, b_gmax, 1.0)
    b_cinv = tl.load(c_inv + o_n, mask=o_n < N, other=0.0)
    b_run = tl.zeros((BLOCK_N,), dtype=tl.float32)  # fp16: as in sim_lse_bwd_dr_kernel, per candidate
    b_hs = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    if SINGLE_D:
        b_c = _load_rows(c, start_n, N, 0, D, stride_c, BLOCK_N, BLOCK_D, EVEN_D)  # [BN, BD]
        b_dc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, M, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < M
        b_rinv = tl.load(r_inv + o_m, mask=m_m, other=0.0)
        b_lse, b_lse_lo = _load_lse(lse, lse_lo, o_m, M)
        b_g = tl.load(g + o_m, mask=m_m, other=0.0)
        if SINGLE_D:
            b_r = _load_rows(r, start_m, M, 0, D, stride_r, BLOCK_M, BLOCK_D, EVEN_D)  # [BM, BD]
            b_dot = tl.dot(b_c, tl.trans(b_r), input_precision=DOT_PRECISION)
        else:
            b_dot = _dot_rows(
                c, r, start_n, start_m, N, M, D, stride_c, stride_r, BLOCK_N, BLOCK_M, BLOCK_D, EVEN_D, DOT_PRECISION
            )
        b_s = b_dot * b_cinv[:, None] * b_rinv[None, :]  # [BN, BM]: the transposed tile
        b_logit = _logits(b_s, o_m[None, :], o_n[:, None], N, period, offset, b_scale, alpha, MASK_OWN, PEN_MODE)
        b_w = b_g / b_gmax * _fold(b_rinv, r.dtype.element_ty)  # |g / max|g|| <= 1: w * P stays in fp16 range
        b_p = tl.exp((b_logit - b_lse[None, :]) - b_lse_lo[None, :])  # [BN, BM]
        if TRANSPOSED:
            b_p += _transposed_p(
                b_s, b_scale, lse_t, lse_t_lo, o_n[:, None] - offset, n_t, m_m[None, :], b_logit, MASK_OWN
            )
        if FOLD_POS:
            b_pv = tl.load(pos_val + o_m, mask=m_m, other=float("inf"))
            b_p = _fold_positive(b_p, o_n[:, None] == o_m[None, :] + offset, b_pv[None, :])
        b_a = b_p * b_w[None, :]
        b_unscale = b_scale * b_gmax
        if r.dtype.element_ty == tl.float16:  # per candidate, as sim_lse_bwd_dr_kernel per row
            if SINGLE_D:
                b_run, b_hs, b_dc = _half_rescale(b_a, b_run, b_hs, b_dc)
            else:
                b_hs = _half_scale(tl.max(tl.abs(b_a), axis=1))
                b_unscale = ((b_scale * b_gmax) / b_hs)[:, None]
            b_a = b_a * b_hs[:, None]
        b_a = b_a.to(r.dtype.element_ty)
        if SINGLE_D:
            b_dc = tl.dot(b_a, b_r, b_dc, input_precision=DOT_PRECISION)  # [BN, BD]
        else:
            for start_d in range(0, D, BLOCK_D):
                b_r = _load_rows(r, start_m, M, start_d, D, stride_r, BLOCK_M, BLOCK_D, EVEN_D)
                b_part = tl.dot(b_a, b_r, input_precision=DOT_PRECISION) * b_unscale  # [BN, BD]
                _add_rows(
                    dc, b_part, (start_m > 0) | ACCUMULATE, start_n - first, N - first, start_d, D, BLOCK_N, BLOCK_D
                )
    if SINGLE_D:
        if r.dtype.element_ty == tl.float16:
            b_dc = b_dc / b_hs[:, None]
        _write_rows(dc, b_dc * (b_scale * b_gmax), ACCUMULATE, start_n - first, N - first, D, BLOCK_N, BLOCK_D)


# ---------------------------------------------------------------------------------------------------------------
# host


@triton.jit
def one_direction_terms_kernel(nlse, nlse_lo, sims, scale, pos_val, loss, B, JOINT: tl.constexpr, BLOCK: tl.constexpr):
    """One program over all B rows, in order: pos_val and the mean of the row losses softplus(x), x = NLSE - scale s
    (NLSE in two parts: (hi - scale s) + lo)."""
    b_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, B, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < B
        b_x = tl.load(nlse + o, mask=m, other=0.0) - tl.load(scale) * tl.load(sims + o, mask=m, other=0.0)
        b_x += tl.load(nlse_lo + o, mask=m, other=0.0)
        tl.store(pos_val + o, _positive_coefficient(b_x, JOINT), mask=m)
        b_sum += tl.where(m, _softplus(b_x), 0.0)
    tl.store(loss, tl.sum(b_sum, axis=0) / B)


@triton.jit
def _logsumexp_directions(lse, nlse, B, o, m, N_DIR: tl.constexpr, FROM_NLSE: tl.constexpr):
    """fastloss.ops.two_part.logsumexp2 over the directions of rows o: the two parts (hi, lo) of log sum_k exp(v_k),
    v_k direction k's two-part LSE from nlse where bit k of FROM_NLSE is set, else from lse (each [2, N_DIR, B])."""
    b_top = tl.full(o.shape, float("-inf"), tl.float32)
    for k in tl.static_range(N_DIR):
        src = nlse if (FROM_NLSE >> k) & 1 else lse
        b_top = tl.maximum(b_top, tl.load(src + k * B + o, mask=m, other=0.0))
    b_ref = tl.where(b_top == float("-inf"), 0.0, b_top)  # exp(-inf - 0) = 0 where every value is -inf
    b_total = tl.zeros(o.shape, tl.float32)
    for k in tl.static_range(N_DIR):
        src = nlse if (FROM_NLSE >> k) & 1 else lse
        b_hi = tl.load(src + k * B + o, mask=m, other=0.0)
        b_total += tl.exp((b_hi - b_ref) + tl.load(src + (N_DIR + k) * B + o, mask=m, other=0.0))
    return _log_sum_parts(b_top, b_total)


@triton.jit
def directions_terms_kernel(
    lse, nlse, positive, pos_val, log_z, loss, B, share, log_k,
    N_DIR: tl.constexpr, HOLDS: tl.constexpr, DERIVE: tl.constexpr, JOINT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program over all B rows, in order: fastloss.ops.mnrl.positive_terms and the forward's log_z for N_DIR
    directions (HOLDS: the bits of those that hold the positive; share = 1 / k, log_k = log k of the k of them). The
    directions of DERIVE's bits (holders) get their LSE here, written into lse before it is read: the two-part
    logsumexp of their NLSE and the positive (fastloss.ops.two_part.logsumexp2 over the two, the positive exact)."""
    b_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, B, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < B
        b_pos = tl.load(positive + o, mask=m, other=0.0)
        if DERIVE:
            for k in tl.static_range(N_DIR):
                if (DERIVE >> k) & 1:
                    b_nh = tl.load(nlse + k * B + o, mask=m, other=0.0)
                    b_top = tl.maximum(b_nh, b_pos)  # finite: the positive's logit is
                    b_total = tl.exp((b_nh - b_top) + tl.load(nlse + (N_DIR + k) * B + o, mask=m, other=0.0))
                    b_hi, b_lo = _log_sum_parts(b_top, b_total + tl.exp(b_pos - b_top))
                    tl.store(lse + k * B + o, b_hi, mask=m)
                    tl.store(lse + (N_DIR + k) * B + o, b_lo, mask=m)
            tl.debug_barrier()  # the loads below read those rows back, in whichever threads
        if JOINT:  # the copies' log-odds x, from the mass without one copy; each holder's weight in the joint LSE
            b_xh, b_xl = _logsumexp_directions(lse, nlse, B, o, m, N_DIR, HOLDS)
            b_x = (b_xh - b_pos) + b_xl
            b_zh, b_zl = _logsumexp_directions(lse, nlse, B, o, m, N_DIR, 0)
            b_folded = _positive_coefficient(b_x - log_k, False) * share
            b_folded = tl.where(b_x <= log_k, b_folded, float("inf"))
            for k in tl.static_range(N_DIR):
                b_val = tl.full((BLOCK,), float("inf"), tl.float32)
                if (HOLDS >> k) & 1:
                    b_lh = tl.load(lse + k * B + o, mask=m, other=0.0)
                    b_ll = tl.load(lse + (N_DIR + k) * B + o, mask=m, other=0.0)
                    b_val = b_folded / tl.exp((b_lh - b_zh) + (b_ll - b_zl))
                tl.store(pos_val + k * B + o, b_val, mask=m)
            b_row = log_k + _softplus(b_x - log_k)
        else:  # each direction its own softmax, holding the positive with weight 1 / N_DIR; log_z: the mean LSE
            b_row = tl.zeros((BLOCK,), dtype=tl.float32)
            b_zh = tl.zeros((BLOCK,), dtype=tl.float32)
            b_zl = tl.zeros((BLOCK,), dtype=tl.float32)
            for k in tl.static_range(N_DIR):
                b_x = (tl.load(nlse + k * B + o, mask=m, other=0.0) - b_pos) + tl.load(
                    nlse + (N_DIR + k) * B + o, mask=m, other=0.0
                )
                tl.store(pos_val + k * B + o, _positive_coefficient(b_x, False), mask=m)
                b_row += _softplus(b_x)
                b_zh += tl.load(lse + k * B + o, mask=m, other=0.0)
                b_zl += tl.load(lse + (N_DIR + k) * B + o, mask=m, other=0.0)
            b_row = b_row / N_DIR
            b_zh = b_zh / N_DIR
            b_zl = b_zl / N_DIR
        tl.store(log_z + o, b_zh, mask=m)
        tl.store(log_z + B + o, b_zl, mask=m)
        b_sum += tl.where(m, b_row, 0.0)
    tl.store(loss, tl.sum(b_sum, axis=0) / B)


@triton.jit
def _share(lse, log_z, B, o, m, k, N_DIR: tl.constexpr):
    """Direction k's share of rows o's joint partition, exp(LSE - log_z) from both parts; 0 where both are -inf."""
    b_e = (tl.load(lse + k * B + o, mask=m, other=0.0) - tl.load(log_z + o, mask=m, other=0.0)) + (
        tl.load(lse + (N_DIR + k) * B + o, mask=m, other=0.0) - tl.load(log_z + B + o, mask=m, other=0.0)
    )
    return tl.where(b_e == b_e, tl.exp(b_e), 0.0)


@triton.jit
def backward_weights_kernel(
    grad, scale, lse, log_z, pos_val, sims, weights, h_rows, pair_pv, coef, separate_dot, B,
    N_DIR: tl.constexpr, BACK: tl.constexpr, JOINT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program over all B rows, in order: the flash backward's weights for N_DIR directions (backward_weights)."""
    b_h = tl.div_rn(tl.load(grad), tl.zeros((), tl.float32) + B)  # h = grad / B, as torch divides
    b_scale = tl.load(scale)
    b_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, B, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < B
        tl.store(h_rows + o, tl.zeros((BLOCK,), tl.float32) + b_h, mask=m)
        for k in tl.static_range(N_DIR):
            if N_DIR == 1:  # query_to_doc alone: its share of the joint partition is exactly 1
                b_w = tl.zeros((BLOCK,), tl.float32) + b_h
            elif JOINT:
                b_w = b_h * _share(lse, log_z, B, o, m, k, N_DIR)
            else:
                b_w = tl.zeros((BLOCK,), tl.float32) + tl.div_rn(b_h, tl.zeros((), tl.float32) + N_DIR)
            tl.store(weights + k * B + o, b_w, mask=m)
        b_pv = tl.load(pos_val + o, mask=m, other=0.0)
        if BACK > 0:  # query_to_doc's launch that takes doc_to_query: the positive entry's coefficient of both
            b_back = tl.load(pos_val + BACK * B + o, mask=m, other=0.0)
            if JOINT:  # each pos_val times its direction's share; both fold or neither (x is the row's)
                b_share = _share(lse, log_z, B, o, m, 0, N_DIR)
                b_both = b_pv * b_share + b_back * _share(lse, log_z, B, o, m, BACK, N_DIR)
                tl.store(pair_pv + o, tl.where(b_pv == float("inf"), b_pv, b_both), mask=m)
            else:
                tl.store(pair_pv + o, b_pv + b_back, mask=m)
        if JOINT:  # rows where the positive's -1 stays separate (pos_val +inf): its coefficient and dL/dscale part
            b_separate = b_pv == float("inf")
            tl.store(coef + o, tl.where(b_separate, -b_h * b_scale, 0.0), mask=m)
            b_acc += tl.where(b_separate & m, tl.load(sims + o, mask=m, other=0.0), 0.0)
    if JOINT:
        tl.store(separate_dot, b_h * tl.sum(b_acc, axis=0))


def _operands(r: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    if r.ndim != 2 or c.ndim != 2 or r.shape[1] != c.shape[1]:
        raise ValueError(f"sim_lse: r [M, D] and c [N, D] must share D, got {tuple(r.shape)} and {tuple(c.shape)}")
    if r.dtype != c.dtype or r.device != c.device:
        raise ValueError(
            f"sim_lse: r and c must share dtype and device, got {r.dtype}/{r.device}, {c.dtype}/{c.device}"
        )
    if r.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"sim_lse: r and c must be float16, bfloat16, float32 or float64, got {r.dtype}")
    if r.shape[1] >= 2**23:
        raise ValueError(f"sim_lse: D must be < 2**23 (in-tile offsets are int32), got {r.shape[1]}")
    if r.dtype == torch.float64 or (r.dtype == torch.bfloat16 and _interpret()):
        r, c = r.float(), c.float()
    # the kernels take a row stride only: rows may be strided (a slice), elements within a row contiguous
    return (r if r.stride(1) == 1 else r.contiguous()), (c if c.stride(1) == 1 else c.contiguous())


def _two_part(x: Tensor, n: int, name: str) -> tuple[Tensor, Tensor]:
    """The parts (hi, lo) of a two-part LSE ``x`` fp32 [2, n] (fastloss.ops.two_part), each contiguous."""
    if x.shape != (2, n) or x.dtype != torch.float32:
        raise ValueError(f"sim_lse: {name} must be fp32 [2, {n}] (two parts), got {x.dtype} {tuple(x.shape)}")
    return _vector(x[0], n, name), _vector(x[1], n, name)


def _vector(x: Tensor, n: int, name: str) -> Tensor:
    if x.shape != (n,):
        raise ValueError(f"sim_lse: {name} must have shape [{n}], got {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()


def _scale(scale: Tensor | float, device: torch.device) -> Tensor:
    """A 0-d fp32 tensor on ``device`` (conversion without a host sync)."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"sim_lse: scale must hold one value, got shape {tuple(scale.shape)}")
        return scale.detach().to(device=device, dtype=torch.float32).reshape(()).contiguous()
    return torch.full((), float(scale), device=device, dtype=torch.float32)


def _options(period: int, base: int, pen_mode: int, alpha: float, dtype: torch.dtype) -> tuple[int, str]:
    if period < 1:
        raise ValueError(f"sim_lse: period must be >= 1, got {period}")
    if base < 0:
        raise ValueError(f"sim_lse: base must be >= 0, got {base}")
    if pen_mode not in (0, 1, 2, 3):
        raise ValueError(f"sim_lse: pen_mode must be 0, 1, 2 or 3, got {pen_mode}")
    if alpha < 0.0:
        raise ValueError(f"sim_lse: alpha must be >= 0, got {alpha}")
    return (pen_mode if alpha > 0.0 else 0), _backend.dot_precision(dtype)


def _on_device(x: Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def sim_lse_fwd(
    r: Tensor,
    c: Tensor,
    r_inv: Tensor,
    c_inv: Tensor,
    scale: Tensor | float,
    *,
    period: int,
    offset: int,
    mask_own: bool,
    pen_mode: int,
    alpha: float,
    positive_col: bool = False,
    base: int = 0,
    nlse_t: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(lse, nlse): lse_i = logsumexp_j logit_ij (fp32 [2, M], two parts: fastloss.ops.two_part; (-inf, 0) for a
    fully masked row) and with ``positive_col`` the same without column i + offset (else None). ``c`` may be a block
    of the candidates whose first row is candidate ``base``: the masks, the penalty and the positive column take the
    global index j + base, and blocks' LSEs combine by two_part.logsumexp2. See the module docstring.
    ``nlse_t`` (fp32 [2, n_t], written): the transposed direction's NLSE from the same tiles, for its rows the
    candidates offset .. offset + n_t - 1 of this block (doc_to_query's local positives beside query_to_doc):
    logsumexp over these rows i != t of scale * s_i,offset+t, unpenalised ((-inf, 0) with no such row). It takes
    2 n_t fp32 values per transposed_rows() rows of r: transposed_bytes()."""
    r, c = _operands(r, c)
    (M, D), N = r.shape, c.shape[0]
    r_inv, c_inv = _vector(r_inv, M, "r_inv"), _vector(c_inv, N, "c_inv")
    pen_mode, precision = _options(period, base, pen_mode, alpha, r.dtype)
    n_t = _transposed_rows_of(nlse_t, offset, base, N, "nlse_t")
    if nlse_t is not None and (nlse_t.dtype != torch.float32 or nlse_t.device != r.device):
        raise ValueError(f"sim_lse: nlse_t must be fp32 on {r.device}, got {nlse_t.dtype} on {nlse_t.device}")
    lse = torch.empty((2, M), device=r.device, dtype=torch.float32)
    nlse = torch.empty((2, M), device=r.device, dtype=torch.float32) if positive_col else None
    if M == 0 or N == 0:
        for x in (lse, nlse, nlse_t):
            if x is not None:
                x[0].fill_(float("-inf"))
                x[1].zero_()
        return lse, nlse
    part_m = transposed_rows() if n_t else 1  # PART_M is unused without TRANSPOSED
    parts = torch.empty((2, triton.cdiv(M, part_m) if n_t else 1, max(1, n_t)), device=r.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    with _on_device(r):
        sim_lse_fwd_kernel[grid](
            r,
            c,
            r_inv,
            c_inv,
            _scale(scale, r.device),
            *lse,
            *(lse if nlse is None else nlse),
            *parts,
            M,
            N,
            D,
            period,
            offset,
            base,
            float(alpha),
            r.stride(0),
            c.stride(0),
            n_t,
            parts.shape[1],
            tune_bucket(M),
            tune_bucket(N),
            MASK_OWN=bool(mask_own),
            PEN_MODE=pen_mode,
            POS_COL=nlse is not None,
            TRANSPOSED=n_t > 0,
            PART_M=part_m,
            DOT_PRECISION=precision,
        )
    if n_t:
        nlse_t.copy_(logsumexp2(parts, dim=1, overwrite=True))
    return lse, nlse


def transposed_rows() -> int:
    """Rows of r per row of the forward's partial transposed statistics: the narrowest BLOCK_M it may run with (of
    the kernel's configs; of the config list where a stand-in replaces the kernel, as the memory projection does)."""
    configs = getattr(sim_lse_fwd_kernel, "configs", None) or _configs("fwd")
    return min(cfg.kwargs["BLOCK_M"] for cfg in configs)


def transposed_bytes(m: int, n_t: int) -> int:
    """Bytes of the partial statistics sim_lse_fwd holds for ``nlse_t`` [2, n_t] over ``m`` rows of r."""
    return 8 * triton.cdiv(m, transposed_rows()) * n_t


def _transposed_rows_of(x: Tensor | None, offset: int, base: int, n: int, name: str) -> int:
    """n_t of the transposed rows ``x`` [n_t] (0 for None): candidates offset .. offset + n_t - 1, which must lie in
    this block of candidates [base, base + n)."""
    if x is None:
        return 0
    n_t = x.shape[1] if x.ndim == 2 and x.shape[0] == 2 else -1
    if not (n_t >= 0 and base <= offset and offset + n_t <= base + n):
        raise ValueError(
            f"sim_lse: {name} must be [2, n_t] for the transposed rows, candidates offset .. offset + n_t - 1 of this "
            f"block [{base}, {base + n}) (offset {offset}), got {tuple(x.shape)}"
        )
    return n_t


class SimLseBackward:
    """The backward for dL/dlse = ``g`` as launches over windows, its operands checked and converted once:
    ``rows(out, first, last, ...)`` computes dr_hat of rows first .. last - 1 and ``candidates(out, first, last, ...)``
    dc_hat of those candidates, each into (or with ``accumulate`` added to) an fp32 ``out`` whose row 0 is ``first``,
    so that a caller can hold a window of the fp32 gradients at a time. ``pos_val`` [M] replaces P at each row's
    column i + offset (+inf: that row keeps P). ``c`` may be a block of the candidates, from candidate ``base`` on
    (sim_lse_fwd): rows() of every block add up to the rows' dr_hat. ``lse`` [2, M] and ``lse_t`` [2, n_t] hold two
    parts (fastloss.ops.two_part), P = exp((logit - hi) - lo). ``lse_t``: P also takes the softmax of
    the transposed direction, whose rows are the candidates offset .. offset + n_t - 1 against these rows as its
    candidates (doc_to_query beside query_to_doc), with logits scale * s, that LSE and the same g (a constant: the
    caller's per-direction weights); the two directions' gradients then come from one pair of launches, and pos_val
    holds both positives' coefficients (the transposed one's positive is the same entry). With ``mask_own`` the
    transposed entries are masked where the direct ones are: a Gram block, c the rows r themselves (query_to_query
    against its own rows, offset = base): rows() alone then gives the rows' whole gradient from the block (what
    candidates() would add is the transposed term) and their dscale counts every entry twice."""

    def __init__(
        self,
        r: Tensor,
        c: Tensor,
        r_inv: Tensor,
        c_inv: Tensor,
        scale: Tensor | float,
        lse: Tensor,
        g: Tensor,
        *,
        period: int,
        offset: int,
        mask_own: bool,
        pen_mode: int,
        alpha: float,
        pos_val: Tensor | None = None,
        base: int = 0,
        lse_t: Tensor | None = None,
    ):
        self.r, self.c = _operands(r, c)
        (self.M, self.D), self.N = self.r.shape, self.c.shape[0]
        self.r_inv, self.c_inv = _vector(r_inv, self.M, "r_inv"), _vector(c_inv, self.N, "c_inv")
        self.lse, self.g = _two_part(lse, self.M, "lse"), _vector(g, self.M, "g")
        self.pos_val = self.g if pos_val is None else _vector(pos_val, self.M, "pos_val")
        self.n_t = _transposed_rows_of(lse_t, offset, base, self.N, "lse_t")
        self.lse_t = self.lse if lse_t is None else _two_part(lse_t, self.n_t, "lse_t")
        pen_mode, precision = _options(period, base, pen_mode, alpha, self.r.dtype)
        self.scale = _scale(scale, self.r.device)
        self.g_max = None
        # the kernels' leading arguments, shared by both
        self.operands = (self.r, self.c, self.r_inv, self.c_inv, self.scale, *self.lse, self.g)
        self.sizes = (period, offset, base, float(alpha), self.r.stride(0), self.c.stride(0))
        self.flags = {
            "MASK_OWN": bool(mask_own),
            "PEN_MODE": pen_mode,
            "FOLD_POS": pos_val is not None,
            "TRANSPOSED": lse_t is not None,
            "DOT_PRECISION": precision,
        }

    def _window(self, out: Tensor, first: int, last: int, total: int, name: str) -> None:
        if not 0 <= first <= last <= total:
            raise ValueError(f"sim_lse: {name} window [{first}, {last}) must lie in [0, {total}]")
        if out.dtype != torch.float32 or out.ndim != 2 or out.shape[0] < last - first or out.shape[1] != self.D:
            raise ValueError(
                f"sim_lse: the output must be fp32 [>= {last - first}, {self.D}], got {out.dtype} {tuple(out.shape)}"
            )
        if not out.is_contiguous():
            raise ValueError("sim_lse: the output must be contiguous")

    def rows(self, out: Tensor, first: int, last: int, *, accumulate: bool, dscale: Tensor | None = None) -> None:
        """dr_hat of rows first .. last - 1 into out[0 : last - first] (added to it with ``accumulate``); their
        dscale into dscale[first : last] when given (fp32 [M])."""
        self._window(out, first, last, self.M, "row")
        if last == first:
            return
        if self.N == 0:
            if not accumulate:
                out[: last - first].zero_()
            if dscale is not None:
                dscale[first:last] = 0.0
            return
        with _on_device(self.r):
            sim_lse_bwd_dr_kernel[lambda meta: (triton.cdiv(last - first, meta["BLOCK_M"]),)](
                *self.operands,
                self.pos_val,
                *self.lse_t,
                out,
                out if dscale is None else dscale,
                first,
                self.n_t,
                last,
                self.N,
                self.D,
                *self.sizes,
                tune_bucket(last - first),
                tune_bucket(self.N),
                NEED_DSCALE=dscale is not None,
                ACCUMULATE=bool(accumulate),
                **self.flags,
            )

    def candidates(self, out: Tensor, first: int, last: int, *, accumulate: bool) -> None:
        """dc_hat of candidates first .. last - 1 into out[0 : last - first] (added to it with ``accumulate``)."""
        self._window(out, first, last, self.N, "candidate")
        if last == first:
            return
        if self.M == 0:
            if not accumulate:
                out[: last - first].zero_()
            return
        if self.g_max is None:
            self.g_max = self.g.abs().amax()
        with _on_device(self.r):
            sim_lse_bwd_dc_kernel[lambda meta: (triton.cdiv(last - first, meta["BLOCK_N"]),)](
                *self.operands,
                self.g_max,
                self.pos_val,
                *self.lse_t,
                out,
                first,
                self.n_t,
                self.M,
                last,
                self.D,
                *self.sizes,
                tune_bucket(self.M),
                tune_bucket(last - first),
                ACCUMULATE=bool(accumulate),
                **self.flags,
            )


def sim_lse_bwd(
    r: Tensor,
    c: Tensor,
    r_inv: Tensor,
    c_inv: Tensor,
    scale: Tensor | float,
    lse: Tensor,
    g: Tensor,
    *,
    need_dscale: bool,
    **options,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dr_hat fp32 [M, D], dc_hat fp32 [N, D], dscale fp32 [M] or None) for dL/dlse = ``g``, whole: SimLseBackward's
    two launches over every row and candidate (``options``: its keywords, period ... pos_val)."""
    bwd = SimLseBackward(r, c, r_inv, c_inv, scale, lse, g, **options)
    dr = torch.empty((bwd.M, bwd.D), device=bwd.r.device, dtype=torch.float32)
    dc = torch.empty((bwd.N, bwd.D), device=bwd.r.device, dtype=torch.float32)
    dscale = torch.empty(bwd.M, device=bwd.r.device, dtype=torch.float32) if need_dscale else None
    bwd.rows(dr, 0, bwd.M, accumulate=False, dscale=dscale)
    bwd.candidates(dc, 0, bwd.N, accumulate=False)
    return dr, dc, dscale


def directions_terms(
    lse: Tensor, nlse: Tensor, positive: Tensor, shares: Sequence[float], joint: bool, derive: Sequence[int] = ()
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss fp32 [], log_z fp32 [2, B], pos_val fp32 [n_dir, B]) of MNRL with several directions from their LSE and
    NLSE fp32 [2, n_dir, B] (two parts) and the positive logits [B]: fastloss.ops.mnrl.positive_terms' values (the
    mean of its row losses) and the forward's log-partition (joint: the LSE over the directions; per direction: their
    mean), in one launch instead of ~66 torch ops. ``shares``: each direction's share of the positive's -1
    (mnrl.positive_shares: 1 / k for the k that hold it, 0 for the others). ``derive``: indices of holders whose LSE
    the launch forms from their NLSE and the positive (logsumexp2 of the two, ~17 torch ops each otherwise) and writes
    into ``lse`` in place, their old entries unread (the flash forward derives every holder: its LSE then cannot
    round below the positive, whose share of the joint LSE would underflow; doc_to_query's NLSE comes from
    query_to_doc's tiles)."""
    n_dir, b = lse.shape[1], lse.shape[2]
    for name, x in (("lse", lse), ("nlse", nlse)):
        if x.shape != (2, n_dir, b) or x.dtype != torch.float32:
            want = f"fp32 [2, {n_dir}, {b}] (two parts)"
            raise ValueError(f"sim_lse: {name} must be {want}, got {x.dtype} {tuple(x.shape)}")
    if len(shares) != n_dir or not any(shares):
        raise ValueError(f"sim_lse: shares must give each of the {n_dir} directions its share, some > 0, got {shares}")
    if any(not 0 <= k < n_dir or not shares[k] for k in derive):
        raise ValueError(f"sim_lse: derive must list directions that hold the positive (shares > 0), got {derive}")
    share = max(shares)
    holds = sum(1 << k for k, s in enumerate(shares) if s)
    lse_c = lse.contiguous()  # the derived directions' LSE are written here, then into lse if that is another tensor
    # separate tensors: a torch.library op's outputs may not share a storage
    pos_val = torch.empty((n_dir, b), device=lse.device, dtype=torch.float32)
    log_z = torch.empty((2, b), device=lse.device, dtype=torch.float32)
    loss = torch.empty((), device=lse.device, dtype=torch.float32)
    with _on_device(lse):
        directions_terms_kernel[(1,)](
            lse_c,
            nlse.contiguous(),
            _vector(positive, b, "positive"),
            pos_val,
            log_z,
            loss,
            b,
            share,
            -math.log(share),
            N_DIR=n_dir,
            HOLDS=holds,
            DERIVE=sum(1 << k for k in set(derive)),
            JOINT=bool(joint),
            BLOCK=512,
        )
    if derive and lse_c is not lse:
        lse.copy_(lse_c)
    return loss, log_z, pos_val


def backward_weights(
    grad: Tensor, scale: Tensor, lse: Tensor, log_z: Tensor, pos_val: Tensor, sims: Tensor, joint: bool, back: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The flash MNRL backward's per-row weights in one launch instead of ~20 torch ops, from the incoming 0-d
    ``grad`` and the forward's LSE fp32 [2, n_dir, B], log_z [2, B] (two parts), pos_val [n_dir, B] and positive
    similarities ``sims`` [B]: (weights fp32 [n_dir, B], each direction's dL/dLSE: with h = grad / B, joint h times the
    direction's share of the joint partition exp(LSE - log_z), 0 where both are -inf, per direction h / n_dir, and h
    for query_to_doc alone; h fp32 [B], the weight of a launch whose rows take the joint softmax of their row; the
    positive entry's coefficient in query_to_doc's launch that takes doc_to_query too, direction ``back`` (> 0; 0:
    no such launch, None): joint each direction's pos_val times its share, +inf where query_to_doc's is (the -1
    separate), per direction their sum; joint, else None: the separate -1's coefficient -h scale on those rows (0
    elsewhere) fp32 [B] and its dL/dscale part h * sum of their ``sims``, fp32 [], which the caller subtracts)."""
    n_dir, b = pos_val.shape
    if lse.shape != (2, n_dir, b) or log_z.shape != (2, b) or lse.dtype != torch.float32 or log_z.dtype != lse.dtype:
        raise ValueError(
            f"sim_lse: lse and log_z must be fp32 [2, {n_dir}, {b}] and [2, {b}] (pos_val's n_dir, B), got "
            f"{lse.dtype} {tuple(lse.shape)} and {log_z.dtype} {tuple(log_z.shape)}"
        )
    if not 0 <= back < n_dir:
        raise ValueError(f"sim_lse: back must be doc_to_query's index among the {n_dir} directions or 0, got {back}")
    new = functools.partial(torch.empty, device=lse.device, dtype=torch.float32)
    weights, h_rows, pair_pv, coef, separate_dot = new((n_dir, b)), new(b), new(b), new(b), new(())
    with _on_device(lse):
        backward_weights_kernel[(1,)](
            _scale(grad, lse.device),
            _scale(scale, lse.device),
            lse.contiguous(),
            log_z.contiguous(),
            pos_val.to(torch.float32).contiguous(),
            _vector(sims, b, "sims"),
            weights,
            h_rows,
            pair_pv,
            coef,
            separate_dot,
            b,
            N_DIR=n_dir,
            BACK=back,
            JOINT=bool(joint),
            BLOCK=512,
        )
    if not joint:
        coef = separate_dot = None
    return weights, h_rows, pair_pv if back else None, coef, separate_dot


def one_direction_terms(nlse: Tensor, sims: Tensor, scale: Tensor, joint: bool) -> tuple[Tensor, Tensor]:
    """(loss fp32 [], pos_val fp32 [1, B]) of MNRL's query_to_doc alone from the forward's NLSE [2, B] (fp32, two
    parts) and the positive pairs' similarities ``sims`` [B]: x = NLSE - scale s, pos_val = -sigmoid(x) (joint: +inf
    where x > 0) and the loss mean softplus(x), in one launch instead of about fourteen torch ops
    (fastloss.ops.mnrl.positive_terms)."""
    b = nlse.shape[1]
    # separate tensors: a torch.library op's outputs may not share a storage
    pos_val = torch.empty((1, b), device=nlse.device, dtype=torch.float32)
    loss = torch.empty((), device=nlse.device, dtype=torch.float32)
    with _on_device(nlse):
        one_direction_terms_kernel[(1,)](
            *_two_part(nlse, b, "nlse"),
            sims,
            _scale(scale, nlse.device),
            pos_val,
            loss,
            b,
            JOINT=bool(joint),
            BLOCK=1024,
        )
    return loss, pos_val
