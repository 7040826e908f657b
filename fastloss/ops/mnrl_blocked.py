"""The row-block MNRL op: the gradient computed inside the forward, no recompute (DESIGN.md's second design), on any
device. On CUDA its products are cuBLAS GEMMs and its row passes over a block of logits two Triton kernels
(fastloss.ops.block_softmax): the default there for one-direction MNRL, which an H200 ran faster than the flash
kernels in bf16 (fastloss.functional.mnrl.prefers_row_blocks: fp32 too, by count); elsewhere all of it is torch ops, the
memory-bounded fallback where fastloss._C is not built (the native op is the same algorithm in C++).

For a block of m local rows and each selected direction (rows R, candidates C, as in fastloss.ops.mnrl):
    S = R_blk C^T                                     one GEMM, fp32 results (cuBLAS out_dtype for fp16/bf16)
    t = r_inv S c_inv; logit = factor * t (+ the hardness penalty, or -inf where masked)
    top = rowmax logit, sum E with E = exp(logit - top); LSE = top + log sum E
Once every direction's LSE of the block is known, softmax_k = c_k E_k (c_k = exp(top_k - log_z) in the joint
partition, 1 / (n_dir sum E_k) per direction), and with G = E c_inv and h = 1 / B:
    inv_r * dL/dr_hat += scale h c_k r_inv  (G C)                 one GEMM, [m, D]
    inv_c * dL/dc_hat += scale h  G^T (c_k r_inv R_blk)           one GEMM, [N, D]
    dL/dscale         += h c_k r_inv <r_i, (G C)_i>               from the first product: no pass over the logits
(query_to_doc alone with the Triton row passes: dL/dscale += h sum_j p_j (t_j - t_own), summed in fp32 by the
statistics' pass, where G C in a half dtype carried G's rounding: block_softmax.row_stats), so three GEMM-equivalents
in all, against five for the flash path (which recomputes S twice in its backward).
The positive enters as in the flash op (fastloss.ops.mnrl.positive_terms, which takes each direction's max and
log(sum E) as the two parts of its LSE, fastloss.ops.two_part, so that no rounded max + log(sum) enters it): the row
passes also sum E without the positive's column (in query_to_doc and doc_to_query), so the row loss is softplus of
log(negatives' mass / positive's) and the positive's coefficient p - share is -sigmoid of it, both without
cancellation; that coefficient is written into the positive's entry of G before the GEMMs (where the positive holds
at least half the row's mass, and G's dtype holds the value); elsewhere (p - 1 <= -1/2: nothing cancels) the -1
stays a separate rank-1 term.
Products that two directions share (doc_to_query's rows are query_to_doc's positives transposed; query_to_query's
and doc_to_doc's blocks of the local rows' own vectors are symmetric: partners()) take one entry of the gradient
GEMMs for both softmax entries: the block of rows [i0, i1) adds the partner's entries of the earlier rows (from
their saved max - log c, computed from the raw products before the row pass) at columns offset + j < offset + i0,
keeps its own rows' columns as they are and leaves the later rows' columns to their blocks, so the backward covers
about half of each B x B block (GTE's pairs: 8 GEMM-equivalents instead of 12; the symmetric loss's 4 instead of 6);
dL/dscale, which sums G C against the rows, sums each product once with both entries. Not in fp16, whose G need not
hold a partner's entry divided by a small softmax factor, nor where the logits may exceed MERGE_LOGIT_BOUND
(logit_bound: cosine similarity at |scale| + |alpha| > 1024, dot similarity at norms of ~7 and more at scale 20),
where the two GEMMs' rounding of a shared product, a few ulps of the logit, would go into the partner's entry
(beyond: 3 GEMM-equivalents per direction, each entry from its own row's product).
The row passes in torch ops turn S into E and then G in place (about nine passes over the block); the Triton ones
read S for the statistics (and the positive's logit) and once more to write G (in place for fp32; the positive's
coefficient folded into its entry there too). The gradients are accumulated as inv * dL/dx_hat (as the native op
does), which makes the normalisation backward dx = a - x_hat <x_hat, a>. The hardness penalty is a stop-gradient
term, as in the other paths.

Launches: on CUDA every torch op of a block is a kernel launch, ~10-25 us of host time each, and at the GPU target a 256
MiB block (~700 rows) holds ~0.5 ms of GEMMs, so a block's launches bound its time unless they are few. With
query_to_doc alone (the CUDA default) and two doc columns a block takes 12 launches: a GEMM per column for the logits,
the statistics' row pass (which also writes the block's terms: _block_terms, and dL/dscale's), the gradient's row pass
(which also writes the weight of the positive's separate term), a GEMM per column for the query rows' product (summed),
the query rows finished (scaled, then normalised with the positive's term added in the same Triton launch: two), the
weighted rows (one, exact: the query rows times powers of two) and the candidates' GEMM and accumulation; fp16 21 (its
weights rescaled for its range, the query rows' product divided by G_r's row scales); 14 until stop 45 (dL/dscale's row
dots two more), 9 with one column (11 until stop 45; 15 and 12 until 2026-12-02, the positive's term a launch of its
own; 29 before 2026-11-30 with the columns concatenated, the terms in ~11 torch ops; 89 before 3ac9dc9). The H200 ran
256 MiB blocks 2.5x slower than 1024 MiB ones at the target (100.6 against 39.8 ms): 49 blocks of 89 launches at ~20 us
is about that time, the likely cause, not measured on a GPU since. A whole call of one block at B = 8192: 23 launches
(27 until stop 45, 33 until 2026-12-02, when the inverse norms became a Triton launch per tensor,
fastloss.ops.l2norm.inverse_norms, and the positive's term joined the normalisation backward's, in q's rows and the
positives'; 66 before, 188 before 3ac9dc9). tests/test_mnrl_blocked.py counts them on fake CUDA tensors. Several
directions keep the general path (~100-170 launches a block); on CUDA they run in the flash kernels unless
FASTLOSS_MNRL_ALGO=blocked.

Half dtypes on CUDA: G and the weighted rows are rounded to the input dtype for the tensor-core GEMMs, the weights
of the rows divided by their maximum so that they stay in fp16's range (in fp16, and with several directions, whose
joint softmax factors can be tiny; one direction's are at least 1 / N), and the folded inverse norm capped at 65504
in fp16 (only the terms of vectors of norm < 1.5e-5 are affected, in every gradient row they enter; zero vectors,
whose term is 0, are exact), as in the flash kernels. In fp16 the query rows' product takes G_r, G with each row
times a power of two rs_i that takes its largest entry into [2^14, 2^15) (block_softmax.row_grad writes both; torch
ops: _row_scales), and divides its result by rs (exact): unscaled, a row whose entries all lay below fp16's subnormals
(a confident small query: the positive's folded p - 1 and every other E c_inv ~1e-9) lost its 1 / |q|-amplified
gradient (tests/test_mnrl_blocked.py::test_fp16_small_rows_keep_their_gradient: 99% off before). The candidates'
product keeps G unscaled: a row's scale would go into its weight there, and rows whose scales differ by 2^20 (a zero
doc's capped inverse norm in some rows' max) left the others' weighted rows below fp16's range. Costs of the copy: a
second fp16 [m, N] in the block (fewer rows per block) and its write (not measured on a GPU). With query_to_doc alone
the candidates' GEMM takes the query rows times powers of two (exact in the half dtype) and each row weight's mantissa
in G's row (row_stats writes it with the block's terms, row_grad multiplies): the weighted rows rounded as q_i w_i moved
each row's direction by the dtype's rounding, which the normalisation's projection keeps whole where a positive nearly
coincides with its query (the positives' gradient 2x the queries' error before, 1x now:
test_half_gemms_keep_the_weighted_rows_directions). Elsewhere the products run in the accumulation dtype (fp32; fp64
for fp64 inputs, for gradcheck).

Memory beyond the inputs and outputs (the doc columns are taken as they come, uncopied: _Stacked): the fp32 gradient
accumulator of the docs ([kW, D]; of the queries too with
several directions, while query_to_doc alone finishes a block's query rows in the block), the candidate product's
fp32 temporary in chunks of rows of at most a quarter of the logits budget, and one block of logits: m rows of every
direction's candidates in the accumulation dtype, plus one direction's G in the input dtype on CUDA (and G_r in
fp16), the logits
dropped once G is written. m follows FASTLOSS_MNRL_BLOCK_MIB (default 1024 MiB on CUDA, where a block should hold
~1000+ rows for the GEMMs to run near peak, 64 MiB elsewhere; at least one row). Projected at the GPU target
(benchmarks/projection.py, which gives what the H200 measured for 30fe787: 1685.9 MiB beyond the gradients): 1152.9
MiB, 384.9 with 256 MiB blocks (833.7 at 30fe787; 1280.5 and 512.4 with the columns concatenated, until 2026-11-30).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from fastloss import _backend
from fastloss.ops.mnrl import (
    DOC_TO_QUERY,
    QUERY_TO_DOC,
    Direction,
    MNRLParams,
    PositiveRows,
    _holds_positive,
    _inv_norms,
    _inv_offsets,
    _norm_backward,
    _positive_rows,
    _positive_sims,
    _softplus,
    directions,
    one_direction_terms,
    positive_shares,
    positive_terms,
)
from fastloss.ops.two_part import from_max_sum

BLOCK_MIB_DEFAULT = {"cuda": 1024.0, "other": 64.0}
_FP16_MAX = 65504.0
# Where directions share products (partners), at least MERGE_BLOCKS blocks of at least MERGE_MIN_ROWS rows: the
# backward skips the later rows' columns, so one block would skip nothing. The CPU numbers are the native op's
# (measured there: csrc/mnrl.cpp); on CUDA a block keeps ~1000 rows for the GEMMs (not measured on a GPU yet).
MERGE_BLOCKS = 8
MERGE_MIN_ROWS = {"cuda": 1024, "other": 128}
_MIN_FACTOR = 1e-20  # below it a row's softmax factor is applied to G in place rather than divided out
# Merged blocks write a partner's softmax entry from this block's product and the partner row's statistics from its
# own block's: the two GEMMs round that product alike only to a few ulps of the logit, which goes into the entry's
# exponent (GTE's directions at dot logits of ~5e7: 0.6 of the gradient, where sentence-transformers' fp32 errs by
# 7e-8; 8.7e-4 at ~4.5e4). Where the logits may exceed this bound (logit_bound) nothing is merged: each entry then
# comes from its own row's product, as in sentence-transformers. The native op's kMergeLogitBound is the same.
MERGE_LOGIT_BOUND = 1024.0


def block_bytes(device: torch.device) -> int:
    """The logits block budget in bytes: FASTLOSS_MNRL_BLOCK_MIB, or the default for ``device``."""
    value = os.environ.get("FASTLOSS_MNRL_BLOCK_MIB", "").strip()
    if not value:
        return int(BLOCK_MIB_DEFAULT["cuda" if device.type == "cuda" else "other"] * 2**20)
    try:
        mib = float(value)
    except ValueError:
        mib = float("nan")
    if not mib > 0.0 or mib == float("inf"):
        raise ValueError(f"FASTLOSS_MNRL_BLOCK_MIB must be a positive number of MiB, got {value!r}")
    return max(1, int(mib * 2**20))


def half_gemms(x: Tensor) -> bool:
    """Whether the products take fp16/bf16 operands with fp32 results (CUDA tensors of those dtypes)."""
    return x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)


def _mm(a: Tensor, b: Tensor, half: bool, acc: torch.dtype, out: Tensor | None = None) -> Tensor:
    """a @ b in ``acc`` (into ``out`` where given: a view of columns of a block of logits, whose row stride cuBLAS
    takes as its leading dimension): cuBLAS with fp32 results for half CUDA operands; otherwise in ``acc`` itself
    (CPU tensors with ``half`` set, which only the tests do, emulate the rounded operands this way)."""
    if half and a.device.type != "cpu":  # CUDA (and meta tensors: benchmarks.projection)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.to(acc), b.to(acc), out=out)


class _Stacked:
    """The rows of several tensors as one matrix without copying them (the doc columns, each [W, D], as the
    concatenation docs_all [kW, D]): at the GPU target (B = 32768, N = 65536, D = 1024 bf16) their concatenation was
    128 MiB of the op's memory. Products with it run per tensor, into columns of the block of logits or summed."""

    def __init__(self, parts: list[Tensor]):
        self.parts = parts
        self.starts = [0, *itertools.accumulate(x.shape[0] for x in parts)]

    def __len__(self) -> int:
        return self.starts[-1]

    def rows(self, a: int, b: int) -> Tensor:
        """Rows a .. b - 1 of the first tensor, where the local rows are (the positives among the docs)."""
        assert b <= self.starts[1], "rows beyond the first tensor"
        return self.parts[0][a:b]

    def logits(self, r: Tensor, half: bool, acc: torch.dtype) -> Tensor:
        """r @ stacked^T [m, rows] in ``acc``: one GEMM per tensor into its columns."""
        if len(self.parts) == 1:
            return _mm(r, self.parts[0].t(), half, acc)
        s = torch.empty((r.shape[0], len(self)), device=r.device, dtype=acc)  # acc is fp32 for half operands
        for x, a in zip(self.parts, self.starts):
            _mm(r, x.t(), half, acc, s[:, a : a + x.shape[0]])
        return s

    def product(self, g: Tensor, spans: list[tuple[int, int]], half: bool, acc: torch.dtype) -> Tensor:
        """The sum over the column spans [a, b) of g[:, a:b] @ stacked[a:b]: [m, D] in ``acc``, a GEMM per span and
        tensor."""
        out = None
        for a, b in spans:
            for x, lo, hi in zip(self.parts, self.starts, self.starts[1:]):
                a_, b_ = max(a, lo), min(b, hi)
                if a_ < b_:
                    part = _mm(g[:, a_:b_], x[a_ - lo : b_ - lo], half, acc)
                    out = part if out is None else out.add_(part)
                    del part
        return out


