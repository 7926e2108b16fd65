"""Tiny checkpoints written straight to disk: safetensors (single or sharded) or .bin."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1,
                    bin_format: bool = False, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"tie_word_embeddings": False}))
    if bin_format:
        torch.save(tensors, folder / "pytorch_model.bin")
        return folder
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
        return folder
    names = list(tensors)
    weight_map = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::shards]}
        save_file(part, folder / file_name)
        weight_map |= {name: file_name for name in part}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def small_model(seed: int = 0, hidden: int = 16, layers: int = 2) -> dict[str, torch.Tensor]:
    """A Qwen2-shaped bf16 state dict: attention, FFN, norms, embedding."""
    generator = torch.Generator().manual_seed(seed)

    def gaussian(*shape):
        return (torch.randn(shape, generator=generator) * 0.02).bfloat16()

    tensors = {"model.embed_tokens.weight": gaussian(40, hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        tensors |= {
            prefix + "self_attn.q_proj.weight": gaussian(hidden, hidden),
            prefix + "self_attn.k_proj.weight": gaussian(8, hidden),
            prefix + "self_attn.v_proj.weight": gaussian(8, hidden),
            prefix + "self_attn.o_proj.weight": gaussian(hidden, hidden),
            prefix + "mlp.gate_proj.weight": gaussian(2 * hidden, hidden),
            prefix + "mlp.up_proj.weight": gaussian(2 * hidden, hidden),
            prefix + "mlp.down_proj.weight": gaussian(hidden, 2 * hidden),
            prefix + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        }
    return tensors


def perturbed(tensors: dict[str, torch.Tensor], seed: int = 1, fraction: float = 0.3,
              scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """A 'trained' copy: a random `fraction` of coordinates moved by N(0, scale^2)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in tensors.items():
        moved = torch.rand(tensor.shape, generator=generator) < fraction
        step = torch.randn(tensor.shape, generator=generator) * scale * moved
        out[name] = (tensor.float() + step).to(tensor.dtype)
    return out
