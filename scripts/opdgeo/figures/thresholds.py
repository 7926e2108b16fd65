"""Appendix: the sparsity of the final delta at every absolute and relative threshold."""

import matplotlib.pyplot as plt
import pandas as pd

from opdgeo.figures.bands import DELTA_INTERVAL, draw_lines
from opdgeo.figures.style import delta_runs, group_colors, group_dashes, log_axis, note, run_labels
from opdgeo.tidy import main_runs


def appendix_sparsity_thresholds(delta: pd.DataFrame, info: pd.DataFrame, plots: dict):
    """Sparsity at every absolute threshold eps and relative threshold tau * RMS(W_src)."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    runs = delta_runs(info)
    data = delta[delta["run"].isin(runs["run"])] if not delta.empty else delta
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    panels = (("sparsity_atol_", "absolute threshold ε on |ΔW|"),
              ("sparsity_rel_", "relative threshold τ (|ΔW| ≤ τ · RMS(W_src))"))
    colors, labels = group_colors(info, plots), run_labels(info)
    for ax, (prefix, xlabel) in zip(axes, panels, strict=True):
        rows = data[data["metric"].str.startswith(prefix)] if not data.empty else data
        if rows.empty:
            note(ax, f"no {prefix}* metrics")
            continue
        rows = rows.assign(threshold=rows["metric"].str.removeprefix(prefix).astype(float))
        rows = rows.merge(runs[["run", "series", "method_rank"]], on="run")
        rows = rows.sort_values(["method_rank", "series", "threshold"])
        draw_lines(ax, rows, "threshold", colors, labels, 100, dashes=group_dashes(info))
        log_axis(ax)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("coordinates at or below threshold (%)")
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 4),
                   fontsize="small")
    fig.suptitle(f"Sparsity of the final ΔW at every threshold (mean over seeds, {DELTA_INTERVAL})")
    return fig
