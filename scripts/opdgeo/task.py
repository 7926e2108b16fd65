"""The tasks a pair trains and is evaluated on (`task.kind`), behind one interface.

`make_task(config)` returns an object with `train_examples(n, seed)`, `eval_examples()`,
`score(completion, answer)` and `max_new_tokens`; examples are `Example(prompt, answer,
image, context)` (opdgeo.prompts). A task whose examples carry a privileged `context` (what an
on-policy self-distillation teacher reads: the reference solution) also has
`privileged_prompt(prompt, context)`, the prompt with the context in it (through the task's
template, rendered by opdgeo.prompts). The kinds:

- `addition` (AdditionTask, the default's language pair): fixed-width addition with the answer
  digits reversed, `123+045=` -> `8610` (the sum 0168 least significant digit first, so that a
  left-to-right model can carry as it goes). Every prompt and answer has one length, so
  batches need no padding and exact match is a string comparison; the held-out split is a
  digest of the operands (`is_held_out`). The privileged context is the worked answer,
  written before the prompt: `8610=123+045=`.
- `squares` (SquaresTask, the default's vision-language pair): a generated picture of squares
  and a one-digit question about it (their colour, or how many there are).
- `math` (opdgeo.data.MathTask, the paper's study): real data sets through `datasets`
  (DAPO-Math-17K prompts; AIME24/25 or Geo3K as benchmarks), answers checked by math-verify.

A new kind is a class with that interface, registered in `TASKS`.
"""

import hashlib
import random

from opdgeo.prompts import Example, privileged_prompt


def make_example(a: int, b: int, digits: int) -> Example:
    prompt = f"{a:0{digits}d}+{b:0{digits}d}="
    answer = f"{a + b:0{digits + 1}d}"[::-1]
    return Example(prompt, answer, context=answer)


