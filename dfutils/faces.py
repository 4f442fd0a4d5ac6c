"""The faces step (00-faces): photos and video clips -> faces_dir/{real,fake} crops.

raw_dir is the toolkit's real/ + fake/ folders, or a published data set (FF++, DFD,
Celeb-DF, DFDC) read as its authors lay it out (`dfutils.datasets`); each crop's row in
faces.csv carries its clip's label, group keys, official split and method. Frames come from
`dfutils.frames`, faces from `dfutils.detect`. raw_dir is only read. The work goes to a
task's part first (`shards.Part`: one journal line per finished source, so a killed run
resumes where it stopped); like the split, the result is built aside and swapped in, and
faces_dir may hold only what this step wrote (`owned.OwnedFolder`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

import cv2
import numpy as np

from dfutils import datasets, paths, processes, shards
from dfutils.atomic import write_json
from dfutils.datasets import CLASSES, Item, Listing, is_clip
from dfutils.detect import Face, FaceFinder, crop_mask, faces_of, model_file
from dfutils.frames import DETECT_PIXELS, UnreadableClip, clip_shape, gray_frames
from dfutils.images import ImageLoadError, load_image
from dfutils.owned import OwnedFolder, complete_report, fingerprint
from dfutils.params import FacesParams
from dfutils.paths import from_here, resolve
from dfutils.progress import tqdm

# of faces.csv; group, split and method come from the data set (empty for real/ + fake/);
# mask is the crop's mask, cut from the clip's published mask video (FF++), or empty
FIELDS = ("path", "label", "source", "frame", "box", "score", "landmarks", "group", "split",
          "method", "mask")


class FacesError(ValueError):
    """The faces step cannot run as asked; the message says why and what to do."""


def scan(raw_dir: Path, params: FacesParams) -> Listing:
    """The photos and clips of raw_dir read as `params.dataset` lays them out, with what was
    skipped or is missing as problems ({"path", "reason"})."""
    if not raw_dir.is_dir():
        raise FacesError(f"raw folder {raw_dir} does not exist: give RAW_DIR= the folder of "
                         f"your photos and clips, or the root of the {params.dataset} data set")
    methods = [m.strip() for m in params.methods.split(",") if m.strip()]
    listing = datasets.read(params.dataset, raw_dir, methods, params.compression)
    for item in list(listing.items):  # a reader's bug must not write outside faces_dir
        why = datasets.stays_inside(item.path)
        if why:
            listing.items.remove(item)
            listing.problem(str(item.path), f"{why}: left out")
    taken: dict[str, str] = {}  # crops are named by the path without its suffix
    for item in list(listing.items):
        stem = Path(item.path).with_suffix("").as_posix()
        first = taken.setdefault(stem, item.path)
        if first != item.path:
            listing.items.remove(item)
            listing.problem(item.path, f"{first} has the same name without its suffix, and "
                            "the crops are named by it: rename one")
    # A clip's crops fill a folder of their own (the group the split keeps together): a
    # photo whose crop would land in it, or be named like it, collides with the clip.
    clips = {crop_stem(i, params.dataset): i.path for i in listing.items if is_clip(i.path)}
    for item in [i for i in listing.items if not is_clip(i.path)]:
        crop = crop_path(item, params.dataset)
        clip = clips.get(crop.parent) or clips.get(crop)
        if clip is not None:
            listing.items.remove(item)
            listing.problem(item.path, f"its crop {crop.as_posix()} would land among the "
                            f"crops of the clip {clip}: rename or move one of them")
    return listing


def crop_stem(item: Item, dataset: str) -> Path:
    """Where a source's crops go, without suffix: <label>/<its path below the class folder>
    for real/ + fake/, <label>/<its path> for a data set; always inside faces_dir."""
    why = datasets.stays_inside(item.path)
    if why or item.label not in CLASSES:
        raise FacesError(f"{item.path}: {why or 'not real or fake'}: no crop is made of it")
    parts = Path(item.path).with_suffix("").parts
    return Path(item.label, *(parts[1:] if dataset == "folder" else parts))


def crop_path(item: Item, dataset: str, index: int = 0, rank: int = 0) -> Path:
    """A crop's path in faces_dir: <stem>/<frame:06d>.png for a clip's frame (its face of
    rank k > 0, with max_faces: <frame:06d>_<k>.png), <stem>.png for a photo (a.v2.jpg gives
    a.v2.png, not a.png)."""
    stem = crop_stem(item, dataset)
    if not is_clip(item.path):
        return stem.parent / f"{stem.name}.png"
    return stem / (f"{index:06d}_{rank}.png" if rank else f"{index:06d}.png")


def mask_path(crop: Path) -> Path:
    """Where a crop's mask goes: masks/<its name> beside it, where the split looks for it."""
    return crop.parent / "masks" / crop.name


