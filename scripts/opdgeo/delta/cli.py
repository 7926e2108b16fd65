"""`analyze`, `decompose` and `overlap` subcommands; the `opdgeo` command adds them through
`register`.

Standalone: PYTHONPATH=scripts python -m opdgeo.delta.cli analyze --source A --trained B --out D
"""

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from opdgeo.delta import columns

# No torch import here: every `opdgeo` command builds this parser, tables and figures too.

def _report(args: argparse.Namespace):
    """Where the human-readable lines go: standard error when --json keeps stdout for JSON."""
    return sys.stderr if args.json else sys.stdout


def run_analyze(args: argparse.Namespace) -> None:
    # torch imports only when used
    from opdgeo.delta.analyze import analyze_checkpoints, analyze_trajectory
    from opdgeo.delta.io import check_writable
    from opdgeo.delta.source import decomposed
    from opdgeo.device import resolve_device

    if args.trajectory:
        check_writable(args.trajectory)
    options = {"dtype": args.dtype, "device": args.device, "exact_svd_max": args.exact_svd_max,
               "seed": args.seed, "rounding_null": args.rounding_null}
    # with a trajectory, the source is decomposed once for the final and every intermediate
    # checkpoint (into a temporary folder unless --source-geometry gives it)
    geometry = args.source_geometry
    with (decomposed(args.source, geometry, args.dtype, resolve_device(args.device),
                     args.exact_svd_max)
          if args.trajectory and args.checkpoints else nullcontext(geometry)) as geometry:
        result = analyze_checkpoints(args.source, args.trained, args.out,
                                     fp32_trained=args.fp32_trained, nulls=not args.no_nulls,
                                     geometry=geometry, run=args.run, **options)
        report = _report(args)
        print(f"wrote {args.out} ({result['tensor_count']} tensors, {result['seconds']:.1f} s)",
              file=report)
        for key in map(columns.summary_name, columns.HEADLINE):
            print(f"  {key}: {result.get(key)}", file=report)
        if args.json:
            print((args.out / "summary.json").read_text(), end="")
        if args.trajectory:
            from opdgeo.table_formats import write_table

            steps = analyze_trajectory(args.source, args.checkpoints, geometry, run=args.run,
                                       **options)
            write_table(steps, args.trajectory, point="analyze.trajectory")
            print(f"wrote {args.trajectory} ({steps['step'].nunique()} intermediate "
                  f"checkpoints)", file=report)


def run_decompose(args: argparse.Namespace) -> None:
    from opdgeo.delta.source import write_geometry
    from opdgeo.device import resolve_device

    count = write_geometry(args.source, args.out, args.dtype, resolve_device(args.device),
                           args.exact_svd_max)
    print(f"wrote {args.out} ({count} matrices of {args.source})")


def _named_run(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or "__" in name:
        raise argparse.ArgumentTypeError(f"--runs takes NAME=CHECKPOINT (no '__' in NAME), "
                                         f"got {text!r}")
    return name, Path(path)


def run_overlap(args: argparse.Namespace) -> None:
    from opdgeo.delta.columns import HEADLINE_ATOL
    from opdgeo.delta.overlap import overlap_all_pairs, overlap_runs

    atol = HEADLINE_ATOL if args.atol is None else args.atol
    if args.runs:
        results = overlap_all_pairs(args.source, dict(args.runs), args.out, atol=atol,
                                    dtype=args.dtype)
    elif args.trained_a and args.trained_b:
        results = {"": overlap_runs(args.source, args.trained_a, args.trained_b, args.out,
                                    atol=atol, dtype=args.dtype)}
    else:
        raise ValueError("give --trained-a and --trained-b, or --runs NAME=CHECKPOINT ...")
    for name, result in results.items():
        print(f"wrote {args.out / name}: coverage a->b {result['coverage_a_to_b']:.4f} "
              f"(random {result['baseline_a_to_b']:.4f}), b->a {result['coverage_b_to_a']:.4f} "
              f"(random {result['baseline_b_to_a']:.4f}), Jaccard {result['jaccard']:.4f}",
              file=_report(args))
    if args.json:  # each pair's overlap.json; with --runs, by pair folder name
        summaries = {name: json.loads((args.out / name / "overlap.json").read_text())
                     for name in results}
        print(json.dumps(summaries[""] if "" in summaries else summaries, indent=2))


def _decomposition_options(parser, dtype_help: str, svd_help: str) -> None:
    """The options an analysis and its source's decomposition must share."""
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help=dtype_help)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--exact-svd-max", type=int, default=4096, help=svd_help)


