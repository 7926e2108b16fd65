"""The paper's tables from our tidy tables, each as CSV, Markdown and LaTeX.

Our numbers sit beside the paper's where one of our runs corresponds to one of its runs
(columns prefixed `paper_`); the paper's values are references quoted in docs/study.md, never
inputs to a computation.
"""

import math
import re
from collections import Counter
from functools import cache
from pathlib import Path

import pandas as pd
import yaml

from opdgeo.config import PAPER
from opdgeo.delta import columns
from opdgeo.delta.columns import (
    LOW_MAGNITUDE_COVERAGE,
    PRINCIPAL_COVERAGE,
    PRINCIPAL_PROJECTION,
    RELATIVE_NORM,
    SPARSITY,
    STABLE_RANK,
    TOP16_ENERGY,
    median_name,
    null_name,
    summary_name,
)
from opdgeo.delta.grouping import overlap_metrics
from opdgeo.intervals import (
    NO_INTERVAL,
    OVER_MATRICES,
    OVER_SEEDS,
    delta_estimates,
    gap,
    interval,
    tensor_bootstrap,
)
from opdgeo.kinds import EXTERNAL, OFFLINE_DISTILLATION, RLVR, ROLE_METHOD
from opdgeo.stats import percentile_interval, seed_interval
from opdgeo.table_formats import key_columns, write_table
from opdgeo.tidy import (
    OPTIMIZER_LABELS,
    curve_stats,
    curves,
    main_runs,
    mask_density,
    masked_arm,
    primary_opd_runs,
    score_metric,
    wide,
)

NAN = math.nan
REFERENCE = Path(__file__).resolve().parents[2] / "config" / "paper_reference.yaml"


def paper_reference(table: str, path: Path = REFERENCE) -> tuple[tuple[str, ...], dict]:
    """One of the paper's tables in config/paper_reference.yaml: (columns, row -> values);
    a one-column table maps rows to the value itself."""
    entry = _reference_file(Path(path))[table]
    columns = tuple(entry["columns"])
    rows = {row: tuple(values) if len(columns) > 1 else values[0]
            for row, values in entry["rows"].items()}
    return columns, rows


@cache
def _reference_file(path: Path) -> dict:
    """The file parsed once for all its tables: the workflow imports this module on every
    Snakemake start (every cluster job's too)."""
    return yaml.safe_load(path.read_text())


# The paper's numbers, by the table they come from (% except ranks; None: not reported).
PAPER_GLOBAL_COLUMNS, PAPER_GLOBAL = paper_reference("global_delta")
PAPER_ENERGY_COLUMNS, PAPER_ENERGY = paper_reference("module_energy")
_, PAPER_MASKED = paper_reference("masked_retraining")  # arm -> (peak, late average)
_, PAPER_MASK_DENSITY = paper_reference("mask_density")
_, PAPER_MASKED_VL = paper_reference("masked_retraining_vl")
_, PAPER_OPTIMIZER = paper_reference("optimizer_ablation")  # optimizer -> (peak, final)
_, PAPER_ADAMW_STATE = paper_reference("adamw_state")  # diagnostic -> mean over the run
_, PAPER_SOURCES = paper_reference("source_models")  # paper run -> its source checkpoint

PAPER_NULL_TABLE = "table_paper_rounding_null"
# The paper's run of each control's role (opdgeo.kinds), by our method: its language row.
ROLE_RUNS = {ROLE_METHOD[OFFLINE_DISTILLATION]: "Qwen-Math offline distill",
             ROLE_METHOD[RLVR]: "DeepScaleR RLVR"}

