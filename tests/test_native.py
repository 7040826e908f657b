"""The native CPU kernel fastloss._C.mnrl_fused against the plain-PyTorch reference (sentence-transformers' maths).

The truth is the reference evaluated in fp64 on the very values the kernel sees; the kernel accumulates in fp32
(fp64 for fp64 inputs), so the loss matches to fp32 rounding in every dtype and the gradients to the rounding of
their output dtype.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from _helpers import NO_MKL_BF16, mkl_bf16_gemm

from fastloss import _backend
from fastloss.ops.mnrl import DIRECTION_BITS, MNRLParams, mnrl
from fastloss.reference import mnrl_loss
from fastloss.similarity import cos_sim, dot_score

_C = _backend.native_module()
if _C is None or not hasattr(_C, "mnrl_fused"):
    pytest.skip("fastloss._C is not built (pip install --no-deps --no-build-isolation -e .)", allow_module_level=True)

# (rtol, atol) per input dtype: the loss is always accumulated in fp32 or better; the gradients come back in the
# input dtype, so they carry its rounding.
LOSS_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),
}
GRAD_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-4),
}
SCALE = {"cos": 20.0, "dot": 1.0}  # dot-product inputs have O(1) entries: O(1) logits, as trained models give
HARDNESS = {0: None, 1: "in_batch_negatives", 2: "hard_negatives", 3: "all_negatives"}
ALPHA = 0.7

DIRECTION_SETS = [
    ("query_to_doc",),
    ("query_to_doc", "query_to_query"),
    ("query_to_doc", "doc_to_query"),
    ("query_to_doc", "doc_to_doc"),
    ("query_to_doc", "query_to_query", "doc_to_query"),
    ("query_to_doc", "query_to_query", "doc_to_doc"),
    ("query_to_doc", "doc_to_query", "doc_to_doc"),
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
]
# sentence-transformers allows per_direction only when every direction's pool holds the positive
PARTITIONS = [(dirs, "joint") for dirs in DIRECTION_SETS] + [
    (dirs, "per_direction") for dirs in DIRECTION_SETS if set(dirs) <= {"query_to_doc", "doc_to_query"}
]


def _ids(dirs: tuple[str, ...], partition: str) -> str:
    short = {"query_to_doc": "qd", "query_to_query": "qq", "doc_to_query": "dq", "doc_to_doc": "dd"}
    return "+".join(short[d] for d in dirs) + "-" + partition


def make_inputs(world: int, dim: int, columns: int, similarity: str, dtype: torch.dtype, seed: int = 0):
    """Queries [W, D] and ``columns`` doc columns, rounded to ``dtype``; dot-product inputs scaled to O(1) logits."""
    g = torch.Generator().manual_seed(seed)
    shrink = 1.0 if similarity == "cos" else dim**-0.5
    q = (torch.randn(world, dim, generator=g, dtype=torch.float64) * shrink).to(dtype)
    docs = [(torch.randn(world, dim, generator=g, dtype=torch.float64) * shrink).to(dtype) for _ in range(columns)]
    return q, docs


def reference(q, docs, scale, *, similarity, offset, batch, directions, partition, hardness):
    """(loss, dq, dd, dscale) of the fp64 reference on the same values.

    dscale is a central difference: the reference's autograd gives NaN for it once a direction masks entries with
    -inf (d(-inf * scale) / d scale), while the loss itself is smooth in the scale.
    """
    q64 = q.detach().double().requires_grad_(True)
    docs64 = [c.detach().double().requires_grad_(True) for c in docs]

    def loss_at(s: float):
        return mnrl_loss(
            q64,
            docs64,
            s,
            similarity_fct=cos_sim if similarity == "cos" else dot_score,
            offset=offset,
            batch_size=batch,
            directions=directions,
            partition_mode=partition,
            hardness_mode=HARDNESS[hardness],
            hardness_strength=ALPHA if hardness else 0.0,
        )

    loss = loss_at(float(scale))
    grads = torch.autograd.grad(loss, [q64, *docs64])
    h = 1e-5
    with torch.no_grad():
        dscale = (loss_at(scale + h) - loss_at(scale - h)) / (2 * h)
    return loss.detach(), grads[0], torch.cat(grads[1:]), dscale


def native(q, docs, scale, *, similarity, offset, batch, directions, partition, hardness, need_grad=True):
    bits = sum(DIRECTION_BITS[d] for d in directions)
    return _C.mnrl_fused(
        q.contiguous(),
        [x.contiguous() for x in docs],  # the columns as the drop-ins hand them (test_columns_or_one_tensor)
        torch.tensor(float(scale)),
        offset,
        batch,
        bits,
        partition == "joint",
        hardness,
        ALPHA if hardness else 0.0,
        similarity == "cos",
        need_grad,
    )


def assert_matches(got, want, dtype):
    loss, dq, dd, dscale = got
    ref_loss, ref_dq, ref_dd, ref_dscale = want
    assert dq.shape == ref_dq.shape and dd.shape == ref_dd.shape and dscale.dim() == 0 and loss.dim() == 0
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dq.dtype == dtype and dd.dtype == dtype
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(dscale.double(), ref_dscale, rtol=rtol, atol=atol)
    rtol, atol = GRAD_TOL[dtype]
    for grad, ref_grad in ((dq, ref_dq), (dd, ref_dd)):
        want_grad = ref_grad.to(dtype).double()
        if dtype == torch.bfloat16 and bf16_gemms():
            # Both gradient GEMMs take G rounded to bf16 (2**-9 relative per entry). A row whose terms cancel (the
            # positive's against the negatives', then the normalisation's projection) keeps errors of its terms'
            # scale, so the bound is normwise, as for the CUDA row-block op's rounding of G
            # (test_mnrl_blocked.py::test_half_gemm_operands); the worst seen over 1920 gradients of odd shapes was
            # 8.1e-3 (5.0e-4 with fp32 GEMMs).
            err = torch.linalg.vector_norm(grad.double() - want_grad) / torch.linalg.vector_norm(want_grad)
            small = want_grad.abs().max() <= atol and grad.abs().max() <= atol  # e.g. cosine at D = 1: zero
            assert torch.isfinite(grad).all() and (err < 2e-2 or small), float(err)
            continue
        torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=atol)


def bf16_gemms() -> bool:
    """Whether the op multiplies bf16 inputs in MKL's bf16 GEMM now (FASTLOSS_NATIVE_BF16_GEMM; auto: an AMX CPU)."""
    return bool(_C.bf16_gemm_enabled())


