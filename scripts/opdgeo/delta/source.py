"""The geometry of a source checkpoint, computed once and reused by every analysis against it.

Per matrix of W_src: its top 20% singular triplets (`spectrum.decompose`) and its principal
mask (the top 10% coordinates of |U_k S_k V_k^T|, k = 10%). Neither depends on the trained
checkpoint, so one decomposition serves a run's final checkpoint, each of its intermediate
ones, and every other run on that source. `write_geometry` stores it in a folder, one
safetensors file per matrix (so memory follows the largest tensor, writing and reading), which
`GeometryFolder` reads back tensor by tensor, bit for bit.
"""

import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from opdgeo.delta.columns import HEADLINE_RATIO, MASK_RATIOS
from opdgeo.delta.geometry import principal_magnitudes
from opdgeo.delta.io import DTYPES, Checkpoint, atomic_folder
from opdgeo.delta.metrics import PrincipalMask, chunk_slices, magnitude_key, rank_splits
from opdgeo.delta.spectrum import Decomposition, as_matrix, decompose, rank_count, tall_rows

INDEX = "geometry.json"


@dataclass
class SourceGeometry:
    """What the analysis of any trained checkpoint needs from one source matrix."""

    decomposition: Decomposition  # top max(MASK_RATIOS) singular triplets
    principal: PrincipalMask  # at HEADLINE_RATIO in the analysis


def source_geometry(source: torch.Tensor, exact_svd_max: int,
                    ratio: float = HEADLINE_RATIO) -> SourceGeometry:
    """Decompose one source matrix (any dtype; read as float32) and find its principal mask
    at `ratio` (k and the mask's density)."""
    matrix = as_matrix(source)
    short_side, numel = min(matrix.shape), source.numel()
    decomposition = decompose(tall_rows(source), rank_count(max(MASK_RATIOS), short_side),
                              exact_svd_max)
    magnitudes = principal_magnitudes(decomposition, rank_count(ratio, short_side),
                                      tuple(matrix.shape))
    # the top-ratio set is the complement of the (numel - count) smallest
    (rest,), _ = rank_splits(magnitudes, [numel - round(ratio * numel)])
    inside = torch.empty(matrix.shape, dtype=torch.bool, device=source.device)
    tied = torch.empty_like(inside)
    flat_magnitudes, flat_inside, flat_tied = magnitudes.view(-1), inside.view(-1), tied.view(-1)
    for sl in chunk_slices(numel):
        keys = magnitude_key(flat_magnitudes[sl])
        flat_inside[sl], flat_tied[sl] = keys > rest.key, keys == rest.key
    return SourceGeometry(decomposition, PrincipalMask(inside, tied, 1 - rest.tie_fraction))


def _packed(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy().reshape(-1)))


def _unpacked(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    flat = np.unpackbits(bits.numpy(), count=math.prod(shape)).astype(bool)
    return torch.from_numpy(flat).view(shape)


def _settings(dtype: str, exact_svd_max: int) -> dict:
    return {"dtype": dtype, "exact_svd_max": exact_svd_max}


def write_geometry(source: str | Path, out_dir: str | Path, dtype: str = "bf16",
                   device: str = "cpu", exact_svd_max: int = 4096) -> int:
    """Decompose every matrix of a source checkpoint into out_dir (written whole or not at
    all); return the number of matrices. dtype: the analysis dtype, which the source is cast
    to first (the analysis must use the same, and the same exact_svd_max)."""
    checkpoint = Checkpoint(source)
    files = {}
    with atomic_folder(out_dir) as folder:
        for name in checkpoint.names():
            if len(checkpoint.shape(name)) < 2:
                continue
            tensor = checkpoint.load(name).to(device, DTYPES[dtype])
            geometry = source_geometry(tensor, exact_svd_max)
            del tensor
            decomposition, principal = geometry.decomposition, geometry.principal
            file_name = f"{len(files):05d}.safetensors"
            save_file({"values": decomposition.values.cpu(), "left": decomposition.left.cpu(),
                       "right": decomposition.right.cpu(), "inside": _packed(principal.inside),
                       "tied": _packed(principal.tied)}, folder / file_name)
            files[name] = {"file": file_name, "tie_share": principal.tie_share,
                                           "shape": list(principal.inside.shape)}
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
        matrix_shape = [shape[0], math.prod(shape[1:])]
        if entry is None or entry["shape"] != matrix_shape:
            raise ValueError(f"source geometry {self.path} has no {name} of shape "
                             f"{matrix_shape} (it was written for {self.index['source']}): "
                             f"decompose this source")
        with safe_open(str(self.path / entry["file"]), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        principal = PrincipalMask(_unpacked(tensors["inside"], tuple(matrix_shape)).to(device),
                                  _unpacked(tensors["tied"], tuple(matrix_shape)).to(device),
                                  entry["tie_share"])
        decomposition = Decomposition(tensors["values"].to(device), tensors["left"].to(device),
                                      tensors["right"].to(device))
        return SourceGeometry(decomposition, principal)
