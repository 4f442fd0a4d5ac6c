"""Labelled images, and a split folder as every step reads it.

`Sample` is one labelled image and `LabelledSet` a set of them with what was left out on
the way: the one shape of "images with labels" that training, validation, Grad-CAM,
evaluate and the benchmark read. A split made by 01-split says everything the other steps
need of it here: its manifest (one row per image: `read_manifest`, `labelled_set`), its
report (`read_report`), the identity a checkpoint records (`identity`, `check_identity`)
and the source folder an image came from (`source_folder`). The split step writes them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dfutils import paths
from dfutils.datasets import LABELS
from dfutils.owned import complete_report
from dfutils.paths import resolve

# The splits a manifest may hold. `test` comes from a data set's official test list (or
# test_fraction); nothing trains or selects on it: training reads train and val only.
SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "label", "split", "sha256", "width", "height", "source", "mask",
                   "group", "video", "method")


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path  # absolute
    label: int  # fake = 1, real = 0
    mask: Path | None = None  # ground-truth mask of a fake image, if known
    video: str = ""  # the clip it comes from (video-level scores take each clip as one)
    group: str = ""  # what the split kept together (a clip, or the clips of one scene)
    method: str = ""  # the manipulation of a fake of a published data set (FF++'s, say)
    source: str = ""  # its path in the folder it came from (real/<source folder>/...)
    frame: int = -1  # its frame in the clip (-1 when unknown)
    area: float = 1.0  # its face box's area in the frame (1 when unknown)
    key: str = ""  # its name, alike in every task of a sharded job ("" means its path)

    @property
    def folder(self) -> str:
        """The source folder it came from (`source_folder`): one data set of a combined
        split."""
        return source_folder(self.source)

    @property
    def name(self) -> str:
        return self.key or str(self.path)


@dataclass
class LabelledSet:
    """Labelled images to score, and what was left out on the way: files that are not
    images ({"path", "reason"}), and a data set's videos in which no face was found
    ({"source", "label", "method"}), which video-level rules count."""

    samples: list[Sample]
    skipped: list[dict] = field(default_factory=list)
    faceless: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=int)

    @property
    def videos(self) -> np.ndarray:
        return np.array([s.video or s.name for s in self.samples], dtype=object)

    def column(self, name: str) -> np.ndarray:
        """One field of every sample, as an array ("method", "frame", "area", "folder")."""
        return np.array([getattr(s, name) for s in self.samples], dtype=object)

    def subset(self, keep) -> LabelledSet:
        """The samples `keep` (a boolean mask, or a test of one sample) keeps."""
        chosen = (keep(s) for s in self.samples) if callable(keep) else keep
        return replace(self, samples=[s for s, k in zip(self.samples, chosen, strict=True)
                                      if k])


def source_folder(source: str) -> str:
    """The first folder below the class folder of a path like real/<folder>/..., or "" for
    a file directly in the class folder: the data set a combined split took it from."""
    parts = source.split("/")
    return parts[1] if len(parts) > 2 else ""


def read_manifest(data_dir: str | os.PathLike, split: str | None = None) -> list[Sample]:
    """The rows of data_dir/manifest.csv (optionally one split of SPLITS), in file order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    data_dir = resolve(data_dir)
    manifest = data_dir / paths.MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} not found: run the split first (notebook 01-split or `make split`)"
        )
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if split is None or r["split"] == split]
    return [Sample(data_dir / r["path"], LABELS[r["label"]],
                   data_dir / r["mask"] if r.get("mask") else None, r.get("video") or r["path"],
                   r.get("group") or r["path"], r.get("method", ""), r.get("source", ""))
            for r in rows]


def read_report(data_dir: str | os.PathLike) -> dict | None:
    """The report of the complete split in data_dir, or None when there is none."""
    return complete_report(resolve(data_dir), paths.SPLIT_REPORT, paths.MANIFEST)


