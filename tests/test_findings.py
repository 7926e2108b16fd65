"""Findings F1-F8 on constructed tidy tables: verdicts follow the numbers, never forced."""

import pandas as pd
import pytest
import tidy_fixtures as tf

from opdgeo import findings
from opdgeo.cli import main
from opdgeo.tidy import run_info

OPD = "addition-opd-teacher-a-adamw-s0"
SFT = "addition-sft-adamw-s0"


def with_values(frames, run, values: dict):
    """A copy of the tables with some delta_global values of one run replaced."""
    delta = frames["delta_global"]
    keep = ~((delta["run"] == run) & delta["metric"].isin(values))
    rows = pd.DataFrame([(run, 40, m, v) for m, v in values.items()], columns=delta.columns)
    return {**frames, "delta_global": pd.concat([delta[keep], rows], ignore_index=True)}


def with_curve(frames, run, curve: dict):
    evaluation = frames["evaluation"]
    evaluation = evaluation[evaluation["run"] != run]
    rows = pd.DataFrame([(run, s, m, v) for s, v in curve.items() for m in ("exact_match",
                                                                            "mean@2")],
                        columns=evaluation.columns)
    return {**frames, "evaluation": pd.concat([evaluation, rows], ignore_index=True)}


def check(frames, finding, run=OPD, measure=None):
    table = findings.findings_table(frames, run_info(frames["runs"]), {})
    rows = table[(table["finding"] == finding) & (table["run"] == run)]
    if measure:
        rows = rows[rows["measure"] == measure]
    assert len(rows) == 1, rows
    return rows.iloc[0]


@pytest.fixture(scope="module")
def frames():
    return tf.tables(tf.config(arms=("opd", "random", "run:grpo")))


def test_verdict_rules():
    assert findings.verdict(True, 0.33, 0.2, +1) == findings.HOLDS_BEYOND
    assert findings.verdict(True, 0.33, 0.323, +1) == findings.EXPLAINED
    assert findings.verdict(False, 0.05, 0.2, +1) == findings.FAILS
    assert findings.verdict(True, 0.004, 0.011, -1) == findings.HOLDS_BEYOND
    assert findings.verdict(True, 0.5) == findings.HOLDS
    assert findings.verdict(None, 0.5) == findings.NOT_TESTED
    assert findings.verdict(True, float("nan")) == findings.NOT_TESTED


@pytest.mark.parametrize("coverage, null, expected", [
    (0.33, 0.323, findings.EXPLAINED),  # a toy probe on sampled weights: rounding explains it
    (0.33, 0.20, findings.HOLDS_BEYOND),
    (0.12, 0.10, findings.FAILS),  # below the 0.15 threshold: fails, whatever the null
])
def test_f8_low_magnitude_against_the_exact_null(frames, coverage, null, expected):
    row = check(with_values(frames, OPD, {"low_magnitude_coverage_10pct": coverage,
                                          "exact_null_low_magnitude_coverage_10pct": null}),
                "F8")
    assert row["verdict"] == expected
    assert row["observed"] == pytest.approx(coverage)
    assert row["null"] == pytest.approx(null)
    assert row["null_kind"] == "exact rounding null"
    assert row["paper"] == pytest.approx(0.3804)
    sft = frames["delta_global"].query("run == @SFT and metric == 'low_magnitude_coverage_10pct'")
    assert row["sft_control"] == pytest.approx(sft["value"].iloc[0])


def test_f8_falls_back_to_the_parametric_null(frames):
    tables = with_values(frames, OPD, {"low_magnitude_coverage_10pct": 0.4,
                                       "rounding_null_low_magnitude_coverage_10pct": 0.39})
    delta = tables["delta_global"]
    tables["delta_global"] = delta[~((delta["run"] == OPD) & (
        delta["metric"] == "exact_null_low_magnitude_coverage_10pct"))]
    row = check(tables, "F8")
    assert row["null_kind"] == "parametric rounding null"
    assert row["verdict"] == findings.EXPLAINED


@pytest.mark.parametrize("opd_norm, expected", [(0.002, findings.HOLDS),
                                                (0.015, findings.FAILS)])
def test_f1_against_the_sft_control(frames, opd_norm, expected):
    tables = with_values(with_values(frames, SFT, {"relative_norm": 0.02}), OPD,
                         {"relative_norm": opd_norm})
    row = check(tables, "F1")
    assert row["verdict"] == expected
    assert row["claim_baseline"] == pytest.approx(findings.F1_MAX_NORM_RATIO * 0.02)


def test_f1_without_an_sft_control_is_not_tested():
    cfg = tf.config()
    cfg["pairs"]["addition"]["controls"] = ["grpo"]
    row = check(tf.tables(cfg), "F1")
    assert row["verdict"] == findings.NOT_TESTED