# Our global delta columns, in the order of the paper's table: (summary column, header); the
# scale to the header's unit comes from the metric registry.
GLOBAL_COLUMNS = (
    (RELATIVE_NORM, "rel. norm %"),
    (SPARSITY, "sparsity@1e-5 %"),
    (summary_name(TOP16_ENERGY), "top-16 energy %"),
    (summary_name(STABLE_RANK), "stable rank"),
    (PRINCIPAL_COVERAGE, "principal cov. 10% %"),
    (LOW_MAGNITUDE_COVERAGE, "low-mag cov. 10% %"),
)
# The coverages above are the headline: pooled over every matrix's updates, as docs/study.md
# counts |mask AND update| / |update|. Beside them, each matrix counted once: the median over
# matrices.
MEDIAN_COLUMNS = (
    (median_name(PRINCIPAL_COVERAGE), "principal cov. 10%, median over matrices %"),
    (median_name(LOW_MAGNITUDE_COVERAGE), "low-mag cov. 10%, median over matrices %"),
)
# Null columns, where the analysis computed them: beside the observed ones.
NULL_COLUMNS = (
    (null_name("exact", SPARSITY), "sparsity, exact rounding null %"),
    (summary_name(null_name("shuffle", TOP16_ENERGY)), "top-16, shuffle null %"),
    (null_name("rounding", PRINCIPAL_COVERAGE), "principal cov., rounding null %"),
    (summary_name(null_name("isotropic", PRINCIPAL_PROJECTION)),
     "principal proj. 10%, isotropic null %"),
    (summary_name(PRINCIPAL_PROJECTION), "principal proj. 10% %"),
    (null_name("rounding", LOW_MAGNITUDE_COVERAGE), "low-mag cov., rounding null %"),
    (null_name("exact", LOW_MAGNITUDE_COVERAGE), "low-mag cov., exact rounding null %"),
)
# Module energy: shares by module type (the paper's blocks), and the blocks a vision-language
# model has beside them, each shown on its own.
TYPE_SHARE, BLOCK_SHARE = "type_energy_share/", "block_energy_share/"
OWN_BLOCKS = ("vision", "projector")
# tidy tables, besides runs.csv
READS = ("delta_global", "tensors", "overlap", "overlap_tensors", "evaluation", "masks")
TABLE_NAMES = ("table_global_delta", "table_module_energy", "table_mask_overlap",
               "table_interventions", "table_evaluation_summary")


def paper_match(info: pd.DataFrame, overrides: dict | None = None) -> dict[str, str]:
    """Run -> the paper's run it corresponds to. By default: the offline-distillation control
    (SFT) -> offline distillation, the RLVR control (GRPO) -> DeepScaleR RLVR (ROLE_RUNS), OPD
    on the primary teacher and optimizer -> DS-Qwen OPD, OPD on another teacher -> DS-Qwen
    OPD (JustRL teacher), external runs by their declared kind.
    Vision-language pairs: the primary OPD run -> Qwen2.5-VL OPD, the others none (the paper
    has no other vision-language row). `overrides` (plots.paper_match) maps a run or run group
    to a paper row ("" for none)."""
    overrides = overrides or {}
    primary = primary_opd_runs(info)
    primary_teacher = dict(zip(primary["pair"], primary["teacher"], strict=True))
    primary_optimizer = dict(zip(primary["pair"], primary["optimizer"], strict=True))
    match = {}
    for row in info.itertuples():
        paper = None
        if row.modality == "vision-language":
            primary_run = row.kind == "opd" and row.optimizer == primary_optimizer.get(row.pair)
            paper = "Qwen2.5-VL OPD" if primary_run and \
                row.teacher == primary_teacher.get(row.pair) else None
        elif row.method in ROLE_RUNS:
            paper = ROLE_RUNS[row.method]
        elif row.kind == "external" and row.method == "opd":
            paper = "DS-Qwen OPD"
        elif row.kind == "opd" and row.optimizer == primary_optimizer.get(row.pair):
            paper = "DS-Qwen OPD" if row.teacher == primary_teacher.get(row.pair) \
                else "DS-Qwen OPD (JustRL teacher)"
        paper = overrides.get(row.run, overrides.get(row.series, paper))
        if paper:
            match[row.run] = paper
    return match


def _groups(info: pd.DataFrame, runs) -> list[pd.DataFrame]:
    """The run groups (a run over its seeds) with a run among `runs`, in runs.csv order: the
    info rows of each group's runs that are there."""
    present = info[info["run"].isin(runs)]
    return [group for _, group in present.groupby("series", sort=False)]


