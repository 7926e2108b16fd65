"""Gradient masks and AdamW state diagnostics in real TRL OPD training (tiny models, CPU)."""

import copy
import csv
import math
from types import SimpleNamespace

import pytest
import torch
from bench_masking import tiny_models, tiny_opd_trainer
from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainerControl, TrainerState
from trl.trainer.utils import RepeatSampler

from opdgeo.callbacks import DataOrderCallback, GradientMaskCallback, OptimizerStateCallback
from opdgeo.masks import random_mask_with_density, save_mask

STEPS = 5
CLIP = 0.05  # below the tiny model's gradient norms, so clipping acts on every step


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models train fastest on one thread; more than the free cores makes steps crawl.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GradientProbe(TrainerCallback):
    """After clipping, before the step: the largest |grad| outside the mask, and the norm."""

    def __init__(self, outside: dict):
        self.outside = outside
        self.max_outside: list[float] = []
        self.clipped_norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        self.max_outside.append(max(
            params[n].grad[out].abs().max().item() if out.any() else 0.0
            for n, out in self.outside.items()))
        self.clipped_norms.append(math.sqrt(sum(
            p.grad.double().pow(2).sum().item() for p in params.values() if p.grad is not None)))


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("masked")
    tokenizer, student, teacher = tiny_models()
    shapes = {n: tuple(p.shape) for n, p in student.named_parameters()}
    mask = random_mask_with_density(shapes, 0.5, seed=0)
    save_mask(mask, tmp / "mask.safetensors")
    with torch.no_grad():  # signed zeros outside the mask must keep their sign bit too
        embed = student.model.embed_tokens.weight
        embed[~mask["model.embed_tokens.weight"] & (torch.arange(len(embed)) < 3)[:, None]] = -0.0
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    probe = GradientProbe({n: ~m for n, m in mask.items()})
    callback = GradientMaskCallback.from_file(tmp / "mask.safetensors", student)
    trainer = tiny_opd_trainer(student, teacher, tokenizer, tmp / "trainer", steps=STEPS,
                               callbacks=[callback, probe], max_grad_norm=CLIP)
    trainer.train()
    grad_norms = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    return dict(student=student, mask=mask, initial=initial, probe=probe, grad_norms=grad_norms,
                trainer=trainer)


@pytest.mark.train
def test_coordinates_outside_the_mask_are_bit_for_bit_unchanged(masked_run):
    """AdamW with weight decay 0.1 at lr 1e-2 would move every coordinate; only inside may."""
    student, mask, initial = masked_run["student"], masked_run["mask"], masked_run["initial"]
    assert masked_run["trainer"].state.global_step == STEPS
    assert masked_run["trainer"].args.weight_decay > 0
    moved_inside = total_inside = 0
    for name, param in student.named_parameters():
        inside = mask[name]
        # Compare bits, not values: -0.0 == 0.0 would hide a sign flip.
        after, before = param.detach().view(torch.int32), initial[name].view(torch.int32)
        assert torch.equal(after[~inside], before[~inside]), f"{name} moved outside the mask"
        moved_inside += int((after[inside] != before[inside]).sum())
        total_inside += int(inside.sum())
    assert moved_inside > 0.9 * total_inside


@pytest.mark.train
def test_clipping_never_sees_gradients_outside_the_mask(masked_run):
    probe, grad_norms = masked_run["probe"], masked_run["grad_norms"]
    assert len(probe.max_outside) == STEPS
    assert max(probe.max_outside) == 0.0
    # The logged norm is the pre-clip norm of the masked gradients: clipping leaves exactly
    # min(norm, CLIP) (up to clip_grad_norm's 1e-6), which fails if unmasked gradients had
    # counted in the norm that set the clipping coefficient.
    assert max(grad_norms) > CLIP
    for logged, clipped in zip(grad_norms, probe.clipped_norms, strict=True):
        assert clipped == pytest.approx(min(logged, CLIP), rel=1e-4)


@pytest.mark.train
def test_mask_hooks_are_removed_after_training(masked_run):
    student = masked_run["student"]
    assert all(not p._backward_hooks for p in student.parameters())


