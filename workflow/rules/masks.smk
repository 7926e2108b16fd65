# Subnetwork masks: |dW| > atol of a run, its top-density coordinates, or random controls.


def mask_spec(name):
    return MASKS[name]


def mask_inputs(w):
    spec = mask_spec(w.mask)
    return {"source": model_inputs(RUNS[spec.run].source), "trained": trained_path(spec.run)}


rule make_mask:
    input:
        unpack(mask_inputs),
    output:
        mask="results/masks/{mask}.safetensors",
        densities="results/masks/{mask}.density.csv",
    params:
        spec=lambda w: as_arg(mask_spec(w.mask).__dict__),
        source=lambda w: model_path(RUNS[mask_spec(w.mask).run].source),
        trained=lambda w: trained_path(mask_spec(w.mask).run),
    log:
        "results/logs/make_mask/{mask}.log",
    benchmark:
        "results/benchmarks/make_mask/{mask}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "opdgeo make-mask --spec {params.spec} --source {params.source}"
        " --trained {params.trained} --out {output.mask} --densities {output.densities}"
        " > {log} 2>&1"
