"""The paper's findings F1-F8 (docs/study.md section 6) as checks on our runs.

Each row: one finding, one run group (a run over its seeds), one measure, with
    observed (mean over seeds) | its 95% interval and what it is over | claim threshold | null |
    matched controls (SFT, GRPO) | the paper's value | verdict.
The interval is the t-interval over seeds. With one seed, a score's is the bootstrap over
prompts, and a delta measure's the bootstrap over the run's matrices (its tensors resampled,
the measure recomputed as it is defined; paired by tensor name with a null or a control): a
reading of how the measure varies between matrices, not between seeds. Verdicts read the
interval, never the
mean alone: "holds" when it lies wholly on the claim's side of the threshold, "fails" when
wholly on the other side, else "inconclusive"; with a null, "holds beyond the null" when the
interval of observed - null (paired by seed) also clears zero in the claimed direction,
"explained by the null" when it does not, and "contradicts the claim" when it lies wholly on
the far side of the null. "not tested": an input is missing. The thresholds are the
constants below; nothing is tuned per run. All values are fractions (scores and shares in
[0, 1]) except ranks and ratios.
"""

import math
from pathlib import Path

import pandas as pd

from opdgeo import stats
from opdgeo.delta.columns import (
    LOW_MAGNITUDE_COVERAGE,
    NUMERICAL_RANK_FRACTION,
    PRINCIPAL_COVERAGE,
    PRINCIPAL_PROJECTION,
    RELATIVE_NORM,
    SPARSITY,
    TOP16_ENERGY,
    summary_name,
)
from opdgeo.paper_tables import (
    PAPER_ENERGY,
    PAPER_ENERGY_COLUMNS,
    PAPER_GLOBAL,
    PAPER_GLOBAL_COLUMNS,
    PAPER_MASKED,
    PAPER_OPTIMIZER,
    paper_match,
)
from opdgeo.tables import write_table
from opdgeo.tidy import (
    NO_INTERVAL,
    OVER_MATRICES,
    OVER_PROMPTS,
    OVER_SEEDS,
    curves,
    delta_summary,
    gap,
    interval,
    main_runs,
    masked_arm,
    score_metric,
    tensor_bootstrap,
    wide,
)

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
VERDICTS = (HOLDS_BEYOND, HOLDS, EXPLAINED, INCONCLUSIVE, FAILS, CONTRADICTS, NOT_TESTED)
CLAIMS = {
    "F1": "small: OPD relative norm far below the offline-distillation (SFT) control",
    "F2": "sparse: most bf16 coordinates unchanged at |dW| <= 1e-5",
    "F3": "spread and FFN-heavy: every layer and block moves in proportion to its size or "
          "more; FFN beyond its parameter share",
    "F4": "subnetwork suffices: OPD-mask retraining ~ full OPD; an equal-density random "
          "mask is worse",
    "F5": "AdamW beats SGD",
    "F6": "full rank, concentrated: numerical rank ~ min(m, n); top-16 energy above the "
          "shuffle null of the same matrix",
    "F7": "off-principal: joint principal projection at 10% below the isotropic null of each "
          "matrix's shape; principal-mask coverage below a random mask's",
    "F8": "low-magnitude: coverage of the bottom-10% |W_src| mask well above 10%",
}
READS = ("delta_global", "evaluation", "tensors")  # tidy tables, besides runs
COLUMNS = ["finding", "series", "measure", "observed", "low", "high", "interval", "seeds",
           "threshold",
           "null", "null_kind", "sft_control", "grpo_control", "paper", "paper_run", "verdict",
           "note"]
NAN = math.nan


