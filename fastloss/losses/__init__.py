"""Drop-in replacements for sentence-transformers' losses: same constructors, same numbers."""

from fastloss.losses.cached import CachedMultipleNegativesRankingLoss, CachedMultipleNegativesSymmetricRankingLoss
from fastloss.losses.cosent import AnglELoss, CoSENTLoss
from fastloss.losses.mnrl import MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss
from fastloss.losses.triplet import (
    BatchAllTripletLoss,
    BatchHardSoftMarginTripletLoss,
    BatchHardTripletLoss,
    BatchHardTripletLossDistanceFunction,
    BatchSemiHardTripletLoss,
)

__all__ = ["MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss", "AnglELoss", "CoSENTLoss"]
__all__ += [
    "BatchAllTripletLoss",
    "BatchHardSoftMarginTripletLoss",
    "BatchHardTripletLoss",
    "BatchHardTripletLossDistanceFunction",
    "BatchSemiHardTripletLoss",
]
__all__ += ["CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss"]
