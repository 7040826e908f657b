"""The row-block MNRL op in torch ops (fastloss.ops.mnrl_blocked): its blocks, its half-dtype GEMM operands, its
memory bound and when it is chosen. Its values and gradients on the whole configuration grid are tested with the
other backends in test_mnrl.py (backend "blocked")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _helpers import (
    CONFIDENT,
    CONFIDENT_LAYOUTS,
    assert_small_row_keeps_its_gradient,
    confident_errors,
    launch_counter,
    leaf,
    needs_interpreter,
    rel_err,
    small_rows_fp16,
)

import fastloss.functional as FF
from fastloss import _backend
from fastloss.functional.mnrl import mnrl_backend
from fastloss.ops import mnrl_blocked
from fastloss.ops.mnrl import MNRLParams, directions, mnrl

CONFIGS = [
    pytest.param(MNRLParams(offset=0, batch=13, directions=15, hardness=3, alpha=0.3), id="all4-all_negatives"),
    pytest.param(MNRLParams(offset=4, batch=6, directions=9, hardness=2, alpha=0.5), id="qd+dd-hard-gathered"),
    pytest.param(MNRLParams(offset=2, batch=9, directions=5, joint=False), id="qd+dq-per_direction-gathered"),
    pytest.param(MNRLParams(offset=0, batch=13, directions=3, hardness=1, alpha=0.2, normalize=False), id="dot"),
    # query_to_doc alone (the drop-ins' default; the one-direction block terms)
    pytest.param(MNRLParams(offset=0, batch=13, directions=1, hardness=1, alpha=0.3), id="qd-alone-in_batch"),
    pytest.param(MNRLParams(offset=4, batch=6, directions=1, joint=False), id="qd-alone-per_direction-gathered"),
]


def _inputs(world=13, dim=24, columns=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(world, dim, generator=g).to(dtype), torch.randn(columns * world, dim, generator=g).to(dtype)


def _run(q, d, p, scale=20.0):
    args = (leaf(q), leaf(d), leaf(torch.tensor(scale, device=q.device)))
    loss = mnrl(*args, p, "blocked")
    loss.backward()
    return [loss.detach(), *(x.grad for x in args)]


def _block_mib(p: MNRLParams, rows: int, world: int = 13, columns: int = 3) -> str:
    """FASTLOSS_MNRL_BLOCK_MIB for blocks of ``rows`` rows of _inputs' shapes (fp32 logits, the partners' entries)."""
    widths = sum((columns if bit in (1, 8) else 1) * world for bit in (1, 2, 4, 8) if p.directions & bit)
    widths += p.batch * sum(k >= 0 for k in mnrl_blocked.partners(directions(p)))  # the partners' entries
    return str(rows * widths * 4 / 2**20)


@pytest.mark.parametrize("p", CONFIGS)
def test_any_block_size_gives_the_same_result(monkeypatch, p):
    """One block of all rows, blocks of 4 rows (the last shorter) and of one row: the same loss and gradients
    (up to the summation order of the accumulated candidate gradients); no product has more rows than a block."""
    q, d = _inputs()
    whole = _run(q, d, p)
    sizes = []
    mm = mnrl_blocked._mm
    monkeypatch.setattr(mnrl_blocked, "_mm", lambda a, b, *rest: sizes.append(tuple(a.shape)) or mm(a, b, *rest))
    for rows in (4, 1):
        monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", _block_mib(p, rows))
        sizes.clear()
        got = _run(q, d, p)
        # the logits products [m, D] x [D, N] and the gradient products [m, N] x [N, D], [N, m] x [m, D]: a block of
        # m rows (the last shorter), never more
        logits = [m for m, inner in sizes if inner == q.shape[1]]
        assert max(logits) == min(rows, p.batch) and sum(logits) == p.batch * bin(p.directions).count("1")
        assert max(min(shape) for shape in sizes) <= rows
        for a, b in zip(got, whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "p",
    [
        pytest.param(MNRLParams(offset=0, batch=13, directions=5), id="qd+dq-joint"),
        pytest.param(MNRLParams(offset=4, batch=4, directions=5, joint=False), id="qd+dq-per_direction-3x"),
        pytest.param(MNRLParams(offset=3, batch=7, directions=15, hardness=1, alpha=0.4), id="all4-in_batch-gathered"),
        pytest.param(MNRLParams(offset=0, batch=13, directions=10 + 1, normalize=False), id="qd+qq+dd-dot"),
    ],
)
@pytest.mark.parametrize("rows", [1, 3])
def test_shared_products_over_blocks(monkeypatch, p, rows):
    """Where directions share products (partners: query_to_doc's positives and doc_to_query's rows, the Gram blocks
    of query_to_query and doc_to_doc), each block adds the earlier rows' softmax entries to its own and leaves the
    later rows' columns to their blocks: in fp64, in blocks of one and three rows, the loss and gradients of one
    block (which shares nothing: test_mnrl checks it against the reference on the whole grid)."""
    q, d = _inputs(dtype=torch.float64, seed=rows)
    whole = _run(q, d, p)
    monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", str(rows * (4 * 39 + 4 * p.batch) * 8 / 2**20))
    for a, b in zip(_run(q, d, p), whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_shared_product_of_a_direction_far_below_the_partition(monkeypatch):
    """Row 1's query and positive are one vector, so its joint partition sits at the positive's logit (500) and its
    query_to_query softmax factor (q_0 . q_1 = 0.6: logit 300) underflows, while that product is row 0's top entry:
    row 1's block, which takes the product for both rows, applies the factor to G instead of dividing by it."""
    q = torch.zeros(4, 6)
    q[0, :2] = torch.tensor([0.6, 0.8])
    q[1, 0] = q[2, 3] = q[3, 4] = 1.0
    d = torch.zeros(4, 6)
    d[0, 2] = d[1, 0] = d[2, 3] = d[3, 5] = 1.0
    p = MNRLParams(offset=0, batch=4, directions=15)
    whole = _run(q.double(), d.double(), p, scale=500.0)  # one block: nothing shared
    monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", str(1e-9))  # one row per block
    got = _run(q, d, p, scale=500.0)
    assert all(bool(torch.isfinite(t).all()) for t in got)
    for a, b in zip(got, whole):  # fp32 logits of scale 500: ~1e-4 of rounding
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_block_rows_follow_the_budget(monkeypatch):
    p = MNRLParams(offset=0, batch=4096, directions=15)  # four directions: 2 x 8192 + 2 x 4096 columns per row
    monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", "16")
    budget = mnrl_blocked.block_bytes(torch.device("cpu"))
    assert budget == 16 * 2**20
    row = (2 * 8192 + 2 * 4096) * 4 + 8192 * 2  # fp32 logits of every direction, bf16 G of the widest
    assert mnrl_blocked.block_rows(p, 4096, 2, 4, 2, budget) == budget // row
    assert mnrl_blocked.block_rows(p, 4096, 2, 4, 2, 1) == 1  # at least one row
    assert mnrl_blocked.block_rows(p, 4096, 2, 4, 0, 2**40) == 4096  # at most the batch
    monkeypatch.delenv("FASTLOSS_MNRL_BLOCK_MIB")
    assert mnrl_blocked.block_bytes(torch.device("cpu")) == 64 * 2**20
    assert mnrl_blocked.block_bytes(torch.device("cuda")) == 1024 * 2**20


