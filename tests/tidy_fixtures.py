"""Small synthetic tidy tables shaped like the smoke DAG's (runs from the real run naming),
for the figure, paper-table and findings tests: no DAG, no checkpoints."""

import copy

import numpy as np
import pandas as pd

from opdgeo.config import build_masks, build_runs, run_table
from opdgeo.delta import columns as c
from opdgeo.delta.grouping import add_enrichment, aggregate, overlap_metrics
from opdgeo.paper_tables import PAPER_MASK_DENSITY

CONFIG = {
    "models": {"teacher-a": {"path": "a"}, "teacher-b": {"path": "b"},
               "student": {"path": "s"}},
    "training": {"steps": 40, "save_every": 10,
                 "optimizers": {"adamw": {"learning_rate": 1e-4},
                                "sgd": {"learning_rate": 1e-2}}},
    "pairs": {"addition": {"student": "student", "teachers": ["teacher-a", "teacher-b"],
                           "masked": {"arms": ["opd", "random", "run:grpo"]}}},
}
# Per kind: (relative norm, sparsity, top-16, low-magnitude coverage) the synthetic runs get.
KIND_VALUES = {"opd": (0.002, 0.80, 0.40, 0.35), "sft": (0.02, 0.30, 0.20, 0.12),
               "grpo": (0.003, 0.75, 0.30, 0.30), "masked": (0.002, 0.85, 0.40, 0.36),
               "external": (0.004, 0.70, 0.35, 0.30), "opsd": (0.0015, 0.88, 0.40, 0.45),
               "op2sd": (0.0025, 0.78, 0.40, 0.33)}
MODULES = {"q": "attention", "k": "attention", "v": "attention", "o": "attention",
           "gate": "ffn", "up": "ffn", "down": "ffn"}
# A tensor's name per module, as a checkpoint spells it (opdgeo.naming reads the names).
TENSOR_NAMES = {"q": "model.layers.{layer}.self_attn.q_proj.weight",
                "k": "model.layers.{layer}.self_attn.k_proj.weight",
                "v": "model.layers.{layer}.self_attn.v_proj.weight",
                "o": "model.layers.{layer}.self_attn.o_proj.weight",
                "gate": "model.layers.{layer}.mlp.gate_proj.weight",
                "up": "model.layers.{layer}.mlp.up_proj.weight",
                "down": "model.layers.{layer}.mlp.down_proj.weight",
                "vision": "visual.blocks.{layer}.mlp.fc1.weight"}


def config(seeds=(0,), optimizers=("adamw", "sgd"), arms=("opd", "random", "run:grpo"),
           external=False, sweep=False, vision=False, self_distillation=False) -> dict:
    cfg = copy.deepcopy(CONFIG)
    cfg["training"]["seeds"] = list(seeds)
    cfg["training"]["optimizers"] = {k: v for k, v in cfg["training"]["optimizers"].items()
                                     if k in optimizers}
    cfg["pairs"]["addition"]["masked"]["arms"] = list(arms)
    if self_distillation:
        cfg["pairs"]["addition"]["controls"] = ["sft", "grpo", "opsd", "op2sd"]
    if sweep:
        cfg["pairs"]["addition"]["sweep"] = {"learning_rates": [1e-5, 1e-3],
                                             "kinds": ["opd", "sft"]}
    if external:
        cfg["external"] = {"ext-opd": {"source": "x", "trained": "y", "kind": "opd"}}
    if vision:  # a vision-language pair beside the language one, with the paper's VL arms
        cfg["models"] |= {"vl-teacher": {"path": "vt"}, "vl-student": {"path": "vs"}}
        cfg["pairs"]["squares"] = {
            "student": "vl-student", "teachers": ["vl-teacher"], "task": {"kind": "squares"},
            "masked": {"arms": ["opd", "random", "run:grpo", "random:grpo"]}}
    return cfg


def _default(declared: c.Metric) -> float:
    """A plausible value of a metric, by its unit: every declared metric gets one, so a
    figure, table or finding that reads a newly declared metric finds it here."""
    if "weight units" in declared.unit:
        return 1e-3
    return {"%": 0.5, "unitless": 8.0, "count": 4096.0}.get(declared.unit, 1.0)


# Every declared metric a tensor row or the global summary has (a group's energy share: only
# in group tables), at its default value; a test's own values replace some.
DECLARED = {name: _default(declared) for name, declared in c.METRICS.items()
            if name != c.ENERGY_SHARE}


