# Input functions: runs, models, masks and the files of each. Names come from opdgeo.config
# only; rules never spell a run name themselves.
import json
import re
import shlex
from functools import cache
from pathlib import Path

from opdgeo import handover, preload
from opdgeo import resources as sizing
from opdgeo.codehash import code_text, subcommands
from opdgeo.config import (
    RUN_SECTIONS,
    ConfigError,
    build_masks,
    build_runs,
    model_reference,
    model_task,
    pair_training,
    self_teacher_contexts,
)
from opdgeo.figures import FIGURES
from opdgeo.kinds import RUN_KINDS  # noqa: E402
from opdgeo.paper_tables import PAPER_MASK_DENSITY

try:
    RUNS = build_runs(config)
    MASKS = build_masks(config, PAPER_MASK_DENSITY)
except ConfigError as error:
    raise WorkflowError(f"config: {error}") from None

TRAINED = [name for name, run in RUNS.items() if run.is_trained]
BUILT_MODELS = [name for name, spec in config["models"].items() if "build" in spec]
# Every student and teacher is evaluated, built here or given (a hub id or a folder).
PAIR_MODELS = list(dict.fromkeys(
    key for pair in config["pairs"].values() for key in (pair["student"], *pair["teachers"])
))
GPU = 1 if config["device"] == "cuda" else 0
# Every rule runs the one `opdgeo` package, so one environment serves them all (with
# `--sdm conda`; relative to workflow/rules/, where every rule is defined).
CONDA_ENV = "../../envs/opdgeo.yaml"


RUN_PATTERN = "|".join(map(re.escape, sorted(RUNS, key=len, reverse=True))) or "NONE"


wildcard_constraints:
    run=RUN_PATTERN,
    model="|".join(map(re.escape, {*BUILT_MODELS, *PAIR_MODELS})) or "NONE",
    mask="|".join(map(re.escape, MASKS)) or "NONE",


def track_code(defined_rules):
    """Each job depends on the code it runs: the param `code` holds a hash of every package
    module that the `opdgeo` subcommands in its shell command import, and the pins of their
    dependencies (opdgeo.codehash), so Snakemake's params trigger reruns it when that changes."""
    if workflow.remote_exec:  # a cluster job's own Snakemake records no params: spare it ~1 s
        return
    requirements = Path(workflow.basedir).parent / "envs" / "requirements.txt"
    texts = {}
    for each in defined_rules:
        commands = tuple(word for word in (each.shellcmd or "").split() if word in subcommands())
        if commands:
            if commands not in texts:
                texts[commands] = code_text(list(commands), requirements)
            each.set_params(code=texts[commands])


def job_device(wildcards, resources):
    """The device follows the job's resources: cuda with a GPU; without one, the config's
    device unless that is cuda (no GPU is visible to a job that asked for none). A profile's
    `set-resources analyze_run:gpu=1` moves that job onto a GPU with nothing else to change."""
    if int(resources.get("gpu", 0)) > 0:
        return "cuda"
    return "cpu" if config["device"] == "cuda" else config["device"]


def as_arg(value, ordered=False):
    """A config value as one shell-quoted JSON argument (Snakemake tracks it as a param).

    Keys are sorted, so that reordering a config's keys changes no param and reruns no job.
    `ordered` keeps the config's order where it means something: the runs table (the first
    optimizer and teacher are the primary ones) and the plot settings (legend order)."""
    return shlex.quote(json.dumps(value, sort_keys=not ordered))


def task_of_run(run):
    """The run's task (the global one, overridden by its pair's) as a shell argument."""
    return as_arg(RUNS[run].task)


def task_of_model(key):
    """The task of the first pair that uses a base model, as a shell argument."""
    return as_arg(model_task(config, key))


def context_options(key):
    """`--contexts own other`: the base model's scores as the teacher of the self-distillation
    runs on it, reading each prompt's privileged context (or another prompt's)."""
    contexts = self_teacher_contexts(config, key)
    return f"--contexts {' '.join(contexts)}" if contexts else ""


def output_of(path, **wildcards):
    """A rule's output (`rules.<rule>.output.<name>`) with its wildcards filled in: each path
    is spelled once, in the rule that writes it."""
    return expand(path, **wildcards)[0]


def model_path(key):
    """Checkpoint of a base model: built by the pipeline, or given (hub id or folder)."""
    spec = config["models"][key]
    return output_of(rules.train_model.output.checkpoint, model=key) if "build" in spec \
        else model_reference(spec)


