"""The HTML report's captions, written from the constants the figures and tables draw with
(their panels' metrics, labels and units from the metric registry, their interval), so a
caption cannot say one thing while its figure shows another.

Each caption is reStructuredText (Snakemake renders it with docutils): text from the
registry goes through `rst`, which escapes what reStructuredText would read as markup.
`write_captions` writes one `<name>.rst` per figure, paper table and the findings;
workflow/rules/figures.smk makes them, and every report entry names its own.
"""

import os
from pathlib import Path

from opdgeo.delta.columns import (
    ABSOLUTE_EPS,
    HEADLINE_ATOL,
    HEADLINE_RATIO,
    RELATIVE_TAUS,
    axis_label,
    module_figure,
    threshold_label,
)
from opdgeo.figures import (
    DELTA_INTERVAL,
    FIG1_PANELS,
    FIG2_PANELS,
    FIGURES,
    GAIN_PANELS,
    INTERVAL,
    ISOTROPIC_PROJECTION,
    M1_LAGS,
    TRAJECTORY_PANELS,
    percent,
)
from opdgeo.findings import VERDICTS
from opdgeo.paper_tables import (
    GLOBAL_COLUMNS,
    OWN_BLOCKS,
    PAPER_ADAMW_STATE,
    PAPER_ENERGY_COLUMNS,
    PAPER_NULL_TABLE,
    TABLE_NAMES,
)

FINDINGS = "findings"


def rst(text: str) -> str:
    """Text as reStructuredText shows it literally: |x| would be a substitution, * emphasis."""
    for char in ("\\", "|", "*", "`"):
        text = text.replace(char, "\\" + char)
    return text


def listing(columns, *notes) -> str:
    """Metric columns as their axis labels, joined: 'a (%), b (%) and c (unitless)'."""
    labels = [rst(axis_label(column, *notes)) for column in columns]
    return ", ".join(labels[:-1]) + " and " + labels[-1] if len(labels) > 1 else labels[0]


