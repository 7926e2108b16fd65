"""Every crash point survived: a job killed at any named point (opdgeo.crash), then rerun as
Snakemake reruns a failed job (its declared outputs deleted, the same command again), writes
the bytes an uninterrupted run writes.

Jobs run as a local Snakemake run runs them, forked by the preload server, so each costs
its work, not its imports. The kill is the event the test waits for: the job dies at the
point, by SIGKILL, whatever the machine's speed. Each job runs in the same folder every
time, so outputs that name their inputs' or their own paths compare as bytes too; only
the timings of a training log and of an analysis summary differ from run to run.
"""

import ast
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tidy_fixtures as tf

from opdgeo import crash, preload
from opdgeo.config import RunSpec, pair_training

THREADS = "1"
OPDGEO = str(Path(sys.executable).parent / "opdgeo")
TASK = {"digits": 2, "eval_prompts": 16, "seed": 0}
# 8 prompts x 4 rollouts / batch 8: four steps a pass. Checkpoints at steps 3 (first pass),
# 6 (second pass) and 7 (the last, in the middle of a pass: resumed there, the Trainer
# would train one step past the end); snapshots at 3 and 6.
STEPS, SAVE_EVERY = 7, 3


def run_spec() -> RunSpec:
    config = {
        "training": {"steps": STEPS, "batch_size": 8, "save_every": SAVE_EVERY, "prompts": 8,
                     "optimizers": {"adamw": {"learning_rate": 1e-3}}},
        "pairs": {"p": {"student": "s", "teachers": ["t"]}},
    }
    return RunSpec("p-opd-t-adamw-s0", "opd", "p", "s", "t", "adamw", 0,
                   training=pair_training(config, "p"))


def spec_arg(spec: RunSpec, *drop: str) -> str:
    return json.dumps({k: getattr(spec, k) for k in spec.__dataclass_fields__ if k not in drop})


@dataclass
class Job:
    """One pipeline command: its arguments (given the inputs' folder) and declared outputs,
    relative to the folder it runs in."""

    argv: callable
    outputs: list[str]
    points: list[str] = field(default_factory=list)


MODEL_SPEC = {"build": {"arch": "qwen2", "hidden_size": 16, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "num_key_value_heads": 2,
                        "intermediate_size": 32},
              "train": {"max_steps": 4, "learning_rate": 1e-3, "batch_size": 8, "eval_every": 2,
                        "stop_at": 1.1, "require_min": 0.0, "require_max": 1.0, "seed": 0,
                        "adam_beta2": 0.99, "privileged": 0.0}}
EVALUATION = {"k": 2, "temperature": 1.0, "batch_size": 16}
PLOTS = {"formats": ["png"], "dpi": 40}

