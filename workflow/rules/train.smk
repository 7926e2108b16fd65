# One job per trained run: OPD, its matched SFT / GRPO controls, and masked retraining.
# Only opdgeo.train knows how each kind is made; every later stage sees checkpoints.


def train_inputs(w):
    spec = RUNS[w.run]
    inputs = {"source": model_inputs(spec.source)}
    if spec.teacher and spec.kind != "grpo":
        inputs["teacher"] = model_inputs(spec.teacher)
    if spec.mask:
        inputs["mask"] = mask_path(spec.mask)
    return inputs


def train_options(w):
    spec = RUNS[w.run]
    options = f"--source {shlex.quote(model_path(spec.source))}"
    if spec.teacher and spec.kind != "grpo":
        options += f" --teacher {shlex.quote(model_path(spec.teacher))}"
    if spec.mask:
        options += f" --mask {mask_path(spec.mask)}"
    return options


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


rule train_run:
    input:
        unpack(train_inputs),
    output:
        final=directory("results/runs/{run}/final"),
        fp32=directory("results/runs/{run}/fp32"),
        checkpoints=directory("results/runs/{run}/checkpoints"),
        log_csv="results/runs/{run}/train_log.csv",
        optimizer_state="results/runs/{run}/optimizer_state.csv",
    params:
        spec=run_spec_arg,
        options=train_options,
        task=lambda w: task_of_run(w.run),
        launcher=launcher,
        device=config["device"],
    log:
        "results/logs/train_run/{run}.log",
    benchmark:
        "results/benchmarks/train_run/{run}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=4000,
        runtime=240,
        gpu=GPU,
    shell:
        "{params.launcher} train-run --spec {params.spec} {params.options} --task {params.task}"
        " --out results/runs/{wildcards.run} --device {params.device} --threads {threads}"
        " > {log} 2>&1"
