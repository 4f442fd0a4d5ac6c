"""Using a trained run: score new images and clips (`predict_run`), and evaluate on a
labelled folder or a split's val or test images (`evaluate_folder`) with robustness sweeps
(JPEG, blur, downscaling) and calibration."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset

from dfutils import LABELS, archs, files, shards
from dfutils.data import ImageLoadError, eval_transform, load_image, read_manifest
from dfutils.distributed import device as default_device
from dfutils.folders import IMAGE_SUFFIXES, VIDEO_SUFFIXES, scan_classes
from dfutils.metrics import (
    binary_metrics,
    by_group,
    calibration_bins,
    expected_calibration_error,
    grouped,
    with_intervals,
)
from dfutils.model import Checkpoint, for_inference, forward, load_checkpoint, threshold_text
from dfutils.params import Amp, EvalParams, PredictParams
from dfutils.paths import (
    atomic_path,
    file_problem,
    fingerprint,
    is_plain_name,
    resolve,
    write_csv,
    write_json,
)
from dfutils.progress import tqdm
from dfutils.split import check_identity, source_folder

Perturb = Callable[[Image.Image], Image.Image]
SWEEPS: dict[str, tuple] = {
    "jpeg": (100, 90, 75, 50, 30),  # re-encoding quality
    "blur": (0, 1, 2, 3),  # Gaussian sigma, pixels
    "downscale": (1, 0.5, 0.25),  # scale factor, resized back to the original size
}


def jpeg(quality: int) -> Perturb:
    """Re-encode as JPEG at `quality` (in memory)."""
    def apply(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(quality))
        return Image.open(buffer).convert("RGB")
    return apply


def blur(sigma: float) -> Perturb:
    """Gaussian blur with standard deviation `sigma` pixels (0: unchanged)."""
    return (lambda image: image) if sigma == 0 else (
        lambda image: image.filter(ImageFilter.GaussianBlur(radius=sigma)))


def downscale(factor: float) -> Perturb:
    """Shrink by `factor` and resize back: the detail a small upload or a thumbnail loses."""
    def apply(image: Image.Image) -> Image.Image:
        if factor == 1:
            return image
        w, h = image.size
        small = image.resize((max(1, round(w * factor)), max(1, round(h * factor))),
                             Image.Resampling.BICUBIC)
        return small.resize((w, h), Image.Resampling.BILINEAR)
    return apply


PERTURBATIONS: dict[str, Callable[[float], Perturb]] = {"jpeg": jpeg, "blur": blur,
                                                        "downscale": downscale}


class FileDataset(Dataset):
    """(tensor, index, error) per file; an unreadable file gives an error, not an exception."""

    def __init__(self, files: Sequence[Path], image_size: int, perturb: Perturb | None = None,
                 arch: str = archs.DEFAULT):
        self.files, self.image_size = list(files), image_size
        self.transform, self.perturb = eval_transform(image_size, arch), perturb

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = load_image(self.files[index])
        except ImageLoadError as error:
            return torch.zeros(3, self.image_size, self.image_size), index, error.reason
        if self.perturb is not None:
            image = self.perturb(image)
        return self.transform(image), index, ""


def score_files(model: torch.nn.Module, files: Sequence[Path], image_size: int,
                batch_size: int = 32, num_workers: int = 0, perturb: Perturb | None = None,
                device: torch.device | None = None, desc: str = "scoring",
                arch: str = archs.DEFAULT, amp: Amp = "off") -> tuple[np.ndarray, list[str]]:
    """P(fake) per file (NaN where unreadable) and the error of each file ("" when scored)."""
    device = device or default_device()
    for_inference(model, device)
    loader = DataLoader(FileDataset(files, image_size, perturb, arch), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    scores, errors = np.full(len(files), np.nan), [""] * len(files)
    with torch.inference_mode():
        for images, indices, batch_errors in tqdm(loader, desc=desc, unit="batch",
                                                  leave=False):
            p_fake = forward(model, images, device, amp)[1].cpu().numpy()
            for i, p, error in zip(indices.tolist(), p_fake, batch_errors, strict=True):
                if error:
                    errors[i] = error
                else:
                    scores[i] = p
    return scores, errors


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


def predict(run: str | os.PathLike | Checkpoint, inputs: Sequence[Input], batch_size: int = 32,
            num_workers: int = 0, amp: Amp = "off") -> tuple[list[dict], Checkpoint]:
    """Rows of (path, p_fake, label, status) for every input, scored as they are, and the
    checkpoint used (`run`: a run folder or a loaded checkpoint)."""
    checkpoint = run if isinstance(run, Checkpoint) else load_checkpoint(
        resolve(run) / files.MODEL)
    clip = ("a video clip: scored as images here, so drop --no-faces to crop and score its "
            "faces as this run's training images were" if checkpoint.faces is not None else
            "a video clip: this run was trained on images, not on face crops (FACES=1), "
            "and scores images only")
    inputs = [dataclasses.replace(i, problem=clip) if not i.problem and i.path.suffix.lower()
              in VIDEO_SUFFIXES else i for i in inputs]
    readable = [i for i in inputs if not i.problem]
    scores, errors = score_files(checkpoint.model, [i.path for i in readable],
                                 checkpoint.image_size, batch_size, num_workers,
                                 arch=checkpoint.params.arch, amp=amp)
    scored = {i.path: (p, e) for i, p, e in zip(readable, scores, errors, strict=True)}
    rows = []
    for item in inputs:
        p, error = scored.get(item.path, (np.nan, item.problem))
        rows.append({"path": str(item.path), "p_fake": "" if error else f"{p:.6f}",
                     "label": "" if error else ("fake" if p >= checkpoint.threshold else "real"),
                     "status": f"error: {error}" if error else "ok"})
    return rows, checkpoint


def score_arrays(checkpoint: Checkpoint, images: Sequence[np.ndarray], batch_size: int = 32,
                 device: torch.device | None = None, amp: Amp = "off") -> np.ndarray:
    """P(fake) of RGB arrays (face crops), under the evaluation transform."""
    device = device or default_device()
    model = for_inference(checkpoint.model, device)
    transform, scores = eval_transform(checkpoint.image_size, checkpoint.params.arch), []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image) for image in images[start:start + batch_size]])
        with torch.inference_mode():
            scores.append(forward(model, batch, device, amp)[1].cpu())
    return torch.cat(scores).numpy() if scores else np.zeros(0)


def predict_faces(checkpoint: Checkpoint, inputs: Sequence[Input], batch_size: int = 32,
                  cam_dir: Path | None = None, layer: str = "auto", amp: Amp = "off"
                  ) -> tuple[list[dict], list[dict]]:
    """Photos and clips scored the way the run's training images were made: frames sampled,
    the face found and cropped with the recorded parameters, each crop scored; an input's
    P(fake) is the mean over its crops. One row per input, and one per frame scored. With
    `cam_dir`, each crop's Grad-CAM overlay is written there as <name>.<frame>.cam.png
    (never over an existing file)."""
    from dfutils.faces import FaceFinder, FacesError, faces_of, params_of

    params = params_of(checkpoint.faces)
    finder = FaceFinder(params)
    rows, frames = [], []
    for item in tqdm(inputs, desc="faces", unit="file"):
        row = {"path": str(item.path), "p_fake": "", "label": "", "n_frames": 0, "n_faces": 0}
        if item.problem:
            rows.append({**row, "status": f"error: {item.problem}"})
            continue
        try:
            found, row["n_frames"], _ = faces_of(item.path, finder, params.frames_per_video)
        except (FacesError, ImageLoadError) as error:
            rows.append({**row, "status": f"error: {getattr(error, 'reason', None) or error}"})
            continue
        if not found:
            rows.append({**row, "status": "error: no face found in the frames read"})
            continue
        scores = score_arrays(checkpoint, [face.crop for _, face in found], batch_size,
                              amp=amp)
        p = float(scores.mean())
        rows.append({**row, "p_fake": f"{p:.6f}", "n_faces": len(found), "status": "ok",
                     "label": "fake" if p >= checkpoint.threshold else "real"})
        frames += [{"path": str(item.path), "frame": index, "p_fake": f"{score:.6f}",
                    "box": list(face.box)}
                   for (index, face), score in zip(found, scores, strict=True)]
        if cam_dir is not None:
            from dfutils.gradcam import write_overlays

            write_overlays(checkpoint, [face.crop for _, face in found],
                           [cam_dir / f"{item.name}.{index:06d}.cam.png" for index, _ in found],
                           layer=layer, batch_size=batch_size, replace=False)
    return rows, frames


def labelled_files(data_dir: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[dict]]:
    """Images under DIR/real and DIR/fake with labels (fake = 1), and files skipped by type."""
    root = resolve(data_dir)
    candidates, skipped = scan_classes(root, IMAGE_SUFFIXES, "images", need_each=True)
    return ([root / rel for rel, _ in candidates],
            np.array([LABELS[label] for _, label in candidates]), skipped)


def _faces_params(checkpoint: Checkpoint, data_dir: str | os.PathLike, out: Path):
    """The faces step's parameters for a labelled folder: the run's, into `out`."""
    import dataclasses

    from dfutils import faces

    return dataclasses.replace(faces.params_of(checkpoint.faces), overwrite=True,
                               raw_dir=str(resolve(data_dir)), faces_dir=str(out),
                               dataset="folder", methods="")  # a labelled folder


def face_crops(checkpoint: Checkpoint, data_dir: str | os.PathLike, out: Path,
               shard: shards.Shard | None = None) -> Labelled:
    """Crop the faces of a labelled folder of photos and clips into `out` the way the run's
    training images were made (with a `shard`, only its sources, into its part): the crops,
    their labels, their source (a clip's crops share one) and what was skipped or
    unreadable; each crop's key is its path in `out`."""
    from dfutils import faces

    report = faces.extract_faces(_faces_params(checkpoint, data_dir, out), shard=shard)
    if "shard" in report:  # this task's part
        folder, table = Path(report["folder"]), {r["path"]: r for r in report["rows"]}
    else:
        folder = out
        table = {path: row for path, row in faces.read_faces(out).items()
                 if shard is None or shard.owns(row["source"])}
    return Labelled([folder / path for path in table],
                    np.array([LABELS[r["label"]] for r in table.values()]),
                    [r["source"] for r in table.values()],
                    [{"path": e["source"], "reason": e["reason"]}
                     for e in report["skipped"] + report["unreadable"]], list(table),
                    [source_folder(r["source"]) for r in table.values()])


def report_name(params: EvalParams) -> str:
    """The name of an evaluation report: as given, or the folder's (and the split's, and
    "self-blends" when the split's fakes are its reals' self-blends)."""
    folder = resolve(params.eval_dir).name
    blends = "-self-blends" if params.self_blends else ""
    return params.name or (f"{folder}-{params.split}{blends}" if params.split else folder)


@dataclass
class Labelled:
    """What evaluate scores: image files, their labels, the video each belongs to, and what
    was skipped on the way; each file's key names it alike in every task of a sharded job,
    and its source is the folder below real/ or fake/ it came from ("" when none)."""

    files: list[Path]
    labels: np.ndarray
    videos: list[str]
    skipped: list[dict]
    keys: list[str] = dataclasses.field(default_factory=list)
    sources: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = self.keys or [str(f) for f in self.files]
        self.sources = self.sources or [""] * len(self.files)

    def subset(self, shard: shards.Shard | None) -> Labelled:
        """The files a shard owns (by key)."""
        if shard is None:
            return self
        mine = [i for i, key in enumerate(self.keys) if shard.owns(key)]
        return Labelled([self.files[i] for i in mine], self.labels[mine],
                        [self.videos[i] for i in mine], self.skipped,
                        [self.keys[i] for i in mine], [self.sources[i] for i in mine])


def labelled_inputs(params: EvalParams, checkpoint: Checkpoint, out: Path,
                    shard: shards.Shard | None = None) -> Labelled:
    """The images of eval_dir: a split's val or test rows (`params.split`; with
    `params.self_blends`, its reals and their self-blends), the crops of a folder of photos
    and clips made as the run's training images were, or the images of a labelled folder (a
    subfolder below a class folder is one clip's frames); with a `shard`, those it owns."""
    root = resolve(params.eval_dir)
    if params.split:
        samples = read_manifest(root, params.split)
        if not samples:
            raise ValueError(f"the split in {root} has no {params.split} images: evaluate "
                             "another split, or a labelled folder (without split)")
        if params.self_blends:
            return self_blend_inputs(root, params.split, out / files.EVAL_BLENDS, shard)
        return Labelled([s.path for s in samples], np.array([s.label for s in samples]),
                        [s.video for s in samples], [], [],
                        [source_folder(s.source) for s in samples]).subset(shard)
    if checkpoint.faces is not None and params.faces:
        return face_crops(checkpoint, root, out / files.EVAL_FACES, shard)
    paths, labels, skipped = labelled_files(root)
    videos = [f.parent.relative_to(root).as_posix() if len(f.relative_to(root).parts) > 2
              else str(f) for f in paths]
    return Labelled(paths, labels, videos, skipped, [],
                    [source_folder(f.relative_to(root).as_posix()) for f in paths]
                    ).subset(shard)


def self_blend_inputs(data_dir: Path, split: str, out: Path,
                      shard: shards.Shard | None = None) -> Labelled:
    """The reals of a split that have a face, and one self-blend of each written to `out`
    as PNG: the blends training with fakes="sbi" validates on (`sbi.ValidationBlends`,
    the same in every run on the split), so any run can be scored on them. The blends of
    a clip's frames make a video of their own; a blend's source is its real's. With a
    `shard`, those it owns (and only their blends are written)."""
    from dfutils import sbi

    blends, counts = sbi.validation_blends(data_dir, split=split)
    reals = blends.samples
    if not reals:
        raise ValueError(f"none of the {counts['reals']} {split} reals of {data_dir} has a "
                         "face to self-blend: self-blends need the faces step's crops")
    kept = {r.path for r in reals}
    skipped = [{"path": s.path.relative_to(data_dir).as_posix(),
                "reason": "no face landmarks: no self-blend"}
               for s in read_manifest(data_dir, split) if s.label == 0 and s.path not in kept]
    made = [out / f"{r.path.relative_to(data_dir).as_posix()}.png" for r in reals]
    for i, target in enumerate(tqdm(made, desc="self-blends", unit="image")):
        if shard is None or shard.owns(str(target)):
            with atomic_path(target) as tmp:
                Image.fromarray(blends.image(len(reals) + i)[0]).save(tmp, format="PNG")
    return Labelled([r.path for r in reals] + made,
                    np.array([0] * len(reals) + [1] * len(made)),
                    [r.video for r in reals] + [f"self-blend:{r.video}" for r in reals],
                    skipped, [], [source_folder(r.source) for r in reals] * 2).subset(shard)


def score_sweeps(checkpoint: Checkpoint, inputs: Labelled, params: EvalParams,
                 sweeps: dict[str, Sequence]) -> tuple[np.ndarray, list[str], dict]:
    """P(fake) of every file as it is, each file's error ("" when read), and P(fake) at
    each level of each perturbation ({kind: {level: scores}}; in memory)."""
    def scores(perturb: Perturb | None, desc: str) -> tuple[np.ndarray, list[str]]:
        return score_files(checkpoint.model, inputs.files, checkpoint.image_size,
                           params.batch_size, params.num_workers, perturb, desc=desc,
                           arch=checkpoint.params.arch, amp=params.amp)

    clean, errors = scores(None, "clean")
    swept = {kind: {level: clean if (kind, level) in (("blur", 0), ("downscale", 1))
                    else scores(PERTURBATIONS[kind](level), f"{kind} {level}")[0]
                    for level in levels} for kind, levels in sweeps.items()}
    return clean, errors, swept


def evaluate_folder(params: EvalParams, sweeps: dict[str, Sequence] = SWEEPS,
                    shard: shards.Shard | None = None) -> tuple[dict, dict]:
    """Metrics at the run's threshold, robustness sweeps and calibration on a labelled folder
    or on a split's val or test images.

    Writes runs/<run>/eval/<name>/report.json and figures; returns the report and figures.
    The source images are only read: every perturbation happens in memory. When the run was
    trained on face crops (and `params.faces`), a folder's photos and clips are cropped the
    same way first (into the report's folder, faces/), and the report adds video-level
    metrics; so it does for a folder of images in one subfolder per clip, and for a split
    whose images belong to clips.

    With a `shard`, only the files it owns are scored (every perturbation too) into a part,
    <report folder>/parts/<i>-of-<n>.json, and ({}, {}) is returned; `merge_evaluation`
    writes the report from every part, computed over all the scores as one run would.
    """
    run_dir, name = resolve(params.run_dir), report_name(params)
    eval_dir = resolve(params.eval_dir).resolve()
    if eval_dir == run_dir.resolve() or run_dir.resolve() in eval_dir.parents:
        raise ValueError(f"the data to evaluate, {eval_dir}, is inside the run folder {run_dir}: "
                         "give a folder with real/ and fake/ (or a split made by 01-split) "
                         "outside the run")
    if not is_plain_name(name):
        raise ValueError(f"report name {name!r} must be a plain name (letters, digits, '.', "
                         "'_' or '-'): it becomes a folder under <run>/eval/; give name=")
    checkpoint = load_checkpoint(run_dir / files.MODEL)
    if params.split:
        check_identity(checkpoint.split, params.eval_dir, checkpoint.path,
                       f"evaluate on its {params.split} split")
    out = files.eval_folder(run_dir, name)
    inputs = labelled_inputs(params, checkpoint, out, shard)
    clean, errors, swept = score_sweeps(checkpoint, inputs, params, sweeps)
    if shard is None:
        return _evaluation(params, checkpoint, inputs, clean, errors, swept, name, out)
    shards.write_part(out / files.EVAL_PARTS, shard, {
        "params": params.to_dict() | {"sweeps": {k: list(v) for k, v in sweeps.items()}},
        "inputs": {"model": fingerprint(run_dir, [files.MODEL])},
        "keys": inputs.keys, "errors": errors, "clean": clean.tolist(),
        "swept": {kind: [levels[level].tolist() for level in sweeps[kind]]
                  for kind, levels in swept.items()}})
    return {}, {}


def merge_evaluation(run_dir: str | os.PathLike, name: str) -> tuple[dict, dict]:
    """The report of a sharded evaluate (<run>/eval/<name>/) from every part: the faces
    merged first when the tasks cropped them, then the metrics, intervals and figures over
    all the scores, as one run computes them; the parts go once the report is written."""
    run_dir = resolve(run_dir)
    out = files.eval_folder(run_dir, name)
    parts = shards.read_parts(out / files.EVAL_PARTS, "--shard")
    recorded = dict(parts[0]["params"])
    sweeps = recorded.pop("sweeps")
    params = EvalParams.from_mapping(recorded)
    if parts[0]["inputs"]["model"] != fingerprint(run_dir, [files.MODEL]):
        raise ValueError(f"{run_dir / files.MODEL} changed since the tasks scored with it: run "
                         "every task again")
    checkpoint = load_checkpoint(run_dir / files.MODEL)
    if checkpoint.faces is not None and params.faces and not params.split:
        from dfutils import faces

        faces.merge_faces(_faces_params(checkpoint, params.eval_dir, out / files.EVAL_FACES))
    inputs = labelled_inputs(params, checkpoint, out)
    where = {key: (part, i) for part in parts for i, key in enumerate(part["keys"])}
    if sorted(where) != sorted(inputs.keys):
        raise ValueError(f"the parts in {out / files.EVAL_PARTS} do not cover the "
                         f"{len(inputs.keys)} images of {params.eval_dir} once each: run every "
                         "task again")
    at = [where[key] for key in inputs.keys]

    def gathered(get: Callable[[dict], list]) -> np.ndarray:
        return np.array([get(part)[i] for part, i in at], dtype=float)

    clean = gathered(lambda part: part["clean"])
    errors = [part["errors"][i] for part, i in at]
    swept = {kind: {level: gathered(lambda part, k=kind, j=j: part["swept"][k][j])
                    for j, level in enumerate(levels)} for kind, levels in sweeps.items()}
    result = _evaluation(params, checkpoint, inputs, clean, errors, swept, name, out)
    shards.remove_parts(out / files.EVAL_PARTS, parts)
    return result


def scored(labels: np.ndarray, scores: np.ndarray, videos: np.ndarray, threshold: float,
           n_resamples: int) -> dict:
    """Metrics with 95% bootstrap intervals (whole clips resampled when images belong to
    clips), and then the same per video (its frames' mean P(fake)) under "video"."""
    clusters = videos if grouped(videos) else None
    metrics = with_intervals(binary_metrics(labels, scores, threshold), labels, scores,
                             clusters, n_resamples)
    if clusters is not None:
        _, label, mean = by_group(videos, labels, scores)
        metrics["video"] = with_intervals(binary_metrics(label, mean, threshold), label, mean,
                                          None, n_resamples)
    return metrics


def by_source(sources: np.ndarray, labels: np.ndarray, scores: np.ndarray,
              videos: np.ndarray, threshold: float, n_resamples: int) -> dict[str, dict]:
    """Per source folder (one data set of a combined split): `scored` on its fakes against
    its reals, or why not ({"n", "why"}) when it holds one class only."""
    found = {}
    for name in sorted(set(sources.tolist()) - {""}):
        at = sources == name
        missing = [label for label, value in LABELS.items() if not (labels[at] == value).any()]
        found[name] = ({"n": int(at.sum()), "why": f"no {missing[0]} image from {name}"}
                       if missing else
                       scored(labels[at], scores[at], videos[at], threshold, n_resamples))
    return found


def source_table(report: dict) -> list[dict]:
    """The report's `by_source` as rows to show: per source, its images' AUC and AP and,
    when its images belong to clips, its videos' AUC, each with its 95% interval."""
    from dfutils.metrics import shown

    rows = []
    for name, found in report.get("by_source", {}).items():
        row = {"source": name, "images": found["n"]}
        if "why" in found:
            rows.append(row | {"AUC": f"not scored: {found['why']}"})
            continue
        row |= {"AUC": shown(found["auc"], found["ci"]["auc"]),
                "AP": shown(found["ap"], found["ci"]["ap"])}
        video = found.get("video")
        if video:
            row |= {"videos": video["n"], "video AUC": shown(video["auc"], video["ci"]["auc"])}
        rows.append(row)
    return rows


def _evaluation(params: EvalParams, checkpoint: Checkpoint, inputs: Labelled,
                clean: np.ndarray, errors: list[str], swept: dict, name: str, out: Path
                ) -> tuple[dict, dict]:
    """The report and figures from the scores of every file (`score_sweeps`), written."""
    from dfutils import viz

    scores = clean
    ok = np.array([not e for e in errors], dtype=bool)  # typed: no crop at all is possible
    labels, threshold = np.asarray(inputs.labels, dtype=int), checkpoint.threshold
    for label, value in LABELS.items():
        if not (ok & (labels == value)).any():
            why = next((f" (first: {f}: {e})" for f, e, y
                        in zip(inputs.files, errors, labels, strict=True) if e and y == value), "")
            raise ValueError(f"no {label} image of {resolve(params.eval_dir)} could be read"
                             f"{why}: AUC, AP and EER need both classes")
    videos = np.asarray(inputs.videos)[ok]
    metrics = scored(labels[ok], scores[ok], videos, threshold, params.n_bootstrap)
    sweep_metrics = {}
    for kind, levels in swept.items():
        sweep_metrics[kind] = []
        for level, at_level in levels.items():
            m = binary_metrics(labels[ok], at_level[ok], threshold)
            sweep_metrics[kind].append({"level": level, "auc": m["auc"], "ap": m["ap"],
                                        "accuracy": m["accuracy"], "eer": m["eer"]})
    report = {
        "run": str(resolve(params.run_dir)), "data": str(resolve(params.eval_dir)),
        "split": params.split, "self_blends": params.self_blends, "name": name,
        "threshold": threshold,
        "threshold_rule": checkpoint.threshold_rule,
        "n_images": int(ok.sum()),
        "unreadable": [{"path": str(f), "reason": e}
                       for f, e in zip(inputs.files, errors, strict=True) if e],
        "skipped": inputs.skipped,
        "metrics": metrics,
        **({"by_source": by_source(np.asarray(inputs.sources)[ok], labels[ok], scores[ok],
                                   videos, threshold, params.n_bootstrap)}
           if params.by_source else {}),
        "calibration": {"ece": expected_calibration_error(labels[ok], scores[ok], 15),
                        "bins": calibration_bins(labels[ok], scores[ok], 15)},
        "sweeps": sweep_metrics,
    }
    figures = dict(zip(files.EVAL_FIGURES, (
        viz.plot_roc(labels[ok], scores[ok], title=f"ROC ({name})", groups=videos),
        viz.plot_confusion(metrics["confusion"], threshold),
        viz.plot_sweeps(report["sweeps"]),
        viz.plot_reliability(report["calibration"])), strict=True))
    for file, fig in figures.items():
        viz.save_figure(fig, out / file)
    write_json(out / files.EVAL_REPORT, report)
    return report, figures


# The columns of predict's CSV: one row per input; with face cropping, frames and faces
# per input, and (--frames-out) one row per frame scored.
PREDICTION_FIELDS = ["path", "p_fake", "label", "status"]
FACE_FIELDS = ["path", "p_fake", "label", "n_frames", "n_faces", "status"]
FRAME_FIELDS = ["path", "frame", "p_fake", "box"]


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
    import glob

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
    for option, target in (("--out", params.out), ("--cam-dir", params.cam_dir),
                           ("--frames-out", params.frames_out)):
        if not target:
            continue
        where = Path(target).resolve()
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


def predict_run(params: PredictParams, log: Callable[[str], None] = lambda line: None,
                shard: shards.Shard | None = None) -> Predictions:
    """The `predict` command: check every output first, score the inputs (cropped as the run's
    training images were, when it was trained on face crops), write the CSVs and overlays
    asked for. Paths in `params` are as the user gave them (relative to the working
    directory). `log` hears the decision rule (and the cropping) before scoring starts.

    With a `shard` only the inputs it owns are scored, and the rows go to a part beside
    --out (`parts_of`) instead of --out; `merge_predictions` writes --out (and --frames-out)
    from every part as one run would have. Overlays go to --cam-dir from each task.
    """
    inputs = collect_files(params.paths)
    if shard is not None and not params.out:
        raise ValueError("--shard writes its part beside --out: give --out, the CSV that "
                         "`dfutils merge predict` writes from the parts")
    mine = [i for i, item in enumerate(inputs) if shard is None or shard.owns(str(item.path))]
    check_outputs(params, [inputs[i] for i in mine])
    if shard is not None:
        shards.check_part(parts_of(params.out), shard)
    checkpoint = load_checkpoint(Path(params.run_dir) / files.MODEL)
    with_faces = checkpoint.faces is not None and params.faces
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
        rows, _ = predict(checkpoint, scoring, params.batch_size, params.num_workers,
                          params.amp)
        result, frames = Predictions(rows, PREDICTION_FIELDS), []
    if shard is not None:
        per_input, start = [], 0  # each input's frame rows: as many as the faces it scored
        for row in rows:
            per_input.append(frames[start:start + int(row.get("n_faces") or 0)])
            start += len(per_input[-1])
        absolute = {name: str(Path(value).absolute()) if value else "" for name, value in (
            ("run_dir", params.run_dir), ("cam_dir", params.cam_dir),
            ("frames_out", params.frames_out))}
        shards.write_part(parts_of(params.out), shard, {
            "params": {**absolute, "paths": [str(Path(p).absolute()) for p in params.paths],
                       "faces": with_faces, "layer": params.layer, "amp": params.amp,
                       "fields": result.fields},
            "inputs": {"files": fingerprint(Path("/"), [str(i.path.absolute())
                                                        for i in inputs]),
                       "n_files": len(inputs), "model": fingerprint(
                           Path(params.run_dir).absolute(), [files.MODEL])},
            "indices": mine, "rows": rows, "frames": per_input})
    else:
        if params.frames_out:
            write_csv(params.frames_out, frames, FRAME_FIELDS)
        if params.out:
            write_csv(params.out, rows, result.fields)
    scored = [item for item, row in zip(scoring, rows, strict=True) if row["status"] == "ok"]
    if cam_dir is not None and scored and not with_faces:  # (with faces: written per crop)
        from dfutils.gradcam import write_overlays

        write_overlays(checkpoint, [i.path for i in scored],
                       [cam_dir / cam_name(i.name) for i in scored], layer=params.layer,
                       batch_size=params.batch_size, replace=False)
    return result


def parts_of(out: str | os.PathLike) -> Path:
    """Where the tasks of a sharded predict put their parts: beside --out, <out>.parts/."""
    return Path(f"{out}.parts")


def merge_predictions(out: str | os.PathLike) -> Predictions:
    """--out (and the --frames-out the tasks were given) from every part of a sharded
    predict, row for row as one run writes them; the parts go once both are written."""
    folder = parts_of(out)
    parts = shards.read_parts(folder, "--shard")
    first = parts[0]
    by_index = {i: (row, frames) for part in parts
                for i, row, frames in zip(part["indices"], part["rows"], part["frames"],
                                          strict=True)}
    n_files = first["inputs"]["n_files"]
    if sorted(by_index) != list(range(n_files)):
        raise ValueError(f"the parts in {folder} do not cover the {n_files} inputs once each: "
                         "run every task again")
    fields, frames_out = first["params"]["fields"], first["params"]["frames_out"]
    for target, headers in ((out, (fields,)), (frames_out, (FRAME_FIELDS,))):
        if target and not _written_by_predict(target, headers):
            raise ValueError(f"{target} exists and is not a CSV that predict wrote: "
                             "move it, then merge again")
    rows = [by_index[i][0] for i in range(n_files)]
    if frames_out:
        write_csv(frames_out, [f for i in range(n_files) for f in by_index[i][1]], FRAME_FIELDS)
    write_csv(out, rows, fields)
    shards.remove_parts(folder, parts)
    return Predictions(rows, fields)
