"""The steps of the experiment, one entry each in STEPS, and the runner that chains them:
00-faces -> 01-split -> 02-train -> 03-gradcam -> 04-evaluate -> 05-benchmark.

A step is a notebook, a Params class and one `Step` entry, the way an architecture is
one entry of `archs.ARCHS`: the entry says which function its notebook and its command
run, which folder it writes, what it checks before anything is written, and what it adds
to the run record. Nothing here names a step: the runner (`run_all`, behind `make
run-all`) executes the entries' notebooks with papermill into a run folder, and every
command (`python -m dfutils <step>`) calls the entry's function; both record the step in
run.json through one lifecycle (`recorded`).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import papermill
from nbclient.exceptions import DeadKernelError

from dfutils import benchmark, evaluate, faces, gradcam, paths, split, train
from dfutils.atomic import remove_stale_temps
from dfutils.datasets import MissingInput
from dfutils.detector import load_model, read_config
from dfutils.params import (
    BenchmarkParams,
    EvalParams,
    FacesParams,
    GradCamParams,
    ParameterError,
    Params,
    SplitParams,
    TrainParams,
    read_params_file,
)
from dfutils.paths import REPO_ROOT, is_plain_name, resolve
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


class ChainError(RuntimeError):
    """The chain cannot start or a step failed; the message says why and what to do."""


class ChainInterrupted(ChainError):
    """Ctrl-C (or SIGINT) stopped a step; run.json says which steps are complete."""


# What the steps planned for one chain are: each step's name -> its parameters.
Chain = Mapping[str, Mapping[str, Any]]


def _nothing(*args: Any) -> Any:
    return None


def _no_summary(record: dict) -> dict:
    return {}


def _no_lines(*args: Any) -> list[str]:
    return []


@dataclass(frozen=True)
class Step:
    """One step of the experiment. Its name (its Params class's `step`) is its notebook's
    stem, its record's key in run.json, and, after the dash, its command."""

    params: type[Params]  # its parameters, defined and validated once
    run: Callable[[Any], Any]  # the function its notebook and its command call with them
    folder: str = "run_dir"  # the parameter naming the folder it writes
    # What its run.json entry keeps of what it wrote (read from its files), then what the
    # run's summary takes of that, and the summary in words (what a chain prints at the end)
    record: Callable[[Any], dict | None] = _nothing
    summary: Callable[[dict], dict] = _no_summary
    summary_lines: Callable[[dict], list[str]] = _no_lines
    shown: Callable[[Any, Any], list[str]] = _no_lines  # what its command prints when done
    status: Callable[[Any], str] = lambda result: "done"  # how the run ended: or interrupted
    # Checks made before anything is written (the chain: every step planned with it)
    preflight: Callable[[Any, Chain], None] = _nothing
    # Its planned parameters, adjusted to the steps planned before it (the names given)
    after: Callable[[dict[str, dict], set[str]], None] = _nothing
    reads: str = ""  # the step whose output it reads: when that one runs again, this one's
    # result is stale
    asked_by: str = ""  # an optional step runs when this parameter (or runner flag) is given
    beside: str = ""  # its run record in this folder inside `folder` (make faces, make split)
    starts_run: bool = False  # a chain running every such step makes the run anew
    resumed: Callable[[dict], dict] = lambda params: params  # recorded params, to continue
    torchrun: bool = False  # its command joins torchrun's processes (one record, rank 0's)

    @property
    def name(self) -> str:
        return self.params.step

    @property
    def notebook(self) -> str:
        return f"notebooks/{self.name}.ipynb"

    @property
    def command(self) -> str:
        return self.name.split("-", 1)[1]

    @property
    def help(self) -> str:
        return (self.params.__doc__ or "").split(": ", 1)[-1].strip().rstrip(".")


def _trained(params: Any, chain: Chain) -> None:
    """A step that reads the run's model: trained in this chain, or before it (or an
    exported folder it names)."""
    run_dir = resolve(params.run_dir)
    if getattr(params, "model_dir", ""):
        read_config(resolve(params.model_dir))
        return
    if "02-train" not in chain and not (run_dir / paths.MODEL).is_file():
        raise ChainError(f"{run_dir / paths.MODEL} not found: " + (
            why_no_model(run_dir) if (run_dir / paths.RUN_RECORD).is_file() else
            "RUN=<name> must name a trained run in runs/ (or add 02-train to STEPS)"))


def _faces_ready(params: FacesParams, chain: Chain) -> None:
    faces.preflight(params)


def _split_ready(params: SplitParams, chain: Chain) -> None:
    if "00-faces" in chain:  # its input does not exist yet
        return
    try:
        split.preflight(params)
    except MissingInput as error:
        raise ChainError(f"{error}\nNo data yet? `make demo` runs the whole chain on a "
                         "built-in demo data set.") from None


def _test_sets_ready(params: BenchmarkParams, chain: Chain) -> None:
    _trained(params, chain)
    made = resolve(chain["01-split"]["data_dir"]) if "01-split" in chain else None
    trained = None if "02-train" in chain and not params.model_dir else load_model(
        params.run_dir, params.model_dir, params.onnx)
    benchmark.check_test_sets(params.test_sets, trained, made)


STEPS: dict[str, Step] = {step.name: step for step in (
    Step(FacesParams, faces.extract_faces, folder="faces_dir", record=faces.record,
         shown=faces.shown_lines, preflight=_faces_ready, asked_by="faces",
         beside=paths.FACES_RUN),
    Step(SplitParams, split.split, folder="data_dir", record=split.record,
         shown=split.shown_lines, preflight=_split_ready, after=split.after_faces,
         reads="00-faces", beside=paths.SPLIT_RUN, starts_run=True),
    Step(TrainParams, train.train_run, record=train.record, summary=train.summary,
         summary_lines=train.summary_lines, status=train.status, preflight=train.preflight,
         reads="01-split",
         starts_run=True, resumed=train.resumed, torchrun=True),
    Step(GradCamParams, gradcam.gradcam_run, record=gradcam.record, summary=gradcam.summary,
         summary_lines=gradcam.summary_lines, shown=gradcam.shown_lines, preflight=_trained,
         reads="02-train"),
    Step(EvalParams, evaluate.evaluate_folder, record=evaluate.record,
         shown=evaluate.shown_lines, preflight=_trained, reads="02-train",
         asked_by="eval_dir"),
    Step(BenchmarkParams, benchmark.run_benchmark, record=benchmark.record,
         summary=benchmark.summary, summary_lines=benchmark.summary_lines,
         shown=benchmark.shown_lines, preflight=_test_sets_ready, reads="02-train",
         asked_by="test_sets"),
)}
# The runner's own settings (RUN=, PARAMS=, ...); everything else is a step's parameter.
RUNNER_KEYS = ("run", "params", "overwrite", "steps", "resume", "faces")
FLAGS = ("overwrite", "resume", "faces")  # of those, the yes/no ones


def parameter_names() -> set[str]:
    """Every name some step declares."""
    return {name for step in STEPS.values() for name in step.params.names()}


def load_params(cls: type[Params], params_file: str | None, given: Mapping[str, Any]
                ) -> Params:
    """One step's parameters from a YAML file and given values (which win), validated.
    Keys that belong to the other steps (a chain's file holds them all) are passed over; a
    key no step knows is an error."""
    values: dict[str, Any] = {}
    if params_file:
        values.update(read_params_file(params_file))
    values.update(given)
    unknown = sorted(set(values) - parameter_names() - set(cls.names()))
    if unknown:
        raise ParameterError(f"unknown parameter {', '.join(map(repr, unknown))} for "
                             f"{cls.step}; known: {', '.join(cls.names())}")
    return cls.from_mapping(cls.coerce({k: v for k, v in values.items()
                                        if k in cls.names()}))


# -- One step's record in run.json -------------------------------------------------------------

def record_dir(step: Step, params: Mapping[str, Any]) -> Path:
    """The folder whose run.json records a step: its run folder, or the folder beside its
    output (`make faces`, `make split`)."""
    folder = resolve(params[step.folder])
    return folder / step.beside if step.beside else folder


def made_from(name: str) -> list[str]:
    """The steps whose results are made from a step's, directly or not (`Step.reads`)."""
    def reads(other: str) -> bool:
        seen = STEPS[other].reads
        while seen and seen != name:
            seen = STEPS[seen].reads if seen in STEPS else ""
        return seen == name

    return [other for other in STEPS if reads(other)]


@contextmanager
def recorded(run_dir: Path, step: Step, params: dict[str, Any], **fields: Any
             ) -> Iterator[Callable[[str], None]]:
    """The one lifecycle of a step in run.json, for a notebook the runner executes and for
    a command alike: the steps made from it that were done become stale (`Step.reads`:
    they were made from what it is about to replace), it is recorded as running, then as
    done (with what it wrote: `Step.record`), failed or interrupted, and the run's summary
    is made again. The block may call `ended(status)` to record another end than done."""
    recorded_steps = read_run(run_dir).get("steps", {})
    for later in made_from(step.name):
        if (recorded_steps.get(later) or {}).get("status") == "done":
            record_step(run_dir, later, status="stale", stale_because=f"{step.name} was run again")
    started = start_step(run_dir, step.name, params=params, **fields)
    end = {"status": "done"}
    try:
        yield lambda status: end.update(status=status)
    except KeyboardInterrupt:
        finish_step(run_dir, step.name, "interrupted", started)
        summarise(run_dir)
        raise
    except BaseException:
        finish_step(run_dir, step.name, "failed", started)
        summarise(run_dir)
        raise
    finish_step(run_dir, step.name, end["status"], started,
                metrics=step.record(step.params.from_mapping(params)))
    summarise(run_dir)


def run_command(step: Step, params: Params, record: bool = True,
                shard: Any = None, **fields: Any) -> Any:
    """A step as a command: its function (with a `shard`: one task's share of a cluster
    job), recorded in its run record unless `record` is False (a task of a cluster job,
    whose merge records the step; a torchrun rank but the first)."""
    run = functools.partial(step.run, shard=shard) if shard is not None else step.run
    if not record:
        return run(params)
    run_dir = record_dir(step, params.to_dict())
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)
    ensure_run(run_dir, run_dir.name, None)
    with recorded(run_dir, step, params.to_dict(), **fields) as ended:
        result = run(params)
        ended(step.status(result))
    return result


