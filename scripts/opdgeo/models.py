"""Tokenizers, processors and models: build tiny ones locally, load fp32 for training, save bf16.

Vision-language models (Qwen2-VL, Qwen2.5-VL) go with a processor (image processor + the
character tokenizer with image tokens and a chat template) wherever a language model goes with
its tokenizer: `load_tokenizer` returns it and `save_checkpoint` saves it beside the weights.

The study's checkpoints are bf16; training keeps fp32 master weights. `save_pretrained` has
no dtype argument, so a bf16 copy is made before saving. Every save goes to a temporary
folder first and is renamed into place, so a crash never leaves a checkpoint that looks whole.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)
from transformers.core_model_loading import revert_weight_conversion
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.utils import logging as transformers_logging

from opdgeo.files import atomic
from opdgeo.progress import on_terminal

if not on_terminal():  # bars of loading and saving checkpoints, one line of noise in a log
    transformers_logging.disable_progress_bar()

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
TASK_CHARACTERS = "0123456789+="
# The special tokens of Qwen2-VL's processor and model (image placeholders and their bounds).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# A chat template for the character tokenizer: the text as it is, an image as Qwen2-VL's
# placeholder, and end-of-sequence after an assistant turn (SFT learns to stop there).
VISION_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}" + EOS + "{% endif %}{% endfor %}"
)

# Architectures a tiny model can be built from; each maps to a transformers config class.
# MiniCPM3 (multi-head latent attention, muP scaling) is the MiniCPM transformers supports
# natively; other MiniCPM releases load with trust_remote_code only.
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "minicpm3": "MiniCPM3ForCausalLM",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "minicpm3": "minicpm3",
                "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}
VISION_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl")


class ImageTextProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without a video processor (Qwen2VLProcessor needs one to be built
    and saved; these tasks have images only). Its sub-processors are read from the signature
    of `__init__`, so it saves and reloads as image processor + tokenizer."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def character_tokenizer(characters: str = TASK_CHARACTERS,
                        vision: bool = False) -> PreTrainedTokenizerFast:
    """One token per character, plus pad / eos / unk; no chat template. With `vision`, also
    Qwen2-VL's image tokens and a chat template that places them (see VISION_CHAT_TEMPLATE)."""
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *characters])}
    if vision:
        vocab.update({token: len(vocab) + i for i, token in enumerate(VISION_TOKENS)})
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    extra = {"additional_special_tokens": list(VISION_TOKENS),
             "chat_template": VISION_CHAT_TEMPLATE} if vision else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        **extra,
    )


def image_text_processor(max_pixels: int = 28 * 28 * 64,
                         characters: str = TASK_CHARACTERS) -> ImageTextProcessor:
    """The character tokenizer with image tokens, and Qwen2-VL's PIL image processor (no
    torchvision needed): 14-pixel patches merged 2 x 2 into one language token."""
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14,
                                      merge_size=2, temporal_patch_size=2)
    tokenizer = character_tokenizer(characters, vision=True)
    return ImageTextProcessor(images, tokenizer, chat_template=tokenizer.chat_template)


def text_tokenizer(processing_class):
    """The tokenizer of a processor, or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def build_model(arch: str, tokenizer, seed: int, vision: dict | None = None,
                **dims) -> torch.nn.Module:
    """A randomly initialised causal LM of a real transformers architecture; for a
    vision-language architecture, `tokenizer` is its processor and `vision` the vision
    tower's dimensions (its output width is the language model's)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    tokenizer = text_tokenizer(tokenizer)
    text = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        # a build may tie them (as Qwen2.5-Math does) and need longer prompts (chat templates)
        **{"max_position_embeddings": 64, "tie_word_embeddings": False, **dims},
    )
    if arch in VISION_ARCHITECTURES:
        config = _vision_language_config(arch, tokenizer, text, vision or {})
    elif vision:
        raise ValueError(f"architecture {arch!r} has no vision tower; drop `vision` or use one "
                         f"of {VISION_ARCHITECTURES}")
    else:
        config = AutoConfig.for_model(_MODEL_TYPES[arch], **text)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if arch in VISION_ARCHITECTURES else AutoModelForCausalLM
    return auto.from_config(config, dtype=torch.float32)


