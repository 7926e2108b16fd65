"""Fig 1: the final delta of every run group at a glance: its scale, sparsity, spectrum and
where its updated coordinates sit (the principal and low-magnitude masks)."""

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D

from opdgeo.delta.columns import (
    HEADLINE_RATIO,
    LOW_MAGNITUDE_COVERAGE,
    PRINCIPAL_COVERAGE,
    RELATIVE_NORM,
    SPARSITY,
    TOP16_ENERGY,
    axis_label,
    summary_name,
)
from opdgeo.figures.bands import DELTA_INTERVAL, error_bars
from opdgeo.figures.style import (
    delta_runs,
    log_axis,
    method_colors,
    metric_scale,
    note,
    percent,
    run_labels,
)
from opdgeo.intervals import interval
from opdgeo.tidy import main_runs, wide

FIG1_PANELS = ((RELATIVE_NORM, True), (SPARSITY, False), (summary_name(TOP16_ENERGY), False))


def fig1_overview(delta: pd.DataFrame, info: pd.DataFrame, plots: dict):
    """Offline distillation vs RLVR vs OPD: scale, sparsity, spectrum, mask coverage."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    runs = delta_runs(info)
    values = wide(delta)
    runs = runs[runs["run"].isin(values.index)]
    groups = list(dict.fromkeys(runs["series"]))
    fig, axes = plt.subplots(1, 4, figsize=(17, 1.6 + 0.55 * max(len(groups), 2)),
                             sharey=True)
    if not groups:
        for ax in axes:
            note(ax, "no analysed runs")
        return fig
    # One colour per method (a row names its group): OPD against its controls at a glance.
    base = method_colors(plots)
    colors = {row.series: base[row.method] for row in runs.itertuples()}
    y = {g: i for i, g in enumerate(groups)}
    method_of = dict(zip(runs["series"], runs["method_label"], strict=False))

    def dots(ax, column, offset=0.0, marker="o", label=None, filled=True):
        for group, frame in runs.groupby("series"):
            v = values.loc[frame["run"], column].dropna() * metric_scale(column) \
                if column in values else []
            if len(v) == 0:
                continue
            color = colors[group]
            ax.errorbar(v.mean(), y[group] + offset,
                        xerr=error_bars(interval(pd.DataFrame({"value": v}))),
                        fmt=marker, ms=8, color=color, mfc=color if filled else "white",
                        capsize=3, label=label if group == groups[0] else None)
            if len(v) > 1:  # the seeds themselves, small
                ax.plot(v, [y[group] + offset] * len(v), "|", color=color, ms=10)

    for ax, (column, log) in zip(axes, FIG1_PANELS, strict=False):
        dots(ax, column)
        ax.set_xlabel(axis_label(column, *(("log",) if log else ())))
        if log:
            log_axis(ax)
        if column not in values:
            note(ax, f"{column} not in delta_global.csv")
    ax = axes[3]
    dots(ax, PRINCIPAL_COVERAGE, -0.15, "o", f"principal mask (top {percent(HEADLINE_RATIO)})")
    dots(ax, LOW_MAGNITUDE_COVERAGE, 0.15, "s",
         f"low-magnitude mask (bottom {percent(HEADLINE_RATIO)})", filled=False)
    ax.axvline(HEADLINE_RATIO * 100, ls="--", color="0.4", lw=1,
               label=f"random mask ({percent(HEADLINE_RATIO)})")
    ax.set_xlabel("share of updated coordinates in mask (%)")
    # The markers' meaning in grey (the colours are the methods'), as stand-in handles.
    _, names = ax.get_legend_handles_labels()
    grey = {"random": Line2D([], [], ls="--", color="0.4", lw=1),
            "principal": Line2D([], [], marker="o", ls="", color="0.3", ms=8),
            "low-magnitude": Line2D([], [], marker="s", ls="", color="0.3", mfc="white", ms=8)}
    handles = [next(h for key, h in grey.items() if name.startswith(key)) for name in names]
    ax.legend(handles, names, loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize="small")
    axes[0].set_yticks(range(len(groups)))
    axes[0].set_yticklabels([f"{run_labels(runs)[g]}\n({method_of[g]})" for g in groups])
    for tick, group in zip(axes[0].get_yticklabels(), groups, strict=True):
        tick.set_color(colors[group])
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="y", visible=False)
    fig.suptitle("Final delta ΔW = W_trained − W_source per run "
                 f"(marker: mean over seeds; bar: {DELTA_INTERVAL})")
    return fig
