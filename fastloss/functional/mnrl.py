"""MultipleNegativesRankingLoss (InfoNCE with in-batch and hard negatives) and its symmetric / GTE variants."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastloss import _backend, distributed
from fastloss._validation import check_embeddings, check_finite, check_same, check_scale
from fastloss.ops.mnrl import DIRECTION_BITS, HARDNESS_MODES, MNRLParams, mnrl
from fastloss.reference.mnrl import mnrl_loss as reference_mnrl_loss
from fastloss.similarity import cos_sim, dot_score, kernel_kind, normalize_embeddings, promote_half

Similarity = str | Callable[[Tensor, Tensor], Tensor]
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def validate_mnrl_options(
    directions: Sequence[str], partition_mode: str, hardness_mode: str | None, hardness_strength: float
) -> tuple[str, ...]:
    """sentence-transformers' checks, with its messages; returns the directions as a tuple."""
    valid_directions = {"query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"}
    if isinstance(directions, str) or not directions:
        if not directions:
            raise ValueError("At least one direction must be specified.")
        raise ValueError(f"directions must be a tuple of direction names, got the string {directions!r}")
    if not set(directions).issubset(valid_directions):
        raise ValueError(f"Invalid directions: {set(directions) - valid_directions}. Valid: {valid_directions}")
    if "query_to_doc" not in directions:
        raise ValueError("'query_to_doc' direction is required (contains the positive pair).")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError(
            "partition_mode='per_direction' requires every direction's candidate pool to include the positive pair. "
            "'query_to_query' and 'doc_to_doc' only contain same-type similarities and never include the positive, "
            "making the per-direction loss ill-defined. Use partition_mode='joint' instead."
        )
    if hardness_mode not in HARDNESS_MODES:
        valid = set(HARDNESS_MODES)
        raise ValueError(f"hardness_mode must be one of {valid}, got {hardness_mode!r}")
    if not hardness_strength >= 0.0:
        raise ValueError("hardness_strength must be non-negative.")
    return tuple(directions)