def _with_interval(out: dict, label: str, estimate: tuple, scale: float = 1.0):
    """`label`, `label 95% low`, `label 95% high` (write_paper_table prints them as one)."""
    for suffix, value in zip(("", " 95% low", " 95% high"), estimate, strict=True):
        out[label + suffix] = value * scale


def global_delta_table(info: pd.DataFrame, delta: pd.DataFrame, tensors: pd.DataFrame,
                       match: dict[str, str]) -> pd.DataFrame:
    """Per run group: the paper's six columns (ours; coverages pooled over matrices), the
    coverages' median over matrices and the nulls we have, each the mean over
    seeds with its 95% interval (intervals.delta_estimates: t over seeds, or the bootstrap over the
    matrices of a one-seed run); the paper's values beside them."""
    values = wide(delta)
    rows = []
    for runs in _groups(info, values.index):
        keys = [key for key, _ in GLOBAL_COLUMNS + MEDIAN_COLUMNS + NULL_COLUMNS if key in values
                and values.loc[runs["run"], key].notna().any()]
        estimates, over = delta_estimates(runs, values, tensors, keys)
        out = {"series": runs["series"].iloc[0], "method": runs["method_label"].iloc[0],
               "seeds": len(runs), "interval": over}
        for key, label in GLOBAL_COLUMNS + MEDIAN_COLUMNS + NULL_COLUMNS:
            if key in estimates:
                _with_interval(out, label, estimates[key], columns.metric(key).scale)
        paper = match.get(runs["run"].iloc[0])
        out["paper run"] = paper or ""
        for (_, label), value in zip(GLOBAL_COLUMNS, PAPER_GLOBAL.get(paper, ()),
                                        strict=False):
            out[f"paper: {label}"] = value
        rows.append(out)
    return pd.DataFrame(rows)


def module_energy_table(info: pd.DataFrame, delta: pd.DataFrame, tensors: pd.DataFrame,
                        match: dict[str, str]) -> pd.DataFrame:
    """Per run group: energy share in % of every module type present, the paper's blocks
    (a vision tower's attention, MLP and norms in attention, FFN and norm: `naming.type_block`),
    then the vision tower and its projector as blocks of their own (already counted in the
    type columns); mean over seeds with its 95% interval as in global_delta_table; the paper's
    beside it."""
    values = wide(delta)
    types = [c for c in values.columns if c.startswith(TYPE_SHARE)]
    ordered = [f"{TYPE_SHARE}{b}" for b in PAPER_ENERGY_COLUMNS if f"{TYPE_SHARE}{b}" in types]
    ordered += sorted(set(types) - set(ordered))
    labels = {key: f"{key.removeprefix(TYPE_SHARE)} %" for key in ordered}
    labels |= {f"{BLOCK_SHARE}{b}": f"{b} block (in the above) %" for b in OWN_BLOCKS
               if f"{BLOCK_SHARE}{b}" in values.columns}
    rows = []
    for runs in _groups(info, values.index):
        estimates, over = delta_estimates(runs, values, tensors, list(labels))
        out = {"series": runs["series"].iloc[0], "method": runs["method_label"].iloc[0],
               "seeds": len(runs), "interval": over}
        for key, label in labels.items():
            _with_interval(out, label, estimates[key], 100)
        paper = match.get(runs["run"].iloc[0])
        out["paper run"] = paper if paper in PAPER_ENERGY else ""
        for block, value in zip(PAPER_ENERGY_COLUMNS, PAPER_ENERGY.get(paper, ()), strict=False):
            out[f"paper: {block} %"] = value
        rows.append(out)
    return pd.DataFrame(rows)


OVERLAP_COLUMNS = (("coverage a->b %", 100), ("random baseline %", 100), ("enrichment", 1),
                   ("jaccard", 1), ("jaccard baseline", 1))
OVERLAP_COUNTS = ("count_a", "count_b", "count_both", "numel")


