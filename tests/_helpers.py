"""Small shared helpers for the tests (not collected: no test_ prefix)."""

from __future__ import annotations

import torch
from packaging.version import Version

from fastloss import _backend


def sentence_transformers_at_least(version: str) -> bool:
    """fastloss mirrors sentence-transformers 6.2; the GPU image holds 6.0.1, where some comparisons must differ."""
    import sentence_transformers

    return Version(sentence_transformers.__version__) >= Version(version)


# sentence-transformers < 6.2 finds the semi-hard negative by a masked minimum, min((d - rowmax) * mask) + rowmax,
# whose rounding moves hinges that tie exactly (integer embeddings) off 0 and so changes the gradient there; 6.2 sorts
# and searches, exactly, as fastloss does. Exact-tie comparisons of semi-hard against ST need 6.2.
ST_EXACT_SEMI_HARD_TIES = sentence_transformers_at_least("6.2")


def available_backends() -> list[str]:
    """Backends the CPU-tensor tests can run: the reference; native if built; triton under TRITON_INTERPRET=1."""
    out = ["torch"]
    if _backend.native_has("mnrl_fused"):
        out.append("native")
    if _backend.triton_available() and _backend.triton_interpret():  # CPU tensors need the interpreter
        out.append("triton")
    return out


def force_configs(monkeypatch, kernel, configs: list) -> None:
    """An autotuned Triton kernel tunes among exactly ``configs`` (no pruning) from its next call, as if new."""
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "early_config_prune", None)
    monkeypatch.setattr(kernel, "cache", {})


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
