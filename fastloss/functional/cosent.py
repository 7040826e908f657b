"""CoSENT and AnglE: ranking losses over the similarity of labelled pairs.

With ``s_p = scale * sim(a_p, b_p)`` and pair labels ``y``:  ``loss = log(1 + sum_{y_i < y_j} exp(s_i - s_j))``,
pairs with tied labels not compared. CoSENT takes any pairwise similarity (cosine, dot product and AnglE's angle
similarity are fused); AnglE is CoSENT with sentence-transformers' ``pairwise_angle_sim`` and also takes
(anchor, positive, negative_1, ...) n-tuples, whose pairs are labelled ``labels`` (default 1) and ``1 - labels``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastloss import _backend
from fastloss._validation import check_embeddings, check_finite, check_same, check_scale
from fastloss.ops.cosent import IMPLS, KINDS, cosent
from fastloss.reference.cosent import cosent_loss as reference_cosent_loss
from fastloss.reference.cosent import pairwise_angle_sim
from fastloss.similarity import pairwise_cos_sim, pairwise_dot_score, pairwise_kernel_kind

PairwiseSimilarity = str | Callable[[Tensor, Tensor], Tensor]

_BY_NAME = {"cos": pairwise_cos_sim, "dot": pairwise_dot_score, "angle": pairwise_angle_sim}
_ANGLE_MODULES = ("fastloss.reference.cosent", "sentence_transformers.util")


def angle_kind(fn: Callable) -> str | None:
    """'angle' for fastloss's or sentence-transformers' ``pairwise_angle_sim``, else None."""
    module = getattr(fn, "__module__", "") or ""
    if getattr(fn, "__name__", None) == "pairwise_angle_sim" and module.startswith(_ANGLE_MODULES):
        return "angle"
    return None


def similarity_kind(similarity: PairwiseSimilarity) -> tuple[str | None, Callable[[Tensor, Tensor], Tensor]]:
    """The fused kind ('cos' / 'dot' / 'angle', or None: the reference runs) and the callable itself."""
    if isinstance(similarity, str):
        if similarity not in _BY_NAME:
            raise ValueError(f"similarity must be 'cos', 'dot', 'angle' or a callable, got {similarity!r}")
        return similarity, _BY_NAME[similarity]
    if not callable(similarity):
        raise ValueError(f"similarity must be 'cos', 'dot', 'angle' or a callable, got {type(similarity).__name__}")
    return pairwise_kernel_kind(similarity) or angle_kind(similarity), similarity


def check_labels(labels: object, n_pairs: int, like: Tensor, name: str = "labels") -> Tensor:
    """A bool / integer / floating tensor with one value per pair (any shape); returned flat. Whether floating
    values are finite is check_finite's to read (labels=), with the embeddings."""
    if not isinstance(labels, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor with one score per pair ({n_pairs}), got {type(labels).__name__}"
        )
    if labels.is_complex():
        raise ValueError(f"{name} must be a bool, integer or floating tensor, got {labels.dtype}")
    if labels.numel() != n_pairs:
        raise ValueError(
            f"{name} must hold one score per pair: expected {n_pairs} values, got {labels.numel()} "
            f"(shape {tuple(labels.shape)})"
        )
    if labels.device != like.device:
        raise ValueError(f"{name} must be on the device of the embeddings ({like.device}), got {labels.device}")
    return labels.reshape(-1)  # NaN/Inf in floating scores: check_finite's read


def _scale_tensor(scale: float | Tensor, like: Tensor) -> Tensor:
    """The scale as a 0-d tensor: fp64 for fp64 embeddings (so gradcheck sees an fp64 scale), else fp32."""
    dtype = _backend.accumulation_dtype(like)
    if isinstance(scale, Tensor):
        return scale.reshape(()).to(device=like.device, dtype=dtype)
    return torch.full((), float(scale), dtype=dtype, device=like.device)  # a fill: no copy, no host sync


def _backend_for(b: Tensor) -> str:
    """triton | native (fastloss._C.cosent_fwd, the CPU default once built) | closed_form (the op in closed form
    with torch ops: the CPU fallback without fastloss._C, O(B log B); also fp64 tensors where the Triton kernels,
    which compute in fp32, would run: it computes fp64 in fp64) | torch (the reference)."""
    backend = _backend.select(b, "cosent_fwd", cpu_impl="closed_form")
    return "closed_form" if backend == "triton" and b.dtype == torch.float64 else backend


