"""The paper's hub models, from config/hub_models.yaml: the one place their facts live.

`opdgeo.resources` sizes jobs from them, `opdgeo.rehearse` builds stand-ins from them and
`opdgeo.paper_tables` takes their shapes for the rounding null. Torch-free: the tensor sizes
are counted in closed form from the config.json keys (tests/test_hub_models.py checks them
against the model transformers builds from the same keys on the meta device).
"""

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

HUB_MODELS_FILE = Path(__file__).resolve().parents[2] / "config" / "hub_models.yaml"


@dataclass(frozen=True)
class HubModel:
    """One checkpoint's facts; the fields are the data file's keys (its header says each)."""

    config: dict
    stand_in: str | None = None
    parent: str | None = None
    wide: bool = False
    sized: bool = True
    unverified: str = ""
    sources: str = ""

    @property
    def arch(self) -> str:
        """The opdgeo.models architecture of its stand-in."""
        return self.stand_in or self.config["model_type"]

    @property
    def tied(self) -> bool:
        """lm_head tied to embed_tokens (the checkpoint stores no head)."""
        return self.config["tie_word_embeddings"]

    @property
    def text(self) -> dict:
        """The language model's keys (a vision-language config nests them)."""
        return {**self.config, **self.config.get("text_config", {})}


@cache
def hub_models() -> dict[str, HubModel]:
    """Hub id (or a user's checkpoint path) -> its facts."""
    entries = yaml.safe_load(HUB_MODELS_FILE.read_text())
    return {hub_id: HubModel(**entry) for hub_id, entry in entries.items()}


def by_name(name: str) -> HubModel:
    """The model whose hub id ends in `/name` (the paper names models without their org)."""
    return next(m for hub_id, m in hub_models().items() if hub_id.split("/")[-1] == name)


def tensor_sizes(model: HubModel) -> list[int]:
    """Elements of every tensor of the checkpoint, a tied head counted once."""
    t = model.text
    h, inner, layers, heads = (t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"],
                               t["num_attention_heads"])
    head_dim = t.get("head_dim") or h // heads
    q, kv = heads * head_dim, t["num_key_value_heads"] * head_dim
    layer = [h * q, h * kv, h * kv, q * h, h * inner, h * inner, inner * h, h, h]
    if t["model_type"] in ("qwen2", "qwen2_5_vl"):  # biased q, k, v projections
        layer += [q, kv, kv]
    if t["model_type"] == "qwen3":  # q and k norms
        layer += [head_dim, head_dim]
    sizes = [t["vocab_size"] * h] * (1 if model.tied else 2) + layer * layers + [h]
    if "vision_config" in model.config:
        sizes += _vision_sizes(model.config["vision_config"])
    return sizes


def _vision_sizes(v: dict) -> list[int]:
    """Qwen2.5-VL's vision tower: patch embedding, blocks (biased attention and gated MLP,
    two norms) and the merger of spatial_merge_size^2 patches into one text token."""
    h, inner = v["hidden_size"], v["intermediate_size"]
    patch = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2 * h
    block = [h, h, 3 * h * h, 3 * h, h * h, h, h * inner, inner, h * inner, inner, inner * h, h]
    merged = h * v["spatial_merge_size"] ** 2
    merger = [h, merged * merged, merged, merged * v["out_hidden_size"], v["out_hidden_size"]]
    return [patch] + block * v["depth"] + merger


def kv_per_token(text: dict) -> int:
    """Key and value elements per generated token, all layers together, from a language
    model's config.json keys."""
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return 2 * text["num_hidden_layers"] * text.get("num_key_value_heads", heads) * head_dim
