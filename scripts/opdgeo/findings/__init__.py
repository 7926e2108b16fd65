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

from pathlib import Path

import pandas as pd

from opdgeo.files import atomic
from opdgeo.findings.context import (
    BEYOND_NULL,
    CLAIMS,
    COLUMNS,
    CONTRADICTS,
    CONTROL_COLUMNS,
    EXPLAINED,
    F1_MAX_NORM_RATIO,
    F2_MIN_SPARSITY,
    F3_MIN_SPREAD,
    F4_TOLERANCE,
    F6_MIN_RANK_FRACTION,
    F7_RANDOM_MASK,
    F8_MIN_COVERAGE,
    FAILS,
    HOLDS,
    HOLDS_BEYOND,
    INCONCLUSIVE,
    NOT_TESTED,
    READS,
    SHORT_OF_NULL,
    VERDICTS,
    WITHIN_NULL,
    Context,
    missing,
    verdict,
)
from opdgeo.findings.delta import check_series
from opdgeo.findings.interventions import check_interventions
from opdgeo.findings.self_distillation import check_self_distillation
from opdgeo.kinds import OPD, OWN, SELF_DISTILLATION
from opdgeo.table_formats import write_table
from opdgeo.tidy import main_runs

# The package's interface: the table, its Markdown, its file; the claims, thresholds and
# verdict words they print (the checks live in .delta, .interventions and
# .self_distillation).
__all__ = ["BEYOND_NULL", "CLAIMS", "COLUMNS", "CONTRADICTS", "EXPLAINED", "F1_MAX_NORM_RATIO",
           "F2_MIN_SPARSITY", "F3_MIN_SPREAD", "F4_TOLERANCE", "F6_MIN_RANK_FRACTION",
           "F7_RANDOM_MASK", "F8_MIN_COVERAGE", "FAILS", "HOLDS", "HOLDS_BEYOND", "INCONCLUSIVE",
           "NOT_TESTED", "READS", "SHORT_OF_NULL", "VERDICTS", "WITHIN_NULL",
           "findings_markdown", "findings_table", "verdict", "write_findings"]


def findings_table(tables: dict[str, pd.DataFrame], info: pd.DataFrame,
                   plots: dict) -> pd.DataFrame:
    # the sweep grid has its own figure, not delta findings rows; F5 reads its OPD cells
    ctx = Context(tables, main_runs(info), plots, everything=info)
    info = ctx.info
    rows = []
    # F1-F8 ask the same of on-policy self-distillation as of OPD.
    relevant = info[info["method"].isin((OPD, SELF_DISTILLATION[OWN]))
                    & (info["kind"] != "masked") & info["run"].isin(ctx.values.index)]
    for _, runs in relevant.groupby("series", sort=False):
        rows += check_series(ctx, runs)
    rows += check_interventions(ctx)
    rows += check_self_distillation(ctx)
    table = pd.DataFrame(rows, columns=COLUMNS)
    order = {f: i for i, f in enumerate(CLAIMS)}
    return table.sort_values("finding", key=lambda s: s.map(order), kind="stable")


def _fmt(value) -> str:
    if missing(value) or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def findings_markdown(table: pd.DataFrame) -> str:
    lines = ["# Findings F1-F8 in our runs", "",
             "The paper's findings (docs/study.md section 6) checked on our runs. Values are "
             "fractions (scores and shares in [0, 1]); `paper` is the paper's value for the "
             "corresponding paper run (a reference from a much larger model, not a target). "
             "`null` is what chance or bf16 rounding alone predicts; "
             + " and ".join(f"`{c}`" for c in CONTROL_COLUMNS.values())
             + " are the matched controls (same pair, seed, optimizer, steps).", "",
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
             "null's far side; *not tested* when an input is missing. F7's and F8's coverages are "
             "read twice, each row with its own verdict: against the paper's threshold "
             "(*holds* / *fails* / *inconclusive*), and against what bf16 rounding alone "
             "gives: *beyond the null* when observed - null clears zero on the claim's side, "
             "*within the null* when its interval includes zero, *short of the null* when it "
             "lies on the other side. Thresholds: "
             f"F1 ratio <= {F1_MAX_NORM_RATIO:g}; F2 sparsity >= {F2_MIN_SPARSITY:g}; F3 "
             f"least-moved layer and block >= {F3_MIN_SPREAD:g} of their parameter share, the "
             f"FFN's energy share above every other block's; F4 within {F4_TOLERANCE:g} of "
             f"full OPD, first on the top-|dW| mask at the paper's density against a random "
             f"mask of that density (tested only where full OPD improves over the source "
             f"beyond its interval); F5 AdamW above SGD, each at its best learning rate, the "
             f"main pair beside; F6 rank "
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
             "null", "null_kind", *CONTROL_COLUMNS.values(), "paper", "verdict", "note"]
    table = table.assign(**{
        "95% interval": [f"[{_fmt(lo)}, {_fmt(hi)}]" if not missing(lo) else "–"
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
    with atomic(out.with_suffix(".md"), "findings.write") as tmp:
        tmp.write_text(findings_markdown(table))
