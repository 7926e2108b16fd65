"""Coordinate masks: from a run's delta, at a target density, at random; bit-packed IO.

A mask is a dict `tensor name -> BoolTensor` (True = the coordinate may move), keyed by the
checkpoint's tensor names, which for causal LMs are the names of `model.named_parameters()`.
Masks are read from checkpoints one tensor at a time through `opdgeo.delta.io`, so a pair
of large checkpoints never sits in memory at once. On disk a mask is a safetensors file of
`numpy.packbits` rows (one bit per coordinate) with shapes and densities in its metadata, so
densities can be read without unpacking anything.
"""

import csv
import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from opdgeo.delta.io import EMBEDDING_SUFFIX, Checkpoint
from opdgeo.delta.pairing import match_tensors
from opdgeo.files import atomic
from opdgeo.naming import canonical_name, classify

FORMAT = "opdgeo-mask-v2"
READABLE_FORMATS = ("opdgeo-mask-v1", FORMAT)
# safetensors writes metadata keys in a random order (a Rust HashMap, seeded per map), so a
# mask's metadata is one key holding sorted JSON: the same mask is the same bytes every run.
# (v1 files held the same fields as separate keys and are still read.)
METADATA_KEY = "opdgeo_mask"
Mask = dict[str, torch.Tensor]


# ---------------------------------------------------------------- reading checkpoints


def checkpoint_shapes(checkpoint: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the checkpoint's headers only."""
    ckpt = Checkpoint(checkpoint)
    return {name: ckpt.shape(name) for name in ckpt.names()}


def _deltas(source, trained) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (source tensor name, |W_trained - W_source|) in fp32, one tensor at a time.

    Both tensors are cast to bf16 first, as the analysis reads them (docs/study.md section 3): an
    fp32 checkpoint's sub-bf16 changes would otherwise make a far denser mask than the
    sparsity the analysis reports. The subtraction is exact in fp32."""
    src, trn = Checkpoint(source), Checkpoint(trained)
    for pair in match_tensors(src, trn):  # raises, naming them, on missing or misshapen ones
        if pair.tied_head and pair.source_name.endswith(EMBEDDING_SUFFIX):
            continue  # a tied source has no head parameter to mask: its embedding is masked
        a, b = (t.to(torch.bfloat16).float() for t in (src.load(pair.source_name),
                                                        trn.load(pair.trained_name)))
        yield pair.source_name, (b - a).abs()


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------- making masks


def mask_from_delta(source, trained, atol: float = 1e-5) -> Mask:
    """m = |W_trained - W_source| > atol per tensor, from two checkpoints as stored."""
    return {name: delta > atol for name, delta in _deltas(source, trained)}


def _count(density: float, numel: int) -> int:
    """Number of True coordinates for a target density (half rounds up, the same everywhere)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"mask density must be in [0, 1], got {density}")
    return min(numel, math.floor(density * numel + 0.5))


def top_fraction_mask(source, trained, density: float) -> Mask:
    """The top-`density` coordinates by |dW| in every tensor.

    A stable descending sort breaks ties by position (lower flat index first), so equal
    deltas, e.g. the many exact zeros of a bf16 checkpoint, are picked the same way every time.
    """
    mask = {}
    for name, delta in _deltas(source, trained):
        flat = delta.flatten()
        k = _count(density, flat.numel())
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[order] = True
        mask[name] = chosen.view(delta.shape)
    return mask


def _random_exact(shape: tuple[int, ...], k: int, seed: int, name: str) -> torch.Tensor:
    # Seeded per tensor from (seed, name): a tensor's mask does not depend on the others.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    numel = math.prod(shape)
    chosen = torch.zeros(numel, dtype=torch.bool)
    chosen[torch.randperm(numel, generator=generator)[:k]] = True
    return chosen.view(shape)


def random_mask_like(mask: Mask, seed: int) -> Mask:
    """A uniformly random mask with exactly as many True coordinates as `mask`, per tensor."""
    return {name: _random_exact(tuple(m.shape), int(m.sum()), seed, name)
            for name, m in mask.items()}


def random_mask_with_density(shapes: dict[str, tuple[int, ...]], density: float,
                             seed: int) -> Mask:
    """A uniformly random mask with round(density * numel) True coordinates in every tensor."""
    return {name: _random_exact(tuple(shape), _count(density, math.prod(shape)), seed, name)
            for name, shape in shapes.items()}


# ---------------------------------------------------------------- IO


