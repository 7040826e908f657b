"""Autotune pieces shared by the Triton kernels' host code (no triton import here: fastloss.ops.triplet works without
triton)."""

from __future__ import annotations

import os

import torch

# Row counts from which the autotuned kernels keep the tile they chose (the size class of tune_bucket stops growing)
TUNE_ROWS_MAX = 2**15


def tune_bucket(rows: int) -> int:
    """The size class of a row count in the autotune keys: 0 up to 1024 rows (tests and the benchmarks' parity checks
    share one tuning), then one class per power of two up to TUNE_ROWS_MAX. Without it the first call for a D (a small
    check, say) would choose the tile for every later size. Past TUNE_ROWS_MAX (hundreds of row blocks, several waves
    of programs on any GPU) the choice is taken to hold: a million-row call does not time every tile again."""
    return 0 if rows <= 1024 else min(rows, TUNE_ROWS_MAX).bit_length()


def without_tiles(configs: list, tiles: list) -> list:
    """``configs`` without ``tiles`` (matched by identity). Never empty: the first config is left if all would go."""
    return [cfg for cfg in configs if all(cfg is not tile for tile in tiles)] or configs[:1]


def drop_fp32_tiles(configs: list, operand: torch.Tensor, fp32_tiles: list) -> list:
    """``configs`` without the tiles of ``fp32_tiles`` unless ``operand`` is fp32: the tiles kept for fp32 operands
    only are neither compiled nor timed for half dtypes. Never empty."""
    return list(configs) if operand.dtype == torch.float32 else without_tiles(configs, fp32_tiles)


def first_only(configs: list) -> list:
    """``configs`` as the kernels' pruning left them, or only the first of them under FASTLOSS_AUTOTUNE=first: one
    tile compiled per kernel and key and nothing timed (the GPU tests on a short device lease spent their time
    compiling and timing every tile of every new key). Read at each new key, so it can change between calls."""
    return list(configs[:1]) if os.environ.get("FASTLOSS_AUTOTUNE", "").strip() == "first" else configs
