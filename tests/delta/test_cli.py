"""The `analyze` and `overlap` subcommands, standalone and through `register`."""

import argparse
import json
import os

import pandas as pd
import pytest
from delta_checkpoints import perturbed, save_checkpoint, small_model

from opdgeo.delta import cli


def test_register_adds_both_subcommands():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", "--source", "a", "--trained", "b", "--out", "c",
                              "--dtype", "fp32", "--device", "cpu", "--exact-svd-max", "64"])
    assert (args.handler, args.dtype, args.exact_svd_max) == (cli.run_analyze, "fp32", 64)
    args = parser.parse_args(["overlap", "--source", "a", "--trained-a", "b", "--trained-b",
                              "c", "--out", "d", "--atol", "0"])
    assert (args.handler, args.atol) == (cli.run_overlap, 0.0)


def test_main_runs_analyze_and_overlap(tmp_path, capsys):
    source = small_model(layers=1)
    save_checkpoint(tmp_path / "source", source)
    save_checkpoint(tmp_path / "a", perturbed(source, seed=1))
    save_checkpoint(tmp_path / "b", perturbed(source, seed=2))
    cli.main(["analyze", "--source", str(tmp_path / "source"), "--trained", str(tmp_path / "a"),
              "--out", str(tmp_path / "analysis"), "--device", "cpu", "--no-nulls"])
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["tensor_count"] == len(source)
    cli.main(["overlap", "--source", str(tmp_path / "source"), "--trained-a",
              str(tmp_path / "a"), "--trained-b", str(tmp_path / "b"),
              "--out", str(tmp_path / "overlap")])
    assert (tmp_path / "overlap" / "overlap.json").exists()
    assert "Jaccard" in capsys.readouterr().out


def test_analyze_writes_the_trajectory_of_every_intermediate_checkpoint(tmp_path):
    source = small_model(layers=1)
    save_checkpoint(tmp_path / "source", source)
    save_checkpoint(tmp_path / "run" / "final", perturbed(source, seed=3, scale=3e-3))
    for step, scale in ((10, 1e-3), (20, 2e-3)):
        save_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{step}",
                        perturbed(source, seed=3, scale=scale))
    options = ["--source", str(tmp_path / "source"), "--device", "cpu", "--no-nulls"]
    cli.main(["analyze", *options, "--trained", str(tmp_path / "run" / "final"),
              "--out", str(tmp_path / "analysis" / "final"),
              "--checkpoints", str(tmp_path / "run" / "checkpoints"),
              "--trajectory", str(tmp_path / "analysis" / "trajectory.csv")])
    trajectory = pd.read_csv(tmp_path / "analysis" / "trajectory.csv")
    assert list(trajectory.columns) == ["step", "metric", "value"]
    norms = trajectory[trajectory["metric"] == "relative_norm"].set_index("step")["value"]
    assert list(norms.index) == [10, 20]
    assert norms[10] < norms[20]  # the later checkpoint moved further from the source
    # Each step's rows are the summary an analysis of that checkpoint alone writes.
    cli.main(["analyze", *options, "--trained", str(tmp_path / "run" / "checkpoints" / "step-20"),
              "--out", str(tmp_path / "alone")])
    alone = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert norms[20] == pytest.approx(alone["relative_norm"])

    # A run without intermediate checkpoints gets a header-only trajectory.
    cli.main(["analyze", *options, "--trained", str(tmp_path / "run" / "final"),
              "--out", str(tmp_path / "other" / "final"),
              "--trajectory", str(tmp_path / "other" / "trajectory.csv")])
    assert pd.read_csv(tmp_path / "other" / "trajectory.csv").empty


def test_overlap_of_every_pair_of_runs_in_one_call(tmp_path):
    source = small_model(layers=1)
    save_checkpoint(tmp_path / "source", source)
    runs = {name: tmp_path / name for name in ("x", "y", "z")}
    for seed, path in enumerate(runs.values(), start=1):
        save_checkpoint(path, perturbed(source, seed=seed))
    cli.main(["overlap", "--source", str(tmp_path / "source"), "--out", str(tmp_path / "group"),
              "--runs", *(f"{name}={path}" for name, path in runs.items())])
    written = sorted(p.name for p in (tmp_path / "group").iterdir())
    assert written == ["x__y", "x__z", "y__z"]
    cli.main(["overlap", "--source", str(tmp_path / "source"), "--trained-a", str(runs["x"]),
              "--trained-b", str(runs["z"]), "--out", str(tmp_path / "two")])
    assert (json.loads((tmp_path / "two" / "overlap.json").read_text())
            == json.loads((tmp_path / "group" / "x__z" / "overlap.json").read_text()))


def test_overlap_names_the_missing_runs(tmp_path):
    with pytest.raises(SystemExit):  # argparse: NAME=CHECKPOINT expected
        cli.main(["overlap", "--source", "s", "--out", "o", "--runs", "no-equals-sign"])
    with pytest.raises(ValueError, match="--trained-a and --trained-b, or --runs"):
        cli.main(["overlap", "--source", "s", "--out", "o", "--trained-a", "a"])


