"""Per-tensor rows -> layer / module / block / layer x module tables and the global summary.

Aggregation follows STUDY.md section 3: energies add (energy share = group ||dW||^2 / total,
relative delta = sqrt(group ||dW||^2 / group ||W_src||^2)); coordinate fractions are
averaged weighted by parameter count, which equals counting coordinates; coverages are
counted (sum of covered updates / sum of updates), i.e. weighted by each tensor's update
count; matrix-level metrics (spectrum, projections, rotation, nulls of those) take the
median over matrices.
"""

import math

import numpy as np
import pandas as pd
from opdgeo.delta.metrics import HEADLINE_ATOL, MASK_RATIOS, ratio_label, threshold_label

KEY_COLUMNS = ("name", "layer", "module", "block", "shape")
GROUPINGS = {
    "layers": ["layer"],
    "modules": ["module"],
    "blocks": ["block"],
    "layer_module": ["layer", "module"],
}
_COUNT_WEIGHTED_PREFIXES = ("sparsity_", "exact_zero_fraction", "coord_energy_top",
                            "exact_null_sparsity_", "combined_density_", "mean_abs")
_UPDATED_AT = {HEADLINE_ATOL: "sparsity_atol_" + threshold_label(HEADLINE_ATOL),
               0.0: "exact_zero_fraction"}


def _coverage_weight(rows: pd.DataFrame, column: str) -> pd.Series:
    """Number of updates a coverage column is a share of (observed or exact-null)."""
    atol = 0.0 if column.endswith("_atol_0") else HEADLINE_ATOL
    unchanged = _UPDATED_AT[atol]
    if column.startswith("exact_null_"):
        unchanged = f"exact_null_sparsity_atol_{threshold_label(atol)}"
    return rows["numel"] * (1 - rows[unchanged])


def _weighted_mean(values: pd.Series, weights: pd.Series) -> float:
    keep = values.notna() & (weights > 0)
    total = weights[keep].sum()
    return float((values[keep] * weights[keep]).sum() / total) if total > 0 else math.nan


def aggregate(rows: pd.DataFrame, total_delta_energy: float) -> dict[str, float]:
    """One summary row for a group of tensors."""
    delta_energy, source_energy = rows["delta_energy"].sum(), rows["source_energy"].sum()
    numel = rows["numel"].sum()
    out = {
        "tensor_count": len(rows),
        "numel": int(numel),
        "delta_energy": float(delta_energy),
        "source_energy": float(source_energy),
        "energy_share": float(delta_energy / total_delta_energy) if total_delta_energy > 0
        else math.nan,
        "relative_norm": math.sqrt(delta_energy / source_energy) if source_energy > 0
        else math.nan,
        "rms": math.sqrt(delta_energy / numel),
        "linf": float(rows["linf"].max()),
    }
    for column in rows.columns:
        if column in out or column in KEY_COLUMNS or column in ("numel", "relative_norm"):
            continue
        if "_coverage_" in column:
            out[column] = _weighted_mean(rows[column], _coverage_weight(rows, column))
        elif column.startswith(_COUNT_WEIGHTED_PREFIXES):
            out[column] = _weighted_mean(rows[column], rows["numel"])
        else:
            out[column] = float(rows[column].median()) if rows[column].notna().any() \
                else math.nan
    return add_enrichment(out)


def add_enrichment(values: dict[str, float]) -> dict[str, float]:
    """enrichment = coverage / mask density (1 for a mask blind to the update)."""
    for column, coverage in list(values.items()):
        if "_coverage_" not in column:
            continue
        ratio = next(r for r in MASK_RATIOS if f"_{ratio_label(r)}" in column)
        density = values.get(f"combined_density_{ratio_label(ratio)}", math.nan) \
            if column.startswith("combined_") else ratio
        values[column.replace("_coverage_", "_enrichment_")] = coverage / density
    return values


def group_tables(tensors: pd.DataFrame) -> dict[str, pd.DataFrame]:
    total = float(tensors["delta_energy"].sum())
    tables = {}
    for table_name, keys in GROUPINGS.items():
        grouped = tensors.dropna(subset=keys).groupby(keys, sort=True)
        rows = [dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
                | aggregate(group, total) for key, group in grouped]
        tables[table_name] = pd.DataFrame(rows)
    return tables


def summary(tensors: pd.DataFrame) -> dict:
    """The global summary: counted metrics under their own names, medians as `<name>_median`."""
    overall = aggregate(tensors, float(tensors["delta_energy"].sum()))
    result: dict = {}
    for column, value in overall.items():
        is_median = not (
            "_coverage_" in column or "_enrichment_" in column
            or column.startswith(_COUNT_WEIGHTED_PREFIXES)
            or column in ("tensor_count", "numel", "delta_energy", "source_energy",
                          "energy_share", "relative_norm", "rms", "linf")
        )
        result[f"{column}_median" if is_median else column] = _plain(value)
    result["num_params"] = result.pop("numel")
    result.pop("energy_share")
    result["numerical_rank_fraction_median"] = result.get(
        "numerical_rank_fraction_1e-5_median", math.nan)
    result["block_energy_share"] = _shares(tensors, "block")
    return result


def _shares(tensors: pd.DataFrame, key: str) -> dict[str, float]:
    energy = tensors.groupby(key)["delta_energy"].sum()
    total = energy.sum()
    return {name: _plain(value / total) if total > 0 else math.nan
            for name, value in energy.items()}


def _plain(value):
    """JSON-safe scalars (numpy -> Python)."""
    if isinstance(value, np.generic):
        return value.item()
    return value
