"""Fig 3: interventions. Masked retraining from the source, one panel per mask beside full
OPD, then the optimizer ablation, over training steps."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from opdgeo.config import PAPER
from opdgeo.figures.bands import INTERVAL, draw_lines
from opdgeo.figures.style import method_colors, note, shades, step_axis
from opdgeo.kinds import MASKED, OPD
from opdgeo.tidy import (
    OPTIMIZER_LABELS,
    curves,
    main_runs,
    mask_density,
    masked_arm,
    primary_opd_runs,
    score_metric,
)


def _arm_label(arm: str, density: float) -> str:
    head, _, arg = arm.partition("-")
    paper = arg == PAPER or arg.endswith(f"-{PAPER}")
    run = arg.removesuffix(PAPER).rstrip("-") if paper else arg
    names = {"opd": "OPD mask", "random": "random mask", "run": f"{arg} run's mask",
             "top": f"top-{arg} |ΔW| mask"}
    label = names.get(head, arm)
    if paper:
        of = f"the {run} run's" if run else "OPD's"
        label = f"top-|ΔW| mask of {of}" if head == "top" else f"random mask, {of} mask"
        label += " at the paper's density"
    elif head == "random" and arg:
        label = f"random mask ({arg} density)"
    return label + (f", density {density:.1%}" if not math.isnan(density) else "")


def _score_axis(ax, metric: str):
    step_axis(ax)
    ax.set_ylabel(f"held-out {metric} (%)")


def fig3_interventions(evaluation: pd.DataFrame, masks: pd.DataFrame, info: pd.DataFrame,
                       plots: dict):
    """Masked retraining from the source, one panel per mask beside full OPD (small multiples:
    two bands a panel), then AdamW against SGD. One row per pair, one y-range per row."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    metric = score_metric(evaluation, plots.get("metric", ""))
    pairs = list(dict.fromkeys(info["pair"].dropna()))
    arms = {pair: _arms(info[(info["pair"] == pair) & (info["kind"] == MASKED)])
            for pair in pairs}
    columns = max([len(a) for a in arms.values()] + [1]) + 1
    fig, axes = plt.subplots(max(len(pairs), 1), columns,
                             figsize=(4.2 * columns, 4.4 * max(len(pairs), 1)), squeeze=False,
                             sharey="row")
    if metric is None or not pairs:
        for ax in axes.flat:
            note(ax, "no evaluations of trained runs")
        return fig
    scores = curves(evaluation, info, metric)
    primary = primary_opd_runs(info)
    for row, pair in zip(axes, pairs, strict=False):
        pair_info, pair_primary = info[info["pair"] == pair], primary[primary["pair"] == pair]
        _masked_panels(row[:-1], scores, masks, pair_info, pair_primary, arms[pair], plots)
        _optimizer_panel(row[-1], scores, pair_info, pair_primary, plots)
        row[-1].set_title(f"{pair}: optimizer ablation\n(primary teacher)", fontsize="medium")
        for ax in row:
            if ax.get_visible():
                _score_axis(ax, metric)
    fig.suptitle("Held-out score over training (step 0: the source model; "
                 f"line: mean over seeds, band: {INTERVAL})")
    return fig


def _arms(masked: pd.DataFrame) -> dict[str, list[str]]:
    """Arm -> its runs (one per seed), in config order."""
    arms = {}
    for row in masked.itertuples():
        arms.setdefault(masked_arm(row.run, row.pair), []).append(row.run)
    return arms


def _masked_panels(axes, scores, masks, pair_info, primary, arms, plots):
    """One panel per arm: the arm (the masked runs' colour; a random mask, the arms' control,
    dashed) over full OPD (OPD's colour), so each panel has two bands."""
    pair = pair_info["pair"].iloc[0]
    if not arms:
        note(axes[0], "no masked runs in this config (pairs.<pair>.masked.arms)")
        axes[0].set_title(f"{pair}: subnetwork-masked retraining", fontsize="medium")
        for ax in axes[1:]:
            ax.set_visible(False)
        return
    base = method_colors(plots)
    colors = {"full": base[OPD], **dict.fromkeys(arms, base[MASKED])}
    masks_of = dict(zip(pair_info["run"], pair_info["mask"], strict=True))
    for ax, (arm, runs) in zip(axes, arms.items(), strict=False):
        # An arm's mask differs by seed: its label gives the mean, as the interventions table
        # does.
        density = np.mean([mask_density(masks, masks_of[run]) for run in runs])
        owner = {run: arm for run in runs} | {run: "full" for run in primary["run"]}
        data = scores[scores["run"].isin(owner)]
        data = data.assign(arm=pd.Categorical(data["run"].map(owner), ["full", arm]))
        draw_lines(ax, data.sort_values(["arm", "step"]), "step", colors,
                   {"full": "full OPD (no mask)", arm: _arm_label(arm, density)}, 100,
                   key="arm", dashes={arm: "--" if arm.startswith("random") else "-"})
        ax.set_title(f"{pair}: subnetwork-masked retraining,\n{_arm_label(arm, math.nan)}",
                     fontsize="medium")
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16))
    for ax in axes[len(arms):]:
        ax.set_visible(False)


def _optimizer_panel(ax, scores, pair_info, primary, plots):
    teacher = primary["teacher"].iloc[0] if len(primary) else None
    opd = pair_info[(pair_info["kind"] == "opd") & (pair_info["teacher"] == teacher)]
    if opd.empty:
        note(ax, "no OPD run")
        return
    labels = {row.series: f"{OPTIMIZER_LABELS.get(row.optimizer, row.optimizer)} "
              f"(lr {row.learning_rate:g})" for row in opd.itertuples()}
    colors = dict(zip(labels, shades(method_colors(plots)[OPD], len(labels)), strict=True))
    data = scores.merge(opd[["run", "series"]], on="run")
    draw_lines(ax, data.sort_values("step"), "step", colors, labels, 100)
    if opd["optimizer"].nunique() < 2:
        ax.text(0.02, 0.02, "only one optimizer in this config (training.optimizers)",
                transform=ax.transAxes, fontsize="small", color="0.35")
    ax.legend(fontsize="small")
