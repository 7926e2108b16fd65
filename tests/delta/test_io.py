"""Checkpoint reading and source <-> trained matching."""

import pandas as pd
import pytest
import torch
from delta_checkpoints import perturbed, save_checkpoint, small_model

from opdgeo.delta.analyze import analyze_checkpoints
from opdgeo.delta.io import Checkpoint
from opdgeo.delta.pairing import match_tensors


def test_sharded_and_single_file_give_identical_results(tmp_path):
    source, trained = small_model(layers=1), perturbed(small_model(layers=1))
    save_checkpoint(tmp_path / "source", source)
    save_checkpoint(tmp_path / "trained", trained)
    save_checkpoint(tmp_path / "source_sharded", source, shards=3)
    save_checkpoint(tmp_path / "trained_sharded", trained, shards=2)
    single = analyze_checkpoints(tmp_path / "source", tmp_path / "trained", tmp_path / "a",
                                 device="cpu")
    sharded = analyze_checkpoints(tmp_path / "source_sharded", tmp_path / "trained_sharded",
                                  tmp_path / "b", device="cpu")
    ignore = {"source", "trained", "seconds"}
    assert {k: v for k, v in single.items() if k not in ignore} == \
        {k: v for k, v in sharded.items() if k not in ignore}
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "tensors.csv"),
                                  pd.read_csv(tmp_path / "b" / "tensors.csv"))


def test_bin_checkpoint_loads_like_safetensors(tmp_path):
    tensors = small_model(layers=1)
    save_checkpoint(tmp_path / "st", tensors)
    save_checkpoint(tmp_path / "bin", tensors, bin_format=True)
    st, binary = Checkpoint(tmp_path / "st"), Checkpoint(tmp_path / "bin")
    assert sorted(st.names()) == sorted(binary.names()) == sorted(tensors)
    for name in tensors:
        assert torch.equal(st.load(name), binary.load(name))
        assert binary.shape(name) == tuple(tensors[name].shape)


def test_multimodal_aliases_match_language_model_names(tmp_path):
    tensors = small_model(layers=1)
    aliased = {name.replace("model.", "model.language_model.", 1): t
               for name, t in tensors.items()}
    save_checkpoint(tmp_path / "plain", tensors)
    save_checkpoint(tmp_path / "aliased", aliased)
    pairs = match_tensors(Checkpoint(tmp_path / "plain"), Checkpoint(tmp_path / "aliased"))
    assert sorted(p.name for p in pairs) == sorted(tensors)
    assert all(p.trained_name.startswith("model.language_model.") for p in pairs)


def test_missing_tensor_error_names_it(tmp_path):
    tensors = small_model(layers=1)
    missing = "model.layers.0.mlp.up_proj.weight"
    save_checkpoint(tmp_path / "source", tensors)
    save_checkpoint(tmp_path / "trained", {k: v for k, v in tensors.items() if k != missing})
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        match_tensors(Checkpoint(tmp_path / "source"), Checkpoint(tmp_path / "trained"))


def test_shape_mismatch_error_names_the_tensor(tmp_path):
    tensors = small_model(layers=1)
    name = "model.layers.0.self_attn.q_proj.weight"
    save_checkpoint(tmp_path / "source", tensors)
    save_checkpoint(tmp_path / "trained", tensors | {name: tensors[name][:, :5].contiguous()})
    with pytest.raises(ValueError, match=f"shape mismatch for tensor {name}"):
        match_tensors(Checkpoint(tmp_path / "source"), Checkpoint(tmp_path / "trained"))


