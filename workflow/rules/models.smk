# Base models the pipeline builds and trains on the task's ground truth: teachers to near
# 100%, the student to a middling score (it becomes the source of every run of its pair).


rule train_model:
    output:
        checkpoint=directory("results/models/{model}/final"),
        score="results/models/{model}/score.json",
        log_csv="results/models/{model}/train_log.csv",
    wildcard_constraints:
        model="|".join(map(re.escape, BUILT_MODELS)) or "NONE",
    params:
        model_spec=lambda w: as_arg(config["models"][w.model]),
        task=lambda w: task_of_model(w.model),
        out=lambda w, output: Path(output.checkpoint).parent,
        device=job_device,
    conda:
        CONDA_ENV
    log:
        "results/logs/train_model/{model}.log",
    benchmark:
        "results/benchmarks/train_model/{model}.tsv"
    threads: config["threads"]
    resources:
        **sized(lambda w: SIZER.train_model(w.model), lambda w: GPU),
    shell:
        "opdgeo train-model --name {wildcards.model:q} --model-spec {params.model_spec} --task {params.task}"
        " --out {params.out:q} --device {params.device} --threads {threads}"
        " > {log:q} 2>&1"
