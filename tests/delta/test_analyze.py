"""End to end: analyze_checkpoints on tiny checkpoints written to disk."""

import json

import pandas as pd
import pytest
import torch
from delta_checkpoints import perturbed, save_checkpoint, small_model

from opdgeo.delta import analyze
from opdgeo.delta.analyze import analyze_checkpoints

REQUIRED_KEYS = (
    "relative_norm", "sparsity_atol_1e-5", "exact_zero_fraction", "sparsity_rel_1e-3",
    "top16_energy_median", "stable_rank_median", "numerical_rank_fraction_median",
    "principal_projection_1pct_median", "principal_projection_10pct_median",
    "principal_projection_20pct_median", "principal_coverage_10pct",
    "low_magnitude_coverage_10pct", "low_magnitude_enrichment_10pct", "block_energy_share",
    "dtype", "tensor_count", "num_params",
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    source = small_model()
    save_checkpoint(root / "source", source)
    save_checkpoint(root / "trained", perturbed(source))
    return root


def test_outputs_and_summary_keys(pair, tmp_path):
    result = analyze_checkpoints(pair / "source", pair / "trained", tmp_path / "out",
                                 device="cpu", nulls=False)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(["tensors.csv", "layers.csv", "modules.csv", "blocks.csv",
                            "layer_module.csv", "summary.json", "summary.md"])
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == result
    for key in REQUIRED_KEYS:
        assert key in result, key
    assert result["tensor_count"] == len(small_model())
    assert sum(result["block_energy_share"].values()) == pytest.approx(1)
    tensors = pd.read_csv(tmp_path / "out" / "tensors.csv")
    assert list(tensors.columns[:6]) == ["name", "layer", "module", "block", "shape", "numel"]
    fractions = [c for c in tensors.columns if "sparsity" in c or "_coverage_" in c]
    assert ((tensors[fractions].fillna(0) >= 0) & (tensors[fractions].fillna(0) <= 1)).all().all()
    blocks = pd.read_csv(tmp_path / "out" / "blocks.csv")
    assert blocks["energy_share"].sum() == pytest.approx(1)
    assert blocks["numel"].sum() == result["num_params"]
    layer_module = pd.read_csv(tmp_path / "out" / "layer_module.csv")
    assert set(layer_module["layer"]) == {0, 1}


def test_bf16_analysis_equals_fp32_analysis_of_the_same_values(tmp_path):
    source, trained = small_model(layers=1), perturbed(small_model(layers=1))
    save_checkpoint(tmp_path / "source", source)
    save_checkpoint(tmp_path / "trained", trained)
    bf16 = analyze_checkpoints(tmp_path / "source", tmp_path / "trained", tmp_path / "bf16",
                               dtype="bf16", device="cpu", nulls=False)
    save_checkpoint(tmp_path / "source32", {k: v.float() for k, v in source.items()})
    save_checkpoint(tmp_path / "trained32", {k: v.float() for k, v in trained.items()})
    fp32 = analyze_checkpoints(tmp_path / "source32", tmp_path / "trained32", tmp_path / "fp32",
                               dtype="fp32", device="cpu", nulls=False)
    ignore = {"dtype", "source", "trained", "seconds"}
    assert {k: v for k, v in bf16.items() if k not in ignore} == \
        {k: v for k, v in fp32.items() if k not in ignore}
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "bf16" / "tensors.csv"),
                                  pd.read_csv(tmp_path / "fp32" / "tensors.csv"))


def test_delta_on_the_smallest_source_coordinates_has_low_magnitude_coverage_one(tmp_path):
    generator = torch.Generator().manual_seed(5)
    source = (torch.randn(60, 40, generator=generator) * 0.02).bfloat16()
    magnitudes = source.float().abs()
    # every coordinate strictly below the 8th percentile: inside the bottom-10% mask
    smallest = magnitudes < magnitudes.reshape(-1).kthvalue(round(0.08 * source.numel())).values
    trained = (source.float() + 0.01 * smallest).bfloat16()
    save_checkpoint(tmp_path / "source", {"model.layers.0.mlp.up_proj.weight": source})
    save_checkpoint(tmp_path / "trained", {"model.layers.0.mlp.up_proj.weight": trained})
    result = analyze_checkpoints(tmp_path / "source", tmp_path / "trained", tmp_path / "out",
                                 device="cpu", nulls=False)
    assert result["low_magnitude_coverage_10pct"] == 1
    assert result["low_magnitude_enrichment_10pct"] == pytest.approx(10)
    assert result["low_magnitude_coverage_1pct"] == pytest.approx(
        round(0.01 * source.numel()) / smallest.sum().item())
    assert result["sparsity_atol_1e-5"] == pytest.approx(1 - smallest.float().mean().item())


