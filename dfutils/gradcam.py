"""The 03-gradcam step: where a trained run's model sees the evidence, on its validation
images and on self-blends of its validation reals, and whether the maps can be trusted
(deletion against random maps; pointing game and IoU against ground-truth and self-blend
masks). The maps and the checks themselves are `dfutils.cam`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from dfutils import curves, paths, sbi, viz
from dfutils.atomic import write_json
from dfutils.cam import deletion_score, explain, localization, verdict, write_overlays
from dfutils.images import load_mask
from dfutils.manifest import Sample, check_identity, read_manifest
from dfutils.metrics import shown
from dfutils.model import Checkpoint, load_checkpoint
from dfutils.params import GradCamParams, Selection, choices
from dfutils.paths import from_here, resolve
from dfutils.runs import seed_everything


def kept_predictions(run_dir: str | os.PathLike, data_dir: str | os.PathLike
                     ) -> tuple[list[Sample], np.ndarray]:
    """The validation images of a run (with what the split says of each: mask, video,
    source) and the P(fake) its kept epoch gave each (val_predictions.csv)."""
    data_dir = resolve(data_dir)
    samples = {s.path: s for s in read_manifest(data_dir)}
    with open(resolve(run_dir) / paths.PREDICTIONS, newline="") as f:
        rows = list(csv.DictReader(f))
    found = [(r, samples.get(data_dir / r["path"])) for r in rows]
    return ([Sample(data_dir / r["path"], int(r["label"]), s and s.mask,
                    video=r.get("video") or r["path"], source=s.source if s else "")
             for r, s in found], np.array([float(r["p_fake"]) for r, _ in found]))


def select_images(labels: np.ndarray, scores: np.ndarray, n: int, mode: Selection = "mixed",
                  threshold: float = 0.5, seed: int = 0, sources: Sequence[str] = ()
                  ) -> list[int]:
    """Which validation images to show.

    "mixed": the most confident correct and wrong predictions of each class, taken in turn
    from the four groups, so the grid shows what the model gets right and what it gets
    wrong; "random": a seeded random sample; "sources": a seeded random sample of each
    source folder's fakes (`sources`, one per image), n shared evenly, one source after the
    other, so a grid row shows one data set's fakes as they come, not the best of them.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    n = min(n, len(labels))
    if mode == "random":
        return sorted(np.random.default_rng(seed).choice(len(labels), n, replace=False).tolist())
    if mode == "sources":
        names = np.asarray(sources) if len(sources) else np.full(len(labels), "")
        folders = sorted(set(names[labels == 1].tolist()))
        rng, chosen = np.random.default_rng(seed), []
        for k, folder in enumerate(folders):
            fakes = np.flatnonzero((labels == 1) & (names == folder))
            share = n // len(folders) + (k < n % len(folders))
            chosen += rng.permutation(fakes)[:share].tolist()
        return [int(i) for i in chosen]
    if mode not in choices(Selection):
        raise ValueError(f"select must be one of {', '.join(choices(Selection))}, got {mode!r}")
    predicted = (scores >= threshold).astype(int)
    confidence = np.abs(scores - threshold)
    groups = [sorted(np.flatnonzero((labels == cls) & ((predicted == cls) == correct)),
                     key=lambda i: -confidence[i])
              for cls in (1, 0) for correct in (True, False)]
    chosen: list[int] = []
    while len(chosen) < n:
        for group in groups:
            if group and len(chosen) < n:
                chosen.append(int(group.pop(0)))
    return chosen


SELF_BLENDS_SHOWN = 4  # self-blend overlays in the grid (and gradcam/self-blend-NN.png)


@dataclass
class BlendMaps:
    """Grad-CAM (for fake) of the validation self-blends, with their masks."""

    images: list[np.ndarray]  # RGB, as blended
    masks: list[np.ndarray]  # boolean at the model's input size: where the blend has weight
    maps: np.ndarray  # (N, size, size)
    p_fake: np.ndarray
    grid: tuple[int, int]

    def __len__(self) -> int:
        return len(self.images)

    def shown(self, n: int) -> tuple:
        return self.images[:n], self.masks[:n], list(self.maps[:n]), list(self.p_fake[:n])

    def localization(self, seed: int, n_resamples: int) -> dict:
        return localization(list(self.maps), self.masks, seed=seed, grid=self.grid,
                            clusters=None, n_resamples=n_resamples)


