"""The `opdgeo` command: one subcommand per verb. The only module that parses arguments.

Pipeline rules pass the settings they use as JSON (`--run-spec`, `--evaluation`, ...), so that
Snakemake tracks them as params and the package never reads the config file behind
Snakemake's back.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from safetensors import SafetensorError

from opdgeo.files import atomic, error_line

DESCRIPTION = """\
What on-policy distillation changes in a model: how sparse the update is, where it sits, and
how it relates to the source weights. `analyze` and `overlap` work on any two Hugging Face
checkpoints (local folders or hub ids); the other verbs are the steps of the pipeline, which
Snakemake runs for you (`snakemake -n -p` prints each step's full command)."""

# One line per verb: shown under "examples" in `opdgeo --help` (a test checks every verb).
EXAMPLES = {
    "analyze": "opdgeo analyze --source Qwen/Qwen2.5-1.5B --trained runs/opd/final "
               "--out delta/ --json",
    "decompose": "opdgeo decompose --source Qwen/Qwen2.5-1.5B --out sources/qwen "
                 "(then: opdgeo analyze ... --source-geometry sources/qwen)",
    "overlap": "opdgeo overlap --source S --trained-a runs/opd/final --trained-b runs/grpo/final "
               "--out overlap/",
    "train-model": "opdgeo train-model --name teacher --model-spec '{\"build\": ...}' "
                   "--task '{...}' --out results/models/teacher",
    "train-run": "opdgeo train-run --run-spec '{...}' --source S --teacher T --task '{...}' "
                 "--out results/runs/NAME",
    "model-card": "opdgeo model-card --run-spec '{...}' --source S --teacher T --task '{...}' "
                  "--scores eval.csv --summary delta/summary.json --checkpoint runs/NAME/final "
                  "--out runs/NAME/model_card.md",
    "base-model-card": "opdgeo base-model-card --name student --model-spec '{...}' "
                       "--task '{...}' --scores eval/models/student.csv "
                       "--checkpoint models/student/final --out models/student/model_card.md",
    "make-mask": "opdgeo make-mask --mask-spec '{\"method\": \"atol\", \"atol\": 1e-5}' "
                 "--source S --trained T --out m.safetensors --densities m.csv",
    "evaluate": "opdgeo evaluate --run NAME --checkpoint runs/NAME/final --task '{...}' "
                "--evaluation '{\"k\": 4, ...}' --out eval.csv",
    "collect": "opdgeo collect csv results/eval/runs/*.csv --out results/tables/evaluation.csv",
    "runs": "opdgeo runs --config '{\"pairs\": ..., \"models\": ...}' --out runs.csv",
    "figure": "opdgeo figure fig1_overview --tables results/tables --out results/figures/fig1 "
              "(opdgeo figure --list: every figure)",
    "paper-tables": "opdgeo paper-tables --tables results/tables --out results/tables",
    "paper-null": "opdgeo paper-null --std 0.02 0.01 --out results/tables",
    "findings": "opdgeo findings --tables results/tables --out results/findings",
    "captions": "opdgeo captions --out results/report",
    "rehearse": "opdgeo rehearse config/paper.yaml --out rehearsal",
    "plan": "opdgeo plan --configfile config/paper.yaml",
    "check-config": "opdgeo check-config config/paper.yaml",
    "check-cluster": "opdgeo check-cluster --configfile config/paper.yaml --profile slurm",
}
DEBUG_VARIABLE = "OPDGEO_DEBUG"


class _Version(argparse.Action):
    """`--version`: the package version and, from a checkout, its commit (git runs only here)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version (and the commit, from a checkout) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from opdgeo.version import describe

        print(f"opdgeo {describe()}")
        parser.exit()


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from error


def _threads(n: int):
    import torch

    torch.set_num_threads(n)


def cmd_train_model(args):
    from opdgeo.device import resolve_device
    from opdgeo.train import train_base

    _threads(args.threads)
    train_base(args.name, args.model_spec, args.task, args.out, resolve_device(args.device))


def cmd_train_run(args):
    from opdgeo.config import RunSpec
    from opdgeo.device import process_device, resolve_device
    from opdgeo.train import train_run

    _threads(args.threads)
    spec = RunSpec(**args.run_spec)
    train_run(spec, args.source, args.teacher, args.task, args.out,
              process_device(resolve_device(args.device)),
              mask_path=args.mask)


def cmd_model_card(args):
    from opdgeo.config import RunSpec
    from opdgeo.model_card import write_model_card

    spec = RunSpec(**args.run_spec, task=args.task)
    write_model_card(spec, args.source, args.teacher, args.mask, args.scores,
                     args.source_scores, args.summary, args.out, args.checkpoint,
                     args.evaluation)
    print(f"wrote {args.out} and {args.checkpoint / 'README.md'}")


def cmd_base_model_card(args):
    from opdgeo.model_card import write_base_model_card

    write_base_model_card(args.name, args.model_spec, args.task, args.scores, args.out,
                          args.checkpoint, args.evaluation)
    print(f"wrote {args.out} and {args.checkpoint / 'README.md'}")


def cmd_make_mask(args):
    from opdgeo import masks

    spec = args.mask_spec
    method = spec["method"]
    if method == "atol":
        mask = masks.mask_from_delta(args.source, args.trained, atol=spec["atol"])
    elif method == "top":
        mask = masks.top_fraction_mask(args.source, args.trained, spec["density"])
    elif method == "random_like":
        like = masks.mask_from_delta(args.source, args.trained, atol=spec["atol"])
        mask = masks.random_mask_like(like, spec["seed"])
    elif method == "random_density":
        shapes = masks.checkpoint_shapes(args.source)
        mask = masks.random_mask_with_density(shapes, spec["density"], spec["seed"])
    else:
        raise SystemExit(f"unknown mask method {method!r}")
    masks.save_mask(mask, args.out)
    masks.write_density_csv(mask, args.densities, args.out.name.removesuffix(".safetensors"))
    density, _ = masks.mask_densities(mask)
    print(f"mask {args.out}: global density {density:.4f}")


def cmd_evaluate(args):
    from opdgeo.attempts import WallClock
    from opdgeo.crash import crash_point
    from opdgeo.delta.io import step_folders
    from opdgeo.device import resolve_device
    from opdgeo.evaluate import ScoreJournal, evaluate_checkpoints
    from opdgeo.task import make_task

    _threads(args.threads)
    checkpoints = {0 if args.step is None else args.step: Path(args.checkpoint)}
    if args.checkpoints:
        checkpoints |= {step: folder for step, folder in step_folders(args.checkpoints).items()
                        if step % args.every == 0}
    task, evaluation = make_task(args.task), args.evaluation
    # Beside the table, until it is written: what a killed job had finished.
    journal = ScoreJournal(args.out.with_name(args.out.stem + ".partial"),
                           {"run": args.run, "task": args.task, "evaluation": evaluation,
                            "seed": args.seed})
    table = evaluate_checkpoints(checkpoints, args.run, task, evaluation["k"],
                                 evaluation["temperature"], args.seed,
                                 resolve_device(args.device), evaluation["batch_size"], journal,
                                 evaluation.get("engine", "hf"), evaluation.get("vllm"),
                                 WallClock.from_slurm(), tuple(args.contexts))
    crash_point("evaluate.after-last-score")
    with atomic(args.out, "evaluate.table") as tmp:
        table.to_csv(tmp, index=False)
    journal.clear()


def cmd_collect(args):
    from opdgeo import collect
    from opdgeo.table_formats import write_table

    if args.kind == "summaries":
        frame = collect.collect_summaries(args.files, args.final_steps or {})
    elif args.kind == "overlaps":
        frame = collect.collect_overlaps(args.files)
    elif args.kind == "overlap-tensors":
        frame = collect.collect_overlap_tensors(args.files)
    else:  # per-run CSVs, each with its own run column
        frame = collect.concat_csvs(args.files)
    write_table(frame, args.out)


def cmd_runs(args):
    from opdgeo.config import build_runs, run_table
    from opdgeo.table_formats import write_table

    write_table(run_table(build_runs(args.config), args.config["models"]), args.out)


def cmd_check_config(args):
    # The paper's numbers are read here, not in opdgeo.config: every command imports that
    # module, and only the masks at the paper's density read them.
    from opdgeo.config import check_config_file
    from opdgeo.paper_tables import PAPER_MASK_DENSITY

    check_config_file(args.config, PAPER_MASK_DENSITY)


def cmd_plan(args):
    from opdgeo.config import read_config
    from opdgeo.plan import format_plan, plan, plan_json

    table, notes = plan(read_config(args.configfile))
    if args.csv:
        with atomic(args.csv, "tables.write") as tmp:
            table.to_csv(tmp, index=False)
    print(plan_json(table, notes) if args.json else format_plan(table, notes))


def cmd_check_cluster(args):
    from opdgeo.cluster_check import check_cluster

    # a bad or missing config is named in one line before Snakemake's dry run starts
    cmd_check_config(argparse.Namespace(config=args.configfile))
    status = check_cluster(str(args.configfile), args.profile, args.snakemake_args)
    if status:
        raise SystemExit(status)


def _tidy_inputs(args):
    """The tidy tables under --tables and the run info the renderers share."""
    from opdgeo.tidy import load_tables, run_info

    tables = load_tables(args.tables)
    plots = args.plots or {}
    return tables, run_info(tables["runs"], args.external, plots.get("labels")), plots


def cmd_figure(args):
    from opdgeo.figures import FIGURES, drawing, render

    if args.list:
        width = max(map(len, FIGURES))
        for name, (_, reads) in FIGURES.items():
            paragraph = " ".join((drawing(name).__doc__ or "").strip().split("\n\n")[0].split())
            shows = re.split(r"(?<=[.?])\s", paragraph)[0]
            print(f"{name:<{width}}  reads {', '.join(reads)}: {shows}")
        return
    if not (args.name and args.tables and args.out):
        raise ValueError("give a figure name, --tables and --out (opdgeo figure --list lists "
                         "the figures)")
    tables, info, plots = _tidy_inputs(args)
    for path in render(args.name, tables, info, plots, args.out):
        print(f"wrote {path}")


def cmd_paper_tables(args):
    from opdgeo.captions import table_captions
    from opdgeo.paper_tables import build_tables, write_paper_table

    tables, info, plots = _tidy_inputs(args)
    for name, frame in build_tables(tables, info, plots).items():
        write_paper_table(frame, args.out / f"{name}.csv", table_captions()[name])
        print(f"wrote {args.out / name}.{{csv,md,tex}} ({len(frame)} rows)")


def cmd_paper_null(args):
    from opdgeo.captions import table_captions
    from opdgeo.paper_tables import PAPER_NULL_TABLE, paper_rounding_null_table, write_paper_table

    frame = paper_rounding_null_table(args.std)
    write_paper_table(frame, args.out / f"{PAPER_NULL_TABLE}.csv",
                      table_captions()[PAPER_NULL_TABLE])
    print(f"wrote {args.out / PAPER_NULL_TABLE}.{{csv,md,tex}} ({len(frame)} rows)")


def cmd_findings(args):
    from opdgeo.findings import findings_table, write_findings

    tables, info, plots = _tidy_inputs(args)
    table = findings_table(tables, info, plots)
    write_findings(table, args.out)
    print(table["verdict"].value_counts().to_string() if len(table) else "no findings rows")


def cmd_captions(args):
    from opdgeo.report_captions import write_captions

    paths = write_captions(args.out)
    print(f"wrote {len(paths)} captions into {args.out}")


def cmd_rehearse(args):
    from opdgeo.rehearse import rehearse

    print(f"wrote {rehearse(args.study, args.out)}")


def _card_arguments(p):
    p.add_argument("--evaluation", type=_json, default={},
                   help="config['evaluation'] (names the scores)")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="the final checkpoint folder (gets a copy as README.md)")
    p.add_argument("--out", type=Path, required=True)


def _render_arguments(p, required=True):
    p.add_argument("--tables", type=Path, required=required, help="folder of the tidy tables")
    p.add_argument("--plots", type=_json, default={}, help="config['plots']")
    p.add_argument("--external", type=_json, default={}, help="external run -> declared kind")
    p.add_argument("--out", type=Path, required=required)


def _job_options(parser):
    """Options every model-running job takes: where to write, which device, how many threads."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opdgeo", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    from opdgeo.delta import cli as delta_cli

    delta_cli.register(sub)

    p = sub.add_parser("train-model", help="build a tiny base model and train it on the task")
    p.add_argument("--name", required=True)
    p.add_argument("--model-spec", type=_json, required=True,
                   help="models.<name> from the config (build and train settings)")
    p.add_argument("--task", type=_json, required=True)
    _job_options(p)
    p.set_defaults(handler=cmd_train_model)

    p = sub.add_parser("train-run", help="train one run (OPD, control or masked) from its source")
    p.add_argument("--run-spec", type=_json, required=True, help="the run spec (opdgeo.config)")
    p.add_argument("--source", required=True)
    p.add_argument("--teacher")
    p.add_argument("--mask", type=Path)
    p.add_argument("--task", type=_json, required=True)
    _job_options(p)
    p.set_defaults(handler=cmd_train_run)

    p = sub.add_parser("model-card", help="the model card (README.md) of a trained run's final "
                                          "checkpoint: settings, scores, delta summary")
    p.add_argument("--run-spec", type=_json, required=True, help="the run spec (opdgeo.config)")
    p.add_argument("--source", required=True)
    p.add_argument("--teacher")
    p.add_argument("--mask", help="the gradient mask file of a masked run")
    p.add_argument("--task", type=_json, required=True)
    p.add_argument("--scores", type=Path, required=True, help="the run's evaluation CSV")
    p.add_argument("--source-scores", type=Path, help="the source model's evaluation CSV")
    p.add_argument("--summary", type=Path, required=True, help="the run's delta summary.json")
    _card_arguments(p)
    p.set_defaults(handler=cmd_model_card)

    p = sub.add_parser("base-model-card", help="the model card (README.md) of a base model the "
                                               "pipeline built and trained: settings, scores")
    p.add_argument("--name", required=True, help="the model's key in the config")
    p.add_argument("--model-spec", type=_json, required=True, help="config['models'][name]")
    p.add_argument("--task", type=_json, required=True)
    p.add_argument("--scores", type=Path, required=True, help="the model's evaluation CSV")
    _card_arguments(p)
    p.set_defaults(handler=cmd_base_model_card)

    p = sub.add_parser("make-mask", help="a subnetwork mask from a run's delta, or a random one")
    p.add_argument("--mask-spec", type=_json, required=True, help="the mask spec (opdgeo.config)")
    p.add_argument("--source", required=True)
    p.add_argument("--trained", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--densities", type=Path, required=True,
                   help="tidy CSV of the mask's global and per-tensor densities")
    p.set_defaults(handler=cmd_make_mask)

    p = sub.add_parser("evaluate", help="held-out exact match and mean@k of checkpoints")
    p.add_argument("--run", required=True)
    p.add_argument("--checkpoint", required=True, help="the final checkpoint")
    p.add_argument("--step", type=int, help="step of the final checkpoint")
    p.add_argument("--checkpoints", help="folder of step-N checkpoints")
    p.add_argument("--every", type=int, default=1,
                   help="score the step-N checkpoints whose N is a multiple of this only")
    p.add_argument("--task", type=_json, required=True)
    p.add_argument("--evaluation", type=_json, required=True,
                   help="the evaluation settings (config['evaluation'])")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed for mean@k (a run's own seed)")
    p.add_argument("--contexts", nargs="*", default=[], choices=["own", "other"],
                   help="also score the prompts with their own privileged context, or another "
                        "prompt's, in them (a self-distillation teacher's score)")
    _job_options(p)
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("collect", help="gather per-run outputs into one tidy table")
    p.add_argument("kind", choices=["summaries", "overlaps", "overlap-tensors", "csv"])
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--final-steps", type=_json, help="summaries: run -> final step")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(handler=cmd_collect)

    p = sub.add_parser("runs", help="the table of runs (kind, pair, teacher, optimizer, ...)")
    p.add_argument("--config", type=_json, required=True, help="the whole config")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("plan", help="a study's bill before it runs: tokens, disk, memory, "
                       "GPU-hours (at the config's stated throughputs)")
    p.add_argument("--configfile", type=Path, required=True)
    p.add_argument("--json", action="store_true",
                   help="print every column of every row, and the notes, as JSON")
    p.add_argument("--csv", type=Path, help="also write every column of every row here")
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("check-config", help="check a config file as a dry run would, before "
                       "Snakemake reads it: YAML (an error's line and column, keys given once), "
                       "the schema, references between sections, the runs and masks it makes")
    p.add_argument("config", type=Path, help="the config file, e.g. config/config.yaml")
    p.set_defaults(handler=cmd_check_config)

    p = sub.add_parser("check-cluster", help="every job of a config's DAG, with the sbatch "
                       "options of your SLURM profile, put to your cluster with `sbatch "
                       "--test-only` (nothing is queued); exits 1 if one is refused")
    p.add_argument("--configfile", type=Path, required=True)
    p.add_argument("--profile", default="slurm", help="your profile's folder (default: slurm)")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, metavar="...",
                   help="more Snakemake options for the dry run, after `--` (e.g. --config "
                   "'training={gpus: 4}')")
    p.set_defaults(handler=cmd_check_cluster)

    p = sub.add_parser("figure", help="one figure (PNG/PDF per plots.formats) from tidy tables")
    p.add_argument("name", nargs="?", help="figure name (opdgeo.figures.FIGURES; --list lists "
                   "them)")
    p.add_argument("--list", action="store_true", help="list the figures, the tidy tables each "
                   "reads and what it shows (nothing else is needed)")
    _render_arguments(p, required=False)  # not with --list
    p.set_defaults(handler=cmd_figure)

    p = sub.add_parser("paper-tables", help="the paper's tables as CSV, Markdown and LaTeX")
    _render_arguments(p)
    p.set_defaults(handler=cmd_paper_tables)

    p = sub.add_parser("paper-null",
                       help="the rounding null on the paper's own sparsities, as a paper table")
    p.add_argument("--std", type=float, nargs="+", default=[0.02],
                   help="std of the Gaussian weights, one row per run and std")
    p.add_argument("--out", type=Path, required=True, help="folder of the paper tables")
    p.set_defaults(handler=cmd_paper_null)

    p = sub.add_parser("findings", help="F1-F8 as verdicts with numbers (out.md, out.csv)")
    _render_arguments(p)
    p.set_defaults(handler=cmd_findings)

    p = sub.add_parser("captions", help="the HTML report's captions (one .rst per figure, "
                       "paper table and the findings), from the constants the figures use")
    p.add_argument("--out", type=Path, required=True, help="folder of the captions")
    p.set_defaults(handler=cmd_captions)

    p = sub.add_parser("rehearse", help="a study's config on tiny local stand-ins of its hub "
                       "models and data sets (CPU)")
    p.add_argument("study", type=Path, help="the study's config, e.g. config/paper.yaml")
    p.add_argument("--out", type=Path, required=True,
                   help="folder of the rehearsal: config.yaml, models/, data/")
    p.set_defaults(handler=cmd_rehearse)

    parser.epilog = "examples:\n" + "\n".join(f"  {EXAMPLES[verb]}" for verb in sub.choices
                                               if verb in EXAMPLES)
    for p in (parser, *sub.choices.values()):
        # SUPPRESS: a verb's parser leaves the flag alone unless it is given after the verb.
        p.add_argument("--debug", action="store_true",
                       default=False if p is parser else argparse.SUPPRESS,
                       help=f"on error, print the full traceback (or set {DEBUG_VARIABLE}=1)")
    return parser


def command():
    """The `opdgeo` console command: in the preload server when a local Snakemake run started
    one (opdgeo.preload), else in this process (opdgeo.handover)."""
    from opdgeo.handover import end_with_run, run_in_server

    status = run_in_server(sys.argv)
    if status is not None:
        raise SystemExit(status)
    end_with_run()
    main()


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, RuntimeError, OSError, SafetensorError) as error:
        if args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"opdgeo {args.command}: error: {error_line(error)} (--debug shows the "
              "traceback)", file=sys.stderr)
        raise SystemExit(1) from error


if __name__ == "__main__":
    main()
