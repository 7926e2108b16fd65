"""`analyze_checkpoints`: every metric of docs/study.md section 3 for one source -> trained
pair.

Streamed: one tensor pair is in memory at a time (peak memory follows the largest tensor),
each source matrix is decomposed once (here, or read from the source's geometry folder) and
reused by every geometry metric and mask. A run's intermediate checkpoints get the measures
of TRAJECTORY_NOTE, against the same decomposition.
Outputs (written into a temporary folder beside `out_dir`, renamed when complete):
tensors.csv, layers.csv, modules.csv, blocks.csv, layer_module.csv, summary.json, summary.md.
"""

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from opdgeo.delta.columns import (
    COMBINED_DENSITY,
    DELTA_ENERGY,
    HEADLINE_ATOL,
    HEADLINE_RATIO,
    LOW_MAGNITUDE_COVERAGE,
    MASK_RATIOS,
    METRICS,
    PRINCIPAL_COVERAGE,
    ROUNDING_NULL_SCALE,
    SHUFFLE_NULL_KEYS,
    SUMMARY_ROWS,
    coverage_name,
    exact_null_sparsity_name,
    flatten,
    markdown_row,
    null_name,
    projection_name,
    summary_name,
)
from opdgeo.delta.geometry import principal_projection, rotation_and_drift
from opdgeo.delta.grouping import add_enrichment, group_tables, is_matrix, summary
from opdgeo.delta.io import (
    DTYPES,
    Checkpoint,
    check_writable,
    resolved_commit,
    step_folders,
    write_atomically,
)
from opdgeo.delta.metrics import (
    N_CATEGORIES,
    coordinate_masks,
    covered_by_atol,
    delta_stats,
    delta_tensor,
)
from opdgeo.delta.nulls import (
    DISTRIBUTIONS,
    exact_rounding_null_categories,
    fit_rounding_null,
    isotropic_rows,
    shuffled_rows,
    tensor_generator,
)
from opdgeo.delta.pairing import TIED_HEAD_NOTE, TensorPair, match_tensors
from opdgeo.delta.source import GeometryFolder, SourceGeometry, decomposed, source_geometry
from opdgeo.delta.spectrum import (
    decompose,
    rank_count,
    singular_values,
    spectrum_metrics,
    tall_rows,
    top_singular_values,
)
from opdgeo.device import resolve_device
from opdgeo.naming import canonical_name, classify
from opdgeo.progress import progress

TRAJECTORY_NOTE = """An intermediate checkpoint's measures cost the delta's passes only: the
source's geometry is decomposed once per source (`opdgeo.delta.source`), and each source
tensor is read once for all of a run's checkpoints. As in the final
analysis (to float32 rounding, 1e-6 relative; tested): every coordinate metric (relative norm,
sparsity, coordinate energy shares), every coverage (low-magnitude, principal, combined; the
rounding null), the principal projection (joint, left, right) at 10%. The delta's spectrum
(`spectrum.top_singular_values`): exact for matrices of at most 2^18 elements; above, the
float32 eigenvalues of a Gram matrix of float32 products, whose top-k energy shares are within
1e-6 and stable rank within 1e-5 relative of the exact ones (tested), and whose numerical and
entropy ranks are not given. Not computed: the nulls, rotation and singular-value drift, the
projection at 1, 5 and 20%."""


def _share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else math.nan


@dataclass
class Updates:
    """Coverage from per-label sums: a coordinate's label is its update category, joint with
    the exact rounding null's when fp32 weights are known (label = observed + N_CATEGORIES *
    null); and the update counts."""

    exact_null: bool
    counts: dict[float, float] = field(default_factory=dict)  # atol -> updated coordinates
    null_counts: dict[float, float] | None = None

    @property
    def n_labels(self) -> int:
        return N_CATEGORIES**2 if self.exact_null else N_CATEGORIES

    def by_atol(self, label_sums: torch.Tensor):
        """Per-label sums -> (observed, exact-null or None) sums over each atol's update mask."""
        if not self.exact_null:
            return covered_by_atol(label_sums[:N_CATEGORIES]), None
        joint = label_sums[: N_CATEGORIES**2].view(N_CATEGORIES, N_CATEGORIES)  # (null, obs)
        return covered_by_atol(joint.sum(0)), covered_by_atol(joint.sum(1))

    def coverage(self, mask: str, ratio: float, label_sums: torch.Tensor,
                 with_null: bool = True) -> dict[str, float]:
        """Coverage columns of one mask: observed, and the exact null's when present (and
        `with_null`)."""
        covered, null_covered = self.by_atol(label_sums)
        columns = {coverage_name(mask, ratio, atol): _share(covered[atol], count)
                   for atol, count in self.counts.items()}
        if self.exact_null and with_null and mask != "combined":
            columns |= {coverage_name(mask, ratio, atol, "exact"):
                        _share(null_covered[atol], count)
                        for atol, count in self.null_counts.items()}
        return columns


