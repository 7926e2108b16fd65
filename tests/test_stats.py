"""Intervals over seeds and prompts, and the three-way verdict."""

import math

import numpy as np
import pytest

from opdgeo import stats


def test_seed_interval_is_the_t_interval():
    values = [0.40, 0.46, 0.43]
    mean, low, high = stats.seed_interval(values)
    q = 0.975  # Student t with 2 degrees of freedom has the closed-form quantile below
    t = (2 * q - 1) / math.sqrt(2 * q * (1 - q))
    half = t * np.std(values, ddof=1) / math.sqrt(3)
    assert mean == pytest.approx(0.43, abs=1e-12)
    assert (low, high) == pytest.approx((mean - half, mean + half), abs=1e-12)


def test_seed_interval_needs_two_seeds():
    mean, low, high = stats.seed_interval([0.4, float("nan")])
    assert mean == 0.4 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in stats.seed_interval([]))


def test_prompt_interval_covers_the_normal_interval():
    """Bernoulli scores at p = 0.5 on 1,024 prompts: the bootstrap interval's half-width is
    1.96 standard errors (1.96 x 0.5 / 32 = 3.06 points) within resampling noise."""
    scores = np.tile([0.0, 1.0], 512)
    mean, low, high = stats.prompt_interval(scores)
    assert mean == 0.5
    assert (high - low) / 2 == pytest.approx(1.96 * 0.5 / 32, rel=0.1)
    assert stats.prompt_interval(scores) == (mean, low, high)  # seeded


@pytest.mark.parametrize("low, high, threshold, direction, expected", [
    (0.6, 0.7, 0.5, +1, stats.HOLDS),
    (0.3, 0.4, 0.5, +1, stats.FAILS),
    (0.4, 0.6, 0.5, +1, stats.INCONCLUSIVE),
    (0.3, 0.4, 0.5, -1, stats.HOLDS),
    (0.6, 0.7, 0.5, -1, stats.FAILS),
    (float("nan"), float("nan"), 0.5, +1, stats.INCONCLUSIVE),
])
def test_verdict(low, high, threshold, direction, expected):
    assert stats.verdict(low, high, threshold, direction) == expected
