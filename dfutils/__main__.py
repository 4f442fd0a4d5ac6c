"""Command line: `python -m dfutils <command>` (also installed as `dfutils`).

Every command's options are built by one builder (`add_parameters`) from the parameter
class of its step: `--name value` for each parameter, its help, default and allowed values
from the class, `--params FILE` for a YAML file of them. make's spelling of the same
options, `NAME=value` words (case-insensitive, EPOCHS = max_epochs), is read as
`--name=value` by every command that takes no file names of its own (`words_as_flags`).
Paths are relative to the working directory, as with any command-line tool. A step's
command runs the step's function through the runner's lifecycle of run.json
(`pipeline.run_command`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import inspect
import json
import signal
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfutils import distributed, jupyter, notebooks, paths, pipeline, shards
from dfutils.app import serve
from dfutils.demo import build_demo
from dfutils.evaluate import merge_evaluation, report_lines
from dfutils.export import export_run
from dfutils.faces import merge_faces
from dfutils.model import WeightsUnavailable
from dfutils.params import (
    ALIASES,
    AppParams,
    DemoParams,
    ExportParams,
    FacesParams,
    ParameterError,
    Params,
    PredictParams,
    assignment,
    choices,
    from_working_dir,
    parse_bool,
)
from dfutils.paths import REPO_ROOT, from_here
from dfutils.predict import merge_predictions, parts_of, predict_run
from dfutils.runs import read_run

SHARD_HELP = ("run task i of n (from 0) of a cluster job, or auto (SLURM's or torchrun's "
              "environment): {} (docs/cluster.md)")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def add_parameters(parser: argparse.ArgumentParser, cls: type[Params],
                   positional: Sequence[str] = (), skip: Sequence[str] = (),
                   spellings: bool = True) -> None:
    """An option for each parameter of `cls` (but `skip` and those already there): its
    name as `--name` (and, with `spellings`, the other spellings its field names, `--run`
    for a trained run), its help, default and allowed values; a yes/no parameter is
    `--name` (or `--name=no`) and `--no-name`; `positional` ones are the command's
    arguments. Values stay text: the parameter class coerces them, as it does make's and a
    YAML file's."""
    hints, defaults = typing.get_type_hints(cls), cls.defaults()
    taken = {action.dest for action in parser._actions}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in taken:
            continue
        options = choices(hints[f.name])
        text = f.metadata["help"] + (f" (one of {', '.join(map(json.dumps, options))})"
                                      if options else "")
        if f.name in positional:
            parser.add_argument(f.name, nargs="+", metavar="PATH", help=text.replace("%", "%%"))
            continue
        flags = [_flag(f.name), *(f.metadata["flags"] if spellings else ()),
                 *(_flag(alias) for alias, name in ALIASES.items() if name == f.name)]
        text = (text + f" (default: {defaults[f.name]!r})").replace("%", "%%")  # argparse
        if hints[f.name] is bool:
            if positional:  # `--onnx photo.jpg` must not take the file for its value
                parser.add_argument(*flags, dest=f.name, action="store_const", const="true",
                                    default=None, help=text)
            else:
                parser.add_argument(*flags, dest=f.name, nargs="?", const="true",
                                    default=None, metavar="yes|no", help=text)
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name,
                                action="store_const", const="false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(*flags, dest=f.name, default=None, metavar=f.name.upper(),
                                help=text)


def given(args: argparse.Namespace, *classes: type[Params], absolute: bool = True
          ) -> dict[str, Any]:
    """The parameters of `classes` given on the command line, paths made absolute against
    the working directory (unless `absolute` is False: as typed)."""
    names = {name for cls in classes for name in cls.names()}
    found = {name: getattr(args, name) for name in names
             if getattr(args, name, None) is not None}
    return from_working_dir(found, classes) if absolute else found


def _here(path: str) -> str:
    """A path from the command line: relative to the user's working directory."""
    return str(Path(path).expanduser().absolute())


def _params(cls: type[Params], args: argparse.Namespace) -> Params:
    """The parameters of `cls` from --params and the options given, validated."""
    return pipeline.load_params(cls, args.params_file and _here(args.params_file),
                                given(args, cls))


def _shard(args: argparse.Namespace) -> shards.Shard | None:
    return shards.resolve(getattr(args, "shard", "") or "", what="--shard")


# -- The commands ------------------------------------------------------------------------

