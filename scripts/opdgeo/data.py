"""Real data sets through `datasets`: math prompts for training, benchmarks for evaluation.

The `math` task of the paper: DAPO-Math-17K prompts for training, AIME24 + AIME25 for
evaluation (mean@k), answers checked by math-verify. Every data set is named by a spec

    {path, name?, split?, revision?, prompt?, answer?, template?, image?, solution?,
     privileged_template?}

where `path` is a Hugging Face id or a local data file / folder (tests write tiny files in
the real schema and read them through this same code). With HF_HUB_OFFLINE=1 `datasets`
reads hub ids from the local cache; nothing here special-cases it.

Prompts are chat messages ([{"role": "user", "content": ...}]): a column that already holds
messages (DAPO) is kept as it is, a string column (AIME `problem`) becomes one user message
through `template` (opdgeo.prompts renders every template, a model's chat template too).

A training set may name a `solution` column: each prompt's reference solution, the privileged
context an on-policy self-distillation teacher reads, placed after the prompt's last message
by `privileged_template` ({prompt}: that message, {context}: the solution).
"""

import random
from functools import cache
from pathlib import Path

from opdgeo.prompts import (
    PRIVILEGED_TEMPLATE,
    QUESTION_TEMPLATE,
    Example,
    privileged_prompt,
    question_prompt,
)

# Builders of `datasets` for local data files, by suffix.
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(spec: dict):
    """One split of a data set from a hub id, a local data file or a local folder."""
    import datasets  # seconds to import: only math tasks pay for it

    path, split = spec["path"], spec.get("split", "train")
    local = Path(path)
    if local.is_file():
        builder = _FILE_BUILDERS.get(local.suffix)
        if builder is None:
            raise ValueError(f"{path}: unknown data file type; use one of {sorted(_FILE_BUILDERS)}")
        # A single local file has a single split, which `datasets` calls "train".
        return datasets.load_dataset(builder, data_files=str(local), split="train")
    return datasets.load_dataset(path, spec.get("name"), split=split, revision=spec.get("revision"))


def _field(row: dict, dotted: str):
    """`reward_model.ground_truth` -> row["reward_model"]["ground_truth"]."""
    value = row
    for key in dotted.split("."):
        value = value[key]
    return value


def load_examples(spec: dict) -> list[Example]:
    """Prompts (chat messages) and reference answers of a data set, duplicates dropped.

    The hub copy of DAPO-Math-17k repeats each of its ~17k prompts 100 times; an epoch (and a
    benchmark) is over distinct prompts, so repeats are dropped, keeping the first.
    """
    rows = load_rows(spec)
    prompt_key, answer_key = spec.get("prompt", "prompt"), spec.get("answer", "answer")
    template, image_key = spec.get("template", QUESTION_TEMPLATE), spec.get("image")
    solution_key = spec.get("solution")
    for role, key in (("prompt", prompt_key), ("answer", answer_key.split(".")[0]),
                      ("image", image_key), ("solution", solution_key)):
        if key is not None and key not in rows.column_names:
            raise ValueError(f"{spec['path']}: no column {key!r} (its `{role}`); columns: "
                             f"{rows.column_names}. Name one of them as the data set's `{role}`.")
    if image_key:
        rows = _undecoded_images(rows, image_key)
    examples, seen = [], set()
    for i, row in enumerate(rows):
        prompt = row[prompt_key]
        if isinstance(prompt, str):
            if image_key:  # the trainers place the image themselves (Geo3K writes "<image>")
                prompt = prompt.replace("<image>", "").strip()
            prompt = question_prompt(template, prompt)
        else:
            prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
        key = tuple((m["role"], m["content"]) for m in prompt)
        image = _decode_image(row[image_key], f"{spec['path']} row {i}") if image_key else None
        if image is not None:
            key += (image.tobytes(),)  # one question about two figures is two examples
        if key not in seen:
            seen.add(key)
            context = _solution(row, solution_key, f"{spec['path']} row {i}") \
                if solution_key else None
            examples.append(Example(prompt, str(_field(row, answer_key)).strip(), image,
                                    context, i))
    return examples


