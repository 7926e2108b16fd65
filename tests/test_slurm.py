"""The shipped SLURM profile (slurm/config.yaml), proven against a real SLURM.

The `slurm`-marked tests share one single-node cluster per session (tests/slurm_cluster.py).
They call Snakemake exactly as a cluster user does, `snakemake --profile slurm` from the
directory holding the workflow, with `slurm/` linked to the repository's profile so that the
file under test is the file we ship.

The GPU-request tests (tests/test_slurm_requests.py, a module of its own so that pytest-xdist
runs them beside the cluster's) and the plugin-options test here need neither SLURM nor a GPU:
they put a recording `sbatch` first on PATH and read back the command line the executor
plugin built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import yaml

from opdgeo.cluster_check import JOB_HEADER

# The cluster fixture; imported by name only, so pytest can rewrite its asserts.
pytest_plugins = ["slurm_cluster"]

REPO = Path(__file__).resolve().parents[1]
PROFILE_DIR = REPO / "slurm"

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


class Submission(NamedTuple):
    rule: str
    wildcards: str  # the job's wildcard values joined by "_" (the plugin's log folder)
    slurm_id: str
    job: str  # Snakemake's job id; a retried job keeps it, with a new SLURM id


@dataclass
class SnakemakeRun:
    returncode: int
    output: str

    def submissions(self) -> list[Submission]:
        """Every sbatch this run made, from Snakemake's log.

        The plugin files each job's SLURM log under
        `.snakemake/slurm_logs/rule_<rule>/<wildcard values>/<slurm id>.log`, the one place
        its log line names the rule.
        """
        found = []
        for job, slurm_id, log in SUBMITTED.findall(self.output):
            where = re.search(r"/(?:rule|group)_([^/]+)/(?:(.+)/)?[^/]+\.log$", log)
            rule, wildcards = where.groups(default="") if where else ("?", "")
            found.append(Submission(rule, wildcards, slurm_id, job))
        return found


def link_profile(workdir: Path) -> None:
    """Make `--profile slurm` resolve, from workdir, to the repository's profile folder."""
    link = workdir / "slurm"
    if not link.exists():
        link.symlink_to(PROFILE_DIR, target_is_directory=True)


def snakemake(workdir: Path, *args: str, env: dict[str, str], timeout: float = 300) -> SnakemakeRun:
    """`snakemake --profile slurm ARGS` in workdir; the venv's Snakemake, output captured."""
    env = {k: v for k, v in env.items() if k != "SNAKEMAKE_PROFILE"}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "slurm", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return SnakemakeRun(proc.returncode, proc.stdout)


def assert_ok(run: SnakemakeRun) -> None:
    assert run.returncode == 0, run.output[-6000:]


# --- Fake SLURM commands recording what sbatch is asked (no SLURM, no GPU needed) ---------

def fake_slurm_bin(bindir: Path, record: Path) -> None:
    """SLURM client commands that record their arguments and refuse to do anything.

    sbatch exits non-zero after recording, so Snakemake reports a failed submission at once
    instead of waiting for a job that will never run. The others exist so that the plugin's
    probes (sinfo, scontrol, sacct for account guessing) get a fast, definite "no".
    """
    bindir.mkdir()
    for name in ("sbatch", "sacct", "squeue", "sinfo", "scontrol", "sacctmgr", "sshare"):
        script = bindir / name
        script.write_text(
            textwrap.dedent(
                f"""\
                #!{sys.executable}
                import json, sys
                with open({str(record)!r}, "a") as f:
                    f.write(json.dumps([{name!r}, *sys.argv[1:]]) + "\\n")
                sys.exit(1)
                """
            )
        )
        script.chmod(0o755)


def recorded_sbatch_calls(record: Path) -> dict[str, list[str]]:
    """sbatch argument lists by rule (from the `--comment rule_<name>` the plugin adds)."""
    calls = {}
    for line in record.read_text().splitlines():
        argv = json.loads(line)
        if argv[0] != "sbatch":
            continue
        # The plugin passes one shell string; sys.argv arrives already split by the shell.
        rule = argv[argv.index("--comment") + 1].removeprefix("rule_")
        calls.setdefault(rule, argv[1:])
    return calls


# --- A real single-node SLURM ---------------------------------------------------------------

