"""What does a gradient mask cost? Time OPD steps of a tiny model with and without one.

Both arms run in this one process on the same models and data, alternating, so machine noise
hits them alike. `tiny_opd_trainer` is also what the mask tests train with.

    PYTHONPATH=scripts python scripts/bench_masking.py --steps 40 --repeats 3
"""

import argparse
import statistics
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import DistillationConfig

from opdgeo.callbacks import GradientMaskCallback
from opdgeo.distillation import OPDTrainer
from opdgeo.masks import random_mask_with_density
from opdgeo.models import build_model, character_tokenizer
from opdgeo.task import answer_length, split_examples

DIGITS = 2


def tiny_models(seed: int = 0, hidden: int = 32, layers: int = 2):
    """A tokenizer, a tiny student and a (differently seeded) tiny teacher."""
    tokenizer = character_tokenizer()
    dims = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=2 * hidden)
    student = build_model("qwen2", tokenizer, seed, **dims)
    teacher = build_model("qwen2", tokenizer, seed + 1, **dims)
    return tokenizer, student, teacher


def tiny_opd_trainer(student, teacher, tokenizer, out_dir, *, steps: int, callbacks=(),
                     learning_rate: float = 1e-2, weight_decay: float = 0.1, seed: int = 0,
                     batch_size: int = 8, max_grad_norm: float = 1.0):
    """An OPDTrainer (reverse KL, AdamW, clipping) wired as the pipeline wires it, on CPU."""
    args = DistillationConfig(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, weight_decay=weight_decay, optim="adamw_torch",
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=max_grad_norm, logging_steps=1,
        save_strategy="no", report_to=[], bf16=False, use_cpu=True, seed=seed, data_seed=seed,
        activation_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
        beta=1.0, temperature=1.0, max_completion_length=answer_length(DIGITS) + 1,
        top_k=0, top_p=1.0,
    )
    prompts = split_examples(DIGITS, steps * batch_size, "train", seed)
    dataset = Dataset.from_list([{"prompt": e.prompt} for e in prompts])
    return OPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=list(callbacks))


class _StepTimer(TrainerCallback):
    """Wall time of the optimizer steps after the first (which pays one-off set-up)."""

    def __init__(self):
        self.start = None
        self.seconds = 0.0
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > 1:
            self.seconds += time.perf_counter() - self.start
            self.steps += 1


def time_arm(masked: bool, steps: int, density: float, hidden: int, layers: int, out_dir):
    tokenizer, student, teacher = tiny_models(hidden=hidden, layers=layers)
    timer = _StepTimer()
    callbacks = [timer]
    if masked:
        shapes = {n: tuple(p.shape) for n, p in student.named_parameters()}
        mask = random_mask_with_density(shapes, density, seed=0)
        callbacks.append(GradientMaskCallback(mask, student))
    tiny_opd_trainer(student, teacher, tokenizer, out_dir, steps=steps,
                     callbacks=callbacks).train()
    return timer.seconds / timer.steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more than the free cores makes steps erratic)")
    parser.add_argument("--out", default="/tmp/bench_masking")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for masked in (False, True):
            times[masked].append(time_arm(masked, args.steps, args.density, args.hidden,
                                          args.layers, args.out))
    plain, masked = statistics.median(times[False]), statistics.median(times[True])
    n_params = sum(p.numel() for p in tiny_models(hidden=args.hidden,
                                                   layers=args.layers)[1].parameters())
    print(f"tiny qwen2 student, {n_params:,} parameters, {args.steps} OPD steps x "
          f"{args.repeats} repeats, mask density {args.density}, {torch.get_num_threads()} threads")
    print(f"unmasked: {plain * 1e3:.1f} ms/step (median)")
    print(f"masked:   {masked * 1e3:.1f} ms/step (median)")
    print(f"ratio masked/unmasked: {masked / plain:.3f}")


if __name__ == "__main__":
    main()
