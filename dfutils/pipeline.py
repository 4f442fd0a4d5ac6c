"""The experiment chain: 01-split -> 02-train -> 03-gradcam, run by papermill into runs/<run>/."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat
import papermill
from nbclient.exceptions import DeadKernelError

from dfutils import split as split_step
from dfutils.params import (
    NOTEBOOK_PARAMS,
    ParameterError,
    parameters_cell,
    parameters_of,
    read_parameters_cell,
    read_params_file,
)
from dfutils.paths import REPO_ROOT, is_plain_name, remove_stale_temps, resolve, write_json
from dfutils.progress import TEXT_ONLY
from dfutils.runs import now, read_run, record_step, start_run, start_step

NOTEBOOKS = {
    "00-faces": "notebooks/00-faces.ipynb",  # run when FACES=1 is given
    "01-split": "notebooks/01-split.ipynb",
    "02-train": "notebooks/02-train.ipynb",
    "03-gradcam": "notebooks/03-gradcam.ipynb",
    "04-evaluate": "notebooks/04-evaluate.ipynb",  # run when EVAL_DIR is given
}
# Shorthands accepted on the command line (make run-all EPOCHS=5).
ALIASES = {"epochs": "max_epochs"}
# Keys the runner owns; everything else is a notebook parameter.
RUNNER_KEYS = ("run", "params", "overwrite", "steps", "resume", "faces")
# `make faces` and `make split` keep their run folder beside their output (--beside-data):
# step -> (the parameter naming the output folder, the run folder's name in it)
BESIDE = {"00-faces": ("faces_dir", "faces-run"), "01-split": ("data_dir", "split-run")}
SPLIT_RUN = BESIDE["01-split"][1]


class ChainError(RuntimeError):
    """The chain cannot start or a step failed; the message says which and why."""


class ChainInterrupted(ChainError):
    """Ctrl-C (or SIGINT) stopped a step; run.json says which steps are complete."""


def parse_assignments(args: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split KEY=VALUE words into the runner's settings and notebook parameters (lower case)."""
    runner, params = {}, {}
    for word in args:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ChainError(f"expected KEY=VALUE, got {word!r}")
        key = ALIASES.get(key.lower(), key.lower())
        (runner if key in RUNNER_KEYS else params)[key] = value
    return runner, params


def _split_metrics(report: dict) -> dict:
    return {"counts": report["counts"], "n_images": report["n_images"],
            "n_masks": report.get("n_masks", 0), "n_rejected": len(report["rejected"]),
            "n_skipped": len(report["skipped"]), "n_duplicate_groups": len(report["duplicates"]),
            "group_counts": report.get("group_counts"),
            "n_conflicts": len(report["conflicts"])}


def step_metrics(step: str, params: Mapping[str, Any]) -> dict | None:
    """What a finished step wrote that run.json summarises (each file named by its module)."""
    from dfutils import faces, gradcam, inference, train

    if step == "00-faces":
        report = faces.read_report(resolve(params["faces_dir"]))
        return {k: report[k] for k in ("n_sources", "n_crops", "frames_read", "faces_found")
                } | {"n_unreadable": len(report["unreadable"])} if report else None
    if step == "01-split":
        report = split_step.read_report(resolve(params["data_dir"]))
        return _split_metrics(report) if report else None
    run_dir = resolve(params["run_dir"])
    if step == "04-evaluate":
        name = params.get("name") or resolve(params["eval_dir"]).name
        file = inference.eval_folder(run_dir, name) / inference.REPORT
        if not file.is_file():
            return None
        report = json.loads(file.read_text())
        return {"name": name, **{k: report["metrics"][k] for k in ("accuracy", "auc", "ap", "eer")},
                "ece": report["calibration"]["ece"]}
    file = run_dir / {"02-train": train.METRICS, "03-gradcam": gradcam.METRICS}[step]
    return json.loads(file.read_text()) if file.is_file() else None


def _file_sets(params_file: str | None, key: str) -> bool:
    if not params_file or not resolve(params_file).is_file():
        return False
    return bool(read_params_file(params_file).get(key))


