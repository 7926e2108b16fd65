"""Checkpoint folders read one tensor at a time; outputs written all at once.

A checkpoint is a Hugging Face folder holding `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model*.bin` (read through a lazy mmap), or a
single `.safetensors` file (the fp32 master weights a run keeps beside its bf16 checkpoint).
Nothing is loaded until `load` asks for one tensor, so a pair of checkpoints never sits in
memory at once. A tensor that holds NaN or inf, or a file that cannot be read, is an error
naming the file and the tensor. Outputs are written all at once or not at all
(`write_atomically`), into a folder checked to be writable before the work (`check_writable`).
"""

import json
import math
import re
import tempfile
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open

from opdgeo.config import split_reference
from opdgeo.files import atomic

EMBEDDING_SUFFIX = "embed_tokens.weight"
LM_HEAD_SUFFIX = "lm_head.weight"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the analysis dtypes
_FLOAT_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class Checkpoint:
    """Tensor names, shapes and lazy loading for one checkpoint folder or file."""

    def __init__(self, path: str | Path):
        self.path = local_checkpoint(path)
        if not self.path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist (a folder, a safetensors "
                                    f"file or a Hugging Face id)")
        self._file_of: dict[str, Path] = {}  # safetensors: tensor name -> file
        self._bin_tensors: dict[str, torch.Tensor] = {}  # .bin: mmap-backed tensors
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._is_float: dict[str, bool] = {}
        if self.path.is_file():
            self._index_safetensors([self.path])
        elif (self.path / "model.safetensors.index.json").exists():
            index = json.loads((self.path / "model.safetensors.index.json").read_text())
            shards = sorted({self.path / f for f in index["weight_map"].values()})
            self._index_safetensors(shards)
        elif sorted(self.path.glob("*.safetensors")):
            self._index_safetensors(sorted(self.path.glob("*.safetensors")))
        elif sorted(self.path.glob("pytorch_model*.bin")):
            for shard in sorted(self.path.glob("pytorch_model*.bin")):
                try:
                    state = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
                except (RuntimeError, OSError, EOFError) as error:
                    raise _damaged(shard, error) from error
                self._bin_tensors.update(state)
        else:
            raise ValueError(f"{self.path}: no *.safetensors or pytorch_model*.bin found")
        self.tie_word_embeddings = _ties_embeddings(self.path)

    def _index_safetensors(self, files: list[Path]) -> None:
        for file in files:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        info = handle.get_slice(name)
                        self._file_of[name] = file
                        self._shapes[name] = tuple(info.get_shape())
                        self._is_float[name] = info.get_dtype() in _FLOAT_SAFETENSORS_DTYPES
            except (SafetensorError, OSError) as error:
                raise _damaged(file, error) from error

    def names(self) -> list[str]:
        """Floating-point tensors, each stored tensor once (tied copies dropped)."""
        if self._bin_tensors:
            names = [n for n, t in self._bin_tensors.items() if t.is_floating_point()]
        else:
            names = [n for n in self._file_of if self._is_float[n]]
        return [n for n in names if not self._is_tied_copy(n, names)]

    def shape(self, name: str) -> tuple[int, ...]:
        if self._bin_tensors:
            return tuple(self._bin_tensors[name].shape)
        return self._shapes[name]

    def load(self, name: str) -> torch.Tensor:
        """One tensor, checked to be finite."""
        if self._bin_tensors:
            tensor = self._bin_tensors[name]
        else:
            # opened per tensor: a file kept open stays memory-mapped, and every page read
            # through the map would count towards the process's resident memory
            file = self._file_of[name]
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    tensor = handle.get_tensor(name)
            except (SafetensorError, OSError) as error:
                raise _damaged(file, error, name) from error
        # finite exactly when its minimum and maximum are (NaN propagates through both): one
        # reduction, where isfinite would write a boolean copy and cost ~9x the time
        if tensor.is_floating_point() and tensor.numel():
            if not all(math.isfinite(float(bound)) for bound in torch.aminmax(tensor)):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(
                    f"checkpoint {self.path}: tensor {name} holds {bad} NaN or inf values "
                    f"(of {tensor.numel()}); the weights are damaged or the training "
                    "diverged, so no delta can be measured")
        return tensor

    def _is_tied_copy(self, name: str, names: list[str]) -> bool:
        """An output head that is the input embedding (by config, or by shared storage)."""
        if not name.endswith(LM_HEAD_SUFFIX):
            return False
        embedding = next((n for n in names if n.endswith(EMBEDDING_SUFFIX)), None)
        if embedding is None:
            return False
        if self.tie_word_embeddings:
            return True
        if self._bin_tensors:  # torch.save keeps tied parameters as one storage
            head, embed = self._bin_tensors[name], self._bin_tensors[embedding]
            return head.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()
        return False


def step_folders(checkpoints: str | Path) -> dict[int, Path]:
    """A run's intermediate checkpoints (`checkpoints/step-N`) by step, in step order."""
    if not Path(checkpoints).is_dir():
        raise FileNotFoundError(f"no checkpoints folder {checkpoints}: train the run first, "
                                f"or drop --checkpoints")
    folders = {int(path.name.removeprefix("step-")): path
               for path in Path(checkpoints).glob("step-*") if path.is_dir()}
    return dict(sorted(folders.items()))


def _damaged(file: Path, error: Exception, tensor: str | None = None) -> ValueError:
    what = f"tensor {tensor} of {file}" if tensor else str(file)
    return ValueError(f"cannot read {what} ({error}): the file is damaged or truncated; "
                      "write or download it again")


def local_checkpoint(path: str | Path) -> Path:
    """A folder or file on disk as it is; a Hugging Face id (`org/name`, not on disk) as its
    folder in the hub cache, downloaded if needed (with HF_HUB_OFFLINE=1, the cache only)."""
    local = Path(path)
    repo_id, revision = split_reference(str(path))
    if local.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return local
    from huggingface_hub import snapshot_download

    # Weights as the folder holds them: safetensors, else pytorch_model*.bin (older uploads).
    folder = Path(snapshot_download(repo_id, revision=revision,
                                    allow_patterns=["*.json", "*.safetensors"]))
    if any(folder.glob("*.safetensors")):
        return folder
    return Path(snapshot_download(repo_id, revision=revision,
                                  allow_patterns=["*.json", "pytorch_model*.bin"]))


def resolved_commit(folder: Path) -> str | None:
    """The hub commit a checkpoint was read at: the name of its snapshot folder in the hub
    cache (`.../models--org--name/snapshots/<commit>`); None for a local checkpoint."""
    folder = folder if folder.is_dir() else folder.parent
    return folder.name if folder.parent.name == "snapshots" else None


def _ties_embeddings(path: Path) -> bool:
    """`tie_word_embeddings` from config.json (top level or a multimodal `text_config`)."""
    config_file = (path.parent if path.is_file() else path) / "config.json"
    if not config_file.exists():
        return False
    config = json.loads(config_file.read_text())
    text_config = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)))


def check_writable(path: str | Path) -> None:
    """Fail before the work rather than after it: `path`'s folder exists (made if needed) and
    takes new files, as `write_atomically` needs."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error}") from error


def write_atomically(out_dir: str | Path, files: dict[str, str | pd.DataFrame],
                     point: str) -> None:
    """Write every file into out_dir at once (`opdgeo.files.atomic`, at crash point `point`).
    DataFrames become CSV."""
    with atomic(out_dir, point) as temporary:
        temporary.mkdir()
        for file_name, content in files.items():
            if isinstance(content, pd.DataFrame):
                content.to_csv(temporary / file_name, index=False)
            else:
                (temporary / file_name).write_text(content)
