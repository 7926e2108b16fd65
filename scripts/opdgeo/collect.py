"""Tidy tables: every per-run output of the DAG gathered into long tables (run, step, metric,
value). Figures and paper tables read these only, never checkpoints.
"""

import json
import math
from pathlib import Path

import pandas as pd

from opdgeo.delta.columns import flatten

TIDY = ["run", "step", "metric", "value"]


def collect_summaries(paths: list[Path], final_steps: dict[str, int]) -> pd.DataFrame:
    """Tidy rows from the analysis's `summary.json` files (at the run's final step) and
    `trajectory.csv` files (its intermediate checkpoints), each naming its run (`--run`)."""
    rows, trajectories = [], []
    for path in map(Path, paths):
        if path.suffix == ".csv":
            trajectories.append(path)
            continue
        summary = json.loads(path.read_text())
        if "run" not in summary:
            raise ValueError(f"{path} names no run: analyse it with `opdgeo analyze --run NAME`")
        run = summary["run"]
        step = final_steps.get(run, math.nan)  # external runs have no step
        for metric, value in flatten(summary).items():
            rows.append((run, step, metric, value))
    if not trajectories:
        return pd.DataFrame(rows, columns=TIDY)
    return pd.concat([pd.DataFrame(rows, columns=TIDY), concat_csvs(trajectories)[TIDY]],
                     ignore_index=True)


def _overlap_files(paths: list[Path], name: str) -> list[Path]:
    """The `{a}__{b}/{name}` files among `paths`, or in the folders among them."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob(f"*__*/{name}"))
        elif path.is_file() and path.name == name and path.parent.name.count("__") == 1:
            files.append(path)
        else:
            raise ValueError(f"{path}: expected a folder of overlaps or an existing "
                             f"{{a}}__{{b}}/{name} file (written by `opdgeo overlap`)")
    return files


def collect_overlaps(paths: list[Path]) -> pd.DataFrame:
    """`{a}__{b}/overlap.json` files, or folders of them (`results/overlap/{group}`) -> rows
    (a, b, metric, value)."""
    rows = []
    for path in _overlap_files(paths, "overlap.json"):
        a, b = path.parent.name.split("__")
        for metric, value in flatten(json.loads(path.read_text())).items():
            rows.append((a, b, metric, value))
    return pd.DataFrame(rows, columns=["run_a", "run_b", "metric", "value"])


def collect_overlap_tensors(paths: list[Path]) -> pd.DataFrame:
    """The per-tensor `{a}__{b}/overlap.csv` files (mask counts), found as collect_overlaps
    finds the JSON beside them, each row with its pair's run_a and run_b."""
    frames = []
    for path in _overlap_files(paths, "overlap.csv"):
        a, b = path.parent.name.split("__")
        frames.append(pd.read_csv(path).assign(run_a=a, run_b=b))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def concat_csvs(paths: list[Path]) -> pd.DataFrame:
    """Concatenate per-run CSVs (each carries its own `run` column)."""
    frames = [pd.read_csv(path) for path in map(Path, paths)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
