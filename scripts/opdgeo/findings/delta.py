"""F1-F3 and F6-F8: the delta findings of one OPD run group, over its seeds (one seed: over
the run's matrices)."""

import pandas as pd

from opdgeo.delta.columns import (
    LOW_MAGNITUDE_COVERAGE,
    NUMERICAL_RANK_FRACTION,
    PRINCIPAL_COVERAGE,
    PRINCIPAL_PROJECTION,
    RELATIVE_NORM,
    SPARSITY,
    TOP16_ENERGY,
    null_name,
    summary_name,
)
from opdgeo.findings.context import (
    F1_MAX_NORM_RATIO,
    F2_MIN_SPARSITY,
    F3_MIN_SPREAD,
    F6_MIN_RANK_FRACTION,
    F7_RANDOM_MASK,
    F8_MIN_COVERAGE,
    NAN,
    Context,
    f1_comparator,
    per_seed,
)
from opdgeo.findings.measures import (
    F1_RATIO,
    PROJECTION_RATIO,
    SPREAD,
    TOP16_RATIO,
    energy_spread,
    matrix_ratio,
)
from opdgeo.paper_tables import PAPER_ENERGY, PAPER_ENERGY_COLUMNS


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
        return ctx.with_interval(runs, per_seed(runs, values), column)

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
                             [null_name("exact", SPARSITY)], paper=ctx.paper(first, "sparsity"),
                             note=f"claim: >= {F2_MIN_SPARSITY:g}"))

    rows += _f3(ctx, runs, observed)

    rank_key = summary_name(NUMERICAL_RANK_FRACTION)
    null, _ = ctx.first_null(runs, [summary_name(null_name("shuffle", NUMERICAL_RANK_FRACTION))])
    rows.append(ctx.row("F6", runs, "numerical rank / min(m, n) (median)", summary(rank_key),
                        F6_MIN_RANK_FRACTION, +1, key=rank_key,
                        note=f"claim: >= {F6_MIN_RANK_FRACTION:g}; shuffle null "
                             f"{null['value'].mean():.3g} (a random update is full rank too)"))
    top16 = ctx.metric_of(runs, summary_name(TOP16_ENERGY))["value"].mean()
    ratio = observed({r: _point(ctx, r, lambda t: matrix_ratio(
        t, TOP16_ENERGY, null_name("shuffle", TOP16_ENERGY))) for r in runs["run"]}, TOP16_RATIO)
    rows.append(ctx.row("F6", runs, "top-16 energy / its shuffle null (mean over matrices)",
                        ratio, 1.0, +1, null_kind="shuffle null", threshold_is_null=True,
                        note=f"claim: > 1; top-16 energy (median) {top16:.4g}"
                             f" (paper {ctx.paper(first, 'top16_energy'):.4g}; the paper "
                             f"compares with 16/min(m, n), which an isotropic matrix exceeds)"))

    ratio = observed({r: _point(ctx, r, lambda t: matrix_ratio(
        t, PRINCIPAL_PROJECTION, null_name("isotropic", PRINCIPAL_PROJECTION)))
        for r in runs["run"]}, PROJECTION_RATIO)
    rows.append(ctx.row("F7", runs, "principal projection at 10% / its isotropic null (mean over "
                        "matrices)", ratio, 1.0, -1, null_kind="isotropic null (k^2/(mn))",
                        threshold_is_null=True,
                        note="claim: < 1 (the paper gives no number for this measure)"))
    coverage_nulls = [null_name(kind, PRINCIPAL_COVERAGE) for kind in ("exact", "rounding")]
    rows.append(against_null(("F7", "principal-mask coverage at 10%"), PRINCIPAL_COVERAGE,
                             F7_RANDOM_MASK, -1, coverage_nulls,
                             paper=ctx.paper(first, "principal_coverage"),
                             note="claim: < 10% (random mask)"))

    low_nulls = [null_name(kind, LOW_MAGNITUDE_COVERAGE) for kind in ("exact", "rounding")]
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


def _f3(ctx: Context, runs: pd.DataFrame, observed) -> list[dict]:
    spread = {r: {key: _point(ctx, r, lambda t, key=key: energy_spread(t)[key])
                  for key in SPREAD} for r in runs["run"]}
    first = runs["run"].iloc[0]
    paper_row = PAPER_ENERGY.get(ctx.match.get(first))
    paper = paper_row[PAPER_ENERGY_COLUMNS.index("ffn")] / 100 if paper_row else NAN
    # by module type, as the paper counts it (a vision tower's MLP in FFN)
    shares = per_seed(runs, {r: ctx.value(r, "type_energy_share/ffn") for r in runs["run"]})

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
