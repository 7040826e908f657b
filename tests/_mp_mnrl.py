"""MNRL's loss and input gradients in mpmath at 40 significant digits: the truth where the fp64 reference itself
rounds away (dot logits of 1e8 and beyond), for test_mnrl_oracle.py. Plain loops over tiny batches.

Semantics: sentence-transformers 6.x's MultipleNegativesRankingLoss (directions, joint / per-direction partition,
hardness penalties on the detached query_to_doc similarity) with cos_sim (rows over max(|x|, 1e-12)) or dot_score,
mean over the queries. test_mnrl_oracle.py checks these against sentence-transformers on moderate inputs.
"""

from __future__ import annotations

import mpmath as mp
import torch

DIGITS = 40
EPS = "1e-12"  # F.normalize's eps in cos_sim


def _dot(a, b):
    return mp.fsum(x * y for x, y in zip(a, b))


def _penalised(mode: str | None, own: bool, in_batch: bool) -> bool:
    """Whether query i's query_to_doc entry j gets the hardness penalty (own: j is one of row i's docs, in_batch:
    j is in the positives' column)."""
    if mode == "hard_negatives":
        return own and not in_batch
    if mode == "in_batch_negatives":
        return not own
    if mode == "all_negatives":
        return not (own and in_batch)
    return False


def mnrl(
    columns: list[torch.Tensor],
    scale: float,
    similarity: str,
    directions: tuple[str, ...],
    partition_mode: str,
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(loss, [d loss / d column for each column]) in fp64, rounded from 40 digits. ``columns``: queries, positives,
    then any hard-negative columns, each [B, D]."""
    with mp.workdps(DIGITS):
        rows = [[[mp.mpf(float(v)) for v in row] for row in col.tolist()] for col in columns]
        batch, dim = columns[0].shape
        k = len(columns) - 1
        queries, docs = rows[0], [r for col in rows[1:] for r in col]  # docs: the columns one after another
        scale = mp.mpf(scale)
        eps = mp.mpf(EPS)
        if similarity == "cos":
            norms = {
                "q": [max(mp.sqrt(_dot(r, r)), eps) for r in queries],
                "d": [max(mp.sqrt(_dot(r, r)), eps) for r in docs],
            }
            vec = {
                "q": [[v / n for v in r] for r, n in zip(queries, norms["q"])],
                "d": [[v / n for v in r] for r, n in zip(docs, norms["d"])],
            }
        else:
            vec = {"q": queries, "d": docs}
        # per direction: row i's candidates as (row vector key, candidate key) pairs, None where masked
        pairs = {
            "query_to_doc": [[(("q", i), ("d", j)) for j in range(k * batch)] for i in range(batch)],
            "query_to_query": [[(("q", i), ("q", j)) if j != i else None for j in range(batch)] for i in range(batch)],
            "doc_to_query": [[(("d", i), ("q", j)) for j in range(batch)] for i in range(batch)],
            "doc_to_doc": [
                [(("d", i), ("d", j)) if j % batch != i else None for j in range(k * batch)] for i in range(batch)
            ],
        }
        pairs = {name: pairs[name] for name in directions}

        def sim(pair):
            (ka, ia), (kb, ib) = pair
            return _dot(vec[ka][ia], vec[kb][ib])

        strength = mp.mpf(hardness_strength) if hardness_mode else mp.mpf(0)
        logits = {}
        for name, table in pairs.items():
            logits[name] = []
            for i, row in enumerate(table):
                out = []
                for j, pair in enumerate(row):
                    if pair is None:
                        out.append(None)
                        continue
                    value = sim(pair) * scale
                    if name == "query_to_doc" and strength and _penalised(hardness_mode, j % batch == i, j < batch):
                        value += strength * sim(pair)  # detached: no gradient through it
                    out.append(value)
                logits[name].append(out)

        def logsumexp(values):
            values = [v for v in values if v is not None]
            top = max(values)
            return top + mp.log(mp.fsum(mp.exp(v - top) for v in values))

        loss = mp.mpf(0)
        weight = {name: [[mp.mpf(0)] * len(row) for row in table] for name, table in pairs.items()}
        for i in range(batch):
            if partition_mode == "joint":
                groups = [(list(logits), 1)]
            else:
                groups = [([name], len(logits)) for name in logits]
            z = mp.mpf(0)
            for names, count in groups:
                zg = logsumexp([v for name in names for v in logits[name][i]])
                z += zg / count
                for name in names:
                    for j, v in enumerate(logits[name][i]):
                        if v is not None:
                            weight[name][i][j] += mp.exp(v - zg) / (batch * count)
            weight["query_to_doc"][i][i] -= mp.mpf(1) / batch
            loss += (z - logits["query_to_doc"][i][i]) / batch
        grad = {"q": [[mp.mpf(0)] * dim for _ in queries], "d": [[mp.mpf(0)] * dim for _ in docs]}
        for name, table in pairs.items():
            for i, row in enumerate(table):
                for j, pair in enumerate(row):
                    if pair is None:
                        continue
                    c = weight[name][i][j] * scale
                    (ka, ia), (kb, ib) = pair
                    for t in range(dim):
                        grad[ka][ia][t] += c * vec[kb][ib][t]
                        grad[kb][ib][t] += c * vec[ka][ia][t]
        if similarity == "cos":  # F.normalize's backward: the projection off x_hat over |x|, or g / eps below eps
            for key in ("q", "d"):
                for idx, (g, u, n) in enumerate(zip(grad[key], vec[key], norms[key])):
                    along = _dot(u, g) if n > eps else mp.mpf(0)
                    grad[key][idx] = [(gv - uv * along) / n for gv, uv in zip(g, u)]
        to_tensor = lambda values: torch.tensor([[float(v) for v in r] for r in values], dtype=torch.float64)  # noqa: E731
        grads = [to_tensor(grad["q"]).reshape(batch, dim)]
        grads += [to_tensor(grad["d"][c * batch : (c + 1) * batch]).reshape(batch, dim) for c in range(k)]
        return torch.tensor(float(loss), dtype=torch.float64), grads