def _solution(row: dict, key: str, where: str) -> str:
    """A row's reference solution; an empty one stops the run before any training."""
    solution = _field(row, key)
    solution = "" if solution is None else str(solution).strip()
    if not solution:
        raise ValueError(f"{where}: the solution column {key!r} is empty, and the "
                         "self-distillation teacher reads every prompt's reference solution: "
                         "fill it or drop the row")
    return solution


def _undecoded_images(rows, key: str):
    """`datasets` decodes an Image column itself, failing deep inside iteration on a bad
    image; keep the bytes instead and decode them in `_decode_image`, which names the row."""
    import datasets

    feature = rows.features[key]
    if isinstance(feature, datasets.Image):
        return rows.cast_column(key, datasets.Image(decode=False))
    if isinstance(getattr(feature, "feature", None), datasets.Image):
        return rows.cast_column(key, datasets.List(datasets.Image(decode=False)))
    return rows


def _decode_image(value, where: str):
    """A prompt's image as an RGB PIL image (a list holds it first: Geo3K's `images`).

    Decoded when the data set is read, so that an unreadable image stops the run before any
    model is trained, naming the row."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where}: the image column holds no image")
        value = value[0]
    try:
        if isinstance(value, dict):  # `datasets`' undecoded form: {"bytes", "path"}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            value = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            value = Image.open(value)
        if not isinstance(value, Image.Image):
            raise TypeError(f"an image column holds {type(value).__name__}")
        return value.convert("RGB")
    except (OSError, UnidentifiedImageError, TypeError) as error:
        raise ValueError(f"{where}: cannot decode the image ({error}); fix or drop the row "
                         "before training") from error


# ---------------------------------------------------------------- answers


def score(completion: str, answer: str) -> float:
    """1 when math-verify finds the reference answer in the completion (last boxed value,
    `Answer: ...`, or last expression), else 0."""
    from math_verify import parse, verify

    gold = parse(answer) or parse(f"${answer}$")
    predicted = parse(completion)
    return float(bool(gold) and bool(predicted) and verify(gold, predicted))


# ---------------------------------------------------------------- the task


@cache
def _cached_examples(spec_items: tuple) -> tuple[Example, ...]:
    # Frozen key: one process reads a data set once, however many times it asks.
    spec = {k: v for k, v in spec_items}
    return tuple(load_examples(spec))


def _examples(spec: dict) -> list[Example]:
    return list(_cached_examples(tuple(sorted(spec.items()))))


class MathTask:
    """Math word problems with verifiable answers (task kind `math`)."""

    def __init__(self, kind: str = "math", train: dict | None = None, eval: dict | None = None,
                 max_new_tokens: int = 8192, seed: int = 0):
        if train is None or not eval:
            raise ValueError("task kind math needs `train` (a data set) and `eval` "
                             "(benchmark name -> data set)")
        self.train_spec, self.eval_specs = train, eval
        self.max_new_tokens, self.seed = max_new_tokens, seed

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """`n` distinct training prompts in a seeded order (all of them when fewer exist)."""
        examples = _examples(self.train_spec)
        random.Random(seed).shuffle(examples)
        return examples[:n]

    def eval_examples(self) -> list[Example]:
        """Every benchmark's problems, in config order (AIME24 then AIME25)."""
        return [e for spec in self.eval_specs.values() for e in _examples(spec)]

    def privileged_prompt(self, prompt, context: str):
        """The prompt (chat messages, or their text for a model without a chat template) with
        a reference solution after its last message, through `privileged_template`."""
        return privileged_prompt(self.train_spec.get("privileged_template", PRIVILEGED_TEMPLATE),
                                 prompt, context)

    @staticmethod
    def score(completion: str, answer: str) -> float:
        return score(completion, answer)
