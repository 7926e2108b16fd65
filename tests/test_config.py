import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opdgeo.config import (
    RUN_SECTIONS,
    ConfigError,
    build_masks,
    build_runs,
    read_config_file,
    run_table,
    validate_config,
)
from opdgeo.models import VISION_ARCHITECTURES
from opdgeo.paper_tables import PAPER_MASK_DENSITY
from opdgeo.task import has_images

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "workflow" / "schemas" / "config.schema.yaml")
CONFIGS = ["config/config.yaml", "config/smoke.yaml"]


def load(name):
    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(config, SCHEMA)
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate_and_expand(name):
    config = load(name)
    runs = build_runs(config)
    kinds = {spec.kind for spec in runs.values()}
    assert {"opd", "sft", "grpo", "masked"} <= kinds
    for mask in build_masks(config, PAPER_MASK_DENSITY).values():
        assert mask.run in runs


def test_default_study_matches_its_design():
    config = load("config/config.yaml")
    runs = {n: s for n, s in build_runs(config).items() if s.pair == "addition"}
    opd_teachers = {s.teacher for s in runs.values() if s.kind == "opd"}
    assert len(opd_teachers) >= 2  # two teachers distil into one source
    assert len({s.source for s in runs.values() if s.is_trained}) == 1
    for key in opd_teachers | {s.source for s in runs.values()}:
        build = config["models"][key]["build"]
        head_dim = build["hidden_size"] // build["num_attention_heads"]
        smallest = min(build["hidden_size"], build["intermediate_size"],
                       build.get("num_key_value_heads", build["num_attention_heads"]) * head_dim)
        assert smallest >= 128, key


# The default runs the paper's VL appendix (OPD, the RLVR control, their masks); the smoke
# config keeps OPD and its mask only (tests/test_vision.py trains every other VL run kind).
@pytest.mark.parametrize(("name", "kinds"), [
    ("config/config.yaml", {"opd", "sft", "grpo", "masked"}),
    ("config/smoke.yaml", {"opd", "masked"}),
])
def test_shipped_configs_have_a_vision_language_pair(name, kinds):
    config = load(name)
    runs = build_runs(config)
    vl = [s for s in runs.values() if s.is_trained and has_images(s.task)]
    assert {s.kind for s in vl} >= kinds
    for key in {s.source for s in vl} | {s.teacher for s in vl}:
        assert config["models"][key]["build"]["arch"] in VISION_ARCHITECTURES, key
    masks = build_masks(config, PAPER_MASK_DENSITY)
    arms = {masks[s.mask].run for s in vl if s.kind == "masked"}
    if "grpo" in kinds:
        assert any("-grpo-" in run for run in arms)  # the RLVR control's mask


def test_mask_of_an_external_run_on_the_same_source():
    config = load("config/smoke.yaml")
    config["external"] = {"addition-rl": {"source": "x", "trained": "y"}}
    config["pairs"]["addition"]["masked"]["arms"] = ["run:rl", "random:rl"]
    runs, masks = build_runs(config), build_masks(config, PAPER_MASK_DENSITY)
    assert masks[runs["addition-masked-run-rl-s0"].mask].run == "addition-rl"
    assert masks[runs["addition-masked-random-rl-s0"].mask].method == "random_like"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(trainig={}), "trainig"),  # a misspelt top-level key
        (lambda c: c["training"].update(stpes=3), "stpes"),
        (lambda c: c["training"].update(steps="many"), "many"),
        (lambda c: c["training"].update(loss="kl"), "kl"),
        (lambda c: c["models"]["student"]["build"].update(arch="gpt"), "gpt"),
        (lambda c: c["pairs"]["squares"]["task"].update(grid=5), "5"),
        (lambda c: c["training"]["optimizers"].update(adam={"learning_rate": 1}), "adam"),
        (lambda c: c.update(preload="maybe"), "maybe"),
        # The analysis measures at the study's fixed thresholds (0 and 1e-5, both reported):
        # an `analysis.atol` would do nothing, so it is refused, not ignored.
        (lambda c: c.setdefault("analysis", {}).update(atol=1e-4), "atol"),
        (lambda c: c["training"].update(sharding="zero3"), "zero3"),
    ],
)
def test_schema_rejects_bad_configs(edit, message):
    config = copy.deepcopy(load("config/smoke.yaml"))
    edit(config)
    with pytest.raises(ConfigError, match=message) as error:
        validate_config(config, SCHEMA)
    assert len(str(error.value).splitlines()) == 1  # the line that matters, not the schema