def summarise(run_dir: Path) -> dict:
    """The headline numbers of a run, each with its 95% interval where it has one, from
    the steps that are done and current, into its run record's `summary`."""
    record = read_run(run_dir)
    current = {name: s for name, s in record.get("steps", {}).items()
               if s.get("status") == "done"}
    summary: dict[str, Any] = {}
    for name, step in STEPS.items():
        summary |= step.summary((current.get(name) or {}).get("metrics") or {})
    summary["seconds"] = round(sum(s.get("seconds", 0) for s in current.values()), 1)
    write_run(run_dir, {**record, "summary": summary})
    return summary


def summary_lines(summary: dict) -> list[str]:
    """A run's headline numbers in words: what `make run-all` prints at the end."""
    return [line for step in STEPS.values() for line in step.summary_lines(summary)]


# -- The chain ---------------------------------------------------------------------------

def _file_sets(params_file: str | None, key: str) -> bool:
    if not params_file or not resolve(params_file).is_file():
        return False
    return bool(read_params_file(params_file).get(key))


def _values(params_file: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """File values, then command-line values, every name known to some step."""
    values: dict[str, Any] = {}
    if params_file:
        try:
            values.update(read_params_file(params_file))
        except ParameterError as error:
            raise ChainError(str(error)) from None
    values.update(overrides)
    known = parameter_names()
    unknown = sorted(set(values) - known)
    if unknown:
        raise ChainError(f"unknown parameter {', '.join(map(repr, unknown))}; the notebooks "
                         f"declare: {', '.join(sorted(known))}")
    if "run_dir" in values:
        raise ChainError("run_dir is set by the runner: use RUN=<name> for runs/<name>")
    return values


def plan(params_file: str | None, overrides: Mapping[str, Any], steps: Sequence[str],
         run_dir: str, overwrite: bool) -> dict[str, dict[str, Any]]:
    """Every parameter of each step: defaults, then file values, then command-line values,
    each step's adjusted to the steps before it (`Step.after`).

    Each step's values are validated by its parameter class here, before anything runs
    or any file changes, so a bad value never costs an existing run.
    """
    values = {**_values(params_file, overrides), "run_dir": run_dir}
    taken = {name for step in steps for name in STEPS[step].params.names()}
    idle = sorted(set(overrides) - taken)  # (a parameter file holds every step's: not those)
    if idle:
        owners = [name for name, step in STEPS.items() if idle[0] in step.params.names()]
        raise ChainError(f"{idle[0].upper()}= is a parameter of {', '.join(owners)}, which this "
                         f"chain does not run ({', '.join(steps)}): it would have no effect; "
                         "leave it out, or add the step to STEPS=")
    if overwrite:
        values.setdefault("overwrite", True)
    given = set(overrides) | set(read_params_file(params_file) if params_file else {})
    planned = {}
    for name in steps:
        cls = STEPS[name].params
        try:
            planned[name] = cls.from_mapping(cls.coerce(
                {k: v for k, v in values.items() if k in cls.names()})).to_dict()
        except ParameterError as error:
            raise ChainError(f"{name}: {error}") from None
        STEPS[name].after(planned, given)
    return planned


def choose_steps(steps: Sequence[str] | None, params_file: str | None,
                 overrides: Mapping[str, Any], flags: Mapping[str, bool]) -> list[str]:
    """The steps asked for; by default every step, an optional one when the parameter (or
    runner flag) that asks for it is given (00-faces with FACES=1, 04-evaluate with
    EVAL_DIR=, 05-benchmark with TEST_SETS=)."""
    if not steps:
        def asked(key: str) -> bool:
            if key in FLAGS:
                return bool(flags.get(key))
            return key in overrides or _file_sets(params_file, key)

        steps = [name for name, step in STEPS.items()
                 if not step.asked_by or asked(step.asked_by)]
    for name in steps:
        if name not in STEPS:
            raise ChainError(f"unknown step {name!r}; steps are {', '.join(STEPS)}")
    return list(steps)


def _execute(run_dir: Path, step: Step, params: dict[str, Any]) -> None:
    """Execute a step's notebook into run_dir with papermill, recorded."""
    notebook, output = resolve(step.notebook), run_dir / f"{step.name}.ipynb"
    print(f"== {step.name}: {output}", file=sys.stderr, flush=True)
    try:
        with recorded(run_dir, step, params, notebook=step.notebook):
            # The kernel runs in its own session, so Ctrl-C reaches only this process;
            # stopping it at once (not gracefully) keeps it from writing after the stop.
            os.environ[TEXT_ONLY] = "1"  # the kernel inherits it: text bars, for the log
            papermill.execute_notebook(notebook, output, parameters=params,
                                       kernel_name="python3", cwd=notebook.parent,
                                       progress_bar=False, log_output=True,
                                       shutdown_kernel="immediate")
    except papermill.PapermillExecutionError as error:
        record_step(run_dir, step.name, error={"cell": error.exec_count, "type": error.ename,
                                               "message": error.evalue})
        _failed(run_dir, step, output, f"failed in cell [{error.exec_count}]: {error.ename}: "
                f"{error.evalue}")
    except DeadKernelError as error:
        record_step(run_dir, step.name, error={"type": "DeadKernelError",
                                               "message": str(error)})
        _failed(run_dir, step, output, "failed: the notebook's kernel died (out of memory? try "
                "a smaller batch_size or image_size)")
    except KeyboardInterrupt:
        remove_stale_temps(run_dir)
        raise ChainInterrupted(f"{step.name} was interrupted; the partly executed notebook "
                               f"is {output}") from None


def _failed(run_dir: Path, step: Step, output: Path, message: str) -> None:
    remove_stale_temps(run_dir)
    raise ChainError(f"{step.name} {message}; the partly executed notebook is {output}")


RESUMABLE = ("pending", "running", "interrupted", "failed", "stale")


def resume_steps(run_dir: Path, steps: Sequence[str] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """The steps of a run still to do, each with the parameters it recorded: those not
    `done` (interrupted, failed, pending or stale), in chain order. An interrupted 02-train
    continues from its last completed epoch (`Step.resumed`)."""
    record = read_run(run_dir)
    if not record:
        raise ChainError(f"{run_dir} has no {paths.RUN_RECORD}: there is no run to resume")
    todo = {}
    for name in steps or STEPS:
        entry = record.get("steps", {}).get(name)
        if entry is None or entry.get("status") not in RESUMABLE:
            continue
        if "params" not in entry:
            raise ChainError(f"{run_dir / paths.RUN_RECORD} records no parameters for {name}: "
                             "run it again with OVERWRITE=1 instead")
        todo[name] = STEPS[name].resumed(dict(entry["params"]))
    return todo


def make_room(run_dir: Path, steps: Sequence[str], replace: bool) -> Path | None:
    """Before a run starts in run_dir: refuse a folder that is not a run of ours, or an
    existing run unless `replace`. A chain that makes the run anew (it runs every step that
    `starts_run`: the split and the training) moves the old run aside (returned) until the
    new one succeeds; re-running some steps (STEPS=03-gradcam) keeps the other steps' files
    and records, and later steps are marked stale as each step starts."""
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return None
    if not replace:
        raise ChainError(f"run folder {run_dir} already exists: choose another RUN=<name> "
                         "or pass OVERWRITE=1 to replace it")
    if not (run_dir / paths.RUN_RECORD).is_file():
        raise ChainError(f"{run_dir} holds files but no {paths.RUN_RECORD}, so it is not a run "
                         "this tool made and will not be replaced: choose another RUN=<name>")
    if not {name for name, step in STEPS.items() if step.starts_run} <= set(steps):
        return None
    aside = run_dir.with_name(f".{run_dir.name}.previous-{os.getpid()}")
    os.replace(run_dir, aside)
    return aside


def run_steps(run_dir: Path, steps: Sequence[str], planned: dict[str, dict[str, Any]],
              aside: Path | None) -> None:
    """Run the steps in order. When one fails or Ctrl-C stops it, the run before it comes
    back from `aside` (the failed attempt kept as <run>.failed-<time>)."""
    # Headless, every progress-bar refresh becomes a log line: refresh every 15 s at most.
    os.environ.setdefault("TQDM_MININTERVAL", "15")
    for name in steps:  # recorded before any runs, so RESUME=1 knows the whole plan
        if read_run(run_dir).get("steps", {}).get(name, {}).get("status") != "done":
            record_step(run_dir, name, status="pending", params=planned[name],
                        notebook=STEPS[name].notebook)
    try:
        for name in steps:
            _execute(run_dir, STEPS[name], planned[name])
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
        raise kind(message) from None


def run_all(run: str | None = None, params_file: str | None = None,
            overrides: Mapping[str, Any] | None = None, overwrite: bool = False,
            steps: Sequence[str] | None = None, replace_run: bool = False,
            runs_root: str | Path = "runs", beside_data: bool = False,
            resume: bool = False, faces: bool = False) -> Path:
    """Run the chosen steps into <runs_root>/<run>/ and record everything in its run record.

    `beside_data` puts the run folder inside the output folder of the first step instead
    (`make faces`, `make split`: `Step.beside`). Every parameter is validated and every
    check made before anything changes. Replacing a whole run (OVERWRITE=1) keeps the old
    run aside until the new chain succeeds (`make_room`, `run_steps`). `resume` continues
    an interrupted run with the parameters it recorded (`resume_steps`).
    """
    overrides = overrides or {}
    first = STEPS.get(steps[0]) if steps else None
    if beside_data and (first is None or not first.beside):
        raise ChainError("--beside-data needs STEPS starting with " + " or ".join(
            name for name, step in STEPS.items() if step.beside))
    run = run or (first.beside if beside_data else time.strftime("%Y%m%d-%H%M%S"))
    if not is_plain_name(run):
        raise ChainError(f"RUN={run!r}: use letters, digits, '.', '_' or '-' (a folder name)")
    steps = choose_steps(steps, params_file, overrides, {"faces": faces})
    if beside_data:
        output = _values(params_file, overrides).get(first.folder,
                                                     first.params.defaults()[first.folder])
        runs_root = resolve(str(output))
    run_dir = resolve(runs_root) / run
    if resume:
        if params_file or overrides or overwrite:
            raise ChainError("RESUME=1 continues a run with the parameters it recorded: give "
                             "only RUN=<name> (and STEPS=), nothing else")
        planned = resume_steps(run_dir, steps)
        steps = list(planned)
        if not steps:
            raise ChainError(f"{run_dir}: every step is done and current; nothing to resume")
    else:
        shown = run_dir.relative_to(REPO_ROOT) if run_dir.is_relative_to(REPO_ROOT) else run_dir
        planned = plan(params_file, overrides, steps, shown.as_posix(), overwrite)
    for name in steps:
        try:
            STEPS[name].preflight(STEPS[name].params.from_mapping(planned[name]), planned)
        except (ValueError, OSError) as error:  # a step's own refusal, in its words
            raise ChainError(str(error)) from None
    aside = None if resume else make_room(run_dir, steps, overwrite or replace_run)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)
    ensure_run(run_dir, run, params_file)
    run_steps(run_dir, steps, planned, aside)
    if aside is not None:
        shutil.rmtree(aside)
    summarise(run_dir)
    return run_dir
