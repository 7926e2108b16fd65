"""A study on hub models, rehearsed on CPU: the same config with every hub model replaced by a
tiny stand-in and every data set by a generated local file in its real schema.

    opdgeo rehearse config/paper.yaml --out rehearsal
    snakemake --profile slurm --configfile rehearsal/config.yaml

The rehearsal config is derived from the study's, never written beside it: its pairs, runs,
masked arms, external runs, evaluation sets and analysis settings are the study's; only model
and data paths, the device and the sizes (steps, prompts, tokens, samples) change. A stand-in
keeps what the pipeline depends on (config/hub_models.yaml): the architecture class, a tied or
untied output head, one vocabulary per family (a teacher shares its student's), bf16 storage,
and its lineage: a checkpoint trained from another (DS-Qwen from Qwen2.5-Math) is a sparse
perturbation of that one's stand-in, so every delta the analysis reads pairs one architecture
with itself, as the real ones do. A model or data set the tables do not know is an error.
"""

import json
import re
import string
from pathlib import Path

import yaml

from opdgeo.config import read_config_file
from opdgeo.hub_models import hub_models


class RehearsalError(ValueError):
    """A study the rehearsal cannot stand in for (an unknown model or data set)."""


# Stand-in sizes: a student-sized and a wide (teacher) model per architecture, 2 layers.
_TEXT_DIMS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 1024}
_ARCH_DIMS = {
    "qwen3": {"head_dim": 16},
    "minicpm3": {"num_key_value_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 8,
                 "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8},
    "qwen2_5_vl": {"vision": {"depth": 1, "hidden_size": 16, "num_heads": 2,
                              "intermediate_size": 32, "fullatt_block_indexes": [0]}},
}
# A child differs from its parent on this fraction of coordinates, by this relative step.
PERTURBED_FRACTION, PERTURBATION = 0.2, 0.02

# Sizes of the rehearsal: enough for every rule to do its real work on every run.
REHEARSAL_TRAINING = {"steps": 2, "save_every": 1, "prompts": 8}
# 2 steps instead of hundreds: learning rates x 100, so that the updates cross the bf16
# spacing of the stand-ins' weights and masks, overlaps and masked runs have coordinates to
# work on (at AdamW 1e-6 two steps change no bf16 coordinate).
LEARNING_RATE_SCALE = 100
PROMPTS_PER_STEP = 2
REHEARSAL_EVALUATION = {"k": 2, "batch_size": 8, "engine": "hf"}  # no vLLM on CPU
REHEARSAL_MAX_NEW_TOKENS = 8


def slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", path).strip("-")


# ---------------------------------------------------------------- the config


def rehearsal_config(study: dict, out: Path) -> dict:
    """The study's config with stand-in paths and rehearsal sizes (nothing else changes)."""
    config = json.loads(json.dumps(study))  # a deep copy of plain YAML data
    models_dir, data_dir = out / "models", out / "data"
    config["device"], config["threads"] = "cpu", 1
    for spec in config["models"].values():
        if "build" not in spec:
            spec["path"] = str(models_dir / slug(_known_model(spec["path"])))
            spec.pop("revision", None)
    for spec in config.get("external", {}).values():
        for side in ("source", "trained"):
            spec[side] = str(models_dir / slug(_known_model(spec[side])))
            spec.pop(f"{side}_revision", None)
    for task in _tasks(config):
        if "max_new_tokens" in task:
            task["max_new_tokens"] = REHEARSAL_MAX_NEW_TOKENS
        for data in [task.get("train", {}), *task.get("eval", {}).values()]:
            if "path" in data:
                data["path"] = str(data_dir / _data_file(data))
                data.pop("revision", None)
    generations = config.get("training", {}).get("generations_per_prompt", 4)
    _scale_training(config.setdefault("training", {}), generations)
    for pair in config["pairs"].values():
        if "training" in pair:
            _scale_training(pair["training"],
                            pair["training"].get("generations_per_prompt", generations))
    config["evaluation"] = {**config.get("evaluation", {}), **REHEARSAL_EVALUATION}
    return config


def _scale_training(training: dict, generations: int):
    training.update({k: v for k, v in REHEARSAL_TRAINING.items()
                     if k in training or k in ("steps", "save_every")})
    if "generations_per_prompt" in training or "batch_size" in training:
        training["batch_size"] = PROMPTS_PER_STEP * min(generations, 2)
        if "generations_per_prompt" in training:
            training["generations_per_prompt"] = min(generations, 2)
    if "micro_batch_size" in training:
        training["micro_batch_size"] = PROMPTS_PER_STEP
    for optimizer in training.get("optimizers", {}).values():
        if "learning_rate" in optimizer:
            optimizer["learning_rate"] *= LEARNING_RATE_SCALE
    training["use_vllm"] = False  # no vLLM on CPU: TRL's own generation


def _tasks(config: dict) -> list[dict]:
    return [config.get("task", {})] + [p["task"] for p in config["pairs"].values() if "task" in p]


def _known_model(path: str) -> str:
    if path not in hub_models():
        raise RehearsalError(
            f"model {path!r} has no stand-in: add its facts (config.json shapes, the "
            "checkpoint it was trained from) to config/hub_models.yaml"
        )
    return path


# ---------------------------------------------------------------- data sets


DAPO_INSTRUCTION = ("Solve the following math problem step by step. The last line of your "
                    "response should be of the form Answer: $Answer (without quotes) where "
                    "$Answer is the answer to the problem.\n\n{}\n\nRemember to put your answer "
                    "on its own line after \"Answer:\".")


def _dapo_rows(split: str) -> list[dict]:
    """BytedTsinghua-SIA/DAPO-Math-17k: chat prompts, `reward_model.ground_truth`; the hub
    copy repeats every prompt (here twice)."""
    rows = [{"data_source": "math_dapo",
             "prompt": [{"content": DAPO_INSTRUCTION.format(f"What is {a} + {a + 1}?"),
                         "role": "user"}],
             "ability": "MATH", "reward_model": {"ground_truth": str(2 * a + 1),
                                                 "style": "rule-lm"},
             "extra_info": {"index": f"rehearsal-{a}"}} for a in range(16)]
    return rows + rows


def _aime_rows(split: str, year: int) -> list[dict]:
    """HuggingFaceH4/aime_2024, yentinglin/aime_2025: `problem`, `answer` (and more)."""
    return [{"id": i, "problem": f"Find {i} times {i + 2}.", "solution": "...",
             "answer": str(i * (i + 2)), "url": f"https://example.org/{year}/{i}", "year": year}
            for i in range(1, 5)]


def _geo3k_rows(split: str) -> list[dict]:
    """hiyouga/geometry3k: `images` (a list of one figure), `problem` with `<image>`."""
    import io

    from PIL import Image, ImageDraw

    rows = []
    for i in range(8 if split == "train" else 4):
        image = Image.new("RGB", (56, 56), "white")
        ImageDraw.Draw(image).polygon([(4, 50), (50, 50), (4 + 5 * i, 6)], outline="black")
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        rows.append({"images": [{"bytes": buffer.getvalue(), "path": None}],
                     "problem": f"<image>Find x if the angle is {30 + i} and x = 2 times it.",
                     "answer": str(2 * (30 + i))})
    return rows


def _openthoughts_rows(split: str) -> list[dict]:
    """siyanzhao/Openthoughts_math_30k_opsd: `problem`, its reference `solution` (the OPSD
    teacher's privileged context), `Answer`."""
    return [{"problem": f"What is {a} + {a + 2}?",
             "solution": f"Add the two numbers: {a} + {a + 2} = {2 * a + 2}. "
                         f"The answer is \\boxed{{{2 * a + 2}}}.",
             "Answer": str(2 * a + 2), "generated_token_count": 24} for a in range(16)]


DATA_SETS = {
    "BytedTsinghua-SIA/DAPO-Math-17k": _dapo_rows,
    "HuggingFaceH4/aime_2024": lambda split: _aime_rows(split, 2024),
    "yentinglin/aime_2025": lambda split: _aime_rows(split, 2025),
    "math-ai/aime25": lambda split: _aime_rows(split, 2025),
    "hiyouga/geometry3k": _geo3k_rows,
    "siyanzhao/Openthoughts_math_30k_opsd": _openthoughts_rows,
}


def _data_file(spec: dict) -> str:
    if spec["path"] not in DATA_SETS:
        raise RehearsalError(f"data set {spec['path']!r} has no generator: add one in its real "
                             "schema to opdgeo.rehearse.DATA_SETS")
    return f"{slug(spec['path'])}-{spec.get('split', 'train')}.parquet"


def write_data(study: dict, data_dir: Path) -> list[Path]:
    """One parquet file per data set and split the study reads, as the hub serves it."""
    import datasets

    written = []
    for task in _tasks(study):
        for spec in [task.get("train", {}), *task.get("eval", {}).values()]:
            if "path" not in spec:
                continue
            path = data_dir / _data_file(spec)
            rows = DATA_SETS[spec["path"]](spec.get("split", "train"))
            if path not in written:
                frame = datasets.Dataset.from_list(rows)
                if "images" in rows[0]:
                    frame = frame.cast_column("images", datasets.List(datasets.Image()))
                data_dir.mkdir(parents=True, exist_ok=True)
                frame.to_parquet(str(path))
                written.append(path)
    return written


# ---------------------------------------------------------------- models


def _processor(arch: str):
    """One tokenizer per family: a teacher, its student and their lineage share a vocabulary
    (printable characters; the vision-language family adds Qwen2-VL's image tokens)."""
    from opdgeo.models import (
        VISION_ARCHITECTURES,
        VISION_CHAT_TEMPLATE,
        character_tokenizer,
        image_text_processor,
    )

    if arch in VISION_ARCHITECTURES:
        return image_text_processor(characters=string.printable)
    tokenizer = character_tokenizer(string.printable)
    tokenizer.chat_template = VISION_CHAT_TEMPLATE  # plain text turns: the real path, a chat
    return tokenizer


def build_stand_in(hub_id: str, folder: Path, models_dir: Path):
    """The stand-in of `hub_id`: built from its facts, or perturbed from its parent's."""
    import torch

    from opdgeo.models import build_model, load_model, save_checkpoint

    facts = hub_models()[hub_id]
    dims = {**_TEXT_DIMS, **_ARCH_DIMS.get(facts.arch, {}), "tie_word_embeddings": facts.tied}
    if facts.wide:
        dims |= {"hidden_size": 48, "intermediate_size": 96}
    processor = _processor(facts.arch)
    seed = sum(map(ord, hub_id))
    model = build_model(facts.arch, processor, seed, **dims)
    if facts.parent:
        parent = load_model(models_dir / slug(facts.parent))
        state = parent.state_dict()
        head, embedding = _head_names(model)
        if head not in state and embedding in state:  # an untied child of a tied parent
            state[head] = state[embedding].clone()
        model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                moved = torch.rand(parameter.shape, generator=generator) < PERTURBED_FRACTION
                step = torch.randn(parameter.shape, generator=generator) * PERTURBATION
                parameter.add_(parameter.abs() * step * moved)
    save_checkpoint(model, processor, folder)


def _head_names(model) -> tuple[str, str]:
    names = list(model.state_dict())
    head = next(n for n in names if n.endswith("lm_head.weight"))
    return head, next(n for n in names if n.endswith("embed_tokens.weight"))


def study_models(study: dict) -> list[str]:
    """Every hub model the study reads, each after the one it was trained from."""
    named = [spec["path"] for spec in study["models"].values() if "build" not in spec]
    named += [spec[side] for spec in study.get("external", {}).values()
              for side in ("source", "trained")]
    ordered: list[str] = []

    def add(hub_id):
        parent = hub_models()[_known_model(hub_id)].parent
        if parent:
            add(parent)
        if hub_id not in ordered:
            ordered.append(hub_id)

    for hub_id in named:
        add(hub_id)
    return ordered


def rehearse(study_path: Path, out: Path) -> Path:
    """Write `out/config.yaml`, the stand-ins under `out/models/`, the data under `out/data/`;
    return the config's path. A stand-in already there is kept (they are deterministic)."""
    study = read_config_file(study_path)  # a YAML error names its line and column
    config = rehearsal_config(study, out)  # first: an unknown model stops before any work
    models_dir = out / "models"
    for hub_id in study_models(study):
        folder = models_dir / slug(hub_id)
        if not (folder / "config.json").exists():
            build_stand_in(hub_id, folder, models_dir)
            print(f"stand-in {hub_id} -> {folder}")
    for path in write_data(study, out / "data"):
        print(f"data {path}")
    header = (f"# The rehearsal of {study_path}, written by `opdgeo rehearse`: do not edit, "
              "rerun it.\n")
    target = out / "config.yaml"
    target.write_text(header + yaml.safe_dump(config, sort_keys=False, width=100))
    return target
