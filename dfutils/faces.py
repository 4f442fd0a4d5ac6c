"""The faces step: photos and video clips -> faces_dir/{real,fake} crops.

raw_dir is the toolkit's real/ + fake/ folders, or a published data set (FaceForensics++,
DFD, Celeb-DF, DFDC) read as its authors lay it out (`dfutils.datasets`); each crop's row
in faces.csv carries its clip's label, group keys, official split and method.

Every detector in this field first samples frames, finds the face and crops it with a
margin, and only then classifies; this module does that. Frames come from OpenCV's bundled
FFmpeg, walked with grab() and decoded with retrieve() only where chosen (frame-exact, and
cheaper than seeking). Faces come from dlib's HOG detector and its 68-point landmark model
(shipped by the face-recognition-models package; trained on iBUG 300-W, whose terms exclude
commercial use). raw_dir is only read. Like the split, the output is built aside and swapped
in, and faces_dir may hold only what this step wrote (`folders.OwnedFolder`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from dfutils import CLASSES, datasets, files, processes, shards
from dfutils.data import ImageLoadError, load_image
from dfutils.datasets import Item, Listing
from dfutils.folders import VIDEO_SUFFIXES, OwnedFolder
from dfutils.params import FacesParams
from dfutils.paths import (
    atomic_path,
    fingerprint,
    is_temp,
    remove_stale_temps,
    resolve,
    write_json,
)
from dfutils.progress import tqdm

# of faces.csv; group, split and method come from the data set (empty for real/ + fake/)
FIELDS = ("path", "label", "source", "frame", "box", "score", "landmarks", "group", "split",
          "method")


class FacesError(ValueError):
    """The faces step cannot run as asked; the message says why and what to do."""


def model_file(name: str) -> Path:
    """A dlib model file shipped by face-recognition-models (found without importing it:
    its __init__ needs pkg_resources, which current setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FacesError("the face models are not installed: run `make setup` (it installs "
                         "face-recognition-models and dlib-bin from requirements.txt)")
    return Path(spec.submodule_search_locations[0]) / "models" / name


@dataclass(frozen=True)
class Face:
    crop: np.ndarray  # face_size x face_size RGB
    box: tuple[int, int, int, int]  # detector box in source pixels: left, top, right, bottom
    score: float  # detector confidence
    landmarks: np.ndarray  # (68, 2) in crop pixels


class FaceFinder:
    """dlib's HOG detector with the 68-point landmarks (and the 5-point model to align)."""

    def __init__(self, params: FacesParams):
        import dlib  # heavy, and not needed by the rest of the package

        self.params, self.settings = params, self.settings_of(params)
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks68 = dlib.shape_predictor(str(model_file(
            "shape_predictor_68_face_landmarks.dat")))
        self.landmarks5 = (dlib.shape_predictor(str(model_file(
            "shape_predictor_5_face_landmarks.dat"))) if params.align else None)

    @staticmethod
    def settings_of(params: FacesParams) -> tuple:
        """What a FaceFinder does depends on these parameters alone."""
        return (params.upsample, params.min_score, params.align, params.face_margin,
                params.face_size)

    def detect(self, rgb: np.ndarray, upsample: int | None = None
               ) -> tuple[object, float, np.ndarray] | None:
        """The most confident face of an RGB image (the largest on a tie) as dlib's box, its
        score and the 68 landmarks in the image's pixels; or None."""
        upsample = self.params.upsample if upsample is None else upsample
        rects, scores, _ = self.detector.run(rgb, upsample, self.params.min_score)
        if not rects:
            return None
        best = max(range(len(rects)), key=lambda i: (scores[i], rects[i].area()))
        rect = rects[best]
        points = np.array([(p.x, p.y) for p in self.landmarks68(rgb, rect).parts()], np.float64)
        return rect, float(scores[best]), points

    def __call__(self, rgb: np.ndarray) -> Face | None:
        """The most confident face of an RGB frame, cropped; or None."""
        found = self.detect(rgb)
        if found is None:
            return None
        rect, score, points = found
        eyes = None
        if self.landmarks5 is not None:  # points 0-1 and 2-3 are the corners of each eye
            five = np.array([(p.x, p.y) for p in self.landmarks5(rgb, rect).parts()], np.float64)
            eyes = (five[0:2].mean(axis=0), five[2:4].mean(axis=0))
        box = (rect.left(), rect.top(), rect.right(), rect.bottom())
        # dlib's box is tight (the chin often lies below it): frame the box and the
        # landmarks together, so the crop holds every landmark.
        extent = (min(box[0], points[:, 0].min()), min(box[1], points[:, 1].min()),
                  max(box[2], points[:, 0].max()), max(box[3], points[:, 1].max()))
        matrix = crop_matrix(extent, self.params.face_margin, self.params.face_size, eyes)
        crop = cv2.warpAffine(rgb, matrix, (self.params.face_size,) * 2, flags=cv2.INTER_AREA,
                              borderMode=cv2.BORDER_CONSTANT)
        return Face(crop, box, score, points @ matrix[:, :2].T + matrix[:, 2])


def crop_matrix(box: tuple[float, float, float, float], margin: float, size: int,
                eyes: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The 2x3 affine map from source pixels to a size x size crop: a square `margin` times
    the box's larger side around its centre, turned so the eyes are level when given.

    One map for both cases keeps the crop and its landmarks in step; pixels outside the
    frame come out black.
    """
    left, top, right, bottom = box
    centre = ((left + right) / 2, (top + bottom) / 2)
    side = margin * max(right - left, bottom - top, 1)
    angle = 0.0
    if eyes is not None:
        (lx, ly), (rx, ry) = sorted(eyes, key=lambda e: e[0])
        angle = float(np.degrees(np.arctan2(ry - ly, rx - lx)))
    matrix = cv2.getRotationMatrix2D(centre, angle, size / side)
    matrix[:, 2] += np.array([size / 2, size / 2]) - centre
    return matrix


def sample_indices(n_frames: int, k: int) -> list[int]:
    """k frame indices evenly spaced over a clip, first and last included; every frame once
    when the clip has k or fewer."""
    if n_frames <= k:
        return list(range(n_frames))
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, k)})


# Frames above this many pixels are scaled down (INTER_AREA) before detection, so a
# process's memory is bounded whatever the clip: 3840 x 2160 (4K UHD) passes unchanged.
# Frames above Pillow's limit, the cap photos have (data.load_image), are not decoded.
DETECT_PIXELS = 3840 * 2160


def bounded(frame: np.ndarray) -> tuple[np.ndarray, float]:
    """A frame scaled down to at most DETECT_PIXELS, and the scale applied (1.0: none)."""
    height, width = frame.shape[:2]
    if height * width <= DETECT_PIXELS:
        return frame, 1.0
    scale = (DETECT_PIXELS / (height * width)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA), size[0] / width


def read_frames(path: Path, k: int) -> Iterator[tuple[int, np.ndarray, float]]:
    """(index, RGB frame, scale) for k evenly spaced frames of a clip, each `bounded`;
    FacesError if unreadable or if its frames are over the pixel cap.

    The frame count comes from the container; a truncated clip ends early, and yields
    the chosen frames it has.
    """
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise FacesError("not a video OpenCV can open (empty, corrupt or another format)")
        n_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if n_frames <= 0:
            raise FacesError("the clip has no frames")
        width, height = (int(capture.get(p)) for p in (cv2.CAP_PROP_FRAME_WIDTH,
                                                        cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise FacesError(f"frames of {width} x {height} pixels are over the cap of "
                             f"{Image.MAX_IMAGE_PIXELS:,} that photos have too: scale the clip "
                             "down (ffmpeg -vf scale=3840:-2)")
        wanted = sample_indices(n_frames, k)
        last, index = wanted[-1], 0
        chosen = set(wanted)
        while index <= last and capture.grab():
            if index in chosen:
                ok, frame = capture.retrieve()
                if ok:
                    frame, scale = bounded(frame)
                    yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), scale
            index += 1
    finally:
        capture.release()


def ahead(frames: Iterator, depth: int = 2) -> Iterator:
    """The items of `frames`, produced by a thread up to `depth` ahead of the consumer.

    OpenCV lets go of the GIL while it decodes, so a clip's next frames are decoded while
    dlib looks for the face in this one. The thread stops when the consumer does.
    """
    out: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def offer(item: object, error: BaseException | None = None) -> bool:
        """Put (item, error) on the queue unless the consumer stops first."""
        while not stop.is_set():
            try:
                out.put((item, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in frames:
                if not offer(item):
                    return
            offer(end)
        except BaseException as error:  # handed to the consumer, raised there
            offer(end, error)
        finally:  # the clip is released here, in the thread that read it
            getattr(frames, "close", lambda: None)()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = out.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def scan(raw_dir: Path, params: FacesParams) -> Listing:
    """The photos and clips of raw_dir read as `params.dataset` lays them out, with what was
    skipped or is missing as problems ({"path", "reason"})."""
    if not raw_dir.is_dir():
        raise FacesError(f"raw folder {raw_dir} does not exist: give RAW_DIR= the folder of "
                         f"your photos and clips, or the root of the {params.dataset} data set")
    methods = [m.strip() for m in params.methods.split(",") if m.strip()]
    listing = datasets.read(params.dataset, raw_dir, methods, params.compression)
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


def is_clip(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def crop_stem(item: Item, dataset: str) -> Path:
    """Where a source's crops go, without suffix: <label>/<its path below the class folder>
    for real/ + fake/, <label>/<its path> for a data set."""
    parts = Path(item.path).with_suffix("").parts
    return Path(item.label, *(parts[1:] if dataset == "folder" else parts))


def crop_path(item: Item, dataset: str, index: int = 0) -> Path:
    """A crop's path in faces_dir: <stem>/<frame:06d>.png for a clip's frame, <stem>.png
    for a photo (a.v2.jpg gives a.v2.png, not a.png)."""
    stem = crop_stem(item, dataset)
    return stem / f"{index:06d}.png" if is_clip(item.path) else stem.parent / f"{stem.name}.png"


_FINDER: FaceFinder | None = None  # one per worker process: dlib's models do not pickle


def _finder(params: FacesParams) -> FaceFinder:
    """This process's FaceFinder, loaded again only when a setting it uses changed (loading
    the landmark models takes about a second)."""
    global _FINDER
    if _FINDER is None or _FINDER.settings != FaceFinder.settings_of(params):
        _FINDER = FaceFinder(params)
    return _FINDER


class Found(NamedTuple):
    faces: list[tuple[int, Face]]  # (frame index, face), the box in the source's pixels
    n_frames: int  # frames read (a photo is frame 0)
    scale: float  # the smallest scale `bounded` applied before detection (1.0: none)


def faces_of(path: Path, finder: FaceFinder, frames_per_video: int,
             each: Callable[[int, Face], None] | None = None) -> Found:
    """The faces of one photo or clip; `each(index, face)` hears each one as it is found.
    FacesError or ImageLoadError when the file cannot be read."""
    if is_clip(path):
        frames = ahead(read_frames(path, frames_per_video))
    else:
        photo, scale = bounded(np.asarray(load_image(path)))
        frames = iter([(0, photo, scale)])
    found, n_frames, smallest = [], 0, 1.0
    for index, rgb, scale in frames:
        n_frames, smallest = n_frames + 1, min(smallest, scale)
        face = finder(rgb)
        if face is not None:
            if scale != 1.0:
                face = dataclasses.replace(face, box=tuple(round(v / scale) for v in face.box))
            found.append((index, face))
            if each is not None:
                each(index, face)
    return Found(found, n_frames, smallest)


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

    def crop_of(index: int) -> Path:
        return crop_path(item, params.dataset, index)

    def write(index: int, face: Face) -> None:
        (out / crop_of(index)).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out / crop_of(index)), cv2.cvtColor(face.crop,
                                                                   cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {out / crop_of(index)}")

    # Crops are encoded and written by a thread (OpenCV lets go of the GIL) while the next
    # frame's face is found; every write is done before the source counts as finished.
    with ThreadPoolExecutor(1) as writer:
        written: list[Future] = []
        try:
            found = faces_of(raw_dir / item.path, _finder(params), params.frames_per_video,
                             lambda index, face: written.append(writer.submit(write, index,
                                                                             face)))
        except (FacesError, ImageLoadError) as error:
            return [], {**entry, "reason": getattr(error, "reason", None) or str(error)}
        for future in written:
            future.result()
    n_frames = found.n_frames
    for index, face in found.faces:
        rows.append({"path": crop_of(index).as_posix(), "label": item.label,
                     "source": item.path, "frame": index, "box": json.dumps(face.box),
                     "score": round(face.score, 4),
                     "landmarks": json.dumps(np.round(face.landmarks, 2).tolist()), **carried})
    entry.update(frames_read=n_frames, faces_found=len(rows))
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
    return {**settings, "raw_dir": str(raw_dir)}


def params_of(settings: dict) -> FacesParams:
    """The FacesParams a faces report (or a checkpoint) recorded."""
    return FacesParams.from_mapping({k: v for k, v in settings.items()
                                     if k in FacesParams.names()})


def _written(faces_dir: Path, report: dict) -> set[str]:
    with open(faces_dir / files.FACES, newline="") as f:
        return {row["path"] for row in csv.DictReader(f)}


# What the faces step owns inside faces_dir; the report comes in last.
FOLDER = OwnedFolder(
    step="the faces step", result="faces", option="faces_dir",
    entries=(*CLASSES, files.FACES, files.FACES_REPORT), folders=CLASSES,
    report=files.FACES_REPORT, listed=_written, prefix="faces", error=FacesError)


def read_report(faces_dir: str | os.PathLike) -> dict | None:
    """The report of a complete faces step in faces_dir, or None."""
    return FOLDER.read_report(resolve(faces_dir))


def _inputs(params: FacesParams) -> tuple[Path, Path, Listing, dict, str]:
    """raw_dir, faces_dir, the sources, the settings a report records and the inputs'
    fingerprint: what a run, a shard and a merge must agree on. Nothing is written."""
    raw_dir, faces_dir = resolve(params.raw_dir).resolve(), resolve(params.faces_dir).resolve()
    if faces_dir == raw_dir or raw_dir in faces_dir.parents or faces_dir in raw_dir.parents:
        raise FacesError(f"faces_dir {faces_dir} and raw_dir {raw_dir} must not contain each "
                         "other")
    listing = scan(raw_dir, params)
    sources = listing.items
    stamp = hashlib.sha256((fingerprint(raw_dir, [item.path for item in sources]) + json.dumps(
        [(i.label, i.group, i.split, i.method) for i in sources])).encode()).hexdigest()
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
    part = Part(faces_dir, shard or shards.WHOLE, settings, stamp)
    part.check()
    mine = [item for item in listing.items if part.shard.owns(item.path)]
    report = part.run(mine, functools.partial(extract_source, raw_dir, part.folder, params),
                      workers)
    if shard is not None:
        return report
    return _merge(faces_dir, listing, settings, stamp, [part])


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
    parts_dir = faces_dir / files.FACES_PARTS
    try:
        n = shards.job_size(parts_dir, "", "run the faces step with SHARD=i/n (or auto) for "
                                           "every i first")
    except shards.ShardError as error:
        raise FacesError(str(error)) from None
    parts = [Part(faces_dir, shards.Shard(i, n), settings, stamp) for i in range(n)]
    problems = [problem for part in parts if (problem := part.problem()) is not None]
    if problems:
        raise FacesError(f"cannot merge the shards in {parts_dir}: " + "; ".join(problems))
    return _merge(faces_dir, listing, settings, stamp, parts)


def _merge(faces_dir: Path, listing: Listing, settings: dict, stamp: str,
           parts: list[Part]) -> dict:
    """faces_dir built from complete parts (crops linked, not copied), in the sources'
    order; the parts are removed once it is in place."""
    results = {source: result for part in parts for source, result in part.done().items()}
    missing = [item.path for item in listing.items if item.path not in results]
    if missing:  # a part's checks make this impossible; a bug must not write a half result
        raise FacesError(f"the parts lack {len(missing)} source(s), e.g. {missing[0]}")
    with FOLDER.build(faces_dir) as built:
        rows, entries = [], []
        for item in listing.items:
            part_folder, source_rows, entry = results[item.path]
            for row in source_rows:
                (built / row["path"]).parent.mkdir(parents=True, exist_ok=True)
                _link(part_folder / row["path"], built / row["path"])
            rows += source_rows
            entries.append(entry)
        report = _report(settings, stamp, listing, rows, entries)
        with open(built / files.FACES, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        write_json(built / files.FACES_REPORT, report)
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
        "skipped": [{"source": p["path"], "reason": p["reason"]} for p in listing.problems],
        "dataset": {"name": settings.get("dataset", "folder"), "rules": listing.rules},
    }


class Part:
    """One shard's partial output, faces_dir/parts/<i>-of-<n>/: its crops, a journal (a
    header line, then one line per finished source with its rows and report entry, written
    after its crops) and, once every source of the shard is in the journal, done.json.

    A journal line that a kill cut short is dropped; a part made with other parameters or
    from other inputs starts afresh (it is this step's own scratch, never a result).
    """

    JOURNAL, DONE = "journal.jsonl", "done.json"

    def __init__(self, faces_dir: Path, shard: shards.Shard, settings: dict, stamp: str):
        self.shard, self.folder = shard, faces_dir / files.FACES_PARTS / shard.name
        self.header = {"params": settings, "fingerprint": stamp, "shard": str(shard)}

    def _lines(self) -> list[dict]:
        """The journal's complete lines; [] when there is none."""
        try:
            text = (self.folder / self.JOURNAL).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return []
        lines = []
        for line in text.split("\n")[:-1]:  # the last piece lacks its newline: cut short
            try:
                lines.append(json.loads(line))
            except ValueError:
                break
        return lines

    def check(self) -> None:
        """Refuse, before anything is written, a parts folder that this step did not make."""
        for folder in (self.folder.parent, self.folder):
            if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
                raise FacesError(f"{folder} is in the way and was not written by the faces "
                                 "step: move it or choose another faces_dir")
        if self.folder.is_dir() and any(not is_temp(p) for p in self.folder.iterdir()) and (
                not self._lines()):  # (a temporary file alone: a kill during the first write)
            raise FacesError(f"{self.folder} holds files but no journal of the faces step: it "
                             "was not written by it; move it or choose another faces_dir")

    def problem(self) -> str | None:
        """Why this part cannot be merged, in words with the fix; None when it can."""
        lines, again = self._lines(), f"run it again (SHARD={self.shard})"
        if not lines:
            return f"shard {self.shard} is missing: {again}"
        head = lines[0]
        if head.get("params") != self.header["params"]:
            changed = shards.differing(self.header["params"], head.get("params") or {})
            return (f"shard {self.shard} was made with other parameters ({', '.join(changed)}"
                    f"): {again} with these")
        if head.get("fingerprint") != self.header["fingerprint"]:
            return (f"shard {self.shard} was made from other inputs (files were added, removed "
                    f"or changed since): {again}")
        if not (self.folder / self.DONE).is_file():
            return (f"shard {self.shard} is not complete (it was stopped, failed or is still "
                    f"running): {again}; it resumes where it stopped")
        return None

    def done(self) -> dict[str, tuple[Path, list[dict], dict]]:
        """The finished sources of a current part: source -> (folder, rows, entry)."""
        lines = self._lines()
        if not lines or {k: lines[0].get(k) for k in self.header} != self.header:
            return {}
        return {line["source"]: (self.folder, line["rows"], line["entry"]) for line in lines[1:]}

    def run(self, sources: list[Item], one: Callable[[Item], tuple[list[dict], dict]],
            workers: int | None) -> dict:
        """Extract the sources not yet in the journal, each written to it as it finishes;
        the part's own report (the shard's sources only)."""
        finished = self.done()
        if not finished and self.folder.exists():  # another run's part, or an empty start
            shutil.rmtree(self.folder)
        elif finished:
            remove_stale_temps(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        kept = [self.header, *self._lines()[1:]] if finished else [self.header]
        with atomic_path(self.folder / self.JOURNAL) as tmp:  # without a cut line
            tmp.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")
        todo = [item for item in sources if item.path not in finished]
        workers = workers or min(len(todo), processes.usable_cpus()) or 1
        with open(self.folder / self.JOURNAL, "a", encoding="utf-8") as journal, \
                tqdm(total=len(sources), initial=len(sources) - len(todo), desc="faces",
                     unit="source") as bar:
            for item, (rows, entry) in _map(one, todo, workers):
                journal.write(json.dumps({"source": item.path, "rows": rows,
                                          "entry": entry}) + "\n")
                journal.flush()
                bar.update()
        write_json(self.folder / self.DONE, {**self.header, "n_sources": len(sources)})
        finished = self.done()
        rows = [row for item in sources for row in finished[item.path][1]]
        entries = [finished[item.path][2] for item in sources]
        return {**_report(self.header["params"], self.header["fingerprint"],
                          Listing([], [], {}), rows, entries), "shard": str(self.shard),
                "folder": str(self.folder), "rows": rows}

    def remove(self) -> None:
        shutil.rmtree(self.folder)
        with contextlib.suppress(OSError):  # the last part out removes parts/
            self.folder.parent.rmdir()


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
    with open(resolve(faces_dir) / files.FACES, newline="") as f:
        return {row["path"]: {**row, "frame": int(row["frame"]), "score": float(row["score"]),
                              "box": json.loads(row["box"]),
                              "landmarks": np.array(json.loads(row["landmarks"]))}
                for row in csv.DictReader(f)}


def summary_rows(report: dict) -> list[dict]:
    """Per class: sources, frames read, faces found and the share of frames with a face."""
    rows = []
    for label in CLASSES:
        entries = [e for e in report["sources"] if e["label"] == label]
        frames = sum(e.get("frames_read", 0) for e in entries)
        found = sum(e.get("faces_found", 0) for e in entries)
        rows.append({"class": label, "sources": len(entries), "frames read": frames,
                     "faces found": found, "found": f"{found / frames:.1%}" if frames else "-"})
    return rows


def problem_rows(report: dict) -> list[dict]:
    """Sources that could not be read, gave no face, were skipped or missing (a data set's
    list names them), or were shorter than frames_per_video, with the reason."""
    rows = [{"source": e["source"], "why": e["reason"]} for e in report["unreadable"]]
    rows += [{"source": e["source"], "why": "no face in any frame read"}
             for e in report["sources"] if "reason" not in e and e["faces_found"] == 0]
    rows += [{"source": e["source"], "why": e["short"]} for e in report["sources"] if "short" in e]
    return rows + [{"source": e["source"], "why": e["reason"]} for e in report["skipped"]]


def sample_crops(faces_dir: str | os.PathLike, n: int, seed: int = 0
                 ) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(crop, landmarks, title) for n random crops of faces_dir, both classes in turn."""
    faces_dir = resolve(faces_dir)
    table = read_faces(faces_dir)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in CLASSES:
        paths = sorted(p for p, row in table.items() if row["label"] == label)
        chosen += [paths[i] for i in rng.choice(len(paths), min(n // 2, len(paths)),
                                                replace=False)]
    return [(np.asarray(load_image(faces_dir / p)), table[p]["landmarks"],
             f"{table[p]['label']} · frame {table[p]['frame']}\n{Path(p).parent.name[:24]}")
            for p in chosen]
