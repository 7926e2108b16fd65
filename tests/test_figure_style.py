"""Figures read at a glance: a colour per method (opdgeo.kinds) in every figure, OPD's controls
dashed, overlapping bands hatched apart, the masked arms as small multiples, one trajectory
row and one AdamW state row per pair with its own axes."""

import matplotlib.colors as mcolors
import pandas as pd
import pytest
import tidy_fixtures as tf

from opdgeo import figures
from opdgeo.figures import adamw_state, bands, delta_trajectory, interventions, style
from opdgeo.kinds import CONTROLS, METHOD_ORDER, OPD
from opdgeo.tidy import main_runs, run_info

PLOTS = style.settings({"formats": ["png"], "dpi": 40})


@pytest.fixture(scope="module")
def full():
    return tf.tables(tf.config(seeds=(0, 1), external=True, sweep=True, vision=True))


def drawn(monkeypatch, name, tables, info, tmp_path):
    """The figure `name` as drawn (its Figure, before it is saved and closed)."""
    kept = {}
    save = figures.save

    def keep(fig, out, plots):
        kept["fig"] = fig
        return save(fig, out, {**plots, "formats": ["png"]})

    monkeypatch.setattr(figures, "save", keep)
    figures.render(name, tables, info, PLOTS, tmp_path / name)
    return kept["fig"]


def rgb(color) -> tuple:
    return tuple(round(c, 6) for c in mcolors.to_rgb(color))


def test_each_method_has_one_colour_whatever_the_runs(full):
    colors = style.method_colors(PLOTS)
    assert list(colors) == list(METHOD_ORDER) and len(set(colors.values())) == len(colors)
    few = main_runs(run_info(tf.tables(tf.config(optimizers=("adamw",), arms=()))["runs"], {}))
    many = main_runs(run_info(full["runs"], {"ext-opd": "opd"}))
    for info in (few, many):
        groups = style.group_colors(info, PLOTS)
        for (pair, method), rows in info.groupby(["pair", "method"]):
            first = rows.sort_values("series")["series"].iloc[0]
            # the first group of a method on a pair has the method's colour, the others its
            # shades: the same hue however many runs precede it in the figure
            assert rgb(groups[first]) == rgb(colors[method]), (pair, method)
    dashes = style.group_dashes(many)
    assert {dashes[s] for s in many.loc[many["method"].isin(CONTROLS), "series"]} == {"--"}
    assert {dashes[s] for s in many.loc[many["method"] == OPD, "series"]} == {"-"}


def test_fig1_draws_every_run_group_in_its_methods_colour(full, monkeypatch, tmp_path):
    info = run_info(full["runs"], {"ext-opd": "opd"})
    fig = drawn(monkeypatch, "fig1_overview", full, info, tmp_path)
    colors = {rgb(c) for c in style.method_colors(PLOTS).values()}
    used = {rgb(line.get_color()) for line in fig.axes[0].lines}
    assert used <= colors and len(used) == info["method"].nunique() - ("masked" in
                                                                          set(info["method"]))


def test_bands_after_the_first_are_hatched(full):
    import matplotlib.pyplot as plt

    info = main_runs(run_info(full["runs"], {}))
    data = full["trajectory"].merge(info[["run", "series"]], on="run")
    data = data[data["metric"] == delta_trajectory.TRAJECTORY_PANELS[0]]
    fig, ax = plt.subplots()
    bands.draw_lines(ax, data, "step", style.group_colors(info, PLOTS), {})
    hatches = [band.get_hatch() for band in ax.collections]
    plt.close(fig)
    assert len(hatches) >= 3 and hatches[0] is None and all(hatches[1:])
    assert len(set(hatches[1:len(bands.HATCHES)])) == len(hatches[1:len(bands.HATCHES)])
    assert None not in hatches[1:]


def test_fig3_has_a_panel_per_mask_arm_each_with_full_opd(full, monkeypatch, tmp_path):
    info = run_info(full["runs"], {})
    fig = drawn(monkeypatch, "fig3_interventions", full, info, tmp_path)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_legend()]
    masked = [ax for ax in panels if "masked" in ax.get_title()]
    assert len(masked) == sum(len(interventions._arms(rows)) for _, rows in
                              main_runs(info).query("kind == 'masked'").groupby("pair"))
    for ax in masked:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[0] == "full OPD (no mask)" and len(labels) == 2
        assert len(ax.collections) <= 2  # two bands a panel at most


def test_trajectory_has_a_row_per_pair_fitted_to_its_data(full, monkeypatch, tmp_path):
    info = run_info(full["runs"], {})
    fig = drawn(monkeypatch, "trajectory", full, info, tmp_path)
    pairs = main_runs(info)["pair"].dropna().nunique()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3 * pairs
    traj = full["trajectory"]
    sparsity = traj.loc[traj["metric"] == delta_trajectory.TRAJECTORY_PANELS[0], "value"] * 100
    low, high = axes[0].get_ylim()
    assert low > 0 and low <= sparsity.min() and high >= 0.9 * sparsity.max() and high < 100
    legends = [ax.get_legend() for ax in axes if ax.get_legend()]
    assert len(legends) == pairs  # one per pair, naming that pair's runs only
    for legend, pair in zip(legends, main_runs(info)["pair"].dropna().unique(), strict=True):
        assert all(t.get_text().startswith(pair) or "isotropic" in t.get_text()
                   for t in legend.get_texts())


def test_optimizer_state_has_a_row_per_pair_naming_its_own_runs(full, monkeypatch, tmp_path):
    info = run_info(full["runs"], {})
    fig = drawn(monkeypatch, "optimizer_state", full, info, tmp_path)
    state = full["optimizer_state"].merge(main_runs(info)[["run", "pair", "series", "label"]],
                                          on="run")
    pairs = list(dict.fromkeys(state["pair"]))
    assert len(pairs) == 2  # both pairs trained with AdamW: one busy panel would mix them
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == (len(adamw_state.M1_LAGS) + 1) * len(pairs)
    legends = [ax.get_legend() for ax in axes if ax.get_legend()]
    assert len(legends) == len(pairs) and not fig.legends
    for legend, pair in zip(legends, pairs, strict=True):
        runs = [t.get_text() for t in legend.get_texts() if not t.get_text().startswith("paper")]
        assert sorted(runs) == sorted(state.loc[state["pair"] == pair, "label"].unique())
    for row, pair in zip(range(len(pairs)), pairs, strict=True):
        steps = state.loc[state["pair"] == pair, "step"]
        panels = len(adamw_state.M1_LAGS) + 1
        for ax in axes[row * panels:(row + 1) * panels]:
            assert ax.get_title().startswith(pair)
            drawn_steps = {x for line in ax.lines if not line.get_label().startswith("paper")
                           for x in line.get_xdata()}
            assert drawn_steps and drawn_steps <= set(steps)


def test_figure_colours_come_from_the_plot_palette():
    other = style.settings({"palette": "deep"})
    assert style.method_colors(other) != style.method_colors(PLOTS)
    assert pd.Series(list(style.method_colors(other))).tolist() == list(METHOD_ORDER)
