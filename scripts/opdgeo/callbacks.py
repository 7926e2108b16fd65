"""Trainer callbacks: training log, snapshots, NaN guard, early stop, gradient masks, AdamW state.

TRL's trainers are extended here, never forked: each concern is a `TrainerCallback`.
"""

import csv
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import TrainerCallback

from opdgeo.crash import crash_point
from opdgeo.files import atomic
from opdgeo.masks import check_mask_matches_model, load_mask
from opdgeo.naming import classify
from opdgeo.progress import StepClock, on_terminal


class NonFiniteLossError(RuntimeError):
    pass


class CSVLogCallback(TrainerCallback):
    """One row per logging step: loss (OPD's is its divergence from the teacher, the reverse
    KL as configured), grad norm, lr, seconds per step, tokens per second, and the metrics
    TRL's on-policy trainers log (mean completion length, mean token entropy; empty where a
    trainer logs none); with `run`, the run's name first (the training-log table is collected
    from these). A resumed run keeps the rows up to the step it resumes from, so that the log
    holds every step. The same metrics reach `training.report_to`'s trackers, live."""

    FIELDS = ("step", "loss", "grad_norm", "learning_rate", "seconds_per_step", "tokens_per_second",
              "completion_length", "entropy")
    # TRL's names of the metrics the last FIELDS copy.
    TRL_METRICS = {"completion_length": "completions/mean_length", "entropy": "entropy"}

    def __init__(self, path: Path, run: str | None = None):
        self.path, self.run = Path(path), run
        self._last_time = None
        self._last_step = 0
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        start_csv(self.path, self._named(self.FIELDS, "run"), state.global_step)
        self._last_time, self._last_step = time.perf_counter(), state.global_step
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss = logs.get("loss")
        if loss is None:
            return
        now = time.perf_counter()
        steps = max(state.global_step - self._last_step, 1)
        tokens = state.num_input_tokens_seen - self._last_tokens
        elapsed = now - self._last_time
        row = (
            state.global_step,
            loss,
            logs.get("grad_norm", ""),
            logs.get("learning_rate", ""),
            elapsed / steps,
            tokens / elapsed if tokens > 0 else "",
            *(logs.get(name, "") for name in self.TRL_METRICS.values()),
        )
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(self._named(row, self.run))
        self._last_time, self._last_step = now, state.global_step
        self._last_tokens = state.num_input_tokens_seen


    def _named(self, row: tuple, run_cell) -> tuple:
        return row if self.run is None else (run_cell, *row)


