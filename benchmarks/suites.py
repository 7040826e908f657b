"""The configurations: which (op, B, N, D, dtype, impls) cases a run measures.

``cpu_default`` fits a 2-core CPU in about five minutes; ``gpu_default`` is the full sweep for an H100/H200;
``quick`` is the tiny set that ``pytest benchmarks/`` and ``--quick`` use.
"""

from __future__ import annotations

from dataclasses import dataclass

MNRL_IMPLS = ("sentence_transformers", "fastloss", "gemm_floor")
GPU_MNRL_IMPLS = (
    "sentence_transformers",
    "fastloss",
    "fastloss_blocked",
    "fastloss_flash",
    "torch_compile",
    "gemm_floor",
    "inf_cl",
    "cce_exact",
)
TRIPLET_OPS = ("batch_hard_triplet", "batch_hard_soft_margin_triplet", "batch_all_triplet", "batch_semi_hard_triplet")
L2NORM_IMPLS = ("norm_torch", "norm_cuda", "norm_triton")
CUBIC_OPS = ("batch_all_triplet", "batch_semi_hard_triplet")  # sentence-transformers holds B^3 tensors for these


@dataclass(frozen=True)
class Case:
    op: str
    B: int
    N: int
    D: int
    dtype: str
    impls: tuple[str, ...]
    group: str = "batch"


def _sweep(op: str, batches, D: int, dtype: str, impls, ratio: int = 1, group: str = "batch") -> list[Case]:
    return [Case(op, b, ratio * b, D, dtype, tuple(impls), group) for b in batches]


def _other_ops(batches, cubic_batches, D: int, dtype: str, compile_batch: int | None, pair_batches=None) -> list[Case]:
    cases = []
    for op in ("cosent", "angle"):
        cases += _sweep(op, pair_batches or batches, D, dtype, ("sentence_transformers", "fastloss"))
        if compile_batch:
            cases.append(Case(op, compile_batch, compile_batch, D, dtype, ("torch_compile",)))
    for op in TRIPLET_OPS:
        cases += _sweep(op, cubic_batches if op in CUBIC_OPS else batches, D, dtype, MNRL_IMPLS)
    return cases


def cpu_default(compile_cases: bool = True) -> list[Case]:
    cases = _sweep("mnrl", (256, 512, 1024, 2048, 4096), 256, "fp32", MNRL_IMPLS)
    if compile_cases:
        cases.append(Case("mnrl", 1024, 1024, 256, "fp32", ("torch_compile",)))
    # the target case also times the row-block torch op, which CPU tensors take where fastloss._C is not built
    cases.append(Case("mnrl", 4096, 8192, 256, "fp32", MNRL_IMPLS + ("fastloss_blocked",), group="target"))
    cases += [Case("mnrl", 1024, 1024, d, "fp32", MNRL_IMPLS, group="dim") for d in (64, 768)]
    # bf16 inputs (MKL's bf16 GEMMs on an AMX CPU), and fp32 ones under torch.autocast(bf16), which multiplies in bf16
    autocast = ("fastloss_autocast", "st_autocast")
    cases += [Case("mnrl", b, n, 256, "bf16", MNRL_IMPLS, group="dtype") for b, n in ((1024, 1024), (4096, 8192))]
    cases += [Case("mnrl", b, n, 256, "fp32", autocast, group="dtype") for b, n in ((1024, 1024), (4096, 8192))]
    # batch-hard's Gram of bf16 inputs, likewise (not sentence-transformers: it would multiply in torch's bf16 GEMMs,
    # which took seconds a product on a CPU without bf16 instructions, benchmarks/README.md, gemm_floor)
    cases.append(Case("batch_hard_triplet", 4096, 4096, 256, "bf16", ("fastloss", "gemm_floor"), group="dtype"))
    # cosine on bf16 inputs: sentence-transformers' cos_sim promotes them, so it multiplies in fp32 here
    cases.append(Case("batch_hard_triplet_cosine", 4096, 4096, 256, "bf16", MNRL_IMPLS, group="dtype"))
    # the largest symmetric and GTE cases also time the row-block torch op, whose products two directions share
    with_blocked = MNRL_IMPLS + ("fastloss_blocked",)
    cases += _sweep("mnsrl", (256, 1024, 2048), 256, "fp32", MNRL_IMPLS) + _sweep(
        "mnsrl", (4096,), 256, "fp32", with_blocked
    )
    cases += _sweep("gte", (256, 1024), 256, "fp32", MNRL_IMPLS) + _sweep("gte", (4096,), 256, "fp32", with_blocked)
    cases += _other_ops((256, 1024, 2048, 4096), (128, 256, 384, 512), 256, "fp32", None, (256, 1024, 4096, 8192))
    cases.append(Case("batch_hard_triplet_bwd", 4096, 4096, 256, "fp32", ("bwd_torch", "fastloss")))
    gradcache_impls = ("sentence_transformers", "fastloss", "fastloss_uncached")
    cases += _sweep("gradcache_step", (128, 512, 1024), 256, "fp32", gradcache_impls, ratio=2)
    return cases


