"""The batch triplet family: batch-hard, batch-hard soft-margin, batch-all and batch-semi-hard triplet losses.

Each takes embeddings [B, D] with integer class labels [B] and equals sentence-transformers 6.x's loss of the same
name (an fp32 result, fp64 for fp64 embeddings). ``distance_metric`` is "euclidean", "squared_euclidean", "cosine"
or a callable ``embeddings [B, D] -> distances [B, B]``: fastloss's / sentence-transformers'
``BatchHardTripletLossDistanceFunction.euclidean_distance`` / ``cosine_distance`` (also as
``functools.partial(euclidean_distance, squared=True|False)``) are fused; any other callable runs the
plain-PyTorch reference with a one-time warning.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from fastloss import _backend
from fastloss._validation import check_embeddings, check_finite
from fastloss.ops import triplet as ops
from fastloss.reference import triplet as reference

DistanceMetric = str | Callable[[Tensor], Tensor]

_REFERENCE_FNS = {
    "euclidean": reference.euclidean_distance,
    "squared_euclidean": functools.partial(reference.euclidean_distance, squared=True),
    "cosine": reference.cosine_distance,
}
_QUALNAMES = {
    "BatchHardTripletLossDistanceFunction.euclidean_distance": "euclidean",
    "BatchHardTripletLossDistanceFunction.eucledian_distance": "euclidean",
    "BatchHardTripletLossDistanceFunction.cosine_distance": "cosine",
}
_TRUSTED_MODULES = ("fastloss.", "sentence_transformers.")


def distance_kind(fn: object) -> str | None:
    """The metric ("euclidean" | "squared_euclidean" | "cosine") of a distance function the fused ops compute, else
    None.

    Recognised: fastloss's and sentence-transformers' ``BatchHardTripletLossDistanceFunction`` methods, and
    ``functools.partial`` of ``euclidean_distance`` binding only ``squared`` to a bool.
    """
    if isinstance(fn, functools.partial):
        if distance_kind(fn.func) != "euclidean" or fn.args or set(fn.keywords) - {"squared"}:
            return None
        squared = fn.keywords.get("squared", False)
        if not isinstance(squared, bool):
            return None
        return "squared_euclidean" if squared else "euclidean"
    module = getattr(fn, "__module__", None) or ""
    if not module.startswith(_TRUSTED_MODULES):
        return None
    return _QUALNAMES.get(getattr(fn, "__qualname__", ""))


def _check_labels(labels: object, batch: int, device: torch.device) -> Tensor:
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor of {batch} integer class labels, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"labels must hold integer class labels (an integer or bool tensor), got {labels.dtype}")
    if labels.numel() != batch:
        raise ValueError(
            f"labels must hold {batch} labels (one per example), but got {labels.numel()} labels with shape "
            f"{tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on the device of embeddings ({device}), got {labels.device}")
    return labels.reshape(-1)


def _check_margin(margin: object) -> float:
    if isinstance(margin, Tensor) and margin.numel() == 1 and not margin.requires_grad:
        margin = margin.item()
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite float, got {margin!r}")
    return float(margin)


def _resolve_metric(distance_metric: DistanceMetric) -> tuple[str | None, Callable[[Tensor], Tensor]]:
    if isinstance(distance_metric, str):
        if distance_metric not in _REFERENCE_FNS:
            raise ValueError(
                f"distance_metric must be one of {sorted(_REFERENCE_FNS)} or a callable embeddings -> [B, B] "
                f"distances, got {distance_metric!r}"
            )
        return distance_metric, _REFERENCE_FNS[distance_metric]
    if not callable(distance_metric):
        raise ValueError(
            f"distance_metric must be one of {sorted(_REFERENCE_FNS)} or a callable embeddings -> [B, B] distances, "
            f"got {type(distance_metric).__name__}"
        )
    kind = distance_kind(distance_metric)
    # a recognised function computes fastloss's definition on every backend (sentence-transformers' cosine_distance
    # before 6.3 differs on the diagonal: the reference path must not follow it where the fused ones do not)
    return kind, _REFERENCE_FNS[kind] if kind is not None else distance_metric


def _prepare(
    op: str,
    embeddings: Tensor,
    labels: Tensor,
    margin: object,
    distance_metric: DistanceMetric,
    native_op: str | None = None,
):
    """Validate everything, then choose: (labels, margin, metric code or None for the reference, reference fn).
    ``native_op``: the op's function in fastloss._C (default ``op``); without it CPU tensors take the blocked path."""
    check_embeddings("embeddings", embeddings)
    labels = _check_labels(labels, embeddings.shape[0], embeddings.device)
    margin = _check_margin(margin)
    kind, fn = _resolve_metric(distance_metric)
    check_finite([("embeddings", embeddings)])
    backend = _backend.select(embeddings, native_op or op, cpu_impl="blocked")
    if backend == "torch":
        return labels, margin, None, fn
    if kind is None:
        _backend.warn_once(
            f"fastloss: distance_metric {getattr(fn, '__name__', fn)!r} has no fused kernel; {op} runs the "
            "plain-PyTorch reference (same results, B x B memory)"
        )
        return labels, margin, None, fn
    return labels, margin, ops.METRIC_NAMES[kind], fn


