"""The model cards the `model_card` and `base_model_card` rules write into final checkpoints:
Hub metadata that huggingface_hub parses back (offline: ModelCard.validate needs the Hub),
every score with its interval, and a usage snippet that runs."""

import dataclasses
import json
import re

import pandas as pd
import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from test_train import TASK, self_distillation_spec, spec

from opdgeo.cli import main
from opdgeo.delta import columns
from opdgeo.version import package_version

EVALUATION = {"k": 2, "temperature": 0.6}
# What a Hub-ready card's metadata must carry (the base model only where there is one).
REQUIRED = ("license", "library_name", "pipeline_tag", "tags", "model-index")


def scores(run, step, exact_match, mean):
    return pd.DataFrame({"run": run, "step": step, "metric": ["exact_match", "mean@2"],
                         "value": [exact_match, mean], "low": [exact_match - 0.125, mean - 0.0625],
                         "high": [exact_match + 0.125, mean + 0.0625]})


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
    main(["model-card", "--run-spec", json.dumps(fields), "--source", str(source),
          *(["--teacher", str(teacher)] if teacher else []), "--task", json.dumps(task),
          "--evaluation", json.dumps(EVALUATION),
          "--scores", str(tmp_path / "eval.csv"), "--source-scores", str(tmp_path / "source.csv"),
          "--summary", str(tmp_path / "summary.json"), "--checkpoint", str(tmp_path / "final"),
          "--out", str(tmp_path / "model_card.md")])
    return ModelCard.load(tmp_path / "final" / "README.md")


def metadata_errors(readme) -> list[str]:
    """What stops a card's metadata from being Hub-ready, checked offline with
    huggingface_hub's own parsers: the front matter loads, ModelCardData takes it back
    unchanged, the model-index parses into results, each with its interval around its value."""
    metadata = metadata_load(readme) or {}
    errors = [f"no {key}" for key in REQUIRED if not metadata.get(key)]
    if metadata.get("base_model") and metadata.get("base_model_relation") != "finetune":
        errors.append("base_model without base_model_relation: finetune")
    if "model-index" in metadata:
        if ModelCardData(**metadata).to_dict() != metadata:
            errors.append("ModelCardData does not round-trip the metadata")
        _, results = model_index_to_eval_results(metadata["model-index"])
        for result in results:
            args = result.metric_args or {}
            if not args.get("ci95_low", float("inf")) <= result.metric_value <= args.get(
                    "ci95_high", float("-inf")):
                errors.append(f"{result.metric_type}: no interval around its value")
    return errors


def test_card_in_the_final_checkpoint_names_the_runs_settings_scores_and_delta(tmp_path):
    run = spec("opd", loss="forward_kl_topk", lr=3e-4, steps=4)
    write_inputs(tmp_path, run.name)
    card = card_command(tmp_path, run, "results/models/s/final", "results/models/t/final")

    assert (tmp_path / "model_card.md").read_text() == (tmp_path / "final/README.md").read_text()
    text = card.text
    for expected in (f"`{run.name}`", "kind `opd`", "`results/models/s/final`",
                     "`results/models/t/final`",
                     "| method | OPD: TRL `DistillationTrainer`, `forward_kl_topk` loss |",
                     "adamw, learning rate 0.0003", "| steps | 4 (8 completions per step) |",
                     "| seed | 0 |", "synthetic `addition` task", "digits 2",
                     f"opdgeo {package_version()} (commit ", "## How to use",
                     "- transformers: 5.23.0", "- trl: 1.16.0", "arXiv:2606.13657",
                     "@software{opdgeo,", "docs/study.md"):
        assert expected in text, expected
    assert "OPDTrainer" not in text  # the class is internal: users reproduce with TRL's
    # held-out scores of the last step beside the source's, each with its interval
    assert "| greedy exact match | 0.25 [0.125, 0.375] | 0.75 [0.625, 0.875] |" in text
    assert "| mean@2, temperature 0.6 | 0.125 [0.0625, 0.1875] | 0.625 [0.5625, 0.6875] |" in text
    # the delta's headline numbers, shown as the figures show them (percent)
    assert "| relative norm ‖ΔW‖/‖W_src‖ (%) | 1.23 |" in text
    assert "| unchanged coordinates, \\|ΔW\\| ≤ 1e-5 (%) | 87.5 |" in text
    # the settings as YAML: training, task and evaluation
    settings = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S)[1])
    assert settings["training"]["loss"] == "forward_kl_topk" and settings["evaluation"] == \
        EVALUATION and settings["run"]["name"] == run.name and settings["run"]["teacher"] == "t"

    data = card.data
    assert data.tags == ["trl", "opdgeo", "on-policy-distillation", "opd"]
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.base_model is None  # a local folder is no hub id
    assert data.license == "unknown" and "**Licence:** unknown" in text  # the source has none
    assert metadata_errors(tmp_path / "final" / "README.md") == []
    _, results = model_index_to_eval_results(metadata_load(tmp_path / "final/README.md")
                                             ["model-index"])
    assert [(r.metric_type, r.metric_value, r.metric_args["ci95_low"], r.metric_args["step"])
            for r in results] == [("exact_match", 0.75, 0.625, 4), ("mean@2", 0.625, 0.5625, 4)]


