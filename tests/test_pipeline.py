"""The whole smoke DAG, end to end, in a temporary copy of the repository.

Slow (minutes): it trains base models, runs, masks and masked runs, evaluates and analyses
every checkpoint, and renders the tables and figures.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from events import wait_for

from opdgeo.config import build_masks, build_runs, self_teacher_contexts
from opdgeo.kinds import RUN_KINDS
from opdgeo.paper_tables import PAPER_MASK_DENSITY
from opdgeo.report_captions import captions
from opdgeo.task import context_metric

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A shared group's umask: every file the DAG writes must be group-writable under it.
UMASK = 0o002


def snakemake(workdir, *args, check=True):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [str(BIN / "snakemake"), "--configfile", "config/smoke.yaml", "--cores", "2", *args],
        cwd=workdir, env=env, capture_output=True, text=True, umask=UMASK,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {args} failed:\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def copy_workflow(workdir):
    """What a run needs of the repository (the package itself is installed in the venv)."""
    for folder in ("workflow", "config", "scripts", "envs"):
        shutil.copytree(ROOT / folder, workdir / folder)


def scheduled_jobs(dry_run_output: str) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    counts = {}
    match = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal", dry_run_output, re.S)
    for line in (match.group(1).splitlines() if match else []):
        rule, count = line.split()
        counts[rule] = int(count)
    return counts


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    copy_workflow(workdir)
    snakemake(workdir)
    return workdir


@pytest.mark.slow
def test_smoke_dag_writes_every_output(smoke):
    config = yaml.safe_load((smoke / "config" / "smoke.yaml").read_text())
    config.setdefault("external", {})
    runs = build_runs(config)
    for name, spec in runs.items():
        assert (smoke / f"results/analysis/{name}/final/summary.json").exists(), name
        if spec.is_trained:
            assert (smoke / f"results/runs/{name}/final/model.safetensors").exists(), name
            card = (smoke / f"results/runs/{name}/final/README.md").read_text()
            assert f"# {name}\n" in card and "## Held-out scores" in card, name
            for step in spec.checkpoint_steps():
                assert (smoke / f"results/runs/{name}/checkpoints/step-{step}").is_dir()
    for mask in build_masks(config, PAPER_MASK_DENSITY):
        assert (smoke / f"results/masks/{mask}.safetensors").exists()
    # a local run's jobs ran in forks of the preload server, which ended with the run
    assert "preloaded" in (smoke / "results/logs/preload.log").read_text()

    # The runs table lists the runs as the DAG made them, primary optimizer first (its JSON
    # argument once sorted the optimizers and made AdamW primary in the table only).
    assert list(pd.read_csv(smoke / "results/tables/runs.csv")["run"]) == list(runs)

    evaluation = pd.read_csv(smoke / "results/tables/evaluation.csv")
    assert set(evaluation["run"]) == set(runs) | set(config["models"])
    scores = {"exact_match", f"mean@{config['evaluation']['k']}"}
    assert set(evaluation[evaluation["run"].isin(runs)]["metric"]) == scores
    # a self-distillation student is also scored as its own teacher, reading the contexts
    for model in config["models"]:
        expected = scores | {context_metric(score, whose) for score in scores
                             for whose in self_teacher_contexts(config, model)}
        assert set(evaluation[evaluation["run"] == model]["metric"]) == expected, model
    steps = evaluation[evaluation["run"] == next(iter(runs))]["step"]
    assert sorted(steps.unique()) == [10, 20]
    assert evaluation["value"].between(0, 1).all()

    delta = pd.read_csv(smoke / "results/tables/delta_global.csv")
    assert set(delta["run"]) == set(runs)
    assert {"relative_norm", "sparsity_atol_1e-5"} <= set(delta["metric"])

    # Each main run's job analysed its intermediate checkpoints too (the trajectory), but for
    # masked retrains (not drawn).
    trajectory = pd.read_csv(smoke / "results/tables/trajectory.csv")
    for name, spec in runs.items():
        expected = set(spec.checkpoint_steps()) if spec.group == "main" \
            and RUN_KINDS[spec.kind].delta_method else set()
        if spec.is_trained:
            expected.add(spec.training["steps"])
        assert set(trajectory[trajectory["run"] == name]["step"]) == expected, name

    # One overlap job per source compared every two main runs on it.
    by_source = {}
    for name, spec in runs.items():
        if spec.kind != "masked" and spec.group == "main":
            by_source.setdefault(spec.source, []).append(name)
    expected = {(a, b) for group in by_source.values()
                for i, a in enumerate(group) for b in group[i + 1:]}
    overlap = pd.read_csv(smoke / "results/tables/overlap.csv")
    assert set(zip(overlap["run_a"], overlap["run_b"], strict=True)) == expected
    assert overlap["value"].notna().any()
    # ... and its per-matrix mask counts, the one-seed overlap table's resampling units
    tensors = pd.read_csv(smoke / "results/tables/overlap_tensors.csv")
    assert set(zip(tensors["run_a"], tensors["run_b"], strict=True)) == expected
    assert (tensors["count_both"] <= tensors[["count_a", "count_b"]].min(axis=1)).all()


@pytest.mark.slow
def test_every_file_of_a_run_has_the_umask_s_mode(smoke):
    """Checkpoints, masks, sources' decompositions (safetensors writes 0600), tables, figures,
    logs: a run under a group's umask leaves nothing the group cannot read and write."""
    modes = {str(p.relative_to(smoke)): p.stat().st_mode & 0o777
             for p in (smoke / "results").rglob("*") if not p.is_symlink()}
    wrong = {path: oct(mode) for path, mode in modes.items()
             if mode != (0o777 if Path(smoke / path).is_dir() else 0o666) & ~UMASK}
    assert not wrong, wrong
    assert any(path.startswith("results/sources/") and path.endswith(".safetensors")
               for path in modes)


