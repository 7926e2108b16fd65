import pandas as pd
import pytest
from safetensors.torch import load_file

from opdgeo.callbacks import NonFiniteLossError
from opdgeo.config import RunSpec, pair_training
from opdgeo.distillation import LOSSES, OWN_LOSSES, OPDTrainer
from opdgeo.models import character_tokenizer
from opdgeo.train import train_run

pytestmark = pytest.mark.train  # every test here trains through TRL
TASK = {"digits": 2, "eval_prompts": 16, "seed": 0}


def spec(kind, loss="reverse_kl", lr=1e-3, optimizer="adamw", steps=4):
    config = {
        "training": {"steps": steps, "batch_size": 8, "save_every": 2, "prompts": 32, "loss": loss,
                     "generations_per_prompt": 4,
                     "optimizers": {optimizer: {"learning_rate": lr}}},
        "pairs": {"p": {"student": "s", "teachers": ["t"]}},
    }
    return RunSpec(f"p-{kind}-{loss}", kind, "p", "s", "t", optimizer, 0,
                   training=pair_training(config, "p"))


def moved(source, final):
    before, after = load_file(str(source / "model.safetensors")), load_file(
        str(final / "model.safetensors"))
    return sum(int((before[k] != after[k]).sum()) for k in before)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_opd_loss_trains_and_writes_a_run(tiny_pair, tmp_path, loss, monkeypatch):
    """Spies on the loss: the study's own losses are computed at every step and are the loss
    trained on (the one the trainer logs), TRL's are never replaced by them."""
    student, teacher = tiny_pair
    returned, own_calls = [], []
    compute = OPDTrainer._compute_loss

    def spy_compute(self, *args, **kwargs):
        result = compute(self, *args, **kwargs)
        returned.append(float((result[0] if isinstance(result, tuple) else result).detach()))
        return result

    def spy_own(name):
        function = OWN_LOSSES[name]

        def spy(*args, **kwargs):
            own_calls.append(name)
            return function(*args, **kwargs)
        return spy

    monkeypatch.setattr(OPDTrainer, "_compute_loss", spy_compute)
    for name in OWN_LOSSES:
        monkeypatch.setitem(OWN_LOSSES, name, spy_own(name))
    train_run(spec("opd", loss), student, teacher, TASK, tmp_path / "run", "cpu")
    run = tmp_path / "run"
    assert moved(student, run / "final") > 0
    assert (run / "checkpoints" / "step-2" / "model.safetensors").exists()
    assert (run / "fp32" / "model.safetensors").exists()
    log = pd.read_csv(run / "train_log.csv")
    assert list(log.columns[:4]) == ["run", "step", "loss", "grad_norm"] and len(log) == 4
    assert (log["run"] == spec("opd", loss).name).all()
    assert len(returned) == len(log)  # one micro-batch per step at this batch size
    assert own_calls == ([loss] * len(log) if loss in OWN_LOSSES else [])
    # the trainer logs the loss it trained on, rounded to 4 decimals
    assert log["loss"].tolist() == pytest.approx(returned, abs=1e-4)


@pytest.mark.parametrize("kind,optimizer", [("sft", "adamw"), ("grpo", "adamw"), ("opd", "sgd")])
def test_controls_and_sgd_train(tiny_pair, tmp_path, kind, optimizer):
    student, teacher = tiny_pair
    lr = 1e-2 if optimizer == "sgd" else 1e-3
    train_run(spec(kind, lr=lr, optimizer=optimizer), student, teacher, TASK, tmp_path / "r", "cpu")
    assert (tmp_path / "r" / "final" / "model.safetensors").exists()
    assert (tmp_path / "r" / "optimizer_state.csv").exists()


