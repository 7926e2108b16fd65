"""`opdgeo plan`: the paper's bill from its config, and the options that cut it."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opdgeo.config import read_config
from opdgeo.plan import plan
from opdgeo.resources import PAPER_MODELS, GiB

ROOT = Path(__file__).resolve().parents[1]
OPD = "dsqwen-opd-deepscaler-adamw-s0"


@pytest.fixture(scope="module")
def paper():
    return read_config(ROOT / "config" / "paper.yaml")


def test_paper_bill_counts_tokens_checkpoints_and_disk(paper):
    table, notes = plan(paper)
    rows = table.set_index("run")
    opd, training = rows.loc[OPD], paper["training"]
    assert opd["steps"] == 544
    assert opd["rollout_tokens"] == 544 * 128 * paper["task"]["max_new_tokens"]
    # A checkpoint every 10 steps and the final one; each scored greedy and with 16 samples
    # on AIME24 + AIME25 (30 problems each).
    assert opd["checkpoints"] == 55
    assert opd["eval_generations"] == 55 * 60 * (1 + paper["evaluation"]["k"])
    params = PAPER_MODELS["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"].params
    assert opd["bf16_checkpoints_gib"] == pytest.approx(55 * 2 * params / GiB, abs=0.1)
    assert opd["fp32_master_gib"] == pytest.approx(4 * params / GiB, abs=0.1)
    # On the GPU: fp32 weights, gradients and AdamW's two moments, and the bf16 teacher.
    assert opd["train_gpu_gib"] * GiB >= 16 * params + 2 * params
    total = rows.loc["total"]
    trained = rows.drop(index="total")
    assert total["rollout_tokens"] == trained["rollout_tokens"].sum()
    assert total["train_gpu_hours"] == pytest.approx(trained["train_gpu_hours"].sum())
    assert total["train_gpu_gib"] == trained["train_gpu_gib"].max()  # a peak, not a sum
    assert training["micro_batch_size"] <= 2  # 8 would not fit (next test)
    assert any("assumed" in note and "not measured" in note for note in notes)
    # Every trained run is counted: the Qwen3 teacher (a folder not there yet) from the
    # shapes config/hub_models.yaml assumes for it, said so.
    assert trained.loc[[n for n in trained.index if not n.startswith("model ")],
                       "train_gpu_hours"].notna().all()
    assert any("assumed shapes" in note and "qwen3-4b-base-grpo" in note for note in notes)
    assert any(note.startswith("total:") and "largest single job" in note for note in notes)


def test_options_that_cut_the_bill(paper):
    wide = copy.deepcopy(paper)
    wide["training"]["micro_batch_size"] = 8
    _, notes = plan(wide)
    assert any(note.startswith(f"{OPD}: train needs") and "micro_batch_size" in note
               for note in notes)

    # As shipped, vLLM generates rollouts and evaluation samples; transformers is slower.
    assert paper["training"]["use_vllm"] and paper["evaluation"]["engine"] == "vllm"
    slow = copy.deepcopy(paper)
    slow["evaluation"]["engine"] = "hf"
    lean = copy.deepcopy(paper)
    lean["keep_checkpoints"] = False
    slow_table, _ = plan(slow)
    lean_table, _ = plan(lean)
    before, after = slow_table.set_index("run").loc[OPD], lean_table.set_index("run").loc[OPD]
    assert after["bf16_checkpoints_gib"] == pytest.approx(before["bf16_checkpoints_gib"] / 55,
                                                          abs=0.1)
    ratio = paper["cost"]["generate_tokens_per_second"]["vllm"] / paper["cost"][
        "generate_tokens_per_second"]["hf"]
    assert after["eval_gpu_hours"] == pytest.approx(before["eval_gpu_hours"] / ratio)


def test_plan_command_prints_the_bill(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "opdgeo.cli", "plan", "--configfile",
                             str(ROOT / "config" / "paper.yaml")], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert OPD in result.stdout and "total" in result.stdout
    assert "GPU" in result.stdout and "assumed" in result.stdout


def test_jobs_are_placed_on_a_partition_and_fitted_to_its_limits(tmp_path):
    from opdgeo.resources import Need, place, read_partitions

    (tmp_path / "p.yaml").write_text(
        "partitions:\n"
        "  short: {max_runtime: 60, max_mem_mb: 8000}\n"
        "  long: {max_runtime: '2-00:00:00', max_mem_mb: 64000}\n"
        "  gpu: {max_runtime: 2880, max_mem_mb: 100000, max_gpu: 4}\n")
    partitions = read_partitions(tmp_path / "p.yaml")
    assert read_partitions(tmp_path / "none.yaml") == []
    small, large = Need(2 * GiB, 0, 30.0), Need(90 * GiB, 60 * GiB, 5000.0)
    # The first partition that holds the whole request; a GPU job on one with its GPUs.
    assert place(small, 0, 1, partitions) == {"slurm_partition": "short", "mem_mb": 2048,
                                               "runtime": 30}
    assert place(Need(2 * GiB, 0, 90.0), 0, 1, partitions)["slurm_partition"] == "long"
    # Over every limit: the longest wall time, and the request cut to it on every attempt.
    for attempt in (1, 2):
        assert place(large, 0, attempt, partitions) == {
            "slurm_partition": "long", "mem_mb": 64000, "runtime": 2880}
        assert place(large, 4, attempt, partitions) == {
            "slurm_partition": "gpu", "mem_mb": 92160 if attempt == 1 else 100000,
            "runtime": 2880}
    with pytest.raises(ValueError, match="8 GPUs.*max_gpu"):
        place(large, 8, 1, partitions)
    # Without a partition file, the request as sized.
    assert place(large, 4, 1, []) == {"mem_mb": 92160, "runtime": 5000}


def test_plan_agrees_with_the_back_of_envelope_in_the_docs(paper):
    """docs/slurm.md's bill by hand (tokens from steps x batch x completion length, checkpoints
    as 2 bytes a parameter): the plan's totals within 2x of it, and of the same formulas
    computed here."""
    import re

    table, _ = plan(paper)
    total = table.set_index("run").loc["total"]
    text = (ROOT / "docs" / "slurm.md").read_text()
    by_hand = {key: float(value) for key, value in re.findall(
        r"^\| (rollout_tokens|eval_tokens|bf16_checkpoints_gib) \| ([\d.e+]+) \|", text, re.M)}
    assert set(by_hand) == {"rollout_tokens", "eval_tokens", "bf16_checkpoints_gib"}, by_hand
    for key, value in by_hand.items():
        assert value / 2 <= total[key] <= 2 * value, (key, value, total[key])


def test_plan_fits_100_columns_and_names_jobs_over_a_partition_limit(paper, tmp_path):
    from opdgeo.plan import format_plan
    from opdgeo.resources import read_partitions

    text = format_plan(*plan(paper))
    assert max(map(len, text.splitlines())) <= 100, text
    (tmp_path / "p.yaml").write_text("partitions:\n  gpu: {max_runtime: 600, max_gpu: 8,"
                                     " max_mem_mb: 20000}\n")
    _, notes = plan(paper, partitions=read_partitions(tmp_path / "p.yaml"))
    assert any(note.startswith(f"{OPD}: train needs") and "attempts" in note for note in notes)
    assert any("does not fit" in note for note in notes), notes
    _, notes = plan(paper, partitions=[])
    assert not any("attempts" in note for note in notes)


def test_plan_names_the_runs_that_need_sharded_training_and_why(paper):
    """The vision-language pair (3B student, 7B teacher) does not fit one 80 GB GPU by the
    plan's own numbers; sharded over 2 GPUs it does: unsharded, the plan says how to shard it
    (and never for DS-Qwen); as shipped it is sharded, and the plan gives its memory per GPU."""
    from opdgeo.config import build_runs
    from opdgeo.plan import format_plan
    from opdgeo.resources import Sizer, sharded_gpu

    vl = "qwen25vl-opd-noisyrollout-geo3k-7b-adamw-s0"
    usable = 0.9 * 80 * GiB
    unsharded = copy.deepcopy(paper)
    for pair in unsharded["pairs"].values():
        pair.get("training", {}).update(gpus=1, sharding="none")
    _, notes = plan(unsharded)
    [note] = [n for n in notes if n.startswith(f"{vl}: train needs")]
    assert "sharded over 2 GPUs" in note and "qwen25vl.training: {gpus: 2, sharding: fsdp}" in note
    assert not any(n.startswith(f"{OPD}: train") and "shard" in n for n in notes)
    assert not any(n.startswith("sharded training") for n in notes)
    sizer = Sizer(unsharded, build_runs(unsharded), on_gpu=True)
    need, logits = sizer.train(vl), sizer.logits(vl)
    assert sharded_gpu(need, logits, 1) == need.gpu
    assert logits < sharded_gpu(need, logits, 2) < usable < need.gpu

    table, notes = plan(paper)
    rows = table.set_index("run")
    assert paper["pairs"]["qwen25vl"]["training"]["sharding"] == "fsdp"
    assert rows.loc[vl, "train_sharding"] == "fsdp" and rows.loc[vl, "train_gpus"] == 2
    assert rows.loc[vl, "train_gpu_gib"] * GiB == pytest.approx(
        sharded_gpu(need, logits, 2), abs=0.05 * GiB)
    assert rows.loc[OPD, "train_sharding"] == "none"
    assert (rows.loc[rows["train_sharding"] == "fsdp", "train_gpu_gib"] * GiB < usable).all()
    assert not any("train needs" in n for n in notes), notes
    [line] = [n for n in notes if n.startswith("sharded training") and "qwen25vl's 5 runs" in n]
    assert f"~{sharded_gpu(need, logits, 2) / GiB:.0f} GiB per GPU" in line
    assert f"~{need.gpu / GiB:.0f} GiB" in line
    assert any(vl in row and "2 fsdp" in row for row in format_plan(table, notes).splitlines())
