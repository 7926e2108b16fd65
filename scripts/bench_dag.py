"""How long does the whole DAG take, and what would per-job start-up alone cost?

Runs `snakemake --configfile CONFIG --cores N` on a copy of the repository's tracked files in
a temporary folder, then prints the wall time beside its target and beside a reference
measured in the same run: the start-up cost, i.e. every job's import cost (timed here, per
kind of job) divided by the cores, which a local run avoids by running its jobs in forks of
the preload server (opdgeo.preload; --no-preload starts every job on its own, as a cluster
does). The machine drifts from day to day; the ratio does less.

    PYTHONPATH=scripts python scripts/bench_dag.py --config config/smoke.yaml --target 180
"""

import argparse
import csv
import os
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
OTHER_JOBS = "opdgeo.tables"


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
        start = time.perf_counter()
        preload = ["--config", "preload=false"] if args.no_preload else []
        subprocess.run(["snakemake", "--configfile", args.config, "--cores", str(args.cores),
                        "--quiet", "rules", *preload], cwd=workdir, env=env, check=True)
        wall = time.perf_counter() - start

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
    finally:  # also when the DAG fails
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
