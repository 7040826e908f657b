"""Plain-PyTorch references of every fused op: the test oracle and the fallback backend."""

from fastloss.reference.cosent import angle_loss, cosent_loss, pairwise_angle_sim
from fastloss.reference.mnrl import mnrl_loss
from fastloss.reference.triplet import (
    BatchHardTripletLossDistanceFunction,
    batch_all_triplet_loss,
    batch_hard_soft_margin_triplet_loss,
    batch_hard_triplet_loss,
    batch_semi_hard_triplet_loss,
)

__all__ = ["mnrl_loss", "angle_loss", "cosent_loss", "pairwise_angle_sim"]
__all__ += [
    "BatchHardTripletLossDistanceFunction",
    "batch_all_triplet_loss",
    "batch_hard_soft_margin_triplet_loss",
    "batch_hard_triplet_loss",
    "batch_semi_hard_triplet_loss",
]