def test_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    pair = tmp_path / "pair"
    save_checkpoint(pair / "source", small_model(layers=1))
    save_checkpoint(pair / "trained", perturbed(small_model(layers=1)))
    out = tmp_path / "out"
    analyze_checkpoints(pair / "source", pair / "trained", out, device="cpu", nulls=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return original(*args, **kwargs)

    original = analyze.analyze_tensor
    monkeypatch.setattr(analyze, "analyze_tensor", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        analyze_checkpoints(pair / "source", pair / "trained", out, device="cpu", nulls=False)
    monkeypatch.setattr(analyze, "analyze_tensor", original)

    def failing_write(result):
        raise OSError("disk full")

    monkeypatch.setattr(analyze, "summary_markdown", failing_write)  # fails mid-writing
    with pytest.raises(OSError, match="disk full"):
        analyze_checkpoints(pair / "source", pair / "trained", out, device="cpu", nulls=False)
    with pytest.raises(OSError, match="disk full"):
        analyze_checkpoints(pair / "source", pair / "trained", tmp_path / "fresh", device="cpu",
                            nulls=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # previous output intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pair"]  # no temp dirs


def test_a_named_run_is_the_first_column_of_every_table_and_in_the_summary(pair, tmp_path):
    """The pipeline collects its tables from these columns, never from folder names."""
    result = analyze_checkpoints(pair / "source", pair / "trained", tmp_path / "out",
                                 device="cpu", nulls=False, run="r1")
    assert result["run"] == "r1"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["run"] == "r1"
    for table in ("tensors", "layers", "modules", "blocks", "layer_module"):
        frame = pd.read_csv(tmp_path / "out" / f"{table}.csv")
        assert frame.columns[0] == "run" and (frame["run"] == "r1").all(), table


def test_tensors_of_three_or_more_dimensions_stay_out_of_the_2d_measures(tmp_path):
    """A Conv3d patch embedding (a VL tower's) gets its own row with coordinate measures only;
    every 2-D measure of the summary is the one of the matrices alone, and the summary names
    the tensor."""
    generator = torch.Generator().manual_seed(3)
    matrices = {"model.layers.0.mlp.up_proj.weight": torch.randn(48, 32, generator=generator),
                "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32,
                                                                      generator=generator)}
    conv = {"visual.patch_embed.proj.weight": torch.randn(16, 3, 2, 4, 4, generator=generator)}
    results = {}
    for name, tensors in (("matrices", matrices), ("with_conv", matrices | conv)):
        source = {k: (v * 0.02).bfloat16() for k, v in tensors.items()}
        save_checkpoint(tmp_path / name / "source", source)
        save_checkpoint(tmp_path / name / "trained", perturbed(source))
        results[name] = analyze_checkpoints(tmp_path / name / "source",
                                            tmp_path / name / "trained", tmp_path / name / "out",
                                            device="cpu", nulls=False)
    alone, mixed = results["matrices"], results["with_conv"]
    assert mixed["matrix_count"] == 2 and mixed["tensor_count"] == 3
    assert mixed["higher_dim_tensors"] == {"visual.patch_embed.proj.weight": "16x3x2x4x4"}
    for key in ("top16_energy_median", "stable_rank_median", "numerical_rank_fraction_median",
                "principal_projection_10pct_median", "principal_coverage_10pct",
                "low_magnitude_coverage_10pct"):
        assert mixed[key] == pytest.approx(alone[key], rel=1e-12), key
    assert mixed["relative_norm"] != pytest.approx(alone["relative_norm"])  # counted there
    tensors = pd.read_csv(tmp_path / "with_conv" / "out" / "tensors.csv").set_index("name")
    row = tensors.loc["visual.patch_embed.proj.weight"]
    assert pd.isna(row["top16_energy"]) and pd.isna(row["principal_projection_10pct"])
    assert pd.notna(row["sparsity_atol_1e-5"]) and row["delta_energy"] > 0
    text = (tmp_path / "with_conv" / "out" / "summary.md").read_text()
    assert "visual.patch_embed.proj.weight" in text and "3+ dimensions" in text


def test_a_zero_delta_matrix_has_no_rank_and_is_counted(tmp_path):
    generator = torch.Generator().manual_seed(4)
    source = {f"model.layers.{i}.mlp.up_proj.weight":
              (torch.randn(40, 24, generator=generator) * 0.02).bfloat16() for i in range(3)}
    trained = perturbed(source)
    trained["model.layers.2.mlp.up_proj.weight"] = source["model.layers.2.mlp.up_proj.weight"]
    save_checkpoint(tmp_path / "source", source)
    save_checkpoint(tmp_path / "trained", trained)
    result = analyze_checkpoints(tmp_path / "source", tmp_path / "trained", tmp_path / "out",
                                 device="cpu", nulls=False)
    tensors = pd.read_csv(tmp_path / "out" / "tensors.csv").set_index("name")
    moved = tensors.drop("model.layers.2.mlp.up_proj.weight")
    assert pd.isna(tensors.loc["model.layers.2.mlp.up_proj.weight", "numerical_rank_1e-5"])
    assert result["zero_delta_matrix_count"] == 1
    # the median over the two moved matrices only (a rank 0 would pull it down)
    assert result["numerical_rank_fraction_median"] == pytest.approx(
        moved["numerical_rank_fraction_1e-5"].median())
    assert "zero delta" in (tmp_path / "out" / "summary.md").read_text()
