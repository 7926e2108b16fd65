"""Null models: what bf16 rounding, isotropy or position-independence alone predict.

Rounding null. A bf16 coordinate w changes by more than atol only when its update u gives
|bf16(w + u) - w| > atol. Rounding moves w by whole bf16 spacings ulp(w), so that happens
when |u| > ulp(w) * (floor(atol / ulp(w)) + 1/2), and the spacing grows with |w|: small
coordinates change first whatever the objective. ulp(w) depends only on w's exponent, hence
only on the high 16 bits of |w|, the bins `metrics.rank_splits` already histograms, so the
parametric null is a sum over those bins.
- parametric: u independent of w, |u| half-normal (or constant) with the scale fitted so the
  expected number of changed coordinates equals the observed; its expected low-magnitude and
  principal coverage follow in closed form.
- on a paper's table (only the global sparsity known): one scale fitted over every tensor
  of the model, on Gaussian weights whose bf16 histogram is computed in closed form.
- exact (fp32 master weights known): the tensor's own fp32 update magnitudes permuted over
  coordinates with random signs, added to the bf16 source and rounded to bf16.
Isotropic null: a Gaussian delta of the tensor's shape through the same projection code.
Shuffle null: the delta's own entries permuted within the tensor, through the same spectrum.
"""

import math
import zlib
from dataclasses import dataclass

import torch

from opdgeo.delta.columns import HEADLINE_ATOL, HEADLINE_RATIO
from opdgeo.delta.metrics import (
    HIGH_BINS,
    categories,
    chunk_slices,
    rank_splits,
)
from opdgeo.delta.source import source_geometry
from opdgeo.delta.spectrum import TallRows

DISTRIBUTIONS = ("half_normal", "constant")
EXPONENTS = 256  # float32 / bf16 exponent field
BF16_FINITE = 0x7F80  # non-negative bf16 bit patterns below +inf
BISECTION_STEPS = 64


