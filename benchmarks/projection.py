"""Projected peak memory of the MNRL loss stage at GPU shapes, on a machine without a GPU.

``python3 -m benchmarks.projection [--shape B,N,D] [--sms 132] [--directions query_to_doc,doc_to_query]`` runs each
implementation's host code on meta tensors (no data, any size) under a dispatch mode that counts the tensor storages
alive (harness.LiveTensorBytes: torch.cuda.max_memory_allocated's accounting, without the caching allocator's
rounding or cuBLAS workspaces), and prints the loss stage's peak beyond its inputs, as the suite's peak_mib counts it,
against sentence-transformers' (the same directions and partition: --directions, --partition):
- sentence-transformers: its MultipleNegativesRankingLoss.compute_loss_from_embeddings and backward, as they are.
- fastloss: the flash path's host code as fastloss.functional.mnrl_loss runs it on CUDA (the doc columns as blocks,
  uncopied, into fastloss.ops.mnrl.mnrl_fwd / mnrl_bwd, called directly: to a dispatch mode a torch.library op is one
  opaque call), with the Triton launches replaced by no-ops. The kernels allocate nothing themselves, so every
  allocation of the op is in that host code. The window is the CUDA default for ``--sms`` SMs, and whole tensors for
  comparison.
- fastloss row blocks (the CUDA default for one-direction MNRL): the columns as fastloss.ops.mnrl.mnrl passes
  them (uncopied), fastloss.ops.mnrl_blocked.mnrl_blocked as on CUDA (half GEMM operands with fp32 products, the Triton
  row passes and normalisation backward as no-ops) and the op's backward, which scales the gradients it computed in
  the forward; at the default 1024 MiB block and at 256 MiB.
Then the largest batch (N = 2B) whose inputs and loss stage fit ``--gib``. A projection, not a measurement: the GPU
sweep's records (benchmarks/results/) are the numbers of record.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

from benchmarks.harness import LiveTensorBytes
from fastloss.ops import block_softmax, l2norm, mnrl_blocked, sim_lse
from fastloss.ops import mnrl as mnrl_ops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIM_LSE_KERNELS = ("sim_lse_fwd_kernel", "sim_lse_bwd_dr_kernel", "sim_lse_bwd_dc_kernel")
TERMS_KERNELS = ("one_direction_terms_kernel", "directions_terms_kernel", "backward_weights_kernel")
KERNELS = [(sim_lse, name) for name in (*SIM_LSE_KERNELS, *TERMS_KERNELS)]
KERNELS += [(l2norm, name) for name in ("inverse_norms_kernel", "l2norm_bwd_kernel")]
KERNELS += [(block_softmax, name) for name in ("row_stats_kernel", "row_grad_kernel")]


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _flash_host_code(window: int):
    """The Triton launches as no-ops, FASTLOSS_FLASH_WINDOW_ROWS = ``window`` and the host code as on a GPU (not the
    interpreter's: it upcasts bf16 operands to fp32 copies, TRITON_INTERPRET=1 in the test suite), restored on exit."""
    saved = [(module, name, getattr(module, name)) for module, name in KERNELS]
    env = {"FASTLOSS_FLASH_WINDOW_ROWS": str(window), "TRITON_INTERPRET": "0"}
    saved_env = {name: os.environ.get(name) for name in env}
    try:
        for module, name in KERNELS:
            setattr(module, name, _NoLaunch())
        os.environ.update(env)
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _inputs(batch: int, n_docs: int, dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Queries and the doc columns (positives, then hard negatives) as meta leaves."""
    if n_docs % batch:
        raise ValueError(f"N must be a multiple of B (columns of B docs), got B={batch}, N={n_docs}")
    return [torch.empty(batch, dim, dtype=dtype, device="meta", requires_grad=True) for _ in range(1 + n_docs // batch)]


# The loss's directions and partition (sentence-transformers' names), for all three projections; query_to_doc alone,
# the drop-ins' default, unless --directions says otherwise (the symmetric loss: query_to_doc,doc_to_query)
DIRECTIONS = ("query_to_doc",)


def _params(batch: int, directions: tuple[str, ...], partition: str) -> mnrl_ops.MNRLParams:
    bits = sum(mnrl_ops.DIRECTION_BITS[name] for name in directions)
    return mnrl_ops.MNRLParams(offset=0, batch=batch, directions=bits, joint=partition == "joint")


def sentence_transformers_mib(
    batch: int, n_docs: int, dim: int, dtype: torch.dtype, directions=DIRECTIONS, partition="joint"
) -> float:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    loss_fn = MultipleNegativesRankingLoss(None, directions=directions, partition_mode=partition)
    leaves = _inputs(batch, n_docs, dim, dtype)
    with LiveTensorBytes() as memory:
        loss_fn.compute_loss_from_embeddings(leaves, None).backward()
    return memory.peak / 2**20


def fastloss_mib(
    batch: int, n_docs: int, dim: int, dtype: torch.dtype, window: int, directions=DIRECTIONS, partition="joint"
) -> float:
    leaves = _inputs(batch, n_docs, dim, dtype)
    params = _params(batch, directions, partition)
    scale = torch.tensor(20.0, device="meta")
    with _flash_host_code(window), LiveTensorBytes() as memory:
        q, docs = leaves[0].detach(), [x.detach() for x in leaves[1:]]  # as mnrl_loss: the columns as blocks
        _, *saved = mnrl_ops.mnrl_fwd(q, docs, scale, params)  # the backward's inputs
        # dq and each column's dd are alive at the end, so counted in the peak
        mnrl_ops.mnrl_bwd(torch.tensor(1.0, device="meta"), q, docs, scale, *saved, params)
    return memory.peak / 2**20


@contextlib.contextmanager
def _as_on_cuda():
    """mnrl_blocked's CUDA choices for meta tensors: half GEMM operands (torch.mm with fp32 results, which _mm takes
    on meta tensors as on CUDA ones), the Triton row passes, fused normalisation backward."""
    saved = {name: getattr(mnrl_blocked, name) for name in ("half_gemms", "triton_rows")}
    try:
        mnrl_blocked.half_gemms = lambda x: x.dtype in (torch.float16, torch.bfloat16)
        mnrl_blocked.triton_rows = lambda x: x.dtype != torch.float64
        yield
    finally:
        for name, value in saved.items():
            setattr(mnrl_blocked, name, value)


def blocked_mib(
    batch: int, n_docs: int, dim: int, dtype: torch.dtype, block_mib: float, directions=DIRECTIONS, partition="joint"
) -> float:
    leaves = _inputs(batch, n_docs, dim, dtype)
    params = _params(batch, directions, partition)
    scale = torch.tensor(20.0, device="meta")
    saved = os.environ.get("FASTLOSS_MNRL_BLOCK_MIB")
    os.environ["FASTLOSS_MNRL_BLOCK_MIB"] = str(block_mib)
    try:
        with _flash_host_code(0), _as_on_cuda(), LiveTensorBytes() as memory:
            q, docs = leaves[0].detach(), [x.detach() for x in leaves[1:]]  # as mnrl(): the columns as they come
            loss, dq, dd, dscale = mnrl_blocked.mnrl_blocked(q, docs, scale, params, True)
            del docs
            g = torch.tensor(1.0, device="meta")  # the op's backward: its gradients scaled by the incoming one
            grads = (dq * g.to(dq.dtype), dd * g.to(dd.dtype))
            del dq, dd, grads
    finally:
        if saved is None:
            os.environ.pop("FASTLOSS_MNRL_BLOCK_MIB", None)
        else:
            os.environ["FASTLOSS_MNRL_BLOCK_MIB"] = saved
    return memory.peak / 2**20


def _max_batch(fits, limit: int) -> int:
    """The largest B (a multiple of 1024) up to ``limit`` for which ``fits(B)`` holds (0 when none)."""
    lo, hi = 0, limit // 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * 1024) else (lo, mid - 1)
    return lo * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.projection", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", help="B,N,D (repeatable; default: the GPU sweep's MNRL target)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the GPU the default window is for (H100/H200: 132)")
    ap.add_argument("--gib", type=float, default=80.0, help="memory for the largest-batch search (H100: 80)")
    ap.add_argument("--max-batch-limit", type=int, default=1 << 24, help="stop the largest-batch search at this B")
    ap.add_argument(
        "--directions",
        default=",".join(DIRECTIONS),
        help="the loss's directions, comma-separated (sentence-transformers' names; the symmetric loss: "
        "query_to_doc,doc_to_query; GTE: all four)",
    )
    ap.add_argument("--partition", choices=("joint", "per_direction"), default="joint")
    args = ap.parse_args(argv)
    loss = dict(directions=tuple(args.directions.split(",")), partition=args.partition)
    unknown = [name for name in loss["directions"] if name not in mnrl_ops.DIRECTION_BITS]
    if unknown or "query_to_doc" not in loss["directions"]:
        ap.error(
            f"--directions must include query_to_doc, from {sorted(mnrl_ops.DIRECTION_BITS)}; got {args.directions}"
        )
    dtype = DTYPES[args.dtype]
    size = torch.finfo(dtype).bits // 8
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape or ["32768,65536,1024"]]
    print(
        f"projected loss-stage peak beyond the inputs (MiB), {args.dtype}, default window for {args.sms} SMs, "
        f"directions {args.directions} ({args.partition}):"
    )
    for batch, n_docs, dim in shapes:
        window = mnrl_ops.default_window_rows(dim, args.sms)
        st = sentence_transformers_mib(batch, n_docs, dim, dtype, **loss)
        grads = (batch + n_docs) * dim * size / 2**20
        print(f"  B={batch} N={n_docs} D={dim}: sentence-transformers {st:.1f}; the inputs' gradients {grads:.1f}")
        for label, rows in ((f"window {window} rows", window), ("whole tensors", 0)):
            mib = fastloss_mib(batch, n_docs, dim, dtype, rows, **loss)
            print(
                f"    fastloss, {label}: {mib:.1f} = {mib / st:.2%} of sentence-transformers'; beyond the gradients "
                f"{mib - grads:.1f} = {(mib - grads) / (st - grads):.2%} of its {st - grads:.1f}"
            )
        # the row-block op is the CUDA default for query_to_doc alone (more directions take the flash op); its
        # merged blocks' data-dependent branch needs values, which meta tensors lack
        for block in (1024.0, 256.0) if loss["directions"] == DIRECTIONS else ():
            mib = blocked_mib(batch, n_docs, dim, dtype, block, **loss)
            print(
                f"    fastloss row blocks, {block:g} MiB block: {mib:.1f} = {mib / st:.2%}; beyond the gradients "
                f"{mib - grads:.1f} = {(mib - grads) / (st - grads):.2%}"
            )
    dim = shapes[0][2]

    def fits(measure):
        return lambda batch: 3 * batch * dim * size + measure(batch) * 2**20 <= args.gib * 2**30

    window = mnrl_ops.default_window_rows(dim, args.sms)
    for name, measure in (
        ("sentence-transformers", lambda b: sentence_transformers_mib(b, 2 * b, dim, dtype, **loss)),
        ("fastloss", lambda b: fastloss_mib(b, 2 * b, dim, dtype, window, **loss)),
    ):
        best = _max_batch(fits(measure), args.max_batch_limit)
        print(f"largest B (N = 2B, D={dim}) whose inputs and loss stage fit {args.gib:g} GiB: {name} {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