def mask_problem(raw_dir: Path, item: Item) -> str | None:
    """Why a clip's published mask video cannot mask its crops (missing, unreadable, fewer
    frames than the clip, or frames of another size), or None when it can."""
    if not (raw_dir / item.mask).is_file():
        return (f"no mask video {item.mask}: its crops have no mask (download the "
                "method's masks to measure where the explanations point)")
    try:
        shape, clip = clip_shape(raw_dir / item.mask), clip_shape(raw_dir / item.path)
    except UnreadableClip as error:
        return f"its mask video {item.mask} cannot be read ({error.reason}): no masks"
    if shape[0] < clip[0]:
        return (f"its mask video {item.mask} has {shape[0]} frames, fewer than the clip's "
                f"{clip[0]}: no masks")
    if shape[1:] != clip[1:]:
        return (f"its mask video {item.mask} is {shape[1]} x {shape[2]}, the clip "
                f"{clip[1]} x {clip[2]}: no masks")
    return None


def write_masks(raw_dir: Path, out: Path, item: Item, faces: list[tuple[int, Face]],
                crop_of: Callable[[int, Face], Path], size: int) -> dict[tuple[int, int], str]:
    """Each face's mask, cut from the same frame of the clip's mask video with exactly the
    map that cut the face; the paths written, by (frame, rank)."""
    by_frame: dict[int, list[Face]] = {}
    for index, face in faces:
        by_frame.setdefault(index, []).append(face)
    written = {}
    for index, mask in gray_frames(raw_dir / item.mask, list(by_frame)):
        for face in by_frame[index]:
            path = mask_path(crop_of(index, face))
            write_png(out / path, crop_mask(mask, face, size))
            written[index, face.rank] = path.as_posix()
    return written


