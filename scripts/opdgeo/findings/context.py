"""What every check reads and writes: the claim thresholds, the verdict words, a findings
row (`Context.row`) and the run group's values, controls and paper rows."""

import math

import pandas as pd

from opdgeo import stats
from opdgeo.findings.measures import NAN, delta_measures
from opdgeo.intervals import (
    NO_INTERVAL,
    OVER_MATRICES,
    OVER_SEEDS,
    gap,
    interval,
    tensor_bootstrap,
)
from opdgeo.kinds import EXTERNAL, OFFLINE_DISTILLATION, RLVR, ROLE_METHOD
from opdgeo.paper_tables import (
    PAPER_GLOBAL,
    PAPER_GLOBAL_COLUMNS,
    paper_match,
)
from opdgeo.tidy import curves, main_runs, score_metric, wide

# ---- claim thresholds (each a reading of the paper's wording, stated once) ----
F1_MAX_NORM_RATIO = 0.5  # "far below": OPD relative norm at most half of its SFT control's
F2_MIN_SPARSITY = 0.5  # "most coordinates unchanged": more than half at |dW| <= 1e-5
# "spread across all layers": the least-moved layer (and the least-moved of the attention and
# FFN blocks) holds at least a quarter of the energy share its parameter share gives it
# (an evenly spread update gives every layer and block 1; one concentrated elsewhere, ~0)
F3_MIN_SPREAD = 0.25
F4_TOLERANCE = 0.02  # "suffices": OPD-mask final score at most 2 pt below full OPD's
F6_MIN_RANK_FRACTION = 0.9  # "numerical rank ~ min(m, n)": at least 90% of it (median)
F7_RANDOM_MASK = 0.10  # coverage of a random 10% mask
F8_MIN_COVERAGE = 0.15  # "well above 10%": low-magnitude coverage at least 1.5x the density

HOLDS_BEYOND, EXPLAINED, CONTRADICTS, NOT_TESTED = (
    "holds beyond the null", "explained by the null", "contradicts the claim", "not tested")
HOLDS, FAILS, INCONCLUSIVE = stats.HOLDS, stats.FAILS, stats.INCONCLUSIVE
# A reading against a null alone (F7's and F8's coverage): observed - null clears zero on the
# claim's side, includes zero, or lies on the other side.
BEYOND_NULL, WITHIN_NULL, SHORT_OF_NULL = (
    "beyond the null", "within the null", "short of the null")
VERDICTS = (HOLDS_BEYOND, HOLDS, EXPLAINED, INCONCLUSIVE, FAILS, CONTRADICTS, BEYOND_NULL,
            WITHIN_NULL, SHORT_OF_NULL, NOT_TESTED)
CLAIMS = {
    "F1": "small: OPD relative norm far below the offline-distillation (SFT) control",
    "F2": "sparse: most bf16 coordinates unchanged at |dW| <= 1e-5",
    "F3": "spread and FFN-heavy: every layer and block moves (at least a quarter of its "
          "parameter share of the energy); the FFN holds the largest energy share of the blocks",
    "F4": "subnetwork suffices: OPD-mask retraining ~ full OPD; an equal-density random "
          "mask is worse (read on the top-|dW| mask at the paper's density against a random "
          "mask of that density; the |dW| > atol mask beside)",
    "F5": "AdamW beats SGD (each at its best learning rate of a small grid; the main pair's "
          "learning rates beside)",
    "F6": "full rank, concentrated: numerical rank ~ min(m, n); top-16 energy above the "
          "shuffle null of the same matrix",
    "F7": "off-principal: joint principal projection at 10% below the isotropic null of each "
          "matrix's shape; principal-mask coverage below a random mask's (read twice: against "
          "the paper's 10%, and against what bf16 rounding alone gives)",
    "F8": "low-magnitude: coverage of the bottom-10% |W_src| mask well above 10% (read twice: "
          "against the paper's threshold, and against what bf16 rounding alone gives)",
    # On-policy self-distillation (opdgeo.findings.self_distillation); F1-F8 apply to it too.
    "SD1": "something to distil: the self-teacher, reading each prompt's own reference "
           "solution, scores above the student reading the prompt alone",
    "SD2": "privileged information: OPSD's update is smaller, sparser, less principal and more "
           "low-magnitude than its OP2SD control's (the teacher reading another example's "
           "solution)",
}
READS = ("delta_global", "evaluation", "tensors", "masks")  # tidy tables, besides runs
# The matched controls' columns, by role (opdgeo.kinds): the offline-distillation and RLVR
# controls' values of a measure
OFFLINE, RLVR_METHOD = ROLE_METHOD[OFFLINE_DISTILLATION], ROLE_METHOD[RLVR]
CONTROL_COLUMNS = {method: f"{method}_control" for method in (OFFLINE, RLVR_METHOD)}
COLUMNS = ["finding", "series", "measure", "observed", "low", "high", "interval", "seeds",
           "threshold", "null", "null_kind", *CONTROL_COLUMNS.values(), "paper", "paper_run",
           "verdict", "note"]


