"""The bill of a study before it runs: per run and in total, optimizer steps, rollout and
evaluation tokens, checkpoints and their disk, each job's peak memory, and GPU-hours.

Token counts are upper bounds (every completion at `max_new_tokens`); times come from the
config's `cost` section, which states throughputs as assumptions, not measurements. Memory
and times are the ones the Snakefile asks for (opdgeo.resources.Sizer).
"""

import json
import textwrap

import pandas as pd

from opdgeo.config import build_runs, model_task
from opdgeo.resources import (
    GiB,
    Sizer,
    eval_prompts,
    evaluation_tokens,
    job_resources,
    optimizer_bytes,
    place,
    sharded_gpu,
    site_partitions,
    task_max_new_tokens,
)

# A job planned to use more of a GPU's memory than this leaves too little for the CUDA
# context and fragmentation.
GPU_HEADROOM = 0.9


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / GiB, 1)


def _gpu_hours(need, gpus: int) -> float | None:
    return None if need is None else need.minutes * gpus / 60


def run_rows(config: dict, sizer: Sizer) -> list[dict]:
    """One row per trained run: its training and its evaluation jobs."""
    gpus = 1 if sizer.on_gpu else 0
    rows = []
    for name, spec in sizer.runs.items():
        if not spec.is_trained:
            continue
        training, size = spec.training, sizer.size(spec.source)
        checkpoints = sizer.checkpoints(name)
        train, evaluate = sizer.train(name), sizer.evaluate_run(name)
        generations = checkpoints * eval_prompts(spec.task) * (1 + config["evaluation"]["k"])
        params = size.params if size else None
        state = None if params is None else 4 * params + optimizer_bytes(
            spec.optimizer, training["optimizers"][spec.optimizer], params)
        rows.append({
            "run": name,
            "steps": training["steps"],
            "rollout_tokens": training["steps"] * training["batch_size"]
            * task_max_new_tokens(spec.task),
            "eval_generations": generations,
            "eval_tokens": checkpoints * evaluation_tokens(
                eval_prompts(spec.task), config["evaluation"]["k"], spec.task),
            "checkpoints": checkpoints,
            # Kept at the end: every checkpoint, or the final one (keep_checkpoints: false).
            "bf16_checkpoints_gib": _gib(None if params is None else 2 * params * (
                checkpoints if config["keep_checkpoints"] else 1)),
            "fp32_master_gib": _gib(4 * params if params and training["keep_fp32"] else 0),
            # The Trainer's own checkpoint (fp32 weights and optimizer state), kept while the
            # run trains and removed when it ends.
            "trainer_state_gib": _gib(state),
            "train_host_gib": _gib(train and train.host),
            "train_gpu_gib": _gib(train and train.gpu),
            "eval_gpu_gib": _gib(evaluate and evaluate.gpu),
            "train_gpus": sizer.gpus(name),
            "train_sharding": "fsdp" if sizer.sharded(name) else "none",
            "train_gpu_hours": _gpu_hours(train, sizer.gpus(name)),
            "eval_gpu_hours": _gpu_hours(evaluate, gpus),
        })
    return rows


def model_rows(config: dict, sizer: Sizer) -> list[dict]:
    """One row per evaluated base model (every student and teacher)."""
    gpus = 1 if sizer.on_gpu else 0
    keys = dict.fromkeys(key for pair in config["pairs"].values()
                         for key in (pair["student"], *pair["teachers"]))
    rows = []
    for key in keys:
        task, need = model_task(config, key), sizer.evaluate_model(key)
        rows.append({"run": f"model {key}", "eval_generations": eval_prompts(task)
                     * (1 + config["evaluation"]["k"]),
                     "eval_tokens": evaluation_tokens(eval_prompts(task),
                                                      config["evaluation"]["k"], task),
                     "eval_gpu_gib": _gib(need and need.gpu),
                     "eval_gpu_hours": _gpu_hours(need, gpus)})
    return rows


def analysis_hours(config: dict, sizer: Sizer) -> float:
    """CPU job hours of the delta analyses (every run, with its trajectory where drawn) and of
    the one decomposition of each source they read."""
    trajectory = config["analysis"]["trajectory"]
    needs = [sizer.analysis(name, trajectory and spec.is_trained and spec.group == "main")
             for name, spec in sizer.runs.items()]
    first_on_source = {spec.source: name for name, spec in reversed(sizer.runs.items())}
    needs += [sizer.decomposition(name) for name in first_on_source.values()]
    return sum(need.minutes / 60 for need in needs if need)


# What the total row holds: a sum over runs and models, or the largest single job (a peak).
PEAKS = ("train_host_gib", "train_gpu_gib", "eval_gpu_gib", "trainer_state_gib", "train_gpus")