def _densities(mask: Mask) -> tuple[float, dict[str, float]]:
    per_tensor = {name: m.sum().item() / max(m.numel(), 1) for name, m in mask.items()}
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    return kept / max(total, 1), per_tensor


def save_mask(mask: Mask, path: str | Path):
    """Write `mask` bit-packed, with shapes and densities in the metadata, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    packed = {name: torch.from_numpy(np.packbits(m.cpu().numpy().reshape(-1)))
              for name, m in mask.items()}
    global_density, per_tensor = _densities(mask)
    fields = {
        "format": FORMAT,
        "shapes": json.dumps({name: list(m.shape) for name, m in mask.items()}),
        "density": json.dumps(per_tensor),
        "global_density": repr(global_density),
    }
    with atomic(path, "masks.mask") as tmp:
        save_file(packed, str(tmp), metadata={METADATA_KEY: json.dumps(fields, sort_keys=True)})


def _metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY in metadata:
        metadata = json.loads(metadata[METADATA_KEY])
    if metadata.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path} is not an opdgeo mask (metadata format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    return metadata


def load_mask(path: str | Path) -> Mask:
    """Read a mask written by `save_mask`: name -> BoolTensor of the original shape."""
    shapes = json.loads(_metadata(path)["shapes"])
    mask = {}
    with safe_open(str(path), framework="pt") as f:
        for name, shape in shapes.items():
            bits = f.get_tensor(name).numpy()
            flat = np.unpackbits(bits, count=math.prod(shape)).astype(bool)
            mask[name] = torch.from_numpy(flat).view(shape)
    return mask


def mask_densities(path_or_mask: str | Path | Mask) -> tuple[float, dict[str, float]]:
    """(global density, per-tensor densities); from a file's metadata without unpacking."""
    if isinstance(path_or_mask, dict):
        return _densities(path_or_mask)
    metadata = _metadata(path_or_mask)
    return float(metadata["global_density"]), json.loads(metadata["density"])


def write_density_csv(path_or_mask: str | Path | Mask, out: str | Path, mask_name: str):
    """Tidy densities: mask, tensor, block, density; tensor "all" is the global density."""
    global_density, per_tensor = mask_densities(path_or_mask)
    with atomic(out, "masks.densities") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("mask", "tensor", "block", "density"))
        writer.writerow((mask_name, "all", "all", global_density))
        for name, density in sorted(per_tensor.items()):
            writer.writerow((mask_name, name, classify(name).block, density))


# ---------------------------------------------------------------- checking against a model


def check_mask_matches_model(mask: Mask, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Align a mask with the model's trainable parameters, or raise a ValueError naming them.

    Names are matched through `canonical_name`, so a mask made from a vision-language
    checkpoint on disk fits the same model in memory. Every trainable parameter must be
    covered (a missing tensor is a wrong mask, not "frozen"), and every mask tensor must name a
    parameter. Returns parameter name -> mask, for the trainable parameters.
    """
    by_canon: dict[str, str] = {}
    for name in mask:
        canon = canonical_name(name)
        if canon in by_canon:
            raise ValueError(f"mask tensors {by_canon[canon]} and {name} both map to {canon}")
        by_canon[canon] = name
    params = {canonical_name(n): (n, p) for n, p in model.named_parameters()}
    trainable = {c: (n, p) for c, (n, p) in params.items() if p.requires_grad}

    unknown = sorted(by_canon[c] for c in by_canon.keys() - params.keys())
    uncovered = sorted(n for c, (n, _) in trainable.items() if c not in by_canon)
    wrong_shape = [
        f"{by_canon[c]} {tuple(mask[by_canon[c]].shape)} vs parameter {n} {tuple(p.shape)}"
        for c, (n, p) in sorted(trainable.items())
        if c in by_canon and tuple(mask[by_canon[c]].shape) != tuple(p.shape)
    ]
    problems = []
    if unknown:
        problems.append(f"mask tensors with no model parameter: {_some(unknown)}")
    if uncovered:
        problems.append(f"trainable parameters the mask does not cover: {_some(uncovered)}")
    if wrong_shape:
        problems.append(f"shape mismatches (mask vs model): {_some(wrong_shape)}")
    if problems:
        raise ValueError(
            "the mask does not match the model: " + "; ".join(problems)
            + ". Make the mask from a checkpoint of this model's source."
        )
    not_bool = sorted(name for name, m in mask.items() if m.dtype != torch.bool)
    if not_bool:
        raise ValueError(f"mask tensors must be bool, got other dtypes for {_some(not_bool)}")
    return {n: mask[by_canon[c]] for c, (n, _) in trainable.items()}
