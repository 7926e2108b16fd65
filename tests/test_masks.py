"""Masks: made from deltas, at random, by top |dW|; bit-packed IO; checks against a model."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from opdgeo.masks import (
    check_mask_matches_model,
    checkpoint_shapes,
    load_mask,
    mask_densities,
    mask_from_delta,
    random_mask_like,
    random_mask_with_density,
    save_mask,
    top_fraction_mask,
    write_density_csv,
)
from opdgeo.models import build_model, character_tokenizer, save_checkpoint

SHAPES = {"a.weight": (7, 3), "b.weight": (13,), "c.bias": (1,), "d.weight": (4, 5, 2)}


def _tiny_model(seed=0):
    tokenizer = character_tokenizer()
    model = build_model("qwen2", tokenizer, seed, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    return tokenizer, model


def _model_mask(model, density=0.5, seed=0):
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return random_mask_with_density(shapes, density, seed)


def _save_sharded(model, folder):
    """Two bf16 shards and an index, laid out as save_pretrained lays out large models."""
    folder.mkdir()
    state = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, members in shards.items():
        save_file({n: state[n] for n in members}, str(folder / file))
    weight_map = {n: file for file, members in shards.items() for n in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    # Sizes that are not multiples of 8 exercise the padding of the packed bits.
    mask = random_mask_with_density(SHAPES, 0.37, seed=3)
    path = tmp_path / "masks" / "m.safetensors"
    save_mask(mask, path)
    loaded = load_mask(path)
    assert loaded.keys() == mask.keys()
    for name, m in mask.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], m), name
    assert not list(path.parent.glob("*.tmp"))
    with safe_open(str(path), framework="pt") as f:  # one bit per coordinate, padded to bytes
        assert {n: f.get_tensor(n).shape[0] for n in f.keys()} == {
            n: (m.numel() + 7) // 8 for n, m in mask.items()}


def test_the_same_mask_is_the_same_bytes(tmp_path):
    # safetensors orders metadata keys at random per write; the mask's one key does not move
    mask = random_mask_with_density(SHAPES, 0.5, seed=0)
    save_mask(mask, tmp_path / "a.safetensors")
    save_mask(mask, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_a_mask_of_the_first_format_still_loads(tmp_path):
    # v1 kept its fields as separate metadata keys (masks written before the fix above)
    mask = random_mask_with_density(SHAPES, 0.5, seed=0)
    global_density, per_tensor = mask_densities(mask)
    save_file({n: torch.from_numpy(np.packbits(m.numpy().reshape(-1))) for n, m in mask.items()},
              str(tmp_path / "v1.safetensors"),
              metadata={"format": "opdgeo-mask-v1", "global_density": repr(global_density),
                        "shapes": json.dumps({n: list(m.shape) for n, m in mask.items()}),
                        "density": json.dumps(per_tensor)})
    loaded = load_mask(tmp_path / "v1.safetensors")
    assert all(torch.equal(loaded[n], m) for n, m in mask.items())
    assert mask_densities(tmp_path / "v1.safetensors") == (global_density, per_tensor)


def test_densities_from_file_match_the_mask(tmp_path):
    mask = {"x": torch.tensor([True, False, False, False]), "y": torch.ones(2, 2, dtype=bool)}
    global_density, per_tensor = mask_densities(mask)
    assert global_density == pytest.approx(5 / 8)
    assert per_tensor == {"x": 0.25, "y": 1.0}
    save_mask(mask, tmp_path / "m.safetensors")
    assert mask_densities(tmp_path / "m.safetensors") == (global_density, per_tensor)

    write_density_csv(tmp_path / "m.safetensors", tmp_path / "d.csv", "m")
    rows = list(csv.DictReader((tmp_path / "d.csv").open()))
    assert rows[0] == {"mask": "m", "tensor": "all", "block": "all", "density": "0.625"}
    assert {r["tensor"]: float(r["density"]) for r in rows[1:]} == per_tensor


def test_random_masks_have_exact_counts_and_are_seeded():
    reference = random_mask_with_density(SHAPES, 0.3, seed=0)
    for name, shape in SHAPES.items():
        numel = torch.Size(shape).numel()
        assert int(reference[name].sum()) == int(0.3 * numel + 0.5), name
        assert tuple(reference[name].shape) == shape

    like = random_mask_like(reference, seed=5)
    again = random_mask_like(reference, seed=5)
    other = random_mask_like(reference, seed=6)
    for name, m in reference.items():
        assert int(like[name].sum()) == int(m.sum()), name
        assert torch.equal(like[name], again[name]), name
    assert any(not torch.equal(like[n], other[n]) for n in reference)


def test_random_mask_of_a_tensor_does_not_depend_on_the_others():
    alone = random_mask_with_density({"a.weight": (7, 3)}, 0.5, seed=1)
    together = random_mask_with_density(SHAPES, 0.5, seed=1)
    assert torch.equal(alone["a.weight"], together["a.weight"])


def test_top_fraction_picks_largest_deltas_and_breaks_ties_by_position(tmp_path):
    source = {"w": torch.zeros(2, 5), "v": torch.zeros(4)}
    trained = {
        "w": torch.tensor([[0.0, 5.0, -1.0, 0.0, 2.0], [0.0, 0.0, -3.0, 0.5, 0.0]]),
        "v": torch.tensor([1.0, 1.0, 1.0, 1.0]),  # all tied
    }
    save_file(source, str(tmp_path / "src.safetensors"))
    save_file(trained, str(tmp_path / "trn.safetensors"))
    mask = top_fraction_mask(tmp_path / "src.safetensors", tmp_path / "trn.safetensors", 0.3)
    # |dW| of w sorted: 5, 3, 2, ... -> top 3 of 10 coordinates.
    expected_w = torch.zeros(2, 5, dtype=torch.bool)
    expected_w[0, 1] = expected_w[1, 2] = expected_w[0, 4] = True
    assert torch.equal(mask["w"], expected_w)
    # round(0.3 * 4) = 1 of four ties: the first position.
    assert mask["v"].tolist() == [True, False, False, False]


def test_mask_from_delta_reads_bf16_checkpoints_single_and_sharded(tmp_path):
    tokenizer, model = _tiny_model()
    save_checkpoint(model, tokenizer, tmp_path / "src")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, :4] += 1.0  # clearly above bf16 resolution
        model.model.layers[0].mlp.down_proj.weight[1, 2] += 1.0
        model.lm_head.weight[3, 3] += 1e-7  # far below bf16 resolution: unchanged on disk
    save_checkpoint(model, tokenizer, tmp_path / "trn")
    _save_sharded(model, tmp_path / "sharded")

    mask = mask_from_delta(tmp_path / "src", tmp_path / "trn")
    assert mask.keys() == dict(model.named_parameters()).keys()
    changed = {name: int(m.sum()) for name, m in mask.items() if m.any()}
    assert changed == {"model.embed_tokens.weight": 4, "model.layers.0.mlp.down_proj.weight": 1}
    assert mask["model.layers.0.mlp.down_proj.weight"][1, 2]

    sharded = mask_from_delta(tmp_path / "src", tmp_path / "sharded")
    assert all(torch.equal(sharded[n], mask[n]) for n in mask)
    assert checkpoint_shapes(tmp_path / "sharded") == checkpoint_shapes(tmp_path / "src")
    assert not any(m.any() for m in mask_from_delta(tmp_path / "src", tmp_path / "src").values())


def test_mask_from_delta_rejects_checkpoints_with_different_tensors(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match=r"missing in trained .*\['b'\]"):
        mask_from_delta(tmp_path / "x.safetensors", tmp_path / "y.safetensors")


def test_check_mask_matches_model_names_the_offending_tensors():
    _, model = _tiny_model()
    mask = _model_mask(model)
    aligned = check_mask_matches_model(mask, model)
    assert aligned.keys() == mask.keys()

    missing = dict(mask)
    del missing["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match="does not cover: model.layers.0.self_attn.q_proj.weight"):
        check_mask_matches_model(missing, model)

    extra = {**mask, "model.layers.7.mlp.up_proj.weight": torch.ones(3, dtype=bool)}
    with pytest.raises(ValueError, match="no model parameter: model.layers.7.mlp.up_proj.weight"):
        check_mask_matches_model(extra, model)

    wrong = {**mask, "lm_head.weight": torch.ones(2, 16, dtype=bool)}
    with pytest.raises(ValueError, match=r"lm_head.weight \(2, 16\) vs parameter lm_head"):
        check_mask_matches_model(wrong, model)


def test_check_mask_matches_vision_language_names():
    """A mask made from a VL checkpoint's language-model tensors fits the language model."""
    _, model = _tiny_model()
    mask = _model_mask(model)
    vl = {("language_model." + n if n.startswith("lm_head") else
           n.replace("model.", "model.language_model.", 1)): m for n, m in mask.items()}
    aligned = check_mask_matches_model(vl, model)
    assert all(torch.equal(aligned[n], mask[n]) for n in mask)