def model_inputs(key):
    """The files Snakemake must wait for before a model can be read."""
    path = model_path(key)
    return [path] if "build" in config["models"][key] or Path(path).exists() else []


def source_path(run):
    spec = RUNS[run]
    return model_path(spec.source) if spec.is_trained else spec.source


def trained_path(run):
    spec = RUNS[run]
    return output_of(rules.train_run.output.final, run=run) if spec.is_trained else spec.trained


def run_inputs(run):
    """Source and trained checkpoints of a run, as Snakemake inputs (lists: a given checkpoint
    that is a hub id, not a file, is no input)."""
    spec = RUNS[run]
    if spec.is_trained:
        return {"source": model_inputs(spec.source), "trained": [trained_path(run)]}
    return {
        "source": [p for p in (spec.source,) if Path(p).exists()],
        "trained": [p for p in (spec.trained,) if Path(p).exists()],
    }


def mask_path(name):
    return output_of(rules.make_mask.output.mask, mask=name)


def final_steps(run):
    return RUNS[run].training["steps"]


def source_key(run):
    """A run's source checkpoint as a name: its model key, else its path or hub id made safe."""
    keys = {model_path(key): key for key in config["models"]}
    source = source_path(run)
    return re.sub(r"[^\w.-]+", "-", keys.get(source, source)).strip("-")


@cache
def overlap_groups():
    """Main runs (masked retrains aside) by the source checkpoint they share: one overlap job
    per group compares every pair in it. A group is named after its source (`source_key`).
    (Called once the rules that write the checkpoints are defined: analyze.smk on.)"""
    by_source = {}
    main = (r for r, spec in RUNS.items()
            if RUN_KINDS[spec.kind].delta_method and spec.group == "main")
    for name in main:
        by_source.setdefault(source_key(name), []).append(name)
    return {key: runs for key, runs in by_source.items() if len(runs) > 1}


def all_targets():
    return [
        *rules.evaluation_table.output,
        *rules.delta_tables.output,
        *rules.overlap_table.output,
        *rules.optimizer_state_table.output,
        *rules.training_log_table.output,
        *rules.runs_table.output,
        *rules.mask_table.output,
    ]


# ---------------------------------------------------------- training (train.smk)


def train_inputs(w):
    spec = RUNS[w.run]
    inputs = {"source": model_inputs(spec.source)}
    if spec.teacher and RUN_KINDS[spec.kind].needs_teacher:
        inputs["teacher"] = model_inputs(spec.teacher)
    if spec.mask:
        inputs["mask"] = mask_path(spec.mask)
    return inputs


def train_options(w):
    spec = RUNS[w.run]
    options = f"--source {shlex.quote(model_path(spec.source))}"
    if spec.teacher and RUN_KINDS[spec.kind].needs_teacher:
        options += f" --teacher {shlex.quote(model_path(spec.teacher))}"
    if spec.mask:
        options += f" --mask {shlex.quote(mask_path(spec.mask))}"
    return options


def keep_or_temp(path):
    """Intermediate checkpoints are deleted once read, unless the config keeps them."""
    return path if config["keep_checkpoints"] else temp(path)


def run_spec_arg(w):
    spec = RUNS[w.run]
    # The task travels as --task (per run: the pair's task).
    return as_arg({k: getattr(spec, k) for k in spec.__dataclass_fields__ if k != "task"})


def launcher(wildcards, resources):
    """`opdgeo`, or one process per GPU through `accelerate launch` when the job has several
    (e.g. --set-resources train_run:gpu=4, or set-resources in the SLURM profile)."""
    gpus = int(resources.gpu)
    if gpus > 1:
        return f"accelerate launch --multi_gpu --num_processes {gpus} -m opdgeo.cli"
    return "opdgeo"


# ---------------------------------------------------------- masks (masks.smk)


def mask_spec(name):
    return MASKS[name]


def mask_inputs(w):
    # The run may be external (a given checkpoint pair on the pair's source).
    return run_inputs(mask_spec(w.mask).run)


# ---------------------------------------------------------- analysis, overlap (analyze.smk)


def fp32_option(w):
    """The exact rounding null needs the fp32 master weights of runs that kept them."""
    spec = RUNS[w.run]
    if spec.is_trained and spec.training["keep_fp32"]:
        fp32 = output_of(rules.train_run.output.fp32, run=w.run)
        return f"--fp32-trained {shlex.quote(f'{fp32}/model.safetensors')}"
    return ""


