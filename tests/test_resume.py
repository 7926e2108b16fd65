"""A training job killed after a checkpoint continues from it, to the same final weights.

OPD generates its own rollouts, so the resumed run only matches the uninterrupted one when
the Trainer restores the optimizer, the data order and the RNG state of the checkpoint. The
runs here pass over their prompts four times and are killed in the second pass, after
`checkpoint-3`: the data order of a later pass must be restored too.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdgeo.callbacks import NonFiniteGuardCallback
from opdgeo.config import RunSpec, pair_training
from opdgeo.train import _checkpoint_damage, train_run

pytestmark = pytest.mark.train  # every test here trains through TRL
TASK = {"digits": 2, "eval_prompts": 16, "seed": 0}


# 4 prompts x 4 rollouts (the default generations_per_prompt) / batch 8: two steps a pass.
STEPS_PER_PASS = 2


def opd_spec(steps=8):
    config = {
        "training": {"steps": steps, "batch_size": 8, "save_every": 3, "prompts": 4,
                     "optimizers": {"adamw": {"learning_rate": 1e-3}}},
        "pairs": {"p": {"student": "s", "teachers": ["t"]}},
    }
    return RunSpec("p-opd-t-adamw-s0", "opd", "p", "s", "t", "adamw", 0,
                   training=pair_training(config, "p"))


class Killed(Exception):
    pass


def fp32_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "fp32" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path):
    wa, wb = fp32_weights(a), fp32_weights(b)
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"tensors differ after resume: {differing}"
    for file in ("fp32/model.safetensors", "final/model.safetensors"):
        assert (a / file).read_bytes() == (b / file).read_bytes(), file


@pytest.fixture(scope="module")
def uninterrupted(tiny_pair, tmp_path_factory):
    student, teacher = tiny_pair
    out = tmp_path_factory.mktemp("resume") / "straight"
    train_run(opd_spec(), student, teacher, TASK, out, "cpu")
    return out


def kill_at_step_4(run: Path, student: Path, teacher: Path, monkeypatch):
    """Train `run` until an exception at the end of step 4, after checkpoint-3."""
    original = NonFiniteGuardCallback.on_step_end

    def die_at_step_4(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise Killed
        return original(self, args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(NonFiniteGuardCallback, "on_step_end", die_at_step_4)
        with pytest.raises(Killed):
            train_run(opd_spec(), student, teacher, TASK, run, "cpu")
    assert (run / "trainer" / "checkpoint-3").is_dir() and not (run / "final").exists()


def test_killed_run_resumes_from_its_checkpoint_to_the_same_weights(
        tiny_pair, uninterrupted, tmp_path, monkeypatch):
    student, teacher = tiny_pair
    run = tmp_path / "run"
    kill_at_step_4(run, student, teacher, monkeypatch)
    assert (run / "trainer" / "snapshots" / "step-3").is_dir()
    state = json.loads((run / "trainer" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["epoch"] == 3 / STEPS_PER_PASS  # in the second pass over the prompts

    train_run(opd_spec(), student, teacher, TASK, run, "cpu")
    assert_same_weights(run, uninterrupted)
    # The log holds every step, those of the killed attempt up to its checkpoint too; the
    # snapshots of both attempts are kept.
    log = (run / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in log[1:]] == [
        str(step) for step in range(1, opd_spec().training["steps"] + 1)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-6"]
    assert not (run / "trainer").exists()


def test_a_damaged_checkpoint_is_dropped_not_resumed(tiny_pair, uninterrupted, tmp_path,
                                                     monkeypatch, capfd):
    student, teacher = tiny_pair
    run = tmp_path / "run"
    kill_at_step_4(run, student, teacher, monkeypatch)
    weights = run / "trainer" / "checkpoint-3" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # its trainer_state.json intact

    train_run(opd_spec(), student, teacher, TASK, run, "cpu")  # from the start: no other one
    assert_same_weights(run, uninterrupted)
    assert "checkpoint-3 cannot be resumed (model.safetensors" in capfd.readouterr().err


def test_a_damaged_snapshot_is_never_promoted(tiny_pair, uninterrupted, tmp_path,
                                              monkeypatch, capfd):
    """A bf16 snapshot cut short (its checkpoint whole) is written again by training its
    step again: the checkpoint after it cannot be resumed."""
    student, teacher = tiny_pair
    run = tmp_path / "run"
    kill_at_step_4(run, student, teacher, monkeypatch)
    weights = run / "trainer" / "snapshots" / "step-3" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)

    train_run(opd_spec(), student, teacher, TASK, run, "cpu")
    assert_same_weights(run, uninterrupted)
    for step in (3, 6):
        assert (run / "checkpoints" / f"step-{step}" / "model.safetensors").read_bytes() == (
            uninterrupted / "checkpoints" / f"step-{step}" / "model.safetensors").read_bytes()
    assert "snapshots/step-3 is damaged or missing (model.safetensors" in capfd.readouterr().err


DAMAGES = {
    "optimizer.pt": "truncated", "scheduler.pt": "deleted", "rng_state.pth": "truncated",
    "trainer_state.json": "truncated", "model.safetensors": "deleted",
    "model.safetensors ": "other tensors", "optimizer_references.safetensors": "truncated",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_checkpoint_is_checked_by_content(tmp_path, damage):
    """Each file an exact resume reads; `training_args.bin` is no weights file."""
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 3}')
    save_file({"w": torch.ones(4)}, checkpoint / "model.safetensors")
    save_file({"logged:w": torch.ones(4)}, checkpoint / "optimizer_references.safetensors")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"state": torch.ones(64)}, checkpoint / name)
    assert _checkpoint_damage(checkpoint, {"w"}) is None
    file, how = checkpoint / damage.strip(), DAMAGES[damage]
    if how == "deleted":
        file.unlink()
    elif how == "truncated":
        os.truncate(file, file.stat().st_size // 2)
    else:
        save_file({"v": torch.ones(4)}, file)
    assert damage.strip() in _checkpoint_damage(checkpoint, {"w"})


# The job under test, paused for good at the end of step 4 (checkpoint-3 is complete by then)
# after it says so in a file: the test kills it at that event, whatever the machine's speed.
PAUSED_JOB = """
import sys, threading
from pathlib import Path
from opdgeo.callbacks import NonFiniteGuardCallback
from opdgeo.cli import main

