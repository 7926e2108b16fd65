# Held-out exact match and mean@k of every checkpoint: base models, and every run's final and
# intermediate checkpoints (the curves of Fig 3 read these).


rule evaluate_model:
    input:
        lambda w: model_inputs(w.model),
    output:
        "results/eval/models/{model}.csv",
    params:
        checkpoint=lambda w: model_path(w.model),
        task=lambda w: task_of_model(w.model),
        evaluation=as_arg(config["evaluation"]),
        contexts=lambda w: context_options(w.model),
        device=job_device,
    conda:
        CONDA_ENV
    log:
        "results/logs/evaluate_model/{model}.log",
    benchmark:
        "results/benchmarks/evaluate_model/{model}.tsv"
    threads: config["threads"]
    resources:
        **sized(lambda w: SIZER.evaluate_model(w.model), lambda w: GPU),
    shell:
        "opdgeo evaluate --run {wildcards.model:q} --checkpoint {params.checkpoint:q}"
        " --task {params.task} --evaluation {params.evaluation} {params.contexts} --out {output:q}"
        " --device {params.device} --threads {threads} > {log:q} 2>&1"


rule evaluate_run:
    input:
        final=rules.train_run.output.final,
        checkpoints=rules.train_run.output.checkpoints,
    output:
        "results/eval/runs/{run}.csv",
    params:
        step=lambda w: final_steps(w.run),
        every=lambda w: RUNS[w.run].evaluate_every,
        seed=lambda w: RUNS[w.run].seed,
        task=lambda w: task_of_run(w.run),
        evaluation=as_arg(config["evaluation"]),
        device=job_device,
    conda:
        CONDA_ENV
    log:
        "results/logs/evaluate_run/{run}.log",
    benchmark:
        "results/benchmarks/evaluate_run/{run}.tsv"
    threads: config["threads"]
    resources:
        **sized(lambda w: SIZER.evaluate_run(w.run), lambda w: GPU),
    shell:
        "opdgeo evaluate --run {wildcards.run:q} --checkpoint {input.final:q} --step {params.step}"
        " --checkpoints {input.checkpoints:q} --every {params.every} --task {params.task}"
        " --evaluation {params.evaluation}"
        " --seed {params.seed}"
        " --out {output:q} --device {params.device} --threads {threads} > {log:q} 2>&1"