@pytest.mark.slow
def test_second_invocation_schedules_nothing(smoke):
    dry = snakemake(smoke, "-n")
    assert scheduled_jobs(dry.stdout) == {}, dry.stdout[-2000:]
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.slow
def test_a_switch_that_changes_no_result_reruns_nothing(smoke):
    dry = snakemake(smoke, "-n", "--config", "preload=false")
    assert scheduled_jobs(dry.stdout) == {}, dry.stdout[-2000:]


def jobs_after_edit(smoke, edit) -> dict[str, int]:
    """The jobs a dry run schedules once `edit(config)` is applied to the smoke config."""
    config_path = smoke / "config" / "smoke.yaml"
    original = config_path.read_text()
    config = yaml.safe_load(original)
    edit(config)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))  # order: primary optimizer
    try:
        return scheduled_jobs(snakemake(smoke, "-n").stdout)
    finally:
        config_path.write_text(original)


ONLY_TABLES_AND_FIGURES = re.compile(r"^(all|fig.*|.*figure.*|.*table.*|findings.*|report.*)$")


@pytest.mark.slow
def test_plot_edit_reruns_only_figures_and_tables(smoke):
    def finer(config):
        config["plots"]["dpi"] += 1

    jobs = jobs_after_edit(smoke, finer)
    assert jobs, "a plot edit should rerun the figures"
    assert all(ONLY_TABLES_AND_FIGURES.match(rule) for rule in jobs), jobs
    assert not {"train_model", "train_run", "evaluate_run", "analyze_run"} & set(jobs)


@pytest.mark.slow
def test_reordering_keys_where_order_means_nothing_retrains_nothing(smoke):
    def reorder(config):
        for model in config["models"].values():
            model["build"] = dict(reversed(model["build"].items()))
            model["train"] = dict(reversed(model["train"].items()))
        config["evaluation"] = dict(reversed(config["evaluation"].items()))
        config["task"] = dict(reversed(config["task"].items()))

    jobs = jobs_after_edit(smoke, reorder)
    assert all(ONLY_TABLES_AND_FIGURES.match(rule) for rule in jobs), jobs


def jobs_after_code_edit(workdir, module, appended) -> tuple[dict[str, int], str]:
    """The jobs a dry run schedules once `appended` is added to a module of the workflow's
    copy of the package (scripts/opdgeo), and the dry run's output."""
    path = workdir / "scripts" / "opdgeo" / module
    original = path.read_text()
    path.write_text(original + appended)
    try:
        dry = snakemake(workdir, "-n")
        return scheduled_jobs(dry.stdout), dry.stdout
    finally:
        path.write_text(original)


@pytest.mark.slow
def test_a_figures_statement_reruns_every_figure_and_nothing_else(smoke):
    jobs, dry = jobs_after_code_edit(smoke, "figures/delta_trajectory.py", "\nEDITED = 1\n")
    rendered = {path.stem for path in (smoke / "results" / "figures").iterdir()}
    # and the captions, written from the figures' constants
    assert set(jobs) == {f"figure_{name}" for name in rendered} | {"all", "report_captions"}, \
        jobs
    changed = r"Params have changed since last execution: .* figures\.delta_trajectory="
    assert re.search(changed, dry), dry[-3000:]


