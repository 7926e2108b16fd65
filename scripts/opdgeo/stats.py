"""Uncertainty of a reported number: a 95% interval over seeds (Student t), or, where one seed
is all there is, a percentile bootstrap over the units the number aggregates (a score's
prompts, a delta measure's matrices); and the three-way verdict that reads a claim against
such an interval."""

import math
import warnings

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"
NAN = math.nan


def seed_interval(values) -> tuple[float, float, float]:
    """Mean and 95% t-interval of one value per seed (NaNs dropped); no interval (NaN bounds)
    from fewer than two seeds."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if len(values) == 0:
        return NAN, NAN, NAN
    mean = float(values.mean())
    if len(values) < 2:
        return mean, NAN, NAN
    # imported here: the workflow reads the paper tables' and findings' declarations on every
    # Snakemake start, and scipy.stats costs more than the rest of those imports together
    from scipy import stats

    half = stats.t.ppf(0.5 + LEVEL / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(
        len(values))
    return mean, float(mean - half), float(mean + half)


def bootstrap(statistic, count: int, seed: int = 0, units: int = 100_000) -> np.ndarray:
    """The statistic of RESAMPLES resamples of `count` units drawn with replacement (seeded,
    so the same units give the same resamples). statistic(index) gets the drawn unit indices,
    an int array (resamples, count), and returns one value, or one row of values, per
    resample; it is called on about `units` drawn units at a time, to bound memory."""
    draws = np.random.default_rng(seed).integers(0, count, (RESAMPLES, count))
    chunk = max(1, units // max(count, 1))
    return np.concatenate([np.asarray(statistic(draws[start:start + chunk]), float)
                           for start in range(0, RESAMPLES, chunk)])


def percentile_interval(resamples) -> tuple:
    """95% percentile interval of bootstrap resamples (per column of a 2-D array); resamples
    where the statistic is undefined (NaN) are left out."""
    with warnings.catch_warnings():  # a statistic undefined on every resample: no interval
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(np.asarray(resamples, float),
                                   [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0)
    return low, high


def prompt_interval(scores, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval of per-prompt scores (resampled prompts)."""
    scores = np.asarray(scores, float)
    if len(scores) == 0:
        return NAN, NAN, NAN
    low, high = percentile_interval(bootstrap(lambda index: scores[index].mean(axis=1),
                                              len(scores), seed))
    return float(scores.mean()), float(low), float(high)


def verdict(low: float, high: float, threshold: float, direction: int) -> str:
    """`holds` when the whole interval lies on the claim's side of `threshold` (direction +1:
    above it, -1: below), `fails` when it lies wholly on the other side, else `inconclusive`
    (also when there is no interval)."""
    if any(v is None or not np.isfinite(v) for v in (low, high, threshold)):
        return INCONCLUSIVE
    if direction * (low - threshold) > 0 and direction * (high - threshold) > 0:
        return HOLDS
    if direction * (low - threshold) < 0 and direction * (high - threshold) < 0:
        return FAILS
    return INCONCLUSIVE
