"""Tokenizers and models: build tiny ones locally, load fp32 for training, save bf16.

The study's checkpoints are bf16; training keeps fp32 master weights. `save_pretrained` has
no dtype argument, so a bf16 copy is made before saving. Every save goes to a temporary
folder first and is renamed into place, so a crash never leaves a checkpoint that looks whole.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
TASK_CHARACTERS = "0123456789+="

# Architectures a tiny model can be built from; each maps to a transformers config class.
# MiniCPM3 (multi-head latent attention, muP scaling) is the MiniCPM transformers supports
# natively; other MiniCPM releases load with trust_remote_code only.
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "minicpm3": "MiniCPM3ForCausalLM",
}
_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "minicpm3": "minicpm3"}


def character_tokenizer(characters: str = TASK_CHARACTERS) -> PreTrainedTokenizerFast:
    """One token per character, plus pad / eos / unk; no chat template."""
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *characters])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
    )


def build_model(arch: str, tokenizer, seed: int, **dims) -> torch.nn.Module:
    """A randomly initialised causal LM of a real transformers architecture."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    config = AutoConfig.for_model(
        _MODEL_TYPES[arch],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **dims,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a model from the keys of its Hugging Face config.json
    (`architectures`, `model_type` and the sizes), built on the meta device: no weights, no
    memory, no hub. Tied weights appear once, as in a checkpoint."""
    import transformers

    numbers = dict(config)
    model_class = getattr(transformers, numbers.pop("architectures")[0])
    hf_config = AutoConfig.for_model(numbers.pop("model_type"), **numbers)
    with torch.device("meta"):
        model = model_class._from_config(hf_config)
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def load_model(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Load a checkpoint with fp32 master weights, whatever dtype it was saved in."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.to(device)


def load_tokenizer(path: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    return tokenizer


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student: str, teacher: str):
    """OPD compares distributions token by token: the vocabularies must be identical."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"teacher {teacher} and student {student} have different vocabularies "
            f"({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens): on-policy "
            "distillation needs one shared tokenizer. Pick a teacher of the student's family."
        )


def save_checkpoint(model, tokenizer, path: str | Path, fp32_weights: Path | None = None):
    """Save a bf16 copy of `model` with its tokenizer, atomically.

    With `fp32_weights`, the fp32 master weights are kept beside it as one safetensors file
    (the exact rounding null needs the update before the bf16 cast).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bf16_state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp, state_dict=bf16_state)
    _mark_dtype(tmp / "config.json", "bfloat16")
    tokenizer.save_pretrained(tmp)
    if fp32_weights is not None:
        state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
        save_file(state, str(fp32_weights) + ".tmp")
        Path(str(fp32_weights) + ".tmp").replace(fp32_weights)
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)


def _mark_dtype(config_path: Path, dtype: str):
    config = json.loads(config_path.read_text())
    config["dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
