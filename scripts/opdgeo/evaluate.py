"""Held-out scores of a checkpoint: greedy exact match and sampled mean@k.

A job scores a run's checkpoints one after another and journals each one's scores as it
finishes (`ScoreJournal`), so that a killed or timed-out job's rerun scores only the rest.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import torch

from opdgeo.data import render_prompts
from opdgeo.models import text_tokenizer
from opdgeo.progress import progress
from opdgeo.task import Example


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, *, sample: bool,
             temperature: float = 1.0, batch_size: int = 256, images: list | None = None
             ) -> list[str]:
    """Completions of `prompts` (text or chat messages), greedy or sampled, special tokens
    stripped. With `images` (one per prompt), `tokenizer` is the model's processor."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    completions = []
    texts, special_tokens = render_prompts(tokenizer, prompts, images)
    for start in range(0, len(texts), batch_size):
        pictures = {"images": images[start : start + batch_size]} if images else {}
        batch = tokenizer(text=texts[start : start + batch_size], return_tensors="pt",
                          padding=True, add_special_tokens=special_tokens, **pictures)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_k=0 if sample else None,
            top_p=1.0 if sample else None,
            pad_token_id=text_tokenizer(tokenizer).pad_token_id,
            eos_token_id=text_tokenizer(tokenizer).eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    model.train(was_training)
    return completions


def images_of(examples: list[Example]) -> list | None:
    """The examples' images, or None for a text-only task."""
    return [e.image for e in examples] if examples and examples[0].image is not None else None


def exact_match(model, tokenizer, examples: list[Example], task, batch_size: int = 256):
    completions = generate(model, tokenizer, [e.prompt for e in examples], task.max_new_tokens,
                           sample=False, batch_size=batch_size, images=images_of(examples))
    hits = sum(task.score(c, e.answer) for c, e in zip(completions, examples, strict=True))
    return hits / len(examples)


def mean_at_k(model, tokenizer, examples: list[Example], task, k: int, temperature: float,
              seed: int, batch_size: int = 256) -> float:
    """Mean exact match over k sampled completions per prompt (seeded)."""
    torch.manual_seed(seed)
    prompts = [e.prompt for e in examples for _ in range(k)]
    answers = [e.answer for e in examples for _ in range(k)]
    images = images_of(examples)
    images = [image for image in images for _ in range(k)] if images else None
    completions = generate(model, tokenizer, prompts, task.max_new_tokens, sample=True,
                           temperature=temperature, batch_size=batch_size, images=images)
    return sum(task.score(c, a) for c, a in zip(completions, answers, strict=True)) / len(prompts)


def generation_dtype(device: str) -> torch.dtype:
    """Checkpoints are bf16: a GPU generates in bf16 (as vLLM does); a CPU, whose bf16 matrix
    products are slow, in fp32."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


class ScoreJournal:
    """Scores of the checkpoints an unfinished evaluation job has finished, one JSON file per
    checkpoint in `folder`, each written whole or not at all. A score is reused only for the
    same settings and the same checkpoint files (names, sizes, modification times): a retrained
    run or a changed evaluation setting is scored afresh. The finished job removes the folder."""

    def __init__(self, folder: Path, settings: dict):
        self.folder = Path(folder)
        self.settings = json.dumps(settings, sort_keys=True)

    def _key(self, path: str | Path) -> str:
        path = Path(path)
        files = sorted(path.rglob("*")) if path.is_dir() else []
        stamp = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                 for f in files if f.is_file()]
        text = json.dumps([self.settings, str(path), stamp])
        return hashlib.sha256(text.encode()).hexdigest()

    def _file(self, step: int) -> Path:
        return self.folder / f"step-{step}.json"

    def read(self, step: int, path: str | Path) -> list | None:
        """The journaled rows of a checkpoint, or None if it was not scored as it is now."""
        try:
            entry = json.loads(self._file(step).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return [tuple(row) for row in entry["rows"]] if entry["key"] == self._key(path) else None

    def write(self, step: int, path: str | Path, rows: list):
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._file(step).with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self._key(path), "rows": rows}))
        tmp.replace(self._file(step))

    def clear(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def evaluate_checkpoints(checkpoints: dict[int, Path], run: str, task, k: int,
                         temperature: float, seed: int, device: str,
                         batch_size: int = 256, journal: ScoreJournal | None = None
                         ) -> pd.DataFrame:
    """Tidy scores (run, step, metric, value) of every checkpoint of one run; with a journal,
    checkpoints it holds are not scored again and each newly scored one is added to it."""
    from opdgeo.models import load_model, load_tokenizer

    examples = task.eval_examples()
    rows = []
    for step, path in progress(sorted(checkpoints.items()), desc=f"evaluate {run}",
                               unit="checkpoint"):
        scored = journal.read(step, path) if journal else None
        if scored is not None:
            rows += scored
            print(f"{run} step {step}: scored before (journal {journal.folder})", flush=True)
            continue
        model, tokenizer = load_model(path, device, generation_dtype(device)), load_tokenizer(path)
        em = exact_match(model, tokenizer, examples, task, batch_size)
        mk = mean_at_k(model, tokenizer, examples, task, k, temperature, seed, batch_size)
        scored = [(run, step, "exact_match", em), (run, step, f"mean@{k}", mk)]
        if journal:
            journal.write(step, path, scored)
        rows += scored
        print(f"{run} step {step}: exact match {em:.3f}, mean@{k} {mk:.3f}", flush=True)
    return pd.DataFrame(rows, columns=["run", "step", "metric", "value"])
