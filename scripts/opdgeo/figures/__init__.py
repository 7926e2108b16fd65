"""Every figure of the study, from tidy tables only (never checkpoints): a module per kind of
figure (overview, modules, interventions, delta_trajectory, adamw_state, thresholds,
matched_gain), drawn with the look of `style` and the intervals of `bands`.

`FIGURES` is the contract: figure -> (the function that draws it, the tidy tables it reads).
workflow/rules/figures.smk makes one rule per entry with those tables as inputs, and `render`
hands the function those tables only, in that order, then the run info (tidy.run_info) and
the plot settings (config["plots"], passed by the rule as JSON); the function returns the
matplotlib figure, which `render` saves to `out` (a path without suffix, one file per format
beside it). Inputs a config may lack (no masked runs, no SGD run, no AdamW state) give a panel
with a note instead of an error, so a small config still renders every figure.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from opdgeo.figures.adamw_state import optimizer_state  # noqa: E402
from opdgeo.figures.delta_trajectory import trajectory  # noqa: E402
from opdgeo.figures.interventions import fig3_interventions  # noqa: E402
from opdgeo.figures.matched_gain import gain_vs_sparsity  # noqa: E402
from opdgeo.figures.modules import appendix_module_metrics, fig2_layer_module  # noqa: E402
from opdgeo.figures.overview import fig1_overview  # noqa: E402
from opdgeo.figures.style import apply_style, settings  # noqa: E402
from opdgeo.figures.thresholds import appendix_sparsity_thresholds  # noqa: E402
from opdgeo.files import atomic  # noqa: E402

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
    """Draw figure `name` (a key of FIGURES) from the tables it declares, and no other, and
    save it."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    plots = settings(plots)
    apply_style(plots)
    function, reads = FIGURES[name]
    return save(function(*(tables[table] for table in reads), info, plots), out, plots)


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