def verdict(low: float, high: float, threshold: float, direction: int,
            null_gap: tuple[float, float] | None = None, threshold_is_null: bool = False
            ) -> str:
    """The claim read against its interval [low, high]: direction +1 says above `threshold`,
    -1 below. null_gap: the interval of observed - null (the null's side decides "beyond"
    and "contradicts"); threshold_is_null: the threshold is itself the null."""
    if any(_missing(v) for v in (low, high)):
        return INCONCLUSIVE
    claim = stats.verdict(low, high, threshold, direction)
    if threshold_is_null:
        return {HOLDS: HOLDS_BEYOND, FAILS: CONTRADICTS}.get(claim, claim)
    if null_gap is None or any(_missing(v) for v in null_gap):
        return claim
    side = stats.verdict(*null_gap, 0.0, direction)
    if side == FAILS:
        return CONTRADICTS
    if claim == HOLDS:
        return HOLDS_BEYOND if side == HOLDS else EXPLAINED
    return claim


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _per_seed(runs: pd.DataFrame, values: dict[str, float]) -> pd.DataFrame:
    """seed, value for the runs of a group (NaN where a run has no value)."""
    return pd.DataFrame({"seed": runs["seed"].to_numpy(),
                         "value": [values.get(r, NAN) for r in runs["run"]]})


class Context:
    """What every check needs: run info, wide delta values, matched controls, paper rows."""

    def __init__(self, tables: dict[str, pd.DataFrame], info: pd.DataFrame, plots: dict):
        self.tables, self.info = tables, info
        self.values = wide(tables["delta_global"])
        self.match = paper_match(info, plots.get("paper_match"))
        self.metric = score_metric(tables["evaluation"], plots.get("metric", ""))
        self.scores = curves(tables["evaluation"], info, self.metric) if self.metric else None
        self.resampled: dict[str, pd.DataFrame] = {}

    def value(self, run, key) -> float:
        if run is None or run not in self.values.index or key not in self.values.columns:
            return NAN
        value = self.values.loc[run, key]
        return float(value) if pd.notna(value) else NAN

    def metric_of(self, runs: pd.DataFrame, key: str) -> pd.DataFrame:
        return _per_seed(runs, {r: self.value(r, key) for r in runs["run"]})

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
        if _missing(mean):
            verdict_ = NOT_TESTED
        else:
            verdict_ = verdict(low, high, threshold, direction,
                               null_gap[1:] if null_gap else None, threshold_is_null)
        controls = {kind: float(self.metric_of(self.controls(runs, kind), key)["value"].mean())
                    if key else NAN for kind in ("sft", "grpo")}
        seeds = observed["value"].notna().sum() if isinstance(observed, pd.DataFrame) \
            else len(runs)
        over = "" if _missing(mean) else NO_INTERVAL if _missing(low) \
            else OVER_SEEDS if seeds > 1 else one_seed  # nothing observed: no interval to name
        return {"finding": finding, "series": runs["series"].iloc[0], "measure": measure,
                "observed": mean, "low": low, "high": high, "interval": over,
                "seeds": int(seeds),
                "threshold": threshold, "null": null_value, "null_kind": null_kind,
                "sft_control": controls["sft"], "grpo_control": controls["grpo"],
                "paper": paper, "paper_run": self.match.get(runs["run"].iloc[0], ""),
                "verdict": verdict_, "note": note}


def f1_comparator(ctx: Context, run: str) -> tuple[str | None, str]:
    """F1's offline-distillation comparator and how the verdict names it: the run's matched
    SFT control, else (config/paper.yaml: no matched control) the first external
    offline-distillation run, on another source as the paper's own F1 is (OPD from DS-Qwen
    against Qwen2.5-Math -> DS-Qwen)."""
    control = ctx.control(run, "sft")
    if control is not None:
        return control, "SFT control"
    external = ctx.info[(ctx.info["kind"] == "external") & (ctx.info["method"] == "sft")]
    external = external[external["run"].isin(ctx.values.index)]
    if len(external):
        name = external["run"].iloc[0]
        return name, f"external offline-distillation run {name} (no matched SFT control)"
    return None, "SFT control"


# Delta measures beyond delta_global's metrics, recomputed from per-tensor rows (delta_measures)
F1_RATIO, TOP16_RATIO, PROJECTION_RATIO = "f1_ratio", "top16_ratio", "projection_ratio"
SPREAD = {"layer": "spread_layer", "block": "spread_block", "ffn": "spread_ffn"}