def start_csv(path: Path, fields: tuple, step: int) -> None:
    """Begin a CSV log with a `step` column: anew, or (a run resumed at `step` > 0) with the
    rows of the steps up to `step`, so that the log holds every step once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if step > 0 and path.exists():
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        column = rows[0].index("step") if rows else 0
        kept = [row for row in rows[1:] if int(row[column]) <= step]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([fields, *kept])


class CrashPointCallback(TrainerCallback):
    """A training run's crash points (opdgeo.crash): the end of its first step, the step
    after its first checkpoint and after its first checkpoint past a pass over the data,
    and the checkpoint of its last step."""

    def __init__(self):
        self._after: dict[int, str] = {}  # step -> the point at that step's end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            crash_point("train.before-first-checkpoint")
        if point := self._after.get(state.global_step):
            crash_point(point)

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            crash_point("train.after-last-checkpoint")
        if "train.mid-run" not in self._after.values():
            self._after[state.global_step + 1] = "train.mid-run"
        if state.epoch >= 1 and "train.past-data-pass" not in self._after.values():
            self._after.setdefault(state.global_step + 1, "train.past-data-pass")


class ProgressLineCallback(TrainerCallback):
    """Steps done, s/step and time left in the job log, where the Trainer's bar is off."""

    def on_train_begin(self, args, state, control, **kwargs):
        self._clock = StepClock(state.max_steps, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if line := self._clock.line(state.global_step):
            print(line, flush=True)


def progress_callbacks() -> list[TrainerCallback]:
    """The Trainer's own bar on a terminal (see `disable_tqdm`), a line now and then in a log."""
    return [] if on_terminal() else [ProgressLineCallback()]


class NonFiniteGuardCallback(TrainerCallback):
    """Stop at the first NaN / inf loss, weight or logit, before a checkpoint can be written.

    Weights can stay finite and still be too large (a learning rate of 1e30): the logits of
    the next forward overflow, so they are checked as the output head computes them."""

    _hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def check_logits(module, inputs, logits):
            # one sum, not a mask: a mask of a real model's logits would cost gigabytes
            if not torch.isfinite(logits.sum(dtype=torch.float32)):
                self._fail("the model's logits became NaN or inf", state.global_step)

        head = model.get_output_embeddings() if model is not None else None
        if head is not None:
            self._hook = head.register_forward_hook(check_logits)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self._fail(f"loss is {loss}", state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Checked every step: once a weight is NaN the next rollout fails inside generate().
        if model is None:
            return
        finite = all(_local(p).isfinite().all() for p in model.parameters())
        if isinstance(model, FSDPModule):  # each process checks its shards; all stop together
            flag = torch.tensor([float(finite)], device=next(model.parameters()).device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item())
        if not finite:
            self._fail("a weight became NaN or inf", state.global_step)

    @staticmethod
    def _fail(what: str, step: int):
        raise NonFiniteLossError(
            f"{what} at step {step}: training diverged. Lower the learning rate or the "
            "gradient clipping norm (max_grad_norm) in the config."
        )


class DataOrderCallback(TrainerCallback):
    """Exact resume past the first pass over the prompts.

    TRL's DistillationTrainer and GRPOTrainer sample with `RepeatSampler`, which draws the
    order of every pass from one generator seeded once: a run resumed in a later pass starts
    a fresh sampler and would replay the first pass's order. Before each pass, the generator
    is replayed from its seed to that pass: the order of an uninterrupted run."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = _repeat_sampler(train_dataloader)
        if sampler is None or not sampler.shuffle or sampler.seed is None:
            return  # other samplers (SFT's) take the epoch from the Trainer themselves
        sampler.generator.manual_seed(sampler.seed)
        for _ in range(math.floor(state.epoch)):  # the passes before this one
            torch.randperm(sampler.num_samples, generator=sampler.generator)


def _repeat_sampler(loader):
    """The RepeatSampler under a (prepared, sharded) data loader, or None."""
    from trl.trainer.utils import RepeatSampler

    todo = [loader]
    while todo:
        item = todo.pop()
        if isinstance(item, RepeatSampler):
            return item
        todo += [getattr(item, name) for name in ("batch_sampler", "sampler")
                 if getattr(item, name, None) is not None]
    return None


class WallTimeCallback(TrainerCallback):
    """Stop at a Trainer checkpoint while the job's wall time still holds the save.

    After each step, unless the next step and a save (the longest of each seen in this
    attempt, twice over) end before the clock's margin, the Trainer saves its checkpoint and
    stops; `stopped` tells the caller to end the attempt (opdgeo.attempts.end_attempt) instead
    of saving the final checkpoint. Processes of one run decide together (the first one's
    clock), so that all of them save and stop at the same step."""

    def __init__(self, clock):
        self.clock, self.stopped = clock, False
        self._step_began = self._step_ended = None
        self._longest_step = self._longest_save = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_began = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        self._longest_step = max(self._longest_step, now - self._step_began)
        self._step_ended = now
        if state.global_step >= state.max_steps:
            return
        stop = not self.clock.room_for(2 * (self._longest_step + self._longest_save))
        if _agreed(stop):
            control.should_save = control.should_training_stop = True
            self.stopped = True

    def on_save(self, args, state, control, **kwargs):
        self._longest_save = max(self._longest_save, time.monotonic() - self._step_ended)


def _agreed(decision: bool) -> bool:
    """The first process's decision, in every process of a distributed run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return decision
    shared = [decision]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


class SnapshotCallback(TrainerCallback):
    """Save a bf16 checkpoint every `every` steps (the curves and trajectories read them):
    `save(folder, model)`, in every process (a sharded model's are gathered to be saved)."""

    def __init__(self, save, every: int, folder: Path):
        self.save, self.every, self.folder = save, every, Path(folder)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.save(self.folder / f"step-{state.global_step}", model)


class EarlyStopOnScoreCallback(TrainerCallback):
    """Evaluate every `every` steps; stop once the score reaches `stop_at`."""

    def __init__(self, score_fn, every: int, stop_at: float, log: Path):
        self.score_fn, self.every, self.stop_at, self.log = score_fn, every, stop_at, Path(log)
        self.history: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step < state.max_steps:
            return
        value = self.score_fn(model)
        self.history.append((state.global_step, value))
        with self.log.open("a") as f:
            f.write(f"{state.global_step},{value}\n")
        print(f"step {state.global_step}: held-out exact match {value:.3f}", flush=True)
        if value >= self.stop_at:
            control.should_training_stop = True

    @property
    def final(self) -> float:
        return self.history[-1][1] if self.history else float("nan")


# ---------------------------------------------------------------- masked training


class GradientMaskCallback(TrainerCallback):
    """Train only the coordinates inside a mask; the others stay bit-for-bit at their start.

    Two mechanisms, because one is not enough with AdamW:
    - a tensor hook zeroes the gradient outside the mask as autograd produces it, before it
      is accumulated into `.grad`, so clipping's norm and the optimizer's moments never see it;
    - after every optimizer step the coordinates outside the mask are written back, since
      decoupled weight decay would still move them.
    Both are float multiply-adds with a 0/1 mask in the parameter's dtype: on CPU, boolean
    masked_fill / masked_scatter over a scattered mask were 15-25x slower (branch-bound).
    Memory: two extra tensors per parameter (the 0/1 mask and the start values outside it),
    8 bytes per fp32 coordinate, half of AdamW's own state.
    A sharded (FSDP) parameter gets its gradient from the processes' reduce-scatter, not from
    autograd, so a tensor hook never sees it: its gradient shard is masked as it is stored
    (a linear reduction, so the same as masking the gradients it sums), with the mask and
    start values sharded as the parameter is.
    """

    def __init__(self, mask: dict, model):
        # Checked here, when the trainer is wired, so a wrong mask fails before any step.
        self.mask = check_mask_matches_model(mask, model)
        self.model = model
        self._frozen: list[tuple] = []  # (parameter, 0/1 inside, start values outside else 0)
        self._hooks: list = []

    @classmethod
    def from_file(cls, path, model) -> "GradientMaskCallback":
        try:
            return cls(load_mask(path), model)
        except ValueError as error:
            raise ValueError(f"mask {path}: {error}") from None

    def on_train_begin(self, args, state, control, **kwargs):
        # Set up here rather than in __init__: the trainer may have moved the model since.
        self._remove_hooks()
        params = dict(self.model.named_parameters())
        for name, inside in self.mask.items():
            param = params[name]
            inside = inside.to(param.device)
            if isinstance(param, DTensor):  # every process holds the whole mask: no traffic
                inside = distribute_tensor(inside, param.device_mesh, param.placements,
                                           src_data_rank=None)
            start_outside = torch.where(inside, 0.0, param.detach())
            inside = inside.to(param.dtype)
            self._frozen.append((param, inside, start_outside))
            if isinstance(param, DTensor):
                self._hooks.append(param.register_post_accumulate_grad_hook(
                    lambda p, inside=inside: p.grad.mul_(inside)))
            else:
                self._hooks.append(param.register_hook(lambda grad, inside=inside: grad * inside))

    def on_optimizer_step(self, args, state, control, **kwargs):
        # p * 1 + 0 keeps a coordinate inside; p * 0 + start restores one outside, exactly.
        with torch.no_grad():
            for param, inside, start_outside in self._frozen:
                param.mul_(inside).add_(start_outside)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()

    def _remove_hooks(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._frozen = [], []


# ---------------------------------------------------------------- AdamW state diagnostics


class OptimizerStateCallback(TrainerCallback):
    """AdamW state every `every` steps: first-moment alignment and second-moment spread.

    - first-moment cosines, over all parameters concatenated and per block, between exp_avg
      after this optimizer step and a reference (LAGS): the step before (`m1_cosine`; with
      beta1 = 0.9 it stays near 0.9 or above whatever the gradients do, since m_t keeps 0.9 of
      m_t-1), the logged step before (`m1_cosine_interval`, a lag of `every` steps) and the
      first logged step (`m1_cosine_first`, a fixed reference). None where the reference was
      not seen (the first step, an early stop's unplanned last step). A resumed run's rows
      are an uninterrupted run's: the references are kept in each Trainer checkpoint
      (REFERENCES) and the step before the first resumed one is the checkpoint's own state;
    - m2_cv: coefficient of variation std / mean of exp_avg_sq over coordinates.
    Both are streamed parameter by parameter in float64 sums. Memory: exp_avg is copied on the
    training device at the step before each logged step and dropped at the logged step (one
    model's worth, held for one step in `every`); the logged step's and the first logged
    step's copies are float32 in CPU memory (two models' worth).
    A sharded model's processes each sum over their own shards, and add up the sums; each
    keeps the references of its shards (REFERENCES per process). `writes`: this process
    writes the rows (the first one).
    Tidy rows: run, step, block ("all" overall), metric, value.
    """

    FIELDS = ("run", "step", "block", "metric", "value")
    # metric -> its reference: the step before, the logged step before, the first logged step
    LAGS = {"m1_cosine": "previous", "m1_cosine_interval": "logged", "m1_cosine_first": "first"}
    REFERENCES = "optimizer_references.safetensors"  # in each Trainer checkpoint

    def __init__(self, path, run: str, every: int, writes: bool = True):
        self.path, self.run, self.every = Path(path), run, max(int(every), 1)
        self.writes = writes
        self._previous: dict[int, torch.Tensor] = {}
        self._previous_step: int | None = None
        self._logged: dict[int, torch.Tensor] = {}  # exp_avg at the last logged step (CPU)
        self._first: dict[int, torch.Tensor] = {}  # at the first logged step (CPU)

    @classmethod
    def references(cls, shards: int = 1) -> list[str]:
        """The references' files in a Trainer checkpoint: one, or one per process of a model
        sharded over `shards` processes."""
        stem = cls.REFERENCES.removesuffix(".safetensors")
        return [cls.REFERENCES] if shards == 1 else [f"{stem}_{i}.safetensors"
                                                     for i in range(shards)]

    def _own_references(self, model) -> str:
        """This process's references file."""
        if not isinstance(model, FSDPModule):
            return self.REFERENCES
        return self.references(dist.get_world_size())[dist.get_rank()]

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        if self.writes:
            start_csv(self.path, self.FIELDS, state.global_step)
        self._previous, self._previous_step, self._logged, self._first = {}, None, {}, {}
        if state.global_step > 0 and model is not None:  # resumed: the checkpoint's references
            ids = {name: id(param) for name, param in model.named_parameters()}
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for key, tensor in load_file(str(folder / self._own_references(model))).items():
                lag, _, name = key.partition(":")
                getattr(self, f"_{lag}")[ids[name]] = tensor
            self._keep_previous(state, model, optimizer)

    def on_save(self, args, state, control, model=None, **kwargs):
        """The references beside the Trainer's checkpoint, for a run resumed from it."""
        names = {id(param): name for name, param in model.named_parameters()}
        tensors = {f"logged:{names[key]}": tensor for key, tensor in self._logged.items()}
        # At the first logged step both references are one tensor, which safetensors refuses
        # to store twice: the fixed one is written as its own copy then.
        tensors |= {f"first:{names[key]}": tensor.clone() if tensor is self._logged.get(key)
                    else tensor for key, tensor in self._first.items()}
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.writes or isinstance(model, FSDPModule):
            with atomic(folder / self._own_references(model), "train.optimizer-references") as tmp:
                save_file(tensors, str(tmp))

    def _keep_previous(self, state, model, optimizer):
        """Copy exp_avg when the next step is logged (its m1_cosine needs this step's)."""
        step = state.global_step
        if optimizer is None or model is None:
            return
        if step < state.max_steps and self._logged_step(step + 1, state.max_steps):
            self._previous_step = step
            for param in model.parameters():
                moments = optimizer.state.get(param, {})
                if "exp_avg" in moments:
                    self._previous[id(param)] = _local(moments["exp_avg"]).detach().clone()

    def _logged_step(self, step: int, max_steps: int) -> bool:
        return step % self.every == 0 or step >= max_steps

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None or model is None:
            return
        step = state.global_step
        if self._logged_step(step, state.max_steps) or control.should_training_stop:
            rows = [(self.run, step, block, metric, value)
                    for block, metric, value in self._measure(model, optimizer, step)]
            if self.writes:
                with self.path.open("a", newline="") as f:
                    csv.writer(f).writerows(rows)
            self._keep_references(model, optimizer)
        self._previous, self._previous_step = {}, None
        self._keep_previous(state, model, optimizer)

    def _keep_references(self, model, optimizer):
        """This logged step's exp_avg: the next logged step's reference, and the fixed one
        when it is the first logged step of the run."""
        self._logged = {id(p): _local(optimizer.state[p]["exp_avg"]).detach().to(
            "cpu", torch.float32, copy=True)
            for p in model.parameters() if "exp_avg" in optimizer.state.get(p, {})}
        if self._first == {}:
            self._first = self._logged

    def _measure(self, model, optimizer, step: int):
        references = {
            "previous": self._previous if self._previous_step == step - 1 else {},
            "logged": self._logged,
            "first": self._first or {},
        }
        references = {lag: found for lag, found in references.items() if found}
        # block -> [|m|^2, n, sum v, sum v^2], and per lag [dot, |reference|^2]
        sums: dict[str, list[float]] = {}
        lag_sums: dict[tuple[str, str], list[float]] = {}
        for name, param in model.named_parameters():
            moments = optimizer.state.get(param, {})
            if "exp_avg" not in moments:
                continue  # not AdamW, or no gradient yet
            m = _local(moments["exp_avg"]).detach().double()
            v = _local(moments["exp_avg_sq"]).detach().double()
            terms = (float((m * m).sum()), float(v.numel()), float(v.sum()),
                     float((v * v).sum()))
            lag_terms = {}
            for lag, found in references.items():
                reference = found.get(id(param))
                if reference is not None:
                    reference = reference.to(m.device, torch.float64)
                    lag_terms[lag] = (float((m * reference).sum()),
                                      float((reference * reference).sum()))
            for block in ("all", classify(name).block):
                acc = sums.setdefault(block, [0.0] * 4)
                for i, term in enumerate(terms):
                    acc[i] += term
                for lag, (dot, pp) in lag_terms.items():
                    acc = lag_sums.setdefault((block, lag), [0.0, 0.0])
                    acc[0] += dot
                    acc[1] += pp
        if isinstance(model, FSDPModule):  # each process summed its own shards
            _add_up(sums, lag_sums, device=next(model.parameters()).device)
        for block, (mm, n, sv, svv) in sorted(sums.items()):
            for metric, lag in self.LAGS.items():
                if (block, lag) in lag_sums:
                    dot, pp = lag_sums[(block, lag)]
                    norms = math.sqrt(mm * pp)
                    yield block, metric, dot / norms if norms > 0 else float("nan")
            mean = sv / n
            variance = max(svv / n - mean * mean, 0.0)
            yield block, "m2_cv", math.sqrt(variance) / mean if mean > 0 else float("nan")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (FSDP) tensor; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _add_up(*sums: dict, device) -> None:
    """Sum each list of numbers in `sums` over the processes, in place (every process holds
    the same keys: each has a shard of every parameter)."""
    keys = [(table, key) for table in sums for key in sorted(table)]
    flat = torch.tensor([x for table, key in keys for x in table[key]], dtype=torch.float64,
                        device=device)
    dist.all_reduce(flat)
    values = iter(flat.tolist())
    for table, key in keys:
        table[key] = [next(values) for _ in table[key]]