def check_case(
    world,
    dim,
    columns,
    dtype,
    *,
    similarity,
    offset=0,
    batch=None,
    directions=DIRECTION_SETS[0],
    partition="joint",
    hardness=0,
    seed=0,
):
    q, docs = make_inputs(world, dim, columns, similarity, dtype, seed=seed)
    scale = SCALE[similarity]
    kwargs = dict(
        similarity=similarity,
        offset=offset,
        batch=batch or world,
        directions=directions,
        partition=partition,
        hardness=hardness,
    )
    assert_matches(native(q, docs, scale, **kwargs), reference(q, docs, scale, **kwargs), dtype)


ROWS = [(0, None), (5, 11)]
ROW_IDS = ["local", "distributed"]


@pytest.mark.parametrize("rows", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("directions,partition", PARTITIONS, ids=[_ids(*p) for p in PARTITIONS])
def test_directions(directions, partition, similarity, rows):
    """Every direction set and partition mode, with a hardness penalty and two hard-negative columns."""
    check_case(
        17,
        33,
        3,
        torch.float32,
        similarity=similarity,
        offset=rows[0],
        batch=rows[1],
        directions=directions,
        partition=partition,
        hardness=3,
    )


@pytest.mark.parametrize("rows", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("columns", [1, 2, 3], ids=["pos", "pos+1neg", "pos+2neg"])
@pytest.mark.parametrize("hardness", [0, 1, 2, 3], ids=["none", "in_batch", "hard", "all"])
def test_hardness(hardness, columns, similarity, rows):
    """Each hardness mode with 0..2 hard-negative columns, under all four directions (the penalty is query_to_doc's)."""
    check_case(
        17,
        33,
        columns,
        torch.float32,
        similarity=similarity,
        offset=rows[0],
        batch=rows[1],
        directions=DIRECTION_SETS[-1],
        hardness=hardness,
        seed=columns,
    )


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=["fp64", "fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize(
    "directions,partition", [PARTITIONS[0], PARTITIONS[7], PARTITIONS[9]], ids=[_ids(*PARTITIONS[i]) for i in (0, 7, 9)]
)
def test_dtypes(directions, partition, similarity, dtype):
    check_case(
        33,
        33,
        3,
        dtype,
        similarity=similarity,
        offset=3,
        batch=29,
        directions=directions,
        partition=partition,
        hardness=3,
        seed=1,
    )


@pytest.mark.parametrize("dim", [1, 33])
@pytest.mark.parametrize("world", [1, 7, 33])
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("partition", ["joint", "per_direction"])
def test_odd_sizes(partition, similarity, world, dim):
    directions = DIRECTION_SETS[-1] if partition == "joint" else ("query_to_doc", "doc_to_query")
    check_case(
        world,
        dim,
        2,
        torch.float32,
        similarity=similarity,
        directions=directions,
        partition=partition,
        hardness=1,
        seed=world * 100 + dim,
    )


@pytest.mark.parametrize("block_bytes", ["1", "600"], ids=["one-row", "some-rows"])
@pytest.mark.parametrize(
    "directions,partition", [PARTITIONS[7], PARTITIONS[9]], ids=[_ids(*PARTITIONS[i]) for i in (7, 9)]
)
def test_row_blocks(monkeypatch, directions, partition, block_bytes):
    """A small FASTLOSS_NATIVE_BLOCK_BYTES splits the rows into several blocks (with a short last one)."""
    monkeypatch.setenv("FASTLOSS_NATIVE_BLOCK_BYTES", block_bytes)
    # 11 queries, 22 docs: 600 bytes hold 2 rows of all four directions (66 fp32 logits) or 4 rows of qd+dq (33)
    check_case(
        11,
        33,
        2,
        torch.float32,
        similarity="cos",
        offset=1,
        batch=9,
        directions=directions,
        partition=partition,
        hardness=2,
        seed=3,
    )


@pytest.mark.parametrize("block_bytes", ["1", "1300"], ids=["one-row", "some-rows"])
@pytest.mark.parametrize(
    "offset,batch", [(0, 17), (4, 11), (6, 5)], ids=["local", "gathered-both-sides", "gathered-3x"]
)
@pytest.mark.parametrize("directions,partition", PARTITIONS, ids=[_ids(*p) for p in PARTITIONS])
def test_products_shared_between_directions(monkeypatch, directions, partition, offset, batch, block_bytes):
    """Over several row blocks, the one-pass op gives each product of the local rows' own vectors (query_to_doc's
    positives with doc_to_query's rows, query_to_query's and doc_to_doc's Gram blocks) one backward GEMM entry for
    both softmax entries that hold it: the block of the later row takes it, the earlier row's statistics read back.
    17 queries, 34 docs: 1300 bytes hold 3 rows of all four directions and 6 of two; the symmetric loss per
    direction runs the one-pass op at W >= 3B (the last rows) and two passes otherwise."""
    monkeypatch.setenv("FASTLOSS_NATIVE_BLOCK_BYTES", block_bytes)
    for similarity, hardness in (("cos", 1), ("dot", 3)):
        check_case(
            17,
            9,
            2,
            torch.float32,
            similarity=similarity,
            offset=offset,
            batch=batch,
            directions=directions,
            partition=partition,
            hardness=hardness,
            seed=offset + batch,
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_shared_product_of_a_direction_far_below_the_partition(monkeypatch, dtype):
    """Row 1's query and positive are one vector: its joint partition sits at the positive's logit, 500, and its
    query_to_query softmax factor (q_0 . q_1 = 0.6: logit 300) underflows to 0, while that product is row 0's top
    entry. Row 1's block takes the product for both rows (row 0's block came first), so it cannot divide row 0's
    softmax entry by that factor: the row takes the factor in place instead."""
    monkeypatch.setenv("FASTLOSS_NATIVE_BLOCK_BYTES", "1")
    q = torch.zeros(4, 6, dtype=torch.float64)
    q[0, :2] = torch.tensor([0.6, 0.8])
    q[1, 0] = q[2, 3] = q[3, 4] = 1.0
    d = torch.zeros(4, 6, dtype=torch.float64)
    d[0, 2] = d[1, 0] = d[2, 3] = d[3, 5] = 1.0
    q, d = q.to(dtype), d.to(dtype)
    kwargs = dict(similarity="cos", offset=0, batch=4, directions=DIRECTION_SETS[-1], partition="joint", hardness=0)
    got = native(q, [d], 500.0, **kwargs)
    assert all(bool(torch.isfinite(t).all()) for t in got)
    want = reference(q, [d], 500.0, **kwargs)
    if dtype == torch.float64:
        assert_matches(got, want, dtype)
    else:  # fp32 logits of scale 500 carry ~1e-4 of rounding into the softmax
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w.to(g.dtype).double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_bytes", [None, "1", "150"], ids=["one-block", "one-row", "some-rows"])
@pytest.mark.parametrize("columns", [1, 2], ids=["pos", "pos+1neg"])
@pytest.mark.parametrize(
    "world,offset,batch",
    [(13, 0, 13), (13, 4, 6), (13, 0, 5), (13, 8, 5), (16, 5, 5)],
    ids=["local", "gathered-both-sides", "gathered-after", "gathered-before", "gathered-3x"],
)
def test_symmetric_two_passes(monkeypatch, world, offset, batch, columns, block_bytes):
    """query_to_doc + doc_to_query per direction (the symmetric loss) runs in two passes while W < 3B: doc_to_query's
    logsumexp down the columns of Q P^T, block by block (rescaled as a column's max rises), then one pair of GEMMs for
    both directions, the other ranks' queries (before and after the local rows) in blocks of their own; at W >= 3B
    (the last case) the one-pass op. Blocks of one and a few rows in both passes."""
    if block_bytes is not None:
        monkeypatch.setenv("FASTLOSS_NATIVE_BLOCK_BYTES", block_bytes)
    for similarity in ("cos", "dot"):
        check_case(
            world,
            9,
            columns,
            torch.float32,
            similarity=similarity,
            offset=offset,
            batch=batch,
            directions=("query_to_doc", "doc_to_query"),
            partition="per_direction",
            hardness=2,
            seed=world + offset + columns,
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize(
    "directions,partition", [PARTITIONS[7], PARTITIONS[9]], ids=[_ids(*PARTITIONS[i]) for i in (7, 9)]
)
def test_zero_and_duplicate_rows(directions, partition, similarity, dtype):
    """Zero and duplicate rows, in the one-pass op (all four directions) and the symmetric loss's two passes."""
    q, docs = make_inputs(9, 16, 2, similarity, dtype, seed=4)
    q[2] = 0.0
    docs[0][5] = 0.0
    docs[1][7] = 0.0
    q[4] = q[3]
    docs[0][6] = docs[0][3]
    docs[1][1] = docs[0][1]
    kwargs = dict(similarity=similarity, offset=0, batch=9, directions=directions, partition=partition, hardness=3)
    got = native(q, docs, SCALE[similarity], **kwargs)
    assert all(bool(torch.isfinite(t).all()) for t in got)
    assert_matches(got, reference(q, docs, SCALE[similarity], **kwargs), dtype)


@pytest.mark.parametrize("block_bytes", [None, "1", "150"], ids=["one-block", "one-row", "some-rows"])
@pytest.mark.parametrize("rows", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize(
    "directions,partition", [PARTITIONS[0], PARTITIONS[7], PARTITIONS[9]], ids=[_ids(*PARTITIONS[i]) for i in (0, 7, 9)]
)
def test_bf16_gemms(monkeypatch, directions, partition, similarity, rows, block_bytes):
    """bf16 inputs in MKL's bf16 GEMMs (FASTLOSS_NATIVE_BF16_GEMM=1; the default on an AMX CPU) against the fp64
    reference, and against the fp32 GEMMs (=0): the logits are products of the bf16 inputs either way, exact in
    fp32, so the loss and dL/dscale agree to fp32 rounding; the gradients differ (G is rounded to bf16: the switch
    took effect) within that rounding. One pass (every direction; query_to_doc alone) and the symmetric loss's two,
    in one block, blocks of one row and of a few (the shared products' column spans)."""
    if not mkl_bf16_gemm():
        pytest.skip(NO_MKL_BF16)
    if block_bytes is not None:
        monkeypatch.setenv("FASTLOSS_NATIVE_BLOCK_BYTES", block_bytes)
    q, docs = make_inputs(19, 24, 3, similarity, torch.bfloat16, seed=12)
    q[2], docs[1][4] = 0.0, 0.0  # zero vectors: inverse norm 1e12 in G, which bf16's range holds
    kwargs = dict(
        similarity=similarity,
        offset=rows[0],
        batch=rows[1] or 19,
        directions=directions,
        partition=partition,
        hardness=3,
    )
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "0")
    assert not bf16_gemms()
    fp32 = native(q, docs, SCALE[similarity], **kwargs)
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "1")
    assert bf16_gemms()
    got = native(q, docs, SCALE[similarity], **kwargs)
    assert all(bool(torch.isfinite(t).all()) for t in got)
    assert_matches(got, reference(q, docs, SCALE[similarity], **kwargs), torch.bfloat16)
    for i in (0, 3):
        torch.testing.assert_close(got[i], fp32[i], rtol=1e-5, atol=1e-6)
    assert not (torch.equal(got[1], fp32[1]) and torch.equal(got[2], fp32[2]))


@pytest.mark.parametrize("world,dim,columns", [(1, 5, 3), (7, 1, 2), (2, 3, 1), (3, 2, 2)])
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("directions,partition", PARTITIONS, ids=[_ids(*p) for p in PARTITIONS])
def test_bf16_gemms_odd_shapes(monkeypatch, directions, partition, similarity, world, dim, columns):
    """bf16 GEMMs of one row, of D = 1, of two and three rows, for every direction set and partition."""
    if not mkl_bf16_gemm():
        pytest.skip(NO_MKL_BF16)
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "1")
    check_case(
        world,
        dim,
        columns,
        torch.bfloat16,
        similarity=similarity,
        directions=directions,
        partition=partition,
        hardness=3,
        seed=world + dim,
    )


@pytest.mark.parametrize("directions,joint", [(1, True), (5, False), (15, True)], ids=["q2d", "symmetric", "all4"])
def test_bf16_gemms_copy_no_inputs(monkeypatch, directions, joint):
    """Where bf16 GEMMs take bf16 inputs, the op reads them as they are: the norms and the normalisation's backward
    widen each entry as they read it, so its only conversions are its bf16 outputs' (counted in the bytes that
    torch's profiler sees aten::_to_copy allocate); fp32 GEMMs copy both inputs to fp32 besides (12 MiB at the CPU
    target shape, B = 4096 with 8192 docs, D = 256)."""
    if not mkl_bf16_gemm():
        pytest.skip(NO_MKL_BF16)
    from torch.profiler import ProfilerActivity, profile

    world, dim, columns = 16, 8, 3
    q = torch.randn(world, dim).bfloat16()
    d = torch.randn(columns * world, dim).bfloat16()
    outputs = (q.numel() + d.numel()) * 2

    def copied_bytes() -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _C.mnrl_fused(q, d, torch.tensor(20.0), 0, world, directions, joint, 3, 0.4, True, True)
        return sum(e.cpu_memory_usage for e in prof.events() if e.name == "aten::_to_copy")

    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "1")
    assert copied_bytes() == outputs
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "0")
    assert copied_bytes() == outputs + (q.numel() + d.numel()) * 4


