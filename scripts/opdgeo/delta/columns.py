"""Every metric column of the delta analysis, declared once: its name, how tensors aggregate
into a layer / module / block / global row, its label, unit and display scale.

Grouping (opdgeo.delta.grouping), figures, paper tables, findings and test fixtures read this
registry; a per-tensor column that is not declared here is an error, not a silent median.
Torch-free, so that the renderers can import it. The thresholds and ratios the analysis
measures at live here too: they spell the column names.

Aggregations (docs/study.md section 3):
    sum      added over tensors (parameter count, energies)
    max      the largest value (L-infinity)
    energy   from the summed energies (relative norm, RMS, energy share)
    count    mean weighted by parameter count (equals counting coordinates)
    update   mean over the matrices (tensors of two or more dimensions, those the source
             geometry measures) weighted by the matrix's number of updated coordinates
             (`unchanged`: the column whose complement counts them): a coverage is a share of
             the updates, pooled. With `matrix_median`, also the median over the matrices
             as `<name>_median` (each matrix counts once, whatever its size)
    median   median over the tensors that have it (matrix-level metrics)
    ratio    enrichment = coverage / mask density, recomputed from the aggregated columns

To add a metric: compute it in the analysis (one more key in the per-tensor row) and declare
it below with `_add`; listed in MODULE_FIGURE it gets a panel in the per-module figure, and
any figure that names it takes its label and scale from here.
"""

from dataclasses import dataclass

HEADLINE_ATOL = 1e-5  # matches bf16 checkpoint deltas (docs/study.md section 3); also atol 0
ABSOLUTE_EPS = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
RELATIVE_TAUS = (1e-4, 1e-3, 1e-2)  # thresholds tau * RMS(W_src)
COORD_ENERGY_FRACTIONS = (0.001, 0.01, 0.05)
MASK_RATIOS = (0.01, 0.05, 0.10, 0.20)
HEADLINE_RATIO = 0.10
SPECTRAL_TOPK = (1, 2, 4, 8, 16, 32, 64)
SINGULAR_VALUE_FRACTIONS = (0.01, 0.05, 0.10)
RANK_TOLERANCES = (1e-6, 1e-5, 1e-4)  # numerical rank counts s > tol * s_1
HEADLINE_RANK_TOLERANCE = 1e-5
ROTATION_RATIO = 0.10

AGGREGATIONS = ("sum", "max", "energy", "count", "update", "median", "ratio")
KEY_COLUMNS = ("name", "layer", "module", "block", "shape")  # identify a tensor; not metrics


def threshold_label(value: float) -> str:
    """1e-05 -> '1e-5', 0 -> '0': the spelling of thresholds in column names."""
    return "0" if value == 0 else f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")


def ratio_label(ratio: float) -> str:
    """0.1 -> '10pct', 0.001 -> '0.1pct'."""
    return f"{ratio * 100:g}pct"


def coverage_suffix(atol: float) -> str:
    """Coverage columns name the headline atol (1e-5) plainly and atol 0 as `_atol_0`."""
    return "" if atol == HEADLINE_ATOL else f"_atol_{threshold_label(atol)}"


@dataclass(frozen=True)
class Metric:
    name: str
    aggregation: str  # one of AGGREGATIONS
    label: str  # what it measures, for axes and captions
    unit: str = "%"  # shown after the label; "%" for fractions shown as percent
    scale: float = 100  # display value = value * scale
    unchanged: str | None = None  # update: the share of coordinates not updated
    coverage: str | None = None  # ratio: the coverage it divides
    density: str | float | None = None  # ratio: the mask's density (a column or a number)
    matrix_median: bool = False  # update: also the median over matrices, `<name>_median`

    def axis_label(self, *notes: str) -> str:
        """`label (unit, notes...)`; a summary column of a median says so."""
        return f"{self.label} ({', '.join((self.unit, *notes))})"


METRICS: dict[str, Metric] = {}


def _add(name: str, aggregation: str, label: str, unit: str = "%", scale: float = 100,
         **fields) -> str:
    assert aggregation in AGGREGATIONS and name not in METRICS, name
    METRICS[name] = Metric(name, aggregation, label, unit, scale, **fields)
    return name


def _plain(value: float, headline: float, text: str) -> str:
    """Labels name the headline threshold or ratio only where the column name does."""
    return "" if value == headline else text


# ---- scale ----
NUMEL = _add("numel", "sum", "parameters", "count", 1)
DELTA_ENERGY = _add("delta_energy", "sum", "delta energy ‖ΔW‖²", "squared weight units", 1)
SOURCE_ENERGY = _add("source_energy", "sum", "source energy ‖W_src‖²", "squared weight units",
                     1)