@pytest.mark.parametrize("value", ["0", "-3", "lots", "inf", "nan"])
def test_bad_block_budget_raises(monkeypatch, value):
    monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", value)
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    q, d = _inputs(4, 8, 1)
    with pytest.raises(ValueError, match="^FASTLOSS_MNRL_BLOCK_MIB must be a positive number of MiB"):
        FF.mnrl_loss(q, d)


def test_bad_algorithm_raises(monkeypatch):
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "flashy")
    q, d = _inputs(4, 8, 1)
    with pytest.raises(ValueError, match="^FASTLOSS_MNRL_ALGO must be one of"):
        FF.mnrl_loss(q, d)


def test_which_backend_runs(monkeypatch):
    q = torch.zeros(2, 3)
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    assert mnrl_backend(q) == "blocked"
    monkeypatch.setenv("FASTLOSS_BACKEND", "torch")
    assert mnrl_backend(q) == "torch"  # the reference stays forceable
    if _backend.triton_available() and _backend.triton_interpret():
        monkeypatch.setenv("FASTLOSS_BACKEND", "triton")
        assert mnrl_backend(q) == "blocked"  # where the flash kernels would run
        monkeypatch.delenv("FASTLOSS_MNRL_ALGO")
        assert mnrl_backend(q) == "triton"
    # CPU tensors without fastloss._C, and CUDA tensors without Triton, take the row-block op, not the B x N reference
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    monkeypatch.delenv("FASTLOSS_MNRL_ALGO", raising=False)
    monkeypatch.setattr(_backend, "native_has", lambda op: False)
    assert mnrl_backend(q) == "blocked"
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # only the device and dtype are read
    symmetric = ("query_to_doc", "doc_to_query")  # the flash kernels' by default where Triton runs
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert mnrl_backend(cuda, symmetric) == "blocked"
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    assert mnrl_backend(cuda, symmetric) == "triton"
    # fp64, which the flash kernels do not take, runs the row-block op in fp64
    assert mnrl_backend(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64)) == "blocked"