def delta_measures(rows: pd.DataFrame, run: str, comparator: str | None) -> pd.DataFrame:
    """Every delta measure the findings read, per resample of the run's tensors (rows with a
    `resample` column; opdgeo.tidy.tensor_bootstrap): delta_global's metrics as the analysis
    aggregates them, the energy spread of F3, the matrix ratios of F6 and F7, and F1's ratio
    of relative norms to the comparator's (its rows among `rows`, drawn by the same tensor
    names)."""
    summary = delta_summary(rows)
    own = rows[rows["run"] == run]
    out = summary.xs(run, level="run").copy()
    out[F1_RATIO] = out[RELATIVE_NORM] / summary.xs(comparator, level="run")[RELATIVE_NORM] \
        if comparator in set(rows["run"]) else NAN
    out[TOP16_RATIO] = matrix_ratio(own, TOP16_ENERGY, f"shuffle_null_{TOP16_ENERGY}")
    out[PROJECTION_RATIO] = matrix_ratio(own, PRINCIPAL_PROJECTION,
                                         f"isotropic_null_{PRINCIPAL_PROJECTION}")
    return out.join(energy_spread(own).rename(columns=SPREAD))


def _point(ctx: Context, run: str, measure) -> float:
    """A per-tensor measure (energy_spread, matrix_ratio) of the run's own tensors."""
    tensors = ctx.tables["tensors"]
    if tensors.empty:
        return NAN
    value = measure(tensors[tensors["run"] == run].assign(resample=0))
    return float(value.iloc[0]) if len(value) else NAN