def block_rows(
    p: MNRLParams, world: int, columns: int, esize: int, half_size: int, budget: int, merged: int = 0
) -> int:
    """Rows per block: every direction's logits of a row in the accumulation dtype (``esize`` bytes), plus the widest
    direction's G in the input dtype when the GEMMs take half operands (``half_size``, else 0; fp16 passes two entries'
    size, G and G_r), plus the partners'
    softmax entries at the earlier rows' columns for ``merged`` directions (B each), within ``budget``."""
    widths = [world * (columns if dir_.candidates_are_docs else 1) for dir_ in directions(p)]
    row = (sum(widths) + merged * p.batch) * esize + max(widths) * half_size
    return max(1, min(p.batch, budget // row))


def partners(selected: list[Direction]) -> list[int]:
    """Per direction, the index of the direction whose rows, transposed, are its columns offset .. offset + B (the
    local rows' own vectors), or -1: doc_to_query's rows are query_to_doc's positives and the reverse;
    query_to_query and doc_to_doc are their own (a Gram block). Entry (i, j) there and the partner's entry (j, i) are
    one product, so one entry of the gradient GEMMs can take both softmax entries."""
    bits = [dir_.bit for dir_ in selected]
    wanted = [{QUERY_TO_DOC: DOC_TO_QUERY, DOC_TO_QUERY: QUERY_TO_DOC}.get(bit, bit) for bit in bits]
    return [bits.index(bit) if bit in bits else -1 for bit in wanted]


def logit_bound(q: Tensor, doc_cols: Sequence[Tensor], scale: Tensor, p: MNRLParams) -> float:
    """An upper bound on |logit| over every direction: (|scale| + |alpha| where penalised) times the largest squared
    norm of the rows (1 with cosine similarity: unit rows, zero vectors 0); inf where that is not finite. A host
    sync on CUDA (the merge is a host decision)."""
    factor = abs(float(scale)) + (abs(p.alpha) if p.hardness else 0.0)
    if p.normalize:
        return factor
    acc = _backend.accumulation_dtype(q)  # fp16/bf16 summed in fp32
    norms = [torch.linalg.vector_norm(x, dim=1, dtype=acc).amax() for x in (q, *doc_cols) if x.numel()]
    bound = factor * float(torch.stack(norms).amax()) ** 2 if norms else 0.0
    return bound if math.isfinite(bound) else math.inf


def triton_rows(x: Tensor) -> bool:
    """Whether the row passes over a block run as Triton kernels (fastloss.ops.block_softmax): fp16/bf16/fp32 CUDA
    tensors where Triton is installed; torch ops otherwise."""
    return x.device.type == "cuda" and x.dtype != torch.float64 and _backend.triton_available()


def _rule(p: MNRLParams, columns: int, scale: Tensor, dir_: Direction):
    """(factor, except factor or None for a mask, t_begin, t_end): the logit of column j is factor * t_j, except at
    the columns own + t * W for t in [t_begin, t_end) (the native op's column rules)."""
    penalised = scale + p.alpha
    if dir_.mask_own:
        return scale, None, 0, columns if dir_.candidates_are_docs else 1
    return {
        0: (scale, scale, 0, 0),
        1: (penalised, scale, 0, columns),  # in_batch_negatives: all but the own query's docs
        2: (scale, penalised, 1, columns),  # hard_negatives: the own query's hard negatives
        3: (penalised, scale, 0, 1),  # all_negatives: all but the positive
    }[dir_.pen_mode]


class _TorchRows:
    """The row passes in torch ops: the block S becomes E = exp(logit - top) in place, then G = E c_inv."""

    def __init__(self, p: MNRLParams, world: int, columns: int, scale: Tensor):
        self.p, self.world, self.columns, self.scale = p, world, columns, scale

    def stats(
        self, s: Tensor, dir_: Direction, r_inv: Tensor, c_inv: Tensor, g0: int, terms=None, gmax=None, mant=None
    ):
        """(top, sum E, sum E without column g0 + i (directions holding the positive, else None), the positive's
        logit) of each row; S becomes E in place. With ``terms`` (query_to_doc alone) what block_softmax.row_stats
        computes from them too: _block_terms (with ``mant``, the row weights' mantissas). ``gmax``: the Triton pass's
        (grad takes fp16's row max from E)."""
        factor, except_factor, t_begin, t_end = _rule(self.p, self.columns, self.scale, dir_)
        s.mul_(r_inv[:, None]).mul_(c_inv[None, :])  # the similarities t
        if terms is not None:
            terms[2].copy_(s.diagonal(offset=g0))  # the positive's
        if t_end > t_begin:
            own = torch.arange(g0, g0 + s.shape[0], device=s.device)
            cols = own[:, None] + self.world * torch.arange(t_begin, t_end, device=s.device)[None, :]
            held = s.gather(1, cols)
            s.mul_(factor)
            s.scatter_(1, cols, held * except_factor if except_factor is not None else held.fill_(-torch.inf))
        else:
            s.mul_(factor)
        positive = s.diagonal(offset=g0).clone()  # column g0 + i of row i: the logits as they are rounded here
        top = s.amax(dim=1)
        top = torch.where(top == -torch.inf, torch.zeros_like(top), top)  # a fully masked row: E = 0, not NaN
        s.sub_(top[:, None]).exp_()
        if not _holds_positive(dir_.bit):
            return top, s.sum(dim=1), None, positive
        own = s.diagonal(offset=g0)
        e_own = own.clone()
        own.zero_()
        neg = s.sum(dim=1)
        own.copy_(e_own)
        stats = (top, neg + e_own, neg, positive)
        if terms is None:
            return stats
        # dL/dscale's row terms: from the query rows' product after the blocks (the Triton pass's from its products)
        return stats + _block_terms(*stats, r_inv, self.scale, *terms[:2], *terms[3:5], mant=mant)

    def grad(self, s, dir_, r_inv, c_inv, g0, top, dtype, fp16, fold=None, pos_w=None, gmax=None, mant=None):
        """(G = E c_inv in ``dtype``, G_r, rs); with ``fold`` = (pos_val, sum E, share, left) the positive's
        coefficient in its entry (_fold_positive), ``left`` gaining the share of the rows where it does not fit; with
        ``pos_w`` = (w, h) too, w = the weight of the positive's separate term in the rows' gradient
        (block_softmax.row_grad). In fp16 G_r is G with each row times the power of two rs (_row_scales); otherwise G_r
        is G and rs None. With ``mant`` G's rows (and G_r's) times it. ``gmax``: the Triton pass's."""
        s.mul_(_cap(c_inv, fp16)[None, :])
        rs = _row_scales(s, g0, c_inv, fold, _holds_positive(dir_.bit)) if fp16 else None
        if mant is not None:
            s.mul_(mant[:, None])
        g = s.to(dtype)
        g_r = g if rs is None else s.mul_(rs[:, None]).to(dtype)  # S is not read again
        if fold is not None:
            pos_val, total, share, left = fold
            scaled = None if rs is None else (g_r, rs)
            left += _fold_positive(g, g0, pos_val * total, c_inv, share, fp16, scaled, mant)
            if pos_w is not None:  # _add_rows' weight, in its order
                w, h = pos_w
                own = c_inv[g0 : g0 + g.shape[0]]
                torch.mul(-(self.scale * h) * left, own, out=w).mul_(r_inv)
        return g, g_r, rs


class _TritonRows:
    """The row passes as Triton kernels: S stays the raw products until G is written (in place for fp32)."""

    def __init__(self, p: MNRLParams, world: int, columns: int, scale: Tensor):
        self.p, self.world, self.scale = p, world, scale

    def _opts(self, dir_: Direction, g0: int) -> dict:
        return dict(period=self.world, offset=g0, mask_own=dir_.mask_own, pen_mode=dir_.pen_mode, alpha=self.p.alpha)

    def stats(self, s, dir_, r_inv, c_inv, g0, terms=None, gmax=None, mant=None):
        from fastloss.ops.block_softmax import row_stats

        # top: 0 for a fully masked row; neg: the sum without column g0 + i; positive: that column's logit, never
        # penalised; with terms, _block_terms in the same launch; with gmax (fp16), each row's largest entry of G
        positive_col = _holds_positive(dir_.bit)
        opts = self._opts(dir_, g0)
        return row_stats(
            s, r_inv, c_inv, self.scale, positive_col=positive_col, terms=terms, gmax=gmax, mant=mant, **opts
        )

    def grad(self, s, dir_, r_inv, c_inv, g0, top, dtype, fp16, fold=None, pos_w=None, gmax=None, mant=None):
        from fastloss.ops.block_softmax import row_grad

        out = s if dtype == s.dtype else torch.empty(s.shape, device=s.device, dtype=dtype)
        g_r, rs, scaled = out, None, None
        if fp16:  # G_r: G's rows scaled, in the same launch
            g_r, rs = torch.empty_like(out), torch.empty_like(top)
            scaled = (gmax, _holds_positive(dir_.bit), rs, g_r)
        opts = self._opts(dir_, g0)
        row_grad(s, r_inv, c_inv, self.scale, top, out, fold=fold, pos_w=pos_w, scaled=scaled, mant=mant, **opts)
        return out, g_r, rs


def _block_terms(top, total, neg, positive, r_inv, scale, x, rw, h, joint, mant=None):
    """For query_to_doc alone, from a block's row statistics: the row loss softplus(x), x = NLSE - positive, into
    ``x``, rw = r_inv / sum E into ``rw``, and (pos_val: -sigmoid(x), +inf where joint and x > 0; the softmax
    weight c = 1 / sum E; srw = scale h rw), as block_softmax.row_stats computes them in its launch (which also
    writes the positive's similarity: _TorchRows.stats does that before the logits overwrite it). With ``mant`` =
    (m, fp16) the mantissa of each row's weight in the candidates' GEMM (rw; fp16: c _cap(r_inv)) into m, and rw
    divided by it (row_stats' ``mant``)."""
    terms = one_direction_terms(top + neg.log(), positive, joint)
    x.copy_(_softplus(terms[1]))
    c = total.reciprocal()
    torch.mul(c, r_inv, out=rw)
    if mant is not None:
        m, fp16 = mant
        m.copy_(_mantissa(c * _cap(r_inv, True) if fp16 else rw))
        rw.div_(m)
    return terms[0], c, (scale * h) * rw


def _mantissa(w: Tensor) -> Tensor:
    """A positive normal w's mantissa in [0.5, 1), so that w / it is a power of two (exact); 1 for anything else."""
    return torch.where((w >= torch.finfo(w.dtype).tiny) & torch.isfinite(w), torch.frexp(w).mantissa, 1.0)


def _triton_inv_norms(q: Tensor, doc_cols: list[Tensor], normalize: bool) -> tuple[Tensor, Tensor]:
    """The fp32 inverse norms of q [W] and of the doc columns [kW] (one vector of them, as the row passes take the
    candidates' norms), from fastloss.ops.l2norm.inverse_norms: views of one vector, the docs' at an aligned offset."""
    from fastloss.ops.l2norm import inverse_norms

    start = _inv_offsets([q.shape[0]])[1]
    offsets = [0, *itertools.accumulate((x.shape[0] for x in doc_cols[:-1]), initial=start)]
    inv, _ = inverse_norms([q, *doc_cols], offsets, start + sum(x.shape[0] for x in doc_cols), normalize)
    return inv[: q.shape[0]], inv[start:]


def mnrl_blocked(q: Tensor, d: Tensor | Sequence[Tensor], scale: Tensor, p: MNRLParams, need_grad: bool):
    """(loss, dq, dd, dscale) of MNRL over gathered queries q [W, D] and docs d [kW, D], or the doc columns that make
    it up in order (uncopied), with the gradients computed in the same pass (zeros without ``need_grad``; dd [kW, D]
    whichever form d takes); loss and dscale in the accumulation dtype."""
    doc_cols = [d] if isinstance(d, Tensor) else list(d)
    n_docs = sum(x.shape[0] for x in doc_cols)
    world, columns = q.shape[0], n_docs // q.shape[0]
    if doc_cols[0].shape[0] < p.offset + p.batch:
        raise ValueError(f"mnrl_blocked: the first docs tensor must hold the positives, rows [0, {p.offset + p.batch})")
    acc = _backend.accumulation_dtype(q)
    half = half_gemms(q)
    fp16 = half and q.dtype == torch.float16  # operands whose folded inverse norms are capped
    gemm_dtype = q.dtype if half else acc
    # the GEMM operands (no copy where they already are)
    x_q, x_d = _Stacked([q.to(gemm_dtype)]), _Stacked([x.to(gemm_dtype) for x in doc_cols])
    first_docs = doc_cols[0]  # the local positives' rows: offset .. offset + B - 1, in the first tensor
    scale = scale.detach().to(device=q.device, dtype=acc).reshape(())
    if triton_rows(q):  # a Triton launch per tensor, where torch ops take ~7 launches for q and two columns
        q_inv, d_inv = _triton_inv_norms(q, doc_cols, p.normalize)
    else:
        q_inv, d_inv = _inv_norms(q, p.normalize, acc), _inv_norms(doc_cols, p.normalize, acc)
    selected = directions(p)
    alone = len(selected) == 1  # query_to_doc alone (the drop-ins' default): one_direction_terms, no stacks
    shares = positive_shares(p)  # of the positive's -1: equal among query_to_doc and doc_to_query
    first = [dir_.bit for dir_ in selected].index(QUERY_TO_DOC)  # whose positive logit the joint loss takes
    side = {True: (x_q, q_inv, 0), False: (x_d, d_inv, 1)}  # queries or docs: GEMM operand, inverse norms, grads[i]
    rows_pass = (_TritonRows if triton_rows(q) else _TorchRows)(p, world, columns, scale)
    # shared products take one entry of the gradient GEMMs (partners), except in fp16, whose G may not hold the
    # partner's entry divided by a small softmax factor, and where the logits may be large (MERGE_LOGIT_BOUND)
    merge = need_grad and not fp16 and not alone and logit_bound(q, doc_cols, scale, p) <= MERGE_LOGIT_BOUND
    partner = partners(selected) if merge else [-1] * len(selected)
    merged = sum(k >= 0 for k in partner)
    half_size = q.element_size() * (2 if fp16 else 1) if half else 0  # G (and G_r) per entry
    rows_per_block = block_rows(p, world, columns, torch.finfo(acc).bits // 8, half_size, block_bytes(q.device), merged)
    if merged:
        least = MERGE_MIN_ROWS["cuda" if q.device.type == "cuda" else "other"]
        rows_per_block = min(rows_per_block, max(least, -(-p.batch // MERGE_BLOCKS)))
        # per row: max and -log c (inf, 0 where c = 0) apart: max - log c would carry max's rounding (_partner_entries)
        ref_max = torch.full((len(selected), p.batch), torch.inf, device=q.device, dtype=acc)
        ref_lnorm = torch.zeros((len(selected), p.batch), device=q.device, dtype=acc)
    h = 1.0 / p.batch
    sh = scale * h  # the gradients' common factor
    # the row losses (query_to_doc alone: softplus(x), written by the statistics' row pass)
    row_loss = torch.empty(p.batch, device=q.device, dtype=acc)
    separate_share = torch.zeros(p.batch, device=q.device, dtype=acc)
    # / h: sums of c r_inv <r, G C> over the blocks (query_to_doc alone: one dot after them)
    dscale = None if alone else torch.zeros((), device=q.device, dtype=acc)
    if alone:  # per row: c r_inv and <r, G C> (dL/dscale's, dotted once after the blocks), the positive's similarity
        # and its separate term's weight (-scale h share c_inv r_inv, for the docs' rows after the blocks)
        rw_all, rowdots, sims_all, pos_w_all = torch.empty((4, p.batch), device=q.device, dtype=acc)
        # half GEMM operands: the mantissa of each row's weight in the candidates' GEMM, which G's row takes, so that
        # the weighted rows are the query rows times powers of two, exact: rounded, they moved the candidates'
        # gradient by 2^-9 (bf16) of its size before the normalisation's projection, 10x the positive's whole
        # gradient where positive and query nearly coincide (test_half_gemms_keep_the_weighted_rows_directions)
        mant_all = torch.empty(p.batch, device=q.device, dtype=acc) if half and need_grad else None
    else:
        mant_all = None
    grads = dq = None
    fused = triton_rows(q)  # the normalisation backward as one Triton launch per tensor
    # rows of the candidate product's temporary (acc dtype, [rows, D]): a quarter of the logits budget
    chunk = max(1, block_bytes(q.device) // 4 // (torch.finfo(acc).bits // 8 * max(1, q.shape[1])))
    if need_grad:
        # query_to_doc alone: a block's query rows get all of their gradient in that block (their positive's separate
        # term too), so dq is written block by block instead of through a [W, D] fp32 accumulator
        dq = torch.empty_like(q) if alone else None
        grads = (
            None if alone else torch.zeros(q.shape, device=q.device, dtype=acc),
            torch.zeros((n_docs, q.shape[1]), device=q.device, dtype=acc),
        )
        if alone and p.offset:  # gathered queries of other ranks: no direction has them as rows
            dq[: p.offset].zero_()
        if alone and p.offset + p.batch < q.shape[0]:
            dq[p.offset + p.batch :].zero_()

    for start in range(0, p.batch, rows_per_block):
        m = min(rows_per_block, p.batch - start)
        g0 = p.offset + start
        blocks, row_max, sums, negs, positives, transposed = [], [], [], [], [], []
        # fp16 G_r: each row's largest entry of G, from the Triton row pass (the torch one takes it from E)
        gmaxes = [torch.empty(m, device=q.device, dtype=acc) if fp16 and grads is not None else None for _ in selected]
        for dir_, k, gmax in zip(selected, partner, gmaxes):
            rows, r_inv, _ = side[dir_.rows_are_queries]
            cands, c_inv, _ = side[not dir_.candidates_are_docs]
            s = cands.logits(rows.rows(g0, g0 + m), half, acc)
            if k >= 0 and start > 0:  # from the raw products, before the row pass
                factor = _rule(p, columns, scale, selected[k])[0]  # no earlier row's column is its own
                ref = (ref_max[k, :start], ref_lnorm[k, :start])
                transposed.append(_partner_entries(s, r_inv[g0 : g0 + m], c_inv, p.offset, factor, ref))
            else:
                transposed.append(None)
            if alone:  # the block's terms from its statistics, in the row pass's launch where it is Triton's
                here = slice(start, start + m)  # the block's entries of the per-row vectors
                # Triton row passes: dL/dscale's row terms into rowdots (from the products in fp32)
                terms = (row_loss[here], rw_all[here], sims_all[here], h, p.joint, rowdots[here])
                mant = None if mant_all is None else (mant_all[here], fp16)
                stats = rows_pass.stats(s, dir_, r_inv[g0 : g0 + m], c_inv, g0, terms, gmax, mant)
                top, total, neg, positive, pv, c, srw = stats
            else:
                top, total, neg, positive = rows_pass.stats(s, dir_, r_inv[g0 : g0 + m], c_inv, g0, gmax=gmax)
            blocks.append(s)
            row_max.append(top)
            sums.append(total)
            negs.append(total if neg is None else neg)
            positives.append(positive)
        del s  # blocks holds it: every name of a block's logits is dropped before the next block's products
        if alone:  # softmax weights c = 1 / sum E
            pos_val, weights = pv[None], c[None]
        else:
            row_max, sums, negs = torch.stack(row_max), torch.stack(sums), torch.stack(negs)  # [n_dir, m]
            lse, nlse = from_max_sum(row_max, sums), from_max_sum(row_max, negs)  # [2, n_dir, m]: two parts
            positive = positives[first] if p.joint else torch.stack(positives)  # each direction's own, per direction
            row_loss[start : start + m], pos_val = positive_terms(lse, nlse, positive, p)
            # joint: softmax = c E, c = exp(row_max - log_z) as (row_max - top) - log(z e^-top), top's rounding apart
            if p.joint:
                # a direction without candidates in a row (query_to_query / doc_to_doc at B = 1) has row_max 0 and sum
                # 0: taken as -inf, or its shift 0 - top overflowed exp where the row's logits lie below -88.7 (fp32)
                # and 0 * inf was NaN
                valid_max = torch.where(sums > 0, row_max, -torch.inf)
                shifted = valid_max - valid_max.amax(dim=0)
                weights = torch.exp(shifted - (sums * torch.exp(shifted)).sum(dim=0).log())
            else:
                weights = torch.where(sums > 0, 1.0 / (len(selected) * sums), torch.zeros_like(sums))
        if grads is None:
            del blocks, transposed
            continue
        if merged:
            ref_max[:, start : start + m] = torch.where(sums > 0, row_max, torch.inf)
            ref_lnorm[:, start : start + m] = torch.where(sums > 0, -weights.log(), 0.0)
        parts = zip(selected, row_max, weights, sums, pos_val, shares, partner, transposed, gmaxes)
        for j, (dir_, top, c, total, pv, share, k, entries, gmax) in enumerate(parts):
            rows, r_inv, i_rows = side[dir_.rows_are_queries]
            cands, c_inv, i_cands = side[not dir_.candidates_are_docs]
            r_blk, r_inv_blk = rows.rows(g0, g0 + m), r_inv[g0 : g0 + m]
            fold = (pv, total, share, separate_share[start : start + m]) if share else None
            pos_w = (pos_w_all[start : start + m], h) if alone else None  # the separate term's weights
            # G = E c_inv (times the row weights' mantissas); fp16: G_r, G's rows times rs, for the query rows' product
            mant = None if mant_all is None else mant_all[start : start + m]
            g, g_r, rs = rows_pass.grad(
                blocks[j], dir_, r_inv_blk, c_inv, g0, top, gemm_dtype, fp16, fold, pos_w, gmax, mant
            )
            blocks[j] = None  # the products need only G: the logits go (in fp32 G is their storage)
            spans = [(0, g.shape[1])]
            if k >= 0:  # the later local rows' columns are their blocks' (this block's rows as the partner's entries)
                c = _add_partner_entries(g, c, entries, p.offset)
                spans = [(0, g0 + m), (p.offset + p.batch, g.shape[1])]
            spans = [(a, b) for a, b in spans if b > a]
            product = cands.product(g_r, spans, half, acc)  # (E c_inv) C: [m, D]
            if rs is not None:
                product.div_(rs[:, None])  # exact: powers of two
            del g_r
            if not alone:
                rw = c * r_inv_blk
                dscale += torch.dot(rw, (r_blk * product).sum(dim=1))  # r_blk promoted to acc, not copied
                grads[i_rows][g0 : g0 + m].addcmul_(product, (sh * rw)[:, None])
            else:  # the accumulator's values (0 + product w, then the positive's separate term), normalised here
                rw = rw_all[start : start + m]
                if not fused:  # dL/dscale's, dotted with rw after (the Triton row pass wrote its terms instead)
                    torch.sum(r_blk * product, dim=1, out=rowdots[start : start + m])
                rows_acc = product.mul_(srw[:, None])
                positive = PositiveRows(first_docs[g0 : g0 + m], None, pos_w[0], 0)  # its weights from the row pass
                out = dq[g0 : g0 + m]
                _norm_backward(
                    q[g0 : g0 + m],
                    r_inv_blk,
                    rows_acc,
                    p.normalize,
                    scaled=True,
                    out=out,
                    fused=fused,
                    positive=positive,
                )
                del rows_acc
            del product
            if alone and not fp16:  # c = 1 / sum E >= 1 / N: the weighted rows need no rescaling for their range
                weighted = torch.empty(r_blk.shape, device=q.device, dtype=gemm_dtype)
                weighted, factor = torch.mul(r_blk, rw[:, None], out=weighted), sh  # in acc, rounded once
            else:
                w = c * _cap(r_inv_blk, fp16)
                if mant is not None:  # its power of two (the mantissa is in G's row)
                    w.div_(mant)
                w_max = w.amax().clamp_min(torch.finfo(acc).tiny)
                weighted, factor = (r_blk * (w / w_max)[:, None]).to(gemm_dtype), sh * w_max
            for a, b in spans:
                for a_ in range(a, b, chunk):
                    b_ = min(a_ + chunk, b)
                    grads[i_cands][a_:b_].addcmul_(_mm(g[:, a_:b_].t(), weighted, half, acc), factor)
            del g, weighted
        # nothing of this block's may stay named into the next block's products: the last logits kept by a loop
        # variable made two blocks of logits the op's peak (at the GPU target 682.5 MiB more; benchmarks/projection)
        del blocks, transposed, parts, entries

    loss = row_loss.mean()
    dd = (torch.empty if grads is not None else torch.zeros)((n_docs, q.shape[1]), device=q.device, dtype=q.dtype)
    if grads is None:
        return loss, torch.zeros_like(q), dd, torch.zeros((), device=q.device, dtype=acc)
    # the positive's separate term in the positives' rows (and q's), added by the normalisation backward
    if alone:  # its weights from the row pass; its share of dL/dscale
        docs_positive = PositiveRows(q[p.offset : p.offset + p.batch], None, pos_w_all, p.offset)
        if fused:  # the row pass's terms sum_j p_j (t_j - t_own), in fp32 from the products themselves
            dscale = h * rowdots.sum()
        else:
            dscale = h * (torch.dot(rw_all, rowdots) - torch.dot(separate_share, sims_all))
    else:
        coef = -sh * separate_share
        positive = _positive_rows(0, q.shape[0], first_docs, d_inv, coef, p)
        dq = _norm_backward(q, q_inv, grads[0], p.normalize, scaled=True, fused=fused, positive=positive)
        docs_positive = _positive_rows(0, first_docs.shape[0], q, q_inv, coef, p)
        dscale = h * (dscale - (separate_share * _positive_sims(q, first_docs, q_inv, d_inv, p)).sum())
    for k, (x, a, b) in enumerate(zip(doc_cols, x_d.starts, x_d.starts[1:])):  # each column's rows of dd
        positive = docs_positive if k == 0 else None
        _norm_backward(
            x, d_inv[a:b], grads[1][a:b], p.normalize, scaled=True, out=dd[a:b], fused=fused, positive=positive
        )
    return loss, dq, dd, dscale


def _partner_entries(
    s: Tensor, r_inv: Tensor, c_inv: Tensor, offset: int, factor, ref: tuple[Tensor, Tensor]
) -> Tensor:
    """The partner direction's softmax entries of the earlier local rows j (``ref``: their max and lnorm = -log c)
    at this block's rows, in G's units before the row weight (E c_inv): exp((t factor - max_j) - lnorm_j) c_inv_j, t
    the similarity of the raw product in column offset + j of ``s``; c_inv_j > 0 goes into the exponent. The logit is
    rounded as the torch row pass rounds the partner's ((s c_inv_j) r_inv factor), so that logit - max is exact where
    the entry matters; one reference point max + lnorm would carry max's rounding into the exponent (0.1% of the
    entry at fp32 logits of 3e4)."""
    row_max, lnorm = ref
    inv = c_inv[offset : offset + row_max.shape[0]]
    x = s[:, offset : offset + row_max.shape[0]] * inv[None, :]
    x.mul_(r_inv[:, None]).mul_(factor).sub_(row_max[None, :])
    return x.add_((inv.log() - lnorm)[None, :]).exp_()


def _add_partner_entries(
    g: Tensor, c: Tensor, entries: Tensor | None, offset: int, branch_free: bool | None = None
) -> Tensor:
    """Add the partner's ``entries`` (None: no earlier rows) into G = E c_inv, whose rows carry the weights ``c``
    (softmax = c E): divided by c, except in rows whose c is below _MIN_FACTOR (a direction far below the joint
    partition's top, whose partner's entries may still count), which take c into G instead. Returns the weights.
    ``branch_free`` (default: on CUDA) scales G's rows by c or by exactly 1 without first asking whether any row is
    small: one pass over G instead of a host sync per block and merged direction, which stops the host from queueing
    the next block's launches while the GPU works (on the H200 the symmetric loss in row blocks took ~3-4 ms per block
    more than one-direction MNRL, 22.0 against 4.1 ms at B=4096; whether this sync was the cause is not measured)."""
    small = c < _MIN_FACTOR
    if branch_free is None:
        branch_free = g.device.type == "cuda"
    if branch_free or bool(small.any()):
        g.mul_(torch.where(small, c, 1.0)[:, None].to(g.dtype))
        c = torch.where(small, 1.0, c)
    if entries is not None:
        g[:, offset : offset + entries.shape[1]] += entries.div_(c[:, None]).to(g.dtype)
    return c


def _fold_positive(
    g: Tensor,
    g0: int,
    value: Tensor,
    c_inv: Tensor,
    share: float,
    fp16: bool,
    scaled: tuple | None = None,
    mant: Tensor | None = None,
) -> Tensor:
    """Write the positive's coefficient p - share, in E units (``value``: pos_val * sum E, +inf for none), into
    its entry of G = E c_inv (the GEMMs multiply G by the row's weight c = softmax / E), so p - 1 is formed before any
    sum, as cross-entropy does, instead of cancelling between two O(scale) products; only where G's dtype holds the
    entry (fp16: not a positive whose inverse norm is capped, nor a value beyond 65504). With ``scaled`` = (G_r, rs)
    the same rows of G_r take the entry times rs; with ``mant`` G's (and G_r's) entries are times it (whether it fits
    is decided without). Returns the share each row leaves to the separate positive term (``share`` where nothing was
    folded, else 0)."""
    rows = torch.arange(g.shape[0], device=g.device)
    own = g0 + rows
    inv = c_inv[own]
    exact = inv * value
    fold = _folds(inv, exact, g.dtype, fp16)
    if mant is not None:
        exact = exact * mant
    entry = exact.to(g.dtype)
    g[rows, own] = torch.where(fold, entry, g[rows, own])
    if scaled is not None:
        g_r, rs = scaled
        g_r[rows, own] = torch.where(fold, (exact * rs).to(g.dtype), g_r[rows, own])
    return torch.where(fold, 0.0, share)


def _folds(inv: Tensor, entry: Tensor, dtype: torch.dtype, fp16: bool) -> Tensor:
    """Where G's ``dtype`` holds the positive's entry (c_inv_own times its coefficient in E units, in fp32): finite
    once rounded (not NaN either) and, in fp16, c_inv_own not capped (block_softmax._own_entry's rule)."""
    fold = torch.isfinite(entry.to(dtype))
    return fold & (inv <= _FP16_MAX) if fp16 else fold


def _row_scales(e: Tensor, g0: int, c_inv: Tensor, fold, own_apart: bool) -> Tensor:
    """Each row's power of two rs that takes its largest entry of fp16 G into [2^14, 2^15) (1 for a row of zeros; at
    most 2^127), as sim_lse._half_scale: from ``e`` = E c_inv [m, N] (fp32) and, where the row holds the positive
    (``own_apart``) and ``fold`` = (pos_val, sum E, ...) folds it (_fold_positive's rule), the entry it writes there."""
    if not own_apart:
        amax = e.amax(dim=1)
    else:
        own = e.diagonal(offset=g0)
        kept = own.clone()  # the positive's entry where it is not folded
        own.zero_()
        amax = e.amax(dim=1)
        own.copy_(kept)
        if fold is not None:
            inv = c_inv[g0 : g0 + e.shape[0]]
            value = inv * (fold[0] * fold[1])
            folded = _folds(inv, value, torch.float16, True)
            kept = torch.where(folded, value.abs(), kept)
        amax = torch.maximum(amax, kept)
    exponent = torch.frexp(amax)[1]  # amax = f 2^exponent, f in [0.5, 1): floor(log2 amax) = exponent - 1
    return torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), (15 - exponent).clamp_max(127)), 1.0)


def _cap(inv: Tensor, fp16: bool) -> Tensor:
    """Inverse norms to fold into GEMM operands: capped at the fp16 maximum when those are fp16."""
    return inv.clamp_max(_FP16_MAX) if fp16 else inv
