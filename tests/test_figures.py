"""Figures and paper tables from small synthetic tidy tables (no DAG, no checkpoints)."""

import pandas as pd
import pytest
import tidy_fixtures as tf

from opdgeo import figures, paper_tables
from opdgeo.cli import main
from opdgeo.figures import interventions, matched_gain, modules, style
from opdgeo.stats import seed_interval
from opdgeo.tidy import TABLES, curve_stats, load_tables, main_runs, run_info

PLOTS = {"formats": ["png", "pdf"], "dpi": 50}


def info_of(frames, external=None):
    return run_info(frames["runs"], external or {})


@pytest.fixture
def drawn(monkeypatch):
    """The figures `figures.save` is handed (then saved as usual), in order."""
    figs, save = [], figures.save

    def keep(fig, out, plots):
        figs.append(fig)
        return save(fig, out, plots)

    monkeypatch.setattr(figures, "save", keep)
    return figs


def empty_panels(fig) -> list[str]:
    """The visible panels that show no data: a note, or nothing drawn in data coordinates
    (reference lines such as axhline sit in axes coordinates; colour bars are not panels)."""
    empty = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or ax.get_label() == "<colorbar>":
            continue
        notes = [text for text in ax.texts if text.get_gid() == style.NOTE]
        data = [*ax.patches, *ax.collections, *ax.images,
                *(line for line in ax.lines if line.get_transform() == ax.transData)]
        if notes or not data:
            empty.append(f"panel {i} ({ax.get_title() or ax.get_ylabel() or ax.get_xlabel()}): "
                         + (notes[0].get_text() if notes else "nothing drawn"))
    return empty


@pytest.fixture(scope="module")
def full():
    """Two seeds, both optimizers, masked arms, an external OPD run, a sweep grid, and a
    vision-language pair beside the language one."""
    return tf.tables(tf.config(seeds=(0, 1), external=True, sweep=True, vision=True))


@pytest.mark.parametrize("name", figures.FIGURES)
def test_every_figure_renders_from_the_tables_it_declares(full, tmp_path, name, drawn):
    """The contract figures.smk builds its rules' inputs from: handed only its declared
    tables, a renderer draws data in every panel (none is empty or a note)."""
    reads = figures.FIGURES[name][1]
    assert set(reads) <= set(TABLES)
    # every format once (Fig 1), PNG only for the others: PDF output is slow to write
    plots = PLOTS if name == "fig1_overview" else {**PLOTS, "formats": ["png"]}
    declared = {table: full[table] for table in reads}
    paths = figures.render(name, declared, info_of(full, {"ext-opd": "opd"}), plots,
                           tmp_path / name)
    assert [p.suffix for p in paths] == ["." + fmt for fmt in plots["formats"]]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert len(drawn) == 1 and empty_panels(drawn[0]) == []


def test_missing_optional_inputs_render_with_notes(tmp_path, drawn):
    """No SGD run, no masked runs, no external runs, no sweep, no AdamW state, no trajectory,
    no per-layer tables: every figure still renders (a panel says what is missing), and the
    panels left without data are the ones the empty check finds."""
    frames = tf.tables(tf.config(optimizers=("adamw",), arms=()))
    for name in ("optimizer_state", "trajectory", "layer_module", "modules", "tensors"):
        frames[name] = pd.DataFrame()
    empty = {}
    for name in figures.FIGURES:
        paths = figures.render(name, frames, info_of(frames), {"formats": ["png"], "dpi": 40},
                               tmp_path / name)
        assert paths[0].exists(), name
        empty[name] = empty_panels(drawn[-1])
    assert {name for name, panels in empty.items() if panels} == {
        "fig2_layer_module", "fig3_interventions", "trajectory", "optimizer_state",
        "appendix_module_metrics", "gain_vs_sparsity"}, empty
    # Fig 3: the masked-retraining panel only; its optimizer panel has the AdamW run
    [masked] = empty["fig3_interventions"]
    assert "subnetwork-masked retraining" in masked and "no masked runs" in masked