def check_series(ctx: Context, runs: pd.DataFrame) -> list[dict]:
    """F1-F3 and F6-F8 for one OPD run group (delta findings), over its seeds (one seed: over
    the run's matrices)."""
    first = runs["run"].iloc[0]
    rows = []

    def observed(values: dict[str, float], column: str) -> pd.DataFrame:
        return ctx.with_interval(runs, _per_seed(runs, values), column)

    def summary(key: str) -> pd.DataFrame:
        return ctx.with_interval(runs, ctx.metric_of(runs, key), key)

    def against_null(measure, key, threshold, direction, null_keys, **fields) -> dict:
        value = summary(key)
        null, null_key = ctx.first_null(runs, null_keys)
        return ctx.row(measure[0], runs, measure[1], value, threshold, direction, null,
                       _null_kind(null_key), key=key,
                       null_gap=ctx.null_gap(runs, value, key, null, null_key), **fields)

    norm = ctx.metric_of(runs, RELATIVE_NORM)
    comparators = {r: f1_comparator(ctx, r) for r in runs["run"]}
    ratio = observed({r: ctx.value(r, RELATIVE_NORM) / ctx.value(c, RELATIVE_NORM)
                      for r, (c, _) in comparators.items() if c}, F1_RATIO)
    described = comparators[first][1]
    rows.append(ctx.row("F1", runs, f"relative norm / its {described.split(' (')[0]}'s", ratio,
                        F1_MAX_NORM_RATIO, -1, key=RELATIVE_NORM,
                        note=f"claim: <= {F1_MAX_NORM_RATIO:g} x the {described}; OPD relative "
                             f"norm {norm['value'].mean():.4g} (paper "
                             f"{ctx.paper(first, 'relative_norm'):.4g})"
                             + ("" if comparators[first][0] else "; no SFT control")))

    rows.append(against_null(("F2", "sparsity at 1e-5"), SPARSITY, F2_MIN_SPARSITY, +1,
                             [f"exact_null_{SPARSITY}"], paper=ctx.paper(first, "sparsity"),
                             note=f"claim: >= {F2_MIN_SPARSITY:g}"))

    rows += _f3(ctx, runs, observed)

    rank_key = summary_name(NUMERICAL_RANK_FRACTION)
    null, _ = ctx.first_null(runs, [summary_name(f"shuffle_null_{NUMERICAL_RANK_FRACTION}")])
    rows.append(ctx.row("F6", runs, "numerical rank / min(m, n) (median)", summary(rank_key),
                        F6_MIN_RANK_FRACTION, +1, key=rank_key,
                        note=f"claim: >= {F6_MIN_RANK_FRACTION:g}; shuffle null "
                             f"{null['value'].mean():.3g} (a random update is full rank too)"))
    top16 = ctx.metric_of(runs, summary_name(TOP16_ENERGY))["value"].mean()
    ratio = observed({r: _point(ctx, r, lambda t: matrix_ratio(
        t, TOP16_ENERGY, f"shuffle_null_{TOP16_ENERGY}")) for r in runs["run"]}, TOP16_RATIO)
    rows.append(ctx.row("F6", runs, "top-16 energy / its shuffle null (mean over matrices)",
                        ratio, 1.0, +1, null_kind="shuffle null", threshold_is_null=True,
                        note=f"claim: > 1; top-16 energy (median) {top16:.4g}"
                             f" (paper {ctx.paper(first, 'top16_energy'):.4g}; the paper "
                             f"compares with 16/min(m, n), which an isotropic matrix exceeds)"))

    ratio = observed({r: _point(ctx, r, lambda t: matrix_ratio(
        t, PRINCIPAL_PROJECTION, f"isotropic_null_{PRINCIPAL_PROJECTION}"))
        for r in runs["run"]}, PROJECTION_RATIO)
    rows.append(ctx.row("F7", runs, "principal projection at 10% / its isotropic null (mean over "
                        "matrices)", ratio, 1.0, -1, null_kind="isotropic null (k^2/(mn))",
                        threshold_is_null=True,
                        note="claim: < 1 (the paper gives no number for this measure)"))
    coverage_nulls = [f"exact_null_{PRINCIPAL_COVERAGE}", f"rounding_null_{PRINCIPAL_COVERAGE}"]
    rows.append(against_null(("F7", "principal-mask coverage at 10%"), PRINCIPAL_COVERAGE,
                             F7_RANDOM_MASK, -1, coverage_nulls,
                             paper=ctx.paper(first, "principal_coverage"),
                             note="claim: < 10% (random mask)"))

    low_nulls = [f"exact_null_{LOW_MAGNITUDE_COVERAGE}",
                 f"rounding_null_{LOW_MAGNITUDE_COVERAGE}"]
    rows.append(against_null(("F8", "low-magnitude coverage at 10%"), LOW_MAGNITUDE_COVERAGE,
                             F8_MIN_COVERAGE, +1, low_nulls,
                             paper=ctx.paper(first, "low_magnitude_coverage"),
                             note=f"claim: >= {F8_MIN_COVERAGE:g} (enrichment >= "
                                  f"{F8_MIN_COVERAGE / 0.1:g})"))
    return rows


def _null_kind(key: str) -> str:
    if key.startswith("exact_null"):
        return "exact rounding null"
    return "parametric rounding null" if key else ""


def matrix_ratio(rows: pd.DataFrame, observed: str, null: str) -> pd.Series:
    """Per resample (rows: tensor rows with a `resample` column): the mean over matrices of
    `observed`, over the mean of each matrix's own null; 1 for a delta that is its own null.
    (A median of per-matrix ratios would carry the noise of one null draw per matrix, and a
    chi-square median's bias below its mean.)"""
    if not {observed, null} <= set(rows.columns):
        return pd.Series(dtype=float)
    means = rows.dropna(subset=[observed, null]).groupby("resample")[[observed, null]].mean()
    return means[observed] / means[null]


# Blocks of the repeated layers: their energy is compared with their parameter share (the
# embedding moves only in the rows of the tokens a task uses, and norms are tiny).
LAYER_BLOCKS = ("attention", "ffn")


