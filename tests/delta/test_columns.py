"""The metric registry: it declares exactly the columns the analysis writes, and grouping
aggregates each column as declared."""

import json
import math
import subprocess
import sys

import numpy
import pandas as pd
import pytest
import tidy_fixtures
from delta_checkpoints import perturbed, save_checkpoint, small_model
from safetensors.torch import save_file

from opdgeo import figures, naming
from opdgeo.delta import columns, grouping
from opdgeo.delta.analyze import analyze_checkpoints
from opdgeo.delta.grouping import aggregate
from opdgeo.tidy import run_info


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
    medians = {columns.median_name(c) for c, m in columns.METRICS.items() if m.matrix_median}
    assert medians == {f"{columns.PRINCIPAL_COVERAGE}_median",
                       f"{columns.LOW_MAGNITUDE_COVERAGE}_median"}
    assert grouped == set(columns.METRICS) | medians | {"module", "tensor_count"}


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


def test_coverage_is_pooled_over_matrices_and_also_their_median():
    """A norm vector's coverage is not a matrix's: left out of the pooled value and the
    median; the median counts each matrix once, the pooled value each update."""
    sparsity, coverage = columns.SPARSITY, columns.LOW_MAGNITUDE_COVERAGE
    tensors = pd.DataFrame({
        "name": ["a", "b", "c", "norm"], "layer": [0] * 4, "module": ["q"] * 4,
        "block": ["attention"] * 4, "shape": ["10x10", "10x30", "20x20", "10"],
        "numel": [100, 300, 400, 10], "delta_energy": [1.0, 3.0, 2.0, 1.0],
        "source_energy": [4.0, 12.0, 8.0, 1.0], "linf": [0.1, 0.3, 0.2, 0.1],
        sparsity: [0.5, 0.9, 0.75, 0.0], coverage: [0.2, 0.6, 0.3, 1.0],
    })
    row = aggregate(tensors, []).iloc[0]
    updates = numpy.array([100 * 0.5, 300 * 0.1, 400 * 0.25])  # the matrices' numel * (1 - s)
    values = numpy.array([0.2, 0.6, 0.3])
    assert row[coverage] == pytest.approx(float(updates @ values / updates.sum()), rel=1e-12)
    assert row[f"{coverage}_median"] == pytest.approx(float(numpy.median(values)), rel=1e-12)
    assert row["low_magnitude_enrichment_10pct"] == pytest.approx(row[coverage] / 0.1)
    summary = grouping.summary(tensors)
    assert summary[coverage] == row[coverage]
    assert summary[f"{coverage}_median"] == row[f"{coverage}_median"]
    assert columns.axis_label(f"{coverage}_median") == \
        "low-magnitude coverage at 10% (%, median)"


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
    table_layer = {"opdgeo.collect", "opdgeo.table_formats", "opdgeo.tidy", "opdgeo.intervals"}
    assert not table_layer & _imports("opdgeo.delta.analyze")


def test_energy_shares_by_block_and_by_module_type():
    """A vision tower's MLP is its own block's, and FFN by module type (the paper's table)."""
    names = {"model.layers.0.mlp.up_proj.weight": 3.0, "model.layers.0.self_attn.q_proj.weight":
             1.0, "visual.blocks.0.mlp.fc1.weight": 2.0, "visual.blocks.0.attn.qkv.weight": 0.5,
             "visual.merger.mlp.0.weight": 0.25, "model.norm.weight": 0.25}
    tensors = pd.DataFrame({"name": list(names), "delta_energy": list(names.values())})
    tensors["block"] = [naming.classify(name).block for name in names]
    shares = grouping.energy_shares(tensors, []).iloc[0]
    total = sum(names.values())
    expected = {"block_energy_share/ffn": 3.0, "block_energy_share/attention": 1.0,
                "block_energy_share/vision": 2.5, "block_energy_share/projector": 0.25,
                "block_energy_share/norm": 0.25, "type_energy_share/ffn": 5.0,
                "type_energy_share/attention": 1.5, "type_energy_share/other": 0.25,
                "type_energy_share/norm": 0.25}
    assert shares.to_dict() == pytest.approx({k: v / total for k, v in expected.items()})


