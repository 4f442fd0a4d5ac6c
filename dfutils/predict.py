"""Predict (`python -m dfutils predict`): P(fake) of new image files, clips and folders with a
trained run, one CSV row per file, scored by `scoring.score` as validation scores; with
face cropping when the run was trained on face crops, and Grad-CAM overlays on request.

A task of a cluster job scores the inputs it owns into a part (`shards.Part`) and
`merge_predictions` writes --out from all of them, row for row as one run writes it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfutils import shards
from dfutils.atomic import write_csv
from dfutils.cam import write_overlays
from dfutils.datasets import file_problem, is_clip
from dfutils.detect import FaceFinder, faces_of
from dfutils.detector import load_model, model_file
from dfutils.frames import UnreadableClip
from dfutils.images import ImageLoadError
from dfutils.model import Checkpoint, threshold_text
from dfutils.owned import fingerprint
from dfutils.params import Amp, CamLayer, FacesParams, PredictParams
from dfutils.progress import tqdm
from dfutils.scoring import images_for, score

# The columns of predict's CSV: one row per input; with face cropping, frames and faces
# per input, and (--frames-out) one row per frame scored.
PREDICTION_FIELDS = ["path", "p_fake", "label", "status"]
FACE_FIELDS = ["path", "p_fake", "label", "n_frames", "n_faces", "status"]
FRAME_FIELDS = ["path", "frame", "p_fake", "box"]


@dataclass(frozen=True)
class Input:
    path: Path  # as named on the command line, or found below a folder named there
    name: str  # unique among the inputs: the path below the folder named, or the file name
    problem: str  # why it cannot be read as a file ("" when it can)


def collect_files(paths: Sequence[str | os.PathLike]) -> list[Input]:
    """Files named, and every file below folders named (recursively), in a stable order.

    A path that does not exist, or is not a regular file (a FIFO, a socket), is kept with
    its problem, so it gets a row of its own instead of stopping the batch.
    """
    found: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += [(p, p.relative_to(path).as_posix()) for p in sorted(path.rglob("*"))
                      if not p.is_dir()]
        else:
            found.append((path, path.name))
    # The same name under two folders named: give the later ones a suffix no input has.
    taken, names = {name for _, name in found}, []
    for i, (_, name) in enumerate(found):
        if any(name == other for _, other in found[:i]):
            k = 2
            while f"{name}~{k}" in taken:
                k += 1
            name = f"{name}~{k}"
            taken.add(name)
        names.append(name)
    return [Input(path, name, file_problem(path)) for (path, _), name in zip(found, names,
                                                                             strict=True)]


def _row(path: Path, p: float, threshold: float, **fields) -> dict:
    return {"path": str(path), "p_fake": f"{p:.6f}",
            "label": "fake" if p >= threshold else "real", **fields}


def predict(checkpoint: Checkpoint, inputs: Sequence[Input], batch_size: int,
            num_workers: int, amp: Amp) -> list[dict]:
    """Rows of (path, p_fake, label, status) for every input, scored as it is."""
    clip = ("a video clip: scored as images here, so drop --no-faces to crop and score its "
            "faces as this run's training images were" if checkpoint.faces is not None else
            "a video clip: this run was trained on images, not on face crops (FACES=1), "
            "and scores images only")
    inputs = [dataclasses.replace(i, problem=clip) if not i.problem and is_clip(i.path) else i
              for i in inputs]
    readable = [i for i in inputs if not i.problem]
    found = score(checkpoint, images_for(checkpoint, [i.path for i in readable]),
                  batch_size=batch_size, num_workers=num_workers, amp=amp)
    scored = {i.path: (p, e) for i, p, e in zip(readable, found.p_fake, found.errors,
                                                strict=True)}
    rows = []
    for item in inputs:
        p, error = scored.get(item.path, (np.nan, item.problem))
        rows.append({"path": str(item.path), "p_fake": "", "label": "",
                     "status": f"error: {error}"} if error else
                    _row(item.path, p, checkpoint.threshold, status="ok"))
    return rows


def predict_faces(checkpoint: Checkpoint, inputs: Sequence[Input], batch_size: int,
                  cam_dir: Path | None, layer: CamLayer, amp: Amp
                  ) -> tuple[list[dict], list[dict]]:
    """Photos and clips scored the way the run's training images were made: frames sampled,
    the face found and cropped with the recorded parameters, each crop scored; an input's
    P(fake) is the mean over its crops. One row per input, and one per frame scored. With
    `cam_dir`, each crop's Grad-CAM overlay is written there as <name>.<frame>.cam.png
    (never over an existing file)."""
    params = FacesParams.from_record(checkpoint.faces)
    finder = FaceFinder(params)
    rows, frames = [], []
    for item in tqdm(inputs, desc="faces", unit="file"):
        row = {"path": str(item.path), "p_fake": "", "label": "", "n_frames": 0, "n_faces": 0}
        if item.problem:
            rows.append({**row, "status": f"error: {item.problem}"})
            continue
        try:
            found, row["n_frames"], _ = faces_of(item.path, finder, params.frames_per_video,
                                                 max_faces=params.max_faces)
        except (UnreadableClip, ImageLoadError) as error:
            rows.append({**row, "status": f"error: {error.reason}"})
            continue
        if not found:
            rows.append({**row, "status": "error: no face found in the frames read"})
            continue
        crops = [face.crop for _, face in found]
        scores = score(checkpoint, images_for(checkpoint, crops), batch_size=batch_size,
                       amp=amp, desc="crops").p_fake
        p = float(scores.mean())
        rows.append(_row(item.path, p, checkpoint.threshold, n_frames=row["n_frames"],
                         n_faces=len(found), status="ok"))
        frames += [{"path": str(item.path), "frame": index, "p_fake": f"{p_frame:.6f}",
                    "box": list(face.box)}
                   for (index, face), p_frame in zip(found, scores, strict=True)]
        if cam_dir is not None:
            write_overlays(checkpoint, crops,
                           [cam_dir / (f"{item.name}.{index:06d}" + (f"_{face.rank}" if face.rank
                                                                     else "") + ".cam.png")
                            for index, face in found],
                           layer=layer, batch_size=batch_size, replace=False)
    return rows, frames


def cam_name(name: str) -> str:
    """An input's overlay: a.png and a.jpg give a.png.cam.png and a.jpg.cam.png."""
    return f"{name}.cam.png"