TWO_RULES = """
rule all:
    input: "b.txt"

rule a:
    output: "a.txt"
    threads: 1
    shell: "echo $SLURM_JOB_ID > {output}"

rule b:
    input: "a.txt"
    output: "b.txt"
    threads: 1
    resources: gpu=1
    shell: "cat {input} > {output}; echo $SLURM_JOB_ID $SLURM_GPUS_ON_NODE >> {output}"
"""


@pytest.mark.slurm
def test_two_rule_workflow_runs_through_profile(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(TWO_RULES)
    link_profile(tmp_path)

    run = snakemake(tmp_path, env=slurm_cluster.env)
    assert_ok(run)

    # Each rule ran as its own SLURM job, on the cluster, to completion.
    subs = {sub.rule: sub.slurm_id for sub in run.submissions()}
    assert set(subs) == {"a", "b"}, run.output[-4000:]
    a_line, b_line = (tmp_path / "b.txt").read_text().splitlines()
    assert a_line == subs["a"]
    assert b_line.split() == [subs["b"], "1"]  # one (fake) GPU allocated to the gpu=1 job
    finished = slurm_cluster.finished_jobs()
    for rule, slurm_id in subs.items():
        assert finished[slurm_id]["JobState"] == "COMPLETED"
        # the plugin places each job by the profile's partition file: the GPU job on "gpu"
        assert finished[slurm_id]["Partition"] == {"a": "cpu", "b": "gpu"}[rule]

    # Nothing left to do: a second invocation submits nothing.
    again = snakemake(tmp_path, env=slurm_cluster.env)
    assert_ok(again)
    assert again.submissions() == []


SLOW_RULE = """
rule all:
    input: "parts"

# Leaves one file per attempt at once, finishes 10 s later: a cancelled attempt's file
# would survive beside the retry's unless Snakemake removed it.
rule slow:
    output: directory("parts")
    threads: 1
    shell: "mkdir -p {output}; touch {output}/$SLURM_JOB_ID.part; sleep 10; touch {output}/done"
"""


@pytest.mark.slurm
def test_scancelled_job_is_retried_without_partial_output(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(SLOW_RULE)
    link_profile(tmp_path)
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--profile", "slurm"],
            cwd=tmp_path,
            env=slurm_cluster.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while not list((tmp_path / "parts").glob("*.part")):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            cancelled = next((tmp_path / "parts").glob("*.part")).stem
            slurm_cluster.run("scancel", cancelled)
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    run = SnakemakeRun(proc.returncode, log.read_text())
    assert_ok(run)

    first, retry = (sub.slurm_id for sub in run.submissions())
    assert first == cancelled != retry
    finished = slurm_cluster.finished_jobs()
    assert finished[cancelled]["JobState"] == "CANCELLED"
    assert finished[retry]["JobState"] == "COMPLETED"
    # Only the retry's files: the cancelled attempt's part file is gone.
    written = {p.name for p in (tmp_path / "parts").iterdir() if p.name[0] != "."}
    assert written == {"done", f"{retry}.part"}  # (.snakemake_timestamp is Snakemake's)


# --- The pipeline itself: the rehearsal of config/paper.yaml ----------------------------------

SMOKE = "config/smoke.yaml"
PAPER = "config/paper.yaml"
# `opdgeo rehearse` writes the paper study on stand-ins here (tiny models, local data, CPU).
REHEARSAL = "rehearsal/config.yaml"
# The paper's whole DAG through SLURM (89 jobs), scancel and retry included: every job pays its
# Python start-up (no preload server on a cluster). 80 of them took 25 min on 2 cores shared
# with 20 other processes: the limit only catches a hang, on a slow machine too.
REHEARSAL_TIMEOUT_S = 2400
# Where figure and table rules write; a plot-setting edit may rerun nothing else.
PRESENTATION_OUTPUTS = ("results/figures/", "results/tables/")


def copy_repo(dest: Path) -> Path:
    """The working tree as git sees it (tracked + untracked, minus ignored: no results/,
    .venv/ or .snakemake/), so a test run never shares state with the real checkout."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    link_profile(dest)
    return dest


def workflow_env(repo_copy: Path, base: dict[str, str]) -> dict[str, str]:
    """Jobs inherit this (sbatch --export=ALL): `opdgeo` on PATH, imported from the copy."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        **base,
        "PATH": f"{venv_bin}{os.pathsep}{base.get('PATH', os.defpath)}",
        "PYTHONPATH": str(repo_copy / "scripts"),
    }


def workflow_ready() -> bool:
    return (REPO / "workflow" / "Snakefile").exists() and (REPO / PAPER).exists()


needs_workflow = pytest.mark.skipif(not workflow_ready(), reason="workflow/config not there yet")


def jobs_run(output: str) -> list[tuple[str, bool, list[str]]]:
    """(rule, is_local, outputs) of every job a Snakemake run started, from its log."""
    jobs = []
    blocks = JOB_HEADER.split(output)
    # split() yields [before, local, rule, body, local, rule, body, ...]
    for local, rule, body in zip(blocks[1::3], blocks[2::3], blocks[3::3], strict=True):
        match = re.search(r"^\s+output: (.*)$", body, re.M)
        outputs = match.group(1).split(", ") if match else []
        jobs.append((rule, bool(local), outputs))
    return jobs


def option(argv: list[str], name: str) -> str | None:
    """The value of `-p VALUE` or `--gpus=VALUE` in an sbatch argument list."""
    if name in argv:
        return argv[argv.index(name) + 1]
    return next((a.split("=", 1)[1] for a in argv if a.startswith(name + "=")), None)


# A cluster's own profile, knowing nothing of this workflow: how to reach its SLURM; its
# partitions in its own partition file, named by the plugin's variable.
SITE_PROFILE = """\
executor: slurm
jobs: 20
"""
SITE_PARTITIONS = """\
partitions:
  site-cpu: {max_runtime: "3-00:00:00", max_mem_mb: 200000}
  site-gpu: {max_runtime: "3-00:00:00", max_mem_mb: 200000, max_gpu: 4}
"""


@dataclass
class Cancellation:
    slurm_id: str
    rule: str
    wildcards: str
    at: float  # time.time() of the scancel
    partial: list[str]  # files the job had written when it was cancelled


def squeue_jobs(cluster) -> list[tuple[str, str, str]]:
    """(job id, state, comment) of every job slurmctld knows; the plugin's comment is
    `rule_<rule>_wildcards_<wildcards>`."""
    out = cluster.run("squeue", "-h", "--states=all", "-o", "%i|%T|%k", check=False).stdout
    return [tuple(line.split("|", 2)) for line in out.splitlines() if line.count("|") == 2]


def cancel_training_mid_run(
    cluster, repo: Path, proc: subprocess.Popen, deadline: float
) -> Cancellation | None:
    """scancel the first train_run job caught with part of its output written.

    Training jobs write checkpoints as they go, so "some files of the run exist, the job is
    still RUNNING" is exactly the state in which a cancelled job leaves partial output.
    """
    tried: set[str] = set()
    while proc.poll() is None and time.monotonic() < deadline:
        for slurm_id, state, comment in squeue_jobs(cluster):
            match = re.fullmatch(r"rule_train_run_wildcards_(.+)", comment)
            if not match or state != "RUNNING" or slurm_id in tried:
                continue
            run_dir = repo / "results" / "runs" / match.group(1)
            partial = sorted(str(p.relative_to(repo)) for p in run_dir.rglob("*") if p.is_file())
            if not partial:
                continue
            tried.add(slurm_id)
            cluster.run("scancel", slurm_id)
            return Cancellation(slurm_id, "train_run", match.group(1), time.time(), partial)
        time.sleep(0.2)
    return None


@pytest.fixture(scope="module")
def rehearsal(slurm_cluster, tmp_path_factory):
    """The rehearsal of config/paper.yaml (`opdgeo rehearse`) through `snakemake --profile
    slurm`, one training job scancelled mid-run. Returns the repo copy, the run's log, the
    cancellation and the environment."""
    if not workflow_ready():
        pytest.skip("workflow/config not there yet")
    repo = copy_repo(tmp_path_factory.mktemp("rehearsal"))
    env = workflow_env(repo, slurm_cluster.env)
    subprocess.run([sys.executable, "-m", "opdgeo.cli", "rehearse", PAPER,
                    "--out", str(Path(REHEARSAL).parent)],
                   cwd=repo, env=env, check=True, capture_output=True)
    log = repo / "snakemake-run1.log"
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--profile", "slurm", "--configfile", REHEARSAL],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = started + REHEARSAL_TIMEOUT_S
        try:
            cancelled = cancel_training_mid_run(slurm_cluster, repo, proc, deadline)
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass  # reported below, with the log
        finally:
            if proc.poll() is None:
                proc.terminate()  # Snakemake cancels its SLURM jobs on SIGTERM
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                pytest.fail(
                    f"rehearsal did not finish in {REHEARSAL_TIMEOUT_S} s:\n"
                    + log.read_text()[-4000:]
                )
    run = SnakemakeRun(proc.returncode, log.read_text())
    print(f"rehearsal of {PAPER} through SLURM: {time.monotonic() - started:.0f} s")
    return repo, run, cancelled, env


@pytest.mark.slurm
@pytest.mark.slow
def test_rehearsal_runs_end_to_end_as_slurm_jobs(rehearsal, slurm_cluster):
    repo, run, _, env = rehearsal
    assert_ok(run)

    # Every output of the DAG exists (Snakemake's own inventory of it).
    summary = subprocess.run(
        [sys.executable, "-m", "snakemake", "--configfile", REHEARSAL, "--summary", "--cores",
         "1"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    outputs = [line.split("\t")[0] for line in summary.splitlines()[1:] if line.strip()]
    assert outputs
    missing = [f for f in outputs if not (repo / f).exists()]
    assert not missing, missing

    # Each job of a non-local rule went through sbatch and completed as a SLURM job; the
    # local rules (tables, figures, report) ran in the Snakemake process and were not
    # submitted.
    # A retried job (the scancelled one) is printed twice: count jobs by their outputs.
    jobs = jobs_run(run.output)
    remote = {(rule, tuple(outputs)) for rule, local, outputs in jobs if not local}
    local = {rule for rule, is_local, _ in jobs if is_local}
    submitted = run.submissions()
    assert remote and local
    assert len({sub.job for sub in submitted}) == len(remote), "a job ran without sbatch"
    assert {sub.rule for sub in submitted} == {rule for rule, _ in remote}
    assert not local & {sub.rule for sub in submitted}
    # SLURM's own records agree: every submission ran there and ended; the last attempt of
    # every job completed (the earlier one of the cancelled job did not).
    finished = slurm_cluster.finished_jobs()
    last_attempt = {sub.job: sub.slurm_id for sub in submitted}
    assert all(sub.slurm_id in finished for sub in submitted)
    assert {finished[i]["JobState"] for i in last_attempt.values()} == {"COMPLETED"}


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_job_is_rerun_and_leaves_no_partial_output(rehearsal, slurm_cluster):
    repo, run, cancelled, _ = rehearsal
    assert_ok(run)
    assert cancelled is not None, "no training job was caught mid-run to cancel"

    assert slurm_cluster.finished_jobs()[cancelled.slurm_id]["JobState"] == "CANCELLED"
    # The same Snakemake job was submitted again under a new SLURM id, and that completed.
    attempts = [
        sub
        for sub in run.submissions()
        if (sub.rule, sub.wildcards) == (cancelled.rule, cancelled.wildcards)
    ]
    assert [sub.slurm_id for sub in attempts][:1] == [cancelled.slurm_id]
    assert len(attempts) == 2 and attempts[0].job == attempts[1].job
    assert slurm_cluster.finished_jobs()[attempts[1].slurm_id]["JobState"] == "COMPLETED"
    # Every file of that run comes from the successful attempt: nothing the cancelled one
    # wrote (cancelled.partial, at least) survived.
    run_dir = repo / "results" / "runs" / cancelled.wildcards
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files
    stale = [str(p) for p in files if p.stat().st_mtime < cancelled.at]
    assert not stale, f"files from the cancelled attempt survived: {stale}"


@pytest.mark.slurm
@pytest.mark.slow
def test_second_invocation_submits_nothing(rehearsal):
    repo, run, _, env = rehearsal
    assert_ok(run)
    again = snakemake(repo, "--configfile", REHEARSAL, env=env)
    assert_ok(again)
    assert again.submissions() == []
    assert jobs_run(again.output) == []
    assert "Nothing to be done" in again.output


def paper_table(repo: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(repo / "results" / "tables" / f"{name}.csv")


@pytest.mark.slurm
@pytest.mark.slow
def test_every_paper_run_and_every_paper_row_the_config_maps_is_filled(rehearsal):
    """What config/paper.yaml promises, on its stand-ins: every run has its checkpoint and its
    analysis, and every row of the paper's tables that the config maps to a paper run is
    filled (global delta, module energy, mask overlap, interventions)."""
    from opdgeo.config import build_runs
    from opdgeo.paper_tables import PAPER_ENERGY, PAPER_GLOBAL

    repo, run, _, _ = rehearsal
    assert_ok(run)
    paper = yaml.safe_load((repo / PAPER).read_text())
    runs = build_runs(paper)
    for name, spec in runs.items():
        if spec.is_trained:
            assert (repo / "results" / "runs" / name / "final" / "model.safetensors").exists()
        assert (repo / "results" / "analysis" / name / "final" / "summary.json").exists(), name
    # The offline-distillation pair: Qwen2.5-Math ties its head, DS-Qwen does not.
    summary = json.loads((repo / "results" / "analysis" / "qwen-math-offline-distill" / "final"
                          / "summary.json").read_text())
    assert "embed_tokens" in summary["tied_head"]

    delta = paper_table(repo, "table_global_delta")
    matched = delta[delta["paper run"].notna()]
    # Every paper row, Qwen3 OPSD's too, each once.
    assert sorted(matched["paper run"]) == sorted(PAPER_GLOBAL)
    ours = ["rel. norm %", "sparsity@1e-5 %", "top-16 energy %", "stable rank",
            "principal cov. 10% %", "low-mag cov. 10% %"]
    assert matched[ours].notna().all().all(), matched[["series", *ours]].to_string()
    # one seed per run: every number's interval is over that run's matrices
    assert set(delta["interval"]) == {"matrices (one seed)"}
    bounds = [f"{c} 95% {side}" for c in ours for side in ("low", "high")]
    assert matched[bounds].notna().all().all(), matched[["series", *bounds]].to_string()

    energy = paper_table(repo, "table_module_energy")
    matched = energy[energy["paper run"].isin(PAPER_ENERGY)]
    assert set(matched["paper run"]) == set(PAPER_ENERGY)
    assert matched[["ffn %", "attention %", "embedding %"]].notna().all().all()

    overlap = paper_table(repo, "table_mask_overlap")
    main = [n for n, spec in runs.items() if spec.kind != "masked"]
    assert {"deepscaler-rlvr", "dsqwen-opd-deepscaler-adamw"} <= set(overlap["series a"])
    assert set(overlap["series a"]) <= {re.sub(r"-s\d+$", "", n) for n in main}
    assert overlap[["coverage a->b %", "random baseline %"]].notna().all().all()

    interventions = paper_table(repo, "table_interventions")
    arms = {(row.pair, row.arm) for row in interventions.itertuples()}
    assert {("dsqwen", arm) for arm in ("full", "opd", "random", "run-grpo")} <= arms
    assert {("qwen25vl", arm) for arm in ("full", "opd", "random", "run-grpo",
                                          "random-grpo")} <= arms
    assert {"AdamW (lr 0.0001)", "SGD (lr 1)"} <= set(interventions["arm"])
    assert interventions[["peak %", "final %", "paper: peak %"]].notna().all().all()
    # DS-Qwen's RLVR mask comes from the external DeepScaleR run: a mask with coordinates.
    rlvr = interventions[(interventions["pair"] == "dsqwen")
                         & (interventions["arm"] == "run-grpo")]
    assert (rlvr["mask density %"] > 0).all()

    # The trajectory, on in the paper's config: every main trained run compared on its delta
    # (not a masked retrain) has its intermediate checkpoints analysed (against the source's
    # one decomposition) and drawn.
    from opdgeo.kinds import RUN_KINDS

    trajectory = paper_table(repo, "trajectory")
    drawn = {name for name, spec in runs.items() if spec.is_trained and spec.group == "main"
             and RUN_KINDS[spec.kind].delta_method}
    assert drawn and not any(runs[name].kind == "masked" for name in drawn)
    steps = trajectory.groupby("run")["step"].nunique()  # an intermediate one and the final
    assert paper["analysis"]["trajectory"] and all(steps.get(n, 0) >= 2 for n in drawn), steps
    assert list((repo / "results" / "figures").glob("trajectory.*"))

    findings = pd.read_csv(repo / "results" / "findings.csv")
    f1 = findings[(findings["finding"] == "F1")
                  & (findings["series"] == "dsqwen-opd-deepscaler-adamw")].iloc[0]
    assert "external offline-distillation run qwen-math-offline-distill" in f1["note"]
    assert f1["verdict"] != "not tested"
    # one seed: the interval over the run's matrices, paired by tensor name with the control
    assert f1["interval"] == "matrices (one seed)" and f1["low"] <= f1["observed"] <= f1["high"]


@pytest.mark.slurm
@pytest.mark.slow
def test_plot_edit_reruns_only_figures_and_tables(rehearsal):
    repo, run, _, env = rehearsal
    assert_ok(run)
    # A plot setting (`plots: {dpi: ...}`) is only a param of the figure rules.
    config_file = repo / REHEARSAL
    config = yaml.safe_load(config_file.read_text())
    config["plots"]["dpi"] += 1
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    edited = snakemake(repo, "--configfile", REHEARSAL, env=env)
    assert_ok(edited)
    jobs = [job for job in jobs_run(edited.output) if job[0] != "all"]
    assert jobs, "the dpi edit invalidated nothing"
    for rule, _, outputs in jobs:
        assert outputs and all(o.startswith(PRESENTATION_OUTPUTS) for o in outputs), rule
    assert {sub.rule for sub in edited.submissions()} <= {rule for rule, _, _ in jobs}


# --- The paper's study as the cluster admits it ----------------------------------------------


def paper_cluster_jobs(repo: Path, env: dict[str, str], *args: str) -> list[dict]:
    """Every job of config/paper.yaml's DAG that the profile would submit (`opdgeo
    check-cluster`'s dry run)."""
    from opdgeo.cluster_check import dry_run_jobs

    return dry_run_jobs(PAPER, "slurm", *args, cwd=repo, env=env)


def sbatch_test_only(cluster, options: list[str]) -> subprocess.CompletedProcess:
    """`sbatch --test-only` on the test cluster (`opdgeo check-cluster`'s check)."""
    from opdgeo.cluster_check import sbatch_test_only as on_cluster

    return on_cluster(options, env=cluster.env)


@pytest.fixture(scope="module")
def paper_submissions(tmp_path_factory):
    """The sbatch options of every job of config/paper.yaml, 1 and 4 GPUs per training job."""
    if not workflow_ready():
        pytest.skip("workflow/config not there yet")
    from snakemake_executor_plugin_slurm.partitions import read_partition_file

    from opdgeo.cluster_check import sbatch_options

    repo = copy_repo(tmp_path_factory.mktemp("paper"))
    env = workflow_env(repo, dict(os.environ))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HUB_CACHE=str(repo / "empty-cache"))
    env.pop("SNAKEMAKE_SLURM_PARTITIONS", None)
    profile = yaml.safe_load((PROFILE_DIR / "config.yaml").read_text())
    partitions = read_partition_file(repo / profile["slurm-partition-config"])
    submissions = {}
    for gpus in (1, 4):
        jobs = paper_cluster_jobs(repo, env, "--config", f"training={{gpus: {gpus}}}")
        submissions[gpus] = [(job, sbatch_options(job, partitions, profile)) for job in jobs]
    return repo, env, submissions


@pytest.mark.slurm
def test_every_paper_job_is_accepted_and_an_over_limit_one_is_refused(
        paper_submissions, slurm_cluster):
    """Every job of config/paper.yaml's DAG, with the sbatch options the executor plugin gives
    it, is accepted by a cluster with the profile's partitions and their limits (48-hour
    MaxTime, memory per node, a GPU GRES), one and four GPUs per training job; the same
    jobs over a limit (wall time, memory, GPUs), and the DS-Qwen training job as it asked
    before its request was fitted to its partition (5.5 days), are refused."""
    _, _, submissions = paper_submissions
    with slurm_cluster.paper_scale():
        check_acceptance(slurm_cluster, submissions)


def check_acceptance(slurm_cluster, submissions):
    from opdgeo.config import build_runs, read_config

    paper = read_config(REPO / PAPER)
    for gpus, jobs in submissions.items():
        assert {job["rule"] for job, _ in jobs} >= {"train_run", "evaluate_run", "analyze_run"}
        refused = [(job["rule"], job["wildcards"], options, verdict.stderr.strip())
                   for job, options in jobs
                   if (verdict := sbatch_test_only(slurm_cluster, options)).returncode != 0]
        assert not refused, refused
        # `--config training={gpus: N}`: a pair that sets its own GPUs (the sharded ones)
        # keeps them.
        paper["training"]["gpus"] = gpus
        runs = build_runs(paper)
        trains = [(job["wildcards"], options) for job, options in jobs
                  if job["rule"] == "train_run"]
        assert any(runs[run].training["sharding"] == "fsdp" for run, _ in trains)
        assert all(option(o, "--gpus") == str(runs[run].training["gpus"])
                   and option(o, "-p") == "gpu" for run, o in trains), trains

    # Over each limit of its partition, the longest training job is refused.
    limits = slurm_cluster.partitions
    job, options = max(((j, o) for j, o in submissions[1] if j["rule"] == "train_run"),
                       key=lambda jo: jo[0]["resources"]["runtime"])
    gpu = limits[option(options, "-p")]

    def replaced(name: str, value) -> list[str]:
        out = [a for a in options if not a.startswith(f"{name}=")]
        if name in out:
            out[out.index(name) + 1] = str(value)
        else:
            out.append(f"{name}={value}")
        return out

    assert sbatch_test_only(slurm_cluster, options).returncode == 0
    for name, value, message in (("-t", int(gpu.max_runtime) + 1, "time limit"),
                                 ("--mem", int(gpu.max_mem_mb) + 1, "Memory"),
                                 ("--gpus", gpu.max_gpu + 1, "node configuration")):
        verdict = sbatch_test_only(slurm_cluster, replaced(name, value))
        assert verdict.returncode != 0 and message in verdict.stderr, (name, verdict)

    # What the job asked for before its request was fitted to the partition.
    from opdgeo.config import build_runs, read_config
    from opdgeo.resources import Sizer, job_resources

    paper = read_config(REPO / PAPER)
    paper["training"]["use_vllm"] = False  # as the config asked before: 5.5 days for DS-Qwen
    need = Sizer(paper, build_runs(paper), on_gpu=True).train(job["wildcards"])
    unfitted = job_resources(need, 1)["runtime"]
    assert unfitted > gpu.max_runtime
    verdict = sbatch_test_only(slurm_cluster, replaced("-t", unfitted))
    assert verdict.returncode != 0 and "time limit" in verdict.stderr, verdict


@pytest.mark.slurm
def test_check_cluster_command_names_the_jobs_a_cluster_refuses(paper_submissions, slurm_cluster,
                                                                tmp_path):
    """`opdgeo check-cluster`, what a user runs against their own cluster: the paper's sharded
    vision-language training job (2 GPUs) under the shipped profile is accepted; under a site
    profile whose partition file names a partition the cluster does not have, it is refused,
    with slurmctld's reason and the exit status 1."""
    repo, env, _ = paper_submissions
    env = {**env, "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    target = "results/runs/qwen25vl-opd-noisyrollout-geo3k-7b-adamw-s0/final"
    site = tmp_path / "site"
    site.mkdir()
    (site / "config.yaml").write_text(SITE_PROFILE)
    (site / "partitions.yaml").write_text(SITE_PARTITIONS)  # site-cpu, site-gpu: not there

    def check(profile: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "opdgeo.cli", "check-cluster", "--configfile", PAPER,
             "--profile", profile, "--", target], cwd=repo, env={**env, **extra},
            capture_output=True, text=True, timeout=600)

    with slurm_cluster.paper_scale():
        shipped = check("slurm")
        theirs = check(str(site), SNAKEMAKE_SLURM_PARTITIONS=str(site / "partitions.yaml"))
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr[-3000:]
    assert "1 of 1 jobs" in shipped.stdout and "refused" not in shipped.stdout
    assert theirs.returncode == 1, theirs.stdout + theirs.stderr[-3000:]
    assert f"refused: train_run {Path(target).parent.name}: " in theirs.stdout
    assert "invalid partition" in theirs.stdout.lower() and "-p site-gpu" in theirs.stdout
    assert "--gpus=2" in theirs.stdout and "0 of 1 jobs" in theirs.stdout


@pytest.mark.workflow
def test_plugin_options_are_the_plugins_own(paper_submissions, tmp_path):
    """The options the acceptance test builds for each job are those the plugin submits: the
    jobs of config/paper.yaml that are ready at once go through the real executor against a
    recording sbatch, and every option that a cluster judges is the same."""
    repo, env, submissions = paper_submissions
    record = tmp_path / "calls.jsonl"
    fake_slurm_bin(tmp_path / "bin", record)
    env = {**env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"}
    env.pop("SLURM_CONF", None)
    subprocess.run([sys.executable, "-m", "snakemake", "--profile", "slurm", "--configfile",
                    PAPER], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    recorded = {}
    for line in record.read_text().splitlines():
        argv = json.loads(line)
        if argv[0] == "sbatch":
            comment = argv[argv.index("--comment") + 1]
            recorded.setdefault(comment, argv[1:])  # the first attempt (then a retry)
    built = {f"rule_{job['rule']}_wildcards_{job['wildcards']}": options
             for job, options in submissions[1]}
    judged = ("-p", "-t", "--mem", "--gpus", "--cpus-per-task", "--cpus-per-gpu", "--ntasks")
    assert {comment.split("_wildcards_")[0] for comment in recorded} >= {
        "rule_train_run", "rule_evaluate_model"}, recorded.keys()
    for comment, argv in recorded.items():
        assert {n: option(argv, n) for n in judged} == {
            n: option(built[comment], n) for n in judged}, comment
        assert ("--requeue" in argv) == ("--requeue" in built[comment])


# --- A job longer than its wall time: a chain of attempts -------------------------------------

CHAINED_STEPS = 3
CHAINED_TASK = {"digits": 2, "eval_prompts": 16, "seed": 0}
# The wall time of each attempt (minutes), and a stop margin as long: every attempt has room
# for one step only, on a fast machine as on a slow one, and stops at a checkpoint after it.
CHAINED_WALL_MINUTES = 2

CHAINED_SNAKEFILE = """
import shlex

rule train:
    output: directory("run/final")
    params: spec=shlex.quote({spec!r}), task=shlex.quote({task!r})
    threads: 1
    resources: runtime={minutes}, mem_mb=2000
    shell: "opdgeo train-run --run-spec {{params.spec}} --source {source} --teacher {teacher}"
           " --task {{params.task}} --out run --device cpu --threads 1 >> attempts.log 2>&1"
"""


def chained_spec():
    from opdgeo.config import RunSpec, pair_training

    config = {"training": {"steps": CHAINED_STEPS, "batch_size": 8, "save_every": 100,
                           "prompts": 4, "optimizers": {"adamw": {"learning_rate": 1e-3}}},
              "pairs": {"p": {"student": "s", "teachers": ["t"]}}}
    return RunSpec("p-opd-t-adamw-s0", "opd", "p", "s", "t", "adamw", 0,
                   training=pair_training(config, "p"))


@pytest.mark.slurm
@pytest.mark.slow
def test_training_longer_than_its_wall_time_finishes_over_attempts(slurm_cluster, tiny_pair,
                                                                      tmp_path):
    """A training job whose wall time holds one step per attempt stops at a checkpoint before
    its time is up, requeues itself and continues, through Snakemake and the profile, over
    as many attempts as it has steps, to the bytes of an uninterrupted run."""
    from dataclasses import asdict

    from opdgeo.train import train_run

    student, teacher = tiny_pair
    spec = chained_spec()
    straight = tmp_path / "straight"
    train_run(spec, student, teacher, CHAINED_TASK, straight, "cpu")

    work = tmp_path / "wf"
    work.mkdir()
    run_spec = {k: v for k, v in asdict(spec).items() if k != "task"}
    (work / "Snakefile").write_text(CHAINED_SNAKEFILE.format(
        minutes=CHAINED_WALL_MINUTES, spec=json.dumps(run_spec), source=student,
        teacher=teacher, task=json.dumps(CHAINED_TASK)))
    link_profile(work)
    env = workflow_env(REPO, slurm_cluster.env)
    env["OPDGEO_STOP_MARGIN_S"] = str(CHAINED_WALL_MINUTES * 60)
    run = snakemake(work, env=env, timeout=900)
    assert_ok(run)

    [submission] = run.submissions()  # one Snakemake job, one SLURM job: no retry
    log = (work / "attempts.log").read_text()  # no Snakemake log: attempts append to it
    assert log.count(f"requeueing SLURM job {submission.slurm_id}") == CHAINED_STEPS - 1, log
    ends = [line for line in slurm_cluster.jobcomp.read_text().splitlines()
            if f"JobId={submission.slurm_id} " in line]
    assert len(ends) == CHAINED_STEPS, ends  # each attempt ended once; the last completed
    assert slurm_cluster.finished_jobs()[submission.slurm_id]["JobState"] == "COMPLETED"
    for file in ("final/model.safetensors", "fp32/model.safetensors"):
        assert (work / "run" / file).read_bytes() == (straight / file).read_bytes(), file
    steps = [int(row.split(",")[1]) for row in
             (work / "run" / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, CHAINED_STEPS + 1))