def test_no_matching_tensors_is_an_error(tmp_path):
    save_checkpoint(tmp_path / "source", {"a.weight": torch.zeros(2, 2)})
    save_checkpoint(tmp_path / "trained", {"b.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="no matching tensors"):
        match_tensors(Checkpoint(tmp_path / "source"), Checkpoint(tmp_path / "trained"))


def test_non_floating_tensors_are_skipped(tmp_path):
    tensors = {"w.weight": torch.ones(3, 3), "position_ids": torch.arange(3)}
    save_checkpoint(tmp_path / "st", tensors)
    save_checkpoint(tmp_path / "bin", tensors, bin_format=True)
    assert Checkpoint(tmp_path / "st").names() == ["w.weight"]
    assert Checkpoint(tmp_path / "bin").names() == ["w.weight"]


def test_tied_output_head_is_counted_once(tmp_path):
    tensors = small_model(layers=1)
    embedding = tensors["model.embed_tokens.weight"]
    # safetensors with lm_head written out but tied by config; .bin with shared storage
    save_checkpoint(tmp_path / "config_tied", tensors | {"lm_head.weight": embedding.clone()},
                    config={"text_config": {"tie_word_embeddings": True}})
    save_checkpoint(tmp_path / "storage_tied", tensors | {"lm_head.weight": embedding},
                    bin_format=True)
    save_checkpoint(tmp_path / "untied", tensors | {"lm_head.weight": embedding.clone()},
                    bin_format=True)
    assert "lm_head.weight" not in Checkpoint(tmp_path / "config_tied").names()
    assert "lm_head.weight" not in Checkpoint(tmp_path / "storage_tied").names()
    assert "lm_head.weight" in Checkpoint(tmp_path / "untied").names()
    result = analyze_checkpoints(tmp_path / "config_tied", tmp_path / "storage_tied",
                                 tmp_path / "out", device="cpu", nulls=False)
    assert result["num_params"] == sum(t.numel() for t in tensors.values())
    assert "lm_head" not in result["block_energy_share"]


@pytest.mark.parametrize("tied_side", ["source", "trained"])
def test_untied_head_is_paired_with_the_tied_embedding(tmp_path, tied_side):
    # Qwen2.5-Math-1.5B stores no lm_head (tied); DeepSeek-R1-Distill-Qwen-1.5B, trained
    # from it, stores its own.
    tied = small_model(layers=1)
    untied = perturbed(tied) | {"lm_head.weight": perturbed(
        {"h": tied["model.embed_tokens.weight"]}, seed=3)["h"]}
    save_checkpoint(tmp_path / "tied", tied, config={"tie_word_embeddings": True})
    save_checkpoint(tmp_path / "untied", untied)
    source, trained = ("tied", "untied") if tied_side == "source" else ("untied", "tied")
    pairs = match_tensors(Checkpoint(tmp_path / source), Checkpoint(tmp_path / trained))
    head = next(p for p in pairs if p.name == "lm_head.weight")
    assert head.tied_head
    names = {"source": head.source_name, "trained": head.trained_name}
    assert names[tied_side] == "model.embed_tokens.weight"
    result = analyze_checkpoints(tmp_path / source, tmp_path / trained, tmp_path / "out",
                                 device="cpu", nulls=False)
    assert "embed_tokens" in result["tied_head"] and result["block_energy_share"]["lm_head"] > 0
    assert result["num_params"] == sum(t.numel() for t in untied.values())
    # Two untied checkpoints say nothing about it.
    plain = analyze_checkpoints(tmp_path / "untied", tmp_path / "untied", None, device="cpu",
                                nulls=False)
    assert plain["tied_head"] is None


def test_an_untied_head_against_an_untied_checkpoint_without_one_is_an_error(tmp_path):
    tensors = small_model(layers=1)
    save_checkpoint(tmp_path / "source", tensors)  # no head, and not tied: a broken pair
    head = tensors["model.embed_tokens.weight"].clone()
    save_checkpoint(tmp_path / "trained", tensors | {"lm_head.weight": head})
    with pytest.raises(ValueError, match="only one checkpoint"):
        match_tensors(Checkpoint(tmp_path / "source"), Checkpoint(tmp_path / "trained"))


def test_a_hub_id_without_safetensors_downloads_its_bin_weights(tmp_path, monkeypatch):
    import huggingface_hub

    folder = save_checkpoint(tmp_path / "snapshot", small_model(layers=1), bin_format=True)
    asked = []

    def snapshot_download(repo_id, allow_patterns, **_):
        asked.append(allow_patterns)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    checkpoint = Checkpoint("org/old-upload")
    assert checkpoint.path == folder and checkpoint.names()
    assert asked == [["*.json", "*.safetensors"], ["*.json", "pytorch_model*.bin"]]