def test_sharding_needs_more_than_one_gpu():
    config = copy.deepcopy(load("config/smoke.yaml"))
    config["pairs"]["addition"].setdefault("training", {})["sharding"] = "fsdp"
    with pytest.raises(ConfigError, match=r"pairs.addition: training.sharding: fsdp .* "
                                          r"training.gpus is 1: set training.gpus to 2"):
        build_runs(config)
    config["pairs"]["addition"]["training"]["gpus"] = 2
    assert all(spec.training["sharding"] == "fsdp" for spec in build_runs(config).values()
               if spec.pair == "addition")


@pytest.mark.parametrize(("given", "read"), [
    ("false", False), ("False", False), ("no", False), ("off", False),
    ("true", True), ("True", True), ("yes", True), ("on", True),
])
def test_booleans_given_as_strings_by_snakemake_config_are_read(given, read):
    # `snakemake --config preload=false` and nested keys from a YAML dump arrive as strings.
    config = copy.deepcopy(load("config/smoke.yaml"))
    config["preload"] = given
    config["training"]["keep_fp32"] = given
    config["pairs"]["addition"].setdefault("training", {})["gradient_checkpointing"] = given
    validate_config(config, SCHEMA)
    assert config["preload"] is read and config["training"]["keep_fp32"] is read
    assert config["pairs"]["addition"]["training"]["gradient_checkpointing"] is read


def test_a_yaml_error_names_its_line_and_column(tmp_path, monkeypatch):
    from opdgeo.cli import main

    bad = tmp_path / "study.yaml"
    bad.write_text("device: cpu\ntraining:\n  steps: 3\n  seeds: [0, 1\n")
    with pytest.raises(ConfigError, match=r"study.yaml: .*flow sequence at line 4, column 10"):
        read_config_file(bad)
    # as `make reproduce` checks CONFIG before Snakemake reads it
    check = check_file([bad])
    assert check.returncode == 1 and "line 4, column 10" in check.stderr
    # every shipped config passes, its masks at the paper's densities resolved (the same
    # command in this process: a failing check raises SystemExit)
    monkeypatch.chdir(ROOT)
    for shipped in ("config/smoke.yaml", "config/config.yaml", "config/paper.yaml"):
        main(["check-config", shipped])


def check_file(path, cwd=None) -> subprocess.CompletedProcess:
    """`opdgeo check-config PATH`, as `make reproduce` runs it before Snakemake."""
    return subprocess.run([sys.executable, "-m", "opdgeo.cli", "check-config", *map(str, path)],
                          cwd=cwd, capture_output=True, text=True)


REFERENCE_ERRORS = {
    "unknown teacher": (lambda pair: pair["teachers"].append("teacher-z"), "teacher-z"),
    "own teacher": (lambda pair: pair["teachers"].insert(0, pair["student"]), "is the student"),
}


@pytest.mark.parametrize("error", REFERENCE_ERRORS)
def test_the_config_check_makes_the_checks_of_a_dry_run(tmp_path, error):
    edit, message = REFERENCE_ERRORS[error]
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    edit(config["pairs"]["addition"])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    check = check_file([path])
    assert check.returncode == 1 and message in check.stderr, check.stderr


def test_a_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text((ROOT / "config/smoke.yaml").read_text() + "\ndevice: cuda\n")
    line = path.read_text().count("\n")
    with pytest.raises(ConfigError, match=rf"key 'device' twice .* at line {line}, column 1"):
        read_config_file(path)
    check = check_file([path])
    assert check.returncode == 1 and "'device' twice" in check.stderr


