"""Coordinate metrics on constructed deltas: values computed, not typed in."""

import math

import pytest
import torch

from opdgeo.delta.columns import HEADLINE_ATOL, HEADLINE_RATIO, MASK_RATIOS
from opdgeo.delta.metrics import (
    PRINCIPAL_STATES,
    STATS_CHUNK,
    Histogram,
    coordinate_masks,
    delta_stats,
    magnitude_key,
    rank_splits,
    sum_of_squares,
)


def test_known_coordinate_set_gives_exact_sparsity():
    generator = torch.Generator().manual_seed(0)
    source = (torch.randn(64, 48, generator=generator) * 0.02).bfloat16()
    moved = torch.rand(source.shape, generator=generator) < 0.37
    tiny = torch.rand(source.shape, generator=generator) < 0.1  # moved by < 1e-5: still sparse
    trained = source.float() + 0.01 * moved
    trained = torch.where(tiny & ~moved, trained + 2 ** -20, trained).float()
    category, stats = delta_stats(source.float(), trained)
    numel = source.numel()
    expected_headline = (numel - moved.sum().item()) / numel
    expected_exact_zero = (numel - (moved | tiny).sum().item()) / numel
    row = stats.row()
    assert row["sparsity_atol_1e-5"] == expected_headline
    assert row["exact_zero_fraction"] == expected_exact_zero
    assert row["sparsity_atol_1e-8"] == expected_exact_zero  # 2^-20 ~ 9.5e-7 > 1e-8
    assert row["sparsity_atol_1e-6"] == expected_headline
    assert torch.equal(category == 2, moved)
    relative = (torch.linalg.vector_norm(trained - source.float())
                / torch.linalg.vector_norm(source.float()))
    assert abs(row["relative_norm"] - relative.item()) < 1e-6 * relative.item()


def test_rank_splits_match_sorting_with_fractional_ties():
    generator = torch.Generator().manual_seed(1)
    values = (torch.randn(300, 70, generator=generator) * 0.02).bfloat16()  # many ties
    labels = torch.randint(0, 3, values.shape, generator=generator)
    magnitudes = values.float().abs().reshape(-1)
    for dtype in (torch.bfloat16, torch.float32):
        for count in (1, 77, values.numel() // 10, values.numel()):
            (split,), _ = rank_splits(values.to(dtype), [count], labels=labels, n_labels=3)
            threshold = magnitudes.sort().values[count - 1]
            below, tied = magnitudes < threshold, magnitudes == threshold
            share = (count - below.sum().double()) / tied.sum()
            for label in range(3):
                mine = labels.reshape(-1) == label
                expected = (below & mine).sum() + share * (tied & mine).sum()
                assert abs(float(split.sums[label]) - float(expected)) < 1e-6
            membership = split.membership(magnitude_key(values.to(dtype).reshape(-1)))
            assert abs(float(membership.sum()) - count) < 1e-3


def test_coordinate_energy_share_of_a_spike():
    delta = torch.zeros(100, 100)
    delta[3, 4] = 10.0  # one coordinate holds almost everything
    delta[5:, :] = 0.01
    delta[5, :50] = 0.02  # the top 1% = 100 coordinates: the spike, 50 at 0.02, 49 at 0.01
    _, stats = delta_stats(torch.zeros(100, 100), delta)
    energy = float((delta.double() ** 2).sum())
    row = stats.row()
    top_ten = 100.0 + 9 * 0.02**2  # top 0.1% = 10 coordinates
    assert abs(row["coord_energy_top0.1pct"] - top_ten / energy) < 1e-6
    top_hundred = 100.0 + 50 * 0.02**2 + 49 * 0.01**2
    assert abs(row["coord_energy_top1pct"] - top_hundred / energy) < 1e-6


def test_headline_atol_is_the_update_threshold():
    source = torch.zeros(4)
    trained = torch.tensor([0.0, HEADLINE_ATOL / 2, HEADLINE_ATOL * 2, -1.0])
    category, _ = delta_stats(source, trained)
    assert category.tolist() == [0, 1, 2, 2]


def test_energy_of_a_large_bf16_tensor_matches_a_float64_sum():
    # the shape of Qwen2.5-0.5B's embedding: a float32 accumulation loses ~3% here
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(151936, 896, generator=generator) * 0.02).bfloat16()
    reference = math.fsum(float(row.double().square().sum()) for row in weight.split(4096))
    assert abs(sum_of_squares(weight) - reference) < 1e-7 * reference
    _, stats = delta_stats(weight, weight)
    assert abs(stats.source_energy - reference) < 1e-7 * reference
    # the delta's energy and mean |dW| too: the weight itself as the delta of a zero source
    _, stats = delta_stats(torch.zeros_like(weight), weight)
    assert abs(stats.delta_energy - reference) < 1e-7 * reference
    absolute = math.fsum(float(row.double().abs().sum()) for row in weight.split(4096))
    assert abs(stats.row()["mean_abs"] * weight.numel() - absolute) < 1e-7 * absolute