def _overlap_columns(summary, direction: str) -> dict[str, float]:
    """One direction ("a_to_b" or "b_to_a") of an overlap summary (overlap.json's metrics) as
    the table's columns, unscaled."""
    coverage, baseline = summary[f"coverage_{direction}"], summary[f"baseline_{direction}"]
    return {"coverage a->b %": coverage, "random baseline %": baseline,
            "enrichment": coverage / baseline if baseline > 0 else NAN,
            "jaccard": summary["jaccard"], "jaccard baseline": summary["jaccard_baseline"]}


def pooled_overlap(rows: pd.DataFrame, direction: str) -> pd.DataFrame:
    """The table's columns of one direction per resample of a pair's tensor rows (a
    `resample` column): the ratios of their summed mask counts, as overlap_runs pools them."""
    sums = rows.groupby("resample")[list(OVERLAP_COUNTS)].sum()
    return pd.DataFrame([_overlap_columns(overlap_metrics(*map(float, counts)), direction)
                         for counts in sums.itertuples(index=False)], index=sums.index)


def overlap_resamples(tensors: pd.DataFrame, run_a: str, run_b: str,
                      direction: str) -> pd.DataFrame:
    """pooled_overlap of one pair over resamples of its tensors (`tensors`: overlap_tensors);
    empty without the pair's tensor rows."""
    if tensors.empty:
        return pd.DataFrame()
    own = tensors[(tensors["run_a"] == run_a) & (tensors["run_b"] == run_b)]
    return tensor_bootstrap(own.assign(run=run_a), [run_a],
                            lambda rows: pooled_overlap(rows, direction))


def mask_overlap_table(info: pd.DataFrame, overlap: pd.DataFrame,
                       tensors: pd.DataFrame) -> pd.DataFrame:
    """Both directions of every pair of run groups: observed one-sided coverage vs its random
    baseline, mean over the seeds where both groups have a run of that seed (an external run,
    without a seed, pairs with every seed) with its 95% t-interval over those seeds. A pair of
    one seed: its pooled value with the percentile bootstrap over its tensors (`tensors`:
    overlap_tensors, the per-tensor mask counts; no interval without them)."""
    header = ["series a", "series b", "seeds", "interval"]
    if overlap.empty:
        return pd.DataFrame(columns=header + [label for label, _ in OVERLAP_COLUMNS])
    glob = overlap[~overlap["metric"].str.contains("/")]
    values = glob.pivot_table(index=["run_a", "run_b"], columns="metric", values="value")
    series = dict(zip(info["run"], info["series"], strict=True))
    seeds = dict(zip(info["run"], info["seed"].where(info["kind"] != EXTERNAL), strict=True))
    pairs = []
    for (a, b), v in values.iterrows():
        if a not in series or b not in series or (
                pd.notna(seeds[a]) and pd.notna(seeds[b]) and seeds[a] != seeds[b]):
            continue
        for src, dst, direction in ((a, b, "a_to_b"), (b, a, "b_to_a")):
            pairs.append({"series a": series[src], "series b": series[dst], "run_a": a,
                          "run_b": b, "direction": direction, **_overlap_columns(v, direction)})
    rows = []
    for (a, b), group in pd.DataFrame(pairs).groupby(header[:2], sort=False):
        out = {"series a": a, "series b": b, "seeds": len(group), "interval": OVER_SEEDS}
        resamples = pd.DataFrame()
        if len(group) == 1:
            pair = group.iloc[0]
            resamples = overlap_resamples(tensors, pair["run_a"], pair["run_b"],
                                          pair["direction"])
            out["interval"] = OVER_MATRICES if len(resamples) else NO_INTERVAL
        for label, scale in OVERLAP_COLUMNS:
            value, low, high = seed_interval(group[label])
            if len(resamples):
                low, high = map(float, percentile_interval(resamples[label]))
            _with_interval(out, label, (value, low, high), scale)
        rows.append(out)
    return pd.DataFrame(rows, columns=None if rows else header)