@pytest.mark.workflow
def test_a_dry_run_rejects_a_key_given_twice(tmp_path):
    from test_pipeline import copy_workflow

    copy_workflow(tmp_path)
    path = tmp_path / "study.yaml"
    path.write_text((ROOT / "config/smoke.yaml").read_text() + "\ndevice: cuda\n")
    dry = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n",
                          "--configfile", str(path)], cwd=tmp_path, capture_output=True,
                         text=True)
    assert dry.returncode != 0 and "'device' twice" in dry.stdout + dry.stderr


def test_the_config_check_without_a_file_prints_its_usage():
    check = check_file([])
    assert check.returncode == 2 and check.stderr.startswith("usage: opdgeo check-config")
    assert "Traceback" not in check.stderr


@pytest.mark.parametrize("name", CONFIGS)
def test_runs_are_made_of_the_run_sections_alone(name):
    """The runs table gets these sections only, so a switch like preload reruns nothing."""
    config = load(name)
    runs = build_runs({k: v for k, v in config.items() if k in RUN_SECTIONS})
    assert run_table(runs, config["models"]).equals(run_table(build_runs(config),
                                                              config["models"]))
    assert "preload" in config and "preload" not in RUN_SECTIONS


def test_unknown_model_reference_names_the_fix():
    config = load("config/smoke.yaml")
    config["pairs"]["addition"]["teachers"] = ["teacher-a", "teacher-z"]
    with pytest.raises(ConfigError, match="teacher-z.*not a key of `models`"):
        build_runs(config)


@pytest.mark.parametrize("same", ["key", "path"])
def test_a_model_cannot_be_its_own_teacher(same):
    config = load("config/smoke.yaml")
    pair = config["pairs"]["addition"]
    if same == "key":
        pair["teachers"] = [pair["student"], *pair["teachers"]]
    else:  # two keys, one checkpoint
        config["models"][pair["student"]] = {"path": "org/model"}
        config["models"]["twin"] = {"path": "org/model"}
        pair["teachers"] = [*pair["teachers"], "twin"]
    with pytest.raises(ConfigError, match="is the student.*privileged-context teacher"):
        build_runs(config)


def test_bad_mask_arm_is_rejected():
    config = load("config/smoke.yaml")
    config["pairs"]["addition"]["masked"]["arms"] = ["run:nonexistent"]
    with pytest.raises(ConfigError, match="nonexistent"):
        build_runs(config)


def test_schema_enums_are_the_run_kind_registry():
    """The schema lists the kinds a config may name; opdgeo.kinds declares them."""
    from opdgeo import kinds

    schema = yaml.safe_load(Path(SCHEMA).read_text())["properties"]
    pair = schema["pairs"]["additionalProperties"]["properties"]
    assert pair["controls"]["items"]["enum"] == list(kinds.CONTROLS)
    assert pair["controls"]["default"] == list(kinds.DEFAULT_CONTROLS)
    assert set(pair["sweep"]["properties"]["kinds"]["items"]["enum"]) == set(kinds.SWEEP_KINDS)
    external = schema["external"]["additionalProperties"]["properties"]["kind"]
    assert set(external["enum"]) == set(kinds.EXTERNAL_METHODS)
    assert external["default"] == kinds.OTHER
    assert set(kinds.SWEEP_KINDS) == set(kinds.TRAINED_METHODS)


def test_masked_arms_train_every_seed_from_that_seed_s_runs():
    config = {
        "models": {"t": {"path": "t"}, "s": {"path": "s"}},
        "training": {"seeds": [0, 1, 2], "optimizers": {"sgd": {"learning_rate": 1e-3}}},
        "pairs": {"p": {"student": "s", "teachers": ["t"], "controls": ["grpo"],
                        "masked": {"seeds": [0, 1, 2],
                                   "arms": ["opd", "random", "run:grpo", "top:0.1"]}}},
    }
    runs, masks = build_runs(config), build_masks(config, PAPER_MASK_DENSITY)
    for arm, source in (("opd", "p-opd-t-sgd"), ("random", "p-opd-t-sgd"),
                        ("run-grpo", "p-grpo-sgd"), ("top-0.1", "p-opd-t-sgd")):
        for seed in (0, 1, 2):
            mask = masks[runs[f"p-masked-{arm}-s{seed}"].mask]
            assert (mask.run, mask.seed) == (f"{source}-s{seed}", seed)


