"""Findings F1-F8 on constructed tidy tables: verdicts follow the intervals, never forced."""

import math

import numpy as np
import pandas as pd
import pytest
import tidy_fixtures as tf

from opdgeo import findings
from opdgeo.cli import main
from opdgeo.delta.columns import SPARSITY
from opdgeo.delta.grouping import summary
from opdgeo.tidy import run_info

SEEDS = (0, 1, 2)
OPD = "addition-opd-teacher-a-adamw"
SFT = "addition-sft-adamw"


def with_values(frames, series, values: dict):
    """A copy of the tables with delta_global values of a run group replaced, one value per
    seed (a list) or the same for every seed."""
    delta = frames["delta_global"]
    runs = [f"{series}-s{seed}" for seed in SEEDS]
    keep = ~(delta["run"].isin(runs) & delta["metric"].isin(values))
    rows = [(run, 40, metric, v[i] if isinstance(v, list) else v)
            for metric, v in values.items() for i, run in enumerate(runs)]
    return {**frames, "delta_global": pd.concat(
        [delta[keep], pd.DataFrame(rows, columns=delta.columns)], ignore_index=True)}


def with_curve(frames, series, finals: list, half: float = 0.02):
    """Runs of a group end at the given final scores (one per seed, step 40), each with a
    +-half interval over prompts."""
    evaluation = frames["evaluation"]
    runs = [f"{series}-s{seed}" for seed in SEEDS[:len(finals)]]
    evaluation = evaluation[~evaluation["run"].isin(runs)]
    rows = pd.DataFrame([(run, step, metric, v * step / 40, v * step / 40 - half,
                          v * step / 40 + half)
                         for run, v in zip(runs, finals, strict=True) for step in (20, 40)
                         for metric in ("exact_match", "mean@2")],
                        columns=["run", "step", "metric", "value", "low", "high"])
    return {**frames, "evaluation": pd.concat([evaluation, rows], ignore_index=True)}


def check_table(frames) -> pd.DataFrame:
    return findings.findings_table(frames, run_info(frames["runs"]), {})