def plan(config: dict, on_gpu: bool | None = None,
         partitions: list | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The bill as a table (one row per run and per evaluated model, and a total: sums, and
    the PEAKS of single jobs) and the notes that go with it: the assumptions, the jobs that do
    not fit one GPU, and the jobs over a limit of their partition (the site's partition file,
    as the Snakefile reads it)."""
    on_gpu = config["device"] == "cuda" if on_gpu is None else on_gpu
    partitions = site_partitions() if partitions is None else partitions
    sizer = Sizer(config, build_runs(config), on_gpu, assume=True)
    table = pd.DataFrame(run_rows(config, sizer) + model_rows(config, sizer))
    total = table.drop(columns="run").sum(numeric_only=True, min_count=1)
    for peak in PEAKS:
        total[peak] = table[peak].max()
    table = pd.concat([table, pd.DataFrame([{"run": "total", **total}])], ignore_index=True)
    cost = config["cost"]
    notes = [
        f"assumed (config `cost`, not measured): {cost['gpu']['name']} with "
        f"{cost['gpu']['memory_gb']} GB, {cost['gpu']['flops']:.2g} FLOP/s in training, "
        f"generation at {cost['generate_tokens_per_second']['hf']:g} (transformers) and "
        f"{cost['generate_tokens_per_second']['vllm']:g} (vLLM) tokens/s for a 1.5B model, "
        f"{cost['prompt_tokens']} prompt tokens; token counts are upper bounds "
        f"(every completion at max_new_tokens)",
        "columns: rollout and evaluation tokens, bf16 checkpoints (GiB), a training job's GPU "
        "memory (GiB per GPU) and GPUs (`fsdp`: sharded), training and evaluation GPU-hours; "
        "`--csv` / `--json` give every column",
        "total: tokens, checkpoints, disk and GPU-hours summed over every row; memory "
        "(GiB) and GPUs are the largest single job's",
        f"evaluation engine: {config['evaluation']['engine']}; rollouts: "
        f"{'vLLM' if config['training'].get('use_vllm') else 'transformers'}",
        f"delta analysis: {analysis_hours(config, sizer):.1f} CPU job-hours",
    ]
    if sizer.assumed:
        notes.append(f"sized from config/hub_models.yaml's assumed shapes (the checkpoint is "
                     f"not there yet): {', '.join(sizer.assumed)}")
    fixes = {"train_gpu_gib": "lower its training.micro_batch_size or plan a larger GPU (cost.gpu)",
             "eval_gpu_gib": "lower evaluation.batch_size"}
    usable = GPU_HEADROOM * cost["gpu"]["memory_gb"] * GiB
    for row in table[table["run"] != "total"].to_dict("records"):
        for column, fix in fixes.items():
            if row.get(column, 0) * GiB > usable:
                notes.append(f"{row['run']}: {column.split('_')[0]} needs ~{row[column]:.0f} GiB "
                             f"of GPU memory, over {GPU_HEADROOM:.0%} of one "
                             f"{cost['gpu']['name']}: {fix}" + (
                                 sharding_note(sizer, row["run"], usable)
                                 if column == "train_gpu_gib" else ""))
    notes += sharded_notes(sizer)
    notes += partition_notes(sizer, partitions)
    if sizer.unsized:
        notes.append(f"not sized (their cells are empty): {', '.join(sizer.unsized)}")
    return table, notes


def sharding_note(sizer: Sizer, run: str, usable: float) -> str:
    """Why a run needs sharded training, and over how many GPUs it would fit one."""
    need, logits = sizer.train(run, sharded=False), sizer.logits(run)
    for gpus in (2, 4, 8):
        per_gpu = sharded_gpu(need, logits, gpus)
        if per_gpu <= usable and gpus > sizer.gpus(run) * sizer.sharded(run):
            return (f"; its weights, gradients and AdamW state sharded over {gpus} GPUs "
                    f"(FSDP) would leave ~{per_gpu / GiB:.0f} GiB per GPU: set "
                    f"pairs.{sizer.runs[run].pair}.training: {{gpus: {gpus}, sharding: fsdp}}")
    return "; even sharded over 8 GPUs it would not fit: lower training.micro_batch_size"


def sharded_notes(sizer: Sizer) -> list[str]:
    """A line per pair whose training is sharded: over how many GPUs, and the memory per GPU
    against one GPU holding everything."""
    pairs: dict[tuple, list] = {}
    for run, spec in sizer.runs.items():
        if spec.is_trained and sizer.sharded(run) and sizer.train(run) is not None:
            pairs.setdefault((spec.pair, sizer.gpus(run)), []).append(run)
    return [f"sharded training (training.sharding: fsdp) of pair {pair}'s {len(runs)} runs: "
            f"the student's and the teacher's weights, gradients and AdamW state divided among "
            f"each job's {gpus} GPUs, ~{max(sizer.train(r).gpu for r in runs) / GiB:.0f} GiB per "
            f"GPU, where one GPU would need "
            f"~{max(sizer.train(r, sharded=False).gpu for r in runs) / GiB:.0f} GiB"
            for (pair, gpus), runs in pairs.items()]


def partition_notes(sizer: Sizer, partitions: list) -> list[str]:
    """A line for every model-loading GPU job whose need is over a limit of the partition it
    goes to: a longer one runs in several attempts (opdgeo.attempts), a larger one does not
    fit."""
    if not partitions:
        return []
    gpu = 1 if sizer.on_gpu else 0
    jobs = [(f"{run}: train", sizer.train(run), sizer.gpus(run))
            for run, spec in sizer.runs.items() if spec.is_trained]
    jobs += [(f"{run}: evaluate", sizer.evaluate_run(run), gpu)
             for run, spec in sizer.runs.items() if spec.is_trained]
    models = dict.fromkeys(key for pair in sizer.config["pairs"].values()
                           for key in (pair["student"], *pair["teachers"]))
    jobs += [(f"model {key}: evaluate", sizer.evaluate_model(key), gpu) for key in models]
    notes = []
    for job, need, gpus in jobs:
        if need is None:
            continue
        asked = job_resources(need, 1)
        try:
            placed = place(need, gpus, 1, partitions)
        except ValueError as error:
            notes.append(f"{job}: {error}")
            continue
        where = f"partition {placed['slurm_partition']}"
        if asked["runtime"] > placed["runtime"]:
            attempts = -(-asked["runtime"] // placed["runtime"])
            notes.append(f"{job} needs ~{asked['runtime'] / 60:,.0f} h, over the "
                         f"{placed['runtime'] / 60:,.0f} h of {where}: ~{attempts} attempts, "
                         "each continuing from the last checkpoint")
        if asked["mem_mb"] > placed["mem_mb"]:
            notes.append(f"{job} needs {asked['mem_mb'] / 1024:,.0f} GB of host memory, over "
                         f"the {placed['mem_mb'] / 1024:,.0f} GB of {where}: it does not fit; "
                         "fewer training.gpus, or a partition with more memory per node")
    return notes


# The columns of the printed table (the whole table: `opdgeo plan --csv` / `--json`), with
# the printed heading and the format of their values.
SHOWN = {
    "rollout_tokens": ("rollouts", "{:.2g}"),
    "eval_tokens": ("eval tok", "{:.2g}"),
    "bf16_checkpoints_gib": ("ckpt GiB", "{:,.0f}"),
    "train_gpu_gib": ("GPU GiB", "{:.0f}"),
    "train_gpus": ("GPUs", "{:.0f}"),
    "train_gpu_hours": ("train h", "{:,.0f}"),
    "eval_gpu_hours": ("eval h", "{:,.0f}"),
}


def format_plan(table: pd.DataFrame, notes: list[str]) -> str:
    """The bill for a terminal: a few columns (within 100 characters for the paper's run
    names), and the notes, wrapped."""
    shown = pd.DataFrame({"run": table["run"]})
    for column, (heading, form) in SHOWN.items():
        shown[heading] = table[column].map(lambda v, f=form: "" if pd.isna(v) else f.format(v))
    shown[SHOWN["train_gpus"][0]] += table["train_sharding"].map({"fsdp": " fsdp"}).fillna("")
    lines = shown.to_string(index=False, justify="right").splitlines()
    wrapped = [textwrap.fill(note, 100, initial_indent="- ", subsequent_indent="  ")
               for note in notes]
    return "\n".join(lines) + "\n\n" + "\n".join(wrapped)


def plan_json(table: pd.DataFrame, notes: list[str]) -> str:
    return json.dumps({"rows": json.loads(table.to_json(orient="records")), "notes": notes},
                      indent=1)


def summary(config: dict) -> str:
    """The bill in one line, for the start of a run."""
    table, _ = plan(config)
    total = table.set_index("run").loc["total"]
    hours = total[["train_gpu_hours", "eval_gpu_hours"]].sum()
    return (f"plan: {total['steps']:.0f} optimizer steps, {total['rollout_tokens']:.3g} rollout "
            f"and {total['eval_tokens']:.3g} evaluation tokens at most, "
            f"{total['bf16_checkpoints_gib'] + total['fp32_master_gib']:,.0f} GiB of "
            f"checkpoints, {hours:,.0f} GPU-hours at the config's assumed throughputs "
            f"(`opdgeo plan --configfile CONFIG` prints the bill)")