def _vision_language_config(arch: str, tokenizer, text: dict, vision: dict):
    # Multimodal rotary positions split each head's frequencies into (time, height, width)
    # sections; Qwen's 1:1.5:1.5 split, scaled to the tiny head.
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = {**text, "max_position_embeddings": max(256, text["max_position_embeddings"]),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": sections}}
    vision = {"depth": 1, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "in_channels": 3, **vision}
    width = "hidden_size" if arch == "qwen2_vl" else "out_hidden_size"
    vision[width] = text["hidden_size"]
    ids = {f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}|>")
           for name in ("vision_start", "vision_end")}
    ids |= {f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}_pad|>")
            for name in ("image", "video")}
    return AutoConfig.for_model(_MODEL_TYPES[arch], text_config=text, vision_config=vision,
                                tie_word_embeddings=text["tie_word_embeddings"],
                                pad_token_id=text["pad_token_id"],
                                eos_token_id=text["eos_token_id"], **ids)


def is_vision_language(path: str | Path) -> bool:
    """Whether a checkpoint (folder or hub id) has a vision tower; a folder without a model
    config (a tokenizer alone) has none."""
    if Path(path).is_dir() and not (Path(path) / "config.json").exists():
        return False
    name, revision = _pretrained(path)
    return hasattr(AutoConfig.from_pretrained(name, revision=revision), "vision_config")


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


def _pretrained(path: str | Path) -> tuple[str, str | None]:
    """(name, revision) for `from_pretrained`: a pinned hub id `org/name@revision` split."""
    from opdgeo.config import split_reference

    return split_reference(str(path))


