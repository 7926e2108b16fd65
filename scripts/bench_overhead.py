"""The pipeline's overhead over the bare libraries, on the same tiny pair and settings.

- OPD: `opdgeo.train.train_run` (OPDTrainer, CSV log, optimizer-state and non-finite checks,
  resumable Trainer checkpoints, bf16 snapshots, the final save) against a bare TRL
  `DistillationTrainer` with the same model, teacher, prompts and settings, saving only the
  final model;
- evaluation: `opdgeo.evaluate.evaluate_checkpoints` (greedy and mean@k on one checkpoint)
  against a bare loop of `model.generate` calls on the same prompts, scored the same way.

Each pair is timed alternately, --repeats times, in this process; the medians of wall and CPU
time and their ratio (pipeline / bare; the goal is within 5%) are printed with the load. On a
shared machine CPU time measures the work, wall time also the neighbours.

    PYTHONPATH=scripts python scripts/bench_overhead.py [--steps 20] [--repeats 3]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from opdgeo.config import RunSpec, pair_training
from opdgeo.models import (
    build_model,
    character_tokenizer,
    load_model,
    load_tokenizer,
    save_checkpoint,
)
from opdgeo.task import make_task

TASK = {"kind": "addition", "digits": 3, "eval_prompts": 128, "seed": 0}
EVALUATION = {"k": 4, "temperature": 1.0, "batch_size": 64}


def tiny_pair(root: Path) -> tuple[Path, Path]:
    tokenizer = character_tokenizer()
    paths = []
    for name, seed, hidden in (("student", 0, 64), ("teacher", 1, 128)):
        model = build_model("qwen2", tokenizer, seed, hidden_size=hidden, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=2 * hidden)
        save_checkpoint(model, tokenizer, root / name)
        paths.append(root / name)
    return paths[0], paths[1]


def opd_spec(steps: int) -> RunSpec:
    config = {"training": {"steps": steps, "batch_size": 16, "save_every": max(steps // 2, 1),
                           "prompts": 256, "optimizers": {"adamw": {"learning_rate": 1e-3}}},
              "pairs": {"p": {"student": "s", "teachers": ["t"]}}}
    return RunSpec("p-opd-t-adamw-s0", "opd", "p", "s", "t", "adamw", 0,
                   training=pair_training(config, "p"))


def pipeline_opd(student, teacher, out: Path, steps: int):
    from opdgeo.train import train_run

    train_run(opd_spec(steps), str(student), str(teacher), TASK, out, "cpu")


def bare_opd(student, teacher, out: Path, steps: int):
    """TRL's DistillationTrainer as its documentation uses it, with the pipeline's settings."""
    import random

    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    spec = opd_spec(steps)
    training = spec.training
    torch.manual_seed(spec.seed)
    model, teacher_model = load_model(student), load_model(teacher)
    tokenizer = load_tokenizer(student)
    task = make_task(TASK)
    prompts = task.train_examples(training["prompts"], spec.seed)
    random.Random(spec.name).shuffle(prompts)
    n = training["generations_per_prompt"]
    dataset = Dataset.from_list([{"prompt": e.prompt} for e in prompts for _ in range(n)])
    args = DistillationConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=training["batch_size"],
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=spec.seed, disable_tqdm=True,
        max_completion_length=task.max_new_tokens, temperature=training["temperature"],
        top_k=0, top_p=1.0, beta=1.0)
    trainer = DistillationTrainer(model=model, teacher_model=teacher_model, args=args,
                                  train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    model.save_pretrained(out / "final")


def pipeline_eval(checkpoint: Path):
    from opdgeo.evaluate import evaluate_checkpoints

    evaluate_checkpoints({0: checkpoint}, "r", make_task(TASK), EVALUATION["k"],
                         EVALUATION["temperature"], 0, "cpu", EVALUATION["batch_size"])


@torch.no_grad()
def bare_eval(checkpoint: Path):
    """A plain generate loop: greedy, then k samples per prompt, exact match."""
    model, tokenizer = load_model(checkpoint).eval(), load_tokenizer(checkpoint)
    task = make_task(TASK)
    examples = task.eval_examples()
    batch = EVALUATION["batch_size"]

    def complete(prompts, sample):
        texts = []
        for start in range(0, len(prompts), batch):
            inputs = tokenizer(prompts[start : start + batch], return_tensors="pt",
                               padding=True)
            out = model.generate(**inputs, max_new_tokens=task.max_new_tokens, do_sample=sample,
                                 temperature=1.0 if sample else None,
                                 top_k=0 if sample else None, top_p=1.0 if sample else None,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            texts += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                            skip_special_tokens=True)
        return texts

    greedy = complete([e.prompt for e in examples], False)
    torch.manual_seed(0)
    sampled = complete([e.prompt for e in examples for _ in range(EVALUATION["k"])], True)
    answers = [e.answer for e in examples for _ in range(EVALUATION["k"])]
    return (sum(task.score(c, e.answer) for c, e in zip(greedy, examples, strict=True)),
            sum(task.score(c, a) for c, a in zip(sampled, answers, strict=True)))


def timed(function, *args) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(name: str, pipeline, bare, repeats: int):
    times = {"pipeline": [], "bare": []}
    for i in range(repeats):
        for label, run in (("pipeline", pipeline), ("bare", bare)):
            times[label].append(timed(run, i))
    medians = {label: [statistics.median(t[j] for t in runs) for j in (0, 1)]
               for label, runs in times.items()}
    (pw, pc), (bw, bc) = medians["pipeline"], medians["bare"]
    print(f"{name}: pipeline {pw:.2f} s wall / {pc:.2f} s CPU, bare {bw:.2f} s / {bc:.2f} s; "
          f"ratio {pw / bw:.3f} wall, {pc / bc:.3f} CPU (median of {repeats})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
          f"{args.threads} thread(s)", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        student, teacher = tiny_pair(root)
        compare(f"OPD {args.steps} steps",
                lambda i: pipeline_opd(student, teacher, root / f"p{i}", args.steps),
                lambda i: bare_opd(student, teacher, root / f"b{i}", args.steps), args.repeats)
        compare("evaluation (greedy + mean@4, 128 prompts)",
                lambda i: pipeline_eval(student), lambda i: bare_eval(student), args.repeats)
    print(f"load average {os.getloadavg()[0]:.1f} after", flush=True)


if __name__ == "__main__":
    main()
