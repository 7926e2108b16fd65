"""Update-mask overlap of two runs on one source."""

import json

import pandas as pd
import pytest
import torch
from delta_checkpoints import save_checkpoint

from opdgeo.delta.overlap import overlap_runs


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