def write_png(path: Path, pixels: np.ndarray) -> None:
    """A crop or a mask (OpenCV's channel order) written as PNG, its folder made; OSError
    when OpenCV cannot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), pixels):
        raise OSError(f"could not write {path}")


_FINDER: FaceFinder | None = None  # one per worker process: dlib's models do not pickle


def _finder(params: FacesParams) -> FaceFinder:
    """This process's FaceFinder, loaded again only when a setting it uses changed (loading
    the landmark models takes about a second)."""
    global _FINDER
    if _FINDER is None or _FINDER.settings != FaceFinder.settings_of(params):
        _FINDER = FaceFinder(params)
    return _FINDER


def extract_source(raw_dir: Path, out: Path, params: FacesParams, item: Item
                   ) -> tuple[list[dict], dict]:
    """Crop the faces of one photo or clip into `out`; its faces.csv rows and report entry.

    A clip's crops go to <stem>/<frame:06d>.png (one folder per clip, the group the split
    keeps together), a photo's to <stem>.png (`crop_stem`).
    """
    video = is_clip(item.path)
    carried = {"group": item.group, "split": item.split, "method": item.method}
    entry: dict = {"source": item.path, "label": item.label,
                   "kind": "video" if video else "photo", **carried}
    rows = []

    def crop_of(index: int, face: Face) -> Path:
        return crop_path(item, params.dataset, index, face.rank)

    def write(index: int, face: Face) -> None:
        write_png(out / crop_of(index, face), cv2.cvtColor(face.crop, cv2.COLOR_RGB2BGR))

    # Crops are encoded and written by a thread (OpenCV lets go of the GIL) while the next
    # frame's face is found; every write is done before the source counts as finished.
    with ThreadPoolExecutor(1) as writer:
        written: list[Future] = []
        try:
            found = faces_of(raw_dir / item.path, _finder(params), params.frames_per_video,
                             lambda index, face: written.append(writer.submit(write, index,
                                                                             face)),
                             params.max_faces)
        except (UnreadableClip, ImageLoadError) as error:
            return [], {**entry, "reason": getattr(error, "reason", None) or str(error)}
        for future in written:
            future.result()
    masks: dict[tuple[int, int], str] = {}
    if video and item.mask and found.faces:
        why = mask_problem(raw_dir, item)
        if why is None:
            masks = write_masks(raw_dir, out, item, found.faces, crop_of, params.face_size)
            if len(masks) < len(found.faces):
                why = (f"its mask video {item.mask} ended early: "
                       f"{len(found.faces) - len(masks)} crop(s) have no mask")
        if why:
            entry["mask"] = why
    n_frames = found.n_frames
    for index, face in found.faces:
        rows.append({"path": crop_of(index, face).as_posix(), "label": item.label,
                     "source": item.path, "frame": index, "box": json.dumps(face.box),
                     "score": round(face.score, 4),
                     "landmarks": json.dumps(np.round(face.landmarks, 2).tolist()), **carried,
                     "mask": masks.get((index, face.rank), "")})
    entry.update(frames_read=n_frames, faces_found=len(rows), masks=len(masks))
    if found.scale != 1.0:
        entry["downscaled"] = (f"frames scaled by {found.scale:.3f} before detection (over "
                               f"{DETECT_PIXELS:,} pixels); boxes are in the source's pixels")
    if not n_frames:
        entry["reason"] = "no frame could be decoded (truncated or corrupt clip)"
    elif video and n_frames < params.frames_per_video:
        entry["short"] = (f"{n_frames} frame(s) read, fewer than frames_per_video="
                          f"{params.frames_per_video}: every frame it has was used")
    return rows, entry


def recorded(params: FacesParams, raw_dir: Path) -> dict:
    """The parameters a faces report records: all but the output's; the data set's only
    when it is not real/ + fake/ (so folders made before data sets existed stay current)."""
    settings = {k: v for k, v in params.to_dict().items() if k not in ("faces_dir", "overwrite")}
    if params.dataset == "folder":
        for name in ("dataset", "methods", "compression"):
            settings.pop(name)
    if params.max_faces == 1:  # as before max_faces existed
        settings.pop("max_faces")
    return {**settings, "raw_dir": str(raw_dir)}


def _written(faces_dir: Path, report: dict) -> set[str]:
    with open(faces_dir / paths.FACES, newline="") as f:
        return {path for row in csv.DictReader(f) for path in files_of(row)}


def files_of(row: dict) -> list[str]:
    """The files one row of faces.csv stands for: its crop, and its mask when it has one."""
    return [row["path"], *([row["mask"]] if row.get("mask") else [])]


# What the faces step owns inside faces_dir; the report comes in last.
FOLDER = OwnedFolder(
    step="the faces step", result="faces", option="faces_dir",
    entries=(*CLASSES, paths.FACES, paths.FACES_REPORT), folders=CLASSES,
    report=paths.FACES_REPORT, listed=_written, prefix="faces", error=FacesError)


def read_report(faces_dir: str | os.PathLike) -> dict | None:
    """The report of a complete faces step in faces_dir, or None."""
    return complete_report(resolve(faces_dir), paths.FACES_REPORT, paths.FACES_REPORT)


def _inputs(params: FacesParams) -> tuple[Path, Path, Listing, dict, str]:
    """raw_dir, faces_dir, the sources, the settings a report records and the inputs'
    fingerprint: what a run, a shard and a merge must agree on. Nothing is written."""
    raw_dir, faces_dir = resolve(params.raw_dir).resolve(), resolve(params.faces_dir).resolve()
    if faces_dir == raw_dir or raw_dir in faces_dir.parents or faces_dir in raw_dir.parents:
        raise FacesError(f"faces_dir {faces_dir} and raw_dir {raw_dir} must not contain each "
                         "other")
    listing = scan(raw_dir, params)
    sources = listing.items
    if not sources:  # nothing to crop is a failure, not an empty result that looks done
        why = "; ".join(f"{p['path']}: {p['reason']}" for p in listing.problems[:5])
        more = f" (and {len(listing.problems) - 5} more)" if len(listing.problems) > 5 else ""
        raise FacesError(f"{raw_dir} holds no photo or clip to crop as dataset="
                         f"{params.dataset} lays them out" + (f": {why}{more}" if why else
                                                               ": put them in real/ and fake/"))
    # the mask videos there are inputs too (none there: the stamp of a folder made before)
    masks = [i.mask for i in sources if i.mask and (raw_dir / i.mask).is_file()]
    stamp = hashlib.sha256((fingerprint(raw_dir, [item.path for item in sources] + masks)
                            + json.dumps([(i.label, i.group, i.split, i.method)
                                          for i in sources])).encode()).hexdigest()
    return raw_dir, faces_dir, listing, recorded(params, raw_dir), stamp


def preflight(params: FacesParams) -> None:
    """Every check of the faces step that needs nothing written (the folders, the inputs,
    what faces_dir holds): the runner makes them before it writes a run folder."""
    _, faces_dir, _, settings, stamp = _inputs(params)
    FOLDER.current(faces_dir, settings, stamp, params.overwrite)


def extract_faces(params: FacesParams, workers: int | None = None,
                  shard: shards.Shard | None = None) -> dict:
    """Run the faces step; return its report. Same inputs and parameters: nothing is redone.

    Sources are spread over worker processes (one source at a time each); a source that
    cannot be read, or a frame without a face, is counted in the report, never fatal. The
    work goes to a part folder first (`Part`), one line per finished source, so a killed
    run resumes where it stopped; with a `shard` (one task of a cluster job) only its part
    is made, and `merge_faces` builds faces_dir from all of them. A whole run is the one
    shard of one, merged at once: both roads give the same bytes.
    """
    raw_dir, faces_dir, listing, settings, stamp = _inputs(params)
    existing = FOLDER.current(faces_dir, settings, stamp, params.overwrite)
    if existing is not None:
        return existing
    model_file("shape_predictor_68_face_landmarks.dat")  # a missing install fails here, once
    part = shards.Part(faces_dir / paths.FACES_PARTS, shard or shards.WHOLE,
                       {"params": settings, "inputs": stamp})
    try:
        part.check("choose another faces_dir")
    except shards.ShardError as error:
        raise FacesError(str(error)) from None
    mine = [item for item in listing.items if part.shard.owns(item.path)]
    report = run_part(part, mine, functools.partial(extract_source, raw_dir, part.folder,
                                                    params), workers)
    if shard is not None:
        return report
    return _merge(faces_dir, listing, settings, stamp, [part])


def run_part(part: shards.Part, sources: list[Item],
             one: Callable[[Item], tuple[list[dict], dict]], workers: int | None) -> dict:
    """Extract the sources the part has not finished, each in the journal as it finishes;
    the part's own report (its shard's sources only)."""
    finished = part.start()
    todo = [item for item in sources if item.path not in finished]
    workers = workers or min(len(todo), processes.usable_cpus()) or 1
    with part.writing() as add, tqdm(total=len(sources), initial=len(sources) - len(todo),
                                     desc="faces", unit="source") as bar:
        for item, (rows, entry) in _map(one, todo, workers):
            add(item.path, {"rows": rows, "entry": entry},
                [path for row in rows for path in files_of(row)])
            bar.update()
    part.finish(len(sources))
    finished = part.done()
    rows = [row for item in sources for row in finished[item.path]["rows"]]
    entries = [finished[item.path]["entry"] for item in sources]
    return {**_report(part.header["params"], part.header["inputs"], Listing(), rows, entries),
            "shard": str(part.shard), "folder": str(part.folder), "rows": rows}


def merge_faces(params: FacesParams) -> dict:
    """Build faces_dir from the parts its shards wrote (`make faces-merge`); its report.

    Every shard of the job must be there and complete, made with these parameters from
    these inputs; each one that is not is named, with what to do, and nothing changes.
    The result is what one run would have written, byte for byte; the parts go once it is
    in place.
    """
    _, faces_dir, listing, settings, stamp = _inputs(params)
    existing = FOLDER.current(faces_dir, settings, stamp, params.overwrite)
    if existing is not None:
        return existing
    try:
        parts = shards.complete_parts(faces_dir / paths.FACES_PARTS, "SHARD=",
                                      {"params": settings, "inputs": stamp})
    except shards.ShardError as error:
        raise FacesError(str(error)) from None
    return _merge(faces_dir, listing, settings, stamp, parts)


def _merge(faces_dir: Path, listing: Listing, settings: dict, stamp: str,
           parts: list[shards.Part]) -> dict:
    """faces_dir built from complete parts (crops linked, not copied), in the sources'
    order; the parts are removed once it is in place."""
    results = {source: (part.folder, line["rows"], line["entry"])
               for part in parts for source, line in part.done().items()}
    missing = [item.path for item in listing.items if item.path not in results]
    if missing:  # a part's checks make this impossible; a bug must not write a half result
        raise FacesError(f"the parts lack {len(missing)} source(s), e.g. {missing[0]}")
    with FOLDER.build(faces_dir) as built:
        rows, entries = [], []
        for item in listing.items:
            part_folder, source_rows, entry = results[item.path]
            for path in (path for row in source_rows for path in files_of(row)):
                (built / path).parent.mkdir(parents=True, exist_ok=True)
                _link(part_folder / path, built / path)
            rows += source_rows
            entries.append(entry)
        report = _report(settings, stamp, listing, rows, entries)
        with open(built / paths.FACES, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        write_json(built / paths.FACES_REPORT, report)
    for part in parts:
        part.remove()
    return report


def _link(source: Path, target: Path) -> None:
    """A crop into the result: a hard link (same bytes, no space), a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _report(settings: dict, stamp: str, listing: Listing, rows: list[dict],
            entries: list[dict]) -> dict:
    return {
        "params": settings, "fingerprint": stamp,
        "n_sources": len(entries), "n_crops": len(rows),
        "frames_read": sum(e.get("frames_read", 0) for e in entries),
        "faces_found": sum(e.get("faces_found", 0) for e in entries),
        "sources": entries,
        "unreadable": [e for e in entries if "reason" in e],
        "short_clips": sum("short" in e for e in entries),
        "n_masks": sum(e.get("masks", 0) for e in entries),
        "without_masks": [{"source": e["source"], "reason": e["mask"]}
                          for e in entries if e.get("mask")],
        "skipped": [{"source": p["path"], "reason": p["reason"]} for p in listing.problems],
        "dataset": {"name": settings.get("dataset", "folder"), "rules": listing.rules},
    }


