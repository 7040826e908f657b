"""Input checks shared by the functional API: each raises ValueError naming the argument and the expected form,
before any kernel runs. Shape/dtype checks read metadata only. The checks of values in tensors (NaN/Inf in the
embeddings and in CoSENT's scores, a scale tensor's value) are one read of the data and one host sync in all
(check_finite; FASTLOSS_CHECK_FINITE=0 skips them, e.g. under torch.compile): on CUDA a sync stops the host from
queueing work ahead of the GPU, and each call of a loss would otherwise take two (a scale tensor's value, or the
copy of a float scale to the device, besides the embeddings)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_embeddings(name: str, x: object, *, dim: int | None = None, batch: int | None = None) -> Tensor:
    """A floating [batch, dim] tensor with at least one row."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [batch, dim], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); expected at least one row")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has embedding dimension 0 (shape {tuple(x.shape)}); expected dim >= 1")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} (as the first input), got {x.shape[0]}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have embedding dimension {dim} (as the first input), got {x.shape[1]}")
    return x


def check_same(name: str, x: Tensor, like: Tensor, like_name: str) -> None:
    if x.dtype != like.dtype:
        raise ValueError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {x.dtype}")
    if x.device != like.device:
        raise ValueError(f"{name} must be on the device of {like_name} ({like.device}), got {x.device}")


def reads_data() -> bool:
    """Whether the checks that read tensor values run (FASTLOSS_CHECK_FINITE, default on)."""
    return os.environ.get("FASTLOSS_CHECK_FINITE", "1") != "0"


def check_finite(
    tensors: Sequence[tuple[str, Tensor]],
    *,
    scale: object = None,
    scale_name: str = "scale",
    labels: Tensor | None = None,
    labels_name: str = "labels",
    cast_from: Sequence[Tensor] | None = None,
) -> None:
    """NaN/Inf in the embeddings ``tensors`` ((name, tensor) pairs, on one device), and with them, in the same read:
    the value of a ``scale`` tensor on their device (finite and > 0; check_scale takes every other scale) and NaN/Inf
    in floating ``labels``. Errors in the order scale, labels, embeddings. ``cast_from``: the tensors as the caller
    gave them, where ``tensors`` are their casts to autocast's dtype (whose range fp16's 65504 may not hold)."""
    if not tensors or not reads_data():
        return
    device = tensors[0][1].device
    # NaN/Inf propagate through a sum, and no B x D temp: first the fast fp32 (fp64) reductions, added up and read
    # once, then, only where that is not finite (NaN/Inf, or finite values overflowing fp32), each tensor's exact
    # fp64 one. On CPU the fp64 sum of fp32 values is not vectorised: 10-60x the fp32 sum, ~1.5 ms per 8 MiB on the
    # 2-core EPYC (> the CoSENT op)
    sums = [x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32) for _, x in tensors]
    read = [sum(sums[1:], sums[0]).double()]
    on_device = isinstance(scale, Tensor) and scale.device == device
    if on_device:
        read.append(scale.detach().reshape(()).double())
    scores = labels is not None and labels.is_floating_point()  # integer and bool labels are finite
    if scores:
        read.append(torch.isfinite(labels).all().double())
    values = torch.stack(read).cpu().tolist()  # the one host sync: one copy of 1-3 values
    total = values.pop(0)
    if on_device:
        _check_scale_value(values.pop(0), scale_name)
    if scores and values.pop(0) != 1.0:
        raise ValueError(f"{labels_name} contains NaN or Inf; expected finite similarity scores")
    if math.isfinite(total):
        return
    for k, ((name, x), fast) in enumerate(zip(tensors, sums)):
        if not bool(torch.isfinite(fast)) and not bool(torch.isfinite(x.sum(dtype=torch.float64))):
            if cast_from is not None and bool(torch.isfinite(cast_from[k]).all()):
                raise ValueError(
                    f"{name} holds values beyond {x.dtype}'s range ({torch.finfo(x.dtype).max:g}), the dtype "
                    "torch.autocast multiplies it in; expected embeddings that fit it (normalise them first, or "
                    "compute the loss outside autocast)"
                )
            raise ValueError(f"{name} contains NaN or Inf; expected finite embeddings")


def _check_scale_value(value: float, name: str) -> None:
    if not (value > 0.0 and value != float("inf")):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def check_scale(scale: object, name: str = "scale", device: torch.device | None = None) -> None:
    """A positive finite number, or a 0-d/1-element floating tensor holding one. The value of a tensor on ``device``
    (the embeddings') is check_finite's to read, with the embeddings; none is read with FASTLOSS_CHECK_FINITE=0."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(
                f"{name} must be a positive float or a 1-element float tensor, got shape "
                f"{tuple(scale.shape)} dtype {scale.dtype}"
            )
        if scale.device == device or not reads_data():
            return
        value = float(scale.detach())
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        value = float(scale)
    else:
        raise ValueError(f"{name} must be a positive float or a 1-element float tensor, got {type(scale).__name__}")
    _check_scale_value(value, name)