def test_f1_without_a_matched_control_uses_the_external_offline_distillation_run():
    # config/paper.yaml: no SFT control; the paper's F1 is OPD against Qwen2.5-Math -> DS-Qwen.
    cfg = tf.config()
    cfg["pairs"]["addition"]["controls"] = ["grpo"]
    cfg["external"] = {"offline-distill": {"source": "x", "trained": "y", "kind": "sft"}}
    frames = with_values(tf.tables(cfg), "offline-distill", {"relative_norm": 0.12})
    info = run_info(frames["runs"], {"offline-distill": "sft"})
    table = findings.findings_table(frames, info, {}).set_index(["finding", "run"])
    row = table.loc[("F1", OPD)]
    assert row["verdict"] == findings.HOLDS
    assert row["claim_baseline"] == pytest.approx(findings.F1_MAX_NORM_RATIO * 0.12)
    assert "external offline-distillation run offline-distill" in row["note"]


def test_f7_principal_projection_against_the_isotropic_null(frames):
    key, null = "principal_projection_10pct_median", \
        "isotropic_null_principal_projection_10pct_median"
    measure = "principal projection at 10% (median)"
    below = with_values(frames, OPD, {key: 0.004, null: 0.011})
    assert check(below, "F7", measure=measure)["verdict"] == findings.HOLDS_BEYOND
    above = with_values(frames, OPD, {key: 0.02, null: 0.011})
    assert check(above, "F7", measure=measure)["verdict"] == findings.FAILS


def test_f3_ffn_share_against_the_parameter_share(frames):
    # fixture: FFN holds 3 of 7 matrices per layer at twice the size -> 6/10 of parameters
    row = check(with_values(frames, OPD, {"block_energy_share/ffn": 0.62}), "F3",
                measure="FFN energy share")
    assert row["null"] == pytest.approx(0.6)
    assert row["verdict"] == findings.EXPLAINED
    row = check(with_values(frames, OPD, {"block_energy_share/ffn": 0.8}), "F3",
                measure="FFN energy share")
    assert row["verdict"] == findings.HOLDS_BEYOND
    row = check(with_values(frames, OPD, {"block_energy_share/ffn": 0.2}), "F3",
                measure="FFN energy share")
    assert row["verdict"] == findings.FAILS  # attention (0.3) is then the largest


def test_f4_masked_retraining_from_curves(frames):
    full = {10: 0.5, 20: 0.6, 30: 0.6, 40: 0.62}
    mask = {10: 0.5, 20: 0.58, 30: 0.61, 40: 0.61}
    tables = with_curve(with_curve(frames, OPD, full), "addition-masked-opd-s0", mask)
    worse = with_curve(tables, "addition-masked-random-s0", {10: 0.3, 20: 0.4, 40: 0.45})
    row = check(worse, "F4")
    assert row["observed"] == pytest.approx(0.61)  # late average: the last quarter
    assert row["claim_baseline"] == pytest.approx(0.62)
    assert row["null"] == pytest.approx(0.45)
    assert row["verdict"] == findings.HOLDS_BEYOND
    same = with_curve(tables, "addition-masked-random-s0", {10: 0.5, 20: 0.6, 40: 0.6})
    assert check(same, "F4")["verdict"] == findings.EXPLAINED
    poor = with_curve(worse, "addition-masked-opd-s0", {10: 0.3, 40: 0.4})
    assert check(poor, "F4")["verdict"] == findings.FAILS


def test_f5_reports_sgd_winning_as_a_failure(frames):
    tables = with_curve(with_curve(frames, OPD, {10: 0.3, 40: 0.4}),
                        "addition-opd-teacher-a-sgd-s0", {10: 0.4, 40: 0.5})
    row = check(tables, "F5")
    assert row["verdict"] == findings.FAILS
    assert (row["observed"], row["claim_baseline"]) == (pytest.approx(0.4), pytest.approx(0.5))


def test_controls_match_the_optimizer(frames):
    # The controls are trained with the primary optimizer (AdamW here): the SGD OPD run has
    # no matched SFT control, and is not compared with AdamW's.
    assert check(frames, "F1")["sft_control"] == pytest.approx(
        check(frames, "F1")["claim_baseline"] / findings.F1_MAX_NORM_RATIO)
    sgd = check(frames, "F1", run="addition-opd-teacher-a-sgd-s0")
    assert sgd["verdict"] == findings.NOT_TESTED and "no SFT control" in sgd["note"]


def test_sweep_and_masked_runs_get_no_delta_findings():
    frames = tf.tables(tf.config(sweep=True))
    table = findings.findings_table(frames, run_info(frames["runs"]), {})
    assert not table["run"].str.contains("sweep|masked").any()
    assert set(table["finding"]) == set(findings.CLAIMS)


def test_cli_writes_markdown_and_csv(frames, tmp_path):
    folder = tf.write(tmp_path / "tables", frames)
    main(["findings", "--tables", str(folder), "--out", str(tmp_path / "findings")])
    text = (tmp_path / "findings.md").read_text()
    for finding in findings.CLAIMS:
        assert f"## {finding}:" in text
    table = pd.read_csv(tmp_path / "findings.csv")
    assert set(table["verdict"]) <= {findings.HOLDS_BEYOND, findings.EXPLAINED, findings.HOLDS,
                                     findings.FAILS, findings.NOT_TESTED}
    assert list(table.columns) == findings.COLUMNS
