"""Null models on constructed cases: values computed, not typed in."""

import itertools
import math
from collections import Counter

import pytest
import torch

from opdgeo.delta import metrics, spectrum
from opdgeo.delta.analyze import analyze_tensor
from opdgeo.delta.metrics import rank_splits
from opdgeo.delta.nulls import (
    StreamedShuffle,
    exponent_counts,
    fit_rounding_null,
    gaussian_bin_counts,
    pooled_rounding_null,
    rounding_null_on_gaussian,
    shuffled_rows,
)
from opdgeo.delta.pairing import TensorPair
from opdgeo.delta.spectrum import singular_values

SHAPE = (192, 160)
NAME = "model.layers.0.mlp.up_proj.weight"


def analyze(source, trained, trained_fp32=None, nulls=False) -> dict:
    pair = TensorPair(NAME, NAME, NAME, tuple(source.shape))
    tensors = {"source": source, "trained": trained}
    if trained_fp32 is not None:
        tensors["trained_fp32"] = trained_fp32
    return analyze_tensor(pair, tensors, exact_svd_max=4096, seed=0, nulls=nulls)


def gaussian_source(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=generator) * 0.02).bfloat16()


def half_normal_update(scale: float, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=generator) * scale


def sampling_error(coverage: float, updates: float) -> float:
    return math.sqrt(coverage * (1 - coverage) / updates)


def test_rounded_half_normal_update_matches_the_parametric_null():
    source = gaussian_source()
    update = half_normal_update(4e-5)  # moves about half the coordinates by more than 1e-5
    row = analyze(source, (source.float() + update).bfloat16())
    updates = (1 - row["sparsity_atol_1e-5"]) * source.numel()
    assert 0.2 < row["sparsity_atol_1e-5"] < 0.8
    observed, null = row["low_magnitude_coverage_10pct"], \
        row["rounding_null_low_magnitude_coverage_10pct"]
    assert observed > 0.15  # rounding alone favours small weights...
    assert abs(observed - null) < 4 * sampling_error(null, updates)  # ...as the null predicts
    assert abs(row["principal_coverage_10pct"] - row["rounding_null_principal_coverage_10pct"]) \
        < 4 * sampling_error(row["rounding_null_principal_coverage_10pct"], updates)
    # the fitted scale recovers the update's
    assert row["rounding_null_scale"] == pytest.approx(4e-5, rel=0.1)


def test_update_on_the_largest_weights_has_coverage_zero_against_a_positive_null():
    source = gaussian_source()
    magnitudes = source.float().abs()
    largest = magnitudes >= magnitudes.reshape(-1).quantile(0.7)
    trained = (source.float() + 0.01 * torch.sign(source.float()) * largest).bfloat16()
    row = analyze(source, trained)
    assert row["low_magnitude_coverage_10pct"] == 0
    assert row["rounding_null_low_magnitude_coverage_10pct"] > 0.1


def test_one_binade_has_null_coverage_equal_to_the_mask_density():
    generator = torch.Generator().manual_seed(2)
    magnitude = (1 + 0.99 * torch.rand(SHAPE, generator=generator)) * 2**-6  # in [2^-6, 2^-5)
    sign = torch.where(torch.rand(SHAPE, generator=generator) < 0.5, -1.0, 1.0)
    source = (magnitude * sign).bfloat16()
    update = half_normal_update(2e-5)
    row = analyze(source, (source.float() + update).bfloat16())
    assert row["rounding_null_low_magnitude_coverage_10pct"] == pytest.approx(0.1, abs=1e-12)
    assert row["rounding_null_principal_coverage_10pct"] == pytest.approx(0.1, abs=1e-12)


def test_exact_null_of_a_position_independent_update_matches_the_observed():
    source = gaussian_source()
    trained_fp32 = source.float() + half_normal_update(4e-5, seed=3)
    row = analyze(source, trained_fp32.bfloat16(), trained_fp32=trained_fp32)
    numel = source.numel()
    observed_sparsity = row["sparsity_atol_1e-5"]
    assert abs(row["exact_null_sparsity_atol_1e-5"] - observed_sparsity) < \
        4 * math.sqrt(observed_sparsity * (1 - observed_sparsity) / numel)
    updates = (1 - observed_sparsity) * numel
    for mask in ("low_magnitude", "principal"):
        observed, null = row[f"{mask}_coverage_10pct"], row[f"exact_null_{mask}_coverage_10pct"]
        assert abs(observed - null) < 4 * math.sqrt(2) * sampling_error(observed, updates)


