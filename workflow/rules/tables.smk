# Tidy tables: every per-run output gathered into long tables that figures read.


localrules:
    runs_table,
    evaluation_table,
    delta_tables,
    overlap_table,
    optimizer_state_table,
    training_log_table,
    mask_table,
    analysis_tables,


rule runs_table:
    output:
        "results/tables/runs.csv",
    params:
        # A function: Snakemake would read braces in a string param (task templates) as wildcards.
        config=lambda w: as_arg({k: v for k, v in config.items() if k != "plots"}, ordered=True),
    log:
        "results/logs/tables/runs.log",
    benchmark:
        "results/benchmarks/tables/runs.tsv"
    shell:
        "opdgeo runs --config {params.config} --out {output} > {log} 2>&1"


rule evaluation_table:
    input:
        expand("results/eval/models/{model}.csv", model=PAIR_MODELS),
        expand("results/eval/runs/{run}.csv", run=TRAINED),
    output:
        "results/tables/evaluation.csv",
    log:
        "results/logs/tables/evaluation.log",
    benchmark:
        "results/benchmarks/tables/evaluation.tsv"
    shell:
        "opdgeo collect csv {input} --out {output} > {log} 2>&1"


rule delta_tables:
    input:
        final=expand("results/analysis/{run}/final/summary.json", run=RUNS),
        steps=expand("results/analysis/{run}/trajectory.csv", run=RUNS),
    output:
        final="results/tables/delta_global.csv",
        trajectory="results/tables/trajectory.csv",
    params:
        final_steps=as_arg({run: final_steps(run) for run in TRAINED}),
    log:
        "results/logs/tables/delta.log",
    benchmark:
        "results/benchmarks/tables/delta.tsv"
    shell:
        "(opdgeo collect summaries {input.final} --final-steps {params.final_steps} --out {output.final}"
        " && opdgeo collect summaries {input.final} {input.steps} --final-steps {params.final_steps}"
        " --out {output.trajectory}) > {log} 2>&1"


rule overlap_table:
    input:
        expand("results/overlap/{group}", group=OVERLAP_GROUPS),
    output:
        "results/tables/overlap.csv",
    log:
        "results/logs/tables/overlap.log",
    benchmark:
        "results/benchmarks/tables/overlap.tsv"
    shell:
        "opdgeo collect overlaps {input} --out {output} > {log} 2>&1"


rule optimizer_state_table:
    input:
        expand("results/runs/{run}/optimizer_state.csv", run=TRAINED),
    output:
        "results/tables/optimizer_state.csv",
    log:
        "results/logs/tables/optimizer_state.log",
    benchmark:
        "results/benchmarks/tables/optimizer_state.tsv"
    shell:
        "opdgeo collect csv {input} --out {output} > {log} 2>&1"


rule training_log_table:
    input:
        expand("results/runs/{run}/train_log.csv", run=TRAINED),
    output:
        "results/tables/training_log.csv",
    log:
        "results/logs/tables/training_log.log",
    benchmark:
        "results/benchmarks/tables/training_log.tsv"
    shell:
        "opdgeo collect run-csv {input} --out {output} > {log} 2>&1"


rule mask_table:
    input:
        expand("results/masks/{mask}.density.csv", mask=MASKS),
    output:
        "results/tables/masks.csv",
    log:
        "results/logs/tables/masks.log",
    benchmark:
        "results/benchmarks/tables/masks.tsv"
    shell:
        "opdgeo collect csv {input} --out {output} > {log} 2>&1"


rule analysis_tables:
    input:
        layer_module=expand(rules.analyze_run.output.layer_module, run=RUNS),
        modules=expand(rules.analyze_run.output.modules, run=RUNS),
        tensors=expand(rules.analyze_run.output.tensors, run=RUNS),
    output:
        layer_module="results/tables/layer_module.csv",
        modules="results/tables/modules.csv",
        tensors="results/tables/tensors.csv",
    log:
        "results/logs/tables/analysis.log",
    benchmark:
        "results/benchmarks/tables/analysis.tsv"
    shell:
        "(opdgeo collect analysis-csv {input.layer_module} --out {output.layer_module}"
        " && opdgeo collect analysis-csv {input.modules} --out {output.modules}"
        " && opdgeo collect analysis-csv {input.tensors} --out {output.tensors}) > {log} 2>&1"
