"""What each job needs, from the sizes and dtypes of the models it loads.

The Snakefile asks these functions for every job's `mem_mb`, `runtime` and GPU memory, and
`opdgeo plan` prints them beside the study's bill. Sizes come from a checkpoint's own files
(config.json and the safetensors headers: no weights read, no torch), from the Hugging Face
cache for a hub id, or from `PAPER_MODELS` (config/hub_models.yaml) for the paper's hub ids
on a machine that has not downloaded them. Memory is an estimate of the peak (weights,
gradients, optimizer state, logits, generation cache) plus `HOST_OVERHEAD`; throughputs are
the config's stated assumptions (`cost`), never measurements.
"""

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from opdgeo.hub_models import HubModel, hub_models, kv_per_token, tensor_sizes

GiB = 1024**3
# Python, torch, the CUDA context, tokenizers and data of a job, beside its models.
HOST_OVERHEAD = 3 * GiB
# The model size at which the config states generation throughputs.
REFERENCE_PARAMS = 1.5e9
# vLLM's own default share of the GPU's memory.
VLLM_GPU_MEMORY_UTILIZATION = 0.9
# Prompts of a benchmark whose `rows` the config does not state.
DEFAULT_ROWS = 1000
# A retried job (Snakemake's `attempt`) asks for this much more each time.
RETRY_GROWTH = 1.5


@dataclass(frozen=True)
class ModelSize:
    params: int  # parameters, a tied head counted once
    largest: int  # elements of the largest tensor
    kv_per_token: int  # key and value elements per generated token, all layers together
    vocab: int


def hub_model_size(model: HubModel) -> ModelSize:
    """A hub model's size from its config.json keys (opdgeo.hub_models)."""
    sizes = tensor_sizes(model)
    return ModelSize(sum(sizes), max(sizes), kv_per_token(model.text),
                     model.text["vocab_size"])


# The paper's hub models, for a machine that has not downloaded them (a folder or a warm cache
# wins).
PAPER_MODELS = {hub_id: hub_model_size(model) for hub_id, model in hub_models().items()
                if model.sized}


