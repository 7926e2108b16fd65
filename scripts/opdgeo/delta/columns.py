"""Every metric column of the delta analysis, declared once: its name, how tensors aggregate
into a layer / module / block / global row, its label, unit and display scale.

Grouping (opdgeo.delta.grouping), figures, paper tables, findings and test fixtures read this
registry; a per-tensor column that is not declared here is an error, not a silent median.
Torch-free, so that the renderers can import it. The thresholds and ratios the analysis
measures at live here too: they spell the column names.

Aggregations (docs/study.md section 3), each a function in opdgeo.delta.grouping:
    sum      added over tensors (parameter count, energies)
    max      the largest value (L-infinity)
    energy   the ratio of two summed columns (`of`), its square root with `root` (relative
             norm, RMS, energy share: a share's denominator is the whole model's sum)
    count    mean weighted by parameter count (equals counting coordinates)
    update   mean over the matrices (tensors of two or more dimensions, those the source
             geometry measures) weighted by the matrix's number of updated coordinates
             (`unchanged`: the column whose complement counts them): a coverage is a share of
             the updates, pooled. With `matrix_median`, also the median over the matrices
             as `<name>_median` (each matrix counts once, whatever its size)
    median   median over the tensors that have it (matrix-level metrics)
    ratio    enrichment = coverage / mask density, recomputed from the aggregated columns

To add a metric: compute it in the analysis (one more key in the per-tensor row, or a
`compute` function given here) and declare it below with `declare`; with `panel=True` it gets
a panel in the per-module figure (`module_figure()`), and any figure that names it takes its
label and scale from here.
"""

from collections.abc import Callable
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
    # energy: (numerator, denominator) summed columns; denominator None: the numerator's sum
    # over every tensor (a share of the whole)
    of: tuple[str, str | None] | None = None
    root: bool = False  # energy: the square root of the ratio
    panel: bool = False  # drawn in the per-module figure (module_figure())
    # computed by the analysis from (source, trained), both in the analysis dtype, for a
    # metric no analysis module computes (a metric declared by an extension)
    compute: Callable | None = None

    def axis_label(self, *notes: str) -> str:
        """`label (unit, notes...)`; a summary column of a median says so."""
        return f"{self.label} ({', '.join((self.unit, *notes))})"


METRICS: dict[str, Metric] = {}


def declare(name: str, aggregation: str, label: str, unit: str = "%", scale: float = 100,
            **fields) -> str:
    """Declare a metric column; returns its name."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"metric {name!r}: aggregation {aggregation!r} is not one of "
                         f"{', '.join(AGGREGATIONS)}")
    if name in METRICS:
        raise ValueError(f"metric {name!r} is declared twice")
    declared = Metric(name, aggregation, label, unit, scale, **fields)
    if aggregation == "energy" and (declared.of is None or any(
            METRICS.get(c) is None or METRICS[c].aggregation != "sum"
            for c in declared.of if c is not None)):
        raise ValueError(f"energy metric {name!r} needs `of`: two declared `sum` columns "
                         "(numerator, denominator or None for the whole model's sum)")
    METRICS[name] = declared
    return name


def _plain(value: float, headline: float, text: str) -> str:
    """Labels name the headline threshold or ratio only where the column name does."""
    return "" if value == headline else text


# ---- column names, each spelled here only (the analysis names its row's keys with these) ----
def sparsity_name(eps: float) -> str:
    return f"sparsity_atol_{threshold_label(eps)}"


def relative_sparsity_name(tau: float) -> str:
    return f"sparsity_rel_{threshold_label(tau)}"


def coord_energy_name(fraction: float) -> str:
    return f"coord_energy_top{ratio_label(fraction)}"


def top_energy_name(k: int) -> str:
    return f"top{k}_energy"


def sv_energy_name(fraction: float) -> str:
    return f"top{ratio_label(fraction)}_sv_energy"


def numerical_rank_name(tol: float) -> str:
    return f"numerical_rank_{threshold_label(tol)}"


def rank_fraction_name(tol: float) -> str:
    return f"numerical_rank_fraction_{threshold_label(tol)}"


def projection_name(ratio: float, side: str = "") -> str:
    """side "": the joint projection; "left" or "right": one-sided."""
    return f"principal_projection_{side + '_' if side else ''}{ratio_label(ratio)}"


def coverage_name(mask: str, ratio: float, atol: float = HEADLINE_ATOL, null: str = "") -> str:
    """mask: low_magnitude | principal | combined; null: "" or a null's kind (exact, rounding)."""
    return null_name(null, f"{mask}_coverage_{ratio_label(ratio)}{coverage_suffix(atol)}")


def enrichment_name(mask: str, ratio: float, atol: float = HEADLINE_ATOL, null: str = "") -> str:
    return null_name(null, f"{mask}_enrichment_{ratio_label(ratio)}{coverage_suffix(atol)}")


def null_name(kind: str, column: str) -> str:
    """A null's column for `column`: kind exact | rounding | isotropic | shuffle ("": the
    observed column itself)."""
    return f"{kind}_null_{column}" if kind else column