@pytest.mark.parametrize("kind,self_teacher", [("opsd", "source"), ("op2sd", "current")])
def test_card_of_a_self_distillation_run_names_the_model_itself_as_its_teacher(
        tmp_path, kind, self_teacher):
    """OPSD and OP2SD have no teacher model: the student's own model is the teacher, reading
    a privileged context (its frozen source weights, or its current ones)."""
    run = self_distillation_spec(kind, self_teacher)
    assert run.teacher is None
    write_inputs(tmp_path, run.name)
    card = card_command(tmp_path, run, "results/models/s/final")
    weights = "its source's weights, frozen" if self_teacher == "source" else \
        "its current weights"
    whose = "its own" if kind == "opsd" else "another example's"
    assert (f"| teacher | the model itself ({weights}), reading {whose} reference solution in "
            "its prompt |") in card.text
    settings = yaml.safe_load(re.search(r"```yaml\n(.*?)```", card.text, re.S)[1])
    assert settings["run"]["teacher"] == settings["run"]["source"] == "s"
    assert settings["training"]["self_teacher"] == self_teacher
    assert card.data.tags == ["trl", "opdgeo", "on-policy-distillation", kind]
    assert metadata_errors(tmp_path / "final" / "README.md") == []


def test_card_of_a_hub_model_on_a_hub_data_set(tmp_path):
    run = spec("grpo")
    write_inputs(tmp_path, run.name)
    task = {"kind": "math", "train": {"path": "BytedTsinghua-SIA/DAPO-Math-17k", "split": "train"},
            "eval": {"aime24": {"path": "HuggingFaceH4/aime_2024", "split": "train",
                                "revision": "abc123"}}}
    card = card_command(tmp_path, run, "Qwen/Qwen2.5-1.5B@a1b2c3", task=task)
    assert card.data.base_model == "Qwen/Qwen2.5-1.5B"
    assert card.data.base_model_relation == "finetune"
    assert "| source (student) | `Qwen/Qwen2.5-1.5B@a1b2c3` |" in card.text
    assert card.data.datasets == ["BytedTsinghua-SIA/DAPO-Math-17k"]
    assert card.data.tags == ["trl", "opdgeo", "rlvr", "grpo"]
    text = card.text
    assert "| teacher | none |" in text and "| method | RLVR (GRPO): TRL `GRPOTrainer` |" in text
    assert ("`BytedTsinghua-SIA/DAPO-Math-17k` (split train, revision not pinned" in text)
    assert "| data set, held-out: aime24 | `HuggingFaceH4/aime_2024` (split train, revision " \
           "abc123) |" in text
    assert metadata_errors(tmp_path / "final" / "README.md") == []
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {(r.dataset_type, r.dataset_name, r.dataset_revision) for r in results} == {
        ("HuggingFaceH4/aime_2024", "aime24", "abc123")}


