"""Shared fixtures: tiny checkpoints built in a temporary folder, once per session."""

import pytest

# How modules are handed to pytest-xdist's workers (longest first), registered as this
# conftest's own hooks.
from scheduling import pytest_collection_modifyitems, pytest_configure_node  # noqa: F401

from opdgeo.models import (
    VISION_ARCHITECTURES,
    build_model,
    character_tokenizer,
    image_text_processor,
    save_checkpoint,
)


def tiny_checkpoint(path, seed, hidden=16, arch="qwen2", tokenizer=None):
    """A random checkpoint saved with its tokenizer; a vision-language one (qwen2_vl,
    qwen2_5_vl) with a one-block vision tower and the image processor (`tokenizer`)."""
    vision = {}
    if arch in VISION_ARCHITECTURES:
        tokenizer = tokenizer or image_text_processor()
        vision = {"vision": {"depth": 1, "embed_dim": 16, "num_heads": 2, "mlp_ratio": 2}
                  if arch == "qwen2_vl" else
                  {"depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32,
                   "fullatt_block_indexes": [0]}}
    tokenizer = tokenizer or character_tokenizer()
    model = build_model(arch, tokenizer, seed, hidden_size=hidden, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2,
                        intermediate_size=2 * hidden, **vision)
    save_checkpoint(model, tokenizer, path)
    return path


@pytest.fixture(scope="session")
def make_checkpoint():
    """`make_checkpoint(path, seed, hidden=16, arch="qwen2", tokenizer=None)`."""
    return tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A random student (source) and a wider random teacher sharing one tokenizer."""
    root = tmp_path_factory.mktemp("tiny_pair")
    return tiny_checkpoint(root / "student", seed=0), tiny_checkpoint(root / "teacher", seed=1,
                                                                       hidden=32)


@pytest.fixture(scope="session")
def tiny_vl_pair(tmp_path_factory):
    """A random Qwen2-VL student and a wider teacher sharing one processor."""
    root = tmp_path_factory.mktemp("tiny_vl_pair")
    return (tiny_checkpoint(root / "student", seed=0, arch="qwen2_vl"),
            tiny_checkpoint(root / "teacher", seed=1, hidden=32, arch="qwen2_vl"))
