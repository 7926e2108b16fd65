"""Per-tensor rows -> layer / module / block / layer x module tables and the global summary.

Aggregation follows docs/study.md section 3: energies add (energy share = group ||dW||^2 /
total, relative delta = sqrt(group ||dW||^2 / group ||W_src||^2)); coordinate fractions are
averaged weighted by parameter count, which equals counting coordinates; coverages are
counted over the matrices (sum of covered updates / sum of updates), i.e. weighted by each
matrix's update count, the headline ones also given as their median over matrices;
matrix-level metrics (spectrum, projections, rotation, nulls of those) take the median over
matrices. Two runs' update-mask overlap is likewise counted over the matrices: its ratios
from the summed counts.
"""

import math

import numpy as np
import pandas as pd

from opdgeo.delta.columns import (
    DELTA_ENERGY,
    KEY_COLUMNS,
    METRICS,
    NUMEL,
    SUMMARY_ALIASES,
    metric,
    summary_name,
)
from opdgeo.naming import type_block

GROUPINGS = {
    "layers": ["layer"],
    "modules": ["module"],
    "blocks": ["block"],
    "layer_module": ["layer", "module"],
}


def aggregate(tensors: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One summary row per group of tensors (keys [] -> one row for all), each column
    aggregated as opdgeo.delta.columns declares it (an undeclared column, or an aggregation
    without a function in AGGREGATORS, is an error)."""
    frame = tensors.assign(_all=0)
    by = [frame[k] for k in keys] if keys else [frame["_all"]]
    grouped = frame.groupby(by, sort=True)
    declared = {c: metric(c).aggregation for c in frame.columns
                if c not in KEY_COLUMNS and c not in ("_all", *keys)}
    unknown = set(declared.values()) - {kind for kinds, _ in AGGREGATORS for kind in kinds}
    if unknown:
        raise ValueError(f"aggregation {', '.join(sorted(unknown))} has no function in "
                         "opdgeo.delta.grouping.AGGREGATORS: add one there")
    parts = [grouped.size().rename("tensor_count")]
    for kinds, function in AGGREGATORS:
        if function is not None:
            parts.append(function(frame, grouped, by,
                                  [c for c, a in declared.items() if a in kinds]))
    # one concat, not ~100 column insertions (which fragment the frame)
    out = add_enrichment(pd.concat(parts, axis=1))
    if not keys:
        return out.reset_index(drop=True)
    return out.rename_axis(keys).reset_index()


def is_matrix(shapes: pd.Series) -> pd.Series:
    """Which tensors (their `shape` column, "m x n") are matrices, the only tensors in the
    2-D measures: a tensor of 3+ dimensions (a convolution kernel) is none, as in the paper."""
    return shapes.astype(str).str.count("x") == 1


def _sums(frame, grouped, by, names) -> pd.DataFrame:
    return grouped[names].sum()


def _energies(frame, grouped, by, names) -> pd.DataFrame:
    """Every declared energy metric whose summed columns the tensors have (a per-tensor
    value, where present, is recomputed from the group's sums)."""
    energies = {}
    for declared in METRICS.values():
        if declared.aggregation != "energy" or not set(declared.of) - {None} <= set(frame):
            continue
        numerator, denominator = declared.of
        sums = grouped[numerator].sum()
        if denominator is None:  # a share of the whole
            total = frame[numerator].sum()
            value = sums / total if total > 0 else math.nan
        else:
            value = sums / grouped[denominator].sum()
        energies[declared.name] = np.sqrt(value) if declared.root else value
    return pd.DataFrame(energies, index=grouped.size().index)


def _maxima(frame, grouped, by, names) -> pd.DataFrame:
    return grouped[names].max()


def _weighted_means(frame, grouped, by, names) -> pd.DataFrame:
    """count: weighted by parameter count; update: over the matrices, weighted by each
    matrix's updates."""
    matrix = is_matrix(frame["shape"])
    weights = pd.DataFrame({c: _update_weight(frame, c).where(matrix, 0.0)
                            if metric(c).aggregation == "update" else frame[NUMEL]
                            for c in names}, index=frame.index)
    weights = weights.where(frame[names].notna() & (weights > 0), 0.0)
    numerators = (frame[names].fillna(0.0) * weights).groupby(by, sort=True).sum()
    denominators = weights.groupby(by, sort=True).sum()
    return numerators / denominators.where(denominators > 0)


def _medians(frame, grouped, by, names) -> pd.DataFrame:
    return grouped[names].median()


def _matrix_medians(frame, grouped, by, names) -> pd.DataFrame:
    """`<name>_median`: the median over the matrices of each pooled column that asks for it
    (`matrix_median`), each matrix counted once."""
    names = [c for c in names if metric(c).matrix_median]
    matrix = is_matrix(frame["shape"])
    return frame[names].where(matrix).groupby(by, sort=True).median() \
        .add_suffix("_median")


# How tensors combine under each aggregation of opdgeo.delta.columns.AGGREGATIONS, in the
# order of the output's columns (count and update in one pass, in the tensors' column order);
# ratio (enrichment) is recomputed from the aggregated columns by add_enrichment.
AGGREGATORS = (
    (("sum",), _sums),
    (("energy",), _energies),
    (("max",), _maxima),
    (("count", "update"), _weighted_means),
    (("median",), _medians),
    (("update",), _matrix_medians),
    (("ratio",), None),
)


def _update_weight(rows: pd.DataFrame, column: str) -> pd.Series:
    """Number of updates a coverage column is a share of (observed or exact-null)."""
    return rows[NUMEL] * (1 - rows[metric(column).unchanged])


def add_enrichment(values):
    """enrichment = coverage / mask density (1 for a mask blind to the update), for every
    coverage present.

    values: a per-tensor row (dict) or a table (DataFrame): columns behave alike."""
    enrichment = {}
    ratios = {m.coverage: m for m in METRICS.values() if m.aggregation == "ratio"}
    for column, coverage in values.items():
        if column not in ratios:
            continue
        declared = ratios[column]
        density = declared.density if isinstance(declared.density, float) \
            else values.get(declared.density, math.nan)
        enrichment[declared.name] = coverage / density
    if isinstance(values, pd.DataFrame):
        return pd.concat([values, pd.DataFrame(enrichment, index=values.index)], axis=1)
    return values | enrichment


def group_tables(tensors: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {name: aggregate(tensors.dropna(subset=keys), keys)
            for name, keys in GROUPINGS.items()}


def summary(tensors: pd.DataFrame) -> dict:
    """The global summary: counted metrics under their own names, medians as `<name>_median`."""
    overall = aggregate(tensors, []).iloc[0].to_dict()
    result: dict = {}
    for column, value in overall.items():
        name = column if column == "tensor_count" else summary_name(column)
        result[name] = _plain(value)
    result["num_params"] = int(result.pop(NUMEL))
    result["tensor_count"] = int(result["tensor_count"])
    result.pop("energy_share")
    for alias, name in SUMMARY_ALIASES.items():
        result[alias] = result.get(name, math.nan)
    shares = energy_shares(tensors, []).iloc[0]
    for prefix in ENERGY_SHARES:
        result[prefix] = {column.removeprefix(f"{prefix}/"): _plain(value)
                          for column, value in shares.items() if column.startswith(f"{prefix}/")}
    return result


# Energy shares of the summary: by block (the vision tower and its projector on their own), and
# by module type (a vision tower's MLP in FFN, as the paper's module energy table counts it).
ENERGY_SHARES = {"block_energy_share": "block", "type_energy_share": "type_block"}


def energy_shares(tensors: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Each block's and each module type's share of the delta energy, as columns
    `block_energy_share/<block>` and `type_energy_share/<block>` (opdgeo.naming.type_block);
    one row per group of `keys` (keys [] -> one row for all)."""
    types = {name: type_block(name) for name in tensors["name"].unique()}  # once per name
    frame = tensors.assign(_all=0, type_block=tensors["name"].map(types))
    by = keys or ["_all"]
    parts = []
    for prefix, column in ENERGY_SHARES.items():
        energy = frame.groupby([*by, column])[DELTA_ENERGY].sum().unstack(column, fill_value=0)
        parts.append(energy.div(energy.sum(axis=1), axis=0).add_prefix(f"{prefix}/"))
    return pd.concat(parts, axis=1)


def _plain(value):
    """JSON-safe scalars (numpy -> Python)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else math.nan


def overlap_metrics(count_a: float, count_b: float, count_both: float,
                    numel: float) -> dict[str, float]:
    """Update-mask overlap of two runs from its counts (|a|, |b|, |a AND b|, coordinates) over
    any set of matrices, pooled: opdgeo.delta.overlap defines the ratios."""
    density_a, density_b = count_a / numel, count_b / numel
    return {
        "density_a": density_a,
        "density_b": density_b,
        "coverage_a_to_b": _ratio(count_both, count_a),
        "baseline_a_to_b": density_b,
        "coverage_b_to_a": _ratio(count_both, count_b),
        "baseline_b_to_a": density_a,
        "jaccard": _ratio(count_both, count_a + count_b - count_both),
        "jaccard_baseline": _ratio(density_a * density_b,
                                   density_a + density_b - density_a * density_b),
    }
