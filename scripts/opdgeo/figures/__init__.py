"""Every figure of the study, from tidy tables only (never checkpoints): a module per kind of
figure (overview, modules, interventions, delta_trajectory, adamw_state, thresholds,
matched_gain), drawn with the look of `style` and the intervals of `bands`.

`FIGURES` is the contract: figure -> (where the function that draws it lives, the tidy tables
it reads). workflow/rules/figures.smk makes one rule per entry with those tables as inputs, and
`render` hands the function those tables only, in that order, then the run info
(tidy.run_info) and the plot settings (config["plots"], passed by the rule as JSON); the
function returns the matplotlib figure, which `render` saves to `out` (a path without suffix,
one file per format beside it). Inputs a config may lack (no masked runs, no SGD run, no AdamW
state) give a panel with a note instead of an error, so a small config still renders every
figure.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

from opdgeo.files import atomic

if TYPE_CHECKING:
    import pandas as pd

# The figure contract: figure -> ("module:function" that draws it, tidy tables it reads
# besides runs.csv, in the order the function takes them). Every renderer also gets the run
# info, sweep runs included. The drawing functions are named, not imported: the workflow reads
# this table on every Snakemake start (every cluster job's too), and the modules that draw
# import matplotlib, seaborn and scipy, most of the parse's CPU. opdgeo.codehash follows the
# names as imports, so an edit to a drawing module still reruns the figures.
FIGURES = {
    "fig1_overview": ("opdgeo.figures.overview:fig1_overview", ("delta_global",)),
    "fig2_layer_module": ("opdgeo.figures.modules:fig2_layer_module", ("layer_module",)),
    "fig3_interventions": ("opdgeo.figures.interventions:fig3_interventions",
                           ("evaluation", "masks")),
    "trajectory": ("opdgeo.figures.delta_trajectory:trajectory", ("trajectory",)),
    "optimizer_state": ("opdgeo.figures.adamw_state:optimizer_state", ("optimizer_state",)),
    "appendix_sparsity_thresholds": ("opdgeo.figures.thresholds:appendix_sparsity_thresholds",
                                     ("delta_global",)),
    "appendix_module_metrics": ("opdgeo.figures.modules:appendix_module_metrics",
                                ("modules",)),
    "gain_vs_sparsity": ("opdgeo.figures.matched_gain:gain_vs_sparsity",
                         ("evaluation", "delta_global")),
}


def drawing(name: str):
    """The function that draws figure `name` (a key of FIGURES), imported now."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    module, function = FIGURES[name][0].split(":")
    return getattr(import_module(module), function)


def drawing_modules() -> list[str]:
    """The modules the drawing functions live in (the preload server imports them once)."""
    return sorted({reference.split(":")[0] for reference, _ in FIGURES.values()})


def render(name: str, tables: dict[str, pd.DataFrame], info: pd.DataFrame, plots: dict,
           out: Path) -> list[Path]:
    """Draw figure `name` (a key of FIGURES) from the tables it declares, and no other, and
    save it."""
    from opdgeo.figures.style import apply_style, settings

    function = drawing(name)
    plots = settings(plots)
    apply_style(plots)
    return save(function(*(tables[table] for table in FIGURES[name][1]), info, plots), out,
                plots)


def save(fig, out: Path, plots: dict) -> list[Path]:
    """One file per format (written beside, then renamed: no half-written figure)."""
    import matplotlib.pyplot as plt

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