def energy_spread(rows: pd.DataFrame) -> pd.DataFrame:
    """Per resample (rows: tensor rows with a `resample` column): energy share / parameter
    share of the least-moved layer and least-moved block (attention, FFN), and of the FFN
    block; over the tensors of those blocks only."""
    rows = rows[rows["block"].isin(LAYER_BLOCKS)]
    names = ["layer", "block", "ffn"]
    if rows.empty:
        return pd.DataFrame(columns=names, dtype=float)

    def ratios(key):
        sums = rows.groupby(["resample", key])[["delta_energy", "numel"]].sum()
        totals = sums.groupby(level="resample").transform("sum")
        shares = sums / totals.where(totals > 0)
        return shares["delta_energy"] / shares["numel"]

    blocks = ratios("block")
    ffn = blocks.xs("ffn", level="block") if "ffn" in set(rows["block"]) else NAN
    return pd.DataFrame({"layer": ratios("layer").groupby(level="resample").min(skipna=False),
                         "block": blocks.groupby(level="resample").min(skipna=False),
                         "ffn": ffn}, columns=names)


def _f3(ctx: Context, runs: pd.DataFrame, observed) -> list[dict]:
    spread = {r: {key: _point(ctx, r, lambda t, key=key: energy_spread(t)[key])
                  for key in SPREAD} for r in runs["run"]}
    first = runs["run"].iloc[0]
    paper_row = PAPER_ENERGY.get(ctx.match.get(first))
    paper = paper_row[PAPER_ENERGY_COLUMNS.index("ffn")] / 100 if paper_row else NAN
    # by module type, as the paper counts it (a vision tower's MLP in FFN)
    shares = _per_seed(runs, {r: ctx.value(r, "type_energy_share/ffn") for r in runs["run"]})

    def values(key):
        return observed({r: v[key] for r, v in spread.items()}, SPREAD[key])

    return [
        ctx.row("F3", runs, "least-moved layer: energy share / parameter share",
                values("layer"), F3_MIN_SPREAD, +1,
                note=f"claim: >= {F3_MIN_SPREAD:g} (attention and FFN tensors; an even "
                     f"spread gives 1)"),
        ctx.row("F3", runs, "least-moved block (attention, FFN): energy share / parameter "
                "share", values("block"), F3_MIN_SPREAD, +1, note=f"claim: >= {F3_MIN_SPREAD:g}"),
        ctx.row("F3", runs, "FFN: energy share / parameter share", values("ffn"), 1.0, +1,
                null_kind="even spread (parameter share)", threshold_is_null=True,
                paper=NAN, note=f"claim: > 1; FFN energy share of all tensors "
                                f"{shares['value'].mean():.3g} (paper {paper:.3g})"),
    ]


def check_interventions(ctx: Context) -> list[dict]:
    """F4 and F5 per pair, over seeds, on final scores: F4 where the pair's primary full OPD
    run improves over the source beyond its interval; F5 where AdamW and SGD runs exist."""
    if ctx.scores is None:
        return []
    info, rows = ctx.info, []
    final = ctx.scores.sort_values("step").groupby("run").tail(1).set_index("run")
    final = final[final["step"] > 0]

    def scores(runs: pd.DataFrame) -> pd.DataFrame:
        found = runs[runs["run"].isin(final.index)]
        return final.loc[found["run"], ["value", "low", "high"]].assign(
            seed=found["seed"].to_numpy()).reset_index(drop=True)

    opd = info[(info["kind"] == "opd")]
    for pair, pair_info in info.groupby("pair", sort=False):
        pair_opd = opd[opd["pair"] == pair]
        if pair_opd.empty:
            continue
        first = pair_opd.iloc[0]  # primary teacher and optimizer (build_runs lists it first)
        full = pair_opd[pair_opd["series"] == first["series"]]
        masked = pair_info[pair_info["kind"] == "masked"]
        arms = {}
        for row in masked.itertuples():
            arms.setdefault(masked_arm(row.run, pair), []).append(row.run)
        if "opd" in arms and len(scores(full)):
            rows.append(_f4(ctx, pair, full, scores, arms))
        f5 = _f5(ctx, pair_opd[pair_opd["teacher"] == first["teacher"]], scores)
        rows += [f5] if f5 else []
    return rows