def _result(loss: Tensor, embeddings: Tensor) -> Tensor:
    """The loss in fp32, fp64 for fp64 embeddings (as sentence-transformers returns it), whichever path ran."""
    return loss.to(_backend.accumulation_dtype(embeddings))


def batch_hard_triplet_loss(
    embeddings: Tensor, labels: Tensor, margin: float = 5.0, *, distance_metric: DistanceMetric = "euclidean"
) -> Tensor:
    """mean_i max(hp_i - hn_i + margin, 0) over anchors i, with the hardest positive distance
    hp_i = max_{j != i, y_j = y_i} d_ij (0 without one) and the hardest negative distance hn_i = min_{y_j != y_i} d_ij
    (an anchor without negatives gets min_{y_j = y_i} d_ij + max_j d_ij, as in sentence-transformers).
    The fused op keeps O(B*D) memory: no B x B matrix."""
    labels, margin, metric, fn = _prepare(
        "batch_hard_triplet", embeddings, labels, margin, distance_metric, native_op="batch_hard_triplet_mine"
    )
    if metric is None:
        return _result(reference.batch_hard_triplet_loss(embeddings, labels, margin, fn), embeddings)
    return _result(ops.batch_hard_triplet(embeddings, labels, margin, metric), embeddings)


def batch_hard_soft_margin_triplet_loss(
    embeddings: Tensor, labels: Tensor, *, distance_metric: DistanceMetric = "euclidean"
) -> Tensor:
    """mean_i softplus(hp_i - hn_i), with hp, hn as in :func:`batch_hard_triplet_loss`."""
    labels, _, metric, fn = _prepare(
        "batch_hard_soft_margin_triplet", embeddings, labels, 0.0, distance_metric, native_op="batch_hard_triplet_mine"
    )
    if metric is None:
        return _result(reference.batch_hard_soft_margin_triplet_loss(embeddings, labels, fn), embeddings)
    return _result(ops.batch_hard_triplet(embeddings, labels, 0.0, metric, soft_margin=True), embeddings)


def batch_all_triplet_loss(
    embeddings: Tensor, labels: Tensor, margin: float = 5.0, *, distance_metric: DistanceMetric = "euclidean"
) -> Tensor:
    """sum_{a, p, n} max(d_ap - d_an + margin, 0) / (#{triplets with a loss > 1e-16} + 1e-16) over the valid
    triplets (a != p, y_a = y_p != y_n). The fused ops stream blocks of anchor rows (fastloss._C on CPU, with the
    gradient computed in the forward; sorted distances and prefix sums in torch ops elsewhere): no B^3 and no B x B
    tensor."""
    labels, margin, metric, fn = _prepare(
        "batch_all_triplet", embeddings, labels, margin, distance_metric, native_op=ops.NATIVE_BATCH_ALL
    )
    if metric is None:
        return _result(reference.batch_all_triplet_loss(embeddings, labels, margin, fn), embeddings)
    return _result(ops.batch_all_triplet(embeddings, labels, margin, metric), embeddings)


def batch_semi_hard_triplet_loss(
    embeddings: Tensor, labels: Tensor, margin: float = 5.0, *, distance_metric: DistanceMetric = "euclidean"
) -> Tensor:
    """FaceNet's semi-hard triplet loss: for each positive pair (a, p) the closest negative farther than p (else
    the farthest negative), loss = sum_ap max(d_ap - d_an + margin, 0) / #positive pairs. The fused op streams
    blocks of anchors: no B x B tensor."""
    labels, margin, metric, fn = _prepare(
        "batch_semi_hard_triplet", embeddings, labels, margin, distance_metric, native_op=ops.NATIVE_SEMI_HARD
    )
    if metric is None:
        return _result(reference.batch_semi_hard_triplet_loss(embeddings, labels, margin, fn), embeddings)
    return _result(ops.batch_semi_hard_triplet(embeddings, labels, margin, metric), embeddings)
