# Subnetwork masks: |dW| > atol of a run, its top-density coordinates, or random controls.


rule make_mask:
    input:
        unpack(mask_inputs),
    output:
        mask="results/masks/{mask}.safetensors",
        densities="results/masks/{mask}.density.csv",
    params:
        mask_spec=lambda w: as_arg(mask_spec(w.mask).__dict__),
        source=lambda w: source_path(mask_spec(w.mask).run),
        trained=lambda w: trained_path(mask_spec(w.mask).run),
    conda:
        CONDA_ENV
    log:
        "results/logs/make_mask/{mask}.log",
    benchmark:
        "results/benchmarks/make_mask/{mask}.tsv"
    threads: 1
    resources:
        **sized(lambda w: SIZER.mask(mask_spec(w.mask).run)),
    shell:
        "opdgeo make-mask --mask-spec {params.mask_spec} --source {params.source:q}"
        " --trained {params.trained:q} --out {output.mask:q} --densities {output.densities:q}"
        " > {log:q} 2>&1"
