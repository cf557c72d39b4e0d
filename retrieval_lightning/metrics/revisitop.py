"""Revisited Oxford/Paris metrics: trapezoid mAP and mP@k with junk, per Easy/Medium/Hard protocol.

Written from the protocol of Radenovic et al. (CVPR 2018), see REFERENCE §4. Two doors share one
kernel, so their results agree to the last bit:

- from a ranking (:func:`compute_map`, :func:`evaluate_revisitop`), the reference's interface;
- from scores (:func:`compute_map_from_scores`, :func:`evaluate_revisitop_from_scores`), which
  only counts, for each ground-truth item, how many database items outrank it (one chunk sorted
  at a time), so no ranking of a million images is ever built.

Sums run in the reference's order (over positives, then over queries), so the values equal the
reference implementation's exactly, not just up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Union

import numpy as np
import torch

Kappas = Sequence[int]
ScoreSource = Union[np.ndarray, torch.Tensor, Callable[[], Iterable[Any]]]

PROTOCOLS = {"easy": "E", "medium": "M", "hard": "H"}


def compute_ap(positions: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """Trapezoid average precision of one query.

    ``positions`` are the sorted 0-based positions of the retrieved positives, already shifted
    down by the junk ranked before them; ``n_positives`` counts all positives, retrieved or not.
    Positive ``j`` at position ``r`` adds ``((j / r if r else 1) + (j + 1) / (r + 1)) / 2 / n``.
    """
    if n_positives <= 0:
        raise ValueError(f"compute_ap: n_positives must be positive, got {n_positives}")
    pos = np.asarray(positions, dtype=np.int64).ravel()
    if pos.size == 0:
        return 0.0
    if pos[0] < 0 or (pos.size > 1 and np.any(np.diff(pos) < 0)):
        raise ValueError(f"compute_ap: positions must be sorted and non-negative, got {pos.tolist()}")
    if pos.size > n_positives:
        raise ValueError(f"compute_ap: {pos.size} positions for only {n_positives} positives")
    rank = pos.astype(np.float64)
    j = np.arange(pos.size, dtype=np.float64)
    before = np.where(pos > 0, j / np.where(pos > 0, rank, 1.0), 1.0)
    after = (j + 1.0) / (rank + 1.0)
    terms = (before + after) * (1.0 / n_positives) / 2.0
    return float(np.cumsum(terms)[-1])


def _query_metrics(
    ok_pos: np.ndarray, junk_pos: np.ndarray, n_ok: int, kappas: Kappas
) -> tuple[float, np.ndarray]:
    """AP and P@k of one query from the raw positions (-1: not retrieved) of its positives and junk."""
    retrieved = np.sort(ok_pos[ok_pos >= 0])
    junk = np.sort(junk_pos[junk_pos >= 0])
    shifted = retrieved - np.searchsorted(junk, retrieved, side="left")
    ap = compute_ap(shifted, n_ok)
    precisions = np.zeros(len(kappas))
    if shifted.size:
        one_based = shifted + 1
        last = int(one_based[-1])
        for i, k in enumerate(kappas):
            window = min(last, k)
            precisions[i] = np.count_nonzero(one_based <= window) / window
    return ap, precisions


def _ids(value: Any, where: str) -> np.ndarray:
    """Sorted unique database indices from one ground-truth list; duplicates count once."""
    try:
        ids = np.asarray(value if value is not None else [], dtype=np.int64).ravel()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: expected a list of database indices, got {value!r}") from err
    if ids.size and ids.min() < 0:
        raise ValueError(f"{where}: negative database index {int(ids.min())}")
    return np.unique(ids)


def _check_kappas(kappas: Kappas) -> tuple[int, ...]:
    out = tuple(int(k) for k in kappas)
    if any(k < 1 for k in out):
        raise ValueError(f"kappas must be positive integers, got {list(kappas)}")
    return out


def _ok_junk(gnd: Sequence[Mapping[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate ``{"ok", "junk"}`` ground truth; a missing ``junk`` means none."""
    out = []
    for q, entry in enumerate(gnd):
        if "ok" not in entry:
            raise ValueError(f"gnd[{q}] has no 'ok' key (keys: {sorted(entry)}); use protocol_gnd first")
        out.append((_ids(entry["ok"], f"gnd[{q}]['ok']"), _ids(entry.get("junk"), f"gnd[{q}]['junk']")))
    return out


