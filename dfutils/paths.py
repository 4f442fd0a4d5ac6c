"""Where things are: the repository, a parameter's path, a folder's plain name, and the name
of every file a step writes (a run's, a split's, a faces folder's, the demo's), said once:
each module that writes or reads one of them takes its name from here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# dfutils is installed editable (`make setup`), so the package sits in the repository.
REPO_ROOT = Path(__file__).resolve().parent.parent
# A name that becomes one folder (a run, a report): no separators, no leading dot.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve(path: str | os.PathLike) -> Path:
    """A path from a parameter: absolute as given, relative to the repository root otherwise.

    JupyterLab (cwd notebooks/), papermill and pytest then agree on every path.
    """
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def from_here(path: str | os.PathLike) -> Path:
    """A path as a command shows it: relative to the working directory when it lies below
    it (where the user typed it from), absolute otherwise."""
    path, here = Path(path).absolute(), Path.cwd()
    return path.relative_to(here) if path.is_relative_to(here) else path


def is_plain_name(name: str) -> bool:
    """Whether `name` can be one folder's name: letters, digits, '.', '_', '-', no leading dot."""
    return bool(_PLAIN_NAME.match(name))


# A run folder, runs/<run>/ (02-train, 03-gradcam, 04-evaluate, 05-benchmark, the runner).
RUN_RECORD = "run.json"  # parameters, git commit, versions, timings, metrics of every step
MODEL = "model.pt"  # the kept (best) checkpoint
LAST = "last.pt"  # the state after the last completed epoch, while the run can be resumed
HISTORY = "history.csv"
METRICS = "metrics.json"
PREDICTIONS = "val_predictions.csv"  # P(fake) of every validation image of the kept epoch
TRAIN_FIGURES = ("curves.png", "roc.png", "confusion.png", "scores.png")
SELF_BLENDS = "self_blends.png"  # fakes="sbi": validation reals, their blends and masks
GRADCAM = "gradcam"  # overlays, the figures below and CAM_METRICS
CAM_METRICS = f"{GRADCAM}/cam_metrics.json"
CAM_FIGURES = ("grid.png", "deletion.png")
EVAL = "eval"  # eval/<name>/: one report of `evaluate` each
EVAL_REPORT = "report.json"
EVAL_FACES = "faces"  # the crops evaluate makes of a folder of photos and clips
EVAL_BLENDS = "self_blends"  # evaluate --self-blends: the blends of the split's reals, as PNG
EVAL_PARTS = "parts"  # the parts of a sharded evaluate, until `merge evaluate` joins them
EVAL_FIGURES = ("roc.png", "confusion.png", "robustness.png", "reliability.png")
BENCHMARK = "benchmark.csv"  # 05-benchmark: the table, per test set, method, level and rule
BENCHMARK_JSON = "benchmark.json"  # the same rows, the rules in words and the headline
BENCHMARK_FIGURE = "benchmark.png"
BENCHMARK_VIDEOS = "benchmark_videos.csv"  # one row per test video: its P(fake) by each rule
BENCHMARK_FRAMES = "benchmark_frames.csv"  # one row per test crop scored
# where Grad-CAM points on the test sets: a row per test set, method and layer; its figure;
# per test set and method, a grid of faces drawn at random with their maps and masks
BENCHMARK_EXPLANATIONS = "benchmark_explanations.csv"
BENCHMARK_EXPLANATIONS_FIGURE = "benchmark_explanations.png"
BENCHMARK_CAMS = "benchmark_cams"
TENSORBOARD = "tensorboard"  # 02-train's event files (losses, AUCs, lr, images/s, ROC, Grad-CAM)

# An exported detector, <out>/ (export): weights, what scoring needs, the model card.
DETECTOR_WEIGHTS = "model.safetensors"
DETECTOR_CONFIG = "config.json"
DETECTOR_CARD = "README.md"
DETECTOR_ONNX = "model.onnx"

# A split, data_dir/ (01-split): train/, val/, test/, masks/ and these.
MANIFEST = "manifest.csv"  # one row per image: path, label, split, group, sha256, ...
SPLIT_REPORT = "split_report.json"  # what was rejected, skipped or kept together, and why
LANDMARKS = "landmarks.csv"  # landmarks found for the split's images by dfutils.sbi, cached
SPLIT_RUN = "split-run"  # `make split` keeps its notebook and run record here

# A faces folder, faces_dir/ (00-faces): real/, fake/ and these. The split carries the
# rows of its images into data_dir under the same name.
FACES = "faces.csv"  # one row per crop: source, frame, box, score, landmarks
FACES_REPORT = "faces_report.json"  # per source: frames read, faces found, or why not
FACES_RUN = "faces-run"
FACES_PARTS = "parts"  # parts/<i>-of-<n>/: a shard's crops and journal until they are merged

# The demo data set (data/demo_raw/ by default): real/, fake/, fake/masks/ and this.
DEMO_RECORD = "demo.json"


def eval_folder(run_dir: str | os.PathLike, name: str) -> Path:
    """Where `evaluate` writes the report called `name` of a run."""
    return Path(run_dir) / EVAL / name
