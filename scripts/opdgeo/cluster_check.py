"""Would your cluster accept the study? Every job of a config's DAG, with the sbatch options
the executor plugin gives it under your profile, put to your SLURM with `sbatch --test-only`
(slurmctld's verdict on partition, wall time, memory, GPUs and account; nothing is queued).

    opdgeo check-cluster --configfile config/paper.yaml --profile slurm

Run it on the login node, from the repository root, after editing the profile and its
partition file: a job the cluster would refuse (a limit in the partition file above the
partition's real one, a GRES the nodes do not have, a missing account) is named with
slurmctld's reason, before anything is submitted.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

JOB_HEADER = re.compile(r"^(local)?rule (\w+):$", re.M)


def dry_run_jobs(configfile: str, profile: str, *args: str, cwd=None, env=None) -> list[dict]:
    """Every job that `snakemake --profile PROFILE --configfile CONFIGFILE -n` would submit:
    rule, wildcards (joined as the plugin's comment joins them), threads and resources, as
    Snakemake hands them to the executor plugin (--cores only makes the dry run print
    threads)."""
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", profile, "--configfile", configfile,
         "-n", "--cores", "512", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the dry run failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    blocks = JOB_HEADER.split(result.stdout)
    jobs = []
    for local, rule, body in zip(blocks[1::3], blocks[2::3], blocks[3::3], strict=True):
        fields = dict(re.findall(r"^ {4}(\w+): (.*)$", body, re.M))
        if local or rule == "all":
            continue
        resources = {}
        for item in fields["resources"].split(", "):
            key, value = item.split("=", 1)
            resources[key] = int(value) if value.isdigit() else value
        values = [kv.split("=", 1)[1] for kv in fields.get("wildcards", "").split(", ") if kv]
        jobs.append({"rule": rule, "wildcards": "_".join(values),
                     "threads": int(fields.get("threads", 1)), "resources": resources})
    return jobs


class _Resources(dict):
    """A job's resources as the plugin reads them: `.get(key)` and `.key`."""

    __getattr__ = dict.get


def profile_settings(profile: str | Path) -> tuple[dict, list]:
    """A profile's settings (its config.yaml) and the partitions the plugin reads for it
    (SNAKEMAKE_SLURM_PARTITIONS, else the profile's `slurm-partition-config`)."""
    from snakemake_executor_plugin_slurm.partitions import read_partition_file

    settings = yaml.safe_load((Path(profile) / "config.yaml").read_text()) or {}
    partitions = os.environ.get("SNAKEMAKE_SLURM_PARTITIONS",
                                settings.get("slurm-partition-config"))
    return settings, read_partition_file(Path(partitions)) if partitions else []


def sbatch_options(job: dict, partitions: list, settings: dict) -> list[str]:
    """The sbatch options the executor plugin builds for a job under a profile's settings
    (its own functions: partition choice, submit string, GPU string), without --wrap, log,
    job name and comment."""
    from snakemake_executor_plugin_slurm.partitions import get_best_partition
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    resources = _Resources(job["resources"])
    plugin_job = SimpleNamespace(name=job["rule"], threads=job["threads"], resources=resources)
    logger = SimpleNamespace(info=lambda *a: None, debug=lambda *a: None,
                             warning=lambda *a: None)
    partition = resources.get("slurm_partition") or get_best_partition(
        partitions, plugin_job, logger)
    account = str(resources.get("slurm_account") or "")
    account = re.split(r"[,\s]+", account)[0]
    executor = SimpleNamespace(requeue=settings.get("slurm-requeue", False),
                               no_requeue=settings.get("slurm-no-requeue", False),
                               qos=settings.get("slurm-qos"),
                               reservation=settings.get("slurm-reservation"))
    params = {"run_uuid": "x", "slurm_logfile": "x.log", "comment_str": f"rule_{job['rule']}",
              "account": f"-A {shlex.quote(account)}" if account else "",
              "partition": f"-p {partition}" if partition else "", "workdir": None}
    call = get_submit_command(plugin_job, params, executor) + set_gres_string(plugin_job)
    argv = shlex.split(call)[1:]
    for name in ("--job-name", "--output", "--comment"):
        i = argv.index(name)
        del argv[i:i + 2]
    return [a for a in argv if a != "--parsable"]


def sbatch_test_only(options: list[str], env=None) -> subprocess.CompletedProcess:
    """`sbatch --test-only`: slurmctld's verdict on a submission, nothing queued."""
    return subprocess.run(["sbatch", "--test-only", *options, "--wrap", "true"],
                          capture_output=True, text=True, env=env)


def refused_jobs(jobs: list[dict], partitions: list, settings: dict,
                 env=None) -> list[tuple[dict, list[str], str]]:
    """(job, options, slurmctld's reason) of every job the cluster refuses; one sbatch per
    distinct set of options."""
    verdicts: dict[tuple, subprocess.CompletedProcess] = {}
    refused = []
    for job in jobs:
        options = sbatch_options(job, partitions, settings)
        if tuple(options) not in verdicts:
            verdicts[tuple(options)] = sbatch_test_only(options, env)
        verdict = verdicts[tuple(options)]
        if verdict.returncode != 0:
            refused.append((job, options, verdict.stderr.strip()))
    return refused


def check_cluster(configfile: str, profile: str, snakemake_args: list[str]) -> int:
    """Print the cluster's verdict on every job of the config's DAG; 1 if any is refused."""
    if snakemake_args[:1] == ["--"]:
        snakemake_args = snakemake_args[1:]
    jobs = dry_run_jobs(configfile, profile, *snakemake_args)
    settings, partitions = profile_settings(profile)
    refused = refused_jobs(jobs, partitions, settings)
    for job, options, reason in refused:
        print(f"refused: {job['rule']} {job['wildcards']}: {reason}\n"
              f"  sbatch --test-only {shlex.join(options)}")
    print(f"{len(jobs) - len(refused)} of {len(jobs)} jobs of {configfile} accepted by "
          f"`sbatch --test-only` under profile {profile}" + (
              f"; {len(refused)} refused: fix the partition file's limits or the profile, and "
              "check again" if refused else ""))
    return 1 if refused else 0
