"""Model cards in the Hugging Face Hub's conventions: how a checkpoint was made and what it
scored, so that a checkpoint can be pushed to the Hub as it is.

The `model_card` rule writes a trained run's card once the run is evaluated and analysed, the
`base_model_card` rule a base model's once it is evaluated; each card goes beside the
checkpoint and as README.md inside it, so that a checkpoint copied elsewhere keeps its
provenance. Training never writes one: its outputs stay as they were.

The metadata (the YAML front matter) carries what the Hub reads: `base_model` (the source, a
Hub id) with `base_model_relation: finetune`, `datasets`, `license` (the source's, read from
its own card; `unknown` where it cannot be read), `library_name`, `pipeline_tag`, `tags` and
a `model-index` with every held-out score, its 95% interval in the metric's `args`.
"""

import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from opdgeo.config import RunSpec, split_reference
from opdgeo.delta import columns
from opdgeo.files import atomic
from opdgeo.kinds import OWN, RUN_KINDS
from opdgeo.task import has_images
from opdgeo.version import describe

CITATION = Path(__file__).resolve().parents[2] / "CITATION.cff"
UNKNOWN_LICENSE = "unknown"  # the Hub's own value for a licence nobody stated
FRAMEWORKS = ("transformers", "trl", "torch", "accelerate", "datasets", "tokenizers",
              "safetensors", "huggingface_hub")
INTERVAL = "95% percentile bootstrap over the held-out prompts"


def _hub_id(path: str | None) -> str | None:
    """`org/name` when `path` reads as a Hugging Face id (`@revision` pinned or not) rather
    than a local folder."""
    if not path or Path(path).exists():
        return None
    name, _ = split_reference(path)
    return name if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name) else None


def citation() -> dict:
    return yaml.safe_load(CITATION.read_text())


def project_license() -> str:
    """This repository's licence as a Hub licence id (CITATION.cff's SPDX id, lower case)."""
    return citation()["license"].lower()


def source_license(source: str) -> str:
    """The licence in the source checkpoint's own card: README.md of a local folder, or the
    card in the local Hugging Face cache for a Hub id (nothing is downloaded); `unknown` when
    there is none or it states none."""
    readme = Path(source) / "README.md"
    if not readme.is_file() and (hub := _hub_id(source)):
        from huggingface_hub import try_to_load_from_cache

        revision = split_reference(source)[1]
        cached = try_to_load_from_cache(hub, "README.md", revision=revision)
        readme = Path(cached) if isinstance(cached, str) else readme
    if not readme.is_file():
        return UNKNOWN_LICENSE
    license_ = ModelCard.load(readme, ignore_metadata_errors=True).data.license
    return license_ if isinstance(license_, str) and license_ else UNKNOWN_LICENSE


def pipeline_tag(task: dict) -> str:
    return "image-text-to-text" if has_images(task) else "text-generation"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def method_tags(kind: str) -> list[str]:
    """The kind (opdgeo.kinds) and the training it stands for: on-policy distillation for the
    kinds trained on a divergence to the teacher, a control's role otherwise."""
    run_kind = RUN_KINDS[kind]
    method = "on-policy-distillation" if run_kind.divergence else _slug(run_kind.role or "")
    return [tag for tag in ("trl", "opdgeo", method, kind) if tag]


def trainer_text(kind: str, loss: str | None) -> str:
    """The TRL trainer a kind is trained with, as a user would reproduce it: the study's
    divergence kinds are TRL's DistillationTrainer with the configured loss (opdgeo.distillation
    adds the losses TRL lacks through its one overridable loss method)."""
    run_kind = RUN_KINDS[kind]
    if run_kind.divergence:
        return f"TRL `DistillationTrainer`, `{loss}` loss"
    return f"TRL `{run_kind.trainer}`"


def evaluation_set(task: dict) -> dict:
    """The held-out set the scores are measured on, as model-index dataset fields."""
    if "eval" not in task:
        settings = ", ".join(f"{k} {v}" for k, v in sorted(task.items()) if k != "kind")
        kind = task.get("kind", "addition")
        return {"dataset_type": kind, "dataset_split": "held-out",
                "dataset_name": f"synthetic {kind} task, held-out prompts ({settings})"}
    specs = task["eval"]
    revisions = {spec.get("revision") for spec in specs.values()} - {None}
    return {"dataset_type": ",".join(spec["path"] for spec in specs.values()),
            "dataset_name": " + ".join(specs) + (" (pooled)" if len(specs) > 1 else ""),
            "dataset_split": ",".join(dict.fromkeys(s.get("split", "train")
                                                    for s in specs.values())),
            **({"dataset_revision": revisions.pop()} if len(revisions) == 1 else {})}


