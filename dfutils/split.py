"""The split step: dataset_raw/{real,fake} -> data/{train,val}/{real,fake}, manifest and report.

The raw folder is only ever read. Every image is decoded in full (a header check misses
truncated files), exact duplicates travel together, and a content hash seeded by `seed`
ranks each class, so the split does not depend on file order or machine, and adding one
file moves at most one other file of its class.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import math
import os
import posixpath
import re
import shutil
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dfutils import CLASSES, files
from dfutils.data import SPLITS, ImageLoadError, load_image
from dfutils.folders import IMAGE_SUFFIXES, MissingInput, OwnedFolder, scan_classes
from dfutils.params import GroupBy, SplitParams
from dfutils.paths import fingerprint, resolve, write_json
from dfutils.progress import tqdm

MANIFEST_FIELDS = ("path", "label", "split", "sha256", "width", "height", "source", "mask",
                   "group", "video")


class SplitError(ValueError):
    """The raw folder cannot be split as asked; the message says why and what to do."""


class NoImagesError(SplitError, MissingInput):
    """The raw folder, a class folder, or the images in it are missing."""


@dataclass(frozen=True)
class ImageInfo:
    source: str  # path relative to raw_dir, POSIX separators
    label: str
    sha256: str
    width: int
    height: int
    mask: str  # mask path relative to raw_dir, or ""


def is_mask(rel: Path) -> bool:
    """A ground-truth mask, not an image: `<name>_mask.png`, or any file under `masks/`."""
    return rel.stem.endswith("_mask") or "masks" in rel.parts[:-1]


def find_mask(raw_dir: Path, rel: Path) -> str:
    """The mask of image `rel`: `<stem>_mask.png` beside it or `masks/<stem>.png`; "" if none."""
    beside, in_masks = f"{rel.stem}_mask.png", Path("masks", f"{rel.stem}.png")
    for candidate in (rel.with_name(beside), rel.parent / in_masks):
        if (raw_dir / candidate).is_file():
            return candidate.as_posix()
    return ""


def scan(raw_dir: Path) -> tuple[list[tuple[Path, str]], list[dict]]:
    """Candidate images (path relative to raw_dir, label) and skipped files with reasons."""
    try:
        return scan_classes(raw_dir, IMAGE_SUFFIXES, "images", leave_out=is_mask,
                            need_each=True)
    except MissingInput as error:
        raise NoImagesError(str(error)) from None


def inspect_image(raw_dir: Path, rel: Path, label: str) -> ImageInfo:
    """Hash one file and load it exactly as training will; raise ValueError with the reason
    it is unusable."""
    try:
        data = (raw_dir / rel).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot be read: {error.strerror or error}") from None
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        width, height = load_image(io.BytesIO(data)).size  # as displayed (EXIF applied)
    except ImageLoadError as error:
        raise ValueError(error.reason) from None
    return ImageInfo(rel.as_posix(), label, hashlib.sha256(data).hexdigest(), width, height,
                     find_mask(raw_dir, rel))


def _inspect_or_reason(raw_dir: Path, item: tuple[Path, str]) -> ImageInfo | dict:
    try:
        return inspect_image(raw_dir, *item)
    except ValueError as error:
        return {"path": item[0].as_posix(), "reason": str(error)}


def inspect_all(raw_dir: Path, candidates: list[tuple[Path, str]],
                workers: int | None = None) -> tuple[list[ImageInfo], list[dict]]:
    """Inspect every candidate, in worker processes when there are many.

    Decoding is the cost. Threads barely help (the per-image Python work holds the GIL);
    processes given chunks of files do (`make bench` measures the split; docs/performance.md).
    """
    one = functools.partial(_inspect_or_reason, raw_dir)
    workers = workers or min(8, os.cpu_count() or 1)
    progress = functools.partial(tqdm, total=len(candidates), desc="reading images", unit="img")
    if workers == 1 or len(candidates) < 256:  # a pool's start-up would cost more
        results = list(progress(map(one, candidates)))
    else:
        chunk = max(16, len(candidates) // (workers * 8))
        with ProcessPoolExecutor(workers) as pool:
            results = list(progress(pool.map(one, candidates, chunksize=chunk)))
    good = [r for r in results if isinstance(r, ImageInfo)]
    return good, [r for r in results if isinstance(r, dict)]


def rank_key(sha256: str, seed: int) -> str:
    """The seeded rank of a content hash: the lowest ranks of each class go to validation."""
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def n_val(n: int, val_fraction: float) -> int:
    """Validation count for a class of n items: rounded half up, at least one per split."""
    return min(n - 1, max(1, math.floor(n * val_fraction + 0.5)))


def groups(images: list[ImageInfo], group_by: GroupBy, pattern: str = "") -> dict[str, str]:
    """The group of each image (by source path): what must stay in one split.

    "file": an image and its exact duplicates (named by their content hash). "folder": every
    image in one folder, which is what the faces step writes for a clip; folders that share
    an exact duplicate are joined, so no content straddles the split. `pattern` (a regular
    expression) also joins the images whose paths below the class folder give the same
    match (its first group, if it has one), real and fake alike: a real clip and its
    face-swapped twin of the same scene, say.
    """
    if group_by == "file" and not pattern:
        return {i.source: i.sha256 for i in images}
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def join(a: str, b: str) -> None:
        first, second = root(a), root(b)
        parent[max(first, second)] = min(first, second)

    def own(info: ImageInfo) -> str:
        return posixpath.dirname(info.source) if group_by == "folder" else info.sha256

    for info in images:
        join(own(info), "sha:" + info.sha256)  # one content never straddles the split
        found = re.search(pattern, info.source.split("/", 1)[1]) if pattern else None
        if found:
            join(own(info), "pattern:" + (found.group(1) if found.groups() else found.group(0)))
    return {i.source: root(own(i)) for i in images}


def assign(images: list[ImageInfo], val_fraction: float, seed: int, group_by: GroupBy = "file",
           pattern: str = "") -> tuple[dict[str, str], dict[str, str], list[dict], list[dict]]:
    """Split by group: {source: split}, {source: group}, duplicate sets and label conflicts.

    Each class's groups are ranked by a seeded hash of their name, the lowest going to
    validation: stratified, independent of file order, and adding one group moves at most
    one other of its class. When `pattern` makes groups that hold both classes, all groups
    are ranked together and each goes to validation while every class it holds is short of
    its validation share.
    """
    by_content: dict[str, list[ImageInfo]] = defaultdict(list)
    for info in images:
        by_content[info.sha256].append(info)
    conflicts = [{"sha256": sha, "paths": sorted(i.source for i in members)}
                 for sha, members in by_content.items() if len({i.label for i in members}) > 1]
    conflicted = {c["sha256"] for c in conflicts}
    kept = [i for i in images if i.sha256 not in conflicted]
    group_of = groups(kept, group_by, pattern)
    labels_of: dict[str, set[str]] = defaultdict(set)
    for info in kept:
        labels_of[group_of[info.source]].add(info.label)
    ranked = sorted(labels_of, key=lambda g: rank_key(g, seed))
    wanted = {}
    for label in CLASSES:
        n = sum(label in labs for labs in labels_of.values())
        if n < 2:
            unit = "distinct image(s)" if group_by == "file" and not pattern else "group(s)"
            raise SplitError(
                f"class {label!r} has {n} usable {unit} after removing unreadable "
                "files, duplicates and label conflicts; it needs at least two (one for train, "
                "one for val): add images or fix the ones in the report"
            )
        wanted[label] = n_val(n, val_fraction)
    split_of_group: dict[str, str] = {}
    taken = dict.fromkeys(CLASSES, 0)
    for name in ranked:  # with one class per group, this is each class's ranking alone
        if all(taken[label] < wanted[label] for label in labels_of[name]):
            split_of_group[name] = "val"
            for label in labels_of[name]:
                taken[label] += 1
        else:
            split_of_group[name] = "train"
    split_of = {i.source: split_of_group[group_of[i.source]] for i in kept}
    duplicates = [{"sha256": sha, "label": members[0].label,
                   "split": split_of[members[0].source],
                   "paths": sorted(i.source for i in members)}
                  for sha, members in sorted(by_content.items())
                  if len(members) > 1 and sha not in conflicted]
    return split_of, group_of, duplicates, conflicts


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no space and leaves the raw file as it is; across file systems
    # (or where links are not allowed) fall back to a copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def materialise(raw_dir: Path, out: Path, images: list[ImageInfo], split_of: dict[str, str],
                group_of: dict[str, str], group_by: GroupBy = "file") -> list[dict]:
    """Link (or copy) each image into out/<split>/<label>/, return the manifest rows.

    `group` is what the split kept together; `video` is what video-level metrics score as
    one: the folder an image is in when grouping by folder (a clip's frames), else itself.
    """
    rows, taken = [], set()
    for info in sorted(images, key=lambda i: (i.label, i.source)):
        split = split_of[info.source]
        # Flattening the path below the class folder keeps names from different
        # subfolders apart; a hash suffix settles the rare clash that remains.
        name = info.source.split("/", 1)[1].replace("/", "__")
        dest = f"{split}/{info.label}/{name}"
        if dest.lower() in taken:
            stem, dot, suffix = name.rpartition(".")
            dest = f"{split}/{info.label}/{stem}-{info.sha256[:8]}{dot}{suffix}"
        taken.add(dest.lower())
        (out / dest).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(raw_dir / info.source, out / dest)
        mask = ""
        if info.mask:
            mask = f"masks/{split}/{info.label}/{Path(dest).stem}.png"
            (out / mask).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(raw_dir / info.mask, out / mask)
        rows.append({"path": dest, "label": info.label, "split": split,
                     "sha256": info.sha256, "width": info.width, "height": info.height,
                     "source": info.source, "mask": mask, "group": group_of[info.source],
                     "video": posixpath.dirname(info.source) if group_by == "folder"
                     else info.source})
    return rows


def _written(data_dir: Path, report: dict) -> set[str]:
    with open(data_dir / files.MANIFEST, newline="") as f:
        return {value for row in csv.DictReader(f) for value in (row["path"], row["mask"])
                if value}


# What the split owns inside data_dir; nothing else there is touched (data/ also holds
# README.md and the demo data set). Its folders may hold only files the manifest lists.
FOLDER = OwnedFolder(
    step="the split", result="a split", option="data_dir",
    entries=(*SPLITS, "masks", files.FACES, files.LANDMARKS, files.SPLIT_REPORT,
             files.MANIFEST),
    folders=(*SPLITS, "masks"), report=files.SPLIT_REPORT, listed=_written, prefix="split",
    error=SplitError)


def read_report(data_dir: str | os.PathLike) -> dict | None:
    """The report of the split in data_dir, or None when there is no complete split."""
    return FOLDER.read_report(resolve(data_dir))


def carry_faces(raw_dir: Path, out: Path, rows: list[dict]) -> dict | None:
    """When raw_dir is the output of the faces step, write out/faces.csv (its rows for the
    split's images, each pointing at the image's path in data_dir) and return the faces
    step's parameters; else None."""
    from dfutils import faces

    report = faces.read_report(raw_dir)
    if report is None:
        return None
    with open(raw_dir / files.FACES, newline="") as f:
        table = {row["path"]: row for row in csv.DictReader(f)}
    with open(out / files.FACES, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=faces.FIELDS)
        writer.writeheader()
        writer.writerows({**table[r["source"]], "path": r["path"]}
                         for r in rows if r["source"] in table)
    return report["params"]


@dataclass(frozen=True)
class SplitPlan:
    params: SplitParams
    raw_dir: Path  # absolute
    data_dir: Path  # absolute
    candidates: list[tuple[Path, str]]
    skipped: list[dict]
    recorded: dict  # the parameters the report records (what makes the split what it is)
    fingerprint: str
    current: dict | None  # the report on disk, when that split is already the answer


def preflight(params: SplitParams) -> SplitPlan:
    """Every check the split makes before it reads an image or changes a file: the folders,
    the parameters against an existing split, and anything of the user's in the way."""
    raw_dir, data_dir = resolve(params.raw_dir).resolve(), resolve(params.data_dir).resolve()
    # raw_dir may sit in data_dir (data/faces, data/demo_raw) but not in what the split
    # replaces, and data_dir must not be inside raw_dir, where the split would read itself.
    if (data_dir == raw_dir or raw_dir in data_dir.parents
            or any(data_dir / name in (raw_dir, *raw_dir.parents) for name in FOLDER.entries)):
        raise SplitError(f"data_dir {data_dir} and raw_dir {raw_dir} overlap: put the split "
                         "outside raw_dir, and raw_dir outside data_dir/train, val, test and "
                         "masks")
    candidates, skipped = scan(raw_dir)
    recorded = {"raw_dir": str(raw_dir), "val_fraction": params.val_fraction,
                "seed": params.seed}
    if params.group_by != "file":  # a split made before group_by existed grouped by file
        recorded["group_by"] = params.group_by
    if params.group_pattern:
        recorded["group_pattern"] = params.group_pattern
    stamp = fingerprint(raw_dir, [rel.as_posix() for rel, _ in candidates]
                        + [s["path"] for s in skipped])
    current = FOLDER.current(data_dir, recorded, stamp, params.overwrite)
    return SplitPlan(params, raw_dir, data_dir, candidates, skipped, recorded, stamp, current)


def split(params: SplitParams) -> dict:
    """Split raw_dir/{real,fake} into data_dir/{train,val}/{real,fake}; return the report.

    Same files and parameters: nothing is rewritten. Other parameters over an existing
    split: refused unless `overwrite`. Files in data_dir that the split did not write are
    never deleted: their presence is an error, found before anything changes. The new split
    is built beside the old one and swapped in (`FOLDER`), so an interrupted run leaves the
    old split or the new one, not a mixture. When raw_dir is a faces step's output, its
    landmarks and parameters come along (data_dir/faces.csv, the report's `faces`).
    """
    plan = preflight(params)
    if plan.current is not None:
        return plan.current  # same files, same parameters: the split on disk is the answer
    images, rejected = inspect_all(plan.raw_dir, plan.candidates)
    split_of, group_of, duplicates, conflicts = assign(
        images, params.val_fraction, params.seed, params.group_by, params.group_pattern)
    conflicted = {c["sha256"] for c in conflicts}
    kept = [i for i in images if i.sha256 not in conflicted]
    with FOLDER.build(plan.data_dir) as built:
        rows = materialise(plan.raw_dir, built, kept, split_of, group_of, params.group_by)
        present = [s for s in SPLITS if any(r["split"] == s for r in rows)]  # no empty test
        report = {
            "params": plan.recorded,
            "fingerprint": plan.fingerprint,
            "counts": {s: {c: sum(r["split"] == s and r["label"] == c for r in rows)
                           for c in CLASSES} for s in present},
            "group_counts": {s: {c: len({r["group"] for r in rows
                                         if r["split"] == s and r["label"] == c})
                                 for c in CLASSES} for s in present},
            "n_images": len(rows),
            "n_masks": sum(bool(r["mask"]) for r in rows),
            "rejected": rejected,
            "skipped": plan.skipped,
            "duplicates": duplicates,
            "conflicts": conflicts,
            "faces": carry_faces(plan.raw_dir, built, rows),  # its parameters, or None
        }
        write_json(built / files.SPLIT_REPORT, report)
        with open(built / files.MANIFEST, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return report
