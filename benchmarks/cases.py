"""What is benchmarked: one ``OpSpec`` per op, each a way to make inputs and a builder per implementation.

Adding an op is one ``OpSpec`` in ``OPS``: ``make(B, N, D, dtype, device, seed)`` returns a ``Problem`` (the
differentiable embeddings plus labels), and ``impls`` maps an implementation name to a builder
``Problem -> Impl`` (untimed set-up; the ``Impl.fn`` it returns computes the loss with its graph). A builder raises
``Skip(note)`` where the implementation cannot run (a package or an op that is not importable, no CUDA, ...).
``sentence_transformers`` is the oracle: every other loss is checked against it before it is timed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

IMPLS = (
    "fastloss",
    "fastloss_blocked",
    "fastloss_flash",
    "fastloss_autocast",
    "sentence_transformers",
    "st_autocast",
    "torch_compile",
    "gemm_floor",
    "inf_cl",
    "cce_exact",
    "fastloss_uncached",
    "bwd_torch",
    "bwd_native",
    "bwd_cuda",
    "norm_torch",
    "norm_cuda",
    "norm_triton",
)
SCALE = 20.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Skip(Exception):
    """An implementation (or op) that cannot run here; the message says why."""


@dataclass
class Problem:
    B: int
    N: int
    D: int
    dtype: torch.dtype
    inputs: list[Tensor]
    labels: Tensor | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Impl:
    fn: Callable[[], Tensor]
    backend: str | None = None
    is_loss: bool = True
    note: str | None = None
    tf32: bool = False  # multiplies fp32 operands in tf32 (its own choice): checked at fp16's tolerance in fp32
    autocast: str | None = None  # runs its forward under torch.autocast in this dtype: checked at its tolerance


Builder = Callable[[Problem], Impl]


@dataclass(frozen=True)
class OpSpec:
    name: str
    make: Callable[[int, int, int, torch.dtype, torch.device, int], Problem]
    impls: dict[str, Builder]
    flops: Callable[[int, int, int], float] | None = None
    check_batch: int = 96
    description: str = ""


def _import(module: str, what: str = ""):
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a skip with its reason
        raise Skip(f"{module} not importable ({type(exc).__name__}: {exc})") from None
    if what and not hasattr(mod, what):
        raise Skip(f"{module} has no {what}")
    return getattr(mod, what) if what else mod


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, device, gen, dtype=torch.float32) -> Tensor:
    return torch.randn(shape, device=device, generator=gen, dtype=torch.float32).to(dtype)


def _leaf(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).contiguous().requires_grad_(True)


def _backend_of(x: Tensor, native_op: str, cpu_impl: str | None = None) -> str:
    """The backend fastloss picks for this op (the functional module asks ``select`` the same way)."""
    from fastloss import _backend

    if cpu_impl is None:
        return _backend.select(x, native_op)
    return _backend.select(x, native_op, cpu_impl=cpu_impl)


def _mnrl_backend(x: Tensor) -> str:
    return _import("fastloss.functional.mnrl", "mnrl_backend")(x)


@functools.cache
def _st_losses():
    return _import("sentence_transformers.sentence_transformer.losses")


def _st_loss(name: str, **kwargs):
    cls = getattr(_st_losses(), name, None)
    if cls is None:
        raise Skip(f"sentence-transformers has no {name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cls(None, **kwargs)


class _GemmFloor(torch.autograd.Function):
    """The products an exact loss over S = R C^T cannot avoid: S in forward, G C and G^T R in backward
    (G: a stand-in for dLoss/dS, made once outside the timing). ``backward_gemms`` selects 0, 1 (G C only, for a
    symmetric Gram matrix) or 2."""

    @staticmethod
    def forward(ctx, r: Tensor, c: Tensor, g: Tensor, backward_gemms: int) -> Tensor:
        ctx.save_for_backward(r, c, g)
        ctx.backward_gemms = backward_gemms
        s = r @ c.T
        return s[0, 0].float().clone()

    @staticmethod
    def backward(ctx, _grad):
        r, c, g = ctx.saved_tensors
        dr = g @ c if ctx.backward_gemms >= 1 else None
        dc = g.T @ r if ctx.backward_gemms >= 2 else None
        return dr, dc, None, None


def _floor_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the floor's GEMMs: x's, except half inputs on CPU, multiplied in fp32 there (exact products and
    fp32 sums, what a half GEMM with fp32 accumulation computes) as the native ops do, unless the native ops take
    bf16 GEMMs on this CPU (MNRL, the triplet ops: AMX-BF16, FASTLOSS_NATIVE_BF16_GEMM) or there is no native
    op (fastloss then runs torch's half GEMMs itself). Torch's half GEMMs on a CPU without bf16 / fp16 instructions
    are no floor: see benchmarks/README.md (gemm_floor)."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return x.dtype
    from fastloss import _backend

    module = _backend.native_module()
    if module is None or (x.dtype == torch.bfloat16 and module.bf16_gemm_enabled()):
        return x.dtype
    return torch.float32


def _gemm_floor(rows: Callable[[Problem], Tensor], cands: Callable[[Problem], Tensor], backward_gemms: int) -> Builder:
    def build(p: Problem) -> Impl:
        r = rows(p)
        dtype = _floor_dtype(r)
        backend = "matmul" if dtype == r.dtype else "matmul_fp32"
        c = cands(p).detach().to(dtype).contiguous().requires_grad_(backward_gemms >= 2)
        if r is c or backward_gemms < 2 or dtype != r.dtype:
            r = r.detach().to(dtype).requires_grad_(True)
        g = (torch.randn(r.shape[0], c.shape[0], device=r.device, dtype=torch.float32) / c.shape[0]).to(r.dtype)
        return Impl(lambda: _GemmFloor.apply(r, c, g, backward_gemms), backend=backend, is_loss=False)

    return build


# ---------------------------------------------------------------------------------------------------------------
# MNRL family: queries [B, D], doc columns k x [B, D] (positives first, then hard negatives), N = k * B


def _make_mnrl(B: int, N: int, D: int, dtype: torch.dtype, device: torch.device, seed: int) -> Problem:
    if N % B:
        raise ValueError(f"MNRL cases need N a multiple of B (N = columns * B), got B={B}, N={N}")
    gen = _generator(device, seed)
    q = _randn((B, D), device, gen)
    cols = [q + 1.5 * _randn((B, D), device, gen)] + [_randn((B, D), device, gen) for _ in range(N // B - 1)]
    return Problem(B, N, D, dtype, [_leaf(q, dtype)] + [_leaf(c, dtype) for c in cols], extra={"cols": N // B})


def _docs(p: Problem) -> Tensor:
    return torch.cat([x.detach() for x in p.inputs[1:]], dim=0)


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


# The MNRL family's ops: their directions and partition (sentence-transformers' MultipleNegativesRankingLoss arguments)
GTE_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
MNRL_VARIANTS = {
    "mnrl": {},
    "mnsrl": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "gte": dict(directions=GTE_DIRECTIONS, partition_mode="joint"),
}


def _mnrl_fastloss(variant: str, algorithm: str = "auto") -> Builder:
    """fastloss's MNRL as dispatched under FASTLOSS_MNRL_ALGO=``algorithm`` (``blocked``: the row-block torch op on
    every device; ``flash``: the flash kernels wherever Triton runs, which ``auto`` leaves for one-direction CUDA
    tensors, fastloss.functional.mnrl.prefers_row_blocks)."""

    def build(p: Problem) -> Impl:
        mnrl_loss = _import("fastloss.functional.mnrl", "mnrl_loss")
        q, docs = p.inputs[0], p.inputs[1:]

        def fn() -> Tensor:
            with _env("FASTLOSS_MNRL_ALGO", algorithm):
                return mnrl_loss(q, docs, SCALE, **MNRL_VARIANTS[variant])

        with _env("FASTLOSS_MNRL_ALGO", algorithm):
            backend = _mnrl_backend(q)
        return Impl(fn, backend=backend)

    return build


def _mnrl_st(variant: str) -> Builder:
    def build(p: Problem) -> Impl:
        try:
            loss = _st_loss("MultipleNegativesRankingLoss", scale=SCALE, **MNRL_VARIANTS[variant])
        except TypeError:  # sentence-transformers before MultipleNegativesRankingLoss took directions
            if variant != "mnsrl":
                raise Skip("this sentence-transformers' MultipleNegativesRankingLoss takes no directions") from None
            loss = _st_loss("MultipleNegativesSymmetricRankingLoss", scale=SCALE)
        return Impl(lambda: loss.compute_loss_from_embeddings(p.inputs, None), backend="torch")

    return build


def _under_autocast(builder: Builder, dtype: str = "bf16") -> Builder:
    """``builder``'s implementation with its forward inside torch.autocast(dtype) and the backward outside, as a
    hand-written mixed-precision loop runs a loss: on fp32 embeddings sentence-transformers' similarity matmul then
    multiplies in bf16, and fastloss's MNRL casts the same operands to bf16 (functional.mnrl.autocast_dtype)."""

    def build(p: Problem) -> Impl:
        impl = builder(p)
        device, forward = p.inputs[0].device.type, impl.fn

        def fn() -> Tensor:
            with torch.autocast(device, dtype=DTYPES[dtype]):
                return forward()

        return dataclasses.replace(impl, fn=fn, autocast=dtype, note=f"forward under torch.autocast({dtype})")

    return build


