"""What the shipped SLURM profile asks sbatch for, read back from recording fake SLURM
commands (no SLURM, no GPU needed): the GPU, CPUs, memory and runtime a rule declares, under
the shipped profile and under a site's own.

Apart from tests/test_slurm.py (whose helpers these use) so that pytest-xdist runs them in
the other worker while that module's one runs the rehearsal on the real cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_slurm import (
    SITE_PARTITIONS,
    SITE_PROFILE,
    SMOKE,
    copy_repo,
    fake_slurm_bin,
    link_profile,
    option,
    recorded_sbatch_calls,
    snakemake,
    workflow_env,
    workflow_ready,
)

# --- A rule's GPU request ---------------------------------------------------------------------

GPU_SNAKEFILE = """
rule all:
    input: "trained.txt", "analysed.txt"

rule train:
    output: "trained.txt"
    threads: 2
    resources: gpu=1, cpus_per_gpu=2, mem_mb=8000, runtime=240
    shell: "touch {output}"

rule analyse:
    output: "analysed.txt"
    threads: 2
    shell: "touch {output}"
"""


@pytest.fixture
def sbatch_calls(tmp_path):
    """Run the GPU Snakefile through the profile against fake SLURM commands."""

    def run(*extra: str) -> dict[str, list[str]]:
        work = tmp_path / "wf"
        work.mkdir(exist_ok=True)
        (work / "Snakefile").write_text(GPU_SNAKEFILE)
        link_profile(work)
        record = tmp_path / "calls.jsonl"
        record.unlink(missing_ok=True)
        bindir = tmp_path / "bin"
        if not bindir.exists():
            fake_slurm_bin(bindir, record)
        env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
        env.pop("SLURM_CONF", None)
        result = snakemake(work, *extra, env=env, timeout=120)
        assert result.returncode != 0, "fake sbatch refuses every job; the run must fail"
        calls = recorded_sbatch_calls(record)
        assert set(calls) == {"train", "analyse"}, result.output[-4000:]
        return calls

    return run


@pytest.mark.workflow
def test_gpu_rule_asks_sbatch_for_one_gpu(sbatch_calls):
    calls = sbatch_calls()
    train, analyse = calls["train"], calls["analyse"]

    assert "--gpus=1" in train
    assert not any(a.startswith("--gres") for a in train)
    # CPUs follow the GPU (cpus_per_gpu), not a profile-wide cpus_per_task default.
    assert "--cpus-per-gpu=2" in train
    assert not any(a.startswith("--cpus-per-task") for a in train)
    assert train[train.index("--mem") + 1] == "8000"
    assert train[train.index("-t") + 1] == "240"
    # Partitions from the profile's partition file: the plugin puts a GPU job on the GPU one.
    assert train[train.index("-p") + 1] == "gpu"
    assert analyse[analyse.index("-p") + 1] == "cpu"

    assert not any(a.startswith(("--gpus", "--gres")) for a in analyse)
    assert "--cpus-per-task=2" in analyse
    assert analyse[analyse.index("--mem") + 1] == "4000"  # the profile's default


@pytest.mark.workflow
def test_gpu_model_from_set_resources_reaches_sbatch(sbatch_calls):
    # What a cluster user's `set-resources: {train: {gpu_model: ...}}` line turns into.
    calls = sbatch_calls("--set-resources", "train:gpu_model=a100")
    assert "--gpus=a100:1" in calls["train"]

# --- The real workflow's training job -------------------------------------------------------------

def training_submission(tmp_path: Path, profile: str,
                        **env_extra: str) -> tuple[list[str], str]:
    """The sbatch arguments of the real workflow's job training its first base model under
    `--profile profile` with `device: cuda` (fake SLURM commands; no GPU, no cluster), and
    Snakemake's output."""
    repo = copy_repo(tmp_path / "repo")
    record = tmp_path / "calls.jsonl"
    fake_slurm_bin(tmp_path / "bin", record)
    env = workflow_env(repo, dict(os.environ))
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    env.pop("SLURM_CONF", None)
    env.pop("SNAKEMAKE_PROFILE", None)
    env.pop("SNAKEMAKE_SLURM_PARTITIONS", None)
    env.update(env_extra)
    models = yaml.safe_load((repo / SMOKE).read_text())["models"]
    model = next(key for key, spec in models.items() if "build" in spec)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", f"results/models/{model}/final", "--profile",
         profile, "--configfile", SMOKE, "--config", "device=cuda"],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300,
    )
    assert result.returncode != 0, "fake sbatch refuses every job; the run must fail"
    calls = recorded_sbatch_calls(record)
    train = next((argv for rule, argv in calls.items() if rule.startswith("train_model")), None)
    assert train is not None, result.stdout[-4000:]
    return train, result.stdout


@pytest.fixture(scope="module")
def shipped_submission(tmp_path_factory):
    """The training job's sbatch arguments under the shipped profile."""
    if not workflow_ready():
        pytest.skip("workflow/config not there yet")
    return training_submission(tmp_path_factory.mktemp("shipped"), "slurm")[0]


@pytest.mark.workflow
def test_training_job_of_the_real_workflow_asks_for_one_gpu(shipped_submission):
    """With `device: cuda` the pipeline's own training rule reaches sbatch as --gpus=1 on the
    profile's GPU partition."""
    assert "--gpus=1" in shipped_submission
    assert option(shipped_submission, "-p") == "gpu"


@pytest.mark.workflow
def test_a_sites_own_profile_gets_the_jobs_gpus_memory_and_runtime(shipped_submission, tmp_path):
    """`snakemake --profile <the site's>`: the GPU, memory and runtime each rule declares
    reach sbatch as under the shipped profile, with the site's partition, and the workflow's
    own settings (workflow/profiles/default) apply as well."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "config.yaml").write_text(SITE_PROFILE)
    (site / "partitions.yaml").write_text(SITE_PARTITIONS)
    shipped = shipped_submission
    theirs, output = training_submission(
        tmp_path / "theirs", str(site), SNAKEMAKE_SLURM_PARTITIONS=str(site / "partitions.yaml"))

    assert "workflow specific profile workflow/profiles/default" in output
    assert option(theirs, "-p") == "site-gpu"
    for name in ("--gpus", "--mem", "-t", "--cpus-per-task", "--cpus-per-gpu"):
        assert option(theirs, name) == option(shipped, name), name
    assert option(theirs, "--gpus") == "1" and option(theirs, "--mem") and option(theirs, "-t")
