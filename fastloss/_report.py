"""``python -m fastloss``: what this installation runs. The versions, whether fastloss._C was built (with its CUDA
sources, OpenMP, the CPU ops' bf16 GEMMs), the CUDA device, and the backend each loss takes on CPU and CUDA
tensors as fastloss chooses it now (under the FASTLOSS_* variables set), so that a user who compiled the extension
on a GPU machine sees at once what it gives them, without running a loss.

The backends come from the functions the losses call (fastloss._backend.select, fastloss.functional.mnrl_backend),
asked about a probe that carries only a device and a dtype: no tensor is made, no kernel runs, and CUDA's column is
what CUDA tensors would take even where this machine has no GPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import platform
import warnings

import torch

import fastloss
from fastloss import _backend
from fastloss.functional.mnrl import mnrl_backend
from fastloss.ops import triplet as triplet_ops

# (loss, how fastloss chooses its backend for a probe); MNRL's depends on the directions selected
LOSSES = (
    ("MNRL, query_to_doc alone (MNRL, CachedMNRL)", lambda x: mnrl_backend(x, ("query_to_doc",))),
    ("MNRL, more directions (MNSRL, GTE)", lambda x: mnrl_backend(x, ("query_to_doc", "doc_to_query"))),
    ("CoSENT, AnglE", lambda x: _backend.select(x, "cosent_fwd", cpu_impl="closed_form")),
    ("batch-hard triplets", lambda x: _backend.select(x, "batch_hard_triplet_mine", cpu_impl="blocked")),
    ("batch-all triplets", lambda x: _backend.select(x, triplet_ops.NATIVE_BATCH_ALL, cpu_impl="blocked")),
    ("semi-hard triplets", lambda x: _backend.select(x, triplet_ops.NATIVE_SEMI_HARD, cpu_impl="blocked")),
)
DEVICES = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Probe:
    """What the backend choice reads of an embeddings tensor: its device and dtype."""

    device: torch.device
    dtype: torch.dtype


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _extension() -> list[str]:
    try:
        module = importlib.import_module("fastloss._C")
    except ImportError as exc:
        return [
            f"fastloss._C: not built ({exc}); CPU tensors take each op's torch-ops implementation or the reference",
            "  (build it: pip install --no-deps --no-build-isolation -e .)",
        ]
    info = module.build_info()
    lines = [
        f"fastloss._C: {module.__file__}",
        f"  OpenMP {'yes' if info.get('openmp') else 'no'}; CUDA sources "
        + ("yes" if info.get("cuda") else "no (FASTLOSS_BUILD_CUDA, CUDA_HOME: see the README)"),
    ]
    if not hasattr(module, "bf16_gemm_enabled"):
        lines.append("  CPU bf16 GEMMs: fp32 (an extension built before bf16 GEMMs existed: rebuild it)")
        return lines
    try:
        on = bool(module.bf16_gemm_enabled())  # reads FASTLOSS_NATIVE_BF16_GEMM, which may be malformed
        why = "MKL's bf16 GEMM, fp32 results" if on else _fp32_reason(info)
        lines.append(f"  CPU bf16 GEMMs: {'bf16' if on else 'fp32'} ({why})")
    except RuntimeError as exc:  # a bad FASTLOSS_NATIVE_BF16_GEMM
        lines.append(f"  CPU bf16 GEMMs: error: {exc}")
    return lines


def _fp32_reason(info: dict) -> str:
    """Why bf16_gemm_enabled() said no: FASTLOSS_NATIVE_BF16_GEMM=0, else what auto needs and lacks (build_info)."""
    if os.environ.get("FASTLOSS_NATIVE_BF16_GEMM") == "0":
        return "FASTLOSS_NATIVE_BF16_GEMM=0"
    if not info.get("mkl_bf16_gemm"):
        return "this torch carries no MKL bf16 GEMM"
    # auto, linked: off
    return (
        "the CPU has no AMX-BF16; FASTLOSS_NATIVE_BF16_GEMM=1 forces MKL's bf16 GEMM, slower on the AVX2 and "
        "AVX-512-BF16 AMD EPYCs measured"
    )


def _cuda() -> str:
    if not torch.cuda.is_available():
        return f"CUDA: no device (torch CUDA build: {torch.version.cuda or 'none'})"
    major, minor = torch.cuda.get_device_capability()
    return f"CUDA: {torch.cuda.get_device_name()} (sm_{major}{minor}), torch CUDA {torch.version.cuda}"


def backends() -> dict[str, dict[str, str]]:
    """{loss: {device: backend}} for fp32 / bf16 / fp16 embeddings (they choose alike; fp64 differs only in the
    flash kernels' absence: see mnrl_backend), as the losses would choose now. A choice that raises (e.g.
    FASTLOSS_BACKEND=native for CUDA tensors) reads ``error: ...``. The fallbacks' one-time warnings are silenced
    here, and count as given for the rest of the process (the command's only use)."""
    out: dict[str, dict[str, str]] = {}
    for name, choose in LOSSES:
        row = {}
        for device in DEVICES:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row[device] = choose(Probe(torch.device(device), torch.bfloat16))
            except (RuntimeError, ValueError) as exc:
                row[device] = f"error: {exc}"
        out[name] = row
    return out


def report() -> str:
    lines = [
        f"fastloss {fastloss.__version__} | python {platform.python_version()} | torch {torch.__version__} | "
        f"triton {_version('triton')} | sentence-transformers {_version('sentence-transformers')}",
        *_extension(),
        _cuda(),
        "",
        "backends (fp32 / bf16 / fp16 embeddings):",
    ]
    table = backends()
    width = max(len(name) for name in table)
    lines.append(f"  {'loss':<{width}}  {'CPU':<10}  CUDA")
    lines += [f"  {name:<{width}}  {row['cpu']:<10}  {row['cuda']}" for name, row in table.items()]
    lines += [
        "  (native: fastloss._C; triton: the Triton kernels; blocked: row blocks, the gradient inside the forward",
        "  (cuBLAS GEMMs on CUDA, torch ops on CPU); closed_form: CoSENT's torch ops; torch: the plain-PyTorch",
        "  reference, with its B x N memory)",
    ]
    settings = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("FASTLOSS_") or k == "TRITON_INTERPRET")
    lines += ["", "settings: " + (", ".join(settings) if settings else "none (FASTLOSS_* unset: the defaults)")]
    return "\n".join(lines)