def verdict(low: float, high: float, threshold: float, direction: int,
            null_gap: tuple[float, float] | None = None, threshold_is_null: bool = False
            ) -> str:
    """The claim read against its interval [low, high]: direction +1 says above `threshold`,
    -1 below. null_gap: the interval of observed - null (the null's side decides "beyond"
    and "contradicts"); threshold_is_null: the threshold is itself the null."""
    if any(missing(v) for v in (low, high)):
        return INCONCLUSIVE
    claim = stats.verdict(low, high, threshold, direction)
    if threshold_is_null:
        return {HOLDS: HOLDS_BEYOND, FAILS: CONTRADICTS}.get(claim, claim)
    if null_gap is None or any(missing(v) for v in null_gap):
        return claim
    side = stats.verdict(*null_gap, 0.0, direction)
    if side == FAILS:
        return CONTRADICTS
    if claim == HOLDS:
        return HOLDS_BEYOND if side == HOLDS else EXPLAINED
    return claim


def null_verdict(null_gap: tuple[float, float], direction: int) -> str:
    """The reading against a null alone: the interval of observed - null on the claim's side
    of zero (direction +1: above), around it, or on the other side."""
    if any(missing(v) for v in null_gap):
        return INCONCLUSIVE
    side = stats.verdict(*null_gap, 0.0, direction)
    return {HOLDS: BEYOND_NULL, FAILS: SHORT_OF_NULL}.get(side, WITHIN_NULL)


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def per_seed(runs: pd.DataFrame, values: dict[str, float]) -> pd.DataFrame:
    """seed, value for the runs of a group (NaN where a run has no value)."""
    return pd.DataFrame({"seed": runs["seed"].to_numpy(),
                         "value": [values.get(r, NAN) for r in runs["run"]]})


