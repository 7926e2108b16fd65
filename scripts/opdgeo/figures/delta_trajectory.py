"""The delta over training: sparsity, spectral energy and principal projection of each
intermediate checkpoint's delta, one row of panels per pair."""

import pandas as pd

from opdgeo.delta.columns import (
    HEADLINE_RATIO,
    PRINCIPAL_PROJECTION,
    SPARSITY,
    TOP16_ENERGY,
    axis_label,
    summary_name,
)
from opdgeo.figures.bands import DELTA_INTERVAL, draw_lines
from opdgeo.figures.style import (
    group_colors,
    group_dashes,
    metric_scale,
    pair_rows,
    percent,
    run_labels,
    step_axis,
)
from opdgeo.kinds import TRAINED_METHODS
from opdgeo.tidy import main_runs

ISOTROPIC_PROJECTION = HEADLINE_RATIO**2  # the asymptotic isotropic baseline at the ratio

TRAJECTORY_PANELS = (SPARSITY, summary_name(TOP16_ENERGY), summary_name(PRINCIPAL_PROJECTION))


def trajectory(traj: pd.DataFrame, info: pd.DataFrame, plots: dict):
    """Sparsity, top-16 spectral energy and principal projection of ΔW over training steps
    (what a trajectory checkpoint measures: opdgeo.delta.analyze.TRAJECTORY_NOTE), one row
    of panels per pair: its own steps, each axis fitted to its data."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    runs = info[info["kind"].isin(TRAINED_METHODS)]
    data = traj[traj["run"].isin(runs["run"])] if not traj.empty else traj
    fig, rows, data = pair_rows(data, runs, len(TRAJECTORY_PANELS), (17, 4.4),
                                "no trajectory (analysis.trajectory off, or no trained runs)")
    colors, labels, dashes = group_colors(info, plots), run_labels(info), group_dashes(info)
    for pair, row in rows:
        own = data[data["pair"] == pair]
        for ax, column in zip(row, TRAJECTORY_PANELS, strict=True):
            draw_lines(ax, own[own["metric"] == column], "step", colors, labels,
                       metric_scale(column), dashes=dashes)
            step_axis(ax)
            ax.set_ylabel(axis_label(column))
            ax.set_title(pair if len(rows) > 1 else "")
        isotropic = ISOTROPIC_PROJECTION * 100
        reference = f"isotropic update ({percent(ISOTROPIC_PROJECTION)})"
        if row[2].get_ylim()[0] <= isotropic * 1.5:  # drawn where the data comes near it
            row[2].axhline(isotropic, ls=":", color="0.4", lw=1, label=reference)
        else:  # stated, not drawn: a line far below would squeeze the data flat
            row[2].text(0.02, 0.02, f"{reference}: below the axis", transform=row[2].transAxes,
                        fontsize="small", color="0.35")
        handles, names = row[0].get_legend_handles_labels()
        row[2].legend(*_with_reference(row[2], handles, names), fontsize="small",
                      loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Delta ΔW over training (line: mean over seeds, band: {DELTA_INTERVAL}; "
                 "dashed: OPD's controls)")
    return fig


def _with_reference(ax, handles, names):
    """A legend's run entries plus the reference lines drawn on `ax` itself."""
    own_handles, own_names = ax.get_legend_handles_labels()
    extra = [(h, n) for h, n in zip(own_handles, own_names, strict=True) if n not in names]
    return handles + [h for h, _ in extra], names + [n for _, n in extra]
