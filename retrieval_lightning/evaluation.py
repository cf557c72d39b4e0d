"""Metric protocols: from gathered descriptors of an :class:`EvalSet` to logged metrics.

A :class:`Protocol` is registered in :data:`PROTOCOLS` under the name an ``EvalSet.protocol``
carries. It has two functions, and a third that checks a ground truth before anything is embedded:

- ``evaluate(queries (Q, D), database (N, D), ground_truth, chunk, reranked=None, device=None,
  excluded=None, failed=None) -> EvalResult``: ``excluded`` database rows and ``failed`` queries are
  the placeholders of unreadable images (ranked last; retrieving nothing). Scores are inner products
  computed chunk by chunk over the database, so no Q×N matrix is ever held. ``reranked`` (from :mod:`retrieval_lightning.retrieval.rerank`) maps a
  *variant* to one array per query of database positions that come first, in that order; the rest
  of the database follows in global order. Without it the metrics are the global-only ones.
- ``exclusions(ground_truth, n_queries) -> {variant: [positions per query]}``: the database items
  that a shortlist of that variant must skip (revisitop: each protocol's junk, so Easy, Medium and
  Hard get their own shortlist of K non-junk items, as the official CVNet and DELG testers do).
  The variant ``"all"`` means one ranking serves every metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from retrieval_lightning.data.types import EvalSet
from retrieval_lightning.errors import DataFormatError, UsageError
from retrieval_lightning.metrics import gldv2 as gldv2_metrics
from retrieval_lightning.metrics.revisitop import PROTOCOLS as REVISITOP_SUFFIX
from retrieval_lightning.metrics.revisitop import protocol_gnd
from retrieval_lightning.metrics.revisitop import revisitop_report_from_scores
from retrieval_lightning.retrieval.search import topk_search

#: how many results per query are kept for pictures and inspection
SHORTLIST = 10
#: what becomes of the placeholders of unreadable images (``on_error: skip``) in the metrics, for the warnings
PLACEHOLDER_RULE = ("a database one is ranked last for every query and is no neighbour in αQE or DBA (it matches "
                    "nothing: a positive among them counts at the end of the ranking, or not at all for GLDv2), "
                    "and a query retrieves nothing (AP 0; no GLDv2 prediction). Fix them and evaluate again")
#: the variant name of a single ranking used for every metric
ALL = "all"
#: ``EvalResult.extra`` key of each query's AP in percent per protocol suffix (``E``/``M``/``H``; revisitop),
#: NaN where a query has no positives: what a paired comparison of two models on the same queries needs
AP_PER_QUERY = "ap_per_query"

POSITIVE, NEGATIVE, JUNK = 1, 0, -1

Rankings = Mapping[str, Sequence[np.ndarray]]
#: an eval set's global descriptors: one (N, D) tensor in dataset order (queries first), or its queries and its
#: database apart (αQE rewrites the queries only: a memory-mapped database is then used as it is, not copied)
EvalDescriptors = Tensor | tuple[Tensor, Tensor]


def split_descriptors(descriptors: EvalDescriptors, n_queries: int) -> tuple[Tensor, Tensor]:
    """``(queries, database)`` of :data:`EvalDescriptors`, without copying either."""
    if isinstance(descriptors, tuple):
        queries, database = descriptors
        if queries.shape[0] != n_queries:
            raise ValueError(f"{queries.shape[0]} query descriptors for {n_queries} queries")
        return queries, database
    return descriptors[:n_queries], descriptors[n_queries:]


class NonFiniteDescriptorError(ValueError):
    """A descriptor holds NaN or Inf: a ranking built on it would be meaningless."""


@dataclass
class EvalResult:
    """Metrics plus each query's shortlist with a relevance mark (1 positive, 0 negative, -1 junk)."""

    metrics: dict[str, float]
    topk: Tensor
    relevance: Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def _score_chunks(
    queries: Tensor, database: Tensor, chunk: int, first: Sequence[np.ndarray] | None = None,
    excluded: np.ndarray | None = None,
) -> Callable[[], Iterator[Tensor]]:
    """Score chunks in database order; ``first[q]`` positions get scores above any inner product, the
    ``excluded`` positions (placeholders of unreadable images) -inf: ranked last, they match nothing."""

    def chunks() -> Iterator[Tensor]:
        q = queries.float()
        for start in range(0, database.shape[0], chunk):
            scores = q @ database[start:start + chunk].float().T
            if first is not None:
                stop = start + scores.shape[1]
                for qi, order in enumerate(first):
                    order = np.asarray(order, dtype=np.int64)
                    inside = (order >= start) & (order < stop)
                    if inside.any():
                        rank = np.nonzero(inside)[0]
                        scores[qi, torch.from_numpy(order[inside] - start)] = torch.from_numpy(
                            (1e6 - rank).astype(np.float32)
                        )
            if excluded is not None and excluded.size:
                stop = start + scores.shape[1]
                inside = excluded[(excluded >= start) & (excluded < stop)]
                scores[:, torch.from_numpy(inside - start)] = float("-inf")
            yield scores

    return chunks