def test_frozen_parameters_need_no_mask():
    _, model = _tiny_model()
    mask = _model_mask(model)
    model.lm_head.weight.requires_grad_(False)
    del mask["lm_head.weight"]
    assert "lm_head.weight" not in check_mask_matches_model(mask, model)


def test_mask_from_fp32_checkpoints_is_the_mask_of_their_bf16_casts(tmp_path):
    # The analysis reads both checkpoints in bf16; a mask from fp32 weights must agree with
    # it, not count changes that vanish in the bf16 cast.
    generator = torch.Generator().manual_seed(0)
    source = {"w.weight": torch.randn(64, 32, generator=generator)}
    moved = source["w.weight"] + 1e-4 * torch.randn(64, 32, generator=generator)
    save_file(source, str(tmp_path / "src.safetensors"))
    save_file({"w.weight": moved}, str(tmp_path / "fp32.safetensors"))
    save_file({"w.weight": moved.bfloat16()}, str(tmp_path / "bf16.safetensors"))
    from_fp32 = mask_from_delta(tmp_path / "src.safetensors", tmp_path / "fp32.safetensors")
    from_bf16 = mask_from_delta(tmp_path / "src.safetensors", tmp_path / "bf16.safetensors")
    assert torch.equal(from_fp32["w.weight"], from_bf16["w.weight"])
    assert 0 < from_fp32["w.weight"].float().mean() < 0.5  # fp32 alone would give ~1.0


def test_mask_from_an_untied_run_of_a_tied_source_covers_the_source_parameters(tmp_path):
    tokenizer = character_tokenizer()
    tied = build_model("qwen2", tokenizer, 0, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                       tie_word_embeddings=True)
    save_checkpoint(tied, tokenizer, tmp_path / "tied")
    untied = build_model("qwen2", tokenizer, 1, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    save_checkpoint(untied, tokenizer, tmp_path / "untied")
    mask = mask_from_delta(tmp_path / "tied", tmp_path / "untied")
    check_mask_matches_model(mask, tied)