def _written_by_predict(target: str | os.PathLike, headers: Sequence[Sequence[str]]) -> bool:
    """Whether `target` is absent, or a CSV with one of predict's headers (so predict may
    replace it)."""
    if not Path(target).exists():
        return True
    with open(target, newline="", errors="replace") as f:
        return f.readline().strip() in {",".join(fields) for fields in headers}


def check_outputs(params: PredictParams, inputs: Sequence[Input]) -> None:
    """Refuse, before anything is scored, outputs that could overwrite a user's file."""
    named = [(option, target, Path(target).resolve()) for option, target in (
        ("--out", params.out), ("--cam-dir", params.cam_dir),
        ("--frames-out", params.frames_out)) if target]
    input_files = {item.path.resolve() for item in inputs}
    for i, (option, target, where) in enumerate(named):
        other = next((o for o, _, w in named[:i] if w == where), None)
        if other is not None:
            raise ValueError(f"{other} and {option} both name {target}: give each output "
                             "its own path")
        if where in input_files:
            raise ValueError(f"{option} {target} is one of the inputs: choose a place "
                             "outside the inputs, so no input is overwritten")
        if option == "--cam-dir" and where.exists() and not where.is_dir():
            raise ValueError(f"--cam-dir {target} is a file: name a new or empty folder")
        if option != "--cam-dir" and where.is_dir():
            raise ValueError(f"{option} {target} is a folder: name a CSV file")
    folders = [Path(p).resolve() for p in params.paths if Path(p).is_dir()]
    for option, target, where in named:
        inside = next((f for f in folders if where == f or f in where.parents), None)
        empty_dir = option == "--cam-dir" and where.is_dir() and not any(where.iterdir())
        if inside is not None and not empty_dir:
            raise ValueError(f"{option} {target} is inside the input folder {inside}: choose a "
                             "place outside the inputs, so no input is overwritten or read back")
    for option, target, headers in (("--out", params.out, (PREDICTION_FIELDS, FACE_FIELDS)),
                                    ("--frames-out", params.frames_out, (FRAME_FIELDS,))):
        if target and not _written_by_predict(target, headers):
            raise ValueError(f"{option} {target} exists and is not a CSV that predict "
                             "wrote: choose another file name")
    if params.cam_dir:
        cam_dir = Path(params.cam_dir)  # any overlay of an input (per crop: <name>.<frame>...)
        taken = [i.name for i in inputs if (cam_dir / cam_name(i.name)).exists()
                 or any(cam_dir.glob(f"{glob.escape(i.name)}.*.cam.png"))]
        if taken:
            raise ValueError(f"--cam-dir {params.cam_dir} already holds {cam_name(taken[0])}"
                             f" (and {len(taken) - 1} more overlays): choose an empty folder")


@dataclass
class Predictions:
    """What `predict_run` scored: one row per input."""

    rows: list[dict]
    fields: list[str]  # the columns of `rows`

    @property
    def n_scored(self) -> int:
        return sum(row["status"] == "ok" for row in self.rows)


def parts_of(out: str | os.PathLike) -> Path:
    """Where the tasks of a sharded predict put their parts: beside --out, <out>.parts/."""
    return Path(f"{out}.parts")