def _similarity_kind(similarity: Similarity) -> tuple[str | None, Callable[[Tensor, Tensor], Tensor]]:
    if isinstance(similarity, str):
        if similarity not in ("cos", "dot"):
            raise ValueError(f"similarity must be 'cos', 'dot' or a callable, got {similarity!r}")
        return similarity, cos_sim if similarity == "cos" else dot_score
    if not callable(similarity):
        raise ValueError(f"similarity must be 'cos', 'dot' or a callable, got {type(similarity).__name__}")
    return kernel_kind(similarity), similarity


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast multiplies ``x`` in on its device, where that is not ``x``'s own (None without
    autocast, on devices without it, and for fp64, which autocast leaves alone). Inside an autocast block
    sentence-transformers' similarity matmul (cos_sim's and dot_score's torch.mm) runs in it, so the fused paths cast
    its operands to it first (cosine's: the embeddings normalised in fp32): the same products' precision and
    tensor-core speed, where they would otherwise multiply fp32 embeddings (what a model's LayerNorm or pooling hands
    over under autocast) in fp32."""
    device = x.device.type
    # the device types torch.autocast takes (torch.amp.is_autocast_available, which torch 2.11's dynamo cannot trace)
    if x.dtype == torch.float64 or device not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if dtype == x.dtype else dtype


def prefers_row_blocks(queries: Tensor, directions: Sequence[str]) -> bool:
    """Whether FASTLOSS_MNRL_ALGO=auto runs the row-block op where the flash kernels would run: CUDA tensors in
    bf16/fp16/fp32 and query_to_doc alone. Measured on an H200 (benchmarks/results/cuda-nvidia-h200.json, 2026-11-29,
    fwd+bwd bf16): with one hard negative (N = 2B, D = 768) the row-block op's cuBLAS GEMMs took 3.9 / 3.9 / 4.1 /
    5.8 / 16.9 ms at B = 1024 / 2048 / 4096 / 8192 / 16384 against the flash kernels' 4.9 / 3.9 / 5.0 / 10.7 / 32.4,
    and 39.8 against 189.5 ms at the GPU target (B = 32768, N = 65536, D = 1024), for 1.7 GiB of loss-stage memory
    against 0.13 (FASTLOSS_MNRL_ALGO=flash keeps the least memory). With doc_to_query as well (the symmetric loss,
    B = 1024 .. 16384) the flash kernels were 1.8-5.4x faster, so every other direction set stays with them. fp16 was
    not timed (the same tensor-core rate as bf16). fp32 was not timed either (2026-11-30: the first GPU run never
    reached its cases); it takes row blocks by count: the flash kernels multiply 5 GEMMs' worth (the forward's logits,
    and each of the backward's two kernels recomputes them before its product: 1 + 2 + 2, the dot counts of their
    sm_90 compiles) where the row-block op multiplies 3 (logits, dQ, dD), so on FMAs (fp32's default) they would need
    5/3 of cuBLAS SGEMM's efficiency, more than the FMA peak, and with TF32 allowed (the Triton dots follow torch's
    setting) the bf16 timings above apply. fp32 is what SentenceTransformerTrainer hands a loss under bf16=True."""
    return (
        queries.device.type == "cuda"
        and queries.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and set(directions) == {"query_to_doc"}
    )


def mnrl_backend(queries: Tensor, directions: Sequence[str] = ("query_to_doc",)) -> str:
    """Where the fused MNRL runs for ``queries``' device and dtype and the selected ``directions``: ``triton`` (the
    flash kernels), ``native`` (fastloss._C), ``blocked`` (the row-block op: FASTLOSS_MNRL_ALGO=blocked; CUDA
    tensors where prefers_row_blocks under ``auto`` and FASTLOSS_BACKEND is unset; CPU tensors without fastloss._C;
    CUDA tensors without Triton; fp64 tensors where the flash kernels would run: they take fp32 and the half dtypes,
    the row-block op computes fp64 in fp64) or ``torch`` (see fastloss._backend)."""
    algorithm, forced = _backend.mnrl_algorithm(), _backend.forced_backend()
    if queries.device.type == "cuda" and forced is None and not _backend.triton_available():
        return "blocked"  # cuBLAS and torch ops: O(B*D + block), not the reference's B x N
    backend = _backend.select(queries, "mnrl_fused", cpu_impl="blocked")
    if backend == "triton" and queries.dtype == torch.float64:
        return "blocked"
    if backend == "triton" and algorithm == "auto" and forced is None and prefers_row_blocks(queries, directions):
        return "blocked"  # not where FASTLOSS_BACKEND=triton asks for the Triton kernels by name
    return "blocked" if algorithm == "blocked" and backend in ("triton", "native") else backend


def mnrl_loss(
    queries: Tensor,
    docs: Tensor | Sequence[Tensor],
    scale: float | Tensor = 20.0,
    *,
    similarity: Similarity = "cos",
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    gather_across_devices: bool = False,
) -> Tensor:
    """Multiple Negatives Ranking loss (InfoNCE) of ``queries`` [B, D] against ``docs``.

    ``docs`` is the positives [B, D] or a sequence of columns [B, D] (positives first, then hard negatives).
    ``similarity``: "cos", "dot", or a callable (sentence-transformers' cos_sim / dot_score or a model's
    ``similarity`` are fused; any other callable runs the plain-PyTorch reference). ``scale`` is a float or a
    1-element tensor (a learnable inverse temperature gets its gradient). The options are those of
    sentence-transformers' MultipleNegativesRankingLoss; the result equals it to fp32 rounding and is fp32 (fp64 for
    fp64 embeddings). Inside a ``torch.autocast`` block the similarity is multiplied in its dtype, as
    sentence-transformers' matmul would be (:func:`autocast_dtype`).
    """
    docs = [docs] if isinstance(docs, Tensor) else list(docs)
    check_embeddings("queries", queries)
    if not docs:
        raise ValueError("docs must hold at least one column (the positives) of shape [batch, dim]")
    batch, dim = queries.shape
    for k, column in enumerate(docs):
        name = f"docs[{k}]"
        check_embeddings(name, column, batch=batch, dim=dim)
        check_same(name, column, queries, "queries")
    check_scale(scale, device=queries.device)
    directions = validate_mnrl_options(directions, partition_mode, hardness_mode, hardness_strength)
    kind, similarity_fct = _similarity_kind(similarity)
    # under autocast the fused paths take the embeddings in its dtype (autocast_dtype) as sentence-transformers'
    # similarity matmul takes its operands: cosine's normalised in fp32 first (then multiplied as dot products, so
    # unit vectors are what is rounded, whatever the embeddings' scale); the reference follows autocast as
    # sentence-transformers does, through its matmul
    cast = autocast_dtype(queries) if kind is not None and mnrl_backend(queries, directions) != "torch" else None
    given = None
    if cast is not None:
        given = [queries, *docs]
        operand = (lambda x: normalize_embeddings(promote_half(x))) if kind == "cos" else (lambda x: x)
        queries, docs = operand(queries).to(cast), [operand(column).to(cast) for column in docs]
        kind = "dot"
    names = ["queries"] + [f"docs[{k}]" for k in range(len(docs))]
    check_finite(list(zip(names, [queries, *docs])), scale=scale, cast_from=given)

    offset = 0
    if gather_across_devices:
        queries = distributed.all_gather_with_grad(queries)
        docs = [distributed.all_gather_with_grad(column) for column in docs]
        offset = distributed.get_rank() * batch if distributed.is_initialized() else 0

    backend = mnrl_backend(queries, directions)
    if kind is None and backend != "torch":
        _backend.warn_once(
            f"fastloss: similarity_fct {getattr(similarity_fct, '__name__', similarity_fct)!r} has no fused kernel; "
            "MNRL runs the plain-PyTorch reference (same results, B x N memory)"
        )
        backend = "torch"
    if backend == "torch":
        return reference_mnrl_loss(
            queries,
            docs,
            scale,
            similarity_fct=similarity_fct,
            offset=offset,
            batch_size=batch,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        ).to(_backend.accumulation_dtype(queries))

    bits = sum(DIRECTION_BITS[name] for name in set(directions))
    alpha = float(hardness_strength) if hardness_mode is not None else 0.0
    params = MNRLParams(
        offset=offset,
        batch=batch,
        directions=bits,
        joint=partition_mode == "joint",
        hardness=HARDNESS_MODES[hardness_mode] if alpha > 0.0 else 0,
        alpha=alpha,
        normalize=kind == "cos",
    )
    acc = _backend.accumulation_dtype(queries)  # the loss comes back in it: fp32, fp64 for fp64 embeddings
    if isinstance(scale, Tensor):
        scale_t = scale.reshape(()).to(device=queries.device, dtype=acc)
    else:
        scale_t = torch.full((), float(scale), dtype=acc, device=queries.device)  # a fill: no copy, no host sync
    # the columns go in as they are: the flash op takes them as blocks of candidates, uncopied where each fills the GPU
    # (at B = 32768, D = 1024 bf16: 64 MiB per column; fastloss.ops.mnrl.columns_as_blocks), the row-block op too (a
    # GEMM per column) and the native op (fastloss._C.mnrl_fused reads the list of columns)
    return mnrl(queries, docs, scale_t, params, backend)


def mnsrl_loss(
    queries: Tensor,
    docs: Tensor | Sequence[Tensor],
    scale: float | Tensor = 20.0,
    *,
    similarity: Similarity = "cos",
    gather_across_devices: bool = False,
) -> Tensor:
    """Multiple Negatives Symmetric Ranking loss: query_to_doc and doc_to_query, each with its own softmax."""
    return mnrl_loss(
        queries,
        docs,
        scale,
        similarity=similarity,
        directions=("query_to_doc", "doc_to_query"),
        partition_mode="per_direction",
        gather_across_devices=gather_across_devices,
    )
