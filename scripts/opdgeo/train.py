"""Wire TRL's trainers from a run spec: base models (SFT on ground truth), OPD, and controls.

Only this module knows how a run was made; every later stage sees a checkpoint folder.
"""

import dataclasses
import json
import os
import random
import shutil
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import DistillationConfig, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from opdgeo.attempts import WallClock, end_attempt
from opdgeo.callbacks import (
    CrashPointCallback,
    CSVLogCallback,
    DataOrderCallback,
    EarlyStopOnScoreCallback,
    GradientMaskCallback,
    NonFiniteGuardCallback,
    OptimizerStateCallback,
    SnapshotCallback,
    WallTimeCallback,
    progress_callbacks,
)
from opdgeo.config import RunSpec
from opdgeo.distillation import TEACHER_PROMPT, TRL_BETA, OPDTrainer, OPSDTrainer
from opdgeo.evaluate import exact_match, generate, generation_dtype, images_of
from opdgeo.files import atomic, link, remove
from opdgeo.kinds import RUN_KINDS
from opdgeo.models import (
    VISION_ARCHITECTURES,
    build_model,
    character_tokenizer,
    check_same_vocabulary,
    check_weights,
    image_text_processor,
    load_model,
    load_tokenizer,
    save_checkpoint,
    saved_state,
    stored_once,
    text_tokenizer,
    weight_files,
)
from opdgeo.progress import on_terminal
from opdgeo.prompts import Example, model_prompt, render_prompts
from opdgeo.task import make_task, privileged_contexts

# Per-example progress bars of dataset preprocessing drown the training progress in the logs.
datasets.disable_progress_bars()


def _trainer_args(config_cls, out_dir: Path, *, steps: int, batch_size: int, optimizer: str,
                  opt: dict, seed: int, device: str, training: dict | None = None,
                  resumable: bool = False, **extra):
    """Settings every trainer shares: optimizer, clipping, precision, logging, and (resumable
    runs) the Trainer's own checkpoint every `save_every` steps in out_dir/trainer/."""
    training = training or {}
    micro, accumulation = _micro_batches(batch_size, training.get("micro_batch_size"))
    optim = {"adamw": "adamw_torch", "sgd": "sgd"}[optimizer]
    optim_args = f"momentum={opt.get('momentum', 0.0)}" if optimizer == "sgd" else None
    bf16 = training.get("bf16", "auto") == "on" or (
        training.get("bf16", "auto") == "auto" and device.startswith("cuda")
    )
    checkpointing = training.get("gradient_checkpointing", False)
    sharding = _sharding(training, checkpointing)
    return config_cls(
        output_dir=str(out_dir / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=opt["learning_rate"],
        weight_decay=opt.get("weight_decay", 0.0),
        adam_beta2=opt.get("adam_beta2", 0.999),
        optim=optim,
        optim_args=optim_args,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=training.get("max_grad_norm", 1.0),
        logging_steps=1,
        save_strategy="steps" if resumable else "no",
        save_steps=training.get("save_every", 50),
        save_total_limit=1,
        report_to=training.get("report_to", []),
        bf16=bf16,
        use_cpu=device == "cpu",
        seed=seed,
        data_seed=seed,
        # transformers 5 renamed gradient checkpointing; naming the new one also overrides TRL's
        # config default under the old name, which would warn in every run. Sharded, FSDP's own
        # checkpointing does it (the Trainer's would gather each layer's weights twice).
        activation_checkpointing=checkpointing and not sharding,
        dataloader_num_workers=0,
        disable_tqdm=not on_terminal(),
        **sharding,
        **extra,
    )


def sharded(training: dict) -> bool:
    """Whether a run's models are sharded over its processes: `training.sharding: fsdp`, with
    more than one process (`accelerate launch` sets WORLD_SIZE; a CPU job runs one)."""
    return training.get("sharding", "none") == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _sharding(training: dict, checkpointing: bool) -> dict:
    """The Trainer's FSDP settings (accelerate's FSDP plugin, built by the Trainer) for a
    sharded run: FSDP2, each decoder layer its own unit (the model's `_no_split_modules`), the
    student's and the teacher's weights, gradients and AdamW state sharded over the processes,
    checkpoints saved whole (FULL_STATE_DICT: gathered to the first process), so that a
    Trainer checkpoint holds the weights every later stage reads."""
    if not sharded(training):
        return {}
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True,
        "cpu_ram_efficient_loading": False, "activation_checkpointing": checkpointing}}


