"""Gathering per-run outputs into tidy tables."""

import json

import pandas as pd
import pytest

from opdgeo.collect import collect_overlaps, collect_summaries
from opdgeo.delta.io import step_folders


def test_summaries_and_trajectories_become_one_tidy_table(tmp_path):
    final = tmp_path / "analysis" / "run-a" / "final" / "summary.json"
    final.parent.mkdir(parents=True)
    final.write_text(json.dumps({"relative_norm": 0.3, "blocks": {"attention": 0.2},
                                 "source": "not a number", "run": "run-a"}))
    trajectory = tmp_path / "analysis" / "run-a" / "trajectory.csv"
    pd.DataFrame({"run": "run-a", "step": [10, 20], "metric": ["relative_norm"] * 2,
                  "value": [0.1, 0.2]}).to_csv(trajectory, index=False)
    empty = tmp_path / "analysis" / "run-b" / "trajectory.csv"
    empty.parent.mkdir(parents=True)
    empty.write_text("run,step,metric,value\n")

    table = collect_summaries([final, trajectory, empty], {"run-a": 30})
    assert list(table.columns) == ["run", "step", "metric", "value"]
    rows = set(table.itertuples(index=False, name=None))
    assert rows == {("run-a", 30, "relative_norm", 0.3), ("run-a", 30, "blocks/attention", 0.2),
                    ("run-a", 10, "relative_norm", 0.1), ("run-a", 20, "relative_norm", 0.2)}


def test_a_summary_that_names_no_run_is_an_error(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"relative_norm": 0.3}))
    with pytest.raises(ValueError, match="names no run.*--run"):
        collect_summaries([tmp_path / "summary.json"], {})


def test_overlaps_from_files_and_from_group_folders(tmp_path):
    for name, jaccard in (("a__b", 0.5), ("a__c", 0.25)):
        path = tmp_path / "group" / name / "overlap.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"jaccard": jaccard}))
    from_folder = collect_overlaps([tmp_path / "group"])
    from_files = collect_overlaps(sorted((tmp_path / "group").glob("*/overlap.json")))
    assert from_folder.equals(from_files)
    assert set(from_folder.itertuples(index=False, name=None)) == {
        ("a", "b", "jaccard", 0.5), ("a", "c", "jaccard", 0.25)}


@pytest.mark.parametrize("given", ["missing/a__b/overlap.json", "a__b/overlap.csv",
                                   "loose/overlap.json"])
def test_an_overlap_path_that_is_not_a_pairs_file_is_named(tmp_path, given):
    for path in (tmp_path / "a__b" / "overlap.csv", tmp_path / "loose" / "overlap.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    with pytest.raises(ValueError, match=f"{given}: expected .*overlap.json file"):
        collect_overlaps([tmp_path / given])


def test_step_folders_are_in_step_order(tmp_path):
    for step in (100, 25, 50):
        (tmp_path / f"step-{step}").mkdir()
    (tmp_path / "step-notes.txt").write_text("")
    assert list(step_folders(tmp_path)) == [25, 50, 100]


def test_a_missing_checkpoints_folder_is_an_error_not_an_empty_trajectory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints folder"):
        step_folders(tmp_path / "absent")
