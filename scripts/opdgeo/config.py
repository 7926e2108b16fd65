"""Config -> run specs. The one place where run and mask names are made.

The schema (workflow/schemas/config.schema.yaml) checks shapes and types; this module checks
what a schema cannot (references between sections) and expands the config into runs:

    {pair}-opd-{teacher}-{optimizer}-s{seed}      on-policy distillation (every optimizer
                                                  on the primary teacher, the first on others)
    {pair}-sft-{optimizer}-s{seed}                offline distillation control (primary teacher)
    {pair}-grpo-{optimizer}-s{seed}               RLVR control
    {pair}-opsd-{optimizer}-s{seed}               on-policy self-distillation (and op2sd, its
                                                  control with another example's context)
    {pair}-masked-{arm}-s{seed}                   subnetwork retraining from the source
    {pair}-sweep-{kind}-{opt}-lr{lr}-n{steps}-s{seed}   learning-rate x steps grid
    {name}                                        external run (two given checkpoints)
"""

import copy
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from opdgeo.kinds import DEFAULT_CONTROLS, DEFAULT_SWEEP_KINDS, EXTERNAL, OPD, RLVR, RUN_KINDS
from opdgeo.task import has_images, has_privileged_context

TRAINING_DEFAULTS = {
    "steps": 200,
    "batch_size": 32,
    "generations_per_prompt": 4,
    "loss": "reverse_kl",
    "beta": 0.5,
    "topk": 32,
    "temperature": 1.0,
    "max_grad_norm": 1.0,
    "save_every": 50,
    "seeds": [0],
    "optimizers": {"adamw": {"learning_rate": 1e-5}},
    "keep_fp32": True,
    "gradient_checkpointing": False,
    "bf16": "auto",
    "use_vllm": False,
    "prompts": 4096,
    "gpus": 1,
    "sharding": "none",
    "self_teacher": "source",
    "kl_clip": None,
}
# The sections of a config that runs are made of (build_runs reads these only).
RUN_SECTIONS = ("models", "pairs", "training", "task", "external")
OPTIMIZER_DEFAULTS = {"weight_decay": 0.0, "momentum": 0.0, "adam_beta2": 0.999}


class ConfigError(ValueError):
    """A config that the schema rejects, or that it accepts but that does not make sense."""


