"""The delta against the source's singular geometry: projections, rotation, principal masks.

All of it reuses one `Decomposition` of W_src (and one of W_trained for the rotation).
"""

import torch

from opdgeo.delta.columns import (
    MASK_RATIOS,
    PROJECTION_SIDES,
    ROTATION_RATIO,
    SINGULAR_VALUE_DRIFT,
    SUBSPACE_ROTATION,
    projection_name,
)
from opdgeo.delta.metrics import CHUNK, float64_sum
from opdgeo.delta.spectrum import Decomposition, TallRows, rank_count


def principal_projection(delta: TallRows, source: Decomposition,
                         ratios: tuple[float, ...] = MASK_RATIOS,
                         energy: float | None = None,
                         gram: torch.Tensor | None = None) -> dict[str, float]:
    """Share of ||dW||^2 inside the top-k singular subspaces of W_src, for every ratio.

    joint = ||U_k^T dW V_k||^2, left = ||U_k^T dW||^2, right = ||dW V_k||^2, each over
    ||dW||^2 (`energy` when known, else summed in the same pass). One pass over dW's rows with
    the largest k serves every smaller k.
    gram: the upper triangle of the tall dW's Gram matrix G = A^T A when already formed
    (`spectrum.upper_gram`, float64): the short side's norms ||A r||^2 are then r^T G r =
    2 r^T U r - sum_i G_ii r_i^2 (U the triangle), in float64, instead of a second product of
    every row chunk (the embedding's 151936 x 896 by 89 vectors); they agree to ~3e-8
    relative (tested).
    """
    top = rank_count(max(ratios), delta.shape[1])
    long_vectors, short_vectors = (source.right, source.left) if delta.transposed \
        else (source.left, source.right)
    long_vectors, short_vectors = long_vectors[:, :top], short_vectors[:, :top]
    summed = 0.0
    long_part = torch.zeros(long_vectors.shape[1], delta.shape[1],
                            device=long_vectors.device)  # L^T A
    short_norms = torch.zeros(short_vectors.shape[1], dtype=torch.float64,
                              device=long_vectors.device)  # column norms^2 of A R
    for start, chunk in delta.chunks():
        if energy is None:
            summed += float64_sum(chunk * chunk)
        long_part.addmm_(long_vectors[start:start + len(chunk)].T, chunk)
        if gram is None:
            short_norms += ((chunk @ short_vectors) ** 2).sum(dim=0, dtype=torch.float64)
    if gram is not None:
        short_float64 = short_vectors.double()
        short_norms = 2 * ((gram @ short_float64) * short_float64).sum(dim=0) - (
            gram.diagonal()[:, None] * short_float64**2).sum(dim=0)
    joint_part = (long_part @ short_vectors).double()
    long_cumulative = (long_part.double() ** 2).sum(dim=1).cumsum(0)
    short_cumulative = short_norms.cumsum(0)
    left_cumulative, right_cumulative = (short_cumulative, long_cumulative) if delta.transposed \
        else (long_cumulative, short_cumulative)
    energy = summed if energy is None else energy
    metrics = {}
    for ratio in ratios:
        k = rank_count(ratio, delta.shape[1])
        if energy == 0:
            joint = left = right = float("nan")
        else:
            joint = float((joint_part[:k, :k] ** 2).sum()) / energy
            left = float(left_cumulative[k - 1]) / energy
            right = float(right_cumulative[k - 1]) / energy
        for side, value in zip(PROJECTION_SIDES, (joint, left, right), strict=True):
            metrics[projection_name(ratio, side)] = value
    return metrics


def rotation_and_drift(source: Decomposition, trained: Decomposition,
                       short_side: int) -> dict[str, float]:
    """Mean sine of the principal angles between the top-k left subspaces of W_src and
    W_trained, and the relative drift of their top-k singular values (k = 10%).

    Sines are the singular values of the part of U_trained outside U_src, from its k x k Gram
    matrix in float64 accumulated over row chunks (an embedding's U is 150k rows): stable
    for tiny angles, where 1 - cos^2 would cancel.
    """
    k = rank_count(ROTATION_RATIO, short_side)
    source_left, trained_left = source.left[:, :k], trained.left[:, :k]
    step = max(1, CHUNK // k)
    row_chunks = [slice(start, start + step) for start in range(0, len(source_left), step)]
    cosines = sum(source_left[rows].double().T @ trained_left[rows].double()
                  for rows in row_chunks)
    outside_gram = 0
    for rows in row_chunks:
        outside = trained_left[rows].double() - source_left[rows].double() @ cosines
        outside_gram = outside_gram + outside.T @ outside
    sines = torch.linalg.eigvalsh(outside_gram).clamp(min=0, max=1).sqrt()
    drift = torch.linalg.vector_norm(trained.values[:k] - source.values[:k])
    return {
        SUBSPACE_ROTATION: float(sines.mean()),
        SINGULAR_VALUE_DRIFT: float(drift / torch.linalg.vector_norm(source.values[:k])),
    }


def principal_magnitudes(source: Decomposition, k: int, shape: tuple[int, int]) -> torch.Tensor:
    """|U_k S_k V_k^T|, the source's rank-k part, built in row chunks into one buffer."""
    out = torch.empty(shape, dtype=torch.float32, device=source.left.device)
    scaled_right = (source.right[:, :k] * source.values[:k].float().to(source.right.device)).T
    step = max(1, CHUNK // shape[1])
    for start in range(0, shape[0], step):
        rows = slice(start, start + step)
        torch.matmul(source.left[rows, :k], scaled_right, out=out[rows])
    return out.abs_()