def tensor_generator(name: str, seed: int, device: torch.device) -> torch.Generator:
    """A generator seeded by run seed and tensor name: results do not depend on order."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def exponent_counts(bin_counts: torch.Tensor) -> torch.Tensor:
    """Coordinates per exponent of |w| from counts per high-bits bin (7 mantissa bits each)."""
    return bin_counts.reshape(EXPONENTS, -1).sum(dim=1)


def change_thresholds(atol: float) -> torch.Tensor:
    """Per exponent of |w|: the smallest |u| that moves bf16(w + u) by more than atol."""
    exponent = torch.arange(EXPONENTS, dtype=torch.float64)
    spacing = torch.exp2(exponent.clamp(min=1) - 134)  # 2^(E - 127 - 7); subnormals as E = 1
    return spacing * (torch.floor(atol / spacing) + 0.5)


def change_probability(thresholds: torch.Tensor, scale: float, distribution: str) -> torch.Tensor:
    if distribution == "half_normal":  # u ~ N(0, scale^2): P(|u| > t) = erfc(t / (scale sqrt 2))
        return torch.special.erfc(thresholds / (scale * math.sqrt(2))) if scale > 0 \
            else torch.zeros_like(thresholds)
    if distribution == "constant":  # |u| = scale
        return (scale > thresholds).to(torch.float64)
    raise ValueError(f"unknown rounding-null distribution {distribution!r}: use {DISTRIBUTIONS}")


@dataclass
class RoundingNull:
    """The fitted parametric null of one tensor: its scale and P(change) per exponent of |w|."""

    scale: float
    probability: torch.Tensor  # (EXPONENTS,) float64, CPU
    expected_changed: float

    def expected_changed_in(self, counts_by_exponent: torch.Tensor) -> float:
        """Expected changed coordinates in a set, given its coordinates per exponent."""
        return float((counts_by_exponent.double().cpu() * self.probability).sum())

    def expected_in_smallest(self, bin_counts: torch.Tensor, count: float) -> float:
        """Expected changed coordinates among the `count` smallest |w|, from the |w| histogram.

        The bin holding the count-th smallest is the one `rank_splits` finds from the same
        histogram. All coordinates of one high bin share one probability, so the partial bin
        at the threshold contributes (its members) * (its probability).
        """
        if count <= 0:
            return 0.0
        counts = bin_counts.double().cpu()
        cumulative = counts.cumsum(0)
        threshold_bin = int(torch.searchsorted(cumulative, float(count)))
        per_bin = self.probability.repeat_interleave(HIGH_BINS // EXPONENTS)
        below = float((counts[:threshold_bin] * per_bin[:threshold_bin]).sum())
        members_in_bin = count - (float(cumulative[threshold_bin - 1]) if threshold_bin else 0.0)
        return below + members_in_bin * float(per_bin[threshold_bin])


def fit_rounding_null(bin_counts: torch.Tensor, changed: float, atol: float = HEADLINE_ATOL,
                      distribution: str = "half_normal") -> RoundingNull:
    """Fit the update scale so that the expected changed count equals `changed`.

    bin_counts: coordinates per high-bits bin of |w| (from `rank_splits`).
    """
    counts = exponent_counts(bin_counts.double().cpu())
    thresholds = change_thresholds(atol)
    occupied = counts > 0
    counts, occupied_thresholds = counts[occupied], thresholds[occupied]

    def expected(scale: float) -> float:
        return float((counts * change_probability(occupied_thresholds, scale, distribution)).sum())

    if changed <= 0:
        scale = 0.0
    else:
        # bisection on log(scale) between scales that change almost nothing and everything
        low = math.log(float(occupied_thresholds.min()) * 1e-3)
        high = math.log(float(occupied_thresholds.max()) * 1e3)
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            low, high = (middle, high) if expected(math.exp(middle)) < changed else (low, middle)
        scale = math.exp(high)
    probability = change_probability(thresholds, scale, distribution)
    return RoundingNull(scale, probability, expected(scale))


def gaussian_bin_counts(std: float, numel: float = 1.0) -> torch.Tensor:
    """Expected coordinates per high-bits bin of |w| for `numel` weights N(0, std^2) rounded
    to bf16: the histogram `rank_splits` counts on a sampled tensor, in closed form. The bins
    of a bf16 magnitude are its values, and a value takes every |w| that rounds to it, up to
    the midpoints with its neighbours."""
    values = torch.arange(BF16_FINITE, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = values.double()
    upper = torch.cat([(values[1:] + values[:-1]) / 2, torch.tensor([math.inf])])
    at_most = torch.special.erf(upper / (std * math.sqrt(2)))  # P(|w| <= upper)
    counts = torch.zeros(HIGH_BINS, dtype=torch.float64)
    counts[:BF16_FINITE] = numel * torch.diff(at_most, prepend=at_most.new_zeros(1))
    return counts


def pooled_rounding_null(bin_counts: list[torch.Tensor], sparsity: float,
                         atol: float = HEADLINE_ATOL, ratio: float = HEADLINE_RATIO,
                         distribution: str = "half_normal") -> dict[str, float]:
    """The parametric null of a model known only by its global sparsity (a paper's table):
    one update scale fitted so that the expected changed coordinates of all tensors together
    match, and the low-magnitude mask taken inside each tensor, as the analysis does.

    bin_counts: the |w| histogram of each tensor (tensors with one histogram up to their
    size may come as one, their sum: their masks' thresholds fall in the same place).
    """
    total = sum(counts.double().cpu() for counts in bin_counts)
    numel = float(total.sum())
    null = fit_rounding_null(total, (1 - sparsity) * numel, atol, distribution)
    in_smallest = sum(null.expected_in_smallest(counts, ratio * float(counts.sum()))
                      for counts in bin_counts)
    return {"scale": null.scale, "low_magnitude_coverage": in_smallest / null.expected_changed}


def exact_rounding_null_categories(source: torch.Tensor, trained_fp32: torch.Tensor,
                                   generator: torch.Generator) -> torch.Tensor:
    """Update categories after the tensor's fp32 update is shuffled and rounded to bf16.

    Chunk by chunk: the update |trained_fp32 - bf16(source)| is gathered at the permuted
    positions, never held whole; the permutation is int32 and the signs are drawn per chunk
    (on CPU the same draws, so the same null, as one int64 permutation and one sign draw).
    Gathers use `index_select`, which takes int32 indices as they are (`tensor[index]`
    would copy them to int64 first).
    """
    flat_source = source.reshape(-1)
    flat_trained = trained_fp32.to(source.device).reshape(-1)
    numel = flat_source.numel()
    order = torch.randperm(numel, generator=generator, device=source.device, dtype=torch.int32)
    out = torch.empty(numel, dtype=torch.uint8, device=source.device)
    for sl in chunk_slices(numel):
        picked = order[sl]
        update = (torch.index_select(flat_trained, 0, picked).float()
                  - torch.index_select(flat_source, 0, picked).bfloat16().float())
        signs = torch.randint(0, 2, update.shape, generator=generator, device=source.device,
                              dtype=torch.uint8)
        base = flat_source[sl].bfloat16().float()
        rounded = (base + update.abs_() * (2 * signs.float() - 1)).bfloat16().float()
        out[sl] = categories((rounded - base).abs_())
    return out.view(source.shape)


def shuffled_rows(delta: torch.Tensor, delta_rows: TallRows,
                  generator: torch.Generator) -> TallRows:
    """The delta's entries permuted uniformly within the tensor, gathered row chunk by row
    chunk, so the shuffled matrix is never held whole (the permutation is int32)."""
    flat = delta.reshape(-1)
    order = torch.randperm(flat.numel(), generator=generator, device=delta.device,
                           dtype=torch.int32)
    short = delta_rows.shape[1]

    def rows(start: int, stop: int) -> torch.Tensor:  # index_select: no int64 index copy
        return torch.index_select(flat, 0, order[start * short:stop * short]).view(-1, short)

    return TallRows(rows, delta_rows.shape, delta_rows.transposed)


def isotropic_rows(delta_rows: TallRows, generator: torch.Generator) -> TallRows:
    """A Gaussian matrix of the delta's shape (its norm is irrelevant: projections are
    shares), generated per chunk from seeds drawn once, so every read returns the same rows."""
    base_seed = int(torch.randint(1 << 62, (1,), generator=generator, device=generator.device))
    short = delta_rows.shape[1]

    def rows(start: int, stop: int) -> torch.Tensor:
        chunk_generator = torch.Generator(device=generator.device).manual_seed(base_seed + start)
        return torch.randn(stop - start, short, generator=chunk_generator,
                           device=generator.device)

    return TallRows(rows, delta_rows.shape, delta_rows.transposed)


def rounding_null_on_gaussian(sparsity: float, std: float, shape: tuple[int, int],
                              atol: float = HEADLINE_ATOL, ratio: float = HEADLINE_RATIO,
                              seed: int = 0, distribution: str = "half_normal",
                              device: str = "cpu") -> dict[str, float]:
    """The parametric null for a reported sparsity on bf16 Gaussian weights N(0, std^2).

    Returns the fitted scale and the expected low-magnitude and principal coverage at
    `ratio`, by the same code the analysis runs on real weights.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    weight = (torch.randn(shape, generator=generator, device=device) * std).bfloat16()
    numel = weight.numel()
    splits, high = rank_splits(weight, [round(ratio * numel)])
    bin_counts = high[0]
    null = fit_rounding_null(bin_counts, (1 - sparsity) * numel, atol, distribution)
    low_magnitude = null.expected_in_smallest(bin_counts, splits[0].count) / null.expected_changed
    masks = source_geometry(weight, min(shape), ratio).masks
    principal = null.expected_changed_in(masks.principal_by_exponent) / null.expected_changed
    return {"scale": null.scale, "low_magnitude_coverage": low_magnitude,
            "principal_coverage": principal}