def test_exact_null_breaks_an_update_tied_to_small_weights():
    source = gaussian_source()
    magnitudes = source.float().abs()
    smallest = magnitudes <= magnitudes.reshape(-1).quantile(0.1)
    trained_fp32 = source.float() + 1e-3 * smallest  # survives rounding, only small weights
    row = analyze(source, trained_fp32.bfloat16(), trained_fp32=trained_fp32)
    assert row["low_magnitude_coverage_10pct"] > 0.95
    assert row["exact_null_low_magnitude_coverage_10pct"] < 0.3


def test_isotropic_and_shuffle_nulls():
    source = gaussian_source()
    generator = torch.Generator().manual_seed(4)
    isotropic = torch.randn(SHAPE, generator=generator) * 1e-3
    row = analyze(source, source.float() + isotropic, nulls=True)
    # an isotropic delta projects like its null, about ratio^2 (finite size adds a little)
    assert row["principal_projection_10pct"] == pytest.approx(
        row["isotropic_null_principal_projection_10pct"], rel=0.5)
    assert 0.5 * 0.1**2 < row["isotropic_null_principal_projection_10pct"] < 2 * 0.1**2
    low_rank = torch.randn(SHAPE[0], 2, generator=generator) @ torch.randn(2, SHAPE[1],
                                                                           generator=generator)
    row = analyze(source, source.float() + 1e-3 * low_rank, nulls=True)
    assert row["top16_energy"] == pytest.approx(1, abs=1e-6)
    assert row["shuffle_null_top16_energy"] < 0.5  # shuffling destroys the low rank
    assert row["shuffle_null_numerical_rank_fraction_1e-5"] == 1


def drawn_order(numel: int, seed: int, bucket_size: int, chunk: int = 1000) -> torch.Tensor:
    """The streamed shuffle's permutation: the order it gives the positions 0..numel-1."""
    positions = torch.arange(numel, dtype=torch.float32)
    shuffle = StreamedShuffle((positions,), torch.Generator().manual_seed(seed), bucket_size,
                              chunk)
    return shuffle.read(0, numel)[0].long()


def test_streamed_shuffle_draws_every_arrangement_alike():
    # four entries, one per bucket: an arrangement needs the labels and the buckets' orders
    # to combine, so a shuffle missing either part (or mixing buckets unevenly) fails
    draws = 4800
    counts = Counter(tuple(drawn_order(4, seed, bucket_size=1).tolist())
                     for seed in range(draws))
    expected = draws / math.factorial(4)
    assert set(counts) == set(itertools.permutations(range(4)))
    assert max(abs(n - expected) for n in counts.values()) < 5 * math.sqrt(expected)
    # and each entry reaches each place alike, with several entries per bucket
    places = torch.zeros(12, 12)
    for seed in range(1200):
        order = drawn_order(12, seed, bucket_size=3)
        places[order, torch.arange(12)] += 1
    assert (places - 100).abs().max() < 5 * math.sqrt(100)


def test_streamed_shuffle_reads_one_permutation_in_any_order():
    numel = 10_007  # chunks of 1000: several chunks per bucket and buckets per chunk
    order = drawn_order(numel, seed=5, bucket_size=700)
    assert torch.equal(order.sort().values, torch.arange(numel))
    assert not torch.equal(order, torch.arange(numel))
    assert torch.equal(order, drawn_order(numel, seed=5, bucket_size=700))  # same seed
    assert not torch.equal(order, drawn_order(numel, seed=6, bucket_size=700))
    positions = torch.arange(numel, dtype=torch.float32)
    shuffle = StreamedShuffle((positions, -positions), torch.Generator().manual_seed(5), 700,
                              chunk=1000)
    edges = [0, 13, 2000, 2001, 6999, 7000, numel]
    pieces = list(zip(edges[:-1], edges[1:], strict=True))
    for start, stop in reversed(pieces):  # out of order, across buckets: the same entries
        first, second = shuffle.read(start, stop)  # of each tensor, permuted alike
        assert torch.equal(first.long(), order[start:stop])
        assert torch.equal(second, -first)


