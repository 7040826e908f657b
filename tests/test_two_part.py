"""Two-part log-sum-exps (fastloss.ops.two_part) against fp64."""

import pytest
import torch
from _helpers import two_part_value, two_parts

from fastloss.ops.mnrl import DOC_TO_QUERY, QUERY_TO_DOC, MNRLParams, positive_terms
from fastloss.ops.two_part import exact, from_max_sum, logsumexp2


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("magnitude", [1.0, 3e4, 1e6])
def test_logsumexp2_keeps_what_rounding_left_off(magnitude, overwrite):
    """Over dim 1 of [2, 5, 64] values whose LSE is ~magnitude: hi + lo within 5e-7 of the fp64 value (measured:
    1.3e-7 .. 2.1e-7, the ulps of log(sum) ~ 2), where hi alone is off by up to ulp(magnitude) / 2 (0.03 at 1e6)."""
    g = torch.Generator().manual_seed(0)
    x = magnitude + torch.randn(5, 64, generator=g, dtype=torch.float64) * 3
    x[2, :7] = float("-inf")
    parts = two_parts(x)
    got = logsumexp2(parts.clone(), dim=1, overwrite=overwrite)
    want = torch.logsumexp(x, dim=0)
    assert got.shape == (2, 64) and got.dtype == torch.float32
    assert torch.equal(got[0], two_part_value(got).float())  # hi is the value rounded, lo the rest
    assert float((two_part_value(got) - want).abs().max()) <= 5e-7
    if magnitude >= 3e4:
        assert float((got[0].double() - want).abs().max()) > 1e-4  # what lo is for


def test_logsumexp2_all_minus_inf_and_exact():
    x = torch.tensor([[float("-inf"), 2.0], [float("-inf"), 2.0]], dtype=torch.float64)
    got = logsumexp2(torch.stack([exact(x[0].float()), exact(x[1].float())], dim=1), dim=1)
    assert got[0, 0] == float("-inf") and got[1, 0] == 0.0  # (-inf, 0), no NaN
    assert abs(float(two_part_value(got)[1]) - (2.0 + float(torch.log(torch.tensor(2.0, dtype=torch.float64))))) <= 1e-7
    with pytest.raises(ValueError, match="dim must be >= 1"):
        logsumexp2(got, dim=0)


def test_from_max_sum():
    top = torch.tensor([3e4, 5.0, 0.0])
    got = from_max_sum(top, torch.tensor([7.0, 1.0, 0.0]))
    assert torch.equal(got[0], torch.tensor([3e4, 5.0, float("-inf")]))  # (-inf, 0) where the sum is 0
    assert torch.equal(got[1], torch.tensor([7.0, 1.0, 1.0]).log())  # log 7, log 1 = 0, and 0 for the empty row


@pytest.mark.parametrize("joint", [True, False])
def test_positive_terms_from_max_and_sum_at_large_logits(joint):
    """The row-block op's statistics (each direction's max logit and sums of exp(logit - max) with and without the
    positive) at logits ~3e4, rows where the positive holds most of the mass (query_to_doc and doc_to_query, which
    share the positive's logit): the row losses and pos_val within 1e-6 of the fp64 truth relative to their size
    (measured: 4.7e-8 .. 1.8e-7). From one rounded LSE per direction (as the row-block op passed them until
    2026-12-01) the positive's log-odds x carried up to ulp(3e4) / 2 = 1e-3: 1.3e-4 .. 8.5e-4."""
    g = torch.Generator().manual_seed(3)
    rows = 256
    top = (3e4 + torch.randn(2, rows, generator=g, dtype=torch.float64) * 2).float()
    positive = top[0] - torch.rand(rows, generator=g, dtype=torch.float64).float()
    top = torch.maximum(top, positive)  # each direction's max is at least its positive's logit
    negs = (torch.rand(2, rows, generator=g, dtype=torch.float64) * 0.1 + 1e-3).float()
    sums = (negs.double() + torch.exp(positive.double() - top.double())).float()
    p = MNRLParams(offset=0, batch=rows, directions=QUERY_TO_DOC | DOC_TO_QUERY, joint=joint)
    truth = positive_terms(
        from_max_sum(top.double(), sums.double()), from_max_sum(top.double(), negs.double()), positive.double(), p
    )
    got = positive_terms(from_max_sum(top, sums), from_max_sum(top, negs), positive, p)
    one_part = [exact(v[0] + v[1]) for v in (from_max_sum(top, sums), from_max_sum(top, negs))]
    rounded = positive_terms(*one_part, positive, p)
    for ours, old, want in zip(got, rounded, truth):  # row losses, then pos_val (+inf where the -1 is separate)
        assert ours.dtype == torch.float32 and torch.equal(ours.isfinite(), want.isfinite())
        assert _finite_error(ours, want) <= 1e-6
        assert _finite_error(old, want) > 5e-5  # what the parts are for


def _finite_error(x, want):
    """The largest error of x against fp64 ``want`` over want's largest magnitude, where want is finite."""
    finite = want.isfinite()
    return float((x.double() - want)[finite].abs().max() / want[finite].abs().max())
