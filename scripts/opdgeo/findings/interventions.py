"""F4 and F5: the interventions (masked retraining, the optimizer ablation) per pair, on
final scores."""

import pandas as pd

from opdgeo import stats
from opdgeo.findings.context import F4_TOLERANCE, HOLDS, NAN, NOT_TESTED, Context
from opdgeo.intervals import OVER_PROMPTS, gap
from opdgeo.paper_tables import PAPER_MASKED, PAPER_OPTIMIZER
from opdgeo.tidy import masked_arm


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
