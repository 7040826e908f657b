"""Small shared helpers for the tests (not collected: no test_ prefix)."""

from __future__ import annotations

import torch

from fastloss import _backend


def available_backends() -> list[str]:
    """Backends the tests can run here: always the reference; native if built; triton on CUDA or interpreted."""
    out = ["torch"]
    if _backend.native_has("mnrl_fused"):
        out.append("native")
    if _backend.triton_available() and (torch.cuda.is_available() or _backend.triton_interpret()):
        out.append("triton")
    return out


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