def _step(step: pipeline.Step, args: argparse.Namespace) -> int:
    params, shard = _params(step.params, args), _shard(args)
    with distributed.session() if step.torchrun else contextlib.nullcontext():
        result = pipeline.run_command(step, params, record=shard is None and
                                      distributed.is_main(), shard=shard,
                                      command=f"python -m dfutils {step.command}",
                                      world_size=distributed.world()[1])
    if distributed.is_main():
        for line in step.shown(params, result):
            print(line)
    return 130 if step.status(result) == "interrupted" else 0


def _run_all(args: argparse.Namespace) -> int:
    classes = [step.params for step in pipeline.STEPS.values()]
    flags = {key: parse_bool(key.upper(), getattr(args, key)) for key in pipeline.FLAGS
             if getattr(args, key) is not None}
    run_dir = pipeline.run_all(
        run=args.run, params_file=args.params_file and _here(args.params_file),
        overrides={k: v for k, v in given(args, *classes).items()
                   if k not in pipeline.RUNNER_KEYS}, overwrite=flags.get("overwrite", False),
        steps=args.steps.split(",") if args.steps else None, replace_run=args.replace_run,
        beside_data=args.beside_data,
        runs_root=_here(args.runs_root) if args.runs_root else REPO_ROOT / "runs",
        resume=flags.get("resume", False), faces=flags.get("faces", False))
    for line in pipeline.summary_lines(read_run(run_dir).get("summary", {})):
        print(line, file=sys.stderr)
    print(f"done: {run_dir / 'run.json'}", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    shard = _shard(args)
    # The CSV names each file as the user typed it: only the run is made absolute.
    values = given(args, PredictParams, absolute=False)
    for name in ("run_dir", "model_dir"):
        if name in values:
            values[name] = _here(values[name])
    params = PredictParams.from_mapping(PredictParams.coerce(values))
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
          f"{len(predictions.rows)} files scored"
          + (f" into {parts_of(params.out)}; `dfutils merge predict --out {params.out}` "
             "writes --out from every part" if shard else ""), file=sys.stderr)
    return 0 if predictions.n_scored or shard else 1


def _export(args: argparse.Namespace) -> int:
    params = ExportParams.from_mapping(ExportParams.coerce(given(args, ExportParams)))
    config = export_run(params, log=lambda line: print(line, file=sys.stderr))
    print(f"exported {from_here(params.out)}: {', '.join(config['files'])}, "
          f"{paths.DETECTOR_CONFIG}, {paths.DETECTOR_CARD} (the model card)", file=sys.stderr)
    return 0


def _app(args: argparse.Namespace) -> int:
    params = AppParams.from_mapping(AppParams.coerce(given(args, AppParams)))
    page, url = serve(params)
    print(f"the page: {url} (this machine only; Ctrl-C stops it)", file=sys.stderr)
    try:
        page.block_thread()
    finally:
        page.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    params = DemoParams.from_mapping(DemoParams.coerce(given(args, DemoParams)))
    print(f"demo data set: {build_demo(params)}", file=sys.stderr)
    return 0


def _merge_faces(args: argparse.Namespace) -> int:
    step, params = pipeline.STEPS[FacesParams.step], _params(FacesParams, args)
    report = pipeline.run_command(dataclasses.replace(step, run=merge_faces), params,
                                  command="python -m dfutils merge faces")
    for line in step.shown(params, report):
        print(line)
    return 0


def _merge_predict(args: argparse.Namespace) -> int:
    predictions = merge_predictions(_here(args.out))
    print(f"{predictions.n_scored} of {len(predictions.rows)} files scored: {args.out}",
          file=sys.stderr)
    return 0


def _merge_evaluate(args: argparse.Namespace) -> int:
    run = Path(_here(args.run))
    report, _ = merge_evaluation(run, args.name)
    for line in report_lines(report, run):
        print(line)
    return 0


def _check_notebooks(args: argparse.Namespace) -> int:
    problems = notebooks.check_notebooks(args.notebooks, pipeline.STEPS, fix=args.fix)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def _reference(args: argparse.Namespace) -> int:
    print(notebooks.reference([step.params for step in pipeline.STEPS.values()]), end="")
    return 0


def _install_kernel(args: argparse.Namespace) -> int:
    print(f"kernel installed: {jupyter.install_kernel()}")
    return 0