@pytest.mark.slow
def test_a_delta_metrics_statement_reruns_the_analysis_and_downstream_only(smoke):
    jobs, dry = jobs_after_code_edit(smoke, "delta/metrics.py", "\nEDITED = 1\n")
    config = yaml.safe_load((smoke / "config" / "smoke.yaml").read_text())
    config.setdefault("external", {})
    assert jobs["analyze_run"] == len(build_runs(config))
    downstream = {"overlap", "delta_tables", "analysis_tables", "overlap_table", "paper_tables",
                  "findings", "figure_fig1_overview", "all"}
    assert downstream <= set(jobs), jobs
    assert not {"train_model", "train_run", "evaluate_model", "evaluate_run", "make_mask",
                "evaluation_table", "runs_table"} & set(jobs), jobs
    assert re.search(r"Params have changed since last execution: .* delta\.metrics=", dry)


@pytest.mark.slow
def test_every_job_depends_on_the_code_all_commands_import(smoke):
    jobs, _ = jobs_after_code_edit(smoke, "__init__.py", "\nEDITED = 1\n")
    assert jobs == scheduled_jobs(snakemake(smoke, "-n", "--forceall").stdout)


@pytest.mark.slow
def test_a_comment_or_a_fresh_copy_of_the_code_reruns_nothing(smoke, tmp_path):
    jobs, dry = jobs_after_code_edit(smoke, "delta/metrics.py", "\n\n# a comment\n")
    assert jobs == {}, dry[-2000:]
    # As a fresh clone in another folder: every source file new (new mtimes), the results
    # and Snakemake's records of them moved in.
    copy_workflow(tmp_path)
    moved = ("results", ".snakemake")
    for name in moved:
        (smoke / name).rename(tmp_path / name)
    try:
        dry = snakemake(tmp_path, "-n")
    finally:
        for name in moved:
            (tmp_path / name).rename(smoke / name)
    assert scheduled_jobs(dry.stdout) == {}, dry.stdout[-2000:]


@pytest.mark.slow
def test_report_of_existing_results_retrains_nothing(smoke):
    """`make report` reports the config `make reproduce` ran last, and never trains: here
    after a learning-rate edit that a plain run would retrain every run for."""
    shutil.copy(ROOT / "Makefile", smoke / "Makefile")
    (smoke / "results" / ".last-config").write_text("config/smoke.yaml\n")  # make reproduce's
    config_path = smoke / "config" / "smoke.yaml"
    original = config_path.read_text()
    config = yaml.safe_load(original)
    for optimizer in config["training"]["optimizers"].values():
        optimizer["learning_rate"] *= 2
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        assert "train_run" in scheduled_jobs(snakemake(smoke, "-n").stdout)
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        # -o: the test's venv counts as installed (no pip run in the copy)
        report = subprocess.run(["make", "-o", f"{BIN}/.installed", f"VENV={BIN.parent}",
                                 "report"], cwd=smoke, env=env, capture_output=True, text=True)
    finally:
        config_path.write_text(original)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    jobs = set(re.findall(r"^(?:local)?rule (\w+):$", report.stdout + report.stderr, re.M))
    assert jobs and not {"train_model", "train_run"} & jobs, jobs
    assert "Report of config/smoke.yaml" in report.stdout
    page = (smoke / "results" / "report.html").read_text()
    # no caption or page with a reStructuredText error (docutils' red "System Message" box)
    assert "system-message" not in page and "System Message" not in page
    # the workflow description opens the report; the captions are the package's own
    assert "opdgeo: the sparsity and geometry of on-policy distillation" in page
    for text in captions().values():  # as the report embeds it: JSON in a script
        first = text.split("**")[1]
        assert json.dumps(first, ensure_ascii=True)[1:-1] in page, first


@pytest.mark.workflow
def test_parsing_the_workflow_imports_no_plotting_or_statistics_library(tmp_path):
    """Every Snakemake start parses the workflow, each cluster job's too: matplotlib, seaborn
    and scipy (most of that CPU, once) are for the jobs that draw and compute, not the parse.
    The figures, paper tables and findings are declared all the same (their rules exist)."""
    copy_workflow(tmp_path)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "snakemake"), "-n", "--configfile",
         "config/smoke.yaml", "--cores", "1"],
        cwd=tmp_path, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"opdgeo.figures", "opdgeo.paper_tables", "opdgeo.findings"} <= imported
    rules = scheduled_jobs(result.stdout).keys()
    assert {"figure_fig1_overview", "paper_tables", "findings"} <= rules
    heavy = sorted(name for name in imported
                   if name.split(".")[0] in ("matplotlib", "seaborn", "scipy"))
    assert not heavy, heavy[:10]


