# Model cards in the Hugging Face Hub's conventions (opdgeo.model_card): how a checkpoint was
# made and what it scored, as a file beside its folders and a copy in final/README.md, so a
# final checkpoint can be pushed to the Hub as it is. Snakemake dates final/ by its
# .snakemake_timestamp, so the copy reruns nothing; retraining replaces final/ and the card.
# A run's card reads its licence from its source's card: a base model's card comes first.

CARDED_MODELS = [key for key in BUILT_MODELS if key in PAIR_MODELS]  # evaluated, so scored


rule base_model_card:
    localrule: True
    input:
        final=rules.train_model.output.checkpoint,
        scores=rules.evaluate_model.output[0],
    output:
        "results/models/{model}/model_card.md",
    wildcard_constraints:
        model="|".join(map(re.escape, CARDED_MODELS)) or "NONE",
    params:
        model_spec=lambda w: as_arg(config["models"][w.model]),
        task=lambda w: task_of_model(w.model),
        evaluation=as_arg(config["evaluation"]),
    conda:
        CONDA_ENV
    log:
        "results/logs/base_model_card/{model}.log",
    benchmark:
        "results/benchmarks/base_model_card/{model}.tsv"
    shell:
        "opdgeo base-model-card --name {wildcards.model:q} --model-spec {params.model_spec}"
        " --task {params.task} --evaluation {params.evaluation} --scores {input.scores:q}"
        " --checkpoint {input.final:q} --out {output:q} > {log:q} 2>&1"


rule model_card:
    localrule: True
    input:
        final=rules.train_run.output.final,
        scores=rules.evaluate_run.output[0],
        source_scores=lambda w: expand(rules.evaluate_model.output[0], model=RUNS[w.run].source),
        source_card=lambda w: expand(rules.base_model_card.output[0], model=RUNS[w.run].source)
        if RUNS[w.run].source in CARDED_MODELS else [],
        summary=rules.analyze_run.output.summary,
    output:
        "results/runs/{run}/model_card.md",
    params:
        run_spec=run_spec_arg,
        options=train_options,
        task=lambda w: task_of_run(w.run),
        evaluation=as_arg(config["evaluation"]),
    conda:
        CONDA_ENV
    log:
        "results/logs/model_card/{run}.log",
    benchmark:
        "results/benchmarks/model_card/{run}.tsv"
    shell:
        "opdgeo model-card --run-spec {params.run_spec} {params.options} --task {params.task}"
        " --evaluation {params.evaluation} --scores {input.scores:q}"
        " --source-scores {input.source_scores:q} --summary {input.summary:q}"
        " --checkpoint {input.final:q} --out {output:q} > {log:q} 2>&1"