def intervention_rows(info: pd.DataFrame, evaluation: pd.DataFrame, masks: pd.DataFrame,
                      metric: str) -> pd.DataFrame:
    """One row per run of an intervention: masked retraining (arm `full` = the primary OPD
    run) and the optimizer ablation (OPD runs on the primary teacher), with curve stats."""
    if evaluation.empty or metric is None:
        return pd.DataFrame()
    scores = curves(evaluation, info, metric)
    primary = primary_opd_runs(info)
    teachers = dict(zip(primary["pair"], primary["teacher"], strict=True))
    rows = []

    def add(run, experiment, arm, density, source_run):
        stats = curve_stats(scores[scores["run"] == run])
        if stats["evaluations"] == 0:
            return
        source = scores[(scores["run"] == run) & (scores["step"] == 0)]["value"]
        final = scores[scores["run"] == run].sort_values("step").iloc[-1]
        rows.append({"experiment": experiment, "pair": source_run.pair, "arm": arm,
                     "modality": source_run.modality,
                     "seed": source_run.seed, "run": run, "mask density %": density * 100,
                     "source": source.iloc[0] if len(source) else float("nan"), **stats,
                     "final_low": final["low"], "final_high": final["high"]})

    for row in info[info["kind"] == "masked"].itertuples():
        add(row.run, "masked retraining", paper_arm(masked_arm(row.run, row.pair), info),
            mask_density(masks, row.mask), row)
    for row in primary.itertuples():
        if (info["kind"] == "masked").any():
            add(row.run, "masked retraining", "full", 1.0, row)
    opd = info[(info["kind"] == "opd") & (info["teacher"] == info["pair"].map(teachers))]
    # A pair trained with one optimizer ablates nothing: its run is not an ablation row.
    opd = opd[opd.groupby("pair")["optimizer"].transform("nunique") > 1]
    for row in opd.itertuples():
        label = OPTIMIZER_LABELS.get(row.optimizer, row.optimizer)
        add(row.run, "optimizer ablation", f"{label} (lr {row.learning_rate:g})", 1.0, row)
    return pd.DataFrame(rows)


def paper_arm(arm: str, info: pd.DataFrame) -> str:
    """An arm named after an external RLVR run (`run-deepscaler-rlvr`, `top-deepscaler-rlvr-
    paper`) is named as the pair's own RLVR control's would be (`run-grpo`, `top-grpo-paper`),
    the paper's RLVR-mask arm."""
    head, _, run = arm.partition("-")
    run, paper = (run.removesuffix(f"-{PAPER}"), f"-{PAPER}") if run.endswith(f"-{PAPER}") \
        else (run, "")
    method = info.loc[info["run"] == run, "method"]
    if head in ("run", "random", "top") and len(method) \
            and method.iloc[0] == ROLE_METHOD[RLVR]:
        return f"{head}-{ROLE_METHOD[RLVR]}{paper}"
    return arm


# Arms at the paper's densities (`top:paper`, ...) stand beside the paper's arm of that mask.
PAPER_DENSITY_ARMS = {f"top-{PAPER}": "opd", f"random-{PAPER}": "random",
                      f"top-{ROLE_METHOD[RLVR]}-{PAPER}": f"run-{ROLE_METHOD[RLVR]}",
                      f"random-{ROLE_METHOD[RLVR]}-{PAPER}": f"random-{ROLE_METHOD[RLVR]}"}


