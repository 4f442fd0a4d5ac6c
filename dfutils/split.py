"""The split step: dataset_raw/{real,fake} -> data/{train,val,test}/{real,fake}, manifest
and report.

The raw folder is only ever read. Every image is decoded in full (a header check misses
truncated files), exact duplicates travel together, and a content hash seeded by `seed`
ranks each class, so the split does not depend on file order or machine, and adding one
file moves at most one other file of its class. Crops of a published data set (made by the
faces step) keep their official split, and the rest goes to train or val by its group keys
(`assign_keys`): a pair, an identity or an original never lands on two sides.
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
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from dfutils import faces, paths, processes
from dfutils.atomic import write_json
from dfutils.datasets import (
    CLASSES,
    IMAGE_SUFFIXES,
    KEY_SEPARATOR,
    MissingInput,
    is_clip,
    scan_classes,
)
from dfutils.images import ImageLoadError, load_image
from dfutils.manifest import MANIFEST_FIELDS, SPLITS, read_report, source_folder
from dfutils.owned import OwnedFolder, fingerprint
from dfutils.params import GroupBy, SplitParams, Stratify
from dfutils.paths import from_here, resolve
from dfutils.progress import tqdm


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
    workers = workers or min(8, processes.usable_cpus())
    progress = functools.partial(tqdm, total=len(candidates), desc="reading images", unit="img")
    if workers == 1 or len(candidates) < 256:  # a pool's start-up would cost more
        results = list(progress(map(one, candidates)))
    else:
        chunk = max(16, len(candidates) // (workers * 8))
        with processes.pool(workers) as pool:
            results = list(progress(pool.map(one, candidates, chunksize=chunk)))
    good = [r for r in results if isinstance(r, ImageInfo)]
    return good, [r for r in results if isinstance(r, dict)]


def rank_key(sha256: str, seed: int) -> str:
    """The seeded rank of a content hash: the lowest ranks of each class go to validation."""
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def n_val(n: int, val_fraction: float) -> int:
    """Validation count for a class of n items: rounded half up, at least one per split."""
    return min(n - 1, max(1, math.floor(n * val_fraction + 0.5)))


def n_held_out(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(test, val) counts for a class of n items: no test when test_fraction is 0 (so the
    split is what it was before test existed), else at least one in each of the three."""
    if test_fraction == 0:
        return 0, n_val(n, val_fraction)
    test = min(n - 2, max(1, math.floor(n * test_fraction + 0.5)))
    return test, min(n - test - 1, max(1, math.floor(n * val_fraction + 0.5)))


# The longest group_pattern may take over every path: a pattern that backtracks without
# end (`(a+)+$`) is stopped there and named, instead of holding a core at 100 % for ever.
PATTERN_SECONDS = 30.0


def _match_all(pattern: str, paths: list[str]) -> list[str | None]:
    keys = []
    for path in paths:
        found = re.search(pattern, path)
        key = found and (found.group(1) if found.groups() else found.group(0))
        keys.append(key)  # an optional first group that took no part: not matched
    return keys


