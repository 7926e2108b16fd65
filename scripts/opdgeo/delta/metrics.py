"""Coordinate metrics of one delta: scale, sparsity, energy concentration, mask coverage.

Everything element-wise runs over flat chunks, so temporaries stay small even for a
150k x 2k embedding, and every statistic is accumulated in one or two passes.

Top- and bottom-ratio masks ("the 10% smallest |W_src|") are counted without sorting: the
magnitudes' float32 bit patterns are ordered like the values, so a histogram of the upper 16
bits finds the bin holding the k-th value and a second histogram of the lower 16 bits inside
that bin finds the value itself. Coordinates tied at the threshold (common in bf16) belong to
the mask with the fraction that fills it to exactly k, which is what random tie-breaking
gives in expectation; a mask's density is therefore exactly its ratio.
"""

from dataclasses import dataclass
from functools import cache

import torch

from opdgeo.delta import columns
from opdgeo.delta.columns import (
    ABSOLUTE_EPS,
    COORD_ENERGY_FRACTIONS,
    HEADLINE_ATOL,
    MASK_RATIOS,
    RELATIVE_TAUS,
)

CHUNK = 1 << 22  # elements per chunk: 16 MB of float32
HIGH_BINS = 1 << 15  # upper 16 bits of a non-negative float32 (sign bit clear)
LOW_BINS = 1 << 16
# Update categories per coordinate: 0 unchanged, 1 changed but |dW| <= 1e-5, 2 |dW| > 1e-5.
# Coverage at atol 0 counts categories {1, 2}, at atol 1e-5 category {2}.
N_CATEGORIES = 3


def chunk_slices(numel: int, size: int = CHUNK):
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


LANES = 4  # interleaved copies of each bin of a `Histogram`


@cache
def _lanes(device: torch.device) -> torch.Tensor:
    return torch.arange(STATS_CHUNK, dtype=torch.int32, device=device).remainder_(LANES)


