"""The model card of a trained run: how the checkpoint was made and what it scored.

The `model_card` rule writes it once the run is evaluated and analysed, beside the run's
folders and as README.md inside its final checkpoint, so that a checkpoint copied elsewhere
keeps its provenance. Training never writes it: its outputs stay as they were.
"""

import json
import re
from pathlib import Path

import pandas as pd
from huggingface_hub import ModelCard, ModelCardData

from opdgeo.config import RunSpec, split_reference
from opdgeo.delta import columns
from opdgeo.kinds import RUN_KINDS
from opdgeo.version import describe


def _hub_id(path: str | None) -> str | None:
    """`org/name` when `path` reads as a Hugging Face id (`@revision` pinned or not) rather
    than a local folder."""
    if not path or Path(path).exists():
        return None
    name, _ = split_reference(path)
    return name if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name) else None


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


def _final_scores(table: pd.DataFrame) -> dict[str, float]:
    final = table[table["step"] == table["step"].max()]
    return dict(zip(final["metric"], final["value"], strict=True))


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def model_card(spec: RunSpec, source: str, teacher: str | None, mask: str | None,
               scores: pd.DataFrame, source_scores: pd.DataFrame | None,
               summary: dict) -> ModelCard:
    training = spec.training
    optimizer = training["optimizers"][spec.optimizer]
    kind = RUN_KINDS[spec.kind]
    objective = f"{kind.label}, {kind.trainer}" + (
        f" with the `{training['loss']}` loss" if kind.divergence else "")
    settings = [
        ("run", f"`{spec.name}` (kind `{spec.kind}`, pair `{spec.pair}`, group {spec.group})"),
        ("source (student)", f"`{source}`"),
        ("teacher", f"`{teacher}`" if teacher else "none"),
        ("objective", objective),
        ("optimizer", f"{spec.optimizer}, learning rate {optimizer['learning_rate']:g}, "
                      f"weight decay {optimizer.get('weight_decay', 0.0):g}"),
        ("steps", f"{training['steps']} ({training['batch_size']} completions per step)"),
        ("seed", str(spec.seed)),
        *([("gradient mask", f"`{mask}` (mask `{spec.mask}`)")] if spec.mask else []),
        *((f"data set, {use}", text) for use, text in data_sets(spec.task)),
        ("pipeline", f"opdgeo {describe()}"),
    ]
    final, step = _final_scores(scores), int(scores["step"].max())
    before = _final_scores(source_scores) if source_scores is not None else {}
    metadata = ModelCardData(
        model_name=spec.name, library_name="transformers", base_model=_hub_id(source),
        datasets=[d for d in (_hub_id(spec.task.get("train", {}).get("path")),) if d] or None,
        tags=["opdgeo", spec.kind],
    )
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# {spec.name}", "",
        f"Trained by the opdgeo pipeline (run kind `{spec.kind}`): `{source}` trained with "
        f"{objective}. This card was written after the run was evaluated and analysed.", "",
        "## How it was made", "", "| setting | value |", "|---|---|",
        *(f"| {key} | {value} |" for key, value in settings), "",
        f"## Held-out scores (step {step})", "", "| metric | source | this checkpoint |",
        "|---|---|---|",
        *(f"| {metric} | {_number(before.get(metric))} | {_number(value)} |"
          for metric, value in final.items()), "",
        "## Parameter delta (this checkpoint minus the source)", "",
        "| measure | value |", "|---|---|",
        *(columns.markdown_row(key, summary.get(key)) for key in map(columns.summary_name,
                                                                    columns.HEADLINE)), "",
        "Definitions: docs/study.md section 3 of the opdgeo repository; every number of the "
        "analysis is in its `results/analysis/<run>/final/summary.json`.", "",
    ]
    return ModelCard("\n".join(lines))


def write_model_card(spec: RunSpec, source: str, teacher: str | None, mask: str | None,
                     scores: Path, source_scores: Path | None, summary: Path, out: Path,
                     checkpoint: Path) -> None:
    """The card at `out`, and the same text as `checkpoint`/README.md."""
    card = model_card(spec, source, teacher, mask, pd.read_csv(scores),
                      pd.read_csv(source_scores) if source_scores else None,
                      json.loads(Path(summary).read_text()))
    for path in (Path(out), Path(checkpoint) / "README.md"):
        tmp = path.with_name(path.name + ".tmp")
        card.save(tmp)
        tmp.replace(path)
