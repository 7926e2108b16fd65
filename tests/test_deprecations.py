"""A training run emits no deprecation warning from our own calls.

A warning is ours when the innermost frame of our code calls the deprecated function itself,
or calls it only through constructors (`SFTConfig(gradient_checkpointing=...)` warns from
TrainingArguments.__post_init__, under TRL's config). A deprecated call that TRL's code makes on
its own (TRL 1.16 calls transformers' `is_gradient_checkpointing` while generating) is not
ours to fix, and is left to TRL.
"""

import traceback
import warnings
from pathlib import Path

import pytest
from test_train import TASK, spec

import opdgeo
from opdgeo.train import train_run

PACKAGE = Path(opdgeo.__file__).resolve().parent
CONSTRUCTORS = ("__init__", "__post_init__")


def is_ours(stack: list[traceback.FrameSummary], root: Path) -> bool:
    """`stack` (outermost first) ends in the function that called warnings.warn."""
    inside = [i for i, frame in enumerate(stack) if Path(frame.filename).resolve()
              .is_relative_to(root)]
    if not inside:
        return False
    called = stack[inside[-1] + 1:]
    return bool(called) and all(frame.name in CONSTRUCTORS for frame in called[:-1])


@pytest.fixture
def deprecations(monkeypatch):
    """Every DeprecationWarning / FutureWarning raised, with the stack that raised it."""
    recorded, warn = [], warnings.warn

    def recording(message, category=None, stacklevel=1, *args, **kwargs):
        if isinstance(category, type) and issubclass(category, DeprecationWarning | FutureWarning):
            recorded.append((str(message), traceback.extract_stack()[:-1]))
        return warn(message, category, stacklevel + 1, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", recording)
    return recorded


def test_the_check_sees_a_deprecated_argument_passed_from_our_code(deprecations, tmp_path):
    """The null: this file playing our code, passing transformers 5's deprecated name."""
    from trl import SFTConfig

    SFTConfig(output_dir=str(tmp_path), gradient_checkpointing=False, use_cpu=True,
              report_to=[])
    ours = [message for message, stack in deprecations if is_ours(stack, Path(__file__).parent)]
    assert any("`gradient_checkpointing` is deprecated" in message for message in ours), ours


@pytest.mark.train
@pytest.mark.parametrize("kind", ["opd", "sft", "grpo"])
def test_training_runs_emit_no_deprecation_of_ours(tiny_pair, tmp_path, deprecations, kind):
    """With gradient checkpointing on (the paper config's), the path with most renamed APIs."""
    run = spec(kind, steps=1)
    run.training["gradient_checkpointing"] = True
    train_run(run, *tiny_pair, TASK, tmp_path / "run", "cpu")
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    ours = [f"{message} (from {stack[-2].filename}:{stack[-2].lineno})"
            for message, stack in deprecations if is_ours(stack, PACKAGE)]
    assert ours == []
