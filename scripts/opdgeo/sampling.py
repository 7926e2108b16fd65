"""Exact resume past the first pass over the prompts.

TRL's DistillationTrainer and GRPOTrainer sample with `RepeatSampler`, which draws the order
of every pass from one generator seeded once: a run resumed in a later pass starts a fresh
sampler and so replays the first pass's order. Here the Trainer's `set_epoch(e)` (called
before every pass) replays the generator from the seed to pass e: the order of an
uninterrupted run, resumed or not, and the same order as TRL's own sampler.
"""

import torch
from trl.trainer.utils import RepeatSampler


class EpochRepeatSampler(RepeatSampler):
    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)


class ResumableSampling:
    """Trainer mixin: TRL's training sampler as an `EpochRepeatSampler` (one overridden
    method)."""

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if type(sampler) is not RepeatSampler:  # a TRL upgrade changed its sampling
            raise TypeError(f"{type(self).__name__} samples with {type(sampler).__name__}, "
                            "not TRL's RepeatSampler: opdgeo.sampling needs updating")
        return EpochRepeatSampler(sampler.data_source, sampler.mini_repeat_count,
                                  batch_size=sampler.batch_size,
                                  repeat_count=sampler.repeat_count, shuffle=sampler.shuffle,
                                  seed=sampler.seed)