def _mark(topk: Tensor, positive: list[set[int]], junk: list[set[int]]) -> Tensor:
    marks = torch.full(topk.shape, NEGATIVE, dtype=torch.int8)
    for q, row in enumerate(topk.tolist()):
        for j, idx in enumerate(row):
            marks[q, j] = POSITIVE if idx in positive[q] else (JUNK if idx in junk[q] else NEGATIVE)
    return marks


def _leading(
    queries: Tensor, database: Tensor, k: int, chunk: int, first: Sequence[np.ndarray] | None, device: Any,
    excluded: np.ndarray | None = None,
) -> tuple[Tensor, Tensor]:
    """Top ``k`` positions per query: ``first[q]`` in order, then the global ranking without them; the
    ``excluded`` positions last (score -inf)."""
    extra = 0 if first is None else max((len(f) for f in first), default=0)
    scores, topk = topk_search(queries, database, k=min(k + extra, database.shape[0]), chunk_size=chunk,
                               device=device, excluded=excluded)
    if first is None:
        return scores[:, :k], topk[:, :k]
    rows, score_rows = [], []
    for q, order in enumerate(first):
        order = [int(i) for i in order]
        taken = set(order)
        rest = [(int(i), float(s)) for i, s in zip(topk[q].tolist(), scores[q].tolist()) if int(i) not in taken]
        glob = {int(i): float(s) for i, s in zip(topk[q].tolist(), scores[q].tolist())}
        merged = [(i, glob[i] if i in glob else float(queries[q].float() @ database[i].float())) for i in order]
        merged += rest
        rows.append([i for i, _ in merged[:k]])
        score_rows.append([s for _, s in merged[:k]])
    return torch.tensor(score_rows, dtype=torch.float32), torch.tensor(rows, dtype=torch.long)


def revisitop_exclusions(ground_truth: list[dict], n_queries: int) -> dict[str, list[np.ndarray]]:
    """Per protocol, the junk a shortlist skips (Easy: junk ∪ hard, Medium: junk, Hard: junk ∪ easy), read by
    the metrics' own :func:`protocol_gnd`, so a shortlist skips exactly what the metric ignores."""
    return {protocol: [g["junk"] for g in protocol_gnd(ground_truth, protocol)] for protocol in REVISITOP_SUFFIX}


def no_exclusions(ground_truth: Any, n_queries: int) -> dict[str, list[np.ndarray]]:
    """Protocols without junk: one shortlist per query serves every metric."""
    return {ALL: [np.zeros(0, np.int64) for _ in range(n_queries)]}


