"""The `analyze` and `overlap` subcommands, standalone and through `register`."""

import argparse
import json

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