paused, original = Path(sys.argv[1]), NonFiniteGuardCallback.on_step_end

def pause_at_step_4(self, args, state, control, **kwargs):
    if state.global_step == 4:
        paused.touch()
        threading.Event().wait()
    return original(self, args, state, control, **kwargs)

NonFiniteGuardCallback.on_step_end = pause_at_step_4
main(sys.argv[2:])
"""


def test_sigkilled_cli_job_resumes(tiny_pair, uninterrupted, tmp_path):
    """The real thing: the `opdgeo train-run` process killed with SIGKILL, then rerun."""
    student, teacher = tiny_pair
    run, paused = tmp_path / "run", tmp_path / "paused"
    spec = opd_spec()
    arguments = ["train-run",
                 "--run-spec", json.dumps({k: getattr(spec, k) for k in spec.__dataclass_fields__}),
                 "--source", str(student), "--teacher", str(teacher), "--task", json.dumps(TASK),
                 "--out", str(run), "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "scripts")}
    job = subprocess.Popen([sys.executable, "-c", PAUSED_JOB, str(paused), *arguments], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not paused.exists():
        assert job.poll() is None, job.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert (run / "trainer" / "checkpoint-3").is_dir() and not (run / "final").exists()

    subprocess.run([sys.executable, "-m", "opdgeo.cli", *arguments], env=env, check=True,
                   capture_output=True)
    assert_same_weights(run, uninterrupted)
