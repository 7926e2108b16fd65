"""The source geometry decomposed once: the cached and uncached paths give the same numbers,
and a trajectory checkpoint's measures match the full analysis's."""

import math

import pandas as pd
import pytest
import torch
from delta_checkpoints import perturbed, save_checkpoint, small_model

from opdgeo.delta import analyze, cli, source
from opdgeo.delta.analyze import analyze_checkpoints, analyze_trajectory
from opdgeo.delta.columns import SPECTRAL_TOPK, flatten
from opdgeo.delta.source import write_geometry
from opdgeo.delta.spectrum import (
    SMALL_MATRIX,
    singular_values,
    spectrum_metrics,
    tall_rows,
    top_singular_values,
)

ROWS, COLS = 1200, 300  # above SMALL_MATRIX elements: the trajectory's float32 Gram route


def low_rank_plus_noise(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    update = torch.randn(ROWS, 6, generator=generator) @ torch.randn(6, COLS,
                                                                     generator=generator)
    return 1e-4 * update + 2e-5 * torch.randn(ROWS, COLS, generator=generator)


BIG = "model.layers.0.mlp.up_proj.weight"


def source_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    big = (torch.randn(ROWS, COLS, generator=generator) * 0.02).bfloat16()
    return small_model(hidden=32) | {BIG: big}


def trained_tensors(seed: int) -> dict[str, torch.Tensor]:
    tensors = source_tensors()
    return perturbed(tensors, seed) | {
        BIG: (tensors[BIG].float() + low_rank_plus_noise(seed)).bfloat16()}


MATRICES = sum(1 for value in source_tensors().values() if value.dim() == 2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    save_checkpoint(root / "source", source_tensors())
    trained = trained_tensors(1)
    save_checkpoint(root / "trained", trained)
    save_checkpoint(root / "fp32", {name: value.float() + 1e-6 for name, value in trained.items()})
    return root


def tables(out) -> pd.DataFrame:
    return pd.read_csv(out / "tensors.csv")


@pytest.mark.parametrize("exact_svd_max", [4096, 20])  # 20: the randomized route too
def test_cached_geometry_gives_the_numbers_of_the_uncached_analysis(pair, tmp_path,
                                                                    exact_svd_max):
    options = {"device": "cpu", "exact_svd_max": exact_svd_max,
               "fp32_trained": pair / "fp32" / "model.safetensors"}
    analyze_checkpoints(pair / "source", pair / "trained", tmp_path / "direct", **options)
    count = write_geometry(pair / "source", tmp_path / "geometry",
                           exact_svd_max=exact_svd_max)
    assert count == MATRICES
    analyze_checkpoints(pair / "source", pair / "trained", tmp_path / "cached",
                        geometry=tmp_path / "geometry", **options)
    pd.testing.assert_frame_equal(tables(tmp_path / "direct"), tables(tmp_path / "cached"),
                                  check_exact=False, rtol=1e-6, atol=1e-12)


def test_a_geometry_of_other_settings_or_another_source_is_refused(pair, tmp_path):
    write_geometry(pair / "source", tmp_path / "geometry", exact_svd_max=4096)
    with pytest.raises(ValueError, match="decompose the source again"):
        analyze_checkpoints(pair / "source", pair / "trained", None, device="cpu",
                            exact_svd_max=64, geometry=tmp_path / "geometry")
    other = save_checkpoint(tmp_path / "other", small_model(hidden=16))
    write_geometry(other, tmp_path / "other-geometry")
    with pytest.raises(ValueError, match="decompose this source"):
        analyze_checkpoints(pair / "source", pair / "trained", None, device="cpu",
                            geometry=tmp_path / "other-geometry")
    with pytest.raises(FileNotFoundError, match="opdgeo decompose"):
        analyze_checkpoints(pair / "source", pair / "trained", None, device="cpu",
                            geometry=tmp_path / "missing")


def test_a_geometry_folder_reads_back_every_source_fact_bit_for_bit(pair, tmp_path):
    write_geometry(pair / "source", tmp_path / "geometry")
    tensor = source_tensors()[BIG]
    direct = source.source_geometry(tensor, 4096)
    cached = source.GeometryFolder(tmp_path / "geometry", "bf16", 4096).load(
        BIG, tuple(tensor.shape), torch.device("cpu"))
    for name in ("classes", "bin_counts", "principal_by_exponent"):
        assert torch.equal(getattr(direct.masks, name), getattr(cached.masks, name)), name
    for name in ("low", "principal_tie_share", "source_energy"):
        assert getattr(direct.masks, name) == getattr(cached.masks, name), name
    for name in ("values", "left", "right"):
        assert torch.equal(getattr(direct.decomposition, name),
                           getattr(cached.decomposition, name)), name
    # a folder of an earlier format is decomposed again, not misread
    index = tmp_path / "geometry" / source.INDEX
    index.write_text(index.read_text().replace(f'"format": {source.FORMAT}', '"format": 1'))
    with pytest.raises(ValueError, match="decompose the source again"):
        analyze_checkpoints(pair / "source", pair / "trained", None, device="cpu",
                            geometry=tmp_path / "geometry")


@pytest.mark.parametrize("kind", ["low rank + noise", "isotropic", "sparse low rank"])
def test_float32_gram_spectrum_matches_the_exact_top_metrics(kind):
    generator = torch.Generator().manual_seed(3)
    delta = {"low rank + noise": lambda: low_rank_plus_noise(2),
             "isotropic": lambda: torch.randn(ROWS, COLS, generator=generator),
             # a low-rank update on 20% of the coordinates: most of its energy in the bulk
             "sparse low rank": lambda: low_rank_plus_noise(2) * (
                 torch.rand(ROWS, COLS, generator=generator) < 0.2)}[kind]()
    assert delta.numel() > SMALL_MATRIX
    exact, complete = singular_values(tall_rows(delta), 4096)
    top, top_complete, _ = top_singular_values(tall_rows(delta), 4096)
    assert complete and not top_complete
    assert float((top**2 - exact**2).abs().max()) < 1e-5 * float(exact[0]) ** 2
    energy = float((delta.double() ** 2).sum())
    reference = spectrum_metrics(exact, COLS, energy, complete)
    metrics = spectrum_metrics(top, COLS, energy, top_complete)
    for k in SPECTRAL_TOPK:
        assert metrics[f"top{k}_energy"] == pytest.approx(reference[f"top{k}_energy"], abs=1e-6)
    assert metrics["stable_rank"] == pytest.approx(reference["stable_rank"], rel=1e-5)
    assert math.isnan(metrics["numerical_rank_1e-5"]) and math.isnan(metrics["effective_rank"])


def assert_trajectory_measures_match(light: dict, full: dict) -> None:
    """A trajectory checkpoint's summary against the full analysis's (TRAJECTORY_NOTE)."""
    exact = [key for key, value in full.items() if isinstance(value, float) and (
        key.startswith(("relative_norm", "sparsity_", "low_magnitude_", "principal_coverage",
                        "combined_", "rounding_null_", "coord_energy"))
        or key.startswith("principal_projection") and "_10pct" in key)]
    assert "principal_projection_10pct_median" in exact and "principal_coverage_10pct" in exact
    for key in exact:
        assert light[key] == pytest.approx(full[key], rel=1e-6, abs=1e-12), key
    for key in ("top16_energy_median", "stable_rank_median", "top1_energy_median"):
        assert light[key] == pytest.approx(full[key], rel=1e-5), key


def test_trajectory_measures_match_the_full_analysis(pair, tmp_path):
    full = analyze_checkpoints(pair / "source", pair / "trained", tmp_path / "full",
                               device="cpu")
    light = analyze_checkpoints(pair / "source", pair / "trained", tmp_path / "light",
                                device="cpu", trajectory=True)
    assert_trajectory_measures_match(light, full)
    # the matrix above SMALL_MATRIX: its ranks are not given; the small ones: exact
    rows = tables(tmp_path / "light").set_index("name")
    big = rows.loc["model.layers.0.mlp.up_proj.weight"]
    assert pd.isna(big["numerical_rank_1e-5"]) and pd.isna(big["effective_rank"])
    small = rows.loc["model.layers.0.self_attn.q_proj.weight"]
    reference = tables(tmp_path / "full").set_index("name").loc[small.name]
    assert small["numerical_rank_1e-5"] == reference["numerical_rank_1e-5"]
    assert "isotropic_null_principal_projection_10pct_median" not in light
    assert "subspace_rotation_10pct_median" not in light


def test_a_trajectory_decomposes_the_source_once(pair, tmp_path, monkeypatch):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / "checkpoints" / f"step-{step}", trained_tensors(step))
    calls = []
    original = source.source_geometry
    monkeypatch.setattr(source, "source_geometry",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    monkeypatch.setattr(analyze, "source_geometry", lambda *args, **kwargs: pytest.fail(
        "a trajectory checkpoint decomposed the source"))
    steps = analyze_trajectory(pair / "source", tmp_path / "checkpoints", device="cpu")
    assert len(calls) == MATRICES
    assert sorted(steps["step"].unique()) == [1, 2, 3]
    assert set(steps.loc[steps["metric"] == "trajectory", "value"]) == {1.0}


def test_a_trajectory_read_tensor_by_tensor_gives_each_checkpoint_its_own_analysis(pair,
                                                                                    tmp_path):
    # each source tensor is read once for all checkpoints: every step's summary is the one
    # its checkpoint gets alone, and its exact measures the full analysis's
    steps = {1: trained_tensors(1), 2: trained_tensors(2), 3: source_tensors()}  # 3: no update
    for step, tensors in steps.items():
        save_checkpoint(tmp_path / "checkpoints" / f"step-{step}", tensors)
    write_geometry(pair / "source", tmp_path / "geometry")
    trajectory = analyze_trajectory(pair / "source", tmp_path / "checkpoints",
                                    tmp_path / "geometry", device="cpu")
    for step in steps:
        checkpoint = tmp_path / "checkpoints" / f"step-{step}"
        alone = flatten(analyze_checkpoints(pair / "source", checkpoint, None, device="cpu",
                                            geometry=tmp_path / "geometry", trajectory=True))
        read = trajectory[trajectory["step"] == step].set_index("metric")["value"]
        assert sorted(read.index) == sorted(alone)
        for metric, value in alone.items():
            if metric != "seconds":
                assert read[metric] == value or math.isnan(value) and math.isnan(read[metric]), \
                    (step, metric)
    assert_trajectory_measures_match(
        analyze_checkpoints(pair / "source", tmp_path / "checkpoints" / "step-2", None,
                            device="cpu", trajectory=True),
        analyze_checkpoints(pair / "source", tmp_path / "checkpoints" / "step-2", None,
                            device="cpu"))


def test_cli_decompose_then_analyze_with_the_geometry(pair, tmp_path, capsys):
    cli.main(["decompose", "--source", str(pair / "source"), "--out", str(tmp_path / "geo"),
              "--device", "cpu"])
    assert "matrices" in capsys.readouterr().out
    cli.main(["analyze", "--source", str(pair / "source"), "--trained", str(pair / "trained"),
              "--out", str(tmp_path / "cached"), "--device", "cpu", "--no-nulls",
              "--source-geometry", str(tmp_path / "geo")])
    cli.main(["analyze", "--source", str(pair / "source"), "--trained", str(pair / "trained"),
              "--out", str(tmp_path / "direct"), "--device", "cpu", "--no-nulls"])
    pd.testing.assert_frame_equal(tables(tmp_path / "direct"), tables(tmp_path / "cached"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (--device cuda)")
def test_cuda_analysis_gives_the_cpu_numbers(pair, tmp_path):
    cpu = analyze_checkpoints(pair / "source", pair / "trained", tmp_path / "cpu",
                              device="cpu")
    cuda = analyze_checkpoints(pair / "source", pair / "trained", tmp_path / "cuda",
                               device="cuda")
    pd.testing.assert_frame_equal(tables(tmp_path / "cpu"), tables(tmp_path / "cuda"),
                                  check_exact=False, rtol=1e-4, atol=1e-6)
    assert cpu["relative_norm"] == pytest.approx(cuda["relative_norm"], rel=1e-6)
