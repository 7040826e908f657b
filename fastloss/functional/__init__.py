"""The public tensor API: losses over embeddings, for people who do not use sentence-transformers."""

from fastloss.functional.cosent import angle_loss, cosent_loss
from fastloss.functional.mnrl import mnrl_loss, mnsrl_loss
from fastloss.functional.triplet import (
    batch_all_triplet_loss,
    batch_hard_soft_margin_triplet_loss,
    batch_hard_triplet_loss,
    batch_semi_hard_triplet_loss,
)

__all__ = ["mnrl_loss", "mnsrl_loss", "angle_loss", "cosent_loss"]
__all__ += [
    "batch_all_triplet_loss",
    "batch_hard_soft_margin_triplet_loss",
    "batch_hard_triplet_loss",
    "batch_semi_hard_triplet_loss",
]