JOBS = {
    "train-run": Job(lambda i: [
        "train-run", "--run-spec", spec_arg(run_spec(), "task"), "--source", str(i / "student"),
        "--teacher", str(i / "teacher"), "--task", json.dumps(TASK), "--out", "run",
        "--device", "cpu", "--threads", THREADS],
        ["run/final", "run/fp32", "run/checkpoints", "run/train_log.csv",
         "run/optimizer_state.csv"]),
    "train-model": Job(lambda i: [
        "train-model", "--name", "m", "--model-spec", json.dumps(MODEL_SPEC),
        "--task", json.dumps(TASK), "--out", "model", "--device", "cpu", "--threads", THREADS],
        ["model/final", "model/score.json", "model/train_log.csv"]),
    "evaluate": Job(lambda i: [
        "evaluate", "--run", "r", "--checkpoint", str(i / "run/final"), "--step", str(STEPS),
        "--checkpoints", str(i / "run/checkpoints"), "--task", json.dumps(TASK),
        "--evaluation", json.dumps(EVALUATION), "--out", "eval.csv", "--device", "cpu",
        "--threads", THREADS], ["eval.csv"]),
    "decompose": Job(lambda i: [
        "decompose", "--source", str(i / "student"), "--out", "geometry"], ["geometry"]),
    "analyze": Job(lambda i: [
        "analyze", "--run", "r", "--source", str(i / "student"), "--trained",
        str(i / "run/final"), "--fp32-trained", str(i / "run/fp32/model.safetensors"),
        "--checkpoints", str(i / "run/checkpoints"), "--trajectory", "trajectory.csv",
        "--out", "analysis"], ["analysis/summary.json", "analysis/tensors.csv",
                               "trajectory.csv"]),
    "overlap": Job(lambda i: [
        "overlap", "--source", str(i / "student"), "--runs", f"a={i / 'run/final'}",
        f"b={i / 'run/checkpoints/step-3'}", "--out", "overlap"], ["overlap"]),
    "make-mask": Job(lambda i: [
        "make-mask", "--mask-spec", json.dumps({"method": "atol", "atol": 1e-5}),
        "--source", str(i / "student"), "--trained", str(i / "run/final"),
        "--out", "mask.safetensors", "--densities", "mask.density.csv"],
        ["mask.safetensors", "mask.density.csv"]),
    "collect": Job(lambda i: [
        "collect", "csv", str(i / "run/train_log.csv"), str(i / "run/train_log.csv"),
        "--out", "training_log.csv"], ["training_log.csv"]),
    "figure": Job(lambda i: [
        "figure", "fig1_overview", "--tables", str(i / "tables"), "--plots", json.dumps(PLOTS),
        "--out", "fig1"], ["fig1.png"]),
    "findings": Job(lambda i: [
        "findings", "--tables", str(i / "tables"), "--out", "findings"],
        ["findings.csv", "findings.md"]),
    "captions": Job(lambda i: ["captions", "--out", "captions"], ["captions"]),
    "model-card": Job(lambda i: [
        "model-card", "--run-spec", spec_arg(run_spec(), "task"), "--source", str(i / "student"),
        "--teacher", str(i / "teacher"), "--task", json.dumps(TASK), "--scores",
        str(i / "eval.csv"), "--summary", str(i / "analysis/summary.json"),
        "--checkpoint", "final", "--out", "model_card.md"], ["model_card.md", "final/README.md"]),
}
# Which job reaches each point; the job it is killed in.
POINT_JOBS = {
    "train.before-first-checkpoint": "train-run", "train.mid-run": "train-run",
    "train.past-data-pass": "train-run", "train.after-last-checkpoint": "train-run",
    "train.snapshot": "train-run", "train.optimizer-references": "train-run",
    "train.final-save": "train-run",
    "train.fp32-save": "train-run", "train.promote": "train-run",
    "model.final-save": "train-model", "model.score": "train-model",
    "evaluate.journal": "evaluate", "evaluate.after-last-score": "evaluate",
    "evaluate.table": "evaluate",
    "decompose.tensor": "decompose", "decompose.index": "decompose",
    "analyze.tables": "analyze", "analyze.trajectory": "analyze",
    "overlap.write": "overlap", "overlap.group": "overlap",
    "masks.mask": "make-mask", "masks.densities": "make-mask",
    "tables.write": "collect", "figures.save": "figure", "findings.write": "findings",
    "captions.write": "captions",
    "model-card.write": "model-card",
}
TRAINING_JOBS = {"train-run", "train-model"}


def test_every_crash_point_is_killed_in_a_job_here():
    assert set(POINT_JOBS) == set(crash.POINTS), "a crash point without a job that reaches it"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the thread variables Snakemake gives a job of the server's thread count
    saved = {name: os.environ.get(name) for name in preload.THREAD_VARIABLES}
    os.environ.update({name: THREADS for name in preload.THREAD_VARIABLES})
    preload.start_server(tmp_path_factory.mktemp("preload") / "preload.log", int(THREADS))
    yield
    preload.stop_server()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def run(job: Job, inputs: Path, folder: Path, point: str | None = None):
    environment = {k: v for k, v in os.environ.items() if k != crash.VARIABLE}
    if point:
        environment[crash.VARIABLE] = point
    return subprocess.run([OPDGEO, *job.argv(inputs)], cwd=folder, env=environment,
                          capture_output=True, text=True)