def labelled_set(data_dir: str | os.PathLike, split: str) -> LabelledSet:
    """One split of a split folder, each crop with its frame and face size (the faces
    step's rows, which the split carries), and the split's videos in which no face was
    found; ValueError naming the folder when the split has no images."""
    root = resolve(data_dir)
    samples = read_manifest(root, split)
    if not samples:
        raise ValueError(f"the split in {root} has no {split} images" + (
            ": split a data set with an official test list (dataset=ffpp, dfd, celebdf or "
            "dfdc) or give TEST_FRACTION= to `make split`" if split == "test" else ""))
    faces: dict[str, dict] = {}
    if (root / paths.FACES).is_file():
        with open(root / paths.FACES, newline="") as f:
            faces = {r["path"]: r for r in csv.DictReader(f)}

    def placed(sample: Sample) -> Sample:
        row = faces.get(sample.path.relative_to(root).as_posix())
        if row is None:
            return sample
        box = json.loads(row["box"]) if row.get("box") else None
        return replace(sample, frame=int(row["frame"]),
                       area=float((box[2] - box[0]) * (box[3] - box[1])) if box else 1.0)

    report = read_report(root) or {}
    return LabelledSet([placed(s) for s in samples],
                       faceless=[f for f in report.get("faceless", []) if f["split"] == split])


def dataset_of(data_dir: str | os.PathLike) -> str:
    """The data set a split was made from ("folder" for real/ + fake/)."""
    return ((read_report(data_dir) or {}).get("faces") or {}).get("dataset") or "folder"


def identity(data_dir: str | os.PathLike) -> dict | None:
    """Which split a model trained on: its folder and its manifest's SHA-256 (which changes
    with any image's side); None where there is no manifest."""
    manifest = resolve(data_dir).resolve() / paths.MANIFEST
    if not manifest.is_file():
        return None
    return {"data_dir": str(manifest.parent),
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}


def check_identity(recorded: dict | None, data_dir: str | os.PathLike, checkpoint: Path,
                   doing: str) -> None:
    """Refuse to `doing` with the split in data_dir when it is the folder `checkpoint` was
    trained on but no longer the same split (re-split since). A checkpoint that recorded
    none (older than this check), or another folder, passes."""
    now = identity(data_dir)
    if recorded and now and now["data_dir"] == recorded.get("data_dir") and (
            now["manifest_sha256"] != recorded.get("manifest_sha256")):
        raise ValueError(f"cannot {doing}: the split in {now['data_dir']} is not the one "
                         f"{checkpoint} was trained on ({paths.MANIFEST} changed: re-split "
                         "since?), so its validation images may have been trained on; train "
                         "again on this split, or put the old split back")


def check_unseen(recorded: dict | None, data_dir: str | os.PathLike, split: str,
                 checkpoint: Path, doing: str) -> None:
    """Refuse to `doing` with a split's `split` images when some of them are images the
    run of `checkpoint` trained or chose its epoch on: the same content (SHA-256) as an
    image of the train or val rows of the split it recorded (`identity`), when that split
    is still there as it was. A test set made from the run's own training images would
    otherwise be scored without a word."""
    if not recorded:
        return
    trained = Path(recorded.get("data_dir", ""))
    if identity(trained) != recorded:  # gone, or split again since (check_identity's case)
        return
    root = resolve(data_dir)
    with open(trained / paths.MANIFEST, newline="") as f:
        seen = {r["sha256"]: r["path"] for r in csv.DictReader(f)
                if r["split"] in ("train", "val")}
    with open(root / paths.MANIFEST, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    again = [r["path"] for r in rows if r["sha256"] in seen]
    if again:
        raise ValueError(f"cannot {doing}: {len(again)} of its {len(rows)} {split} images of "
                         f"{root} are images {checkpoint} trained or chose its epoch on (the "
                         f"same content in the train or val split of {trained}), e.g. "
                         f"{', '.join(again[:3])}: score a test set the run never saw")
