"""fastloss._validation: the checks every op runs before a kernel."""

import pytest
import torch

from fastloss._validation import check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_finite_check_decides_exactly(dtype):
    """The validation's fast fp32 sum overflows on large finite values: the exact fp64 sum decides then."""
    big = torch.full((64, 8), torch.finfo(dtype).max, dtype=dtype)
    check_finite([("a", big)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[3, 5] = bad
        with pytest.raises(ValueError, match="a contains NaN or Inf"):
            check_finite([("a", x)])
        with pytest.raises(ValueError, match="a contains NaN or Inf"):
            check_finite([("a", torch.ones(64, 8, dtype=dtype).index_fill(0, torch.tensor([7]), bad))])