def register(subparsers) -> None:
    """Add `analyze`, `decompose` and `overlap` to an argparse subparsers object."""
    analyze = subparsers.add_parser(
        "analyze", help="every delta metric of two checkpoints (docs/study.md section 3)")
    analyze.add_argument("--source", required=True, type=Path, help="source checkpoint folder")
    analyze.add_argument("--trained", required=True, type=Path, help="trained checkpoint folder")
    analyze.add_argument("--out", required=True, type=Path, help="output folder")
    _decomposition_options(analyze, "cast both checkpoints to this before subtracting",
                           "largest min(m, n) decomposed exactly; above: randomized top-k")
    analyze.add_argument("--seed", type=int, default=0, help="seed of the null models")
    analyze.add_argument("--fp32-trained", type=Path, default=None,
                         help="fp32 master weights of the trained run (exact rounding null)")
    analyze.add_argument("--no-nulls", action="store_true",
                         help="skip the isotropic and shuffle nulls (about a third of the time)")
    analyze.add_argument("--rounding-null", choices=("half_normal", "constant"),
                         default="half_normal",
                         help="update magnitudes of the parametric rounding null")
    analyze.add_argument("--checkpoints", type=Path, default=None,
                         help="folder of the run's intermediate checkpoints (step-N)")
    analyze.add_argument("--trajectory", type=Path, default=None,
                         help="also write the summary of every --checkpoints step-N here "
                              "(tidy CSV: step, metric, value; header only without them)")
    analyze.add_argument("--json", action="store_true",
                         help="print the summary (summary.json) on standard output")
    analyze.add_argument("--run", default=None,
                         help="the run's name: the first column of every table written, and "
                              "a key of summary.json")
    analyze.add_argument("--source-geometry", type=Path, default=None,
                         help="the source's decomposition written by `opdgeo decompose` (same "
                              "--dtype and --exact-svd-max), read instead of decomposing it")
    analyze.set_defaults(handler=run_analyze)

    decompose = subparsers.add_parser(
        "decompose", help="the source geometry every analysis of a run on it reuses (top "
                          "singular triplets and principal mask of each matrix)")
    decompose.add_argument("--source", required=True, type=Path, help="source checkpoint")
    decompose.add_argument("--out", required=True, type=Path, help="output folder")
    _decomposition_options(decompose, "the analysis dtype, which the source is cast to first",
                           "as for analyze (the analysis must use the same)")
    decompose.set_defaults(handler=run_decompose)

    overlap = subparsers.add_parser(
        "overlap", help="update-mask overlap of two runs (or of every pair of --runs) that "
                        "share a source")
    overlap.add_argument("--source", required=True, type=Path)
    overlap.add_argument("--trained-a", type=Path)
    overlap.add_argument("--trained-b", type=Path)
    overlap.add_argument("--runs", nargs="+", type=_named_run, metavar="NAME=CHECKPOINT",
                         help="instead of -a/-b: every pair, into OUT/{a}__{b}/")
    overlap.add_argument("--out", required=True, type=Path)
    overlap.add_argument("--atol", type=float, default=None,
                         help="a coordinate moved if |dW| > atol (default: the headline 1e-5)")
    overlap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    overlap.add_argument("--json", action="store_true",
                         help="print the summary (overlap.json; with --runs, one per pair by "
                              "folder name) on standard output")
    overlap.set_defaults(handler=run_overlap)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opdgeo-delta", description=__doc__)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
