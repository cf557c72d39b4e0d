"""The paired bootstrap over queries, against scipy's bootstrap and on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from retrieval_lightning.metrics import paired_bootstrap


def test_a_constant_shift_has_no_spread_and_nan_queries_are_left_out() -> None:
    b = np.array([10.0, 50.0, np.nan, 80.0, 20.0])
    a = b + 2.5
    a[0] = np.nan  # a query without positives under this protocol, in one model's report
    d = paired_bootstrap(a, b)
    assert (d.mean, d.low, d.high, d.n) == (pytest.approx(2.5), pytest.approx(2.5), pytest.approx(2.5), 3)
    assert str(d) == "+2.50 [+2.50, +2.50]"


def test_interval_equals_scipys_percentile_bootstrap() -> None:
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 100, 40)
    a = np.clip(b + rng.normal(1.0, 8.0, 40), 0, 100)
    ours = paired_bootstrap(a, b, draws=40000, seed=1)
    ref = stats.bootstrap((a - b,), np.mean, method="percentile", n_resamples=40000, random_state=2,
                          confidence_level=0.95).confidence_interval
    width = ref.high - ref.low
    assert abs(ours.low - ref.low) < 0.03 * width and abs(ours.high - ref.high) < 0.03 * width, (ours, ref)
    assert ours.mean == pytest.approx(np.mean(a - b))
    assert ours == paired_bootstrap(a, b, draws=40000, seed=1)  # reproducible


def test_unpaired_or_empty_input() -> None:
    with pytest.raises(ValueError, match="pair them query by query"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(np.zeros(3), np.zeros(3), confidence=95)
    assert paired_bootstrap(np.full(2, np.nan), np.zeros(2)).n == 0
