"""The matched-gain comparison: over a learning-rate x steps grid, the gain in held-out score
against the final delta's sparsity and size, one curve per method."""

import matplotlib.pyplot as plt
import pandas as pd

from opdgeo.delta.columns import RELATIVE_NORM, SPARSITY, axis_label
from opdgeo.figures.bands import INTERVAL, mean_band
from opdgeo.figures.style import MARKERS, log_axis, method_colors, metric_scale, note
from opdgeo.intervals import gap
from opdgeo.kinds import TRAINED_METHODS
from opdgeo.tidy import OPTIMIZER_LABELS, curves, primary_opd_runs, score_metric, wide


def matched_gain_points(evaluation: pd.DataFrame, delta: pd.DataFrame, info: pd.DataFrame,
                        metric: str) -> pd.DataFrame:
    """Per run of the sweep grid (and the main OPD / SFT / GRPO runs of the primary teacher
    and optimizer, which are grid points too): gain = final score - source score, with the
    final delta's sparsity and relative norm."""
    primary = primary_opd_runs(info)
    teacher = dict(zip(primary["pair"], primary["teacher"], strict=True))
    optimizer = dict(zip(primary["pair"], primary["optimizer"], strict=True))
    matched = (info["kind"].isin(TRAINED_METHODS)
               & (info["teacher"] == info["pair"].map(teacher))
               & (info["optimizer"] == info["pair"].map(optimizer)))
    runs = info[info["sweep"] | (matched & ~info["sweep"])]
    if runs.empty or metric is None or delta.empty:
        return pd.DataFrame()
    scores = curves(evaluation, runs, metric)
    values = wide(delta)
    rows = []
    for row in runs.itertuples():
        curve = scores[scores["run"] == row.run].sort_values("step")
        if row.run not in values.index or len(curve) < 2 or curve["step"].iloc[0] != 0:
            continue
        rows.append({"run": row.run, "method": row.method, "method_label": row.method_label,
                     "pair": row.pair, "optimizer": row.optimizer,
                     "cell": f"{row.optimizer} lr {row.learning_rate:g}, {row.steps:g} steps",
                     **dict(zip(("gain", "gain_low", "gain_high"),
                                gap(curve.tail(1).assign(seed=row.seed), curve.head(1).drop(
                                    columns="run")), strict=True)),
                     SPARSITY: values.loc[row.run].get(SPARSITY),
                     RELATIVE_NORM: values.loc[row.run].get(RELATIVE_NORM)})
    return pd.DataFrame(rows)


GAIN_PANELS = ((SPARSITY, False), (RELATIVE_NORM, True))  # (x axis, log scale)


def gain_vs_sparsity(evaluation: pd.DataFrame, delta: pd.DataFrame, info: pd.DataFrame,
                     plots: dict):
    """At equal gain, does OPD move fewer coordinates? One curve per method over the
    learning-rate x steps grid."""
    metric = score_metric(evaluation, plots.get("metric", ""))
    points = matched_gain_points(evaluation, delta, info, metric)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    if points.empty or not info["sweep"].any():
        for ax in axes:
            note(ax, "no matched-gain sweep in this config (pairs.<pair>.sweep)")
        return fig
    colors = method_colors(plots)
    # One curve per pair, method and optimizer (a curve through two optimizers' points, or two
    # pairs', would zigzag between unrelated grids): colour = method, line = optimizer,
    # marker = pair.
    pairs = list(dict.fromkeys(points["pair"]))
    optimizers = list(dict.fromkeys(points["optimizer"]))
    curves_of = points.groupby(["pair", "method", "optimizer"], sort=False)
    for ax, (x, log) in zip(axes, GAIN_PANELS, strict=True):
        for (pair, method, opt), frame in curves_of:
            gains = frame.rename(columns={"gain": "value", "gain_low": "low",
                                          "gain_high": "high"})
            cells = mean_band(gains.assign(x=gains.groupby("cell")[x].transform("mean")), "x")
            label = f"{frame['method_label'].iloc[0]}, {OPTIMIZER_LABELS.get(opt, opt)}"
            ax.errorbar(cells["x"] * metric_scale(x), cells["mean"] * 100,
                        yerr=[(cells["mean"] - cells["low"]).fillna(0) * 100,
                              (cells["high"] - cells["mean"]).fillna(0) * 100],
                        marker=MARKERS[pairs.index(pair) % len(MARKERS)],
                        linestyle=("-", "--", ":")[optimizers.index(opt) % 3], capsize=3,
                        color=colors.get(method),
                        label=f"{pair}: {label}" if len(pairs) > 1 else label)
        if log:
            log_axis(ax)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xlabel(axis_label(x, *(("log",) if log else ())))
        ax.set_ylabel(f"gain in held-out {metric} over the source (points)")
    axes[0].legend(fontsize="small")
    fig.suptitle("Matched-gain comparison: one point per learning rate x steps "
                 f"(mean over seeds, {INTERVAL})")
    return fig
