"""Command line: `python -m dfutils <command>` (also installed as `dfutils`).

Each command parses its options into the parameter class of its step (defaults and help
come from there) and calls the step's function; paths are relative to the working
directory, as with any command-line tool.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import signal
import sys
import typing
from pathlib import Path
from typing import Any

from dfutils import files, pipeline
from dfutils.params import (
    DemoParams,
    EvalParams,
    ParameterError,
    Params,
    PredictParams,
    TrainParams,
    assignment,
    choices,
    from_working_dir,
)
from dfutils.paths import REPO_ROOT


def _here(path: str) -> Path:
    """A path from the command line: relative to the user's working directory."""
    return Path(path).expanduser().absolute()


def _option(parser: argparse.ArgumentParser, cls: type[Params], name: str,
            flag: str | None = None, **overrides: Any) -> None:
    """An option for parameter `name` of `cls`, with its type, default, choices and help."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = cls.defaults()[name]
    kind = {"type": type(default)} if isinstance(default, int | float | str) else {}
    options = choices(typing.get_type_hints(cls)[name])
    flag = flag or f"--{name.replace('_', '-')}"
    where = {"dest": name} if flag.startswith("-") else {}  # a positional is its own dest
    shown = f" (default: {default!r})" if where else ""
    parser.add_argument(flag, **where, default=default, help=f"{f.metadata['help']}{shown}",
                        **({"choices": options} if options else {}), **kind, **overrides)


def _flag(parser: argparse.ArgumentParser, cls: type[Params], name: str) -> None:
    """A switch for boolean parameter `name` of `cls` (off unless given), with its help."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true",
                        help=f.metadata["help"])