_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    """torch.compile(fn) once per name: one static-shape graph per benchmarked shape."""
    if name not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(64, getattr(dynamo_config, knob)))
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _mnrl_compile(variant: str) -> Builder:
    def build(p: Problem) -> Impl:
        from fastloss.reference.mnrl import mnrl_loss

        fn = _compiled(variant, lambda q, *docs: mnrl_loss(q, docs, SCALE, **MNRL_VARIANTS[variant]))
        return Impl(lambda: fn(*p.inputs), backend="inductor")

    return build


def _cuda_only(p: Problem, package: str) -> None:
    if p.inputs[0].device.type != "cuda":
        raise Skip(f"{package} runs on CUDA only")


def _head_dim(D: int) -> int:
    for h in (256, 128, 64, 32, 16):
        if D % h == 0:
            return h
    raise Skip(f"inf_cl needs D divisible by 16, got {D}")


def _inf_cl(p: Problem) -> Impl:
    cal_inf_loss = _import("inf_cl", "cal_inf_loss")
    _cuda_only(p, "inf_cl")
    q, docs = p.inputs[0], p.inputs[1:]
    head_dim = _head_dim(p.D)
    scale = torch.tensor(SCALE, device=q.device)

    def fn() -> Tensor:
        return cal_inf_loss(
            F.normalize(q, dim=-1), F.normalize(torch.cat(docs), dim=-1), scale=scale, head_dim=head_dim
        )

    # its kernels' tl.dot on fp32 operands is tf32 (inf_cl/flash.py says so beside a commented-out ieee dot): at B=64,
    # D=32 fp32 on an H200 its loss was 9.7e-3 off sentence-transformers' (gradients 1.2e-3)
    return Impl(fn, backend="triton", note="one direction; scale and normalisation outside its kernel", tf32=True)


