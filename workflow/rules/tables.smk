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
        # Only the sections runs are made of: a switch like preload reruns nothing.
        config=lambda w: as_arg({k: v for k, v in config.items() if k in RUN_SECTIONS},
                                ordered=True),
    conda:
        CONDA_ENV
    log:
        "results/logs/tables/runs.log",
    benchmark:
        "results/benchmarks/tables/runs.tsv"
    shell:
        "opdgeo runs --config {params.config} --out {output:q} > {log:q} 2>&1"


rule evaluation_table:
    input:
        expand(rules.evaluate_model.output[0], model=PAIR_MODELS),
        expand(rules.evaluate_run.output[0], run=TRAINED),
    output:
        "results/tables/evaluation.csv",
    conda:
        CONDA_ENV
    log:
        "results/logs/tables/evaluation.log",
    benchmark:
        "results/benchmarks/tables/evaluation.tsv"
    shell:
        "opdgeo collect csv {input:q} --out {output:q} > {log:q} 2>&1"


rule delta_tables:
    input:
        final=expand(rules.analyze_run.output.summary, run=RUNS),
        steps=expand(rules.analyze_run.output.trajectory, run=RUNS),
    output:
        final="results/tables/delta_global.csv",
        trajectory="results/tables/trajectory.csv",
    params:
        final_steps=as_arg({run: final_steps(run) for run in TRAINED}),
    conda:
        CONDA_ENV
    log:
        "results/logs/tables/delta.log",
    benchmark:
        "results/benchmarks/tables/delta.tsv"
    shell:
        "(opdgeo collect summaries {input.final:q} --final-steps {params.final_steps} --out {output.final:q}"
        " && opdgeo collect summaries {input.final:q} {input.steps:q} --final-steps {params.final_steps}"
        " --out {output.trajectory:q}) > {log:q} 2>&1"


rule overlap_table:
    input:
        expand(rules.overlap.output[0], group=OVERLAP_GROUPS),
    output:
        pooled="results/tables/overlap.csv",
        tensors="results/tables/overlap_tensors.csv",
    conda:
        CONDA_ENV
    log:
        "results/logs/tables/overlap.log",
    benchmark:
        "results/benchmarks/tables/overlap.tsv"
    shell:
        "(opdgeo collect overlaps {input:q} --out {output.pooled:q}"
        " && opdgeo collect overlap-tensors {input:q} --out {output.tensors:q}) > {log:q} 2>&1"


rule optimizer_state_table:
    input:
        expand(rules.train_run.output.optimizer_state, run=TRAINED),
    output:
        "results/tables/optimizer_state.csv",
    conda:
        CONDA_ENV
    log:
        "results/logs/tables/optimizer_state.log",
    benchmark:
        "results/benchmarks/tables/optimizer_state.tsv"
    shell:
        "opdgeo collect csv {input:q} --out {output:q} > {log:q} 2>&1"


rule training_log_table:
    input:
        expand(rules.train_run.output.log_csv, run=TRAINED),
    output:
        "results/tables/training_log.csv",
    conda:
        CONDA_ENV
    log:
        "results/logs/tables/training_log.log",
    benchmark:
        "results/benchmarks/tables/training_log.tsv"
    shell:
        "opdgeo collect csv {input:q} --out {output:q} > {log:q} 2>&1"


rule mask_table:
    input:
        expand(rules.make_mask.output.densities, mask=MASKS),
    output:
        "results/tables/masks.csv",
    conda:
        CONDA_ENV
    log:
        "results/logs/tables/masks.log",
    benchmark:
        "results/benchmarks/tables/masks.tsv"
    shell:
        "opdgeo collect csv {input:q} --out {output:q} > {log:q} 2>&1"


rule analysis_tables:
    input:
        layer_module=expand(rules.analyze_run.output.layer_module, run=RUNS),
        modules=expand(rules.analyze_run.output.modules, run=RUNS),
        tensors=expand(rules.analyze_run.output.tensors, run=RUNS),
    output:
        layer_module="results/tables/layer_module.csv",
        modules="results/tables/modules.csv",
        tensors="results/tables/tensors.csv",
    conda:
        CONDA_ENV
    log:
        "results/logs/tables/analysis.log",
    benchmark:
        "results/benchmarks/tables/analysis.tsv"
    shell:
        "(opdgeo collect csv {input.layer_module:q} --out {output.layer_module:q}"
        " && opdgeo collect csv {input.modules:q} --out {output.modules:q}"
        " && opdgeo collect csv {input.tensors:q} --out {output.tensors:q}) > {log:q} 2>&1"