def test_coordinate_masks_count_every_mask_as_sorting_does():
    generator = torch.Generator().manual_seed(2)
    values = (torch.randn(300, 70, generator=generator) * 0.02).bfloat16()  # many ties
    values[:3] = 0  # ties at zero: the smallest ratios' thresholds coincide
    numel = values.numel()
    # a principal mask with members, non-members and coordinates tied at its threshold
    state = torch.randint(0, PRINCIPAL_STATES, values.shape, generator=generator,
                          dtype=torch.uint8)
    tie_share = 0.3
    magnitudes = values.float().abs().reshape(-1)
    principal = torch.tensor([0.0, 1.0, tie_share], dtype=torch.float64)[state.reshape(-1).long()]
    for dtype in (torch.bfloat16, torch.float32):
        masks = coordinate_masks(values.to(dtype), state, tie_share)
        for n_labels in (3, 9):  # 9: labels joint with the exact null's
            labels = torch.randint(0, n_labels, values.shape, generator=generator,
                                   dtype=torch.uint8)
            table = masks.count(labels, n_labels)
            one_hot = torch.nn.functional.one_hot(labels.reshape(-1).long(), n_labels).double()
            for ratio in MASK_RATIOS:
                count = round(ratio * numel)
                threshold = magnitudes.sort().values[count - 1]
                below, tied = magnitudes < threshold, magnitudes == threshold
                share = (count - below.sum().double()) / tied.sum()
                low = below.double() + share * tied.double()
                torch.testing.assert_close(table @ masks.low_weights(ratio), low @ one_hot,
                                           rtol=0, atol=1e-9)
                if ratio == HEADLINE_RATIO:
                    union = principal + low - principal * low
                    torch.testing.assert_close(table @ masks.union_weights(ratio),
                                               union @ one_hot, rtol=0, atol=1e-9)
            torch.testing.assert_close(table @ masks.principal_weights(), principal @ one_hot,
                                       rtol=0, atol=1e-9)
            assert table.sum(dim=1).tolist() == one_hot.sum(dim=0).tolist()
        exponent = magnitude_key(values.to(dtype).reshape(-1)) >> 23
        expected = torch.zeros(256, dtype=torch.float64).index_add_(0, exponent, principal)
        torch.testing.assert_close(masks.principal_by_exponent, expected, rtol=0, atol=1e-9)
        _, high = rank_splits(values.to(dtype), [1])
        assert torch.equal(masks.bin_counts, high[0])
        assert masks.source_energy == sum_of_squares(values.to(dtype))


def test_histogram_adds_chunks_as_bincount_does():
    generator = torch.Generator().manual_seed(4)
    # runs of one bin, as an update's unchanged coordinates give, and a ragged last chunk
    index = torch.randint(0, 50, (3000,), generator=generator, dtype=torch.int32)
    index[torch.rand(3000, generator=generator) < 0.7] = 0
    weights = torch.rand(3000, generator=generator)
    histogram = Histogram(50, index.device, weighted=True)
    for start in range(0, 3000, 1024):
        histogram.add(index[start:start + 1024], weights[start:start + 1024])
    assert torch.equal(histogram.counts(), torch.bincount(index, minlength=50).double())
    torch.testing.assert_close(histogram.sums(),
                               torch.bincount(index, weights=weights.double(), minlength=50))


def test_histogram_refuses_a_chunk_longer_than_its_lanes():
    histogram = Histogram(4, torch.device("cpu"))
    with pytest.raises(ValueError, match="at most"):
        histogram.add(torch.zeros(STATS_CHUNK + 1, dtype=torch.int32))
