"""The geometry of a source checkpoint, computed once and reused by every analysis against it.

Per matrix of W_src: its top 20% singular triplets (`spectrum.decompose`) and its coordinate
masks (`metrics.CoordinateMasks`: the principal mask, the top 10% coordinates of
|U_k S_k V_k^T| at k = 10%, and the low-magnitude masks, one uint8 class per coordinate, with
the |W_src| histogram and energy the rounding null and the statistics read). None of it
depends on the trained checkpoint, so one decomposition serves a run's final checkpoint, each
of its intermediate ones, and every other run on that source. `write_geometry` stores it in a
folder, one safetensors file per matrix (so memory follows the largest tensor, writing and
reading), which `GeometryFolder` reads back tensor by tensor, bit for bit.
"""

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from opdgeo.crash import crash_point
from opdgeo.delta.columns import HEADLINE_RATIO, MASK_RATIOS
from opdgeo.delta.geometry import principal_magnitudes
from opdgeo.delta.io import DTYPES, Checkpoint
from opdgeo.delta.metrics import (
    CoordinateMasks,
    chunk_slices,
    coordinate_masks,
    magnitude_key,
    rank_splits,
)
from opdgeo.delta.spectrum import Decomposition, decompose, rank_count, tall_rows
from opdgeo.files import atomic

INDEX = "geometry.json"
FORMAT = 2  # what each matrix's file holds; a folder of another format is decomposed again


@dataclass
class SourceGeometry:
    """What the analysis of any trained checkpoint needs from one source matrix."""

    decomposition: Decomposition  # top max(MASK_RATIOS) singular triplets
    masks: CoordinateMasks  # the principal mask at HEADLINE_RATIO, the low-magnitude masks


def source_geometry(source: torch.Tensor, exact_svd_max: int,
                    ratio: float = HEADLINE_RATIO) -> SourceGeometry:
    """Decompose one source matrix (any dtype; read as float32) and find its principal mask
    at `ratio` (k and the mask's density) and its low-magnitude masks."""
    short_side, numel = min(source.shape), source.numel()
    decomposition = decompose(tall_rows(source), rank_count(max(MASK_RATIOS), short_side),
                              exact_svd_max)
    magnitudes = principal_magnitudes(decomposition, rank_count(ratio, short_side),
                                      tuple(source.shape))
    # the top-ratio set is the complement of the (numel - count) smallest
    (rest,), _ = rank_splits(magnitudes, [numel - round(ratio * numel)])
    state = torch.empty(source.shape, dtype=torch.uint8, device=source.device)
    flat_magnitudes, flat_state = magnitudes.view(-1), state.view(-1)
    for sl in chunk_slices(numel):
        keys = magnitude_key(flat_magnitudes[sl])
        flat_state[sl] = (keys > rest.key).to(torch.uint8) + 2 * (keys == rest.key).to(torch.uint8)
    del magnitudes, flat_magnitudes
    masks = coordinate_masks(source, state, 1 - rest.tie_fraction)
    return SourceGeometry(decomposition, masks)


def _settings(dtype: str, exact_svd_max: int) -> dict:
    return {"format": FORMAT, "dtype": dtype, "exact_svd_max": exact_svd_max}


def write_geometry(source: str | Path, out_dir: str | Path, dtype: str = "bf16",
                   device: str = "cpu", exact_svd_max: int = 4096) -> int:
    """Decompose every matrix of a source checkpoint into out_dir (written whole or not at
    all); return the number of matrices. dtype: the analysis dtype, which the source is cast
    to first (the analysis must use the same, and the same exact_svd_max)."""
    checkpoint = Checkpoint(source)
    files = {}
    with atomic(out_dir, "decompose.index") as folder:
        folder.mkdir()
        for name in checkpoint.names():
            if len(checkpoint.shape(name)) != 2:  # matrices only
                continue
            tensor = checkpoint.load(name).to(device, DTYPES[dtype])
            geometry = source_geometry(tensor, exact_svd_max)
            del tensor
            decomposition, masks = geometry.decomposition, geometry.masks
            file_name = f"{len(files):05d}.safetensors"
            save_file({"values": decomposition.values.cpu(), "left": decomposition.left.cpu(),
                       "right": decomposition.right.cpu(), "classes": masks.classes.cpu(),
                       "bin_counts": masks.bin_counts.cpu(),
                       "principal_by_exponent": masks.principal_by_exponent.cpu()},
                      folder / file_name)
            crash_point("decompose.tensor")
            files[name] = {"file": file_name, "shape": list(masks.classes.shape),
                           "low": masks.low, "principal_tie_share": masks.principal_tie_share,
                           "source_energy": masks.source_energy}
        index = {"source": str(source), **_settings(dtype, exact_svd_max), "matrices": files}
        (folder / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return len(files)


@contextmanager
def decomposed(source: str | Path, geometry: str | Path | None, dtype: str = "bf16",
               device: str = "cpu", exact_svd_max: int = 4096):
    """The source's geometry folder for a block of analyses: `geometry` when given, else the
    source decomposed into a temporary folder that lasts the block."""
    if geometry is not None:
        yield Path(geometry)
        return
    with tempfile.TemporaryDirectory(prefix="opdgeo-geometry-") as temporary:
        folder = Path(temporary) / "geometry"
        write_geometry(source, folder, dtype, device, exact_svd_max)
        yield folder


class GeometryFolder:
    """A folder written by `write_geometry`, read one matrix at a time."""

    def __init__(self, path: str | Path, dtype: str, exact_svd_max: int):
        self.path = Path(path)
        if not (self.path / INDEX).exists():
            raise FileNotFoundError(f"no source geometry in {path} ({INDEX} missing): write it "
                                    f"with `opdgeo decompose --source SOURCE --out {path}`")
        self.index = json.loads((self.path / INDEX).read_text())
        written = {key: self.index.get(key) for key in _settings(dtype, exact_svd_max)}
        if written != _settings(dtype, exact_svd_max):
            raise ValueError(f"source geometry {path} was decomposed with {written}, the "
                             f"analysis asks for {_settings(dtype, exact_svd_max)}: decompose "
                             f"the source again with the analysis's settings")

    def load(self, name: str, shape: tuple[int, ...], device: torch.device) -> SourceGeometry:
        entry = self.index["matrices"].get(name)
        if entry is None or entry["shape"] != list(shape):
            raise ValueError(f"source geometry {self.path} has no {name} of shape "
                             f"{list(shape)} (it was written for {self.index['source']}): "
                             f"decompose this source")
        with safe_open(str(self.path / entry["file"]), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        # copied: a tensor read from the file keeps the whole file mapped while it lives, so
        # the small ones, kept to the end of the tensor's analysis, would keep the large
        # ones' pages resident after they are dropped
        masks = CoordinateMasks(tensors["classes"].to(device), [tuple(t) for t in entry["low"]],
                                entry["principal_tie_share"],
                                tensors["bin_counts"].to(device, copy=True),
                                tensors["principal_by_exponent"].to(device, copy=True),
                                entry["source_energy"])
        decomposition = Decomposition(tensors["values"].to(device), tensors["left"].to(device),
                                      tensors["right"].to(device))
        return SourceGeometry(decomposition, masks)