def revisitop_protocol(
    queries: Tensor, database: Tensor, ground_truth: list[dict], chunk: int,
    reranked: Rankings | None = None, device: Any = None, excluded: np.ndarray | None = None,
    failed: np.ndarray | None = None,
) -> EvalResult:
    """Revisited Oxford/Paris: mAP and mP@1/5/10 for Easy, Medium and Hard (percent); ``failed`` queries
    (unreadable images) score AP and P@k 0."""
    failed = () if failed is None else failed
    if len(ground_truth) != queries.shape[0]:
        raise ValueError(f"revisitop ground truth has {len(ground_truth)} queries, extracted {queries.shape[0]}")
    if reranked is None:
        report = revisitop_report_from_scores(_score_chunks(queries, database, chunk, excluded=excluded), ground_truth,
                                              chunk_size=chunk, failed=failed)
        metrics, ap_per_query = report.metrics, report.ap_per_query
        shown = None
    else:
        metrics, ap_per_query = {}, {}
        for variant, first in reranked.items():
            report = revisitop_report_from_scores(_score_chunks(queries, database, chunk, first, excluded),
                                                  ground_truth, chunk_size=chunk, failed=failed)
            if variant == ALL:
                metrics.update(report.metrics)
                ap_per_query.update(report.ap_per_query)
            else:
                suffix = REVISITOP_SUFFIX[variant]
                metrics.update({k: v for k, v in report.metrics.items() if k.endswith(f"_{suffix}")})
                ap_per_query[suffix] = report.ap_per_query[suffix]
        shown = reranked.get("medium", reranked.get(ALL))
    _, topk = _leading(queries, database, min(SHORTLIST, database.shape[0]), chunk, shown, device, excluded)
    medium = protocol_gnd(ground_truth, "medium")  # the picture's marks: Medium's positives and junk
    positive = [set(g["ok"].tolist()) for g in medium]
    junk = [set(g["junk"].tolist()) for g in medium]
    return EvalResult(metrics, topk, _mark(topk, positive, junk), {AP_PER_QUERY: ap_per_query})


def gldv2_retrieval_protocol(
    queries: Tensor, database: Tensor, ground_truth: dict, chunk: int,
    reranked: Rankings | None = None, device: Any = None, excluded: np.ndarray | None = None,
    failed: np.ndarray | None = None,
) -> EvalResult:
    """GLDv2 retrieval: mAP@100 over the queries that have ground truth (percent); ``failed`` queries
    (unreadable images) predict nothing."""
    failed_ids = _query_ids_of(ground_truth, failed)
    query_ids, db_ids, solution = ground_truth["query_ids"], ground_truth["db_ids"], ground_truth["solution"]
    k = min(100, database.shape[0])
    first = None if reranked is None else reranked[ALL]
    scores, topk = _leading(queries, database, k, chunk, first, device, excluded)
    predictions = {qid: [db_ids[i] for i, s in zip(row, srow) if s > float("-inf")]  # placeholders predict nothing
                   for qid, row, srow in zip(query_ids, topk.tolist(), scores.tolist()) if qid not in failed_ids}
    metrics = {"mAP@100": 100.0 * gldv2_metrics.mean_average_precision(predictions, solution, max_predictions=100)}
    db_pos = {i: n for n, i in enumerate(db_ids)}
    positive = [{db_pos[x] for x in solution.get(qid, []) if x in db_pos} for qid in query_ids]
    short = topk[:, :SHORTLIST]
    return EvalResult(metrics, short, _mark(short, positive, [set() for _ in query_ids]))


def gldv2_recognition_protocol(
    queries: Tensor, database: Tensor, ground_truth: dict, chunk: int,
    reranked: Rankings | None = None, device: Any = None, excluded: np.ndarray | None = None,
    failed: np.ndarray | None = None,
) -> EvalResult:
    """GLDv2 recognition by label transfer from the first-ranked training image: GAP and accuracy (percent).

    The confidence is the global similarity of that image, also after re-ranking. ``failed`` queries
    (unreadable images) predict nothing.
    """
    failed_ids = _query_ids_of(ground_truth, failed)
    query_ids, db_labels, solution = ground_truth["query_ids"], ground_truth["db_labels"], ground_truth["solution"]
    first = None if reranked is None else reranked[ALL]
    scores, topk = _leading(queries, database, min(SHORTLIST, database.shape[0]), chunk, first, device, excluded)
    predictions = {qid: (db_labels[row[0]], float(s[0])) for qid, row, s in zip(query_ids, topk.tolist(), scores)
                   if float(s[0]) > float("-inf")  # a query whose every neighbour is a placeholder predicts nothing
                   and qid not in failed_ids}
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