@pytest.mark.parametrize("shape", [(97, 61), (61, 97)])
def test_shuffle_null_spectrum_is_that_of_the_permuted_delta(shape, monkeypatch):
    monkeypatch.setattr(spectrum, "CHUNK_ELEMENTS", 4000)  # the chunked float64 Gram route
    generator = torch.Generator().manual_seed(7)
    source = torch.randn(shape, generator=generator).bfloat16()
    trained = (source.float() + torch.randn(shape, generator=generator) @ torch.diag(
        torch.linspace(0, 1, shape[1]))).bfloat16()
    delta = trained.float() - source.float()
    order = drawn_order(delta.numel(), seed=8, bucket_size=500, chunk=metrics.CHUNK)
    expected = torch.linalg.svdvals(delta.reshape(-1)[order].view(97, 61).double())
    values, complete = singular_values(shuffled_rows(
        trained, torch.Generator().manual_seed(8), minus=source, bucket_size=500), 4096)
    assert complete
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-6 * float(expected[0]))


def test_parametric_null_on_gaussian_weights():
    sparse = rounding_null_on_gaussian(0.8, 0.02, (256, 256))
    dense = rounding_null_on_gaussian(0.03, 0.02, (256, 256))
    # the sparser the update, the more rounding alone concentrates it on small weights
    assert sparse["low_magnitude_coverage"] > 0.25
    assert dense["low_magnitude_coverage"] == pytest.approx(0.1, abs=0.01)
    assert sparse["scale"] < dense["scale"]
    # smaller weights (finer bf16 spacing) need a smaller update for the same sparsity
    assert rounding_null_on_gaussian(0.8, 0.01, (256, 256))["scale"] < sparse["scale"]


def test_constant_magnitude_null_changes_whole_exponent_classes():
    source = gaussian_source()
    numel = source.numel()
    (split,), high = rank_splits(source, [round(0.1 * numel)])
    null = fit_rounding_null(high[0], 0.4 * numel, distribution="constant")
    changes = null.probability[exponent_counts(high[0]) > 0]
    # P(change) is 1 up to some exponent and 0 above it, the fewest classes that reach 40%
    assert set(changes.tolist()) == {0.0, 1.0}
    assert torch.equal(changes, changes.sort(descending=True).values)
    assert 0.4 * numel <= null.expected_changed < 0.75 * numel
    # the 10% smallest weights all change
    assert null.expected_in_smallest(high[0], split.count) == split.count


def test_closed_form_gaussian_null_matches_the_sampled_one():
    closed = pooled_rounding_null([gaussian_bin_counts(0.02)], 0.8)["low_magnitude_coverage"]
    sampled = rounding_null_on_gaussian(0.8, 0.02, (1024, 1024))["low_magnitude_coverage"]
    assert closed == pytest.approx(sampled, abs=0.003)
    histogram = gaussian_bin_counts(0.02, 1e6)
    assert float(histogram.sum()) == pytest.approx(1e6)
    # half the weights lie within 0.6745 std of zero
    below = histogram[:int(torch.tensor(0.6745 * 0.02).bfloat16().view(torch.int16)) + 1].sum()
    assert float(below) == pytest.approx(5e5, rel=0.01)


def test_pooled_null_on_one_binade_is_the_mask_density():
    counts = torch.zeros(1 << 15, dtype=torch.float64)
    first = int(torch.tensor(2.0**-6).bfloat16().view(torch.int16))
    counts[first:first + 128] = 1000.0  # every bf16 value in [2^-6, 2^-5)
    for sparsity in (0.1, 0.5, 0.9):
        null = pooled_rounding_null([counts, 3 * counts], sparsity)
        assert null["low_magnitude_coverage"] == pytest.approx(0.1, abs=1e-12)


def test_pooled_null_does_not_depend_on_how_one_distribution_is_split():
    whole = pooled_rounding_null([gaussian_bin_counts(0.02, 4e6)], 0.8)
    parts = pooled_rounding_null([gaussian_bin_counts(0.02, n) for n in (1e6, 2.5e6, 5e5)], 0.8)
    assert parts == pytest.approx(whole, rel=1e-9)


@pytest.mark.parametrize(("sparsity", "std", "coverage", "tolerance"), [
    (0.826, 0.02, 0.332, 0.005),  # a probe on sampled weights: DS-Qwen OPD
    (0.031, 0.02, 0.103, 0.002),  # offline distillation: dense, so about the mask density
    (0.895, 0.02, 0.398, 0.005),  # OPSD
    (0.667, 0.01, 0.20, 0.03),  # "with std 0.01 the null falls to 18-22%"
    (0.895, 0.01, 0.20, 0.03),
])
def test_pooled_null_reproduces_the_issue_probe(sparsity, std, coverage, tolerance):
    null = pooled_rounding_null([gaussian_bin_counts(std)], sparsity)
    assert null["low_magnitude_coverage"] == pytest.approx(coverage, abs=tolerance)