def test_analyze_with_a_missing_checkpoints_folder_writes_no_trajectory(tmp_path):
    source = small_model(layers=1)
    save_checkpoint(tmp_path / "source", source)
    save_checkpoint(tmp_path / "final", perturbed(source, seed=1))
    with pytest.raises(FileNotFoundError, match="no checkpoints folder"):
        cli.main(["analyze", "--source", str(tmp_path / "source"), "--trained",
                  str(tmp_path / "final"), "--out", str(tmp_path / "analysis"), "--device",
                  "cpu", "--no-nulls", "--checkpoints", str(tmp_path / "absent"),
                  "--trajectory", str(tmp_path / "trajectory.csv")])
    assert not (tmp_path / "trajectory.csv").exists()


def test_overlap_of_a_missing_run_checkpoint_writes_nothing(tmp_path):
    source = small_model(layers=1)
    save_checkpoint(tmp_path / "source", source)
    save_checkpoint(tmp_path / "x", perturbed(source, seed=1))
    save_checkpoint(tmp_path / "y", perturbed(source, seed=2))
    # x__y is compared before the missing z is found: nothing of the group may remain.
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        cli.main(["overlap", "--source", str(tmp_path / "source"), "--out",
                  str(tmp_path / "group"), "--runs", f"x={tmp_path / 'x'}",
                  f"y={tmp_path / 'y'}", f"z={tmp_path / 'missing'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "x", "y"]


def analyze_with_opdgeo(tmp_path, capsys, trained, out=None, *extra):
    """`opdgeo analyze` as a user runs it: exit status and the last line of stderr."""
    from opdgeo.cli import main

    with pytest.raises(SystemExit) as status:
        main(["analyze", "--source", str(tmp_path / "source"), "--trained", str(trained),
              "--out", str(out or tmp_path / "analysis"), "--device", "cpu", "--no-nulls",
              *extra])
    return status.value.code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(("tensor", "value"), [
    ("model.norm.weight", float("nan")),  # a 1-D tensor: no SVD would stumble on it
    ("model.layers.0.mlp.down_proj.weight", float("inf")),
    ("model.layers.1.self_attn.q_proj.weight", float("-inf")),
])
def test_analyze_rejects_non_finite_weights_naming_checkpoint_and_tensor(tmp_path, capsys,
                                                                         tensor, value):
    source = small_model()
    save_checkpoint(tmp_path / "source", source)
    trained = perturbed(source)
    trained[tensor].view(-1)[3] = value
    save_checkpoint(tmp_path / "trained", trained)
    code, message = analyze_with_opdgeo(tmp_path, capsys, tmp_path / "trained")
    assert code == 1
    assert str(tmp_path / "trained") in message and f"tensor {tensor} " in message
    assert "NaN or inf" in message
    assert not (tmp_path / "analysis").exists()


def test_analyze_names_a_truncated_safetensors_file(tmp_path, capsys):
    source = small_model()
    save_checkpoint(tmp_path / "source", source)
    file = save_checkpoint(tmp_path / "trained", perturbed(source)) / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    code, message = analyze_with_opdgeo(tmp_path, capsys, tmp_path / "trained")
    assert code == 1 and str(file) in message and "damaged or truncated" in message
    assert not (tmp_path / "analysis").exists()


@pytest.mark.parametrize("where", ["out", "trajectory"])
def test_analyze_checks_its_outputs_can_be_written_before_the_work(tmp_path, capsys, where):
    # The source does not even exist: the unwritable output is reported before anything else.
    (tmp_path / "a-file").write_text("")
    unwritable = tmp_path / "a-file" / "analysis"
    out, extra = ((unwritable, []) if where == "out" else
                  (None, ["--trajectory", str(unwritable / "trajectory.csv")]))
    code, message = analyze_with_opdgeo(tmp_path, capsys, tmp_path / "trained", out, *extra)
    assert code == 1 and f"cannot write {unwritable}" in message


def test_json_prints_the_written_summary_and_nothing_else(tmp_path, capsys):
    source = small_model(layers=1)
    save_checkpoint(tmp_path / "source", source)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        save_checkpoint(tmp_path / name, perturbed(source, seed=seed))
    cli.main(["analyze", "--source", str(tmp_path / "source"), "--trained", str(tmp_path / "a"),
              "--out", str(tmp_path / "analysis"), "--device", "cpu", "--no-nulls", "--json"])
    printed = capsys.readouterr()
    assert (json.loads(printed.out)
            == json.loads((tmp_path / "analysis" / "summary.json").read_text()))
    assert "relative_norm" in printed.err  # the human-readable lines moved to stderr

    cli.main(["overlap", "--source", str(tmp_path / "source"), "--trained-a", str(tmp_path / "a"),
              "--trained-b", str(tmp_path / "b"), "--out", str(tmp_path / "two"), "--json"])
    assert (json.loads(capsys.readouterr().out)
            == json.loads((tmp_path / "two" / "overlap.json").read_text()))

    cli.main(["overlap", "--source", str(tmp_path / "source"), "--out", str(tmp_path / "group"),
              "--runs", *(f"{n}={tmp_path / n}" for n in "abc"), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"a__b", "a__c", "b__c"}
    for pair, summary in printed.items():
        assert summary == json.loads((tmp_path / "group" / pair / "overlap.json").read_text())