@pytest.mark.parametrize(("lr", "optimizer"), [
    (float("inf"), "sgd"),  # the first step yields NaN weights
    (1e30, "adamw"),  # finite weights, too large: the next rollout's logits overflow
])
def test_divergence_stops_with_a_clear_error_and_no_checkpoint(tiny_pair, tmp_path, lr,
                                                               optimizer):
    student, teacher = tiny_pair
    run = spec("opd", lr=lr, optimizer=optimizer, steps=6)
    with pytest.raises(NonFiniteLossError, match="Lower the learning rate"):
        train_run(run, student, teacher, TASK, tmp_path / "r", "cpu")
    assert not (tmp_path / "r" / "final").exists()


def test_teacher_with_another_vocabulary_is_rejected_before_training(tiny_pair, tmp_path,
                                                                     make_checkpoint):
    student, _ = tiny_pair
    teacher = make_checkpoint(tmp_path / "t", seed=3,
                              tokenizer=character_tokenizer("0123456789+=-"))
    with pytest.raises(ValueError, match="different vocabularies"):
        train_run(spec("opd"), student, teacher, TASK, tmp_path / "r", "cpu")
    assert not (tmp_path / "r" / "final").exists()


def test_every_trained_kind_names_a_trainer_train_run_builds():
    from opdgeo.kinds import RUN_KINDS
    from opdgeo.train import BUILDERS

    assert {kind.trainer for kind in RUN_KINDS.values() if kind.trainer} <= set(BUILDERS)


def test_trackers_come_from_the_config(tmp_path):
    from trl import DistillationConfig

    from opdgeo.train import _trainer_args

    def args(training):
        return _trainer_args(DistillationConfig, tmp_path, steps=4, batch_size=8,
                             optimizer="adamw", opt={"learning_rate": 1e-3}, seed=0,
                             device="cpu", training=training)

    assert args({"report_to": ["tensorboard"]}).report_to == ["tensorboard"]
    assert args({}).report_to in ([], ["none"], "none")


def two_processes(run, pair, out, *, sharded: bool, mask=None, crash_at: str | None = None):
    """`opdgeo train-run` in two CPU processes on gloo, as `accelerate launch` starts one per
    GPU (torchrun; a sharded run through tests/cpu_fsdp.py, which turns accelerate's FSDP
    plugin on for CPU processes as accelerate does for GPUs)."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from opdgeo.crash import VARIABLE

    training = {**run.training, "micro_batch_size": 2, "gpus": 2,
                "sharding": "fsdp" if sharded else "none"}
    run = dataclasses.replace(run, training=training)
    tests = Path(__file__).parent
    torchrun = Path(sys.executable).parent / "torchrun"
    entry = [str(tests / "cpu_fsdp.py")] if sharded else ["-m", "opdgeo.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(VARIABLE, None)
    env |= {VARIABLE: crash_at} if crash_at else {}
    return subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", *entry, "train-run",
         "--run-spec", json.dumps(dataclasses.asdict(run)), "--source", str(pair[0]),
         "--teacher", str(pair[1]), "--task", json.dumps(TASK), "--out", str(out),
         "--device", "cpu", *(["--mask", str(mask)] if mask else [])],
        capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_sharded_training_gives_the_unsharded_weights_and_resumes_exactly(tiny_pair, tmp_path):
    """training.sharding: fsdp on two CPU processes: a masked OPD run (the student's and the
    teacher's weights, gradients and AdamW state sharded; the mask sharded with them), killed
    after its first Trainer checkpoint and run again, ends at the weights of the same run
    unsharded (DDP) and uninterrupted, within fp32's precision, with every step logged once,
    and the coordinates outside its mask untouched. The unsharded reference runs on two
    processes too: on-policy rollouts are sampled per process, so one process with the same
    global batch samples other completions. The first process alone writes the run's files."""
    import torch

    from opdgeo.masks import checkpoint_shapes, load_mask, random_mask_with_density, save_mask

    student, teacher = tiny_pair
    mask = tmp_path / "mask.safetensors"
    save_mask(random_mask_with_density(checkpoint_shapes(student), 0.3, seed=0), mask)
    run = spec("masked", steps=4)  # a Trainer checkpoint every 2 steps: killed at step 3

    plain = two_processes(run, tiny_pair, tmp_path / "plain", sharded=False, mask=mask)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "[rank1]" in plain.stderr  # the second process trained too
    killed = two_processes(run, tiny_pair, tmp_path / "sharded", sharded=True, mask=mask,
                           crash_at="train.mid-run")
    assert killed.returncode != 0
    checkpoint = tmp_path / "sharded" / "trainer" / "checkpoint-2"
    # FSDP's own checkpoint (the whole model and optimizer, gathered) and each process's
    # optimizer-state references: the run was sharded.
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "optimizer_references_0.safetensors",
            "optimizer_references_1.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    resumed = two_processes(run, tiny_pair, tmp_path / "sharded", sharded=True, mask=mask)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for out in ("plain", "sharded"):
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == [
            "checkpoints", "final", "fp32", "optimizer_state.csv", "train_log.csv"]
    for file in ("fp32/model.safetensors", "final/model.safetensors",
                 "checkpoints/step-2/model.safetensors"):
        ours, theirs = (load_file(str(tmp_path / out / file)) for out in ("sharded", "plain"))
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], msg=f"{file}: {name}")
    logs = [pd.read_csv(tmp_path / out / "train_log.csv") for out in ("sharded", "plain")]
    assert logs[0]["step"].tolist() == [1, 2, 3, 4]
    assert logs[0]["loss"].tolist() == pytest.approx(logs[1]["loss"].tolist(), rel=1e-5)
    states = [pd.read_csv(tmp_path / out / "optimizer_state.csv") for out in ("sharded", "plain")]
    assert states[0][["step", "block", "metric"]].equals(states[1][["step", "block", "metric"]])
    assert states[0]["value"].tolist() == pytest.approx(states[1]["value"].tolist(), rel=1e-6)

    inside = load_mask(mask)
    source = load_file(str(student / "model.safetensors"))
    trained = load_file(str(tmp_path / "sharded" / "final" / "model.safetensors"))
    assert not any(((source[n] != trained[n]) & ~inside[n]).any() for n in inside)
    assert any(((source[n] != trained[n]) & inside[n]).any() for n in inside)


