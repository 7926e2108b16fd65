# One job per trained run: OPD, its matched SFT / GRPO controls, and masked retraining.
# Only opdgeo.train knows how each kind is made; every later stage sees checkpoints.


rule train_run:
    input:
        unpack(train_inputs),
    output:
        final=directory("results/runs/{run}/final"),
        fp32=directory("results/runs/{run}/fp32"),
        checkpoints=keep_or_temp(directory("results/runs/{run}/checkpoints")),
        log_csv="results/runs/{run}/train_log.csv",
        optimizer_state="results/runs/{run}/optimizer_state.csv",
    params:
        run_spec=run_spec_arg,
        options=train_options,
        task=lambda w: task_of_run(w.run),
        launcher=launcher,
        out=lambda w, output: Path(output.final).parent,
        device=job_device,
    conda:
        CONDA_ENV
    log:
        "results/logs/train_run/{run}.log",
    benchmark:
        "results/benchmarks/train_run/{run}.tsv"
    threads: config["threads"]
    resources:
        **sized(lambda w: SIZER.train(w.run), lambda w: SIZER.gpus(w.run)),
    shell:
        "{params.launcher} train-run --run-spec {params.run_spec} {params.options} --task {params.task}"
        " --out {params.out:q} --device {params.device} --threads {threads}"
        " > {log:q} 2>&1"
