"""Spectrum and decomposition on matrices of known rank and geometry."""

import math
from fractions import Fraction

import pytest
import torch

from opdgeo.delta import columns, spectrum
from opdgeo.delta.spectrum import (
    decompose,
    rank_count,
    singular_values,
    spectrum_metrics,
    tall_rows,
    upper_gram,
)


def low_rank(rows: int, cols: int, rank: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols,
                                                                       generator=generator)


@pytest.mark.parametrize("shape", [(80, 60), (40, 120)])
def test_rank_r_delta_has_numerical_rank_r_and_top_r_energy_one(shape):
    rank = 5
    delta = low_rank(*shape, rank) * 1e-4
    values, complete = singular_values(tall_rows(delta), exact_svd_max=4096)
    metrics = spectrum_metrics(values, min(shape), float((delta**2).sum()), complete)
    for tol in ("1e-6", "1e-5", "1e-4"):
        assert metrics[f"numerical_rank_{tol}"] == rank
    assert metrics["top4_energy"] < 1
    assert metrics["top8_energy"] == pytest.approx(1, abs=1e-12)  # top-r (<= 8) energy is 1
    assert rank > metrics["stable_rank"] >= 1


def test_large_matrices_take_the_gram_route(monkeypatch):
    delta = low_rank(300, 40, 3, seed=2) + 1e-3 * torch.randn(300, 40)
    direct, _ = singular_values(tall_rows(delta), 4096)
    monkeypatch.setattr(spectrum, "CHUNK_ELEMENTS", 1000)  # as if it were an embedding
    large, complete = singular_values(tall_rows(delta), 4096)
    assert complete
    torch.testing.assert_close(large, direct, rtol=1e-9, atol=1e-12 * float(direct[0]))


@pytest.mark.parametrize("shape", [(300, 42), (42, 300)])
def test_upper_gram_is_the_upper_triangle_of_the_gram_matrix(shape, monkeypatch):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(spectrum, "CHUNK_ELEMENTS", 1000)  # several row chunks, summed
    upper = upper_gram(tall_rows(matrix))
    tall = matrix.double() if shape[0] > shape[1] else matrix.double().T
    exact = tall.T @ tall
    torch.testing.assert_close(upper.triu(), exact.triu(), rtol=0,
                               atol=1e-5 * float(exact.max()))
    assert not upper.tril(-1).any()  # zeros below the diagonal, as the projection reads it
    eigenvalues = torch.linalg.eigvalsh(upper, UPLO="U")
    torch.testing.assert_close(eigenvalues, torch.linalg.eigvalsh(exact), rtol=0,
                               atol=1e-5 * float(exact.max()))


def test_decomposition_matches_svd_in_both_orientations():
    for shape in ((90, 30), (30, 90)):
        matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        ours = decompose(tall_rows(matrix), top=6, exact_svd_max=4096)
        left, values, right_t = torch.linalg.svd(matrix.double(), full_matrices=False)
        torch.testing.assert_close(ours.values[:6], values[:6], rtol=1e-5, atol=0)  # float32
        # singular vectors up to sign: compare the rank-6 reconstructions
        reconstruction = ours.left * ours.values[:6].float() @ ours.right.T
        expected = (left[:, :6] * values[:6] @ right_t[:6]).float()
        torch.testing.assert_close(reconstruction, expected, rtol=1e-4, atol=1e-4)


def test_randomized_route_keeps_top_statistics():
    delta = low_rank(200, 150, 3, seed=4) + 1e-3 * torch.randn(200, 150)
    exact_values, _ = singular_values(tall_rows(delta), 4096)
    top_values, complete = singular_values(tall_rows(delta), exact_svd_max=100)
    assert not complete
    torch.testing.assert_close(top_values[:3], exact_values[:3], rtol=1e-4, atol=0)
    metrics = spectrum_metrics(top_values, 150, float((delta.double() ** 2).sum()), complete)
    assert metrics["numerical_rank_1e-5"] != metrics["numerical_rank_1e-5"]  # NaN: unknown
    assert metrics["top4_energy"] == pytest.approx(
        float((exact_values[:4] ** 2).sum() / (exact_values**2).sum()), rel=1e-4)


def test_rank_count_is_the_floor_of_ratio_times_the_short_side():
    assert rank_count(0.10, 896) == 89  # the paper's k (round would give 90)
    assert rank_count(0.10, 128) == 12
    assert rank_count(0.20, 4864) == 972
    assert rank_count(0.29, 100) == 29  # 0.29 * 100 is 28.999999999999996 in binary
    assert rank_count(0.01, 64) == 1  # at least one direction
    # every ratio the analysis uses, every short side up to 10k: the exact decimal floor
    ratios = {*columns.MASK_RATIOS, *columns.SINGULAR_VALUE_FRACTIONS, columns.ROTATION_RATIO}
    for ratio in ratios:
        exact = Fraction(str(ratio))
        mismatched = [short for short in range(1, 10_000)
                      if rank_count(ratio, short) != max(1, math.floor(exact * short))]
        assert not mismatched, (ratio, mismatched[:5])