def _micro_batches(batch_size: int, micro_batch_size: int | None) -> tuple[int, int]:
    """Per-device batch and gradient accumulation giving `batch_size` completions per step
    over all processes (`accelerate launch` sets WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = micro_batch_size or max(batch_size // world, 1)
    if batch_size % (micro * world):
        raise ValueError(
            f"batch_size {batch_size} is not a multiple of micro_batch_size {micro} x {world} "
            "processes: change training.batch_size or training.micro_batch_size"
        )
    return micro, batch_size // (micro * world)


def _generation_backend(training: dict, config_cls) -> dict:
    """TRL's vLLM rollouts when asked for, with `training.vllm` as TRL's vllm_* settings; a
    clear error when vLLM is not installed or a setting is not TRL's."""
    if not training.get("use_vllm", False):
        return {}
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "training.use_vllm is true, but vllm cannot be imported here: install the GPU "
            "extras (pip install -r envs/requirements-gpu.txt), or set use_vllm: false"
        ) from error
    settings = {"vllm_mode": "colocate"} | {f"vllm_{key}": value
                                            for key, value in training.get("vllm", {}).items()}
    known = {f.name for f in dataclasses.fields(config_cls)}
    if unknown := sorted(set(settings) - known):
        raise ValueError(f"training.vllm: {config_cls.__name__} has no {unknown}; its vLLM "
                         f"settings: {sorted(k[5:] for k in known if k.startswith('vllm_'))}")
    return {"use_vllm": True, **settings}


def _resume_point(trainer_dir: Path, fingerprint: dict, keys: set[str],
                  snapshot_every: int, max_steps: int, shards: bool = False) -> Path | None:
    """The last whole Trainer checkpoint of an interrupted attempt at the same run, if any.

    `fingerprint` (run spec, inputs, task) is kept beside the checkpoints: a checkpoint left
    by a run with other settings is removed instead of being resumed. Checkpoints and bf16
    snapshots are checked by their content (`keys`: the model's tensors): a damaged one is
    removed, with a line naming it, and the run goes on from the checkpoint before it (the
    Trainer rotates that one away only after the next is written), or from the start. A
    snapshot is written again only by training its step again: a damaged one drops the
    checkpoints after it. `shards`: the run is sharded (its checkpoints are FSDP's files)."""
    stamp = trainer_dir / "run.json"
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    if trainer_dir.exists() and (not stamp.exists() or stamp.read_text() != text):
        shutil.rmtree(trainer_dir)
    snapshots = trainer_dir / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    stamp.write_text(text)
    for leftover in [*trainer_dir.glob("*.tmp"), *snapshots.glob("*.tmp")]:
        remove(leftover)  # written by a killed attempt, never renamed into place
    while (last := get_last_checkpoint(str(trainer_dir))) is not None:
        last = Path(last)
        damage = _checkpoint_damage(last, keys, shards)
        step = _step_of(last)
        if damage is None:
            damage = _snapshots_damage(snapshots, keys, snapshot_every, min(step, max_steps - 1))
        if damage is None:
            for later in snapshots.glob("step-*"):
                if _step_of(later) > step:
                    remove(later)  # the resumed run writes it again
            return last
        _drop(last, damage)
    for snapshot in snapshots.glob("step-*"):
        remove(snapshot)
    return None


def _drop(folder: Path, damage: str) -> None:
    print(f"trainer checkpoint {folder} cannot be resumed ({damage}): removed it, the run "
          "goes on from the checkpoint before it or from the start", file=sys.stderr)
    remove(folder)


def _step_of(folder: Path) -> int:
    return int(folder.name.rpartition("-")[2])