def test_the_licence_is_the_sources(tmp_path):
    """Read from the source's own card; a pipeline-built base model's card states this
    repository's licence, so the runs trained from it inherit it."""
    source = tmp_path / "source"
    source.mkdir()
    ModelCard("---\nlicense: apache-2.0\n---\n# source\n").save(source / "README.md")
    run = spec("sft")
    write_inputs(tmp_path, run.name)
    card = card_command(tmp_path, run, source, "results/models/t/final")
    assert card.data.license == "apache-2.0" and "**Licence:**" not in card.text
    assert card.data.tags == ["trl", "opdgeo", "offline-distillation", "sft"]


def test_the_metadata_check_fails_a_card_without_intervals_or_licence(tmp_path):
    """The null: the check above fails what is not Hub-ready."""
    run = spec("opd")
    write_inputs(tmp_path, run.name)
    card_command(tmp_path, run, "results/models/s/final")
    text = (tmp_path / "final" / "README.md").read_text()
    broken = re.sub(r"        ci95_high: .*\n", "", text).replace("license: unknown\n", "")
    (tmp_path / "broken.md").write_text(broken)
    assert metadata_errors(tmp_path / "broken.md") == [
        "no license", "exact_match: no interval around its value",
        "mean@2: no interval around its value"]


@pytest.mark.parametrize("vision", [False, True])
def test_base_model_card_and_its_usage_snippet_runs(tmp_path, tiny_pair, tiny_vl_pair,
                                                    monkeypatch, capsys, vision):
    """A base model's card (what the pipeline built): this repository's licence, its scores,
    and a snippet that loads the checkpoint and answers its prompt."""
    import shutil

    checkpoint = tmp_path / "final"
    shutil.copytree((tiny_vl_pair if vision else tiny_pair)[0], checkpoint)
    model = {"build": {"arch": "qwen2_vl" if vision else "qwen2", "hidden_size": 16},
             "train": {"max_steps": 100, "batch_size": 8, "learning_rate": 1e-3,
                       "stop_at": 0.5, "seed": 3}}
    task = {"kind": "squares", "grid": 2, "colours": 4, "eval_prompts": 4, "seed": 0} \
        if vision else {"kind": "addition", "digits": 2, "eval_prompts": 4, "seed": 0}
    scores("student", 0, 0.5, 0.25).to_csv(tmp_path / "eval.csv", index=False)
    main(["base-model-card", "--name", "student", "--model-spec", json.dumps(model),
          "--task", json.dumps(task), "--evaluation", json.dumps(EVALUATION),
          "--scores", str(tmp_path / "eval.csv"), "--checkpoint", str(checkpoint),
          "--out", str(tmp_path / "model_card.md")])
    card = ModelCard.load(checkpoint / "README.md")
    assert card.data.license == "mit" and card.data.tags == ["trl", "opdgeo", "sft"]
    assert card.data.pipeline_tag == ("image-text-to-text" if vision else "text-generation")
    assert "built from random weights (seed 3)" in card.text
    assert "| greedy exact match | 0.5 [0.375, 0.625] |" in card.text
    assert metadata_errors(checkpoint / "README.md") == []

    snippet = re.search(r"```python\n(.*?)```", card.text, re.S)[1]
    monkeypatch.chdir(checkpoint)
    if vision:  # the picture the snippet opens: one of the task's
        from opdgeo.task import make_task

        make_task(task).eval_examples()[0].image.save("picture.png")
    capsys.readouterr()
    exec(compile(snippet, "usage snippet", "exec"), {})
    assert capsys.readouterr().out.endswith("\n")  # it printed the decoded answer
