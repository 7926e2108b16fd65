"""Source <-> trained tensor matching: which tensor of one checkpoint each tensor of the
other is compared with (by name, by canonical name, and a tied head with its embedding).
"""

import re
from dataclasses import dataclass

from opdgeo.delta.io import EMBEDDING_SUFFIX, LM_HEAD_SUFFIX, Checkpoint
from opdgeo.naming import canonical_name


@dataclass(frozen=True)
class TensorPair:
    """One tensor of the source and its counterpart in the trained checkpoint."""

    name: str  # canonical name (naming.canonical_name of the source name)
    source_name: str
    trained_name: str
    shape: tuple[int, ...]
    # The output head of one checkpoint paired with the other's input embedding, because that
    # one ties them (its effective head): see `TIED_HEAD_NOTE`.
    tied_head: bool = False


TIED_HEAD_NOTE = ("one checkpoint ties lm_head to embed_tokens and stores no head: the other's "
                  "lm_head is compared with its embedding (the tied checkpoint's effective head)")


def _tied_head_pair(source: Checkpoint, trained: Checkpoint, missing_in_trained: list[str],
                    missing_in_source: list[str]) -> TensorPair | None:
    """The one pair a tied and an untied checkpoint of one architecture leave unmatched
    (Qwen2.5-Math-1.5B ties its head, DeepSeek-R1-Distill-Qwen-1.5B does not), else None."""
    def embedding(checkpoint: Checkpoint) -> str | None:
        return next((n for n in checkpoint.names() if n.endswith(EMBEDDING_SUFFIX)), None)

    if (not missing_in_trained and len(missing_in_source) == 1
            and missing_in_source[0].endswith(LM_HEAD_SUFFIX) and source.tie_word_embeddings
            and embedding(source)):
        head = missing_in_source[0]
        return TensorPair(canonical_name(head), embedding(source), head, trained.shape(head),
                          tied_head=True)
    if (not missing_in_source and len(missing_in_trained) == 1
            and missing_in_trained[0].endswith(LM_HEAD_SUFFIX) and trained.tie_word_embeddings
            and embedding(trained)):
        head = missing_in_trained[0]
        return TensorPair(canonical_name(head), head, embedding(trained), source.shape(head),
                          tied_head=True)
    return None


def match_tensors(source: Checkpoint, trained: Checkpoint) -> list[TensorPair]:
    """Pair tensors by exact name, then by canonical name; raise on any mismatch.

    Pairs come in natural order of their canonical names."""
    source_names, trained_names = source.names(), trained.names()
    trained_left = set(trained_names)
    matched: dict[str, str] = {}
    for name in source_names:
        if name in trained_left:
            matched[name] = name
            trained_left.discard(name)
    trained_by_canonical = {canonical_name(n): n for n in trained_left}
    for name in source_names:
        if name not in matched and canonical_name(name) in trained_by_canonical:
            matched[name] = trained_by_canonical.pop(canonical_name(name))
    if not matched:
        raise ValueError(
            f"no matching tensors between {source.path} and {trained.path}: "
            f"source has {source_names[:5]}..., trained has {trained_names[:5]}..."
        )
    missing_in_trained = [n for n in source_names if n not in matched]
    missing_in_source = sorted(trained_by_canonical.values())
    tied = _tied_head_pair(source, trained, missing_in_trained, missing_in_source)
    if tied is not None:
        missing_in_trained, missing_in_source = [], []
    if missing_in_trained or missing_in_source:
        raise ValueError(
            f"tensors present in only one checkpoint: missing in trained {trained.path}: "
            f"{missing_in_trained}; missing in source {source.path}: {missing_in_source}"
        )
    pairs = []
    for source_name, trained_name in matched.items():
        source_shape, trained_shape = source.shape(source_name), trained.shape(trained_name)
        if source_shape != trained_shape:
            raise ValueError(
                f"shape mismatch for tensor {source_name}: source {list(source_shape)} "
                f"vs trained {trained_name} {list(trained_shape)}"
            )
        pairs.append(TensorPair(canonical_name(source_name), source_name, trained_name,
                                source_shape))
    if tied is not None:
        if source.shape(tied.source_name) != trained.shape(tied.trained_name):
            raise ValueError(f"shape mismatch between the tied head {tied.source_name} and "
                             f"{tied.trained_name}")
        pairs.append(tied)
    return sorted(pairs, key=lambda pair: _natural_key(pair.name))


def _natural_key(name: str) -> list:
    """layers.2 before layers.10: output rows in model order whatever the shard layout."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