def _params(cls: type[Params], args: argparse.Namespace, **values: Any) -> Params:
    """The parameters of `cls` found among the parsed options, validated."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if hasattr(args, f.name)}
    return cls.from_mapping({**given, **values})


def _run_all(args: argparse.Namespace) -> int:
    runner, params = pipeline.parse_assignments(args.assignments)
    steps = runner["steps"].split(",") if runner.get("steps") else None
    run_dir = pipeline.run_all(
        run=runner.get("run"), params_file=str(_here(runner["params"])) if runner.get(
            "params") else None, overrides=from_working_dir(params),
        overwrite=runner.get("overwrite", False), steps=steps, replace_run=args.replace_run,
        beside_data=args.beside_data,
        runs_root=_here(args.runs_root) if args.runs_root else REPO_ROOT / "runs",
        resume=runner.get("resume", False), faces=runner.get("faces", False))
    from dfutils.runs import read_run

    for line in pipeline.summary_lines(read_run(run_dir).get("summary", {})):
        print(line, file=sys.stderr)
    print(f"done: {run_dir / files.RUN_RECORD}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dfutils.demo import build_demo

    out = build_demo(_params(DemoParams, args, out=str(_here(args.out))))
    print(f"demo data set: {out}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from dfutils import distributed, runs
    from dfutils.params import load_params
    from dfutils.paths import resolve
    from dfutils.train import train_run

    sets = from_working_dir(dict(assignment(s) for s in args.set))
    if args.resume:
        sets["resume"] = "true"
    params = load_params(TrainParams, args.params and str(_here(args.params)), sets)
    out = resolve(params.run_dir)
    with distributed.session() as (rank, size):
        started = None
        if rank == 0:  # the same run record the runner keeps
            out.mkdir(parents=True, exist_ok=True)
            runs.ensure_run(out, out.name, args.params)
            started = runs.start_step(out, "02-train", params=params.to_dict(),
                                      command="python -m dfutils train", world_size=size)
        try:
            result, _ = train_run(params)
        except BaseException:
            if started is not None:
                runs.finish_step(out, "02-train", "failed", started)
            raise
    if started is not None:
        runs.finish_step(out, "02-train", "interrupted" if result.interrupted else "done",
                         started, metrics=result.metrics)
    return 130 if result.interrupted else 0


def _predict(args: argparse.Namespace) -> int:
    from dfutils import shards
    from dfutils.inference import predict_run

    params = _params(PredictParams, args, run_dir=str(_here(args.run)), faces=not args.no_faces)
    shard = shards.resolve(args.shard, what="--shard")
    predictions = predict_run(params, log=lambda line: print(line, file=sys.stderr),
                              shard=shard)
    for row in predictions.rows:
        if row["status"] != "ok":
            print(f"cannot score {row['path']}: {row['status'][len('error: '):]}",
                  file=sys.stderr)
    if not params.out:
        # A file name that is not UTF-8 goes out as the bytes it has on disk.
        sys.stdout.reconfigure(errors="surrogateescape")
        writer = csv.DictWriter(sys.stdout, fieldnames=predictions.fields)
        writer.writeheader()
        writer.writerows(predictions.rows)
    if params.cam_dir and predictions.n_scored:
        print(f"Grad-CAM overlays: {params.cam_dir}", file=sys.stderr)
    print(f"{f'shard {shard}: ' if shard else ''}{predictions.n_scored} of "
          f"{len(predictions.rows)} files scored", file=sys.stderr)
    return 0 if predictions.n_scored or shard else 1


def _evaluate(args: argparse.Namespace) -> int:
    from dfutils import shards
    from dfutils.inference import evaluate_folder, report_name

    params = _params(EvalParams, args, run_dir=str(_here(args.run)),
                     eval_dir=str(_here(args.data)), faces=not args.no_faces)
    shard = shards.resolve(args.shard, what="--shard")
    report, _ = evaluate_folder(params, shard=shard)
    if shard is not None:
        parts = files.eval_folder(Path(args.run), report_name(params)) / files.EVAL_PARTS
        print(f"shard {shard}: scored into {parts}; `dfutils merge evaluate --run {args.run} "
              f"--name {report_name(params)}` writes the report from every part",
              file=sys.stderr)
        return 0
    _print_evaluation(report, Path(args.run))
    return 0


def _print_evaluation(report: dict, run: Path) -> None:
    from dfutils.inference import source_table
    from dfutils.metrics import metrics_line
    from dfutils.model import threshold_text

    m = report["metrics"]
    print(threshold_text(report["threshold"], report["threshold_rule"]))
    print(f"{report['n_images']} images: {metrics_line(m)}  ECE "
          f"{report['calibration']['ece']:.4f}  ([low, high]: 95% bootstrap intervals)")
    if "video" in m:
        print(f"{m['video']['n']} videos (mean P(fake) of their frames): "
              f"{metrics_line(m['video'])}")
    print(f"confusion (rows: true real, fake; columns: predicted real, fake): {m['confusion']}")
    for row in source_table(report):
        print(f"source {row.pop('source')}: " + "  ".join(f"{k} {v}" for k, v in row.items()))
    for kind, levels in report["sweeps"].items():
        print(f"AUC under {kind:9s} " + "  ".join(f"{r['level']}: {r['auc']:.4f}"
                                                  for r in levels))
    for item in report["unreadable"]:
        print(f"cannot read {item['path']}: {item['reason']}", file=sys.stderr)
    print(f"report: {files.eval_folder(run, report['name']) / files.EVAL_REPORT}")


def _faces_params(words: list[str]) -> tuple[Params, str]:
    """FacesParams from KEY=VALUE words, as make passes them (PARAMS=<yaml> and the
    parameters of 00-faces, relative paths from the working directory), and SHARD's value."""
    from dfutils.params import FacesParams, load_params

    sets = dict(assignment(word) for word in words)
    params_file, shard = sets.pop("params", None), sets.pop("shard", "")
    return load_params(FacesParams, params_file and str(_here(params_file)),
                       from_working_dir(sets)), shard


