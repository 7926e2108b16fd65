"""What on-policy self-distillation's privileged context adds: findings SD1 and SD2 (their
claims in .context), rows like F1-F8's:

- SD1: the self-teacher reading each held-out prompt's own context (the source model scored
  with `--contexts`) against the student reading the prompt alone: OPSD has something to
  distil only if the first is higher;
- SD2: OPSD against its OP2SD control, whose teacher reads another example's context, seed by
  seed: does the update's scale, sparsity and geometry come from the privileged information,
  or from self-distillation itself? The claim is the paper's picture of OPSD (its sparsest,
  smallest update, the most low-magnitude coverage): each measure on its side of OP2SD's.
"""

import math

from opdgeo.delta.columns import (
    LOW_MAGNITUDE_COVERAGE,
    PRINCIPAL_COVERAGE,
    RELATIVE_NORM,
    SPARSITY,
)
from opdgeo.findings.context import Context, missing
from opdgeo.intervals import gap
from opdgeo.kinds import OTHER_EXAMPLE, OWN, SELF_DISTILLATION
from opdgeo.task import context_metric

# (delta metric, measure, the side of OP2SD's value the claim puts OPSD's: +1 above)
COMPARED = ((RELATIVE_NORM, "relative norm", -1), (SPARSITY, "sparsity at 1e-5", +1),
            (PRINCIPAL_COVERAGE, "principal-mask coverage at 10%", -1),
            (LOW_MAGNITUDE_COVERAGE, "low-magnitude coverage at 10%", +1))


def check_self_distillation(ctx: Context) -> list[dict]:
    """SD1 and SD2 for every OPSD run group."""
    info = ctx.info
    rows = []
    for _, runs in info[info["kind"] == SELF_DISTILLATION[OWN]].groupby("series", sort=False):
        rows += teacher_score(ctx, runs)
        control = ctx.controls(runs, SELF_DISTILLATION[OTHER_EXAMPLE])
        for key, measure, direction in COMPARED:
            opsd, op2sd = ctx.metric_of(runs, key), ctx.metric_of(control, key)
            rows.append(ctx.row(
                "SD2", runs, f"{measure}: OPSD - OP2SD (paired by seed)", gap(opsd, op2sd),
                0.0, direction, key=key, null_value=float(op2sd["value"].mean()),
                null_kind="OP2SD control",
                note=f"OPSD {opsd['value'].mean():.4g}, OP2SD {op2sd['value'].mean():.4g}; "
                     f"claim: OPSD {'above' if direction > 0 else 'below'} OP2SD"))
    return rows


def teacher_score(ctx: Context, runs) -> list[dict]:
    """SD1: the source's score reading its own context, against its score without one."""
    evaluation, metric = ctx.tables["evaluation"], ctx.metric
    if evaluation.empty or not metric:
        return []
    source = evaluation[(evaluation["run"] == runs["source"].iloc[0])
                        & (evaluation["step"] == 0)].set_index("metric")

    def score(name: str) -> tuple[float, float, float]:
        if name not in source.index:
            return math.nan, math.nan, math.nan
        row = source.loc[name]
        return tuple(float(row[c]) if c in row else math.nan for c in ("value", "low", "high"))

    student, own = score(metric), score(context_metric(metric, OWN))
    other = score(context_metric(metric, OTHER_EXAMPLE))
    # One evaluation of the source, shared by every seed: its interval is over prompts.
    return [ctx.row("SD1", runs.iloc[:1], f"self-teacher {metric}, own context",
                    own, student[0], +1, one_seed="prompts (the source)", null_value=student[0],
                    null_kind="the student, no context",
                    note=f"student {student[0]:.3g} [{student[1]:.3g}, {student[2]:.3g}]; "
                         + ("" if missing(other[0]) else
                            f"reading another example's context (OP2SD's teacher) "
                            f"{other[0]:.3g}; ")
                         + "claim: own context above the student's score")]
