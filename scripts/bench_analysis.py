"""Benchmark `opdgeo analyze` on a synthetic bf16 pair shaped like Qwen2.5-0.5B.

Builds the pair on local disk (24 layers, hidden 896, intermediate 4864, 14 heads / 2 KV
heads of dim 64, vocab 151936, tied embeddings; source ~ N(0, 0.02^2), a sparse low-rank
update), then times in fresh processes, each with its own peak RSS:
- the full analysis (every metric and null), and the analysis without the isotropic and
  shuffle nulls;
- the SVD floor: torch.linalg.svd of every source matrix plus torch.linalg.svdvals of every
  delta, the least any exact spectral analysis of the pair must do;
- a run's whole analysis as the workflow runs it: the source decomposed once (`decompose`),
  the final checkpoint against it (`final`, every null), and a trajectory of --checkpoints
  intermediate checkpoints (`trajectory`; checkpoint i holds i/N of the final update), beside
  one full analysis (`full`, which decomposes the source itself). Goals: final + a
  5-checkpoint trajectory within 1.5x one full analysis (printed with and without the
  decomposition, which a source's runs share). N runs on one source cost decompose + N x
  final, against N x full;
- the memory reference: a plain per-tensor loop (`plain`: float32 copies, dW whole, full
  SVDs), one tensor at a time like the analysis. Goal: the full analysis's peak RSS <= 1.56 GB.
Target on 2 cores: <= 90 s and <= 2 GB peak RSS. Each line also gives the process's CPU
time, which on a shared machine measures the work where wall time measures the neighbours.

    PYTHONPATH=scripts python scripts/bench_analysis.py [--layers 24] [--threads 2]
        [--tasks full,decompose,final,trajectory] [--repeat 3]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 896, 4864, 14, 2, 64, 151936
SOURCE_STD = 0.02
UPDATE_RANK, UPDATE_DENSITY, UPDATE_SCALE = 8, 0.2, 3e-4


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    prefix = f"model.layers.{layer}."
    return {
        prefix + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        prefix + "self_attn.q_proj.bias": (HEADS * HEAD_DIM,),
        prefix + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        prefix + "self_attn.k_proj.bias": (KV_HEADS * HEAD_DIM,),
        prefix + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        prefix + "self_attn.v_proj.bias": (KV_HEADS * HEAD_DIM,),
        prefix + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        prefix + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        prefix + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        prefix + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        prefix + "input_layernorm.weight": (HIDDEN,),
        prefix + "post_attention_layernorm.weight": (HIDDEN,),
    }


# Threads that sleep instead of spinning while they wait: on a shared machine spinning
# OpenMP threads slow LAPACK calls several-fold, which would measure the neighbours.
CHILD_ENVIRONMENT = {"PYTHONPATH": str(Path(__file__).parent), "OMP_WAIT_POLICY": "PASSIVE"}


def tensor_pair(shape: tuple[int, ...], generator: torch.Generator):
    """A source tensor and its trained copy: a sparse low-rank update, rounded to bf16."""
    source = (torch.randn(shape, generator=generator) * SOURCE_STD).bfloat16()
    if len(shape) == 1:
        update = torch.randn(shape, generator=generator) * UPDATE_SCALE
    else:
        left = torch.randn(shape[0], UPDATE_RANK, generator=generator)
        right = torch.randn(UPDATE_RANK, shape[1], generator=generator)
        update = (left @ right) * (UPDATE_SCALE / UPDATE_RANK**0.5)
    update *= torch.rand(shape, generator=generator) < UPDATE_DENSITY
    return source, (source.float() + update).bfloat16()


def build_pair(root: Path, layers: int, seed: int = 0) -> None:
    """Write source/ and trained/ as one safetensors shard per layer (bounded memory)."""
    generator = torch.Generator().manual_seed(seed)
    config = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "num_hidden_layers": layers,
              "vocab_size": VOCAB, "tie_word_embeddings": True}
    shards = [{"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}]
    shards += [layer_shapes(layer) for layer in range(layers)]
    weight_map = {}
    for folder in ("source", "trained"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "config.json").write_text(json.dumps(config))
    for index, shapes in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        pairs = {name: tensor_pair(shape, generator) for name, shape in shapes.items()}
        save_file({n: p[0] for n, p in pairs.items()}, root / "source" / file_name)
        save_file({n: p[1] for n, p in pairs.items()}, root / "trained" / file_name)
        weight_map |= {name: file_name for name in shapes}
    for folder in ("source", "trained"):
        index_file = root / folder / "model.safetensors.index.json"
        index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def build_checkpoints(root: Path, count: int) -> None:
    """checkpoints/step-i: source + i/count of the final update, rounded to bf16."""
    for step in range(1, count + 1):
        folder = root / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        for file in (root / "trained").iterdir():
            if file.suffix != ".safetensors":
                (folder / file.name).write_bytes(file.read_bytes())
                continue
            with safe_open(root / "source" / file.name, "pt") as source_file, \
                    safe_open(file, "pt") as trained_file:
                tensors = {name: (source_file.get_tensor(name).float() + step / count * (
                    trained_file.get_tensor(name).float() - source_file.get_tensor(name).float())
                ).bfloat16() for name in trained_file.keys()}
            save_file(tensors, folder / file.name)


def svd_floor(root: Path) -> None:
    """svd of every source matrix + svdvals of every delta, plain torch calls."""
    index = json.loads((root / "source" / "model.safetensors.index.json").read_text())
    for name, file_name in index["weight_map"].items():
        with safe_open(root / "source" / file_name, "pt") as source_file, \
                safe_open(root / "trained" / file_name, "pt") as trained_file:
            source = source_file.get_tensor(name).float()
            if source.dim() != 2:
                continue
            delta = trained_file.get_tensor(name).float() - source
        torch.linalg.svd(source, full_matrices=False)
        torch.linalg.svdvals(delta)


def plain_loop(root: Path) -> None:
    """A plain per-tensor loop over the same core measures, as a direct implementation would
    write them: both tensors as float32 copies, dW whole, a full SVD of every source matrix,
    the singular values of dW and of its entries shuffled, the delta's statistics whole-tensor
    (the memory reference: one tensor at a time, nothing streamed)."""
    index = json.loads((root / "source" / "model.safetensors.index.json").read_text())
    generator = torch.Generator().manual_seed(0)
    for name, file_name in index["weight_map"].items():
        with safe_open(root / "source" / file_name, "pt") as source_file, \
                safe_open(root / "trained" / file_name, "pt") as trained_file:
            source = source_file.get_tensor(name).float()
            delta = trained_file.get_tensor(name).float() - source
        magnitude = delta.abs()
        [float((magnitude <= t).double().mean()) for t in (0.0, 1e-8, 1e-6, 1e-5, 1e-4)]
        float((delta.double() ** 2).sum())
        if source.dim() < 2:
            continue
        torch.linalg.svd(source, full_matrices=False)
        torch.linalg.svdvals(delta)
        order = torch.randperm(delta.numel(), generator=generator)
        torch.linalg.svdvals(delta.reshape(-1)[order].view_as(delta))


def child(task: str, root: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    geometry = root / "geometry"
    if task == "floor":
        svd_floor(root)
    elif task == "plain":
        plain_loop(root)
    elif task == "decompose":
        from opdgeo.delta.source import write_geometry

        write_geometry(root / "source", geometry)
    elif task == "trajectory":
        from opdgeo.delta.analyze import analyze_trajectory

        analyze_trajectory(root / "source", root / "checkpoints", geometry, device="cpu")
    else:
        from opdgeo.delta.analyze import analyze_checkpoints

        analyze_checkpoints(root / "source", root / "trained", root / f"out-{task}",
                            device="cpu", nulls=task != "issue3",
                            geometry=geometry if task == "final" else None)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": time.perf_counter() - started,
                      "cpu_seconds": usage.ru_utime + usage.ru_stime,
                      "peak_rss_gb": peak_rss_kib() / 2**20}))


def peak_rss_kib() -> int:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    across fork and exec, so a child forked from the parent that built the 2 GB pair would
    report the parent's size whatever it did itself."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the best there is


def measure(task: str, root: Path, threads: int) -> dict:
    """Run one task in a fresh process; it reports its wall time and peak RSS."""
    output = subprocess.run([sys.executable, __file__, "--child", task, "--root", str(root),
                             "--threads", str(threads)], check=True, capture_output=True,
                            text=True, env=os.environ | CHILD_ENVIRONMENT)
    return json.loads(output.stdout.strip().splitlines()[-1])


def rounds_count(text: str) -> int:
    """--repeat's value: a whole number of rounds, at least one."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--repeat takes a number of rounds >= 1, got {text!r}")
    return int(text)


