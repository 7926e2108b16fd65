"""The metric registry: it declares exactly the columns the analysis writes, and grouping
aggregates each column as declared."""

import math
import subprocess
import sys

import pandas as pd
import pytest
from delta_checkpoints import perturbed, save_checkpoint, small_model
from safetensors.torch import save_file

from opdgeo.delta import columns
from opdgeo.delta.analyze import analyze_checkpoints
from opdgeo.delta.grouping import aggregate


def test_registry_declares_every_column_the_analysis_writes_and_no_other(tmp_path):
    source = small_model(layers=1)
    trained32 = {k: v.float() for k, v in perturbed(source).items()}
    save_checkpoint(tmp_path / "source", source)
    save_checkpoint(tmp_path / "trained", {k: v.bfloat16() for k, v in trained32.items()})
    save_file(trained32, tmp_path / "fp32.safetensors")
    analyze_checkpoints(tmp_path / "source", tmp_path / "trained", tmp_path / "out",
                        device="cpu", fp32_trained=tmp_path / "fp32.safetensors", nulls=True)
    written = set(pd.read_csv(tmp_path / "out" / "tensors.csv").columns)
    group_only = {columns.ENERGY_SHARE}  # a share of the group's total: no per-tensor value
    assert written - set(columns.KEY_COLUMNS) == set(columns.METRICS) - group_only
    grouped = set(pd.read_csv(tmp_path / "out" / "modules.csv").columns)
    assert grouped == set(columns.METRICS) | {"module", "tensor_count"}


def test_an_undeclared_column_is_an_error_naming_the_registry():
    tensors = pd.DataFrame({"name": ["a"], "layer": [0], "module": ["q"], "block": ["attention"],
                            "shape": ["2x2"], "numel": [4], "delta_energy": [1.0],
                            "source_energy": [2.0], "linf": [0.1], "my_new_metric": [0.5]})
    with pytest.raises(KeyError, match="my_new_metric.*opdgeo/delta/columns.py"):
        aggregate(tensors, ["module"])


def test_each_aggregation_as_declared():
    """Two matrices of one module: counts weight by parameters, coverages by updates,
    matrix metrics take the median, enrichment is recomputed from the aggregate."""
    sparsity, coverage = columns.SPARSITY, columns.LOW_MAGNITUDE_COVERAGE
    tensors = pd.DataFrame({
        "name": ["a", "b"], "layer": [0, 0], "module": ["q", "q"], "block": ["attention"] * 2,
        "shape": ["10x10", "10x30"], "numel": [100, 300], "delta_energy": [1.0, 3.0],
        "source_energy": [4.0, 12.0], "linf": [0.1, 0.3],
        sparsity: [0.5, 0.9], coverage: [0.2, 0.6], columns.STABLE_RANK: [2.0, 6.0],
        "low_magnitude_enrichment_10pct": [2.0, 6.0],
    })
    row = aggregate(tensors, ["module"]).iloc[0]
    assert row[sparsity] == pytest.approx((100 * 0.5 + 300 * 0.9) / 400)
    updates = [100 * 0.5, 300 * 0.1]  # numel * (1 - sparsity)
    expected = (updates[0] * 0.2 + updates[1] * 0.6) / sum(updates)
    assert row[coverage] == pytest.approx(expected)
    assert row[columns.STABLE_RANK] == pytest.approx(4.0)
    assert row["low_magnitude_enrichment_10pct"] == pytest.approx(expected / 0.1)
    assert row[columns.RELATIVE_NORM] == pytest.approx(math.sqrt(4 / 16))
    assert row["linf"] == pytest.approx(0.3)


def test_summary_names_and_labels():
    assert columns.summary_name(columns.TOP16_ENERGY) == "top16_energy_median"
    assert columns.summary_name(columns.SPARSITY) == columns.SPARSITY
    assert columns.metric("numerical_rank_fraction_median").name == \
        columns.NUMERICAL_RANK_FRACTION
    assert columns.axis_label("top16_energy_median") == "top-16 spectral energy (%, median)"
    assert columns.axis_label(columns.RELATIVE_NORM, "log") == \
        "relative norm ‖ΔW‖/‖W_src‖ (%, log)"
    with pytest.raises(KeyError):
        columns.metric("sparsity_atol_1e-5_median")  # a count-weighted column has no median


def _imports(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    scripts = str(columns.__file__).rsplit("/opdgeo/", 1)[0]
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True, env={"PYTHONPATH": scripts})
    return set(result.stdout.split())


def test_the_registry_imports_without_torch_and_the_analysis_without_the_table_layer():
    assert "torch" not in _imports("opdgeo.delta.columns")
    assert not {"opdgeo.tables", "opdgeo.tidy"} & _imports("opdgeo.delta.analyze")