@pytest.mark.workflow
def test_jobs_find_opdgeo_when_the_environment_is_not_activated(tmp_path):
    # `.venv/bin/snakemake ...` from a login node: the venv's bin folder is not on PATH
    copy_workflow(tmp_path)
    result = subprocess.run(
        [str(BIN / "snakemake"), "--configfile", "config/smoke.yaml", "--cores", "1",
         "results/tables/runs.csv", "--config", "preload=false"],
        cwd=tmp_path, env={**os.environ, "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "results/tables/runs.csv").exists()


@pytest.mark.workflow
def test_device_cuda_without_a_gpu_stops_before_any_output_is_deleted(tmp_path):
    copy_workflow(tmp_path)
    table = tmp_path / "results/tables/runs.csv"
    table.parent.mkdir(parents=True)
    table.write_text("an earlier run's table\n")
    result = snakemake(tmp_path, str(table.relative_to(tmp_path)), "--forcerun", "runs_table",
                       "--config", "device=cuda", check=False)
    assert result.returncode != 0 and "no GPU is visible" in result.stderr
    assert table.read_text() == "an earlier run's table\n"


def command_line(process):
    try:
        return " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):  # a short-lived child of Snakemake
        return ""


def gone(process):
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def endless_base_model(workdir: Path, *options) -> subprocess.Popen:
    """Snakemake running a job that trains until it is killed: no evaluation stops it."""
    copy_workflow(workdir)
    config = yaml.safe_load((workdir / "config/smoke.yaml").read_text())
    config["models"]["student"]["train"].update(max_steps=10**9, eval_every=10**9)
    (workdir / "endless.yaml").write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [str(BIN / "snakemake"), "--configfile", "endless.yaml", "--cores", "1",
         "results/models/student/final", *options],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_and_wait_for_its_jobs(run: subprocess.Popen, workdir: Path):
    """`kill -9` the run (Snakemake runs no onerror hook); every process it started ends."""
    started = psutil.Process(run.pid).children(recursive=True)
    run.send_signal(signal.SIGKILL)
    run.wait()
    for process in started:
        wait_for(lambda p=process: gone(p), seconds=60)
    assert not (workdir / "results/models/student/final").exists()


@pytest.mark.workflow
def test_killing_snakemake_ends_the_jobs_running_in_the_preload_server(tmp_path):
    run = endless_base_model(tmp_path)
    snakemake = psutil.Process(run.pid)

    def preload_workers():
        servers = [p for p in snakemake.children() if "opdgeo.preload" in command_line(p)]
        try:
            return [worker for server in servers for worker in server.children()]
        except psutil.NoSuchProcess:  # a server that has just ended
            return []

    wait_for(lambda: preload_workers(), seconds=600)  # the job runs in a forked worker
    kill_and_wait_for_its_jobs(run, tmp_path)  # server, worker, job shell, opdgeo command


@pytest.mark.workflow
def test_killing_snakemake_ends_its_jobs_without_the_preload_server(tmp_path):
    """Each job's `opdgeo` process waits for the run's end (opdgeo.handover.end_with_run)."""
    run = endless_base_model(tmp_path, "--config", "preload=false")
    snakemake = psutil.Process(run.pid)
    wait_for(lambda: any("train-model" in command_line(p) and "bash" not in command_line(p)
                         for p in snakemake.children(recursive=True)), seconds=600)
    kill_and_wait_for_its_jobs(run, tmp_path)  # job shell, opdgeo command


@pytest.mark.workflow
@pytest.mark.parametrize("preload", [True, False])
def test_preload_setting_decides_whether_jobs_run_in_the_server(tmp_path, preload):
    copy_workflow(tmp_path)
    # spelt as the README writes it: Snakemake hands `preload=false` over as a string
    snakemake(tmp_path, "results/tables/runs.csv", "--config", f"preload={str(preload).lower()}")
    assert (tmp_path / "results/tables/runs.csv").exists()
    log = tmp_path / "results/logs/preload.log"
    assert ("preloaded" in log.read_text()) if preload else not log.exists()
