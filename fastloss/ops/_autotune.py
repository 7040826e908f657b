"""Autotune pieces shared by the Triton kernels' host code (no triton import here: fastloss.ops.triplet works without
triton)."""

from __future__ import annotations

import torch


def drop_fp32_tiles(configs: list, operand: torch.Tensor, fp32_tiles: list) -> list:
    """``configs`` without the tiles of ``fp32_tiles`` (matched by identity) unless ``operand`` is fp32: the tiles kept
    for fp32 operands only are neither compiled nor timed for half dtypes. Never empty."""
    if operand.dtype == torch.float32:
        return list(configs)
    return [cfg for cfg in configs if all(cfg is not tile for tile in fp32_tiles)] or configs[:1]
