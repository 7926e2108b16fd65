"""Every architecture of the paper's pairs, built tiny: one OPD step, then the delta analysis.

Qwen2 (DS-Qwen, Qwen2.5-Math), Qwen3 (Qwen3-1.7B / 4B), Llama-style, and MiniCPM3, the MiniCPM
that transformers supports natively. The first case also runs the GPU path's settings that
work on a CPU: bf16 mixed precision and gradient checkpointing.
"""

import json
import sys
import types

import pytest

from opdgeo.config import RunSpec, pair_training
from opdgeo.delta.analyze import analyze_checkpoints
from opdgeo.models import build_model, character_tokenizer, save_checkpoint
from opdgeo.naming import classify
from opdgeo.train import train_run

TASK = {"digits": 2, "eval_prompts": 8, "seed": 0}
# Extra config values an architecture needs to be tiny (MiniCPM3's latent attention ranks).
EXTRA = {"minicpm3": dict(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                          qk_rope_head_dim=8, v_head_dim=8)}


def tiny(arch, path, seed, hidden):
    tokenizer = character_tokenizer()
    model = build_model(arch, tokenizer, seed, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1 if arch != "minicpm3" else 2,
                        intermediate_size=2 * hidden, **EXTRA.get(arch, {}))
    save_checkpoint(model, tokenizer, path)
    return model


@pytest.mark.train
@pytest.mark.parametrize("arch,gpu_settings", [
    ("qwen2", True), ("qwen3", False), ("llama", False), ("minicpm3", False),
])
def test_one_opd_step_and_the_analysis(arch, gpu_settings, tmp_path):
    model = tiny(arch, tmp_path / "student", seed=0, hidden=32)
    tiny(arch, tmp_path / "teacher", seed=1, hidden=48)
    # Every attention and FFN weight of the architecture is named into its block.
    matrices = [n for n, p in model.named_parameters() if p.dim() == 2]
    blocks = {classify(n).block for n in matrices}
    assert blocks == {"attention", "ffn", "embedding", "lm_head"}, {
        n: classify(n).block for n in matrices}

    training = {"steps": 1, "batch_size": 4, "save_every": 1, "prompts": 8,
                "generations_per_prompt": 1, "optimizers": {"adamw": {"learning_rate": 1e-3}}}
    if gpu_settings:
        training.update(bf16="on", gradient_checkpointing=True, micro_batch_size=2)
    config = {"training": training, "pairs": {"p": {"student": "s", "teachers": ["t"]}}}
    spec = RunSpec(f"p-opd-{arch}", "opd", "p", "s", "t", "adamw", 0,
                   training=pair_training(config, "p"))
    train_run(spec, tmp_path / "student", tmp_path / "teacher", TASK, tmp_path / "run", "cpu")

    summary = analyze_checkpoints(tmp_path / "student", tmp_path / "run" / "final",
                                  tmp_path / "analysis", device="cpu", nulls=False)
    assert json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary  # the analysis read every tensor of the architecture
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert len(log) == 2 and log[1].startswith(f"{spec.name},1,")


def test_micro_batches_split_the_batch_over_processes(monkeypatch):
    from opdgeo.train import _micro_batches

    assert _micro_batches(128, 8) == (8, 16)
    monkeypatch.setenv("WORLD_SIZE", "4")  # what `accelerate launch --num_processes 4` sets
    assert _micro_batches(128, 8) == (8, 4)
    assert _micro_batches(128, None) == (32, 1)
    with pytest.raises(ValueError, match="micro_batch_size"):
        _micro_batches(128, 48)


def test_use_vllm_without_vllm_is_a_clear_error(monkeypatch):
    from trl import DistillationConfig

    from opdgeo.train import _generation_backend

    assert _generation_backend({"use_vllm": False}, DistillationConfig) == {}
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(RuntimeError, match="use_vllm: false"):
        _generation_backend({"use_vllm": True}, DistillationConfig)


def test_trl_vllm_settings_pass_through(monkeypatch):
    from trl import DistillationConfig, GRPOConfig

    from opdgeo.train import _generation_backend

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    vllm = {"gpu_memory_utilization": 0.3, "max_model_length": 9216,
            "tensor_parallel_size": 2, "enable_sleep_mode": True}
    for config_cls in (DistillationConfig, GRPOConfig):
        assert _generation_backend({"use_vllm": True, "vllm": vllm}, config_cls) == {
            "use_vllm": True, "vllm_mode": "colocate",
            **{f"vllm_{key}": value for key, value in vllm.items()}}
    with pytest.raises(ValueError, match="no \\['vllm_gpu_memory'\\]"):
        _generation_backend({"use_vllm": True, "vllm": {"gpu_memory": 0.3}}, DistillationConfig)