def test_only_runs_table_renders_everything(tmp_path, drawn):
    """With no data at all every figure still renders, each panel a note: the check the
    figures pass above finds every one of them empty."""
    frames = {name: pd.DataFrame() for name in tf.tables()}
    frames["runs"] = tf.tables()["runs"]
    info = info_of(frames)
    for name in figures.FIGURES:
        assert figures.render(name, frames, info, {"formats": ["png"], "dpi": 40},
                              tmp_path / name)[0].exists()
        visible = [ax for ax in drawn[-1].axes if ax.get_visible()]
        assert len(empty_panels(drawn[-1])) == len(visible) > 0, name
    built = paper_tables.build_tables(frames, info, {})
    assert set(built) == set(paper_tables.TABLE_NAMES)


def test_late_average_is_the_mean_of_the_last_quarter():
    # 8 evaluations after the source score: the last quarter is the last 2
    values = [0.10, 0.20, 0.30, 0.50, 0.40, 0.60, 0.55, 0.45]
    curve = pd.DataFrame({"step": [0] + [10 * (i + 1) for i in range(8)],
                          "value": [0.9] + values})  # the source (step 0) is not an evaluation
    stats = curve_stats(curve)
    assert stats["late_average"] == pytest.approx((0.55 + 0.45) / 2)
    assert stats["peak"] == pytest.approx(0.60)
    assert stats["final"] == pytest.approx(0.45)
    # 5 evaluations: ceil(5 / 4) = 2 last ones
    assert curve_stats(curve.iloc[:6])["late_average"] == pytest.approx((0.40 + 0.50) / 2)


def test_interventions_table_is_computed_from_the_curves():
    frames = tf.tables(tf.config(optimizers=("adamw",), arms=("opd",)))
    run, full = "addition-masked-opd-s0", "addition-opd-teacher-a-adamw-s0"
    curve = {10: 0.30, 20: 0.50, 30: 0.40, 40: 0.44}
    evaluation = frames["evaluation"]
    evaluation = evaluation[~evaluation["run"].isin([run])]
    evaluation = pd.concat([evaluation, pd.DataFrame(
        [(run, s, "mean@2", v) for s, v in curve.items()], columns=evaluation.columns)])
    masks = pd.DataFrame([(frames["runs"].set_index("run").loc[run, "mask"], "all", "all",
                           0.175)], columns=["mask", "tensor", "block", "density"])
    info = info_of(frames)
    rows = paper_tables.intervention_rows(info, evaluation, masks, "mean@2")
    table = paper_tables.interventions_table(rows).set_index("arm")
    assert table.loc["opd", "late average %"] == pytest.approx(44.0)  # last quarter: step 40
    assert table.loc["opd", "peak %"] == pytest.approx(50.0)
    assert table.loc["opd", "mask density %"] == pytest.approx(17.5)
    assert table.loc["opd", "source %"] == pytest.approx(18.0)  # the student's mean@2
    assert table.loc["opd", "paper: peak %"] == pytest.approx(35.10)
    assert "full" in table.index and rows.set_index("arm").loc["full", "run"] == full
    assert "optimizer ablation" not in set(table["experiment"])  # one optimizer only


def test_global_delta_table_puts_the_paper_beside_matching_runs(full):
    info = main_runs(info_of(full, {"ext-opd": "opd"}))
    match = paper_tables.paper_match(info)
    table = paper_tables.global_delta_table(info, full["delta_global"], full["tensors"],
                                            match).set_index("series")
    delta = full["delta_global"].set_index(["run", "metric"])["value"]
    primary = "addition-opd-teacher-a-adamw"
    norms = [100 * delta[(f"{primary}-s{seed}", "relative_norm")] for seed in (0, 1)]
    row = table.loc[primary]
    assert row["seeds"] == 2 and row["interval"] == "seeds"
    assert row["rel. norm %"] == pytest.approx(sum(norms) / 2)
    assert (row["rel. norm % 95% low"], row["rel. norm % 95% high"]) == pytest.approx(
        seed_interval(norms)[1:])
    assert row["paper run"] == "DS-Qwen OPD"
    assert row["paper: sparsity@1e-5 %"] == pytest.approx(82.58)
    for key, label in (("low_magnitude_coverage_10pct", "low-mag cov. 10% %"),
                       ("low_magnitude_coverage_10pct_median",
                        "low-mag cov. 10%, median over matrices %")):
        seeds = [100 * delta[(f"{primary}-s{seed}", key)] for seed in (0, 1)]
        assert row[label] == pytest.approx(sum(seeds) / 2)
    assert table.loc["addition-opd-teacher-b-adamw", "paper run"] == \
        "DS-Qwen OPD (JustRL teacher)"
    assert table.loc["addition-sft-adamw", "paper run"] == "Qwen-Math offline distill"
    assert table.loc["addition-opd-teacher-a-sgd", "paper run"] == ""  # no paper row
    assert table.loc["ext-opd", "paper run"] == "DS-Qwen OPD"
    assert not any(r.startswith("addition-sweep") for r in table.index)
    override = paper_tables.paper_match(info, {"addition-opd-teacher-a-adamw": ""})
    assert f"{primary}-s0" not in override


