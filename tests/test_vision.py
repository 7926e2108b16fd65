"""Vision-language pairs: the squares task, the processor, checkpoints, runs with images."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from opdgeo.config import RunSpec, pair_training
from opdgeo.evaluate import exact_match
from opdgeo.masks import mask_from_delta, random_mask_with_density, save_mask
from opdgeo.models import (
    ImageTextProcessor,
    Qwen2VLImageProcessorPil,
    build_model,
    image_text_processor,
    load_model,
    load_tokenizer,
)
from opdgeo.naming import canonical_name, classify, type_block
from opdgeo.task import SquaresTask, make_task
from opdgeo.train import train_run, verifier_reward

TASK = {"kind": "squares", "grid": 2, "colours": 4, "eval_prompts": 8, "seed": 0}


def cells(image, grid):
    """Mean colour of every cell of a squares picture."""
    pixels = np.asarray(image, dtype=float)
    side = SquaresTask.CELL
    return [pixels[r * side:(r + 1) * side, c * side:(c + 1) * side].mean((0, 1))
            for r in range(grid) for c in range(grid)]


# ---------------------------------------------------------------- the task


def test_squares_answers_match_the_pictures():
    task = make_task(TASK)
    for example in task.train_examples(64, seed=3):
        question = example.prompt[0]["content"]
        means = cells(example.image, 2)
        filled = [m for m in means if m.max() > 100]  # the background is below 40
        if question == "1=":
            assert int(example.answer) == len(filled)
        else:
            assert question == "0="
            palette = np.array(SquaresTask.PALETTE[:4])
            nearest = {int(np.abs(palette - m).sum(1).argmin()) + 1 for m in filled}
            assert nearest == {int(example.answer)}


def test_squares_are_seeded_and_splits_differ():
    task = make_task(TASK)
    a, b = task.train_examples(16, seed=0), task.train_examples(16, seed=0)
    assert [e.image.tobytes() for e in a] == [e.image.tobytes() for e in b]
    assert [e.answer for e in a] == [e.answer for e in b]
    other = {e.image.tobytes() for e in task.train_examples(16, seed=1)}
    held_out = {e.image.tobytes() for e in task.eval_examples()}
    assert not other & {e.image.tobytes() for e in a}
    assert not held_out & {e.image.tobytes() for e in a}
    assert a[0].image.size == (56, 56)  # 2 x 2 cells of 28 pixels, on the merged patch grid


# ---------------------------------------------------------------- processor and checkpoints


def test_processor_round_trip_keeps_tokens_pixels_and_template(tmp_path):
    processor = image_text_processor()
    example = make_task(TASK).eval_examples()[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "1="}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|vision_start|><|image_pad|><|vision_end|>1="
    before = processor(text=[text], images=[example.image], return_tensors="pt")
    # 56 x 56 pixels: 4 x 4 patches of 14, merged 2 x 2 into 4 image tokens.
    assert before["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert (before["input_ids"] == processor.image_token_id).sum() == 4
    processor.save_pretrained(tmp_path)
    reloaded = load_tokenizer_dir(tmp_path)
    assert isinstance(reloaded, ImageTextProcessor)
    assert isinstance(reloaded.image_processor, Qwen2VLImageProcessorPil)
    after = reloaded(text=[text], images=[example.image], return_tensors="pt")
    assert torch.equal(before["input_ids"], after["input_ids"])
    assert torch.equal(before["pixel_values"], after["pixel_values"])
    assert reloaded.chat_template == processor.chat_template


def load_tokenizer_dir(path):
    # load_tokenizer decides by the model config; a bare processor folder has none.
    return ImageTextProcessor.from_pretrained(str(path))


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_bf16_vl_checkpoint_reloads_with_its_processor(tmp_path, make_checkpoint, arch):
    path = make_checkpoint(tmp_path / "ckpt", seed=0, arch=arch)
    stored = load_file(str(path / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert any(n.startswith("visual.merger.") for n in stored)
    model, processor = load_model(path), load_tokenizer(path)
    assert isinstance(processor, ImageTextProcessor)
    assert next(model.parameters()).dtype == torch.float32
    reloaded = {canonical_name(n): p for n, p in model.named_parameters()}
    assert {canonical_name(n) for n in stored} == set(reloaded)
    for name, tensor in stored.items():
        assert torch.equal(reloaded[canonical_name(name)].detach().bfloat16(), tensor), name
    # The reloaded pair answers (greedy, with the image) without error.
    assert 0 <= exact_match(model, processor, make_task(TASK).eval_examples(), make_task(TASK)) <= 1


def test_vl_tensor_names_map_to_the_language_scheme_and_vision_blocks():
    processor = image_text_processor()
    model = build_model("qwen2_vl", processor, 0, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                        vision={"depth": 1, "embed_dim": 16, "num_heads": 2, "mlp_ratio": 2})
    groups = {name: classify(name) for name, _ in model.named_parameters()}
    blocks = {g.block for g in groups.values()}
    assert {"vision", "projector", "attention", "ffn", "embedding", "lm_head", "norm"} <= blocks
    language = {g.name for n, g in groups.items() if n.startswith("model.language_model.")}
    assert "model.layers.0.mlp.down_proj.weight" in language
    assert classify("model.language_model.layers.0.self_attn.q_proj.weight").module == "q"
    assert classify("visual.merger.mlp.0.weight").block == "projector"
    assert classify("model.visual.blocks.0.attn.qkv.weight").block == "vision"
    assert classify("visual.blocks.0.mlp.fc1.weight").layer == 0


@pytest.mark.parametrize("architecture, vision", [
    ("qwen2_vl", {"depth": 1, "embed_dim": 16, "num_heads": 2, "mlp_ratio": 2}),
    ("qwen2_5_vl", {"depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32,
                    "fullatt_block_indexes": [0]}),
])
def test_module_types_count_the_vision_towers_mlp_as_ffn(architecture, vision):
    """The paper's module energy blocks: the tower's MLP (fc1/fc2 in Qwen2-VL, gate/up/down in
    Qwen2.5-VL) in FFN, its attention in attention, its norms in norm, its patch embedding and
    projector in other; a language tensor's type is its block."""
    model = build_model(architecture, image_text_processor(), 0, hidden_size=16,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                        intermediate_size=32, vision=vision)
    types = {}
    for name, _ in model.named_parameters():
        group = classify(name)
        if group.block in ("vision", "projector"):
            types[group.name.removeprefix("visual.")] = type_block(name)
        else:
            assert type_block(name) == group.block, name
    tower = {name: kind for name, kind in types.items() if name.startswith("blocks.0.")}
    assert {kind for name, kind in tower.items() if ".mlp." in name} == {"ffn"}
    assert {kind for name, kind in tower.items() if ".attn." in name} == {"attention"}
    assert {kind for name, kind in tower.items() if ".norm" in name} == {"norm"}
    assert len(tower) == len([n for n in tower if ".mlp." in n or ".attn." in n or ".norm" in n])
    assert {kind for name, kind in types.items() if not name.startswith("blocks.")} == {"other"}