def _faces(args: argparse.Namespace) -> int:
    from dfutils import faces, shards

    params, shard = _faces_params(args.assignments)
    report = faces.extract_faces(params, shard=shards.resolve(shard))
    if "shard" in report:
        print(f"shard {report['shard']}: {report['n_sources']} sources, {report['n_crops']} "
              f"crops in {report['folder']}", file=sys.stderr)
    else:
        print(f"{report['n_sources']} sources, {report['n_crops']} crops: "
              f"{Path(params.faces_dir) / files.FACES_REPORT}", file=sys.stderr)
    return 0


def _merge_faces(args: argparse.Namespace) -> int:
    from dfutils import faces

    params, shard = _faces_params(args.assignments)
    if shard:
        raise ParameterError(f"SHARD={shard}: merge joins every shard; give it without SHARD")
    report = faces.merge_faces(params)
    print(f"{report['n_sources']} sources, {report['n_crops']} crops: "
          f"{Path(params.faces_dir) / files.FACES_REPORT}", file=sys.stderr)
    return 0


def _merge_predict(args: argparse.Namespace) -> int:
    from dfutils.inference import merge_predictions

    predictions = merge_predictions(_here(args.out))
    print(f"{predictions.n_scored} of {len(predictions.rows)} files scored: {args.out}",
          file=sys.stderr)
    return 0


def _merge_evaluate(args: argparse.Namespace) -> int:
    from dfutils.inference import merge_evaluation

    report, _ = merge_evaluation(_here(args.run), args.name)
    _print_evaluation(report, Path(args.run))
    return 0


def _check_notebooks(args: argparse.Namespace) -> int:
    from dfutils.notebooks import check_notebooks

    problems = check_notebooks(args.notebooks, fix=args.fix)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def _reference(args: argparse.Namespace) -> int:
    from dfutils.notebooks import reference

    print(reference(), end="")
    return 0


def _install_kernel(args: argparse.Namespace) -> int:
    from dfutils.jupyter import install_kernel

    print(f"kernel installed: {install_kernel()}")
    return 0


def _shard_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--shard", default="", metavar="i/n|auto",
                        help=f"run task i of n (from 0) of a cluster job: {what}; auto reads "
                        "i and n from SLURM's or torchrun's environment (docs/cluster.md)")


