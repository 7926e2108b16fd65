"""A constructed checkpoint pair whose every observed metric is known: the analysis of it
(opdgeo.delta.analyze_checkpoints) equals, to 1e-6, the same definitions (docs/study.md section 3)
evaluated here in float64 numpy on the very bf16 values it reads. The null models are random
or fitted and have their own tests (test_nulls.py); they are not compared here.

The pair is built so that every metric is well defined at float32 precision:
- each matrix is [L | P]: L holds the top 10% of singular directions as Hadamard columns (its
  coordinates are exactly the principal mask at 10%, far above the rest of |U_k S_k V_k^T|),
  P is the rest, orthogonal to L up to bf16 rounding; the singular values have wide gaps at
  every k the geometry uses (1, 5, 10, 20% of the short side), so float32 vectors resolve
  the subspaces;
- every |dW| is a bf16 value, so the coordinate energy shares (from bf16-bit bins) are exact;
  no |dW| lies near a sparsity threshold;
- the embedding is large (8.2M coordinates) and dense: a float32 running sum of its squares
  is off by far more than 1e-6.
"""

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from delta_checkpoints import save_checkpoint

from opdgeo.delta import columns
from opdgeo.delta.analyze import analyze_checkpoints

TOLERANCE = 1e-6
EMBEDDING = "model.embed_tokens.weight"
# (rows, columns); a wide one is built tall and transposed. Short sides where the paper's
# k = floor(ratio x short) differs from the rounded one: 1% of 170 is 1 (not 2), 5% of 70 is
# 3 (not 4).
SHAPES = {
    EMBEDDING: (32768, 170),
    "model.layers.0.mlp.up_proj.weight": (128, 70),
    "model.layers.0.mlp.down_proj.weight": (70, 128),
    "model.layers.0.self_attn.q_proj.weight": (64, 40),
    "model.layers.0.input_layernorm.weight": (64,),
}
NULL_COLUMNS = ("rounding_null_scale", "rounding_null_low_magnitude_coverage_10pct",
                "rounding_null_principal_coverage_10pct", "rounding_null_low_magnitude_"
                "enrichment_10pct", "rounding_null_principal_enrichment_10pct")


def rank_count(ratio: float, short: int) -> int:
    """The paper's number of singular directions: floor(ratio x short), at least one, with
    the ratio read as the decimal it is written as (exact, no binary rounding)."""
    return max(1, math.floor(Fraction(str(ratio)) * short))


def hadamard_columns(order: int, indices: np.ndarray) -> np.ndarray:
    """Columns of the Sylvester Hadamard matrix of a power-of-2 order: H[i, j] =
    (-1)^popcount(i AND j); orthogonal, every entry +-1."""
    bits = np.arange(order)[:, None] & indices[None, :]
    parity = np.zeros(bits.shape, dtype=np.int64)
    while bits.any():
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity


def spectrum_design(short: int) -> np.ndarray:
    """Descending singular values with wide gaps at k = 1, 5, 10 and 20% of `short`."""
    k1, k5, k10, k20 = (rank_count(r, short) for r in columns.MASK_RATIOS)
    groups = [(k1, 10.0, 9.5), (k5 - k1, 8.0, 7.0), (k10 - k5, 6.0, 5.0),
              (k20 - k10, 4.0, 3.0), (short - k20, 1.0, 0.2)]
    return np.concatenate([np.linspace(high, low, n) for n, high, low in groups if n > 0])