def test_each_process_places_its_models_on_its_own_gpu(monkeypatch):
    import torch

    from opdgeo.device import process_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_device("cuda") == "cuda" and process_device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_device("cuda") == "cuda:3" and chosen == [3]
    assert process_device("cpu") == "cpu"


def self_distillation_spec(kind, self_teacher="source", loss="reverse_kl", kl_clip=None):
    config = {"training": {"steps": 2, "batch_size": 8, "save_every": 2, "prompts": 32,
                           "loss": loss, "generations_per_prompt": 4, "kl_clip": kl_clip,
                           "self_teacher": self_teacher,
                           "optimizers": {"adamw": {"learning_rate": 1e-3}}},
              "pairs": {"p": {"student": "s", "teachers": []}}}
    return RunSpec(f"p-{kind}-adamw-s0", kind, "p", "s", None, "adamw", 0,
                   training=pair_training(config, "p"))


@pytest.mark.parametrize("self_teacher", ["source", "current"])
@pytest.mark.parametrize("kind", ["opsd", "op2sd"])
def test_self_teacher_is_the_student_s_model_reading_a_privileged_context(
        tiny_pair, tmp_path, monkeypatch, kind, self_teacher):
    """The teacher's logits differ from the student's only through its prompt: at the first
    step (student = source), the teacher scoring the student's own prompt gives the student's
    logits exactly, and the student scoring the teacher's prompt gives the teacher's. OPSD's
    teacher reads the example's own answer, OP2SD's another example's."""
    import torch

    from opdgeo.distillation import TEACHER_PROMPT
    from opdgeo.task import split_examples

    student, _ = tiny_pair
    tokenizer = character_tokenizer()
    compute, calls = OPDTrainer._completion_logits, []

    def spy(model, inputs, prompt="prompt"):
        logits = compute(model, inputs, prompt)
        if prompt == TEACHER_PROMPT and len(calls) == 1:  # the first step's teacher pass
            taught = calls[0][0]
            assert torch.equal(compute(model, inputs, "prompt"), calls[0][1])
            assert torch.equal(compute(taught, inputs, TEACHER_PROMPT), logits)
            assert not torch.equal(logits, calls[0][1])  # the context changes the scores
            assert (model is taught) == (self_teacher == "current")
        calls.append((model, logits.detach(), prompt, inputs))
        return logits

    monkeypatch.setattr(OPDTrainer, "_completion_logits", staticmethod(spy))
    train_run(self_distillation_spec(kind, self_teacher), student, None, TASK,
              tmp_path / "run", "cpu")
    assert [c[2] for c in calls] == ["prompt", TEACHER_PROMPT] * 2
    answers = {e.prompt: e.answer for e in split_examples(2, 32, "train", 0)}
    for _, _, _, inputs in calls[1::2]:
        for plain, taught in zip(tokenizer.batch_decode(inputs["prompt_ids"], True),
                                 tokenizer.batch_decode(inputs[f"{TEACHER_PROMPT}_ids"], True),
                                 strict=True):
            context, _, prompt = taught.partition("=")
            assert prompt == plain
            own = answers[plain]
            if kind == "opsd":
                assert context == own
            else:  # another training example's answer
                assert context in answers.values() and any(
                    p != plain for p, a in answers.items() if a == context)
    assert moved(student, tmp_path / "run" / "final") > 0
    if self_teacher == "source":  # the frozen teacher is still the source after training
        source = load_file(str(student / "model.safetensors"))
        teacher = dict(calls[-1][0].named_parameters())
        assert source.keys() <= teacher.keys()
        assert all(torch.equal(teacher[name].float(), value.float())
                   for name, value in source.items())


