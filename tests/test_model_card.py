"""The model card the `model_card` rule writes into a trained run's final checkpoint."""

import dataclasses
import json

import pandas as pd
from huggingface_hub import ModelCard
from test_train import TASK, spec

from opdgeo.cli import main
from opdgeo.delta import columns
from opdgeo.version import package_version


def scores(run, step, exact_match, mean):
    return pd.DataFrame({"run": run, "step": step, "metric": ["exact_match", "mean@2"],
                         "value": [exact_match, mean]})


def write_inputs(tmp_path, run):
    pd.concat([scores(run, 2, 0.5, 0.4), scores(run, 4, 0.75, 0.625)]).to_csv(
        tmp_path / "eval.csv", index=False)
    scores("s", 0, 0.25, 0.125).to_csv(tmp_path / "source.csv", index=False)
    summary = dict(zip(map(columns.summary_name, columns.HEADLINE),
                       (0.0123, 0.875, 0.5, 0.25, 0.0625), strict=True))
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "final").mkdir()


def card_command(tmp_path, run_spec, source, teacher=None, task=TASK):
    fields = {k: v for k, v in dataclasses.asdict(run_spec).items() if k != "task"}
    main(["model-card", "--run-spec", json.dumps(fields), "--source", source,
          *(["--teacher", teacher] if teacher else []), "--task", json.dumps(task),
          "--scores", str(tmp_path / "eval.csv"), "--source-scores", str(tmp_path / "source.csv"),
          "--summary", str(tmp_path / "summary.json"), "--checkpoint", str(tmp_path / "final"),
          "--out", str(tmp_path / "model_card.md")])
    return ModelCard.load(tmp_path / "final" / "README.md")


def test_card_in_the_final_checkpoint_names_the_runs_settings_scores_and_delta(tmp_path):
    run = spec("opd", loss="forward_kl_topk", lr=3e-4, steps=4)
    write_inputs(tmp_path, run.name)
    card = card_command(tmp_path, run, "results/models/s/final", "results/models/t/final")

    assert (tmp_path / "model_card.md").read_text() == (tmp_path / "final/README.md").read_text()
    text = card.text
    for expected in (f"`{run.name}`", "kind `opd`", "`results/models/s/final`",
                     "`results/models/t/final`", "OPD, OPDTrainer with the `forward_kl_topk` loss",
                     "adamw, learning rate 0.0003", "| steps | 4 (8 completions per step) |",
                     "| seed | 0 |", "synthetic `addition` task", "digits 2",
                     f"opdgeo {package_version()} (commit "):
        assert expected in text, expected
    # held-out scores of the last step beside the source's
    assert "## Held-out scores (step 4)" in text
    assert "| exact_match | 0.25 | 0.75 |" in text and "| mean@2 | 0.125 | 0.625 |" in text
    # the delta's headline numbers, shown as the figures show them (percent)
    assert "| relative norm ‖ΔW‖/‖W_src‖ (%) | 1.23 |" in text
    assert "| unchanged coordinates, \\|ΔW\\| ≤ 1e-5 (%) | 87.5 |" in text
    assert card.data.tags == ["opdgeo", "opd"]
    assert card.data.base_model is None  # a local folder is no hub id


def test_card_of_a_hub_model_on_a_hub_data_set(tmp_path):
    run = spec("grpo")
    write_inputs(tmp_path, run.name)
    task = {"kind": "math", "train": {"path": "BytedTsinghua-SIA/DAPO-Math-17k", "split": "train"},
            "eval": {"aime24": {"path": "HuggingFaceH4/aime_2024", "split": "train",
                                "revision": "abc123"}}}
    card = card_command(tmp_path, run, "Qwen/Qwen2.5-1.5B@a1b2c3", task=task)
    assert card.data.base_model == "Qwen/Qwen2.5-1.5B"
    assert "| source (student) | `Qwen/Qwen2.5-1.5B@a1b2c3` |" in card.text
    assert card.data.datasets == ["BytedTsinghua-SIA/DAPO-Math-17k"]
    text = card.text
    assert "| teacher | none |" in text and "| objective | RLVR (GRPO), GRPOTrainer |" in text
    assert ("`BytedTsinghua-SIA/DAPO-Math-17k` (split train, revision not pinned" in text)
    assert "| data set, held-out: aime24 | `HuggingFaceH4/aime_2024` (split train, revision " \
           "abc123) |" in text
