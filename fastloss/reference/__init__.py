"""Plain-PyTorch references of every fused op: the test oracle and the fallback backend."""

from fastloss.reference.mnrl import mnrl_loss

__all__ = ["mnrl_loss"]
