"""The fused MNRL op: every direction of MultipleNegativesRankingLoss without a B x N matrix in memory.

Directions (W gathered rows, B local rows at ``offset``, k doc columns, docs_all = cat(columns) [kW, D]: the flash
op takes the columns as blocks of candidates, uncopied, one sim_lse launch per block with its first index, where
they fill the GPU, columns_as_blocks):
  query_to_doc    rows = local queries,   candidates = docs_all, hardness penalty per ``hardness``
  query_to_query  rows = local queries,   candidates = all queries, own query masked
  doc_to_query    rows = local positives, candidates = all queries
  doc_to_doc      rows = local positives, candidates = docs_all, the own query's docs masked
Each is one call of the masked scaled-similarity logsumexp primitive (fastloss.ops.sim_lse), which keeps only
the per-row LSE (in two fp32 parts, fastloss.ops.two_part: the backward's softmax entries then as exact at large
logits as the forward's). With pos_i = scale * s(q_i, d_i):
  joint:          loss = mean_i(logaddexp_d(LSE_d,i) - pos_i)
  per_direction:  loss = mean_i(mean_d(LSE_d,i) - pos_i)
Backward: dLSE_d,i = grad / B * softmax_d(LSE_d,i) (joint) or grad / (B * n_dir); the primitive recomputes the
tiles and returns the gradients w.r.t. the normalised embeddings. With query_to_doc and doc_to_query (the symmetric
loss, GTE's four directions; joint or per direction) each tile is computed once for both: doc_to_query's row i is
column offset + i of query_to_doc's tiles, so query_to_doc's launch over the positives' block also gives
doc_to_query's logsumexp over the local queries in the forward (sim_lse_fwd's nlse_t: per-program partial column
statistics, reduced on the host; TRANSPOSED_FWD_BYTES) and adds doc_to_query's softmax there in the backward
(merges_transposed; sim_lse's lse_t), and doc_to_query's own launches keep the other ranks' queries: the symmetric
loss's pairs take 1 + 4 GEMM-equivalents, not 2 + 8 (k doc columns: 5k, not 5k + 5). query_to_query's and
doc_to_doc's candidates that are their own rows (the local queries; the local positives) form a symmetric Gram block
whose transposed entries are the same direction's rows, so the backward's rows launch over it with lse_t gives those
rows' whole gradient from the block and it needs no candidates launch (merges_gram): GTE's pairs take 11, not 20.
The positive pair sits in column offset + i of query_to_doc and of doc_to_query (the same logit twice). In a
trained model's batch its probability is near 1, so LSE - pos and p - 1 would each cancel (to the logits' ulp, and
inside the kernels' sums, or across the two copies). The kernels also return NLSE, the LSE without that column, for
the k directions that hold it (positive_terms): with x_i = log(negatives' mass / one copy's mass) = logsumexp of the
holders' NLSE and the other directions' LSE, minus pos_i, the row loss is log k + softplus(x_i - log k) (joint; per
direction: softplus of each direction's own x), and each copy's coefficient p - 1/k = -sigmoid(x_i - log k) / k, both
without cancellation. The backward kernels take that coefficient (divided by the direction's weight) in place of P
at the positive's entries, as cross-entropy forms p - 1 before its GEMMs; in joint rows where the copies hold less
than half the mass (p - 1 <= -1/2: nothing cancels, and the division could grow large) P stays and the
positive's -1 is added after the kernels. That term and the normalisation backward
dx = (dx_hat - x_hat <x_hat, dx_hat>) / max(|x|, eps) are O(B*D) epilogues here (the latter in one Triton kernel,
fastloss.ops.l2norm, without temporaries; fastloss._C.l2norm_bwd on CUDA with FASTLOSS_CUDA_KERNELS=1). The backward
runs per window of rows of q and of each block of d (window_rows): the kernels write or add that window's fp32 dx_hat
into one buffer, the epilogues turn it into those rows of dx. Beyond the returned gradients it holds that buffer and
O(B) vectors. The forward hands the backward the inverse norms of q and each block of d and the positive pairs'
similarities, O(B) fp32 vectors that the backward computed again before (2026-11-30: 13 of a call's 66 kernel
launches with the doc columns concatenated, one hard negative, counted on fake CUDA tensors; 53 then), in a Triton
launch per tensor (fastloss.ops.l2norm.inverse_norms, in place of ~10 torch ops for two tensors). With
query_to_doc alone (the drop-ins' default) the loss and pos_val come from one Triton launch
(sim_lse.one_direction_terms, in place of positive_terms' ~14 torch ops), its log_z is its LSE and its weight in the
backward h itself. With several directions positive_terms' values and log_z come from one launch too
(sim_lse.directions_terms, for ~66 torch ops), which also forms the LSE of each direction that holds the positive
from its NLSE (doc_to_query's from query_to_doc's tiles) and the positive (~17 torch ops each), so that no holder's LSE
rounds below the positive it holds. The backward's per-row weights (each direction's dL/dLSE, the merged launch's
positive coefficient, the separate -1's coefficient and dL/dscale part) are one launch (sim_lse.backward_weights, for
~8 torch ops with one direction, ~20 with several), and the positive pair's term joins the normalisation backward's
Triton launch (l2norm_bwd's ``positive``, for a product and an addcmul per tensor): query_to_doc alone 12 launches a
call, the symmetric loss 14 (128 before), GTE 23 (146).

Three implementations sit behind ``torch.library`` ops so that torch.compile sees one op each:
  fastloss::mnrl_fwd / fastloss::mnrl_bwd   flash style (Triton: CUDA, or CPU under TRITON_INTERPRET=1)
  fastloss::mnrl_fused                      row blocks with the gradient computed in the forward (fastloss._C, CPU)
  fastloss::mnrl_blocked                    the same algorithm in torch ops, any device (fastloss.ops.mnrl_blocked)
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fastloss import _backend
from fastloss.ops._custom_op import custom_op
from fastloss.ops.two_part import logsumexp2
from fastloss.similarity import NORM_EPS

QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC = 1, 2, 4, 8
DIRECTION_BITS = {
    "query_to_doc": QUERY_TO_DOC,
    "query_to_query": QUERY_TO_QUERY,
    "doc_to_query": DOC_TO_QUERY,
    "doc_to_doc": DOC_TO_DOC,
}
# sentence-transformers' order of the directions in the joint softmax
DIRECTION_ORDER = (QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC)
HARDNESS_MODES = {None: 0, "in_batch_negatives": 1, "hard_negatives": 2, "all_negatives": 3}


@dataclass(frozen=True)
class MNRLParams:
    """Non-tensor options of the op (``offset``/``batch``: the local rows of the gathered queries)."""

    offset: int
    batch: int
    directions: int = QUERY_TO_DOC
    joint: bool = True
    hardness: int = 0
    alpha: float = 0.0
    normalize: bool = True

    @property
    def n_directions(self) -> int:
        return bin(self.directions).count("1")

    def as_args(self) -> tuple:
        return (self.offset, self.batch, self.directions, self.joint, self.hardness, self.alpha, self.normalize)


def _inv_norms(x: Tensor | Sequence[Tensor], normalize: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """1 / max(|x_i|, eps) in ``dtype`` (ones for dot-product similarity), of the rows of ``x`` or of several tensors
    one after another (in one vector, each tensor's norms written into it)."""
    if isinstance(x, Tensor):
        if not normalize:
            return torch.ones(x.shape[0], device=x.device, dtype=dtype)
        return torch.linalg.vector_norm(x, dim=1, dtype=dtype).clamp_min(NORM_EPS).reciprocal()
    starts = [0, *itertools.accumulate(t.shape[0] for t in x)]
    return _inv_norms_at(x, starts, starts[-1], normalize, dtype)


def _inv_norms_at(
    xs: Sequence[Tensor], offsets: Sequence[int], length: int, normalize: bool, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The inverse norms of each tensor of ``xs`` at its offset in one vector of ``length`` (other entries 1), the same
    bits as _inv_norms of each."""
    padded = not normalize or sum(x.shape[0] for x in xs) < length
    out = (torch.ones if padded else torch.empty)(length, device=xs[0].device, dtype=dtype)
    if not normalize:
        return out
    for x, a in zip(xs, offsets):
        torch.linalg.vector_norm(x, dim=1, dtype=dtype, out=out[a : a + x.shape[0]])
    return out.clamp_min_(NORM_EPS).reciprocal_()


# The flash forward computes the inverse norms of q and of each block of docs once, into one fp32 vector (O(B): 384 KiB
# at the GPU target; the padding 1, so that the op's output is deterministic), and hands it to the backward, which
# computes none. Each tensor's entries start at a multiple of this many entries (128 bytes), so that the kernels see
# the same pointer alignment as for vectors of their own
_INV_ALIGN = 32


def _inv_offsets(rows: Sequence[int]) -> list[int]:
    """Where each tensor's inverse norms start in the flash op's vector of them, and last its length."""
    offsets = [0]
    for n in rows:
        offsets.append(offsets[-1] + -(-n // _INV_ALIGN) * _INV_ALIGN)
    return offsets


def _split_inv_norms(inv: Tensor, xs: Sequence[Tensor]) -> list[Tensor]:
    """The views of the flash op's vector of inverse norms (_inv_offsets) that hold each tensor's."""
    return [inv[a : a + x.shape[0]] for x, a in zip(xs, _inv_offsets([x.shape[0] for x in xs]))]


# Rows per chunk of the O(B*D) epilogues below: about 16 MiB per fp32 temporary, so that at GPU batch sizes (65536 x
# 1024 docs: 256 MiB in fp32) they add a few chunks to the loss stage's peak instead of several fp32 copies of the
# embeddings. The arithmetic per row is the same at any chunking.
_EPILOGUE_BYTES = 16 * 2**20


def _row_chunks(x: Tensor) -> list[slice]:
    rows = max(1, _EPILOGUE_BYTES // (4 * max(1, x.shape[1])))
    return [slice(s, s + rows) for s in range(0, x.shape[0], rows)]


def _row_dots(a: Tensor, b: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """<a_i, b_i> in ``dtype`` for each row, a chunk of rows at a time."""
    out = torch.empty(a.shape[0], device=a.device, dtype=dtype)
    for rows in _row_chunks(a):
        out[rows] = a[rows].to(dtype, copy=True).mul_(b[rows]).sum(dim=1)  # one chunk-sized temporary
    return out


def _norm_backward(
    x: Tensor,
    inv: Tensor,
    grad: Tensor,
    normalize: bool,
    scaled: bool = False,
    out: Tensor | None = None,
    fused: bool = False,
    positive: PositiveRows | None = None,
) -> Tensor:
    """The backward of F.normalize(x, eps=1e-12) in x's dtype, given ``grad`` = the gradient w.r.t. the normalised
    rows dx_hat (fp32 or fp64), or with ``scaled`` a = inv * dx_hat (the row-block op's accumulators), with the
    ``positive`` pair's term added to its rows (_add_rows: in grad, in place, except in the Triton kernel, which adds
    it as it reads grad, for two launches fewer):
    dx = (dx_hat - x_hat <x_hat, dx_hat>) * inv = a - x_hat <x_hat, a>, with no projection where |x| < eps (the
    clamp passes no gradient to the norm there). Written into ``out`` when given (x's shape and dtype). Torch ops in
    grad's dtype a chunk of rows at a time (two chunk-sized temporaries), each rounded once to x's dtype;
    fastloss._C.l2norm_bwd for unscaled fp32 grads of CUDA tensors with FASTLOSS_CUDA_KERNELS=1 (one pass over x and
    dx_hat, the same fp32 sums); else with ``fused`` (where Triton runs: the flash path, the row-block op's Triton
    row passes) for fp32 grads fastloss.ops.l2norm's Triton kernel (no temporaries, the same maths in fp32, one
    launch instead of about eight per chunk)."""
    cuda_kernel = (
        not scaled
        and x.device.type == "cuda"
        and x.dtype != torch.float64
        and grad.dtype == torch.float32
        and _backend.cuda_kernel_enabled("l2norm_bwd")
    )
    triton = fused and not cuda_kernel and grad.dtype == torch.float32 and x.dtype != torch.float64
    if positive is not None and not (normalize and triton):
        _add_rows(grad, positive, inv, scaled)
    if not normalize:
        return grad.to(x.dtype) if out is None else out.copy_(grad)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if out is None else out
    if cuda_kernel:
        return dx.copy_(_backend.native_module().l2norm_bwd(x.detach(), grad, NORM_EPS))
    if triton:
        from fastloss.ops.l2norm import l2norm_bwd

        return l2norm_bwd(x.detach(), inv, grad, dx, scaled=scaled, positive=positive)
    for rows in _row_chunks(x):
        inv_rows = inv[rows, None]
        x_hat = x[rows].to(grad.dtype, copy=True).mul_(inv_rows)
        projection = (x_hat * grad[rows]).sum(dim=1, keepdim=True)
        projection = torch.where(inv_rows < 1.0 / NORM_EPS, projection, torch.zeros_like(projection))
        part = x_hat.mul_(projection.neg_()).add_(grad[rows])  # grad - x_hat * projection, rounded the same way
        dx[rows] = part if scaled else part.mul_(inv_rows)
        del x_hat, part  # before the next chunk's copy
    return dx


class PositiveRows(NamedTuple):
    """The positive logit's term coef_j * y_inv_j * y_j for rows lo .. lo + n - 1 of a window of rows of a tensor (q
    or d): y [n, D] the other tensor's rows (d or q), y_inv and coef [n] fp32 (l2norm_bwd takes it as a tuple); y_inv
    None: coef_j * y_j, coef the whole weight (the row-block op's, from its row pass)."""

    y: Tensor
    y_inv: Tensor | None
    coef: Tensor
    lo: int


def _positive_rows(first: int, rows: int, other: Tensor, other_inv: Tensor, coef: Tensor, p) -> PositiveRows | None:
    """The positive's term in the window of rows first .. first + rows - 1 of q or d (``other`` is d or q), for its
    local rows among them (None for none), views of the operands."""
    a, b = max(first, p.offset), min(first + rows, p.offset + p.batch)
    if a >= b:
        return None
    return PositiveRows(other[a:b], other_inv[a:b], coef[a - p.offset : b - p.offset], a - first)


def _add_rows(acc: Tensor, positive: PositiveRows, own_inv: Tensor, scaled: bool) -> None:
    """Add ``positive``'s term to the window's accumulator ``acc`` in place, without copies of the operands;
    ``scaled``: acc holds inv * dx_hat, own_inv the window's inverse norms."""
    y, y_inv, coef, lo = positive
    weight = coef
    if y_inv is not None:
        weight = weight * y_inv
        if scaled:
            weight = weight * own_inv[lo : lo + y.shape[0]]
    acc[lo : lo + y.shape[0]].addcmul_(y, weight[:, None])


@dataclass(frozen=True)
class Direction:
    """One selected direction: whether its rows are the local queries (else the local positives) and its candidates
    the docs (else the queries), whether each row's own column(s) are masked, and sim_lse's hardness pen_mode."""

    bit: int
    rows_are_queries: bool
    candidates_are_docs: bool
    mask_own: bool
    pen_mode: int


def directions(p: MNRLParams) -> list[Direction]:
    """The selected directions in sentence-transformers' order."""
    return [
        Direction(
            bit,
            rows_are_queries=bit in (QUERY_TO_DOC, QUERY_TO_QUERY),
            candidates_are_docs=bit in (QUERY_TO_DOC, DOC_TO_DOC),
            mask_own=bit in (QUERY_TO_QUERY, DOC_TO_DOC),
            pen_mode=p.hardness if bit == QUERY_TO_DOC and p.alpha > 0.0 else 0,
        )
        for bit in DIRECTION_ORDER
        if p.directions & bit
    ]


@dataclass(frozen=True)
class Launch:
    """One sim_lse launch of a selected direction (its index ``direction``) over one block of its candidates, on the
    tensors xs = [q, *docs]: its rows are the local rows of xs[rows_of], its candidates xs[block] from its row
    ``start`` on; ``positive``: the block holds the rows' positive column; ``operands`` (r, c, r_inv, c_inv) and
    ``options`` (period ... base) are sim_lse's arguments around scale; ``transposed``: the index of the direction
    whose rows the launch's transposed entries are, -1 for none (_launches): doc_to_query in query_to_doc's launch
    over the positives (``merged``), the direction itself in a Gram block (``gram``)."""

    direction: int
    rows_of: int
    block: int
    positive: bool
    operands: tuple[Tensor, Tensor, Tensor, Tensor]
    options: dict
    start: int = 0
    transposed: int = -1

    @property
    def gram(self) -> bool:
        return self.transposed == self.direction


def _merge_enabled() -> bool:
    value = os.environ.get("FASTLOSS_FLASH_MERGE", "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"FASTLOSS_FLASH_MERGE must be 0 or 1, got {value!r}")
    return value == "1"


def merges_transposed(p: MNRLParams) -> bool:
    """Whether the flash op takes doc_to_query inside query_to_doc's launch over the positives' block: with both
    selected (the symmetric loss, GTE's four directions; joint or per direction). doc_to_query's row i is column
    offset + i of query_to_doc's tiles (its logits scale * s, without the penalty), so the forward takes its logsumexp
    over the local queries from those tiles and the backward recomputes them once for both directions; its own
    launches keep only the other ranks' queries (gathered) as candidates. The backward's merged launch needs one weight
    for every row of both directions: per direction it is h / n_dir; joint, both take the joint softmax
    exp(logit - log_z) of their row with the weight h (their rows' log-partitions as LSE and lse_t).
    FASTLOSS_FLASH_MERGE=0 keeps doc_to_query in launches of its own (the baseline the GPU check times this against)."""
    return _merge_enabled() and bool(p.directions & QUERY_TO_DOC) and bool(p.directions & DOC_TO_QUERY)


def merges_gram(p: MNRLParams) -> bool:
    """Whether the flash backward takes query_to_query's and doc_to_doc's blocks of their own rows as Gram blocks:
    there the candidates are the rows themselves (the local queries; the local positives, in the first block of
    docs), s is symmetric and the own entry masked both ways, so the rows' gradient launch with the block's transposed
    entries added (lse_t: the direction's own LSE; the same weight for every row, as in merges_transposed) gives the
    whole gradient of those rows from the block, and the block needs no candidates launch: 2 GEMM-equivalents
    instead of 4 (GTE's pairs: 15 -> 11). FASTLOSS_FLASH_MERGE=0 turns it off too. The forward is unchanged: half
    the block's tiles (each program from its own rows' columns on, the rest as partial column statistics) would
    still leave the first programs a whole row each and add a second exp per tile, so it would gain only where the
    grid is many times the SM count and lose below that; not without a GPU to time it."""
    return _merge_enabled() and bool(p.directions & (QUERY_TO_QUERY | DOC_TO_DOC))


def _transposed_index(p: MNRLParams) -> int:
    """doc_to_query's index among the selected directions (-1 when it is not selected)."""
    bits = [dir_.bit for dir_ in directions(p)]
    return bits.index(DOC_TO_QUERY) if DOC_TO_QUERY in bits else -1


def _launches(
    xs: list[Tensor], invs: list[Tensor], p: MNRLParams, merged: bool = False, gram: bool = False
) -> list[Launch]:
    """The selected directions' launches over xs = [q, *docs] (the docs in blocks of candidates: the columns as they
    come, not copied into one tensor) and their inverse norms. Each direction's rows are the local rows of q or of the
    first block, which holds the positives (_doc_blocks): the directions with the positive hold it in their first
    block (base 0). ``merged`` (query_to_doc's launch over the positives takes doc_to_query over the local queries: in
    the backward where merges_transposed, in the forward with both selected): doc_to_query's candidates are only the
    queries outside the local rows, in the blocks before and after them. ``gram`` (the backward where merges_gram):
    query_to_query's and doc_to_doc's candidates that are their own rows form a block of their own (the Gram block),
    between the blocks of the candidates before and after them."""
    bounds = (p.offset, p.offset + p.batch)
    local = slice(*bounds)
    world = xs[0].shape[0]
    bases = [0, *itertools.accumulate(x.shape[0] for x in xs[1:])][:-1]
    back = _transposed_index(p)
    out = []
    for i, dir_ in enumerate(directions(p)):
        rows_of = 0 if dir_.rows_are_queries else 1
        # (tensor, its rows a .. b - 1, their global index base, the launch's transposed direction)
        if dir_.candidates_are_docs:
            blocks = [(1 + k, 0, x.shape[0], base, -1) for k, (x, base) in enumerate(zip(xs[1:], bases))]
        else:
            blocks = [(0, 0, world, 0, -1)]
        if gram and dir_.mask_own:  # the first block (base 0) holds the rows themselves: local .. local + B - 1
            k, n = blocks[0][0], blocks[0][2]
            blocks[:1] = [(k, 0, p.offset, 0, -1), (k, *bounds, p.offset, i), (k, bounds[1], n, bounds[1], -1)]
        elif merged and dir_.bit == DOC_TO_QUERY:
            blocks = [(0, 0, p.offset, 0, -1), (0, bounds[1], world, bounds[1], -1)]
        for k, a, b, base, transposed in blocks:
            if b <= a:
                continue
            options = dict(
                period=world, offset=p.offset, mask_own=dir_.mask_own, pen_mode=dir_.pen_mode, alpha=p.alpha, base=base
            )
            operands = (xs[rows_of][local], xs[k][a:b], invs[rows_of][local], invs[k][a:b])
            positive = _holds_positive(dir_.bit) and base == 0 and b > p.offset
            if merged and positive and dir_.bit == QUERY_TO_DOC:
                transposed = back
            out.append(Launch(i, rows_of, k, positive, operands, options, start=a, transposed=transposed))
    return out


def _doc_blocks(d: Tensor | Sequence[Tensor], p: MNRLParams) -> list[Tensor]:
    """The flash op's docs as a list of blocks of candidates ([n_k, D] each, in order); the first holds the local
    positives (rows offset .. offset + batch - 1 of the candidates)."""
    blocks = [d] if isinstance(d, Tensor) else list(d)
    if not blocks or blocks[0].shape[0] < p.offset + p.batch:
        raise ValueError(
            f"mnrl: the first block of docs must hold the positives, rows [{p.offset}, {p.offset + p.batch}), got "
            f"{[tuple(b.shape) for b in blocks]}"
        )
    return blocks


def _positive_sims(q: Tensor, d: Tensor, q_inv: Tensor, d_inv: Tensor, p: MNRLParams) -> Tensor:
    """s(q_i, d_i) of the local rows, in the dtype of the inverse norms."""
    local = slice(p.offset, p.offset + p.batch)
    return _row_dots(q[local], d[local], q_inv.dtype) * q_inv[local] * d_inv[local]


def _holds_positive(bit: int) -> bool:
    """Whether the direction holds the positive pair (q_i, d_i) as a column: query_to_doc and doc_to_query."""
    return bit in (QUERY_TO_DOC, DOC_TO_QUERY)


def positive_shares(p: MNRLParams) -> list[float]:
    """Each selected direction's share of the positive's -1: 1 / k for the k directions that hold the positive
    (query_to_doc, and doc_to_query when selected: per direction they are all of them), 0 for the others."""
    holds = [_holds_positive(dir_.bit) for dir_ in directions(p)]
    return [1.0 / sum(holds) if h else 0.0 for h in holds]


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x) without F.softplus's threshold (which returns x above 20: off by e^-20, beyond fp64's ulp)."""
    return x.clamp_min(0.0) + torch.log1p(torch.exp(-x.abs()))


def positive_terms(lse: Tensor, nlse: Tensor, positive: Tensor, p: MNRLParams) -> tuple[Tensor, Tensor]:
    """(row losses [B], pos_val [n_dir, B]) from each direction's LSE [2, n_dir, B], its NLSE (the LSE without the
    positive's column; rows of directions without the positive unused), both in two parts (fastloss.ops.two_part),
    and the positive logits (joint: [B], from query_to_doc; per direction: [B] or each direction's own [n_dir, B]):
    pos_val is the positive entry's coefficient p - share divided by its direction's weight, i.e. what replaces the
    entry's softmax value P, and +inf where the -1 stays a separate term (shares: 1 / k for each of the k directions
    that hold the positive). Module docstring. The parts keep the rounding of one fp32 LSE, ulp(|lse|) / 2, out of x
    (the positive's log-odds) and the weights: x = (hi - positive) + lo, exact where the loss is small.
    The flash kernels take pos_val as it is; the row-block ops scale it to their units. For several directions:
    query_to_doc alone (the only single direction, since it holds the positive) takes one_direction_terms; the flash
    forward computes the same values (and its log_z) in one launch: sim_lse.directions_terms."""
    if not p.joint:  # every direction holds the positive, each with weight 1 / n_dir and its own -1 / n_dir
        x = (nlse[0] - positive) + nlse[1]
        return _softplus(x).mean(dim=0), -torch.sigmoid(x)
    # joint: k directions hold a copy of the positive logit, so Z = k e^pos + N, the loss is log Z - pos =
    # log k + softplus(x - log k) and each copy takes -1 / k: e^pos / Z - 1 / k = -sigmoid(x - log k) / k
    shares = positive_shares(p)
    share = max(shares)  # 1 / k
    log_k = -math.log(share)
    # the row's mass without one copy of the positive, per direction
    held = torch.stack([nlse[:, k] if s else lse[:, k] for k, s in enumerate(shares)], dim=1)
    x_hi, x_lo = logsumexp2(held, dim=1)
    x = (x_hi - positive) + x_lo
    z_hi, z_lo = logsumexp2(lse, dim=1)  # the row's joint LSE; each direction's share of its mass:
    weight = torch.exp((lse[0] - z_hi) + (lse[1] - z_lo))
    coefficient = -torch.sigmoid(x - log_k) * share
    # folded where the copies hold at least half the mass (x <= log k): there every copy's weight is >= 1 / (2k),
    # so |pos_val| <= 1; elsewhere the -1 stays separate (p - 1 <= -1/2: nothing cancels)
    folded = torch.where(x <= log_k, coefficient, float("inf"))
    return log_k + _softplus(x - log_k), torch.stack(
        [folded / w if s else torch.full_like(w, float("inf")) for w, s in zip(weight, shares)]
    )


def one_direction_terms(nlse: Tensor, positive: Tensor, joint: bool) -> Tensor:
    """positive_terms' values for query_to_doc alone as [pos_val, x] [2, B], x = NLSE - positive, the row loss being
    softplus(x), in a few torch ops (the row-block op's torch row passes; the Triton paths compute the same in a
    kernel: sim_lse.one_direction_terms, block_softmax.row_stats): with one direction positive_terms' logsumexp over
    the directions is the NLSE itself, log k = -0.0 and the direction's weight exactly 1. pos_val: -sigmoid(x), the
    positive's p - 1; joint: +inf where x > 0, where the -1 stays a separate term."""
    out = torch.empty((2, nlse.shape[0]), device=nlse.device, dtype=nlse.dtype)
    x = torch.sub(nlse, positive, out=out[1])
    coefficient = torch.sigmoid(x, out=out[0]).neg_()
    if joint:
        coefficient.masked_fill_(x > 0.0, torch.inf)  # x is never NaN: the positive's logit and the NLSE are finite
    return out


def _combine(parts: list[Tensor]) -> Tensor:
    """The LSE over several blocks of candidates from each block's LSE, in two parts [2, B] (fastloss.ops.two_part)."""
    return parts[0] if len(parts) == 1 else logsumexp2(torch.stack(parts, dim=1), dim=1)


# With query_to_doc and doc_to_query (the symmetric loss, GTE's four directions) the forward takes doc_to_query's
# logsumexp over the local queries from query_to_doc's tiles (sim_lse_fwd's nlse_t) while their partial statistics,
# 2B fp32 values per 32 local queries (two parts: 256 MiB at B = 32768), stay within this; beyond it doc_to_query runs
# its own launch over every query, as the other directions do.
TRANSPOSED_FWD_BYTES = 256 * 2**20


def mnrl_fwd(
    q: Tensor, d: Tensor | Sequence[Tensor], scale: Tensor, p: MNRLParams
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flash-style forward of queries ``q`` [W, D] and docs ``d``: [kW, D] or blocks of its rows in order (the doc
    columns, uncopied); (loss fp32 [], per-direction LSE fp32 [2, n_dir, B], log-partition fp32 [2, B] (both in two
    parts: fastloss.ops.two_part), the backward's pos_val fp32 [n_dir, B]; for the backward, which would compute them
    again, the inverse norms of q and each block in one vector (_inv_offsets) and the positive pairs' similarities fp32
    [B], from fastloss.ops.l2norm.inverse_norms: one launch per tensor, where torch ops took ~10 for two)."""
    from fastloss.ops.l2norm import inverse_norms
    from fastloss.ops.sim_lse import directions_terms, sim_lse_fwd, transposed_bytes
    from fastloss.ops.sim_lse import one_direction_terms as terms_in_one_launch

    docs = _doc_blocks(d, p)
    xs = [q, *docs]
    offsets = _inv_offsets([x.shape[0] for x in xs])
    inv, sims = inverse_norms(xs, offsets[:-1], offsets[-1], p.normalize, pairs=(p.offset, p.batch))
    invs = _split_inv_norms(inv, xs)
    alone = p.directions == QUERY_TO_DOC  # the drop-ins' default
    positive = None if alone else scale.float() * sims
    lse_parts: list[list[Tensor]] = [[] for _ in range(p.n_directions)]
    nlse_parts: list[list[Tensor]] = [[] for _ in range(p.n_directions)]
    # doc_to_query over the local queries from query_to_doc's tiles of the positives' block
    merged = merges_transposed(p) and transposed_bytes(p.batch, p.batch) <= TRANSPOSED_FWD_BYTES
    for launch in _launches(xs, invs, p, merged=merged):
        transposed, back = {}, launch.transposed
        if back >= 0:
            transposed = dict(nlse_t=torch.empty((2, p.batch), device=q.device, dtype=torch.float32))
        lse_b, nlse_b = sim_lse_fwd(
            *launch.operands, scale, positive_col=launch.positive, **launch.options, **transposed
        )
        lse_parts[launch.direction].append(lse_b)
        nlse_parts[launch.direction].append(lse_b if nlse_b is None else nlse_b)  # without the positive: its LSE
        if transposed:  # doc_to_query's local part: its negatives among the local queries
            nlse_parts[back].append(transposed["nlse_t"])
    if alone:  # the loss and pos_val in one launch; log_z is the LSE itself (a logsumexp or mean over one direction)
        lse = _combine(lse_parts[0])
        loss, pos_val = terms_in_one_launch(_combine(nlse_parts[0]), sims, scale, p.joint)
        return loss, lse[:, None], lse.clone(), pos_val, inv, sims
    # The directions that hold the positive take their LSE from their NLSE and the positive, in directions_terms (the
    # tiles' LSE of query_to_doc goes unused; doc_to_query's merged launch gives its NLSE only): an LSE from the tiles
    # can round below the positive, whose logit comes from inverse_norms (by 2 ulps at |logit| ~ 1e11: extreme dot
    # products), and that direction's share of the joint LSE then underflows to 0, 0 / 0 = NaN in its pos_val. The
    # others' LSE is their NLSE.
    shares = positive_shares(p)
    nlse = torch.stack([_combine(parts) for parts in nlse_parts], dim=1)  # [2, n_dir, B]
    lse = nlse.clone()  # the holders' entries are placeholders, written by directions_terms
    # positive_terms' values and log_z (per direction the mean of the LSEs, of each part: the backward reads it in
    # the joint partition only) in one launch, which writes the holders' LSE into lse
    loss, log_z, pos_val = directions_terms(
        lse, nlse, positive, shares, p.joint, [k for k, s in enumerate(shares) if s]
    )
    return loss, lse, log_z, pos_val, inv, sims


# The flash backward holds the fp32 gradients of a window of rows at a time (one buffer for q's and d's windows): at
# the GPU target (32768 queries, 65536 docs, D = 1024) whole fp32 dq_hat and dd_hat would take 384 MiB, against the 1%
# target of sentence-transformers' 33 GiB there (projected: python -m benchmarks.projection). A window holds about
# WINDOW_BYTES, but on CUDA at least WINDOW_ROWS_PER_SM rows per SM: one 128-row program for every SM, since each
# program loops over every candidate and a grid smaller than the GPU leaves SMs idle for the whole launch. Two per SM
# (256 rows, the wide tiles' occupancy) bought nothing on an H200 at the GPU target (fwd+bwd 189.5 ms with 256,
# 187.7 with 128; loss-stage memory 129.6 -> 67.6 MiB; 2026-11-29, scripts/gpu_check.sh). Elsewhere (the Triton
# interpreter) WINDOW_ROWS_MIN.
WINDOW_BYTES = 64 * 2**20
WINDOW_ROWS_PER_SM = 128
WINDOW_ROWS_MIN = 16384


def default_window_rows(dim: int, sms: int | None) -> int:
    """The default window for rows of ``dim`` on a GPU with ``sms`` SMs (None: not CUDA)."""
    least = WINDOW_ROWS_PER_SM * sms if sms else WINDOW_ROWS_MIN
    return max(least, WINDOW_BYTES // (4 * max(1, dim)) // 128 * 128)


# The flash op takes the doc columns as blocks (uncopied) where each column fills a GPU by itself, at least
# BLOCK_ROWS_PER_SM rows per SM (one 128-row program per SM in each launch over a column's rows), else concatenated:
# each block is a launch of its own, and small columns' launches would run one after another with SMs idle, where
# one launch over their concatenation fills the GPU (and their copy is small). Off CUDA (the Triton interpreter), always
# blocks.
BLOCK_ROWS_PER_SM = 128


def columns_as_blocks(rows: int, sms: int | None) -> bool:
    """Whether doc columns of ``rows`` rows go into the flash op as blocks on a GPU of ``sms`` SMs (None: not CUDA)."""
    return sms is None or rows >= BLOCK_ROWS_PER_SM * sms


def window_rows(x: Tensor) -> int:
    """Rows of fp32 gradient the flash backward holds per window of ``x`` [rows, D]: FASTLOSS_FLASH_WINDOW_ROWS
    (0: the whole tensor), or the default above."""
    value = os.environ.get("FASTLOSS_FLASH_WINDOW_ROWS", "").strip()
    if value:
        if not value.isdigit():
            raise ValueError(f"FASTLOSS_FLASH_WINDOW_ROWS must be a whole number of rows (0: whole), got {value!r}")
        return int(value) or max(1, x.shape[0])
    return default_window_rows(x.shape[1], _sm_count(x))


def _sm_count(x: Tensor) -> int | None:
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else None


def mnrl_bwd(
    grad: Tensor,
    q: Tensor,
    d: Tensor | Sequence[Tensor],
    scale: Tensor,
    lse: Tensor,
    log_z: Tensor,
    pos_val: Tensor,
    inv: Tensor,
    sims: Tensor,
    p: MNRLParams,
) -> tuple[Tensor, list[Tensor], Tensor]:
    """Flash-style backward: (dq, [dd of each block of docs], dscale) for the incoming scalar ``grad``, given the
    forward's outputs (``inv``, ``sims``: its inverse norms and positive similarities). Per window of rows of q, then
    of each block of docs, each launch whose rows or candidates are those rows adds its part of dx_hat to one fp32
    buffer, the positive's separate term joins, and the normalisation backward writes those rows of dx."""
    from fastloss.ops.sim_lse import SimLseBackward, backward_weights

    docs = _doc_blocks(d, p)
    xs = [q, *docs]
    invs = _split_inv_norms(inv, xs)
    merged = merges_transposed(p)
    # each direction's dL/dLSE weights, h per row, the merged launch's positive coefficient and the separate -1's
    # (joint: the rows where pos_val is +inf, p - 1 <= -1/2; per direction every row folds it) in one launch
    weights, h, pair_pv, coef, separate_dot = backward_weights(
        grad, scale, lse, log_z, pos_val, sims, p.joint, _transposed_index(p) if merged else 0
    )
    # each tensor's parts: (launcher, its dscale for a rows part else None, first row of the tensor it covers, rows)
    parts: list[list] = [[] for _ in xs]
    launches = _launches(xs, invs, p, merged=merged, gram=merges_gram(p))
    # each rows launch's dscale per row: the launches over Gram blocks last, whose entries each count twice
    dscales = torch.empty((len(launches), p.batch), device=q.device, dtype=torch.float32)
    n_own = sum(not launch.gram for launch in launches)
    own, gram = iter(range(n_own)), iter(range(n_own, len(launches)))
    for launch in launches:
        i, back = launch.direction, launch.transposed
        lse_i, g_i, pv, transposed = lse[:, i], weights[i], pos_val[i], {}
        if back >= 0:  # another direction's rows (doc_to_query in query_to_doc) or its own (a Gram block) with it
            if p.joint:  # exp(logit - log_z) of either row's joint softmax, weight h
                lse_i, g_i, transposed = log_z, h, dict(lse_t=log_z)
            else:
                transposed = dict(lse_t=lse[:, back])
        if launch.positive and back >= 0:  # the positive entry takes both directions' coefficients
            pv = pair_pv
        bwd = SimLseBackward(
            *launch.operands,
            scale,
            lse_i,
            g_i,
            pos_val=pv if launch.positive else None,
            **launch.options,
            **transposed,
        )
        parts[launch.rows_of].append((bwd, dscales[next(gram if launch.gram else own)], p.offset, p.batch))
        if not launch.gram:  # a Gram block's candidates are its rows, whose launch took their transposed entries
            parts[launch.block].append((bwd, None, launch.start, launch.operands[1].shape[0]))
    dxs = [torch.empty_like(x) for x in xs]
    size = max(min(window_rows(x), x.shape[0]) for x in xs)
    buffer = torch.empty((size, q.shape[1]), device=q.device, dtype=torch.float32)
    for k, (x, x_inv, dx) in enumerate(zip(xs, invs, dxs)):
        step = max(1, min(window_rows(x), x.shape[0]))
        for first in range(0, x.shape[0], step):
            last = min(first + step, x.shape[0])
            acc = buffer[: last - first]
            # launches covering the whole window first: the first of them writes the buffer, the others add to it
            spans = [(bwd, ds, max(first, lo), min(last, lo + n), lo) for bwd, ds, lo, n in parts[k]]
            spans.sort(key=lambda span: (span[2], span[3]) != (first, last))
            written = False
            for bwd, ds, a, b, lo in spans:
                if a >= b:
                    continue
                if not written and (a, b) != (first, last):
                    acc.zero_()
                    written = True
                if ds is None:
                    bwd.candidates(acc[a - first : b - first], a - lo, b - lo, accumulate=written)
                else:
                    bwd.rows(acc[a - first : b - first], a - lo, b - lo, accumulate=written, dscale=ds)
                written = True
            if not written:
                acc.zero_()
            positive = None  # the positive pair (q_i, d_i): q's rows and the first block's, in the Triton kernel
            if k < 2 and coef is not None:
                positive = _positive_rows(first, last - first, xs[1 - k], invs[1 - k], coef, p)
            _norm_backward(
                x[first:last], x_inv[first:last], acc, p.normalize, out=dx[first:last], fused=True, positive=positive
            )
    del acc, buffer
    dscale = dscales[:n_own].sum()
    if n_own < len(launches):
        dscale = dscale + dscales[n_own:].sum() * 0.5
    if separate_dot is not None:
        dscale = dscale - separate_dot
    return dxs[0], dxs[1:], dscale.to(scale.dtype).reshape(scale.shape)


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration


def _params(offset, batch, directions, joint, hardness, alpha, normalize) -> MNRLParams:
    return MNRLParams(offset, batch, directions, joint, hardness, alpha, normalize)


def _mnrl_fwd(
    q: Tensor,
    docs: list[Tensor],
    scale: Tensor,
    offset: int,
    batch: int,
    directions: int,
    joint: bool,
    hardness: int,
    alpha: float,
    normalize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return mnrl_fwd(q, docs, scale, _params(offset, batch, directions, joint, hardness, alpha, normalize))


def _mnrl_fwd_fake(q, docs, scale, offset, batch, directions, joint, hardness, alpha, normalize):
    n_dir = bin(directions).count("1")
    return (
        q.new_empty((), dtype=torch.float32),
        q.new_empty((2, n_dir, batch), dtype=torch.float32),
        q.new_empty((2, batch), dtype=torch.float32),
        q.new_empty((n_dir, batch), dtype=torch.float32),
        q.new_empty((_inv_offsets([q.shape[0], *(x.shape[0] for x in docs)])[-1],), dtype=torch.float32),
        q.new_empty((batch,), dtype=torch.float32),
    )


def _mnrl_bwd(
    grad: Tensor,
    q: Tensor,
    docs: list[Tensor],
    scale: Tensor,
    lse: Tensor,
    log_z: Tensor,
    pos_val: Tensor,
    inv: Tensor,
    sims: Tensor,
    offset: int,
    batch: int,
    directions: int,
    joint: bool,
    hardness: int,
    alpha: float,
    normalize: bool,
) -> tuple[Tensor, list[Tensor], Tensor]:
    p = _params(offset, batch, directions, joint, hardness, alpha, normalize)
    return mnrl_bwd(grad, q, docs, scale, lse, log_z, pos_val, inv, sims, p)


def _mnrl_bwd_fake(
    grad, q, docs, scale, lse, log_z, pos_val, inv, sims, offset, batch, directions, joint, hardness, alpha, normalize
):
    return torch.empty_like(q), [torch.empty_like(x) for x in docs], torch.empty_like(scale)


_mnrl_bwd_op = custom_op("mnrl_bwd", _mnrl_bwd, fake=_mnrl_bwd_fake)


def _fwd_setup_context(ctx, inputs, output):
    q, docs, scale, *args = inputs
    _, lse, log_z, pos_val, inv, sims = output
    ctx.save_for_backward(q, scale, lse, log_z, pos_val, inv, sims, *docs)
    ctx.args = tuple(args)


def _fwd_backward(ctx, grad_loss, _grad_lse, _grad_log_z, _grad_pos_val, _grad_inv, _grad_sims):
    q, scale, lse, log_z, pos_val, inv, sims, *docs = ctx.saved_tensors
    dq, dd, dscale = _mnrl_bwd_op(grad_loss, q, docs, scale, lse, log_z, pos_val, inv, sims, *ctx.args)
    return (dq, dd, dscale) + (None,) * len(ctx.args)


_mnrl_fwd_op = custom_op(
    "mnrl_fwd", _mnrl_fwd, fake=_mnrl_fwd_fake, setup_context=_fwd_setup_context, backward=_fwd_backward
)


def _run_native(q: Tensor, docs: list[Tensor], scale: Tensor, p: MNRLParams, need_grad: bool):
    from fastloss._backend import native_module

    loss, dq, dd, dscale = native_module().mnrl_fused(
        q.contiguous(),
        [c for x in docs for c in x.contiguous().split(q.shape[0])],  # its columns [W, D] where they lie: no copy
        scale.detach().to(_backend.accumulation_dtype(q)).cpu().reshape(()),
        *p.as_args(),
        need_grad,
    )
    return loss, dq.to(q.dtype), dd.to(q.dtype), dscale


def _run_blocked(q: Tensor, docs: list[Tensor], scale: Tensor, p: MNRLParams, need_grad: bool):
    from fastloss.ops.mnrl_blocked import mnrl_blocked

    return mnrl_blocked(q, docs, scale, p, need_grad)  # the columns as they come: no copy of them


def _fused_fake(q, docs, scale, offset, batch, directions, joint, hardness, alpha, normalize, need_grad):
    loss = q.new_empty((), dtype=_backend.accumulation_dtype(q))
    dd = q.new_empty((sum(x.shape[0] for x in docs), q.shape[1]))
    return loss, torch.empty_like(q), dd, torch.empty_like(scale)


def _fused_setup_context(ctx, inputs, output):
    _, dq, dd, dscale = output
    ctx.save_for_backward(dq, dd, dscale)
    ctx.rows = [x.shape[0] for x in inputs[1]]
    ctx.n_args = len(inputs) - 3


def _fused_backward(ctx, grad_loss, *_unused):
    dq, dd, dscale = ctx.saved_tensors
    g = grad_loss.float()
    dd = list((dd * g.to(dd.dtype)).split(ctx.rows))  # each doc column's rows
    return (dq * g.to(dq.dtype), dd, dscale * g.to(dscale.dtype)) + (None,) * ctx.n_args


def _gradient_in_forward_op(name: str, run):
    """A ``fastloss::<name>`` op (loss, dq, dd, dscale) = run(q, docs, scale, params, need_grad) of the row-block
    algorithm over the doc columns ``docs`` (dd: [kW, D], their rows in order): the gradients come out of the forward,
    and its backward only scales them by the incoming gradient."""

    def op(
        q: Tensor,
        docs: list[Tensor],
        scale: Tensor,
        offset: int,
        batch: int,
        directions: int,
        joint: bool,
        hardness: int,
        alpha: float,
        normalize: bool,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        p = _params(offset, batch, directions, joint, hardness, alpha, normalize)
        loss, dq, dd, dscale = run(q, docs, scale, p, need_grad)
        return loss, dq, dd, dscale.to(device=scale.device, dtype=scale.dtype).reshape(scale.shape)

    op.__name__ = op.__qualname__ = name
    return custom_op(name, op, fake=_fused_fake, setup_context=_fused_setup_context, backward=_fused_backward)


_mnrl_fused_op = _gradient_in_forward_op("mnrl_fused", _run_native)  # fastloss._C, CPU tensors
_mnrl_blocked_op = _gradient_in_forward_op("mnrl_blocked", _run_blocked)  # torch ops (+ Triton row passes on CUDA)


def mnrl(q: Tensor, docs: Tensor | Sequence[Tensor], scale: Tensor, p: MNRLParams, backend: str) -> Tensor:
    """The MNRL loss (fp32 scalar; fp64 from the row-block ops for fp64 inputs) of gathered queries ``q`` [W, D] and
    docs [kW, D], or its doc columns [W, D] in order, on a fused backend: ``triton`` (flash; it takes the columns as
    they are where columns_as_blocks), ``native`` (fastloss._C) or
    ``blocked`` (the row-block op, which takes them as they are)."""
    docs = [docs] if isinstance(docs, Tensor) else list(docs)
    if backend in ("native", "blocked"):
        # the columns go in as they come: both row-block ops read them uncopied
        need_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, scale, *docs))
        op = _mnrl_fused_op if backend == "native" else _mnrl_blocked_op
        return op(q, docs, scale, *p.as_args(), need_grad)[0]
    if backend == "triton":
        if len(docs) > 1:
            sms = _sm_count(q)
            docs = docs if columns_as_blocks(min(x.shape[0] for x in docs), sms) else [torch.cat(docs, dim=0)]
        return _mnrl_fwd_op(q, docs, scale, *p.as_args())[0]
    raise ValueError(f"mnrl: no fused implementation for backend {backend!r}")
