"""reStructuredText for the report's captions, and the paper tables' captions (the LaTeX
tables' too), written from the constants the tables are built with.

Snakemake renders a caption with docutils: text from the metric registry goes through `rst`,
which escapes what reStructuredText would read as markup. The figures' and the findings'
captions, and the files the report reads, are in opdgeo.report_captions.
"""

from opdgeo.delta.columns import HEADLINE_ATOL, HEADLINE_RATIO, axis_label, threshold_label
from opdgeo.paper_tables import (
    GLOBAL_COLUMNS,
    OWN_BLOCKS,
    PAPER_ENERGY_COLUMNS,
    PAPER_NULL_TABLE,
    display_header,
)


def rst(text: str) -> str:
    """Text as reStructuredText shows it literally: |x| would be a substitution, * emphasis."""
    for char in ("\\", "|", "*", "`"):
        text = text.replace(char, "\\" + char)
    return text


def listing(columns, *notes) -> str:
    """Metric columns as their axis labels, joined: 'a (%), b (%) and c (unitless)'."""
    labels = [rst(axis_label(column, *notes)) for column in columns]
    return ", ".join(labels[:-1]) + " and " + labels[-1] if len(labels) > 1 else labels[0]


def table_captions() -> dict[str, str]:
    """Paper table -> its caption."""
    headers = ", ".join(rst(display_header(header)) for _, header in GLOBAL_COLUMNS)
    atol = threshold_label(HEADLINE_ATOL)
    return {
        "table_global_delta": f"""**Table: global delta.** Per run group (a run over its seeds),
the columns of the paper's table ({headers}), then the two coverages' median over matrices,
then the null models the analysis computed (rounding, isotropic, shuffle), then, in columns
marked ``paper:``, the values the paper reports for its corresponding run (see ``paper run``).
Each of ours is the mean over the group's seeds with its 95% interval (``interval``: t over
``seeds``; with one seed, the percentile bootstrap over the run's matrices, its tensors
resampled and the column recomputed as the analysis aggregates it: how the value varies
between matrices, not between seeds). The paper's runs are 1.5-4B-parameter models; ours are
the study's own runs. Markdown and LaTeX copies sit beside the CSV in results/tables/.

Coverages are measured over the weight matrices. The headline coverage, our reading of the
paper's column and the one findings F7 and F8 read, is pooled: covered updates over all
updates of every matrix (docs/study.md's \\|mask AND update\\| / \\|update\\|, counted), so the
largest matrices (embedding, FFN) weigh most; the median over matrices counts each matrix
once.""",

        "table_module_energy": f"""**Table: module energy share.** Share of ‖ΔW‖² per module
type ({', '.join(PAPER_ENERGY_COLUMNS)}, and norm) in % per run group, the mean over seeds with
its 95% interval (t over seeds; with one seed, the bootstrap over the run's matrices, as in
the global delta table), and in ``paper:`` columns the paper's shares for its corresponding
run. A vision-language model's tower is counted by module type, as the paper's table (which
has no vision column) must count it: the tower's MLP in FFN, its attention in attention, its
norms in norm, its patch embedding and projector in other (our reading of the paper,
docs/study.md section 7). The {' and '.join(OWN_BLOCKS)} blocks are also shown on their own,
whose shares are already inside the type columns.""",

        "table_mask_overlap": f"""**Table: mask overlap.** For two runs on one source, the
share of run a's updated coordinates (\\|ΔW\\| > {atol}) that run b also updated, against the
random baseline (run b's density), their ratio (enrichment; 1 = chance), and the Jaccard index
with its independence baseline. One row per pair of run groups and direction: the mean over
the seeds both groups share (an external run pairs with every seed) with its 95% t-interval;
a pair with one seed: its pooled value with the 95% percentile bootstrap over its matrices
(each resample's ratios from its summed per-matrix mask counts).""",

        "table_interventions": """**Table: interventions.** Masked retraining (arm ``full`` is
the unmasked OPD run) and the optimizer ablation: peak, final and late-average score (mean
over the last quarter of the run's evaluations) in %, mean over seeds with its 95% interval,
with the mask density; the source's score for reference; the paper's values in ``paper:``
columns (AIME mean@16 on DS-Qwen).""",

        "table_evaluation_summary": """**Table: evaluation summary.** Per run and metric: the
source's score, the run's peak, final and late-average score and its gain (final − source),
in %; base models with their score.""",

        PAPER_NULL_TABLE: f"""**Table: the rounding null on the paper's own sparsities.** For
each run of the paper's global delta table: the sparsity at {atol} and the low-magnitude
coverage at {HEADLINE_RATIO:.0%} the paper reports, and the coverage that bf16 rounding alone
predicts at that sparsity (the parametric rounding null: update magnitudes half-normal and
independent of the weights, one scale fitted over the model to the reported sparsity). The
weights are Gaussian, N(0, std²) for every tensor of the run's source model (shapes built from
its config), with the bf16 histogram computed in closed form; one row per weight std
(``analysis.paper_null_std``). ``reported - null`` is what the null leaves for the objective to
explain. With one std for every tensor, the null does not depend on the shapes; it depends on
the std, and real weights are not Gaussian: a first look, not a result.""",
    }


