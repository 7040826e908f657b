"""What every drop-in loss shares: embedding the input columns the way sentence-transformers does."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn


def embed_columns(model: nn.Module, sentence_features: Iterable[dict[str, Any]]) -> list[Tensor]:
    """One embedding tensor per input column.

    Uses sentence-transformers' own ``embed_columns`` when it exists (6.2+: it merges columns that preprocess
    alike into one forward pass), else one forward per column as older releases do.
    """
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns as st_embed_columns
    except ImportError:
        st_embed_columns = None
    if st_embed_columns is not None:
        return st_embed_columns(model, sentence_features)
    embeddings = []
    for features in sentence_features:
        output = model(features)
        if not isinstance(output, dict) or "sentence_embedding" not in output:
            raise ValueError("model(features) must return a dict with a 'sentence_embedding' tensor")
        embeddings.append(output["sentence_embedding"])
    return embeddings


def similarity_fct_name(similarity_fct: Callable) -> str:
    try:
        from sentence_transformers.util import similarity_fct_name as st_name
    except ImportError:
        return getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
    return st_name(similarity_fct)
