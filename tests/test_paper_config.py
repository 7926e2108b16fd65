"""config/paper.yaml: the paper's pairs as runs, its DAG resolved offline, per-pair tasks,
and hub ids read from a warm cache with HF_HUB_OFFLINE=1 (all without hub or GPU)."""

import copy
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from opdgeo.config import (
    ConfigError,
    build_masks,
    build_runs,
    model_reference,
    model_task,
    pair_task,
    run_table,
    split_reference,
)
from opdgeo.kinds import RUN_KINDS
from opdgeo.paper_tables import PAPER_MASK_DENSITY
from opdgeo.resources import PAPER_MODELS, RETRY_GROWTH, GiB, Need, job_resources, model_size
from opdgeo.task import has_images

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCHEMA = str(ROOT / "workflow" / "schemas" / "config.schema.yaml")


@pytest.fixture(scope="module")
def paper():
    config = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    validate(config, SCHEMA)
    return config


def test_paper_pairs_become_the_papers_runs(paper):
    runs = build_runs(paper)
    trained = {name for name, spec in runs.items() if spec.is_trained}
    assert trained == {
        "dsqwen-opd-deepscaler-adamw-s0", "dsqwen-opd-deepscaler-sgd-s0",
        "dsqwen-opd-justrl-adamw-s0", "qwen3-opd-qwen3-4b-base-grpo-adamw-s0",
        "dsqwen-masked-opd-s0", "dsqwen-masked-random-s0", "dsqwen-masked-run-deepscaler-rlvr-s0",
        "qwen25vl-opd-noisyrollout-geo3k-7b-adamw-s0", "qwen25vl-masked-opd-s0",
        "qwen25vl-masked-random-s0", "qwen25vl-masked-run-grpo-s0",
        "qwen25vl-masked-random-grpo-s0", "qwen3-4b-opsd-adamw-s0", "qwen3-4b-op2sd-adamw-s0",
    }
    # The paper's OPSD pair: Qwen3-4B as its own teacher, reading OpenThoughts' solutions.
    opsd = runs["qwen3-4b-opsd-adamw-s0"]
    assert (opsd.source, opsd.teacher) == ("qwen3-4b", None)
    assert opsd.task["train"]["solution"] == "solution" and set(opsd.task["eval"]) == {
        "aime24", "aime25"}
    assert paper["plots"]["paper_match"]["qwen3-4b-opsd-adamw"] == "Qwen3 OPSD"
    external = {name: spec for name, spec in runs.items() if not spec.is_trained}
    assert set(external) == {"qwen-math-offline-distill", "deepscaler-rlvr", "justrl-rlvr",
                             "minicpm-opd", "qwen25vl-grpo"}
    assert external["deepscaler-rlvr"].source == model_reference(paper["models"]["ds-qwen"])
    # The paper's RLVR-mask arm for DS-Qwen: the mask of the external DeepScaleR run.
    mask = build_masks(paper, PAPER_MASK_DENSITY)[runs["dsqwen-masked-run-deepscaler-rlvr-s0"].mask]
    assert (mask.method, mask.run) == ("atol", "deepscaler-rlvr")


    opd = runs["dsqwen-opd-deepscaler-adamw-s0"]
    training = opd.training
    assert training["optimizers"]["adamw"]["learning_rate"] == 1e-6
    assert runs["dsqwen-opd-deepscaler-sgd-s0"].training["optimizers"]["sgd"][
        "learning_rate"] == 1e-2
    assert training["generations_per_prompt"] == 4 and training["save_every"] == 10
    assert training["bf16"] == "on" and training["gradient_checkpointing"]
    # One epoch: every prompt with all its rollouts, once.
    epoch = training["prompts"] * training["generations_per_prompt"] / training["batch_size"]
    assert training["steps"] == pytest.approx(epoch, abs=1)
    assert training["batch_size"] % training["micro_batch_size"] == 0
    assert opd.task["kind"] == "math" and set(opd.task["eval"]) == {"aime24", "aime25"}
    assert paper["evaluation"]["k"] == 16


