"""The runner behind `make run-all`: the notebook chain 00-faces -> 01-split -> 02-train ->
03-gradcam -> 04-evaluate -> 05-benchmark, executed by papermill into runs/<run>/, recorded
in its run record (parameters, timings, status and metrics of every step, and a summary).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import papermill
from nbclient.exceptions import DeadKernelError

from dfutils import files
from dfutils import split as split_step
from dfutils.folders import MissingInput
from dfutils.params import (
    NOTEBOOK_PARAMS,
    ParameterError,
    assignment,
    parameters_of,
    parse_bool,
    read_params_file,
)
from dfutils.paths import REPO_ROOT, is_plain_name, remove_stale_temps, resolve
from dfutils.progress import TEXT_ONLY
from dfutils.runs import (
    ensure_run,
    finish_step,
    read_run,
    record_step,
    start_step,
    why_no_model,
    write_run,
)

NOTEBOOKS = {
    "00-faces": "notebooks/00-faces.ipynb",  # run when FACES=1 is given
    "01-split": "notebooks/01-split.ipynb",
    "02-train": "notebooks/02-train.ipynb",
    "03-gradcam": "notebooks/03-gradcam.ipynb",
    "04-evaluate": "notebooks/04-evaluate.ipynb",  # run when EVAL_DIR is given
    "05-benchmark": "notebooks/05-benchmark.ipynb",  # run when TEST_SETS is given
}
# The optional steps, by the parameter whose value asks for them.
ASKED_BY = {"04-evaluate": "eval_dir", "05-benchmark": "test_sets"}
# Keys the runner owns; everything else is a notebook parameter. Of those, the flags.
RUNNER_KEYS = ("run", "params", "overwrite", "steps", "resume", "faces")
FLAGS = ("overwrite", "resume", "faces")
# `make faces` and `make split` keep their run folder beside their output (--beside-data):
# step -> (the parameter naming the output folder, the run folder's name in it)
BESIDE = {"00-faces": ("faces_dir", files.FACES_RUN), "01-split": ("data_dir", files.SPLIT_RUN)}


class ChainError(RuntimeError):
    """The chain cannot start or a step failed; the message says which and why."""


class ChainInterrupted(ChainError):
    """Ctrl-C (or SIGINT) stopped a step; run.json says which steps are complete."""


def parse_assignments(args: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """KEY=VALUE words as the runner's settings (its flags as booleans) and the notebook
    parameters (keys in lower case)."""
    runner: dict[str, Any] = {}
    params: dict[str, str] = {}
    try:
        for word in args:
            key, value = assignment(word)
            if key in FLAGS:
                runner[key] = parse_bool(key.upper(), value)
            else:
                (runner if key in RUNNER_KEYS else params)[key] = value
    except ParameterError as error:
        raise ChainError(str(error)) from None
    return runner, params


def _split_metrics(report: dict) -> dict:
    return {"counts": report["counts"], "n_images": report["n_images"],
            "n_masks": report.get("n_masks", 0), "n_rejected": len(report["rejected"]),
            "n_skipped": len(report["skipped"]), "n_duplicate_groups": len(report["duplicates"]),
            "group_counts": report.get("group_counts"),
            "n_conflicts": len(report["conflicts"])}


def step_metrics(step: str, params: Mapping[str, Any]) -> dict | None:
    """What a finished step wrote that the run record summarises."""
    from dfutils import faces
    from dfutils.inference import report_name
    from dfutils.params import EvalParams

    if step == "00-faces":
        report = faces.read_report(params["faces_dir"])
        return {k: report[k] for k in ("n_sources", "n_crops", "frames_read", "faces_found")
                } | {"n_unreadable": len(report["unreadable"])} if report else None
    if step == "01-split":
        report = split_step.read_report(params["data_dir"])
        return _split_metrics(report) if report else None
    run_dir = resolve(params["run_dir"])
    if step == "04-evaluate":
        name = report_name(EvalParams.from_mapping(params))
        report = _read_json(files.eval_folder(run_dir, name) / files.EVAL_REPORT)
        return report and {"name": name, **{k: report["metrics"][k] for k in (
            "accuracy", "auc", "ap", "eer")}, "ci": report["metrics"].get("ci"),
            "ece": report["calibration"]["ece"]}
    if step == "05-benchmark":
        report = _read_json(run_dir / files.BENCHMARK_JSON)
        return report and {"video_auc": report["headline"]}
    return _read_json(run_dir / {"02-train": files.METRICS, "03-gradcam": files.CAM_METRICS}[step])


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _file_sets(params_file: str | None, key: str) -> bool:
    if not params_file or not resolve(params_file).is_file():
        return False
    return bool(read_params_file(params_file).get(key))


def check_split(params: Mapping[str, Any]) -> None:
    """Stop before any notebook runs when the split would refuse (no images to split, an
    existing split made otherwise, a file of the user's in the way)."""
    from dfutils.params import SplitParams

    try:
        split_step.preflight(SplitParams.from_mapping(params))
    except MissingInput as error:
        raise ChainError(f"{error}\nNo data yet? `make demo` runs the whole chain on a built-in "
                         "demo data set.") from None
    except split_step.SplitError as error:
        raise ChainError(str(error)) from None


def check_faces(params: Mapping[str, Any]) -> None:
    """Stop before anything is written when the faces step would refuse (raw and faces
    folders inside each other, no raw folder, faces made otherwise, a user's file in the
    way)."""
    from dfutils import faces
    from dfutils.params import FacesParams

    try:
        faces.preflight(FacesParams.from_mapping(params))
    except (faces.FacesError, MissingInput) as error:
        raise ChainError(str(error)) from None


def _values(params_file: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """File values, then command-line values, every name known to some notebook."""
    values: dict[str, Any] = {}
    if params_file:
        try:
            values.update(read_params_file(params_file))
        except ParameterError as error:
            raise ChainError(str(error)) from None
    values.update(overrides)
    known = {name for cls in NOTEBOOK_PARAMS for name in cls.names()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ChainError(f"unknown parameter {', '.join(map(repr, unknown))}; the notebooks "
                         f"declare: {', '.join(sorted(known))}")
    if "run_dir" in values:
        raise ChainError("run_dir is set by the runner: use RUN=<name> for runs/<name>")
    return values


def plan(params_file: str | None, overrides: Mapping[str, Any], steps: Sequence[str],
         run_dir: str, overwrite: bool) -> dict[str, dict[str, Any]]:
    """Every parameter of each step: defaults, then file values, then command-line values.

    Each step's values are validated by its parameter class here, before anything runs
    or any file changes, so a bad value never costs an existing run.
    """
    values = {**_values(params_file, overrides), "run_dir": run_dir}
    if overwrite:
        values.setdefault("overwrite", True)
    per_step = {}
    for step in steps:
        cls = parameters_of(step)
        try:
            per_step[step] = cls.from_mapping(cls.coerce(
                {k: v for k, v in values.items() if k in cls.names()})).to_dict()
        except ParameterError as error:
            raise ChainError(f"{step}: {error}") from None
    return per_step


def faces_first(per_step: dict[str, dict[str, Any]], overrides: Mapping[str, Any],
                params_file: str | None) -> None:
    """With FACES=1 the split reads the faces step's output, grouped by folder (one clip,
    one group) unless group_by was set."""
    if "00-faces" in per_step and "01-split" in per_step:
        split = per_step["01-split"]
        split["raw_dir"] = per_step["00-faces"]["faces_dir"]
        if "group_by" not in overrides and not _file_sets(params_file, "group_by"):
            split["group_by"] = "folder"


def _later_steps(step: str) -> list[str]:
    order = list(NOTEBOOKS)
    return order[order.index(step) + 1:]


def _run_step(run_dir: Path, step: str, params: dict[str, Any]) -> None:
    """Execute one notebook into run_dir and record it; steps after it become stale."""
    notebook, output = resolve(NOTEBOOKS[step]), run_dir / f"{step}.ipynb"
    recorded = read_run(run_dir).get("steps", {})
    for later in _later_steps(step):  # made from what this step is about to replace
        if (recorded.get(later) or {}).get("status") == "done":
            record_step(run_dir, later, status="stale", stale_because=f"{step} was run again")
    started = start_step(run_dir, step, notebook=NOTEBOOKS[step], params=params)
    print(f"== {step}: {output}", file=sys.stderr, flush=True)

    def failed(status: str, message: str, **fields: Any) -> None:
        finish_step(run_dir, step, status, started, **fields)
        remove_stale_temps(run_dir)
        error = ChainInterrupted if status == "interrupted" else ChainError
        raise error(f"{step} {message}; the partly executed notebook is {output}")

    try:
        # The kernel runs in its own session, so Ctrl-C reaches only this process; stopping
        # the kernel at once (not gracefully) keeps it from writing on after the interruption.
        os.environ[TEXT_ONLY] = "1"  # the kernel inherits it: text bars, for the log
        papermill.execute_notebook(notebook, output, parameters=params,
                                   kernel_name="python3", cwd=notebook.parent,
                                   progress_bar=False, log_output=True,
                                   shutdown_kernel="immediate")
    except papermill.PapermillExecutionError as error:
        failed("failed", f"failed in cell [{error.exec_count}]: {error.ename}: {error.evalue}",
               error={"cell": error.exec_count, "type": error.ename, "message": error.evalue})
    except DeadKernelError as error:
        failed("failed", "failed: the notebook's kernel died (out of memory? try a smaller "
               "batch_size or image_size)", error={"type": "DeadKernelError",
                                                   "message": str(error)})
    except KeyboardInterrupt:
        failed("interrupted", "was interrupted")
    finish_step(run_dir, step, "done", started, metrics=step_metrics(step, params))


RESUMABLE = ("pending", "running", "interrupted", "failed", "stale")


def resume_steps(run_dir: Path, steps: Sequence[str] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """The steps of a run still to do, each with the parameters it recorded: those not
    `done` (interrupted, failed, pending or stale), in chain order. An interrupted 02-train
    continues from its last completed epoch (last.pt)."""
    record = read_run(run_dir)
    if not record:
        raise ChainError(f"{run_dir} has no {files.RUN_RECORD}: there is no run to resume")
    todo = {}
    for step in steps or NOTEBOOKS:
        entry = record.get("steps", {}).get(step)
        if entry is None or entry.get("status") not in RESUMABLE:
            continue
        if "params" not in entry:
            raise ChainError(f"{run_dir / files.RUN_RECORD} records no parameters for {step}: "
                             "run it again with OVERWRITE=1 instead")
        params = dict(entry["params"])
        if step == "02-train":
            params["resume"] = (resolve(params["run_dir"]) / files.LAST).is_file()
        todo[step] = params
    return todo


def choose_steps(steps: Sequence[str] | None, params_file: str | None,
                 overrides: Mapping[str, Any], faces: bool) -> list[str]:
    """The steps asked for; by default the chain, with 00-faces when FACES=1, 04-evaluate
    when an eval_dir is given and 05-benchmark when test_sets are."""
    if not steps:
        asked = {step for step, key in ASKED_BY.items()
                 if key in overrides or _file_sets(params_file, key)}
        steps = [s for s in NOTEBOOKS if (s not in ASKED_BY or s in asked)
                 and (s != "00-faces" or faces)]
    for step in steps:
        if step not in NOTEBOOKS:
            raise ChainError(f"unknown step {step!r}; steps are {', '.join(NOTEBOOKS)}")
    return list(steps)


def make_room(run_dir: Path, steps: Sequence[str], replace: bool) -> Path | None:
    """Before a run starts in run_dir: refuse a folder that is not a run of ours, or an
    existing run unless `replace`. A whole chain over an existing run moves the old run
    aside (returned) until the new one succeeds; re-running some steps (STEPS=03-gradcam)
    keeps the other steps' files and records, and later steps are marked stale as each
    step starts."""
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return None
    if not replace:
        raise ChainError(f"run folder {run_dir} already exists: choose another RUN=<name> "
                         "or pass OVERWRITE=1 to replace it")
    if not (run_dir / files.RUN_RECORD).is_file():
        raise ChainError(f"{run_dir} holds files but no {files.RUN_RECORD}, so it is not a run "
                         "this tool made and will not be replaced: choose another RUN=<name>")
    if not {"01-split", "02-train"} <= set(steps):
        return None
    aside = run_dir.with_name(f".{run_dir.name}.previous-{os.getpid()}")
    os.replace(run_dir, aside)
    return aside


def run_steps(run_dir: Path, steps: Sequence[str], per_step: dict[str, dict[str, Any]],
              aside: Path | None) -> None:
    """Run the steps in order. When one fails or Ctrl-C stops it, the run before it comes
    back from `aside` (the failed attempt kept as <run>.failed-<time>), or the steps still
    current are summarised."""
    # Headless, every progress-bar refresh becomes a log line: refresh every 15 s at most.
    os.environ.setdefault("TQDM_MININTERVAL", "15")
    for step in steps:  # recorded before any runs, so RESUME=1 knows the whole plan
        if read_run(run_dir).get("steps", {}).get(step, {}).get("status") != "done":
            record_step(run_dir, step, status="pending", params=per_step[step],
                        notebook=NOTEBOOKS[step])
    try:
        for step in steps:
            _run_step(run_dir, step, per_step[step])
    except (ChainError, KeyboardInterrupt) as error:  # Ctrl-C between steps too
        kind = ChainInterrupted if isinstance(error, KeyboardInterrupt | ChainInterrupted) else (
            ChainError)
        message = str(error) or "interrupted"
        if aside is not None:
            failed = run_dir.with_name(f"{run_dir.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(run_dir, failed)
            os.replace(aside, run_dir)
            message = (message.replace(str(run_dir), str(failed))
                       + f"\nthe previous run is unchanged in {run_dir}")
        else:
            summarise(run_dir)  # the headline numbers of the steps that are still current
        raise kind(message) from None


def run_all(run: str | None = None, params_file: str | None = None,
            overrides: Mapping[str, Any] | None = None, overwrite: bool = False,
            steps: Sequence[str] | None = None, replace_run: bool = False,
            runs_root: str | Path = "runs", beside_data: bool = False,
            resume: bool = False, faces: bool = False) -> Path:
    """Run the chosen steps into <runs_root>/<run>/ and record everything in its run record.

    `beside_data` puts the run folder inside the output folder of the first step instead
    (`make faces`, `make split`; see BESIDE). Every parameter is validated and every check
    made before anything changes. Replacing a whole run (OVERWRITE=1) keeps the old run
    aside until the new chain succeeds (`make_room`, `run_steps`). `resume` continues an
    interrupted run with the parameters it recorded (`resume_steps`).
    """
    overrides = overrides or {}
    if beside_data and (not steps or steps[0] not in BESIDE):
        raise ChainError(f"--beside-data needs STEPS starting with {' or '.join(BESIDE)}")
    run = run or (BESIDE[steps[0]][1] if beside_data else time.strftime("%Y%m%d-%H%M%S"))
    if not is_plain_name(run):
        raise ChainError(f"RUN={run!r}: use letters, digits, '.', '_' or '-' (a folder name)")
    steps = choose_steps(steps, params_file, overrides, faces)
    if beside_data:
        key = BESIDE[steps[0]][0]
        output = _values(params_file, overrides).get(key, getattr(parameters_of(steps[0])(), key))
        runs_root = resolve(str(output))
    run_dir = resolve(runs_root) / run
    if resume:
        if params_file or overrides or overwrite:
            raise ChainError("RESUME=1 continues a run with the parameters it recorded: give "
                             "only RUN=<name> (and STEPS=), nothing else")
        per_step = resume_steps(run_dir, steps)
        steps = list(per_step)
        if not steps:
            raise ChainError(f"{run_dir}: every step is done and current; nothing to resume")
    else:
        shown = run_dir.relative_to(REPO_ROOT) if run_dir.is_relative_to(REPO_ROOT) else run_dir
        per_step = plan(params_file, overrides, steps, shown.as_posix(), overwrite)
        faces_first(per_step, overrides, params_file)
    if "00-faces" in steps:
        check_faces(per_step["00-faces"])
    if "01-split" in steps and "00-faces" not in steps:  # else its input does not exist yet
        check_split(per_step["01-split"])
    if "02-train" not in steps and not (run_dir / files.MODEL).is_file() and any(
            s in steps for s in ("03-gradcam", *ASKED_BY)):
        raise ChainError(f"{run_dir / files.MODEL} not found: " + (
            why_no_model(run_dir) if (run_dir / files.RUN_RECORD).is_file() else
            "RUN=<name> must name a trained run in runs/ (or add 02-train to STEPS)"))
    made = resolve(per_step["01-split"]["data_dir"]) if "01-split" in per_step else None
    for folder in (per_step.get("05-benchmark") or {}).get("test_sets", []):
        if resolve(folder) != made and not (resolve(folder) / files.MANIFEST).is_file():
            raise ChainError(f"TEST_SETS: {resolve(folder)} holds no {files.MANIFEST}: name split "
                             "folders made by `make split` (docs/datasets.md)")
    aside = None if resume else make_room(run_dir, steps, overwrite or replace_run)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)
    ensure_run(run_dir, run, params_file)
    run_steps(run_dir, steps, per_step, aside)
    if aside is not None:
        shutil.rmtree(aside)
    summarise(run_dir)
    return run_dir


def summarise(run_dir: Path) -> dict:
    """The headline numbers of a run, gathered from its steps into its run record's
    `summary`."""
    record = read_run(run_dir)
    steps = record.get("steps", {})
    current = {name: s for name, s in steps.items() if s.get("status") == "done"}
    train = (current.get("02-train") or {}).get("metrics") or {}
    cam = (current.get("03-gradcam") or {}).get("metrics") or {}
    on_blends = (cam.get("self_blends") or {}).get("localization") or {}
    deletion = cam.get("deletion") or {}
    located = cam.get("localization") or {}
    sbi = train.get("sbi") or {}
    video = train.get("video") or {}

    def ci(metrics: dict, key: str) -> list | None:
        return (metrics.get("ci") or {}).get(key)

    summary = {  # each headline with its 95% bootstrap interval (`_ci`) where it has one
        "val_auc": train.get("auc"), "val_auc_ci": ci(train, "auc"),
        "val_video_auc": video.get("auc"), "val_video_auc_ci": ci(video, "auc"),
        "val_accuracy": train.get("accuracy"), "val_accuracy_ci": ci(train, "accuracy"),
        "best_epoch": train.get("best_epoch"),
        "cam_layer": cam.get("layer"),
        "deletion_auc_cam": deletion.get("auc_cam"),
        "deletion_auc_cam_ci": ci(deletion, "auc_cam"),
        "deletion_auc_random": deletion.get("auc_random"),
        "deletion_auc_random_ci": ci(deletion, "auc_random"),
        "pointing_cam": located.get("pointing_cam"),
        "pointing_cam_ci": ci(located, "pointing_cam"),
        "pointing_random": located.get("pointing_random"),
        "pointing_random_ci": ci(located, "pointing_random"),
        "sbi_auc": sbi.get("auc"), "sbi_auc_ci": ci(sbi, "auc"),
        "self_blend_pointing_cam": on_blends.get("pointing_cam"),
        "self_blend_pointing_cam_ci": ci(on_blends, "pointing_cam"),
        "self_blend_pointing_random": on_blends.get("pointing_random"),
        "self_blend_pointing_random_ci": ci(on_blends, "pointing_random"),
        "test_video_auc": ((current.get("05-benchmark") or {}).get("metrics") or {}).get(
            "video_auc"),
        "seconds": round(sum(s.get("seconds", 0) for s in current.values()), 1),
    }
    write_run(run_dir, {**record, "summary": summary})
    return summary


def summary_lines(summary: dict) -> list[str]:
    """A run's headline numbers in words, each with its 95% interval: what `make run-all`
    prints at the end."""
    from dfutils.metrics import shown

    def pair(name: str, key: str) -> str:
        return (f"{name} CAM {shown(summary[key + '_cam'], summary.get(key + '_cam_ci'))} vs "
                f"random {shown(summary[key + '_random'], summary.get(key + '_random_ci'))}")

    lines = []
    if summary.get("val_auc") is not None:
        lines.append(f"validation (epoch {summary['best_epoch']}): AUC "
                     f"{shown(summary['val_auc'], summary.get('val_auc_ci'))}, accuracy "
                     f"{shown(summary['val_accuracy'], summary.get('val_accuracy_ci'))}")
    if summary.get("val_video_auc") is not None:
        lines.append(f"validation videos: AUC "
                     f"{shown(summary['val_video_auc'], summary.get('val_video_auc_ci'))}")
    if summary.get("sbi_auc") is not None:
        lines.append(f"validation self-blends: AUC "
                     f"{shown(summary['sbi_auc'], summary.get('sbi_auc_ci'))}")
    checks = [pair("deletion AUC (lower is better):", "deletion_auc")
              if summary.get("deletion_auc_cam") is not None else "",
              pair("pointing game:", "pointing") if summary.get("pointing_cam") is not None
              else "",
              pair("pointing on self-blends:", "self_blend_pointing")
              if summary.get("self_blend_pointing_cam") is not None else ""]
    if any(checks):
        lines.append(f"Grad-CAM on {summary.get('cam_layer')}: "
                     + "; ".join(c for c in checks if c))
    for name, auc in (summary.get("test_video_auc") or {}).items():
        lines.append(f"test set {name}: video AUC {shown(auc, None)} (benchmark.csv has the "
                     "intervals)")
    return lines