def interventions_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per (experiment, pair, arm); scores in %; the paper's beside them."""
    if rows.empty:
        return pd.DataFrame(columns=["experiment", "pair", "arm", "seeds", "mask density %",
                                     "peak %", "final %", "late average %"])
    grouped = rows.groupby(["experiment", "pair", "arm"], sort=False)
    table = grouped[["mask density %", "source", "peak", "final", "late_average"]].mean()
    table.insert(0, "seeds", grouped.size())
    finals = grouped.apply(lambda g: interval(g.rename(columns={
        "final": "value", "final_low": "low", "final_high": "high"}))[1:], include_groups=False)
    table.insert(table.columns.get_loc("final") + 1, "final low", [f[0] for f in finals])
    table.insert(table.columns.get_loc("final") + 2, "final high", [f[1] for f in finals])
    for column in ("source", "peak", "final", "final low", "final high", "late_average"):
        table[column] *= 100
    table = table.rename(columns={"source": "source %", "peak": "peak %", "final": "final %",
                                  "final low": "final % 95% low",
                                  "final high": "final % 95% high",
                                  "late_average": "late average %"}).reset_index()
    vision_pairs = set(rows.loc[rows["modality"] == "vision-language", "pair"])
    peaks, lates, densities = [], [], []
    for row in table.itertuples():
        key = PAPER_DENSITY_ARMS.get(row.arm, row.arm) if row.experiment == "masked retraining" \
            else next((k for k, v in OPTIMIZER_LABELS.items() if row.arm.startswith(v)), None)
        if row.experiment == "masked retraining" and row.pair in vision_pairs:
            peak, late = PAPER_MASKED_VL.get(key, (None, None))
            densities.append(None)
        elif row.experiment == "masked retraining":
            peak, late = PAPER_MASKED.get(key, (None, None))
            densities.append(PAPER_MASK_DENSITY.get(key))
        elif row.pair in vision_pairs:  # the paper ablated the optimizer on DS-Qwen only
            peak, late = None, None
            densities.append(None)
        else:
            peak, late = PAPER_OPTIMIZER.get(key, (None, None))  # the paper gives the final
            densities.append(None)
        peaks.append(peak)
        lates.append(late)
    table["paper: peak %"] = peaks
    table["paper: late average (masked) / final (optimizer) %"] = lates
    table["paper: mask density %"] = densities
    return table


def evaluation_summary(info: pd.DataFrame, evaluation: pd.DataFrame) -> pd.DataFrame:
    """Per run and metric: source, peak, final, late average and gain (final - source), in %;
    base models (teachers, the student) with their single score."""
    if evaluation.empty:
        return pd.DataFrame()
    rows = []
    for metric in evaluation["metric"].unique():
        scores = curves(evaluation, info, metric)
        for row in info.itertuples():
            curve = scores[scores["run"] == row.run]
            if curve.empty:
                continue
            stats = curve_stats(curve)
            source = curve[curve["step"] == 0]
            final = curve.sort_values("step").tail(1)
            _, low, high = gap(final.assign(seed=row.seed), source.drop(columns="run"))
            rows.append({"run": row.run, "method": row.method_label, "metric": metric,
                         "source %": (source["value"].iloc[0] if len(source) else NAN) * 100,
                         "peak %": stats["peak"] * 100, "final %": stats["final"] * 100,
                         "final % 95% low": final["low"].iloc[0] * 100,
                         "final % 95% high": final["high"].iloc[0] * 100,
                         "late average %": stats["late_average"] * 100,
                         "gain %": (stats["final"] - (source["value"].iloc[0] if len(source)
                                                      else NAN)) * 100,
                         "gain % 95% low": low * 100, "gain % 95% high": high * 100})
        base = evaluation[(evaluation["metric"] == metric) & ~evaluation["run"].isin(info["run"])]
        for model, last in base.groupby("run").last().iterrows():
            rows.append({"run": model, "method": "base model", "metric": metric,
                         "final %": last["value"] * 100,
                         "final % 95% low": last.get("low", NAN) * 100,
                         "final % 95% high": last.get("high", NAN) * 100})
    return pd.DataFrame(rows)


def paper_rounding_null_table(stds: list[float]) -> pd.DataFrame:
    """The parametric rounding null applied to the paper's own sparsities: per
    paper run and weight std, every tensor of its source model's shapes is N(0, std^2) in
    bf16, one update scale is fitted so that the expected sparsity at 1e-5 is the reported
    one, and the null's low-magnitude coverage at 10% stands beside the reported coverage.

    Computed in closed form (`gaussian_bin_counts`), not sampled. One std for every tensor
    gives every tensor one histogram up to its size, so tensors of one size enter summed and
    the null depends on std and sparsity, not on the shapes.
    """
    from opdgeo.delta.nulls import gaussian_bin_counts, pooled_rounding_null
    from opdgeo.hub_models import by_name
    from opdgeo.models import parameter_shapes

    column = {name: PAPER_GLOBAL_COLUMNS.index(name)
              for name in ("sparsity", "low_magnitude_coverage")}
    rows = []
    for run, model in PAPER_SOURCES.items():
        sizes = Counter(math.prod(shape)
                        for shape in parameter_shapes(by_name(model).config).values())
        sparsity = PAPER_GLOBAL[run][column["sparsity"]]
        reported = PAPER_GLOBAL[run][column["low_magnitude_coverage"]]
        for std in stds:
            null = pooled_rounding_null(
                [gaussian_bin_counts(std, size * n) for size, n in sizes.items()], sparsity / 100)
            coverage = null["low_magnitude_coverage"] * 100
            rows.append({"paper run": run, "source model": model,
                         "parameters": sum(size * n for size, n in sizes.items()),
                         "weight std": std, "reported sparsity %": sparsity,
                         "null low-mag cov. %": coverage, "reported low-mag cov. %": reported,
                         "reported - null (pt)": reported - coverage,
                         "null update scale": null["scale"]})
    return pd.DataFrame(rows)


