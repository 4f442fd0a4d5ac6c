"""Training curves as TensorBoard event files, in runs/<run>/tensorboard/ (`make tensorboard
RUN=<run>` serves them): every numeric column of history.csv each epoch (losses, AUCs,
accuracy, the learning rate, images/s), the ROC curve of the kept epoch at the end, and
03-gradcam's grid.

A resumed run continues the same curves: its writer starts with TensorBoard's purge step
at the first epoch it runs, so a point an interrupted run wrote for an epoch it did not
save is dropped on reading, and each epoch has one point per curve. A run trained anew in
the same folder removes the event files of the training it replaces (theirs, no other).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from dfutils import paths
from dfutils.paths import resolve

# history.csv's columns as TensorBoard's tags: a section per kind of number, so the
# training and validation losses share one chart's section.
TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "sbi_loss": "loss/self-blends",
        "mean_loss": "loss/mean", "train_acc": "accuracy/train", "val_acc": "accuracy/val",
        "val_auc": "auc/val", "val_video_auc": "auc/val_video", "sbi_auc": "auc/self-blends",
        "mean_auc": "auc/mean", "lr": "train/learning_rate",
        "images_per_s": "train/images_per_s", "seconds": "train/seconds_per_epoch"}
EVENT_FILES = "events.out.tfevents.*"  # what SummaryWriter names its files


def folder(run_dir: str | os.PathLike) -> Path:
    return resolve(run_dir) / paths.TENSORBOARD


class Curves:
    """The event files of one training run (rank 0 writes them)."""

    def __init__(self, run_dir: str | os.PathLike, first_epoch: int | None = None):
        """`first_epoch`: 1 trains anew (the replaced training's curves go), k > 1 resumes
        at epoch k; None adds to the curves there are (a later step's figure)."""
        where = folder(run_dir)
        if first_epoch == 1:
            for old in where.glob(EVENT_FILES):
                old.unlink()
        self.writer = SummaryWriter(str(where), purge_step=first_epoch if (
            first_epoch or 0) > 1 else None)

    def epoch(self, row: dict) -> None:
        """One row of history.csv: a point per curve at its epoch, on disk at once."""
        for column, tag in TAGS.items():
            value = row.get(column)
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, row["epoch"])
        self.writer.flush()

    def figure(self, tag: str, figure: Figure, step: int) -> None:
        self.writer.add_figure(tag, figure, step, close=False)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def add_figure(run_dir: str | os.PathLike, tag: str, figure: Figure, step: int) -> None:
    """A figure of a later step (03-gradcam's grid) into a run's curves, when it has them."""
    if folder(run_dir).is_dir():
        curves = Curves(run_dir)
        curves.figure(tag, figure, step)
        curves.close()
