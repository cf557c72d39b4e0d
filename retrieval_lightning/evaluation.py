"""Metric protocols: from gathered descriptors of an :class:`EvalSet` to logged metrics.

A protocol is a function ``(queries (Q, D), database (N, D), ground_truth, chunk) -> EvalResult``
registered in :data:`PROTOCOLS` under the name an ``EvalSet.protocol`` carries. Scores are inner
products computed chunk by chunk over the database, so no Q×N matrix is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from retrieval_lightning.data.types import EvalSet
from retrieval_lightning.metrics import gldv2 as gldv2_metrics
from retrieval_lightning.metrics.revisitop import evaluate_revisitop_from_scores
from retrieval_lightning.retrieval.search import topk_search

#: how many results per query are kept for pictures and inspection
SHORTLIST = 10

POSITIVE, NEGATIVE, JUNK = 1, 0, -1


@dataclass
class EvalResult:
    """Metrics plus each query's shortlist with a relevance mark (1 positive, 0 negative, -1 junk)."""

    metrics: dict[str, float]
    topk: Tensor
    relevance: Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def _score_chunks(queries: Tensor, database: Tensor, chunk: int) -> Callable[[], Iterator[Tensor]]:
    def chunks() -> Iterator[Tensor]:
        for start in range(0, database.shape[0], chunk):
            yield queries.float() @ database[start:start + chunk].float().T

    return chunks


def _mark(topk: Tensor, positive: list[set[int]], junk: list[set[int]]) -> Tensor:
    marks = torch.full(topk.shape, NEGATIVE, dtype=torch.int8)
    for q, row in enumerate(topk.tolist()):
        for j, idx in enumerate(row):
            marks[q, j] = POSITIVE if idx in positive[q] else (JUNK if idx in junk[q] else NEGATIVE)
    return marks


def revisitop_protocol(queries: Tensor, database: Tensor, ground_truth: list[dict], chunk: int) -> EvalResult:
    """Revisited Oxford/Paris: mAP and mP@1/5/10 for Easy, Medium and Hard (percent)."""
    if len(ground_truth) != queries.shape[0]:
        raise ValueError(f"revisitop ground truth has {len(ground_truth)} queries, extracted {queries.shape[0]}")
    metrics = evaluate_revisitop_from_scores(_score_chunks(queries, database, chunk), ground_truth, chunk_size=chunk)
    _, topk = topk_search(queries, database, k=min(SHORTLIST, database.shape[0]), chunk_size=chunk)
    positive = [set(g.get("easy", [])) | set(g.get("hard", [])) for g in ground_truth]
    junk = [set(g.get("junk", [])) for g in ground_truth]
    return EvalResult(metrics, topk, _mark(topk, positive, junk))


def gldv2_retrieval_protocol(queries: Tensor, database: Tensor, ground_truth: dict, chunk: int) -> EvalResult:
    """GLDv2 retrieval: mAP@100 over the queries that have ground truth (percent)."""
    query_ids, db_ids, solution = ground_truth["query_ids"], ground_truth["db_ids"], ground_truth["solution"]
    k = min(100, database.shape[0])
    _, topk = topk_search(queries, database, k=k, chunk_size=chunk)
    predictions = {qid: [db_ids[i] for i in row] for qid, row in zip(query_ids, topk.tolist())}
    metrics = {"mAP@100": 100.0 * gldv2_metrics.mean_average_precision(predictions, solution, max_predictions=100)}
    db_pos = {i: n for n, i in enumerate(db_ids)}
    positive = [{db_pos[x] for x in solution.get(qid, []) if x in db_pos} for qid in query_ids]
    short = topk[:, :SHORTLIST]
    return EvalResult(metrics, short, _mark(short, positive, [set() for _ in query_ids]))


def gldv2_recognition_protocol(queries: Tensor, database: Tensor, ground_truth: dict, chunk: int) -> EvalResult:
    """GLDv2 recognition by label transfer from the nearest training image: GAP and accuracy (percent)."""
    query_ids, db_labels, solution = ground_truth["query_ids"], ground_truth["db_labels"], ground_truth["solution"]
    scores, topk = topk_search(queries, database, k=min(SHORTLIST, database.shape[0]), chunk_size=chunk)
    predictions = {qid: (db_labels[row[0]], float(s[0])) for qid, row, s in zip(query_ids, topk.tolist(), scores)}
    metrics = {
        "GAP": 100.0 * gldv2_metrics.global_average_precision(predictions, solution),
        "top1_accuracy": 100.0 * gldv2_metrics.top1_accuracy(predictions, solution),
    }
    marks = torch.full(topk.shape, NEGATIVE, dtype=torch.int8)
    for q, (qid, row) in enumerate(zip(query_ids, topk.tolist())):
        wanted = {str(x) for x in solution.get(qid, [])}
        for j, idx in enumerate(row):
            if str(db_labels[idx]) in wanted:
                marks[q, j] = POSITIVE
    return EvalResult(metrics, topk, marks)


PROTOCOLS: dict[str, Callable[[Tensor, Tensor, Any, int], EvalResult]] = {
    "revisitop": revisitop_protocol,
    "gldv2_retrieval": gldv2_retrieval_protocol,
    "gldv2_recognition": gldv2_recognition_protocol,
}


def evaluate_eval_set(eval_set: EvalSet, descriptors: Tensor, chunk: int = 65536) -> EvalResult:
    """Split ``descriptors`` (ordered like ``eval_set.dataset``) into queries/database and evaluate."""
    if eval_set.protocol not in PROTOCOLS:
        raise ValueError(
            f"eval set {eval_set.name!r} asks for protocol {eval_set.protocol!r}; known: {sorted(PROTOCOLS)}"
        )
    queries, database = descriptors[: eval_set.n_queries], descriptors[eval_set.n_queries:]
    return PROTOCOLS[eval_set.protocol](queries, database, eval_set.ground_truth, chunk)