# ---------------------------------------------------------------- runs with images


def run_spec(kind, loss="reverse_kl", mask=None, steps=2):
    config = {"training": {"steps": steps, "batch_size": 4, "save_every": 1, "prompts": 8,
                           "loss": loss, "topk": 4, "generations_per_prompt": 2,
                           "optimizers": {"adamw": {"learning_rate": 1e-2}}},
              "pairs": {"p": {"student": "s", "teachers": ["t"]}}}
    return RunSpec(f"p-{kind}-{loss}", kind, "p", "s", "t", "adamw", 0, mask=mask,
                   training=pair_training(config, "p"))


@pytest.mark.train
@pytest.mark.parametrize("kind,loss", [("opd", "reverse_kl"), ("opd", "forward_kl_topk"),
                                       ("opd", "sampled_k1"), ("sft", "reverse_kl"),
                                       ("grpo", "reverse_kl")])
def test_every_run_kind_trains_a_vl_student_and_saves_its_processor(tiny_vl_pair, tmp_path,
                                                                    kind, loss):
    student, teacher = tiny_vl_pair
    train_run(run_spec(kind, loss), student, teacher, TASK, tmp_path / "r", "cpu")
    before = load_file(str(student / "model.safetensors"))
    after = load_file(str(tmp_path / "r" / "final" / "model.safetensors"))
    # A random student earns no reward, so GRPO's advantages (and updates) are all zero.
    if kind != "grpo":
        # The vision tower trains too: the images reached the student's forward.
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert len((tmp_path / "r" / "train_log.csv").read_text().splitlines()) == 3
    assert isinstance(load_tokenizer(tmp_path / "r" / "final"), ImageTextProcessor)
    assert (tmp_path / "r" / "checkpoints" / "step-1" / "processor_config.json").exists()


def test_grpo_reward_reads_conversational_completions():
    reward = verifier_reward(make_task(TASK))
    completions = [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "2"}]]
    assert reward(prompts=None, completions=completions, answer=["3", "3"]) == [1.0, 0.0]
    assert reward(prompts=None, completions=["3", "1"], answer=["3", "3"]) == [1.0, 0.0]


@pytest.mark.train
def test_masked_vl_run_keeps_coordinates_outside_the_mask(tiny_vl_pair, tmp_path):
    student, teacher = tiny_vl_pair
    shapes = {k: v.shape for k, v in load_file(str(student / "model.safetensors")).items()}
    mask = random_mask_with_density(shapes, 0.3, seed=0)
    save_mask(mask, tmp_path / "mask.safetensors")
    train_run(run_spec("masked", mask="m"), student, teacher, TASK, tmp_path / "r", "cpu",
              mask_path=tmp_path / "mask.safetensors")
    moved = mask_from_delta(student, tmp_path / "r" / "final", atol=0.0)
    assert sum(int(m.sum()) for m in moved.values()) > 0
    for name, m in moved.items():
        assert not (m & ~mask[name]).any(), name


# ---------------------------------------------------------------- bad input


def test_teacher_with_another_processor_is_rejected_before_training(tiny_vl_pair, tmp_path,
                                                                     make_checkpoint):
    student, _ = tiny_vl_pair
    other = image_text_processor(max_pixels=28 * 28 * 4)
    teacher = make_checkpoint(tmp_path / "t", seed=3, arch="qwen2_vl", tokenizer=other)
    with pytest.raises(ValueError, match="different processors"):
        train_run(run_spec("opd"), student, teacher, TASK, tmp_path / "r", "cpu")
    assert not (tmp_path / "r" / "final").exists()


def test_language_teacher_for_a_vl_student_is_rejected(tiny_vl_pair, tiny_pair, tmp_path):
    student, _ = tiny_vl_pair
    _, teacher = tiny_pair
    with pytest.raises(ValueError, match="different processors"):
        train_run(run_spec("opd"), student, teacher, TASK, tmp_path / "r", "cpu")


def test_image_task_needs_a_vl_model(tiny_pair, tmp_path):
    student, teacher = tiny_pair
    with pytest.raises(ValueError, match="vision-language"):
        train_run(run_spec("opd"), student, teacher, TASK, tmp_path / "r", "cpu")