def test_a_one_seed_group_gets_the_bootstrap_over_its_matrices(full):
    """The external run has one seed: its interval is over its matrices, recomputed from its
    per-tensor rows (here every tensor has the same relative norm but one)."""
    tensors = full["tensors"].copy()
    external = tensors["run"] == "ext-opd"
    tensors.loc[external, "delta_energy"] = 1e-6
    query = tensors["name"].eq("model.layers.0.self_attn.q_proj.weight")
    tensors.loc[external & query, "delta_energy"] = 4e-6
    info = main_runs(info_of(full, {"ext-opd": "opd"}))
    energy = tensors[external][["delta_energy", "source_energy"]].sum()
    delta = full["delta_global"].copy()
    delta.loc[(delta["run"] == "ext-opd") & (delta["metric"] == "relative_norm"), "value"] = (
        energy["delta_energy"] / energy["source_energy"]) ** 0.5
    row = paper_tables.global_delta_table(info, delta, tensors, {}).set_index("series").loc[
        "ext-opd"]
    assert row["seeds"] == 1 and row["interval"] == "matrices (one seed)"
    # a resample's norm lies between all-even tensors (0.1%) and all on the one moved more
    assert 0.1 <= row["rel. norm % 95% low"] < row["rel. norm %"] < row["rel. norm % 95% high"]
    assert row["rel. norm % 95% high"] <= 0.2


def test_paper_rounding_null_table_from_the_papers_numbers(tmp_path):
    main(["paper-null", "--std", "0.02", "0.01", "--out", str(tmp_path)])
    for fmt in ("csv", "md", "tex"):
        assert (tmp_path / f"{paper_tables.PAPER_NULL_TABLE}.{fmt}").stat().st_size > 0
    table = pd.read_csv(tmp_path / f"{paper_tables.PAPER_NULL_TABLE}.csv")
    assert len(table) == 2 * len(paper_tables.PAPER_GLOBAL)
    row = table.set_index(["paper run", "weight std"]).loc[("DS-Qwen OPD", 0.02)]
    assert row["reported sparsity %"] == 82.58 and row["reported low-mag cov. %"] == 38.04
    assert row["null low-mag cov. %"] == pytest.approx(33.2, abs=0.5)  # probe on sampled weights
    assert row["reported - null (pt)"] == pytest.approx(38.04 - row["null low-mag cov. %"])
    # shapes from the architectures: the parameter counts the model cards give
    parameters = table.groupby("source model")["parameters"].first()
    assert parameters["Qwen3-4B"] == pytest.approx(4.02e9, rel=0.01)
    assert parameters["Qwen2.5-VL-3B-Instruct"] == pytest.approx(3.75e9, rel=0.01)
    assert parameters["Qwen2.5-Math-1.5B"] == pytest.approx(1.54e9, rel=0.01)
    assert parameters["DeepSeek-R1-Distill-Qwen-1.5B"] == pytest.approx(1.78e9, rel=0.01)
    # with std 0.01 the null falls, to about 18-22% for the sparse runs
    sparse = table[table["reported sparsity %"] > 50].set_index(["paper run", "weight std"])
    runs = sparse.index.get_level_values(0).unique()
    for run in runs:
        assert sparse.loc[(run, 0.01), "null low-mag cov. %"] < \
            sparse.loc[(run, 0.02), "null low-mag cov. %"]


