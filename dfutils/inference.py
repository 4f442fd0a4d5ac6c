"""Using a trained run: score new images, and evaluate on a labelled folder with robustness
sweeps (JPEG, blur, downscaling) and calibration."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset

from dfutils import LABELS
from dfutils.data import ImageLoadError, eval_transform, load_image
from dfutils.distributed import device as default_device
from dfutils.metrics import (
    binary_metrics,
    calibration_bins,
    expected_calibration_error,
    grouped,
    video_metrics,
)
from dfutils.model import CHECKPOINT_FILE, Checkpoint, load_checkpoint
from dfutils.paths import file_problem, is_plain_name, resolve, write_json
from dfutils.progress import tqdm
from dfutils.split import scan
from dfutils.train import to_device

REPORT = "report.json"  # in eval_folder(run_dir, name), with the figures

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

    def __init__(self, files: Sequence[Path], image_size: int, perturb: Perturb | None = None):
        self.files, self.image_size = list(files), image_size
        self.transform, self.perturb = eval_transform(image_size), perturb

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


@torch.inference_mode()
def score_files(model: torch.nn.Module, files: Sequence[Path], image_size: int,
                batch_size: int = 32, num_workers: int = 0, perturb: Perturb | None = None,
                device: torch.device | None = None, desc: str = "scoring"
                ) -> tuple[np.ndarray, list[str]]:
    """P(fake) per file (NaN where unreadable) and the error of each file ("" when scored)."""
    device = device or default_device()
    model.eval().to(device, memory_format=torch.channels_last)
    loader = DataLoader(FileDataset(files, image_size, perturb), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    scores, errors = np.full(len(files), np.nan), [""] * len(files)
    for images, indices, batch_errors in tqdm(loader, desc=desc, unit="batch", leave=False):
        p_fake = torch.sigmoid(model(to_device(images, device)).reshape(-1).float()).cpu().numpy()
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
            num_workers: int = 0) -> tuple[list[dict], Checkpoint]:
    """Rows of (path, p_fake, label, status) for every input, scored as they are, and the
    checkpoint used (`run`: a run folder or a loaded checkpoint)."""
    checkpoint = run if isinstance(run, Checkpoint) else load_checkpoint(
        resolve(run) / CHECKPOINT_FILE)
    readable = [i for i in inputs if not i.problem]
    scores, errors = score_files(checkpoint.model, [i.path for i in readable],
                                 checkpoint.image_size, batch_size, num_workers)
    scored = {i.path: (p, e) for i, p, e in zip(readable, scores, errors, strict=True)}
    rows = []
    for item in inputs:
        p, error = scored.get(item.path, (np.nan, item.problem))
        rows.append({"path": str(item.path), "p_fake": "" if error else f"{p:.6f}",
                     "label": "" if error else ("fake" if p >= checkpoint.threshold else "real"),
                     "status": f"error: {error}" if error else "ok"})
    return rows, checkpoint


@torch.inference_mode()
def score_arrays(model: torch.nn.Module, images: Sequence[np.ndarray], image_size: int,
                 batch_size: int = 32, device: torch.device | None = None) -> np.ndarray:
    """P(fake) of RGB arrays (face crops), under the evaluation transform."""
    device = device or default_device()
    model.eval().to(device, memory_format=torch.channels_last)
    transform, scores = eval_transform(image_size), []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image) for image in images[start:start + batch_size]])
        scores.append(torch.sigmoid(model(to_device(batch, device)).reshape(-1).float()).cpu())
    return torch.cat(scores).numpy() if scores else np.zeros(0)


def predict_faces(checkpoint: Checkpoint, inputs: Sequence[Input], batch_size: int = 32,
                  cam_dir: Path | None = None, layer: str = "layer4"
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
            found, row["n_frames"] = faces_of(item.path, finder, params.frames_per_video)
        except (FacesError, ImageLoadError) as error:
            rows.append({**row, "status": f"error: {getattr(error, 'reason', None) or error}"})
            continue
        if not found:
            rows.append({**row, "status": "error: no face found in the frames read"})
            continue
        scores = score_arrays(checkpoint.model, [face.crop for _, face in found],
                              checkpoint.image_size, batch_size)
        p = float(scores.mean())
        rows.append({**row, "p_fake": f"{p:.6f}", "n_faces": len(found), "status": "ok",
                     "label": "fake" if p >= checkpoint.threshold else "real"})
        frames += [{"path": str(item.path), "frame": index, "p_fake": f"{score:.6f}",
                    "box": list(face.box)}
                   for (index, face), score in zip(found, scores, strict=True)]
        if cam_dir is not None:
            from dfutils.gradcam import write_overlays

            write_overlays(checkpoint.model, [face.crop for _, face in found],
                           [cam_dir / f"{item.name}.{index:06d}.cam.png" for index, _ in found],
                           checkpoint.image_size, layer=layer, batch_size=batch_size,
                           replace=False)
    return rows, frames


def labelled_files(data_dir: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[dict]]:
    """Images under DIR/real and DIR/fake with labels (fake = 1), and files skipped by type."""
    root = resolve(data_dir)
    candidates, skipped = scan(root)
    return ([root / rel for rel, _ in candidates],
            np.array([LABELS[label] for _, label in candidates]), skipped)


def eval_folder(run_dir: str | os.PathLike, name: str) -> Path:
    """Where `evaluate` writes the report called `name` of a run."""
    return resolve(run_dir) / "eval" / name


def face_crops(checkpoint: Checkpoint, data_dir: str | os.PathLike, out: Path
               ) -> tuple[list[Path], np.ndarray, list[str], list[dict]]:
    """Crop the faces of a labelled folder of photos and clips into `out` the way the run's
    training images were made: the crops, their labels, their source (a clip's crops share
    one) and what was skipped or unreadable."""
    import dataclasses

    from dfutils import faces

    params = dataclasses.replace(faces.params_of(checkpoint.faces), overwrite=True,
                                 raw_dir=str(resolve(data_dir)), faces_dir=str(out))
    report = faces.extract_faces(params)
    table = faces.read_faces(out)
    return ([out / path for path in table], np.array([LABELS[r["label"]] for r in table.values()]),
            [r["source"] for r in table.values()],
            [{"path": e["source"], "reason": e["reason"]}
             for e in report["skipped"] + report["unreadable"]])


def evaluate_folder(run_dir: str | os.PathLike, data_dir: str | os.PathLike, name: str = "",
                    batch_size: int = 32, num_workers: int = 0,
                    sweeps: dict[str, Sequence] = SWEEPS, faces: bool = True
                    ) -> tuple[dict, dict]:
    """Metrics at the run's threshold, robustness sweeps and calibration on a labelled folder.

    Writes runs/<run>/eval/<name>/report.json and figures; returns the report and figures.
    The source images are only read: every perturbation happens in memory. When the run was
    trained on face crops (and `faces`), the folder's photos and clips are cropped the same
    way first (into the report's folder, faces/), and the report adds video-level metrics;
    so it does for a folder of images in one subfolder per clip.
    """
    from dfutils import viz

    run_dir = resolve(run_dir)
    name = name or resolve(data_dir).name
    if not is_plain_name(name):
        raise ValueError(f"report name {name!r} must be a plain name (letters, digits, '.', "
                         "'_' or '-'): it becomes a folder under <run>/eval/")
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    out = eval_folder(run_dir, name)
    if checkpoint.faces is not None and faces:
        files, labels, groups, skipped = face_crops(checkpoint, data_dir, out / "faces")
    else:
        files, labels, skipped = labelled_files(data_dir)
        root = resolve(data_dir)  # a subfolder below the class folder is a clip's frames
        groups = [f.parent.relative_to(root).as_posix()
                  if len(f.relative_to(root).parts) > 2 else str(f) for f in files]
    threshold = checkpoint.threshold

    def run(perturb: Perturb | None, desc: str) -> tuple[np.ndarray, list[str]]:
        return score_files(checkpoint.model, files, checkpoint.image_size, batch_size,
                           num_workers, perturb, desc=desc)

    scores, errors = run(None, "clean")
    ok = np.array([not e for e in errors], dtype=bool)  # typed: no crop at all is possible
    labels = np.asarray(labels, dtype=int)
    for label, value in LABELS.items():
        if not (ok & (labels == value)).any():
            why = next((f" (first: {f}: {e})" for f, e, y
                        in zip(files, errors, labels, strict=True) if e and y == value), "")
            raise ValueError(f"no {label} image under {resolve(data_dir) / label} could be "
                             f"read{why}: AUC, AP and EER need both classes")
    metrics = binary_metrics(labels[ok], scores[ok], threshold)
    groups = np.asarray(groups)[ok]
    if grouped(groups):
        metrics["video"] = video_metrics(groups, labels[ok], scores[ok], threshold)
    results = {}
    for kind, levels in sweeps.items():
        results[kind] = []
        for level in levels:
            perturb = PERTURBATIONS[kind](level)
            level_scores = scores if (kind, level) in (("blur", 0), ("downscale", 1)) else run(
                perturb, f"{kind} {level}")[0]
            m = binary_metrics(labels[ok], level_scores[ok], threshold)
            results[kind].append({"level": level, "auc": m["auc"], "ap": m["ap"],
                                  "accuracy": m["accuracy"], "eer": m["eer"]})
    report = {
        "run": str(run_dir), "data": str(resolve(data_dir)), "name": name,
        "threshold": threshold, "threshold_rule": checkpoint.threshold_rule,
        "n_images": int(ok.sum()),
        "unreadable": [{"path": str(f), "reason": e} for f, e in zip(files, errors, strict=True)
                       if e],
        "skipped": skipped,
        "metrics": metrics,
        "calibration": {"ece": expected_calibration_error(labels[ok], scores[ok], 15),
                        "bins": calibration_bins(labels[ok], scores[ok], 15)},
        "sweeps": results,
    }
    figures = {
        "roc.png": viz.plot_roc(labels[ok], scores[ok], title=f"ROC ({name})", groups=groups),
        "confusion.png": viz.plot_confusion(metrics["confusion"], threshold),
        "robustness.png": viz.plot_sweeps(results),
        "reliability.png": viz.plot_reliability(report["calibration"]),
    }
    for file, fig in figures.items():
        viz.save_figure(fig, out / file)
    write_json(out / REPORT, report)
    return report, figures