def written(folder: Path, outputs: list[str]) -> dict[str, bytes]:
    """The bytes of the declared outputs, without the timings a rerun changes."""
    files = {}
    for output in outputs:
        path = folder / output
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                files[str(file.relative_to(folder))] = comparable(file)
    return files


def comparable(file: Path) -> bytes:
    data = file.read_bytes()
    if file.name == "train_log.csv":
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        timings = ("seconds_per_step", "tokens_per_second")
        return json.dumps([{k: v for k, v in row.items() if k not in timings}
                           for row in rows]).encode()
    if file.name == "summary.json":
        summary = json.loads(data)
        summary.pop("seconds")
        return json.dumps(summary).encode()
    if file.name == "trajectory.csv":
        return b"".join(line for line in data.splitlines(keepends=True)
                        if b",seconds," not in line)
    return data


class Jobs:
    """Each job's uninterrupted outputs, made once; the inputs of later jobs in `inputs`."""

    def __init__(self, root: Path, inputs: Path):
        self.root, self.inputs, self.done = root, inputs, {}

    def folder(self, name: str) -> Path:
        return self.root / name

    def reference(self, name: str) -> dict[str, bytes]:
        if name not in self.done:
            folder = self.folder(name)
            folder.mkdir(exist_ok=True)
            if name == "model-card":
                shutil.copytree(self.inputs / "run/final", folder / "final")
            result = run(JOBS[name], self.inputs, folder)
            assert result.returncode == 0, result.stderr[-3000:]
            self.done[name] = written(folder, JOBS[name].outputs)
            # later jobs read these
            if name == "train-run":
                shutil.copytree(folder / "run", self.inputs / "run")
            elif name == "evaluate":
                shutil.copy(folder / "eval.csv", self.inputs / "eval.csv")
            elif name == "analyze":
                shutil.copytree(folder / "analysis", self.inputs / "analysis")
        return self.done[name]


@pytest.fixture(scope="module")
def jobs(server, tiny_pair, tmp_path_factory):
    inputs = tmp_path_factory.mktemp("inputs")
    student, teacher = tiny_pair
    shutil.copytree(student, inputs / "student")
    shutil.copytree(teacher, inputs / "teacher")
    tf.write(inputs / "tables", tf.tables(tf.config(seeds=(0, 1))))
    jobs = Jobs(tmp_path_factory.mktemp("jobs"), inputs)
    jobs.reference("train-run")
    return jobs


def needs(job: str) -> list[str]:
    """The jobs whose outputs `job` reads."""
    return {"evaluate": ["train-run"], "analyze": ["train-run"], "overlap": ["train-run"],
            "make-mask": ["train-run"], "collect": ["train-run"],
            "model-card": ["train-run", "evaluate", "analyze"]}.get(job, [])


@pytest.mark.parametrize("point", [
    pytest.param(point, marks=[pytest.mark.train] if POINT_JOBS.get(point) in TRAINING_JOBS
                 else [])
    for point in crash.POINTS])
def test_a_job_killed_at_a_crash_point_reruns_to_the_same_bytes(jobs, point, capfd):
    name = POINT_JOBS[point]
    job = JOBS[name]
    for needed in needs(name):
        jobs.reference(needed)
    expected = jobs.reference(name)
    folder = jobs.folder(name)

    killed = run(job, jobs.inputs, folder, point)
    assert killed.returncode != 0 and f"crash point {point}:" in killed.stderr, (
        f"the job never reached {point}: {killed.stderr[-3000:]}")
    for output in job.outputs:  # Snakemake deletes a failed job's outputs, then reruns it
        path = folder / output
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    again = run(job, jobs.inputs, folder)
    assert again.returncode == 0, again.stderr[-3000:]
    assert written(folder, job.outputs) == expected
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


# ---------------------------------------------------------------- every writer has its point

PACKAGE = Path(__file__).parents[1] / "scripts" / "opdgeo"
WRITES = {"write_text", "write_bytes", "to_csv", "to_parquet", "savefig", "save_file",
          "save_pretrained", "torch.save", "json.dump"}