def _map(one: Callable, items: list, workers: int) -> Iterator[tuple]:
    """(item, one(item)) as each finishes: in this process, or over `workers` processes."""
    if workers == 1:
        yield from ((item, one(item)) for item in items)
        return
    with processes.pool(workers) as workers_pool:
        futures = {workers_pool.submit(one, item): item for item in items}
        try:
            for future in as_completed(futures):
                yield futures.pop(future), future.result()
        except BaseException:  # Ctrl-C: what is running finishes, the rest never starts
            workers_pool.shutdown(wait=False, cancel_futures=True)
            raise


def read_faces(faces_dir: str | os.PathLike) -> dict[str, dict]:
    """faces.csv by crop path: label, source, frame, box, score, landmarks (68 x 2)."""
    with open(resolve(faces_dir) / paths.FACES, newline="") as f:
        return {row["path"]: {**row, "frame": int(row["frame"]), "score": float(row["score"]),
                              "box": json.loads(row["box"]),
                              "landmarks": np.array(json.loads(row["landmarks"]))}
                for row in csv.DictReader(f)}


def sample_crops(faces_dir: str | os.PathLike, n: int, seed: int = 0
                 ) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(crop, landmarks, title) for n random crops of faces_dir, both classes in turn."""
    faces_dir = resolve(faces_dir)
    table = read_faces(faces_dir)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in CLASSES:
        crops = sorted(p for p, row in table.items() if row["label"] == label)
        chosen += [crops[i] for i in rng.choice(len(crops), min(n // 2, len(crops)),
                                                replace=False)]
    return [(np.asarray(load_image(faces_dir / p)), table[p]["landmarks"],
             f"{table[p]['label']} · frame {table[p]['frame']}\n{Path(p).parent.name[:24]}")
            for p in chosen]


def record(params: FacesParams) -> dict | None:
    """What run.json keeps of a finished 00-faces: its report's counts."""
    report = read_report(params.faces_dir)
    if report is None:
        return None
    return {**{k: report[k] for k in ("n_sources", "n_crops", "frames_read", "faces_found")},
            "n_unreadable": len(report["unreadable"])}


def shown_lines(params: FacesParams, report: dict) -> list[str]:
    """What the faces command prints: the counts, and where they are."""
    if "shard" in report:
        return [f"shard {report['shard']}: {report['n_sources']} sources, "
                f"{report['n_crops']} crops in {from_here(report['folder'])}"]
    lines = [f"{report['n_sources']} sources, {report['n_crops']} crops: "
             f"{from_here(resolve(params.faces_dir) / paths.FACES_REPORT)}"]
    without = report.get("without_masks", [])
    if report.get("n_masks") or without:
        lines.append(f"{report['n_masks']} crops masked from the published mask videos; "
                     f"{len(without)} clip(s) without: " + "; ".join(
                         f"{w['source']}: {w['reason']}" for w in without[:3])
                     + (f" (and {len(without) - 3} more in the report)" if len(without) > 3
                        else ""))
    return lines
