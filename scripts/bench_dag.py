"""How long does the whole DAG take, and what would per-job start-up alone cost?

Runs `snakemake --configfile CONFIG --cores N` on a copy of the repository's tracked files in
a temporary folder, then prints the wall time beside its target and beside a reference
measured in the same run: the start-up cost, i.e. every job's import cost (timed here, per
kind of job) divided by the cores, which a local run avoids by running its jobs in forks of
the preload server (opdgeo.preload; --no-preload starts every job on its own, as a cluster
does). The machine drifts from day to day; the ratio does less.

It also prints the CPU time per stage, which a shared machine inflates less than wall time:
each job's own (the preload server's log, one line per forked job; the benchmark files'
cpu_time with --no-preload), Snakemake's with the job commands and the server (its waited-for
children; the forked jobs are not among them), and a fixed single-thread reference workload
timed before and after the DAG, so that runs on different days or loads can be scaled to one
another. Idle wall time on N cores is estimated as the total CPU time / N (the DAG's many
one-thread jobs keep every core busy; its critical path is far shorter).

    PYTHONPATH=scripts python scripts/bench_dag.py --config config/smoke.yaml --target 180
"""

import argparse
import csv
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The module each kind of job imports before it does any work (see opdgeo.cli), by the
# folder its benchmark file goes to (results/benchmarks/{folder}/...).
JOB_IMPORTS = {
    "train_": "opdgeo.train",
    "evaluate_": "opdgeo.evaluate",
    "analyze": "opdgeo.delta.analyze",
    "overlap": "opdgeo.delta.overlap",
    "make_mask": "opdgeo.masks",
    "figures": "opdgeo.figures",
}
OTHER_JOBS = "opdgeo.collect"


def job_import(rule: str) -> str:
    return next((m for prefix, m in JOB_IMPORTS.items() if rule.startswith(prefix)), OTHER_JOBS)


def import_seconds(module: str, repeats: int = 2) -> float:
    """Wall time of a fresh interpreter importing `module` (the best of `repeats`)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def copy_tracked_files(destination: Path):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def job_counts(workdir: Path) -> Counter:
    """Jobs run, per rule, from the benchmark directive's files (one per job)."""
    return Counter(path.relative_to(workdir / "results/benchmarks").parts[0]
                   for path in (workdir / "results/benchmarks").rglob("*.tsv"))


def job_seconds(workdir: Path) -> float:
    total = 0.0
    for path in (workdir / "results/benchmarks").rglob("*.tsv"):
        with path.open() as handle:
            total += sum(float(row["s"]) for row in csv.DictReader(handle, delimiter="\t"))
    return total


# Stages of the per-stage table: the `opdgeo` subcommand (or benchmark folder) -> stage
STAGES = {"train-model": "base models", "train_model": "base models",
          "train-run": "training of runs", "train_run": "training of runs",
          "evaluate": "evaluation", "evaluate_model": "evaluation", "evaluate_run": "evaluation",
          "analyze": "analysis (final + trajectory)", "decompose": "analysis (final + trajectory)"}
OTHER_STAGE = "tables, figures, findings, masks, cards, overlap"


def reference_cpu_seconds(repeats: int = 3) -> float:
    """CPU seconds of a fixed one-thread workload (small matrix products and element-wise
    passes, as the jobs do), the best of `repeats`: a unit for scaling CPU times."""
    import torch

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(256, 256, generator=generator) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(2000):
            c = torch.tanh(a @ b) * 0.5 + a
        best = min(best, time.process_time() - start)
    del c
    return best


def stage_cpu(workdir: Path, preload: bool) -> dict[str, float]:
    """CPU seconds of the jobs' own work per stage."""
    totals: dict[str, float] = {}
    if preload:
        sys.path.insert(0, str(workdir / "scripts"))
        from opdgeo.preload import job_usage

        for row in job_usage(workdir / "results/logs/preload.log"):
            command = row["command"].split()[0]
            stage = STAGES.get(command, OTHER_STAGE)
            totals[stage] = totals.get(stage, 0.0) + row["cpu"]
        return totals
    for path in (workdir / "results/benchmarks").rglob("*.tsv"):
        stage = STAGES.get(path.relative_to(workdir / "results/benchmarks").parts[0],
                           OTHER_STAGE)
        with path.open() as handle:
            totals[stage] = totals.get(stage, 0.0) + sum(
                float(row["cpu_time"]) for row in csv.DictReader(handle, delimiter="\t"))
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/smoke.yaml")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--target", type=float, default=180, help="seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--no-preload", action="store_true",
                        help="start every job in its own process (--config preload=false)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="opdgeo-bench-dag-"))
    try:
        copy_tracked_files(workdir)
        env = {**os.environ, "PYTHONPATH": str(workdir / "scripts")}
        reference_before = reference_cpu_seconds()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        preload = ["--config", "preload=false"] if args.no_preload else []
        subprocess.run(["snakemake", "--configfile", args.config, "--cores", str(args.cores),
                        "--quiet", "rules", *preload], cwd=workdir, env=env, check=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        snakemake_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime
                                                              + children.ru_stime)
        reference_after = reference_cpu_seconds()

        jobs = job_counts(workdir)
        imports = {m: import_seconds(m) for m in {job_import(rule) for rule in jobs}}
        floor = sum(n * imports[job_import(rule)] for rule, n in jobs.items()) / args.cores
        load = os.getloadavg()[0]
        print(f"config {args.config}, {sum(jobs.values())} jobs on {args.cores} cores "
              f"(load average now {load:.1f})")
        mode = "every job on its own" if args.no_preload else "jobs in forks of the preload server"
        print(f"  DAG wall time            {wall:8.1f} s   target {args.target:.0f} s   "
              f"ratio {wall / args.target:.2f}   ({mode})")
        print(f"  start-up cost (imports)  {floor:8.1f} s   = {floor / wall:.0%} of the wall time "
              f"(each job importing on its own, divided by the cores)")
        print(f"  sum of job times         {job_seconds(workdir):8.1f} s   "
              f"(Snakemake benchmark files)")
        for module, seconds in sorted(imports.items(), key=lambda item: -item[1]):
            print(f"    import {module:24s} {seconds:5.2f} s")
        stages = stage_cpu(workdir, not args.no_preload)
        jobs_cpu = sum(stages.values())
        if args.no_preload:  # the benchmark files already counted the jobs' own processes
            stages["Snakemake itself (and the job commands' start-up)"] = \
                snakemake_cpu - jobs_cpu
        else:
            stages["Snakemake itself, the job commands, the preload server"] = snakemake_cpu
        total = sum(stages.values())
        print(f"CPU time per stage (reference workload {reference_before:.2f} s before the DAG, "
              f"{reference_after:.2f} s after)")
        for stage, seconds in sorted(stages.items(), key=lambda item: -item[1]):
            print(f"  {stage:56s} {seconds:8.1f} s   {seconds / total:4.0%}")
        print(f"  {'total':56s} {total:8.1f} s   = {total / args.cores / 60:.1f} min on "
              f"{args.cores} idle cores (total / cores), "
              f"{total / ((reference_before + reference_after) / 2):.0f} reference units")
    finally:  # also when the DAG fails
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
