"""GLDv2 metrics against the official test vectors (REFERENCE §3) and a naive re-implementation."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_lightning.metrics import (
    global_average_precision,
    mean_average_precision,
    mean_precisions,
    top1_accuracy,
)

RECOGNITION_SOLUTION = {"a": [0, 12], "b": [100, 200, 300], "c": [1], "d": [], "e": []}
RECOGNITION_PREDICTIONS = {"b": (0, 0.01), "c": (1, 10.0), "d": (150, 15.0)}
RETRIEVAL_SOLUTION = {"a": ["x10", "x20"], "b": ["x10"], "c": ["x30", "x40", "x50"], "d": ["x30"]}
RETRIEVAL_PREDICTIONS = {"b": ["x00", "x10"], "c": ["x40"], "d": ["x30", "x40"]}


def naive_ap(prediction, truth, max_predictions):
    """AP@n as the challenge page words it: sum over ranks k of P(k) * rel(k) / min(m, n)."""
    cut = list(prediction)[:max_predictions]
    total = 0.0
    for k in range(1, len(cut) + 1):
        first_time = cut[k - 1] not in cut[: k - 1]
        relevant = first_time and cut[k - 1] in truth
        if relevant:
            distinct_hits = len({x for x in cut[:k] if x in truth})
            total += distinct_hits / k
    return total / min(len(truth), max_predictions)


def test_recognition_reference_vectors():
    assert global_average_precision(RECOGNITION_PREDICTIONS, RECOGNITION_SOLUTION) == pytest.approx(1 / 6)
    assert global_average_precision(RECOGNITION_PREDICTIONS, RECOGNITION_SOLUTION, True) == pytest.approx(1 / 3)
    assert top1_accuracy(RECOGNITION_PREDICTIONS, RECOGNITION_SOLUTION) == pytest.approx(1 / 3)


def test_recognition_accepts_official_dict_predictions():
    official = {key: {"class": c, "score": s} for key, (c, s) in RECOGNITION_PREDICTIONS.items()}
    assert global_average_precision(official, RECOGNITION_SOLUTION) == pytest.approx(1 / 6)


def test_retrieval_reference_vectors():
    assert mean_average_precision(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION) == pytest.approx(0.458333, abs=1e-6)
    assert mean_average_precision(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, max_predictions=1) == 0.5
    np.testing.assert_allclose(mean_precisions(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, 2), [0.5, 0.375])


def test_gap_ties_are_broken_by_image_id():
    solution = {"p": [1], "q": [2]}
    right_first = {"q": (9, 0.5), "p": (1, 0.5)}
    wrong_first = {"q": (2, 0.5), "p": (9, 0.5)}
    assert global_average_precision(right_first, solution) == pytest.approx(1 / 2)
    assert global_average_precision(wrong_first, solution) == pytest.approx(1 / 4)


def test_repeated_ids_are_skipped_but_take_a_rank():
    solution = {"q": ["x", "y"]}
    assert mean_average_precision({"q": ["x", "x", "y"]}, solution) == pytest.approx((1 + 2 / 3) / 2)
    np.testing.assert_allclose(mean_precisions({"q": ["x", "x", "y"]}, solution, 4), [1, 1 / 2, 2 / 3, 2 / 4])


def test_a_repeated_ground_truth_id_counts_in_the_denominator_as_the_official_code():
    """delf's MeanAveragePrecision divides by min(len(solution[key]), max_predictions): a solution list
    naming an image twice is one relevant image but two expected ones."""
    assert mean_average_precision({"q": ["a", "b"]}, {"q": ["a", "a", "b"]}) == pytest.approx(2 / 3)
    assert mean_average_precision({"q": ["a", "b"]}, {"q": ["a", "b"]}) == 1.0


def test_unpredicted_queries_count_zero():
    solution = {"q": ["x"], "r": ["y"]}
    assert mean_average_precision({"q": ["x"]}, solution) == 0.5
    np.testing.assert_allclose(mean_precisions({"q": ["x"]}, solution, 2), [0.5, 0.25])


def test_ap_is_divided_by_capped_ground_truth_size():
    solution = {"q": [f"x{i}" for i in range(5)]}
    assert mean_average_precision({"q": ["x0", "x1"]}, solution, max_predictions=2) == 1.0
    assert mean_average_precision({"q": ["x0", "x1"]}, solution, max_predictions=3) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_retrieval_matches_naive_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    pool = [f"i{n}" for n in range(40)]
    solution = {f"q{n}": list(rng.choice(pool, size=int(rng.integers(1, 15)), replace=False)) for n in range(12)}
    predictions = {
        key: list(rng.choice(pool, size=int(rng.integers(0, 30)), replace=True))
        for key in solution
        if rng.random() < 0.8
    }
    for max_predictions in (1, 5, 100):
        expected = sum(naive_ap(predictions.get(k, []), set(v), max_predictions) for k, v in solution.items())
        got = mean_average_precision(predictions, solution, max_predictions)
        assert got == pytest.approx(expected / len(solution), rel=1e-12)
    precisions = mean_precisions(predictions, solution, 20)
    for k in (1, 7, 20):
        hits = [
            len({x for x in predictions.get(key, [])[:k] if x in set(truth)}) / k for key, truth in solution.items()
        ]
        assert precisions[k - 1] == pytest.approx(np.mean(hits), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_gap_matches_naive_on_random_cases(seed):
    rng = np.random.default_rng(50 + seed)
    solution = {f"t{n:02d}": list(rng.choice(6, size=int(rng.integers(0, 3)), replace=False)) for n in range(30)}
    keys = [key for key in rng.permutation(list(solution)) if rng.random() < 0.7]
    predictions = {str(key): (int(rng.integers(0, 6)), float(rng.integers(0, 4))) for key in keys}
    for ignore in (False, True):
        ordered = sorted(predictions, key=lambda key: (-predictions[key][1], key))
        if ignore:
            ordered = [key for key in ordered if solution[key]]
        correct = [predictions[key][0] in solution[key] for key in ordered]
        expected = sum(np.cumsum(correct)[i] / (i + 1) for i in range(len(correct)) if correct[i])
        expected /= sum(1 for truth in solution.values() if truth)
        assert global_average_precision(predictions, solution, ignore) == pytest.approx(expected, rel=1e-12)


def test_errors_name_the_input():
    with pytest.raises(ValueError, match="'zz'"):
        mean_average_precision({"zz": ["x"]}, RETRIEVAL_SOLUTION)
    with pytest.raises(ValueError, match="'zz'"):
        global_average_precision({"zz": (1, 1.0)}, RECOGNITION_SOLUTION)
    with pytest.raises(ValueError, match="query 'e' has no ground-truth"):
        mean_average_precision({"e": ["x"]}, {"a": ["x"], "e": []})
    with pytest.raises(ValueError, match="no test image"):
        global_average_precision({"d": (1, 1.0)}, {"d": []})
    with pytest.raises(ValueError, match="'c' must be \\(class, score\\)"):
        global_average_precision({"c": 3}, RECOGNITION_SOLUTION)


def test_empty_ground_truth_behaves_as_official():
    solution = {"a": ["x"], "e": []}
    assert mean_average_precision({"a": ["x"]}, solution) == 0.5
    np.testing.assert_allclose(mean_precisions({"a": ["x"], "e": ["x"]}, solution, 1), [0.5])
    assert top1_accuracy({"a": (1, 0.3), "e": (2, 0.9)}, {"a": [1], "e": []}) == 1.0
