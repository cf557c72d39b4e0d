"""Revisitop metrics against the official test vectors (REFERENCE §4) and a naive re-implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrieval_lightning.metrics import (
    compute_ap,
    compute_map,
    compute_map_from_scores,
    evaluate_revisitop,
    evaluate_revisitop_from_scores,
    protocol_gnd,
    revisitop_report_from_scores,
)

KAPPAS = (1, 5, 10)


def naive_query(ranking, ok, junk, kappas):
    """Walk the ranking item by item, exactly as the protocol is worded."""
    ok, junk = set(ok), set(junk)
    shifted = []
    junk_seen = 0
    for position, item in enumerate(ranking):
        if item in ok:
            shifted.append(position - junk_seen)
        if item in junk:
            junk_seen += 1
    ap = 0.0
    for j, r in enumerate(shifted):
        precision_before = 1.0 if r == 0 else j / r
        ap += (precision_before + (j + 1) / (r + 1)) / (2 * len(ok))
    precisions = []
    for k in kappas:
        if not shifted:
            precisions.append(0.0)
            continue
        window = min(shifted[-1] + 1, k)
        precisions.append(sum(1 for r in shifted if r + 1 <= window) / window)
    return ap, precisions


def naive_map(ranks, gnd, kappas=KAPPAS):
    aps, precisions = [], []
    for q, entry in enumerate(gnd):
        if len(entry["ok"]) == 0:
            continue
        ap, prs = naive_query(list(ranks[:, q]), entry["ok"], entry.get("junk", []), kappas)
        aps.append(ap)
        precisions.append(prs)
    if not aps:
        return math.nan, [math.nan] * len(kappas)
    return sum(aps) / len(aps), list(np.mean(precisions, axis=0))


def random_gnd(rng, n_queries, n_db, overlap=False):
    gnd = []
    for q in range(n_queries):
        n_ok = 0 if q % 4 == 3 else int(rng.integers(1, 12))
        chosen = rng.choice(n_db, size=n_ok + int(rng.integers(0, 10)), replace=False)
        ok, junk = chosen[:n_ok], chosen[n_ok:]
        if overlap and n_ok:
            junk = np.append(junk, ok[0])
        gnd.append({"ok": list(ok), "junk": list(junk)})
    return gnd


def random_revisitop_gnd(rng, n_queries, n_db):
    gnd = []
    for q in range(n_queries):
        chosen = rng.choice(n_db, size=int(rng.integers(0, 25)), replace=False)
        a, b = sorted(rng.integers(0, chosen.size + 1, size=2))
        easy, hard, junk = chosen[:a], chosen[a:b], chosen[b:]
        if q == 0:
            easy = chosen[:0]
        gnd.append({"easy": list(easy), "hard": list(hard), "junk": list(junk), "bbx": [0, 0, 1, 1]})
    return gnd


def stable_ranks(scores):
    return np.argsort(-np.asarray(scores), axis=1, kind="stable").T


@pytest.mark.parametrize(
    "positions, n, expected",
    [([0, 2], 2, 0.7916667), ([1], 1, 0.25), ([4], 1, 0.1), ([1, 3], 2, 0.3333333), ([0], 2, 0.5)],
)
def test_compute_ap_reference_vectors(positions, n, expected):
    assert compute_ap(positions, n) == pytest.approx(expected, abs=1e-7)


def test_compute_map_reference_ranking():
    ranks = np.array([5, 3, 7, 1, 0, 2, 4, 6])[:, None]
    gnd = [{"ok": [3, 1], "junk": [5]}]
    mean_ap, precisions = compute_map(ranks, gnd)
    assert mean_ap == pytest.approx(0.7916667, abs=1e-7)
    np.testing.assert_allclose(precisions, [1.0, 2 / 3, 2 / 3], atol=1e-7)
    scores = np.zeros((1, 8), dtype=np.float32)
    scores[0, ranks[:, 0]] = -np.arange(8)
    from_scores = compute_map_from_scores(scores, gnd)
    assert from_scores[0] == mean_ap
    np.testing.assert_array_equal(from_scores[1], precisions)


def test_per_query_ap_reference_vectors_and_left_out_queries():
    """Query 0 is the reference ranking (positives {3, 1}, junk {5}: AP 0.7916667) with easy positives only,
    so it has none under Hard; query 1 has one hard positive at position 1 (AP 0.25) and none under Easy."""
    order = np.array([[5, 3, 7, 1, 0, 2, 4, 6], [0, 2, 1, 3, 4, 5, 6, 7]])
    scores = np.zeros((2, 8), dtype=np.float32)
    for q in range(2):
        scores[q, order[q]] = -np.arange(8)
    gnd = [{"easy": [3, 1], "hard": [], "junk": [5]}, {"easy": [], "hard": [2], "junk": []}]
    report = revisitop_report_from_scores(scores, gnd)
    np.testing.assert_allclose(report.ap_per_query["E"], [79.16667, np.nan], atol=1e-5)
    np.testing.assert_allclose(report.ap_per_query["M"], [79.16667, 25.0], atol=1e-5)
    np.testing.assert_allclose(report.ap_per_query["H"], [np.nan, 25.0], atol=1e-5)
    assert report.metrics == evaluate_revisitop_from_scores(scores, gnd)


@pytest.mark.parametrize("seed", range(3))
def test_per_query_ap_is_each_query_alone_and_averages_to_the_map(seed):
    rng = np.random.default_rng(300 + seed)
    n_db, n_queries = 60, 9
    gnd = random_revisitop_gnd(rng, n_queries, n_db)
    scores = rng.normal(size=(n_queries, n_db)).astype(np.float32)
    report = revisitop_report_from_scores(scores, gnd, chunk_size=17)
    for suffix in ("E", "M", "H"):
        per_query = report.ap_per_query[suffix]
        assert per_query.shape == (n_queries,)
        counted = per_query[~np.isnan(per_query)]
        assert counted.mean() == pytest.approx(report.metrics[f"mAP_{suffix}"], rel=1e-12)
        for q in range(n_queries):  # the query on its own, through the ranking door
            alone = evaluate_revisitop(stable_ranks(scores[q:q + 1]), gnd[q:q + 1])[f"mAP_{suffix}"]
            assert (np.isnan(alone) and np.isnan(per_query[q])) or per_query[q] == pytest.approx(alone, abs=1e-9)


def test_compute_ap_rejects_bad_input():
    with pytest.raises(ValueError, match="n_positives"):
        compute_ap([0], 0)
    with pytest.raises(ValueError, match="sorted"):
        compute_ap([3, 1], 2)


@pytest.mark.parametrize("seed", range(6))
def test_compute_map_matches_naive_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n_db, n_queries = int(rng.integers(20, 120)), 9
    gnd = random_gnd(rng, n_queries, n_db, overlap=seed % 2 == 1)
    full = np.stack([rng.permutation(n_db) for _ in range(n_queries)], axis=1)
    for length in (n_db, n_db // 3, 1):
        ranks = full[:length]
        mean_ap, precisions = compute_map(ranks, gnd)
        expected_ap, expected_precisions = naive_map(ranks, gnd)
        assert mean_ap == pytest.approx(expected_ap, rel=1e-12)
        np.testing.assert_allclose(precisions, expected_precisions, rtol=1e-12)


def test_query_without_retrieved_positive_scores_zero():
    ranks = np.array([[0], [1], [2]])
    mean_ap, precisions = compute_map(ranks, [{"ok": [7, 8], "junk": [0, 1, 2]}])
    assert mean_ap == 0.0
    np.testing.assert_array_equal(precisions, [0.0, 0.0, 0.0])


def test_junk_everywhere_else_gives_perfect_score():
    ranks = np.array([4, 0, 3, 1, 2])[:, None]
    mean_ap, precisions = compute_map(ranks, [{"ok": [1, 2], "junk": [0, 3, 4]}])
    assert mean_ap == 1.0
    np.testing.assert_array_equal(precisions, [1.0, 1.0, 1.0])


def test_queries_without_positives_are_left_out():
    ranks = np.array([[0, 0], [1, 1], [2, 2]])
    both = compute_map(ranks, [{"ok": [1]}, {"ok": [], "junk": [0]}])
    alone = compute_map(ranks[:, :1], [{"ok": [1]}])
    assert both[0] == alone[0] == 0.25
    np.testing.assert_array_equal(both[1], alone[1])


def test_no_query_with_positives_gives_nan():
    mean_ap, precisions = compute_map(np.zeros((4, 0), dtype=np.int64), [])
    assert math.isnan(mean_ap) and np.isnan(precisions).all()
    mean_ap, _ = compute_map(np.arange(3)[:, None], [{"ok": [], "junk": [0, 1, 2]}])
    assert math.isnan(mean_ap)


def test_compute_map_errors_name_the_input():
    with pytest.raises(ValueError, match="column 0"):
        compute_map(np.array([[1], [1]]), [{"ok": [1]}])
    with pytest.raises(ValueError, match="2 query columns but gnd has 1"):
        compute_map(np.zeros((3, 2), dtype=np.int64), [{"ok": [1]}])
    with pytest.raises(ValueError, match=r"gnd\[0\] has no 'ok'"):
        compute_map(np.zeros((3, 1), dtype=np.int64), [{"easy": [1], "hard": [], "junk": []}])
    with pytest.raises(ValueError, match=r"gnd\[1\]\['junk'\]: negative"):
        compute_map(np.zeros((3, 2), dtype=np.int64), [{"ok": [1]}, {"ok": [0], "junk": [-2]}])


def test_protocol_gnd_splits():
    gnd = [{"easy": [3, 1], "hard": [5], "junk": [2]}]
    easy, medium, hard = (protocol_gnd(gnd, p)[0] for p in ("easy", "medium", "hard"))
    assert (easy["ok"].tolist(), easy["junk"].tolist()) == ([1, 3], [2, 5])
    assert (medium["ok"].tolist(), medium["junk"].tolist()) == ([1, 3, 5], [2])
    assert (hard["ok"].tolist(), hard["junk"].tolist()) == ([5], [1, 2, 3])
    with pytest.raises(ValueError, match="unknown revisitop protocol 'mediun'"):
        protocol_gnd(gnd, "mediun")
    with pytest.raises(ValueError, match=r"gnd\[0\] has no 'hard'"):
        protocol_gnd([{"easy": [1]}], "easy")


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_revisitop_matches_naive_per_protocol(seed):
    rng = np.random.default_rng(100 + seed)
    n_db, n_queries = 80, 7
    gnd = random_revisitop_gnd(rng, n_queries, n_db)
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_queries)], axis=1)[:60]
    report = evaluate_revisitop(ranks, gnd)
    for suffix, ok_keys, junk_keys in (("E", ["easy"], ["junk", "hard"]), ("M", ["easy", "hard"], ["junk"]),
                                       ("H", ["hard"], ["junk", "easy"])):
        by_hand = [{"ok": sum((g[k] for k in ok_keys), []), "junk": sum((g[k] for k in junk_keys), [])}
                   for g in gnd]
        expected_ap, expected_precisions = naive_map(ranks, by_hand)
        assert report[f"mAP_{suffix}"] == pytest.approx(100 * expected_ap, rel=1e-12)
        for k, value in zip(KAPPAS, expected_precisions):
            assert report[f"mP@{k}_{suffix}"] == pytest.approx(100 * value, rel=1e-12)
    assert len(report) == 12


def tied_scores(rng, n_queries, n_db):
    """Scores with many exact ties (few distinct values), signed zeros and infinities."""
    scores = rng.integers(-3, 4, size=(n_queries, n_db)).astype(np.float32) / 4
    scores[0, :5] = [0.0, -0.0, np.inf, -np.inf, 0.0]
    return scores


@pytest.mark.parametrize("seed", range(6))
def test_scores_path_equals_stable_argsort_exactly(seed, monkeypatch):
    """On one counting thread and on several (queries side by side; the tests run torch on one thread)."""
    import retrieval_lightning.metrics.revisitop as revisitop

    rng = np.random.default_rng(200 + seed)
    n_db, n_queries = int(rng.integers(30, 300)), 8
    scores = tied_scores(rng, n_queries, n_db) if seed % 2 == 0 else rng.random((n_queries, n_db))
    gnd = random_gnd(rng, n_queries, n_db, overlap=seed == 3)
    expected = compute_map(stable_ranks(scores), gnd)
    for workers in (1, 3):
        monkeypatch.setattr(revisitop, "_counting_workers", lambda workers=workers: workers)
        for chunk_size in (7, 65536):
            got = compute_map_from_scores(scores, gnd, chunk_size=chunk_size)
            assert got[0] == expected[0] or (math.isnan(got[0]) and math.isnan(expected[0]))
            np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scores_path_exact_when_ground_truth_scores_span_a_huge_range(dtype):
    """Extreme ground-truth scores make the counting bins coarse, so most items need exact comparison."""
    rng = np.random.default_rng(5)
    scores = (rng.integers(0, 40, size=(6, 200)) / 8).astype(dtype)
    gnd = random_gnd(rng, 6, 200)
    for q, entry in enumerate(gnd):
        if len(entry["ok"]) >= 2:
            scores[q, entry["ok"][0]], scores[q, entry["ok"][1]] = 1e30, -1e30
    expected = compute_map(stable_ranks(scores), gnd)
    got = compute_map_from_scores(scores, gnd, chunk_size=50)
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])


def test_scores_path_accepts_tensors_and_chunk_callables():
    rng = np.random.default_rng(7)
    scores = tied_scores(rng, 5, 101)
    gnd = random_revisitop_gnd(rng, 5, 101)
    expected = evaluate_revisitop(stable_ranks(scores), gnd)
    assert evaluate_revisitop_from_scores(torch.from_numpy(scores), gnd) == expected
    assert evaluate_revisitop_from_scores(torch.from_numpy(scores).half(), gnd) == expected

    def chunks():
        for start in range(0, 101, 13):
            yield torch.from_numpy(scores[:, start : start + 13])

    assert evaluate_revisitop_from_scores(chunks, gnd) == expected
    with pytest.raises(TypeError, match="fresh iterator"):
        evaluate_revisitop_from_scores(chunks(), gnd)


def test_scores_path_matches_naive_on_tie_free_scores():
    rng = np.random.default_rng(11)
    scores = rng.permutation(6 * 50).reshape(6, 50).astype(np.float64)
    gnd = random_gnd(rng, 6, 50)
    ranks = np.argsort(-scores, axis=1).T
    expected_ap, expected_precisions = naive_map(ranks, gnd)
    mean_ap, precisions = compute_map_from_scores(scores, gnd)
    assert mean_ap == pytest.approx(expected_ap, rel=1e-12)
    np.testing.assert_allclose(precisions, expected_precisions, rtol=1e-12)


def test_scores_path_errors_name_the_input():
    scores = np.zeros((2, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"gnd\[1\] names database index 9 but scores cover only 5"):
        compute_map_from_scores(scores, [{"ok": [1]}, {"ok": [9]}])
    scores[1, 3] = np.nan
    with pytest.raises(ValueError, match="query 1 contain NaN"):
        compute_map_from_scores(scores, [{"ok": [1]}, {"ok": [2]}])
    with pytest.raises(ValueError, match=r"shape \(n_queries=3"):
        compute_map_from_scores(np.zeros((2, 5)), [{"ok": [1]}] * 3)


@pytest.mark.parametrize("seed", range(8))
def test_score_positions_equal_stable_argsort_positions(seed):
    """Every ground-truth item's position, ties included (lower index first), for any chunking."""
    from retrieval_lightning.metrics.revisitop import _score_positions

    rng = np.random.default_rng(300 + seed)
    n_queries, n_db = 5, int(rng.integers(1, 400))
    dtype = (np.float16, np.float32, np.float64)[seed % 3]
    levels = int(rng.integers(1, 6)) if seed % 2 == 0 else 1000  # few levels: most scores tie
    scores = (rng.integers(0, levels, size=(n_queries, n_db)) / max(levels - 1, 1)).astype(dtype)
    if n_db > 3:
        scores[1, :3] = [np.inf, -np.inf, -0.0]
    items = [np.unique(rng.choice(n_db, size=int(rng.integers(0, min(n_db, 40) + 1)))) for _ in range(n_queries)]
    order = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")
    rank_of = np.argsort(order, axis=1)
    for chunk_size in (1, 17, 1 << 20):
        got = _score_positions(scores, items, chunk_size)
        for q, ids in enumerate(items):
            np.testing.assert_array_equal(got[q], rank_of[q, ids])
