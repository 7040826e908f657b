"""Log-sum-exps in two fp32 parts: hi, the value rounded to fp32, and lo, what that rounding left off.

A softmax entry written from a saved log-sum-exp, exp(logit - lse), carries lse's rounding, up to ulp(|lse|) / 2, in
its exponent: at fp32 logits of 1e3 .. 1e5 (dot similarity on large embeddings) 6e-5 .. 4e-3 of the entry, even at a
row's dominant entry, which a softmax's exp(logit - max) / sum gets exact. From both parts, exp((logit - hi) - lo):
logit - hi is exact where the entry matters (a logit within a factor 2 of hi), and lo brings the rest to fp32's
precision. The flash op's kernels (fastloss.ops.sim_lse) write and read them as fp32 tensors [2, ...], the parts
first; a kernel's row writes lo = (max - hi) + log(sum) of its running max and sum (sim_lse._log_sum_parts). Any
split whose parts add up to the value serves the functions here (hi a logit, lo a log of a sum: from_max_sum, the
row-block op's statistics); -inf is (-inf, 0)."""

from __future__ import annotations

import torch
from torch import Tensor


def exact(x: Tensor) -> Tensor:
    """A value that fp32 holds exactly (a logit) as two parts [2, ...]: lo = 0."""
    return torch.stack([x, torch.zeros_like(x)])


def from_max_sum(top: Tensor, total: Tensor) -> Tensor:
    """log(total) + top, a row's LSE from its max logit and sum of exp(logit - max) [...], as two parts [2, ...]:
    (top, log(total)), (-inf, 0) where total is 0."""
    empty = total == 0.0
    return torch.stack([top.masked_fill(empty, float("-inf")), total.log().masked_fill_(empty, 0.0)])


def logsumexp2(x: Tensor, dim: int, *, overwrite: bool = False) -> Tensor:
    """The log-sum-exp over ``dim`` (>= 1: a dim of x, past the parts) of two-part values ``x`` [2, ...], as two
    parts [2, ...] without that dim: ref + log(sum exp((hi - ref) + lo)) with ref the largest hi, which each part of
    the result keeps apart; (-inf, 0) where every value is -inf. ``overwrite``: x's hi part is the scratch of the
    exponentials (no temporary of x's size; the flash forward's partial statistics, up to 128 MiB each part)."""
    if dim < 1:
        raise ValueError(f"logsumexp2: dim must be >= 1 (dim 0 holds the parts), got {dim}")
    hi, lo = x[0], x[1]
    top = hi.amax(dim=dim - 1, keepdim=True)
    ref = torch.where(top == float("-inf"), 0.0, top)  # exp(-inf - 0) = 0, not NaN, where every value is -inf
    terms = hi.sub_(ref) if overwrite else hi - ref
    total = terms.add_(lo).exp_().sum(dim=dim - 1)
    ref = ref.squeeze(dim - 1)
    log_total = total.log()
    out_hi = ref + log_total
    out_lo = torch.where(total > 0.0, (ref - out_hi) + log_total, 0.0)
    return torch.stack([out_hi, out_lo])
