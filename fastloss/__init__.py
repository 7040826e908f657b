"""fastloss: fused kernels for the losses that train text-embedding models."""

from fastloss import functional, reference
from fastloss._backend import native_module

__version__ = "0.1.0"

__all__ = ["functional", "reference", "native_module", "__version__"]