def has_trajectory(run):
    """Main trained runs compared on their delta are analysed at every intermediate checkpoint
    too (the trajectory figure); a masked retrain's delta is no method's, and is not drawn."""
    spec = RUNS[run]
    return (config["analysis"]["trajectory"] and spec.is_trained and spec.group == "main"
            and RUN_KINDS[spec.kind].delta_method)


def analyze_inputs(w):
    geometry = output_of(rules.decompose_source.output.geometry, source=source_key(w.run))
    inputs = run_inputs(w.run) | {"geometry": geometry}
    if RUNS[w.run].is_trained:
        inputs["fp32"] = output_of(rules.train_run.output.fp32, run=w.run)
    if has_trajectory(w.run):
        inputs["checkpoints"] = output_of(rules.train_run.output.checkpoints, run=w.run)
    return inputs


def checkpoints_option(w):
    if not has_trajectory(w.run):
        return ""
    return f"--checkpoints {shlex.quote(output_of(rules.train_run.output.checkpoints, run=w.run))}"


def overlap_inputs(w):
    return [path for run in overlap_groups()[w.group] for path in run_inputs(run)["trained"]]


def overlap_runs_option(w):
    return " ".join(f"{run}={shlex.quote(trained_path(run))}"
                    for run in overlap_groups()[w.group])


# ---------------------------------------------------------- figures, tables, findings (figures.smk)


def tidy(names):
    """The tidy tables of these names (opdgeo.tidy.TABLES): outputs of tables.smk's rules, the
    inputs of figures, paper tables and findings."""
    tables = {Path(path).stem: path for each in (
        rules.runs_table, rules.evaluation_table, rules.delta_tables, rules.overlap_table,
        rules.optimizer_state_table, rules.training_log_table, rules.mask_table,
        rules.analysis_tables) for path in each.output}
    return [tables[name] for name in names]


def tables_folder(wildcards, input):
    """The folder of a renderer's tidy tables (its inputs; runs.csv is the first)."""
    return Path(input[0]).parent


def figure_outputs(name):
    """One file per format; the PNG (else the first format) goes into the HTML report."""
    formats = config["plots"]["formats"]
    shown = "png" if "png" in formats else formats[0]
    paths = [f"results/figures/{name}.{fmt}" for fmt in formats]
    # (a line may not start with `report`: the Snakefile parser reads it as the directive)
    return [in_report(p, name, "Figures") if p.endswith(shown) else p for p in paths]


def in_report(path, name, category):
    """`path` in the HTML report, with its caption as written by rule report_captions (an
    absolute path: a relative one would be read from this file's folder)."""
    caption = Path(rules.report_captions.output[0], f"{name}.rst").absolute()
    return report(path, caption=str(caption), category=category)


def figure_targets():
    figures = [path for name in FIGURES for path in getattr(rules, f"figure_{name}").output]
    return [*figures, *rules.paper_tables.output, *rules.paper_rounding_null.output,
            *rules.findings.output, *rules.report_captions.output]



# ---------------------------------------------------------- resources (every model-loading rule)
# Memory and runtime from the sizes of the models a job loads (opdgeo.resources: the same
# numbers `opdgeo plan` prints), grown on a retry, on the partition the job's GPUs call for
# (the SLURM profile's partition file, slurm/partitions.yaml, or the file that
# SNAKEMAKE_SLURM_PARTITIONS names, as for the executor plugin) and cut to its limits;
# set-resources in a profile still overrides them. A model that cannot be sized here (a hub
# id neither downloaded nor in config/hub_models.yaml) gets FALLBACK, with a warning naming
# the fix.
SIZER = sizing.Sizer(config, RUNS, on_gpu=GPU > 0)
FALLBACK = sizing.Need(host=16000 * 2**20, gpu=0, minutes=120)
try:
    PARTITIONS = sizing.site_partitions()
except WorkflowError as error:
    raise WorkflowError(f"partition file: {error}") from None


def sized(need_of, gpus_of=lambda w: 0, floor_minutes=10):
    """Resources of a rule (gpu, slurm_partition, mem_mb, runtime) from `need_of(wildcards)`
    and `gpus_of(wildcards)`."""

    def resource(key):
        def value(wildcards, attempt):
            need = need_of(wildcards) or FALLBACK
            try:
                placed = sizing.place(need, gpus_of(wildcards), attempt, PARTITIONS,
                                      floor_minutes)
            except ValueError as error:
                raise WorkflowError(str(error)) from None
            return placed[key]

        return value

    keys = ("mem_mb", "runtime", *(("slurm_partition",) if PARTITIONS else ()))
    return {"gpu": gpus_of, **{key: resource(key) for key in keys}}
