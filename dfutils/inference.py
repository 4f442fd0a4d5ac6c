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
from tqdm import tqdm

from dfutils import LABELS
from dfutils.data import ImageLoadError, eval_transform, load_image
from dfutils.distributed import device as default_device
from dfutils.metrics import binary_metrics, calibration_bins, expected_calibration_error
from dfutils.model import CHECKPOINT_FILE, Checkpoint, load_checkpoint
from dfutils.paths import file_problem, is_plain_name, resolve, write_json
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


def predict(run_dir: str | os.PathLike, inputs: Sequence[Input], batch_size: int = 32,
            num_workers: int = 0) -> tuple[list[dict], Checkpoint]:
    """Rows of (path, p_fake, label, status) for every input, and the run's checkpoint."""
    checkpoint = load_checkpoint(resolve(run_dir) / CHECKPOINT_FILE)
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


def labelled_files(data_dir: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[dict]]:
    """Images under DIR/real and DIR/fake with labels (fake = 1), and files skipped by type."""
    root = resolve(data_dir)
    candidates, skipped = scan(root)
    return ([root / rel for rel, _ in candidates],
            np.array([LABELS[label] for _, label in candidates]), skipped)


def eval_folder(run_dir: str | os.PathLike, name: str) -> Path:
    """Where `evaluate` writes the report called `name` of a run."""
    return resolve(run_dir) / "eval" / name


def evaluate_folder(run_dir: str | os.PathLike, data_dir: str | os.PathLike, name: str = "",
                    batch_size: int = 32, num_workers: int = 0,
                    sweeps: dict[str, Sequence] = SWEEPS) -> tuple[dict, dict]:
    """Metrics at the run's threshold, robustness sweeps and calibration on a labelled folder.

    Writes runs/<run>/eval/<name>/report.json and figures; returns the report and figures.
    The source images are only read: every perturbation happens in memory.
    """
    from dfutils import viz

    run_dir = resolve(run_dir)
    name = name or resolve(data_dir).name
    if not is_plain_name(name):
        raise ValueError(f"report name {name!r} must be a plain name (letters, digits, '.', "
                         "'_' or '-'): it becomes a folder under <run>/eval/")
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    out = eval_folder(run_dir, name)
    files, labels, skipped = labelled_files(data_dir)
    threshold = checkpoint.threshold

    def run(perturb: Perturb | None, desc: str) -> tuple[np.ndarray, list[str]]:
        return score_files(checkpoint.model, files, checkpoint.image_size, batch_size,
                           num_workers, perturb, desc=desc)

    scores, errors = run(None, "clean")
    ok = np.array([not e for e in errors])
    for label, value in LABELS.items():
        if not (ok & (labels == value)).any():
            why = next((f" (first: {f}: {e})" for f, e, y
                        in zip(files, errors, labels, strict=True) if e and y == value), "")
            raise ValueError(f"no {label} image under {resolve(data_dir) / label} could be "
                             f"read{why}: AUC, AP and EER need both classes")
    metrics = binary_metrics(labels[ok], scores[ok], threshold)
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
        "roc.png": viz.plot_roc(labels[ok], scores[ok], title=f"ROC ({name})"),
        "confusion.png": viz.plot_confusion(metrics["confusion"], threshold),
        "robustness.png": viz.plot_sweeps(results),
        "reliability.png": viz.plot_reliability(report["calibration"]),
    }
    for file, fig in figures.items():
        viz.save_figure(fig, out / file)
    write_json(out / REPORT, report)
    return report, figures