def check_revisitop_ground_truth(ground_truth: Any, n_queries: int, n_database: int) -> None:
    """One entry per query, each readable by :func:`protocol_gnd` (``easy`` and ``hard`` lists, optional ``junk``),
    every index inside the database."""
    if not isinstance(ground_truth, Sequence) or len(ground_truth) != n_queries:
        size = len(ground_truth) if isinstance(ground_truth, Sequence) else type(ground_truth).__name__
        raise ValueError(f"revisitop ground truth must be a list of one entry per query ({n_queries}), got {size}")
    medium = protocol_gnd(ground_truth, "medium")  # ok = easy + hard, and junk: every index named
    for q, entry in enumerate(medium):
        high = max(int(entry["ok"].max(initial=-1)), int(entry["junk"].max(initial=-1)))
        if high >= n_database:
            raise ValueError(f"query {q} names database index {high}, but the database holds {n_database} images "
                             "(indices count from 0, the first database item)")


def _gldv2_ground_truth_checker(database_key: str) -> Callable[[Any, int, int], None]:
    def check(ground_truth: Any, n_queries: int, n_database: int) -> None:
        missing = [k for k in ("solution", "query_ids", database_key)
                   if not isinstance(ground_truth, Mapping) or k not in ground_truth]
        if missing:
            raise ValueError(f"GLDv2 ground truth must be a dict with 'solution', 'query_ids' and {database_key!r}; "
                             f"missing {missing}")
        for key, n in (("query_ids", n_queries), (database_key, n_database)):
            if len(ground_truth[key]) != n:
                raise ValueError(f"{key!r} holds {len(ground_truth[key])} entries for {n} items")
    return check


@dataclass(frozen=True)
class Protocol:
    """A metric protocol: how to evaluate, which items each shortlist variant skips, and how its ground truth is
    checked before anything is embedded (``check(ground_truth, n_queries, n_database)`` raising ValueError)."""

    evaluate: Callable[..., EvalResult]
    exclusions: Callable[[Any, int], dict[str, list[np.ndarray]]]
    check: Callable[[Any, int, int], None] = lambda ground_truth, n_queries, n_database: None


PROTOCOLS: dict[str, Protocol] = {
    "revisitop": Protocol(revisitop_protocol, revisitop_exclusions, check_revisitop_ground_truth),
    "gldv2_retrieval": Protocol(gldv2_retrieval_protocol, no_exclusions, _gldv2_ground_truth_checker("db_ids")),
    "gldv2_recognition": Protocol(gldv2_recognition_protocol, no_exclusions,
                                  _gldv2_ground_truth_checker("db_labels")),
}


def protocol_of(eval_set: EvalSet) -> Protocol:
    if eval_set.protocol not in PROTOCOLS:
        raise UsageError(
            f"eval set {eval_set.name!r} asks for protocol {eval_set.protocol!r}; known: {sorted(PROTOCOLS)}"
        )
    return PROTOCOLS[eval_set.protocol]