def _f4(ctx, pair, full, scores, arms) -> dict:
    group = {arm: ctx.info[ctx.info["run"].isin(runs)] for arm, runs in arms.items()}
    source = ctx.scores[(ctx.scores["step"] == 0) & ctx.scores["run"].isin(full["run"])]
    improves = gap(scores(full), source.head(1)[["value", "low", "high"]])
    opd = scores(group["opd"])
    random = scores(group["random"]) if "random" in group else pd.DataFrame()
    other = next((scores(g) for a, g in group.items() if a.startswith("run-grpo")), None)
    null = gap(opd, random) if len(random) else None
    row = ctx.row("F4", group["opd"], f"OPD-mask final {ctx.metric} - full OPD's",
                  gap(opd, scores(full)), -F4_TOLERANCE, +1,
                  null_value=random["value"].mean() if len(random) else NAN, null_gap=null,
                  null_kind="random mask, same density" if len(random) else "",
                  paper=(PAPER_MASKED["opd"][1] - PAPER_MASKED["full"][1]) / 100,
                  one_seed=OVER_PROMPTS,
                  note=f"claim: >= -{F4_TOLERANCE:g}; beyond the null: the OPD mask above the "
                       f"random mask of the same density; grpo_control = the GRPO run's mask"
                       + (f"; OPD mask - random mask {_interval_text(null)}" if null else ""))
    row["grpo_control"] = float(other["value"].mean()) if other is not None else NAN
    row["paper_run"] = "DS-Qwen OPD"
    row["note"] += f"; full OPD - source {_interval_text(improves)}"
    if stats.verdict(improves[1], improves[2], 0.0, +1) != HOLDS:
        row["verdict"] = NOT_TESTED
        row["note"] += ": full OPD does not improve over the source beyond its interval"
    return row


def _interval_text(estimate: tuple) -> str:
    mean, low, high = estimate
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def _f5(ctx, opd: pd.DataFrame, scores) -> dict | None:
    by_optimizer = dict(iter(opd.groupby("optimizer")))
    if not {"adamw", "sgd"} <= set(by_optimizer):
        return None
    adamw, sgd = scores(by_optimizer["adamw"]), scores(by_optimizer["sgd"])
    if adamw.empty or sgd.empty:
        return None
    row = ctx.row("F5", by_optimizer["adamw"], f"AdamW final {ctx.metric} - SGD's",
                  gap(adamw, sgd), 0.0, +1,
                  paper=(PAPER_OPTIMIZER["adamw"][1] - PAPER_OPTIMIZER["sgd"][1]) / 100,
                  one_seed=OVER_PROMPTS,
                  note=f"claim: > 0; AdamW {adamw['value'].mean():.3f}, SGD "
                       f"{sgd['value'].mean():.3f} (paper peaks "
                       f"{PAPER_OPTIMIZER['adamw'][0] / 100:.4f} vs "
                       f"{PAPER_OPTIMIZER['sgd'][0] / 100:.4f})")
    row["paper_run"] = "DS-Qwen OPD (optimizer ablation)"
    return row


def findings_table(tables: dict[str, pd.DataFrame], info: pd.DataFrame,
                   plots: dict) -> pd.DataFrame:
    info = main_runs(info)  # the sweep grid has its own figure, not findings rows
    ctx = Context(tables, info, plots)
    rows = []
    relevant = info[(info["method"] == "opd") & (info["kind"] != "masked")
                    & info["run"].isin(ctx.values.index)]
    for _, runs in relevant.groupby("series", sort=False):
        rows += check_series(ctx, runs)
    rows += check_interventions(ctx)
    table = pd.DataFrame(rows, columns=COLUMNS)
    order = {f: i for i, f in enumerate(CLAIMS)}
    return table.sort_values("finding", key=lambda s: s.map(order), kind="stable")


