"""Which implementation runs an op: ``triton`` (CUDA tensors, or any tensor under TRITON_INTERPRET=1),
``native`` (fastloss._C on CPU tensors) or ``torch`` (the plain-PyTorch reference in fastloss.reference).

``FASTLOSS_BACKEND=triton|native|torch`` forces one. Each fallback is logged once with its reason.
``FASTLOSS_CUDA_KERNELS=1`` opts CUDA tensors into fastloss._C's hand-written CUDA kernels (see
:func:`cuda_kernel_enabled`).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

import torch

logger = logging.getLogger("fastloss")

BACKENDS = ("triton", "native", "torch")


# Memoised in module globals rather than with functools caches, which torch.compile traces through with a warning
_UNSET = object()
_native = _triton = _UNSET


def native_module():
    """The compiled ``fastloss._C`` module, or None (the reason is logged once)."""
    global _native
    if _native is _UNSET:
        try:
            from fastloss import _C  # type: ignore[attr-defined]
        except ImportError as exc:
            logger.warning("fastloss: native extension fastloss._C is not available (%s); CPU ops use fallbacks", exc)
            _C = None
        _native = _C
    return _native


def native_has(op: str) -> bool:
    module = native_module()
    return module is not None and hasattr(module, op)


def native_enabled(op: str) -> bool:
    """Whether CPU tensors take fastloss._C's ``op``: the extension has it and FASTLOSS_BACKEND forces neither the
    reference (``torch``) nor the Triton kernels (``triton``: their CPU twin is the op's torch path), as
    :func:`select` answers. Callers check that the tensors are on the CPU."""
    return forced_backend() not in ("torch", "triton") and native_has(op)


def cuda_kernel_enabled(op: str) -> bool:
    """Whether CUDA tensors take fastloss._C's CUDA kernel ``op`` (e.g. ``l2norm_bwd``) instead of torch ops: only when
    FASTLOSS_CUDA_KERNELS=1 opts in, FASTLOSS_BACKEND is not ``torch`` and the extension was built with it. The torch
    ops stay the default until a GPU measurement shows a kernel faster. Callers check that the tensors are on CUDA."""
    return os.environ.get("FASTLOSS_CUDA_KERNELS", "0") == "1" and forced_backend() != "torch" and native_has(op)


def triton_available() -> bool:
    global _triton
    if _triton is _UNSET:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton = False
        else:
            _triton = True
    return _triton


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 tensors, else fp32: what the fused ops accumulate in and the losses are returned in (fp64 losses
    for fp64 embeddings, as sentence-transformers returns them, and exact enough for gradcheck; fp32 for fp32 and
    the half dtypes)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


FP32_DOTS = ("ieee", "tf32x3", "tf32")


def torch_fp32_matmul_precision() -> str:
    """``tf32`` where torch's own fp32 matmuls on CUDA take TF32 tensor cores, else ``ieee``: what
    ``torch.backends.cuda.matmul.fp32_precision`` says (``torch.set_float32_matmul_precision("high")``,
    ``torch.backends.cuda.matmul.allow_tf32 = True`` and transformers' ``tf32=True`` set it; read through the new
    API, which the legacy getters refuse once both APIs were used), or the legacy global setting where a torch has no
    such attribute."""
    try:
        return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"
    except (AttributeError, RuntimeError):
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision in the Triton kernels for operands of ``dtype``. fp32: ``FASTLOSS_FP32_DOT=ieee``
    (fp32 FMAs), ``tf32x3`` (three tf32 tensor-core products per dot, close to fp32 accuracy) or ``tf32`` (one, ~1e-3
    relative error); ``FASTLOSS_ALLOW_TF32=1`` is the older spelling of ``tf32``. Unset, torch's own setting for fp32
    matmuls on CUDA (torch_fp32_matmul_precision: ``ieee`` by default, ``tf32`` where the caller allowed TF32), which
    sentence-transformers' fp32 matmuls and the row-block op's cuBLAS GEMMs follow too: the same numbers and
    tensor-core speed where a training script asks for TF32. Half dtypes ignore the setting (``ieee``), and so does
    the interpreter, which has no tf32; a bad value raises whatever the dtype."""
    value = os.environ.get("FASTLOSS_FP32_DOT", "").strip().lower()
    if not value:
        allow = os.environ.get("FASTLOSS_ALLOW_TF32", "")
        value = "tf32" if allow == "1" else "ieee" if allow == "0" else torch_fp32_matmul_precision()
    if value not in FP32_DOTS:
        raise ValueError(f"FASTLOSS_FP32_DOT must be one of {FP32_DOTS}, got {value!r}")
    return value if dtype == torch.float32 and not triton_interpret() else "ieee"


MNRL_ALGORITHMS = ("auto", "flash", "blocked")


def mnrl_algorithm() -> str:
    """``FASTLOSS_MNRL_ALGO``: which algorithm the fused MNRL losses run. ``auto`` (default): on CUDA the row-block
    op for one-direction MNRL (query_to_doc alone; faster on an H200 in bf16, fp32 by count), and the flash kernels
    otherwise (fastloss.functional.mnrl.prefers_row_blocks); the row-block algorithm on CPU tensors
    (fastloss._C, or the torch op where the extension is not built). ``flash``: the flash kernels wherever Triton
    runs (fastloss.ops.mnrl: online logsumexp, a backward that recomputes; the least memory). ``blocked``: the
    row-block op in torch ops on every device (fastloss.ops.mnrl_blocked: the gradient inside the forward, cuBLAS
    GEMMs on CUDA, a block of logits of FASTLOSS_MNRL_BLOCK_MIB). FASTLOSS_BACKEND=torch still means the reference.
    A bad value raises."""
    value = os.environ.get("FASTLOSS_MNRL_ALGO", "").strip().lower() or "auto"
    if value not in MNRL_ALGORITHMS:
        raise ValueError(f"FASTLOSS_MNRL_ALGO must be one of {MNRL_ALGORITHMS}, got {value!r}")
    return value


def forced_backend() -> str | None:
    value = os.environ.get("FASTLOSS_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"FASTLOSS_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def warn_once(message: str) -> None:
    """Warn (RuntimeWarning) the first time ``message`` is seen in this process."""
    _warn_once(message)


def select(tensor: torch.Tensor, native_op: str, cpu_impl: str | None = None) -> str:
    """The backend for an op whose inputs live where ``tensor`` lives.

    ``native_op`` is the name of the op's function in fastloss._C (so a partially built extension falls back
    per op rather than as a whole). ``cpu_impl`` names an op's own fused CPU implementation in torch ops (e.g.
    blocked rows): CPU tensors take it when fastloss._C lacks the op, and under FASTLOSS_BACKEND=native.
    """
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("FASTLOSS_BACKEND=triton but triton is not installed")
        if tensor.device.type != "cuda" and not triton_interpret():
            raise RuntimeError("FASTLOSS_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
        return "triton"
    if forced == "native":
        if tensor.device.type != "cpu":
            raise RuntimeError(f"FASTLOSS_BACKEND=native runs on CPU tensors only, got {tensor.device}")
        if not native_has(native_op) and cpu_impl is not None:
            return cpu_impl
        if not native_has(native_op):
            raise RuntimeError(f"FASTLOSS_BACKEND=native but fastloss._C has no {native_op!r} (extension not built?)")
        return "native"
    if tensor.device.type == "cuda":
        if triton_available():
            return "triton"
        warn_once("fastloss: triton is not installed; CUDA tensors use the torch reference")
        return "torch"
    if tensor.device.type == "cpu":
        if native_has(native_op):
            return "native"
        if cpu_impl is not None:
            return cpu_impl
        warn_once(f"fastloss: fastloss._C has no {native_op!r}; CPU tensors use the torch reference")
        return "torch"
    warn_once(f"fastloss: no fused kernel for device {tensor.device.type!r}; using the torch reference")
    return "torch"
