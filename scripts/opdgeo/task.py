"""The synthetic verifiable task: fixed-width addition with the answer digits reversed.

`123+045=` -> `8610`: the sum 0168 written least significant digit first, so that a
left-to-right model can carry as it goes. Every prompt and every answer of one task has the
same length, so batches need no padding and exact match is a string comparison.
"""

import hashlib
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str | list  # text, or chat messages [{"role", "content"}] (opdgeo.data)
    answer: str


def make_example(a: int, b: int, digits: int) -> Example:
    prompt = f"{a:0{digits}d}+{b:0{digits}d}="
    answer = f"{a + b:0{digits + 1}d}"[::-1]
    return Example(prompt, answer)


def split_examples(digits: int, n: int, split: str, seed: int) -> list[Example]:
    """`n` examples of one split; train and eval prompts never overlap.

    Splits are disjoint by construction: a pair (a, b) belongs to `eval` when its hash
    bucket says so, so every seed draws from the same held-out set. The hash is a digest, not
    a linear form in a and b: `(7919a + 104729b) % 10` would select exactly the pairs whose
    sum ends in 0, a held-out set no training answer resembles.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    high = 10**digits
    want_eval = split == "eval"
    rng = random.Random(f"{split}-{seed}")
    examples = []
    while len(examples) < n:
        a, b = rng.randrange(high), rng.randrange(high)
        if is_held_out(a, b) == want_eval:
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


def _math_task(**config):
    from opdgeo.data import MathTask  # imports `datasets` and math-verify only when used

    return MathTask(**config)


TASKS = {"addition": AdditionTask, "math": _math_task}


def make_task(config: dict):
    """The task of a config's `task:` section (a pair's: see opdgeo.config.pair_task)."""
    kind = config.get("kind", "addition")
    if kind not in TASKS:
        raise ValueError(f"unknown task kind {kind!r}; known: {sorted(TASKS)}")
    return TASKS[kind](**config)
