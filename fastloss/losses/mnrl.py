"""Drop-in MultipleNegativesRankingLoss and MultipleNegativesSymmetricRankingLoss (sentence-transformers 6.x)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

from torch import Tensor, nn

from fastloss.functional.mnrl import mnrl_loss, validate_mnrl_options
from fastloss.losses._common import embed_columns, similarity_fct_name
from fastloss.similarity import cos_sim

logger = logging.getLogger(__name__)

Direction = Literal["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]

_CITATION_MNRL = """
@misc{henderson2017efficient,
    title={Efficient Natural Language Response Suggestion for Smart Reply},
    author={Matthew Henderson and Rami Al-Rfou and Brian Strope and Yun-hsuan Sung and Laszlo Lukacs and Ruiqi Guo
        and Sanjiv Kumar and Balint Miklos and Ray Kurzweil},
    year={2017},
    eprint={1705.00652},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}
"""

_CITATION_GTE = """
@misc{li2023generaltextembeddingsmultistage,
    title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
    author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long and Pengjun Xie and Meishan Zhang},
    year={2023},
    eprint={2308.03281},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}
"""


class MultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' MultipleNegativesRankingLoss on fastloss's fused kernels: the same constructor,
    validation and results (fp32 loss; fp64 for fp64 embeddings), without the B x N similarity matrices. Inside a
    ``torch.autocast`` block the similarity is multiplied in its dtype, as sentence-transformers' matmul would be.

    Inputs: (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples; labels are unused.
    ``scale`` may be a float or a 1-element tensor (e.g. an ``nn.Parameter``: a learnable inverse temperature).
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float | Tensor = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[Direction, ...] = ("query_to_doc",),
        partition_mode: Literal["joint", "per_direction"] = "joint",
        hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.scale = scale
        if not scale > 0:
            raise ValueError("Scale must be a positive value.")
        self.similarity_fct = similarity_fct
        self.gather_across_devices = gather_across_devices
        self.directions = validate_mnrl_options(directions, partition_mode, hardness_mode, hardness_strength)
        self.partition_mode = partition_mode
        self.hardness_mode = hardness_mode
        self.hardness_strength = hardness_strength
        if hardness_mode is not None and hardness_strength == 0.0:
            logger.warning(
                f"hardness_mode={hardness_mode!r} is set but hardness_strength=0.0, so hardness weighting has no "
                "effect. Set hardness_strength to a positive value to enable hardness weighting."
            )

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        return mnrl_loss(
            embeddings[0],
            embeddings[1:],
            self.scale,
            similarity=self.similarity_fct,
            directions=self.directions,
            partition_mode=self.partition_mode,
            hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength,
            gather_across_devices=self.gather_across_devices,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": similarity_fct_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        if (
            set(self.directions) == {"query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"}
            and self.partition_mode == "joint"
        ):
            return _CITATION_GTE
        return _CITATION_MNRL


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """The symmetric variant: query_to_doc and doc_to_query, each direction with its own softmax (as
    sentence-transformers' deprecated class of the same name)."""

    def __init__(
        self,
        model: nn.Module,
        scale: float | Tensor = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(
            model=model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
        )