def test_vision_language_runs_get_their_paper_rows_and_vision_columns(full):
    info = main_runs(info_of(full, {"ext-opd": "opd"}))
    assert set(info.loc[info["pair"] == "squares", "modality"]) == {"vision-language"}
    assert set(info.loc[info["pair"] == "addition", "modality"]) == {"language"}
    match = paper_tables.paper_match(info)
    assert match["squares-opd-vl-teacher-adamw-s0"] == "Qwen2.5-VL OPD"
    assert "squares-grpo-adamw-s0" not in match  # the paper has no VL GRPO row
    energy = paper_tables.module_energy_table(info, full["delta_global"], full["tensors"],
                                              match).set_index("series")
    vl = "squares-opd-vl-teacher-adamw"
    # the paper's blocks by module type (the tower's MLP in FFN), the tower on its own beside
    assert energy.loc[vl, "ffn %"] == pytest.approx(51.0)
    assert energy.loc[vl, "other %"] == pytest.approx(5.0)
    assert energy.loc[vl, "vision block (in the above) %"] == pytest.approx(10.0)
    assert energy.loc[vl, "vision block (in the above) % 95% low"] == pytest.approx(10.0)
    assert energy.loc[vl, "projector block (in the above) %"] == pytest.approx(5.0)
    assert energy.loc[vl, "paper: ffn %"] == pytest.approx(81.4)
    assert pd.isna(energy.loc["addition-opd-teacher-a-adamw", "vision block (in the above) %"])
    assert energy.loc["addition-opd-teacher-a-adamw", "ffn %"] == pytest.approx(60.0)
    delta = paper_tables.global_delta_table(info, full["delta_global"], full["tensors"],
                                            match).set_index("series")
    assert delta.loc[vl, "paper: sparsity@1e-5 %"] == pytest.approx(66.72)


def test_vision_language_interventions_use_the_papers_vl_numbers(full):
    info = info_of(full, {"ext-opd": "opd"})
    rows = paper_tables.intervention_rows(info, full["evaluation"], full["masks"], "mean@2")
    table = paper_tables.interventions_table(rows)
    vl = table[(table["pair"] == "squares")
               & (table["experiment"] == "masked retraining")].set_index("arm")
    assert set(vl.index) == {"full", "opd", "random", "run-grpo", "random-grpo"}
    assert vl.loc["random-grpo", "paper: peak %"] == pytest.approx(47.40)
    assert vl.loc["run-grpo", "paper: peak %"] == pytest.approx(49.98)
    assert vl.loc["full", "paper: peak %"] == pytest.approx(55.72)
    language = table[(table["pair"] == "addition")
                     & (table["experiment"] == "masked retraining")].set_index("arm")
    assert language.loc["opd", "paper: peak %"] == pytest.approx(35.10)
    # the paper ablated the optimizer on DS-Qwen only: nothing beside the VL pair's AdamW/SGD
    ablation = table[table["experiment"] == "optimizer ablation"]
    assert set(ablation["pair"]) == {"addition", "squares"}
    assert ablation.loc[ablation["pair"] == "squares", "paper: peak %"].isna().all()
    assert ablation.loc[ablation["pair"] == "addition", "paper: peak %"].notna().all()


def test_mask_overlap_table_both_directions_over_seeds():
    info = pd.DataFrame({"run": ["a-s0", "b-s0", "a-s1", "b-s1"], "seed": [0, 0, 1, 1],
                         "kind": "opd"})
    info["series"] = info["run"].str[0]
    coverage = {("a-s0", "b-s0"): 0.6, ("a-s1", "b-s1"): 0.7, ("a-s0", "b-s1"): 0.1}
    overlap = pd.DataFrame(
        [(a, b, m, v) for (a, b), cov in coverage.items()
         for m, v in (("coverage_a_to_b", cov), ("baseline_a_to_b", 0.2),
                      ("coverage_b_to_a", 0.3), ("baseline_b_to_a", 0.1),
                      ("jaccard", 0.25), ("jaccard_baseline", 0.07),
                      ("blocks/ffn/jaccard", 0.9))],
        columns=["run_a", "run_b", "metric", "value"])
    table = paper_tables.mask_overlap_table(info, overlap, pd.DataFrame()).set_index(
        ["series a", "series b"])
    row = table.loc[("a", "b")]
    assert row["seeds"] == 2 and row["interval"] == "seeds"  # seed-matched pairs only
    assert row["coverage a->b %"] == pytest.approx(65)
    assert (row["coverage a->b % 95% low"], row["coverage a->b % 95% high"]) == \
        pytest.approx([100 * v for v in seed_interval([0.6, 0.7])[1:]])
    assert row["enrichment"] == pytest.approx(3.25)
    assert table.loc[("b", "a"), "random baseline %"] == pytest.approx(10)
    assert table.loc[("b", "a"), "jaccard"] == pytest.approx(0.25)  # global, not per block


