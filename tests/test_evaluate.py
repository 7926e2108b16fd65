"""Evaluation never redoes finished work: a killed job's rerun scores only the checkpoints
it had not scored, and writes the table an uninterrupted job writes."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pandas as pd

from opdgeo.evaluate import ScoreJournal

TASK = {"kind": "addition", "digits": 2, "eval_prompts": 8, "seed": 0}
SPEC = {"k": 2, "temperature": 1.0, "batch_size": 8}


def evaluate_command(run, out):
    return [sys.executable, "-m", "opdgeo.cli", "evaluate", "--run", "r",
            "--checkpoint", str(run / "final"), "--step", "3",
            "--checkpoints", str(run / "checkpoints"), "--task", json.dumps(TASK),
            "--evaluation", json.dumps(SPEC), "--out", str(out), "--device", "cpu",
            "--threads", "1"]


def test_killed_evaluation_reruns_only_the_missing_checkpoints(tmp_path, make_checkpoint):
    run = tmp_path / "run"
    for step, seed in ((1, 1), (2, 2)):
        make_checkpoint(run / "checkpoints" / f"step-{step}", seed=seed)
    final = make_checkpoint(run / "final", seed=3)
    reference = tmp_path / "reference.csv"
    subprocess.run(evaluate_command(run, reference), check=True, capture_output=True)

    # The final checkpoint's config is a FIFO: loading it blocks until the test writes to it,
    # so the job is killed after it scored steps 1 and 2, and certainly before step 3.
    config = (final / "config.json").read_bytes()
    (final / "config.json").unlink()
    os.mkfifo(final / "config.json")
    out = tmp_path / "eval" / "r.csv"
    job = subprocess.Popen(evaluate_command(run, out), stdout=subprocess.PIPE, text=True)
    for line in job.stdout:
        if line.startswith("r step 2:"):
            break
    job.send_signal(signal.SIGKILL)
    job.wait()
    job.stdout.close()
    assert not out.exists()
    journal = tmp_path / "eval" / "r.partial"
    assert sorted(p.name for p in journal.iterdir()) == ["step-1.json", "step-2.json"]

    (final / "config.json").unlink()
    (final / "config.json").write_bytes(config)
    rerun = subprocess.run(evaluate_command(run, out), check=True, capture_output=True,
                           text=True)
    lines = rerun.stdout.splitlines()
    assert [line for line in lines if "scored before" in line] == [
        f"r step {s}: scored before (journal {journal})" for s in (1, 2)]
    assert [line.split(":")[0] for line in lines if "exact match" in line] == ["r step 3"]
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(reference))
    assert not journal.exists()


def test_journal_reuses_a_score_only_for_the_same_checkpoint_and_settings(
        tmp_path, make_checkpoint):
    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=0)
    rows = [("r", 5, "exact_match", 0.25)]
    ScoreJournal(tmp_path / "journal", {"k": 2}).write(5, checkpoint, rows)
    assert ScoreJournal(tmp_path / "journal", {"k": 2}).read(5, checkpoint) == rows
    assert ScoreJournal(tmp_path / "journal", {"k": 4}).read(5, checkpoint) is None
    assert ScoreJournal(tmp_path / "journal", {"k": 2}).read(6, checkpoint) is None
    # A retrained checkpoint in the same folder is scored afresh.
    shutil.rmtree(checkpoint)
    make_checkpoint(checkpoint, seed=1)
    os.utime(checkpoint / "model.safetensors", ns=(1, 1))
    assert ScoreJournal(tmp_path / "journal", {"k": 2}).read(5, checkpoint) is None
