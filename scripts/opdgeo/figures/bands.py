"""Means over seeds and their 95% intervals, drawn: lines with bands, error bars."""

import numpy as np
import pandas as pd

from opdgeo.figures.style import MARKERS
from opdgeo.intervals import interval

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
