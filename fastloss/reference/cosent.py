"""Plain-PyTorch reference of CoSENT and AnglE: the oracle for the kernels and the fallback backend.

It follows sentence-transformers 6.2 ``CoSENTLoss.compute_loss_from_embeddings`` (sort the labels, suffix
logcumsumexp over strictly higher labels, so O(B log B) time and O(B) memory beyond the similarity) and
``AnglELoss`` (n-tuples become (anchor, other) pairs labelled ``labels`` / ``1 - labels``) step by step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastloss.similarity import pairwise_cos_sim, promote_half


def pairwise_angle_sim(x: Tensor, y: Tensor) -> Tensor:
    """sentence-transformers' ``pairwise_angle_sim``: ``|cos(x, y) + sin(x, y)|`` after L2 normalisation.

    With halves ``x = (x1, x2)`` (an odd dim is padded with one zero) and ``x_hat = x / max(|x|, 1e-12)``:
    ``sin = <x2_hat, y1_hat> - <x1_hat, y2_hat>``. Half-precision inputs are promoted to fp32 first.
    """
    x, y = promote_half(x), promote_half(y)
    if x.shape[1] % 2 != 0:
        x = F.pad(x, (0, 1), mode="constant", value=0)
        y = F.pad(y, (0, 1), mode="constant", value=0)
    normalized_x = F.normalize(x, p=2, dim=1)
    normalized_y = F.normalize(y, p=2, dim=1)
    cosines = torch.sum(normalized_x * normalized_y, dim=1)
    first_x, last_x = torch.chunk(normalized_x, 2, dim=1)
    first_y, last_y = torch.chunk(normalized_y, 2, dim=1)
    sines = torch.sum(last_x * first_y - first_x * last_y, dim=1)
    return torch.abs(cosines + sines)


def cosent_loss(
    a: Tensor,
    b: Tensor,
    labels: Tensor,
    scale: float | Tensor = 20.0,
    *,
    similarity_fct: Callable[[Tensor, Tensor], Tensor] = pairwise_cos_sim,
) -> Tensor:
    """``log(1 + sum_{i, j: y_i < y_j} exp(s_i - s_j))`` with ``s = scale * similarity_fct(a, b)``."""
    labels = labels.reshape(-1)
    scores = similarity_fct(a, b)  # sentence-transformers' and fastloss's pairwise functions promote half inputs
    if labels.shape != scores.shape:
        raise ValueError(f"Labels and scores must have the same shape, got {labels.shape} and {scores.shape}.")
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    scores = scores * scale
    if labels.dtype == torch.bool:
        labels = labels.int()

    labels, order = labels.sort()
    scores = scores[order]
    higher_label_start = torch.searchsorted(labels, labels, right=True)
    suffix_scores = torch.logcumsumexp(-scores.flip(0), dim=0).flip(0)
    suffix_scores = torch.cat((suffix_scores, scores.new_full((1,), -torch.inf)))
    scores = scores + suffix_scores[higher_label_start]
    scores = torch.cat((scores.new_zeros(1), scores), dim=0)
    return torch.logsumexp(scores, dim=0)


def angle_pairs(embeddings: Sequence[Tensor], labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """AnglE's (anchor, other) pairs and their labels: ``labels`` (default ones) for the positives,
    ``1 - labels`` for each negative column; a plain pair keeps its labels."""
    if len(embeddings) == 2:
        return embeddings[0], embeddings[1], labels
    anchors = embeddings[0]
    if labels is None:
        labels = torch.ones(anchors.size(0), device=anchors.device)
    labels = labels.reshape(-1)
    if labels.dtype == torch.bool:
        labels = labels.int()
    combined_labels = torch.cat([labels, (1 - labels).repeat(len(embeddings) - 2)], dim=0)
    return anchors.repeat(len(embeddings) - 1, 1), torch.cat(list(embeddings[1:]), dim=0), combined_labels


def angle_loss(embeddings: Sequence[Tensor], labels: Tensor | None = None, scale: float | Tensor = 20.0) -> Tensor:
    """AnglE: CoSENT with ``pairwise_angle_sim`` over pairs or (anchor, positive, negative_1, ...) n-tuples."""
    a, b, pair_labels = angle_pairs(embeddings, labels)
    return cosent_loss(a, b, pair_labels, scale, similarity_fct=pairwise_angle_sim)
