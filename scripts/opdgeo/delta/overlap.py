"""`overlap_runs`: how far the update masks of two runs from one source coincide.

Update mask of a run: |W_run - W_src| > atol. One-sided coverage a -> b = |a AND b| / |a|;
were b placed at random, it would be b's density, the baseline. Jaccard = |a AND b| / |a OR b|,
its baseline under independence d_a d_b / (d_a + d_b - d_a d_b). Global values are counted
over all coordinates. Outputs: overlap.csv (per tensor) and overlap.json (global, per block);
`overlap_all_pairs` writes them for every pair of several runs, in one process.
"""

import json
from pathlib import Path

import pandas as pd
import torch

from opdgeo.delta.analyze import DTYPES
from opdgeo.delta.columns import HEADLINE_ATOL
from opdgeo.delta.grouping import overlap_metrics
from opdgeo.delta.io import Checkpoint, write_atomically
from opdgeo.delta.metrics import chunk_slices
from opdgeo.delta.pairing import match_tensors
from opdgeo.files import atomic
from opdgeo.naming import classify
from opdgeo.progress import progress


def _mask_counts(source: torch.Tensor, trained_a: torch.Tensor, trained_b: torch.Tensor,
                 atol: float) -> tuple[int, int, int]:
    flat_source, flat_a, flat_b = source.reshape(-1), trained_a.reshape(-1), trained_b.reshape(-1)
    count_a = count_b = count_both = 0
    for sl in chunk_slices(flat_source.numel()):
        base = flat_source[sl].float()
        moved_a = (flat_a[sl].float() - base).abs() > atol
        moved_b = (flat_b[sl].float() - base).abs() > atol
        count_a += int(moved_a.sum())
        count_b += int(moved_b.sum())
        count_both += int((moved_a & moved_b).sum())
    return count_a, count_b, count_both


def overlap_runs(source: str | Path, trained_a: str | Path, trained_b: str | Path,
                 out_dir: str | Path, atol: float = HEADLINE_ATOL, dtype: str = "bf16") -> dict:
    """Compare the update masks of two runs on one source; write out_dir; return the summary."""
    source_checkpoint = Checkpoint(source)
    checkpoint_a, checkpoint_b = Checkpoint(trained_a), Checkpoint(trained_b)
    pairs_a = match_tensors(source_checkpoint, checkpoint_a)
    pairs_b = {pair.name: pair for pair in match_tensors(source_checkpoint, checkpoint_b)}
    cast = DTYPES[dtype]
    rows = []
    for pair in progress(pairs_a, desc=f"overlap {trained_a} {trained_b}", unit="tensor"):
        source_tensor = source_checkpoint.load(pair.source_name).to(cast)
        counts = _mask_counts(source_tensor, checkpoint_a.load(pair.trained_name).to(cast),
                              checkpoint_b.load(pairs_b[pair.name].trained_name).to(cast), atol)
        group = classify(pair.name)
        rows.append({"name": pair.name, "layer": group.layer, "module": group.module,
                     "block": group.block, "shape": "x".join(map(str, pair.shape)),
                     "numel": source_tensor.numel(), "count_a": counts[0],
                     "count_b": counts[1], "count_both": counts[2],
                     **overlap_metrics(*counts, source_tensor.numel())})
    tensors = pd.DataFrame(rows)
    tensors["layer"] = tensors["layer"].astype("Int64")

    def totals(frame: pd.DataFrame) -> dict[str, float]:
        sums = frame[["count_a", "count_b", "count_both", "numel"]].sum()
        return {"numel": int(sums["numel"]), "count_a": int(sums["count_a"]),
                "count_b": int(sums["count_b"]), "count_both": int(sums["count_both"]),
                **overlap_metrics(*(float(sums[c]) for c in
                                    ("count_a", "count_b", "count_both", "numel")))}

    result = {
        **totals(tensors),
        "blocks": {block: totals(group) for block, group in tensors.groupby("block")},
        "source": str(source), "trained_a": str(trained_a), "trained_b": str(trained_b),
        "atol": atol, "dtype": dtype, "tensor_count": len(tensors),
    }
    write_atomically(out_dir, {"overlap.csv": tensors,
                               "overlap.json": json.dumps(result, indent=2) + "\n"},
                     "overlap.write")
    return result


def overlap_all_pairs(source: str | Path, runs: dict[str, str | Path], out_dir: str | Path,
                      atol: float = HEADLINE_ATOL, dtype: str = "bf16") -> dict[str, dict]:
    """`overlap_runs` for every pair of `runs` (name -> checkpoint, in order), each into
    out_dir/{a}__{b}; return the summaries by folder name. The pairs are written into a
    temporary sibling folder renamed to out_dir at the end: a failure leaves no partial group."""
    names = list(runs)
    with atomic(out_dir, "overlap.group") as temporary:
        temporary.mkdir()  # (a single run has no pair)
        results = {f"{a}__{b}": overlap_runs(source, runs[a], runs[b], temporary / f"{a}__{b}",
                                             atol=atol, dtype=dtype)
                   for i, a in enumerate(names) for b in names[i + 1:]}
    return results