def metric_name(metric: str, evaluation: dict) -> str:
    if metric == "exact_match":
        return "greedy exact match"
    temperature = evaluation.get("temperature")
    return metric + (f", temperature {temperature:g}" if temperature is not None else "")


def final_scores(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the last evaluated step, indexed by metric."""
    return table[table["step"] == table["step"].max()].set_index("metric")


def eval_results(scores: pd.DataFrame, task: dict, evaluation: dict) -> list[EvalResult]:
    """Every metric of the last step, its interval in `args` (the Hub's index has no interval
    field; `args` keeps it beside the value through every parser)."""
    final, step = final_scores(scores), int(scores["step"].max())
    return [EvalResult(task_type=pipeline_tag(task), **evaluation_set(task),
                       metric_type=metric, metric_value=round(float(row.value), 6),
                       metric_name=metric_name(metric, evaluation),
                       metric_args={"ci95_low": round(float(row.low), 6),
                                    "ci95_high": round(float(row.high), 6),
                                    "interval": INTERVAL, "step": step},
                       verified=False)
            for metric, row in final.iterrows()]


def _score(row) -> str:
    return "n/a" if row is None else f"{row.value:.4g} [{row.low:.4g}, {row.high:.4g}]"


def _table(header: tuple[str, ...], rows) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
            *(f"| {' | '.join(map(str, row))} |" for row in rows), ""]


def _example_prompt(task: dict) -> str:
    """A held-out prompt of a synthetic task (a placeholder for a data set's)."""
    if "eval" in task:
        return "<a problem in the training set's prompt format>"
    from opdgeo.task import make_task

    return make_task(task).eval_examples()[0].prompt


def usage(task: dict, max_new_tokens: int = 32) -> list[str]:
    """A snippet that loads the checkpoint with transformers and answers one prompt as the
    evaluation does (greedy)."""
    prompt = json.dumps(_example_prompt(task))
    if has_images(task):
        body = [
            "from PIL import Image",
            "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
            'model_id = "."  # this folder, or the Hub id it was pushed to',
            "processor = AutoProcessor.from_pretrained(model_id)",
            "model = AutoModelForImageTextToText.from_pretrained(model_id)",
            'image = Image.open("picture.png").convert("RGB")  # your picture',
            'messages = [{"role": "user", "content": [{"type": "image"}, '
            f'{{"type": "text", "text": {prompt}}}]}}]',
            "text = processor.apply_chat_template(messages, tokenize=False, "
            "add_generation_prompt=True)",
            'inputs = processor(text=[text], images=[image], return_tensors="pt")',
            "decode = processor.batch_decode"]
    else:
        body = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'model_id = "."  # this folder, or the Hub id it was pushed to',
            "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            "model = AutoModelForCausalLM.from_pretrained(model_id)",
            f'inputs = tokenizer([{prompt}], return_tensors="pt")',
            "decode = tokenizer.batch_decode"]
    return ["## How to use", "", "```python", *body,
            f"output = model.generate(**inputs, max_new_tokens={max_new_tokens}, "
            "do_sample=False)",
            'print(decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)'
            "[0])", "```", ""]


def framework_versions() -> list[str]:
    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return ["## Framework versions", "", f"- opdgeo: {describe()}",
            *(f"- {name}: {installed(name)}" for name in FRAMEWORKS), ""]


def _bibtex_authors(people: list[dict]) -> str:
    return " and ".join(f"{p['family-names']}, {p['given-names']}" if "family-names" in p
                        else f"{{{p['name']}}}" for p in people)


def citations() -> list[str]:
    """BibTeX of the paper and of this software, from CITATION.cff."""
    cff = citation()
    paper = cff["references"][0]
    arxiv = paper["url"].rsplit("/", 1)[-1]
    key = f"{paper['authors'][0]['family-names'].lower()}{paper['year']}"
    return ["## Citation", "", "The paper this study reproduces, and this software:", "",
            "```bibtex", f"@article{{{key},", f"  title = {{{paper['title']}}},",
            f"  author = {{{_bibtex_authors(paper['authors'])}}},",
            f"  journal = {{arXiv preprint arXiv:{arxiv}}},", f"  year = {{{paper['year']}}},",
            f"  url = {{{paper['url']}}}", "}", "",
            "@software{opdgeo,", f"  title = {{{cff['title']}}},",
            f"  author = {{{_bibtex_authors(cff['authors'])}}},",
            f"  version = {{{cff['version']}}},", f"  license = {{{cff['license']}}}", "}",
            "```", ""]


def _config_block(settings: dict) -> list[str]:
    return ["<details><summary>The settings it was made with (YAML)</summary>", "",
            "```yaml", yaml.safe_dump(settings, sort_keys=False).rstrip(), "```", "",
            "</details>", ""]


def _license_note(license_: str, source: str) -> list[str]:
    if license_ != UNKNOWN_LICENSE:
        return []
    return [f"**Licence:** unknown: the source `{source}` states none that could be read here "
            "(its README.md, or the Hub card in the local cache). Check the source's licence "
            "before publishing this checkpoint, and set `license` above.", ""]


def _scores_table(scores: pd.DataFrame, before: pd.DataFrame | None,
                  evaluation: dict) -> list[str]:
    final = final_scores(scores)
    header = ("metric", "source", "this checkpoint") if before is not None else \
        ("metric", "this checkpoint")
    rows = []
    for metric, row in final.iterrows():
        name = metric_name(metric, evaluation)
        if before is None:
            rows.append((name, _score(row)))
        else:
            rows.append((name, _score(before.loc[metric] if metric in before.index else None),
                         _score(row)))
    return [f"Step {int(scores['step'].max())}; each score with its {INTERVAL} "
            "(also in the metadata's `model-index`).", "", *_table(header, rows)]


def _self_teacher(kind, training: dict) -> str:
    """A self-distillation run's teacher: its own model, with a privileged context."""
    if not kind.privileged:
        return "none"
    weights = "its source's weights, frozen" if training["self_teacher"] == "source" else \
        "its current weights"
    whose = "its own" if kind.privileged == OWN else "another example's"
    return f"the model itself ({weights}), reading {whose} reference solution in its prompt"


def model_card(spec: RunSpec, source: str, teacher: str | None, mask: str | None,
               scores: pd.DataFrame, source_scores: pd.DataFrame | None,
               summary: dict, evaluation: dict | None = None) -> ModelCard:
    """The card of a trained run."""
    evaluation = evaluation or {}
    training = spec.training
    optimizer = training["optimizers"][spec.optimizer]
    kind = RUN_KINDS[spec.kind]
    trainer = trainer_text(spec.kind, training.get("loss"))
    base, license_ = _hub_id(source), source_license(source)
    teacher_hub = _hub_id(teacher)
    metadata = ModelCardData(
        model_name=spec.name, base_model=base,
        **({"base_model_relation": "finetune"} if base else {}),
        **({"teacher_model": teacher_hub} if teacher_hub else {}),
        datasets=[d for d in (_hub_id(spec.task.get("train", {}).get("path")),) if d] or None,
        license=license_, library_name="transformers", pipeline_tag=pipeline_tag(spec.task),
        tags=method_tags(spec.kind), eval_results=eval_results(scores, spec.task, evaluation),
    )
    settings = [
        ("run", f"`{spec.name}` (kind `{spec.kind}`, pair `{spec.pair}`, group {spec.group})"),
        ("source (student)", f"`{source}`"),
        ("teacher", f"`{teacher}`" if teacher else _self_teacher(kind, training)),
        ("method", f"{kind.label}: {trainer}"),
        ("optimizer", f"{spec.optimizer}, learning rate {optimizer['learning_rate']:g}, "
                      f"weight decay {optimizer.get('weight_decay', 0.0):g}"),
        ("steps", f"{training['steps']} ({training['batch_size']} completions per step)"),
        ("seed", str(spec.seed)),
        *([("gradient mask", f"`{mask}` (mask `{spec.mask}`)")] if spec.mask else []),
        *((f"data set, {use}", text) for use, text in data_sets(spec.task)),
        ("licence", f"`{license_}` (the source's)"),
        ("pipeline", f"opdgeo {describe()}"),
    ]
    before = final_scores(source_scores) if source_scores is not None else None
    lines = [
        f"# {spec.name}", "",
        f"`{source}` trained with {kind.label} ({trainer}) by the opdgeo pipeline, which "
        "reproduces *Dense Supervision, Sparse Updates: On the Sparsity and Geometry of "
        "On-Policy Distillation* (arXiv 2606.13657). Written after the run was evaluated "
        "and analysed.", "",
        *_license_note(license_, source),
        "## How it was made", "", *_table(("setting", "value"), settings),
        *_config_block({"run": {k: v for k, v in vars(spec).items()
                                if k not in ("training", "task")}
                        # a self-distillation run's teacher is its own model, not none
                        | ({"teacher": spec.source} if kind.privileged else {}),
                        "training": training, "task": spec.task, "evaluation": evaluation}),
        "## Held-out scores", "", *_scores_table(scores, before, evaluation),
        "## Parameter delta (this checkpoint minus the source)", "",
        "| measure | value |", "|---|---|",
        *(columns.markdown_row(key, summary.get(key))
          for key in map(columns.summary_name, columns.HEADLINE)), "",
        "Definitions: docs/study.md of the opdgeo repository; every number of the analysis "
        "is in its `results/analysis/<run>/final/summary.json`.", "",
        *usage(spec.task), *framework_versions(), *citations(),
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines))


