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
    NOT_TESTED,
    Context,
    f1_comparator,
    missing,
    null_verdict,
    per_seed,
)
from opdgeo.findings.measures import (
    F1_RATIO,
    FFN_LEAD,
    PROJECTION_RATIO,
    SPREAD,
    TOP16_RATIO,
    TYPE_SHARE,
    energy_spread,
    ffn_lead,
    matrix_ratio,
)
from opdgeo.intervals import gap
from opdgeo.paper_tables import PAPER_ENERGY, PAPER_ENERGY_COLUMNS


def _paper_beside(value, after: str, before: str = "") -> str:
    """`{before}paper {value}{after}`, or nothing where the paper gives no value."""
    return "" if missing(value) else f"{before}paper {value:.4g}{after}"


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

    def two_readings(measure, key, threshold, direction, null_keys, paper_column,
                     meaning) -> list[dict]:
        """The paper's reading (the threshold) and the rounding null's, each a row with its
        own verdict."""
        value = summary(key)
        null, null_key = ctx.first_null(runs, null_keys)
        null_gap = ctx.null_gap(runs, value, key, null, null_key) or gap(value, null)
        side = "below" if direction < 0 else "at least"
        paper = ctx.paper(first, paper_column)
        by_threshold = ctx.row(
            measure[0], runs, f"{measure[1]}: against the paper's threshold", value, threshold,
            direction, key=key, paper=paper, null_value=float(null["value"].mean()),
            null_kind=_null_kind(null_key),
            note=f"the paper's reading: {side} {threshold:g} ({meaning})"
                 + (f"; the paper's own value {paper:.4g}" if not missing(paper) else ""))
        by_null = ctx.row(
            measure[0], runs, f"{measure[1]}: against bf16 rounding", value,
            float(null["value"].mean()), direction, null, _null_kind(null_key), key=key,
            null_gap=null_gap, paper=paper,
            note=f"{'below' if direction < 0 else 'above'} what bf16 rounding alone gives "
                 f"(the {_null_kind(null_key) or 'rounding null'}, paired by "
                 f"{'matrix' if len(runs) == 1 else 'seed'}): observed - null "
                 + (_gap_text(null_gap) if not missing(null_gap[0]) else "not computed"))
        if by_null["verdict"] != NOT_TESTED:
            by_null["verdict"] = null_verdict(null_gap[1:], direction) if not missing(
                null_gap[0]) else NOT_TESTED
        return [by_threshold, by_null]

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
                             f"norm {norm['value'].mean():.4g}"
                             + _paper_beside(ctx.paper(first, "relative_norm"), ")", " (")
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
                             f" ({_paper_beside(ctx.paper(first, 'top16_energy'), '; ')}the "
                             f"paper compares with 16/min(m, n), which an isotropic matrix "
                             f"exceeds)"))

    ratio = observed({r: _point(ctx, r, lambda t: matrix_ratio(
        t, PRINCIPAL_PROJECTION, null_name("isotropic", PRINCIPAL_PROJECTION)))
        for r in runs["run"]}, PROJECTION_RATIO)
    rows.append(ctx.row("F7", runs, "principal projection at 10% / its isotropic null (mean over "
                        "matrices)", ratio, 1.0, -1, null_kind="isotropic null (k^2/(mn))",
                        threshold_is_null=True,
                        note="claim: < 1 (the paper gives no number for this measure)"))
    coverage_nulls = [null_name(kind, PRINCIPAL_COVERAGE) for kind in ("exact", "rounding")]
    rows += two_readings(("F7", "principal-mask coverage at 10%"), PRINCIPAL_COVERAGE,
                         F7_RANDOM_MASK, -1, coverage_nulls, "principal_coverage",
                         "the coverage of a random 10% mask")
    low_nulls = [null_name(kind, LOW_MAGNITUDE_COVERAGE) for kind in ("exact", "rounding")]
    rows += two_readings(("F8", "low-magnitude coverage at 10%"), LOW_MAGNITUDE_COVERAGE,
                         F8_MIN_COVERAGE, +1, low_nulls, "low_magnitude_coverage",
                         f"enrichment {F8_MIN_COVERAGE / 0.1:g} over the mask's 10% density")
    return rows


def _null_kind(key: str) -> str:
    if key.startswith("exact_null"):
        return "exact rounding null"
    return "parametric rounding null" if key else ""


def _f3(ctx: Context, runs: pd.DataFrame, observed) -> list[dict]:
    spread = {r: {key: _point(ctx, r, lambda t, key=key: energy_spread(t)[key])
                  for key in SPREAD} for r in runs["run"]}
    first = runs["run"].iloc[0]
    # by module type, as the paper's module energy table counts it (a tower's MLP in FFN)
    shares = ctx.values.reindex(runs["run"])
    shares = shares[[c for c in shares.columns if c.startswith(TYPE_SHARE)]]
    lead = observed(ffn_lead(shares).to_dict(), FFN_LEAD)
    mean_shares = shares.mean().drop(f"{TYPE_SHARE}ffn", errors="ignore")
    runner_up = mean_shares.idxmax().removeprefix(TYPE_SHARE) if mean_shares.notna().any() \
        else "none"
    paper_row = PAPER_ENERGY.get(ctx.match.get(first))
    paper = dict(zip(PAPER_ENERGY_COLUMNS, paper_row, strict=True)) if paper_row else {}
    paper_lead = (paper["ffn"] - max(v for k, v in paper.items() if k != "ffn" and v is not None)
                  ) / 100 if paper else NAN
    ratio = observed({r: v["ffn"] for r, v in spread.items()}, SPREAD["ffn"])["value"].mean()

    def values(key):
        return observed({r: v[key] for r, v in spread.items()}, SPREAD[key])

    return [
        ctx.row("F3", runs, "least-moved layer: energy share / parameter share",
                values("layer"), F3_MIN_SPREAD, +1,
                note=f"claim: >= {F3_MIN_SPREAD:g} (attention and FFN tensors; an even "
                     f"spread gives 1)"),
        ctx.row("F3", runs, "least-moved block (attention, FFN): energy share / parameter "
                "share", values("block"), F3_MIN_SPREAD, +1, note=f"claim: >= {F3_MIN_SPREAD:g}"),
        ctx.row("F3", runs, "FFN energy share - the largest other block's (by module type)",
                lead, 0.0, +1, paper=paper_lead,
                note=f"claim: > 0, the FFN holds the largest share; FFN share "
                     f"{shares.get(f'{TYPE_SHARE}ffn', pd.Series(NAN)).mean():.3g}, next "
                     f"{runner_up} {mean_shares.max():.3g}"
                     + (f" (paper: FFN {paper['ffn'] / 100:.3g})" if paper else "")
                     + f"; context: FFN energy share / its "
                     f"parameter share {ratio:.3g} (within attention + FFN; an even spread "
                     f"gives 1)"),
    ]


def _gap_text(estimate: tuple) -> str:
    mean, low, high = estimate
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"