def _summary(kind: str, rng) -> dict[str, float]:
    norm, sparsity, top16, low = KIND_VALUES[kind]
    jitter = lambda v: v * (1 + 0.05 * rng.standard_normal())  # noqa: E731
    metrics = DECLARED | {
        c.RELATIVE_NORM: jitter(norm), c.SPARSITY: jitter(sparsity),
        c.EXACT_ZERO: jitter(sparsity) * 0.99,
        c.TOP16_ENERGY: jitter(top16), c.STABLE_RANK: jitter(8.0),
        c.NUMERICAL_RANK_FRACTION: 0.98,
        c.PRINCIPAL_PROJECTION: jitter(0.006),
        c.null_name("isotropic", c.PRINCIPAL_PROJECTION): 0.011,
        c.PRINCIPAL_COVERAGE: jitter(0.07),
        c.null_name("rounding", c.PRINCIPAL_COVERAGE): 0.07,
        c.LOW_MAGNITUDE_COVERAGE: jitter(low),
        c.median_name(c.PRINCIPAL_COVERAGE): jitter(0.08),
        c.median_name(c.LOW_MAGNITUDE_COVERAGE): jitter(low * 0.9),
        c.null_name("rounding", c.LOW_MAGNITUDE_COVERAGE): low * 0.98,
        c.null_name("exact", c.LOW_MAGNITUDE_COVERAGE): low * 0.99,
        c.null_name("exact", c.SPARSITY): sparsity * 0.995,
        c.null_name("shuffle", c.TOP16_ENERGY): 0.25,
        c.null_name("shuffle", c.NUMERICAL_RANK_FRACTION): 1.0,
    }
    for i, eps in enumerate(c.ABSOLUTE_EPS):
        metrics[c.sparsity_name(eps)] = min(1.0, sparsity * (0.9 + 0.03 * i))
    for i, tau in enumerate(c.RELATIVE_TAUS):
        metrics[c.relative_sparsity_name(tau)] = min(1.0, sparsity * (0.95 + 0.04 * i))
    metrics = add_enrichment(metrics)  # coverage / density, as the analysis computes it
    # under their global-summary names, as the analysis writes them (medians as `_median`)
    values = {c.summary_name(name): value for name, value in metrics.items()}
    values |= {alias: values[name] for alias, name in c.SUMMARY_ALIASES.items()}
    shares = {"ffn": 0.6, "attention": 0.3, "embedding": 0.07, "norm": 0.03}
    return values | {f"{kind}_energy_share/{block}": share for block, share in shares.items()
                     for kind in ("block", "type")}


