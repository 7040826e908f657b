"""All-gather with gradient over torch.distributed (NCCL on GPU, gloo on CPU), as sentence-transformers does it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fastloss._backend import warn_once


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0; gradients flow back to each rank's own rows.

    Without an initialised process group this returns ``tensor`` (and warns once), as sentence-transformers does.
    """
    if not is_initialized():
        warn_once(
            "fastloss: gather_across_devices=True but torch.distributed is not initialised; using the local batch"
        )
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)
