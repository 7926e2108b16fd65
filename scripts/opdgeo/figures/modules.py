"""Where in the model the update lands: layer x module heat maps of one run per modality
(Fig 2), and every panel metric of the registry per module type, one bar per run group
(appendix)."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from opdgeo.delta import columns
from opdgeo.delta.columns import RELATIVE_NORM, SPARSITY, axis_label, module_figure
from opdgeo.figures.bands import DELTA_INTERVAL, mean_band
from opdgeo.figures.style import delta_runs, group_colors, metric_scale, note, run_labels
from opdgeo.kinds import OPD, OWN, SELF_DISTILLATION
from opdgeo.tidy import main_runs

MODULE_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "norm")
ANNOTATE_MAX_CELLS = 200  # beyond this the numbers in the cells become unreadable


def fig2_runs(info: pd.DataFrame, plots: dict) -> list[str]:
    """plots.fig2_run, or the first OPD run of each modality (the primary run of the first
    language pair, and of the first vision-language pair, whose vision tower and projector
    get columns of their own), and likewise the first on-policy self-distillation run."""
    if plots.get("fig2_run"):
        return [plots["fig2_run"]]
    shown = info[info["method"].isin((OPD, SELF_DISTILLATION[OWN]))]
    return list(shown.groupby(["method", "modality"], sort=False)["run"].first())


FIG2_PANELS = ((SPARSITY, "viridis", ".0f"), (RELATIVE_NORM, "magma", ".2g"))  # colour map, format


def fig2_layer_module(layer_module: pd.DataFrame, info: pd.DataFrame, plots: dict):
    """Layer x module heat maps of sparsity and relative movement, one row per OPD run."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    runs = fig2_runs(info, plots) or [None]
    fig, axes = plt.subplots(len(runs), 2, figsize=(13, 5 * len(runs)), squeeze=False)
    for run, row_axes in zip(runs, axes, strict=True):
        rows = layer_module[layer_module["run"] == run] if not layer_module.empty \
            else layer_module
        if rows.empty:
            for ax in row_axes:
                note(ax, f"no layer x module table for run {run!r}")
            continue
        modules = [m for m in MODULE_ORDER if m in set(rows["module"])]
        modules += sorted(set(rows["module"]) - set(modules))
        for ax, (column, cmap, fmt) in zip(row_axes, FIG2_PANELS, strict=True):
            grid = rows.pivot_table(index="layer", columns="module", values=column)
            grid = grid.reindex(columns=modules) * metric_scale(column)
            annotate = grid.size <= ANNOTATE_MAX_CELLS
            title = axis_label(column)
            sns.heatmap(grid, ax=ax, cmap=cmap, annot=annotate, fmt=fmt,
                        annot_kws={"fontsize": "x-small"},
                        cbar_kws={"label": columns.metric(column).unit})
            ax.set_title(f"{run}: {title}" if len(runs) > 1 else title)
            ax.set_xlabel("module")
            ax.set_ylabel("layer")
    fig.suptitle("Where the update lands, by layer and module"
                 + (f": {runs[0]}" if len(runs) == 1 else ""))
    return fig


def appendix_module_metrics(modules: pd.DataFrame, info: pd.DataFrame, plots: dict):
    """Spectral and geometry metrics per module type, one bar per run group: the analysis's
    own per-module aggregation (modules.csv of each run)."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    runs = delta_runs(info)
    modules = modules[modules["run"].isin(runs["run"])] if not modules.empty else modules
    panels = module_figure()
    rows = math.ceil(len(panels) / 4)
    fig, axes = plt.subplots(rows, 4, figsize=(20, 4.25 * rows), squeeze=False)
    if modules.empty:
        for ax in axes.flat:
            note(ax, "no per-module analysis table")
        return fig
    table = modules.merge(runs[["run", "series", "label"]], on="run")
    modules = [m for m in MODULE_ORDER if m in set(table["module"])]
    modules += sorted(set(table["module"]) - set(modules))
    colors, labels = group_colors(info, plots), run_labels(info)
    groups = list(dict.fromkeys(runs["series"]))
    groups = [g for g in groups if g in set(table["series"])]
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(modules))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, panels, strict=False):
        if column not in table:
            note(ax, f"{column} not in modules.csv")
            continue
        for i, group in enumerate(groups):
            stats = mean_band(table[table["series"] == group], "module", column)
            stats = stats.set_index("module").reindex(modules) * metric_scale(column)
            ax.bar(x + (i - (len(groups) - 1) / 2) * width, stats["mean"], width,
                   yerr=[(stats["mean"] - stats["low"]).fillna(0),
                         (stats["high"] - stats["mean"]).fillna(0)],
                   color=colors[group], label=labels[group], capsize=2)
        ax.set_xticks(x, modules, rotation=45 if len(modules) > 8 else 0,
                      ha="right" if len(modules) > 8 else "center", rotation_mode="anchor")
        ax.set_ylabel(axis_label(column))
        ax.set_xlabel("module")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 5),
               fontsize="small")
    fig.suptitle(f"Per-module metrics of the final ΔW (bar: mean over seeds, whisker: "
                 f"{DELTA_INTERVAL})")
    return fig
