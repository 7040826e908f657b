"""Two-part log-sum-exps (fastloss.ops.two_part) against fp64."""

import pytest
import torch
from _helpers import two_part_value, two_parts

from fastloss.ops.two_part import exact, logsumexp2


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