def predict_run(params: PredictParams, log: Callable[[str], None] = lambda line: None,
                shard: shards.Shard | None = None) -> Predictions:
    """The `predict` command: check every output first, score the inputs (cropped as the run's
    training images were, when it was trained on face crops), write the CSVs and overlays
    asked for. Paths in `params` are as the user gave them (relative to the working
    directory). `log` hears the decision rule (and the cropping) before scoring starts.

    With a `shard` only the inputs it owns are scored, and the rows go to its part beside
    --out (`parts_of`) instead of --out; `merge_predictions` writes --out (and --frames-out)
    from every part as one run would have. Overlays go to --cam-dir from each task.
    """
    inputs = collect_files(params.paths)
    if shard is not None and not params.out:
        raise ValueError("--shard writes its part beside --out: give --out, the CSV that "
                         "`dfutils merge predict` writes from the parts")
    mine = [i for i, item in enumerate(inputs) if shard is None or shard.owns(str(item.path))]
    check_outputs(params, [inputs[i] for i in mine])
    checkpoint = load_model(params.run_dir, params.model_dir, params.onnx)
    with_faces = checkpoint.faces is not None and params.faces
    part = None
    if shard is not None:
        absolute = {name: str(Path(value).absolute()) if value else "" for name, value in (
            ("run_dir", params.run_dir), ("model_dir", params.model_dir),
            ("cam_dir", params.cam_dir),
            ("frames_out", params.frames_out))}
        part = shards.Part(parts_of(params.out), shard, {
            "params": {**absolute, "paths": [str(Path(p).absolute()) for p in params.paths],
                       "faces": with_faces, "layer": params.layer, "amp": params.amp,
                       "onnx": params.onnx,
                       "fields": FACE_FIELDS if with_faces else PREDICTION_FIELDS},
            "inputs": {"files": fingerprint(Path("/"), [str(i.path.absolute())
                                                        for i in inputs]),
                       "n_files": len(inputs), "model": fingerprint(
                           Path("/"), [str(model_file(params.run_dir, params.model_dir)
                                           .absolute())])}})
        part.check("give another --out")
    if params.frames_out and not with_faces:
        raise ValueError("--frames-out needs a run trained on face crops (FACES=1), without "
                         "--no-faces")
    log(threshold_text(checkpoint.threshold, checkpoint.threshold_rule))
    if with_faces:
        log(f"cropping faces as the training images were: {checkpoint.faces}")
    cam_dir = Path(params.cam_dir) if params.cam_dir else None
    scoring = [inputs[i] for i in mine]
    if with_faces:
        rows, frames = predict_faces(checkpoint, scoring, params.batch_size, cam_dir,
                                     params.layer, params.amp)
        result = Predictions(rows, FACE_FIELDS)
    else:
        rows = predict(checkpoint, scoring, params.batch_size, params.num_workers, params.amp)
        result, frames = Predictions(rows, PREDICTION_FIELDS), []
    if part is not None:
        part.start(resume=False)
        with part.writing() as add:
            start = 0  # each input's frame rows: as many as the faces it scored
            for index, row in zip(mine, rows, strict=True):
                count = int(row.get("n_faces") or 0)
                add(str(index), {"row": row, "frames": frames[start:start + count]})
                start += count
        part.finish(len(mine))
    else:
        if params.frames_out:
            write_csv(params.frames_out, frames, FRAME_FIELDS)
        if params.out:
            write_csv(params.out, rows, result.fields)
    scored = [item for item, row in zip(scoring, rows, strict=True) if row["status"] == "ok"]
    if cam_dir is not None and scored and not with_faces:  # (with faces: written per crop)
        write_overlays(checkpoint, [i.path for i in scored],
                       [cam_dir / cam_name(i.name) for i in scored], layer=params.layer,
                       batch_size=params.batch_size, replace=False)
    return result


def merge_predictions(out: str | os.PathLike) -> Predictions:
    """--out (and the --frames-out the tasks were given) from every part of a sharded
    predict, row for row as one run writes them; the parts go once both are written."""
    folder = parts_of(out)
    parts = shards.complete_parts(folder, "--shard ")
    first = parts[0].header
    lines = {int(key): line for part in parts for key, line in part.done().items()}
    n_files = first["inputs"]["n_files"]
    if sorted(lines) != list(range(n_files)):
        raise ValueError(f"the parts in {folder} do not cover the {n_files} inputs once each: "
                         "run every task again")
    fields, frames_out = first["params"]["fields"], first["params"]["frames_out"]
    for target, headers in ((out, (fields,)), (frames_out, (FRAME_FIELDS,))):
        if target and not _written_by_predict(target, headers):
            raise ValueError(f"{target} exists and is not a CSV that predict wrote: "
                             "move it, then merge again")
    rows = [lines[i]["row"] for i in range(n_files)]
    if frames_out:
        write_csv(frames_out, [f for i in range(n_files) for f in lines[i]["frames"]],
                  FRAME_FIELDS)
    write_csv(out, rows, fields)
    for part in parts:
        part.remove()
    return Predictions(rows, fields)
