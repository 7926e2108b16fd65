"""Reading the tidy tables for figures, paper tables and findings: run metadata, wide pivots,
score curves and their peak / final / late average. One place, so the three agree.
"""

import math
import re
from pathlib import Path

import pandas as pd

from opdgeo.kinds import EXTERNAL, METHOD_LABELS, METHOD_ORDER, OPD, OTHER

# Tidy tables the renderers may read (results/tables/{name}.csv). Optional ones may be absent
# or empty (no masked runs, no AdamW run, ...); renderers then draw a note or skip a row.
TABLES = ("runs", "evaluation", "delta_global", "trajectory", "overlap", "overlap_tensors",
          "optimizer_state", "training_log", "masks", "layer_module", "modules", "tensors")

OPTIMIZER_LABELS = {"adamw": "AdamW", "sgd": "SGD"}
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

    def get(self, name: str, default=None) -> pd.DataFrame:
        """As `folder[name]`: dict.get would skip `__missing__` and answer `default` for a
        table not read yet."""
        return self[name]


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


