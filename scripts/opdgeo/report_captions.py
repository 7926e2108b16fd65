"""The HTML report's captions: one reStructuredText file per figure, paper table and the
findings, each written from the constants its figure or table draws with (panels' metrics,
labels and units from the metric registry, the interval), so a caption cannot say one thing
while its figure shows another. `write_captions` writes them (rule report_captions); every
report entry names its own.
"""

from pathlib import Path

from opdgeo.captions import listing, rst, table_captions
from opdgeo.delta.columns import (
    ABSOLUTE_EPS,
    HEADLINE_RATIO,
    RELATIVE_TAUS,
    module_figure,
    threshold_label,
)
from opdgeo.figures import FIGURES
from opdgeo.figures.adamw_state import M1_LAGS
from opdgeo.figures.bands import DELTA_INTERVAL, INTERVAL
from opdgeo.figures.delta_trajectory import ISOTROPIC_PROJECTION, TRAJECTORY_PANELS
from opdgeo.figures.matched_gain import GAIN_PANELS
from opdgeo.figures.modules import FIG2_PANELS
from opdgeo.figures.overview import FIG1_PANELS
from opdgeo.figures.style import percent
from opdgeo.files import atomic
from opdgeo.findings import VERDICTS
from opdgeo.paper_tables import PAPER_ADAMW_STATE, PAPER_NULL_TABLE, TABLE_NAMES

FINDINGS = "findings"


def figure_captions() -> dict[str, str]:
    """Figure -> its caption."""
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

        "optimizer_state": f"""**AdamW state diagnostics.** One row of panels per pair, its
own run groups over its own steps. Cosine between the first moment m_t and a reference, over
all parameters, one panel per reference: {lags}
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


def _findings_caption() -> str:
    return f"""**Findings F1-F8.** Each of the paper's findings (docs/study.md section 6)
checked on each relevant run group: the observed value with its 95% interval and what it is
over, the claim's threshold, the null model's prediction (bf16 rounding, isotropic or shuffled
update, random mask), the matched SFT and GRPO controls, the paper's value, and the verdict
({' / '.join(VERDICTS)}). Thresholds are constants in ``opdgeo.findings``;
results/findings.md has the same table per finding."""


def captions() -> dict[str, str]:
    """Report entry -> its caption: every figure, paper table and the findings."""
    return {**figure_captions(), **table_captions(), FINDINGS: _findings_caption()}


def caption_names() -> list[str]:
    """The report entries with a caption, known without rendering them."""
    return [*FIGURES, *TABLE_NAMES, PAPER_NULL_TABLE, FINDINGS]


def write_captions(out: Path) -> list[Path]:
    """One `<name>.rst` per report entry in `out` (each written beside, then renamed)."""
    out = Path(out)
    paths = []
    for name, text in captions().items():
        path = out / f"{name}.rst"
        with atomic(path, "captions.write") as tmp:
            tmp.write_text(text + "\n")
        paths.append(path)
    return paths