def analyze_tensor(pair: TensorPair, tensors: dict[str, torch.Tensor], exact_svd_max: int,
                   seed: int, nulls: bool, rounding_null: str = "half_normal",
                   geometry: Callable[[], SourceGeometry] | None = None,
                   trajectory: bool = False) -> dict:
    """Every per-tensor metric of one pair.

    tensors: "source" and "trained" in the analysis dtype, optionally "trained_fp32": the
    analysis's own (the shuffle null reorders source and trained in place). They are popped
    and dropped as soon as they are used, so a caller that keeps no other reference holds,
    besides them, about one float32 copy of the largest tensor at once (the principal
    magnitudes, or the exact rounding null's int32 permutation) and its uint8 labels. The
    delta is never held whole but in a trajectory (below): its readers compute
    trained - source chunk by chunk.
    geometry: reads the source matrix's geometry (`opdgeo.delta.source`) when it is needed;
    without it, the source is decomposed here.
    trajectory: the measures of an intermediate checkpoint only (see TRAJECTORY_NOTE).
    """
    source, trained = tensors.pop("source"), tensors.pop("trained")
    group = classify(pair.name)
    numel = source.numel()
    row = {"name": pair.name, "layer": group.layer, "module": group.module,
           "block": group.block, "shape": "x".join(map(str, pair.shape)), "numel": numel}
    matrix = source.dim() == 2  # the 2-D measures take matrices only, as the paper's do
    if matrix:
        geometry = geometry() if geometry is not None else source_geometry(source, exact_svd_max)
        masks = geometry.masks
    else:
        masks = coordinate_masks(source)
    # metrics an extension declares with their own `compute` (opdgeo.delta.columns)
    row |= {m.name: float(m.compute(source, trained)) for m in METRICS.values() if m.compute}
    # An intermediate checkpoint reads dW in three passes (statistics, spectrum, projection),
    # so it is held whole once in float32 (in place of the trained tensor) instead of cast
    # and subtracted in each.
    delta = delta_tensor(source, trained) if trajectory else None
    if delta is not None:
        trained = None
    category, stats = delta_stats(source, trained, delta, masks.source_energy)
    row |= stats.row()
    generator = tensor_generator(pair.name, seed, source.device)
    updates = Updates(exact_null="trained_fp32" in tensors)
    labels = category
    if updates.exact_null:
        joint = exact_rounding_null_categories(source, tensors.pop("trained_fp32"), generator)
        labels = joint.mul_(N_CATEGORIES).add_(category)  # in place: no third copy
    del category

    # Every coverage from one count of the labels per mask class; the rounding null fitted
    # on the |W_src| histogram.
    class_counts = masks.count(labels, updates.n_labels)
    masks.classes = None  # counted: released
    del labels
    updates.counts, updates.null_counts = updates.by_atol(class_counts.sum(dim=1))
    for ratio in MASK_RATIOS:
        row |= updates.coverage("low_magnitude", ratio, class_counts @ masks.low_weights(ratio),
                                with_null=ratio == HEADLINE_RATIO)
    if updates.exact_null:
        for atol, count in updates.null_counts.items():
            row[exact_null_sparsity_name(atol)] = 1 - count / numel
    rounding_null = fit_rounding_null(masks.bin_counts, updates.counts[HEADLINE_ATOL],
                                      distribution=rounding_null)
    low_count, _, _ = masks.low[MASK_RATIOS.index(HEADLINE_RATIO)]
    row[ROUNDING_NULL_SCALE] = rounding_null.scale
    row[null_name("rounding", LOW_MAGNITUDE_COVERAGE)] = _share(
        rounding_null.expected_in_smallest(masks.bin_counts, low_count),
        rounding_null.expected_changed)
    if not matrix:
        return add_enrichment(row)

    # Spectrum of the delta; geometry against the one decomposition of the source.
    delta_rows = tall_rows(trained, minus=source) if delta is None else tall_rows(delta)
    short_side = delta_rows.shape[1]
    if trajectory:
        values, complete, delta_gram = top_singular_values(delta_rows, exact_svd_max)
    else:
        (values, complete), delta_gram = singular_values(delta_rows, exact_svd_max), None
    row |= spectrum_metrics(values, short_side, stats.delta_energy, complete)
    source_decomposition = geometry.decomposition
    del geometry
    row |= principal_projection(delta_rows, source_decomposition,
                                (HEADLINE_RATIO,) if trajectory else MASK_RATIOS,
                                stats.delta_energy, delta_gram)
    del delta_gram
    if not trajectory:
        trained_decomposition = decompose(tall_rows(trained),
                                          rank_count(HEADLINE_RATIO, short_side), exact_svd_max)
        row |= rotation_and_drift(source_decomposition, trained_decomposition, short_side)
        del trained_decomposition
    if nulls:
        isotropic = principal_projection(isotropic_rows(delta_rows, generator),
                                         source_decomposition)
        row |= {null_name("isotropic", projection_name(r)): isotropic[projection_name(r)]
                for r in MASK_RATIOS}

    if not nulls:  # the shuffle null at the end is the delta's last use
        del trained, delta_rows

    # Principal mask: top-10% coordinates of |U_k S_k V_k^T| at k = 10% (other ratios would
    # each cost a rank-k product and two passes over the matrix).
    del source_decomposition
    row |= updates.coverage("principal", HEADLINE_RATIO,
                            class_counts @ masks.principal_weights())
    row[null_name("rounding", PRINCIPAL_COVERAGE)] = _share(
        rounding_null.expected_changed_in(masks.principal_by_exponent),
        rounding_null.expected_changed)
    union = class_counts @ masks.union_weights(HEADLINE_RATIO)
    row[COMBINED_DENSITY] = float(union.sum()) / numel
    row |= updates.coverage("combined", HEADLINE_RATIO, union)
    if nulls:  # last, with the rest released: it shuffles both tensors in place
        del updates, delta_rows
        shuffled = shuffled_rows(trained, generator, minus=source)
        del source, trained
        shuffled_values, shuffled_complete = singular_values(shuffled, exact_svd_max)
        del shuffled
        shuffled_metrics = spectrum_metrics(shuffled_values, short_side, stats.delta_energy,
                                            shuffled_complete)
        row |= {null_name("shuffle", key): shuffled_metrics.get(key, math.nan)
                for key in SHUFFLE_NULL_KEYS}
    return add_enrichment(row)


