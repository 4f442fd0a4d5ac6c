"""Command line: `python -m dfutils <command>` (also installed as `dfutils`)."""

from __future__ import annotations

import argparse
import csv
import glob
import signal
import sys
from pathlib import Path

from dfutils import pipeline
from dfutils.model import threshold_text
from dfutils.params import CamLayer, choices, from_working_dir
from dfutils.paths import REPO_ROOT

PREDICTION_FIELDS = ["path", "p_fake", "label", "status"]
# With face cropping (a run trained on the faces step's crops): frames and faces per input.
FACE_FIELDS = ["path", "p_fake", "label", "n_frames", "n_faces", "status"]
FRAME_FIELDS = ["path", "frame", "p_fake", "box"]


def _here(path: str) -> Path:
    """A path from the command line: relative to the user's working directory."""
    return Path(path).expanduser().absolute()


def _run_all(args: argparse.Namespace) -> int:
    runner, params = pipeline.parse_assignments(args.assignments)
    steps = runner["steps"].split(",") if runner.get("steps") else None

    def flag(key: str) -> bool:
        return runner.get(key, "").lower() in ("1", "true", "yes")
    run_dir = pipeline.run_all(
        run=runner.get("run"), params_file=str(_here(runner["params"])) if runner.get(
            "params") else None, overrides=from_working_dir(params), overwrite=flag("overwrite"),
        steps=steps, replace_run=args.replace_run, beside_data=args.beside_data,
        runs_root=_here(args.runs_root) if args.runs_root else REPO_ROOT / "runs",
        resume=flag("resume"), faces=flag("faces"))
    print(f"done: {run_dir}/run.json", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dfutils.demo import build_demo

    out = build_demo(args.out, n_per_class=args.n, size=args.size, seed=args.seed)
    print(f"demo data set: {out}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from dfutils import distributed, runs
    from dfutils.params import TrainParams, load_params
    from dfutils.paths import resolve
    from dfutils.train import train_run

    sets = from_working_dir(dict(_assignment(s) for s in args.set))
    if args.resume:
        sets["resume"] = "true"
    params = load_params(TrainParams, args.params and str(_here(args.params)), sets)
    started = runs.now()
    with distributed.session() as (rank, size):
        result, _ = train_run(params)
    if rank == 0:
        out = resolve(params.run_dir)
        if not (out / "run.json").is_file():
            runs.start_run(out, out.name, args.params)
        runs.record_step(out, "02-train", params=params.to_dict(), started=started,
                         finished=runs.now(), world_size=size,
                         status="interrupted" if result.interrupted else "done",
                         metrics=result.metrics, command="python -m dfutils train")
    return 130 if result.interrupted else 0


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set takes key=value, got {text!r}")
    return pipeline.ALIASES.get(key.lower(), key.lower()), value


def _check_outputs(args: argparse.Namespace, inputs: list) -> None:
    """Refuse, before anything is scored, outputs that could overwrite a user's file."""
    folders = [_here(p).resolve() for p in args.paths if Path(p).is_dir()]
    for option, target in (("--out", args.out), ("--cam-dir", args.cam_dir),
                           ("--frames-out", args.frames_out)):
        if not target:
            continue
        where = _here(target).resolve()
        inside = next((f for f in folders if where == f or f in where.parents), None)
        empty_dir = option == "--cam-dir" and where.is_dir() and not any(where.iterdir())
        if inside is not None and not empty_dir:
            raise ValueError(f"{option} {target} is inside the input folder {inside}: choose a "
                             "place outside the inputs, so no input is overwritten or read back")
    for option, target, headers in (("--out", args.out, (PREDICTION_FIELDS, FACE_FIELDS)),
                                    ("--frames-out", args.frames_out, (FRAME_FIELDS,))):
        if target and Path(target).exists():
            with open(target, newline="", errors="replace") as f:
                header = f.readline().strip()
            if header not in {",".join(fields) for fields in headers}:
                raise ValueError(f"{option} {target} exists and is not a CSV that predict "
                                 "wrote: choose another file name")
    if args.cam_dir:
        cam_dir = Path(args.cam_dir)  # any overlay of an input (per crop: <name>.<frame>...)
        taken = [i.name for i in inputs if (cam_dir / _cam_name(i.name)).exists()
                 or any(cam_dir.glob(f"{glob.escape(i.name)}.*.cam.png"))]
        if taken:
            raise ValueError(f"--cam-dir {args.cam_dir} already holds {_cam_name(taken[0])}"
                             f" (and {len(taken) - 1} more overlays): choose an empty folder")


def _cam_name(name: str) -> str:
    return f"{name}.cam.png"  # one per input: a.png and a.jpg give a.png.cam.png, a.jpg.cam.png


def _predict(args: argparse.Namespace) -> int:
    from dfutils.inference import collect_files, predict, predict_faces
    from dfutils.model import CHECKPOINT_FILE, load_checkpoint
    from dfutils.paths import write_csv

    inputs = collect_files(args.paths)
    _check_outputs(args, inputs)
    checkpoint = load_checkpoint(_here(args.run) / CHECKPOINT_FILE)
    with_faces = checkpoint.faces is not None and not args.no_faces
    if args.frames_out and not with_faces:
        raise ValueError("--frames-out needs a run trained on face crops (FACES=1), without "
                         "--no-faces")
    print(threshold_text(checkpoint.threshold, checkpoint.threshold_rule), file=sys.stderr)
    if with_faces:
        print(f"cropping faces as the training images were: {checkpoint.faces}",
              file=sys.stderr)
        cam_dir = Path(args.cam_dir) if args.cam_dir else None
        rows, frames = predict_faces(checkpoint, inputs, args.batch_size, cam_dir, args.layer)
        fields = FACE_FIELDS
        if args.frames_out:
            write_csv(args.frames_out, frames, FRAME_FIELDS)
    else:
        rows, _ = predict(checkpoint, inputs, args.batch_size, args.num_workers)
        fields = PREDICTION_FIELDS
    for row in rows:
        if row["status"] != "ok":
            print(f"cannot score {row['path']}: {row['status'][len('error: '):]}",
                  file=sys.stderr)
    if args.out:
        write_csv(args.out, rows, fields)
    else:
        # A file name that is not UTF-8 goes out as the bytes it has on disk.
        sys.stdout.reconfigure(errors="surrogateescape")
        writer = csv.DictWriter(sys.stdout, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    scored = [item for item, row in zip(inputs, rows, strict=True) if row["status"] == "ok"]
    if args.cam_dir and scored and not with_faces:  # (with faces: written per crop above)
        _write_cams(checkpoint, scored, Path(args.cam_dir), args)
    print(f"{len(scored)} of {len(rows)} files scored", file=sys.stderr)
    return 0 if scored else 1


def _write_cams(checkpoint, inputs: list, cam_dir: Path, args: argparse.Namespace) -> None:
    from dfutils.gradcam import write_overlays

    write_overlays(checkpoint.model, [i.path for i in inputs],
                   [cam_dir / _cam_name(i.name) for i in inputs], checkpoint.image_size,
                   layer=args.layer, batch_size=args.batch_size, replace=False)
    print(f"Grad-CAM overlays: {cam_dir}", file=sys.stderr)


def _evaluate(args: argparse.Namespace) -> int:
    from dfutils.inference import evaluate_folder

    report, _ = evaluate_folder(_here(args.run), _here(args.data), args.name, args.batch_size,
                                args.num_workers, faces=not args.no_faces)
    m = report["metrics"]
    print(threshold_text(report["threshold"], report["threshold_rule"]))
    print(f"{report['n_images']} images: accuracy {m['accuracy']:.4f}  AUC {m['auc']:.4f}  "
          f"AP {m['ap']:.4f}  EER {m['eer']:.4f}  ECE {report['calibration']['ece']:.4f}")
    if "video" in m:
        v = m["video"]
        print(f"{v['n']} videos (mean P(fake) of their frames): accuracy {v['accuracy']:.4f}  "
              f"AUC {v['auc']:.4f}  AP {v['ap']:.4f}  EER {v['eer']:.4f}")
    print(f"confusion (rows: true real, fake; columns: predicted real, fake): {m['confusion']}")
    for kind, levels in report["sweeps"].items():
        print(f"AUC under {kind:9s} " + "  ".join(f"{r['level']}: {r['auc']:.4f}"
                                                  for r in levels))
    for item in report["unreadable"]:
        print(f"cannot read {item['path']}: {item['reason']}", file=sys.stderr)
    print(f"report: {Path(args.run) / 'eval' / report['name'] / 'report.json'}")
    return 0


def _check_notebooks(args: argparse.Namespace) -> int:
    problems = pipeline.check_notebooks(args.notebooks, fix=args.fix)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def _params(args: argparse.Namespace) -> int:
    from dfutils.params import reference

    print(reference(), end="")
    return 0


def _loader_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="image-loading processes (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfutils", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run-all", help="run 01-split, 02-train and 03-gradcam into runs/<RUN>/",
        description="Run the notebook chain with papermill into runs/<RUN>/. Settings and "
        "parameters are KEY=VALUE words, as with make: RUN=<name> (default: a time stamp), "
        "PARAMS=<yaml> (papermill -f), OVERWRITE=1 (replace the run folder and let 01-split "
        "rebuild the split), STEPS=01-split,02-train (a subset), RESUME=1 (continue an "
        "interrupted run with the parameters it recorded), FACES=1 (first crop the faces of "
        "the photos and clips in RAW_DIR with 00-faces, and split those by clip); any other "
        "KEY=VALUE is a notebook parameter (case-insensitive, EPOCHS = max_epochs) and wins "
        "over PARAMS.")
    run.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    run.add_argument("--replace-run", action="store_true",
                     help="replace an existing run folder (used by make split and make demo)")
    run.add_argument("--runs-root", help="folder of run folders (default: runs/ in the "
                     "repository)")
    run.add_argument("--beside-data", action="store_true",
                     help="put the run folder inside the first step's output folder: "
                     "FACES_DIR/faces-run for STEPS=00-faces, DATA_DIR/split-run for "
                     "STEPS=01-split (make faces, make split)")
    run.set_defaults(func=_run_all)

    train = commands.add_parser(
        "train", help="the training step of 02-train as a command (also under torchrun)",
        description="Trains with the parameters of 02-train (validated the same way) and "
        "writes the same files to run_dir. Alone it is one process; under `torchrun "
        "--nproc_per_node=N` it trains with DistributedDataParallel (NCCL on GPUs, gloo on "
        "CPUs), batch_size staying the global batch.")
    train.add_argument("--params", help="YAML parameter file (keys of other notebooks are "
                       "passed over)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a parameter, winning over the file (repeatable)")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its run_dir/last.pt, with the "
                       "same parameters, to the history it would have had")
    train.set_defaults(func=_train)

    predict = commands.add_parser(
        "predict", help="score image files and folders with a trained run",
        description="Writes CSV (path, p_fake, label, status) with one row per file. "
        "When the run was trained on face crops (FACES=1), photos and video clips are "
        "cropped the same way first: frames sampled, the face found and cropped, each crop "
        "scored, and a file's P(fake) is the mean over its crops (columns path, p_fake, "
        "label, n_frames, n_faces, status). Labels use the decision threshold stored in the "
        "run's checkpoint. Unreadable files get an error status (and a line on stderr) and "
        "do not stop the batch; the exit status is non-zero only if no file could be scored.")
    predict.add_argument("--run", required=True, help="run folder holding model.pt")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--out", help="CSV file to write (default: standard output)")
    predict.add_argument("--cam-dir", help="also write Grad-CAM overlays to this folder")
    predict.add_argument("--no-faces", action="store_true",
                         help="score the files as they are, even when the run was trained "
                         "on face crops (FACES=1)")
    predict.add_argument("--frames-out", help="with face cropping: also write one row per "
                         "frame scored (path, frame, p_fake, box) to this CSV")
    predict.add_argument("--layer", default="layer4", choices=choices(CamLayer),
                         help="Grad-CAM layer (default: layer4)")
    _loader_options(predict)
    predict.set_defaults(func=_predict)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a trained run on a labelled folder (DIR/real, DIR/fake)",
        description="Accuracy at the run's threshold, ROC-AUC, AP, EER, confusion matrix "
        "(and the same per video, each scored by its frames' mean P(fake), when the folder "
        "holds clips, or one subfolder of images per clip; a run trained on face crops crops "
        "the folder's photos and clips the same way first); "
        "AUC under JPEG re-compression (quality 100-30), Gaussian blur (sigma 0-3) and "
        "downscaling (1, 1/2, 1/4); calibration (ECE, 15 bins, reliability diagram). Writes "
        "<run>/eval/<name>/report.json and PNGs.")
    evaluate.add_argument("--run", required=True, help="run folder holding model.pt")
    evaluate.add_argument("--data", required=True, help="folder with real/ and fake/ inside")
    evaluate.add_argument("--name", default="", help="report name (default: the folder's name)")
    evaluate.add_argument("--no-faces", action="store_true",
                          help="score the images as they are, even when the run was trained "
                          "on face crops (FACES=1)")
    _loader_options(evaluate)
    evaluate.set_defaults(func=_evaluate)

    demo = commands.add_parser("demo", help="build the demo data set (data/demo_raw)")
    demo.add_argument("--out", default="data/demo_raw", help="output folder (default: %(default)s)")
    demo.add_argument("--n", type=int, default=400, help="images per class (default: %(default)s)")
    demo.add_argument("--size", type=int, default=96, help="side in pixels (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
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
        f"({pipeline.KERNEL['display_name']}), inside its environment")
    kernel.set_defaults(func=lambda args: print(f"kernel installed: {pipeline.install_kernel()}")
                        or 0)

    reference = commands.add_parser(
        "params", help="print every notebook parameter: default, allowed values, help",
        description="The parameter reference, as Markdown tables generated from "
        "dfutils/params.py (the README's tables are this output).")
    reference.set_defaults(func=_params)
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
    except (pipeline.ChainError, ValueError, OSError, WeightsUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
