"""Google Landmarks v2 metrics: retrieval mAP@100 and precision@k, recognition GAP and top-1 accuracy.

Semantics follow the official challenge metric code (tensorflow/models ``research/delf``,
``google_landmarks_dataset/metrics.py``), see REFERENCE §3:

- retrieval: every query of the solution counts, a query without a prediction scores 0, a
  repeated index id is skipped but still takes its rank position, and AP is divided by
  ``min(#ground truth, max_predictions)``;
- recognition: one ``(class, score)`` per test image, sorted by score (ties: image id), every
  prediction counts (those on non-landmark images, whose solution is empty, are false positives)
  and the sum is divided by the number of images that have ground truth.

Where the official code would crash (a key unknown to the solution, a division by zero) these
functions raise a ValueError naming the key instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Retrieval = Mapping[str, Sequence[str]]


def _check_keys(predictions: Mapping[str, Any], solution: Mapping[str, Any]) -> None:
    for key in predictions:
        if key not in solution:
            raise ValueError(f"prediction for test image {key!r}, which is not part of the solution")


def _relevance(prediction: Sequence[str], truth: set, max_predictions: int) -> np.ndarray:
    """1 where rank i holds a first-time correct id, else 0, over the first ``max_predictions`` ranks."""
    hits = np.zeros(max_predictions)
    seen: set = set()
    for i, image_id in enumerate(list(prediction)[:max_predictions]):
        if image_id in seen:
            continue
        seen.add(image_id)
        if image_id in truth:
            hits[i] = 1.0
    return hits


def mean_average_precision(predictions: Retrieval, solution: Retrieval, max_predictions: int = 100) -> float:
    """Retrieval mAP@``max_predictions``, averaged over every query of ``solution``.

    ``predictions`` maps a query id to index ids best first, ``solution`` a query id to its
    ground-truth index ids. A predicted query with empty ground truth is an error (the official
    code divides by zero); an unpredicted one counts 0, as there.
    """
    if max_predictions < 1:
        raise ValueError(f"max_predictions must be positive, got {max_predictions}")
    if not solution:
        raise ValueError("the retrieval solution is empty")
    _check_keys(predictions, solution)
    total = 0.0
    for key, prediction in predictions.items():
        truth = set(solution[key])
        if not truth:
            raise ValueError(f"query {key!r} has no ground-truth images; drop it from the solution")
        ap = 0.0
        for n_correct, rank in enumerate(np.flatnonzero(_relevance(prediction, truth, max_predictions)), 1):
            ap += n_correct / (int(rank) + 1)
        total += ap / min(len(solution[key]), max_predictions)  # the list's length, repeats included (official)
    return total / len(solution)


def mean_precisions(predictions: Retrieval, solution: Retrieval, max_predictions: int = 100) -> np.ndarray:
    """Mean precision@k for k = 1..``max_predictions`` over every query of ``solution``.

    Beyond the end of a short prediction list precision keeps falling (k grows, hits do not);
    unpredicted queries and queries with empty ground truth contribute 0.
    """
    if max_predictions < 1:
        raise ValueError(f"max_predictions must be positive, got {max_predictions}")
    if not solution:
        raise ValueError("the retrieval solution is empty")
    _check_keys(predictions, solution)
    total = np.zeros(max_predictions)
    for key, prediction in predictions.items():
        hits = _relevance(prediction, set(solution[key]), max_predictions)
        total += np.cumsum(hits) / np.arange(1, max_predictions + 1)
    return total / len(solution)


def _class_score(key: str, prediction: Any) -> tuple[Any, float]:
    """Accept ``(class, score)`` or the official ``{"class": ..., "score": ...}``."""
    if isinstance(prediction, Mapping):
        prediction = (prediction.get("class"), prediction.get("score"))
    try:
        label, score = prediction
        return label, float(score)
    except (TypeError, ValueError) as err:
        raise ValueError(f"prediction for test image {key!r} must be (class, score), got {prediction!r}") from err


def _count_with_truth(solution: Mapping[str, Sequence[Any]]) -> int:
    count = sum(1 for truth in solution.values() if len(truth))
    if count == 0:
        raise ValueError("no test image in the recognition solution has a ground-truth landmark")
    return count


def global_average_precision(
    predictions: Mapping[str, Any],
    solution: Mapping[str, Sequence[Any]],
    ignore_non_gt_test_images: bool = False,
) -> float:
    """Recognition GAP (micro AP) of one ``(class, score)`` prediction per test image.

    Predictions are walked by descending score (ties: ascending image id); each correct one
    adds (correct so far) / (seen so far); the sum is divided by the number of images with
    ground truth. Predictions on images with empty ground truth count as false positives
    unless ``ignore_non_gt_test_images`` (the challenge uses False).
    """
    _check_keys(predictions, solution)
    n_with_truth = _count_with_truth(solution)
    walked = sorted(
        ((key, *_class_score(key, value)) for key, value in predictions.items()),
        key=lambda item: (-item[2], item[0]),
    )
    gap = 0.0
    seen = 0
    correct = 0
    for key, label, _ in walked:
        truth = solution[key]
        if ignore_non_gt_test_images and not len(truth):
            continue
        seen += 1
        if label in truth:
            correct += 1
            gap += correct / seen
    return gap / n_with_truth


def top1_accuracy(predictions: Mapping[str, Any], solution: Mapping[str, Sequence[Any]]) -> float:
    """Fraction of test images with ground truth whose predicted class is one of their landmarks.

    Images without ground truth are ignored, as are predictions for images outside the solution
    (as in the official code).
    """
    n_with_truth = _count_with_truth(solution)
    correct = 0
    for key, truth in solution.items():
        if len(truth) and key in predictions:
            label, _ = _class_score(key, predictions[key])
            correct += label in truth
    return correct / n_with_truth