RELATIVE_NORM = _add("relative_norm", "energy", "relative norm ‖ΔW‖/‖W_src‖")
RMS = _add("rms", "energy", "RMS of ΔW", "weight units", 1)
ENERGY_SHARE = _add("energy_share", "energy", "share of ‖ΔW‖²")
_add("linf", "max", "largest |ΔW|", "weight units", 1)
_add("mean_abs", "count", "mean |ΔW|", "weight units", 1)

# ---- sparsity ----
EXACT_ZERO = _add("exact_zero_fraction", "count", "unchanged coordinates, ΔW = 0")
for _eps in ABSOLUTE_EPS:
    _add(f"sparsity_atol_{threshold_label(_eps)}", "count",
         f"unchanged coordinates, |ΔW| ≤ {threshold_label(_eps)}")
for _tau in RELATIVE_TAUS:
    _add(f"sparsity_rel_{threshold_label(_tau)}", "count",
         f"unchanged coordinates, |ΔW| ≤ {threshold_label(_tau)} · RMS(W_src)")
SPARSITY = f"sparsity_atol_{threshold_label(HEADLINE_ATOL)}"
# the update count each atol's coverages are shares of: numel * (1 - unchanged)
UNCHANGED_AT = {HEADLINE_ATOL: SPARSITY, 0.0: EXACT_ZERO}
for _fraction in COORD_ENERGY_FRACTIONS:
    _add(f"coord_energy_top{ratio_label(_fraction)}", "count",
         f"share of ‖ΔW‖² in the top {ratio_label(_fraction).replace('pct', '%')} "
         "coordinates")

# ---- spectrum (matrices) ----
for _k in SPECTRAL_TOPK:
    _add(f"top{_k}_energy", "median", f"top-{_k} spectral energy")
for _fraction in SINGULAR_VALUE_FRACTIONS:
    _add(f"top{ratio_label(_fraction)}_sv_energy", "median",
         f"spectral energy of the top {ratio_label(_fraction).replace('pct', '%')} "
         "singular values")
STABLE_RANK = _add("stable_rank", "median", "stable rank", "unitless", 1)
_add("effective_rank", "median", "effective rank (entropy)", "unitless", 1)
for _tol in RANK_TOLERANCES:
    _tol_note = _plain(_tol, HEADLINE_RANK_TOLERANCE, f", s > {threshold_label(_tol)} · s₁")
    _add(f"numerical_rank_{threshold_label(_tol)}", "median", "numerical rank" + _tol_note,
         "unitless", 1)
    _add(f"numerical_rank_fraction_{threshold_label(_tol)}", "median",
         "numerical rank / min(m, n)" + _tol_note)
NUMERICAL_RANK_FRACTION = f"numerical_rank_fraction_{threshold_label(HEADLINE_RANK_TOLERANCE)}"
TOP16_ENERGY = "top16_energy"

# ---- geometry against the source's singular vectors (matrices) ----
for _ratio in MASK_RATIOS:
    _r = ratio_label(_ratio)
    _add(f"principal_projection_{_r}", "median", f"principal projection at {_r[:-3]}%")
    _add(f"principal_projection_left_{_r}", "median",
         f"left principal projection at {_r[:-3]}%")
    _add(f"principal_projection_right_{_r}", "median",
         f"right principal projection at {_r[:-3]}%")
_r = ratio_label(ROTATION_RATIO)
SUBSPACE_ROTATION = _add(f"subspace_rotation_{_r}", "median",
                         f"top-{_r[:-3]}% subspace rotation", "mean sin", 1)
_add(f"singular_value_drift_{_r}", "median", f"top-{_r[:-3]}% singular value drift",
     "relative", 1)
PRINCIPAL_PROJECTION = f"principal_projection_{ratio_label(HEADLINE_RATIO)}"


# ---- mask coverage (a share of the updated coordinates) and its enrichment ----
def _coverage(mask: str, ratio: float, null: str = "", atols=(HEADLINE_ATOL, 0.0),
              density: str | float | None = None, headline: bool = False):
    """Coverage columns of one mask (at each atol) and their enrichment (coverage / density).
    headline: the global table's coverage, pooled over every matrix's updates (docs/study.md's
    |mask AND update| / |update|, counted) and also as the median over matrices (the pooled
    value is dominated by the largest matrices: embedding, FFN)."""
    text = {"low_magnitude": "low-magnitude", "principal": "principal",
            "combined": "combined"}[mask]
    null_text = {"": "", "exact_null_": "exact rounding null: ",
                 "rounding_null_": "rounding null: "}[null]
    for atol in atols:
        suffix, r = coverage_suffix(atol), ratio_label(ratio)
        at = _plain(atol, HEADLINE_ATOL, ", updates ΔW ≠ 0")
        coverage = _add(f"{null}{mask}_coverage_{r}{suffix}", "update",
                        f"{null_text}{text} coverage at {r[:-3]}%{at}",
                        unchanged=_unchanged(null, atol),
                        matrix_median=headline and atol == HEADLINE_ATOL)
        _add(f"{null}{mask}_enrichment_{r}{suffix}", "ratio",
             f"{null_text}{text} enrichment at {r[:-3]}%{at}", "coverage / density", 1,
             coverage=coverage, density=ratio if density is None else density)


