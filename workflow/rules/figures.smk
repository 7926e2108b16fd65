# Figures, paper tables, findings and the report's captions: rendered from tidy tables only.
# Every rule here takes the plot settings it uses as params, so editing config["plots"]
# reruns these rules and nothing upstream. All run locally (also under the SLURM profile).

from opdgeo import findings, paper_tables
from opdgeo.config import primary_score
from opdgeo.paper_tables import PAPER_NULL_TABLE

PLOTS = {**config["plots"], "metric": primary_score(config["evaluation"])}
# Figures (opdgeo.figures.FIGURES), paper tables and findings each declare the tidy tables
# (results/tables/{name}.csv) they read besides runs.csv; those are their rules' inputs.
PAPER_TABLES = list(paper_tables.TABLE_NAMES)
# Declared kinds of external runs (Fig 1 groups them with OPD / SFT / GRPO by this).
EXTERNAL_KINDS = as_arg({n: e.get("kind", "other") for n, e in config.get("external", {}).items()})
# Settings the tables and findings use (labels, score metric, paper matching); the others
# (style, dpi, formats, ...) only touch figures.
TABLE_PLOTS = as_arg({k: PLOTS[k] for k in ("labels", "metric", "paper_match") if k in PLOTS},
                     ordered=True)


rule report_captions:
    localrule: True
    output:
        directory("results/report"),
    conda:
        CONDA_ENV
    log:
        "results/logs/figures/report_captions.log",
    benchmark:
        "results/benchmarks/figures/report_captions.tsv"
    shell:
        "opdgeo captions --out {output:q} > {log:q} 2>&1"


for _figure, (_, _tables) in FIGURES.items():

    rule:
        name:
            f"figure_{_figure}"
        localrule: True
        input:
            tidy(["runs", *_tables]),
        output:
            figure_outputs(_figure),
        params:
            name=_figure,
            tables=tables_folder,
            out=lambda w, output: Path(output[0]).with_suffix(""),
            plots=as_arg(PLOTS, ordered=True),
            external=EXTERNAL_KINDS,
        conda:
            CONDA_ENV
        log:
            f"results/logs/figures/{_figure}.log",
        benchmark:
            f"results/benchmarks/figures/{_figure}.tsv"
        shell:
            "opdgeo figure {params.name} --tables {params.tables:q} --plots {params.plots}"
            " --external {params.external} --out {params.out:q} > {log:q} 2>&1"


rule paper_tables:
    localrule: True
    input:
        tidy(["runs", *paper_tables.READS]),
    output:
        [in_report(f"results/tables/{name}.csv", name, "Tables") for name in PAPER_TABLES],
        [f"results/tables/{name}.{fmt}" for name in PAPER_TABLES for fmt in ("md", "tex")],
    params:
        tables=tables_folder,
        out=lambda w, output: Path(output[0]).parent,
        plots=TABLE_PLOTS,
        external=EXTERNAL_KINDS,
    conda:
        CONDA_ENV
    log:
        "results/logs/figures/paper_tables.log",
    benchmark:
        "results/benchmarks/figures/paper_tables.tsv"
    shell:
        "opdgeo paper-tables --tables {params.tables:q} --plots {params.plots}"
        " --external {params.external} --out {params.out:q} > {log:q} 2>&1"


rule paper_rounding_null:
    localrule: True
    output:
        in_report(f"results/tables/{PAPER_NULL_TABLE}.csv", PAPER_NULL_TABLE, "Tables"),
        [f"results/tables/{PAPER_NULL_TABLE}.{fmt}" for fmt in ("md", "tex")],
    params:
        stds=config["analysis"]["paper_null_std"],
        out=lambda w, output: Path(output[0]).parent,
    conda:
        CONDA_ENV
    log:
        "results/logs/figures/paper_rounding_null.log",
    benchmark:
        "results/benchmarks/figures/paper_rounding_null.tsv"
    shell:
        "opdgeo paper-null --std {params.stds} --out {params.out:q} > {log:q} 2>&1"


rule findings:
    localrule: True
    input:
        tidy(["runs", *findings.READS]),
    output:
        csv=in_report("results/findings.csv", "findings", "Findings"),
        md="results/findings.md",
    params:
        tables=tables_folder,
        out=lambda w, output: Path(output.csv).with_suffix(""),
        plots=TABLE_PLOTS,
        external=EXTERNAL_KINDS,
    conda:
        CONDA_ENV
    log:
        "results/logs/figures/findings.log",
    benchmark:
        "results/benchmarks/figures/findings.tsv"
    shell:
        "opdgeo findings --tables {params.tables:q} --plots {params.plots}"
        " --external {params.external} --out {params.out:q} > {log:q} 2>&1"


