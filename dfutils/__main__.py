"""Command line: `python -m dfutils <command>` (also installed as `dfutils`)."""

from __future__ import annotations

import argparse
import sys

from dfutils import pipeline


def _run_all(args: argparse.Namespace) -> int:
    runner, params = pipeline.parse_assignments(args.assignments)
    steps = runner["steps"].split(",") if runner.get("steps") else None
    run_dir = pipeline.run_all(
        run=runner.get("run"), params_file=runner.get("params") or None, overrides=params,
        overwrite=runner.get("overwrite", "").lower() in ("1", "true", "yes"), steps=steps,
        replace_run=args.replace_run, runs_root=args.runs_root)
    print(f"done: {run_dir}/run.json", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dfutils.demo import build_demo

    out = build_demo(args.out, n_per_class=args.n, size=args.size, seed=args.seed)
    print(f"demo data set: {out}", file=sys.stderr)
    return 0


def _check_notebooks(args: argparse.Namespace) -> int:
    problems = pipeline.check_notebooks(args.notebooks)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfutils", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run-all", help="run 01-split, 02-train and 03-gradcam into runs/<RUN>/",
        description="Run the notebook chain with papermill into runs/<RUN>/. Settings and "
        "parameters are KEY=VALUE words, as with make: RUN=<name> (default: a time stamp), "
        "PARAMS=<yaml> (papermill -f), OVERWRITE=1 (replace the run folder and let 01-split "
        "rebuild the split), STEPS=01-split,02-train (a subset); any other KEY=VALUE is a "
        "notebook parameter (case-insensitive, EPOCHS = max_epochs) and wins over PARAMS.")
    run.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    run.add_argument("--replace-run", action="store_true",
                     help="replace an existing run folder (used by make split and make demo)")
    run.add_argument("--runs-root", default="runs", help="folder of run folders (default: runs)")
    run.set_defaults(func=_run_all)

    demo = commands.add_parser("demo", help="build the demo data set (data/demo_raw)")
    demo.add_argument("--out", default="data/demo_raw", help="output folder (default: %(default)s)")
    demo.add_argument("--n", type=int, default=400, help="images per class (default: %(default)s)")
    demo.add_argument("--size", type=int, default=96, help="side in pixels (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    demo.set_defaults(func=_demo)

    check = commands.add_parser("check-notebooks",
                                help="check each notebook's parameters cell")
    check.add_argument("notebooks", nargs="+")
    check.set_defaults(func=_check_notebooks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (pipeline.ChainError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