def test_auto_takes_row_blocks_where_an_h200_measured_them_faster(monkeypatch):
    """On CUDA, FASTLOSS_MNRL_ALGO=auto runs one-direction MNRL in bf16/fp16/fp32 in row blocks (cuBLAS) and every
    other direction set in the flash kernels, unless FASTLOSS_BACKEND=triton names them; ``flash`` keeps the flash
    kernels, ``blocked`` takes row blocks; CPU tensors are not affected."""
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    monkeypatch.delenv("FASTLOSS_MNRL_ALGO", raising=False)
    monkeypatch.setattr(_backend, "triton_available", lambda: True)

    def on(dtype, device="cuda"):
        return SimpleNamespace(device=torch.device(device), dtype=dtype)  # only the device and dtype are read

    one, symmetric = ("query_to_doc",), ("query_to_doc", "doc_to_query")
    gte = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert mnrl_backend(on(dtype), one) == "blocked"
        assert mnrl_backend(on(dtype)) == "blocked"  # query_to_doc is the default direction
        assert mnrl_backend(on(dtype), ["query_to_doc", "query_to_doc"]) == "blocked"
        assert mnrl_backend(on(dtype), symmetric) == mnrl_backend(on(dtype), gte) == "triton"
        assert mnrl_backend(on(dtype), ("query_to_query",)) == "triton"
    monkeypatch.setenv("FASTLOSS_BACKEND", "triton")  # the Triton kernels asked for by name
    assert mnrl_backend(on(torch.bfloat16), one) == mnrl_backend(on(torch.float32), one) == "triton"
    monkeypatch.delenv("FASTLOSS_BACKEND")
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "flash")
    assert mnrl_backend(on(torch.bfloat16), one) == mnrl_backend(on(torch.float32), one) == "triton"
    assert mnrl_backend(on(torch.float64), one) == "blocked"  # the flash kernels do not take fp64
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    assert mnrl_backend(on(torch.float32), gte) == "blocked"
    monkeypatch.delenv("FASTLOSS_MNRL_ALGO")
    cpu = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert mnrl_backend(cpu, one) == _backend.select(cpu, "mnrl_fused", cpu_impl="blocked")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("p", CONFIGS)
@pytest.mark.parametrize("rows", [None, 3], ids=["one-block", "blocks-of-3"])
def test_half_gemm_operands(monkeypatch, dtype, p, rows):
    """The CUDA path's rounding of G and of the weighted rows to the input dtype (emulated here with fp32 products
    of the rounded operands), with a zero vector among the rows and the candidates, against the same op in fp32 on
    the rounded inputs: within the half dtype's rounding, and finite; in several blocks, bf16 G takes the partners'
    entries (fp16 does not)."""
    q, d = _inputs(dtype=dtype)
    q[5], d[20] = 0.0, 0.0
    want = _run(q.float(), d.float(), p)
    if rows is not None:
        monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", str(rows * (8 * 39 * 4 + 39 * 2) / 2**20))
    monkeypatch.setattr(mnrl_blocked, "half_gemms", lambda x: True)
    got = _run(q, d, p)
    assert got[1].dtype == got[2].dtype == dtype and got[0].dtype == torch.float32
    bound = 4e-3 if dtype == torch.float16 else 2e-2  # 2**-11, 2**-8 relative rounding of the operands
    assert rel_err(got[0], want[0]) < 1e-6  # the logits are products of the inputs themselves, in fp32
    for a, b in zip(got[1:3], want[1:3]):
        keep = torch.isfinite(b.to(dtype)).all(dim=1)  # a zero vector's true gradient (1e12 x) overflows fp16
        assert torch.isfinite(a[keep]).all() and rel_err(a[keep], b[keep]) < bound
    assert rel_err(got[3], want[3]) < bound


