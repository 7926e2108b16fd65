# The delta analysis of docs/study.md section 3: one decomposition per source checkpoint, one job
# per run (its final checkpoint, and its intermediate ones for the trajectory) reading it, one
# overlap job per group of runs on one source.

OVERLAP_GROUPS = overlap_groups()
# One run per source checkpoint: every analysis on a source reads its one decomposition.
SOURCES = {source_key(run): run for run in reversed(RUNS)}


rule decompose_source:
    input:
        lambda w: run_inputs(SOURCES[w.source])["source"],
    output:
        geometry=directory("results/sources/{source}"),
    wildcard_constraints:
        source="|".join(map(re.escape, SOURCES)) or "NONE",
    params:
        source=lambda w: source_path(SOURCES[w.source]),
        dtype=config["analysis"]["dtype"],
        exact_svd_max=config["analysis"]["exact_svd_max"],
        device=job_device,
    conda:
        CONDA_ENV
    log:
        "results/logs/decompose/{source}.log",
    benchmark:
        "results/benchmarks/decompose/{source}.tsv"
    threads: config["threads"]
    resources:
        **sized(lambda w: SIZER.decomposition(SOURCES[w.source])),
    shell:
        "opdgeo decompose --source {params.source:q} --out {output.geometry:q} --dtype {params.dtype}"
        " --exact-svd-max {params.exact_svd_max} --device {params.device} > {log:q} 2>&1"


rule analyze_run:
    input:
        unpack(analyze_inputs),
    output:
        summary="results/analysis/{run}/final/summary.json",
        tensors="results/analysis/{run}/final/tensors.csv",
        blocks="results/analysis/{run}/final/blocks.csv",
        modules="results/analysis/{run}/final/modules.csv",
        layer_module="results/analysis/{run}/final/layer_module.csv",
        trajectory="results/analysis/{run}/trajectory.csv",
    params:
        source=lambda w: source_path(w.run),
        trained=lambda w: trained_path(w.run),
        fp32=fp32_option,
        checkpoints=checkpoints_option,
        out=lambda w, output: Path(output.summary).parent,
        dtype=config["analysis"]["dtype"],
        exact_svd_max=config["analysis"]["exact_svd_max"],
        device=job_device,
    conda:
        CONDA_ENV
    log:
        "results/logs/analyze/{run}.log",
    benchmark:
        "results/benchmarks/analyze/{run}.tsv"
    threads: config["threads"]
    resources:
        **sized(lambda w: SIZER.analysis(w.run, has_trajectory(w.run))),
    shell:
        "opdgeo analyze --run {wildcards.run:q} --source {params.source:q} --trained {params.trained:q}"
        " --out {params.out:q} --dtype {params.dtype} {params.fp32}"
        " --exact-svd-max {params.exact_svd_max} --device {params.device}"
        " --source-geometry {input.geometry:q} {params.checkpoints}"
        " --trajectory {output.trajectory:q} > {log:q} 2>&1"


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
    conda:
        CONDA_ENV
    log:
        "results/logs/overlap/{group}.log",
    benchmark:
        "results/benchmarks/overlap/{group}.tsv"
    threads: 1
    resources:
        **sized(lambda w: SIZER.mask(OVERLAP_GROUPS[w.group][0])),
    shell:
        "opdgeo overlap --source {params.source:q} --runs {params.runs}"
        " --out {output:q} > {log:q} 2>&1"
