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

import csv
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dfutils import CLASSES, datasets, files
from dfutils.data import ImageLoadError, load_image
from dfutils.datasets import Item, Listing
from dfutils.folders import VIDEO_SUFFIXES, OwnedFolder
from dfutils.params import FacesParams
from dfutils.paths import fingerprint, resolve, write_json
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

        self.params = params
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks68 = dlib.shape_predictor(str(model_file(
            "shape_predictor_68_face_landmarks.dat")))
        self.landmarks5 = (dlib.shape_predictor(str(model_file(
            "shape_predictor_5_face_landmarks.dat"))) if params.align else None)

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


def read_frames(path: Path, k: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame) for k evenly spaced frames of a clip; FacesError if unreadable.

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
        wanted = sample_indices(n_frames, k)
        last, index = wanted[-1], 0
        chosen = set(wanted)
        while index <= last and capture.grab():
            if index in chosen:
                ok, frame = capture.retrieve()
                if ok:
                    yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()


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
    return listing


def crop_stem(item: Item, dataset: str) -> Path:
    """Where a source's crops go, without suffix: <label>/<its path below the class folder>
    for real/ + fake/, <label>/<its path> for a data set."""
    parts = Path(item.path).with_suffix("").parts
    return Path(item.label, *(parts[1:] if dataset == "folder" else parts))


_FINDER: FaceFinder | None = None  # one per worker process: dlib's models do not pickle


def _finder(params: FacesParams) -> FaceFinder:
    global _FINDER
    if _FINDER is None or _FINDER.params != params:
        _FINDER = FaceFinder(params)
    return _FINDER


def faces_of(path: Path, finder: FaceFinder, frames_per_video: int
             ) -> tuple[list[tuple[int, Face]], int]:
    """The faces of one photo or clip as (frame index, face), and the frames read (a photo
    is frame 0). FacesError or ImageLoadError when the file cannot be read."""
    if path.suffix.lower() in VIDEO_SUFFIXES:
        frames = read_frames(path, frames_per_video)
    else:
        frames = iter([(0, np.asarray(load_image(path)))])
    found, n_frames = [], 0
    for index, rgb in frames:
        n_frames += 1
        face = finder(rgb)
        if face is not None:
            found.append((index, face))
    return found, n_frames


def extract_source(raw_dir: Path, out: Path, params: FacesParams, item: Item
                   ) -> tuple[list[dict], dict]:
    """Crop the faces of one photo or clip into `out`; its faces.csv rows and report entry.

    A clip's crops go to <stem>/<frame:06d>.png (one folder per clip, the group the split
    keeps together), a photo's to <stem>.png (`crop_stem`).
    """
    video = Path(item.path).suffix.lower() in VIDEO_SUFFIXES
    carried = {"group": item.group, "split": item.split, "method": item.method}
    entry: dict = {"source": item.path, "label": item.label,
                   "kind": "video" if video else "photo", **carried}
    try:
        found, n_frames = faces_of(raw_dir / item.path, _finder(params),
                                   params.frames_per_video)
    except (FacesError, ImageLoadError) as error:
        return [], {**entry, "reason": getattr(error, "reason", None) or str(error)}
    stem, rows = crop_stem(item, params.dataset), []
    for index, face in found:
        crop = stem / f"{index:06d}.png" if video else stem.with_suffix(".png")
        (out / crop).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / crop), cv2.cvtColor(face.crop, cv2.COLOR_RGB2BGR))
        rows.append({"path": crop.as_posix(), "label": item.label, "source": item.path,
                     "frame": index, "box": json.dumps(face.box), "score": round(face.score, 4),
                     "landmarks": json.dumps(np.round(face.landmarks, 2).tolist()), **carried})
    entry.update(frames_read=n_frames, faces_found=len(rows))
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


def extract_faces(params: FacesParams, workers: int | None = None) -> dict:
    """Run the faces step; return its report. Same inputs and parameters: nothing is redone.

    Sources are spread over worker processes (one source at a time each); a source that
    cannot be read, or a frame without a face, is counted in the report, never fatal.
    """
    raw_dir, faces_dir = resolve(params.raw_dir).resolve(), resolve(params.faces_dir).resolve()
    if faces_dir == raw_dir or raw_dir in faces_dir.parents or faces_dir in raw_dir.parents:
        raise FacesError(f"faces_dir {faces_dir} and raw_dir {raw_dir} must not contain each "
                         "other")
    listing = scan(raw_dir, params)
    sources = listing.items
    settings = recorded(params, raw_dir)
    stamp = hashlib.sha256((fingerprint(raw_dir, [item.path for item in sources]) + json.dumps(
        [(i.label, i.group, i.split, i.method) for i in sources])).encode()).hexdigest()
    existing = FOLDER.current(faces_dir, settings, stamp, params.overwrite)
    if existing is not None:
        return existing
    model_file("shape_predictor_68_face_landmarks.dat")  # a missing install fails here, once
    with FOLDER.build(faces_dir) as built:
        one = functools.partial(extract_source, raw_dir, built, params)
        workers = workers or min(len(sources), os.cpu_count() or 1) or 1
        bar = functools.partial(tqdm, total=len(sources), desc="faces", unit="source")
        if workers == 1:
            results = list(bar(map(one, sources)))
        else:
            with ProcessPoolExecutor(workers) as pool:
                results = list(bar(pool.map(one, sources)))
        rows = [row for source_rows, _ in results for row in source_rows]
        entries = [entry for _, entry in results]
        report = {
            "params": settings, "fingerprint": stamp,
            "n_sources": len(sources), "n_crops": len(rows),
            "frames_read": sum(e.get("frames_read", 0) for e in entries),
            "faces_found": sum(e.get("faces_found", 0) for e in entries),
            "sources": entries,
            "unreadable": [e for e in entries if "reason" in e],
            "short_clips": sum("short" in e for e in entries),
            "skipped": [{"source": p["path"], "reason": p["reason"]} for p in listing.problems],
            "dataset": {"name": params.dataset, "rules": listing.rules},
        }
        with open(built / files.FACES, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        write_json(built / files.FACES_REPORT, report)
    return report


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