class Histogram:
    """Counts per bin, and optionally float64 sums of weights per bin, added to in place chunk
    by chunk (chunks of at most STATS_CHUNK elements). Each bin is kept in LANES interleaved
    copies (element i of a chunk goes to copy i mod LANES), added when read: a delta's bins
    come in runs (most coordinates are unchanged, bin 0), and a CPU's adds to one counter in
    quick succession wait on each other. On a 4864 x 896 delta with 80% zeros, one thread,
    this took the statistics' counts and energies per bin from 17.3 ms (two torch.bincount
    per chunk, each allocating its output) to 8.8 ms."""

    def __init__(self, n_bins: int, device: torch.device, weighted: bool = False):
        self._counts = torch.zeros(n_bins * LANES, dtype=torch.int64, device=device)
        self._sums = torch.zeros(n_bins * LANES, dtype=torch.float64, device=device) \
            if weighted else None

    def add(self, index: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Count the chunk's indices (integers in [0, n_bins)), and add up their weights."""
        if index.numel() > STATS_CHUNK:
            raise ValueError(f"a Histogram chunk holds at most {STATS_CHUNK} elements, got "
                             f"{index.numel()}: add it in chunk_slices(n, STATS_CHUNK)")
        spread = (index.to(torch.int32) * LANES).add_(_lanes(index.device)[:index.numel()])
        self._counts.index_add_(0, spread, self._counts.new_ones(1).expand(index.numel()))
        if self._sums is not None:
            self._sums.index_add_(0, spread, weights.double())

    def counts(self) -> torch.Tensor:
        """Per bin, float64."""
        return self._counts.view(-1, LANES).sum(dim=1, dtype=torch.float64)

    def sums(self) -> torch.Tensor:
        """Per bin, float64."""
        return self._sums.view(-1, LANES).sum(dim=1)


def float64_sum(values: torch.Tensor) -> float:
    """Sum of a float32 tensor: float32 partial sums over blocks of 1024 values, added in
    float64. A block's error is at most ~log2(1024) x 2^-24 ~ 6e-7 of it, and no error grows
    with the tensor's size (measured: 1.4e-8 relative on a 151936 x 896 tensor of squares,
    where `torch.linalg.vector_norm(x, dtype=torch.float32)` loses 3.3%), at several times
    the speed of `sum(dtype=torch.float64)` on CPU."""
    flat = values.reshape(-1)
    whole = flat.numel() // 1024 * 1024
    blocks = flat[:whole].view(-1, 1024).sum(dim=1).double().sum()
    return float(blocks + flat[whole:].double().sum())


def sum_of_squares(values: torch.Tensor) -> float:
    """||values||_F^2, chunk by chunk (`float64_sum`)."""
    flat = values.reshape(-1)
    return sum(float64_sum(flat[sl].float().square()) for sl in chunk_slices(flat.numel()))


def magnitude_key(values: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like |values|: the float32 bit pattern of |x| (bf16 exactly)."""
    if values.dtype == torch.bfloat16:
        return (values.view(torch.int16).to(torch.int32) & 0x7FFF) << 16
    return values.float().view(torch.int32) & 0x7FFFFFFF


def categories(abs_delta: torch.Tensor) -> torch.Tensor:
    """Update category of each coordinate (see N_CATEGORIES) as uint8."""
    return (abs_delta > 0).to(torch.uint8) + (abs_delta > HEADLINE_ATOL).to(torch.uint8)


def covered_by_atol(label_sums: torch.Tensor) -> dict[float, float]:
    """Per-category sums -> sums over the update mask of each atol."""
    return {0.0: float(label_sums[1] + label_sums[2]), HEADLINE_ATOL: float(label_sums[2])}


@dataclass
class RankSplit:
    """The `count` smallest magnitudes of a tensor, with per-label and weighted sums."""

    count: int
    key: int  # magnitude key of the count-th smallest value (the threshold)
    tie_fraction: float  # fraction of coordinates at the threshold that belong to the set
    sums: torch.Tensor  # (n_labels + n_weights,) sums over the set, float64

    def membership(self, keys: torch.Tensor) -> torch.Tensor:
        """Per-coordinate membership in the set: 1 below the threshold, tie_fraction at it."""
        below = (keys < self.key).to(torch.float32)
        return below + self.tie_fraction * (keys == self.key).to(torch.float32)


def rank_splits(values: torch.Tensor, counts: list[int], labels: torch.Tensor | None = None,
                n_labels: int = 1, weights=()) -> tuple[list[RankSplit], torch.Tensor]:
    """Sums over the `count` smallest |values| for each count, and over all coordinates.

    labels: integer tensor (same numel) in [0, n_labels): sums are counts per label.
    weights: callables slice -> float tensor of that chunk's per-coordinate weights.
    Returns (one RankSplit per count, the high-bits histogram (n_sums, HIGH_BINS) over all
    coordinates; its row sums are the totals).
    """
    flat = values.reshape(-1)
    flat_labels = labels.reshape(-1) if labels is not None else None
    n_sums = n_labels + len(weights)
    device = values.device

    def histograms(select_bin: int | None):
        # select_bin None: histogram of the high 16 bits; else of the low 16 bits in that bin
        n_bins = HIGH_BINS if select_bin is None else LOW_BINS
        hist = torch.zeros(n_sums, n_bins, dtype=torch.float64, device=device)
        for sl in chunk_slices(flat.numel()):
            key = magnitude_key(flat[sl])
            chunk_labels = flat_labels[sl] if flat_labels is not None else None
            chunk_weights = [w(sl) for w in weights]
            if select_bin is None:
                bins = key >> 16
            else:
                inside = (key >> 16) == select_bin
                bins = key[inside] & 0xFFFF
                chunk_labels = chunk_labels[inside] if chunk_labels is not None else None
                chunk_weights = [w[inside] for w in chunk_weights]
            if chunk_labels is None:
                hist[0] += torch.bincount(bins, minlength=n_bins)
            else:  # one int32 bincount over (label, bin) pairs: int64 would double the traffic
                joint = bins + chunk_labels.to(torch.int32) * n_bins
                hist[:n_labels] += torch.bincount(joint, minlength=n_bins * n_labels).view(
                    n_labels, n_bins)
            for j, weight in enumerate(chunk_weights):
                hist[n_labels + j] += torch.bincount(bins, weights=weight.double(),
                                                     minlength=n_bins)
        return hist

    high = histograms(None)
    high_counts = high[:n_labels].sum(dim=0)
    high_cumulative = high_counts.cumsum(0)
    splits = []
    low_cache: dict[int, torch.Tensor] = {}
    for count in counts:
        if count <= 0:
            splits.append(RankSplit(0, -1, 0.0, torch.zeros(n_sums, dtype=torch.float64,
                                                          device=device)))
            continue
        high_bin = int(torch.searchsorted(high_cumulative, float(count)))
        below_high = float(high_cumulative[high_bin - 1]) if high_bin > 0 else 0.0
        if high_bin not in low_cache:
            if values.dtype == torch.bfloat16:  # the high bits are the whole value
                low_cache[high_bin] = torch.zeros(n_sums, LOW_BINS, dtype=torch.float64,
                                                  device=device)
                low_cache[high_bin][:, 0] = high[:, high_bin]
            else:
                low_cache[high_bin] = histograms(high_bin)
        low = low_cache[high_bin]
        low_cumulative = low[:n_labels].sum(dim=0).cumsum(0)
        low_bin = int(torch.searchsorted(low_cumulative, float(count) - below_high))
        below = below_high + (float(low_cumulative[low_bin - 1]) if low_bin > 0 else 0.0)
        at_threshold = float(low_cumulative[low_bin]) + below_high - below
        tie_fraction = (count - below) / at_threshold
        sums = (high[:, :high_bin].sum(dim=1) + low[:, :low_bin].sum(dim=1)
                + tie_fraction * low[:, low_bin])
        splits.append(RankSplit(count, (high_bin << 16) | low_bin, tie_fraction, sums))
    return splits, high


@dataclass
class CoordinateStats:
    """Scale and sparsity sums of one delta (sums, so groups aggregate by adding)."""

    numel: int
    delta_energy: float  # ||dW||_F^2
    source_energy: float  # ||W_src||_F^2
    abs_sum: float
    linf: float
    at_most: dict[str, int]  # column name -> count of coordinates with |dW| <= threshold
    magnitude_counts: torch.Tensor  # coordinates per high-bits bin of |dW|
    magnitude_energy: torch.Tensor  # sum of dW^2 per high-bits bin of |dW|

    def coordinate_energy_shares(self) -> dict[str, float]:
        """Share of ||dW||^2 held by the top 0.1 / 1 / 5% coordinates by |dW|.

        From the |dW| histogram: the bin holding the k-th largest value contributes its energy
        pro rata; its values agree to 2^-7 relative, so the error is below 2^-6 of that
        bin's energy (a second pass for exactness would cost as much as the statistics)."""
        counts = self.magnitude_counts.flip(0)  # largest magnitudes first
        energies = self.magnitude_energy.flip(0)
        count_cumulative, energy_cumulative = counts.cumsum(0), energies.cumsum(0)
        shares = {}
        for fraction in COORD_ENERGY_FRACTIONS:
            k = max(1, round(fraction * self.numel))
            threshold_bin = int(torch.searchsorted(count_cumulative, float(k)))
            above = float(count_cumulative[threshold_bin - 1]) if threshold_bin else 0.0
            energy = float(energy_cumulative[threshold_bin - 1]) if threshold_bin else 0.0
            energy += (k - above) / float(counts[threshold_bin]) * float(energies[threshold_bin])
            shares[columns.coord_energy_name(fraction)] = \
                energy / self.delta_energy if self.delta_energy > 0 else float("nan")
        return shares

    def row(self) -> dict[str, float]:
        numel = self.numel
        return {
            columns.RELATIVE_NORM: (self.delta_energy / self.source_energy) ** 0.5
            if self.source_energy > 0 else float("nan"),
            columns.LINF: self.linf,
            columns.MEAN_ABS: self.abs_sum / numel,
            columns.RMS: (self.delta_energy / numel) ** 0.5,
            columns.DELTA_ENERGY: self.delta_energy,
            columns.SOURCE_ENERGY: self.source_energy,
            **{name: count / numel for name, count in self.at_most.items()},
            **self.coordinate_energy_shares(),
        }


def sparsity_thresholds(source_rms: float) -> dict[str, float]:
    """Column name -> |dW| threshold of every sparsity the study reports."""
    thresholds = {columns.EXACT_ZERO: 0.0}
    thresholds |= {columns.sparsity_name(eps): eps for eps in ABSOLUTE_EPS}
    thresholds |= {columns.relative_sparsity_name(tau): tau * source_rms
                   for tau in RELATIVE_TAUS}
    return thresholds


@cache
def _pair_categories(atol_bin: int, device: torch.device) -> torch.Tensor:
    """The update category (N_CATEGORIES) of each `ThresholdTable` pair, as uint8."""
    bins = torch.arange(HIGH_BINS).repeat_interleave(2)
    at_or_below = torch.arange(2 * HIGH_BINS) % 2 == 1
    changed = (bins > 0) | ~at_or_below  # |dW| > 0 (bin 0's threshold is 0)
    above_atol = (bins > atol_bin) | ((bins == atol_bin) & ~at_or_below)
    return (changed.to(torch.uint8) + above_atol.to(torch.uint8)).to(device)


class ThresholdTable:
    """Counts of |dW| <= t for a few thresholds t, from one histogram of (high-bits bin, at or
    below the bin's threshold) pairs: the bins are the |dW| bins the statistics keep anyway, and
    a coordinate in a bin that holds a threshold carries one more bit, found by one table
    lookup and one comparison (a search over the sorted thresholds costs several times more).
    A threshold sharing its bin with another (rare: bins are 2^-7 wide) is counted directly.
    The same pairs give each coordinate's update category (N_CATEGORIES) by a second lookup,
    and the histogram sums dW^2 over each pair as well (the energy per bin)."""

    def __init__(self, thresholds: dict[str, float], device: torch.device):
        self.thresholds = thresholds
        # the category's thresholds first, so that they own their bins
        values = sorted(set(thresholds.values()) | {0.0, HEADLINE_ATOL},
                        key=lambda v: (v not in (0.0, HEADLINE_ATOL), v))
        self.keys = {v: int(magnitude_key(torch.tensor([v]))[0]) for v in values}
        self.cut = torch.full((HIGH_BINS,), -1, dtype=torch.int32)  # no threshold: never below
        self.direct = []
        for value in values:
            key = self.keys[value]
            if self.cut[key >> 16] >= 0:
                self.direct.append(value)
            else:
                self.cut[key >> 16] = key
        self.category = _pair_categories(self.keys[HEADLINE_ATOL] >> 16, device)
        self.cut = self.cut.to(device)
        self.pairs = Histogram(2 * HIGH_BINS, device, weighted=True)
        self.direct_counts = torch.zeros(len(self.direct), dtype=torch.int64, device=device)

    def add(self, key: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        """Count one chunk (keys of |dW|, and dW^2); its update categories."""
        high = key >> 16
        # pair 2 x bin + (key <= cut), in int32 arithmetic (a bool operand costs ~4x more):
        # (cut - key) >> 31 is 0 at or below the cut and -1 above (no overflow: both < 2^31)
        below = self.cut.index_select(0, high).sub_(key).bitwise_right_shift_(31)
        pairs = (key >> 15).bitwise_or_(1).add_(below)
        self.pairs.add(pairs, squares)
        for i, value in enumerate(self.direct):
            self.direct_counts[i] += (key <= self.keys[value]).sum()
        return self.category.index_select(0, pairs)

    def bins(self) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
        """The count at or below each threshold (by name); per high-bits bin, the coordinates
        and the energy."""
        pairs = self.pairs.counts().view(HIGH_BINS, 2)
        bin_counts = pairs.sum(dim=1)
        below_bin = torch.cat([bin_counts.new_zeros(1), bin_counts.cumsum(0)])
        at_or_below = pairs[:, 1]
        direct = dict(zip(self.direct, self.direct_counts.tolist(), strict=True))
        counts = {}
        for name, value in self.thresholds.items():
            high = self.keys[value] >> 16
            counts[name] = direct.get(value, round(float(below_bin[high] + at_or_below[high])))
        return counts, bin_counts, self.pairs.sums().view(HIGH_BINS, 2).sum(dim=1)


STATS_CHUNK = 1 << 18  # elements: a chunk's dozen passes read 1 MB of float32 from the cache


def delta_stats(source: torch.Tensor, trained: torch.Tensor | None,
                delta: torch.Tensor | None = None,
                source_energy: float | None = None) -> tuple[torch.Tensor, CoordinateStats]:
    """The update category of every coordinate of dW = trained - source, and the
    scale/sparsity sums. dW itself is computed chunk by chunk and not kept: its later readers
    subtract as they read (`spectrum.tall_rows(trained, minus=source)`); in bf16 the two
    tensors hold the bytes of one float32 dW, and the source is held anyway. delta: dW
    already held whole (`delta_tensor`), read instead of subtracting (trained then unused).
    source_energy: ||W_src||_F^2 when known (`CoordinateMasks`), else computed here."""
    numel = source.numel()
    if source_energy is None:
        source_energy = sum_of_squares(source)
    table = ThresholdTable(sparsity_thresholds((source_energy / numel) ** 0.5), source.device)
    category = torch.empty(source.shape, dtype=torch.uint8, device=source.device)
    flat_category = category.view(-1)
    flat_source = source.reshape(-1)
    flat_trained = trained.reshape(-1) if delta is None else None
    flat_delta = delta.reshape(-1) if delta is not None else None
    buffer = torch.empty(min(numel, STATS_CHUNK), device=source.device)
    energy = abs_sum = 0.0
    linf = torch.zeros((), device=source.device)
    for sl in chunk_slices(numel, STATS_CHUNK):
        if flat_delta is not None:
            chunk = flat_delta[sl]
        else:  # cast and subtracted in place: no float32 temporaries of either tensor
            chunk = buffer[:sl.stop - sl.start].copy_(flat_trained[sl]).sub_(flat_source[sl])
        squares = chunk * chunk
        magnitude = chunk.abs()
        key = magnitude.view(torch.int32)  # magnitudes are non-negative
        flat_category[sl] = table.add(key, squares)
        energy += float64_sum(squares)
        abs_sum += float64_sum(magnitude)
        linf = torch.maximum(linf, magnitude.max())
    return category, CoordinateStats(numel, energy, source_energy, abs_sum, float(linf),
                                     *table.bins())


def delta_tensor(source: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """dW = trained - source in float32, whole, filled chunk by chunk (no whole temporaries):
    for a trajectory checkpoint, which reads it in three passes."""
    delta = torch.empty(source.shape, dtype=torch.float32, device=source.device)
    flat_delta, flat_source, flat_trained = delta.view(-1), source.reshape(-1), trained.reshape(-1)
    for sl in chunk_slices(delta.numel()):
        flat_delta[sl].copy_(flat_trained[sl]).sub_(flat_source[sl])
    return delta


PRINCIPAL_STATES = 3  # outside the principal mask, inside it, tied at its threshold
LOW_BANDS = 2 * len(MASK_RATIOS) + 1
N_CLASSES = LOW_BANDS * PRINCIPAL_STATES


@dataclass
class CoordinateMasks:
    """The source's side of every coordinate mask of one tensor: the low-magnitude masks at
    MASK_RATIOS and the principal mask at HEADLINE_RATIO. None of it depends on the trained
    checkpoint, so it is found once per source and each checkpoint only counts its labels per
    class (`count`), one bincount pass.

    A coordinate's class is band * PRINCIPAL_STATES + principal state; its band places |W_src|
    among the low-magnitude thresholds (nondecreasing with the ratio): 2c where c thresholds
    lie below it, 2c + 1 where it also sits at the next one. Coordinates tied at a threshold
    belong to a mask with its tie fraction (`rank_splits`), the two masks' tie-breaks
    independent.
    """

    classes: torch.Tensor | None  # uint8, the tensor's shape; None once counted
    low: list[tuple[int, int, float]]  # per MASK_RATIOS: (count, threshold key, tie fraction)
    principal_tie_share: float
    bin_counts: torch.Tensor  # (HIGH_BINS,) coordinates per high-bits bin of |W_src|, float64
    principal_by_exponent: torch.Tensor  # (256,) principal-mask members per exponent of |W_src|
    source_energy: float  # ||W_src||_F^2

    def count(self, labels: torch.Tensor, n_labels: int) -> torch.Tensor:
        """(n_labels, N_CLASSES) coordinates per label and class, float64, on the CPU (where
        the class weights are)."""
        flat_classes, flat_labels = self.classes.reshape(-1), labels.reshape(-1)
        joint_dtype = torch.uint8 if n_labels * N_CLASSES <= 256 else torch.int32
        table = Histogram(n_labels * N_CLASSES, labels.device)
        for sl in chunk_slices(flat_labels.numel(), STATS_CHUNK):
            table.add(flat_labels[sl].to(joint_dtype) * N_CLASSES + flat_classes[sl])
        return table.counts().view(n_labels, N_CLASSES).cpu()

    def low_weights(self, ratio: float) -> torch.Tensor:
        """(N_CLASSES,) membership of each class in the low-magnitude mask at `ratio`."""
        index = MASK_RATIOS.index(ratio)
        _, key, tie_fraction = self.low[index]
        keys = [threshold_key for _, threshold_key, _ in self.low]
        weights = torch.zeros(N_CLASSES, dtype=torch.float64)
        for band in range(LOW_BANDS):
            below, at_next = divmod(band, 2)
            if index < below:  # above this threshold
                continue
            weight = tie_fraction if at_next and key == keys[below] else 1.0
            weights[band * PRINCIPAL_STATES:(band + 1) * PRINCIPAL_STATES] = weight
        return weights

    def principal_weights(self) -> torch.Tensor:
        """(N_CLASSES,) membership of each class in the principal mask."""
        return torch.tensor([0.0, 1.0, self.principal_tie_share],
                            dtype=torch.float64).repeat(LOW_BANDS)

    def union_weights(self, ratio: float) -> torch.Tensor:
        """(N_CLASSES,) membership in the principal mask or the low-magnitude mask at `ratio`."""
        principal, low = self.principal_weights(), self.low_weights(ratio)
        return principal + low - principal * low


def coordinate_masks(source: torch.Tensor, principal_state: torch.Tensor | None = None,
                     principal_tie_share: float = 0.0) -> CoordinateMasks:
    """The masks of one source tensor. principal_state: uint8 per coordinate, 0 outside the
    principal mask, 1 inside, 2 tied at its threshold (None: no principal mask, as for a
    vector)."""
    numel = source.numel()
    splits, high = rank_splits(source, [round(r * numel) for r in MASK_RATIOS])
    low = [(split.count, split.key, split.tie_fraction) for split in splits]
    classes = torch.empty(source.shape, dtype=torch.uint8, device=source.device)
    by_exponent = torch.zeros(256, dtype=torch.float64, device=source.device)
    flat_source, flat_classes = source.reshape(-1), classes.view(-1)
    flat_state = principal_state.reshape(-1) if principal_state is not None else None
    for sl in chunk_slices(numel):
        key = magnitude_key(flat_source[sl])
        below = sum((key > threshold_key).to(torch.uint8) for _, threshold_key, _ in low)
        at_next = sum((key == threshold_key).to(torch.uint8) for _, threshold_key, _ in low)
        band = 2 * below + (at_next > 0).to(torch.uint8)
        if flat_state is None:
            flat_classes[sl] = band * PRINCIPAL_STATES
            continue
        state = flat_state[sl]
        flat_classes[sl] = band * PRINCIPAL_STATES + state
        exponent = key >> 23
        by_exponent += torch.bincount(exponent[state == 1], minlength=256)
        tied = torch.bincount(exponent[state == 2], minlength=256)
        by_exponent += principal_tie_share * tied.double()
    return CoordinateMasks(classes, low, principal_tie_share, high[0], by_exponent,
                           sum_of_squares(source))