def check(frames, finding, series=OPD, measure=None):
    table = check_table(frames)
    rows = table[(table["finding"] == finding) & (table["series"] == series)]
    if measure:
        rows = rows[rows["measure"].str.startswith(measure)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


@pytest.fixture(scope="module")
def frames():
    cfg = tf.config(seeds=SEEDS, arms=("opd", "random", "run:grpo"), self_distillation=True)
    cfg["pairs"]["addition"]["masked"]["seeds"] = list(SEEDS)
    tables = tf.tables(cfg)
    scores = tables["evaluation"]["value"]  # every score with its interval over prompts
    tables["evaluation"] = tables["evaluation"].assign(low=scores - 0.02, high=scores + 0.02)
    return tables


def test_verdict_rules():
    v = findings.verdict
    assert v(0.6, 0.7, 0.5, +1) == findings.HOLDS
    assert v(0.6, 0.7, 0.5, +1, (0.1, 0.2)) == findings.HOLDS_BEYOND
    assert v(0.6, 0.7, 0.5, +1, (-0.01, 0.05)) == findings.EXPLAINED
    assert v(0.6, 0.7, 0.5, +1, (-0.2, -0.1)) == findings.CONTRADICTS
    assert v(0.4, 0.6, 0.5, +1) == findings.INCONCLUSIVE
    assert v(0.3, 0.4, 0.5, +1) == findings.FAILS
    assert v(0.3, 0.4, 0.5, -1, (-0.2, -0.1)) == findings.HOLDS_BEYOND
    assert v(1.2, 1.5, 1.0, +1, threshold_is_null=True) == findings.HOLDS_BEYOND
    assert v(0.6, 0.9, 1.0, +1, threshold_is_null=True) == findings.CONTRADICTS
    assert v(math.nan, math.nan, 0.5, +1) == findings.INCONCLUSIVE


@pytest.mark.parametrize("sparsity, null, expected", [
    ([0.80, 0.82, 0.81], [0.60, 0.61, 0.60], findings.HOLDS_BEYOND),
    ([0.80, 0.82, 0.81], [0.80, 0.83, 0.805], findings.EXPLAINED),
    ([0.80, 0.82, 0.81], [0.90, 0.91, 0.92], findings.CONTRADICTS),
    ([0.40, 0.60, 0.50], [0.30, 0.31, 0.30], findings.INCONCLUSIVE),
    ([0.30, 0.32, 0.31], [0.20, 0.21, 0.20], findings.FAILS),
])
def test_f2_interval_against_threshold_and_exact_null(frames, sparsity, null, expected):
    row = check(with_values(frames, OPD, {"sparsity_atol_1e-5": sparsity,
                                          "exact_null_sparsity_atol_1e-5": null}), "F2")
    assert row["verdict"] == expected
    assert row["observed"] == pytest.approx(sum(sparsity) / 3)
    assert row["low"] < row["observed"] < row["high"]
    assert row["null"] == pytest.approx(sum(null) / 3)
    assert row["seeds"] == 3 and row["null_kind"] == "exact rounding null"


def one_seed_norms(opd_ratios: list[float]) -> dict:
    """One seed: the SFT control moves every tensor by a relative norm of 1%, the OPD run
    moves tensor i by opd_ratios[i] times that; delta_global's relative norms are the
    analysis's own aggregate of those tensors."""
    frames = tf.tables(tf.config())
    tensors = frames["tensors"]
    for run, ratios in ((f"{SFT}-s0", None), (f"{OPD}-s0", opd_ratios)):
        rows = tensors["run"] == run
        ratio = 1.0 if ratios is None else np.resize(ratios, rows.sum())
        tensors.loc[rows, "delta_energy"] = (0.01 * ratio) ** 2 * tensors.loc[rows,
                                                                            "source_energy"]
        delta = frames["delta_global"]
        delta.loc[(delta["run"] == run) & (delta["metric"] == "relative_norm"), "value"] = \
            summary(tensors[rows].drop(columns="run"))["relative_norm"]
    return frames


@pytest.mark.parametrize("ratios, expected", [
    ([0.1, 0.2, 0.3], findings.HOLDS),  # every tensor's ratio below the threshold 0.5
    ([0.1, 0.7], findings.INCONCLUSIVE),  # tensors on both sides, pooled ratio near 0.5
    ([0.8, 1.0, 1.2], findings.FAILS),  # every tensor's ratio above it
])
def test_one_seed_delta_verdicts_read_the_interval_over_matrices(ratios, expected):
    frames = one_seed_norms(ratios)
    row = check(frames, "F1")
    delta = frames["delta_global"].set_index(["run", "metric"])["value"]
    pooled = delta[(f"{OPD}-s0", "relative_norm")] / delta[(f"{SFT}-s0", "relative_norm")]
    assert row["seeds"] == 1 and row["interval"] == "matrices (one seed)"
    assert row["observed"] == pytest.approx(pooled)
    # a resample's pooled ratio is a weighted mean of squared per-tensor ratios, square-rooted
    assert min(ratios) - 1e-12 <= row["low"] <= row["observed"] <= row["high"] \
        <= max(ratios) + 1e-12
    assert row["verdict"] == expected
    assert (row["low"] < findings.F1_MAX_NORM_RATIO < row["high"]) == (
        expected == findings.INCONCLUSIVE)


def test_one_seed_null_gap_pairs_the_null_by_matrix():
    """Every matrix of the one run is sparser than its own exact rounding null: the gap's
    interval over matrices clears zero, although the two values' own intervals overlap."""
    frames = tf.tables(tf.config())
    tensors = frames["tensors"]
    rows = tensors["run"] == f"{OPD}-s0"
    spread = np.linspace(0.55, 0.95, rows.sum())
    tensors.loc[rows, SPARSITY] = spread
    tensors.loc[rows, f"exact_null_{SPARSITY}"] = spread - 0.01
    computed = summary(tensors[rows].drop(columns="run"))
    delta = frames["delta_global"]
    for metric in (SPARSITY, f"exact_null_{SPARSITY}"):
        delta.loc[(delta["run"] == f"{OPD}-s0") & (delta["metric"] == metric), "value"] = \
            computed[metric]
    row = check(frames, "F2")
    assert row["interval"] == "matrices (one seed)" and row["low"] < row["null"] < row["high"]
    assert row["verdict"] == findings.HOLDS_BEYOND


def test_findings_markdown_says_what_a_one_seed_interval_is_over():
    text = findings.findings_markdown(check_table(one_seed_norms([0.1, 0.2, 0.3])))
    assert "matrices (one seed)" in text and "not how it would vary between seeds" in text


def test_f8_falls_back_to_the_parametric_null(frames):
    tables = with_values(frames, OPD, {"low_magnitude_coverage_10pct": [0.40, 0.41, 0.40],
                                       "rounding_null_low_magnitude_coverage_10pct": 0.2})
    delta = tables["delta_global"]
    tables["delta_global"] = delta[~delta["metric"].eq("exact_null_low_magnitude_coverage_10pct")]
    row = check(tables, "F8", measure="low-magnitude coverage at 10%: against bf16")
    assert row["null_kind"] == "parametric rounding null"
    assert row["verdict"] == findings.BEYOND_NULL
    assert row["paper"] == pytest.approx(0.3804)


@pytest.mark.parametrize("opd_norm, expected", [([0.002, 0.0021, 0.0019], findings.HOLDS),
                                                ([0.015, 0.016, 0.014], findings.FAILS)])
def test_f1_against_the_sft_control(frames, opd_norm, expected):
    tables = with_values(with_values(frames, SFT, {"relative_norm": 0.02}), OPD,
                         {"relative_norm": opd_norm})
    row = check(tables, "F1")
    assert row["verdict"] == expected
    assert row["observed"] == pytest.approx(sum(opd_norm) / 3 / 0.02)
    assert row["sft_control"] == pytest.approx(0.02)


def test_f1_without_an_sft_control_is_not_tested():
    cfg = tf.config(seeds=SEEDS)
    cfg["pairs"]["addition"]["controls"] = ["grpo"]
    row = check(tf.tables(cfg), "F1")
    assert row["verdict"] == findings.NOT_TESTED and "no SFT control" in row["note"]
    assert row["interval"] == ""  # several seeds, nothing observed: not "none (one seed)"


def test_f1_without_a_matched_control_uses_the_external_offline_distillation_run():
    # config/paper.yaml: no SFT control; the paper's F1 is OPD against Qwen2.5-Math -> DS-Qwen.
    cfg = tf.config(seeds=SEEDS)
    cfg["pairs"]["addition"]["controls"] = ["grpo"]
    cfg["external"] = {"offline-distill": {"source": "x", "trained": "y", "kind": "sft"}}
    frames = tf.tables(cfg)
    delta = frames["delta_global"]
    delta.loc[(delta["run"] == "offline-distill") & (delta["metric"] == "relative_norm"),
              "value"] = 0.12
    info = run_info(frames["runs"], {"offline-distill": "sft"})
    table = findings.findings_table(frames, info, {}).set_index(["finding", "series"])
    row = table.loc[("F1", OPD)]
    assert row["verdict"] == findings.HOLDS  # ~0.002 / 0.12
    opd = delta[delta["run"].str.startswith(OPD + "-s") & (delta["metric"] == "relative_norm")]
    assert row["observed"] == pytest.approx(opd["value"].mean() / 0.12)
    assert "external offline-distillation run offline-distill" in row["note"]


def test_f4_needs_full_opd_to_improve_over_the_source(frames):
    # the source (student) scores 0.18 on mean@2 in the fixture
    tables = with_curve(frames, OPD, [0.50, 0.52, 0.51])
    tables = with_curve(tables, "addition-masked-opd", [0.50, 0.51, 0.51])
    worse = with_curve(tables, "addition-masked-random", [0.40, 0.41, 0.39])
    row = check(worse, "F4", series="addition-masked-opd")
    assert row["observed"] == pytest.approx((0.50 + 0.51 + 0.51 - 1.53) / 3)
    assert row["null"] == pytest.approx(0.40)
    assert row["verdict"] == findings.HOLDS_BEYOND
    same = with_curve(tables, "addition-masked-random", [0.50, 0.50, 0.52])
    assert check(same, "F4", series="addition-masked-opd")["verdict"] == findings.EXPLAINED
    poor = with_curve(worse, "addition-masked-opd", [0.40, 0.42, 0.41])
    assert check(poor, "F4", series="addition-masked-opd")["verdict"] == findings.FAILS
    flat = with_curve(worse, OPD, [0.17, 0.19, 0.18])
    row = check(flat, "F4", series="addition-masked-opd")
    assert row["verdict"] == findings.NOT_TESTED and "does not improve" in row["note"]


def test_f5_reports_sgd_winning_as_a_failure(frames):
    tables = with_curve(with_curve(frames, OPD, [0.40, 0.41, 0.40]),
                        "addition-opd-teacher-a-sgd", [0.50, 0.52, 0.51])
    row = check(tables, "F5")
    assert row["verdict"] == findings.FAILS
    assert row["observed"] == pytest.approx((1.21 - 1.53) / 3)


def test_f5_with_one_seed_uses_the_intervals_over_prompts():
    frames = tf.tables(tf.config())
    close = with_curve(with_curve(frames, OPD, [0.40]), "addition-opd-teacher-a-sgd",
                       [0.41], half=0.02)
    row = check(close, "F5")
    assert row["high"] - row["low"] == pytest.approx(2 * math.hypot(0.02, 0.02))
    assert row["verdict"] == findings.INCONCLUSIVE
    apart = with_curve(with_curve(frames, OPD, [0.40]), "addition-opd-teacher-a-sgd", [0.50])
    assert check(apart, "F5")["verdict"] == findings.FAILS


def test_controls_match_the_optimizer(frames):
    # The controls are trained with the primary optimizer (AdamW here): the SGD OPD run has
    # no matched SFT control, and is not compared with AdamW's.
    sgd = check(frames, "F1", series="addition-opd-teacher-a-sgd")
    assert sgd["verdict"] == findings.NOT_TESTED and "no SFT control" in sgd["note"]


def test_sweep_and_masked_runs_get_no_delta_findings():
    frames = tf.tables(tf.config(sweep=True, self_distillation=True))
    table = findings.findings_table(frames, run_info(frames["runs"]), {})
    delta_rows = table[~table["finding"].isin(["F4", "F5"])]
    assert not delta_rows["series"].str.contains("sweep|masked").any()
    assert set(table["finding"]) == set(findings.CLAIMS)


def test_cli_writes_markdown_and_csv(frames, tmp_path):
    folder = tf.write(tmp_path / "tables", frames)
    main(["findings", "--tables", str(folder), "--out", str(tmp_path / "findings")])
    text = (tmp_path / "findings.md").read_text()
    for finding in findings.CLAIMS:
        assert f"## {finding}:" in text
    # every number a note names was found (the masks' densities are read from the folder too)
    assert "nan" not in text.lower(), [line for line in text.splitlines() if "nan" in line]
    masks = frames["masks"]
    opd_masks = frames["runs"].loc[frames["runs"]["run"].str.contains("-masked-opd-"), "mask"]
    density = masks[masks["mask"].isin(opd_masks) & (masks["tensor"] == "all")]["density"]
    assert f"(density {density.mean():.1%})" in text  # the OPD mask's, read from the folder
    table = pd.read_csv(tmp_path / "findings.csv")
    assert set(table["verdict"]) <= set(findings.VERDICTS)
    assert list(table.columns) == findings.COLUMNS


def with_self_teacher(frames, own: float, other: float = 0.05):
    """The student's scores reading its own context and another example's (+-0.03)."""
    evaluation = frames["evaluation"]
    evaluation = evaluation[~evaluation["metric"].str.contains("context")]
    teacher = pd.DataFrame([("student", 0, f"mean@2 ({whose} context)", v, v - 0.03, v + 0.03)
                            for whose, v in (("own", own), ("other", other))],
                           columns=evaluation.columns)
    return {**frames, "evaluation": pd.concat([evaluation, teacher], ignore_index=True)}


def test_self_distillation_is_checked_like_opd_and_against_its_op2sd_control(frames):
    frames = with_self_teacher(frames, 0.9)
    opsd, op2sd = "addition-opsd-adamw", "addition-op2sd-adamw"
    table = check_table(frames)
    assert {"F1", "F2", "F6", "F7", "F8"} <= set(table[table["series"] == opsd]["finding"])
    assert check(frames, "SD1", opsd)["verdict"] == findings.HOLDS
    # a self-teacher no better than the student (0.18 at step 0): nothing to distil
    assert check(with_self_teacher(frames, 0.1), "SD1", opsd)["verdict"] == findings.FAILS
    # OPSD sparser, smaller, more low-magnitude than OP2SD (fixture values): the claim holds
    sd2 = table[(table["finding"] == "SD2") & (table["series"] == opsd)]
    assert len(sd2) == 4 and (sd2["interval"] == "seeds").all()
    sparsity = sd2[sd2["measure"].str.startswith("sparsity")].iloc[0]
    assert sparsity["verdict"] == findings.HOLDS and sparsity["low"] > 0
    # a control that moved exactly as OPSD did: no privileged effect to claim
    same = {SPARSITY: [0.8, 0.85, 0.9]}
    null = with_values(with_values(frames, opsd, same), op2sd, same)
    assert check(null, "SD2", opsd, "sparsity")["verdict"] == findings.INCONCLUSIVE
    # the control sparser than OPSD: the claim fails
    reverse = with_values(with_values(frames, opsd, {SPARSITY: [0.6, 0.61, 0.62]}), op2sd,
                          {SPARSITY: [0.9, 0.91, 0.92]})
    assert check(reverse, "SD2", opsd, "sparsity")["verdict"] == findings.FAILS
