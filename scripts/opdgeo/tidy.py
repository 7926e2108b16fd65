"""Reading the tidy tables for figures, paper tables and findings: run metadata, wide pivots,
score curves and their peak / final / late average. One place, so the three agree.
"""

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from opdgeo.delta.columns import KEY_COLUMNS, METRICS, metric, summary_name
from opdgeo.delta.grouping import aggregate, energy_shares
from opdgeo.kinds import EXTERNAL, METHOD_LABELS, METHOD_ORDER, OPD, OTHER
from opdgeo.stats import bootstrap, percentile_interval, seed_interval

# Tidy tables the renderers may read (results/tables/{name}.csv). Optional ones may be absent
# or empty (no masked runs, no AdamW run, ...); renderers then draw a note or skip a row.
TABLES = ("runs", "evaluation", "delta_global", "trajectory", "overlap", "overlap_tensors",
          "optimizer_state", "training_log", "masks", "layer_module", "modules", "tensors")

OPTIMIZER_LABELS = {"adamw": "AdamW", "sgd": "SGD"}
# What an interval is over: a run group's seeds, or, where it has one seed, a score's prompts
# or the matrices of a delta (between-matrix variability, not seed variability).
OVER_SEEDS, OVER_PROMPTS, OVER_MATRICES = "seeds", "prompts (one seed)", "matrices (one seed)"
NO_INTERVAL = "none (one seed)"
_SEED = re.compile(r"-s\d+$")


def read_table(path: Path) -> pd.DataFrame:
    """A tidy CSV, or an empty frame when the file is missing or has no rows/columns."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


class TableFolder(dict):
    """Tidy tables read on first use from {folder}/{name}.csv: a renderer reads only the
    tables it uses (the ones its rule declares as inputs)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def __missing__(self, name: str) -> pd.DataFrame:
        if name not in TABLES:
            raise KeyError(f"unknown tidy table {name!r}; known: {', '.join(TABLES)}")
        self[name] = frame = read_table(self.folder / f"{name}.csv")
        return frame


def load_tables(folder: Path) -> TableFolder:
    return TableFolder(folder)


def run_info(runs: pd.DataFrame, external_kinds: dict | None = None,
             labels: dict | None = None) -> pd.DataFrame:
    """runs.csv plus `series` (the run without its seed: seeds of a series are averaged),
    `method` (the kind; external runs take the kind declared in the config), `label`
    (display name, overridable per series, run or method through plots.labels) and `sweep`
    (a run of the matched-gain grid, runs.csv group "sweep", not one of the main runs);
    `modality` (language or vision-language) comes from runs.csv."""
    external_kinds, labels = external_kinds or {}, labels or {}
    info = runs.copy()
    if "modality" not in info:  # runs.csv written before vision-language pairs existed
        info["modality"] = "language"
    info["sweep"] = info["group"].eq("sweep") if "group" in info else False
    info["series"] = info["run"].str.replace(_SEED, "", regex=True)
    info["method"] = [
        external_kinds.get(run, OTHER) if kind == EXTERNAL else kind
        for run, kind in zip(info["run"], info["kind"], strict=True)
    ]
    # One pair: drop its name from labels, it only lengthens them.
    single_pair = info["pair"].dropna().nunique() <= 1
    info["label"] = [
        labels.get(series, labels.get(run, _short(series, pair) if single_pair else series))
        for run, series, pair in zip(info["run"], info["series"], info["pair"], strict=True)
    ]
    info["method_label"] = [labels.get(m, METHOD_LABELS.get(m, m)) for m in info["method"]]
    info["method_rank"] = [METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
                           for m in info["method"]]
    return info


def _short(series: str, pair) -> str:
    if isinstance(pair, str) and series.startswith(pair + "-"):
        return series[len(pair) + 1:]
    return series


def main_runs(info: pd.DataFrame) -> pd.DataFrame:
    """The study's runs without the matched-gain sweep grid (shown in its own figure)."""
    return info[~info["sweep"]]


def wide(tidy: pd.DataFrame, index: str = "run") -> pd.DataFrame:
    """Long (run, metric, value) -> one row per run, one column per metric (last step)."""
    if tidy.empty:
        return pd.DataFrame()
    if "step" in tidy:
        tidy = tidy.sort_values("step")
    return tidy.pivot_table(index=index, columns="metric", values="value", aggfunc="last")


def primary_opd_runs(info: pd.DataFrame) -> pd.DataFrame:
    """The full OPD run of each (pair, seed): the first OPD run in runs.csv order (primary
    teacher, primary optimizer: opdgeo.config.build_runs lists it first)."""
    opd = info[(info["kind"] == OPD) & ~info["sweep"]]
    return opd.groupby(["pair", "seed"], sort=False).head(1)


def masked_arm(run: str, pair: str) -> str:
    """`{pair}-masked-{arm}-s{seed}` -> arm."""
    return _SEED.sub("", run).removeprefix(f"{pair}-masked-")


def score_metric(evaluation: pd.DataFrame, preferred: str = "") -> str | None:
    """The score the curves show: `preferred` if present, else mean@k, else exact match."""
    if evaluation.empty:
        return None
    metrics = list(evaluation["metric"].unique())
    if preferred in metrics:
        return preferred
    return next((m for m in metrics if m.startswith("mean@")),
                "exact_match" if "exact_match" in metrics else metrics[0])


def curves(evaluation: pd.DataFrame, info: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Score over training steps for every run: run, step, value, low, high (the score's 95%
    interval over prompts, NaN where the table has none), with the source model's score as
    step 0 (the source is evaluated once, as a base model, at step 0)."""
    columns = ["run", "step", "value", "low", "high"]
    scores = evaluation[evaluation["metric"] == metric].reindex(
        columns=[*columns, "metric"])
    source_score = scores[scores["step"] == 0].set_index("run")
    rows = [scores[scores["run"].isin(info["run"])][columns]]
    for run, source in zip(info["run"], info["source"], strict=True):
        if source in source_score.index and run in set(scores["run"]):
            rows.append(source_score.loc[[source], columns[2:]].assign(run=run, step=0))
    out = pd.concat(rows, ignore_index=True)[columns]
    return out.drop_duplicates(["run", "step"], keep="first").sort_values(["run", "step"])


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


def curve_stats(curve: pd.DataFrame) -> dict[str, float]:
    """Peak, final and late average of one run's own evaluations (step > 0; the source score
    at step 0 is the baseline, not an evaluation of the run). Late average = mean over the
    last quarter of the evaluations, at least one."""
    own = curve[curve["step"] > 0].sort_values("step")["value"].to_numpy()
    if len(own) == 0:
        return {"peak": math.nan, "final": math.nan, "late_average": math.nan,
                "evaluations": 0}
    late = own[-max(1, math.ceil(len(own) / 4)):]
    return {"peak": float(own.max()), "final": float(own[-1]),
            "late_average": float(late.mean()), "evaluations": len(own)}


def mask_density(masks: pd.DataFrame, mask: str) -> float:
    """Global density of a mask from masks.csv (tensor "all"), NaN if unknown."""
    if masks.empty or not isinstance(mask, str):
        return math.nan
    row = masks[(masks["mask"] == mask) & (masks["tensor"] == "all")]
    return float(row["density"].iloc[0]) if len(row) else math.nan


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