def self_blend_maps(checkpoint: Checkpoint, params: GradCamParams) -> tuple[BlendMaps, dict]:
    """Grad-CAM for fake on the fixed validation self-blends of the split's first n_eval
    validation reals that have a face (dfutils.sbi; the same for every run on the split),
    whatever the run trained on; and the landmark counts. None found: an empty BlendMaps."""
    size = checkpoint.image_size
    blends, found = sbi.validation_blends(params.data_dir, limit=params.n_eval)
    n = len(blends.samples)
    images, masks = [], []
    for i in range(n, 2 * n):
        image, _, mask = blends.image(i)
        images.append(image)
        masks.append(cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR) > 0)
    _, cams = explain(checkpoint, images, "fake", params.batch_size, params.layer)
    return BlendMaps(images, masks, cams.maps, cams.p_fake, cams.grid), found


def mask_localization(checkpoint: Checkpoint, predictions: list[Sample],
                      params: GradCamParams) -> dict:
    """Localization of Grad-CAM for fake against the ground-truth masks of the first n_eval
    validation images that have one ({"n": 0} when none has)."""
    with_mask = [p for p in predictions if p.mask is not None][:params.n_eval]
    if not with_mask:
        return {"n": 0}
    size = checkpoint.image_size
    _, cams = explain(checkpoint, [p.path for p in with_mask], "fake", params.batch_size,
                      params.layer)
    masks = [load_mask(p.mask, (size, size)) for p in with_mask]
    return localization(list(cams.maps), masks, seed=params.seed, grid=cams.grid,
                        clusters=[p.video for p in with_mask], n_resamples=params.n_bootstrap)


@dataclass
class CamReport:
    """What 03-gradcam shows: the overlays of the chosen images, their grid, and the checks."""

    checkpoint: Checkpoint
    n_predictions: int
    overlays: list[np.ndarray]
    titles: list[str]
    deletion: dict
    localization: dict
    metrics: dict  # as written to cam_metrics.json
    figures: dict = field(default_factory=dict)  # paths.CAM_FIGURES: the grid, the deletion


def gradcam_run(params: GradCamParams) -> CamReport:
    """The 03-gradcam step: overlays of chosen validation images and of self-blends, their
    grid, the deletion check, and localization against ground-truth masks where the split
    has them and against self-blend masks; everything written to <run>/gradcam/."""
    seed_everything(params.seed)
    run = resolve(params.run_dir)
    out = run / paths.GRADCAM
    checkpoint = load_checkpoint(run / paths.MODEL)
    check_identity(checkpoint.split, params.data_dir, checkpoint.path,
                   "explain its validation images")
    predictions, scores = kept_predictions(run, params.data_dir)
    labels = np.array([p.label for p in predictions])
    pick = functools.partial(select_images, labels, scores, threshold=checkpoint.threshold,
                             seed=params.seed, sources=[p.folder for p in predictions])

    chosen = pick(params.n_images, params.select)

    def named(i: int) -> str:  # what a title says an image is: its source, or its truth
        return predictions[i].folder if params.select == "sources" else "true"

    shown_paths = [predictions[i].path for i in chosen]
    cams, overlays = write_overlays(checkpoint, shown_paths,
                                    [out / f"{p.stem}.png" for p in shown_paths],
                                    params.target, params.layer, params.alpha,
                                    params.batch_size)
    titles = [f"{named(i)} {'fake' if labels[i] else 'real'}".strip() + f" · P(fake) {p:.2f}"
              for i, p in zip(chosen, cams.p_fake, strict=True)]

    eval_index = pick(params.n_eval, "random")
    eval_inputs, eval_cams = explain(checkpoint, [predictions[i].path for i in eval_index],
                                     params.target, params.batch_size, params.layer)
    deletion = deletion_score(checkpoint.model, eval_inputs, eval_cams.maps,
                              eval_cams.explained, seed=params.seed, grid=eval_cams.grid,
                              clusters=[predictions[i].video for i in eval_index],
                              n_resamples=params.n_bootstrap)
    located = mask_localization(checkpoint, predictions, params)

    blends, found = self_blend_maps(checkpoint, params)
    n_shown = min(SELF_BLENDS_SHOWN, len(blends))
    for i, (image, mask, cam, p) in enumerate(zip(*blends.shown(n_shown), strict=True)):
        overlays.append(viz.outline(viz.overlay(image, cam, params.alpha), mask))
        titles.append(f"self-blend · P(fake) {p:.2f}")
        viz.save_rgb(out / f"self-blend-{i:02d}.png", overlays[-1])

    layer = checkpoint.arch.layer_for(params.layer, (checkpoint.image_size,) * 2)
    grid = viz.image_grid(overlays, titles, ncols=4, title=(
        f"Grad-CAM ({params.target}; on self-blends: fake, mask outlined) on "
        f"{layer} ({checkpoint.arch.explained(layer).path}), {params.select} selection"))
    metrics = {"layer": layer, "layer_asked": params.layer, "grid": list(eval_cams.grid),
               "target": params.target, "select": params.select,
               "n_images": len(chosen), "n_eval": len(eval_index), "deletion": deletion,
               "localization": located,
               "self_blends": {"faces": found, "localization": blends.localization(
                   params.seed, params.n_bootstrap)}}
    figures = dict(zip(paths.CAM_FIGURES, (grid, viz.plot_deletion(deletion)), strict=True))
    curves.add_figure(run, "gradcam", grid, checkpoint.epoch)  # beside the training curves
    for name, fig in figures.items():
        viz.save_figure(fig, out / name)
    write_json(run / paths.CAM_METRICS, metrics)
    return CamReport(checkpoint, len(predictions), overlays, titles, deletion, located,
                     metrics, figures)