def _fp32_name(checkpoint: Checkpoint, pair: TensorPair) -> str:
    names = checkpoint.names()
    if pair.trained_name in names:
        return pair.trained_name
    by_canonical = {canonical_name(n): n for n in names}
    if pair.name not in by_canonical:
        raise ValueError(f"tensor {pair.trained_name} missing in fp32 weights {checkpoint.path}")
    return by_canonical[pair.name]


def analyze_checkpoints(source: str | Path, trained: str | Path, out_dir: str | Path | None,
                        run: str | None = None, **options) -> dict:
    """Analyse the delta trained - source tensor by tensor; write out_dir (unless None);
    return the summary.

    run: the run's name, written as the first column of every table and into the summary
    (the pipeline's tables are collected from these, never from folder names).
    options (`analyze_deltas`): dtype: both checkpoints are cast to it before subtracting
    (statistics in float32). device: where the tensors and every computation go ("cuda": the
    same code on the GPU). exact_svd_max: the largest min(m, n) decomposed exactly. seed: the
    null models'. fp32_trained: fp32 master weights of the trained run (file or folder), for
    the exact rounding null. nulls: also compute the isotropic and shuffle nulls (the
    parametric rounding null is always computed: it is nearly free). rounding_null: the
    parametric null's update magnitudes, "half_normal" or "constant". geometry: the source's
    folder written by `source.write_geometry` (same dtype and exact_svd_max), read instead of
    decomposing the source. trajectory: an intermediate checkpoint's measures only
    (TRAJECTORY_NOTE; no nulls).
    """
    if out_dir is not None:
        check_writable(out_dir)
    ((result, table),) = analyze_deltas(source, [trained], **options)
    if run is not None:
        result["run"] = run
    if out_dir is not None:
        tables = {f"{name}.csv": with_run(frame, run)
                  for name, frame in {"tensors": table, **group_tables(table)}.items()}
        write_atomically(out_dir, {**tables,
                                   "summary.json": json.dumps(result, indent=2) + "\n",
                                   "summary.md": summary_markdown(result)},
                         "analyze.tables")
    return result


def _own_masks(geometry: SourceGeometry) -> SourceGeometry:
    """The geometry with a copy of its masks object: one analysis releases its classes once
    counted while the next checkpoint's still reads them."""
    return SourceGeometry(geometry.decomposition, replace(geometry.masks))