def pattern_keys(pattern: str, paths: list[str]) -> dict[str, str]:
    """The key `pattern` gives each path it matches (its first group, if it has one, else
    the whole match), found in a child process stopped after PATTERN_SECONDS; SplitError
    naming the pattern when it takes longer, matches no path, or puts every path in one
    group."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        try:
            keys = pool.apply_async(_match_all, (pattern, paths)).get(PATTERN_SECONDS)
        except multiprocessing.TimeoutError:
            pool.terminate()
            raise SplitError(f"group_pattern {pattern!r} took more than {PATTERN_SECONDS:.0f} s "
                             f"on {len(paths)} paths and was stopped: it backtracks without end "
                             "(nested repeats such as (a+)+); write it without them") from None
    matched = {path: key for path, key in zip(paths, keys, strict=True) if key is not None}
    example = paths[0] if paths else ""
    if not matched:
        raise SplitError(f"group_pattern {pattern!r} matches none of the {len(paths)} paths "
                         f"below the class folders (one is {example!r}): grouping would not "
                         "change; fix the pattern or leave it empty")
    if len(set(paths)) > 1 and None not in keys and len(set(matched.values())) == 1:
        raise SplitError(f"group_pattern {pattern!r} gives every one of the {len(paths)} paths "
                         f"the same key {next(iter(matched.values()))!r}: one group cannot be "
                         "split; capture what tells scenes apart (e.g. ^([^_]+)_)")
    return matched


def groups(images: list[ImageInfo], group_by: GroupBy, keys: dict[str, str] | None = None,
           singles: frozenset[str] = frozenset()) -> dict[str, str]:
    """The group of each image (by source path): what must stay in one split.

    "file": an image and its exact duplicates (named by their content hash). "folder": every
    image in one folder, which is what the faces step writes for a clip (a photo's crop,
    one of `singles`, is its own); folders that share an exact duplicate are joined, so no
    content straddles the split. `keys` (from `pattern_keys`, by path below the class
    folder) also join the images with the same key, real and fake alike: a real clip and
    its face-swapped twin of the same scene, say.
    """
    if group_by == "file" and not keys:
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
        if group_by == "folder" and info.source not in singles:
            return posixpath.dirname(info.source)
        return info.sha256

    for info in images:
        join(own(info), "sha:" + info.sha256)  # one content never straddles the split
        key = (keys or {}).get(info.source.split("/", 1)[1])
        if key is not None:
            join(own(info), "pattern:" + key)
    return {i.source: root(own(i)) for i in images}


def assign(images: list[ImageInfo], val_fraction: float, seed: int, group_by: GroupBy = "file",
           keys: dict[str, str] | None = None, test_fraction: float = 0.0,
           singles: frozenset[str] = frozenset(), stratify: Stratify = "class"
           ) -> tuple[dict[str, str], dict[str, str], list[dict], list[dict]]:
    """Split by group: {source: split}, {source: group}, duplicate sets and label conflicts.

    Each class's groups (with stratify="source", each class's groups in each source folder)
    are ranked by a seeded hash of their name, the lowest going to test (test_fraction),
    the next to validation: stratified, independent of file order, and adding one group
    moves at most one other of its stratum. When `keys` make groups that hold both classes,
    all groups are ranked together and each goes to test (then validation) while every
    stratum it holds is short of that share.
    """
    by_content: dict[str, list[ImageInfo]] = defaultdict(list)
    for info in images:
        by_content[info.sha256].append(info)
    conflicts = [{"sha256": sha, "paths": sorted(i.source for i in members)}
                 for sha, members in by_content.items() if len({i.label for i in members}) > 1]
    conflicted = {c["sha256"] for c in conflicts}
    kept = [i for i in images if i.sha256 not in conflicted]
    group_of = groups(kept, group_by, keys, singles)

    def stratum(info: ImageInfo) -> tuple[str, str]:
        return info.label, source_folder(info.source) if stratify == "source" else ""

    strata_of: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for info in kept:
        strata_of[group_of[info.source]].add(stratum(info))
    ranked = sorted(strata_of, key=lambda g: rank_key(g, seed))
    wanted: dict[str, dict[tuple[str, str], int]] = {"test": {}, "val": {}}
    needed, in_words = (3, "three (one for each split)") if test_fraction else (
        2, "two (one for train, one for val)")
    counts = Counter(s for strata in strata_of.values() for s in strata)
    for label in CLASSES:
        if not any(s[0] == label for s in counts):
            counts[(label, "")] = 0
    for (label, folder), n in sorted(counts.items(),
                                     key=lambda c: (CLASSES.index(c[0][0]), c[0][1])):
        if n < needed:
            unit = "distinct image(s)" if group_by == "file" and not keys else "group(s)"
            where = f" in source folder {label}/{folder}" if folder else ""
            raise SplitError(
                f"class {label!r}{where} has {n} usable {unit} after removing unreadable "
                f"files, duplicates and label conflicts; it needs at least {in_words}: add "
                "images or fix the ones in the report"
                + (", or split with stratify=class" if folder else "")
            )
        wanted["test"][(label, folder)], wanted["val"][(label, folder)] = n_held_out(
            n, val_fraction, test_fraction)
    split_of_group: dict[str, str] = {}
    taken = {split: dict.fromkeys(counts, 0) for split in wanted}
    for name in ranked:  # with one stratum per group, this is each stratum's ranking alone
        split_of_group[name] = next(
            (split for split in wanted
             if all(taken[split][s] < wanted[split][s] for s in strata_of[name])),
            "train")
        for s in strata_of[name]:
            if split_of_group[name] != "train":
                taken[split_of_group[name]][s] += 1
    split_of = {i.source: split_of_group[group_of[i.source]] for i in kept}
    duplicates = [{"sha256": sha, "label": members[0].label,
                   "split": split_of[members[0].source],
                   "paths": sorted(i.source for i in members)}
                  for sha, members in sorted(by_content.items())
                  if len(members) > 1 and sha not in conflicted]
    return split_of, group_of, duplicates, conflicts


def _side(official: str, keys: list[str], val_keys: set[str]) -> str | None:
    """The split of a clip: its official one, else where all its keys went; None when its
    keys went both ways (or it has none)."""
    sides = {official} if official else {"val" if k in val_keys else "train" for k in keys}
    return sides.pop() if len(sides) == 1 else None


def assign_keys(images: list[ImageInfo], carried: dict[str, dict], val_fraction: float,
                seed: int) -> tuple[dict[str, str], dict[str, str], list[dict], set[str] | None]:
    """Split the crops of a published data set: {source: split}, {source: group}, the
    crops left out (each {"path", "reason"}) and the keys that went to validation (None
    when every crop had an official split).

    A crop with an official split keeps it. The other crops' keys (identities, FF++ ids,
    DFDC originals: faces.csv's `group`) are ranked by a seeded hash, and each goes to
    validation while every class it holds is short of its share (n_val of the keys that
    hold the class); a class still missing there takes its first-ranked key. A crop goes
    where all its keys went; a crop whose keys went both ways (a swap of a train and a val
    identity) is left out, so no key is on two sides.
    """
    def keys(info: ImageInfo) -> list[str]:
        row = carried[info.source]
        return [k for k in row["group"].split(KEY_SEPARATOR) if k] or [row["source"]]

    free = [i for i in images if not carried[i.source]["split"]]
    labels_of: dict[str, set[str]] = defaultdict(set)
    for info in free:
        for key in keys(info):
            labels_of[key].add(info.label)
    ranked = sorted(labels_of, key=lambda k: rank_key(k, seed))
    wanted = {label: n_val(sum(label in labs for labs in labels_of.values()), val_fraction)
              for label in CLASSES}
    taken, val_keys = dict.fromkeys(CLASSES, 0), set()
    for key in ranked:
        if len(ranked) > 1 and all(taken[label] < wanted[label] for label in labels_of[key]):
            val_keys.add(key)
            for label in labels_of[key]:
                taken[label] += 1
    for label in CLASSES:
        if not taken[label] and len(ranked) > 1:
            first = next((k for k in ranked if label in labels_of[k] and k not in val_keys),
                         None)
            if first is not None and len(val_keys) + 1 < len(ranked):
                val_keys.add(first)
                taken[label] += 1
    split_of, left_out = {}, []
    for info in images:
        side = _side(carried[info.source]["split"], keys(info), val_keys)
        if side is not None:
            split_of[info.source] = side
        else:
            left_out.append({"path": info.source, "reason": "its keys "
                             f"{', '.join(keys(info))} fell on both sides of train/val"})
    group_of = {i.source: carried[i.source]["group"] or carried[i.source]["source"]
                for i in images}
    return split_of, group_of, left_out, val_keys if free else None


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no space and leaves the raw file as it is; across file systems
    # (or where links are not allowed) fall back to a copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def materialise(raw_dir: Path, out: Path, images: list[ImageInfo], split_of: dict[str, str],
                group_of: dict[str, str], group_by: GroupBy = "file",
                carried: dict[str, dict] | None = None,
                singles: frozenset[str] = frozenset()) -> list[dict]:
    """Link (or copy) each image into out/<split>/<label>/, return the manifest rows.

    `group` is what the split kept together; `video` is what video-level metrics score as
    one: a data set crop's clip, the folder an image is in when grouping by folder (a
    clip's frames), else itself; `method` is a data set's manipulation (faces.csv).
    """
    carried = carried or {}
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
        clip = carried.get(info.source, {})
        video = clip.get("source") or (posixpath.dirname(info.source)
                                       if group_by == "folder" and info.source not in singles
                                       else info.source)
        rows.append({"path": dest, "label": info.label, "split": split,
                     "sha256": info.sha256, "width": info.width, "height": info.height,
                     "source": info.source, "mask": mask, "group": group_of[info.source],
                     "video": video, "method": clip.get("method", "")})
    return rows


def _written(data_dir: Path, report: dict) -> set[str]:
    with open(data_dir / paths.MANIFEST, newline="") as f:
        return {value for row in csv.DictReader(f) for value in (row["path"], row["mask"])
                if value}


# What the split owns inside data_dir; nothing else there is touched (data/ also holds
# README.md and the demo data set). Its folders may hold only files the manifest lists.
FOLDER = OwnedFolder(
    step="the split", result="a split", option="data_dir",
    entries=(*SPLITS, "masks", paths.FACES, paths.LANDMARKS, paths.SPLIT_REPORT,
             paths.MANIFEST),
    folders=(*SPLITS, "masks"), report=paths.SPLIT_REPORT, listed=_written, prefix="split",
    error=SplitError)


def faces_of(raw_dir: Path) -> tuple[dict | None, dict[str, dict]]:
    """When raw_dir is the output of the faces step: its report and its faces.csv rows by
    crop path (the sources of the split); else (None, {})."""
    report = faces.read_report(raw_dir)
    if report is None:
        return None, {}
    with open(raw_dir / paths.FACES, newline="") as f:
        return report, {row["path"]: row for row in csv.DictReader(f)}


def carry_faces(out: Path, table: dict[str, dict], rows: list[dict]) -> None:
    """Write out/faces.csv: the faces step's rows of the split's images, each pointing at
    the image's path in data_dir (and its mask's)."""
    with open(out / paths.FACES, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=faces.FIELDS)
        writer.writeheader()
        writer.writerows({**table[r["source"]], "path": r["path"], "mask": r["mask"]}
                         for r in rows if r["source"] in table)


def faceless(report: dict, val_keys: set[str]) -> list[dict]:
    """The data set's clips in which the faces step found no face (or that it could not
    read), with the split they belong to: official, or where their keys went (none when
    the keys went both ways). Video-level scores count them."""
    found = []
    for entry in report["sources"]:
        if entry.get("faces_found") and "reason" not in entry:
            continue
        keys = [k for k in entry.get("group", "").split(KEY_SEPARATOR) if k]
        side = _side(entry.get("split", ""), keys, val_keys)
        if side is None:
            continue
        found.append({"source": entry["source"], "label": entry["label"], "split": side,
                      "method": entry.get("method", ""),
                      "why": entry.get("reason", "no face in any frame read")})
    return found


def by_method(rows: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """Per split and per method (reals under "real"): the clips (videos) and crops."""
    table: dict[str, dict[str, dict[str, set | int]]] = {}
    for r in rows:
        entry = table.setdefault(r["split"], {}).setdefault(
            r["method"] or r["label"], {"clips": set(), "crops": 0})
        entry["clips"].add(r["video"])
        entry["crops"] += 1
    return {split: {m: {"clips": len(e["clips"]), "crops": e["crops"]}
                    for m, e in sorted(methods.items())}
            for split, methods in table.items()}


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
    if params.test_fraction:
        recorded["test_fraction"] = params.test_fraction
    if params.stratify != "class":
        recorded["stratify"] = params.stratify
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
    faces_report, table = faces_of(plan.raw_dir)
    # A published data set's crops carry keys or an official split; real/ + fake/ do not.
    keyed = {src: row for src, row in table.items() if row.get("group") or row.get("split")}
    plain = [i for i in images if i.source not in keyed]
    # A photo's crop is its own group and its own video, wherever it lies.
    photos = frozenset(crop for crop, row in table.items() if not is_clip(row["source"]))
    below = [i.source.split("/", 1)[1] for i in plain]  # each path below its class folder
    keys = pattern_keys(params.group_pattern, below) if params.group_pattern and plain else None
    split_of, group_of, duplicates, conflicts = assign(
        plain, params.val_fraction, params.seed, params.group_by, keys,
        params.test_fraction, photos, params.stratify) if plain else ({}, {}, [], [])
    conflicted = {c["sha256"] for c in conflicts}
    kept = [i for i in plain if i.sha256 not in conflicted]
    left_out, val_keys = [], None
    if keyed:
        from_keys = [i for i in images if i.source in keyed]
        keyed_split, keyed_group, left_out, val_keys = assign_keys(
            from_keys, keyed, params.val_fraction, params.seed)
        split_of.update(keyed_split)
        group_of.update(keyed_group)
        kept += [i for i in from_keys if i.source in keyed_split]
    with FOLDER.build(plan.data_dir) as built:
        rows = materialise(plan.raw_dir, built, kept, split_of, group_of, params.group_by,
                           keyed, photos)
        present = [s for s in SPLITS if any(r["split"] == s for r in rows)]  # no empty test
        report = {
            "params": plan.recorded,
            "fingerprint": plan.fingerprint,
            "counts": {s: {c: sum(r["split"] == s and r["label"] == c for r in rows)
                           for c in CLASSES} for s in present},
            "group_counts": {s: {c: len({r["group"] for r in rows
                                         if r["split"] == s and r["label"] == c})
                                 for c in CLASSES} for s in present},
            "by_method": by_method(rows),
            # a class no image of which landed in a split (a data set's groups can do that)
            "empty": [f"{s}/{c}" for s in present for c in CLASSES
                      if not any(r["split"] == s and r["label"] == c for r in rows)],
            "rules": rules(params, faces_report if keyed else None, val_keys is not None),
            "n_images": len(rows),
            "n_masks": sum(bool(r["mask"]) for r in rows),
            "rejected": rejected,
            "skipped": plan.skipped,
            "left_out": left_out,
            "duplicates": duplicates,
            "conflicts": conflicts,
            **({"group_pattern": {
                "pattern": params.group_pattern, "paths": len(below),
                "matched": sum(p in keys for p in below),
                "unmatched": sum(p not in keys for p in below),
                "keys": len(set(keys.values()))}} if keys is not None else {}),
            "faces": faces_report and faces_report["params"],  # its parameters, or None
            "faceless": faceless(faces_report, val_keys or set()) if keyed else [],
        }
        if faces_report is not None:
            carry_faces(built, table, rows)
        write_json(built / paths.SPLIT_REPORT, report)
        with open(built / paths.MANIFEST, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return report


def rules(params: SplitParams, faces_report: dict | None, by_keys: bool = False
          ) -> dict[str, str]:
    """In words, what decided each split (the report's `rules`); `by_keys`: some of a data
    set's crops had no official split and went by their keys (`assign_keys`)."""
    ranked = f"ranked by a hash seeded with seed={params.seed}"
    if faces_report is not None:
        official = dict((faces_report.get("dataset") or {}).get("rules", {}))
        how = official.pop("train/val", "by group keys")
        return official | ({"train/val": f"{how}; keys {ranked}, about val_fraction="
                            f"{params.val_fraction} of each class's keys to val; a clip whose "
                            "keys fell on both sides is left out (left_out)"} if by_keys else {})
    unit = {"file": "image (and its exact duplicates)", "folder": "folder (a clip's frames)"}
    group = unit[params.group_by] + (f", joined by group_pattern {params.group_pattern!r}"
                                     if params.group_pattern else "")
    per = "per class" if params.stratify == "class" else "per class and source folder"
    return {"train/val/test": f"{per}, each {group} {ranked}: the lowest "
            f"test_fraction={params.test_fraction} to test, the next "
            f"val_fraction={params.val_fraction} to val, the rest to train"}


def record(params: SplitParams) -> dict | None:
    """What run.json keeps of a finished 01-split: its counts and what it left out."""
    report = read_report(params.data_dir)
    if report is None:
        return None
    return {"counts": report["counts"], "n_images": report["n_images"],
            "n_masks": report.get("n_masks", 0), "n_rejected": len(report["rejected"]),
            "n_skipped": len(report["skipped"]),
            "n_duplicate_groups": len(report["duplicates"]),
            "group_counts": report.get("group_counts"), "n_conflicts": len(report["conflicts"])}


def shown_lines(params: SplitParams, report: dict) -> list[str]:
    """What the split command prints: the images of each split, what was left out, and a
    class that a split does not hold."""
    counts = "; ".join(f"{name} {n['real']} real, {n['fake']} fake"
                       for name, n in report["counts"].items())
    where = from_here(resolve(params.data_dir) / paths.SPLIT_REPORT)
    return [f"{counts}; {len(report['rejected'])} rejected, {len(report['skipped'])} skipped "
            f"(why: {where})", *empty_lines(report)]


def empty_lines(report: dict) -> list[str]:
    """A split's classes that hold no image in one of its splits, in words."""
    return [f"{empty.replace('/', ' holds no ', 1)} image: a model cannot learn or be "
            "validated on that class there" for empty in report.get("empty", [])]


def after_faces(planned: dict[str, dict], given: set[str]) -> None:
    """In a chain that crops faces first (FACES=1), the split reads the faces step's output,
    grouped by folder (one clip, one group) unless group_by was given."""
    if "00-faces" in planned:
        planned["01-split"]["raw_dir"] = planned["00-faces"]["faces_dir"]
        if "group_by" not in given:
            planned["01-split"]["group_by"] = "folder"