def test_cli_writes_tables_and_figures(full, tmp_path):
    folder = tf.write(tmp_path / "tables", full)
    main(["paper-tables", "--tables", str(folder), "--out", str(tmp_path / "out"),
          "--external", '{"ext-opd": "opd"}'])
    for name in paper_tables.TABLE_NAMES:
        for fmt in ("csv", "md", "tex"):
            assert (tmp_path / "out" / f"{name}.{fmt}").stat().st_size > 0, (name, fmt)
    summary = pd.read_csv(tmp_path / "out" / "table_evaluation_summary.csv")
    row = summary[(summary["run"] == "addition-opd-teacher-a-adamw-s0")
                  & (summary["metric"] == "exact_match")].iloc[0]
    assert row["gain %"] == pytest.approx(row["final %"] - row["source %"])
    assert "nan" not in (tmp_path / "out" / "table_global_delta.md").read_text()
    overlap = pd.read_csv(tmp_path / "out" / "table_mask_overlap.csv")
    assert (overlap["interval"] == "matrices (one seed)").all()  # from overlap_tensors
    main(["figure", "fig1_overview", "--tables", str(folder), "--plots",
          '{"formats": ["png"], "dpi": 40}', "--out", str(tmp_path / "fig" / "fig1")])
    assert (tmp_path / "fig" / "fig1.png").exists()


def test_missing_table_files_read_as_empty(tmp_path):
    loaded = load_tables(tmp_path)
    assert loaded["overlap"].empty
    (tmp_path / "masks.csv").write_text("")
    assert loaded["masks"].empty
    with pytest.raises(KeyError):
        loaded["nonsense"]


def test_a_table_not_read_yet_is_read_by_get_too(tmp_path):
    pd.DataFrame({"mask": ["m"], "tensor": ["all"], "block": ["all"], "density": [0.2]}
                 ).to_csv(tmp_path / "masks.csv", index=False)
    assert load_tables(tmp_path).get("masks")["density"].tolist() == [0.2]


def test_fig2_runs_setting_and_default(full):
    info = info_of(full)
    # One OPD run per modality: the language pair's and the vision-language pair's primary.
    assert modules.fig2_runs(info, {}) == ["addition-opd-teacher-a-adamw-s0",
                                           "squares-opd-vl-teacher-adamw-s0"]
    assert modules.fig2_runs(info, {"fig2_run": "addition-grpo-adamw-s1"}) == \
        ["addition-grpo-adamw-s1"]
    # and the first on-policy self-distillation run beside OPD's
    opsd = tf.tables(tf.config(self_distillation=True))
    assert modules.fig2_runs(run_info(opsd["runs"]), {}) == ["addition-opd-teacher-a-adamw-s0",
                                                           "addition-opsd-adamw-s0"]


def test_gain_vs_sparsity_keeps_pairs_and_optimizers_apart(full):
    # One curve per pair, method and optimizer: every point knows its pair and optimizer,
    # and every cell names its optimizer (AdamW and SGD cells at one lr never merge).
    info = info_of(full, {"ext-opd": "opd"})
    points = matched_gain.matched_gain_points(full["evaluation"], full["delta_global"], info,
                                         "mean@2")
    assert set(points["pair"]) == {"addition"} and len(set(points["optimizer"])) >= 1
    assert (points.apply(lambda p: p["cell"].startswith(p["optimizer"]), axis=1)).all()
    per_cell = points.groupby(["pair", "method", "optimizer", "cell"])["run"].nunique()
    assert per_cell.max() <= 2  # at most one run per seed (the fixture has two seeds)