def analyze_deltas(source: str | Path, trained: list[str | Path], dtype: str = "bf16",
                   device: str = "auto", exact_svd_max: int = 4096, seed: int = 0,
                   fp32_trained: Path | None = None, nulls: bool = True,
                   rounding_null: str = "half_normal", geometry: str | Path | None = None,
                   trajectory: bool = False) -> list[tuple[dict, pd.DataFrame]]:
    """(summary, per-tensor table) of each trained checkpoint against one source, options as
    for `analyze_checkpoints`. Tensor by tensor: each source tensor is read (and, without a
    geometry folder, decomposed) once for every checkpoint, which are analysed one after
    another against it (a trajectory's). One checkpoint: its analysis gets the only
    references, so that it can release them as it goes."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if rounding_null not in DISTRIBUTIONS:
        raise ValueError(f"rounding_null must be one of {DISTRIBUTIONS}, got {rounding_null!r}")
    if fp32_trained is not None and len(trained) != 1:
        raise ValueError("fp32 master weights belong to one trained checkpoint")
    torch_device = torch.device(resolve_device(device))
    source_checkpoint = Checkpoint(source)
    checkpoints = [Checkpoint(path) for path in trained]
    fp32_checkpoint = Checkpoint(fp32_trained) if fp32_trained is not None else None
    geometry_folder = GeometryFolder(geometry, dtype, exact_svd_max) if geometry else None
    nulls = nulls and not trajectory
    pairs = match_tensors(source_checkpoint, checkpoints[0])
    for checkpoint in checkpoints[1:]:
        if match_tensors(source_checkpoint, checkpoint) != pairs:
            raise ValueError(f"checkpoint {checkpoint.path} holds other tensors than "
                             f"{checkpoints[0].path}: analyse them separately")
    shared = len(checkpoints) > 1
    rows = [[] for _ in checkpoints]
    seconds = [0.0 for _ in checkpoints]
    for pair in progress(pairs, desc=f"analyze {trained[0]}" + (
            f" and {len(trained) - 1} more" if shared else ""), unit="tensor"):
        started = time.perf_counter()
        source_tensor = source_checkpoint.load(pair.source_name).to(torch_device, DTYPES[dtype])
        if len(pair.shape) != 2:
            read_geometry = None
        elif geometry_folder is not None:
            # read by each checkpoint's analysis: the file's pages come in as it reads them,
            # and a geometry kept across checkpoints would keep them resident beside the
            # next checkpoint's delta (+0.2 GB at the 0.5B pair's embedding)
            read_geometry = partial(geometry_folder.load, pair.source_name, pair.shape,
                                    torch_device)
        elif shared:
            read_geometry = partial(_own_masks, source_geometry(source_tensor, exact_svd_max))
        else:
            # decomposed before the trained tensor is read: its temporaries (the principal
            # magnitudes) are the analysis's largest; handed over (popped), so that the
            # analysis holds the only reference and releases it as it goes
            read_geometry = [source_geometry(source_tensor, exact_svd_max)].pop
        shared_seconds = (time.perf_counter() - started) / len(checkpoints)
        for i, checkpoint in enumerate(checkpoints):
            started = time.perf_counter()
            tensors = {"source": source_tensor,
                       "trained": checkpoint.load(pair.trained_name).to(torch_device,
                                                                       DTYPES[dtype])}
            if not shared:
                del source_tensor
            if fp32_checkpoint is not None:
                tensors["trained_fp32"] = fp32_checkpoint.load(
                    _fp32_name(fp32_checkpoint, pair)).to(torch_device)
            rows[i].append(analyze_tensor(pair, tensors, exact_svd_max, seed, nulls,
                                          rounding_null, read_geometry, trajectory))
            seconds[i] += shared_seconds + time.perf_counter() - started
    settings = {"dtype": dtype, "device": str(torch_device), "exact_svd_max": exact_svd_max,
                "seed": seed, "nulls": nulls, "trajectory": trajectory,
                "rounding_null_distribution": rounding_null}
    return [_summary(pd.DataFrame(checkpoint_rows), pairs, (source, source_checkpoint),
                     (path, checkpoint), fp32_trained, settings, checkpoint_seconds)
            for checkpoint_rows, checkpoint, path, checkpoint_seconds in zip(
                rows, checkpoints, trained, seconds, strict=True)]


def _summary(table: pd.DataFrame, pairs: list[TensorPair], source: tuple[str | Path, Checkpoint],
             trained: tuple[str | Path, Checkpoint], fp32_trained: Path | None, settings: dict,
             seconds: float) -> tuple[dict, pd.DataFrame]:
    """One checkpoint's summary from its per-tensor rows (source and trained: as given, and
    read), and the table with its layers typed."""
    table["layer"] = table["layer"].astype("Int64")
    result = summary(table)
    matrices = is_matrix(table["shape"])
    higher = table["shape"].str.count("x") >= 2
    result["rounding_null_sparsity_fit"] = {
        block: float(scale) for block, scale in
        table.groupby("block")[ROUNDING_NULL_SCALE].median().items()}
    result |= {
        "dtype": settings["dtype"], "device": settings["device"], "tensor_count": len(table),
        "matrix_count": int(matrices.sum()),
        # in no spectrum median: a zero delta has no spectrum (its ranks are NaN, not 0)
        "zero_delta_matrix_count": int((matrices & (table[DELTA_ENERGY] <= 0)).sum()),
        # tensors of 3+ dimensions (a vision tower's Conv3d patch embedding): coordinate
        # measures only, outside the spectrum, projection and pooled coverages
        "higher_dim_tensors": dict(zip(table.loc[higher, "name"], table.loc[higher, "shape"],
                                       strict=True)),
        "source": str(source[0]), "trained": str(trained[0]),
        # the hub commits read (None: a local checkpoint), so a rerun can pin the same weights
        "source_commit": resolved_commit(source[1].path),
        "trained_commit": resolved_commit(trained[1].path),
        "fp32_trained": str(fp32_trained) if fp32_trained is not None else None,
        **{key: settings[key] for key in ("exact_svd_max", "seed", "nulls", "trajectory",
                                          "rounding_null_distribution")},
        "tied_head": next((f"{TIED_HEAD_NOTE} (source {p.source_name}, trained {p.trained_name})"
                           for p in pairs if p.tied_head), None),
        "seconds": seconds,
    }
    result = {key: (None if isinstance(v, float) and math.isnan(v) else v)
              for key, v in result.items()}
    return result, table


def analyze_trajectory(source: str | Path, checkpoints: str | Path | None,
                       geometry: str | Path | None = None, run: str | None = None,
                       **options) -> pd.DataFrame:
    """The summary of every intermediate checkpoint (`checkpoints/step-N`) against the source,
    as tidy rows ([run,] step, metric, value), with the trajectory's measures
    (TRAJECTORY_NOTE); `options` as for `analyze_checkpoints`. The source is decomposed once:
    `geometry` (its folder), else into a temporary folder; each of its tensors is read once
    for every checkpoint (`analyze_deltas`). One job per run analyses its whole trajectory: a
    job per checkpoint paid the start-up each time."""
    folders = step_folders(checkpoints) if checkpoints else {}
    rows = []
    if folders:
        settings = {key: options[key] for key in ("dtype", "exact_svd_max") if key in options}
        with decomposed(source, geometry, device=resolve_device(options.get("device", "auto")),
                        **settings) as folder:
            analyses = analyze_deltas(source, list(folders.values()), geometry=folder,
                                      trajectory=True, **options)
        for step, (result, _) in zip(folders, analyses, strict=True):
            rows += [(step, metric, value) for metric, value in flatten(result).items()]
    return with_run(pd.DataFrame(rows, columns=["step", "metric", "value"]), run)


def with_run(table: pd.DataFrame, run: str | None) -> pd.DataFrame:
    """The table with the run's name as its first column (unchanged without a run)."""
    if run is None:
        return table
    # concat, not insert: a wide per-tensor table would be copied column by column
    return pd.concat([pd.DataFrame({"run": [run] * len(table)}, index=table.index), table],
                     axis=1)


def summary_markdown(result: dict) -> str:
    lines = [f"# Delta analysis: {result['trained']} - {result['source']}", "",
             f"{result['tensor_count']} tensors, {result['num_params']:,} parameters, "
             f"analysed in {result['dtype']}.", "", "| metric | value |", "|---|---|"]
    lines += [markdown_row(key, result[key], digits=6) for key in map(summary_name, SUMMARY_ROWS)
              if result.get(key) is not None]
    if result.get("zero_delta_matrix_count"):
        lines.append(f"| matrices with a zero delta (not in the rank medians) | "
                     f"{result['zero_delta_matrix_count']} |")
    lines += ["", "| block | energy share |", "|---|---|"]
    lines += [f"| {block} | {share:.4f} |" for block, share in
              sorted(result["block_energy_share"].items(), key=lambda item: -item[1])]
    higher = result.get("higher_dim_tensors") or {}
    if higher:
        lines += ["", "Tensors of 3+ dimensions, not matrices: coordinate measures only, outside "
                  "the spectrum, projection and coverage rows above (tensors.csv has their rows).",
                  "", "| tensor | shape |", "|---|---|"]
        lines += [f"| {name} | {shape} |" for name, shape in higher.items()]
    return "\n".join(lines) + "\n"