class Context:
    """What every check needs: run info, wide delta values, matched controls, paper rows."""

    def __init__(self, tables: dict[str, pd.DataFrame], info: pd.DataFrame, plots: dict,
                 everything: pd.DataFrame | None = None):
        """info: the main runs; everything: with the sweep grid (F5's learning rates)."""
        self.tables, self.info = tables, info
        self.everything = info if everything is None else everything
        self.values = wide(tables["delta_global"])
        self.match = paper_match(info, plots.get("paper_match"))
        self.metric = score_metric(tables["evaluation"], plots.get("metric", ""))
        self.scores = curves(tables["evaluation"], self.everything, self.metric) \
            if self.metric else None
        self.resampled: dict[str, pd.DataFrame] = {}

    def value(self, run, key) -> float:
        if run is None or run not in self.values.index or key not in self.values.columns:
            return NAN
        value = self.values.loc[run, key]
        return float(value) if pd.notna(value) else NAN

    def metric_of(self, runs: pd.DataFrame, key: str) -> pd.DataFrame:
        return per_seed(runs, {r: self.value(r, key) for r in runs["run"]})

    def first_null(self, runs: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, str]:
        """The first of `keys` every run has (the exact null before the parametric one)."""
        for key in keys:
            frame = self.metric_of(runs, key)
            if frame["value"].notna().all():
                return frame, key
        return frame.assign(value=NAN), ""

    def control(self, run: str, kind: str) -> str | None:
        """The matched control of a run: same pair, seed and optimizer, the given kind."""
        row = self.info[self.info["run"] == run].iloc[0]
        if not isinstance(row["pair"], str):
            return None
        info = main_runs(self.info)
        found = info[(info["pair"] == row["pair"]) & (info["seed"] == row["seed"])
                     & (info["optimizer"] == row["optimizer"]) & (info["kind"] == kind)]
        return found["run"].iloc[0] if len(found) else None

    def controls(self, runs: pd.DataFrame, kind: str) -> pd.DataFrame:
        """The matched controls of a group's runs, as info rows (seed by seed)."""
        names = [self.control(r, kind) for r in runs["run"]]
        return self.info[self.info["run"].isin([n for n in names if n])]

    def one_seed(self, runs: pd.DataFrame) -> pd.DataFrame:
        """A one-seed group's delta measures over resamples of its run's matrices
        (delta_measures; paired by tensor name with the run's F1 comparator); empty for a
        group of several seeds, or without per-tensor rows."""
        if len(runs) != 1:
            return pd.DataFrame()
        run = runs["run"].iloc[0]
        if run not in self.resampled:
            comparator = f1_comparator(self, run)[0]
            tensors = self.tables["tensors"]
            paired = [run, comparator] if comparator and not tensors.empty and \
                (tensors["run"] == comparator).any() else [run]
            self.resampled[run] = tensor_bootstrap(
                tensors, paired, lambda rows: delta_measures(rows, run, comparator))
        return self.resampled[run]

    def with_interval(self, runs: pd.DataFrame, observed: pd.DataFrame, column: str
                      ) -> pd.DataFrame:
        """observed (per seed) with, for a one-seed group, its interval over matrices."""
        resamples = self.one_seed(runs)
        if column not in resamples:
            return observed
        low, high = stats.percentile_interval(resamples[column])
        return observed.assign(low=low, high=high)

    def null_gap(self, runs: pd.DataFrame, observed: pd.DataFrame, column: str,
                 null: pd.DataFrame, null_column: str) -> tuple | None:
        """observed - null of a one-seed group, its interval over the same resampled matrices
        (None for several seeds: ctx.row pairs them by seed)."""
        resamples = self.one_seed(runs)
        if not {column, null_column} <= set(resamples):
            return None
        low, high = stats.percentile_interval(resamples[column] - resamples[null_column])
        return float(observed["value"].mean() - null["value"].mean()), low, high

    def paper(self, run: str, column: str) -> float:
        """The paper's value for a global-table column, as a fraction (ranks as they are)."""
        row = PAPER_GLOBAL.get(self.match.get(run))
        if row is None:
            return NAN
        value = row[PAPER_GLOBAL_COLUMNS.index(column)]
        return value if column == "stable_rank" else value / 100

    def row(self, finding: str, runs: pd.DataFrame, measure: str,
            observed: pd.DataFrame | tuple, threshold: float, direction: int,
            null: pd.DataFrame | None = None, null_kind: str = "",
            threshold_is_null: bool = False, key: str | None = None, paper: float = NAN,
            note: str = "", null_value: float = NAN,
            null_gap: tuple[float, float, float] | None = None,
            one_seed: str = OVER_MATRICES) -> dict:
        """One findings row for a run group (`runs`: its info rows, one per seed). observed:
        per seed (columns seed, value[, low, high]), or an estimate (mean, low, high) made by
        the caller. null: per seed like observed (its gap to observed is paired by seed unless
        the caller gives null_gap), or the caller's null_value and null_gap (the interval of
        observed - null). one_seed: what a one-seed interval is over."""
        mean, low, high = interval(observed) if isinstance(observed, pd.DataFrame) else observed
        if isinstance(null, pd.DataFrame) and null["value"].notna().any():
            null_value = float(null["value"].mean())
            null_gap = null_gap or gap(observed, null)
        if missing(mean):
            verdict_ = NOT_TESTED
        else:
            verdict_ = verdict(low, high, threshold, direction,
                               null_gap[1:] if null_gap else None, threshold_is_null)
        controls = {kind: float(self.metric_of(self.controls(runs, kind), key)["value"].mean())
                    if key else NAN for kind in CONTROL_COLUMNS}
        seeds = observed["value"].notna().sum() if isinstance(observed, pd.DataFrame) \
            else len(runs)
        over = "" if missing(mean) else NO_INTERVAL if missing(low) \
            else OVER_SEEDS if seeds > 1 else one_seed  # nothing observed: no interval to name
        return {"finding": finding, "series": runs["series"].iloc[0], "measure": measure,
                "observed": mean, "low": low, "high": high, "interval": over,
                "seeds": int(seeds),
                "threshold": threshold, "null": null_value, "null_kind": null_kind,
                **{column: controls[kind] for kind, column in CONTROL_COLUMNS.items()},
                "paper": paper, "paper_run": self.match.get(runs["run"].iloc[0], ""),
                "verdict": verdict_, "note": note}


def f1_comparator(ctx: Context, run: str) -> tuple[str | None, str]:
    """F1's offline-distillation comparator and how the verdict names it: the run's matched
    SFT control, else (config/paper.yaml: no matched control) the first external
    offline-distillation run, on another source as the paper's own F1 is (OPD from DS-Qwen
    against Qwen2.5-Math -> DS-Qwen)."""
    control = ctx.control(run, OFFLINE)
    if control is not None:
        return control, "SFT control"
    external = ctx.info[(ctx.info["kind"] == EXTERNAL) & (ctx.info["method"] == OFFLINE)]
    external = external[external["run"].isin(ctx.values.index)]
    if len(external):
        name = external["run"].iloc[0]
        return name, f"external offline-distillation run {name} (no matched SFT control)"
    return None, "SFT control"