# ---- scale ----
NUMEL = declare("numel", "sum", "parameters", "count", 1)
DELTA_ENERGY = declare("delta_energy", "sum", "delta energy ‖ΔW‖²", "squared weight units", 1)
SOURCE_ENERGY = declare("source_energy", "sum", "source energy ‖W_src‖²",
                        "squared weight units", 1)
ENERGY_SHARE = declare("energy_share", "energy", "share of ‖ΔW‖²", of=(DELTA_ENERGY, None))
RELATIVE_NORM = declare("relative_norm", "energy", "relative norm ‖ΔW‖/‖W_src‖",
                        of=(DELTA_ENERGY, SOURCE_ENERGY), root=True, panel=True)
RMS = declare("rms", "energy", "RMS of ΔW", "weight units", 1, of=(DELTA_ENERGY, NUMEL),
              root=True)
LINF = declare("linf", "max", "largest |ΔW|", "weight units", 1)
MEAN_ABS = declare("mean_abs", "count", "mean |ΔW|", "weight units", 1)

# ---- sparsity ----
EXACT_ZERO = declare("exact_zero_fraction", "count", "unchanged coordinates, ΔW = 0")
for _eps in ABSOLUTE_EPS:
    declare(sparsity_name(_eps), "count",
            f"unchanged coordinates, |ΔW| ≤ {threshold_label(_eps)}", panel=_eps == HEADLINE_ATOL)
for _tau in RELATIVE_TAUS:
    declare(relative_sparsity_name(_tau), "count",
            f"unchanged coordinates, |ΔW| ≤ {threshold_label(_tau)} · RMS(W_src)")
SPARSITY = sparsity_name(HEADLINE_ATOL)
# the update count each atol's coverages are shares of: numel * (1 - unchanged)
UNCHANGED_AT = {HEADLINE_ATOL: SPARSITY, 0.0: EXACT_ZERO}
for _fraction in COORD_ENERGY_FRACTIONS:
    declare(coord_energy_name(_fraction), "count",
            f"share of ‖ΔW‖² in the top {ratio_label(_fraction).replace('pct', '%')} "
            "coordinates")

# ---- spectrum (matrices) ----
TOP16_ENERGY = top_energy_name(16)
for _k in SPECTRAL_TOPK:
    declare(top_energy_name(_k), "median", f"top-{_k} spectral energy",
            panel=top_energy_name(_k) == TOP16_ENERGY)
for _fraction in SINGULAR_VALUE_FRACTIONS:
    declare(sv_energy_name(_fraction), "median",
            f"spectral energy of the top {ratio_label(_fraction).replace('pct', '%')} "
            "singular values")
STABLE_RANK = declare("stable_rank", "median", "stable rank", "unitless", 1, panel=True)
EFFECTIVE_RANK = declare("effective_rank", "median", "effective rank (entropy)", "unitless", 1)
for _tol in RANK_TOLERANCES:
    _tol_note = _plain(_tol, HEADLINE_RANK_TOLERANCE, f", s > {threshold_label(_tol)} · s₁")
    declare(numerical_rank_name(_tol), "median", "numerical rank" + _tol_note, "unitless", 1)
    declare(rank_fraction_name(_tol), "median", "numerical rank / min(m, n)" + _tol_note,
            panel=_tol == HEADLINE_RANK_TOLERANCE)
NUMERICAL_RANK_FRACTION = rank_fraction_name(HEADLINE_RANK_TOLERANCE)

# ---- geometry against the source's singular vectors (matrices) ----
PROJECTION_SIDES = ("", "left", "right")
for _ratio in MASK_RATIOS:
    for _side in PROJECTION_SIDES:
        _text = f"principal projection at {ratio_label(_ratio)[:-3]}%"
        declare(projection_name(_ratio, _side), "median", f"{_side} {_text}".lstrip(),
                panel=_ratio == HEADLINE_RATIO and not _side)
PRINCIPAL_PROJECTION = projection_name(HEADLINE_RATIO)
_r = ratio_label(ROTATION_RATIO)
SUBSPACE_ROTATION = declare(f"subspace_rotation_{_r}", "median",
                            f"top-{_r[:-3]}% subspace rotation", "mean sin", 1, panel=True)
SINGULAR_VALUE_DRIFT = declare(f"singular_value_drift_{_r}", "median",
                               f"top-{_r[:-3]}% singular value drift", "relative", 1)


# ---- mask coverage (a share of the updated coordinates) and its enrichment ----
MASKS = {"low_magnitude": "low-magnitude", "principal": "principal", "combined": "combined"}
NULLS = {"": "", "exact": "exact rounding null: ", "rounding": "rounding null: ",
         "isotropic": "isotropic null: ", "shuffle": "shuffle null: "}