# Functions that write without `opdgeo.files.atomic`, and why that is safe.
UNCOMMITTED = {
    "callbacks.py:start_csv": "a training log in the job's own folder, begun anew or cut "
                              "back to the resumed step",
    "callbacks.py:CSVLogCallback.on_log": "appends to that log",
    "callbacks.py:OptimizerStateCallback.on_step_end": "appends to that log",
    "callbacks.py:EarlyStopOnScoreCallback.on_step_end": "a base model's score log, no output",
    "train.py:_resume_point": "the stamp of the settings beside a run's Trainer checkpoints",
    "preload.py:start_server": "the preload server's own log",
    "models.py:_mark_dtype": "config.json inside save_checkpoint's temporary folder",
    "rehearse.py:write_data": "opdgeo rehearse makes a study's stand-ins once, outside the "
                              "pipeline: rerun it whole",
    "rehearse.py:rehearse": "the same",
}


def _functions(tree):
    """(qualified name, function node) of every function, methods as Class.method."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def _called(call: ast.Call) -> str:
    """The called name; a module's function with its module (torch.save, json.dump)."""
    function = call.func
    if isinstance(function, ast.Attribute):
        owner = function.value
        module = owner.id if isinstance(owner, ast.Name) and owner.id in (
            "torch", "json", "yaml", "os", "shutil") else None
        return f"{module}.{function.attr}" if module else function.attr
    return getattr(function, "id", "")


def _writes(node) -> list[str]:
    """The write calls in `node`: a file written, opened for writing, or renamed into place."""
    found = []
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        name = _called(call)
        modes = [a.value for a in call.args if isinstance(a, ast.Constant)]
        # Path.replace(target), a method; a bare replace(x) is dataclasses.replace
        one_path = (isinstance(call.func, ast.Attribute) and len(call.args) == 1
                    and not call.keywords and not isinstance(call.args[0], ast.Constant))
        if (name in WRITES
                or (name == "open" and any(isinstance(m, str) and m[:1] in "wax" for m in modes))
                or (name == "yaml.safe_dump"  # into a stream, not a string
                    and (len(call.args) > 1 or any(k.arg == "stream" for k in call.keywords)))
                or (name in ("replace", "rename") and one_path)
                or name in ("os.replace", "os.rename", "shutil.move")):
            found.append(f"{name}() at line {call.lineno}")
    return found


def _commits(node) -> bool:
    return any(isinstance(n, ast.Call) and _called(n) == "atomic" for n in ast.walk(node))


def test_every_writer_commits_through_a_crash_point():
    """A function that writes a file does it in `opdgeo.files.atomic(path, point)` (a
    temporary renamed into place at a named crash point, which the test above kills at),
    or is listed in UNCOMMITTED with the reason a kill there loses nothing."""
    unlisted, points = [], set()
    for module in sorted(PACKAGE.rglob("*.py")):
        if module.name == "files.py":
            continue
        tree = ast.parse(module.read_text())
        if module.name != "crash.py":
            points |= {n.value for n in ast.walk(tree)
                       if isinstance(n, ast.Constant) and n.value in crash.POINTS}
        for name, function in _functions(tree):
            key = f"{module.relative_to(PACKAGE)}:{name}".removeprefix("delta/")
            if (writes := _writes(function)) and not _commits(function) \
                    and key not in UNCOMMITTED:
                unlisted.append(f"{key}: {', '.join(writes)}")
    assert not unlisted, "writers without a crash point (use opdgeo.files.atomic):\n" + \
        "\n".join(unlisted)
    assert points == set(crash.POINTS), f"declared, never used: {set(crash.POINTS) - points}"


def test_the_writer_check_sees_a_writer_without_a_point():
    tree = ast.parse("def f(p):\n    p.write_text('x')\n\ndef g(p):\n"
                     "    with atomic(p, 'tables.write') as t:\n        t.write_text('x')\n")
    functions = dict(_functions(tree))
    assert _writes(functions["f"]) and not _commits(functions["f"])
    assert _commits(functions["g"])
