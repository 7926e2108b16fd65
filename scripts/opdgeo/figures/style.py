"""How a figure looks: the plot settings, a colour per method and its shades per run group,
line styles and markers, labels, axes (log, steps), and the note of an empty panel."""

import matplotlib

# Files only, no display on cluster nodes: set here, as every drawing module imports this one.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from opdgeo.delta import columns  # noqa: E402
from opdgeo.kinds import CONTROLS, DELTA_KINDS, METHOD_ORDER, OPD  # noqa: E402

DEFAULTS = {"style": "whitegrid", "context": "paper", "dpi": 150, "formats": ["png", "pdf"],
            "fig2_run": "", "palette": "colorblind", "labels": {}, "metric": ""}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def settings(plots: dict | None) -> dict:
    return {**DEFAULTS, **(plots or {})}


def apply_style(plots: dict):
    # font_scale 1.2 on top of the context: "paper" alone is too small in a browser report
    sns.set_theme(style=plots["style"], context=plots["context"], palette=plots["palette"],
                  font_scale=1.2)
    plt.rcParams.update({"figure.constrained_layout.use": True, "legend.frameon": False,
                         "savefig.bbox": "tight", "hatch.linewidth": 0.6})


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


def step_axis(ax):
    """Training steps are integers: no 2.5-step ticks."""
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))


def pair_rows(data: pd.DataFrame, runs: pd.DataFrame, panels: int, size: tuple[float, float],
              empty: str):
    """A figure with one row of `panels` panels per pair that has data (in the runs' order),
    each row `size` (width, height) inches: (figure, [(pair, its row of axes)], `data` with
    each run's series, pair and display rank, in display order). Without data, every panel is
    a note saying `empty`."""
    pairs = list(dict.fromkeys(runs.loc[runs["run"].isin(data["run"]), "pair"])) \
        if not data.empty else []
    width, height = size
    fig, axes = plt.subplots(max(len(pairs), 1), panels,
                             figsize=(width, height * max(len(pairs), 1)), squeeze=False)
    if not pairs:
        for ax in axes.flat:
            note(ax, empty)
        return fig, [], data
    data = data.merge(runs[["run", "series", "pair", "method_rank"]], on="run")
    return fig, list(zip(pairs, axes, strict=False)), \
        data.sort_values(["method_rank", "series", "step"])


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


def run_labels(info: pd.DataFrame) -> dict[str, str]:
    return dict(zip(info["series"], info["label"], strict=False))


def metric_scale(column: str) -> float:
    return columns.metric(column).scale


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def delta_runs(info: pd.DataFrame) -> pd.DataFrame:
    return info[info["kind"].isin(DELTA_KINDS)].sort_values(["method_rank", "series"])