def _coverage(mask: str, ratio: float, null: str = "", atols=(HEADLINE_ATOL, 0.0),
              density: str | float | None = None, headline: bool = False,
              panel: bool = False):
    """Coverage columns of one mask (at each atol) and their enrichment (coverage / density).
    headline: the global table's coverage, pooled over every matrix's updates (docs/study.md's
    |mask AND update| / |update|, counted) and also as the median over matrices (the pooled
    value is dominated by the largest matrices: embedding, FFN)."""
    for atol in atols:
        r = ratio_label(ratio)
        at = _plain(atol, HEADLINE_ATOL, ", updates ΔW ≠ 0")
        coverage = declare(coverage_name(mask, ratio, atol, null), "update",
                           f"{NULLS[null]}{MASKS[mask]} coverage at {r[:-3]}%{at}",
                           unchanged=_unchanged(null, atol),
                           matrix_median=headline and atol == HEADLINE_ATOL,
                           panel=panel and atol == HEADLINE_ATOL)
        declare(enrichment_name(mask, ratio, atol, null), "ratio",
                f"{NULLS[null]}{MASKS[mask]} enrichment at {r[:-3]}%{at}", "coverage / density",
                1, coverage=coverage, density=ratio if density is None else density)


def exact_null_sparsity_name(atol: float) -> str:
    return null_name("exact", sparsity_name(atol))


def _unchanged(null: str, atol: float) -> str:
    """The exact null's coverages are shares of the exact null's own updates."""
    return exact_null_sparsity_name(atol) if null == "exact" else UNCHANGED_AT[atol]


for _ratio in MASK_RATIOS:
    _coverage("low_magnitude", _ratio, headline=_ratio == HEADLINE_RATIO,
              panel=_ratio == HEADLINE_RATIO)
_coverage("low_magnitude", HEADLINE_RATIO, "exact")
_coverage("principal", HEADLINE_RATIO, headline=True)
_coverage("principal", HEADLINE_RATIO, "exact")
_headline = ratio_label(HEADLINE_RATIO)
COMBINED_DENSITY = declare(f"combined_density_{_headline}", "count",
                           f"density of the combined mask at {_headline[:-3]}%")
_coverage("combined", HEADLINE_RATIO, density=COMBINED_DENSITY)
LOW_MAGNITUDE_COVERAGE = coverage_name("low_magnitude", HEADLINE_RATIO)
PRINCIPAL_COVERAGE = coverage_name("principal", HEADLINE_RATIO)

# ---- nulls: what chance or bf16 rounding alone gives ----
for _atol in (HEADLINE_ATOL, 0.0):
    declare(exact_null_sparsity_name(_atol), "count",
            f"exact rounding null: unchanged coordinates, |ΔW| ≤ {threshold_label(_atol)}")
ROUNDING_NULL_SCALE = declare("rounding_null_scale", "median",
                              "rounding null: fitted update scale", "weight units", 1)
_coverage("low_magnitude", HEADLINE_RATIO, "rounding", atols=(HEADLINE_ATOL,))
_coverage("principal", HEADLINE_RATIO, "rounding", atols=(HEADLINE_ATOL,))
for _ratio in MASK_RATIOS:
    declare(null_name("isotropic", projection_name(_ratio)), "median",
            f"isotropic null: principal projection at {ratio_label(_ratio)[:-3]}%")
SHUFFLE_NULL_KEYS = (TOP16_ENERGY, STABLE_RANK, NUMERICAL_RANK_FRACTION)
for _key in SHUFFLE_NULL_KEYS:
    _base = METRICS[_key]
    declare(null_name("shuffle", _key), "median", f"shuffle null: {_base.label}", _base.unit,
            _base.scale)


def module_figure() -> tuple[str, ...]:
    """The metrics the per-module appendix figure draws, one panel each, in declaration order
    (those declared with panel=True)."""
    return tuple(name for name, declared in METRICS.items() if declared.panel)


# The analysis's headline measures: printed by `opdgeo analyze`, listed in every model card
# (each under its summary_name).
HEADLINE = (RELATIVE_NORM, SPARSITY, TOP16_ENERGY, PRINCIPAL_COVERAGE, LOW_MAGNITUDE_COVERAGE)
# summary.md's rows (under their summary_name), in order; a null after its measure.
SUMMARY_ROWS = (
    RELATIVE_NORM, SPARSITY, EXACT_ZERO, TOP16_ENERGY, STABLE_RANK, NUMERICAL_RANK_FRACTION,
    PRINCIPAL_PROJECTION, null_name("isotropic", PRINCIPAL_PROJECTION),
    PRINCIPAL_COVERAGE, null_name("rounding", PRINCIPAL_COVERAGE),
    LOW_MAGNITUDE_COVERAGE, null_name("rounding", LOW_MAGNITUDE_COVERAGE),
    null_name("exact", LOW_MAGNITUDE_COVERAGE), SUBSPACE_ROTATION,
)

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


def markdown_row(column: str, value: float | None, digits: int = 4) -> str:
    """`| label (unit) | value |` for a summary column, the value in its display unit (a |
    in the label escaped: it would end the cell)."""
    number = "n/a" if value is None else f"{value * metric(column).scale:.{digits}g}"
    label = axis_label(column).replace("|", "\\|")
    return f"| {label} | {number} |"


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