def _run(a: Tensor, b: Tensor, labels: Tensor, scale: float | Tensor, kind: str | None, fn: Callable) -> Tensor:
    """CoSENT of pairs (a[p mod A], b[p]) on the selected backend."""
    backend = _backend_for(b)
    if kind is None and backend != "torch":
        _backend.warn_once(
            f"fastloss: similarity_fct {getattr(fn, '__name__', fn)!r} has no fused kernel; CoSENT runs the "
            "plain-PyTorch reference (same results)"
        )
        backend = "torch"
    if backend == "torch":
        if a.shape[0] != b.shape[0]:
            a = a.repeat(b.shape[0] // a.shape[0], 1)
        loss = reference_cosent_loss(a, b, labels, scale, similarity_fct=fn)
        return loss.to(_backend.accumulation_dtype(a))
    if backend not in IMPLS:
        raise ValueError(f"cosent: no fused implementation for backend {backend!r}")
    return cosent(a, b, labels, _scale_tensor(scale, b), KINDS[kind], impl=backend)


def cosent_loss(
    a: Tensor,
    b: Tensor,
    labels: Tensor,
    scale: float | Tensor = 20.0,
    *,
    similarity: PairwiseSimilarity = "cos",
) -> Tensor:
    """CoSENT loss of the pairs (``a`` [B, D], ``b`` [B, D]) with one score per pair in ``labels`` ([B] or any
    shape of B values; bool, integer or float).

    ``similarity``: "cos", "dot", "angle" or a pairwise callable (sentence-transformers' / fastloss's
    pairwise_cos_sim, pairwise_dot_score, pairwise_angle_sim or a model's ``similarity_pairwise`` are fused; any
    other callable runs the reference). ``scale`` is a float or a 1-element tensor (which gets its gradient).
    Equals sentence-transformers' CoSENTLoss to fp32 rounding; the loss is fp32 (fp64 for fp64 embeddings).
    """
    check_embeddings("a", a)
    check_embeddings("b", b, batch=a.shape[0], dim=a.shape[1])
    check_same("b", b, a, "a")
    check_scale(scale, device=a.device)
    kind, fn = similarity_kind(similarity)
    labels = check_labels(labels, a.shape[0], a)
    check_finite([("a", a), ("b", b)], scale=scale, labels=labels)
    return _run(a, b, labels, scale, kind, fn)


def angle_loss(
    anchors: Tensor,
    others: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
    scale: float | Tensor = 20.0,
) -> Tensor:
    """AnglE loss: CoSENT with the angle similarity ``|cos(a, b) + sin(a, b)|`` of sentence-transformers.

    ``others`` is the second column [B, D] of labelled pairs (``labels`` required, [B]) or a sequence of columns
    (positive, negative_1, ...): then the pairs (anchor, positive) get ``labels`` (default ones) and every
    (anchor, negative) ``1 - labels``, without copying the anchors.
    """
    others = [others] if isinstance(others, Tensor) else list(others)
    check_embeddings("anchors", anchors)
    if not others:
        raise ValueError("others must hold at least one column [batch, dim] (the second element of each pair)")
    batch, dim = anchors.shape
    for k, column in enumerate(others):
        check_embeddings(f"others[{k}]", column, batch=batch, dim=dim)
        check_same(f"others[{k}]", column, anchors, "anchors")
    check_scale(scale, device=anchors.device)
    if labels is None:
        if len(others) == 1:
            raise ValueError("labels are required for pairs (anchors, others): a tensor of [batch] scores")
        labels = torch.ones(batch, device=anchors.device)
    labels = check_labels(labels, batch, anchors)
    check_finite(
        [("anchors", anchors)] + [(f"others[{k}]", c) for k, c in enumerate(others)], scale=scale, labels=labels
    )
    if len(others) > 1:
        if labels.dtype == torch.bool:
            labels = labels.int()
        labels = torch.cat([labels, (1 - labels).repeat(len(others) - 1)])
    b = others[0] if len(others) == 1 else torch.cat(others, dim=0)
    return _run(anchors, b, labels, scale, "angle", pairwise_angle_sim)