def _params_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", dest="params_file", metavar="FILE",
                        help="YAML file of parameters (`name: value` lines; the options "
                        "given win; keys of the other steps are passed over)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfutils", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    # No option may be shortened: EPOCH=3 must not pass for --epochs (an unknown name is an
    # error, never a guess).
    commands = parser.add_subparsers(dest="command", required=True,
                                     parser_class=functools.partial(argparse.ArgumentParser,
                                                                    allow_abbrev=False))

    run = commands.add_parser(
        "run-all", help="run the notebook chain into runs/<RUN>/: "
        + ", ".join(pipeline.STEPS) + " (the optional ones when asked for)",
        description="Run the notebooks of the steps with papermill into runs/<RUN>/: "
        + ", ".join(f"{name}{f' (with {step.asked_by.upper()}=)' if step.asked_by else ''}"
                    for name, step in pipeline.STEPS.items())
        + ". Every step's parameter is an option (--max-epochs 5, or as make writes it, "
        "MAX_EPOCHS=5 or EPOCHS=5) and wins over --params; flags take 1/0, true/false or "
        "yes/no.")
    run.add_argument("--run", help="the run's name: runs/<RUN>/ (default: a time stamp)")
    _params_file(run)
    run.add_argument("--overwrite", nargs="?", const="true", metavar="yes|no",
                     help="replace the run folder (and let 01-split rebuild the split)")
    run.add_argument("--steps", metavar="STEP,STEP", help="a subset of the steps, e.g. "
                     "01-split,02-train")
    run.add_argument("--resume", nargs="?", const="true", metavar="yes|no",
                     help="continue an interrupted run with the parameters it recorded")
    run.add_argument("--faces", nargs="?", const="true", metavar="yes|no",
                     help="first crop the faces of the photos and clips in RAW_DIR with "
                     "00-faces, and split those by clip")
    run.add_argument("--replace-run", action="store_true",
                     help="replace an existing run folder (used by make split and make demo)")
    run.add_argument("--runs-root", help="folder of run folders (default: runs/ in the "
                     "repository)")
    run.add_argument("--beside-data", action="store_true",
                     help="put the run folder inside the first step's output folder (make "
                     "faces, make split): " + ", ".join(
                         f"{step.folder.upper()}/{step.beside} for STEPS={name}"
                         for name, step in pipeline.STEPS.items() if step.beside))
    for step in pipeline.STEPS.values():
        add_parameters(run, step.params, skip=("run_dir",), spellings=False)
    run.set_defaults(func=_run_all)

    for step in pipeline.STEPS.values():
        command = commands.add_parser(
            step.command, help=f"{step.name} as a command: {step.help}",
            description=f"{step.name} as a command: {step.help}. The same function as its "
            f"notebook ({step.notebook}), recorded in run.json the same way.")
        _params_file(command)
        add_parameters(command, step.params)
        if "shard" in inspect.signature(step.run).parameters:
            command.add_argument("--shard", default="", metavar="i/n|auto",
                                 help=SHARD_HELP.format("only the inputs it owns, into a "
                                                        "part; `dfutils merge` joins them"))
        command.set_defaults(func=lambda args, step=step: _step(step, args))

    predict = commands.add_parser(
        "predict", help="score image files, clips and folders with a trained run",
        description="Writes CSV (path, p_fake, label, status) with one row per file. "
        "When the run was trained on face crops (FACES=1), photos and video clips are "
        "cropped the same way first: frames sampled, the face found and cropped, each crop "
        "scored, and a file's P(fake) is the mean over its crops (columns path, p_fake, "
        "label, n_frames, n_faces, status). Labels use the decision threshold stored in the "
        "run's checkpoint. Unreadable files get an error status (and a line on stderr) and "
        "do not stop the batch; the exit status is non-zero only if no file could be scored.")
    add_parameters(predict, PredictParams, positional=("paths",))
    predict.add_argument("--shard", default="", metavar="i/n|auto", help=SHARD_HELP.format(
        "the inputs it owns, into <out>.parts/; `merge predict` writes --out"))
    predict.set_defaults(func=_predict)

    export = commands.add_parser(
        "export", help="a trained run as a folder to share: safetensors, config, model card, "
        "ONNX", description="Writes --out (a new or empty folder) whole or not at all: "
        f"{paths.DETECTOR_WEIGHTS} (the weights alone), {paths.DETECTOR_CONFIG} (what "
        "scoring a file as the run did needs, and each file's SHA-256), "
        f"{paths.DETECTOR_CARD} (a model card from the run's records) and, with --onnx, "
        f"{paths.DETECTOR_ONNX}, checked against PyTorch on the run's validation images. "
        "predict, evaluate and the benchmark take the folder as --model. "
        "docs/using-a-model.md")
    add_parameters(export, ExportParams)
    export.set_defaults(func=_export)

    app = commands.add_parser(
        "app", help="a web page to try a detector: drop an image or a clip (make app)",
        description="Serves a page on 127.0.0.1 (this machine only): drop an image or a clip "
        "and see each face found with its P(fake) and Grad-CAM overlay, a clip's score per "
        "frame and by the video rule, the decision at the threshold and the model card; the "
        "numbers are predict's. Nothing dropped is kept unless --save-dir is given and the "
        "box is ticked. docs/app.md")
    add_parameters(app, AppParams)
    app.set_defaults(func=_app)

    demo = commands.add_parser("demo", help="build the demo data set (data/demo_raw)")
    add_parameters(demo, DemoParams)
    demo.set_defaults(func=_demo)

    merge = commands.add_parser(
        "merge", help="join the parts of a job run as shards (faces, predict, evaluate)",
        description="Checks that every shard's part is there and complete, made with the same "
        "parameters from the same inputs, names each one that is not (nothing changes then), "
        "and writes the result exactly as one run would have; the parts go once it is in "
        "place. docs/cluster.md")
    merged = merge.add_subparsers(dest="what", required=True)
    merge_faces_ = merged.add_parser(
        "faces", help="build FACES_DIR from FACES_DIR/parts (make faces-merge)",
        description="The same parameters as the shards were given (SHARD aside): the merge "
        "checks every shard against them and against the files in RAW_DIR.")
    _params_file(merge_faces_)
    add_parameters(merge_faces_, FacesParams)
    merge_faces_.set_defaults(func=_merge_faces)
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

    check = commands.add_parser(
        "check-notebooks", help="check what a commit of each notebook would carry, and its "
        "parameters cell against its step's parameter class",
        description="What `git add` would stage of each notebook (the file through the "
        "nbstripout filter `make setup` installs), and what is staged now, must carry no "
        "outputs or execution counts and name the project's kernel; outputs JupyterLab saves "
        "in the working file are fine. Each notebook must be a step of dfutils.pipeline.STEPS "
        "and its first code cell its `parameters` cell, with the names, order, defaults and "
        "comments of its class in dfutils/params.py, the one place where parameters are "
        "defined.")
    check.add_argument("notebooks", nargs="+")
    check.add_argument("--fix", action="store_true",
                       help="rewrite a parameters cell that differs from its class")
    check.set_defaults(func=_check_notebooks)

    kernel = commands.add_parser(
        "install-kernel", help=f"register this Python as the notebooks' kernel "
        f"({jupyter.KERNEL['display_name']}), inside its environment")
    kernel.set_defaults(func=_install_kernel)

    reference = commands.add_parser(
        "params", help="print every step's parameters: default, allowed values, help",
        description="The parameter reference, as Markdown tables generated from "
        "dfutils/params.py (docs/parameters.md is this output).")
    reference.set_defaults(func=_reference)
    return parser


