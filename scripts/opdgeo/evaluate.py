"""Held-out scores of a checkpoint: greedy exact match and sampled mean@k.

Completions come from an engine: transformers' `generate` batch by batch, or vLLM, which
generates the greedy and all k sampled completions of every prompt in one call. Both render
prompts with `opdgeo.prompts.render_prompts` and are scored by `scores`, the same for both.
A job scores a run's checkpoints one after another and journals each one's scores as it
finishes (`ScoreJournal`), so that a killed or timed-out job's rerun scores only the rest.
"""

import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from opdgeo.attempts import WallClock, end_attempt
from opdgeo.files import atomic
from opdgeo.models import text_tokenizer
from opdgeo.progress import progress
from opdgeo.prompts import Example, render_prompts
from opdgeo.stats import prompt_interval
from opdgeo.task import context_metric, privileged_contexts


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
    greedy, _ = prompt_scores(task, examples, completions, [])
    return sum(greedy) / len(greedy)


def prompt_scores(task, examples: list[Example], greedy: list[str], sampled: list[list[str]]
                  ) -> tuple[list[float], list[float]]:
    """Per prompt: exact match of the greedy completion (0 or 1), and the share of its k
    sampled completions that are right (mean@k is their mean over prompts)."""
    em = [float(task.score(c, e.answer)) for c, e in zip(greedy, examples, strict=True)]
    mk = [sum(task.score(c, e.answer) for c in samples) / len(samples)
          for samples, e in zip(sampled, examples, strict=True)] if sampled else []
    return em, mk


class TransformersEngine:
    """transformers' `generate`, `batch_size` sequences at a time; sampling seeded by torch."""

    def __init__(self, path, device: str, batch_size: int):
        from opdgeo.models import load_model, load_tokenizer

        self.model = load_model(path, device, generation_dtype(device))
        self.tokenizer, self.batch_size = load_tokenizer(path), batch_size

    def completions(self, examples: list[Example], max_new_tokens: int, k: int,
                    temperature: float, seed: int) -> tuple[list[str], list[list[str]]]:
        """Greedy completions, and k sampled ones per prompt."""
        images = images_of(examples)
        greedy = generate(self.model, self.tokenizer, [e.prompt for e in examples],
                          max_new_tokens, sample=False, batch_size=self.batch_size,
                          images=images)
        torch.manual_seed(seed)
        sampled = generate(self.model, self.tokenizer, [e.prompt for e in examples for _ in
                                                        range(k)],
                           max_new_tokens, sample=True, temperature=temperature,
                           batch_size=self.batch_size,
                           images=[i for i in images for _ in range(k)] if images else None)
        return greedy, [sampled[i : i + k] for i in range(0, len(sampled), k)]


class VLLMEngine:
    """vLLM: the greedy and the k sampled completions of every prompt in one `generate` call
    (a list of sampling settings, one per request), the prompts as `TransformersEngine`
    renders them. `settings`: the evaluation's vllm_* keys without the prefix."""

    def __init__(self, path, settings: dict, seed: int):
        from vllm import LLM

        from opdgeo.models import load_tokenizer

        self.tokenizer = load_tokenizer(path)
        images = hasattr(self.tokenizer, "image_processor")
        self.llm = LLM(model=str(path), dtype="bfloat16", seed=seed,
                       **({"limit_mm_per_prompt": {"image": 1}} if images else {}), **settings)

    def requests(self, examples: list[Example]) -> list[dict]:
        """vLLM prompts: token ids of the rendered text, or the text with its image (vLLM
        expands the image placeholder as the processor does)."""
        images = images_of(examples)
        texts, special_tokens = render_prompts(self.tokenizer, [e.prompt for e in examples],
                                               images)
        if images:
            return [{"prompt": text, "multi_modal_data": {"image": image}}
                    for text, image in zip(texts, images, strict=True)]
        ids = text_tokenizer(self.tokenizer)(texts, add_special_tokens=special_tokens)
        return [{"prompt_token_ids": prompt} for prompt in ids["input_ids"]]

    def completions(self, examples: list[Example], max_new_tokens: int, k: int,
                    temperature: float, seed: int) -> tuple[list[str], list[list[str]]]:
        from vllm import SamplingParams

        greedy = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens,
                                skip_special_tokens=True)
        sampled = SamplingParams(n=k, temperature=temperature, top_p=1.0, top_k=-1, seed=seed,
                                 max_tokens=max_new_tokens, skip_special_tokens=True)
        requests = self.requests(examples)
        outputs = self.llm.generate(requests + requests,
                                    [greedy] * len(requests) + [sampled] * len(requests),
                                    use_tqdm=False)
        texts = [[choice.text for choice in output.outputs] for output in outputs]
        return [t[0] for t in texts[: len(requests)]], texts[len(requests) :]


