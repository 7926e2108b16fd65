# The delta analysis of STUDY.md section 3: one job per run (its final checkpoint, and its
# intermediate ones for the trajectory), one overlap job per group of runs on one source.


def fp32_option(w):
    """The exact rounding null needs the fp32 master weights of runs that kept them."""
    spec = RUNS[w.run]
    if spec.is_trained and spec.training["keep_fp32"]:
        return f"--fp32-trained results/runs/{w.run}/fp32/model.safetensors"
    return ""


def has_trajectory(run):
    """Main trained runs are analysed at every intermediate checkpoint too (Fig 3's curves)."""
    spec = RUNS[run]
    return config["analysis"]["trajectory"] and spec.is_trained and spec.group == "main"


def analyze_inputs(w):
    inputs = run_inputs(w.run)
    if RUNS[w.run].is_trained:
        inputs["fp32"] = f"results/runs/{w.run}/fp32"
    if has_trajectory(w.run):
        inputs["checkpoints"] = f"results/runs/{w.run}/checkpoints"
    return inputs


def checkpoints_option(w):
    return f"--checkpoints results/runs/{w.run}/checkpoints" if has_trajectory(w.run) else ""


rule analyze_run:
    input:
        unpack(analyze_inputs),
    output:
        summary="results/analysis/{run}/final/summary.json",
        tensors="results/analysis/{run}/final/tensors.csv",
        blocks="results/analysis/{run}/final/blocks.csv",
        layer_module="results/analysis/{run}/final/layer_module.csv",
        trajectory="results/analysis/{run}/trajectory.csv",
    params:
        source=lambda w: source_path(w.run),
        trained=lambda w: trained_path(w.run),
        fp32=fp32_option,
        checkpoints=checkpoints_option,
        dtype=config["analysis"]["dtype"],
        exact_svd_max=config["analysis"]["exact_svd_max"],
        device=config["device"],
    log:
        "results/logs/analyze/{run}.log",
    benchmark:
        "results/benchmarks/analyze/{run}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "opdgeo analyze --source {params.source} --trained {params.trained}"
        " --out results/analysis/{wildcards.run}/final --dtype {params.dtype} {params.fp32}"
        " --exact-svd-max {params.exact_svd_max} --device {params.device}"
        " {params.checkpoints} --trajectory {output.trajectory} > {log} 2>&1"


def overlap_inputs(w):
    return [path for run in OVERLAP_GROUPS[w.group] for path in run_inputs(run)["trained"]]


def overlap_runs_option(w):
    return " ".join(f"{run}={shlex.quote(trained_path(run))}" for run in OVERLAP_GROUPS[w.group])


rule overlap:
    input:
        overlap_inputs,
    output:
        directory("results/overlap/{group}"),
    wildcard_constraints:
        group="|".join(map(re.escape, OVERLAP_GROUPS)) or "NONE",
    params:
        source=lambda w: source_path(OVERLAP_GROUPS[w.group][0]),
        runs=overlap_runs_option,
        atol=config["analysis"]["atol"],
    log:
        "results/logs/overlap/{group}.log",
    benchmark:
        "results/benchmarks/overlap/{group}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "opdgeo overlap --source {params.source} --runs {params.runs}"
        " --out {output} --atol {params.atol} > {log} 2>&1"