def designed_source(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A tall bf16-valued [L | P] (rows a power of 2, cols ten times its k at 10%)."""
    values = spectrum_design(cols)
    k = rank_count(columns.HEADLINE_RATIO, cols)
    signs = hadamard_columns(rows, rng.permutation(rows)[:k])
    left = signs * _bf16(values[:k] / math.sqrt(rows))  # columns: orthogonal, constant |.|
    outside = rng.standard_normal((rows, cols - k))
    outside -= signs @ (signs.T @ outside) / rows  # orthogonal to L's columns
    basis, _ = np.linalg.qr(outside)
    right, _ = np.linalg.qr(rng.standard_normal((cols - k, cols - k)))
    rest = basis @ np.diag(values[k:]) @ right.T
    return _bf16(np.concatenate([left, rest], axis=1))


def designed_delta(source: np.ndarray, rng: np.random.Generator,
                   fraction: float = 0.4) -> np.ndarray:
    """A sparse update whose every |dW| is a bf16 value: on a random `fraction` of
    coordinates, steps of ±(1 + j/8) 2^-e times |w|'s power of two (e = 4..9: from ~1/32 of
    |w| to below half its bf16 spacing, which rounds away), rounded into bf16; a coordinate
    whose rounded change is not a bf16 value (rare: it crosses a power of two) is left
    unchanged."""
    shape = source.shape
    scale = np.exp2(np.floor(np.log2(np.maximum(np.abs(source), 2.0**-40))))
    step = (rng.choice([-1.0, 1.0], shape) * scale * np.exp2(-rng.integers(4, 10, shape))
            * (1 + rng.integers(0, 8, shape) / 8) * (rng.random(shape) < fraction))
    delta = _bf16(source + step) - source
    return np.where(_bf16(delta) == delta, delta, 0.0)


def _bf16(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).bfloat16().double().numpy()


# ------------------------------------------------------------ the definitions, in float64


def coordinate_metrics(source: np.ndarray, delta: np.ndarray) -> dict[str, float]:
    magnitude, numel = np.abs(delta).ravel(), delta.size
    energy, source_energy = float(np.sum(delta**2)), float(np.sum(source**2))
    row = {"numel": numel, "delta_energy": energy, "source_energy": source_energy,
           "relative_norm": math.sqrt(energy / source_energy), "linf": float(magnitude.max()),
           "mean_abs": float(magnitude.mean()), "rms": math.sqrt(energy / numel),
           "exact_zero_fraction": float(np.mean(magnitude == 0))}
    thresholds = {f"sparsity_atol_{columns.threshold_label(e)}": e for e in columns.ABSOLUTE_EPS}
    rms = math.sqrt(source_energy / numel)
    thresholds |= {f"sparsity_rel_{columns.threshold_label(t)}": t * rms
                   for t in columns.RELATIVE_TAUS}
    for name, threshold in thresholds.items():
        near = np.abs(magnitude - threshold) <= 1e-3 * threshold
        assert not near.any(), f"a |dW| sits at the threshold of {name}: not well defined"
        row[name] = float(np.mean(magnitude <= threshold))
    descending = np.sort(magnitude)[::-1]
    for fraction in columns.COORD_ENERGY_FRACTIONS:
        count = max(1, round(fraction * numel))
        row[f"coord_energy_top{columns.ratio_label(fraction)}"] = \
            float(np.sum(descending[:count] ** 2)) / energy
    return row


def coverage_metrics(source: np.ndarray, delta: np.ndarray,
                     principal: np.ndarray | None) -> dict[str, float]:
    """Low-magnitude masks (bottom ratio of |W_src|, ties at the threshold shared so the mask
    holds exactly its ratio), the principal mask, their union; each coverage a share of the
    updates at each atol, each enrichment coverage / density."""
    magnitude, numel = np.abs(source).ravel(), source.size
    updated = {atol: np.abs(delta).ravel() > atol for atol in (columns.HEADLINE_ATOL, 0.0)}
    row = {}

    def add(mask, name, membership, density, atols=(columns.HEADLINE_ATOL, 0.0)):
        for atol in atols:
            suffix = columns.coverage_suffix(atol)
            coverage = float(membership[updated[atol]].sum() / updated[atol].sum())
            row[f"{mask}_coverage_{name}{suffix}"] = coverage
            row[f"{mask}_enrichment_{name}{suffix}"] = coverage / density

    ordered = np.sort(magnitude)
    for ratio in columns.MASK_RATIOS:
        count = round(ratio * numel)
        threshold = ordered[count - 1]
        below, tied = magnitude < threshold, magnitude == threshold
        low = below + (count - below.sum()) / tied.sum() * tied
        add("low_magnitude", columns.ratio_label(ratio), low, ratio)
        if ratio == columns.HEADLINE_RATIO:
            headline_low = low
    if principal is None:
        return row
    label = columns.ratio_label(columns.HEADLINE_RATIO)
    add("principal", label, principal.ravel().astype(float), columns.HEADLINE_RATIO)
    union = np.maximum(principal.ravel(), headline_low)
    row[f"combined_density_{label}"] = float(union.sum() / numel)
    add("combined", label, union, row[f"combined_density_{label}"])
    return row


def spectral_metrics(source: np.ndarray, trained: np.ndarray,
                     delta: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Spectrum of dW, projections on and rotation of W_src's top singular subspaces; and
    the principal mask (top 10% of |U_k S_k V_k^T|, which must be well separated)."""
    short = min(delta.shape)
    values = np.linalg.svd(delta, compute_uv=False)
    energy = float(np.sum(values**2))
    cumulative = np.cumsum(values**2) / energy
    row = {f"top{k}_energy": float(cumulative[min(k, short) - 1]) for k in columns.SPECTRAL_TOPK}
    row |= {f"top{columns.ratio_label(f)}_sv_energy": float(cumulative[rank_count(f, short) - 1])
            for f in columns.SINGULAR_VALUE_FRACTIONS}
    row["stable_rank"] = energy / values[0] ** 2
    weights = values / values.sum()
    row["effective_rank"] = math.exp(-float(np.sum(weights * np.log(weights))))
    for tol in columns.RANK_TOLERANCES:
        rank = float(np.sum(values > tol * values[0]))
        row[f"numerical_rank_{columns.threshold_label(tol)}"] = rank
        row[f"numerical_rank_fraction_{columns.threshold_label(tol)}"] = rank / short
    u, s, vt = np.linalg.svd(source, full_matrices=False)
    for ratio in columns.MASK_RATIOS:
        k, label = rank_count(ratio, short), columns.ratio_label(ratio)
        row[f"principal_projection_{label}"] = \
            float(np.sum((u[:, :k].T @ delta @ vt[:k].T) ** 2)) / energy
        row[f"principal_projection_left_{label}"] = \
            float(np.sum((u[:, :k].T @ delta) ** 2)) / energy
        row[f"principal_projection_right_{label}"] = \
            float(np.sum((delta @ vt[:k].T) ** 2)) / energy
    k = rank_count(columns.ROTATION_RATIO, short)
    label = columns.ratio_label(columns.ROTATION_RATIO)
    trained_u, trained_s, _ = np.linalg.svd(trained, full_matrices=False)
    outside = trained_u[:, :k] - u[:, :k] @ (u[:, :k].T @ trained_u[:, :k])
    row[f"subspace_rotation_{label}"] = float(np.linalg.svd(outside, compute_uv=False).mean())
    row[f"singular_value_drift_{label}"] = \
        float(np.linalg.norm(trained_s[:k] - s[:k]) / np.linalg.norm(s[:k]))
    k = rank_count(columns.HEADLINE_RATIO, short)
    magnitudes = np.abs(u[:, :k] * s[:k] @ vt[:k])
    count = round(columns.HEADLINE_RATIO * magnitudes.size)
    ordered = np.sort(magnitudes.ravel())[::-1]
    assert ordered[count - 1] > 100 * ordered[count], "principal mask not well separated"
    return row, magnitudes >= ordered[count - 1]