def test_self_distillation_runs_and_their_bad_configs():
    config = load("config/smoke.yaml")
    config["pairs"]["addition"]["controls"] = ["grpo", "opsd", "op2sd"]
    runs = build_runs(config)
    opsd = runs["addition-opsd-sgd-s0"]
    assert (opsd.kind, opsd.teacher, runs["addition-op2sd-sgd-s0"].kind) == ("opsd", None, "op2sd")
    # a pair without teachers self-distils only
    config["pairs"]["solo"] = {"student": "student", "teachers": [], "controls": ["opsd"]}
    assert [r for r in build_runs(config) if r.startswith("solo-")] == ["solo-opsd-sgd-s0"]
    for bad, message in [({"controls": ["opsd", "sft"]}, "self-distillation only"),
                         ({"controls": []}, "self-distillation only"),
                         ({"task": {"kind": "squares"}}, "has none: give task.train a `solution`"),
                         ({"training": {"loss": "sampled_k1", "kl_clip": 0.05}}, "kl_clip")]:
        broken = copy.deepcopy(config)
        broken["pairs"]["solo"].update(bad)
        with pytest.raises(ConfigError, match=message):
            build_runs(broken)


def test_masks_at_the_papers_densities():
    """`paper` is the paper's density of that mask, read once (config/paper_reference.yaml):
    the OPD mask's for the primary run, the RLVR mask's for the GRPO control; the random arms
    at the same densities."""
    config = {
        "models": {"t": {"path": "t"}, "s": {"path": "s"}},
        "training": {"seeds": [0], "optimizers": {"sgd": {"learning_rate": 1e-3}}},
        "pairs": {"p": {"student": "s", "teachers": ["t"], "controls": ["sft", "grpo"],
                        "masked": {"arms": ["top:paper", "random:paper", "top:grpo:paper",
                                            "random:grpo:paper", "top:0.3"]}}},
    }
    runs, masks = build_runs(config), build_masks(config, PAPER_MASK_DENSITY)
    expected = {"top-paper": ("top", "p-opd-t-sgd-s0", PAPER_MASK_DENSITY["opd"] / 100),
                "random-paper": ("random_density", "p-opd-t-sgd-s0",
                                 PAPER_MASK_DENSITY["opd"] / 100),
                "top-grpo-paper": ("top", "p-grpo-sgd-s0", PAPER_MASK_DENSITY["run-grpo"] / 100),
                "random-grpo-paper": ("random_density", "p-opd-t-sgd-s0",
                                      PAPER_MASK_DENSITY["run-grpo"] / 100),
                "top-0.3": ("top", "p-opd-t-sgd-s0", 0.3)}
    for arm, (method, run, density) in expected.items():
        mask = masks[runs[f"p-masked-{arm}-s0"].mask]
        assert (mask.method, mask.run) == (method, run), arm
        assert mask.density == pytest.approx(density), arm
    with pytest.raises(ConfigError, match="densities are needed"):
        build_masks(config)
    config["pairs"]["p"]["masked"]["arms"] = ["top:sft:paper"]  # the paper has no SFT mask
    with pytest.raises(ConfigError, match="primary OPD run and an RLVR run only"):
        build_runs(config)
    config["pairs"]["p"]["masked"]["arms"] = ["top:1.5"]
    with pytest.raises(ConfigError, match=r"fraction in \(0, 1\]"):
        build_runs(config)


def test_only_some_checkpoints_are_evaluated():
    config = load("config/config.yaml")
    runs = build_runs(config)
    opd = runs["addition-opd-teacher-a-sgd-s0"]
    assert opd.checkpoint_steps() == [20, 40, 60, 80]  # all analysed (the trajectory)
    assert opd.evaluated_steps() == [60]  # and the final one
    config["training"]["evaluate_every"] = 30
    with pytest.raises(ConfigError, match="multiple of save_every"):
        build_runs(config)