def base_model_card(name: str, model: dict, task: dict, scores: pd.DataFrame,
                    evaluation: dict | None = None) -> ModelCard:
    """The card of a base model the pipeline builds and trains on the task's ground truth
    (a teacher, or the source student): from random weights with this repository's code, so
    it carries this repository's licence."""
    evaluation = evaluation or {}
    build, train = model["build"], model["train"]
    license_ = project_license()
    metadata = ModelCardData(
        model_name=name, license=license_, library_name="transformers",
        pipeline_tag=pipeline_tag(task), tags=["trl", "opdgeo", "sft"],
        eval_results=eval_results(scores, task, evaluation))
    settings = [
        ("model", f"`{name}`: {build['arch']}, built from random weights (seed {train['seed']})"),
        ("method", "supervised fine-tuning on the task's ground truth: TRL `SFTTrainer`"),
        ("training", f"up to {train['max_steps']} steps of {train['batch_size']} examples, "
                     f"AdamW, learning rate {train['learning_rate']:g}, stopping at held-out "
                     f"exact match {train['stop_at']:g}"),
        *((f"data set, {use}", text) for use, text in data_sets(task)),
        ("licence", f"`{license_}` (this repository's: the weights are its code's output)"),
        ("pipeline", f"opdgeo {describe()}"),
    ]
    lines = [
        f"# {name}", "",
        f"A base model of the opdgeo pipeline: built as `{build['arch']}` and trained on the "
        "task's ground truth, as a teacher or as the source student of the study's runs.", "",
        "## How it was made", "", *_table(("setting", "value"), settings),
        *_config_block({"model": model, "task": task, "evaluation": evaluation}),
        "## Held-out scores", "", *_scores_table(scores, None, evaluation),
        *usage(task), *framework_versions(), *citations(),
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines))