def protocol_gnd(gnd_revisitop: Sequence[Mapping[str, Any]], protocol: str) -> list[dict[str, np.ndarray]]:
    """Turn revisitop ground truth (``easy``/``hard``/``junk`` per query) into ``ok``/``junk``.

    Easy: ok = easy, junk = junk ∪ hard. Medium: ok = easy ∪ hard, junk = junk.
    Hard: ok = hard, junk = junk ∪ easy. A missing ``junk`` key means no junk.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown revisitop protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
    out = []
    for q, entry in enumerate(gnd_revisitop):
        for key in ("easy", "hard"):
            if key not in entry:
                raise ValueError(f"gnd[{q}] has no {key!r} key (keys: {sorted(entry)})")
        easy = _ids(entry["easy"], f"gnd[{q}]['easy']")
        hard = _ids(entry["hard"], f"gnd[{q}]['hard']")
        junk = _ids(entry.get("junk"), f"gnd[{q}]['junk']")
        if protocol == "easy":
            out.append({"ok": easy, "junk": np.union1d(junk, hard)})
        elif protocol == "medium":
            out.append({"ok": np.union1d(easy, hard), "junk": junk})
        else:
            out.append({"ok": hard, "junk": np.union1d(junk, easy)})
    return out


def _query_values(
    items: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    gnd: list[tuple[np.ndarray, np.ndarray]],
    kappas: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's AP (Q,) and P@k (Q, len(kappas)), NaN for a query without positives (left out of the means)."""
    aps = np.full(len(gnd), np.nan)
    precisions = np.full((len(gnd), len(kappas)), np.nan)
    for q, (ok, junk) in enumerate(gnd):
        if ok.size == 0:
            continue
        ok_pos = positions[q][np.searchsorted(items[q], ok)]
        junk_pos = positions[q][np.searchsorted(items[q], junk)]
        aps[q], precisions[q] = _query_metrics(ok_pos, junk_pos, ok.size, kappas)
    return aps, precisions