def gpu_default(compile_cases: bool = True) -> list[Case]:
    impls = GPU_MNRL_IMPLS if compile_cases else tuple(i for i in GPU_MNRL_IMPLS if i != "torch_compile")
    cases = _sweep("mnrl", (1024, 2048, 4096, 8192, 16384), 768, "bf16", impls, ratio=2)
    cases.append(Case("mnrl", 32768, 65536, 1024, "bf16", impls, group="target"))
    eager = tuple(i for i in impls if i != "torch_compile")  # one compilation per shape: the batch sweep only
    cases += [Case("mnrl", 8192, 16384, d, "bf16", eager, group="dim") for d in (256, 384, 1024, 4096)]
    # fp32 embeddings as a hand-written bf16 autocast loop hands them over (LayerNorm, pooling): both losses' forward
    # under torch.autocast, where sentence-transformers' matmul and fastloss's products take bf16
    autocast = ("fastloss_autocast", "st_autocast")
    cases += _sweep("mnrl", (1024, 4096, 8192), 768, "fp32", eager + autocast, ratio=2, group="dtype")
    cases += _sweep("mnrl", (4096, 8192), 768, "fp16", eager, ratio=2, group="dtype")
    mnsrl_impls = tuple(i for i in impls if i not in ("inf_cl", "cce_exact"))
    cases += _sweep("mnsrl", (1024, 4096, 16384), 768, "bf16", mnsrl_impls)
    gte_impls = ("sentence_transformers", "fastloss", "fastloss_blocked", "gemm_floor")
    cases.append(Case("gte", 4096, 4096, 768, "bf16", gte_impls))
    cases += _other_ops((1024, 4096, 16384), (256, 512, 1024), 768, "bf16", 4096 if compile_cases else None)
    # cosine batch-hard on bf16: the mining kernel's tensor-core dots of the raw rows (fastloss.ops.triplet's
    # _cosine_operand) against sentence-transformers' fp32 GEMM of fp32 unit rows
    cases += _sweep("batch_hard_triplet_cosine", (1024, 4096, 16384), 768, "bf16", MNRL_IMPLS)
    # the batch-hard backward alone: the torch-ops path (default) against the opt-in CUDA kernel
    cases += _sweep("batch_hard_triplet_bwd", (1024, 4096, 16384), 768, "bf16", ("bwd_torch", "bwd_cuda"))
    cases.append(Case("batch_hard_triplet_bwd", 16384, 16384, 768, "fp32", ("bwd_torch", "bwd_cuda"), group="dtype"))
    # L2 normalisation and its backward alone: torch ops against the opt-in CUDA kernels and the Triton backward
    # (the flash MNRL epilogue's default)
    for dtype, group in (("bf16", "batch"), ("fp32", "dtype")):
        cases += [Case("l2norm", b, b, d, dtype, L2NORM_IMPLS, group) for d in (768, 1024) for b in (16384, 65536)]
    cases += _sweep("gradcache_step", (1024, 8192), 768, "fp32", ("sentence_transformers", "fastloss"), ratio=2)
    # issue 4: cached vs uncached time, and cached peak memory flat from 1k to 64k rows at a fixed mini-batch
    cases += _sweep("gradcache_step", (1024, 4096, 16384, 65536), 768, "fp32", ("fastloss",), ratio=2, group="flat")
    cases += _sweep("gradcache_step", (1024, 8192), 768, "fp32", ("fastloss_uncached",), ratio=2, group="flat")
    return cases


def quick() -> list[Case]:
    cases = _sweep("mnrl", (32, 64), 32, "fp32", MNRL_IMPLS + ("fastloss_blocked",), ratio=2)
    cases.append(Case("mnrl", 64, 128, 32, "fp32", ("sentence_transformers", "fastloss_autocast", "st_autocast")))
    cases += _sweep("mnsrl", (32, 64), 32, "fp32", MNRL_IMPLS)
    cases += _sweep("gte", (32, 64), 32, "fp32", MNRL_IMPLS)
    cases += _other_ops((32, 64), (16, 32), 32, "fp32", None)
    cases.append(Case("batch_hard_triplet_cosine", 32, 32, 32, "fp32", MNRL_IMPLS))
    cases.append(Case("batch_hard_triplet_bwd", 64, 64, 32, "fp32", ("bwd_torch", "fastloss")))
    cases += _sweep("gradcache_step", (128,), 32, "fp32", ("sentence_transformers", "fastloss"), ratio=2)
    return cases