def build_parser() -> argparse.ArgumentParser:
    from dfutils.jupyter import KERNEL

    parser = argparse.ArgumentParser(prog="dfutils", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run-all", help="run the notebook chain (00-faces, 01-split, 02-train, 03-gradcam, "
        "04-evaluate) into runs/<RUN>/",
        description="Run the notebook chain with papermill into runs/<RUN>/: 01-split, "
        "02-train and 03-gradcam, with 00-faces first when FACES=1 and 04-evaluate last when "
        "EVAL_DIR is given. Settings and parameters are KEY=VALUE words, as with make: "
        "RUN=<name> (default: a time stamp), PARAMS=<yaml> (papermill -f), OVERWRITE=1 "
        "(replace the run folder and let 01-split rebuild the split), "
        "STEPS=01-split,02-train (a subset), RESUME=1 (continue an interrupted run with the "
        "parameters it recorded), FACES=1 (first crop the faces of the photos and clips in "
        "RAW_DIR with 00-faces, and split those by clip); flags take 1/0, true/false or "
        "yes/no. Any other KEY=VALUE is a notebook parameter (case-insensitive, EPOCHS = "
        "max_epochs) and wins over PARAMS.")
    run.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    run.add_argument("--replace-run", action="store_true",
                     help="replace an existing run folder (used by make split and make demo)")
    run.add_argument("--runs-root", help="folder of run folders (default: runs/ in the "
                     "repository)")
    run.add_argument("--beside-data", action="store_true",
                     help="put the run folder inside the first step's output folder: "
                     f"FACES_DIR/{files.FACES_RUN} for STEPS=00-faces, "
                     f"DATA_DIR/{files.SPLIT_RUN} for STEPS=01-split (make faces, make split)")
    run.set_defaults(func=_run_all)

    faces = commands.add_parser(
        "faces", help="the faces step of 00-faces as a command: the whole job, or one shard "
        "of a cluster job (SHARD=i/n or SHARD=auto)",
        description="Crops the faces of RAW_DIR's photos and clips into FACES_DIR with the "
        "parameters of 00-faces, given as KEY=VALUE words (PARAMS=<yaml> first, then each "
        "KEY=VALUE wins), as `make faces` passes them. With SHARD=i/n (task i of n, from 0) "
        "only that task's sources run, into FACES_DIR/parts/i-of-n; SHARD=auto reads i and n "
        "from SLURM's or torchrun's environment; `merge` builds FACES_DIR from all of them. "
        "A killed run resumes where it stopped. docs/cluster.md")
    faces.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    faces.set_defaults(func=_faces)

    merge = commands.add_parser(
        "merge", help="join the parts of a job run as shards (faces, predict, evaluate)",
        description="Checks that every shard's part is there and complete, made with the same "
        "parameters from the same inputs, names each one that is not (nothing changes then), "
        "and writes the result exactly as one run would have; the parts go once it is in "
        "place. docs/cluster.md")
    merged = merge.add_subparsers(dest="what", required=True)
    merge_faces = merged.add_parser(
        "faces", help="build FACES_DIR from FACES_DIR/parts (make faces-merge)",
        description="The same KEY=VALUE words as the shards were given (PARAMS=<yaml> and "
        "the parameters of 00-faces), SHARD aside: the merge checks every shard against them "
        "and against the files in RAW_DIR.")
    merge_faces.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    merge_faces.set_defaults(func=_merge_faces)
    merge_predict = merged.add_parser(
        "predict", help="write --out (and the tasks' --frames-out) from <out>.parts/")
    merge_predict.add_argument("--out", required=True, help="the --out the tasks were given")
    merge_predict.set_defaults(func=_merge_predict)
    merge_evaluate = merged.add_parser(
        "evaluate", help="write <run>/eval/<name>/report.json from its parts/")
    merge_evaluate.add_argument("--run", required=True, help="the run the tasks evaluated")
    merge_evaluate.add_argument("--name", required=True, help="the report's name (the folder "
                                "under <run>/eval/ that holds parts/)")
    merge_evaluate.set_defaults(func=_merge_evaluate)

    train = commands.add_parser(
        "train", help="the training step of 02-train as a command (also under torchrun)",
        description="Trains with the parameters of 02-train (validated the same way) and "
        "writes the same files to run_dir, and the step to its run record. Alone it is one "
        "process; under `torchrun --nproc_per_node=N` it trains with "
        "DistributedDataParallel (NCCL on GPUs, gloo on CPUs), batch_size staying the "
        "global batch.")
    train.add_argument("--params", help="YAML parameter file (keys of other notebooks are "
                       "passed over)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a parameter, winning over the file (repeatable)")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its run_dir/last.pt, with the "
                       "same parameters, to the history it would have had")
    train.set_defaults(func=_train)

    predict = commands.add_parser(
        "predict", help="score image files, clips and folders with a trained run",
        description="Writes CSV (path, p_fake, label, status) with one row per file. "
        "When the run was trained on face crops (FACES=1), photos and video clips are "
        "cropped the same way first: frames sampled, the face found and cropped, each crop "
        "scored, and a file's P(fake) is the mean over its crops (columns path, p_fake, "
        "label, n_frames, n_faces, status). Labels use the decision threshold stored in the "
        "run's checkpoint. Unreadable files get an error status (and a line on stderr) and "
        "do not stop the batch; the exit status is non-zero only if no file could be scored.")
    predict.add_argument("--run", required=True, help="run folder holding model.pt")
    _option(predict, PredictParams, "paths", "paths", nargs="+", metavar="PATH")
    for name in ("out", "cam_dir", "frames_out", "layer", "batch_size", "num_workers", "amp"):
        _option(predict, PredictParams, name)
    predict.add_argument("--no-faces", action="store_true",
                         help="score the files as they are, even when the run was trained "
                         "on face crops (FACES=1)")
    _shard_option(predict, "the inputs it owns, into <out>.parts/; `merge predict` writes "
                  "--out")
    predict.set_defaults(func=_predict)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a trained run on a labelled folder (DIR/real, DIR/fake) "
        "or on a split's val or test images",
        description="Accuracy at the run's threshold, ROC-AUC, AP, EER, confusion matrix "
        "(and the same per video, each scored by its frames' mean P(fake), when the folder "
        "holds clips, or one subfolder of images per clip; a run trained on face crops crops "
        "the folder's photos and clips the same way first); "
        "AUC under JPEG re-compression (quality 100-30), Gaussian blur (sigma 0-3) and "
        "downscaling (1, 1/2, 1/4); calibration (ECE, 15 bins, reliability diagram). Writes "
        "<run>/eval/<name>/report.json and PNGs.")
    evaluate.add_argument("--run", required=True, help="run folder holding model.pt")
    evaluate.add_argument("--data", required=True, help="folder with real/ and fake/ inside; "
                          "with --split, a split made by 01-split")
    for name in ("name", "split", "batch_size", "num_workers", "amp"):
        _option(evaluate, EvalParams, name)
    evaluate.add_argument("--no-faces", action="store_true",
                          help="score the images as they are, even when the run was trained "
                          "on face crops (FACES=1)")
    for name in ("by_source", "self_blends"):
        _flag(evaluate, EvalParams, name)
    _shard_option(evaluate, "the images it owns, into <run>/eval/<name>/parts/; `merge "
                  "evaluate` writes the report")
    evaluate.set_defaults(func=_evaluate)

    demo = commands.add_parser("demo", help="build the demo data set (data/demo_raw)")
    _option(demo, DemoParams, "out")
    _option(demo, DemoParams, "n_per_class", "--n")
    for name in ("size", "seed"):
        _option(demo, DemoParams, name)
    demo.set_defaults(func=_demo)

    check = commands.add_parser(
        "check-notebooks", help="check what a commit of each notebook would carry, and its "
        "parameters cell against dfutils.params",
        description="What `git add` would stage of each notebook (the file through the "
        "nbstripout filter `make setup` installs), and what is staged now, must carry no "
        "outputs or execution counts and name the project's kernel; outputs JupyterLab saves "
        "in the working file are fine. Each notebook's first code cell must be its "
        "`parameters` cell, with the names, order, defaults and comments of its class in "
        "dfutils/params.py, the one place where parameters are defined.")
    check.add_argument("notebooks", nargs="+")
    check.add_argument("--fix", action="store_true",
                       help="rewrite a parameters cell that differs from its class")
    check.set_defaults(func=_check_notebooks)

    kernel = commands.add_parser(
        "install-kernel", help=f"register this Python as the notebooks' kernel "
        f"({KERNEL['display_name']}), inside its environment")
    kernel.set_defaults(func=_install_kernel)

    reference = commands.add_parser(
        "params", help="print every notebook parameter: default, allowed values, help",
        description="The parameter reference, as Markdown tables generated from "
        "dfutils/params.py (docs/parameters.md is this output).")
    reference.set_defaults(func=_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dfutils.model import WeightsUnavailable

    args = build_parser().parse_args(argv)
    # SIGTERM (kill, a job scheduler's time limit) stops a run the way Ctrl-C does, so the
    # run records what is complete instead of dying mid-step.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return args.func(args)
    except (pipeline.ChainInterrupted, KeyboardInterrupt) as error:
        print(f"interrupted: {error}" if str(error) else "interrupted", file=sys.stderr)
        return 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)
    except (pipeline.ChainError, ParameterError, ValueError, OSError,
            WeightsUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