def check_split(params: Mapping[str, Any]) -> None:
    """Stop before any notebook runs when the split would refuse (no images to split, an
    existing split made otherwise, a file of the user's in the way)."""
    try:
        split_step.preflight(params["raw_dir"], params["data_dir"], params["val_fraction"],
                             params["seed"], params["overwrite"], params["group_by"],
                             params["group_pattern"])
    except split_step.NoImagesError as error:
        raise ChainError(f"{error}\nNo data yet? `make demo` runs the whole chain on a built-in "
                         "demo data set.") from None
    except split_step.SplitError as error:
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
    start_step(run_dir, step, notebook=NOTEBOOKS[step], params=params)
    print(f"== {step}: {output}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()

    def failed(status: str, message: str, **fields: Any) -> None:
        record_step(run_dir, step, status=status, finished=now(),
                    seconds=round(time.perf_counter() - t0, 2), **fields)
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
    record_step(run_dir, step, status="done", finished=now(),
                seconds=round(time.perf_counter() - t0, 2), metrics=step_metrics(step, params))


RESUMABLE = ("pending", "running", "interrupted", "failed", "stale")


def resume_steps(run_dir: Path, steps: Sequence[str] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """The steps of a run still to do, each with the parameters it recorded: those not
    `done` (interrupted, failed, pending or stale), in chain order. An interrupted 02-train
    continues from its last completed epoch (last.pt)."""
    from dfutils.train import LAST

    record = read_run(run_dir)
    if not record:
        raise ChainError(f"{run_dir} has no run.json: there is no run to resume")
    todo = {}
    for step in steps or NOTEBOOKS:
        entry = record.get("steps", {}).get(step)
        if entry is None or entry.get("status") not in RESUMABLE:
            continue
        if "params" not in entry:
            raise ChainError(f"{run_dir}/run.json records no parameters for {step}: run it "
                             "again with OVERWRITE=1 instead")
        params = dict(entry["params"])
        if step == "02-train":
            params["resume"] = (resolve(params["run_dir"]) / LAST).is_file()
        todo[step] = params
    return todo


def run_all(run: str | None = None, params_file: str | None = None,
            overrides: Mapping[str, Any] | None = None, overwrite: bool = False,
            steps: Sequence[str] | None = None, replace_run: bool = False,
            runs_root: str | Path = "runs", beside_data: bool = False,
            resume: bool = False, faces: bool = False) -> Path:
    """Run the chosen steps into <runs_root>/<run>/ and record everything in run.json.

    `beside_data` puts the run folder inside the output folder of the first step instead
    (`make faces`, `make split`; see BESIDE).
    Replacing a whole run (OVERWRITE=1 with 01-split and 02-train) keeps the old run aside
    until the new chain succeeds; if it fails, the old run is put back and the failed
    attempt is kept under <run>.failed-<time>. `resume` continues an interrupted run with
    the parameters it recorded (see `resume_steps`).
    """
    overrides = overrides or {}
    if beside_data and (not steps or steps[0] not in BESIDE):
        raise ChainError(f"--beside-data needs STEPS starting with {' or '.join(BESIDE)}")
    run = run or (BESIDE[steps[0]][1] if beside_data else time.strftime("%Y%m%d-%H%M%S"))
    if not is_plain_name(run):
        raise ChainError(f"RUN={run!r}: use letters, digits, '.', '_' or '-' (a folder name)")
    if not steps:  # the chain, 00-faces with FACES=1, 04-evaluate when given something
        evaluate = "eval_dir" in overrides or _file_sets(params_file, "eval_dir")
        steps = [s for s in NOTEBOOKS
                 if (s != "04-evaluate" or evaluate) and (s != "00-faces" or faces)]
    steps = list(steps)
    for step in steps:
        if step not in NOTEBOOKS:
            raise ChainError(f"unknown step {step!r}; steps are {', '.join(NOTEBOOKS)}")
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
    if "01-split" in steps and "00-faces" not in steps:  # else its input does not exist yet
        check_split(per_step["01-split"])
    aside = None
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not (overwrite or replace_run):
            raise ChainError(f"run folder {run_dir} already exists: choose another RUN=<name> "
                             "or pass OVERWRITE=1 to replace it")
        if not (run_dir / "run.json").is_file():
            raise ChainError(f"{run_dir} holds files but no run.json, so it is not a run this "
                             "tool made and will not be replaced: choose another RUN=<name>")
        if {"01-split", "02-train"} <= set(steps):
            aside = run_dir.with_name(f".{run}.previous-{os.getpid()}")
            os.replace(run_dir, aside)
        # else: re-running some steps of an existing run (e.g. STEPS=03-gradcam) keeps the
        # other steps' files and records; later steps are marked stale as each step starts.
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)
    if not (run_dir / "run.json").is_file():
        start_run(run_dir, run, params_file)
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
            failed = run_dir.with_name(f"{run}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(run_dir, failed)
            os.replace(aside, run_dir)
            message = (message.replace(str(run_dir), str(failed))
                       + f"\nthe previous run is unchanged in {run_dir}")
        else:
            summarise(run_dir)  # the headline numbers of the steps that are still current
        raise kind(message) from None
    if aside is not None:
        shutil.rmtree(aside)
    summarise(run_dir)
    return run_dir


def summarise(run_dir: Path) -> dict:
    """The headline numbers of a run, gathered from its steps into run.json's `summary`."""
    record = read_run(run_dir)
    steps = record.get("steps", {})
    current = {name: s for name, s in steps.items() if s.get("status") == "done"}
    train = (current.get("02-train") or {}).get("metrics") or {}
    cam = (current.get("03-gradcam") or {}).get("metrics") or {}
    on_blends = (cam.get("self_blends") or {}).get("localization") or {}
    summary = {
        "val_auc": train.get("auc"),
        "val_video_auc": (train.get("video") or {}).get("auc"),
        "val_accuracy": train.get("accuracy"),
        "best_epoch": train.get("best_epoch"),
        "deletion_auc_cam": (cam.get("deletion") or {}).get("auc_cam"),
        "deletion_auc_random": (cam.get("deletion") or {}).get("auc_random"),
        "pointing_cam": (cam.get("localization") or {}).get("pointing_cam"),
        "pointing_random": (cam.get("localization") or {}).get("pointing_random"),
        "sbi_auc": (train.get("sbi") or {}).get("auc"),
        "self_blend_pointing_cam": on_blends.get("pointing_cam"),
        "self_blend_pointing_random": on_blends.get("pointing_random"),
        "seconds": round(sum(s.get("seconds", 0) for s in current.values()), 1),
    }
    write_json(run_dir / "run.json", {**record, "summary": summary})
    return summary


# The kernel the notebooks name: `make setup` registers it (`python -m dfutils install-kernel`).
KERNEL = {"name": "dfutils", "display_name": "Python (dfutils)", "language": "python"}


def install_kernel() -> str:
    """Register this interpreter as the notebooks' kernel, inside its environment."""
    from ipykernel.kernelspec import install

    return install(kernel_name=KERNEL["name"], display_name=KERNEL["display_name"],
                   prefix=sys.prefix)


def _git(where: Path, *args: str) -> subprocess.CompletedProcess:
    """git run in folder `where`; output as bytes."""
    return subprocess.run(["git", *args], cwd=where, capture_output=True)


def staged_text(path: Path, as_path: Path | None = None) -> tuple[bytes, str]:
    """What `git add` would stage for a file (as if it were at `as_path`): its content
    through the clean filter its git attributes name (nbstripout, which `make setup`
    installs), run as git runs it; or the content as it is, when no filter applies. With a
    word on which it was."""
    content = path.read_bytes()
    where = as_path or path
    top = _git(where.parent, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        return content, "not in a git work tree: the file as it is"
    root = top.stdout.decode().strip()
    attribute = _git(where.parent, "check-attr", "filter", "--", where.name).stdout.decode()
    name = attribute.rpartition(": ")[2].strip()
    if name in ("", "unspecified", "unset"):
        return content, "no git filter applies: the file as it is"
    clean = _git(where.parent, "config", "--get", f"filter.{name}.clean").stdout.decode().strip()
    if not clean:
        return content, (f"git filter {name!r} is not installed (run `make setup`): the file "
                         "as it is")
    relative = where.resolve().relative_to(Path(root).resolve()).as_posix()
    filtered = subprocess.run(clean.replace("%f", shlex.quote(relative)), shell=True,
                              cwd=root, input=content, capture_output=True)
    if filtered.returncode != 0:
        raise RuntimeError(f"{path}: git filter {name!r} failed: {filtered.stderr.decode()}")
    return filtered.stdout, f"through git filter {name!r}"


def refresh_git_stat(os_path: str, **_: Any) -> bool:
    """`make lab`'s post-save hook. A notebook saved with outputs differs on disk from what
    git stores, and `git status` lists every file whose size changed, even when the filter
    would stage nothing new. When what `git add` would stage of the saved notebook is
    exactly what is staged already, stage it (the same content: only git's record of the
    file's size and time changes), so `git status` shows no change; any other change is
    left for the user. True when it refreshed."""
    path = Path(os_path)
    text, how = staged_text(path) if path.suffix == ".ipynb" else (b"", "")
    if not how.startswith("through git filter"):
        return False
    folder, name = path.parent, path.name
    entry = _git(folder, "ls-files", "--stage", "--", name).stdout.decode().split()
    index = _git(folder, "show", f":./{name}")
    if not entry or index.returncode != 0 or index.stdout != text:
        return False
    _git(folder, "add", "--", name)
    if _git(folder, "ls-files", "--stage", "--", name).stdout.decode().split()[:2] != entry[:2]:
        # saved again meanwhile with other content: put the entry back as it was
        _git(folder, "update-index", "--cacheinfo", f"{entry[0]},{entry[1]},{entry[3]}")
        return False
    return True


def commit_problems(path: Path) -> list[str]:
    """What a commit of this notebook would carry that it must not: outputs or execution
    counts (in what `git add` would stage, and in what is staged now), or, in what `git add`
    would stage, another kernel than the project's."""
    problems = []
    text, how = staged_text(path)
    versions = [(text, f"as git would stage it ({how})")]
    index = _git(path.parent, "show", f":./{path.name}")
    if index.returncode == 0:
        versions.append((index.stdout, "as staged now"))
    for content, where in versions:
        nb = nbformat.reads(content.decode("utf-8"), as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                 and (c.get("outputs") or c.get("execution_count") is not None)]
        if dirty:
            problems.append(f"{path}: {where}, cells {dirty} carry outputs or execution counts "
                            "(`make setup` installs the filter that strips them on `git add`; "
                            "or run `.venv/bin/nbstripout` on the file)")
        kernel = nb.metadata.get("kernelspec", {}).get("name")
        if content is text and kernel != KERNEL["name"]:
            problems.append(f"{path}: {where}, its kernel is {kernel!r}, not the project's "
                            f"{KERNEL['name']!r} ({KERNEL['display_name']}): choose that kernel "
                            "in JupyterLab and save")
    return problems


def check_notebooks(paths: Sequence[str | Path], fix: bool = False) -> list[str]:
    """Problems with notebooks: what a commit would carry (`commit_problems`), and their
    parameters cells: exactly one, the first code cell, and the same names, order, defaults
    and comments as the notebook's parameter class. `fix` rewrites a cell that differs from
    the class (the class is the one source)."""
    problems = []
    for path in paths:
        problems += commit_problems(Path(path))
        nb = nbformat.read(str(path), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
        if len(tagged) != 1 or tagged[0] != 0:
            problems.append(f"{path}: needs exactly one cell tagged 'parameters', as its first "
                            f"code cell (found at code cells {tagged})")
            continue
        cls = parameters_of(str(path))
        expected = read_parameters_cell(parameters_cell(cls))
        try:
            found = read_parameters_cell(code[0].source)
        except ValueError as error:
            found, problem = [], f"{path}: parameters cell: {error}"
        else:
            problem = _cell_difference(path, cls, found, expected)
        if problem and fix:
            code[0].source = parameters_cell(cls)
            nbformat.write(nb, str(path))
            found, problem = expected, ""
        if problem:
            problems.append(problem + " (python -m dfutils check-notebooks --fix writes the "
                            f"cell from {cls.__name__})")
            continue
        unparsed = {name for name, _, _ in found} - set(papermill.inspect_notebook(str(path)))
        problems += [f"{path}: papermill cannot parse parameter {name!r}" for name in unparsed]
    return problems


def _cell_difference(path: str | Path, cls: type, found: list, expected: list) -> str:
    """The first way a parameters cell differs from its class, or ""."""
    names, wanted = [f[0] for f in found], [e[0] for e in expected]
    missing, extra = [n for n in wanted if n not in names], [n for n in names if n not in wanted]
    if missing or extra:
        return (f"{path}: parameters cell and {cls.__name__} differ: missing "
                f"{missing or 'none'}, extra {extra or 'none'}")
    if names != wanted:
        return f"{path}: parameters are not in {cls.__name__}'s order {wanted}"
    for (name, value, text), (_, default, help_text) in zip(found, expected, strict=True):
        if value != default or type(value) is not type(default):
            return f"{path}: {name} = {value!r} but {cls.__name__}'s default is {default!r}"
        if text != help_text:
            return f"{path}: the comment of {name} is not {cls.__name__}'s help {help_text!r}"
    return ""
