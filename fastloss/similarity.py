"""Similarity functions with sentence-transformers' semantics, and recognition of the ones the kernels fuse.

The kernels fuse cosine (L2-normalise, then dot) and dot-product similarity. ``kernel_kind`` maps a callable to
``"cos"`` / ``"dot"`` when it is ours, sentence-transformers' or a model's ``similarity`` bound to one of them, and
to None otherwise (the caller then falls back to the reference with a one-time warning).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-12  # torch.nn.functional.normalize's default, which sentence-transformers uses


def normalize_embeddings(x: Tensor) -> Tensor:
    return F.normalize(x, p=2, dim=-1, eps=NORM_EPS)


def promote_half(x: Tensor) -> Tensor:
    """fp32 for a floating tensor narrower than fp32 (fp16, bf16, fp8), as sentence-transformers 6.x's similarity
    functions promote their inputs (its util's _convert_to_float_tensor): a half-precision matmul rounds every
    similarity to the input dtype (bf16: up to 2e-3 near 1, 0.04 in a logit at scale 20), as much as a confident
    model's whole loss."""
    return x.float() if x.is_floating_point() and torch.finfo(x.dtype).bits < 32 else x


def cos_sim(a: Tensor, b: Tensor) -> Tensor:
    return torch.mm(normalize_embeddings(promote_half(a)), normalize_embeddings(promote_half(b)).transpose(0, 1))


def dot_score(a: Tensor, b: Tensor) -> Tensor:
    return torch.mm(promote_half(a), promote_half(b).transpose(0, 1))


def pairwise_cos_sim(a: Tensor, b: Tensor) -> Tensor:
    return (normalize_embeddings(promote_half(a)) * normalize_embeddings(promote_half(b))).sum(dim=-1)


def pairwise_dot_score(a: Tensor, b: Tensor) -> Tensor:
    return (promote_half(a) * promote_half(b)).sum(dim=-1)


_MATRIX_NAMES = {"cos_sim": "cos", "pytorch_cos_sim": "cos", "dot_score": "dot"}
_PAIRWISE_NAMES = {"pairwise_cos_sim": "cos", "pairwise_dot_score": "dot"}
_MODEL_FN_NAMES = {"cosine": "cos", "dot": "dot"}
_TRUSTED_MODULES = ("fastloss.similarity", "sentence_transformers.util")


def _kind(fn: Callable, names: dict[str, str], method: str) -> str | None:
    if isinstance(fn, functools.partial):
        return None
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", None)
    if owner is not None and name == method and hasattr(owner, "similarity_fn_name"):
        return _MODEL_FN_NAMES.get(str(owner.similarity_fn_name))
    module = getattr(fn, "__module__", "") or ""
    if name in names and module.startswith(_TRUSTED_MODULES):
        return names[name]
    return None


def kernel_kind(fn: Callable) -> str | None:
    """'cos' or 'dot' for a matrix similarity the kernels fuse, else None."""
    return _kind(fn, _MATRIX_NAMES, "similarity")


def pairwise_kernel_kind(fn: Callable) -> str | None:
    """'cos' or 'dot' for a pairwise similarity the kernels fuse, else None."""
    return _kind(fn, _PAIRWISE_NAMES, "similarity_pairwise")