INTERVAL_SUFFIXES = (" 95% low", " 95% high")
SIGNIFICANT = 3  # digits of a column's typical (median) value; its column shares its decimals
def decimals(values: pd.Series) -> int:
    """Decimals that give the column's median magnitude SIGNIFICANT digits (whole numbers:
    none), so that every cell of a column, interval bounds included, has one precision."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    values = values[(values != 0) & values.abs().lt(math.inf)].abs()
    if values.empty or (values == values.round()).all():
        return 0
    return min(max(SIGNIFICANT - 1 - math.floor(math.log10(values.median())), 0), 6)


def display_header(column: str) -> str:
    """A column's header for a reader: its unit in parentheses ("cov. 10% %" -> "cov. 10%
    (%)")."""
    return re.sub(r" %$", " (%)", column)


def write_paper_table(frame: pd.DataFrame, out: Path, caption: str = ""):
    """CSV at full precision; Markdown and LaTeX (the LaTeX caption from the report's caption,
    `caption` in reStructuredText: opdgeo.captions.table_captions)
    with one precision per column, a value and its interval columns (`x`, `x 95% low`, `x 95%
    high`) in one cell, `mean [low, high]`, and units in parentheses."""
    write_table(frame, out, ("csv",))
    shown = frame.copy().astype(object)
    for column in frame.select_dtypes("number").columns:
        if column.endswith(INTERVAL_SUFFIXES):
            continue
        bounds = [column + suffix for suffix in INTERVAL_SUFFIXES if column + suffix in frame]
        places = decimals(frame[column])
        for each in (column, *bounds):
            shown[each] = [f"{v:.{places}f}" if pd.notna(v) else "" for v in frame[each]]
        if len(bounds) == 2:
            low, high = bounds
            shown[column] = [f"{v} [{lo}, {hi}]" if lo and hi else v
                             for v, lo, hi in zip(shown[column], shown[low], shown[high],
                                                  strict=True)]
            shown = shown.drop(columns=bounds)
    # empty cells, not "nan", where a value does not exist (a paper column without a match)
    shown = shown.fillna("")
    name = Path(out).stem
    write_table(shown.rename(columns=display_header), out, ("md", "tex"),
                caption=caption, label=f"tab:{name}",
                keys=[display_header(c) for c in key_columns(frame)])


def build_tables(tables: dict[str, pd.DataFrame], info: pd.DataFrame,
                 plots: dict) -> dict[str, pd.DataFrame]:
    """Every paper table; the sweep grid appears in the evaluation summary only."""
    everything, info = info, main_runs(info)
    match = paper_match(info, plots.get("paper_match"))
    metric = score_metric(tables["evaluation"], plots.get("metric", ""))
    return {
        "table_global_delta": global_delta_table(info, tables["delta_global"],
                                                 tables["tensors"], match),
        "table_module_energy": module_energy_table(info, tables["delta_global"],
                                                   tables["tensors"], match),
        "table_mask_overlap": mask_overlap_table(info, tables["overlap"],
                                                 tables["overlap_tensors"]),
        "table_interventions": interventions_table(
            intervention_rows(info, tables["evaluation"], tables["masks"], metric)),
        "table_evaluation_summary": evaluation_summary(everything, tables["evaluation"]),
    }
