"""Drop-in CachedMultipleNegativesRankingLoss and CachedMultipleNegativesSymmetricRankingLoss (sentence-transformers
6.x): the MNRL losses on fastloss's fused kernels, trained through fastloss's GradCache driver."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastloss.gradcache import cached_forward, validate_mini_batching
from fastloss.losses.mnrl import Direction, MultipleNegativesRankingLoss
from fastloss.similarity import cos_sim

_CITATION_GRADCACHE = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


def _reject_static_embedding(model: nn.Module, name: str) -> None:
    if "sentence_transformers" not in sys.modules:  # then model cannot be a SentenceTransformer
        return
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.losses.gradcache import has_static_embedding_input

    if isinstance(model, SentenceTransformer) and has_static_embedding_input(model):
        raise ValueError(
            f"{name} is not compatible with a SentenceTransformer model based on a StaticEmbedding, whose inputs "
            "cannot be split into mini-batches along a batch dimension. Consider using MultipleNegativesRankingLoss "
            "instead."
        )


class CachedMultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' CachedMultipleNegativesRankingLoss: MultipleNegativesRankingLoss with GradCache, so
    the batch size is bounded by the embeddings' memory (O(B * D)) rather than the encoder's activations.

    The same constructor, options and validation as sentence-transformers 6.x; the hyperparameters live on the
    wrapped fused :class:`~fastloss.losses.MultipleNegativesRankingLoss` (``self.loss``) and assignments to them
    are forwarded there. ``mini_batch_size`` rows (or ``mini_batch_num_tokens`` non-padding tokens) are embedded
    at a time; the loss stage is one fused op over the whole batch. With dropout off the loss and the gradients
    equal the uncached loss's; with dropout on, each mini-batch's replay draws the masks of its first pass.

    ``uses_gradient_cache = True`` and :meth:`calculate_loss` follow sentence-transformers' contract, so
    ``MatryoshkaLoss`` wraps this loss as it wraps its own Cached losses. Inputs: (anchor, positive) pairs or
    (anchor, positive, negative_1, ..., negative_n) tuples; labels are unused. ``model`` is anything mapping a
    feature dict to ``{"sentence_embedding": Tensor [batch, dim]}`` (a SentenceTransformer, or DDP around one).
    """

    uses_gradient_cache = True

    _delegated_to_wrapped_loss = (
        "scale",
        "similarity_fct",
        "gather_across_devices",
        "directions",
        "partition_mode",
        "hardness_mode",
        "hardness_strength",
    )

    def __init__(
        self,
        model: nn.Module,
        scale: float | Tensor = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        directions: tuple[Direction, ...] = ("query_to_doc",),
        partition_mode: Literal["joint", "per_direction"] = "joint",
        show_progress_bar: bool = False,
        hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__()
        _reject_static_embedding(model, type(self).__name__)
        validate_mini_batching(mini_batch_size, mini_batch_num_tokens)
        self.model = model
        self.loss = MultipleNegativesRankingLoss(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        )
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._delegated_to_wrapped_loss and isinstance(getattr(self, "loss", None), nn.Module):
            setattr(self.loss, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def scale(self) -> float | Tensor:
        return self.loss.scale

    @property
    def similarity_fct(self) -> Callable[[Tensor, Tensor], Tensor]:
        return self.loss.similarity_fct

    @property
    def gather_across_devices(self) -> bool:
        return self.loss.gather_across_devices

    @property
    def directions(self) -> tuple[str, ...]:
        return self.loss.directions

    @property
    def partition_mode(self) -> str:
        return self.loss.partition_mode

    @property
    def hardness_mode(self) -> str | None:
        return self.loss.hardness_mode

    @property
    def hardness_strength(self) -> float:
        return self.loss.hardness_strength

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The fused MNRL loss over ``reps[column][mini_batch]`` (concatenated per column). With ``with_backward``
        it is back-propagated to the reps (and a learnable scale) and returned detached."""
        loss = self.loss.compute_loss_from_embeddings([torch.cat(column) for column in reps], labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
        scale = self.scale
        return cached_forward(
            self.model,
            sentence_features,
            lambda reps, with_backward: self.calculate_loss(reps, labels, with_backward=with_backward),
            mini_batch_size=self.mini_batch_size,
            mini_batch_num_tokens=self.mini_batch_num_tokens,
            show_progress_bar=self.show_progress_bar,
            loss_parameters=[scale] if isinstance(scale, Tensor) else [],
        )

    def get_config_dict(self) -> dict[str, Any]:
        config = self.loss.get_config_dict()
        return {
            "scale": config["scale"],
            "similarity_fct": config["similarity_fct"],
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
            "gather_across_devices": config["gather_across_devices"],
            "directions": config["directions"],
            "partition_mode": config["partition_mode"],
            "hardness_mode": config["hardness_mode"],
            "hardness_strength": config["hardness_strength"],
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return _CITATION_GRADCACHE


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """The symmetric variant (query_to_doc and doc_to_query, each with its own softmax) with GradCache, as
    sentence-transformers' deprecated class of the same name."""

    def __init__(
        self,
        model: nn.Module,
        scale: float | Tensor = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__(
            model=model,
            scale=scale,
            similarity_fct=similarity_fct,
            mini_batch_size=mini_batch_size,
            mini_batch_num_tokens=mini_batch_num_tokens,
            gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
            show_progress_bar=show_progress_bar,
        )