def test_a_mask_that_does_not_fit_fails_before_training(tmp_path):
    _, student, _ = tiny_models()
    shapes = {n: tuple(p.shape) for n, p in student.named_parameters()}
    shapes["model.layers.0.mlp.up_proj.weight"] = (3, 3)
    save_mask(random_mask_with_density(shapes, 0.5, seed=0), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad.safetensors.*model.layers.0.mlp.up_proj.weight"):
        GradientMaskCallback.from_file(tmp_path / "bad.safetensors", student)


class _FirstMomentProbe(TrainerCallback):
    """AdamW's exp_avg of every parameter, concatenated, after each step."""

    def __init__(self):
        self.at = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.at[state.global_step] = torch.cat([
            optimizer.state[p]["exp_avg"].detach().double().flatten()
            for p in model.parameters() if "exp_avg" in optimizer.state.get(p, {})])


@pytest.mark.train
def test_optimizer_state_callback_writes_tidy_rows(tmp_path):
    tokenizer, student, teacher = tiny_models()
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    callback = OptimizerStateCallback(tmp_path / "optimizer_state.csv", "toy-opd", every=2)
    first_moments = _FirstMomentProbe()
    tiny_opd_trainer(student, teacher, tokenizer, tmp_path / "trainer", steps=STEPS,
                     callbacks=[callback, first_moments]).train()
    # Without a mask, AdamW with weight decay moves (nearly) every coordinate.
    changed = sum(int((p.detach() != initial[n]).sum()) for n, p in student.named_parameters())
    assert changed > 0.99 * sum(p.numel() for p in student.parameters())

    rows = list(csv.DictReader((tmp_path / "optimizer_state.csv").open()))
    assert rows and set(rows[0]) == {"run", "step", "block", "metric", "value"}
    assert {r["run"] for r in rows} == {"toy-opd"}
    assert sorted({int(r["step"]) for r in rows}) == [2, 4, 5]  # every 2, and the last step
    cosine = [r for r in rows if r["metric"] == "m1_cosine"]
    cv = [r for r in rows if r["metric"] == "m2_cv"]
    assert {int(r["step"]) for r in cosine} == {2, 4, 5}  # against the step before each
    assert all(-1.0 <= float(r["value"]) <= 1.0 for r in cosine)
    assert all(float(r["value"]) >= 0.0 for r in cv)
    assert {r["block"] for r in cv} == {"all", "attention", "ffn", "embedding", "lm_head", "norm"}
    logged = {int(r["step"]): float(r["value"]) for r in cosine if r["block"] == "all"}
    # The moments are float32 and the callback reduces them in another order than the probe:
    # they agree to float32's precision, not to the last bits.
    float32 = torch.finfo(torch.float32).eps
    for step, value in logged.items():
        before, now = first_moments.at[step - 1], first_moments.at[step]
        assert value == pytest.approx(float(before @ now / (before.norm() * now.norm())),
                                      rel=16 * float32, abs=16 * float32), step


def test_first_moment_cosine_is_between_consecutive_adamw_steps(tmp_path):
    """A real torch AdamW driven step by step: the callback's cosine at each logged step is
    the one between that step's exp_avg and the step before's, and it copies exp_avg only at
    the step before a logged one."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    callback = OptimizerStateCallback(tmp_path / "state.csv", "toy", every=3)
    state, control = TrainerState(max_steps=7), TrainerControl()
    callback.on_train_begin(None, state, control)
    moments, copied_after = {}, []
    for step in range(1, state.max_steps + 1):
        inputs = torch.randn(16, 6, generator=generator)
        optimizer.zero_grad()
        model(inputs).square().mean().backward()  # a new batch: the gradient turns each step
        optimizer.step()
        state.global_step = step
        callback.on_step_end(None, state, control, model=model, optimizer=optimizer)
        moments[step] = torch.cat([optimizer.state[p]["exp_avg"].double().flatten()
                                   for p in model.parameters()])
        if callback._previous:
            copied_after.append(step)
    assert copied_after == [2, 5, 6]  # before the logged steps 3, 6 and 7 (the last)
    rows = list(csv.DictReader((tmp_path / "state.csv").open()))
    logged = {int(r["step"]): float(r["value"]) for r in rows
              if r["metric"] == "m1_cosine" and r["block"] == "all"}
    assert sorted(logged) == [3, 6, 7]
    float32 = torch.finfo(torch.float32).eps

    def cosine(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    for step, value in logged.items():
        assert value == pytest.approx(cosine(moments[step - 1], moments[step]),
                                      rel=16 * float32, abs=16 * float32), step
    assert {int(r["step"]) for r in rows if r["metric"] == "m2_cv"} == {3, 6, 7}
    # the longer lags: against the logged step before (3 steps, 1 at the last) and against
    # the first logged step, neither at the first logged step itself
    for metric, references in (("m1_cosine_interval", {6: 3, 7: 6}),
                               ("m1_cosine_first", {6: 3, 7: 3})):
        lagged = {int(r["step"]): float(r["value"]) for r in rows
                  if r["metric"] == metric and r["block"] == "all"}
        assert sorted(lagged) == sorted(references), metric
        for step, reference in references.items():
            assert lagged[step] == pytest.approx(cosine(moments[reference], moments[step]),
                                                 rel=16 * float32, abs=16 * float32), metric
    # the step-before cosine keeps ~beta1 of the moment; a longer lag lets it turn further
    assert logged[6] > 0.5


def test_a_resumed_run_logs_the_rows_of_an_uninterrupted_one(tmp_path):
    """The references (the logged step before, the first logged step) are kept beside each
    Trainer checkpoint; the step before the first resumed one is the checkpoint's own
    optimizer state. Killed after step 6, resumed from the checkpoint of step 4."""
    args, control = SimpleNamespace(output_dir=str(tmp_path / "trainer")), TrainerControl()

    def train(path, steps, start=None, kill_after=None):
        if start is None:
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 2)
            start = (model, torch.optim.AdamW(model.parameters(), lr=0.05), 0)
        model, optimizer, begin = start
        callback = OptimizerStateCallback(path, "toy", every=2)
        state = TrainerState(max_steps=steps, global_step=begin)
        callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
        checkpoint = None
        for step in range(begin + 1, (kill_after or steps) + 1):
            optimizer.zero_grad()
            model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step))).sum().backward()
            optimizer.step()
            state.global_step = step
            callback.on_step_end(args, state, control, model=model, optimizer=optimizer)
            if step == 4:
                (tmp_path / "trainer" / "checkpoint-4").mkdir(parents=True, exist_ok=True)
                callback.on_save(args, state, control, model=model)
                checkpoint = (*copy.deepcopy((model, optimizer)), step)
        return checkpoint

    train(tmp_path / "straight.csv", 10)
    checkpoint = train(tmp_path / "resumed.csv", 10, kill_after=6)
    train(tmp_path / "resumed.csv", 10, start=checkpoint)
    straight = (tmp_path / "straight.csv").read_text()
    assert "m1_cosine_first" in straight and "m1_cosine_interval" in straight
    assert (tmp_path / "resumed.csv").read_text() == straight


def test_data_order_of_a_resumed_pass_is_the_uninterrupted_one():
    prompts = list(range(12))

    def sampler():  # as DistillationTrainer and GRPOTrainer build theirs
        return RepeatSampler(prompts, mini_repeat_count=2, batch_size=3, seed=0)

    straight = sampler()
    passes = [list(straight) for _ in range(3)]  # an uninterrupted run: one sampler
    assert passes[1] != passes[0]  # so a fresh sampler would replay the wrong pass
    for epoch in (0.0, 1.0, 1.5, 2.25):  # resumed at the start of, or within, a pass
        fresh = sampler()  # a resumed run's
        loader = DataLoader(prompts, batch_size=6, sampler=fresh)
        DataOrderCallback().on_epoch_begin(None, TrainerState(epoch=epoch), None,
                                           train_dataloader=loader)
        assert list(fresh) == passes[math.floor(epoch)], epoch

