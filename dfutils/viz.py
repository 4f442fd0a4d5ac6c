"""Figures: split counts, sample grids, training curves, ROC, confusion, Grad-CAM overlays.

Arrays are RGB everywhere in this project. OpenCV's colormaps come out BGR; `colorize`
is the one place that converts, so no other function has to think about channel order.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import cv2
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from dfutils.atomic import atomic_path
from dfutils.datasets import CLASSES
from dfutils.metrics import grouped, video_scores

COLORMAP = cv2.COLORMAP_JET  # blue = no evidence, red = strongest


def closed(make: Callable[..., Figure]) -> Callable[..., Figure]:
    """For a helper that makes a figure: close it in pyplot before returning it, so a
    notebook shows it once, where it calls `display(fig)`, and never again at the end of
    the cell (a closed figure still displays, saves and takes a title)."""
    @functools.wraps(make)
    def wrapper(*args, **kwargs) -> Figure:
        fig = make(*args, **kwargs)
        plt.close(fig)
        return fig
    return wrapper


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> None:
    """Write a figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")


def save_rgb(path: str | os.PathLike, image: np.ndarray, replace: bool = True) -> None:
    """Write an RGB uint8 array as PNG, atomically; `replace=False` never overwrites a file."""
    with atomic_path(path, replace) as tmp:
        Image.fromarray(image, mode="RGB").save(tmp, format="PNG")


def draw_points(image: np.ndarray, points: np.ndarray, radius: int = 2) -> np.ndarray:
    """A copy of an RGB image with landmark points drawn on it in green."""
    out = np.ascontiguousarray(image).copy()
    for x, y in np.round(points).astype(int):
        cv2.circle(out, (int(x), int(y)), radius, (0, 255, 0), -1)
    return out


def outline(image: np.ndarray, mask: np.ndarray, colour=(255, 255, 255)) -> np.ndarray:
    """A copy of an RGB image with the edge of a boolean mask (at any size) drawn on it."""
    region = cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]),
                        interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return cv2.drawContours(np.ascontiguousarray(image).copy(), contours, -1, colour, 1)


def colorize(cam: np.ndarray) -> np.ndarray:
    """A [0, 1] map as an RGB uint8 heatmap (the project's only BGR -> RGB conversion)."""
    heat = cv2.applyColorMap(np.uint8(np.clip(cam, 0, 1) * 255), COLORMAP)
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heatmap over the original RGB uint8 image; alpha is the heatmap's weight."""
    if cam.shape != image.shape[:2]:
        cam = cv2.resize(cam.astype(np.float32), (image.shape[1], image.shape[0]),
                         interpolation=cv2.INTER_LINEAR)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(cam).astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def _grid(n: int, ncols: int, size: float = 2.6) -> tuple[Figure, np.ndarray]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    # Constrained layout leaves room for a suptitle above the images' own titles.
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


@closed
def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], ncols: int = 4,
               title: str = "") -> Figure:
    """RGB images in a grid, each with a title, under an optional figure title."""
    fig, axes = _grid(len(images), ncols)
    for ax, image, caption in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image)
        ax.set_title(caption, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


@closed
def plot_counts(counts: dict[str, dict[str, int]]) -> Figure:
    """Bar chart of images per split and class."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    splits = list(counts)
    x = np.arange(len(splits))
    for i, label in enumerate(("real", "fake")):
        values = [counts[s][label] for s in splits]
        bars = ax.bar(x + (i - 0.5) * 0.38, values, 0.38, label=label)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, splits)
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title("images per split and class")
    fig.tight_layout()
    return fig


@closed
def plot_history(history: Sequence[dict], best_epoch: int | None = None) -> Figure:
    """Loss, accuracy and validation AUC per epoch; the kept epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    present = [k for k in ("val_auc", "val_video_auc", "sbi_auc") if k in history[0]]
    losses = [k for k in ("train_loss", "val_loss", "sbi_loss") if k in history[0]]
    for ax, keys, title in zip(axes, (losses, ("train_acc", "val_acc"), present),
                               ("loss (BCE)", "accuracy", "validation AUC"), strict=True):
        for key in keys:
            ax.plot(epochs, [h[key] for h in history], marker="o", label=key)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label="kept")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@closed
