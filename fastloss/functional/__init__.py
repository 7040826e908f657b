"""The public tensor API: losses over embeddings, for people who do not use sentence-transformers."""

from fastloss.functional.cosent import angle_loss, cosent_loss
from fastloss.functional.mnrl import mnrl_loss, mnsrl_loss

__all__ = ["mnrl_loss", "mnsrl_loss", "angle_loss", "cosent_loss"]