def load_model(path: str | Path, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a checkpoint with fp32 master weights (or in `dtype`), whatever dtype it was saved
    in."""
    auto = AutoModelForImageTextToText if is_vision_language(path) else AutoModelForCausalLM
    name, revision = _pretrained(path)
    model = auto.from_pretrained(name, revision=revision, dtype=dtype)
    return model.to(device)


def load_tokenizer(path: str | Path):
    """The tokenizer of a language model; the processor of a vision-language model."""
    if is_vision_language(path):
        # AutoProcessor does not know ImageTextProcessor (and returns the tokenizer alone for
        # a folder without a video processor): a folder saved by it is reloaded by it.
        config = Path(path) / "processor_config.json"
        ours = config.exists() and ImageTextProcessor.__name__ in config.read_text()
        name, revision = _pretrained(path)
        processor = (ImageTextProcessor if ours else AutoProcessor).from_pretrained(
            name, revision=revision)
        processor.tokenizer.padding_side = "left"
        return processor
    name, revision = _pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    tokenizer.padding_side = "left"
    return tokenizer


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student: str, teacher: str):
    """OPD compares distributions token by token: the vocabularies must be identical; with
    images, both models must also see the same pixels (one image processor setting)."""
    student_images = getattr(student_tokenizer, "image_processor", None)
    teacher_images = getattr(teacher_tokenizer, "image_processor", None)
    if _pixel_settings(student_images) != _pixel_settings(teacher_images):
        raise ValueError(
            f"teacher {teacher} and student {student} have different processors (image "
            f"processor {_describe(teacher_images)} vs {_describe(student_images)}): on-policy "
            "distillation needs one shared processor, so that both see the same image tokens."
        )
    student_tokenizer, teacher_tokenizer = (text_tokenizer(student_tokenizer),
                                            text_tokenizer(teacher_tokenizer))
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"teacher {teacher} and student {student} have different vocabularies "
            f"({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens): on-policy "
            "distillation needs one shared tokenizer. Pick a teacher of the student's family."
        )


def _pixel_settings(image_processor) -> dict | None:
    """What decides the pixels and image tokens a model sees; not the class that computes
    them (a fast and a slow image processor of one checkpoint agree)."""
    if image_processor is None:
        return None
    return {k: v for k, v in image_processor.to_dict().items()
            if not k.startswith("_") and k not in ("image_processor_type", "processor_class")}


def _describe(image_processor) -> str:
    if image_processor is None:
        return "none"
    settings = image_processor.to_dict()
    keys = ("patch_size", "merge_size", "min_pixels", "max_pixels", "size", "image_mean")
    return f"{type(image_processor).__name__}({', '.join(f'{k}={settings.get(k)}' for k in keys)})"


def save_checkpoint(model, tokenizer, path: str | Path, fp32_weights: Path | None = None,
                    point: str = "model.final-save", fp32_point: str = "train.fp32-save",
                    state: dict | None = None):
    """Save a bf16 copy of `model` with its tokenizer (or processor), atomically and verified
    (every tensor read back equal), at crash point `point` (opdgeo.crash).

    With `fp32_weights`, the fp32 master weights are kept beside it as one safetensors file
    (the exact rounding null needs the update before the bf16 cast), written first: the
    checkpoint folder, there last, says the save is complete. `state`: the model's weights
    where `model.state_dict()` does not hold them whole (gathered from a sharded model).
    """
    state = stored_once(model.state_dict() if state is None else state)
    if fp32_weights is not None:
        state32 = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
        with atomic(fp32_weights, fp32_point) as tmp:
            save_file(state32, str(tmp))
            check_weights(tmp, state32)
    bf16_state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in state.items()}
    with atomic(path, point) as tmp:
        model.save_pretrained(tmp, state_dict=dict(bf16_state))  # it empties the dict
        _mark_dtype(tmp / "config.json", "bfloat16")
        tokenizer.save_pretrained(tmp)
        check_weights(tmp, saved_state(model, bf16_state))


def saved_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` under the names `save_pretrained` writes (a vision-language model's language
    tensors are stored as its hub checkpoints name them)."""
    return revert_weight_conversion(model, dict(state))


def weight_files(folder: str | Path) -> list[Path]:
    """The weights files of a checkpoint folder (model.safetensors, or its shards), or the one
    file given."""
    folder = Path(folder)
    return [folder] if folder.is_file() else sorted(folder.glob("model*.safetensors"))


def check_weights(folder: str | Path, expected: dict[str, torch.Tensor] | None = None,
                  keys: set[str] | None = None) -> None:
    """Raise ValueError unless the safetensors weights in `folder` (or the file) open and hold
    exactly `keys`, or `expected`'s keys with each tensor read back equal to it. With `keys`
    only the headers are read: a truncated file has lost the end its header points to."""
    files = weight_files(folder)
    if not files:
        raise ValueError(f"{Path(folder).name}: no weights (model.safetensors or its shards)")
    wanted = set(expected) if expected is not None else keys
    found = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                found |= set(handle.keys())
                for key in handle.keys() if expected is not None else ():
                    if key in expected and not torch.equal(handle.get_tensor(key), expected[key]):
                        raise ValueError(f"{file.name}: {key} reads back other values than "
                                         "were written")
        except SafetensorError as error:
            raise ValueError(f"{file.name}: {error}") from None
    if wanted is not None and found != wanted:
        raise ValueError(f"{', '.join(file.name for file in files)}: tensors missing "
                         f"{sorted(wanted - found)[:3]}, unexpected {sorted(found - wanted)[:3]}")


def stored_once(state: dict) -> dict:
    """A state dict without tied copies: a tied head shares the embedding's storage and is
    stored once, as the hub's checkpoints of tied models (Qwen2.5-Math, Qwen3) store it."""
    seen, kept = set(), {}
    for name, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.numel() and pointer in seen:
            continue
        seen.add(pointer)
        kept[name] = tensor
    return kept


def _mark_dtype(config_path: Path, dtype: str):
    config = json.loads(config_path.read_text())
    config["dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
