# The delta analysis of STUDY.md section 3: one job per run (final checkpoint), one per
# intermediate checkpoint (trajectories), one overlap job per pair of runs on one source.


def fp32_option(w):
    """The exact rounding null needs the fp32 master weights of runs that kept them."""
    spec = RUNS[w.run]
    if spec.is_trained and spec.training["keep_fp32"]:
        return f"--fp32-trained results/runs/{w.run}/fp32/model.safetensors"
    return ""


def analyze_inputs(w):
    inputs = run_inputs(w.run)
    if RUNS[w.run].is_trained:
        inputs["fp32"] = f"results/runs/{w.run}/fp32"
    return inputs


rule analyze_final:
    input:
        unpack(analyze_inputs),
    output:
        summary="results/analysis/{run}/final/summary.json",
        tensors="results/analysis/{run}/final/tensors.csv",
        blocks="results/analysis/{run}/final/blocks.csv",
        layer_module="results/analysis/{run}/final/layer_module.csv",
    params:
        source=lambda w: source_path(w.run),
        trained=lambda w: trained_path(w.run),
        fp32=fp32_option,
        dtype=config["analysis"]["dtype"],
        exact_svd_max=config["analysis"]["exact_svd_max"],
        device=config["device"],
    log:
        "results/logs/analyze/{run}/final.log",
    benchmark:
        "results/benchmarks/analyze/{run}/final.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "opdgeo analyze --source {params.source} --trained {params.trained}"
        " --out results/analysis/{wildcards.run}/final --dtype {params.dtype} {params.fp32}"
        " --exact-svd-max {params.exact_svd_max} --device {params.device} > {log} 2>&1"


rule analyze_step:
    input:
        source=lambda w: model_inputs(RUNS[w.run].source),
        checkpoints="results/runs/{run}/checkpoints",
    output:
        summary="results/analysis/{run}/step-{step}/summary.json",
    params:
        source=lambda w: source_path(w.run),
        dtype=config["analysis"]["dtype"],
        exact_svd_max=config["analysis"]["exact_svd_max"],
        device=config["device"],
    log:
        "results/logs/analyze/{run}/step-{step}.log",
    benchmark:
        "results/benchmarks/analyze/{run}/step-{step}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "opdgeo analyze --source {params.source}"
        " --trained {input.checkpoints}/step-{wildcards.step}"
        " --out results/analysis/{wildcards.run}/step-{wildcards.step} --dtype {params.dtype}"
        " --exact-svd-max {params.exact_svd_max} --device {params.device} > {log} 2>&1"


rule overlap:
    input:
        a=lambda w: run_inputs(w.a)["trained"],
        b=lambda w: run_inputs(w.b)["trained"],
    output:
        "results/overlap/{a}__{b}/overlap.json",
    params:
        source=lambda w: source_path(w.a),
        a=lambda w: trained_path(w.a),
        b=lambda w: trained_path(w.b),
        atol=config["analysis"]["atol"],
    log:
        "results/logs/overlap/{a}__{b}.log",
    benchmark:
        "results/benchmarks/overlap/{a}__{b}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "opdgeo overlap --source {params.source} --trained-a {params.a} --trained-b {params.b}"
        " --out results/overlap/{wildcards.a}__{wildcards.b} --atol {params.atol} > {log} 2>&1"