SCRATCH_MODULE = '''"""An extension's metrics, declared in one file of its own."""
from opdgeo.delta import columns

LARGEST_SOURCE = columns.declare(
    "scratch_largest_source", "max", "largest |W_src|", "weight units", 1, panel=True,
    compute=lambda source, trained: source.float().abs().max())
CHANGED = columns.declare(
    "scratch_changed", "sum", "changed coordinates", "count", 1,
    compute=lambda source, trained: (trained != source).sum())
'''


@pytest.fixture
def scratch_metrics(tmp_path, monkeypatch):
    """Import SCRATCH_MODULE as an extension would; the registry is restored afterwards."""
    saved = dict(columns.METRICS)
    (tmp_path / "scratch_metrics.py").write_text(SCRATCH_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield __import__("scratch_metrics")
    sys.modules.pop("scratch_metrics")
    columns.METRICS.clear()
    columns.METRICS.update(saved)


def test_a_metric_declared_in_a_scratch_module_reaches_every_table_and_the_module_figure(
        scratch_metrics, tmp_path, monkeypatch):
    """No other edit: the per-tensor table, the group tables, summary.json (hence
    delta_global) and a panel of the per-module figure."""
    largest, changed = scratch_metrics.LARGEST_SOURCE, scratch_metrics.CHANGED
    source = small_model(layers=1)
    trained = perturbed(source)
    save_checkpoint(tmp_path / "source", source)
    save_checkpoint(tmp_path / "trained", trained)
    frames = tidy_fixtures.tables(tidy_fixtures.config(arms=()))
    run = frames["runs"]["run"].iloc[0]
    out = tmp_path / "out"
    analyze_checkpoints(tmp_path / "source", tmp_path / "trained", out, device="cpu",
                        nulls=False, run=run)

    tensors = pd.read_csv(out / "tensors.csv").set_index("name")
    for name, tensor in source.items():
        expected = float(tensor.float().abs().max())
        assert tensors.loc[naming.canonical_name(name), largest] == expected, name
        assert tensors.loc[naming.canonical_name(name), changed] == \
            int((trained[name] != tensor).sum()), name
    for table, key in (("layers", "layer"), ("modules", "module"), ("blocks", "block")):
        grouped = pd.read_csv(out / f"{table}.csv").set_index(key)
        by_group = tensors.groupby(key)
        assert grouped[largest].to_dict() == by_group[largest].max().to_dict(), table
        assert grouped[changed].to_dict() == by_group[changed].sum().to_dict(), table
    summary = json.loads((out / "summary.json").read_text())
    assert summary[largest] == tensors[largest].max()
    assert summary[changed] == tensors[changed].sum() > 0

    drawn = {}

    def keep(fig, path, plots):
        drawn["fig"] = fig
        return [path]

    monkeypatch.setattr(figures, "save", keep)
    modules = pd.read_csv(out / "modules.csv")
    figures.render("appendix_module_metrics", {"modules": modules}, run_info(frames["runs"]),
                   {"formats": ["png"]}, tmp_path / "figure")
    panels = {ax.get_ylabel(): ax for ax in drawn["fig"].axes}
    panel = panels[columns.axis_label(largest)]
    heights = sorted(bar.get_height() for bar in panel.patches)
    assert heights == sorted(modules.set_index("module")[largest].dropna())
    assert heights[-1] > 0


def test_declare_rejects_an_unknown_aggregation_an_energy_without_its_sums_and_a_repeat():
    before = dict(columns.METRICS)
    with pytest.raises(ValueError, match="aggregation 'mode' is not one of"):
        columns.declare("x", "mode", "x")
    with pytest.raises(ValueError, match="energy metric 'y' needs `of`"):
        columns.declare("y", "energy", "y", of=(columns.SPARSITY, None))  # not a sum
    with pytest.raises(ValueError, match="declared twice"):
        columns.declare(columns.SPARSITY, "count", "again")
    assert columns.METRICS == before


def test_an_aggregation_without_a_function_is_an_error(monkeypatch):
    monkeypatch.setitem(columns.METRICS, "odd", columns.Metric("odd", "mode", "odd"))
    tensors = pd.DataFrame({"name": ["a"], "layer": [0], "module": ["q"], "block": ["attention"],
                            "shape": ["2x2"], "numel": [4], "odd": [0.5]})
    with pytest.raises(ValueError, match="aggregation mode has no function in"):
        aggregate(tensors, ["module"])