def test_a_mask_arms_label_gives_its_mean_density_over_seeds(full):
    import matplotlib.pyplot as plt

    from opdgeo.tidy import curves, primary_opd_runs, score_metric

    info = main_runs(info_of(full))
    pair = info[info["pair"] == "addition"]
    seed0 = pair[pair["run"] == "addition-masked-opd-s0"].iloc[0]
    seed1 = seed0.copy()
    seed1[["run", "seed", "mask"]] = ["addition-masked-opd-s1", 1, "opd-mask-of-seed-1"]
    pair = pd.concat([pair, seed1.to_frame().T], ignore_index=True)
    masks = pd.concat([full["masks"], pd.DataFrame(
        [("opd-mask-of-seed-1", "all", "all", 0.3)], columns=full["masks"].columns)])
    densities = masks.set_index("mask").loc[[seed0["mask"], seed1["mask"]], "density"]
    assert densities.nunique() == 2  # the two seeds' masks differ
    arms = interventions._arms(pair[pair["kind"] == "masked"])
    fig, axes = plt.subplots(1, len(arms))
    scores = curves(full["evaluation"], info, score_metric(full["evaluation"]))
    interventions._masked_panels(list(axes), scores, masks, pair, primary_opd_runs(pair), arms,
                           style.DEFAULTS)
    labels = [text.get_text() for ax in axes for text in ax.get_legend().get_texts()]
    plt.close(fig)
    assert f"OPD mask, density {densities.mean():.1%}" in labels


def test_a_mask_arm_of_an_external_rlvr_run_is_the_papers_rlvr_arm(full):
    # DS-Qwen's RLVR-mask arm takes the external DeepScaleR run's mask (`run:deepscaler-rlvr`).
    runs = pd.concat([full["runs"], full["runs"].iloc[[0]].assign(
        run="deepscaler-rlvr", kind="external", pair=None)])
    info = info_of({"runs": runs}, {"ext-opd": "opd", "deepscaler-rlvr": "grpo"})
    assert paper_tables.paper_arm("run-deepscaler-rlvr", info) == "run-grpo"
    assert paper_tables.paper_arm("random-deepscaler-rlvr", info) == "random-grpo"
    assert paper_tables.paper_arm("run-ext-opd", info) == "run-ext-opd"
    assert paper_tables.paper_arm("opd", info) == "opd"


def test_every_paper_reference_names_the_table_it_comes_from():
    import yaml

    reference = yaml.safe_load(paper_tables.REFERENCE.read_text())
    assert {"global_delta", "module_energy", "masked_retraining", "optimizer_ablation"} <= \
        set(reference)
    for name, entry in reference.items():
        assert entry["from"].strip(), name
        assert all(len(values) == len(entry["columns"]) for values in entry["rows"].values()), name


def test_score_tables_give_the_95_percent_interval():
    cfg = tf.config(seeds=(0, 1, 2))
    frames = tf.tables(cfg)
    info = run_info(frames["runs"])
    rows = paper_tables.intervention_rows(info, frames["evaluation"], frames["masks"], "mean@2")
    table = paper_tables.interventions_table(rows).set_index(["experiment", "arm"])
    full = table.loc[("masked retraining", "full")]  # OPD over three seeds
    assert full["seeds"] == 3
    assert full["final % 95% low"] < full["final %"] < full["final % 95% high"]


def test_optimizer_ablation_only_for_pairs_trained_with_several_optimizers(full):
    info = info_of(full, {"ext-opd": "opd"})
    one_optimizer = info[(info["pair"] == "squares") & (info["kind"] == "opd")
                         & (info["optimizer"] != "adamw")]
    assert len(one_optimizer)  # the fixture trains squares with more than AdamW
    info = info[~info["run"].isin(one_optimizer["run"])]
    rows = paper_tables.intervention_rows(info, full["evaluation"], full["masks"], "mean@2")
    ablation = rows[rows["experiment"] == "optimizer ablation"]
    assert set(ablation["pair"]) == {"addition"}
