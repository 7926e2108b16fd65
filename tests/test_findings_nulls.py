"""Checks that can fail: deltas of known structure, measured by the real per-tensor analysis
(opdgeo.delta.analyze_tensor, nulls on) over three seeds, read by the findings. An isotropic
Gaussian delta must not pass F6's concentration or F7's projection; a delta in one layer or
one block must fail F3; structured deltas pass, so the checks are not merely strict."""

import pandas as pd
import pytest
import tidy_fixtures as tf
import torch

from opdgeo import findings
from opdgeo.delta.analyze import analyze_tensor
from opdgeo.delta.grouping import energy_shares
from opdgeo.delta.pairing import TensorPair
from opdgeo.tidy import run_info

SEEDS = (0, 1, 2)
SERIES = "addition-opd-teacher-a-adamw"
# square and non-square matrices in two layers, attention and FFN
SHAPES = {"model.layers.{layer}.self_attn.q_proj.weight": (64, 64),
          "model.layers.{layer}.mlp.up_proj.weight": (96, 64),
          "model.layers.{layer}.mlp.down_proj.weight": (64, 96)}


def isotropic(source: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(source.shape, generator=generator) * 0.01


def low_rank(source: torch.Tensor, generator) -> torch.Tensor:
    """Rank 2: all of its energy in two singular directions."""
    m, n = source.shape
    return (torch.randn(m, 2, generator=generator) @ torch.randn(2, n, generator=generator)
            ) * 0.005


def off_principal(source: torch.Tensor, generator) -> torch.Tensor:
    """Isotropic, then with the source's top-10% singular directions projected out on both
    sides: nothing left in the principal subspace."""
    u, _, vh = torch.linalg.svd(source.float(), full_matrices=False)
    k = max(1, int(0.1 * min(source.shape)))
    left = torch.eye(source.shape[0]) - u[:, :k] @ u[:, :k].T
    right = torch.eye(source.shape[1]) - vh[:k].T @ vh[:k]
    return left @ isotropic(source, generator) @ right


def tensors_table(make_delta, moves=lambda name: True) -> pd.DataFrame:
    """The analysis's per-tensor rows of every seed's run: bf16 Gaussian source, trained =
    source + make_delta(source) for the tensors `moves` selects, unchanged otherwise."""
    rows = []
    for seed in SEEDS:
        generator = torch.Generator().manual_seed(seed)
        for layer in (0, 1):
            for template, shape in SHAPES.items():
                name = template.format(layer=layer)
                source = (torch.randn(shape, generator=generator) * 0.02).bfloat16()
                delta = make_delta(source, generator) if moves(name) else 0.0
                trained = (source.float() + delta).bfloat16()
                row = analyze_tensor(TensorPair(name, name, name, shape),
                                     {"source": source, "trained": trained},
                                     exact_svd_max=4096, seed=seed, nulls=True)
                rows.append({"run": f"{SERIES}-s{seed}", **row})
    return pd.DataFrame(rows)


def findings_rows(tensors: pd.DataFrame) -> pd.DataFrame:
    """The findings of the run group whose per-tensor rows are `tensors`; its energy shares
    in delta_global are those of these tensors, as the analysis's summary gives them."""
    frames = tf.tables(tf.config(seeds=SEEDS))
    frames["tensors"] = tensors
    shares = energy_shares(tensors, ["run"]).stack().rename("value").reset_index()
    shares = shares.rename(columns={"level_1": "metric"}).assign(step=40)
    delta = frames["delta_global"]
    delta = delta[~(delta["run"].isin(shares["run"]) & delta["metric"].isin(shares["metric"]))]
    frames["delta_global"] = pd.concat([delta, shares[delta.columns]], ignore_index=True)
    table = findings.findings_table(frames, run_info(frames["runs"]), {})
    return table[table["series"] == SERIES].set_index("measure")


def verdict(rows: pd.DataFrame, measure: str) -> str:
    return rows.loc[rows.index.str.startswith(measure), "verdict"].item()


PASSES = (findings.HOLDS, findings.HOLDS_BEYOND)
F6_CONCENTRATION = "top-16 energy / its shuffle null"
F7_PROJECTION = "principal projection at 10% / its isotropic null"


@pytest.fixture(scope="module")
def isotropic_rows():
    return findings_rows(tensors_table(isotropic))


def test_an_isotropic_gaussian_delta_passes_neither_f6_nor_f7(isotropic_rows):
    for measure in (F6_CONCENTRATION, F7_PROJECTION):
        row = isotropic_rows.loc[isotropic_rows.index.str.startswith(measure)].iloc[0]
        assert row["verdict"] not in PASSES, (measure, row.to_dict())
        assert row["low"] < 1.2 and row["high"] > 0.8  # ~1: the delta is its own null


def test_an_isotropic_gaussian_delta_is_spread(isotropic_rows):
    assert verdict(isotropic_rows, "least-moved layer") == findings.HOLDS
    assert verdict(isotropic_rows, "least-moved block") == findings.HOLDS
    # the FFN holds two thirds of the parameters, so of an even update's energy
    assert verdict(isotropic_rows, "FFN energy share - the largest") == findings.HOLDS


def test_structured_deltas_pass_f6_and_f7():
    assert verdict(findings_rows(tensors_table(low_rank)), F6_CONCENTRATION) \
        == findings.HOLDS_BEYOND
    assert verdict(findings_rows(tensors_table(off_principal)), F7_PROJECTION) \
        == findings.HOLDS_BEYOND


def test_a_delta_in_one_layer_fails_f3():
    rows = findings_rows(tensors_table(isotropic, lambda name: ".layers.0." in name))
    assert verdict(rows, "least-moved layer") == findings.FAILS
    assert rows.loc[rows.index.str.startswith("least-moved layer"), "high"].item() < 0.01


def test_a_delta_in_one_block_fails_f3():
    rows = findings_rows(tensors_table(isotropic, lambda name: "self_attn" in name))
    assert verdict(rows, "least-moved block") == findings.FAILS
    assert verdict(rows, "FFN energy share - the largest other block's") == findings.FAILS
