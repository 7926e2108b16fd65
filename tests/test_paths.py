"""Paths with a space and a non-ASCII letter reach every command whole: the config file, a
given model pair, an external run's checkpoints and the workflow's own folder."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline import ROOT, copy_workflow

from opdgeo.config import build_masks, read_config

BIN = Path(sys.executable).parent
ODD = "dïr with space"


def test_make_passes_a_config_path_whole(tmp_path):
    config = f"{ODD}/c.yaml"
    result = subprocess.run(["make", "-n", "reproduce", f"CONFIG={config}"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    commands = [shlex.split(line) for line in result.stdout.splitlines()
                if "check-config" in line or "--configfile" in line]
    assert len(commands) == 2, result.stdout
    for words in commands:
        assert config in words, words


@pytest.mark.workflow
def test_an_external_pair_and_a_config_in_odd_folders(tmp_path, make_checkpoint):
    """Decomposition, analysis, a mask and an evaluation of checkpoints given by paths that a
    shell would split, run from a workflow folder and a config file in such folders."""
    models = tmp_path / f"mödels {ODD}"
    student = make_checkpoint(models / "the student", seed=0)
    teacher = make_checkpoint(models / "the teacher", seed=1)
    trained = make_checkpoint(models / "the trained", seed=2)
    workdir = tmp_path / f"wörk {ODD}"
    copy_workflow(workdir)
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    config["models"] = {"s": {"path": str(student)}, "t": {"path": str(teacher)}}
    config["pairs"] = {"p": {"student": "s", "teachers": ["t"],
                             "masked": {"arms": ["run:ext"], "seeds": [0]}}}
    config["external"] = {"ext": {"source": str(student), "trained": str(trained),
                                  "kind": "opd"}}
    config_file = tmp_path / f"cönfig {ODD}" / "c.yaml"
    config_file.parent.mkdir()
    config_file.write_text(yaml.safe_dump(config))
    mask = next(name for name, spec in build_masks(read_config(config_file)).items()
                if spec.run == "ext")
    targets = ["results/analysis/ext/final/summary.json", f"results/masks/{mask}.safetensors",
               "results/eval/models/s.csv"]

    result = subprocess.run(
        [str(BIN / "snakemake"), "--configfile", str(config_file), "--cores", "1", *targets],
        cwd=workdir, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    for target in targets:
        assert (workdir / target).stat().st_size > 0, target