def split_examples(digits: int, n: int, split: str, seed: int) -> list[Example]:
    """`n` examples of one split; train and eval prompts never overlap.

    Splits are disjoint by construction: a pair (a, b) belongs to `eval` when its hash
    bucket says so, so every seed draws from the same held-out set. The hash is a digest, not
    a linear form in a and b: `(7919a + 104729b) % 10` would select exactly the pairs whose
    sum ends in 0, a held-out set no training answer resembles. Held-out prompts are distinct
    (a score's interval over prompts counts each once); training prompts may repeat.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    high = 10**digits
    want_eval = split == "eval"
    rng = random.Random(f"{split}-{seed}")
    examples, seen = [], set()
    draws = 0
    while len(examples) < n:
        draws += 1
        if draws > 1000 * n:  # the 2-digit task holds out 1,067 pairs: 1,024 take ~40k draws
            raise ValueError(f"{n} held-out prompts asked of a {digits}-digit task, which "
                             f"holds out {len(examples)}: lower task.eval_prompts or add a digit")
        a, b = rng.randrange(high), rng.randrange(high)
        if is_held_out(a, b) == want_eval and not (want_eval and (a, b) in seen):
            seen.add((a, b))
            examples.append(make_example(a, b, digits))
    return examples


def is_held_out(a: int, b: int) -> bool:
    """One pair in ten, by a digest of the pair: independent of its digits and its sum."""
    return hashlib.blake2b(f"{a}+{b}".encode(), digest_size=8).digest()[0] % 10 == 0


def answer_length(digits: int) -> int:
    return digits + 1


def score(completion: str, answer: str) -> float:
    """Exact match of the completion (special tokens stripped) with the answer."""
    return float(completion.strip() == answer)


class AdditionTask:
    """The task as the trainers and the evaluation see it; other tasks offer the same four."""

    # The worked answer before the prompt, `=` after it: `8610=123+045=` (a prompt starts
    # with an operand, so a model tells the two forms apart at the first `=`).
    PRIVILEGED_TEMPLATE = "{context}={prompt}"

    def __init__(self, kind: str = "addition", digits: int = 3, eval_prompts: int = 256,
                 seed: int = 0):
        self.digits, self.eval_prompts, self.seed = digits, eval_prompts, seed
        self.max_new_tokens = answer_length(digits) + 1  # the answer and end-of-sequence

    def train_examples(self, n: int, seed: int) -> list[Example]:
        return split_examples(self.digits, n, "train", seed)

    def eval_examples(self) -> list[Example]:
        return split_examples(self.digits, self.eval_prompts, "eval", self.seed)

    @staticmethod
    def score(completion: str, answer: str) -> float:
        return score(completion, answer)

    @classmethod
    def privileged_prompt(cls, prompt: str, context: str) -> str:
        return privileged_prompt(cls.PRIVILEGED_TEMPLATE, prompt, context)


class SquaresTask:
    """A picture of squares of one colour on a grid, and a question about it (task kind
    `squares`, vision-language): the prompt `0=` asks for their colour (an index from 1), `1=`
    for how many there are; the answer is one digit.

    Cells are 28 pixels, one merged 2 x 2 group of Qwen2-VL's 14-pixel patches, so every
    language-side image token sees exactly one cell (tiny vision towers learn fast then).
    Colours are jittered and pixels noised, so no two images are equal. The splits draw from
    differently seeded streams: evaluation images are new pictures, of layouts (which cells hold
    a square, and their colour) that training also shows: a 2 x 2 grid has only 15 x colours
    layouts, too few to hold some out (a count seen with no other colour is not learned).
    """

    CELL = 28
    PALETTE = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (200, 60, 220),
               (40, 210, 210), (240, 140, 30), (150, 150, 150), (120, 70, 20))
    QUESTIONS = ("colour", "count")

    def __init__(self, kind: str = "squares", grid: int = 2, colours: int = 4,
                 eval_prompts: int = 256, seed: int = 0):
        if grid * grid > 9 or not 1 <= colours <= len(self.PALETTE):
            raise ValueError(f"squares task: grid {grid} (at most 3: counts are one digit) and "
                             f"colours {colours} (1 to {len(self.PALETTE)})")
        self.grid, self.colours, self.eval_prompts, self.seed = grid, colours, eval_prompts, seed
        self.max_new_tokens = 2  # the digit and end-of-sequence

    def _examples(self, n: int, split: str, seed: int) -> list[Example]:
        import numpy as np

        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        rng = random.Random(f"squares-{split}-{seed}")
        noise = np.random.default_rng(rng.randrange(2**32))
        cells = self.grid * self.grid
        examples = []
        while len(examples) < n:
            colour = rng.randrange(1, self.colours + 1)
            layout = tuple(colour * rng.randrange(2) for _ in range(cells))
            if not any(layout):
                continue
            question = rng.randrange(len(self.QUESTIONS))
            answer = colour if question == 0 else sum(map(bool, layout))
            prompt = [{"role": "user", "content": f"{question}="}]
            examples.append(Example(prompt, str(answer), self.draw(layout, noise)))
        return examples

    def draw(self, layout, noise):
        """The picture of a layout: jittered colours and pixel noise from `noise`."""
        import numpy as np
        from PIL import Image

        side = self.grid * self.CELL
        pixels = noise.integers(0, 40, size=(side, side, 3)).astype(np.int16)
        for i, colour in enumerate(layout):
            if colour:
                r, c = divmod(i, self.grid)
                jitter = noise.integers(-30, 31, size=3)
                block = pixels[r * self.CELL:(r + 1) * self.CELL, c * self.CELL:(c + 1) * self.CELL]
                block += np.array(self.PALETTE[colour - 1]) + jitter - 20
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")

    def train_examples(self, n: int, seed: int) -> list[Example]:
        return self._examples(n, "train", seed)

    def eval_examples(self) -> list[Example]:
        return self._examples(self.eval_prompts, "eval", self.seed)

    @staticmethod
    def score(completion: str, answer: str) -> float:
        return score(completion, answer)


def _math_task(**config):
    from opdgeo.data import MathTask  # imports `datasets` and math-verify only when used

    return MathTask(**config)


TASKS = {"addition": AdditionTask, "math": _math_task, "squares": SquaresTask}


def has_images(config: dict) -> bool:
    """Whether a task's prompts come with images (its pair is then a vision-language pair):
    the squares task, or data sets that name an image column."""
    datasets = [config.get("train") or {}, *(config.get("eval") or {}).values()]
    return config.get("kind") == "squares" or any("image" in spec for spec in datasets)


def has_privileged_context(config: dict, split: str = "train") -> bool:
    """Whether a task's training (or held-out) examples carry a privileged context for a
    self-distillation teacher: the addition task's worked answer, a math data set's
    `solution` column (every benchmark's, for the held-out ones)."""
    kind = config.get("kind", "addition")
    if kind != "math":
        return kind == "addition"
    specs = [config.get("train") or {}] if split == "train" else \
        list((config.get("eval") or {}).values())
    return bool(specs) and all("solution" in spec for spec in specs)


def make_task(config: dict):
    """The task of a config's `task:` section (a pair's: see opdgeo.config.pair_task)."""
    kind = config.get("kind", "addition")
    if kind not in TASKS:
        raise ValueError(f"unknown task kind {kind!r}; known: {sorted(TASKS)}")
    return TASKS[kind](**config)


def privileged_contexts(examples: list[Example], whose: str, seed: int) -> list[str]:
    """The privileged context a self-distillation teacher reads beside each example: its own
    (`own`), or that of another example (`other`): a derangement of the distinct prompts,
    fixed by `seed`, so that no prompt is ever given its own context (a repeated prompt gets
    the same other one each time)."""
    missing = [i for i, e in enumerate(examples) if not e.context]
    if missing:
        e = examples[missing[0]]
        where = f"data set row {e.row}" if e.row is not None else f"training prompt {missing[0]}"
        raise ValueError(f"{where} ({_excerpt(e.prompt)}) has no privileged context (reference "
                         "solution): self-distillation needs one for every prompt. Name the "
                         "solution column as task.train.solution, fill the empty ones or drop "
                         "those rows.")
    if whose == "own":
        return [e.context for e in examples]
    if whose != "other":
        raise ValueError(f"unknown privileged context {whose!r}: own or other")
    first = {}
    for e in examples:
        first.setdefault(_prompt_key(e.prompt), e.context)
    keys = sorted(first)
    if len(keys) < 2:
        raise ValueError("another example's context needs at least two distinct prompts")
    # Sattolo's algorithm: a uniformly drawn single cycle, a permutation without fixed points.
    order, rng = list(range(len(keys))), random.Random(f"other-context-{seed}")
    for i in range(len(order) - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    other = {key: first[keys[order[i]]] for i, key in enumerate(keys)}
    return [other[_prompt_key(e.prompt)] for e in examples]


def context_metric(metric: str, whose: str) -> str:
    """A score of a model reading a privileged context (`own` or `other`) in its prompts: a
    self-distillation teacher's score (opdgeo.evaluate --contexts)."""
    return f"{metric} ({whose} context)"


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else repr([(m["role"], m["content"]) for m in prompt])


def _excerpt(prompt, width: int = 60) -> str:
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return repr(text[:width] + ("..." if len(text) > width else ""))
