"""Run records: seeds, the environment, and the run record of runs/<run>/ (run.json)."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from dfutils import paths
from dfutils.atomic import write_json
from dfutils.paths import REPO_ROOT

PACKAGES = ("torch", "torchvision", "numpy", "pillow", "opencv-python", "scikit-learn",
            "scikit-image", "matplotlib", "papermill", "tqdm", "dfutils")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def now() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_state(root: Path = REPO_ROOT) -> dict:
    """The commit of the working tree and whether it had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True, timeout=20).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Python, package versions, CPU and GPU: what a reader needs to repeat a number."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        # The instruction set torch's CPU kernels use (AVX2, AVX512, ...): the same seed gives
        # different numbers across CPU generations, and this says why.
        "cpu": {"name": _cpu_name(), "cores": os.cpu_count(),
                "capability": torch.backends.cpu.get_cpu_capability(),
                "torch_threads": torch.get_num_threads()},
        "gpu": gpus,
        "cuda": torch.version.cuda if gpus else None,
    }


def read_run(run_dir: Path) -> dict:
    """The run record (run.json) of a run folder, or an empty record."""
    path = run_dir / paths.RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_run(run_dir: Path, record: dict) -> None:
    """Write a run record, atomically."""
    write_json(run_dir / paths.RUN_RECORD, record)


def ensure_run(run_dir: Path, name: str, params_file: str | None) -> dict:
    """The run record of run_dir; a new one (who, where, with what) if it has none."""
    record = read_run(run_dir)
    if not record:
        record = {"run": name, "created": now(), "params_file": params_file,
                  "git": git_state(), "environment": environment(), "steps": {}}
        write_run(run_dir, record)
    return record


def start_step(run_dir: Path, step: str, **fields: object) -> float:
    """A fresh entry for a step that starts now (nothing of an earlier run of it survives),
    with the process that runs it; returns the clock value `finish_step` measures the
    step's seconds from."""
    record = read_run(run_dir)
    record.setdefault("steps", {})[step] = {**fields, "started": now(), "status": "running",
                                            "pid": os.getpid(), "host": platform.node()}
    write_run(run_dir, record)
    return time.perf_counter()


def why_no_model(run_dir: Path) -> str:
    """What to do about a run folder without model.pt, from what its run record says of
    02-train: train first, wait for it, see why it failed, or resume it."""
    try:
        step = read_run(run_dir).get("steps", {}).get("02-train") or {}
    except (OSError, ValueError):
        step = {}
    status, started = step.get("status"), step.get("started")
    if status == "running":
        pid, host = step.get("pid"), step.get("host")
        if host == platform.node() and isinstance(pid, int) and _alive(pid):
            return (f"02-train is still running there (process {pid}, since {started}): "
                    "wait until it keeps its first epoch")
        where = "" if host in (None, platform.node()) else f" on {host}"
        return (f"02-train started {started}{where} and stopped before it kept an epoch (its "
                "process is gone: killed?): train again")
    if status == "failed":
        return (f"02-train failed ({step.get('finished')}): the error is in its notebook there "
                "(02-train.ipynb); fix it and train again")
    if status == "interrupted":
        return ("02-train was interrupted before it kept an epoch: train again (RESUME=1 "
                "continues it when it saved last.pt)")
    if status == "done":
        return "02-train finished, but model.pt was removed since: train again"
    return "train a model first (02-train)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds that number
        return True
    return True


def record_step(run_dir: Path, step: str, **fields: object) -> dict:
    """Merge fields (parameters, status, metrics) into one step's entry of the run record."""
    record = read_run(run_dir)
    record.setdefault("steps", {}).setdefault(step, {}).update(fields)
    write_run(run_dir, record)
    return record


def finish_step(run_dir: Path, step: str, status: str, started: float, **fields: object
                ) -> dict:
    """Record how a step ended (done, failed, interrupted), when, after how many seconds."""
    return record_step(run_dir, step, status=status, finished=now(),
                       seconds=round(time.perf_counter() - started, 2), **fields)