def data_sets(task: dict) -> list[tuple[str, str]]:
    """(use, description) of every data set the task reads: its hub id or file, configuration,
    split and revision; a synthetic task names its generator and settings."""
    if "train" not in task:
        settings = ", ".join(f"{k} {v}" for k, v in sorted(task.items()) if k != "kind")
        return [("train and held-out", f"synthetic `{task.get('kind', 'addition')}` task "
                                       f"(opdgeo.task; {settings})")]

    def describe_set(spec: dict) -> str:
        parts = [f"split {spec.get('split', 'train')}"]
        if spec.get("name"):
            parts.insert(0, f"configuration {spec['name']}")
        parts.append(f"revision {spec['revision']}" if spec.get("revision")
                     else "revision not pinned (the hub's latest when read)")
        return f"`{spec['path']}` ({', '.join(parts)})"

    return [("train", describe_set(task["train"]))] + [
        (f"held-out: {name}", describe_set(spec)) for name, spec in task.get("eval", {}).items()]


def save_card(card: ModelCard, out: Path, checkpoint: Path) -> None:
    """The card at `out`, and the same text as `checkpoint`/README.md (each written beside,
    then renamed)."""
    for path in (Path(out), Path(checkpoint) / "README.md"):
        with atomic(path, "model-card.write") as tmp:
            card.save(tmp)


def write_model_card(spec: RunSpec, source: str, teacher: str | None, mask: str | None,
                     scores: Path, source_scores: Path | None, summary: Path, out: Path,
                     checkpoint: Path, evaluation: dict | None = None) -> None:
    card = model_card(spec, source, teacher, mask, pd.read_csv(scores),
                      pd.read_csv(source_scores) if source_scores else None,
                      json.loads(Path(summary).read_text()), evaluation)
    save_card(card, out, checkpoint)


def write_base_model_card(name: str, model: dict, task: dict, scores: Path, out: Path,
                          checkpoint: Path, evaluation: dict | None = None) -> None:
    save_card(base_model_card(name, model, task, pd.read_csv(scores), evaluation), out,
              checkpoint)
