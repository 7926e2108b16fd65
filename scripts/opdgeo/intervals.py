"""Intervals of tidy data: a value over a run group's seeds (t), a difference of two groups
(paired by seed), and, for a one-seed run, the percentile bootstrap over its matrices (its
tensors resampled, the measure recomputed as the analysis aggregates it) or over prompts.
"""

import math

import numpy as np
import pandas as pd

from opdgeo.delta.columns import KEY_COLUMNS, METRICS, metric, summary_name
from opdgeo.delta.grouping import aggregate, energy_shares
from opdgeo.stats import bootstrap, percentile_interval, seed_interval

# What an interval is over: a run group's seeds, or, where it has one seed, a score's prompts
# or the matrices of a delta (between-matrix variability, not seed variability).
OVER_SEEDS, OVER_PROMPTS, OVER_MATRICES = "seeds", "prompts (one seed)", "matrices (one seed)"
NO_INTERVAL = "none (one seed)"


def interval(frame: pd.DataFrame, y: str = "value") -> tuple[float, float, float]:
    """Mean and 95% interval of one quantity over a run group's seeds (rows of `frame`): the
    t-interval over seeds; with one value (one seed, or one evaluation shared by every seed,
    as the source's), that value's own interval over prompts (columns low / high) where the
    table has one."""
    values = frame[y].dropna()
    shared = "low" in frame and values.nunique() == 1
    if len(values) > 1 and not shared:
        return seed_interval(values)
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    own = [frame[c].mean() if c in frame else math.nan for c in ("low", "high")]
    return float(values.mean()), *own

def gap(a: pd.DataFrame, b: pd.DataFrame, y: str = "value") -> tuple[float, float, float]:
    """Mean and 95% interval of a - b. Rows pair by `seed` (b without a seed column, as the
    source, pairs with every row of a). The t-interval over seeds of the differences where
    several seeds pair; else each side's interval() half-width (over seeds where it varies,
    over prompts where it does not), combined in quadrature as for independent samples. NaN
    when nothing pairs, or when a one-seed value has no interval."""
    paired = (a.merge(b, on="seed", suffixes=("_a", "_b")) if "seed" in b
              else a.merge(b, how="cross", suffixes=("_a", "_b")))
    paired = paired.dropna(subset=[f"{y}_a", f"{y}_b"])
    if paired.empty:
        return math.nan, math.nan, math.nan
    diff = paired[f"{y}_a"] - paired[f"{y}_b"]
    if len(paired) > 1 and "seed" in b:
        return seed_interval(diff)
    half = math.hypot(*(_half_width(paired, f"_{side}", y) for side in "ab"))
    return float(diff.mean()), float(diff.mean() - half), float(diff.mean() + half)

def _half_width(frame: pd.DataFrame, suffix: str, y: str) -> float:
    """Half-width of interval(): over seeds where the values differ, else over prompts."""
    own = frame[[c + suffix for c in (y, "low", "high") if c + suffix in frame]]
    mean, low, _ = interval(own.rename(columns=lambda c: c.removesuffix(suffix)), y)
    return mean - low

def tensor_bootstrap(tensors: pd.DataFrame, runs: list[str], statistic) -> pd.DataFrame:
    """A statistic of the runs' per-tensor rows over resamples of their tensors
    (opdgeo.stats.bootstrap; seeded): one row per resample. The runs pair by tensor name (a
    draw takes the same tensor of every run; tensors some run lacks are left out).
    statistic(rows) gets the drawn rows with a `resample` column and returns one row per
    resample, indexed by it. Empty where a run has no tensor rows."""
    if tensors.empty:
        return pd.DataFrame()
    groups = [tensors[tensors["run"] == run].drop_duplicates("name").set_index("name")
              for run in runs]
    names = sorted(set.intersection(*(set(group.index) for group in groups)))
    if not names:
        return pd.DataFrame()
    groups = [group.loc[names].reset_index() for group in groups]

    def drawn(index: np.ndarray) -> pd.DataFrame:
        resample = np.repeat(np.arange(len(index)), index.shape[1])
        rows = pd.concat([group.iloc[index.ravel()] for group in groups], ignore_index=True)
        return rows.assign(resample=np.tile(resample, len(groups))).copy()  # one block

    columns = statistic(drawn(np.arange(len(names))[None])).columns
    return pd.DataFrame(bootstrap(lambda index: statistic(drawn(index)).reindex(
        columns=columns), len(names)), columns=columns)

def delta_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """delta_global's metrics recomputed from per-tensor rows by the analysis's own
    aggregation (opdgeo.delta.grouping), energy shares included: one row per (run,
    resample)."""
    keys = ["run", "resample"]
    out = aggregate(rows, keys).set_index(keys)
    out = out.rename(columns=lambda c: summary_name(c) if c in METRICS else c)
    return pd.concat([out, energy_shares(rows, keys)], axis=1)

def delta_estimates(runs: pd.DataFrame, values: pd.DataFrame, tensors: pd.DataFrame,
                    keys) -> tuple[dict[str, tuple[float, float, float]], str]:
    """Mean and 95% interval of delta_global metrics (`values`: wide, one row per run) over a
    run group's seeds (`runs`: its info rows), and what the interval is over: the t-interval
    over seeds; with one seed, that run's value with the percentile bootstrap over its
    tensors (delta_summary of resampled tensors)."""
    present = runs[runs["run"].isin(values.index)]["run"]
    if len(present) != 1:
        return {key: seed_interval(values.loc[present, key]) if key in values
                else (math.nan,) * 3 for key in keys}, OVER_SEEDS
    run = present.iloc[0]
    resamples = tensor_bootstrap(tensors[_inputs(keys, tensors)], [run],
                                 lambda rows: delta_summary(rows).droplevel("run"))
    estimates = {}
    for key in keys:
        value = float(values.loc[run, key]) if key in values else math.nan
        low, high = percentile_interval(resamples[key]) if key in resamples and \
            not math.isnan(value) else (math.nan, math.nan)
        estimates[key] = (value, float(low), float(high))
    return estimates, OVER_MATRICES if len(resamples) else NO_INTERVAL

def _inputs(keys, tensors: pd.DataFrame) -> list[str]:
    """The per-tensor columns delta_summary needs for `keys` (a metric, the unchanged share
    its updates count from, a ratio's coverage and density; energy shares need the energies):
    aggregating only those keeps the bootstrap cheap."""
    needed = {"run", *KEY_COLUMNS, "numel", "delta_energy", "source_energy", "linf"}
    for key in keys:
        try:
            declared = metric(key)
        except KeyError:  # an energy share
            continue
        needed |= {declared.name, declared.unchanged, declared.coverage, declared.density}
        if declared.coverage:
            needed.add(metric(declared.coverage).unchanged)
    return [c for c in tensors.columns if c in needed]
