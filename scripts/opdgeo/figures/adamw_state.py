"""AdamW's state over training: the first moment's cosine to earlier steps and the spread
of the second moment, beside the paper's curves."""

import matplotlib.pyplot as plt
import pandas as pd

from opdgeo.figures.bands import draw_lines
from opdgeo.figures.style import group_colors, group_dashes, note, run_labels, step_axis
from opdgeo.paper_tables import PAPER_ADAMW_STATE
from opdgeo.tidy import main_runs

# The first-moment cosine at each lag the callback logs (opdgeo.callbacks.OptimizerStateCallback)
M1_LAGS = (("m1_cosine", "cos(m_t, m_t-1): the step before"),
           ("m1_cosine_interval", "cos(m_t, m_t-every): the logged step before"),
           ("m1_cosine_first", "cos(m_t, m_first): the first logged step"))


def optimizer_state(state: pd.DataFrame, info: pd.DataFrame, plots: dict):
    """AdamW diagnostics over steps: the first-moment cosine at three lags (the step before,
    the logging interval, the first logged step), each beside the paper's curve (its start,
    mean and end; the paper does not say its lag), and the coefficient of variation of the
    second moment, over all parameters."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    axes = axes.ravel()
    data = state[state["block"] == "all"] if not state.empty else state
    if data.empty:
        for ax in axes:
            note(ax, "no AdamW state logged (no AdamW run)")
        return fig
    data = data.merge(info[["run", "series", "method_rank"]], on="run")
    data = data.sort_values(["method_rank", "series", "step"])
    colors, labels = group_colors(info, plots), run_labels(info)
    start, mean, end = PAPER_ADAMW_STATE["m1_cosine"]
    steps = (data["step"].min(), data["step"].max())
    for ax, (metric, title) in zip(axes, M1_LAGS, strict=False):
        rows = data[data["metric"] == metric]
        if rows.empty:
            note(ax, f"no {metric} logged (runs trained before it was)")
        else:
            draw_lines(ax, rows, "step", colors, labels, dashes=group_dashes(info))
        ax.plot(steps, (start, end), ls="--", marker="o", color="0.3", lw=1,
                label=f"paper: starts ~{start}, ends ~{end} (lag not given)")
        ax.axhline(mean, ls=":", color="0.3", lw=1.2, label=f"paper: mean over its run ({mean})")
        step_axis(ax)
        ax.set_ylabel("cosine (unitless)")
        ax.set_title(title, fontsize="medium")
    cv = PAPER_ADAMW_STATE["m2_cv"][1]
    draw_lines(axes[3], data[data["metric"] == "m2_cv"], "step", colors, labels,
               dashes=group_dashes(info))
    axes[3].axhline(cv, ls="-.", color="0.3", lw=1.2, label=f"paper: m2 mean over its run ({cv})")
    step_axis(axes[3])
    axes[3].set_ylabel("std / mean of v_t over coordinates (unitless)")
    axes[3].set_title("second moment: spread of per-coordinate scales", fontsize="medium")
    legend = {}
    for ax in axes:  # run lines once, and the paper references
        legend |= dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    names, handles = list(legend), list(legend.values())
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 3),
               fontsize="small")
    return fig
