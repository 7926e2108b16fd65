"""Update-mask overlap of two runs on one source."""

import json

import pandas as pd
import pytest
import torch
from delta_checkpoints import save_checkpoint

from opdgeo.collect import collect_overlap_tensors, collect_overlaps
from opdgeo.delta.overlap import overlap_runs
from opdgeo.intervals import OVER_MATRICES
from opdgeo.paper_tables import OVERLAP_COLUMNS, mask_overlap_table, pooled_overlap


def test_overlap_of_constructed_masks(tmp_path):
    generator = torch.Generator().manual_seed(0)
    names = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight")
    source, run_a, run_b, masks = {}, {}, {}, {}
    for name in names:
        weight = (torch.randn(40, 30, generator=generator) * 0.02).bfloat16()
        mask_a = torch.rand(weight.shape, generator=generator) < 0.3
        mask_b = torch.rand(weight.shape, generator=generator) < 0.5
        source[name] = weight
        run_a[name] = (weight.float() + 0.01 * mask_a).bfloat16()
        run_b[name] = (weight.float() - 0.01 * mask_b).bfloat16()
        masks[name] = (mask_a, mask_b)
    for folder, tensors in (("source", source), ("a", run_a), ("b", run_b)):
        save_checkpoint(tmp_path / folder, tensors)
    result = overlap_runs(tmp_path / "source", tmp_path / "a", tmp_path / "b", tmp_path / "out")
    count_a = sum(int(a.sum()) for a, _ in masks.values())
    count_b = sum(int(b.sum()) for _, b in masks.values())
    both = sum(int((a & b).sum()) for a, b in masks.values())
    numel = sum(a.numel() for a, _ in masks.values())
    assert result["coverage_a_to_b"] == both / count_a
    assert result["coverage_b_to_a"] == both / count_b
    assert result["baseline_a_to_b"] == count_b / numel
    assert result["jaccard"] == both / (count_a + count_b - both)
    # independent masks: observed coverage near the random baseline
    assert result["coverage_a_to_b"] == pytest.approx(result["baseline_a_to_b"], abs=0.05)
    assert json.loads((tmp_path / "out" / "overlap.json").read_text()) == result
    table = pd.read_csv(tmp_path / "out" / "overlap.csv")
    assert table["count_both"].sum() == both
    assert set(result["blocks"]) == {"ffn", "attention"}


def test_a_run_overlaps_itself_fully(tmp_path):
    source = {"w.weight": torch.zeros(10, 10)}
    trained = {"w.weight": torch.eye(10)}
    for folder, tensors in (("source", source), ("a", trained), ("b", trained)):
        save_checkpoint(tmp_path / folder, tensors)
    result = overlap_runs(tmp_path / "source", tmp_path / "a", tmp_path / "b", tmp_path / "out")
    assert result["coverage_a_to_b"] == result["jaccard"] == 1
    assert result["baseline_a_to_b"] == 0.1


def _one_seed_overlap_table(tmp_path, masks):
    """Mask overlap table of runs a-s0 and b-s0 whose updates are `masks` (tensor name ->
    (mask of a, mask of b)), measured by overlap_runs and collected as the workflow does;
    also the pair's collected per-tensor counts."""
    generator = torch.Generator().manual_seed(1)
    source, run_a, run_b = {}, {}, {}
    for name, (mask_a, mask_b) in masks.items():
        weight = (torch.randn(mask_a.shape, generator=generator) * 0.02).bfloat16()
        source[name] = weight
        run_a[name] = (weight.float() + 0.01 * mask_a).bfloat16()
        run_b[name] = (weight.float() - 0.01 * mask_b).bfloat16()
    for folder, tensors in (("source", source), ("a", run_a), ("b", run_b)):
        save_checkpoint(tmp_path / folder, tensors)
    group = tmp_path / "overlap" / "src"
    overlap_runs(tmp_path / "source", tmp_path / "a", tmp_path / "b", group / "a-s0__b-s0")
    info = pd.DataFrame({"run": ["a-s0", "b-s0"], "seed": [0, 0], "kind": "opd",
                         "series": ["a", "b"]})
    tensors = collect_overlap_tensors([group])
    table = mask_overlap_table(info, collect_overlaps([group]), tensors)
    return table.set_index(["series a", "series b"]), tensors


def _names(count):
    return [f"model.layers.{i}.mlp.up_proj.weight" for i in range(count)]


def test_one_seed_overlap_of_alike_tensors_has_a_zero_width_interval(tmp_path):
    # Tensors of several sizes, each with the same shares: a updates columns 0-3 of 10,
    # b columns 2-6, so every resample of them pools to the same ratios.
    masks = {}
    for rows, name in zip((3, 5, 8, 13), _names(4), strict=True):
        column = torch.arange(10).expand(rows, 10)
        masks[name] = (column < 4, (column >= 2) & (column < 7))
    table, _ = _one_seed_overlap_table(tmp_path, masks)
    for (a, b), coverage in ((("a", "b"), 50), (("b", "a"), 40)):
        row = table.loc[(a, b)]
        assert row["interval"] == OVER_MATRICES and row["seeds"] == 1
        assert row["coverage a->b %"] == pytest.approx(coverage)
        for label, _ in OVERLAP_COLUMNS:
            assert row[f"{label} 95% low"] == row[label] == row[f"{label} 95% high"], label


def test_one_seed_overlap_of_unlike_tensors_has_an_interval_around_the_pooled_value(tmp_path):
    generator = torch.Generator().manual_seed(2)
    masks = {}
    for i, name in enumerate(_names(8)):
        mask_a = torch.rand(12, 10, generator=generator) < 0.1 + 0.1 * i
        # b follows a more closely in some tensors than in others
        follows = torch.rand(12, 10, generator=generator) < 0.9 - 0.1 * i
        mask_b = torch.where(follows, mask_a, torch.rand(12, 10, generator=generator) < 0.3)
        masks[name] = (mask_a, mask_b)
    table, tensors = _one_seed_overlap_table(tmp_path, masks)
    for (a, b), direction in ((("a", "b"), "a_to_b"), (("b", "a"), "b_to_a")):
        row = table.loc[(a, b)]
        assert row["interval"] == OVER_MATRICES
        for label, _ in OVERLAP_COLUMNS:
            assert row[f"{label} 95% low"] <= row[label] <= row[f"{label} 95% high"], label
            assert row[f"{label} 95% low"] < row[f"{label} 95% high"], label
        # the statistic on the full sample of tensors is the pooled value, exactly
        full = pooled_overlap(tensors.assign(resample=0), direction).iloc[0]
        for label, scale in OVERLAP_COLUMNS:
            assert full[label] * scale == row[label], label