def words_as_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """make's spelling of options: each `NAME=value` word (and `--set NAME=value`, the
    train command's older spelling) becomes `--name=value`, on every command that takes no
    file names of its own (predict's arguments are files, so they stay as typed)."""
    argv = list(argv)
    commands = parser._subparsers._group_actions[0].choices
    chosen = commands.get(argv[0]) if argv else None
    if chosen is None:
        return argv
    if argv[0] == "merge" and len(argv) > 1:
        chosen = chosen._subparsers._group_actions[0].choices.get(argv[1], chosen)
    if any(not action.option_strings and action.dest not in ("what",)
           for action in chosen._actions if not isinstance(action, argparse._SubParsersAction)):
        # Beside file names a yes/no option takes no value of its own (`--onnx photo.jpg`):
        # `--faces=no` is read as `--no-faces`, `--onnx=yes` as `--onnx`.
        yes_no = {option for action in chosen._actions
                  if isinstance(action, argparse._StoreConstAction) and action.const == "true"
                  for option in action.option_strings}
        out = []
        for word in argv:
            name, given_value, value = word.partition("=")
            if given_value and name in yes_no:
                word = name if parse_bool(name, value) else f"--no-{name[2:]}"
            out.append(word)
        return out
    out, words = [], iter(argv)
    for word in words:
        if word == "--set":
            word = next(words, "")
        elif word.startswith("--set="):
            word = word[len("--set="):]
        if "=" in word and not word.startswith("-"):
            key, value = assignment(word)
            word = f"{_flag(key)}={value}"
        out.append(word)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # SIGTERM (kill, a job scheduler's time limit) stops a run the way Ctrl-C does, so the
    # run records what is complete instead of dying mid-step.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        args, unknown = parser.parse_known_args(
            words_as_flags(parser, sys.argv[1:] if argv is None else argv))
        if unknown:
            raise ParameterError(f"unknown parameter {unknown[0]!r} for {args.command}: see "
                                 f"`python -m dfutils {args.command} --help`")
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