def median_result(runs: list[dict]) -> dict:
    """One task's rounds: the median of each clock, the largest peak RSS."""
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", default="full,floor,plain,decompose,final,trajectory",
                        help="comma list of: issue3 (no nulls), full, floor, plain (a plain "
                             "per-tensor loop), and in this order decompose, final, trajectory")
    parser.add_argument("--checkpoints", type=int, default=5,
                        help="intermediate checkpoints of the trajectory task")
    parser.add_argument("--repeat", type=rounds_count, default=1,
                        help="rounds of the tasks, one after another: each figure is the "
                             "median over rounds, each ratio given per round as well")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.threads)
        return
    with tempfile.TemporaryDirectory(prefix="bench_analysis_") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        build_pair(root, args.layers)
        if "trajectory" in args.tasks:
            build_checkpoints(root, args.checkpoints)
        print(f"built the pair ({args.layers} layers) in {time.perf_counter() - started:.0f} s; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
              f"{args.threads} torch threads")
        rounds = [{task: measure(task, root, args.threads) for task in args.tasks.split(",")}
                  for _ in range(args.repeat)]
    results = {task: median_result([one[task] for one in rounds]) for task in rounds[0]}
    labels = {"issue3": "analysis without isotropic/shuffle nulls",
              "full": "full analysis (all metrics and nulls)",
              "floor": "SVD floor (svd of sources + svdvals of deltas)",
              "plain": "plain per-tensor loop (float32 copies, full SVDs)",
              "decompose": "source decomposition (once per source)",
              "final": "final analysis against the decomposition",
              "trajectory": f"trajectory of {args.checkpoints} checkpoints"}
    for task, result in results.items():
        print(f"{labels[task]:48s} wall {result['seconds']:7.1f} s   "
              f"CPU {result['cpu_seconds']:7.1f} s   peak RSS {result['peak_rss_gb']:.2f} GB")
    if "floor" in results:
        for task in ("issue3", "full"):
            if task in results:
                wall = results[task]["seconds"] / results["floor"]["seconds"]
                cpu = results[task]["cpu_seconds"] / results["floor"]["cpu_seconds"]
                print(f"{task} / floor: wall {wall:.2f}, CPU {cpu:.2f}")
    if "full" in results:
        for task in ("floor", "plain"):
            if task in results:
                print(f"peak memory: full analysis {results['full']['peak_rss_gb']:.2f} GB "
                      f"(goal <= 1.56), {task} {results[task]['peak_rss_gb']:.2f} GB: "
                      f"{results[task]['peak_rss_gb'] / results['full']['peak_rss_gb']:.2f}x "
                      f"leaner; time {results['full']['seconds'] / results[task]['seconds']:.2f}x"
                      f" the {task}'s wall, "
                      f"{results['full']['cpu_seconds'] / results[task]['cpu_seconds']:.2f}x "
                      f"its CPU")
    if {"full", "decompose", "final", "trajectory"} <= set(results):
        for clock in ("seconds", "cpu_seconds"):
            full, final, trajectory = (results[task][clock] for task in (
                "full", "final", "trajectory"))
            each = ", ".join(
                f"{(one['final'][clock] + one['trajectory'][clock]) / one['full'][clock]:.2f}"
                for one in rounds)
            print(f"{clock}: final + {args.checkpoints}-checkpoint trajectory = "
                  f"{(final + trajectory) / full:.2f} x one full analysis (goal <= 1.5)"
                  + (f"; per round {each}" if len(rounds) > 1 else ""))
        for clock in ("seconds", "cpu_seconds"):
            full, decompose, final, trajectory = (results[task][clock] for task in (
                "full", "decompose", "final", "trajectory"))
            print(f"{clock}: decompose + final + {args.checkpoints}-checkpoint trajectory = "
                  f"{(decompose + final + trajectory) / full:.2f} x one full analysis (goal "
                  f"<= 2); a trajectory checkpoint {trajectory / args.checkpoints / full:.2f} x; "
                  + "; ".join(f"{n} runs on one source {(decompose + n * final) / (n * full):.2f}"
                              f" x {n} full analyses" for n in (1, 3, 10)))
    print(f"load average at the end {os.getloadavg()[0]:.1f}: on a shared machine wall time "
          "includes the neighbours' share; CPU time does not")


if __name__ == "__main__":
    main()
