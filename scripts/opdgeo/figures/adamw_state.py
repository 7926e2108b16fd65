"""AdamW's state over training: the first moment's cosine to earlier steps and the spread
of the second moment, beside the paper's curves."""

import pandas as pd

from opdgeo.figures.bands import DELTA_INTERVAL, draw_lines
from opdgeo.figures.style import (
    group_colors,
    group_dashes,
    note,
    pair_rows,
    run_labels,
    step_axis,
)
from opdgeo.paper_tables import PAPER_ADAMW_STATE
from opdgeo.tidy import main_runs

# The first-moment cosine at each lag the callback logs (opdgeo.callbacks.OptimizerStateCallback)
M1_LAGS = (("m1_cosine", "cos(m_t, m_t-1): the step before"),
           ("m1_cosine_interval", "cos(m_t, m_t-every): the logged step before"),
           ("m1_cosine_first", "cos(m_t, m_first): the first logged step"))


def optimizer_state(state: pd.DataFrame, info: pd.DataFrame, plots: dict):
    """AdamW diagnostics over steps, one row of panels per pair (its own run groups and steps):
    the first-moment cosine at three lags (the step before, the logging interval, the first
    logged step), each beside the paper's curve (its start, mean and end; the paper does not
    say its lag), and the coefficient of variation of the second moment, over all
    parameters."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    data = state[state["block"] == "all"] if not state.empty else state
    fig, rows, data = pair_rows(data, info, len(M1_LAGS) + 1, (22, 4.8),
                                "no AdamW state logged (no AdamW run)")
    colors, labels, dashes = group_colors(info, plots), run_labels(info), group_dashes(info)
    for pair, row in rows:
        own = data[data["pair"] == pair]
        _pair_row(row, own, colors, labels, dashes)
        for ax in row:
            ax.set_title(f"{pair}\n{ax.get_title()}" if len(rows) > 1 else ax.get_title(),
                         fontsize="medium")
        legend = {}
        for ax in row:  # the pair's run lines once, and the paper's references
            legend |= dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
        row[-1].legend(list(legend.values()), list(legend), fontsize="small",
                       loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"AdamW state over all parameters, over training (line: mean over seeds, "
                 f"band: {DELTA_INTERVAL}; grey: the paper's)")
    return fig


def _pair_row(row, data: pd.DataFrame, colors: dict, labels: dict, dashes: dict):
    """One pair's panels: a first-moment cosine per lag, then the second moment's spread."""
    start, mean, end = PAPER_ADAMW_STATE["m1_cosine"]
    steps = (data["step"].min(), data["step"].max())
    for ax, (metric, title) in zip(row, M1_LAGS, strict=False):
        rows = data[data["metric"] == metric]
        if rows.empty:
            note(ax, f"no {metric} logged (runs trained before it was)")
        else:
            draw_lines(ax, rows, "step", colors, labels, dashes=dashes)
        ax.plot(steps, (start, end), ls="--", marker="o", color="0.3", lw=1,
                label=f"paper: starts ~{start}, ends ~{end} (lag not given)")
        ax.axhline(mean, ls=":", color="0.3", lw=1.2, label=f"paper: mean over its run ({mean})")
        step_axis(ax)
        ax.set_ylabel("cosine (unitless)")
        ax.set_title(title)
    cv = PAPER_ADAMW_STATE["m2_cv"][1]
    draw_lines(row[-1], data[data["metric"] == "m2_cv"], "step", colors, labels, dashes=dashes)
    row[-1].axhline(cv, ls="-.", color="0.3", lw=1.2, label=f"paper: m2 mean over its run ({cv})")
    step_axis(row[-1])
    row[-1].set_ylabel("std / mean of v_t over coordinates (unitless)")
    row[-1].set_title("second moment: spread of per-coordinate scales")