def tables(cfg: dict | None = None, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Every tidy table the renderers read, for the runs of `cfg`."""
    cfg = cfg or config()
    rng = np.random.default_rng(seed)
    runs = build_runs(cfg)
    info = run_table(runs)
    steps = cfg["training"]["steps"]
    evaluation, delta, trajectory, optimizer, layer_module, tensors = [], [], [], [], [], []
    for model, score in (("teacher-a", 0.95), ("teacher-b", 0.93), ("student", 0.20)):
        evaluation += [(model, 0, "exact_match", score), (model, 0, "mean@2", score - 0.02)]
    for name, spec in runs.items():
        final = steps if spec.is_trained else np.nan
        # sweep cells: a larger learning rate moves more coordinates and gains more
        lr_factor = 1.0
        if spec.group == "sweep":
            lr = spec.training["optimizers"][spec.optimizer]["learning_rate"]
            lr_factor = 0.5 if lr > 1e-4 else 1.1
        summary = _summary(spec.kind, rng)
        if spec.pair == "squares":  # the vision tower and its projector move too
            summary |= {"block_energy_share/ffn": 0.45, "block_energy_share/vision": 0.1,
                        "block_energy_share/projector": 0.05,
                        # by module type: the tower's MLP, attention and norms, the projector
                        "type_energy_share/ffn": 0.45 + 0.06,
                        "type_energy_share/attention": 0.3 + 0.03,
                        "type_energy_share/norm": 0.03 + 0.01,
                        "type_energy_share/other": 0.05}
        for metric, value in summary.items():
            delta.append((name, final, metric,
                          value * lr_factor if metric.startswith("sparsity") else value))
        if not spec.is_trained:
            continue
        for step in range(10, spec.training["steps"] + 1, 10):
            score = 0.2 + 0.5 * (1 - np.exp(-step / 15)) / lr_factor \
                + 0.02 * rng.standard_normal()
            score -= 0.1 if spec.optimizer == "sgd" or "random" in name else 0
            evaluation += [(name, step, "exact_match", score), (name, step, "mean@2", score)]
            for metric, value in _summary(spec.kind, rng).items():
                trajectory.append((name, step, metric, value * (0.5 + step / (2 * steps))))
            if spec.optimizer == "adamw":
                for block in ("all", "ffn", "attention"):
                    optimizer += [(name, step, block, "m2_cv", 4 + rng.random())]
                    if step > 10:
                        optimizer += [(name, step, block, "m1_cosine", 0.9 - step / 50),
                                      (name, step, block, "m1_cosine_interval", 0.8 - step / 50),
                                      (name, step, block, "m1_cosine_first", 1 - step / 40)]
    for name, spec in runs.items():
        modules = MODULES | ({"vision": "vision"} if spec.pair == "squares" else {})
        for layer in range(2):
            for module, block in modules.items():
                sparsity = KIND_VALUES[spec.kind][1] + 0.05 * rng.standard_normal()
                layer_module.append({"run": name, "layer": layer, "module": module,
                                     c.SPARSITY: sparsity,
                                     c.RELATIVE_NORM: 0.002 * (1 + layer + rng.random())})
                numel = 64 * 128 if block == "ffn" else 64 * 64
                tensors.append(add_enrichment(DECLARED | {
                    "run": name, "name": TENSOR_NAMES[module].format(layer=layer),
                    "layer": layer, "module": module, "block": block,
                    "shape": "128x64" if block == "ffn" else "64x64", "numel": numel,
                    "delta_energy": 1e-6 * (3 if block == "ffn" else 1),
                    "source_energy": 1.0, "linf": 1e-3, c.SPARSITY: sparsity,
                    c.EXACT_ZERO: sparsity * 0.99, c.TOP16_ENERGY: 0.4,
                    c.STABLE_RANK: 8 + rng.random(), c.NUMERICAL_RANK_FRACTION: 0.97,
                    c.PRINCIPAL_PROJECTION: 0.006, c.SUBSPACE_ROTATION: 0.01,
                    c.LOW_MAGNITUDE_COVERAGE: 0.3,
                }))
    masks = [(m.name, "all", "all", m.density if isinstance(m.density, float)
              else 0.2 if m.method == "atol" else 0.21)
             for m in build_masks(cfg, PAPER_MASK_DENSITY).values()]
    primary = next(n for n, s in runs.items() if s.kind == "opd")
    others = [n for n, s in runs.items() if s.kind in ("sft", "grpo")]
    # Per-tensor mask counts of each pair, and its pooled values from them as overlap_runs
    overlap, overlap_tensors = [], []
    counts = pd.DataFrame({"name": [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)],
                           "numel": [400, 600, 1000], "count_a": [80, 150, 170],
                           "count_b": [100, 120, 280], "count_both": [40, 60, 60]})
    for other in others:
        overlap_tensors.append(counts.assign(run_a=primary, run_b=other))
        pooled = overlap_metrics(*(float(counts[c].sum())
                                   for c in ("count_a", "count_b", "count_both", "numel")))
        for metric, value in (*pooled.items(), ("blocks/ffn/jaccard", 0.31)):
            overlap.append((primary, other, metric, value))
    tidy = ["run", "step", "metric", "value"]
    return {
        "runs": info,
        "evaluation": pd.DataFrame(evaluation, columns=tidy),
        "delta_global": pd.DataFrame(delta, columns=tidy),
        "trajectory": pd.DataFrame(trajectory, columns=tidy),
        "optimizer_state": pd.DataFrame(optimizer, columns=["run", "step", "block", "metric",
                                                            "value"]),
        "training_log": pd.DataFrame(),
        "masks": pd.DataFrame(masks, columns=["mask", "tensor", "block", "density"]),
        "overlap": pd.DataFrame(overlap, columns=["run_a", "run_b", "metric", "value"]),
        "overlap_tensors": pd.concat(overlap_tensors, ignore_index=True),
        "layer_module": pd.DataFrame(layer_module),
        "modules": _modules(pd.DataFrame(tensors)),
        "tensors": pd.DataFrame(tensors),
    }


def _modules(tensors: pd.DataFrame) -> pd.DataFrame:
    """Per run, the analysis's own per-module table (its modules.csv), as collected."""
    frames = [aggregate(rows.drop(columns="run"), ["module"]).assign(run=run)
              for run, rows in tensors.groupby("run", sort=False)]
    return pd.concat(frames, ignore_index=True)


def write(folder, frames: dict[str, pd.DataFrame]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame.to_csv(folder / f"{name}.csv", index=False)
    return folder
