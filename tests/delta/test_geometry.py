"""Source geometry on constructed sources: W_src = U S V^T with known U, S, V."""

import math

import pytest
import torch

from opdgeo.delta import spectrum
from opdgeo.delta.geometry import principal_magnitudes, principal_projection, rotation_and_drift
from opdgeo.delta.metrics import rank_splits
from opdgeo.delta.spectrum import decompose, rank_count, tall_rows, upper_gram

ROWS, COLS = 120, 80
K10 = rank_count(0.10, COLS)


def orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))[0]


@pytest.fixture
def source():
    generator = torch.Generator().manual_seed(0)
    left, right = orthogonal(ROWS, generator), orthogonal(COLS, generator)  # left: all ROWS
    values = torch.linspace(3.0, 0.1, COLS, dtype=torch.float64)  # distinct: subspaces defined
    return left, values, right


def weight(source) -> torch.Tensor:
    left, values, right = source
    return (left[:, :COLS] * values @ right.T).float()


def projections(source, delta) -> dict[str, float]:
    decomposition = decompose(tall_rows(weight(source)), rank_count(0.2, COLS), 4096)
    return principal_projection(tall_rows(delta.float()), decomposition)


def test_delta_inside_the_principal_subspace_projects_fully(source):
    left, _, right = source
    core = torch.randn(K10, K10, dtype=torch.float64)
    metrics = projections(source, left[:, :K10] @ core @ right[:, :K10].T)
    assert metrics["principal_projection_10pct"] == pytest.approx(1, abs=1e-5)
    assert metrics["principal_projection_left_10pct"] == pytest.approx(1, abs=1e-5)
    assert metrics["principal_projection_right_10pct"] == pytest.approx(1, abs=1e-5)


def test_delta_orthogonal_to_the_principal_subspace_projects_to_zero(source):
    left, _, right = source
    core = torch.randn(COLS - K10, COLS - K10, dtype=torch.float64)
    metrics = projections(source, left[:, K10:COLS] @ core @ right[:, K10:].T)
    assert metrics["principal_projection_10pct"] == pytest.approx(0, abs=1e-5)
    assert metrics["principal_projection_left_10pct"] == pytest.approx(0, abs=1e-5)


def test_left_only_delta_is_seen_by_the_left_projection_alone(source):
    left, _, right = source
    delta = left[:, :K10] @ torch.randn(K10, COLS - K10, dtype=torch.float64) @ right[:, K10:].T
    metrics = projections(source, delta)
    assert metrics["principal_projection_left_10pct"] == pytest.approx(1, abs=1e-5)
    assert metrics["principal_projection_right_10pct"] == pytest.approx(0, abs=1e-5)
    assert metrics["principal_projection_10pct"] == pytest.approx(0, abs=1e-5)
    # the same, transposed: left and right swap (wide matrices are read transposed)
    transposed = projections((right, source[1], left[:, :COLS]), delta.T)
    assert transposed["principal_projection_right_10pct"] == pytest.approx(1, abs=1e-5)


def test_rotation_is_zero_without_change_and_grows_with_mixing(source):
    left, values, right = source
    decomposition = decompose(tall_rows(weight(source)), K10, 4096)
    same = rotation_and_drift(decomposition, decompose(tall_rows(weight(source)), K10, 4096),
                              COLS)
    assert same["subspace_rotation_10pct"] == pytest.approx(0, abs=1e-6)
    assert same["singular_value_drift_10pct"] == 0
    # rotate direction K10-1 (inside) towards one outside the column space by angle theta
    theta = 0.3
    rotated = left[:, :COLS].clone()
    rotated[:, K10 - 1] = math.cos(theta) * left[:, K10 - 1] + math.sin(theta) * left[:, -1]
    moved = decompose(tall_rows((rotated * values @ right.T).float()), K10, 4096)
    metrics = rotation_and_drift(decomposition, moved, COLS)
    # one principal angle of theta, the other k - 1 zero
    assert metrics["subspace_rotation_10pct"] == pytest.approx(math.sin(theta) / K10, rel=1e-3)


def test_principal_mask_is_the_top_coordinates_of_the_rank_k_part(source):
    k = K10
    magnitudes = principal_magnitudes(decompose(tall_rows(weight(source)), k, 4096), k,
                                      (ROWS, COLS))
    left, values, right = source
    expected = (left[:, :k] * values[:k] @ right[:, :k].T).abs().float()
    torch.testing.assert_close(magnitudes, expected, rtol=1e-4, atol=1e-6)
    count = round(0.1 * ROWS * COLS)
    top = torch.zeros(ROWS * COLS, dtype=torch.long)
    top[expected.reshape(-1).topk(count).indices] = 1
    (rest,), high = rank_splits(magnitudes, [ROWS * COLS - count], labels=top, n_labels=2)
    covered = high.sum(dim=1) - rest.sums  # per label, inside the top-10% mask
    assert float(covered[1]) == pytest.approx(count, abs=1e-6)


def test_principal_projection_counts_floor_of_ratio_directions():
    # 10% of 87 columns is 8.7: the top 8 directions, so a delta in the 9th is outside
    rows, cols = 100, 87
    generator = torch.Generator().manual_seed(3)
    left, right = orthogonal(rows, generator)[:, :cols], orthogonal(cols, generator)
    values = torch.linspace(3.0, 0.1, cols, dtype=torch.float64)
    decomposition = decompose(tall_rows((left * values @ right.T).float()), rank_count(0.2, cols),
                              4096)
    ninth = torch.outer(left[:, 8], right[:, 8]).float()
    metrics = principal_projection(tall_rows(ninth), decomposition)
    assert metrics["principal_projection_10pct"] == pytest.approx(0, abs=1e-5)
    assert metrics["principal_projection_20pct"] == pytest.approx(1, abs=1e-5)  # k = 17


@pytest.mark.parametrize("wide", [False, True])  # wide: read transposed, short vectors = left
def test_projection_reads_the_short_side_from_the_gram_as_from_the_rows(source, wide,
                                                                        monkeypatch):
    # a trajectory checkpoint passes the Gram its spectrum formed: every side at every ratio
    # as from the rows (an update mixing inside and outside the subspaces on both sides)
    generator = torch.Generator().manual_seed(4)
    left, values, right = source
    delta = (left[:, :K10] @ torch.randn(K10, COLS, generator=generator, dtype=torch.float64)
             @ right.T + 0.3 * torch.randn(ROWS, COLS, generator=generator,
                                             dtype=torch.float64)).float()
    matrix = weight(source)
    if wide:
        matrix, delta = matrix.T.contiguous(), delta.T.contiguous()
    decomposition = decompose(tall_rows(matrix), rank_count(0.2, COLS), 4096)
    monkeypatch.setattr(spectrum, "CHUNK_ELEMENTS", 1000)  # several row chunks, summed
    rows = tall_rows(delta)
    direct = principal_projection(rows, decomposition)
    from_gram = principal_projection(rows, decomposition, gram=upper_gram(rows))
    assert from_gram.keys() == direct.keys()
    for key, value in direct.items():
        assert from_gram[key] == pytest.approx(value, rel=1e-6), key
    for side in ("left", "right"):  # not a trivial case
        assert 0.05 < direct[f"principal_projection_{side}_10pct"] < 0.95, side