def _means(aps: np.ndarray, precisions: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean AP and mP@k over the queries that have positives, summed in query order (the reference's)."""
    counted = np.flatnonzero(~np.isnan(aps))
    if counted.size == 0:
        return float("nan"), np.full(precisions.shape[1], np.nan)
    total = 0.0
    mean_precisions = np.zeros(precisions.shape[1])
    for q in counted:
        total = total + float(aps[q])
        mean_precisions = mean_precisions + precisions[q]
    return total / counted.size, mean_precisions / counted.size


def _mean_metrics(
    items: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    gnd: list[tuple[np.ndarray, np.ndarray]],
    kappas: tuple[int, ...],
) -> tuple[float, np.ndarray]:
    """Mean AP and mP@k over the queries that have positives, given each query's item positions."""
    return _means(*_query_values(items, positions, gnd, kappas))


def _union_items(gnd: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    return [np.union1d(ok, junk) for ok, junk in gnd]


def _ranking_positions(ranks: np.ndarray, items: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Position of each item in each query's ranking column, -1 where the ranking omits it."""
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be a 2-D integer array (n_db, n_queries), got {ranks.dtype} {ranks.shape}")
    n_ranked, n_queries = ranks.shape
    if len(items) != n_queries:
        raise ValueError(f"ranks has {n_queries} query columns but gnd has {len(items)} queries")
    if ranks.size and ranks.min() < 0:
        raise ValueError(f"ranks holds a negative database index {int(ranks.min())}")
    upper = max([int(ranks.max()) + 1 if ranks.size else 0] + [int(i[-1]) + 1 for i in items if i.size])
    inverse = np.full(upper, -1, dtype=np.int64)
    order = np.arange(n_ranked, dtype=np.int64)
    out = []
    for q in range(n_queries):
        column = ranks[:, q]
        inverse[column] = order
        if not np.array_equal(inverse[column], order):
            raise ValueError(f"ranks column {q} lists a database index more than once")
        out.append(inverse[items[q]])
        inverse[column] = -1
    return out


def compute_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Kappas = (1, 5, 10)
) -> tuple[float, np.ndarray]:
    """Mean AP and mean P@k (fractions in [0, 1]) of rankings against ``{"ok", "junk"}`` ground truth.

    ``ranks[:, q]`` lists database indices best first for query ``q``; it may be shorter than the
    database, then positives missing from it count as not retrieved. Queries without positives
    are left out of both means (all left out: NaN); a query whose ranking holds no positive scores
    0 (the reference crashes there).
    """
    checked = _ok_junk(gnd)
    items = _union_items(checked)
    positions = _ranking_positions(np.asarray(ranks), items)
    return _mean_metrics(items, positions, checked, _check_kappas(kappas))


def _revisitop_items(gnd_revisitop: Sequence[Mapping[str, Any]]) -> tuple[list[np.ndarray], dict]:
    """Every query's ground-truth items, and the ok/junk split of each protocol."""
    per_protocol = {name: _ok_junk(protocol_gnd(gnd_revisitop, name)) for name in PROTOCOLS}
    items = _union_items(per_protocol["medium"])
    return items, per_protocol


class RevisitopReport(NamedTuple):
    """Easy/Medium/Hard metrics in percent (``mAP_E``, ``mP@5_H``, ...) and each query's AP in percent per
    protocol (``ap_per_query["H"]``, shape (Q,); NaN where the query has no positives under that protocol).
    The per-query values are what a paired comparison of two rankings of the same queries needs."""

    metrics: dict[str, float]
    ap_per_query: dict[str, np.ndarray]


def _report(per_protocol: dict, items, positions, kappas: Kappas, failed: Sequence[int] = ()) -> RevisitopReport:
    kappas = _check_kappas(kappas)
    out: dict[str, float] = {}
    per_query: dict[str, np.ndarray] = {}
    failed = np.asarray(failed, dtype=np.int64)
    for name, suffix in PROTOCOLS.items():
        aps, precisions = _query_values(items, positions, per_protocol[name], kappas)
        counted = failed[~np.isnan(aps[failed])]  # a query without positives stays out of the means
        aps[counted], precisions[counted] = 0.0, 0.0
        mean_ap, mean_precisions = _means(aps, precisions)
        out[f"mAP_{suffix}"] = 100.0 * mean_ap
        for k, value in zip(kappas, mean_precisions):
            out[f"mP@{k}_{suffix}"] = 100.0 * float(value)
        per_query[suffix] = 100.0 * aps
    return RevisitopReport(out, per_query)


def evaluate_revisitop(
    ranks: np.ndarray, gnd_revisitop: Sequence[Mapping[str, Any]], kappas: Kappas = (1, 5, 10)
) -> dict[str, float]:
    """Easy/Medium/Hard mAP and mP@k in percent (``mAP_E``, ``mP@5_H``, ...) from rankings.

    Positions are looked up once for all three protocols; ``ranks`` is as in :func:`compute_map`.
    """
    items, per_protocol = _revisitop_items(gnd_revisitop)
    positions = _ranking_positions(np.asarray(ranks), items)
    return _report(per_protocol, items, positions, kappas).metrics


def _float_array(values: Any) -> np.ndarray:
    """Scores as a float numpy array; half precision widens exactly to float32, integers to float64."""
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        values = values.cpu().numpy()
    array = np.asarray(values)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float64)
    return array


def _as_scores(chunk: Any, n_queries: int, where: str) -> np.ndarray:
    """A checked (n_queries, C) float chunk: NaN has no place in a ranking, so it is rejected."""
    array = _float_array(chunk)
    if array.ndim != 2 or array.shape[0] != n_queries:
        raise ValueError(f"{where}: expected scores of shape ({n_queries}, n), got {array.shape}")
    if np.isnan(array).any():
        query = int(np.flatnonzero(np.isnan(array).any(axis=1))[0])
        raise ValueError(f"{where}: scores of query {query} contain NaN")
    return array


def _chunk_source(
    scores: ScoreSource, n_queries: int, chunk_size: int
) -> tuple[Callable[[], Iterable[np.ndarray]], Any]:
    """A callable yielding (n_queries, C) score chunks in database order, and the full matrix if given."""
    if callable(scores):
        def chunks() -> Iterable[np.ndarray]:
            for i, chunk in enumerate(scores()):
                yield _as_scores(chunk, n_queries, f"score chunk {i}")

        return chunks, None
    if isinstance(scores, Iterator):
        raise TypeError("scores are read twice: pass a callable that returns a fresh iterator of chunks, "
                        "not an iterator")
    scores = scores.detach() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != n_queries:
        raise ValueError(f"scores must have shape (n_queries={n_queries}, n_db), got {tuple(scores.shape)}")

    def slices() -> Iterable[np.ndarray]:
        for start in range(0, scores.shape[1], chunk_size):
            yield _as_scores(scores[:, start : start + chunk_size], n_queries, f"scores[:, {start}:]")

    return slices, scores


def _item_scores(
    chunks: Callable[[], Iterable[np.ndarray]], full: Any, items: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], int]:
    """Each query's ground-truth item scores (first pass) and the database size."""
    if full is not None:
        n_db = full.shape[1]
        for q, ids in enumerate(items):
            if ids.size and ids[-1] >= n_db:
                raise ValueError(f"gnd[{q}] names database index {int(ids[-1])} but scores cover only {n_db} items")
        if isinstance(full, torch.Tensor):
            return [_float_array(full[q, torch.from_numpy(ids)]) for q, ids in enumerate(items)], n_db
        return [_float_array(full[q, ids]) for q, ids in enumerate(items)], n_db
    picked: list[np.ndarray | None] = [None] * len(items)
    n_db = 0
    for chunk in chunks():
        for q, ids in enumerate(items):
            if picked[q] is None:
                picked[q] = np.zeros(ids.size, dtype=chunk.dtype)
            inside = (ids >= n_db) & (ids < n_db + chunk.shape[1])
            picked[q][inside] = chunk[q, ids[inside] - n_db]
        n_db += chunk.shape[1]
    for q, ids in enumerate(items):
        if ids.size and ids[-1] >= n_db:
            raise ValueError(f"gnd[{q}] names database index {int(ids[-1])} but scores cover only {n_db} items")
    return [p if p is not None else np.zeros(0) for p in picked], n_db


def _counting_workers() -> int:
    """Threads that count queries side by side: torch's thread setting (numpy's sort and ``searchsorted``
    release the GIL, so each thread keeps a core busy)."""
    return max(1, torch.get_num_threads())


def _count_in_chunk(row: np.ndarray, ids: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
    """For each item of one query: the chunk's scores that outrank it (higher, or equal at a lower index).

    ``row`` is the query's chunk of scores, starting at database index ``start``."""
    stop = start + row.size
    ordered = np.sort(row)
    first = np.searchsorted(ordered, values, side="left")
    after = np.searchsorted(ordered, values, side="right")
    counts = row.size - after  # strictly higher scores
    counts += np.where(ids >= stop, after - first, 0)  # equal scores at lower indices
    own = np.flatnonzero((ids >= start) & (ids < stop) & (after - first > 1))
    for k in own:  # the item's own chunk holds other scores equal to it
        counts[k] += np.count_nonzero(row[: ids[k] - start] == values[k])
    return counts


def _score_positions(
    scores: ScoreSource, items: Sequence[np.ndarray], chunk_size: int
) -> list[np.ndarray]:
    """Position of each item in the stable descending sort of each query's scores.

    Position of item i = #{j: s_j > s_i} + #{j < i: s_j == s_i}. Each chunk row is sorted on its
    own (a chunk, never the database) and the items' scores are looked up in it with
    ``searchsorted``: that counts the scores above each item and those equal to it. Equal scores
    in an earlier chunk all come first; in the item's own chunk the few equal ones before it are
    counted directly. Queries are counted on :func:`_counting_workers` threads (torch's thread count);
    each query's sums run in the same order whatever the count, so the result does not depend on it.
    """
    n_queries = len(items)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunks, full = _chunk_source(scores, n_queries, chunk_size)
    item_scores, n_db = _item_scores(chunks, full, items)
    if n_db == 0:
        return [np.full(ids.size, -1, dtype=np.int64) for ids in items]

    positions = [np.zeros(ids.size, dtype=np.int64) for ids in items]
    counted = [q for q, ids in enumerate(items) if ids.size]
    workers = min(_counting_workers(), max(1, len(counted)))
    start = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in chunks():
            if chunk.dtype != item_scores[0].dtype:
                raise ValueError(f"score chunk at database index {start} is {chunk.dtype}, earlier ones were "
                                 f"{item_scores[0].dtype}")

            def count(q: int, chunk: np.ndarray = chunk, start: int = start) -> None:
                positions[q] += _count_in_chunk(chunk[q], items[q], item_scores[q], start)  # q's own array

            if workers == 1:
                for q in counted:
                    count(q)
            else:
                list(pool.map(count, counted))  # raises a worker's exception here
            start += chunk.shape[1]
    if start != n_db:
        raise ValueError(f"the score source yielded {start} database items on its second pass, {n_db} on its first")
    return positions


def compute_map_from_scores(
    scores: ScoreSource,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Kappas = (1, 5, 10),
    *,
    chunk_size: int = 1 << 20,
) -> tuple[float, np.ndarray]:
    """:func:`compute_map` of the full ranking by descending score, without sorting the database.

    ``scores`` is a (n_queries, n_db) array or tensor, or a callable returning a fresh iterable
    of (n_queries, C) chunks in database order (it is called twice). Ties are ordered as a stable
    descending argsort orders them, lower database index first, so the result equals
    ``compute_map(np.argsort(-scores, axis=1, kind="stable").T, gnd)`` exactly. NaN is rejected.
    """
    checked = _ok_junk(gnd)
    items = _union_items(checked)
    positions = _score_positions(scores, items, chunk_size)
    return _mean_metrics(items, positions, checked, _check_kappas(kappas))


def evaluate_revisitop_from_scores(
    scores: ScoreSource,
    gnd_revisitop: Sequence[Mapping[str, Any]],
    kappas: Kappas = (1, 5, 10),
    *,
    chunk_size: int = 1 << 20,
) -> dict[str, float]:
    """:func:`evaluate_revisitop` of the ranking by descending score (ties: lower index first).

    One counting pass over the scores serves all three protocols; see
    :func:`compute_map_from_scores` for the accepted ``scores``.
    """
    return revisitop_report_from_scores(scores, gnd_revisitop, kappas, chunk_size=chunk_size).metrics


def revisitop_report_from_scores(
    scores: ScoreSource,
    gnd_revisitop: Sequence[Mapping[str, Any]],
    kappas: Kappas = (1, 5, 10),
    *,
    chunk_size: int = 1 << 20,
    failed: Sequence[int] = (),
) -> RevisitopReport:
    """:func:`evaluate_revisitop_from_scores` with each query's AP as well, from the same counting pass.

    ``failed`` queries retrieved nothing (their image could not be read): AP and P@k 0 wherever a protocol
    gives them positives, whatever their scores rank."""
    items, per_protocol = _revisitop_items(gnd_revisitop)
    positions = _score_positions(scores, items, chunk_size)
    return _report(per_protocol, items, positions, kappas, failed)