def _figure_captions() -> dict[str, str]:
    start, mean, end = PAPER_ADAMW_STATE["m1_cosine"]
    cv = PAPER_ADAMW_STATE["m2_cv"][1]
    fig1 = listing(column for column, _ in FIG1_PANELS)
    fig2 = listing(column for column, *_ in FIG2_PANELS)
    gain = listing(column for column, _ in GAIN_PANELS)
    lags = ", ".join(rst(title) for _, title in M1_LAGS)
    ratio = percent(HEADLINE_RATIO)
    return {
        "fig1_overview": f"""**Fig 1. Overview of the final deltas.** For each run group, the delta
ΔW = W_trained − W_source of its final checkpoint: {fig1}, and the share of updated
coordinates inside the principal mask (top {ratio} of \\|U_k S_k V_kᵀ\\|) and the low-magnitude
mask (bottom {ratio} of \\|W_src\\|); the dashed line is a random {ratio} mask. SFT is the
offline-distillation control, GRPO the RLVR control; external runs sit with the kind declared
for them. Marker: mean over seeds, ticks: the seeds; bar: {DELTA_INTERVAL}.""",

        "fig2_layer_module": f"""**Fig 2. Layer x module map of one OPD run per modality**
(``plots.fig2_run`` names others). Per layer and module type (q, k, v, o, gate, up, down,
norms), as the analysis aggregates them: {fig2}. One run, so no interval.""",

        "fig3_interventions": f"""**Fig 3. Interventions.** Held-out score (``plots.metric``,
default the evaluation's primary score) over training steps; step 0 is the source model.
Left: OPD retrained from the source with only the coordinates of a mask free to move (the full
run's own update mask, \\|ΔW\\| > atol; a random mask of equal per-tensor density; another
run's mask) against full OPD (no mask), each mask's density (mean over seeds) in the legend.
Right: the same OPD setting with AdamW and with SGD. Line: mean over seeds; band: {INTERVAL}.
A panel says so when the config has no masked runs or only one optimizer.""",

        "trajectory": f"""**Trajectory of the delta over training.** For the intermediate
checkpoints' deltas to the source (against the source's one decomposition), for OPD and the SFT
and GRPO controls: {listing(TRAJECTORY_PANELS)}. The dashed line is the asymptotic principal
projection of an isotropic update ({percent(ISOTROPIC_PROJECTION)}). Line: mean over seeds;
band: {DELTA_INTERVAL}.""",

        "optimizer_state": f"""**AdamW state diagnostics.** Cosine between the first moment m_t
and a reference, over all parameters, one panel per reference: {lags}
(with beta1 = 0.9 the step before stays near 0.9 or above whatever the gradients do). Dashed:
the paper's curve, from its start (~{start}) to its end (~{end}); dotted: its mean over the run
({mean}); the paper does not say its lag. Last panel: coefficient of variation (std / mean) of
the second moment v_t over coordinates, the paper's mean ({cv}) dash-dotted. Line: mean over
seeds; band: {DELTA_INTERVAL}. References only; SGD runs have no such state.""",

        "appendix_sparsity_thresholds": f"""**Appendix: sparsity at every threshold.** Share of
coordinates with \\|ΔW\\| at or below an absolute threshold ε in
{{{', '.join(threshold_label(eps) for eps in ABSOLUTE_EPS)}}} (left) and a relative threshold
τ · RMS(W_src) of each tensor, τ in {{{', '.join(threshold_label(t) for t in RELATIVE_TAUS)}}}
(right), final checkpoints. Mean over seeds; band: {DELTA_INTERVAL}.""",

        "appendix_module_metrics": f"""**Appendix: metrics per module type.** Per module type,
aggregated over layers as the analysis does (energies add, coordinate fractions weighted by
size, coverages pooled over matrices, matrix metrics as medians), one panel each:
{listing(module_figure())}. Bar: mean over seeds; whisker: {DELTA_INTERVAL}.""",

        "gain_vs_sparsity": f"""**Matched-gain comparison.** For the learning-rate x steps grid
of ``pairs.<pair>.sweep`` (and the main OPD / SFT / GRPO runs of the same teacher and
optimizer), the gain in held-out score over the source (final − source, in points) against
the final delta's {gain} (one panel each), one curve per method. At equal
gain, a method further right on the sparsity panel leaves more coordinates unchanged. Mean
over seeds; bars: {INTERVAL}.""",
    }


def _table_captions() -> dict[str, str]:
    headers = ", ".join(rst(header) for _, header in GLOBAL_COLUMNS)
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
coverage at {percent(HEADLINE_RATIO)} the paper reports, and the coverage that bf16 rounding alone
predicts at that sparsity (the parametric rounding null: update magnitudes half-normal and
independent of the weights, one scale fitted over the model to the reported sparsity). The
weights are Gaussian, N(0, std²) for every tensor of the run's source model (shapes built from
its config), with the bf16 histogram computed in closed form; one row per weight std
(``analysis.paper_null_std``). ``reported - null`` is what the null leaves for the objective to
explain. With one std for every tensor, the null does not depend on the shapes; it depends on
the std, and real weights are not Gaussian: a first look, not a result.""",
    }


def _findings_caption() -> str:
    return f"""**Findings F1-F8.** Each of the paper's findings (docs/study.md section 6)
checked on each relevant run group: the observed value with its 95% interval and what it is
over, the claim's threshold, the null model's prediction (bf16 rounding, isotropic or shuffled
update, random mask), the matched SFT and GRPO controls, the paper's value, and the verdict
({' / '.join(VERDICTS)}). Thresholds are constants in ``opdgeo.findings``;
results/findings.md has the same table per finding."""


def captions() -> dict[str, str]:
    """Report entry -> its caption: every figure, paper table and the findings."""
    return {**_figure_captions(), **_table_captions(), FINDINGS: _findings_caption()}


def caption_names() -> list[str]:
    """The report entries with a caption, known without rendering them."""
    return [*FIGURES, *TABLE_NAMES, PAPER_NULL_TABLE, FINDINGS]


def write_captions(out: Path) -> list[Path]:
    """One `<name>.rst` per report entry in `out` (each written beside, then renamed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in captions().items():
        path = out / f"{name}.rst"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths
