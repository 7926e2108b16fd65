"""Every figure of the study, from tidy tables only (never checkpoints).

`FIGURES` (at the end) is the contract: figure -> (the function that draws it, the tidy tables
it reads). workflow/rules/figures.smk makes one rule per entry with those tables as inputs, and
`render` hands the function those tables only, in that order, then the run info
(tidy.run_info), the plot settings (config["plots"], passed by the rule as JSON) and `out` (a
path without suffix, one file per format beside it). Inputs a config may lack (no masked runs,
no SGD run, no AdamW state) give a panel with a note instead of an error, so a small config
still renders every figure.
"""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from opdgeo.config import PAPER  # noqa: E402
from opdgeo.delta import columns  # noqa: E402
from opdgeo.delta.columns import (  # noqa: E402
    HEADLINE_RATIO,
    LOW_MAGNITUDE_COVERAGE,
    PRINCIPAL_COVERAGE,
    PRINCIPAL_PROJECTION,
    RELATIVE_NORM,
    SPARSITY,
    TOP16_ENERGY,
    axis_label,
    module_figure,
    summary_name,
)
from opdgeo.files import atomic  # noqa: E402
from opdgeo.intervals import gap, interval  # noqa: E402
from opdgeo.kinds import (  # noqa: E402
    CONTROLS,
    DELTA_KINDS,
    MASKED,
    METHOD_ORDER,
    OPD,
    OWN,
    SELF_DISTILLATION,
    TRAINED_METHODS,
)
from opdgeo.paper_tables import PAPER_ADAMW_STATE  # noqa: E402
from opdgeo.tidy import (  # noqa: E402
    OPTIMIZER_LABELS,
    curves,
    main_runs,
    mask_density,
    masked_arm,
    primary_opd_runs,
    score_metric,
    wide,
)

DEFAULTS = {"style": "whitegrid", "context": "paper", "dpi": 150, "formats": ["png", "pdf"],
            "fig2_run": "", "palette": "colorblind", "labels": {}, "metric": ""}
ISOTROPIC_PROJECTION = HEADLINE_RATIO**2  # the asymptotic isotropic baseline at the ratio


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def settings(plots: dict | None) -> dict:
    return {**DEFAULTS, **(plots or {})}


def apply_style(plots: dict):
    # font_scale 1.2 on top of the context: "paper" alone is too small in a browser report
    sns.set_theme(style=plots["style"], context=plots["context"], palette=plots["palette"],
                  font_scale=1.2)
    plt.rcParams.update({"figure.constrained_layout.use": True, "legend.frameon": False,
                         "savefig.bbox": "tight", "hatch.linewidth": 0.6})


