# A model card in every trained run's final checkpoint (opdgeo.model_card): how it was made and
# what it scored. It needs the scores and the analysis, so it is written after them, as a file
# beside the run's folders and a copy in final/README.md. Snakemake dates final/ by its
# .snakemake_timestamp, so the copy reruns nothing; retraining replaces final/ and the card.


rule model_card:
    localrule: True
    input:
        final=rules.train_run.output.final,
        scores=rules.evaluate_run.output[0],
        source_scores=lambda w: expand(rules.evaluate_model.output[0], model=RUNS[w.run].source),
        summary=rules.analyze_run.output.summary,
    output:
        "results/runs/{run}/model_card.md",
    params:
        run_spec=run_spec_arg,
        options=train_options,
        task=lambda w: task_of_run(w.run),
    conda:
        CONDA_ENV
    log:
        "results/logs/model_card/{run}.log",
    benchmark:
        "results/benchmarks/model_card/{run}.tsv"
    shell:
        "opdgeo model-card --run-spec {params.run_spec} {params.options} --task {params.task}"
        " --scores {input.scores} --source-scores {input.source_scores}"
        " --summary {input.summary} --checkpoint {input.final} --out {output} > {log} 2>&1"
