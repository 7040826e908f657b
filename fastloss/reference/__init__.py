"""Plain-PyTorch references of every fused op: the test oracle and the fallback backend."""

from fastloss.reference.cosent import angle_loss, cosent_loss, pairwise_angle_sim
from fastloss.reference.mnrl import mnrl_loss

__all__ = ["mnrl_loss", "angle_loss", "cosent_loss", "pairwise_angle_sim"]
