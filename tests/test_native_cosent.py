"""The native CPU kernels fastloss._C.cosent_fwd / cosent_bwd (CoSENT and AnglE) through the public functions.

Each case is checked against three others: the plain-PyTorch reference evaluated in fp64 on the very values the
kernel sees (the truth), the op's closed-form torch implementation in the same dtype, and sentence-transformers'
CoSENTLoss / AnglELoss. The kernel accumulates in fp32 (fp64 for fp64 inputs), so the loss matches the truth to
fp32 rounding in every dtype and the gradients to the rounding of their output dtype.
"""

from __future__ import annotations

import pytest
import torch

from fastloss import _backend
from fastloss.functional.cosent import angle_loss, cosent_loss
from fastloss.losses.cosent import AnglELoss, CoSENTLoss
from fastloss.ops import cosent as cosent_op
from fastloss.reference import cosent as ref
from fastloss.similarity import pairwise_cos_sim, pairwise_dot_score

if not _backend.native_has("cosent_fwd"):
    pytest.skip(
        "fastloss._C has no cosent_fwd (build the extension: python3 setup.py build_ext --inplace)",
        **{"allow_module_level": True},
    )

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import util as st_util  # noqa: E402

try:
    from sentence_transformers.sentence_transformer import losses as st_losses
except ImportError:  # the older layout
    from sentence_transformers import losses as st_losses

_C = _backend.native_module()

# max |actual - truth| <= TOL * max(|truth|, 1), per input dtype: the loss is accumulated in fp32 (fp64) whatever
# the input dtype; the gradients come back in the input dtype and carry its rounding
LOSS_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp64", "fp32", "fp16", "bf16"]

KINDS = ["cos", "dot", "angle"]
FASTLOSS_SIM = {"cos": pairwise_cos_sim, "dot": pairwise_dot_score, "angle": ref.pairwise_angle_sim}
ST_SIM = {"cos": st_util.pairwise_cos_sim, "dot": st_util.pairwise_dot_score, "angle": st_util.pairwise_angle_sim}
PAIRS = [1, 2, 7, 63, 129]
DIMS = [1, 2, 33]
SCALE = 20.0


def make_columns(n_cols, n, dim, dtype, *, kind="cos", seed=0, magnitude=1.0):
    """``n_cols`` columns [n, dim] rounded to ``dtype``; dot-product inputs scaled to O(1) similarities.

    Rows have norm >= 0.2 sqrt(D): a row of norm 1e-4 (likely among 129 at D = 1) makes its cosine gradient a
    difference of 1e4-sized terms, rounding noise in every implementation (zero and tiny rows have their own tests).
    """
    g = torch.Generator().manual_seed(seed)
    std = magnitude * (dim**-0.5 if kind == "dot" else 1.0)
    floor = 0.2 * dim**0.5
    cols = []
    for _ in range(n_cols):
        x = torch.randn(n, dim, generator=g, dtype=torch.float64)
        norm = x.norm(dim=1, keepdim=True)
        cols.append((torch.where(norm < floor, x * (floor / norm), x) * std).to(dtype))
    return cols


