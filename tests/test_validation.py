"""fastloss._validation: the checks every op runs before a kernel."""

import pytest
import torch
from _helpers import host_syncs
from torch._subclasses.fake_tensor import FakeTensorMode

import fastloss.functional as F
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


def _fake_cuda_syncs(call) -> list[str]:
    """The host syncs of ``call()`` on fake CUDA tensors (FakeTensorMode; _helpers.host_syncs)."""
    syncs = []
    with FakeTensorMode(), host_syncs(syncs):
        call()
    return syncs


def _cuda(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="cuda", dtype=dtype)


B, D = 33, 16
SYNC_CASES = {
    "mnrl": lambda: F.mnrl_loss(_cuda(B, D), [_cuda(B, D), _cuda(B, D)], 20.0),
    "mnrl-scale-tensor": lambda: F.mnrl_loss(_cuda(B, D), [_cuda(B, D)], _cuda((), dtype=torch.float32)),
    "mnrl-scale-cpu": lambda: F.mnrl_loss(_cuda(B, D), [_cuda(B, D)], torch.tensor(20.0)),
    "mnsrl": lambda: F.mnsrl_loss(_cuda(B, D), _cuda(B, D), 20.0),
    "cosent": lambda: F.cosent_loss(_cuda(B, D), _cuda(B, D), _cuda(B, dtype=torch.float32)),
    "cosent-scale-tensor": lambda: F.cosent_loss(
        _cuda(B, D), _cuda(B, D), _cuda(B, dtype=torch.float32), _cuda(1, dtype=torch.float32)
    ),
    "cosent-int-labels": lambda: F.cosent_loss(_cuda(B, D), _cuda(B, D), _cuda(B, dtype=torch.long)),
    "angle": lambda: F.angle_loss(_cuda(B, D), [_cuda(B, D), _cuda(B, D)]),
    "batch_hard": lambda: F.batch_hard_triplet_loss(_cuda(B, D), _cuda(B, dtype=torch.long)),
    "batch_hard_soft_margin": lambda: F.batch_hard_soft_margin_triplet_loss(_cuda(B, D), _cuda(B, dtype=torch.long)),
    "batch_all": lambda: F.batch_all_triplet_loss(_cuda(B, D), _cuda(B, dtype=torch.long)),
    "batch_semi_hard": lambda: F.batch_semi_hard_triplet_loss(_cuda(B, D), _cuda(B, dtype=torch.long)),
}


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_one_host_sync_a_call(monkeypatch, case, check):
    """On CUDA a host sync stops the host from queueing work ahead of the GPU (in training: the loss's launches wait
    for the encoder's forward to finish). A loss call makes one: the read of its values checks (NaN/Inf in the
    embeddings and CoSENT's scores, a scale tensor's value), none with FASTLOSS_CHECK_FINITE=0; a float scale is
    filled on the device, not copied there (torch.tensor(x, device="cuda") is a copy and a sync). Counted on fake
    CUDA tensors: copies between host and device and scalar reads of device tensors."""
    monkeypatch.setenv("FASTLOSS_CHECK_FINITE", "1" if check else "0")
    # a scale tensor on the CPU is read there (no sync) and copied to the embeddings' device, autograd's way
    copy = ["host_to_device"] if case.endswith("scale-cpu") else []
    assert _fake_cuda_syncs(SYNC_CASES[case]) == (["device_to_host"] if check else []) + copy


BAD_SCALES = [0.0, -1.0, float("nan"), float("inf")]


@pytest.mark.parametrize("bad", BAD_SCALES, ids=["zero", "negative", "nan", "inf"])
@pytest.mark.parametrize("loss", ["mnrl", "cosent", "angle"])
def test_scale_tensor_values(loss, bad):
    """A scale tensor on the embeddings' device is read with them (check_finite's one read): a value <= 0 or not
    finite is a ValueError naming it, before the NaN in the embeddings (the checks' order); none is read with
    FASTLOSS_CHECK_FINITE=0."""
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    a[1, 2] = float("nan")
    scale = torch.tensor([bad])
    call = {
        "mnrl": lambda: F.mnrl_loss(a, [b], scale),
        "cosent": lambda: F.cosent_loss(a, b, torch.rand(5), scale),
        "angle": lambda: F.angle_loss(a, [b, b], scale=scale),
    }[loss]
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        call()


def test_labels_and_embeddings_in_one_read(monkeypatch):
    """CoSENT's floating scores are checked in the same read as the embeddings, scores first; integer labels need no
    check; FASTLOSS_CHECK_FINITE=0 skips both."""
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    labels = torch.rand(6)
    labels[4] = float("inf")
    with pytest.raises(ValueError, match="labels contains NaN or Inf"):
        F.cosent_loss(a.index_fill(0, torch.tensor([0]), float("nan")), b, labels)
    with pytest.raises(ValueError, match="a contains NaN or Inf"):
        F.cosent_loss(a.index_fill(0, torch.tensor([0]), float("nan")), b, torch.arange(6))
    assert torch.isfinite(F.cosent_loss(a, b, torch.arange(6), torch.tensor(20.0)))
    monkeypatch.setenv("FASTLOSS_CHECK_FINITE", "0")
    F.cosent_loss(a, b, labels, torch.tensor(-1.0))  # nothing read: no error, whatever the values give