def _cce_exact(p: Problem) -> Impl:
    linear_cross_entropy = _import("cut_cross_entropy", "linear_cross_entropy")
    _cuda_only(p, "cut_cross_entropy")
    q, docs = p.inputs[0], p.inputs[1:]
    targets = torch.arange(p.B, device=q.device)

    def fn() -> Tensor:
        # impl "cce" without gradient filtering (filter_eps=None): the exact one (cut-cross-entropy 25.1.1 takes only
        # "cce" and "torch_compile" as impl; "cce_exact" raised NotImplementedError on the H200)
        return linear_cross_entropy(
            SCALE * F.normalize(q, dim=-1), F.normalize(torch.cat(docs), dim=-1), targets, impl="cce", filter_eps=None
        )

    return Impl(fn, backend="triton", note="MNRL as linear cross-entropy over the docs")


def _mnrl_flops(B: int, N: int, D: int) -> float:
    return 8.0 * B * N * D


MNRL = OpSpec(
    "mnrl",
    _make_mnrl,
    {
        "fastloss": _mnrl_fastloss("mnrl"),
        "fastloss_blocked": _mnrl_fastloss("mnrl", "blocked"),
        "fastloss_flash": _mnrl_fastloss("mnrl", "flash"),
        "fastloss_autocast": _under_autocast(_mnrl_fastloss("mnrl")),
        "sentence_transformers": _mnrl_st("mnrl"),
        "st_autocast": _under_autocast(_mnrl_st("mnrl")),
        "torch_compile": _mnrl_compile("mnrl"),
        "gemm_floor": _gemm_floor(lambda p: p.inputs[0], _docs, 2),
        "inf_cl": _inf_cl,
        "cce_exact": _cce_exact,
    },
    flops=_mnrl_flops,
    description="MultipleNegativesRankingLoss, query_to_doc, cos, scale 20; N = columns * B",
)

