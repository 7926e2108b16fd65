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
Shuffle null: the delta's own entries permuted uniformly within the tensor, through the same
spectrum (the permutation drawn bucket by bucket, `StreamedShuffle`, never held whole).
"""

import bisect
import math
import zlib
from dataclasses import dataclass

import torch

from opdgeo.delta.columns import HEADLINE_ATOL, HEADLINE_RATIO
from opdgeo.delta.metrics import (
    CHUNK,
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
# entries per bucket of a streamed shuffle (about: labels are uint8): a layer's matrix is one
# bucket, a single randperm (grouping by labels costs about as much as the shuffle itself)
SHUFFLE_BUCKET = 1 << 23
MAX_BUCKETS = 256


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


class StreamedShuffle:
    """The entries of one or more tensors of one size in a uniformly random order (the same
    for each), read in pieces, without the permutation held whole (Rao and Sandelius's
    shuffle): each entry draws a bucket label, uniformly and independently; the entries are
    grouped by label in place, chunk by chunk (a stable sort of each chunk's labels); the
    shuffled order is bucket 0's entries in a uniformly random order (one randperm of the
    bucket), then bucket 1's, and so on. An arrangement comes out when the labels match its
    bucket segments and each bucket's randperm its order: with probability sum over bucket
    sizes n of B^-N prod_b 1/n_b!, the same for every arrangement. So the draw is uniform, as
    one randperm of the whole tensor, from other random numbers. Memory: the tensors
    (reordered in place: their last use) and one bucket of each, where a whole int32
    permutation would add 4 bytes per entry.

    Every read of a range returns the same entries (each bucket's randperm has its own seed);
    reads in order shuffle each bucket once.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], generator: torch.Generator,
                 bucket_size: int = SHUFFLE_BUCKET, chunk: int = CHUNK):
        self.flats = tuple(tensor.view(-1) for tensor in tensors)
        numel, device = self.flats[0].numel(), tensors[0].device
        buckets = min(MAX_BUCKETS, max(1, -(-numel // bucket_size)))
        self.seed = int(torch.randint(1 << 62, (1,), generator=generator, device=device))
        self.cached: tuple[int, tuple[torch.Tensor, ...]] | None = None
        if buckets == 1:  # no labels: one randperm of the whole
            self.segments, self.ends = [[(0, numel)]], [numel]
            return
        label_generator = torch.Generator(device=device).manual_seed(self.seed)
        slices = list(chunk_slices(numel, chunk))  # grouped a chunk at a time
        sizes = torch.zeros(len(slices), buckets, dtype=torch.int64)  # per chunk and bucket
        for i, sl in enumerate(slices):
            labels = torch.randint(buckets, (sl.stop - sl.start,), generator=label_generator,
                                   device=device, dtype=torch.uint8)
            order = torch.argsort(labels, stable=True)
            for flat in self.flats:
                flat[sl] = flat[sl].index_select(0, order)
            sizes[i] = torch.bincount(labels, minlength=buckets).cpu()
        chunk_starts = torch.tensor([sl.start for sl in slices], dtype=torch.int64)
        # per bucket and chunk: where that chunk's entries of the bucket start, and how many
        self.segments = torch.stack([chunk_starts[:, None] + sizes.cumsum(1) - sizes, sizes],
                                    dim=-1).transpose(0, 1).tolist()
        self.ends = sizes.sum(0).cumsum(0).tolist()  # where each bucket ends in the output

    def bucket(self, index: int) -> tuple[torch.Tensor, ...]:
        """Bucket `index`'s entries of each tensor in their shuffled order."""
        if self.cached is None or self.cached[0] != index:
            self.cached = None  # released before the next is gathered
            segments = [(start, size) for start, size in self.segments[index] if size]
            device = self.flats[0].device
            generator = torch.Generator(device=device).manual_seed(self.seed + 1 + index)
            order = torch.randperm(sum(size for _, size in segments), generator=generator,
                                   device=device, dtype=torch.int32)
            self.cached = index, tuple(
                torch.index_select(flat[segments[0][0]:sum(segments[0])] if len(segments) == 1
                                   else torch.cat([flat[start:start + size]
                                                   for start, size in segments]), 0, order)
                for flat in self.flats)
        return self.cached[1]

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Entries start..stop of the shuffled order, of each tensor."""
        pieces = []
        index = bisect.bisect_right(self.ends, start)
        while start < stop:
            begin = self.ends[index - 1] if index else 0
            end = min(stop, self.ends[index])
            if end > start:
                pieces.append([values[start - begin:end - begin]
                               for values in self.bucket(index)])
            start, index = max(start, end), index + 1
        return tuple(parts[0] if len(parts) == 1 else torch.cat(parts)
                     for parts in zip(*pieces, strict=True))


def shuffled_rows(tensor: torch.Tensor, generator: torch.Generator,
                  minus: torch.Tensor | None = None,
                  bucket_size: int = SHUFFLE_BUCKET) -> TallRows:
    """The entries of `tensor` (with `minus`: of the difference tensor - minus, W_trained -
    W_src = dW) permuted uniformly within it (`StreamedShuffle`, which reorders both in
    place), read tall in row chunks, float32: neither the shuffled matrix, the difference nor
    the permutation is held whole."""
    short = min(tensor.shape)
    shuffle = StreamedShuffle((tensor,) if minus is None else (tensor, minus), generator,
                              bucket_size)

    def rows(start: int, stop: int) -> torch.Tensor:
        pieces = shuffle.read(start * short, stop * short)
        values = pieces[0].float() if minus is None else pieces[0].float() - pieces[1].float()
        return values.view(-1, short)

    return TallRows(rows, (max(tensor.shape), short), tensor.shape[0] < tensor.shape[1])


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
