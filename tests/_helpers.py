"""Small shared helpers for the tests (not collected: no test_ prefix)."""

from __future__ import annotations

import torch

from fastloss import _backend


def available_backends() -> list[str]:
    """Backends the CPU-tensor tests can run: the reference; native if built; triton under TRITON_INTERPRET=1."""
    out = ["torch"]
    if _backend.native_has("mnrl_fused"):
        out.append("native")
    if _backend.triton_available() and _backend.triton_interpret():  # CPU tensors need the interpreter
        out.append("triton")
    return out


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