MNSRL = OpSpec(
    "mnsrl",
    _make_mnrl,
    {
        "fastloss": _mnrl_fastloss("mnsrl"),
        "fastloss_blocked": _mnrl_fastloss("mnsrl", "blocked"),
        "fastloss_flash": _mnrl_fastloss("mnsrl", "flash"),
        "sentence_transformers": _mnrl_st("mnsrl"),
        "torch_compile": _mnrl_compile("mnsrl"),
        "gemm_floor": _gemm_floor(lambda p: p.inputs[0], _docs, 2),
    },
    flops=_mnrl_flops,
    description="MNRL with query_to_doc + doc_to_query, per_direction (MultipleNegativesSymmetricRankingLoss)",
)


def _gemm_floors(*builders: Builder) -> Builder:
    """The sum of several products' floors (_gemm_floor each, or None where a product is empty), for losses over
    several similarity matrices."""

    def build(p: Problem) -> Impl:
        impls = [impl for impl in (b(p) for b in builders) if impl is not None]
        fns = [impl.fn for impl in impls]
        return Impl(lambda: sum(fn() for fn in fns), backend=impls[0].backend, is_loss=False)

    return build


def _negatives_floor(p: Problem) -> Impl | None:
    """The positives against the hard-negative columns (doc_to_doc beyond its Gram block; none for pairs)."""
    if len(p.inputs) <= 2:
        return None
    return _gemm_floor(lambda p: p.inputs[1], lambda p: torch.cat([x.detach() for x in p.inputs[2:]]), 2)(p)


GTE = OpSpec(
    "gte",
    _make_mnrl,
    {
        "fastloss": _mnrl_fastloss("gte"),
        "fastloss_blocked": _mnrl_fastloss("gte", "blocked"),
        "fastloss_flash": _mnrl_fastloss("gte", "flash"),
        "sentence_transformers": _mnrl_st("gte"),
        "torch_compile": _mnrl_compile("gte"),
        # Q D^T (query_to_doc and doc_to_query), the Gram matrices Q Q^T and P P^T (one backward product each) and
        # P against the hard negatives (doc_to_doc's other columns)
        "gemm_floor": _gemm_floors(
            _gemm_floor(lambda p: p.inputs[0], _docs, 2),
            _gemm_floor(lambda p: p.inputs[0], lambda p: p.inputs[0], 1),
            _gemm_floor(lambda p: p.inputs[1], lambda p: p.inputs[1], 1),
            _negatives_floor,
        ),
    },
    description="MNRL with all four directions, joint (GTE's improved contrastive loss)",
)


# ---------------------------------------------------------------------------------------------------------------
# CoSENT / AnglE: pairs a [B, D], b [B, D], a float score per pair; N = B


def _make_pairs(B: int, N: int, D: int, dtype: torch.dtype, device: torch.device, seed: int) -> Problem:
    gen = _generator(device, seed)
    a = _randn((B, D), device, gen)
    b = a + 2.0 * _randn((B, D), device, gen)
    labels = torch.rand(B, device=device, generator=gen)
    return Problem(B, B, D, dtype, [_leaf(a, dtype), _leaf(b, dtype)], labels=labels)


def _cosent_fastloss(angle: bool) -> Builder:
    def build(p: Problem) -> Impl:
        fn = _import("fastloss.functional.cosent", "angle_loss" if angle else "cosent_loss")
        a, b = p.inputs
        return Impl(lambda: fn(a, b, p.labels, SCALE), backend=_backend_of(b, "cosent_fwd", "closed_form"))

    return build


def _cosent_st(angle: bool) -> Builder:
    def build(p: Problem) -> Impl:
        loss = _st_loss("AnglELoss" if angle else "CoSENTLoss", scale=SCALE)
        return Impl(lambda: loss.compute_loss_from_embeddings(p.inputs, p.labels), backend="torch")

    return build


def _cosent_compile(angle: bool) -> Builder:
    def build(p: Problem) -> Impl:
        ref = _import("fastloss.reference.cosent")
        if angle:
            fn = _compiled("angle", lambda a, b, y: ref.angle_loss([a, b], y, SCALE))
        else:
            fn = _compiled("cosent", lambda a, b, y: ref.cosent_loss(a, b, y, SCALE))
        return Impl(lambda: fn(*p.inputs, p.labels), backend="inductor")

    return build


COSENT = OpSpec(
    "cosent",
    _make_pairs,
    {
        "fastloss": _cosent_fastloss(False),
        "sentence_transformers": _cosent_st(False),
        "torch_compile": _cosent_compile(False),
    },
    description="CoSENTLoss, pairwise cos, scale 20; N = B (no GEMM: no gemm_floor)",
)
ANGLE = OpSpec(
    "angle",
    _make_pairs,
    {
        "fastloss": _cosent_fastloss(True),
        "sentence_transformers": _cosent_st(True),
        "torch_compile": _cosent_compile(True),
    },
    description="AnglELoss, scale 20; N = B (no GEMM: no gemm_floor)",
)