def _unchanged(null: str, atol: float) -> str:
    """The exact null's coverages are shares of the exact null's own updates."""
    if null == "exact_null_":
        return f"exact_null_sparsity_atol_{threshold_label(atol)}"
    return UNCHANGED_AT[atol]


for _ratio in MASK_RATIOS:
    _coverage("low_magnitude", _ratio, headline=_ratio == HEADLINE_RATIO)
_headline = ratio_label(HEADLINE_RATIO)
_coverage("low_magnitude", HEADLINE_RATIO, "exact_null_")
_coverage("principal", HEADLINE_RATIO, headline=True)
_coverage("principal", HEADLINE_RATIO, "exact_null_")
COMBINED_DENSITY = _add(f"combined_density_{_headline}", "count",
                        f"density of the combined mask at {_headline[:-3]}%")
_coverage("combined", HEADLINE_RATIO, density=COMBINED_DENSITY)
LOW_MAGNITUDE_COVERAGE = f"low_magnitude_coverage_{_headline}"
PRINCIPAL_COVERAGE = f"principal_coverage_{_headline}"

# ---- nulls: what chance or bf16 rounding alone gives ----
for _atol in (HEADLINE_ATOL, 0.0):
    _add(f"exact_null_sparsity_atol_{threshold_label(_atol)}", "count",
         f"exact rounding null: unchanged coordinates, |ΔW| ≤ {threshold_label(_atol)}")
_add("rounding_null_scale", "median", "rounding null: fitted update scale", "weight units", 1)
_coverage("low_magnitude", HEADLINE_RATIO, "rounding_null_", atols=(HEADLINE_ATOL,))
_coverage("principal", HEADLINE_RATIO, "rounding_null_", atols=(HEADLINE_ATOL,))
for _ratio in MASK_RATIOS:
    _r = ratio_label(_ratio)
    _add(f"isotropic_null_principal_projection_{_r}", "median",
         f"isotropic null: principal projection at {_r[:-3]}%")
SHUFFLE_NULL_KEYS = (TOP16_ENERGY, STABLE_RANK, NUMERICAL_RANK_FRACTION)
for _key in SHUFFLE_NULL_KEYS:
    _base = METRICS[_key]
    _add(f"shuffle_null_{_key}", "median", f"shuffle null: {_base.label}", _base.unit,
         _base.scale)

# The metrics the per-module appendix figure draws, one panel each, in this order.
MODULE_FIGURE = (RELATIVE_NORM, SPARSITY, TOP16_ENERGY, STABLE_RANK, NUMERICAL_RANK_FRACTION,
                 PRINCIPAL_PROJECTION, SUBSPACE_ROTATION, LOW_MAGNITUDE_COVERAGE)

# Global summary (summary.json, delta_global.csv) names: a median under `<name>_median`.
SUMMARY_ALIASES = {"numerical_rank_fraction_median": f"{NUMERICAL_RANK_FRACTION}_median"}


def summary_name(name: str) -> str:
    """The column's name in the global summary."""
    return f"{name}_median" if metric(name).aggregation == "median" else name


def median_name(name: str) -> str:
    """The column of a metric's median over matrices (a `median` metric's summary column, or
    a pooled coverage's `matrix_median`)."""
    declared = metric(name)
    assert declared.aggregation == "median" or declared.matrix_median, name
    return f"{name}_median"


def metric(column: str) -> Metric:
    """The declaration of a per-tensor or summary column; an undeclared one is an error."""
    if column in METRICS:
        return METRICS[column]
    base = SUMMARY_ALIASES.get(column, column).removesuffix("_median")
    if base in METRICS and column != base and (METRICS[base].aggregation == "median"
                                               or METRICS[base].matrix_median):
        return METRICS[base]
    raise KeyError(f"column {column!r} is not a declared metric: declare it in "
                   "opdgeo/delta/columns.py (name, aggregation, label, unit, scale)")


def axis_label(column: str, *notes: str) -> str:
    """A column's axis label: a summary median says `median`."""
    declared = metric(column)
    median = column != declared.name
    return declared.axis_label(*notes, *(("median",) if median else ()))


def flatten(summary: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a summary, nested keys joined with '/' (block_energy_share/ffn): the
    metric names of delta_global.csv and trajectory.csv."""
    flat = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "/"))
        elif isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, int | float):
            flat[name] = float(value)
    return flat
