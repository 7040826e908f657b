"""Drop-in CoSENTLoss and AnglELoss (sentence-transformers 6.x) on fastloss's fused CoSENT op."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from fastloss.functional.cosent import angle_loss, cosent_loss
from fastloss.losses._common import embed_columns
from fastloss.reference.cosent import pairwise_angle_sim
from fastloss.similarity import pairwise_cos_sim

_CITATION_COSENT = """
@article{10531646,
    author={Huang, Xiang and Peng, Hao and Zou, Dongcheng and Liu, Zhiwei and Li, Jianxin and Liu, Kay and Wu, Jia and Su, Jianlin and Yu, Philip S.},
    journal={IEEE/ACM Transactions on Audio, Speech, and Language Processing},
    title={CoSENT: Consistent Sentence Embedding via Similarity Ranking},
    year={2024},
    doi={10.1109/TASLP.2024.3402087}
}
"""  # noqa: E501

_CITATION_ANGLE = """
@inproceedings{li-li-2024-aoe,
    title = "{A}o{E}: Angle-optimized Embeddings for Semantic Textual Similarity",
    author = "Li, Xianming and Li, Jing",
    year = "2024",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/2024.acl-long.101/",
    doi = "10.18653/v1/2024.acl-long.101"
}
"""


def _check_label_count(loss: nn.Module, batch_size: int, labels: Tensor) -> None:
    if labels.numel() != batch_size:
        raise ValueError(
            f"{loss.__class__.__name__} expects {batch_size} labels (one per example), "
            f"but got {labels.numel()} labels with shape {tuple(labels.shape)}."
        )


class CoSENTLoss(nn.Module):
    """sentence-transformers' CoSENTLoss on the fused op: ``loss = log(1 + sum exp(s(k, l) - s(i, j)))`` over the
    pairs of input pairs whose labels order (i, j) above (k, l), with ``s = scale * similarity_fct``.

    Inputs: (input_A, input_B) pairs with a float (or int / bool) similarity label. ``similarity_fct`` is a
    PAIRWISE similarity: pairwise_cos_sim, pairwise_dot_score and pairwise_angle_sim (fastloss's or
    sentence-transformers') are fused; any other runs the plain-PyTorch reference with the same results.
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = pairwise_cos_sim,
    ) -> None:
        super().__init__()
        self.model = model
        self.similarity_fct = similarity_fct
        self.scale = scale

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        _check_label_count(self, embeddings[0].shape[0], labels)
        return cosent_loss(
            embeddings[0], embeddings[1], labels.to(embeddings[0].device), self.scale, similarity=self.similarity_fct
        )

    def get_config_dict(self) -> dict[str, Any]:
        name = getattr(self.similarity_fct, "__name__", type(self.similarity_fct).__name__)
        return {"scale": self.scale, "similarity_fct": name}

    @property
    def citation(self) -> str:
        return _CITATION_COSENT


class AnglELoss(CoSENTLoss):
    """sentence-transformers' AnglELoss: CoSENT with ``pairwise_angle_sim``. Takes (input_A, input_B) pairs with a
    float label, or (anchor, positive, negative_1, ..., negative_n) tuples (labels optional: the positive pairs get
    ``labels`` or 1, the negative pairs ``1 - labels``)."""

    def __init__(self, model: nn.Module, scale: float = 20.0) -> None:
        super().__init__(model, scale, similarity_fct=pairwise_angle_sim)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        if len(embeddings) > 2:
            if labels is not None:
                _check_label_count(self, embeddings[0].shape[0], labels)
                labels = labels.to(embeddings[0].device)
            return angle_loss(embeddings[0], embeddings[1:], labels, self.scale)
        if labels is None:
            raise ValueError("AnglELoss requires labels for datasets with pairs.")
        return super().compute_loss_from_embeddings(embeddings, labels)

    @property
    def citation(self) -> str:
        return _CITATION_ANGLE
