"""Plain-PyTorch reference of the MNRL family: the oracle for the kernels and the fallback backend.

It follows sentence-transformers 6.x ``MultipleNegativesRankingLoss.compute_loss_from_embeddings`` step by step
(the same B x N matrices, masks, hardness penalties and partition modes), starting from already gathered
embeddings so that it also serves ``gather_across_devices``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastloss.similarity import cos_sim


def mnrl_loss(
    queries: Tensor,
    docs: Sequence[Tensor],
    scale: float | Tensor = 20.0,
    *,
    similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
    offset: int = 0,
    batch_size: int | None = None,
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
) -> Tensor:
    """MNRL over gathered ``queries`` [W, D] and doc columns ``docs`` (k tensors of [W, D]; docs[0] positives).

    The local rows are ``offset .. offset + batch_size`` (``batch_size`` defaults to W: not distributed).
    """
    world = queries.size(0)
    batch_size = world if batch_size is None else batch_size
    device = queries.device
    docs_all = torch.cat(list(docs), dim=0)
    local = torch.arange(offset, offset + batch_size, device=device)
    rows = torch.arange(batch_size, device=device)
    local_queries = queries[local]
    local_docs = docs[0][local]

    sims = {"query_to_doc": similarity_fct(local_queries, docs_all)}
    if "query_to_query" in directions:
        sims["query_to_query"] = similarity_fct(local_queries, queries)
        sims["query_to_query"][rows, local] = -torch.inf
    if "doc_to_query" in directions:
        sims["doc_to_query"] = similarity_fct(queries, local_docs).T
    if "doc_to_doc" in directions:
        sims["doc_to_doc"] = similarity_fct(docs_all, local_docs).T
        same_query = torch.eye(world, device=device)[local].repeat(1, len(docs)).bool()
        sims["doc_to_doc"].masked_fill_(same_query, -torch.inf)

    penalties = {}
    if hardness_mode is not None and hardness_strength > 0.0:
        penalty = hardness_strength * sims["query_to_doc"].detach()
        own = torch.eye(world, device=device, dtype=torch.bool)[local].repeat(1, len(docs))
        if hardness_mode == "hard_negatives":
            excluded = ~own
            excluded[:, :world] = True
        elif hardness_mode == "in_batch_negatives":
            excluded = own
        elif hardness_mode == "all_negatives":
            excluded = own
            excluded[:, world:] = False
        else:
            raise ValueError(f"unknown hardness_mode {hardness_mode!r}")
        penalty[excluded] = 0.0
        penalties["query_to_doc"] = penalty

    for key in sims:
        sims[key] = sims[key] * scale
    for key, penalty in penalties.items():
        sims[key] = sims[key] + penalty

    positive = sims["query_to_doc"][rows, local]
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(sims.values()), dim=1), dim=1)
    else:
        log_z = sum(torch.logsumexp(s, dim=1) for s in sims.values()) / len(sims)
    return -(positive - log_z).mean()