def choose_engine(engine: str, device: str) -> str:
    """`auto`: vLLM on a GPU where it is installed, else transformers. Asking for vLLM where it
    cannot run is an error that names the fix."""
    if engine == "hf":
        return engine
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        if engine == "auto":
            return "hf"
        raise RuntimeError(
            "evaluation.engine is vllm, but vllm cannot be imported here: install the GPU "
            "extras (pip install -r envs/requirements-gpu.txt), or set evaluation.engine: hf "
            "or auto"
        ) from error
    if not device.startswith("cuda"):
        if engine == "auto":
            return "hf"
        raise RuntimeError(f"evaluation.engine is vllm, which needs a GPU, but this job runs on "
                           f"{device}: give the job a GPU, or set evaluation.engine: hf or auto")
    return "vllm"


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
        with atomic(self._file(step), "evaluate.journal") as tmp:
            tmp.write_text(json.dumps({"key": self._key(path), "rows": rows}))

    def clear(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def evaluate_checkpoints(checkpoints: dict[int, Path], run: str, task, k: int,
                         temperature: float, seed: int, device: str,
                         batch_size: int = 256, journal: ScoreJournal | None = None,
                         engine: str = "hf", vllm: dict | None = None,
                         clock: WallClock | None = None,
                         contexts: tuple[str, ...] = ()) -> pd.DataFrame:
    """Tidy scores (run, step, metric, value, low, high) of every checkpoint of one run: the
    mean over held-out prompts and its 95% bootstrap interval over those prompts. `seed`
    seeds the sampling (a run's own seed: the seeds of a run draw different samples). With a
    journal, checkpoints it holds are not scored again and each newly scored one is added.
    `engine`: auto, hf or vllm (see `choose_engine`); `vllm`: vLLM's engine settings.
    `clock` (a SLURM job's wall time, with a journal): before a checkpoint that might not be
    scored in time (twice the longest so far), the job requeues itself, and its next attempt
    scores the rest (opdgeo.attempts). `contexts` (own, other): also the scores with each
    prompt's privileged context, or another prompt's, in it (`context_metric`): what a
    self-distillation teacher of this model scores."""
    engine = choose_engine(engine, device)
    examples = task.eval_examples()
    sets = {"": examples} | {whose: [
        replace(e, prompt=task.privileged_prompt(e.prompt, c))
        for e, c in zip(examples, privileged_contexts(examples, whose, task.seed), strict=True)]
        for whose in contexts}
    rows, longest = [], 0.0
    for step, path in progress(sorted(checkpoints.items()), desc=f"evaluate {run}",
                               unit="checkpoint"):
        scored = journal.read(step, path) if journal else None
        if scored is not None:
            rows += scored
            print(f"{run} step {step}: scored before (journal {journal.folder})", flush=True)
            continue
        if clock and journal and longest and not clock.room_for(2 * longest):
            end_attempt(f"evaluation of {run}: {len(rows) // 2} of {len(checkpoints)} "
                        "checkpoints scored")
        began = time.monotonic()
        generator = (VLLMEngine(path, vllm or {}, seed) if engine == "vllm" else
                     TransformersEngine(path, device, batch_size))
        scored = []
        for whose, prompts in sets.items():
            em, mk = prompt_scores(task, prompts, *generator.completions(
                prompts, task.max_new_tokens, k, temperature, seed))
            scored += [(run, step, context_metric(metric, whose) if whose else metric,
                        *prompt_interval(values))
                       for metric, values in (("exact_match", em), (f"mean@{k}", mk))]
        if journal:
            journal.write(step, path, scored)
        longest = max(longest, time.monotonic() - began)
        rows += scored
        print(f"{run} step {step}: " + ", ".join(
            f"{m.replace('_', ' ')} {v:.3f} [{lo:.3f}, {hi:.3f}]" for _, _, m, v, lo, hi in scored)
            + f" ({engine})", flush=True)
    return pd.DataFrame(rows, columns=["run", "step", "metric", "value", "low", "high"])
