"""Evaluation never redoes finished work: a killed job's rerun scores only the checkpoints
it had not scored, and writes the table an uninterrupted job writes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import types
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from opdgeo.evaluate import (
    ScoreJournal,
    TransformersEngine,
    VLLMEngine,
    choose_engine,
    prompt_scores,
)
from opdgeo.task import make_task

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


class FakeSamplingParams:
    def __init__(self, **settings):
        self.__dict__.update(settings)


class FakeLLM:
    """vLLM's LLM as the evaluation calls it, generating with transformers on the CPU: a test
    double for the wiring (one call, the rendered prompts, the sampling settings); vLLM itself
    needs a GPU and cannot be installed here."""

    instances = []

    def __init__(self, model, **settings):
        from opdgeo.models import load_model, load_tokenizer

        self.settings, self.calls = {"model": model, **settings}, []
        self.model, self.tokenizer = load_model(model), load_tokenizer(model)
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        outputs = []
        for prompt, setting in zip(prompts, params, strict=True):
            ids = torch.tensor([prompt["prompt_token_ids"]])
            sample = setting.temperature > 0
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=setting.max_tokens,
                do_sample=sample, temperature=setting.temperature if sample else None,
                top_k=0 if sample else None, top_p=1.0 if sample else None,
                num_return_sequences=setting.n, pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id)
            texts = self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(text=t) for t in texts]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


def test_vllm_engine_renders_scores_and_batches_as_transformers_does(tmp_path, make_checkpoint,
                                                                     fake_vllm):
    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=0)
    task = make_task(TASK)
    examples = task.eval_examples()
    engine = VLLMEngine(checkpoint, {"gpu_memory_utilization": 0.5}, seed=3)
    greedy, sampled = engine.completions(examples, task.max_new_tokens, 4, 0.6, seed=3)
    [llm] = FakeLLM.instances
    assert llm.settings["gpu_memory_utilization"] == 0.5 and llm.settings["dtype"] == "bfloat16"
    # One call: every prompt greedy, and every prompt with its k samples.
    [(prompts, params)] = llm.calls
    assert len(prompts) == 2 * len(examples)
    assert [p.temperature for p in params] == [0.0] * len(examples) + [0.6] * len(examples)
    assert {(p.n, p.seed) for p in params[len(examples):]} == {(4, 3)}
    assert all(len(samples) == 4 for samples in sampled)
    # The prompts are the ones transformers generates from, and so are the greedy answers.
    tokenizer = engine.tokenizer
    assert [tokenizer.decode(p["prompt_token_ids"]) for p in prompts[: len(examples)]] == [
        e.prompt for e in examples]
    reference = TransformersEngine(checkpoint, "cpu", batch_size=8)
    hf_greedy, hf_sampled = reference.completions(examples, task.max_new_tokens, 4, 0.6, seed=3)
    assert greedy == hf_greedy
    assert prompt_scores(task, examples, greedy, sampled)[0] == \
        prompt_scores(task, examples, hf_greedy, hf_sampled)[0]


def test_engine_choice_and_the_error_naming_the_fix(monkeypatch, fake_vllm):
    assert choose_engine("auto", "cuda") == "vllm"
    assert choose_engine("auto", "cpu") == "hf"
    with pytest.raises(RuntimeError, match="needs a GPU"):
        choose_engine("vllm", "cpu")
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    assert choose_engine("auto", "cuda") == "hf"
    with pytest.raises(RuntimeError, match="pip install -r envs/requirements-gpu.txt"):
        choose_engine("vllm", "cuda")


def test_evaluate_command_without_vllm_stops_with_the_fix(tmp_path, make_checkpoint, capsys,
                                                          monkeypatch):
    from opdgeo.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)
    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=0)
    with pytest.raises(SystemExit):
        main(["evaluate", "--run", "r", "--checkpoint", str(checkpoint), "--task",
              json.dumps(TASK), "--evaluation", json.dumps({**SPEC, "engine": "vllm"}),
              "--out", str(tmp_path / "r.csv"), "--device", "cpu"])
    assert "pip install -r envs/requirements-gpu.txt" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


class AttemptEnded(Exception):
    pass


def test_evaluation_near_its_wall_time_ends_the_attempt_and_the_next_scores_the_rest(
        tmp_path, make_checkpoint, monkeypatch):
    """With a SLURM wall time too short for another checkpoint, the job ends its attempt
    (opdgeo.attempts.end_attempt: requeue) after one; the next attempt scores the rest, and
    the table is that of an uninterrupted evaluation."""
    from opdgeo import evaluate
    from opdgeo.attempts import WallClock, parse_time_left

    assert parse_time_left("1-02:03:04") == ((26 * 60) + 3) * 60 + 4
    assert parse_time_left("1:30") == 90 and parse_time_left("UNLIMITED") is None
    checkpoints = {step: make_checkpoint(tmp_path / f"step-{step}", seed=step)
                   for step in (1, 2, 3)}
    task = make_task(TASK)
    scores = (task, 2, 1.0, 0, "cpu", 8)
    reference = evaluate.evaluate_checkpoints(checkpoints, "r", *scores)

    ended = []

    def end_attempt(what):
        ended.append(what)
        raise AttemptEnded

    monkeypatch.setattr(evaluate, "end_attempt", end_attempt)
    journal = ScoreJournal(tmp_path / "journal", SPEC)
    with pytest.raises(AttemptEnded):  # no room for a second checkpoint
        evaluate.evaluate_checkpoints(checkpoints, "r", *scores, journal=journal,
                                      clock=WallClock(seconds_left=0))
    assert ended == ["evaluation of r: 1 of 3 checkpoints scored"]
    table = evaluate.evaluate_checkpoints(checkpoints, "r", *scores, journal=journal,
                                          clock=WallClock(seconds_left=1e6))
    pd.testing.assert_frame_equal(table, reference)


def test_a_self_teacher_is_scored_reading_each_prompt_s_own_context_or_another_s(
        monkeypatch):
    """`contexts`: the prompts with their own worked answer in front (OPSD's teacher) and with
    another prompt's (OP2SD's). A model that copies the context scores 1 with its own, 0 with
    another's (a derangement: never the prompt's own) and 0 without."""
    from opdgeo.evaluate import evaluate_checkpoints

    def copy_context(self, examples, max_new_tokens, k, temperature, seed):
        texts = [e.prompt.split("=")[0] if e.prompt.count("=") == 2 else "" for e in examples]
        return texts, [[t] * k for t in texts]

    monkeypatch.setattr(TransformersEngine, "__init__", lambda self, *a, **kw: None)
    monkeypatch.setattr(TransformersEngine, "completions", copy_context)
    task = make_task({**TASK, "eval_prompts": 64})
    table = evaluate_checkpoints({0: "unused"}, "student", task, 2, 1.0, 0, "cpu",
                                 contexts=("own", "other")).set_index("metric")["value"]
    assert table["exact_match"] == 0 and table["mean@2"] == 0
    assert table["exact_match (own context)"] == 1 and table["mean@2 (own context)"] == 1
    # another prompt's answer is right only where two sums agree
    assert table["exact_match (other context)"] < 0.1


def test_every_scores_the_intermediate_checkpoints_a_run_evaluates_and_the_final_one(
        tmp_path, make_checkpoint, monkeypatch):
    """`opdgeo evaluate --every N` (the workflow passes the run's `evaluate_every`): of the
    step-N checkpoints, those at multiples of N are loaded and scored, each from its own
    folder, and the final checkpoint always; without --every, every checkpoint."""
    from opdgeo.cli import main
    from opdgeo.config import RunSpec, pair_training

    config = {"training": {"steps": 5, "save_every": 1, "evaluate_every": 2,
                           "optimizers": {"adamw": {"learning_rate": 1e-3}}},
              "pairs": {"p": {"student": "s", "teachers": ["t"]}}}
    spec = RunSpec("r", "opd", "p", "s", "t", "adamw", 0, training=pair_training(config, "p"))
    run = tmp_path / "run"
    for step in spec.checkpoint_steps():  # 1..4: the runs' checkpoints differ
        make_checkpoint(run / "checkpoints" / f"step-{step}", seed=step)
    make_checkpoint(run / "final", seed=5)
    loaded = []
    load = TransformersEngine.__init__

    def spy(self, path, *args, **kwargs):
        loaded.append(path)
        load(self, path, *args, **kwargs)

    monkeypatch.setattr(TransformersEngine, "__init__", spy)
    small = json.dumps({**TASK, "eval_prompts": 4})

    def scored(*every):
        loaded.clear()
        out = tmp_path / f"every{''.join(every)}.csv"
        main(["evaluate", "--run", "r", "--checkpoint", str(run / "final"), "--step", "5",
              "--checkpoints", str(run / "checkpoints"), *every, "--task", small,
              "--evaluation", json.dumps(SPEC), "--out", str(out), "--device", "cpu",
              "--threads", "1"])
        return sorted(pd.read_csv(out)["step"].unique()), loaded.copy()

    steps, paths = scored("--every", str(spec.evaluate_every))
    assert spec.evaluated_steps() == [2, 4] and steps == [2, 4, 5]
    assert paths == [run / "checkpoints" / "step-2", run / "checkpoints" / "step-4",
                     run / "final"]
    assert scored()[0] == [1, 2, 3, 4, 5]
