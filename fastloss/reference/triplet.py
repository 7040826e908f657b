"""Plain-PyTorch reference of the batch triplet family: the oracle for the fused ops and the fallback backend.

Each function follows sentence-transformers 6.3 (``batch_hard_triplet.py``, ``batch_hard_soft_margin_triplet.py``,
``batch_all_triplet.py``, ``batch_semi_hard_triplet.py``) step by step: the same B x B distance matrix, masks,
row-max trick for anchors without negatives, in-place clamps and normalisers, hence the same values and gradients.
Earlier 6.x differ in ``cosine_distance`` (see it) and, before 6.2, in the semi-hard negative's rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastloss.similarity import cos_sim

Distance = Callable[[Tensor], Tensor]


class BatchHardTripletLossDistanceFunction:
    """Distance matrices for the Batch[All/Hard/SemiHard]TripletLoss family (sentence-transformers' definitions)."""

    @staticmethod
    def cosine_distance(embeddings: Tensor) -> Tensor:
        """d_ij = max(1 - cos(e_i, e_j), 0) and d_ii = 0 (rows L2-normalised with eps 1e-12; fp16 / bf16 rows promoted
        to fp32 first, as sentence-transformers' cos_sim), sentence-transformers 6.3's definition: up to 6.2 it was
        1 - cos, whose diagonal is 1 for a zero row and whose entries may be -eps for duplicates."""
        distances = (1 - cos_sim(embeddings, embeddings)).clamp(min=0.0)
        distances.fill_diagonal_(0.0)
        return distances

    @staticmethod
    def euclidean_distance(embeddings: Tensor, squared: bool = False) -> Tensor:
        """d_ij = sqrt(max(|e_j|^2 - 2 <e_i, e_j> + |e_i|^2, 0)), 0 where that is 0 (the square when ``squared``).

        fp16 / bf16 inputs are computed in fp32, also under autocast.
        """
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if embeddings.dtype in (torch.float16, torch.bfloat16):
                embeddings = embeddings.float()
            dot_product = torch.matmul(embeddings, embeddings.t())
        square_norm = torch.diag(dot_product)
        distances = square_norm.unsqueeze(0) - 2.0 * dot_product + square_norm.unsqueeze(1)
        distances[distances < 0] = 0
        if not squared:
            # sqrt has an infinite gradient at 0: add eps there and mask the result
            mask = distances.eq(0).float()
            distances = distances + mask * 1e-16
            distances = (1.0 - mask) * torch.sqrt(distances)
        return distances

    eucledian_distance = euclidean_distance


euclidean_distance = BatchHardTripletLossDistanceFunction.euclidean_distance
cosine_distance = BatchHardTripletLossDistanceFunction.cosine_distance


def anchor_positive_mask(labels: Tensor) -> Tensor:
    """[B, B] bool: j != i and labels[j] == labels[i]."""
    eye = torch.eye(labels.size(0), device=labels.device, dtype=torch.bool)
    return (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~eye


def anchor_negative_mask(labels: Tensor) -> Tensor:
    """[B, B] bool: labels[j] != labels[i]."""
    return labels.unsqueeze(0) != labels.unsqueeze(1)


def hardest_distances(embeddings: Tensor, labels: Tensor, distance_metric: Distance) -> tuple[Tensor, Tensor]:
    """(hardest positive [B, 1], hardest negative [B, 1]) as sentence-transformers' BatchHardTripletLoss mines them.

    hp_i = max_j m+_ij d_ij (0 without a positive); hn_i = min_j (d_ij + max_k d_ik * [labels_j == labels_i]),
    so an anchor without a negative gets its row maximum (plus its smallest same-label distance).
    """
    labels = labels.view(-1)
    pairwise_dist = distance_metric(embeddings)
    anchor_positive_dist = anchor_positive_mask(labels).float() * pairwise_dist
    hardest_positive_dist, _ = anchor_positive_dist.max(1, keepdim=True)
    max_anchor_negative_dist, _ = pairwise_dist.max(1, keepdim=True)
    anchor_negative_dist = pairwise_dist + max_anchor_negative_dist * (1.0 - anchor_negative_mask(labels).float())
    hardest_negative_dist, _ = anchor_negative_dist.min(1, keepdim=True)
    return hardest_positive_dist, hardest_negative_dist


def batch_hard_triplet_loss(
    embeddings: Tensor, labels: Tensor, margin: float = 5.0, distance_metric: Distance = euclidean_distance
) -> Tensor:
    """mean_i max(hp_i - hn_i + margin, 0) (the gradient also flows where the hinge is exactly 0, as in ST)."""
    hardest_positive_dist, hardest_negative_dist = hardest_distances(embeddings, labels, distance_metric)
    tl = hardest_positive_dist - hardest_negative_dist + margin
    tl[tl < 0] = 0
    return tl.mean()


def batch_hard_soft_margin_triplet_loss(
    embeddings: Tensor, labels: Tensor, distance_metric: Distance = euclidean_distance
) -> Tensor:
    """mean_i softplus(hp_i - hn_i)."""
    hardest_positive_dist, hardest_negative_dist = hardest_distances(embeddings, labels, distance_metric)
    return F.softplus(hardest_positive_dist - hardest_negative_dist).mean()


def batch_all_triplet_loss(
    embeddings: Tensor, labels: Tensor, margin: float = 5.0, distance_metric: Distance = euclidean_distance
) -> Tensor:
    """sum over valid (a, p, n) of max(d_ap - d_an + margin, 0) / (#{triplets with a loss > 1e-16} + 1e-16).

    Valid: a != p, labels[a] == labels[p] != labels[n]. Memory B * (#positive pairs per anchor) * B, as in ST.
    """
    labels = labels.view(-1)
    pairwise_dist = distance_metric(embeddings)
    anchor_indices, positive_indices = anchor_positive_mask(labels).nonzero(as_tuple=True)
    anchor_positive_dist = pairwise_dist[anchor_indices, positive_indices].unsqueeze(1)
    triplet_loss = anchor_positive_dist - pairwise_dist[anchor_indices] + margin
    mask = labels[anchor_indices].unsqueeze(1) != labels.unsqueeze(0)
    triplet_loss = mask.float() * triplet_loss
    triplet_loss[triplet_loss < 0] = 0
    num_positive_triplets = triplet_loss[triplet_loss > 1e-16].size(0)
    return triplet_loss.sum() / (num_positive_triplets + 1e-16)


def masked_maximum(data: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """max over ``mask`` along ``dim`` (the row minimum where the mask is empty), keepdim."""
    axis_minimums, _ = data.min(dim, keepdim=True)
    masked_maximums = (data - axis_minimums) * mask
    masked_maximums, _ = masked_maximums.max(dim, keepdim=True)
    return masked_maximums + axis_minimums


def batch_semi_hard_triplet_loss(
    embeddings: Tensor, labels: Tensor, margin: float = 5.0, distance_metric: Distance = euclidean_distance
) -> Tensor:
    """FaceNet's semi-hard loss: for each positive pair (a, p) the negative n* = argmin {d_an : d_an > d_ap}
    (else the farthest negative of a); loss = sum_ap max(d_ap - d_an* + margin, 0) / max(#positive pairs, 1e-16).
    """
    labels = labels.view(-1).unsqueeze(1)
    pdist_matrix = distance_metric(embeddings)
    adjacency = labels == labels.t()
    batch_size = torch.numel(labels)
    negatives = pdist_matrix.masked_fill(adjacency, torch.inf)
    sorted_negatives = negatives.sort(dim=1, stable=True).values
    positions = torch.searchsorted(
        sorted_negatives.detach().contiguous(), pdist_matrix.detach().contiguous(), right=True
    )
    negatives_outside = sorted_negatives.gather(1, positions.clamp(max=batch_size - 1))
    negatives_inside = masked_maximum(pdist_matrix, ~adjacency)
    semi_hard_negatives = torch.where(torch.isfinite(negatives_outside), negatives_outside, negatives_inside)
    loss_mat = (pdist_matrix - semi_hard_negatives) + margin
    mask_positives = adjacency.float() - torch.eye(batch_size, device=labels.device)
    num_positives = torch.sum(mask_positives)
    zero = torch.tensor([0.0], device=labels.device)
    return torch.sum(torch.max(loss_mat * mask_positives, zero)) / num_positives.clamp(min=1e-16)