def test_bf16_gemm_env(monkeypatch):
    """auto is MKL's bf16 GEMM where torch carries it and the CPU has AMX-BF16; other values than auto, 0 and 1 are
    refused by name."""
    info = _C.build_info()
    monkeypatch.delenv("FASTLOSS_NATIVE_BF16_GEMM", raising=False)
    assert bf16_gemms() == (info["mkl_bf16_gemm"] and info["amx_bf16"])
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "auto")
    assert bf16_gemms() == (info["mkl_bf16_gemm"] and info["amx_bf16"])
    monkeypatch.setenv("FASTLOSS_NATIVE_BF16_GEMM", "yes")
    with pytest.raises(RuntimeError, match="FASTLOSS_NATIVE_BF16_GEMM must be auto, 0 or 1, got 'yes'"):
        bf16_gemms()


def test_without_grad_returns_zeros():
    q, docs = make_inputs(7, 5, 2, "cos", torch.float32, seed=5)
    kwargs = dict(similarity="cos", offset=0, batch=7, directions=DIRECTION_SETS[-1], partition="joint", hardness=1)
    loss, dq, dd, dscale = native(q, docs, 20.0, need_grad=False, **kwargs)
    torch.testing.assert_close(loss, native(q, docs, 20.0, **kwargs)[0], rtol=0, atol=0)
    assert dq.shape == q.shape and dd.shape == (14, 5) and dscale.dim() == 0
    assert not dq.any() and not dd.any() and not dscale.any()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(d=torch.zeros(10, 4)), "k\\*W"),
        (dict(offset=5, batch=4), "local rows"),
        (dict(directions=2), "query_to_doc"),
        (dict(hardness=4), "hardness"),
        (dict(scale=torch.tensor(-1.0)), "scale"),
        (dict(q=torch.zeros(7, 4, dtype=torch.float64)), "dtype"),
    ],
    ids=["doc-rows", "rows-range", "no-query_to_doc", "hardness", "scale", "dtype-mismatch"],
)
def test_rejects_bad_input(change, message):
    args = dict(
        q=torch.randn(7, 4),
        d=torch.randn(14, 4),
        scale=torch.tensor(20.0),
        offset=0,
        batch=7,
        directions=1,
        joint=True,
        hardness=0,
        alpha=0.0,
        normalize=True,
        need_grad=True,
    )
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        _C.mnrl_fused(*args.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("directions,joint", [(1, True), (5, False), (5, True), (15, True)])
def test_columns_or_one_tensor(monkeypatch, dtype, directions, joint):
    """The doc columns as a list (read where they lie) or as one [k*W, D] tensor: the same results, in row blocks
    too, to the GEMMs' rounding (MKL's sums may differ in the last bit with the operands' alignment: the tensor's
    columns are views at offsets of W*D entries); the list's columns are checked one by one."""
    monkeypatch.setenv("FASTLOSS_NATIVE_BLOCK_BYTES", "2048")
    q, docs = make_inputs(23, 9, 3, "cos", dtype, seed=directions)
    scale = torch.tensor(20.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    args = (scale, 2, 19, directions, joint, 3, ALPHA, True, True)
    for got, want in zip(_C.mnrl_fused(q, docs, *args), _C.mnrl_fused(q, torch.cat(docs), *args)):
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(got, want, rtol=rtol / 10, atol=atol / 10)
    bad = {
        "each doc column must be \\[W, D\\]": [docs[0], torch.cat(docs[1:])],
        "share a dtype": [docs[0], docs[1].half()],
        "at least one column": [],
        "contiguous": [docs[0], docs[1].t().contiguous().t()],
    }
    for message, columns in bad.items():
        with pytest.raises(RuntimeError, match=message):
            _C.mnrl_fused(q, columns, *args)


def test_drop_in_copies_no_doc_columns():
    """The native op reads the drop-ins' doc columns where they lie: no [k*W, D] concatenation (8 MiB of fp32 at the
    CPU target shape, B = 4096 with 8192 docs, D = 256), whose copy torch's profiler would see as aten::cat."""
    from torch.profiler import ProfilerActivity, profile

    q, docs = make_inputs(16, 8, 3, "cos", torch.float32)
    q, docs = q.requires_grad_(True), [x.requires_grad_(True) for x in docs]
    p = MNRLParams(offset=0, batch=16, directions=1, joint=True, hardness=0, alpha=0.0, normalize=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mnrl(q, docs, torch.tensor(20.0), p, backend="native").backward()
    names = {e.name for e in prof.events()}
    assert "aten::cat" not in names
    assert all(x.grad is not None and x.grad.shape == x.shape for x in (q, *docs))


def test_dscale_finite_difference_fp64():
    """d loss / d scale in fp64, through the kernel alone (the scale is read as a double)."""
    q, docs = make_inputs(6, 5, 2, "cos", torch.float64, seed=6)
    d = torch.cat(docs)

    def loss_at(scale: float) -> float:
        out = _C.mnrl_fused(q, d, torch.tensor(scale, dtype=torch.float64), 1, 4, 15, True, 3, ALPHA, True, True)
        return float(out[0])

    dscale = float(_C.mnrl_fused(q, d, torch.tensor(7.0, dtype=torch.float64), 1, 4, 15, True, 3, ALPHA, True, True)[3])
    h = 1e-6
    assert dscale == pytest.approx((loss_at(7.0 + h) - loss_at(7.0 - h)) / (2 * h), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize(
    "params",
    [
        MNRLParams(offset=0, batch=5, directions=15, joint=True),
        MNRLParams(offset=1, batch=3, directions=5, joint=False),
        MNRLParams(offset=2, batch=2, directions=11, joint=True),
    ],
    ids=["all-joint", "qd+dq-per_direction", "qd+qq+dd-distributed"],
)
def test_gradcheck(params, similarity):
    """No hardness penalty here: its stop-gradient makes autograd's gradient differ from finite differences."""
    q, docs = make_inputs(5, 4, 2, similarity, torch.float64, seed=7)
    q, d = q.requires_grad_(True), torch.cat(docs).requires_grad_(True)
    scale = torch.tensor(SCALE[similarity], dtype=torch.float64)
    p = MNRLParams(**{**params.__dict__, "normalize": similarity == "cos"})
    assert torch.autograd.gradcheck(lambda q, d: mnrl(q, d, scale, p, backend="native"), (q, d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    q, docs = make_inputs(6, 8, 2, "cos", dtype, seed=8)
    q, docs = q.requires_grad_(True), [x.requires_grad_(True) for x in docs]  # the op takes the columns
    scale = torch.tensor(20.0, requires_grad=True)
    args = (q, docs, scale, 1, 4, 15, True, 3, ALPHA, True, True)
    torch.library.opcheck(torch.ops.fastloss.mnrl_fused.default, args)


def test_env_block_bytes_is_validated(monkeypatch):
    monkeypatch.setenv("FASTLOSS_NATIVE_BLOCK_BYTES", "lots")
    q, docs = make_inputs(3, 4, 1, "cos", torch.float32)
    with pytest.raises(RuntimeError, match="FASTLOSS_NATIVE_BLOCK_BYTES"):
        native(
            q,
            docs,
            20.0,
            similarity="cos",
            offset=0,
            batch=3,
            directions=("query_to_doc",),
            partition="joint",
            hardness=0,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here")
@pytest.mark.skipif(not hasattr(_C, "l2norm_fwd"), reason="fastloss._C was built without CUDA (FASTLOSS_BUILD_CUDA)")
@pytest.mark.parametrize("dim", [1, 33, 384, 1000])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=["fp64", "fp32", "fp16", "bf16"]
)
def test_l2norm_cuda_matches_f_normalize(dtype, dim):
    """Forward and backward against F.normalize in fp64, with a zero row and a row below eps; the backward for dy
    in x's dtype and in fp32 (fp64 for fp64 x: what the losses' backward hands it), dx in x's dtype either way."""
    g = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(129, dim, device="cuda", dtype=torch.float64, generator=g)
    dy64 = torch.randn(129, dim, device="cuda", dtype=torch.float64, generator=g)
    x[3] = 0.0
    x[5] *= 1e-14
    x = x.to(dtype)
    x64 = x.double().requires_grad_(True)
    y64 = F.normalize(x64, p=2, dim=1, eps=1e-12)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(_C.l2norm_fwd(x), y64.to(dtype), rtol=rtol, atol=atol)
    for dy in (dy64.to(dtype), dy64.to(torch.float64 if dtype == torch.float64 else torch.float32)):
        (dx64,) = torch.autograd.grad(y64, x64, dy.double(), retain_graph=True)
        dx = _C.l2norm_bwd(x, dy)
        assert dx.dtype == dtype
        torch.testing.assert_close(dx, dx64.to(dtype), rtol=rtol, atol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here")
@pytest.mark.skipif(not hasattr(_C, "l2norm_bwd"), reason="fastloss._C was built without CUDA (FASTLOSS_BUILD_CUDA)")
@pytest.mark.parametrize(
    "x_dtype, dy_dtype",
    [
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.float64),
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float32, torch.float16),
    ],
    ids=["bf16-fp16", "fp16-fp64", "fp32-fp64", "fp64-fp32", "fp32-fp16"],
)
def test_l2norm_bwd_cuda_rejects_other_dy_dtypes(x_dtype, dy_dtype):
    """dy must be in x's dtype or in x's accumulation dtype (fp32; fp64 for fp64)."""
    x = torch.randn(4, 8, device="cuda", dtype=x_dtype)
    with pytest.raises(RuntimeError, match="dy must be in x's dtype"):
        _C.l2norm_bwd(x, torch.randn(4, 8, device="cuda").to(dy_dtype))


@pytest.mark.skipif(
    os.environ.get("FASTLOSS_EXPECT_CUDA_BUILD") != "1",
    reason="FASTLOSS_EXPECT_CUDA_BUILD=1 is not set (the build was not asked to include CUDA)",
)
def test_cuda_build_requested():
    assert _C.build_info()["cuda"] is True


_HOT_LOOPS = (
    "segment_max_f32",
    "segment_exp_f32",
    "column_max_f32",
    "column_exp_f32",
    "column_softmax_f32",
    "hinge_pass_f32",
    "coefficients_f32",
    "first_match_f32",
    "distance_rows_f32",
    "round_scaled_bf16",
    "round_negated_bf16",
)
# fp32 -> bf16 narrowing loops: GCC's AVX-512 clones of these keep 256-bit vectors (16 floats narrow into one ymm)
_NARROWING = {"round_scaled_bf16", "round_negated_bf16"}


def _clones(suffix: str) -> dict[str, str]:
    """{function name: symbol} of the extension's per-extension clones (FASTLOSS_SIMD_CLONES) with this suffix."""
    out = subprocess.run(["nm", _C.__file__], capture_output=True, text=True, check=True).stdout
    symbols = [line.split()[-1] for line in out.splitlines() if line.endswith(suffix)]
    return {name: sym for sym in symbols for name in _HOT_LOOPS if f"{len(name)}{name}E" in sym}


@pytest.mark.skipif(
    os.uname().machine != "x86_64" or not all(shutil.which(t) for t in ("nm", "objdump")),
    reason="checks the x86-64 clones with binutils' nm and objdump",
)
@pytest.mark.parametrize("suffix, register", [(".avx2", "ymm"), (".avx512f", "zmm")], ids=["avx2", "avx512f"])
def test_hot_loops_vectorise(suffix, register):
    """The MNRL op's per-entry loops over its blocks of logits (max, exp, softmax), the batch-all / semi-hard triplet
    op's (hinges, coefficients), the triplet ops' distance rows and first-index search, and the two ops' rounding of
    gradient weights to bf16 for bf16 GEMMs (in 256-bit vectors at least), compiled once per x86 vector
    extension and picked at load time, use that extension's vector registers. Until 2026-11-30 their floating-point
    compares and selects kept GCC (-ftrapping-math) from vectorising them for AVX2, so CPUs without AVX-512 ran them one
    lane at a time (on an AMD EPYC, Zen 3: MNSRL at B=4096 473-501 ms, 294-318 since; batch-all at B=2048 79-85 ms,
    69-74 since); the hinge pass and the first-index search (a loop with an early exit) had no vector register in either
    clone."""
    clones = _clones(suffix)
    if not clones:
        pytest.skip(f"fastloss._C has no {suffix} clones (built without FASTLOSS_SIMD_CLONES' target_clones)")
    assert set(clones) == set(_HOT_LOOPS)
    for name, sym in clones.items():
        code = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", f"--disassemble={sym}", _C.__file__],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        wanted = ("ymm", "zmm") if name in _NARROWING else (register,)
        assert any(r in code for r in wanted), f"{name}{suffix} is not vectorised (no {register} register in its code)"