def _checkpoint_damage(folder: Path, keys: set[str], shards: bool = False) -> str | None:
    """What makes a Trainer checkpoint unusable for an exact resume, or None: its state, its
    weights (`keys`, whole), the optimizer, scheduler and RNG states (a sharded run's: FSDP's
    whole model and optimizer, which the Trainer resumes from). Each is read as far as a
    truncation shows (safetensors header, zip directory): a check costs no full read."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        if state.get("global_step") != _step_of(folder):
            return f"trainer_state.json is at step {state.get('global_step')}"
    except (OSError, ValueError) as error:
        return f"trainer_state.json: {error}"
    try:
        check_weights(folder, keys=keys)
    except ValueError as error:
        return str(error)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name in OptimizerStateCallback.references(world if shards else 1):
        try:  # the optimizer-state log's references (opdgeo.callbacks)
            with safe_open(str(folder / name), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            return f"{name}: {error}"
    rng = ["rng_state.pth"] if world == 1 else [f"rng_state_{i}.pth" for i in range(world)]
    states = ["pytorch_model_fsdp.bin", "optimizer.bin"] if shards else ["optimizer.pt"]
    for name in (*states, "scheduler.pt", *rng):
        try:
            with zipfile.ZipFile(folder / name) as archive:  # torch.save writes a zip archive
                if not any(n.endswith("/data.pkl") for n in archive.namelist()):
                    return f"{name}: no pickled object in it"
        except (zipfile.BadZipFile, OSError) as error:
            return f"{name}: {error}"
    return None


def _snapshots_damage(snapshots: Path, keys: set[str], every: int, step: int) -> str | None:
    """Check the snapshots due up to `step` by content; remove a damaged or missing one's
    successors too and say which (the steps to train again start before it), else None."""
    for due in range(every, step + 1, every):
        folder = snapshots / f"step-{due}"
        try:
            json.loads((folder / "config.json").read_text())
            check_weights(folder, keys=keys)
        except (OSError, ValueError) as error:
            for later in snapshots.glob("step-*"):
                if _step_of(later) >= due:
                    remove(later)
            return f"its snapshot {folder} is damaged or missing ({error})"
    return None


def _load_weights(model, checkpoint: Path) -> None:
    """The weights of a Trainer checkpoint, into `model`: a run resumed at its last step has
    no step left to train (the Trainer would train one past the end)."""
    device = next(model.parameters()).device
    for file in weight_files(checkpoint):
        model.load_state_dict(load_file(str(file), device=str(device)), strict=False)


# ---------------------------------------------------------------- base models


def train_base(name: str, spec: dict, task: dict, out_dir: Path, device: str):
    """Build a tiny model and train it on the task's ground truth until it scores `stop_at`.

    Writes `out_dir/final` (bf16 checkpoint), `train_log.csv`, `scores.csv` and `score.json`.
    Fails, leaving no checkpoint, when the final score is outside [require_min, require_max].
    """
    out_dir = Path(out_dir)
    build, train = spec["build"], spec["train"]
    set_seed(train["seed"])
    vision = build["arch"] in VISION_ARCHITECTURES
    tokenizer = image_text_processor() if vision else character_tokenizer()
    dims = {k: v for k, v in build.items() if k != "arch"}
    model = build_model(build["arch"], tokenizer, train["seed"], **dims).to(device)
    task = make_task(task)
    # Epochs cycle; pictures cost time to draw and to store, so image tasks cycle sooner.
    n_train = min(train["max_steps"] * train["batch_size"], 4_096 if vision else 20_000)
    train_examples = with_privileged_prompts(task, task.train_examples(n_train, train["seed"]),
                                             train["privileged"], train["seed"])
    eval_examples = task.eval_examples()
    check_images(train_examples, vision, name)
    dataset = Dataset.from_list([sft_row(e, e.answer) for e in train_examples])
    out_dir.mkdir(parents=True, exist_ok=True)
    scores_log = out_dir / "scores.csv"
    scores_log.write_text("step,exact_match\n")
    stopper = EarlyStopOnScoreCallback(
        lambda m: exact_match(m, tokenizer, eval_examples, task),
        train["eval_every"], train["stop_at"], scores_log,
    )
    args = _trainer_args(
        SFTConfig, out_dir, steps=train["max_steps"], batch_size=train["batch_size"],
        optimizer="adamw",
        opt={"learning_rate": train["learning_rate"], "adam_beta2": train["adam_beta2"]},
        seed=train["seed"], device=device, max_length=None, completion_only_loss=True,
        packing=False, eos_token=text_tokenizer(tokenizer).eos_token,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer,
                         callbacks=[NonFiniteGuardCallback(),
                                    CSVLogCallback(out_dir / "train_log.csv"), stopper,
                                    *progress_callbacks()])
    trainer.train()
    final = stopper.final
    if not train["require_min"] <= final <= train["require_max"]:
        raise RuntimeError(
            f"model {name} ended at held-out exact match {final:.3f} after "
            f"{trainer.state.global_step} steps, outside the required range "
            f"[{train['require_min']}, {train['require_max']}]. Give it more steps "
            f"(models.{name}.train.max_steps), another learning rate, or widen the range."
        )
    save_checkpoint(model, tokenizer, out_dir / "final", point="model.final-save")
    with atomic(out_dir / "score.json", "model.score") as tmp:
        tmp.write_text(json.dumps(
            {"model": name, "exact_match": final, "steps": trainer.state.global_step}) + "\n")
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)


def with_privileged_prompts(task, examples: list[Example], share: float, seed: int):
    """A seeded `share` of the examples with their privileged context in the prompt (as a
    self-distillation teacher reads it), so that a model learns to use the context."""
    if not share:
        return examples
    rng = random.Random(f"privileged-{seed}")
    return [replace(e, prompt=task.privileged_prompt(e.prompt, e.context))
            if rng.random() < share else e for e in examples]


def sft_row(example: Example, completion: str) -> dict:
    """A prompt-completion row for SFTTrainer; with an image, the completion is an assistant
    message (TRL's vision-language collator renders both through the chat template, which
    ends an assistant turn with end-of-sequence)."""
    if example.image is None:
        return {"prompt": example.prompt, "completion": completion}
    return {"prompt": example.prompt, "image": example.image,
            "completion": [{"role": "assistant", "content": completion}]}


def prompt_row(example: Example, **extra) -> dict:
    """A prompt-only row for DistillationTrainer and GRPOTrainer (which pass `image` on)."""
    image = {"image": example.image} if example.image is not None else {}
    return {"prompt": example.prompt, **image, **extra}


def check_images(examples: list[Example], vision: bool, model: str):
    """A task with images needs a vision-language model, and the reverse."""
    has_images = bool(examples) and examples[0].image is not None
    if has_images != vision:
        raise ValueError(
            f"{model}: the task's prompts {'come' if has_images else 'do not come'} with "
            f"images, but the model {'is not' if has_images else 'is'} a vision-language "
            f"model. Pair image tasks (kind squares, or a data set with `image`) with "
            f"architectures {VISION_ARCHITECTURES}, text tasks with language models."
        )


# ---------------------------------------------------------------- runs


@dataclass
class Setup:
    """What a trainer builder is handed: the run, its models and prompts (rendered for the
    student), and the settings and callbacks every trainer of a run shares."""

    spec: RunSpec
    source: str
    device: str
    task: Any  # the task (opdgeo.task.make_task): its verifier and completion length
    model: Any
    tokenizer: Any
    teacher: Any  # the teacher model (kinds that need one), None otherwise
    teacher_tokenizer: Any
    prompts: list[Example]
    out_dir: Path
    callbacks: list
    common: dict  # _trainer_args's settings shared by every trainer

    @property
    def training(self) -> dict:
        return self.spec.training

    def args(self, config_cls, **extra):
        return _trainer_args(config_cls, self.out_dir, **self.common, **extra)


def distillation_trainer(run: Setup):
    """OPD (and masked OPD): TRL's DistillationTrainer with the study's losses."""
    return OPDTrainer(model=run.model, teacher_model=run.teacher, args=_distillation_args(run),
                      train_dataset=_rollout_rows(run, [{}] * len(run.prompts)),
                      processing_class=run.tokenizer, callbacks=run.callbacks,
                      loss=run.training["loss"], topk=run.training["topk"],
                      kl_clip=run.training["kl_clip"])


def self_distillation_trainer(run: Setup):
    """OPSD and its OP2SD control: OPD's rollouts, batches and divergence, scored by the
    student's own model (the frozen source; training.self_teacher: current, its current
    weights) reading a privileged context in its prompt: the example's reference solution
    (OPSD), or that of another example (OP2SD, a fixed derangement)."""
    if images_of(run.prompts) is not None:
        raise ValueError(f"run {run.spec.name}: self-distillation takes text prompts only")
    whose = RUN_KINDS[run.spec.kind].privileged
    contexts = privileged_contexts(run.prompts, whose, run.spec.seed)
    teacher_prompts = [run.task.privileged_prompt(e.prompt, c)
                       for e, c in zip(run.prompts, contexts, strict=True)]
    check_context_length(run.tokenizer, run.model, run.prompts, teacher_prompts,
                         run.task.max_new_tokens)
    teacher = None if run.training["self_teacher"] == "current" else load_model(
        run.source, run.device, generation_dtype(run.device))
    rows = _rollout_rows(run, [{TEACHER_PROMPT: t} for t in teacher_prompts])
    return OPSDTrainer(model=run.model, teacher_model=teacher, args=_distillation_args(run),
                       train_dataset=rows, processing_class=run.tokenizer,
                       callbacks=run.callbacks, loss=run.training["loss"],
                       topk=run.training["topk"], kl_clip=run.training["kl_clip"])


def _distillation_args(run: Setup):
    training, loss = run.training, run.training["loss"]
    return run.args(DistillationConfig, beta=TRL_BETA.get(loss, training["beta"]),
                    temperature=training["temperature"],
                    max_completion_length=run.task.max_new_tokens, top_k=0, top_p=1.0,
                    **_generation_backend(training, DistillationConfig))


def _rollout_rows(run: Setup, extra: list[dict]) -> Dataset:
    """DistillationTrainer draws one rollout per prompt: listing each prompt n times makes an
    epoch hold n rollouts of every prompt (the paper's n = 4 samples per prompt)."""
    n = run.training["generations_per_prompt"]
    return Dataset.from_list([prompt_row(e, **x) for e, x in zip(run.prompts, extra, strict=True)
                              for _ in range(n)])


def check_context_length(tokenizer, model, prompts: list[Example], teacher_prompts: list,
                         completion_tokens: int):
    """Every privileged prompt, with a completion after it, fits the model's context."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is None:
        return
    texts, special = render_prompts(tokenizer, teacher_prompts)
    lengths = [len(ids) for ids in text_tokenizer(tokenizer)(
        texts, add_special_tokens=special)["input_ids"]]
    for i, (example, length) in enumerate(zip(prompts, lengths, strict=True)):
        if length + completion_tokens > limit:
            where = f"data set row {example.row}" if example.row is not None \
                else f"training prompt {i}"
            raise ValueError(
                f"{where}: the self-distillation teacher's prompt with its privileged context is "
                f"{length} tokens, {length + completion_tokens} with the {completion_tokens} "
                f"completion tokens, over the model's context of {limit}: drop the row, shorten "
                "its solution, or lower task.max_new_tokens")


def sft_trainer(run: Setup):
    """Offline distillation: SFTTrainer on completions the teacher samples once, up front.
    Sequences are never truncated: a completion ends within the task's completion length."""
    training = run.training
    n = training["steps"] * training["batch_size"]
    chosen = (run.prompts * (n // len(run.prompts) + 1))[:n]
    torch.manual_seed(run.spec.seed)
    completions = generate(run.teacher, run.teacher_tokenizer, [e.prompt for e in chosen],
                           run.task.max_new_tokens, sample=True,
                           temperature=training["temperature"], images=images_of(chosen))
    dataset = Dataset.from_list([sft_row(e, c) for e, c in zip(chosen, completions, strict=True)])
    args = run.args(SFTConfig, max_length=None, completion_only_loss=True, packing=False,
                    eos_token=text_tokenizer(run.tokenizer).eos_token)
    return SFTTrainer(model=run.model, args=args, train_dataset=dataset,
                      processing_class=run.tokenizer, callbacks=run.callbacks)


def grpo_trainer(run: Setup):
    """RLVR: GRPOTrainer with the task's verifier as the reward, no KL term."""
    training = run.training
    dataset = Dataset.from_list([prompt_row(e, answer=e.answer) for e in run.prompts])
    args = run.args(GRPOConfig, num_generations=training["generations_per_prompt"],
                    max_completion_length=run.task.max_new_tokens,
                    temperature=training["temperature"], beta=0.0, top_k=0, top_p=1.0,
                    **_generation_backend(training, GRPOConfig))
    return GRPOTrainer(model=run.model, reward_funcs=verifier_reward(run.task), args=args,
                       train_dataset=dataset, processing_class=run.tokenizer,
                       callbacks=run.callbacks)


# The builder of each trainer a run kind names (opdgeo.kinds.RunKind.trainer).
BUILDERS = {
    OPDTrainer.__name__: distillation_trainer,
    OPSDTrainer.__name__: self_distillation_trainer,
    SFTTrainer.__name__: sft_trainer,
    GRPOTrainer.__name__: grpo_trainer,
}


def train_run(spec: RunSpec, source: str, teacher: str | None, task: dict, out_dir: Path,
              device: str, mask_path: Path | None = None):
    """Train one run from `source`: final/, fp32/, checkpoints/step-N/, train_log.csv."""
    build = BUILDERS.get(RUN_KINDS[spec.kind].trainer)
    if build is None:
        raise ValueError(f"run {spec.name}: kind {spec.kind!r} is not trained")
    out_dir = Path(out_dir)
    set_seed(spec.seed)
    tokenizer = load_tokenizer(source)
    model = load_model(source, device)
    teacher_model = teacher_tokenizer = None
    if teacher is not None:
        teacher_tokenizer = load_tokenizer(teacher)
        check_same_vocabulary(tokenizer, teacher_tokenizer, source, teacher)
        # A teacher only runs forward passes: bf16 on a GPU (fp32 on a CPU, as evaluation).
        teacher_model = load_model(teacher, device, generation_dtype(device))
    task_spec, task = task, make_task(task)
    prompts = task.train_examples(spec.training["prompts"], spec.seed)
    random.Random(spec.name).shuffle(prompts)
    # `accelerate launch` starts one process per GPU: only the first one writes files.
    main_process = int(os.environ.get("RANK", "0")) == 0
    shards = sharded(spec.training)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Everything an interrupted attempt must keep lives in trainer/, which is no Snakemake
    # output (Snakemake deletes a failed job's outputs): the Trainer's last checkpoint, the
    # bf16 snapshots and the training log so far. A rerun resumes from there; the end moves
    # the snapshots and the log into place.
    names = list(stored_once(model.state_dict()))  # the tensors a checkpoint stores
    keys = set(saved_state(model, {name: model.state_dict()[name] for name in names}))
    resume = _resume_point(out_dir / "trainer", {
        "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__}, "source": str(source),
        "teacher": str(teacher), "task": task_spec, "mask": str(mask_path),
    }, keys, spec.training["save_every"], spec.training["steps"], shards)
    # training.report_to's TensorBoard writes beside the run (the Trainer's own folder is
    # removed at the end): `tensorboard --logdir results/runs` shows every run, live.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out_dir / "tensorboard")
    callbacks = _callbacks(model, tokenizer, names, mask_path, out_dir, spec, main_process)
    clock = WallClock.from_slurm()  # a SLURM job's wall time: stop at a checkpoint before it
    wall_time = WallTimeCallback(clock) if clock else None
    callbacks += [wall_time] if wall_time else []
    check_images(prompts, hasattr(tokenizer, "image_processor"), source)
    prompts = [replace(e, prompt=model_prompt(tokenizer, e.prompt)) for e in prompts]
    common = dict(steps=spec.training["steps"], batch_size=spec.training["batch_size"],
                  optimizer=spec.optimizer, opt=spec.training["optimizers"][spec.optimizer],
                  seed=spec.seed, device=device, training=spec.training, resumable=True)
    trainer = build(Setup(spec, str(source), device, task, model, tokenizer, teacher_model,
                          teacher_tokenizer, prompts, out_dir, callbacks, common))
    if resume is not None and _step_of(resume) >= spec.training["steps"]:
        _load_weights(model, resume)  # killed after its last checkpoint: nothing to train
    else:
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    trainer.accelerator.wait_for_everyone()
    if wall_time and wall_time.stopped:  # the job's next attempt resumes from the checkpoint
        if main_process:
            end_attempt(f"run {spec.name}: step {trainer.state.global_step} of "
                        f"{spec.training['steps']}")
        return
    state = gathered_state(trainer.model, names)
    if main_process:
        _finish(model, tokenizer, spec, out_dir, keys, state)
    trainer.accelerator.wait_for_everyone()  # the job ends when its outputs are in place


def gathered_state(model, names: list[str]) -> dict | None:
    """The tensors `names` of the model's weights on the first process, None on the others.
    A sharded model's are gathered from every process (each must call this, at the same
    point), into the first one's host memory."""
    from torch.distributed.fsdp import FSDPModule

    first = int(os.environ.get("RANK", "0")) == 0
    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    else:
        state = model.state_dict() if first else {}
    return {name: state[name] for name in names} if first else None


def save_gathered(model, tokenizer, names: list[str], path: Path, point: str, **options):
    """save_checkpoint of a model that may be sharded: called by every process, written by
    the first."""
    state = gathered_state(model, names)
    if state is not None:
        save_checkpoint(model, tokenizer, path, point=point, state=state, **options)


def _finish(model, tokenizer, spec: RunSpec, out_dir: Path, keys: set[str], state: dict):
    """Move a trained run's outputs into place: final/, fp32/, checkpoints/, train_log.csv,
    optimizer_state.csv; every snapshot checked first. `state`: the trained weights."""
    every, steps = spec.training["save_every"], spec.training["steps"]
    snapshots = out_dir / "trainer" / "snapshots"
    if damage := _snapshots_damage(snapshots, keys, every, (steps - 1) // every * every):
        raise RuntimeError(f"{damage}: removed it; run the job again to train its steps again")
    # fp32/ always exists (a declared output); it holds the master weights when kept.
    (out_dir / "fp32").mkdir(exist_ok=True)
    fp32 = out_dir / "fp32" / "model.safetensors" if spec.training["keep_fp32"] else None
    save_checkpoint(model, tokenizer, out_dir / "final", fp32_weights=fp32,
                    point="train.final-save", state=state)
    # Into place as hard links (no copy of the weights), the trainer/ folder removed last:
    # a kill before that leaves it whole for the rerun. checkpoints/ is a declared output,
    # even when no snapshot was due.
    for kept, output in (("snapshots", "checkpoints"), ("train_log.csv", "train_log.csv"),
                         ("optimizer_state.csv", "optimizer_state.csv")):
        with atomic(out_dir / output, "train.promote") as tmp:
            link(out_dir / "trainer" / kept, tmp)
    shutil.rmtree(out_dir / "trainer")


def verifier_reward(task):
    """RLVR reward: the task's verifier (1 when the completion is exactly the answer)."""

    def exact_match_reward(prompts, completions, answer, **kwargs) -> list[float]:
        # Conversational prompts (a chat template) get completions as assistant messages.
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [task.score(c, a) for c, a in zip(texts, answer, strict=True)]

    return exact_match_reward


def _callbacks(model, tokenizer, names: list[str], mask_path, out_dir: Path, spec: RunSpec,
               main_process: bool):
    """Every run's callbacks: NaN guard, data order, crash points, bf16 snapshots and
    optimizer state diagnostics (empty for SGD), which a sharded model's processes compute
    together; the training log and progress on the first process, which writes every file
    (kept in trainer/ until the end); the gradient mask of a masked run."""
    every = max(spec.training["steps"] // 20, 1)
    trainer_dir = out_dir / "trainer"
    callbacks = [
        NonFiniteGuardCallback(), DataOrderCallback(), CrashPointCallback(),
        SnapshotCallback(lambda path, trained: save_gathered(trained, tokenizer, names, path,
                                                             "train.snapshot"),
                         spec.training["save_every"], trainer_dir / "snapshots"),
    ]
    if main_process or sharded(spec.training):
        callbacks.append(OptimizerStateCallback(trainer_dir / "optimizer_state.csv", spec.name,
                                                every, writes=main_process))
    if main_process:
        callbacks += [CSVLogCallback(trainer_dir / "train_log.csv", run=spec.name),
                      *progress_callbacks()]
    if mask_path is not None:
        callbacks.append(GradientMaskCallback.from_file(mask_path, model))
    return callbacks
