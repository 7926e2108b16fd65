"""Singular values of a delta, and the one decomposition of a weight matrix that geometry reuses.

Matrices are read tall (long side first, transposing wide ones: LAPACK is several times
faster on tall matrices) and in row chunks, so a 150k x 1k embedding is never copied whole.
Matrices only: a tensor of 3+ dimensions (a convolution kernel) has no spectrum here, as in the
paper's definitions.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from opdgeo.delta import columns
from opdgeo.delta.columns import (
    RANK_TOLERANCES,
    SINGULAR_VALUE_FRACTIONS,
    SPECTRAL_TOPK,
)

RANDOMIZED_OVERSAMPLING = 10
RANDOMIZED_POWER_ITERATIONS = 4
CHUNK_ELEMENTS = 1 << 24  # rows per chunk: 64 MB of float32
SMALL_MATRIX = 1 << 18  # elements: the trajectory takes every such spectrum exactly
GRAM_BLOCKS = 8  # column blocks of `upper_gram`: fewer products, still large matrix products


def rank_count(ratio: float, short_side: int) -> int:
    """Number of singular directions in the top `ratio` of a matrix: floor(ratio x min(m, n)),
    as the paper's numbers use (89 at 10% of 896), at least one. The product is rounded to
    9 digits first, so that 0.29 x 100 counts 29, not the 28 its binary value floors to."""
    return max(1, math.floor(round(ratio * short_side, 9)))


@dataclass
class TallRows:
    """A matrix read tall, in row chunks: `rows(start, stop)` returns those rows (float32)."""

    rows: Callable[[int, int], torch.Tensor]  # float32
    shape: tuple[int, int]  # (long, short)
    transposed: bool  # the tall matrix is the original's transpose

    def chunks(self, dtype: torch.dtype = torch.float32):
        # a float64 chunk is held beside its float32 rows: a quarter of the rows keeps the
        # pair at 48 MB (the shuffle null's Gram runs at the analysis's peak memory)
        elements = CHUNK_ELEMENTS if dtype == torch.float32 else CHUNK_ELEMENTS // 4
        step = max(1, elements // self.shape[1])
        for start in range(0, self.shape[0], step):
            yield start, self.rows(start, min(start + step, self.shape[0])).to(dtype)

    def whole(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


def tall_rows(tensor: torch.Tensor, minus: torch.Tensor | None = None) -> TallRows:
    """A tensor read tall in chunks; with `minus`, the difference tensor - minus
    (W_trained - W_src = dW) subtracted chunk by chunk, so it is never held whole."""
    if tensor.dim() != 2:
        raise ValueError(f"a spectrum needs a matrix, got a tensor of shape {tuple(tensor.shape)}")
    matrix, subtrahend = tensor, minus
    transposed = matrix.shape[0] < matrix.shape[1]
    if transposed:
        matrix = matrix.T
        subtrahend = subtrahend.T if subtrahend is not None else None

    def rows(start: int, stop: int) -> torch.Tensor:
        chunk = matrix[start:stop].float()  # a view when already float32: no copy
        return chunk if subtrahend is None else chunk - subtrahend[start:stop].float()

    return TallRows(rows, tuple(matrix.shape), transposed)


def gram(matrix: TallRows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Short-side Gram matrix A^T A, accumulated over row chunks."""
    total = None
    for _, chunk in matrix.chunks(dtype):
        total = chunk.T @ chunk if total is None else total.addmm_(chunk.T, chunk)
    return total