def _fmt(value) -> str:
    if _missing(value) or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def findings_markdown(table: pd.DataFrame) -> str:
    lines = ["# Findings F1-F8 in our runs", "",
             "The paper's findings (docs/study.md section 6) checked on our runs. Values are "
             "fractions (scores and shares in [0, 1]); `paper` is the paper's value for the "
             "corresponding paper run (a reference from a much larger model, not a target). "
             "`null` is what chance or bf16 rounding alone predicts; `sft_control` and "
             "`grpo_control` are the matched controls (same pair, seed, optimizer, steps).", "",
             "`observed` is the mean over the group's seeds and [`low`, `high`] its 95% "
             "interval; `over` says what it is over: t over seeds; with one seed, a score's "
             "bootstrap over prompts, and a delta measure's bootstrap over the run's matrices "
             "(its tensors resampled with replacement and the measure recomputed as defined, "
             "paired by tensor name with its null or control). A one-seed interval over "
             "matrices reads how the measure varies between the matrices of that one run, not "
             "how it would vary between seeds: a verdict on it says the matrices agree, not "
             "that another training run would. Verdicts "
             "read the interval: *holds* / *fails* when it lies wholly on one side of the "
             "threshold, else *inconclusive*; against a null (the interval of observed - null, "
             "paired by seed): *holds beyond the null* when it clears the null too, *explained "
             "by the null* when it does not, *contradicts the claim* when it lies wholly on the "
             "null's far side; *not tested* when an input is missing. Thresholds: "
             f"F1 ratio <= {F1_MAX_NORM_RATIO:g}; F2 sparsity >= {F2_MIN_SPARSITY:g}; F3 "
             f"least-moved layer and block >= {F3_MIN_SPREAD:g} of their parameter share, FFN "
             f"above its share; F4 within {F4_TOLERANCE:g} of full OPD (tested only where full "
             f"OPD improves over the source beyond its interval); F5 AdamW above SGD; F6 rank "
             f"fraction >= {F6_MIN_RANK_FRACTION:g}, top-16 energy above the shuffle null; F7 "
             f"projection below the isotropic null of each matrix, coverage < "
             f"{F7_RANDOM_MASK:g}; F8 >= {F8_MIN_COVERAGE:g}. Coverages (F7, F8) are pooled "
             "over the updates of every weight matrix, the global table's headline (its median "
             "over matrices stands beside it there).", "",
             "F8 in the paper's own runs: `tables/table_paper_rounding_null.md` sets the "
             "low-magnitude coverage the paper reports beside what bf16 rounding alone "
             "predicts at its reported sparsities, on Gaussian weights of its models' shapes.",
             ""]
    if table.empty:
        return "\n".join(lines + ["No OPD run with results: nothing to check.", ""])
    shown = ["series", "measure", "observed", "95% interval", "over", "seeds", "threshold",
             "null", "null_kind", "sft_control", "grpo_control", "paper", "verdict", "note"]
    table = table.assign(**{
        "95% interval": [f"[{_fmt(lo)}, {_fmt(hi)}]" if not _missing(lo) else "–"
                         for lo, hi in zip(table["low"], table["high"], strict=True)],
        "over": table["interval"]})
    for finding, rows in table.groupby("finding", sort=False):
        lines += [f"## {finding}: {CLAIMS[finding]}", "",
                  "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
        for row in rows.to_dict("records"):
            lines.append("| " + " | ".join(_fmt(row[c]) for c in shown) + " |")
        counts = rows["verdict"].value_counts()
        lines += ["", "Verdicts: " + ", ".join(f"{v} {n}" for v, n in counts.items()) + ".", ""]
    return "\n".join(lines)


def write_findings(table: pd.DataFrame, out: Path):
    """out without suffix: out.csv and out.md."""
    out = Path(out)
    write_table(table, out.with_suffix(".csv"), ("csv",))
    path = out.with_suffix(".md")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(findings_markdown(table))
    tmp.replace(path)
