"""Delta measures the findings read beyond delta_global's metrics, recomputed from
per-tensor rows: F1's ratio of relative norms, F3's energy spread and FFN lead, the matrix
ratios of F6 and F7. Each works per resample of a run's tensors
(opdgeo.intervals.tensor_bootstrap)."""

import math

import pandas as pd

from opdgeo.delta.columns import (
    DELTA_ENERGY,
    NUMEL,
    PRINCIPAL_PROJECTION,
    RELATIVE_NORM,
    TOP16_ENERGY,
    null_name,
)
from opdgeo.intervals import delta_summary

NAN = math.nan

# Delta measures beyond delta_global's metrics, recomputed from per-tensor rows (delta_measures)
F1_RATIO, TOP16_RATIO, PROJECTION_RATIO = "f1_ratio", "top16_ratio", "projection_ratio"
SPREAD = {"layer": "spread_layer", "block": "spread_block", "ffn": "spread_ffn"}
# F3: the FFN's energy share minus the largest other block's, by module type (the paper's
# module energy table: a vision tower's MLP in FFN)
FFN_LEAD, TYPE_SHARE = "ffn_lead", "type_energy_share/"


def ffn_lead(values: pd.DataFrame) -> pd.Series:
    """Per row of `values` (type_energy_share/<block> columns): the FFN's share minus the
    largest of the other blocks' (NaN without an FFN share)."""
    shares = values[[c for c in values.columns if c.startswith(TYPE_SHARE)]]
    ffn = f"{TYPE_SHARE}ffn"
    if ffn not in shares:
        return pd.Series(NAN, index=values.index)
    others = shares.drop(columns=ffn)
    return shares[ffn] - (others.max(axis=1, skipna=True) if others.shape[1] else 0.0)


def delta_measures(rows: pd.DataFrame, run: str, comparator: str | None) -> pd.DataFrame:
    """Every delta measure the findings read, per resample of the run's tensors (rows with a
    `resample` column; opdgeo.intervals.tensor_bootstrap): delta_global's metrics as the analysis
    aggregates them, the energy spread of F3, the matrix ratios of F6 and F7, and F1's ratio
    of relative norms to the comparator's (its rows among `rows`, drawn by the same tensor
    names)."""
    summary = delta_summary(rows)
    own = rows[rows["run"] == run]
    out = summary.xs(run, level="run").copy()
    out[F1_RATIO] = out[RELATIVE_NORM] / summary.xs(comparator, level="run")[RELATIVE_NORM] \
        if comparator in set(rows["run"]) else NAN
    out[TOP16_RATIO] = matrix_ratio(own, TOP16_ENERGY, null_name("shuffle", TOP16_ENERGY))
    out[PROJECTION_RATIO] = matrix_ratio(own, PRINCIPAL_PROJECTION,
                                         null_name("isotropic", PRINCIPAL_PROJECTION))
    out[FFN_LEAD] = ffn_lead(out)
    return out.join(energy_spread(own).rename(columns=SPREAD))


def matrix_ratio(rows: pd.DataFrame, observed: str, null: str) -> pd.Series:
    """Per resample (rows: tensor rows with a `resample` column): the mean over matrices of
    `observed`, over the mean of each matrix's own null; 1 for a delta that is its own null.
    (A median of per-matrix ratios would carry the noise of one null draw per matrix, and a
    chi-square median's bias below its mean.)"""
    if not {observed, null} <= set(rows.columns):
        return pd.Series(dtype=float)
    means = rows.dropna(subset=[observed, null]).groupby("resample")[[observed, null]].mean()
    return means[observed] / means[null]


# Blocks of the repeated layers: their energy is compared with their parameter share (the
# embedding moves only in the rows of the tokens a task uses, and norms are tiny).
LAYER_BLOCKS = ("attention", "ffn")


def energy_spread(rows: pd.DataFrame) -> pd.DataFrame:
    """Per resample (rows: tensor rows with a `resample` column): energy share / parameter
    share of the least-moved layer and least-moved block (attention, FFN), and of the FFN
    block; over the tensors of those blocks only."""
    rows = rows[rows["block"].isin(LAYER_BLOCKS)]
    names = ["layer", "block", "ffn"]
    if rows.empty:
        return pd.DataFrame(columns=names, dtype=float)

    def ratios(key):
        sums = rows.groupby(["resample", key])[[DELTA_ENERGY, NUMEL]].sum()
        totals = sums.groupby(level="resample").transform("sum")
        shares = sums / totals.where(totals > 0)
        return shares[DELTA_ENERGY] / shares[NUMEL]

    blocks = ratios("block")
    ffn = blocks.xs("ffn", level="block") if "ffn" in set(rows["block"]) else NAN
    return pd.DataFrame({"layer": ratios("layer").groupby(level="resample").min(skipna=False),
                         "block": blocks.groupby(level="resample").min(skipna=False),
                         "ffn": ffn}, columns=names)