@pytest.mark.parametrize("rows", [None, 4, 1], ids=["one-block", "blocks-of-4", "blocks-of-1"])
@pytest.mark.parametrize("p", CONFIGS)
def test_columns_as_they_come(monkeypatch, p, rows):
    """The doc columns go into the op uncopied, as mnrl() passes them (their concatenation was 128 MiB of the op's
    memory at the GPU target): the logits' products write each column's part of a block, the gradient products sum
    over the columns a span of candidates crosses (the shared products' spans too: blocks of 1 or 4 rows where
    directions share them). The loss and every gradient are those of the concatenation, up to the order of sums."""
    monkeypatch.setitem(mnrl_blocked.MERGE_MIN_ROWS, "other", 1)
    if rows is not None:
        monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", _block_mib(p, rows))
    q, d = _inputs()
    whole = _run(q, d, p)
    taken = [leaf(q), [leaf(x) for x in d.split(q.shape[0])], leaf(torch.tensor(20.0))]
    loss = mnrl(taken[0], taken[1], taken[2], p, "blocked")
    loss.backward()
    got = [loss.detach(), taken[0].grad, torch.cat([x.grad for x in taken[1]]), taken[2].grad]
    for a, b in zip(got, whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_without_grad_it_computes_only_the_loss(monkeypatch):
    q, d = _inputs()
    p = CONFIGS[0].values[0]
    calls = []
    mm = mnrl_blocked._mm
    monkeypatch.setattr(mnrl_blocked, "_mm", lambda a, b, *rest: calls.append(1) or mm(a, b, *rest))
    with torch.no_grad():
        loss = mnrl(q, d, torch.tensor(20.0), p, "blocked")
    assert len(calls) == 4  # one logits product per direction, no gradient products
    torch.testing.assert_close(loss, _run(q, d, p)[0])


@pytest.mark.gpu
class TestCUDA:
    """The row-block op on CUDA (cuBLAS with fp32 results for half operands) against the flash kernels and the
    fp32 reference of the same rounded inputs."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    @pytest.mark.parametrize("p", CONFIGS)
    def test_matches_the_flash_path_and_the_reference(self, dtype, p):
        from fastloss.reference import mnrl_loss

        q, d = (x.cuda() for x in _inputs(world=300, dim=768, dtype=dtype))
        got = _run(q, d, p)
        flash = [leaf(q), leaf(d), leaf(torch.tensor(20.0, device="cuda"))]
        mnrl(*flash, p, "triton").backward()
        bound = 1e-4 if dtype == torch.float32 else 1e-2
        for a, b in zip(got[1:3], flash[:2]):
            assert a.dtype == dtype and rel_err(a, b.grad) < bound
        ref = [leaf(x.float()) for x in (q, d)]
        names = {1: "query_to_doc", 2: "query_to_query", 4: "doc_to_query", 8: "doc_to_doc"}
        ref_loss = mnrl_loss(
            ref[0],
            list(ref[1].split(q.shape[0])),
            20.0,
            similarity_fct=_sim(p.normalize),
            offset=p.offset,
            batch_size=p.batch,
            directions=[n for bit, n in names.items() if p.directions & bit],
            partition_mode="joint" if p.joint else "per_direction",
            hardness_mode=[None, "in_batch_negatives", "hard_negatives", "all_negatives"][p.hardness],
            hardness_strength=p.alpha,
        )
        assert rel_err(got[0], ref_loss) < (1e-5 if dtype == torch.float32 else 1e-3)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    @pytest.mark.parametrize("p", [CONFIGS[0], CONFIGS[4]])  # all four directions; query_to_doc alone
    def test_columns_as_they_come(self, monkeypatch, dtype, p):
        """The doc columns as separate tensors on CUDA: cuBLAS writes each column's logits into its columns of the
        block (torch.mm with out_dtype and out= a column slice, whose row stride is the leading dimension; fp32:
        mm.out), in blocks of a few rows: the concatenation's loss and gradients, up to the GEMMs' summation order."""
        monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", "0.05")  # blocks of a few rows
        q, d = (x.cuda() for x in _inputs(world=300, dim=768, dtype=dtype))
        whole = _run(q, d, p)
        taken = [leaf(q), [leaf(x) for x in d.split(q.shape[0])], leaf(torch.tensor(20.0, device="cuda"))]
        loss = mnrl(taken[0], taken[1], taken[2], p, "blocked")
        loss.backward()
        got = [loss.detach(), taken[0].grad, torch.cat([x.grad for x in taken[1]]), taken[2].grad]
        bound = 1e-5 if dtype == torch.float32 else 1e-2
        for a, b in zip(got, whole):
            assert a.dtype == b.dtype and rel_err(a, b) < bound

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    @pytest.mark.parametrize(
        "p",
        [
            pytest.param(MNRLParams(offset=0, batch=300, directions=15, hardness=3, alpha=0.3), id="all4"),
            pytest.param(MNRLParams(offset=50, batch=200, directions=5, joint=False), id="qd+dq-per_direction"),
            pytest.param(MNRLParams(offset=0, batch=300, directions=11, normalize=False), id="qd+qq+dd-dot"),
        ],
    )
    def test_shared_products_over_blocks(self, monkeypatch, dtype, p):
        """The partners' entries on CUDA (after the Triton statistics, before the Triton G; cuBLAS products over
        column ranges, with fp32 results for half operands) in blocks of ~16 rows, against one block, which shares
        nothing (fp16 shares nothing either: only the blocks differ)."""
        q, d = (x.cuda() for x in _inputs(world=300, dim=768, dtype=dtype))
        whole = _run(q, d, p)
        monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", "0.25")
        got = _run(q, d, p)
        # fp32: the dot-product case's logits reach ~1e3, whose rounding the blocks' summation orders show (3e-5 on CPU)
        bound = (1e-4 if p.normalize else 5e-4) if dtype == torch.float32 else 1e-2
        for a, b in zip(got, whole):
            assert torch.isfinite(a).all() and rel_err(a, b) < bound

    def test_large_batch_in_several_blocks(self, monkeypatch):
        # a row: 8192 fp32 logits and bf16 G, 48 KiB, so 1365 rows a block and four blocks (the last of one row)
        monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", "64")
        q, d = (x.cuda() for x in _inputs(world=4096, dim=1024, columns=2, dtype=torch.bfloat16))
        p = MNRLParams(offset=0, batch=4096)
        got = _run(q, d, p)
        monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", "1024")
        whole = _run(q, d, p)
        for a, b in zip(got, whole):
            assert rel_err(a, b) < 1e-3


def _sim(normalize: bool):
    from fastloss.similarity import cos_sim, dot_score

    return cos_sim if normalize else dot_score


@needs_interpreter  # CPU tensors, against the torch row passes (on a GPU: TestCUDA)
@pytest.mark.parametrize(
    "world,columns,p",
    [
        *[pytest.param(13, 3, c.values[0], id=c.id) for c in CONFIGS],
        # N = 1040 > one 1024-column step of a row; 5 local rows at offset 300 in blocks of 2
        pytest.param(520, 2, MNRLParams(offset=300, batch=5, directions=15, hardness=1, alpha=0.4), id="wide"),
        # W = 1: the query_to_query row has no candidate left (fully masked)
        pytest.param(1, 2, MNRLParams(offset=0, batch=1, directions=15), id="masked-row"),
    ],
)
def test_triton_row_passes_match_the_torch_ones(monkeypatch, world, columns, p):
    """The CUDA path's row passes (Triton: statistics of the raw block, then G) against the torch ones, in blocks."""
    q, d = _inputs(world, 8, columns)
    monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", str(2 * world * (2 * columns + 2) * 4 / 2**20))  # ~2 rows
    want = _run(q, d, p)
    monkeypatch.setattr(mnrl_blocked, "triton_rows", lambda x: True)
    got = _run(q, d, p)
    assert all(torch.isfinite(x).all() for x in got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# the interpreter casts with numpy, which warns where a value overflows fp16: here the folded entry of a zero
# vector's positive (inverse norm 1e12), which overflows by design and so stays unfolded (as on a GPU, silently)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@needs_interpreter  # CPU tensors, against the torch row passes (on a GPU: TestCUDA)
@pytest.mark.parametrize("p", [CONFIGS[0], CONFIGS[4]])  # all four directions; query_to_doc alone (its terms)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_row_passes_write_half_g(monkeypatch, dtype, p):
    """G written by the Triton kernel in the input dtype (fp16: the folded inverse norm capped) is as accurate as the
    torch path's rounding of the same values (the interpreter's bf16 conversion need not round the same way), both
    against the products in fp32; zero vectors give the same non-finite pattern (fp16: their 1e12 x gradient)."""
    q, d = _inputs(dtype=dtype)
    q[5], d[20] = 0.0, 0.0
    exact = _run(q, d, p)
    monkeypatch.setattr(mnrl_blocked, "half_gemms", lambda x: True)
    torch_rows = _run(q, d, p)
    monkeypatch.setattr(mnrl_blocked, "triton_rows", lambda x: True)
    triton_rows = _run(q, d, p)
    # Triton's interpreter converts fp32 to bf16 by truncation (a bias of -2.8e-3 on average, measured on uniform
    # values; CUDA rounds to nearest), so there bf16 G only gets the bound of its rounding
    truncating = dtype == torch.bfloat16 and q.device.type == "cpu"
    for a, b, truth in zip(triton_rows, torch_rows, exact):
        keep = torch.isfinite(truth)
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        bound = 2**-7 if truncating else 2 * rel_err(b[keep], truth[keep]) + 1e-6
        assert rel_err(a[keep], truth[keep]) <= bound


@needs_interpreter  # CPU tensors, against the torch row passes (on a GPU: TestCUDA)
@pytest.mark.parametrize("layout", ["qd", "all4"])
def test_triton_row_passes_in_confident_rows(monkeypatch, layout):
    """The row-block op with its Triton row passes (the negatives' sum apart in row_stats; the positive's logit
    taken on the host in the kernels' order of operations) where every row is nearly one-hot (loss ~7e-16): within
    2e-2 of the truth, where sentence-transformers' fp32 errors reach 2e5 (test_mnrl.test_confident_rows_precise)."""
    monkeypatch.setattr(mnrl_blocked, "triton_rows", lambda x: True)
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    ours, theirs = confident_errors(*CONFIDENT["loss7e-16"], *CONFIDENT_LAYOUTS[layout])
    for a, b in zip(ours, theirs):
        assert a <= 2 * b + 1e-6 and a <= 2e-2


ROW_PASSES = ["torch", pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("case", ["far_doc", "confident_query"])
@pytest.mark.parametrize("rows", ROW_PASSES)
def test_fp16_small_rows_keep_their_gradient(monkeypatch, rows, case):
    """The CUDA path's fp16 G (emulated here: fp32 products of the rounded operands) in the query rows' product: a
    small query whose row's entries all lie below fp16's subnormals (confident_query: the positive's folded p - 1
    and every other E c_inv ~1e-9) lost its 1 / |q|-amplified gradient (99% off, both row passes, before G_r, whose
    rows are scaled by powers of two into fp16's range); a far small doc (far_doc) keeps its gradient through the
    candidates' product, which takes G unscaled (its entries hold the doc's 1 / |d|). That row within 1e-3 of the
    fp64 truth on the same fp16 values (measured: 1.4e-4 and 4.3e-4), every gradient within 2e-2 of its size."""
    monkeypatch.setattr(mnrl_blocked, "half_gemms", lambda x: x.dtype == torch.float16)
    if rows == "triton":
        monkeypatch.setattr(mnrl_blocked, "triton_rows", lambda x: True)
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    assert_small_row_keeps_its_gradient(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rows", ROW_PASSES)
def test_half_gemms_keep_the_weighted_rows_directions(monkeypatch, rows, dtype):
    """The candidates' GEMM takes the query rows times powers of two (exact) and each row weight's mantissa in G's
    row: rounded as q_i w_i, a row's direction moved by the half dtype's rounding, which the normalisation's
    projection keeps whole where positive and query nearly coincide (the projection removes the rest). One direction,
    positives within 3% of their queries, scale 3 (gradients in fp16's normal range): the positives' gradient within
    1.25x the queries' error against fp64 (measured 1.0x; 1.5-2x before, 4.8e-3 against 2.3e-3 in bf16)."""
    monkeypatch.setattr(mnrl_blocked, "half_gemms", lambda x: x.dtype in (torch.float16, torch.bfloat16))
    if rows == "triton":
        monkeypatch.setattr(mnrl_blocked, "triton_rows", lambda x: True)
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(64, 64, generator=g, dtype=torch.float64)
    columns = [x.to(dtype) for x in (q, q + 0.03 * torch.randn(64, 64, generator=g, dtype=torch.float64))]
    grads = []
    for kind in (dtype, torch.float64):
        leaves = [leaf(x.to(kind)) for x in columns]
        FF.mnrl_loss(leaves[0], leaves[1:], 3.0).backward()
        grads.append([x.grad.double() for x in leaves])
    (dq, dp), (truth_q, truth_p) = grads
    assert rel_err(dp, truth_p) <= 1.25 * rel_err(dq, truth_q)


@needs_interpreter  # the Triton row pass computes them; the torch one keeps the product's (fp32 on a CPU)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_gemms_learnable_scale_from_the_products(monkeypatch, dtype):
    """dL/dscale of one-direction MNRL with the CUDA path's half GEMM operands: the statistics' row pass sums each
    row's sum_j p_j (t_j - t_own) in fp32 from the products; taken from <r, G C> with G rounded to the half dtype it
    was 4e-4 .. 9e-4 off in bf16 (the flash kernels and the native op 2e-7). Within 1e-5 of fp64 here (three columns,
    positives near their queries)."""
    monkeypatch.setattr(mnrl_blocked, "half_gemms", lambda x: x.dtype in (torch.float16, torch.bfloat16))
    monkeypatch.setattr(mnrl_blocked, "triton_rows", lambda x: True)
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(32, 32, generator=g, dtype=torch.float64)
    p = q + 0.3 * torch.randn(32, 32, generator=g, dtype=torch.float64)
    columns = [x.to(dtype) for x in (q, p, torch.randn(32, 32, generator=g, dtype=torch.float64))]
    grads = []
    for kind in (dtype, torch.float64):
        scale = leaf(torch.tensor(20.0, dtype=torch.float64 if kind == torch.float64 else torch.float32))
        FF.mnrl_loss(columns[0].to(kind), [x.to(kind) for x in columns[1:]], scale).backward()
        grads.append(float(scale.grad))
    assert abs(grads[0] - grads[1]) <= 1e-5 * abs(grads[1])


def _half_g(rows: str):
    """One block's fp16 G, G_r and row scales from a row pass (query_to_doc alone, in-batch negatives) over
    small_rows_fp16's confident query and a zero doc (its inverse norm capped, every row's largest entry where its E
    is large), the positive folded as the op folds it."""
    q, p = (x.float() for x in small_rows_fp16("confident_query"))
    d = torch.cat([p, torch.randn(8, 8, generator=torch.Generator().manual_seed(1))])
    d[12] = 0.0
    r_inv, c_inv = (x.norm(dim=1).clamp_min(1e-12).reciprocal() for x in (q, d))
    params = MNRLParams(offset=0, batch=8, directions=1, hardness=0)
    scale = torch.tensor(20.0)
    pass_ = (mnrl_blocked._TritonRows if rows == "triton" else mnrl_blocked._TorchRows)(params, 8, 2, scale)
    s, gmax = q @ d.t(), torch.empty(8)
    top, total, neg, _ = pass_.stats(s, directions(params)[0], r_inv, c_inv, 0, gmax=gmax)
    fold = (-(neg / total), total, 1.0, torch.zeros(8))  # p - 1 of the one direction
    return pass_.grad(s, directions(params)[0], r_inv, c_inv, 0, top, torch.float16, True, fold, None, gmax)


@needs_interpreter
def test_half_g_rows_scaled_into_range():
    """G_r, the query rows' fp16 operand, is G with each row times a power of two that takes its largest entry into
    [2^14, 2^15): equal to G times that where G is normal in fp16; the small query's row, 13 of whose 16 entries
    vanish in G (below 2^-24), keeps 15 in G_r. The Triton pass (its row max from row_stats) and the torch one (from
    E) scale alike; their G differ at the zero doc (column 12), whose inverse norm each caps at its own bound
    (32752 in the Triton pass, 65504 in torch ops)."""
    results = {rows: _half_g(rows) for rows in ("torch", "triton")}
    for g, g_r, rs in results.values():
        assert torch.equal(torch.frexp(rs).mantissa, torch.full_like(rs, 0.5))  # powers of two
        top = g_r.float().abs().amax(dim=1)
        assert bool(((top >= 2**14) & (top < 2**15)).all())
        normal = g.float().abs() >= 2**-14
        assert torch.equal(g_r.float()[normal], (g.float() * rs[:, None])[normal])
        assert int((g[3] == 0).sum()) == 13 and int((g_r[3] == 0).sum()) == 1
    (g, g_r, rs), (g_t, g_r_t, rs_t) = results.values()
    assert torch.equal(rs, rs_t)
    kept = torch.arange(16) != 12
    torch.testing.assert_close(g_r_t.float()[:, kept], g_r.float()[:, kept], rtol=2**-10, atol=0)
    torch.testing.assert_close(g_t.float()[:, kept], g.float()[:, kept], rtol=2**-10, atol=2**-24)


def test_fold_positive_only_where_the_entry_fits():
    """The positive's coefficient (E units; +inf where the op keeps the -1 apart) goes into G's entry where it fits
    G's dtype; a row without a coefficient, an fp16 row whose positive has a capped inverse norm, or whose entry would
    pass 65504, keep G as it was and leave their share to the separate term."""
    g = torch.full((4, 6), 0.25, dtype=torch.float16)
    c_inv = torch.tensor([1.0, 2.0, 1e6, 60000.0, 1.0, 1.0])  # rows 0..3 own columns 0..3 (g0 = 0)
    value = torch.tensor([-0.5, float("inf"), -0.5, -3.0])  # row 3: 60000 * -3 = -1.8e5, beyond fp16
    left = mnrl_blocked._fold_positive(g, 0, value, c_inv, 1.0, fp16=True)
    assert left.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert g[0, 0].item() == -0.5
    assert g[1, 1].item() == g[2, 2].item() == g[3, 3].item() == 0.25  # none; a capped inverse norm; overflow
    g32 = torch.full((1, 2), 0.25)
    left = mnrl_blocked._fold_positive(g32, 1, torch.tensor([-0.25]), c_inv[:2], 0.5, fp16=False)
    assert left.tolist() == [0.0] and g32[0, 1].item() == 2.0 * -0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_partner_entries_branch_free_gives_the_same_bits(dtype):
    """The CUDA form of _add_partner_entries (G's rows scaled by c or by exactly 1, no host sync) gives the bits of
    the checked form, with and without rows whose weight is below _MIN_FACTOR, and without earlier rows."""
    gen = torch.Generator().manual_seed(3)
    for small_rows in ([], [1, 4]):
        c = torch.rand(6, generator=gen) + 0.1
        c[small_rows] = 1e-30
        g = torch.rand(6, 20, generator=gen).to(dtype)
        for entries in (None, torch.rand(6, 5, generator=gen)):
            outs = []
            for branch_free in (False, True):
                g_i = g.clone()
                e_i = None if entries is None else entries.clone()
                c_i = mnrl_blocked._add_partner_entries(g_i, c.clone(), e_i, 3, branch_free=branch_free)
                outs.append((g_i, c_i))
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_branch_free_partner_entries_through_the_op(monkeypatch):
    """The whole row-block op with shared products over several blocks (the symmetric loss and GTE's four
    directions), its partner entries in the CUDA form, gives the same bits as in the checked form."""
    import functools

    q, d = _inputs(world=40, columns=2)
    real = mnrl_blocked._add_partner_entries
    monkeypatch.setitem(mnrl_blocked.MERGE_MIN_ROWS, "other", 8)
    monkeypatch.setenv("FASTLOSS_MNRL_BLOCK_MIB", "0.002")  # blocks of a few rows
    for p in (MNRLParams(offset=0, batch=40, directions=5, joint=False), MNRLParams(offset=0, batch=40, directions=15)):
        checked = _run(q, d, p)
        monkeypatch.setattr(mnrl_blocked, "_add_partner_entries", functools.partial(real, branch_free=True))
        branch_free = _run(q, d, p)
        monkeypatch.setattr(mnrl_blocked, "_add_partner_entries", real)
        for a, b in zip(checked, branch_free):
            assert torch.equal(a, b)


def _cuda_launches(monkeypatch, p, dtype, rows_per_block):
    """Kernel launches of one call of the row-block op with gradients on fake CUDA tensors (Q [B, 768], two doc
    columns as the drop-ins pass them, each its own tensor): the ATen ops that launch one, counted by a dispatch mode,
    and the Triton launches (row passes and the normalisation backward, stubbed: fake tensors run no kernel), one
    each."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastloss.ops import block_softmax, l2norm

    launches = []

    def row_stats(s, *args, positive_col=False, terms=None, **kwargs):
        launches.append("row_stats")
        out = torch.empty((7, s.shape[0]), device=s.device)
        stats = (out[0], out[1], out[2] if positive_col else None, out[3])
        return stats if terms is None else (*stats, *out[4:])

    def row_grad(s, r_inv, c_inv, scale, top, out, **kwargs):
        launches.append("row_grad")
        return out

    def l2norm_bwd(x, inv, grad, out, scaled=False, positive=None):
        launches.append("l2norm_bwd")
        return out

    def inverse_norms(xs, offsets, length, normalize, pairs=None):
        launches.extend(["inverse_norms"] * len(xs))
        return torch.empty(length, device=xs[0].device), None

    monkeypatch.setattr(block_softmax, "row_stats", row_stats)
    monkeypatch.setattr(block_softmax, "row_grad", row_grad)
    monkeypatch.setattr(l2norm, "l2norm_bwd", l2norm_bwd)
    monkeypatch.setattr(l2norm, "inverse_norms", inverse_norms)
    monkeypatch.setattr(mnrl_blocked, "triton_rows", lambda x: True)
    monkeypatch.setattr(mnrl_blocked, "block_rows", lambda *args, **kwargs: rows_per_block)
    with FakeTensorMode():
        q = torch.empty(p.batch, 768, device="cuda", dtype=dtype)
        docs = [torch.empty(p.batch, 768, device="cuda", dtype=dtype) for _ in range(2)]
        scale = torch.empty((), device="cuda")
        with launch_counter(launches):
            mnrl_blocked.mnrl_blocked(q, docs, scale, p, True)
    assert not {"host_to_device", "device_to_host"} & set(launches)  # no host sync
    assert launches.count("inverse_norms") == 3 and "aten.linalg_vector_norm" not in launches  # once per tensor
    return len(launches)


@pytest.mark.unpoisoned
@pytest.mark.parametrize("joint", [True, False], ids=["joint", "per_direction"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_one_direction_launches_per_block(monkeypatch, dtype, joint):
    """On CUDA each launch costs the host ~10-25 us, and a block of ~700 rows at the GPU target (B = 32768, N =
    65536, D = 1024) is ~0.5 ms of GEMMs: the H200 run's 256 MiB blocks took 2.5x as long as 1024 MiB ones (100.6
    against 39.8 ms), as ~90 launches a block would. One-direction MNRL (the CUDA default) launches at
    most 12 kernels per block with two doc columns (a GEMM per column for the logits and for the query rows'
    product; fp16: 21, whose weighted rows are rescaled for its range, their weights divided by the mantissas that G
    takes, and whose query rows' product is divided by the row scales of its G_r): the GEMMs, the two row passes (the
    block's terms, dL/dscale's and the positive's separate weight written by them), the query rows finished in three
    (the positive's term in the normalisation backward's launch); and 23 for a whole call of one block (32 in fp16)
    at B = 8192 (the row losses' softplus in the row pass too). Until stop 45 14 and 27, dL/dscale's row dots two
    launches a block. Before 2026-11-30: 29 a block and 66 a call with the
    columns concatenated (89 and 188 before 3ac9dc9); 15 and 33 until 2026-12-02, when the inverse norms became a
    Triton launch per tensor (l2norm.inverse_norms, for 7 torch ops) and the positive's term joined l2norm_bwd's
    launch (in the docs' rows too: 28 a call before). Counted on fake CUDA tensors (FakeTensorMode)."""
    p = MNRLParams(offset=0, batch=8192, directions=1, joint=joint)
    one = _cuda_launches(monkeypatch, p, dtype, 8192)
    per_block = (_cuda_launches(monkeypatch, p, dtype, 1024) - one) / 7
    extra = 9 if dtype == torch.float16 else 0
    assert per_block <= 12 + extra and one <= 23 + extra