def checked_eval_sets(sets: Any, owner: Any) -> list[EvalSet]:
    """A datamodule's ``eval_sets(stage)``, checked before anything is embedded: a list of :class:`EvalSet`, each
    of a known protocol with ground truth that protocol reads (a malformed one surfaced after the whole set was
    embedded, hours at GLDv2 scale)."""
    name = type(owner).__name__
    if not isinstance(sets, (list, tuple)) or not all(isinstance(s, EvalSet) for s in sets):
        got = type(sets).__name__ if not isinstance(sets, (list, tuple)) else \
            f"a list holding {sorted({type(s).__name__ for s in sets})}"
        raise UsageError(f"{name}.eval_sets(stage) must return a list of EvalSet, got {got}")
    for eval_set in sets:
        try:
            protocol_of(eval_set).check(eval_set.ground_truth, eval_set.n_queries, eval_set.n_database)
        except UsageError:
            raise
        except (ValueError, TypeError, KeyError) as err:
            raise DataFormatError(f"eval set {eval_set.name!r} of {name}: its {eval_set.protocol} ground truth is "
                                  f"malformed: {err}") from None
    return list(sets)


def check_finite(eval_set: EvalSet, descriptors: EvalDescriptors, chunk: int = 65536) -> None:
    """Raise :class:`NonFiniteDescriptorError` naming the images whose descriptors hold NaN or Inf.

    Row chunks: a memory-mapped +1M fp16 store is checked without a full-size copy."""
    queries, database = split_descriptors(descriptors, eval_set.n_queries)
    bad = [offset + start + i for offset, part in ((0, queries), (eval_set.n_queries, database))
           for start in range(0, part.shape[0], chunk)
           for i in torch.nonzero(~torch.isfinite(part[start:start + chunk]).all(dim=1)).flatten().tolist()]
    if not bad:
        return
    names = [eval_set.image_ids[i] if i < len(eval_set.image_ids) else f"item {i}" for i in bad[:5]]
    raise NonFiniteDescriptorError(
        f"eval set {eval_set.name!r}: {len(bad)} descriptor(s) contain NaN/Inf, e.g. {names} "
        "(a diverged model or a broken image); refusing to rank them"
    )


def evaluate_eval_set(
    eval_set: EvalSet, descriptors: EvalDescriptors, chunk: int = 65536,
    reranked: Rankings | None = None, device: Any = None, unreadable: Tensor | np.ndarray | None = None,
) -> EvalResult:
    """Split ``descriptors`` (ordered like ``eval_set.dataset``, or already split) into queries/database and
    evaluate.

    ``unreadable`` flags the items that are placeholders of unreadable images (``on_error: skip``): the
    database ones are ranked last for every query (they match nothing; a positive among them is missed),
    the queries retrieve nothing (a blank image's ranking would credit them with whatever it happens to find)."""
    protocol = protocol_of(eval_set)
    check_finite(eval_set, descriptors, chunk)
    queries, database = split_descriptors(descriptors, eval_set.n_queries)
    device = device if device is not None else "cpu"
    excluded = unreadable_database(eval_set, unreadable)
    failed = unreadable_queries(eval_set, unreadable)
    return protocol.evaluate(queries, database, eval_set.ground_truth, chunk, reranked=reranked, device=device,
                             **({"excluded": excluded} if excluded.size else {}),
                             **({"failed": failed} if failed.size else {}))


def unreadable_database(eval_set: EvalSet, unreadable: Tensor | np.ndarray | None) -> np.ndarray:
    """Database positions whose items are placeholders of unreadable images (empty without flags)."""
    return _flagged(unreadable, slice(eval_set.n_queries, None))


def unreadable_queries(eval_set: EvalSet, unreadable: Tensor | np.ndarray | None) -> np.ndarray:
    """Query positions whose items are placeholders of unreadable images (empty without flags)."""
    return _flagged(unreadable, slice(None, eval_set.n_queries))


def _flagged(unreadable: Tensor | np.ndarray | None, part: slice) -> np.ndarray:
    if unreadable is None:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.asarray(unreadable)[part]).astype(np.int64)


def _query_ids_of(ground_truth: dict, positions: np.ndarray | None) -> set:
    """The GLDv2 query ids at ``positions`` (the unreadable queries: they predict nothing)."""
    return set() if positions is None else {ground_truth["query_ids"][int(q)] for q in positions}