def make_labels(kind, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return torch.randint(0, 4, (n,), generator=g).float() / 4
    if kind == "continuous":
        return torch.rand(n, generator=g)
    if kind == "int":
        return torch.randint(-3, 3, (n,), generator=g)
    if kind == "bool":
        return torch.randint(0, 2, (n,), generator=g).bool()
    if kind == "all-equal":
        return torch.full((n,), 0.5)
    if kind == "all-distinct":
        return torch.randperm(n, generator=g)
    raise ValueError(kind)


def run(fn, tensors):
    """(loss, grads) of fn(*leaves) with fresh leaves of ``tensors`` (a 0-d tensor among them: a learnable scale)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def max_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def assert_close(actual, expected, tol, what="", slack=0.0):
    """max |actual - expected| <= tol * max(|expected|, 1) + slack."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = max_err(actual, expected)
    bound = tol * max(expected.double().abs().max().item(), 1.0) + slack
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def assert_all_close(got, want, dtype, names="ab", baseline=None):
    """Loss and gradients of ``got`` against ``want``; with a ``baseline`` (the reference run in the input dtype),
    the error may also reach twice the baseline's own error, as an ill-conditioned input (a row of norm 1e-4 at
    D = 1, whose cosine gradient is a difference of 1e4-sized terms) gives PyTorch itself."""
    loss, grads = got
    want_loss, want_grads = want
    base_loss, base_grads = baseline if baseline is not None else (want_loss, want_grads)
    assert_close(loss, want_loss, LOSS_TOL[dtype], "loss", 2 * max_err(base_loss, want_loss))
    for name, g, w, b in zip(list(names) + ["scale"], grads, want_grads, base_grads):
        assert_close(g, w, GRAD_TOL[dtype], f"d{name}", 2 * max_err(b, w))


@pytest.fixture
def native(monkeypatch):
    """FASTLOSS_BACKEND=native, and a record of the native forward calls (so a test knows the kernel ran)."""
    monkeypatch.setenv("FASTLOSS_BACKEND", "native")
    calls = []
    fwd = cosent_op.cosent_fwd_native
    monkeypatch.setattr(cosent_op, "cosent_fwd_native", lambda *args: calls.append(args[0].dtype) or fwd(*args))
    return calls


def closed_form(fn, tensors, monkeypatch):
    """(loss, grads) of fn on the closed-form torch implementation (the CPU fallback without the native op)."""
    with monkeypatch.context() as m:
        m.delenv("FASTLOSS_BACKEND", raising=False)
        m.setattr(_backend, "native_has", lambda op: False)
        return run(fn, tensors)


def truth(fn, tensors):
    """(loss, grads) of fn on fp64 copies of ``tensors``: the reference in fp64 on the values the kernel sees."""
    return run(fn, [t.double() for t in tensors])


# ---------------------------------------------------------------------------------------------------------------
# values and every gradient


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dim", DIMS, ids=[f"D{d}" for d in DIMS])
@pytest.mark.parametrize("n", PAIRS, ids=[f"N{n}" for n in PAIRS])
@pytest.mark.parametrize("kind", KINDS)
def test_values_and_grads(kind, n, dim, dtype, native, monkeypatch):
    """Loss, da, db and d scale (a learnable tensor) against the fp64 reference and the closed form."""
    a, b = make_columns(2, n, dim, dtype, kind=kind, seed=n + dim)
    y = make_labels("ties", n)
    scale = torch.tensor(SCALE, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    def ours(x1, x2, s):
        return cosent_loss(x1, x2, y, s, similarity=kind)

    got = run(ours, [a, b, scale])
    assert native == [dtype]
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert [g.dtype for g in got[1]] == [dtype, dtype, scale.dtype]
    reference = lambda x1, x2, s: ref.cosent_loss(x1, x2, y, s, similarity_fct=FASTLOSS_SIM[kind])  # noqa: E731
    want = truth(reference, [a, b, scale])
    assert_all_close(got, want, dtype, baseline=run(reference, [a, b, scale]))
    assert_all_close(closed_form(ours, [a, b, scale], monkeypatch), want, dtype, baseline=run(reference, [a, b, scale]))


@pytest.mark.parametrize("dim", [1, 7, 33, 256], ids=["D1", "D7", "D33", "D256"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_half_inputs_are_the_fp32_computation_rounded(kind, dtype, dim):
    """fp16/bf16 rows are widened exactly and the gradients narrowed once (F16C / integer rounding, to nearest
    even): bit for bit the fp32 kernel on the widened values, rounded by torch."""
    cols = make_columns(3, 37, dim, dtype, kind=kind, seed=dim)
    y = make_labels("ties", 74)
    k = cosent_op.KINDS[kind]
    s = torch.tensor(SCALE)
    half = _C.cosent_fwd(cols[0], torch.cat(cols[1:]), y, s, k)
    full = _C.cosent_fwd(cols[0].float(), torch.cat(cols[1:]).float(), y, s, k)
    for x, z in zip(half, full):
        assert torch.equal(x, z)
    grad = torch.tensor(0.37)
    da, db, _ = _C.cosent_bwd(grad, cols[0], torch.cat(cols[1:]), s, half[1], half[2], k)
    da32, db32, _ = _C.cosent_bwd(grad, cols[0].float(), torch.cat(cols[1:]).float(), s, full[1], full[2], k)
    assert da.dtype == db.dtype == dtype
    assert torch.equal(da, da32.to(dtype)) and torch.equal(db, db32.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n_cols", [2, 3, 5], ids=["pairs", "triplets", "5-tuples"])
def test_angle_columns(n_cols, dtype, native, monkeypatch):
    """AnglE n-tuples: the anchors once, the other columns stacked (pair p joins anchor p mod B)."""
    cols = make_columns(n_cols, 13, 9, dtype, seed=7)
    y = make_labels("continuous", 13)
    scale = torch.tensor(SCALE, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    def ours(anchors, *rest):
        *others, s = rest
        return angle_loss(anchors, others, y, s)

    got = run(ours, cols + [scale])
    assert native == [dtype]
    reference = lambda *xs: ref.angle_loss(xs[:-1], y, xs[-1])  # noqa: E731
    want = truth(reference, cols + [scale])
    names = [f"x{k}" for k in range(n_cols)]
    assert_all_close(got, want, dtype, names, baseline=run(reference, cols + [scale]))
    assert_all_close(got, closed_form(ours, cols + [scale], monkeypatch), dtype, names)


@pytest.mark.parametrize("labels_kind", ["ties", "continuous", "int", "bool", "all-distinct"])
@pytest.mark.parametrize("kind", KINDS)
def test_against_sentence_transformers(kind, labels_kind, native):
    """The drop-in CoSENTLoss and sentence-transformers' own, learnable scale included."""
    a, b = make_columns(2, 29, 33, torch.float32, kind=kind, seed=3)
    y = make_labels(labels_kind, 29)
    if labels_kind == "bool":  # sentence-transformers 6.2 sorts bool labels as ints; older ones cannot sort them
        y_st = y.int()
    else:
        y_st = y

    def ours(x1, x2, s):
        return CoSENTLoss(model=None, scale=s, similarity_fct=ST_SIM[kind]).compute_loss_from_embeddings([x1, x2], y)

    def theirs(x1, x2, s):
        loss = st_losses.CoSENTLoss(model=None, scale=s, similarity_fct=ST_SIM[kind])
        return loss.compute_loss_from_embeddings([x1, x2], y_st)

    scale = torch.tensor(SCALE)
    got = run(ours, [a, b, scale])
    assert native == [torch.float32]
    assert_all_close(got, run(theirs, [a, b, scale]), torch.float32)


@pytest.mark.parametrize("n_cols", [2, 3, 4], ids=["pairs", "triplets", "4-tuples"])
def test_angle_against_sentence_transformers(n_cols, native):
    cols = make_columns(n_cols, 17, 10, torch.float32, seed=11)
    y = make_labels("continuous", 17)
    if n_cols > 2 and "compute_loss_from_embeddings" not in vars(st_losses.AnglELoss):
        pytest.skip("this sentence-transformers' AnglELoss takes no n-tuples")

    def ours(*xs):
        return AnglELoss(model=None, scale=xs[-1]).compute_loss_from_embeddings(list(xs[:-1]), y)

    def theirs(*xs):
        return st_losses.AnglELoss(model=None, scale=xs[-1]).compute_loss_from_embeddings(list(xs[:-1]), y)

    scale = torch.tensor(SCALE)
    got = run(ours, cols + [scale])
    assert native == [torch.float32]
    assert_all_close(got, run(theirs, cols + [scale]), torch.float32, [f"x{k}" for k in range(n_cols)])


@pytest.mark.parametrize("kind", KINDS)
def test_many_row_blocks(kind, native, monkeypatch):
    """Enough pairs for several parallel chunks of anchors (and a long ranking scan)."""
    a, b, c = make_columns(3, 1500, 64, torch.float32, kind=kind, seed=5)
    y = make_labels("continuous", 3000)

    def ours(x1, x2, x3, s):
        return cosent_loss(x1.repeat(2, 1), torch.cat([x2, x3]), y, s, similarity=kind)

    def ours_angle(x1, x2, x3, s):
        return angle_loss(x1, [x2, x3], y[:1500], s)

    fn = ours_angle if kind == "angle" else ours
    scale = torch.tensor(SCALE)
    got = run(fn, [a, b, c, scale])
    assert native == [torch.float32]
    assert_all_close(got, closed_form(fn, [a, b, c, scale], monkeypatch), torch.float32, "abc")


# ---------------------------------------------------------------------------------------------------------------
# fp64 gradcheck and torch.library.opcheck


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fp64(kind, native):
    a, b = make_columns(2, 7, 5, torch.float64, kind=kind, seed=2)
    y = make_labels("ties", 7)
    scale = torch.tensor(3.0, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (a, b, scale)]
    assert torch.autograd.gradcheck(lambda x1, x2, s: cosent_loss(x1, x2, y, s, similarity=kind), leaves)
    assert native and set(native) == {torch.float64}


def test_gradcheck_fp64_angle_tuples(native):
    cols = make_columns(3, 5, 6, torch.float64, seed=4)
    scale = torch.tensor(2.0, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in cols + [scale]]
    assert torch.autograd.gradcheck(lambda x1, x2, x3, s: angle_loss(x1, [x2, x3], None, s), leaves)
    assert native and set(native) == {torch.float64}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind, dtype):
    a, b = make_columns(2, 10, 7, dtype, kind=kind)
    y = make_labels("ties", 10)
    scale = torch.tensor(SCALE, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    args = (a.requires_grad_(True), b.requires_grad_(True), y, scale.requires_grad_(True), cosent_op.KINDS[kind])
    torch.library.opcheck(cosent_op._cosent_fwd_op.op, args + ("native",))
    _, aux, gsim = (t.detach() for t in cosent_op._cosent_fwd_op(*args, "native"))
    grad = torch.tensor(0.7, dtype=aux.dtype)
    bwd_args = (grad, a.detach(), b.detach(), scale.detach(), aux, gsim, cosent_op.KINDS[kind], "native")
    torch.library.opcheck(cosent_op._cosent_bwd_op.op, bwd_args)


def test_compile_fullgraph(native):
    a, b = make_columns(2, 10, 7, torch.float32)
    y = make_labels("ties", 10)

    def fn(x1, x2, s):
        return cosent_op.cosent(x1, x2, y, s, cosent_op.KIND_ANGLE, "native") * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = run(compiled, [a, b, torch.tensor(SCALE)])
    want = run(fn, [a, b, torch.tensor(SCALE)])
    assert_all_close(got, want, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# ties, degenerate inputs, extreme scales


@pytest.mark.parametrize("kind", KINDS)
def test_all_labels_equal_is_zero(kind, native):
    a, b = make_columns(2, 9, 8, torch.float32, kind=kind)
    loss, grads = run(
        lambda x1, x2, s: cosent_loss(x1, x2, make_labels("all-equal", 9), s, similarity=kind),
        [a, b, torch.tensor(SCALE)],
    )
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("labels_kind", ["all-distinct", "bool", "int"])
@pytest.mark.parametrize("kind", KINDS)
def test_label_kinds(kind, labels_kind, native):
    a, b = make_columns(2, 31, 12, torch.float32, kind=kind, seed=9)
    y = make_labels(labels_kind, 31)
    fn = FASTLOSS_SIM[kind]
    got = run(lambda x1, x2, s: cosent_loss(x1, x2, y, s, similarity=kind), [a, b, torch.tensor(SCALE)])
    want = truth(lambda x1, x2, s: ref.cosent_loss(x1, x2, y, s, similarity_fct=fn), [a, b, torch.tensor(SCALE)])
    assert_all_close(got, want, torch.float32)


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([-0.0, 0.0, -1.5, 2.0, -1e30, 1e30, 0.0, -1.5, 7.25, -0.0, 3.0]),
        torch.tensor([2**60, 2**60 + 1, -(2**62), 5, -3, 2**60, 0, -1, 2**62, -(2**62), 5]),
        torch.tensor([0.5, -0.25, 0.5, 1e4, -1e4, 0.0, -0.0, 3.0, 3.0, 2.0, -7.0]).half(),
        torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.uint8),
    ],
    ids=["float-signs-and-zeros", "int64-beyond-2^53", "fp16", "uint8"],
)
def test_label_sort_keys(labels, native):
    """The radix sort's keys order every label dtype as torch.sort does (-0.0 ties 0.0; int64 exactly)."""
    a, b = make_columns(2, 11, 6, torch.float64, seed=13)
    got = run(lambda x1, x2: cosent_loss(x1, x2, labels, similarity="cos"), [a, b])
    assert native == [torch.float64]
    assert_all_close(got, run(lambda x1, x2: ref.cosent_loss(x1, x2, labels), [a, b]), torch.float64)


@pytest.mark.parametrize("seed", range(12))
def test_brute_force_definition(seed, native):
    """log(1 + sum_{y_i < y_j} exp(s_i - s_j)) over all pairs, in fp64, for random ties, scales and kinds."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    kind = KINDS[seed % 3]
    y = torch.randint(0, 1 + seed, (n,), generator=g)
    scale = float(torch.empty(()).uniform_(0.1, 60.0, generator=g))
    a, b = make_columns(2, n, 5, torch.float64, kind=kind, seed=seed)

    def brute(x1, x2):
        s = scale * FASTLOSS_SIM[kind](x1, x2)
        terms = (s[:, None] - s[None, :])[y[:, None] < y[None, :]]
        return torch.logsumexp(torch.cat([terms, terms.new_zeros(1)]), 0)

    got = run(lambda x1, x2: cosent_loss(x1, x2, y, scale, similarity=kind), [a, b])
    assert_all_close(got, run(brute, [a, b]), torch.float64)


def test_labels_shape_and_dtype_do_not_matter(native):
    a, b = make_columns(2, 12, 8, torch.float32)
    y = make_labels("int", 12)
    flat = cosent_loss(a, b, y)
    for other in (y.reshape(3, 4), y.double(), y.half(), y.to(torch.int8)):
        assert cosent_loss(a, b, other).item() == flat.item()


@pytest.mark.parametrize("kind", KINDS)
def test_pair_order_does_not_matter(kind, native):
    a, b = make_columns(2, 40, 6, torch.float64, kind=kind, seed=8)
    y = make_labels("ties", 40)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert_close(cosent_loss(a[perm], b[perm], y[perm], similarity=kind), cosent_loss(a, b, y, similarity=kind), 1e-13)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_vectors(kind, native):
    a, b = make_columns(2, 8, 6, torch.float32, kind=kind)
    a[0] = 0.0
    b[3] = 0.0
    a[5] = 0.0
    b[5] = 0.0
    y = make_labels("continuous", 8)
    fn = FASTLOSS_SIM[kind]
    got = run(lambda x1, x2, s: cosent_loss(x1, x2, y, s, similarity=kind), [a, b, torch.tensor(SCALE)])
    want = truth(lambda x1, x2, s: ref.cosent_loss(x1, x2, y, s, similarity_fct=fn), [a, b, torch.tensor(SCALE)])
    assert_all_close(got, want, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_rows(kind, native):
    a, b = make_columns(2, 4, 5, torch.float32, kind=kind)
    a, b = a.repeat(3, 1), b.repeat(3, 1)
    b[1] = b[0]  # and one anchor's pair twice in one column
    y = make_labels("continuous", 12)
    fn = FASTLOSS_SIM[kind]
    got = run(lambda x1, x2, s: cosent_loss(x1, x2, y, s, similarity=kind), [a, b, torch.tensor(SCALE)])
    want = truth(lambda x1, x2, s: ref.cosent_loss(x1, x2, y, s, similarity_fct=fn), [a, b, torch.tensor(SCALE)])
    assert_all_close(got, want, torch.float32)


@pytest.mark.parametrize(
    "magnitude,scale",
    [(1e-20, 20.0), (1e15, 20.0), (1.0, 1e4), (1.0, 1e-4)],
    ids=["tiny-embeddings", "huge-embeddings", "scale-1e4", "scale-1e-4"],
)
@pytest.mark.parametrize("kind", ["cos", "angle"])
def test_extreme_scales(kind, magnitude, scale, native):
    """Finite, and equal to the reference (a scale of 1e4 turns the logsumexp into a max: no overflow)."""
    a, b = make_columns(2, 16, 8, torch.float32, magnitude=magnitude)
    y = make_labels("continuous", 16)
    fn = FASTLOSS_SIM[kind]
    s = torch.tensor(scale)
    got = run(lambda x1, x2, t: cosent_loss(x1, x2, y, t, similarity=kind), [a, b, s])
    want = run(lambda x1, x2, t: ref.cosent_loss(x1, x2, y, t, similarity_fct=fn), [a, b, s])
    assert_close(got[0], want[0], LOSS_TOL[torch.float32], "loss")
    for name, g, w in zip(["a", "b", "scale"], got[1], want[1]):
        assert_close(g, w, GRAD_TOL[torch.float32], f"d{name}")


def test_non_contiguous_inputs(native):
    wide_a, b = make_columns(2, 10, 20, torch.float32)
    b = b[:, :9].t().contiguous().t()  # column-major
    y = make_labels("ties", 10)
    got = run(lambda x1, x2: cosent_loss(x1[:, 3:12], x2, y, similarity="angle"), [wide_a, b])
    want = run(lambda x1, x2: ref.cosent_loss(x1[:, 3:12], x2, y, similarity_fct=ref.pairwise_angle_sim), [wide_a, b])
    assert_all_close(got, want, torch.float32)


def test_deterministic_and_thread_count_invariant(native):
    """Per-pair sums, a serial ranking and per-anchor gradients: the same bits with 1 thread or many."""
    a, b = make_columns(2, 2000, 48, torch.float32, seed=12)
    y = make_labels("continuous", 2000)
    fn = lambda x1, x2, s: cosent_loss(x1, x2, y, s, similarity="angle")  # noqa: E731
    first = run(fn, [a, b, torch.tensor(SCALE)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(fn, [a, b, torch.tensor(SCALE)])
    finally:
        torch.set_num_threads(threads)
    for x, z in zip([first[0]] + first[1], [single[0]] + single[1]):
        assert torch.equal(x, z)


# ---------------------------------------------------------------------------------------------------------------
# backend choice, bad input, the extension's own checks


def test_default_cpu_backend_is_native(monkeypatch, recwarn):
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    calls = []
    fwd = cosent_op.cosent_fwd_native
    monkeypatch.setattr(cosent_op, "cosent_fwd_native", lambda *args: calls.append(1) or fwd(*args))
    a, b = make_columns(2, 5, 4, torch.float32)
    assert _backend.select(b, "cosent_fwd", cpu_impl="closed_form") == "native"
    cosent_loss(a, b, make_labels("continuous", 5))
    angle_loss(a, b, make_labels("continuous", 5))
    assert calls == [1, 1]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_torch_backend_runs_the_reference(monkeypatch):
    monkeypatch.setenv("FASTLOSS_BACKEND", "torch")
    monkeypatch.setattr(cosent_op, "_cosent_fwd_op", None)  # any fused call would fail
    a, b = make_columns(2, 6, 4, torch.float32)
    y = make_labels("continuous", 6)
    assert_close(cosent_loss(a, b, y), ref.cosent_loss(a, b, y), 0.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"labels": torch.rand(5)}, "labels"),
        ({"b": torch.zeros(4, 2)}, "b must have embedding dimension 3"),
        ({"scale": -1.0}, "scale must be finite and > 0"),
        ({"a": torch.full((4, 3), float("nan"))}, "a contains NaN"),
    ],
    ids=["label-count", "dim", "scale", "nan"],
)
def test_bad_input_raises_before_the_kernel(kwargs, match, monkeypatch):
    monkeypatch.setenv("FASTLOSS_BACKEND", "native")

    def fail(*args):
        raise AssertionError("the kernel ran on bad input")

    monkeypatch.setattr(cosent_op, "cosent_fwd_native", fail)
    inputs = {"a": torch.randn(4, 3), "b": torch.randn(4, 3), "labels": torch.rand(4)}
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cosent_loss(**inputs)


def test_extension_checks_its_arguments():
    a, b = make_columns(2, 4, 3, torch.float32)
    y, s = torch.rand(4), torch.tensor(SCALE)
    with pytest.raises(RuntimeError, match="kind must be"):
        _C.cosent_fwd(a, b, y, s, 7)
    with pytest.raises(RuntimeError, match="b must have the dtype of a"):
        _C.cosent_fwd(a, b.double(), y, s, 1)
    with pytest.raises(RuntimeError, match="multiple of the anchor count"):
        _C.cosent_fwd(a[:3], b, y, s, 1)
    with pytest.raises(RuntimeError, match="one value per pair"):
        _C.cosent_fwd(a, b, y[:3], s, 1)
    _, aux, gsim = _C.cosent_fwd(a, b, y, s, 1)
    with pytest.raises(RuntimeError, match="aux must be"):
        _C.cosent_bwd(torch.tensor(1.0), a, b, s, aux.double(), gsim, 1)


def test_impl_name_is_checked():
    a, b = make_columns(2, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        cosent_op.cosent(a, b, torch.rand(4), torch.tensor(SCALE), cosent_op.KIND_COS, "cuda")
