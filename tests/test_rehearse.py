"""The rehearsal of config/paper.yaml: derived from it, stand-ins true to the real models' facts.
The rehearsal itself runs end to end through SLURM in tests/test_slurm.py."""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from opdgeo.config import build_masks, build_runs
from opdgeo.data import load_examples
from opdgeo.hub_models import hub_models
from opdgeo.rehearse import (
    LEARNING_RATE_SCALE,
    RehearsalError,
    rehearsal_config,
    rehearse,
    slug,
    study_models,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "config" / "paper.yaml"


@pytest.fixture(scope="module")
def paper():
    return yaml.safe_load(PAPER.read_text())


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    return yaml.safe_load(rehearse(PAPER, out).read_text()), out


def test_the_rehearsal_has_the_papers_runs_masks_and_settings(paper, tmp_path):
    config = rehearsal_config(paper, tmp_path)
    assert list(build_runs(config)) == list(build_runs(paper))
    assert {n: (m.method, m.run) for n, m in build_masks(config).items()} == \
        {n: (m.method, m.run) for n, m in build_masks(paper).items()}
    assert config["analysis"] == paper["analysis"] and config["plots"] == paper["plots"]
    assert config["evaluation"]["temperature"] == paper["evaluation"]["temperature"]
    for pair, spec in paper["pairs"].items():
        assert set(spec.get("task", {}).get("eval", {})) == \
            set(config["pairs"][pair].get("task", {}).get("eval", {}))
    opd = build_runs(config)["dsqwen-opd-deepscaler-adamw-s0"].training
    assert opd["steps"] == 2 and opd["use_vllm"] is False and config["device"] == "cpu"
    assert opd["optimizers"]["adamw"]["learning_rate"] == pytest.approx(
        paper["training"]["optimizers"]["adamw"]["learning_rate"] * LEARNING_RATE_SCALE)
    assert opd["loss"] == paper["training"]["loss"] and opd["gradient_checkpointing"]
    vl = build_runs(config)["qwen25vl-opd-noisyrollout-geo3k-7b-adamw-s0"].training
    assert vl["generations_per_prompt"] == 1 and vl["loss"] == "forward_kl_topk"
    # A change to the study is a change to the rehearsal.
    edited = copy.deepcopy(paper)
    edited["pairs"]["dsqwen"]["masked"]["arms"].append("random:deepscaler-rlvr")
    assert "dsqwen-masked-random-deepscaler-rlvr-s0" in build_runs(
        rehearsal_config(edited, tmp_path))


def test_a_model_or_data_set_without_a_stand_in_is_an_error(paper, tmp_path):
    edited = copy.deepcopy(paper)
    edited["models"]["ds-qwen"]["path"] = "org/unknown-model"
    with pytest.raises(RehearsalError, match="org/unknown-model.*hub_models.yaml"):
        rehearsal_config(edited, tmp_path)
    edited = copy.deepcopy(paper)
    edited["task"]["train"]["path"] = "org/unknown-data"
    with pytest.raises(RehearsalError, match="org/unknown-data.*DATA_SETS"):
        rehearsal_config(edited, tmp_path)


def _stored(folder: Path) -> tuple[dict, list[str]]:
    config = json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return config, {name: handle.get_tensor(name) for name in handle.keys()}


def test_stand_ins_keep_the_real_models_facts(paper, rehearsal):
    config, out = rehearsal
    for hub_id in study_models(paper):
        facts = hub_models()[hub_id]
        model_config, tensors = _stored(out / "models" / slug(hub_id))
        text = model_config.get("text_config", model_config)
        assert model_config["model_type"] == facts.arch, hub_id
        assert text.get("tie_word_embeddings", model_config.get("tie_word_embeddings")) == \
            facts.tied, hub_id
        assert any(n.endswith("lm_head.weight") for n in tensors) != facts.tied, hub_id
        assert all(t.dtype == torch.bfloat16 for t in tensors.values()), hub_id
        if facts.arch == "qwen2_5_vl":
            assert any(n.startswith("model.visual.merger.") or n.startswith("visual.merger.")
                       for n in tensors), hub_id
        if facts.parent:  # a sparse update of the checkpoint it was trained from
            _, parent = _stored(out / "models" / slug(facts.parent))
            name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
            changed = (tensors[name] != parent[name]).float().mean()
            assert 0 < changed < 0.5, hub_id
    # Teacher and student of every pair share one vocabulary.
    for pair in config["pairs"].values():
        vocabularies = {(Path(config["models"][key]["path"]) / "tokenizer.json").read_text()
                        for key in (pair["student"], *pair["teachers"])}
        assert len(vocabularies) == 1


def test_data_sets_are_written_in_their_real_schemas(rehearsal):
    config, _ = rehearsal
    dapo = load_examples(config["task"]["train"])
    assert dapo and dapo[0].prompt[0]["role"] == "user" and dapo[0].answer.isdigit()
    aime = load_examples(config["task"]["eval"]["aime24"])
    assert "Answer:" in aime[0].prompt[0]["content"]  # the DAPO template of the paper config
    geo3k = load_examples(config["pairs"]["qwen25vl"]["task"]["eval"]["geo3k"])
    assert geo3k[0].image is not None and "<image>" not in geo3k[0].prompt[0]["content"]
    # OPSD's data: each problem with its reference solution, the self-teacher's context
    opsd = config["pairs"]["qwen3-4b"]["task"]["train"]
    openthoughts = load_examples(opsd)
    assert openthoughts and all(e.context and "boxed" in e.context for e in openthoughts)
    assert openthoughts[0].prompt[0]["content"].startswith("Problem: ")


def test_a_study_that_is_not_valid_yaml_is_one_line_naming_where(tmp_path, capsys):
    from opdgeo.cli import main

    study = tmp_path / "study.yaml"
    study.write_text("training: [\n")
    with pytest.raises(SystemExit):
        main(["rehearse", str(study), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert "not valid YAML" in error and "line 2" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