@pytest.mark.workflow
def test_paper_dag_resolves_offline(paper_dag):
    """`snakemake -n` with hub ids for every model, offline and with an empty cache: ids are
    no files, so nothing waits on them."""
    result = paper_dag
    assert "train_run" in result.stdout and "analyze_run" in result.stdout
    # The default config's tiny models are not merged into the paper's study.
    assert "train_model" not in result.stdout
    # Every given student and teacher is evaluated (the source's score is each gain's base).
    paper = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    for pair in paper["pairs"].values():
        for model in (pair["student"], *pair["teachers"]):
            assert f"results/eval/models/{model}.csv" in result.stdout, model



def test_vision_language_pair_is_the_papers_qwen25vl_run(paper):
    runs, masks = build_runs(paper), build_masks(paper, PAPER_MASK_DENSITY)
    opd = runs["qwen25vl-opd-noisyrollout-geo3k-7b-adamw-s0"]
    assert paper["models"][opd.source]["path"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    training = opd.training
    assert training["generations_per_prompt"] == 1
    assert training["loss"] == "forward_kl_topk" and training["topk"] == 32
    # 10 epochs of Geo3K's training problems, one rollout each.
    assert training["steps"] == pytest.approx(10 * training["prompts"] / training["batch_size"],
                                              abs=1)
    assert has_images(opd.task) and opd.task["train"]["image"] == "images"
    assert opd.task["train"]["path"] == "hiyouga/geometry3k"
    assert set(opd.task["eval"]) == {"geo3k"}
    # The paper's VL masked arms; the GRPO mask comes from the external reference run.
    grpo = runs["qwen25vl-grpo"]
    assert grpo.source == model_reference(paper["models"][opd.source])
    assert masks[runs["qwen25vl-masked-run-grpo-s0"].mask].run == "qwen25vl-grpo"
    random_grpo = masks[runs["qwen25vl-masked-random-grpo-s0"].mask]
    assert (random_grpo.method, random_grpo.run) == ("random_like", "qwen25vl-grpo")
    assert paper["plots"]["paper_match"]["qwen25vl-grpo"] == ""  # no VL row in the paper
    table = run_table(runs).set_index("run")
    assert table.loc[opd.name, "modality"] == "vision-language"
    assert table.loc["dsqwen-opd-deepscaler-adamw-s0", "modality"] == "language"


def test_pair_task_overrides_the_global_one(paper):
    config = copy.deepcopy(paper)
    config["pairs"]["qwen3"]["task"] = {"max_new_tokens": 4096}
    config["pairs"]["toy"] = {"student": "ds-qwen", "teachers": ["deepscaler"],
                              "task": {"kind": "addition", "digits": 2}}
    qwen3 = pair_task(config, "qwen3")
    assert qwen3["max_new_tokens"] == 4096 and qwen3["train"] == paper["task"]["train"]
    assert pair_task(config, "toy") == {"kind": "addition", "digits": 2}  # another kind: whole
    assert pair_task(config, "dsqwen") == paper["task"]
    runs = build_runs(config)
    assert runs["qwen3-opd-qwen3-4b-base-grpo-adamw-s0"].task["max_new_tokens"] == 4096
    assert runs["toy-opd-deepscaler-adamw-s0"].task["kind"] == "addition"
    assert model_task(config, "qwen3-1.7b-base")["max_new_tokens"] == 4096
    validate(config, SCHEMA)


def test_hub_ids_load_from_a_warm_cache_offline(tmp_path, make_checkpoint):
    """A hub id resolves through the local cache with HF_HUB_OFFLINE=1, for training
    (from_pretrained) and for the delta analysis (opdgeo.delta.io) alike."""
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    make_checkpoint(snapshot, seed=0)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    script = textwrap.dedent("""
        from opdgeo.delta.io import Checkpoint, resolved_commit
        from opdgeo.models import load_model, load_tokenizer
        model, tokenizer = load_model("org/tiny"), load_tokenizer("org/tiny")
        names = Checkpoint("org/tiny").names()
        assert len(names) == len(dict(model.named_parameters())), names
        # Pinned to a commit (models.<key>.revision): the same weights, and the commit read.
        pinned = "org/tiny@" + "0" * 40
        load_model(pinned), load_tokenizer(pinned)
        assert resolved_commit(Checkpoint(pinned).path) == "0" * 40
        assert resolved_commit(Checkpoint("org/tiny").path) == "0" * 40
        print("ok", len(tokenizer))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": str(ROOT / "scripts")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_a_mask_from_an_external_run_on_another_source_is_refused(paper):
    config = copy.deepcopy(paper)
    config["pairs"]["dsqwen"]["masked"]["arms"] = ["run:qwen-math-offline-distill"]
    with pytest.raises(ConfigError, match="not the pair's student"):
        build_runs(config)


def test_every_prompt_template_formats_a_problem(paper):
    # A literal brace (Geo3K's \boxed{}) must be doubled, or str.format fails on the first row.
    tasks = [paper["task"]] + [p["task"] for p in paper["pairs"].values() if "task" in p]
    for task in tasks:
        for spec in [task["train"], *task.get("eval", {}).values()]:
            if "template" in spec:
                assert "PROBLEM" in spec["template"].format(problem="PROBLEM")
            if "privileged_template" in spec:  # the self-distillation teacher's message
                text = spec["privileged_template"].format(prompt="PROMPT", context="SOLUTION")
                assert text.index("PROMPT") < text.index("SOLUTION") and "boxed{}" in text


def test_every_reproduced_paper_row_is_matched_to_exactly_one_run(paper):
    from opdgeo.paper_tables import PAPER_GLOBAL, paper_match
    from opdgeo.tidy import run_info

    info = run_info(run_table(build_runs(paper)),
                    {name: spec["kind"] for name, spec in paper["external"].items()})
    match = paper_match(info, paper["plots"]["paper_match"])
    by_row = {}
    for run, row in match.items():
        by_row.setdefault(row, []).append(run)
    assert set(by_row) == set(PAPER_GLOBAL)
    assert all(len(runs) == 1 for runs in by_row.values()), by_row
    assert by_row["Qwen-Math offline distill"] == ["qwen-math-offline-distill"]
    assert by_row["MiniCPM OPD"] == ["minicpm-opd"]
    assert by_row["Qwen3 OPSD"] == ["qwen3-4b-opsd-adamw-s0"]  # not its OP2SD control


def test_every_hub_model_and_data_set_is_pinned_to_a_revision(paper):
    """A rerun a month later must read the same weights and data: every hub id names a
    revision, and the stages read `org/name@revision`."""
    hub_id = r"(?!checkpoints/)[\w.-]+/[\w.-]+"  # checkpoints/...: the user's own folders
    for key, spec in paper["models"].items():
        if re.fullmatch(hub_id, spec["path"]) and not Path(spec["path"]).exists():
            assert spec.get("revision"), key
            assert model_reference(spec) == f"{spec['path']}@{spec['revision']}"
    for name, spec in paper["external"].items():
        for side in ("source", "trained"):
            if re.fullmatch(hub_id, spec[side]):
                assert spec.get(f"{side}_revision"), (name, side)
    runs = build_runs(paper)
    assert runs["deepscaler-rlvr"].source == model_reference(paper["models"]["ds-qwen"])
    tasks = [paper["task"]] + [p["task"] for p in paper["pairs"].values() if "task" in p]
    for task in tasks:
        for spec in [task["train"], *task.get("eval", {}).values()]:
            assert spec.get("revision"), spec["path"]
    table = run_table(runs, paper["models"]).set_index("run")
    assert table.loc["dsqwen-opd-deepscaler-adamw-s0", "source_revision"] == \
        paper["models"]["ds-qwen"]["revision"]
    assert table.loc["deepscaler-rlvr", "trained_revision"] == \
        paper["external"]["deepscaler-rlvr"]["trained_revision"]
    assert split_reference("org/name@abc123") == ("org/name", "abc123")
    assert split_reference("checkpoints/folder") == ("checkpoints/folder", None)


def paper_dry_run(tmp_path, *args) -> subprocess.CompletedProcess:
    """`snakemake -n -p` of config/paper.yaml in a copy of the workflow, offline, with an
    empty Hugging Face cache (the paper's models sized from config/hub_models.yaml)."""
    for folder in ("workflow", "config", "scripts", "envs", "slurm"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    env.pop("SNAKEMAKE_SLURM_PARTITIONS", None)
    return subprocess.run([str(BIN / "snakemake"), *args, "-n", "-p", "--configfile",
                           "config/paper.yaml"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def paper_dag(tmp_path_factory) -> subprocess.CompletedProcess:
    """The paper's whole DAG as a dry run, made once for the tests that read it."""
    result = paper_dry_run(tmp_path_factory.mktemp("paper_dag"), "--cores", "8")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def dry_run_jobs(stdout: str) -> list[dict]:
    """rule, wildcards, resources and shell command of every job of `snakemake -n -p`."""
    jobs = []
    for block in stdout.split("\nrule ")[1:]:
        job = {"rule": block.split(":", 1)[0], "wildcards": {}, "resources": {}}
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("wildcards: "):
                job["wildcards"] = dict(kv.split("=", 1) for kv in line[11:].split(", "))
            elif line.startswith("resources: "):
                job["resources"] = dict(kv.split("=", 1) for kv in line[11:].split(", "))
            elif line.startswith("Shell command: "):
                job["shell"] = line[15:]
        jobs.append(job)
    return jobs


@pytest.mark.workflow
def test_paper_jobs_ask_for_what_their_models_need(paper_dag, paper):
    """Every job of the paper's DAG: a command that names cuda has a GPU, and memory at least
    what the paper's models need (fp32 student, its gradients and AdamW state on the GPU, the
    bf16 teacher, a checkpoint in fp32 for evaluation, the largest tensor for the analysis)."""
    result = paper_dag
    jobs = [job for job in dry_run_jobs(result.stdout) if "shell" in job]
    runs, path = build_runs(paper), {key: spec["path"] for key, spec in paper["models"].items()}

    def paper_size(model):  # a model key, or a given checkpoint org/name@revision
        return PAPER_MODELS.get(split_reference(path.get(model, model))[0])

    assert {job["rule"] for job in jobs} >= {"train_run", "evaluate_run", "evaluate_model",
                                             "analyze_run", "make_mask", "overlap"}
    sized = []
    for job in jobs:
        resources, shell = job["resources"], job["shell"]
        assert "--device cuda" not in shell or int(resources.get("gpu", 0)) >= 1, job
        if int(resources.get("gpu", 0)) >= 1:
            assert "--device cpu" not in shell, job
        mem = int(resources.get("mem_mb", 0)) * 2**20
        wildcards = job["wildcards"]
        if job["rule"] == "train_run":
            spec = runs[wildcards["run"]]
            # a self-distillation run's teacher is a frozen copy of its source
            teacher = spec.source if RUN_KINDS[spec.kind].privileged else spec.teacher
            student, teacher = paper_size(spec.source), paper_size(teacher)
            if student and teacher:  # one copy of each on the host while loading
                assert mem >= 4 * student.params + 2 * teacher.params, job
                sized.append(job["rule"])
            assert int(resources["runtime"]) >= 60, job
        elif job["rule"] in ("evaluate_run", "evaluate_model"):
            key = runs[wildcards["run"]].source if "run" in wildcards else wildcards["model"]
            size = paper_size(key)
            if size:
                assert mem >= 4 * size.params, job
                sized.append(job["rule"])
        elif job["rule"] == "analyze_run":
            source = runs[wildcards["run"]].source
            size = paper_size(source)
            if size:
                assert mem >= 3 * 4 * size.largest + GiB, job
                sized.append(job["rule"])
    # Every training job of a pair whose models the table knows (all but qwen3, whose teacher
    # is the user's own folder), and every analysis of those.
    trained = [spec for spec in runs.values() if spec.is_trained]
    assert sized.count("train_run") == len(trained) - 1 >= 10, sized
    assert sized.count("analyze_run") >= len(trained) - 1, sized
    # One decomposition per source, read by every analysis on it; main runs draw trajectories.
    decompositions = {job["wildcards"]["source"] for job in jobs
                      if job["rule"] == "decompose_source"}
    analyses = [job for job in jobs if job["rule"] == "analyze_run"]
    read = {job["shell"].split("--source-geometry results/sources/")[1].split()[0]
            for job in analyses}
    assert read == decompositions and len(decompositions) < len(analyses), (read, decompositions)
    for job in analyses:
        spec = runs[job["wildcards"]["run"]]
        assert ("--checkpoints" in job["shell"]) == (spec.is_trained and spec.group == "main"
                                                     and RUN_KINDS[spec.kind].delta_method)
    # The teacher of the qwen3 pair is a folder the user provides: sized once it is there.
    assert "cannot size the jobs that load checkpoints/Qwen3-4B-Base-GRPO" in result.stderr
    with pytest.raises(ValueError, match="Put the checkpoint at checkpoints/Qwen3-4B-Base-GRPO"):
        model_size("checkpoints/Qwen3-4B-Base-GRPO")
    with pytest.raises(ValueError, match=r"hf download nobody/none --revision abc1\)"):
        model_size("nobody/none@abc1")


@pytest.mark.workflow
def test_a_job_with_a_gpu_runs_on_cuda_and_retries_ask_for_more(tmp_path):
    """set-resources moves an analysis job onto a GPU (and its command onto cuda); a retry's
    memory and runtime grow with Snakemake's attempt."""
    result = paper_dry_run(tmp_path, "results/analysis/deepscaler-rlvr/final/summary.json",
                           "--cores", "2", "--set-resources", "analyze_run:gpu=1")
    [job] = [job for job in dry_run_jobs(result.stdout) if job["rule"] == "analyze_run"]
    assert job["resources"]["gpu"] == "1" and "--device cuda" in job["shell"], job
    need = Need(10 * GiB, 0, 100.0)
    first, second = job_resources(need, 1), job_resources(need, 2)
    assert second["mem_mb"] >= first["mem_mb"] * RETRY_GROWTH - 1
    assert second["runtime"] >= first["runtime"] * RETRY_GROWTH - 1


@pytest.mark.workflow
def test_four_gpus_per_training_job_keep_gpu_partitions_and_memory(tmp_path):
    """The README's multi-GPU command as a dry run through the SLURM profile: every job with
    GPUs is on a partition with that many GPUs per node, the others on a CPU partition, each
    request within its partition's limits; training jobs get 4 GPUs, one process each, and
    the host memory of 4 processes; a pair that sets its own GPUs (sharded) keeps them."""
    from opdgeo.resources import read_partitions

    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    own = {pair: spec["training"]["gpus"] for pair, spec in paper["pairs"].items()
           if "gpus" in spec.get("training", {})}
    assert own, "config/paper.yaml shards no pair"

    limits = {p.name: p.limits for p in read_partitions(ROOT / "slurm" / "partitions.yaml")}
    runs = {}
    for gpus in (1, 4):
        (tmp_path / str(gpus)).mkdir()
        result = paper_dry_run(tmp_path / str(gpus), "--profile", "slurm",
                               "--config", f"training={{gpus: {gpus}}}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        jobs = [job for job in dry_run_jobs(result.stdout) if "shell" in job]
        for job in jobs:
            resources = job["resources"]
            if "slurm_partition" not in resources:  # the plugin places it: not model-sized
                assert int(resources.get("gpu", 0)) == 0, job
                continue
            partition = limits[resources["slurm_partition"]]
            gpu = int(resources["gpu"])
            assert partition.max_gpu >= gpu and (gpu > 0) == (partition.max_gpu > 0), job
            assert int(resources["runtime"]) <= partition.max_runtime, job
            assert int(resources["mem_mb"]) <= partition.max_mem_mb, job
            if job["rule"] in ("evaluate_run", "evaluate_model"):
                assert gpu == 1, job
        runs[gpus] = {job["wildcards"]["run"]: job for job in jobs if job["rule"] == "train_run"}
    assert runs[1] and set(runs[1]) == set(runs[4])
    for run, job in runs[4].items():
        pair = next((p for p in own if run.startswith(f"{p}-")), None)
        if pair is not None:
            assert job["resources"]["gpu"] == runs[1][run]["resources"]["gpu"] == str(own[pair])
            assert (f"accelerate launch --multi_gpu --num_processes {own[pair]} -m opdgeo.cli "
                    "train-run") in job["shell"], job
            continue
        assert job["resources"]["gpu"] == "4", job
        assert "accelerate launch --multi_gpu --num_processes 4 -m opdgeo.cli train-run" in (
            job["shell"]), job
        one = int(runs[1][run]["resources"]["mem_mb"])
        if "qwen3" not in run:  # its teacher is the user's folder: a fixed fallback size
            assert int(job["resources"]["mem_mb"]) >= 4 * one - 4, (job, one)
