"""Drop-in BatchHardTripletLoss, BatchHardSoftMarginTripletLoss, BatchAllTripletLoss and BatchSemiHardTripletLoss
(sentence-transformers 6.x): the same constructors, attributes and results (fp32 loss; fp64 for fp64 embeddings), on
fastloss's fused ops.

Inputs: single texts with integer class labels. ``distance_metric`` is a function embeddings [B, D] -> [B, B];
``BatchHardTripletLossDistanceFunction.euclidean_distance`` / ``cosine_distance`` (fastloss's or
sentence-transformers', or ``functools.partial(euclidean_distance, squared=True)``) run fused, any other callable
runs the plain-PyTorch reference (a one-time warning says so). Cosine distance is sentence-transformers 6.3's,
max(1 - cos_sim, 0) with a zero diagonal, also where an earlier 6.x is installed (README: a zero embedding's
self-distance is 1 there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from fastloss.functional.triplet import (
    batch_all_triplet_loss,
    batch_hard_soft_margin_triplet_loss,
    batch_hard_triplet_loss,
    batch_semi_hard_triplet_loss,
)
from fastloss.reference.triplet import BatchHardTripletLossDistanceFunction, anchor_negative_mask, anchor_positive_mask

__all__ = [
    "BatchAllTripletLoss",
    "BatchHardSoftMarginTripletLoss",
    "BatchHardTripletLoss",
    "BatchHardTripletLossDistanceFunction",
    "BatchSemiHardTripletLoss",
]

_CITATION = """
@misc{hermans2017defense,
    title={In Defense of the Triplet Loss for Person Re-Identification},
    author={Alexander Hermans and Lucas Beyer and Bastian Leibe},
    year={2017},
    eprint={1703.07737},
    archivePrefix={arXiv},
    primaryClass={cs.CV}
}
"""


def _embed(model: nn.Module, sentence_features: Iterable[dict[str, Tensor]]) -> Tensor:
    output = model(list(sentence_features)[0])
    if not isinstance(output, Mapping) or "sentence_embedding" not in output:
        raise ValueError("model(features) must return a dict with a 'sentence_embedding' tensor")
    return output["sentence_embedding"]


def _check_label_count(loss: nn.Module, labels: Tensor, batch_size: int) -> None:
    """sentence-transformers' own check and message."""
    if isinstance(labels, Tensor) and labels.numel() != batch_size:
        raise ValueError(
            f"{loss.__class__.__name__} expects {batch_size} labels (one per example), "
            f"but got {labels.numel()} labels with shape {tuple(labels.shape)}."
        )


def _metric_name(distance_metric: Any) -> str:
    return getattr(distance_metric, "__name__", str(distance_metric))


class _TripletBase(nn.Module):
    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.compute_loss_from_embeddings([_embed(self.sentence_embedder, sentence_features)], labels)

    @property
    def citation(self) -> str:
        return _CITATION


class BatchHardTripletLoss(_TripletBase):
    """For each anchor, the hardest positive and the hardest negative: mean max(d_ap - d_an + margin, 0).

    Fused: O(B*D) memory, no B x B distance matrix (see :func:`fastloss.functional.batch_hard_triplet_loss`).
    """

    def __init__(
        self,
        model: nn.Module,
        distance_metric=BatchHardTripletLossDistanceFunction.euclidean_distance,
        margin: float = 5,
    ) -> None:
        super().__init__()
        self.sentence_embedder = model
        self.triplet_margin = margin
        self.distance_metric = distance_metric

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        return self.batch_hard_triplet_loss(labels, embeddings[0])

    def batch_hard_triplet_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        _check_label_count(self, labels, embeddings.shape[0])
        return batch_hard_triplet_loss(embeddings, labels, self.triplet_margin, distance_metric=self.distance_metric)

    @staticmethod
    def get_triplet_mask(labels: Tensor) -> Tensor:
        """[B, B, B] bool: mask[a, p, n] iff a, p, n are distinct and labels[a] == labels[p] != labels[n]."""
        positive = anchor_positive_mask(labels)
        return positive.unsqueeze(2) & anchor_negative_mask(labels).unsqueeze(1)

    @staticmethod
    def get_anchor_positive_triplet_mask(labels: Tensor) -> Tensor:
        return anchor_positive_mask(labels)

    @staticmethod
    def get_anchor_negative_triplet_mask(labels: Tensor) -> Tensor:
        return anchor_negative_mask(labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {"distance_metric": _metric_name(self.distance_metric), "margin": self.triplet_margin}


class BatchHardSoftMarginTripletLoss(BatchHardTripletLoss):
    """Batch-hard with a soft margin: mean softplus(d_ap - d_an) over the hardest pairs; no margin to set."""

    def __init__(
        self, model: nn.Module, distance_metric=BatchHardTripletLossDistanceFunction.euclidean_distance
    ) -> None:
        super().__init__(model)
        self.sentence_embedder = model
        self.distance_metric = distance_metric

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        return self.batch_hard_triplet_soft_margin_loss(labels, embeddings[0])

    def batch_hard_triplet_soft_margin_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        _check_label_count(self, labels, embeddings.shape[0])
        return batch_hard_soft_margin_triplet_loss(embeddings, labels, distance_metric=self.distance_metric)

    def get_config_dict(self) -> dict[str, Any]:
        return {"distance_metric": _metric_name(self.distance_metric)}


class BatchAllTripletLoss(_TripletBase):
    """Every valid triplet: sum max(d_ap - d_an + margin, 0) / #triplets with a positive loss.

    Fused: blocks of anchor rows (fastloss._C on CPU; sorted negatives and prefix sums elsewhere), no B^3 (nor B x B)
    tensor.
    """

    def __init__(
        self,
        model: nn.Module,
        distance_metric=BatchHardTripletLossDistanceFunction.euclidean_distance,
        margin: float = 5,
    ) -> None:
        super().__init__()
        self.sentence_embedder = model
        self.triplet_margin = margin
        self.distance_metric = distance_metric

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        return self.batch_all_triplet_loss(labels, embeddings[0])

    def batch_all_triplet_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        _check_label_count(self, labels, embeddings.shape[0])
        return batch_all_triplet_loss(embeddings, labels, self.triplet_margin, distance_metric=self.distance_metric)

    def get_config_dict(self) -> dict[str, Any]:
        return {"distance_metric": _metric_name(self.distance_metric), "margin": self.triplet_margin}


class BatchSemiHardTripletLoss(_TripletBase):
    """FaceNet's semi-hard negatives: for each positive pair, the closest negative farther than the positive."""

    def __init__(
        self,
        model: nn.Module,
        distance_metric=BatchHardTripletLossDistanceFunction.euclidean_distance,
        margin: float = 5,
    ) -> None:
        super().__init__()
        self.sentence_embedder = model
        self.margin = margin
        self.distance_metric = distance_metric

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        return self.batch_semi_hard_triplet_loss(labels, embeddings[0])

    def batch_semi_hard_triplet_loss(self, labels: Tensor, embeddings: Tensor) -> Tensor:
        _check_label_count(self, labels, embeddings.shape[0])
        return batch_semi_hard_triplet_loss(embeddings, labels, self.margin, distance_metric=self.distance_metric)

    def get_config_dict(self) -> dict[str, Any]:
        return {"distance_metric": _metric_name(self.distance_metric), "margin": self.margin}