def safetensors_tensors(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, read from a safetensors file's header only."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {name: entry["shape"] for name, entry in header.items()}


def folder_size(folder: Path) -> ModelSize | None:
    """The size of a checkpoint folder from its files, or None without config and weights."""
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").exists() or not files:
        return None
    config = json.loads((folder / "config.json").read_text())
    text = {**config, **config.get("text_config", {})}
    shapes = [shape for f in files for shape in safetensors_tensors(f).values()]
    counts = [math.prod(shape) for shape in shapes]
    return ModelSize(sum(counts), max(counts), kv_per_token(text), text["vocab_size"])


def built_size(build: dict) -> ModelSize:
    """A model the pipeline builds (tiny, character vocabulary): its size from its settings."""
    h, layers, inner = build["hidden_size"], build["num_hidden_layers"], build["intermediate_size"]
    heads = build["num_attention_heads"]
    kv_dim = build.get("num_key_value_heads", heads) * (h // heads)
    vocab = 64  # characters, special and image tokens
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inner
    return ModelSize(2 * vocab * h + layers * per_layer, max(vocab * h, h * inner),
                     2 * layers * kv_dim, vocab)


def model_size(path: str, build: dict | None = None) -> ModelSize:
    """The size of a model given by its build settings, a folder or a hub id (`org/name` or
    `org/name@revision`)."""
    from opdgeo.config import split_reference

    if build is not None:
        return built_size(build)
    if Path(path).is_dir() and (size := folder_size(Path(path))):
        return size
    if not Path(path).exists():
        from huggingface_hub import try_to_load_from_cache

        name, revision = split_reference(path)
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        if isinstance(cached, str) and (size := folder_size(Path(cached).parent)):
            return size
        if name in PAPER_MODELS:
            return PAPER_MODELS[name]
    name, revision = split_reference(path)
    # a hub id names its revision (org/name@revision); anything else is a local folder
    fix = (f"download it first (hf download {name} --revision {revision})" if revision
           else f"put the checkpoint at {path}")
    raise ValueError(
        f"cannot size the jobs that load {path}: no config.json and safetensors weights there "
        f"or in the Hugging Face cache. {fix[0].upper()}{fix[1:]}, or set the jobs' mem_mb "
        f"and runtime in your profile (set-resources)")


@dataclass(frozen=True)
class Need:
    """A job's peak memory (bytes) on the host and on its GPU, and its runtime (minutes)."""

    host: int
    gpu: int
    minutes: float

    def on(self, device_is_gpu: bool) -> "Need":
        """On a CPU job, what the GPU would hold is on the host."""
        if device_is_gpu:
            return self
        return Need(self.host + self.gpu, 0, self.minutes)


def optimizer_bytes(optimizer: str, settings: dict, params: int) -> int:
    """fp32 state: AdamW's two moments; SGD's momentum buffer when it has one."""
    if optimizer == "adamw":
        return 8 * params
    return 4 * params if settings.get("momentum", 0.0) else 0


def sequence_tokens(task: dict, cost: dict) -> int:
    return cost["prompt_tokens"] + task_max_new_tokens(task)


def task_max_new_tokens(task: dict) -> int:
    """The completion length of a task (the synthetic tasks' answers are a few tokens)."""
    return task.get("max_new_tokens", 16)


def generation_seconds(tokens: int, model: ModelSize, engine: str, cost: dict) -> float:
    """Generation time at the config's assumed rate for a 1.5B model, slower in proportion
    to the model's parameters (decoding reads every weight for each token)."""
    rate = cost["generate_tokens_per_second"][engine] * REFERENCE_PARAMS / model.params
    return tokens / rate


def train_need(student: ModelSize, teacher: ModelSize | None, training: dict,
               optimizer: str, task: dict, cost: dict) -> Need:
    """fp32 master weights, gradients and optimizer state of the student, the teacher in
    bf16, and the logits of one micro-batch (fp32 student, bf16 teacher, and one fp32 copy for
    the loss); rollouts at the config's generation throughput, updates at its training one."""
    p = student.params
    settings = training["optimizers"][optimizer]
    teacher_bytes = 2 * teacher.params if teacher else 0
    seq = sequence_tokens(task, cost)
    logits = logits_bytes(student, training, task, cost)
    gpu = 8 * p + optimizer_bytes(optimizer, settings, p) + teacher_bytes + logits
    # Loading reads one copy of each model on the host; the bf16 copy of each save is one more.
    host = HOST_OVERHEAD + 4 * p + teacher_bytes + 2 * p
    tokens = training["steps"] * training["batch_size"] * task_max_new_tokens(task)
    engine = "vllm" if training.get("use_vllm") else "hf"
    seconds = generation_seconds(tokens, student, engine, cost)
    # Forward and backward of the student, forward of the teacher: 6 and 2 FLOPs per parameter.
    flops = training["steps"] * training["batch_size"] * seq
    flops *= 6 * p + 2 * (teacher.params if teacher else 0)
    return Need(host, gpu, (seconds + flops / cost["gpu"]["flops"]) / 60)


def logits_bytes(student: ModelSize, training: dict, task: dict, cost: dict) -> int:
    """The logits of one micro-batch: fp32 student, bf16 teacher, one fp32 copy for the loss."""
    micro = training.get("micro_batch_size") or training["batch_size"]
    return micro * sequence_tokens(task, cost) * student.vocab * (4 + 2 + 4)


def sharded_gpu(need: Need, logits: int, gpus: int) -> float:
    """GPU memory per GPU with the models' weights, gradients and optimizer state sharded over
    `gpus` (FSDP / ZeRO-3); each GPU still holds its own micro-batch's logits."""
    return (need.gpu - logits) / gpus + logits


def evaluation_tokens(prompts: int, k: int, task: dict) -> int:
    """Generated tokens of one checkpoint's evaluation at most: greedy, and k samples each."""
    return prompts * (1 + k) * task_max_new_tokens(task)


def eval_prompts(task: dict) -> int:
    """Held-out prompts of a task: the synthetic tasks' `eval_prompts`, or the benchmarks'
    `rows` (DEFAULT_ROWS for a benchmark that does not state them)."""
    if "eval" in task:
        return sum(spec.get("rows", DEFAULT_ROWS) for spec in task["eval"].values())
    return task.get("eval_prompts", 256)


def evaluation_need(model: ModelSize, evaluation: dict, task: dict, checkpoints: int,
                    on_gpu: bool, cost: dict) -> Need:
    """The checkpoint and the generation cache of one batch on transformers (bf16 on a GPU,
    fp32 on a CPU: opdgeo.evaluate.generation_dtype); vLLM takes its share of the GPU whatever
    the model. `auto` is sized for the larger of the two engines' memory and time."""
    seq = sequence_tokens(task, cost)
    width = 2 if on_gpu else 4
    cache = evaluation["batch_size"] * seq * model.kv_per_token * width
    hf_gpu = width * model.params + cache + evaluation["batch_size"] * model.vocab * 4
    share = evaluation["vllm"].get("gpu_memory_utilization", VLLM_GPU_MEMORY_UTILIZATION)
    vllm_gpu = int(share * cost["gpu"]["memory_gb"] * GiB)
    engines = {"auto": ["hf", "vllm"] if on_gpu else ["hf"]}.get(evaluation["engine"],
                                                               [evaluation["engine"]])
    tokens = checkpoints * evaluation_tokens(eval_prompts(task), evaluation["k"], task)
    seconds = max(generation_seconds(tokens, model, e, cost) for e in engines)
    gpu = max(hf_gpu if e == "hf" else vllm_gpu for e in engines)
    return Need(HOST_OVERHEAD + 4 * model.params, gpu, seconds / 60).on(on_gpu)


# An intermediate checkpoint's analysis (opdgeo.delta.analyze.TRAJECTORY_NOTE) and a source's
# decomposition, each as a share of one full analysis: measured 0.15-0.22 and 0.22-0.25
# (docs/results.md), asked with a margin because a job past its time limit is killed.
TRAJECTORY_CHECKPOINT_SHARE = 0.3
DECOMPOSITION_SHARE = 0.3


def analysis_need(model: ModelSize, checkpoints: int, cost: dict,
                  share: float = 1.0) -> Need:
    """The analysis streams tensor by tensor: the largest one as source, trained and fp32
    master weights, its delta, and an SVD's factors and workspace, in fp32. `checkpoints`:
    the final one, a full analysis, and the rest at TRAJECTORY_CHECKPOINT_SHARE; `share`: the
    whole job's time as a share of that (DECOMPOSITION_SHARE for a source's decomposition)."""
    working = 8 * 4 * model.largest
    analyses = share * (1 + TRAJECTORY_CHECKPOINT_SHARE * (checkpoints - 1))
    seconds = analyses * model.params / cost["analysis_params_per_second"]
    return Need(HOST_OVERHEAD + working, 0, seconds / 60)


def mask_need(model: ModelSize) -> Need:
    """A mask is one bit per parameter; the largest tensor as source, trained and delta."""
    return Need(HOST_OVERHEAD + model.params // 8 + 3 * 4 * model.largest, 0, 5.0)


def job_resources(need: Need, attempt: int, floor_minutes: int = 10) -> dict:
    """Snakemake resources (mem_mb on the host, runtime in minutes), grown on each retry."""
    growth = RETRY_GROWTH ** (attempt - 1)
    return {"mem_mb": math.ceil(need.host * growth / 2**20),
            "runtime": max(floor_minutes, math.ceil(need.minutes * growth))}


# ---------------------------------------------------------------- partitions
# The site's partitions and their limits live in the SLURM profile's partition file
# (slurm/partitions.yaml, the executor plugin's own `slurm-partition-config` format). Every
# job is placed on one of them and its request cut to that partition's limits, on every
# attempt: a job longer than the wall time continues over several attempts instead
# (opdgeo.attempts), and one needing more memory than any node has is reported by `opdgeo
# plan`.
PARTITION_FILE = Path("slurm/partitions.yaml")


def site_partitions() -> list:
    """The partitions jobs go to: the file SNAKEMAKE_SLURM_PARTITIONS names (the executor
    plugin's own variable), else slurm/partitions.yaml under the working directory."""
    return read_partitions(Path(os.environ.get("SNAKEMAKE_SLURM_PARTITIONS", PARTITION_FILE)))


def read_partitions(path: Path = PARTITION_FILE) -> list:
    """The partitions of a partition file, read by the executor plugin's own reader (so that
    both read the same limits, in the same units: minutes, MB); none without the file."""
    if not Path(path).exists():
        return []
    from snakemake_executor_plugin_slurm.partitions import read_partition_file

    return read_partition_file(Path(path))


def choose_partition(partitions: list, gpus: int, request: dict):
    """The partition of a job asking for `gpus` GPUs: among those with enough GPUs per node (a
    CPU job: those without GPUs, if any), the first, in the file's order, whose limits hold the
    whole request, else the one with the longest wall time (the job then runs in several
    attempts)."""
    if gpus:
        fits = [p for p in partitions if p.limits.max_gpu >= gpus]
    else:
        fits = [p for p in partitions if not p.limits.max_gpu] or partitions
    if not fits:
        most = max((p.limits.max_gpu for p in partitions), default=0)
        raise ValueError(
            f"a job asks for {gpus} GPUs, but no partition of {PARTITION_FILE} has more than "
            f"{most} per node (max_gpu): lower training.gpus, or add the partition")
    whole = [p for p in fits if request["runtime"] <= p.limits.max_runtime
             and request["mem_mb"] <= p.limits.max_mem_mb]
    return whole[0] if whole else max(fits, key=lambda p: p.limits.max_runtime)


def place(need: Need, gpus: int, attempt: int, partitions: list,
          floor_minutes: int = 10) -> dict:
    """A job's Snakemake resources on its partition: `slurm_partition`, and `mem_mb` and
    `runtime` grown on a retry and cut to the partition's limits (without partitions, as
    job_resources gives them)."""
    request = job_resources(need, attempt, floor_minutes)
    if not partitions:
        return request
    partition = choose_partition(partitions, gpus, request)
    limits = partition.limits
    return {"slurm_partition": partition.name,
            "mem_mb": int(min(request["mem_mb"], limits.max_mem_mb)),
            "runtime": int(min(request["runtime"], limits.max_runtime))}


class Sizer:
    """Every job's need under one config: the Snakefile's resources and `opdgeo plan` read
    the same numbers. `on_gpu`: the config's GPU jobs (training, evaluation) have a GPU."""

    def __init__(self, config: dict, runs: dict, on_gpu: bool, assume: bool = False):
        """`assume`: a user's own checkpoint that is not there yet is sized from the facts
        config/hub_models.yaml assumes for it (a plan's estimate; jobs are never sized so)."""
        self.config, self.runs, self.on_gpu, self.assume = config, runs, on_gpu, assume
        self.cost = config["cost"]
        self.size = cache(self._size)
        self.unsized = []  # models that could not be sized, in the order they were asked for
        self.assumed = []  # models sized from assumed facts

    def _size(self, model: str) -> ModelSize | None:
        """The size of a model key's checkpoint (built, folder or hub id) or of a path; None,
        with a warning, when it cannot be sized."""
        from opdgeo.config import model_reference

        spec = self.config["models"].get(model, {"path": model})
        try:
            return model_size(model_reference(spec), spec.get("build"))
        except ValueError as error:
            facts = hub_models().get(spec.get("path"))
            if self.assume and facts is not None:
                self.assumed.append(model)
                return hub_model_size(facts)
            print(f"warning: {error}", file=sys.stderr)
            self.unsized.append(model)
            return None

    def teacher(self, run: str) -> str | None:
        """The teacher a run's job loads (GRPO's reward needs none; self-distillation's is a
        frozen copy of the source, unless it is the current weights)."""
        from opdgeo.kinds import RUN_KINDS

        spec, kind = self.runs[run], RUN_KINDS[self.runs[run].kind]
        if kind.privileged:
            return spec.source if spec.training["self_teacher"] == "source" else None
        return spec.teacher if spec.teacher and kind.needs_teacher else None

    def checkpoints(self, run: str) -> int:
        """Checkpoints of a trained run: every `save_every` steps and the final one."""
        return len(self.runs[run].checkpoint_steps()) + 1

    def gpus(self, run: str) -> int:
        """GPUs of a run's training job: `training.gpus` when the config's jobs have GPUs."""
        return self.runs[run].training["gpus"] if self.on_gpu else 0

    def sharded(self, run: str) -> bool:
        """Whether a run's training job shards its models over its GPUs (training.sharding)."""
        return self.runs[run].training["sharding"] == "fsdp" and self.gpus(run) > 1

    def train(self, run: str, sharded: bool | None = None) -> Need | None:
        """The whole job: one process per GPU (`accelerate launch`), each holding its own copy
        of the models on the host, sharing the steps between them; its GPU memory per GPU,
        with the models sharded over the GPUs where the run is (or `sharded` says)."""
        spec, teacher = self.runs[run], self.teacher(run)
        student = self.size(spec.source)
        teacher_size = self.size(teacher) if teacher else None
        if student is None or (teacher and teacher_size is None):
            return None
        need = train_need(student, teacher_size, spec.training, spec.optimizer, spec.task,
                          self.cost).on(self.on_gpu)
        processes = max(self.gpus(run), 1)
        gpu = need.gpu
        if self.sharded(run) if sharded is None else sharded:
            gpu = sharded_gpu(need, self.logits(run), processes)
        return Need(need.host * processes, int(gpu), need.minutes / processes)

    def logits(self, run: str) -> int | None:
        spec = self.runs[run]
        student = self.size(spec.source)
        return None if student is None else logits_bytes(student, spec.training, spec.task,
                                                         self.cost)

    def train_model(self, key: str) -> Need:
        """A base model the pipeline builds and trains on the ground truth (no teacher)."""
        from opdgeo.config import model_task

        train = self.config["models"][key]["train"]
        training = {"steps": train["max_steps"], "batch_size": train["batch_size"],
                    "optimizers": {"adamw": {}}}
        need = train_need(self.size(key), None, training, "adamw",
                          model_task(self.config, key), self.cost)
        return need.on(self.on_gpu)

    def _evaluation(self, model: str, task: dict, checkpoints: int) -> Need | None:
        size = self.size(model)
        if size is None:
            return None
        return evaluation_need(size, self.config["evaluation"], task, checkpoints, self.on_gpu,
                               self.cost)

    def evaluate_model(self, key: str) -> Need | None:
        from opdgeo.config import model_task

        return self._evaluation(key, model_task(self.config, key), 1)

    def evaluate_run(self, run: str) -> Need | None:
        spec = self.runs[run]
        return self._evaluation(spec.source, spec.task, len(spec.evaluated_steps()) + 1)

    def analysis(self, run: str, trajectory: bool) -> Need | None:
        size = self.size(self.runs[run].source)
        if size is None:
            return None
        return analysis_need(size, self.checkpoints(run) if trajectory else 1, self.cost)

    def decomposition(self, run: str) -> Need | None:
        """The decomposition of a run's source, which every analysis on that source reads."""
        size = self.size(self.runs[run].source)
        return None if size is None else analysis_need(size, 1, self.cost, DECOMPOSITION_SHARE)

    def mask(self, run: str) -> Need | None:
        """A mask or an overlap job: a run's checkpoint against its source, tensor by tensor."""
        size = self.size(self.runs[run].source)
        return None if size is None else mask_need(size)