def test_generalized_jsd_is_trl_s_divergence_and_the_cap_bounds_its_terms():
    import torch
    import torch.nn.functional as F
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from opdgeo.distillation import generalized_jsd

    generator = torch.Generator().manual_seed(0)
    hidden_s, hidden_t = (torch.randn(2, 5, 8, generator=generator) for _ in range(2))
    head = torch.randn(11, 8, generator=generator)
    mask = torch.ones(2, 5)
    student = F.log_softmax(hidden_s @ head.T, dim=-1)
    teacher = F.log_softmax(hidden_t @ head.T, dim=-1)
    for beta in (0.0, 0.5, 1.0):
        trl_loss, _, _ = _chunked_divergence_loss(hidden_s, hidden_t, head, head, mask, beta)
        ours = generalized_jsd(student, teacher, beta)
        assert float(ours.mean()) == pytest.approx(float(trl_loss), rel=1e-5)
        capped = generalized_jsd(student, teacher, beta, clip=0.01)
        assert (capped <= 0.01 * 11 + 1e-6).all() and (capped <= ours + 1e-6).all()
        assert (capped < ours - 1e-6).any()


def test_a_run_is_tracked_live_and_its_log_has_trls_metrics(tiny_pair, tmp_path):
    """report_to: [tensorboard] writes every logged step beside the run, where `tensorboard
    --logdir results/runs` finds it; train_log.csv keeps TRL's completion length and entropy
    per step."""
    from dataclasses import replace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    student, teacher = tiny_pair
    tracked = spec("opd")
    tracked = replace(tracked, training={**tracked.training, "report_to": ["tensorboard"]})
    train_run(tracked, student, teacher, TASK, tmp_path / "run", "cpu")
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    assert log[["completion_length", "entropy", "tokens_per_second"]].notna().all().all()
    assert (log["completion_length"] > 0).all() and (log["entropy"] > 0).all()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "train/grad_norm", "train/entropy",
                "train/completions/mean_length"):
        assert tag in scalars, scalars
        assert [e.step for e in events.Scalars(tag)] == log["step"].tolist()