def plot_roc(labels, scores, title: str = "ROC (validation)", groups=None) -> Figure:
    """ROC curve of P(fake) with the AUC in the legend; with `groups` (a clip's frames share
    one), the video-level curve too (each video scored by its frames' mean P(fake))."""
    fig, ax = plt.subplots(figsize=(4, 4))
    curves = [("", labels, scores)]
    if grouped(groups):
        _, by_video, video_p = video_scores(groups, labels, scores)
        curves = [("frames, ", labels, scores), ("videos, ", by_video, video_p)]
    for name, y, p in curves:
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{name}AUC = {roc_auc_score(y, p):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("false positive rate (real called fake)")
    ax.set_ylabel("true positive rate (fake caught)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


@closed
def plot_confusion(confusion: Sequence[Sequence[int]], threshold: float) -> Figure:
    """Confusion matrix, rows = true class, columns = predicted class (real, fake)."""
    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set_xticks([0, 1], ["real", "fake"])
    ax.set_yticks([0, 1], ["real", "fake"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion at P(fake) >= {threshold:.3f}", fontsize=9)
    fig.tight_layout()
    return fig


@closed
def plot_score_hist(labels, scores, threshold: float) -> Figure:
    """Histograms of P(fake) for real and for fake images, with the threshold."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(0, 1, 26)
    for value, name in ((0, "real"), (1, "fake")):
        ax.hist(scores[labels == value], bins=bins, alpha=0.6, label=name)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set_xlabel("P(fake)")
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title("validation scores per class")
    fig.tight_layout()
    return fig


@closed
def plot_deletion(deletion: dict) -> Figure:
    """P(explained class) as the top pixels by CAM, and by random maps, are removed."""
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    fractions = np.asarray(deletion["fractions"]) * 100
    ax.plot(fractions, deletion["cam"], marker="o",
            label=f"Grad-CAM (AUC {deletion['auc_cam']:.3f})")
    ax.plot(fractions, deletion["random"], marker="s",
            label=f"random maps (AUC {deletion['auc_random']:.3f})")
    ax.set_xlabel(f"pixels removed (%, filled with {deletion['fill']})")
    ax.set_ylabel("mean P(explained class)")
    ax.set_title("deletion: lower is more faithful")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows of dicts as a Markdown table (floats to 4 significant digits)."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def faces_summary(report: dict) -> list[dict]:
    """The faces step's report per class: sources, frames read, faces found and the share
    of frames with a face."""
    rows = []
    for label in CLASSES:
        entries = [e for e in report["sources"] if e["label"] == label]
        frames = sum(e.get("frames_read", 0) for e in entries)
        found = sum(e.get("faces_found", 0) for e in entries)
        rows.append({"class": label, "sources": len(entries), "frames read": frames,
                     "faces found": found, "found": f"{found / frames:.1%}" if frames else "-"})
    return rows


def faces_problems(report: dict) -> list[dict]:
    """The sources of the faces step's report that could not be read, gave no face, were
    skipped or missing (a data set's list names them), or were shorter than
    frames_per_video, with the reason."""
    rows = [{"source": e["source"], "why": e["reason"]} for e in report["unreadable"]]
    rows += [{"source": e["source"], "why": "no face in any frame read"}
             for e in report["sources"] if "reason" not in e and e["faces_found"] == 0]
    rows += [{"source": e["source"], "why": e["short"]} for e in report["sources"] if "short" in e]
    return rows + [{"source": e["source"], "why": e["reason"]} for e in report["skipped"]]


def counts_table(counts: dict[str, dict[str, int]]) -> str:
    """A split's images per split and class (the split report's `counts`) as Markdown."""
    return markdown_table([{"split": split, **by_class, "total": sum(by_class.values())}
                           for split, by_class in counts.items()])


@closed
def plot_sweeps(sweeps: dict[str, list[dict]]) -> Figure:
    """ROC-AUC per perturbation level, one panel per kind (JPEG quality, blur, downscale)."""
    labels = {"jpeg": "JPEG quality", "blur": "Gaussian blur sigma (px)",
              "downscale": "downscale factor"}
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4 * len(sweeps), 3.2), squeeze=False)
    for ax, (kind, rows) in zip(axes.flat, sweeps.items(), strict=True):
        levels = [str(r["level"]) for r in rows]
        ax.plot(levels, [r["auc"] for r in rows], marker="o")
        ax.set_ylim(0.4, 1.02)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(labels.get(kind, kind))
        ax.set_ylabel("ROC-AUC")
        ax.set_title(f"robustness: {kind}")
    fig.tight_layout()
    return fig


@closed
def plot_reliability(calibration: dict) -> Figure:
    """Reliability diagram: fraction fake against mean P(fake) per bin, with the ECE."""
    bins = [b for b in calibration["bins"] if b["n"]]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.bar([b["low"] for b in bins], [b["fraction_fake"] for b in bins],
           width=[b["high"] - b["low"] for b in bins], align="edge", alpha=0.6,
           edgecolor="black", label="fraction fake")
    ax.plot([b["mean_p_fake"] for b in bins], [b["fraction_fake"] for b in bins], "o",
            color="black", markersize=3)
    ax.set_xlabel("P(fake)")
    ax.set_ylabel("fraction fake")
    ax.set_title(f"reliability (ECE {calibration['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


@closed
def plot_benchmark(rows: Sequence[dict]) -> Figure:
    """The cross-dataset table as a picture: per test set and method, the AUC of each level
    and rule with its 95% interval."""
    kinds = [("frame", "-", "frame"), ("video", "mean", "video, mean"),
             ("video", "sbi", "video, SBI rule")]
    groups = list(dict.fromkeys((r["test_set"], r["method"]) for r in rows))
    fig, ax = plt.subplots(figsize=(6.5, 0.55 * len(groups) * len(kinds) / 2 + 1.6))
    y = np.arange(len(groups))
    height = 0.8 / len(kinds)
    for k, (level, rule, name) in enumerate(kinds):
        found = {(r["test_set"], r["method"]): r for r in rows
                 if r["level"] == level and r["rule"] == rule}
        auc = np.array([found[g]["auc"] if g in found else np.nan for g in groups], float)
        low = np.array([found[g]["auc_low"] if g in found else np.nan for g in groups], float)
        high = np.array([found[g]["auc_high"] if g in found else np.nan for g in groups], float)
        ax.barh(y + (k - 1) * height, auc, height, label=name,
                xerr=np.nan_to_num([auc - low, high - auc]), capsize=2)
    ax.set_yticks(y, [f"{t} · {m}" for t, m in groups])
    ax.invert_yaxis()
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_xlabel("ROC-AUC (95% bootstrap interval)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("test sets: AUC per level and rule")
    fig.tight_layout()
    return fig


@closed
def plot_explanations(rows: Sequence[dict], measures: dict[str, tuple[str, bool]]
                      ) -> Figure:
    """Where Grad-CAM points on the test sets: per measure (name: its title, and whether
    lower is better), each test set, method and layer's difference CAM minus random maps
    with its 95% interval, coloured by its verdict."""
    labels = [f"{r['test_set']} · {r['method']} · {r['layer']}" for r in rows]
    fig, axes = plt.subplots(1, len(measures), sharey=True, squeeze=False,
                             figsize=(3.2 * len(measures) + 2, 0.4 * len(rows) + 1.6))
    y = np.arange(len(rows))
    for ax, (name, (title, below)) in zip(axes[0], measures.items(), strict=True):
        difference = np.array([r[f"{name}_cam"] - r[f"{name}_random"] for r in rows], float)
        low = np.array([r[f"{name}_low"] for r in rows], float)
        high = np.array([r[f"{name}_high"] for r in rows], float)
        colours = ["tab:green" if r[f"{name}_verdict"] == "better" else "tab:red"
                   if r[f"{name}_verdict"] == "worse" else "tab:grey" for r in rows]
        ax.barh(y, difference, 0.6, color=colours,
                xerr=np.nan_to_num([difference - low, high - difference]), capsize=2)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{title}\nCAM − random ({'left' if below else 'right'} of 0: better)",
                     fontsize=9)
    axes[0][0].set_yticks(y, labels)
    axes[0][0].invert_yaxis()
    fig.suptitle("Grad-CAM against random maps on the test sets (95% intervals; green: "
                 "better, red: worse, grey: not told apart)", fontsize=10)
    fig.tight_layout()
    return fig
