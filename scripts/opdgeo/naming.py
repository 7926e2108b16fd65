"""Parameter names -> one scheme: canonical name, layer index, module type and block.

Checkpoints of one architecture family spell their tensors differently (a vision-language
checkpoint nests the language model under `model.language_model.` or `language_model.`).
Every later stage (analysis, masks, optimizer diagnostics, figures) groups parameters through
this one module, so a language-model tensor gets the same name and group in every pair.
"""

import re
from dataclasses import dataclass

# Prefixes that wrap the language model in multimodal checkpoints, mapped to the
# language-only spelling. Longest first: the first match wins.
LANGUAGE_ALIASES = (
    ("model.language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model."),
)
# Vision towers: `visual.*` (Qwen2-VL on disk), `model.visual.*` (in memory), `vision_tower.*`.
VISION_PREFIXES = ("model.visual.", "visual.", "vision_tower.", "model.vision_tower.")
VISION_CANONICAL = "visual."

BLOCKS = ("attention", "ffn", "embedding", "lm_head", "norm", "vision", "projector", "other")

_MODULE_PATTERNS = (
    ("q_proj", "q"),
    ("k_proj", "k"),
    ("v_proj", "v"),
    ("o_proj", "o"),
    ("qkv", "qkv"),
    # Multi-head latent attention (MiniCPM3, DeepSeek-V2): low-rank query and key-value maps.
    ("q_a_proj", "q"),
    ("q_b_proj", "q"),
    ("kv_a_proj", "kv"),
    ("kv_b_proj", "kv"),
    ("gate_proj", "gate"),
    ("up_proj", "up"),
    ("down_proj", "down"),
    ("embed_tokens", "embed_tokens"),
    ("lm_head", "lm_head"),
)
_MODULE_TO_BLOCK = {
    "q": "attention",
    "k": "attention",
    "v": "attention",
    "o": "attention",
    "qkv": "attention",
    "kv": "attention",
    "gate": "ffn",
    "up": "ffn",
    "down": "ffn",
    "embed_tokens": "embedding",
    "lm_head": "lm_head",
    "norm": "norm",
}
_LAYER = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ParamGroup:
    """Where one parameter sits: its canonical name and its layer / module / block."""

    name: str
    layer: int | None
    module: str
    block: str


def canonical_name(name: str) -> str:
    """Map a checkpoint tensor name to the language-only (or `visual.`) scheme."""
    for prefix in VISION_PREFIXES:
        if name.startswith(prefix):
            return VISION_CANONICAL + name[len(prefix) :]
    for prefix, replacement in LANGUAGE_ALIASES:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return name


def classify(name: str) -> ParamGroup:
    """Group a parameter by layer index, module type and block."""
    canon = canonical_name(name)
    match = _LAYER.search(canon)
    layer = int(match.group(1)) if match else None
    if canon.startswith(VISION_CANONICAL):
        block = "projector" if ".merger." in canon else "vision"
        return ParamGroup(canon, layer, block, block)
    module = next((label for needle, label in _MODULE_PATTERNS if needle in canon), None)
    if module is None:
        module = "norm" if "norm" in canon else "other"
    block = _MODULE_TO_BLOCK.get(module, "other")
    return ParamGroup(canon, layer, module, block)


def type_block(name: str) -> str:
    """The block of a parameter by its module type wherever it sits: `classify`'s block, but a
    vision tower's attention, MLP and norms count as attention, FFN and norm, and its patch
    embedding and projector (merger) as other. The paper's module energy table has only these
    blocks (docs/study.md section 3 lists no vision block), so its vision-language row counts the
    tower so; our reading, as the paper does not say where the tower's other parts go."""
    group = classify(name)
    if group.block == "projector":
        return "other"
    if group.block != "vision":
        return group.block
    if ".attn." in group.name:
        return "attention"
    if ".mlp." in group.name:
        return "ffn"
    return "norm" if "norm" in group.name.rsplit(".", 2)[-2] else "other"