def upper_gram(matrix: TallRows, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """The upper triangle of A^T A, diagonal included (zeros below it), as `eigvalsh(...,
    UPLO="U")` reads it: each row chunk's products in float32 over `blocks` column blocks, the
    diagonal ones and those right of them only (9/16 of the products at 8 blocks), summed in
    float64."""
    short = matrix.shape[1]
    edges = [i * short // blocks for i in range(blocks + 1)]
    total = None
    for _, chunk in matrix.chunks():
        if total is None:
            total = torch.zeros(short, short, dtype=torch.float64, device=chunk.device)
        for start, stop in zip(edges[:-1], edges[1:], strict=True):
            total[start:stop, start:] += chunk[:, start:stop].T @ chunk[:, start:]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        total[start:stop, start:stop].triu_()
    return total


def randomized_svd(matrix: torch.Tensor, top: int):
    """torch.svd_lowrank for the top `top` triplets, from a fixed seed: the same matrix gives
    the same values in every run (svd_lowrank draws from the global generator)."""
    devices = [matrix.device] if matrix.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=matrix.device.type):
        torch.manual_seed(0)
        return torch.svd_lowrank(matrix, q=top + RANDOMIZED_OVERSAMPLING,
                                 niter=RANDOMIZED_POWER_ITERATIONS)


def singular_values(delta: TallRows, exact_svd_max: int) -> tuple[torch.Tensor, bool]:
    """Descending singular values (float64, CPU) and whether they are all of them.

    Float64, since numerical rank at 1e-6 * s_1 sits near float32's noise floor (~5e-7 s_1):
    a direct SVD when the matrix fits one chunk; for larger ones (embeddings) the eigenvalues
    of the float64 Gram matrix, accumulated over row chunks, since an SVD would copy the
    matrix (resolves s_i down to ~1e-7 s_1). Above `exact_svd_max`: the randomized top
    values, enough for every top-k statistic.
    """
    long, short = delta.shape
    if short > exact_svd_max:
        wanted = max(max(SPECTRAL_TOPK), rank_count(max(SINGULAR_VALUE_FRACTIONS), short))
        _, values, _ = randomized_svd(delta.whole(), wanted)
        return values[:wanted].double().cpu(), False
    if long * short <= CHUNK_ELEMENTS:
        return torch.linalg.svdvals(delta.rows(0, long).to(torch.float64)).cpu(), True
    eigenvalues = torch.linalg.eigvalsh(gram(delta, torch.float64))
    return eigenvalues.flip(0).clamp(min=0).sqrt().cpu(), True


def top_singular_values(delta: TallRows, exact_svd_max: int
                        ) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """The spectrum a trajectory checkpoint needs (top-k energy, s_1), at a fraction of the cost,
    and the Gram matrix it formed (as `upper_gram` leaves it; None where it formed none), from
    which the principal projection reads the short side's norms (`geometry.principal_projection`).

    A matrix of at most SMALL_MATRIX elements, or wider than `exact_svd_max`: as
    `singular_values`. Otherwise the float32 eigenvalues (0.6x the float64 eigensolver's
    time) of the Gram matrix with float32 chunk products (summed in float64): each s_i^2
    within ~1e-5 s_1^2 of the float64 value (measured: up to 1.2e-6), so top-k energy shares
    within ~1e-6 and stable rank within ~1e-5 relative (tested), while the values below
    ~3e-3 s_1 are float32 noise: the spectrum counts as a top part (complete False), its
    top-k energies shares of the exact ||dW||_F^2, and the numerical and effective ranks are
    not given. A randomized top-k SVD is no cheaper at these k (up to 10% of the short side,
    inside the bulk of an update's spectrum) and misses top-k energies by 1e-4 to 1e-2.
    """
    long, short = delta.shape
    if long * short <= SMALL_MATRIX or short > exact_svd_max:
        return *singular_values(delta, exact_svd_max), None
    upper = upper_gram(delta)
    eigenvalues = torch.linalg.eigvalsh(upper.float(), UPLO="U")
    return eigenvalues.double().flip(0).clamp(min=0).sqrt().cpu(), False, upper


def spectrum_metrics(values: torch.Tensor, short_side: int, frobenius_energy: float,
                     complete: bool) -> dict[str, float]:
    """Top-k energy, stable rank, entropy effective rank, numerical rank of one spectrum.

    With a complete spectrum the energies are shares of sum s_i^2; with a randomized top part
    they are shares of ||dW||_F^2, and the metrics that need every value are NaN.
    """
    nan = float("nan")
    energy = float((values**2).sum()) if complete else frobenius_energy
    metrics: dict[str, float] = {}
    if energy <= 0 or float(values[0]) <= 0:  # no update: no spectrum, no rank (not rank 0)
        return metrics
    cumulative = (values**2).cumsum(0) / energy
    for k in SPECTRAL_TOPK:
        index = min(k, short_side) - 1
        metrics[columns.top_energy_name(k)] = \
            float(cumulative[index]) if index < len(values) else nan
    for fraction in SINGULAR_VALUE_FRACTIONS:
        k = rank_count(fraction, short_side)
        metrics[columns.sv_energy_name(fraction)] = \
            float(cumulative[k - 1]) if k <= len(values) else nan
    metrics[columns.STABLE_RANK] = energy / float(values[0]) ** 2
    if complete:
        weights = values / values.sum()
        weights = weights[weights > 0]
        metrics[columns.EFFECTIVE_RANK] = math.exp(float(-(weights * weights.log()).sum()))
    else:
        metrics[columns.EFFECTIVE_RANK] = nan
    for tol in RANK_TOLERANCES:
        rank = float((values > tol * values[0]).sum()) if complete else nan
        metrics[columns.numerical_rank_name(tol)] = rank
        metrics[columns.rank_fraction_name(tol)] = rank / short_side
    return metrics


@dataclass
class Decomposition:
    """Top singular triplets of a matrix, W ~ left @ diag(values) @ right.T (original
    orientation, float32 vectors; `values` float64, all of them when exact)."""

    values: torch.Tensor
    left: torch.Tensor  # (m, k)
    right: torch.Tensor  # (n, k)


def decompose(matrix: TallRows, top: int, exact_svd_max: int) -> Decomposition:
    """Top-`top` singular triplets.

    Exact route: eigendecomposition of the short-side Gram matrix, then the long-side vectors
    as A v / s for the top directions only: a third of an SVD's time and no copy of the
    matrix. Float32 squares the condition number, which costs accuracy only in the small
    singular values; geometry uses the top 20%, whose vectors and values come out accurate
    to ~1e-6 relative. Above `exact_svd_max`: randomized top-k SVD.
    """
    if matrix.shape[1] <= exact_svd_max:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram(matrix))
        values = eigenvalues.flip(0).clamp(min=0).sqrt()
        short_vectors = eigenvectors.flip(1)[:, :top]
        inverse = 1 / values[:top].clamp(min=torch.finfo(torch.float32).tiny)
        long_vectors = torch.cat([chunk @ short_vectors for _, chunk in matrix.chunks()]) * inverse
    else:
        long_vectors, values, short_vectors = randomized_svd(matrix.whole(), top)
        long_vectors, short_vectors, values = long_vectors[:, :top], short_vectors[:, :top], \
            values[:top]
    long_vectors, short_vectors = long_vectors.contiguous(), short_vectors.contiguous()
    if matrix.transposed:
        return Decomposition(values.double(), short_vectors, long_vectors)
    return Decomposition(values.double(), long_vectors, short_vectors)
