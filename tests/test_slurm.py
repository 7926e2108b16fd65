"""The shipped SLURM profile (slurm/config.yaml), proven against a real SLURM.

The `slurm`-marked tests share one single-node cluster per session (tests/slurm_cluster.py).
They call Snakemake exactly as a cluster user does, `snakemake --profile slurm` from the
directory holding the workflow, with `slurm/` linked to the repository's profile so that the
file under test is the file we ship.

The GPU-request tests at the top need neither SLURM nor a GPU: they put a recording `sbatch`
first on PATH and read back the command line the executor plugin built.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

# The cluster fixture; imported by name only, so pytest can rewrite its asserts.
pytest_plugins = ["slurm_cluster"]

REPO = Path(__file__).resolve().parents[1]
PROFILE_DIR = REPO / "slurm"

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


@dataclass
class SnakemakeRun:
    returncode: int
    output: str

    def submissions(self) -> list[tuple[str, str]]:
        """(rule, SLURM job id) for every sbatch this run made, from Snakemake's log.

        The plugin files each job's log under `.snakemake/slurm_logs/rule_<name>/`, which is
        the one place its log line names the rule.
        """
        found = []
        for _, slurm_id, log in SUBMITTED.findall(self.output):
            rule = re.search(r"/(?:rule|group)_([^/]+)/", log)
            found.append((rule.group(1) if rule else "?", slurm_id))
        return found

    def submitted_rules(self) -> set[str]:
        return {rule for rule, _ in self.submissions()}


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


# --- GPU requests reach sbatch (no SLURM, no GPU needed) -----------------------------------

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
    # Partition from the profile's default-resources.
    assert train[train.index("-p") + 1] == "cpu"

    assert not any(a.startswith(("--gpus", "--gres")) for a in analyse)
    assert "--cpus-per-task=2" in analyse
    assert analyse[analyse.index("--mem") + 1] == "4000"  # the profile's default


def test_gpu_model_from_set_resources_reaches_sbatch(sbatch_calls):
    # What a cluster user's `set-resources: {train: {gpu_model: ...}}` line turns into.
    calls = sbatch_calls("--set-resources", "train:gpu_model=a100")
    assert "--gpus=a100:1" in calls["train"]


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
    subs = dict(run.submissions())
    assert set(subs) == {"a", "b"}, run.output[-4000:]
    a_line, b_line = (tmp_path / "b.txt").read_text().splitlines()
    assert a_line == subs["a"]
    assert b_line.split() == [subs["b"], "1"]  # one (fake) GPU allocated to the gpu=1 job
    finished = slurm_cluster.finished_jobs()
    for slurm_id in subs.values():
        assert finished[slurm_id]["JobState"] == "COMPLETED"
        assert finished[slurm_id]["Partition"] == "cpu"

    # Nothing left to do: a second invocation submits nothing.
    again = snakemake(tmp_path, env=slurm_cluster.env)
    assert_ok(again)
    assert again.submissions() == []