# What YAML reads as a boolean; `snakemake --config preload=false` hands over the string.
YAML_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML
    itself keeps the last value silently: an edit that seems to change a setting would not)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} twice (the first one would be ignored)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_config_file(path) -> dict:
    """A config file as YAML reads it; a syntax error or a key given twice says where
    (Snakemake's reader does not)."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from None
    except yaml.MarkedYAMLError as error:
        where = [f"{what} at line {mark.line + 1}, column {mark.column + 1}"
                 for what, mark in ((error.problem, error.problem_mark),
                                    (error.context, error.context_mark)) if what and mark]
        raise ConfigError(f"{path}: not valid YAML: {'; '.join(where)}") from None


def validate_config(config: dict, schema_path) -> None:
    """Check `config` against the schema and fill in the schema's defaults, in place.

    Where the schema expects a boolean or an integer, a string YAML would read as one is read
    as one (Snakemake's `--config` hands nested values over as strings). An
    error is one short line (where, what) instead of jsonschema's dump of the schema."""
    import jsonschema
    from snakemake.utils import validate

    schema = yaml.safe_load(Path(schema_path).read_text())
    _read_booleans(config, schema, schema)
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        where = ".".join(map(str, error.absolute_path)) or "top level"
        raise ConfigError(f"{where}: {error.message}")
    validate(config, str(schema_path))  # Snakemake's validator also fills in the defaults


def _read_booleans(value, schema: dict, root: dict):
    if "$ref" in schema:  # the schema's own definitions: "#/definitions/<name>"
        schema = root["definitions"][schema["$ref"].rsplit("/", 1)[-1]]
    if not isinstance(value, dict):
        return
    properties, others = schema.get("properties", {}), schema.get("additionalProperties")
    for key, item in value.items():
        sub = properties.get(key, others if isinstance(others, dict) else {})
        if (sub.get("type") == "boolean" and isinstance(item, str)
                and item.lower() in YAML_BOOLEANS):
            value[key] = YAML_BOOLEANS[item.lower()]
        elif sub.get("type") == "integer" and isinstance(item, str) and item.isdigit():
            value[key] = int(item)  # `--config 'training={gpus: 4}'` hands over '4'
        else:
            _read_booleans(item, sub, root)


@dataclass(frozen=True)
class RunSpec:
    name: str
    kind: str  # a key of opdgeo.kinds.RUN_KINDS
    pair: str | None
    source: str  # model key (trained runs) or checkpoint path (external runs)
    teacher: str | None = None
    optimizer: str | None = None
    seed: int = 0
    mask: str | None = None  # mask name (masked runs)
    trained: str | None = None  # checkpoint path (external runs)
    training: dict = field(default_factory=dict, compare=False, hash=False)
    group: str = "main"  # main | sweep (the learning-rate x steps grid of matched methods)
    task: dict = field(default_factory=dict, compare=False, hash=False)  # see pair_task

    @property
    def is_trained(self) -> bool:
        return RUN_KINDS[self.kind].trainer is not None

    def checkpoint_steps(self) -> list[int]:
        """Steps of the intermediate checkpoints that training leaves behind."""
        if not self.is_trained:
            return []
        every, steps = self.training["save_every"], self.training["steps"]
        return [s for s in range(every, steps, every)]

    @property
    def evaluate_every(self) -> int:
        """The intermediate checkpoints scored: those at multiples of this (the others are
        analysed only)."""
        return self.training.get("evaluate_every") or self.training.get("save_every", 1)

    def evaluated_steps(self) -> list[int]:
        return [s for s in self.checkpoint_steps() if s % self.evaluate_every == 0]


@dataclass(frozen=True)
class MaskSpec:
    """How a mask is made: from which run's delta, or at random like another mask."""

    name: str
    pair: str
    method: str  # atol | top | random_like | random_density
    run: str | None = None  # run whose delta defines it (atol, top, random_like)
    atol: float = 1e-5
    density: float | str | None = None  # a fraction, or `paper:<row>` until build_masks
    seed: int = 0


def hub_reference(path: str, revision: str | None = None) -> str:
    """A given checkpoint as the stages read it: `org/name@revision` when a hub id is pinned
    (the commit, tag or branch to download), else the path as it is."""
    return f"{path}@{revision}" if revision and not Path(path).exists() else path


def split_reference(reference: str) -> tuple[str, str | None]:
    """`org/name@revision` -> (`org/name`, revision); a local path or unpinned id as it is."""
    match = re.fullmatch(r"([\w.-]+/[\w.-]+)@([\w./-]+)", str(reference))
    return (match.group(1), match.group(2)) if match else (str(reference), None)


def model_reference(spec: dict) -> str | None:
    """A given base model (`models.<key>` with `path`) as the stages read it."""
    return hub_reference(spec["path"], spec.get("revision")) if "path" in spec else None


def pair_training(config: dict, pair: str) -> dict:
    """Global training settings, overridden by the pair's own, with defaults filled in."""
    merged = copy.deepcopy(TRAINING_DEFAULTS)
    for layer in (config.get("training", {}), config["pairs"][pair].get("training", {})):
        for key, value in layer.items():
            merged[key] = copy.deepcopy(value)
    merged["optimizers"] = {
        name: {**OPTIMIZER_DEFAULTS, **settings} for name, settings in merged["optimizers"].items()
    }
    if merged["sharding"] != "none" and merged["gpus"] < 2:
        raise ConfigError(f"pairs.{pair}: training.sharding: {merged['sharding']} shards the "
                          f"models over the job's GPUs, and training.gpus is {merged['gpus']}: "
                          "set training.gpus to 2 or more (`opdgeo plan` says how many fit), or "
                          "sharding: none")
    every = merged.get("evaluate_every")
    if every is not None and every % merged["save_every"]:
        raise ConfigError(f"pairs.{pair}: training.evaluate_every ({every}) must be a multiple "
                          f"of save_every ({merged['save_every']}): only saved checkpoints can "
                          f"be scored")
    return merged


def pair_task(config: dict, pair: str | None) -> dict:
    """The global task with the pair's `task` keys replaced; a pair whose task is of another
    kind shares no setting with the global one, so its own task replaces it whole."""
    base = config.get("task", {})
    override = config["pairs"][pair].get("task", {}) if pair else {}
    kind = base.get("kind", "addition")
    if override.get("kind", kind) != kind:
        base = {}
    return copy.deepcopy({**base, **override})


def primary_score(evaluation: dict) -> str:
    """The evaluation metric that figures, tables and findings use (`evaluation.primary`)."""
    primary = evaluation["primary"]
    return f"mean@{evaluation['k']}" if primary == "mean@k" else primary


def model_task(config: dict, model: str) -> dict:
    """The task a base model is trained and evaluated on: that of the first pair it is the
    student or a teacher of (the global task when no pair uses it)."""
    for pair, spec in config["pairs"].items():
        if model == spec["student"] or model in spec["teachers"]:
            return pair_task(config, pair)
    return pair_task(config, None)


def self_teacher_contexts(config: dict, model: str) -> list[str]:
    """The privileged contexts (own, other) the self-distillation runs on a base model give
    their teacher, to score the model with: empty where none runs on it, or where its
    held-out examples have no context (a benchmark without solutions)."""
    if not has_privileged_context(model_task(config, model), "eval"):
        return []
    kinds = {control for spec in config["pairs"].values() if spec["student"] == model
             for control in spec.get("controls", DEFAULT_CONTROLS)}
    return [k.privileged for name, k in RUN_KINDS.items() if k.privileged and name in kinds]


def check_references(config: dict):
    models = config["models"]
    for pair, spec in config["pairs"].items():
        roles = [("student", spec["student"])] + [("teacher", t) for t in spec["teachers"]]
        for role, key in roles:
            if key not in models:
                raise ConfigError(
                    f"pairs.{pair}.{role} is {key!r}, which is not a key of `models` "
                    f"(known: {sorted(models)}). Add it under `models:` or fix the name."
                )
        if len(set(spec["teachers"])) != len(spec["teachers"]):
            raise ConfigError(f"pairs.{pair}.teachers lists a teacher twice")
        check_self_distillation(config, pair)
        student = models[spec["student"]].get("path", spec["student"])
        for teacher in spec["teachers"]:
            if models[teacher].get("path", teacher) == student:
                raise ConfigError(
                    f"pairs.{pair}: teacher {teacher!r} is the student {spec['student']!r} "
                    "itself, so OPD has nothing to learn (loss 0). A self-distillation pair "
                    "needs a privileged-context teacher, which is a different run kind; "
                    "give the pair another model as teacher."
                )
    for name, model in models.items():
        if model.get("train", {}).get("privileged") and \
                not has_privileged_context(model_task(config, name)):
            raise ConfigError(f"models.{name}.train.privileged: its task has no privileged "
                              "context to put in its prompts (addition, or a math data set "
                              "naming its `solution`); set it to 0")
    for name in config.get("external", {}):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ConfigError(f"external run name {name!r}: use letters, digits, '.', '_', '-'")


def check_self_distillation(config: dict, pair: str):
    """A pair without teachers trains self-distillation only; self-distillation needs a task
    whose examples carry a privileged context, and a divergence that can be capped."""
    spec = config["pairs"][pair]
    controls = spec.get("controls", list(DEFAULT_CONTROLS))
    privileged = [c for c in controls if RUN_KINDS[c].privileged]
    if not spec["teachers"]:
        needing = [c for c in controls if RUN_KINDS[c].needs_teacher]
        if needing or not privileged or spec.get("masked", {}).get("arms") or spec.get("sweep"):
            raise ConfigError(
                f"pairs.{pair} has no teachers, so it can train self-distillation only: list "
                f"controls from {[k for k, kind in RUN_KINDS.items() if kind.privileged]} and "
                "no teacher-based controls, masked arms or sweep, or give it a teacher")
    task = pair_task(config, pair)
    if privileged and not has_privileged_context(task):
        raise ConfigError(
            f"pairs.{pair}.controls lists {privileged}, whose teacher reads a privileged context "
            f"(the reference solution), but the pair's task ({task.get('kind', 'addition')}) has "
            "none: give task.train a `solution` column (math data sets), or drop them")
    training = pair_training(config, pair)
    if privileged and training["kl_clip"] is not None and training["loss"] == "sampled_k1":
        raise ConfigError(f"pairs.{pair}: training.kl_clip caps the divergence's terms, and "
                          "sampled_k1 has none; use another loss or kl_clip: null")


def build_runs(config: dict) -> dict[str, RunSpec]:
    """Every run of the study, by name, in a stable order."""
    check_references(config)
    runs: dict[str, RunSpec] = {}
    external = {name: RunSpec(name, EXTERNAL, None,
                              hub_reference(ext["source"], ext.get("source_revision")),
                              trained=hub_reference(ext["trained"], ext.get("trained_revision")),
                              task=pair_task(config, None))
                for name, ext in config.get("external", {}).items()}
    for pair, spec in config["pairs"].items():
        training = pair_training(config, pair)
        optimizers = list(training["optimizers"])
        primary_teacher = spec["teachers"][0] if spec["teachers"] else None
        primary_opt = optimizers[0]
        for seed in training["seeds"]:
            # The optimizer ablation runs on the primary teacher; other teachers use the
            # primary optimizer (as the paper's second-teacher run used AdamW only).
            for teacher in spec["teachers"]:
                for opt in optimizers if teacher == primary_teacher else optimizers[:1]:
                    name = f"{pair}-opd-{teacher}-{opt}-s{seed}"
                    runs[name] = RunSpec(
                        name, "opd", pair, spec["student"], teacher, opt, seed, training=training
                    )
            for control in spec.get("controls", list(DEFAULT_CONTROLS)):
                name = f"{pair}-{control}-{primary_opt}-s{seed}"
                # A self-distillation run's teacher is its own model.
                teacher = None if RUN_KINDS[control].privileged else primary_teacher
                runs[name] = RunSpec(name, control, pair, spec["student"], teacher, primary_opt,
                                     seed, training=training)
        # A mask may come from an external run on the same source (the paper's VL GRPO run).
        for arm, masks in masked_arms(config, pair, {**runs, **external}).items():
            for mask in masks:
                name = f"{pair}-masked-{arm}-s{mask.seed}"
                runs[name] = RunSpec(
                    name, "masked", pair, spec["student"], primary_teacher, primary_opt,
                    mask.seed, mask=mask.name, training=training,
                )
        runs.update(sweep_runs(config, pair, training))
        task = pair_task(config, pair)
        for name, run in runs.items():
            if run.pair == pair:
                runs[name] = replace(run, task=task)
    for name, run in external.items():
        if name in runs:
            raise ConfigError(f"external run {name!r} has the name of a trained run")
        runs[name] = run
    return runs


def sweep_runs(config: dict, pair: str, training: dict) -> dict[str, RunSpec]:
    """The grid of `pairs.<pair>.sweep`: each method at each optimizer, learning rate and
    step count, with the primary teacher and otherwise the pair's training settings.

    `learning_rates` is a list (for the primary optimizer) or a mapping optimizer -> list, so
    that SGD gets its own range (its useful learning rates are orders of magnitude above
    AdamW's)."""
    spec, sweep = config["pairs"][pair], config["pairs"][pair].get("sweep")
    if not sweep:
        return {}
    rates = sweep["learning_rates"]
    if not isinstance(rates, dict):
        rates = {list(training["optimizers"])[0]: rates}
    runs = {}
    for kind in sweep.get("kinds", list(DEFAULT_SWEEP_KINDS)):
        for opt, learning_rates in rates.items():
            for lr in learning_rates:
                for steps in sweep.get("steps", [training["steps"]]):
                    for seed in sweep.get("seeds", training["seeds"]):
                        grid = copy.deepcopy(training)
                        grid["steps"], grid["save_every"] = steps, steps
                        settings = grid["optimizers"].get(opt, OPTIMIZER_DEFAULTS)
                        grid["optimizers"] = {opt: {**settings, "learning_rate": lr}}
                        name = f"{pair}-sweep-{kind}-{opt}-lr{lr:g}-n{steps}-s{seed}"
                        runs[name] = RunSpec(name, kind, pair, spec["student"],
                                             spec["teachers"][0], opt, seed, training=grid,
                                             group="sweep")
    return runs


def primary_run(config: dict, pair: str, seed: int) -> str:
    spec = config["pairs"][pair]
    opt = list(pair_training(config, pair)["optimizers"])[0]
    return f"{pair}-opd-{spec['teachers'][0]}-{opt}-s{seed}"


# The paper's name for a mask's density (config/paper_reference.yaml, mask_density): the OPD
# mask's for the primary run, else the mask of a run of that role's.
PAPER = "paper"
PAPER_MASK_ROWS = {OPD: "opd", RLVR: "run-grpo"}


def masked_arms(config: dict, pair: str, runs: dict) -> dict[str, list[MaskSpec]]:
    """Arm name -> one mask per seed, parsed from `pairs.<pair>.masked.arms` (the schema says
    each form). A density `paper` stays symbolic here (`paper:<row>` of the paper's
    mask_density table): build_masks resolves it."""
    masked = config["pairs"][pair].get("masked", {})
    atol = masked.get("atol", 1e-5)
    arms: dict[str, list[MaskSpec]] = {}
    for arm in masked.get("arms", []):
        head, *rest = arm.split(":")
        density = rest.pop() if rest and _is_density(rest[-1]) else ""
        arg = ":".join(rest)
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", arm).strip("-")
        arms[slug] = []
        for seed in masked.get("seeds", [0]):
            primary = primary_run(config, pair, seed)
            other = _named_run(config, pair, runs, arm, arg, seed) if arg else None
            d = _density(config, pair, runs, arm, other or primary, primary, density) \
                if density else None
            tag = f"{d:g}" if isinstance(d, float) else f"-{d.replace(':', '-')}" if d else ""
            if head == "opd" and not arg and not density:
                mask = MaskSpec(f"{primary}.atol{atol:g}", pair, "atol", primary, atol,
                                seed=seed)
            elif head == "run" and arg and not density:
                mask = MaskSpec(f"{other}.atol{atol:g}", pair, "atol", other, atol, seed=seed)
            elif head == "top" and density:
                run = other or primary
                mask = MaskSpec(f"{run}.top{tag}", pair, "top", run, atol, d, seed)
            elif head == "random" and not arg and not density:
                mask = MaskSpec(
                    f"{primary}.atol{atol:g}.random{seed}", pair, "random_like", primary, atol,
                    seed=seed,
                )
            elif head == "random" and density:
                mask = MaskSpec(f"{pair}.density{tag}.random{seed}", pair, "random_density",
                                primary, atol, d, seed)
            elif head == "random":
                mask = MaskSpec(f"{other}.atol{atol:g}.random{seed}", pair, "random_like", other,
                                atol, seed=seed)
            else:
                raise ConfigError(
                    f"pairs.{pair}.masked.arms: cannot read {arm!r}; use opd, random, run:<run>, "
                    "random:<run>, top:[<run>:]<density> or random:[<run>:]<density> (a "
                    "density: a number in (0, 1] or `paper`)"
                )
            arms[slug].append(mask)
    return arms


def _is_density(text: str) -> bool:
    return text == PAPER or _is_number(text)


def _named_run(config: dict, pair: str, runs: dict, arm: str, arg: str, seed: int) -> str:
    """The run an arm names: `{pair}-{arg}` (its own seed where it has one, else its first
    run), or an external run on the pair's source."""
    other = f"{pair}-{arg}"
    if other in runs:
        return other
    found = [r for r in runs if r.startswith(other + "-")]
    other = next((r for r in found if r.endswith(f"-s{seed}")), found[0] if found else other)
    if other not in runs and runs.get(arg) and runs[arg].kind == EXTERNAL:
        other = _external_on_source(config, pair, runs[arg], arm)
    if other not in runs:
        raise ConfigError(
            f"pairs.{pair}.masked.arms: {arm!r} names run {arg!r}, but no run "
            f"{pair}-{arg}[-...] or external run {arg} exists; runs of the pair: "
            f"{sorted(r for r in runs if r.startswith(pair))}"
        )
    return other


def _density(config: dict, pair: str, runs: dict, arm: str, run: str, primary: str,
             density: str) -> float | str:
    """A number in (0, 1], or `paper:<row>`: the paper's density of the named run's mask."""
    if density != PAPER:
        value = float(density)
        if not 0 < value <= 1:
            raise ConfigError(f"pairs.{pair}.masked.arms: {arm!r} has density {value:g}; a "
                              f"density is a fraction in (0, 1]")
        return value
    spec = runs[run]
    role = OPD if run == primary else RUN_KINDS.get(
        config.get("external", {}).get(run, {}).get("kind", spec.kind), RUN_KINDS[EXTERNAL]).role
    if role not in PAPER_MASK_ROWS:
        raise ConfigError(f"pairs.{pair}.masked.arms: {arm!r}: the paper gives a mask density for "
                          f"the primary OPD run and an RLVR run only, not for {run}")
    return f"{PAPER}:{PAPER_MASK_ROWS[role]}"


def _external_on_source(config: dict, pair: str, run: RunSpec, arm: str) -> str:
    """An external run a mask arm names (the paper's DeepScaleR RLVR mask for DS-Qwen): its
    source must be the pair's student, or its delta says nothing about the student."""
    student = config["pairs"][pair]["student"]
    if model_reference(config["models"][student]) != run.source:
        raise ConfigError(
            f"pairs.{pair}.masked.arms: {arm!r} takes the mask of external run {run.name}, "
            f"whose source {run.source} is not the pair's student {student} "
            f"({config['models'][student].get('path', 'built by the pipeline')}); a mask "
            "must come from a run on the student's own weights"
        )
    return run.name


def build_masks(config: dict, paper_densities: dict[str, float] | None = None
                ) -> dict[str, MaskSpec]:
    """Every mask of the config; a `paper` density read from `paper_densities` (the paper's
    mask_density table, row -> %): the workflow passes opdgeo.paper_tables', so that only the
    masks, not every command importing this module, read the paper's numbers."""
    runs = build_runs(config)
    masks = {m.name: m for pair in config["pairs"]
             for masks in masked_arms(config, pair, runs).values() for m in masks}
    for name, mask in masks.items():
        if isinstance(mask.density, str):
            if paper_densities is None:
                raise ConfigError(f"mask {name}: the paper's densities are needed to resolve "
                                  f"{mask.density!r}")
            masks[name] = replace(mask, density=paper_densities[mask.density.split(":")[1]] / 100)
    return masks


def run_table(runs: dict[str, RunSpec], models: dict | None = None):
    """One row per run: how it was made (the figures colour and group runs by these), with the
    hub revisions its given checkpoints are pinned to (`models`: the config's)."""
    import pandas as pd

    rows = []
    for spec in runs.values():
        opt = spec.training.get("optimizers", {}).get(spec.optimizer, {})
        if spec.is_trained:
            revisions = ((models or {}).get(spec.source, {}).get("revision"), None)
        else:
            revisions = (split_reference(spec.source)[1], split_reference(spec.trained)[1])
        rows.append({
            "run": spec.name, "kind": spec.kind, "pair": spec.pair, "source": spec.source,
            "teacher": spec.teacher, "optimizer": spec.optimizer, "seed": spec.seed,
            "mask": spec.mask, "learning_rate": opt.get("learning_rate"),
            "steps": spec.training.get("steps"), "group": spec.group,
            "modality": "vision-language" if has_images(spec.task) else "language",
            "source_revision": revisions[0], "trained_revision": revisions[1],
        })
    return pd.DataFrame(rows)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_config(path) -> dict:
    """A config file as the Snakefile sees it: checked against the schema, defaults filled."""
    config = read_config_file(path)
    validate_config(config, Path(__file__).parents[2] / "workflow/schemas/config.schema.yaml")
    return config


def check_config_file(path, paper_density: dict) -> dict:
    """Every check a dry run makes of a config file: YAML (keys given once), the schema,
    the references between sections, the runs and masks it makes (a mask at the paper's
    density resolved with `paper_density`, as the workflow does; `opdgeo check-config`)."""
    config = read_config(path)
    build_runs(config)
    build_masks(config, paper_density)
    return config