# ---------------------------------------------------------------------------------------------------------------
# batch-hard triplet family: embeddings [B, D], integer labels (B // 4 classes); N = B


def _make_labelled(B: int, N: int, D: int, dtype: torch.dtype, device: torch.device, seed: int) -> Problem:
    gen = _generator(device, seed)
    labels = torch.randint(0, max(2, B // 4), (B,), device=device, generator=gen)
    centers = _randn((max(2, B // 4), D), device, gen)
    x = centers[labels] + _randn((B, D), device, gen)
    return Problem(B, B, D, dtype, [_leaf(x, dtype)], labels=labels)


_TRIPLET_ST = {
    "batch_hard_triplet": "BatchHardTripletLoss",
    "batch_all_triplet": "BatchAllTripletLoss",
    "batch_semi_hard_triplet": "BatchSemiHardTripletLoss",
    "batch_hard_soft_margin_triplet": "BatchHardSoftMarginTripletLoss",
}


# the fastloss._C function each triplet op runs when the extension has it (batch-hard's mining)
_TRIPLET_NATIVE = {
    "batch_hard_triplet": "batch_hard_triplet_mine",
    "batch_hard_soft_margin_triplet": "batch_hard_triplet_mine",
    "batch_all_triplet": "batch_all_triplet_fused",
    "batch_semi_hard_triplet": "batch_semi_hard_triplet_fused",
}


def _triplet_fastloss(op: str, metric: str) -> Builder:
    def build(p: Problem) -> Impl:
        fn = _import("fastloss.functional", f"{op}_loss")
        (x,) = p.inputs
        backend = _backend_of(x, _TRIPLET_NATIVE.get(op, op), "blocked")
        return Impl(lambda: fn(x, p.labels, distance_metric=metric), backend=backend)

    return build


def _triplet_st(op: str, metric: str) -> Builder:
    def build(p: Problem) -> Impl:
        distances = _st_losses().BatchHardTripletLossDistanceFunction
        fn = distances.cosine_distance if metric == "cosine" else distances.euclidean_distance
        loss = _st_loss(_TRIPLET_ST[op], distance_metric=fn)
        return Impl(lambda: loss.compute_loss_from_embeddings(p.inputs, p.labels), backend="torch")

    return build


def _triplet_spec(op: str, metric: str = "euclidean") -> OpSpec:
    """Op ``op`` with euclidean distances (sentence-transformers' default), ``op``_cosine with cosine ones."""
    dense_backward = op in ("batch_all_triplet", "batch_semi_hard_triplet")
    return OpSpec(
        op if metric == "euclidean" else f"{op}_{metric}",
        _make_labelled,
        {
            "fastloss": _triplet_fastloss(op, metric),
            "sentence_transformers": _triplet_st(op, metric),
            "gemm_floor": _gemm_floor(lambda p: p.inputs[0], lambda p: p.inputs[0], 1 if dense_backward else 0),
        },
        description=f"{_TRIPLET_ST[op]}, {metric}, B // 4 classes; N = B; gemm_floor = the Gram matrix"
        + (" and its backward" if dense_backward else " (the backward touches only the chosen pairs)"),
    )


# batch-hard backward alone (op batch_hard_triplet_bwd): the problem of batch_hard_triplet, its selections mined once
# in the untimed set-up; fn() is the loss from the mined distances (O(B)), so fwd+bwd is one backward


class _MinedBatchHard(torch.autograd.Function):
    """(hp, hn) of selections mined beforehand; the backward runs ``bwd`` (one of fastloss's batch_hard_bwd paths)."""

    @staticmethod
    def forward(ctx, x: Tensor, hp: Tensor, hn: Tensor, sel_idx: Tensor, sel_d: Tensor, bwd: Callable):
        ctx.save_for_backward(x, sel_idx, sel_d)
        ctx.bwd = bwd
        ctx.mark_non_differentiable(sel_idx, sel_d)
        return hp.clone(), hn.clone()

    @staticmethod
    def backward(ctx, grad_hp: Tensor, grad_hn: Tensor):
        x, sel_idx, sel_d = ctx.saved_tensors
        return ctx.bwd(grad_hp.contiguous(), grad_hn.contiguous(), x, sel_idx, sel_d, 0), None, None, None, None, None


def _batch_hard_bwd(path: str) -> Builder:
    """fastloss: batch_hard_bwd as dispatched (CPU: fastloss._C; CUDA: torch ops unless FASTLOSS_CUDA_KERNELS=1);
    bwd_torch / bwd_native / bwd_cuda: that path forced."""

    def build(p: Problem) -> Impl:
        ops = _import("fastloss.ops.triplet")
        from fastloss import _backend

        (x,) = p.inputs
        cpu = x.device.type == "cpu"
        if path == "fastloss":
            bwd = ops.batch_hard_bwd
            if cpu and ops._native_bwd():
                backend = "native"
            else:
                backend = "cuda" if not cpu and ops._cuda_bwd() else "torch"
        elif path == "bwd_torch":
            bwd, backend = ops._batch_hard_bwd_torch, "torch"
        elif path == "bwd_native":
            if not cpu or not _backend.native_has("batch_hard_triplet_bwd"):
                raise Skip("bwd_native: CPU tensors and fastloss._C.batch_hard_triplet_bwd only")
            bwd, backend = ops._batch_hard_bwd_native, "native"
        else:
            if cpu or not _backend.native_has("batch_hard_triplet_bwd_cuda"):
                raise Skip("bwd_cuda: CUDA tensors and a CUDA build of fastloss._C only")
            bwd, backend = ops._batch_hard_bwd_cuda, "cuda"
        hp, hn, sel_idx, sel_d = ops.batch_hard_fwd(x.detach(), p.labels, 0)

        def fn() -> Tensor:
            hp_, hn_ = _MinedBatchHard.apply(x, hp, hn, sel_idx, sel_d, bwd)
            hinge = hp_ - hn_ + 5.0  # sentence-transformers' default margin
            return torch.where(hinge < 0, torch.zeros_like(hinge), hinge).mean()

        return Impl(fn, backend=backend, note="backward only: selections mined in the set-up")

    return build


BATCH_HARD_BWD = OpSpec(
    "batch_hard_triplet_bwd",
    _make_labelled,
    {
        "fastloss": _batch_hard_bwd("fastloss"),
        "bwd_torch": _batch_hard_bwd("bwd_torch"),
        "bwd_native": _batch_hard_bwd("bwd_native"),
        "bwd_cuda": _batch_hard_bwd("bwd_cuda"),
        "sentence_transformers": _triplet_st("batch_hard_triplet", "euclidean"),
    },
    description="the backward of BatchHardTripletLoss (euclidean, margin 5) alone, selections mined in the set-up: "
    "the torch-ops path (bwd_torch), fastloss._C's CPU kernel (bwd_native), its CUDA kernel (bwd_cuda)",
)


# ---------------------------------------------------------------------------------------------------------------
# L2 normalisation alone (op l2norm): x [B, D] -> F.normalize(x), and its backward for a fixed fp32 gradient dy (the
# dtype the losses' backward hands it); fn() returns one element of y, so fwd+bwd is one normalise and one backward

_L2NORM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # relative Frobenius error of y and dx; half: 2 ulp


class _Normalised(torch.autograd.Function):
    """y = fwd(x) in forward (returns y[0, 0] as fp32); the backward returns bwd(x, dy) for the stand-in ``dy``."""

    @staticmethod
    def forward(ctx, x: Tensor, dy: Tensor, fwd: Callable, bwd: Callable) -> Tensor:
        ctx.save_for_backward(x, dy)
        ctx.bwd = bwd
        return fwd(x)[0, 0].float().clone()

    @staticmethod
    def backward(ctx, _grad: Tensor):
        x, dy = ctx.saved_tensors
        return ctx.bwd(x, dy), None, None, None


def _make_l2norm(B: int, N: int, D: int, dtype: torch.dtype, device: torch.device, seed: int) -> Problem:
    gen = _generator(device, seed)
    x = _randn((B, D), device, gen)
    return Problem(B, B, D, dtype, [_leaf(x, dtype)], extra={"dy": _randn((B, D), device, gen)})


def _check_l2norm(name: str, x: Tensor, dy: Tensor, fwd: Callable, bwd: Callable, rows: int = 4096) -> None:
    """Refuse an implementation whose y or dx (first ``rows`` rows) is off F.normalize's autograd in fp64."""
    x, dy = x.detach()[:rows], dy[:rows]
    x64 = x.double().requires_grad_(True)
    y64 = F.normalize(x64, p=2, dim=1, eps=1e-12)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    tol = _L2NORM_TOL.get(x.dtype, 2.0 * torch.finfo(x.dtype).eps)
    with torch.no_grad():
        for what, got, truth in (("y", fwd(x), y64), ("dx", bwd(x, dy), dx64)):
            err = float(torch.linalg.vector_norm(got.double() - truth) / torch.linalg.vector_norm(truth))
            if not err <= tol:  # NaN fails too
                raise RuntimeError(f"l2norm/{name}: {what} off F.normalize in fp64 by {err:.2e} > {tol:.1e}")


def _l2norm(path: str) -> Builder:
    """fastloss: fastloss.ops.triplet's _normalize / _normalize_backward as dispatched (torch ops unless
    FASTLOSS_CUDA_KERNELS=1; half x promoted to fp32 first, as the cosine triplet losses and sentence-transformers'
    cos_sim do, so its forward also casts and writes fp32); norm_torch: those torch ops (F.normalize, then the fp32
    backward cast to x's dtype); norm_cuda: fastloss._C.l2norm_fwd / l2norm_bwd; norm_triton: F.normalize, then
    fastloss.ops.l2norm's Triton backward with its inverse norms (the flash MNRL path's epilogue, unless
    FASTLOSS_CUDA_KERNELS=1)."""

    def build(p: Problem) -> Impl:
        ops = _import("fastloss.ops.triplet")
        from fastloss import _backend

        (x,) = p.inputs
        dy = p.extra["dy"]
        if path == "fastloss":
            fwd = ops._normalize
            cuda = x.device.type == "cuda" and _backend.cuda_kernel_enabled("l2norm_bwd")
            backend = "cuda" if cuda else "torch"
        elif path in ("norm_torch", "norm_triton"):
            if path == "norm_triton" and x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise Skip("norm_triton: CUDA tensors (on CPU Triton runs only under the interpreter, in the tests)")
            fwd = lambda t: F.normalize(t, p=2, dim=1, eps=ops.NORM_EPS)
            backend = "triton" if path == "norm_triton" else "torch"
        else:
            if x.device.type != "cuda" or not _backend.native_has("l2norm_bwd"):
                raise Skip("norm_cuda: CUDA tensors and a CUDA build of fastloss._C only")
            fwd, backend = (lambda t: _backend.native_module().l2norm_fwd(t, ops.NORM_EPS)), "cuda"

        if path == "norm_cuda":

            def bwd(t: Tensor, g: Tensor) -> Tensor:
                return _backend.native_module().l2norm_bwd(t, g, ops.NORM_EPS)

        elif path == "norm_triton":
            l2norm = _import("fastloss.ops.l2norm")

            def bwd(t: Tensor, g: Tensor) -> Tensor:
                inv = torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).clamp_min(ops.NORM_EPS).reciprocal()
                return l2norm.l2norm_bwd(t, inv, g.float().contiguous(), torch.empty_like(t))

        else:
            backward = ops._normalize_backward_torch if path == "norm_torch" else ops._normalize_backward

            def bwd(t: Tensor, g: Tensor) -> Tensor:
                return backward(t, g).to(t.dtype)

        _check_l2norm(path, x, dy, fwd, bwd)
        return Impl(lambda: _Normalised.apply(x, dy, fwd, bwd), backend=backend, is_loss=False)

    return build


L2NORM = OpSpec(
    "l2norm",
    _make_l2norm,
    {name: _l2norm(name) for name in ("fastloss", "norm_torch", "norm_cuda", "norm_triton")},
    description="F.normalize(x) of [B, D] rows and its backward for an fp32 gradient (what the losses' backward "
    "hands it): torch ops (norm_torch) against fastloss._C's CUDA kernels (norm_cuda) and the Triton backward "
    "(norm_triton); checked against fp64 autograd",
)


# ---------------------------------------------------------------------------------------------------------------
# GradCache step: a tiny bag-of-words encoder, (anchor, positive) columns of B rows of L tokens, MNRL;
# one full training step's forward + backward in mini-batches of 64 rows


_VOCAB, _SEQ, _MINI = 4096, 32, 64


class _BagEncoder(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(_VOCAB, dim, mode="mean")
        self.proj = torch.nn.Linear(dim, dim)

    def __getitem__(self, index: int) -> torch.nn.Module:
        return (self.emb, self.proj)[index]  # sentence-transformers' Cached losses look at model[0]

    def forward(self, features: dict) -> dict:
        features = dict(features)
        features["sentence_embedding"] = self.proj(self.emb(features["input_ids"]))
        return features


def _make_gradcache(B: int, N: int, D: int, dtype: torch.dtype, device: torch.device, seed: int) -> Problem:
    if dtype != torch.float32:
        raise Skip("gradcache_step is benchmarked in fp32 only")
    gen = _generator(device, seed)
    torch.manual_seed(seed)
    encoder = _BagEncoder(D).to(device)
    cols = []
    for _ in range(max(2, N // B)):
        ids = torch.randint(0, _VOCAB, (B, _SEQ), device=device, generator=gen)
        cols.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    params = list(encoder.parameters())
    return Problem(B, max(2, N // B) * B, D, dtype, params, extra={"encoder": encoder, "columns": cols})


def _gradcache_fastloss(p: Problem) -> Impl:
    step = _import("fastloss.gradcache", "gradcache_step")
    fl = _import("fastloss.functional")
    encoder, cols = p.extra["encoder"], p.extra["columns"]

    def loss_fn(embs: list[Tensor]) -> Tensor:
        return fl.mnrl_loss(embs[0], embs[1:], SCALE)

    def fn() -> Tensor:
        return _Done.apply(step(encoder, cols, loss_fn, mini_batch_size=_MINI), p.inputs[0])

    return Impl(fn, backend=_mnrl_backend(p.inputs[0]), note="gradcache_step with fastloss MNRL")


def _gradcache_uncached(p: Problem) -> Impl:
    """The same step without GradCache: the whole batch embedded with gradients, fastloss MNRL, one backward (the
    baseline of issue 4's "cached step at most 1.3x an uncached step")."""
    fl = _import("fastloss.functional")
    encoder, cols = p.extra["encoder"], p.extra["columns"]

    def fn() -> Tensor:
        embs = [encoder(c)["sentence_embedding"] for c in cols]
        return fl.mnrl_loss(embs[0], embs[1:], SCALE)

    return Impl(fn, backend=_mnrl_backend(p.inputs[0]), note="uncached step with fastloss MNRL")


def _gradcache_st(p: Problem) -> Impl:
    cached = getattr(_st_losses(), "CachedMultipleNegativesRankingLoss", None)
    if cached is None:
        raise Skip("sentence-transformers has no CachedMultipleNegativesRankingLoss")
    encoder, cols = p.extra["encoder"], p.extra["columns"]
    loss = cached(encoder, scale=SCALE, mini_batch_size=_MINI)

    def fn() -> Tensor:
        return loss(cols, None)

    return Impl(fn, backend="torch", note="CachedMultipleNegativesRankingLoss (backward on .backward())")


class _Done(torch.autograd.Function):
    """Wraps an already back-propagated loss so that the harness's .backward() is a no-op that keeps the graph
    shape (gradcache_step runs its backward inside the call)."""

    @staticmethod
    def forward(ctx, loss: Tensor, anchor: Tensor) -> Tensor:
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


GRADCACHE = OpSpec(
    "gradcache_step",
    _make_gradcache,
    {"fastloss": _gradcache_fastloss, "sentence_transformers": _gradcache_st, "fastloss_uncached": _gradcache_uncached},
    check_batch=128,
    description=f"one cached step (mini-batches of {_MINI}) of a bag-of-words encoder ({_SEQ} tokens) with MNRL; "
    "time and memory of the whole step",
)


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        MNRL,
        MNSRL,
        GTE,
        COSENT,
        ANGLE,
        *(_triplet_spec(op) for op in _TRIPLET_ST),
        # cosine on half inputs: the mining kernel's half rows scaled by inverse norms (fastloss.ops.triplet's
        # _cosine_operand) against sentence-transformers' fp32 unit rows
        _triplet_spec("batch_hard_triplet", "cosine"),
        BATCH_HARD_BWD,
        L2NORM,
        GRADCACHE,
    )
}


def preload() -> None:
    """Import the heavy modules now and move every object alive after that out of the garbage collector's
    generations (gc.freeze), so that the gc.collect() before each memory measurement takes milliseconds."""
    import gc

    for module in ("fastloss.functional", "sentence_transformers.sentence_transformer.losses"):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - reported where the module is used
            pass
    gc.collect()
    gc.freeze()


def op_available(name: str, device: torch.device) -> str | None:
    """None when the op's fastloss implementation imports (and selects a backend), else the reason."""
    spec = OPS[name]
    try:
        p = spec.make(8, 16, 8, torch.float32, device, 0)
        spec.impls["fastloss"](p)
    except Skip as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001
        return f"fastloss {name} unavailable ({type(exc).__name__}: {exc})"
    return None