def check_lines(metrics: dict) -> list[str]:
    """The checks of cam_metrics.json in words, each number with its 95% interval and a
    verdict from the interval of the paired difference: deletion, pointing on ground-truth
    masks, pointing on self-blends ("" for a check that was not scored)."""
    def judged(ci: dict, better_below: bool) -> str:
        if ci.get("unavailable"):
            return f"; no verdict: {ci['unavailable']}"
        said = verdict(ci.get("difference"), better_below)
        return {"better": "; better than random maps (the difference's interval excludes 0)",
                "worse": "; worse than random maps (the difference's interval excludes 0)",
                "not told apart": "; not distinguishable from random maps (the difference's "
                                  "interval holds 0)"}.get(said, "")

    deletion = metrics["deletion"]
    d_ci = deletion.get("ci") or {}
    lines = [f"deletion AUC (lower = more faithful): CAM "
             f"{shown(deletion['auc_cam'], d_ci.get('auc_cam'))}, random "
             f"{shown(deletion['auc_random'], d_ci.get('auc_random'))}"
             f"{judged(d_ci, True)}"]
    for what, located in (("ground-truth masks", metrics["localization"]),
                          (f"{metrics['self_blends']['localization'].get('n', 0)} self-blends",
                           metrics["self_blends"]["localization"])):
        if not located.get("n"):
            lines.append("")
            continue
        ci = located.get("ci") or {}
        lines.append(f"pointing game on {what}: CAM "
                     f"{shown(located['pointing_cam'], ci.get('pointing_cam'))}, random "
                     f"{shown(located['pointing_random'], ci.get('pointing_random'))}"
                     f"{judged(ci, False)}")
    return lines


def record(params: GradCamParams) -> dict | None:
    """What run.json keeps of a finished 03-gradcam: its cam_metrics.json."""
    path = resolve(params.run_dir) / paths.CAM_METRICS
    return json.loads(path.read_text()) if path.is_file() else None


def summary(record: dict) -> dict:
    """A run's headline numbers from 03-gradcam: the explained layer, and each check, CAM
    against random maps, with its 95% interval."""
    checks = {"deletion_auc": record.get("deletion") or {},
              "pointing": record.get("localization") or {},
              "self_blend_pointing": ((record.get("self_blends") or {}).get("localization")
                                      or {})}
    found = {"cam_layer": record.get("layer")}
    for name, check in checks.items():
        metric = "auc" if name == "deletion_auc" else "pointing"
        for kind in ("cam", "random"):
            found[f"{name}_{kind}"] = check.get(f"{metric}_{kind}")
            found[f"{name}_{kind}_ci"] = (check.get("ci") or {}).get(f"{metric}_{kind}")
    return found


def summary_lines(summary: dict) -> list[str]:
    """03-gradcam's headline numbers in words."""
    def pair(name: str, key: str) -> str:
        return (f"{name} CAM {shown(summary[key + '_cam'], summary.get(key + '_cam_ci'))} vs "
                f"random {shown(summary[key + '_random'], summary.get(key + '_random_ci'))}")

    checks = [pair(name, key) for name, key in (
        ("deletion AUC (lower is better):", "deletion_auc"), ("pointing game:", "pointing"),
        ("pointing on self-blends:", "self_blend_pointing"))
        if summary.get(f"{key}_cam") is not None]
    return [f"Grad-CAM on {summary.get('cam_layer')}: " + "; ".join(checks)] if checks else []


def shown_lines(params: GradCamParams, report: CamReport) -> list[str]:
    """What the gradcam command prints: the checks in words, and where the maps are."""
    return [line for line in check_lines(report.metrics) if line] + [
        f"Grad-CAM: {from_here(resolve(params.run_dir) / paths.GRADCAM)}"]
