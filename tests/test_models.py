import os

import pytest
import torch
from safetensors.torch import load_file

from opdgeo.masks import random_mask_with_density, save_mask
from opdgeo.models import (
    build_model,
    character_tokenizer,
    check_same_vocabulary,
    load_model,
    load_tokenizer,
    save_checkpoint,
)


def tiny(tokenizer, arch="qwen2", seed=0):
    return build_model(arch, tokenizer, seed, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, intermediate_size=32)


def test_tokenizer_round_trip(tmp_path):
    tokenizer = character_tokenizer()
    text = "123+045=8610"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert reloaded.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_bf16_checkpoint_reloads_bit_for_bit(tmp_path, arch):
    tokenizer = character_tokenizer()
    model = tiny(tokenizer, arch)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", fp32_weights=tmp_path / "fp32.safetensors")
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    reloaded = load_model(tmp_path / "ckpt")
    assert next(reloaded.parameters()).dtype == torch.float32  # fp32 master weights
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name].bfloat16(), tensor.bfloat16()), name
        assert torch.equal(stored[name], tensor.bfloat16()), name
    fp32 = load_file(str(tmp_path / "fp32.safetensors"))
    assert all(torch.equal(fp32[n], t) for n, t in model.state_dict().items())
    assert not (tmp_path / "ckpt.tmp").exists()


def test_a_tied_model_stores_its_head_once_with_fp32_weights_too(tmp_path):
    # Qwen2.5-Math-1.5B and Qwen3-1.7B-Base tie their heads; their checkpoints store none, and
    # a run keeping fp32 weights must not fail on the shared storage.
    tokenizer = character_tokenizer()
    model = build_model("qwen3", tokenizer, 0, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                        tie_word_embeddings=True)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", fp32_weights=tmp_path / "fp32.safetensors")
    for stored in (load_file(str(tmp_path / "ckpt" / "model.safetensors")),
                   load_file(str(tmp_path / "fp32.safetensors"))):
        assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    reloaded = load_model(tmp_path / "ckpt")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_vocabulary_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="different vocabularies"):
        check_same_vocabulary(character_tokenizer(), character_tokenizer("0123456789+=-"),
                              "student", "teacher")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_and_masks_are_written_as_the_umask_says(tmp_path, umask):
    # safetensors alone writes 0600: collaborators on a shared file system could not read it
    tokenizer = character_tokenizer()
    model = tiny(tokenizer)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    previous = os.umask(umask)
    try:
        save_checkpoint(model, tokenizer, tmp_path / "final",
                        fp32_weights=tmp_path / "fp32.safetensors")
        save_mask(random_mask_with_density(shapes, 0.5, seed=0), tmp_path / "mask.safetensors")
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in tmp_path.rglob("*") if p.is_file()}
    assert "final/model.safetensors" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