# ------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("known"), np.random.default_rng(7)
    sources, trained, expected = {}, {}, {}
    for name, shape in SHAPES.items():
        if len(shape) == 1:
            source = _bf16(1 + 0.1 * rng.standard_normal(shape))
            delta = designed_delta(source, rng)
        else:
            tall = sorted(shape, reverse=True)
            source = designed_source(*tall, rng)
            source = source if shape[0] >= shape[1] else source.T
            delta = designed_delta(source, rng)
        sources[name], trained[name] = source, source + delta
        row = coordinate_metrics(source, delta)
        principal = None
        if len(shape) == 2:
            spectral, principal = spectral_metrics(source, source + delta, delta)
            row |= spectral
        expected[name] = row | coverage_metrics(source, delta, principal)
    for folder, tensors in (("source", sources), ("trained", trained)):
        save_checkpoint(root / folder, {n: torch.from_numpy(t).bfloat16().contiguous()
                                        for n, t in tensors.items()})
    result = analyze_checkpoints(root / "source", root / "trained", root / "out",
                                 device="cpu", nulls=False)
    measured = pd.read_csv(root / "out" / "tensors.csv").set_index("name")
    return sources, expected, measured, result


def test_the_embedding_is_large_enough_to_need_float64_sums(pair):
    sources, expected, _, _ = pair
    squares = (sources[EMBEDDING] ** 2).astype(np.float32).ravel()
    running = float(np.cumsum(squares, dtype=np.float32)[-1])  # a float32 accumulator
    reference = expected[EMBEDDING]["source_energy"]
    assert abs(running - reference) > 10 * TOLERANCE * reference


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_metric_of_a_tensor_matches_its_definition(pair, name):
    _, expected, measured, _ = pair
    row = measured.loc[name]
    compared = {c for c in row.index if c not in columns.KEY_COLUMNS and pd.notna(row[c])}
    assert compared - set(NULL_COLUMNS) == set(expected[name]), name  # every metric, no other
    mismatched = {c: (float(row[c]), v) for c, v in expected[name].items()
                  if float(row[c]) != pytest.approx(v, rel=TOLERANCE, abs=TOLERANCE)}
    assert not mismatched, mismatched


def test_the_global_summary_matches_its_definition(pair):
    _, expected, _, result = pair
    rows = pd.DataFrame(expected).T
    matrices = rows[rows["top1_energy"].notna()]
    assert result["num_params"] == rows["numel"].sum()
    assert result["relative_norm"] == pytest.approx(
        math.sqrt(rows["delta_energy"].sum() / rows["source_energy"].sum()), rel=TOLERANCE)
    assert result[columns.SPARSITY] == pytest.approx(
        (rows["numel"] * rows[columns.SPARSITY]).sum() / rows["numel"].sum(), abs=TOLERANCE)
    updates = matrices["numel"] * (1 - matrices[columns.SPARSITY])
    for coverage in (columns.LOW_MAGNITUDE_COVERAGE, columns.PRINCIPAL_COVERAGE):
        assert result[coverage] == pytest.approx(
            (updates * matrices[coverage]).sum() / updates.sum(), abs=TOLERANCE)
        assert result[columns.median_name(coverage)] == pytest.approx(
            matrices[coverage].median(), abs=TOLERANCE)
    assert result[columns.summary_name(columns.TOP16_ENERGY)] == pytest.approx(
        matrices[columns.TOP16_ENERGY].median(), abs=TOLERANCE)
    blocks = {"embedding": [EMBEDDING], "norm": ["model.layers.0.input_layernorm.weight"],
              "ffn": [n for n in SHAPES if ".mlp." in n], "attention": [n for n in SHAPES
                                                                        if "self_attn" in n]}
    total = rows["delta_energy"].sum()
    assert result["block_energy_share"] == pytest.approx(
        {block: rows.loc[names, "delta_energy"].sum() / total for block, names in blocks.items()},
        abs=TOLERANCE)