def save(fig, out: Path, plots: dict) -> list[Path]:
    """One file per format (written beside, then renamed: no half-written figure)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in plots["formats"]:
        path = out.with_suffix("." + fmt)
        with atomic(path, "figures.save") as tmp:
            fig.savefig(tmp, format=fmt, dpi=plots["dpi"])
        paths.append(path)
    plt.close(fig)
    return paths


NOTE = "note"  # the group id of a note's text: tests tell a note from drawn data by it


def note(ax, text: str):
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True,
            fontsize="small", color="0.35", gid=NOTE)
    ax.set_xticks([])
    ax.set_yticks([])


def log_axis(ax, axis: str = "x"):
    """Log scale with plain-number labels at 1-2-5 (or decades over a wide range): matplotlib's
    default labels minor ticks too, and they collide on a narrow panel."""
    getattr(ax, f"set_{axis}scale")("log")
    low, high = getattr(ax, f"get_{axis}lim")()
    subs = (1.0,) if high / max(low, 1e-300) > 300 else (1.0, 2.0, 5.0)
    target = getattr(ax, f"{axis}axis")
    target.set_major_locator(mticker.LogLocator(subs=subs))
    target.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(mticker.NullFormatter())


def method_colors(plots: dict) -> dict[str, tuple]:
    """Method (opdgeo.kinds.METHOD_ORDER) -> its colour, the same in every figure: the
    palette's first colour for OPD, the study's subject, the next ones for the other methods
    in their display order."""
    order = (OPD, *(method for method in METHOD_ORDER if method != OPD))
    colors = dict(zip(order, sns.color_palette(plots["palette"], len(order)), strict=True))
    return {method: colors[method] for method in METHOD_ORDER}


def shades(color, n: int) -> list[tuple]:
    """`n` shades of one colour, the colour itself first, then lighter ones (the run groups
    of one method: the hue says the method, the shade and marker which group)."""
    return [tuple(c) for c in sns.light_palette(color, n + 2, reverse=True)[:n]]


def group_colors(info: pd.DataFrame, plots: dict) -> dict[str, tuple]:
    """Run group -> colour: its method's (method_colors), in shades where a method has
    several groups on one pair, so a method reads the same in every figure."""
    order = info.sort_values(["method_rank", "series"]).drop_duplicates("series")
    base = method_colors(plots)
    colors = {}
    for (_, method), groups in order.groupby(["pair", "method"], sort=False, dropna=False):
        colors |= dict(zip(groups["series"], shades(base.get(method, (0.5, 0.5, 0.5)),
                                                    len(groups)), strict=True))
    return colors


def group_dashes(info: pd.DataFrame) -> dict[str, str]:
    """Run group -> line style: the controls of OPD (opdgeo.kinds) dashed, the rest solid."""
    control = info["method"].isin(CONTROLS)
    return dict(zip(info["series"], np.where(control, "--", "-"), strict=False))


def _labels(info: pd.DataFrame) -> dict[str, str]:
    return dict(zip(info["series"], info["label"], strict=False))


INTERVAL = "95% interval over seeds (one seed: over prompts)"
# A delta measure of one seed has no interval in a figure (tables give it over matrices).
DELTA_INTERVAL = "95% interval over seeds (none with one seed)"


def mean_band(frame: pd.DataFrame, x: str, y: str = "value") -> pd.DataFrame:
    """Mean and 95% interval (intervals.interval: over seeds, or one seed's over prompts) at
    each x."""
    rows = [(at, *interval(group, y)) for at, group in frame.groupby(x, sort=True)]
    return pd.DataFrame(rows, columns=[x, "mean", "low", "high"])


def error_bars(estimate: tuple[float, float, float], scale: float = 1.0):
    """matplotlib's asymmetric [[below], [above]] for (mean, low, high); None without one."""
    mean, low, high = estimate
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    return [[(mean - low) * scale], [(high - mean) * scale]]


HATCHES = ("", "////", "\\\\\\\\", "xxx", "...", "|||", "---", "+++")


def draw_lines(ax, data: pd.DataFrame, x: str, colors: dict, labels: dict, scale: float = 1.0,
               key: str = "series", dashes: dict | None = None):
    """One line per `key` value: mean over seeds with its 95% interval as a band. Markers
    differ too, so shades of one colour stay apart; `dashes` gives a group its line style.
    The first band is filled, each further one hatched in its colour over a faint fill, so
    overlapping bands stay apart instead of mixing into one colour."""
    dashes, bands = dashes or {}, 0
    for i, (group, frame) in enumerate(data.groupby(key, sort=False, observed=True)):
        stats = mean_band(frame, x)
        color = colors.get(group, (0.4, 0.4, 0.4))
        ax.plot(stats[x], stats["mean"] * scale, marker=MARKERS[i % len(MARKERS)], ms=5,
                color=color, ls=dashes.get(group, "-"), label=labels.get(group, group))
        if stats["low"].notna().any():
            hatch = HATCHES[1 + (bands - 1) % (len(HATCHES) - 1)] if bands else ""
            bands += 1
            ax.fill_between(stats[x], stats["low"] * scale, stats["high"] * scale,
                            facecolor=(*color[:3], 0.22 if not hatch else 0.06),
                            edgecolor=(*color[:3], 0.45), hatch=hatch or None, lw=0)


def metric_scale(column: str) -> float:
    return columns.metric(column).scale


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _delta_runs(info: pd.DataFrame) -> pd.DataFrame:
    return info[info["kind"].isin(DELTA_KINDS)].sort_values(["method_rank", "series"])


# ------------------------------------------------------------------------------ Fig 1

FIG1_PANELS = ((RELATIVE_NORM, True), (SPARSITY, False), (summary_name(TOP16_ENERGY), False))


def fig1_overview(delta: pd.DataFrame, info: pd.DataFrame, plots: dict, out: Path):
    """Offline distillation vs RLVR vs OPD: scale, sparsity, spectrum, mask coverage."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    runs = _delta_runs(info)
    values = wide(delta)
    runs = runs[runs["run"].isin(values.index)]
    groups = list(dict.fromkeys(runs["series"]))
    fig, axes = plt.subplots(1, 4, figsize=(17, 1.6 + 0.55 * max(len(groups), 2)),
                             sharey=True)
    if not groups:
        for ax in axes:
            note(ax, "no analysed runs")
        return save(fig, out, plots)
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
    axes[0].set_yticklabels([f"{_labels(runs)[g]}\n({method_of[g]})" for g in groups])
    for tick, group in zip(axes[0].get_yticklabels(), groups, strict=True):
        tick.set_color(colors[group])
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="y", visible=False)
    fig.suptitle("Final delta ΔW = W_trained − W_source per run "
                 f"(marker: mean over seeds; bar: {DELTA_INTERVAL})")
    return save(fig, out, plots)


# ------------------------------------------------------------------------------ Fig 2

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


def fig2_layer_module(layer_module: pd.DataFrame, info: pd.DataFrame, plots: dict, out: Path):
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
    return save(fig, out, plots)


# ------------------------------------------------------------------------------ Fig 3

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


def step_axis(ax):
    """Training steps are integers: no 2.5-step ticks."""
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))


def _score_axis(ax, metric: str):
    step_axis(ax)
    ax.set_ylabel(f"held-out {metric} (%)")


def fig3_interventions(evaluation: pd.DataFrame, masks: pd.DataFrame, info: pd.DataFrame,
                       plots: dict, out: Path):
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
        return save(fig, out, plots)
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
    return save(fig, out, plots)


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


# ------------------------------------------------------------------------- trajectory

TRAJECTORY_PANELS = (SPARSITY, summary_name(TOP16_ENERGY), summary_name(PRINCIPAL_PROJECTION))


def trajectory(traj: pd.DataFrame, info: pd.DataFrame, plots: dict, out: Path):
    """Sparsity, top-16 spectral energy and principal projection of ΔW over training steps
    (what a trajectory checkpoint measures: opdgeo.delta.analyze.TRAJECTORY_NOTE), one row
    of panels per pair: its own steps, each axis fitted to its data."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    runs = info[info["kind"].isin(TRAINED_METHODS)]
    data = traj[traj["run"].isin(runs["run"])] if not traj.empty else traj
    pairs = list(dict.fromkeys(runs.loc[runs["run"].isin(data["run"]), "pair"])) \
        if not data.empty else []
    fig, axes = plt.subplots(max(len(pairs), 1), 3, figsize=(17, 4.4 * max(len(pairs), 1)),
                             squeeze=False)
    if data.empty:
        for ax in axes.flat:
            note(ax, "no trajectory (analysis.trajectory off, or no trained runs)")
        return save(fig, out, plots)
    data = data.merge(runs[["run", "series", "pair", "method_rank"]], on="run")
    data = data.sort_values(["method_rank", "series", "step"])
    colors, labels, dashes = group_colors(info, plots), _labels(info), group_dashes(info)
    for row, pair in zip(axes, pairs, strict=True):
        own = data[data["pair"] == pair]
        for ax, column in zip(row, TRAJECTORY_PANELS, strict=True):
            draw_lines(ax, own[own["metric"] == column], "step", colors, labels,
                       metric_scale(column), dashes=dashes)
            step_axis(ax)
            ax.set_ylabel(axis_label(column))
            ax.set_title(pair if len(pairs) > 1 else "")
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
    return save(fig, out, plots)


def _with_reference(ax, handles, names):
    """A legend's run entries plus the reference lines drawn on `ax` itself."""
    own_handles, own_names = ax.get_legend_handles_labels()
    extra = [(h, n) for h, n in zip(own_handles, own_names, strict=True) if n not in names]
    return handles + [h for h, _ in extra], names + [n for _, n in extra]


# -------------------------------------------------------------------- optimizer state

# The first-moment cosine at each lag the callback logs (opdgeo.callbacks.OptimizerStateCallback)
M1_LAGS = (("m1_cosine", "cos(m_t, m_t-1): the step before"),
           ("m1_cosine_interval", "cos(m_t, m_t-every): the logged step before"),
           ("m1_cosine_first", "cos(m_t, m_first): the first logged step"))


def optimizer_state(state: pd.DataFrame, info: pd.DataFrame, plots: dict, out: Path):
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
        return save(fig, out, plots)
    data = data.merge(info[["run", "series", "method_rank"]], on="run")
    data = data.sort_values(["method_rank", "series", "step"])
    colors, labels = group_colors(info, plots), _labels(info)
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
    return save(fig, out, plots)


# --------------------------------------------------------------------------- appendix

def appendix_sparsity_thresholds(delta: pd.DataFrame, info: pd.DataFrame, plots: dict,
                                 out: Path):
    """Sparsity at every absolute threshold eps and relative threshold tau * RMS(W_src)."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    runs = _delta_runs(info)
    data = delta[delta["run"].isin(runs["run"])] if not delta.empty else delta
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    panels = (("sparsity_atol_", "absolute threshold ε on |ΔW|"),
              ("sparsity_rel_", "relative threshold τ (|ΔW| ≤ τ · RMS(W_src))"))
    colors, labels = group_colors(info, plots), _labels(info)
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
    return save(fig, out, plots)




def appendix_module_metrics(modules: pd.DataFrame, info: pd.DataFrame, plots: dict,
                            out: Path):
    """Spectral and geometry metrics per module type, one bar per run group: the analysis's
    own per-module aggregation (modules.csv of each run)."""
    info = main_runs(info)  # the sweep grid appears in its own figure only
    runs = _delta_runs(info)
    modules = modules[modules["run"].isin(runs["run"])] if not modules.empty else modules
    panels = module_figure()
    rows = math.ceil(len(panels) / 4)
    fig, axes = plt.subplots(rows, 4, figsize=(20, 4.25 * rows), squeeze=False)
    if modules.empty:
        for ax in axes.flat:
            note(ax, "no per-module analysis table")
        return save(fig, out, plots)
    table = modules.merge(runs[["run", "series", "label"]], on="run")
    modules = [m for m in MODULE_ORDER if m in set(table["module"])]
    modules += sorted(set(table["module"]) - set(modules))
    colors, labels = group_colors(info, plots), _labels(info)
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
    return save(fig, out, plots)


# ------------------------------------------------------------------ matched-gain sweep

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
                     plots: dict, out: Path):
    """At equal gain, does OPD move fewer coordinates? One curve per method over the
    learning-rate x steps grid."""
    metric = score_metric(evaluation, plots.get("metric", ""))
    points = matched_gain_points(evaluation, delta, info, metric)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    if points.empty or not info["sweep"].any():
        for ax in axes:
            note(ax, "no matched-gain sweep in this config (pairs.<pair>.sweep)")
        return save(fig, out, plots)
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
    return save(fig, out, plots)


# The figure contract: figure -> (function, tidy tables it reads besides runs.csv, in the
# order the function takes them). Every renderer also gets the run info, sweep runs included.
FIGURES = {
    "fig1_overview": (fig1_overview, ("delta_global",)),
    "fig2_layer_module": (fig2_layer_module, ("layer_module",)),
    "fig3_interventions": (fig3_interventions, ("evaluation", "masks")),
    "trajectory": (trajectory, ("trajectory",)),
    "optimizer_state": (optimizer_state, ("optimizer_state",)),
    "appendix_sparsity_thresholds": (appendix_sparsity_thresholds, ("delta_global",)),
    "appendix_module_metrics": (appendix_module_metrics, ("modules",)),
    "gain_vs_sparsity": (gain_vs_sparsity, ("evaluation", "delta_global")),
}


def render(name: str, tables: dict[str, pd.DataFrame], info: pd.DataFrame, plots: dict,
           out: Path) -> list[Path]:
    """Draw figure `name` (a key of FIGURES) from the tables it declares, and no other."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    plots = settings(plots)
    apply_style(plots)
    function, reads = FIGURES[name]
    return function(*(tables[table] for table in reads), info, plots, out)
