"""Using a trained run: score new images, and evaluate on a labelled folder with robustness
sweeps (JPEG, blur, downscaling) and calibration."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dfutils import LABELS
from dfutils.data import eval_transform, load_image
from dfutils.metrics import binary_metrics, calibration_bins, expected_calibration_error
from dfutils.model import load_checkpoint
from dfutils.paths import resolve, write_json
from dfutils.split import scan
from dfutils.train import default_device, to_device

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
        except OSError as error:
            reason = str(error.__cause__ or error).splitlines()[0]
            return torch.zeros(3, self.image_size, self.image_size), index, reason
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


def collect_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named, and every file below folders named (recursively), in a stable order."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return files


def predict(run_dir: str | os.PathLike, paths: Sequence[str | os.PathLike],
            batch_size: int = 32, num_workers: int = 0) -> tuple[list[dict], dict]:
    """Rows of (path, p_fake, label, status) for every file, and the run's checkpoint."""
    model, checkpoint = load_checkpoint(resolve(run_dir) / "model.pt")
    files = collect_files(paths)
    scores, errors = score_files(model, files, checkpoint["params"]["image_size"], batch_size,
                                 num_workers)
    threshold = checkpoint["threshold"]
    rows = [{"path": str(f), "p_fake": "" if e else f"{p:.6f}",
             "label": "" if e else ("fake" if p >= threshold else "real"),
             "status": f"error: {e}" if e else "ok"}
            for f, p, e in zip(files, scores, errors, strict=True)]
    return rows, {**checkpoint, "model": model}


def labelled_files(data_dir: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[dict]]:
    """Images under DIR/real and DIR/fake with labels (fake = 1), and files skipped by type."""
    root = resolve(data_dir)
    candidates, skipped = scan(root)
    return ([root / rel for rel, _ in candidates],
            np.array([LABELS[label] for _, label in candidates]), skipped)


def evaluate_folder(run_dir: str | os.PathLike, data_dir: str | os.PathLike, name: str = "",
                    batch_size: int = 32, num_workers: int = 0,
                    sweeps: dict[str, Sequence] = SWEEPS) -> tuple[dict, dict]:
    """Metrics at the run's threshold, robustness sweeps and calibration on a labelled folder.

    Writes runs/<run>/eval/<name>/report.json and figures; returns the report and figures.
    The source images are only read: every perturbation happens in memory.
    """
    from dfutils import viz

    run_dir = resolve(run_dir)
    model, checkpoint = load_checkpoint(run_dir / "model.pt")
    name = name or Path(data_dir).name
    out = run_dir / "eval" / name
    files, labels, skipped = labelled_files(data_dir)
    image_size, threshold = checkpoint["params"]["image_size"], checkpoint["threshold"]

    def run(perturb: Perturb | None, desc: str) -> tuple[np.ndarray, list[str]]:
        return score_files(model, files, image_size, batch_size, num_workers, perturb,
                           desc=desc)

    scores, errors = run(None, "clean")
    ok = np.array([not e for e in errors])
    if not ok.any():
        raise ValueError(f"no image under {data_dir} could be read")
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
        "threshold": threshold, "threshold_rule": checkpoint["threshold_rule"],
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
    write_json(out / "report.json", report)
    return report, figures
