"""The cross-dataset table (05-benchmark): one trained run scored on the test splits of one
or more prepared data sets, per frame and per video, per test set and per FF++ method.

The same evaluation as `evaluate --split test` (`metrics.assess`'s numbers, intervals and
subgroups), presented as the field's table. Frame level: every face crop is one sample.
Video level, two rules, each named in its row (`metrics.VIDEO_RULES`): "mean" (videos
without a face are left out and counted) and "sbi" (a video without a face scores 0.5 and
is counted, as the Self-Blended Images evaluation does). The faces step keeps the most
confident face of each frame, so on its crops the two rules differ by the videos without a
face; the size rule matters for crops made otherwise.

Scoring is streamed: crops are loaded a batch at a time and every frame's score goes to
benchmark_frames.csv as it comes, so memory holds one float per frame, never an image
more than a batch.

Beside the table, where the explanations point: Grad-CAM for "fake" on test fakes whose
manipulated region is known: the crops' masks (FF++'s published mask videos, cut with their
faces by 00-faces; or masks a user drew), each FF++ method on its own; on a test set
without masks, the fixed self-blends of its test reals (`sbi.validation_blends`: their
blend masks are known), labelled as self-blends. Per crop, for the CAM and for random maps
of the explained layer's grid: the pointing game, the share of the map's energy inside the
mask, the IoU of the map's top region with the mask, and the deletion area (faithfulness).
A row per test set, method and layer gives each measure's mean for the CAM and for random
maps and the 95% interval of their paired difference (whole videos resampled), and its
verdict from that interval.

Streamed: crops are explained a batch at a time and only their few numbers are kept (and
the overlays of the faces a figure shows), so memory does not grow with the test set.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from dfutils import archs, paths, sbi, viz
from dfutils.atomic import atomic_path, write_csv, write_json
from dfutils.cam import deletion_areas, explain, localization_scores, random_maps, verdict
from dfutils.datasets import LABELS
from dfutils.detector import load_model
from dfutils.images import load_image, load_mask
from dfutils.manifest import (
    LabelledSet,
    Sample,
    check_identity,
    check_unseen,
    dataset_of,
    labelled_set,
    read_manifest,
)
from dfutils.metrics import (
    NAMES,
    NO_FACE_SCORE,
    TITLES,
    VIDEO_RULES,
    binary_metrics,
    mean_intervals,
    shown,
    subgroups,
    video_scores,
    with_intervals,
)
from dfutils.model import Checkpoint
from dfutils.params import BenchmarkParams
from dfutils.paths import from_here, is_plain_name, resolve
from dfutils.progress import tqdm
from dfutils.scoring import images_for, score

FRAME_FIELDS = ["test_set", "dataset", "method", "label", "video", "frame", "path", "p_fake"]
VIDEO_FIELDS = ["test_set", "dataset", "method", "label", "video", "n_frames",
                *(f"p_fake_{rule}" for rule in VIDEO_RULES)]
TABLE_FIELDS = ["test_set", "dataset", "method", "level", "rule",
                *(f for name in NAMES for f in (name, f"{name}_low", f"{name}_high")),
                "n_videos", "n_frames", "n_no_face", "note"]
LEVELS = (("frame", "-"), *(("video", rule) for rule in VIDEO_RULES))
ALL = "all"  # the row of a whole test set; other rows are one method's fakes with all reals


@dataclass
class TestSet:
    """The test split of one prepared data set: its crops (with each crop's frame and face
    size, and the videos without a face), named by its folder."""

    name: str
    dataset: str  # the data set it was made from ("folder" for real/ + fake/)
    images: LabelledSet
    root: Path  # the split's folder


def check_test_sets(test_sets: list[str], checkpoint: Checkpoint | None,
                    made: Path | None = None) -> None:
    """Every check of the test sets before anything is scored or written (05-benchmark's
    preflight too): each is a split with a test split, no two share a folder name, and
    none holds images the run trained or chose on (the split it trained on, split again
    since; or the same images: `manifest.check_unseen`). `made`: the folder this chain's
    split is about to make, not there yet; without a `checkpoint` (trained in this chain)
    only the folders are checked."""
    names = [resolve(d).name for d in test_sets]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"two test sets are folders named {duplicated[0]!r}: their rows "
                         "could not be told apart; give each split folder its own name")
    for folder in map(resolve, test_sets):
        if folder == made:
            continue
        if not (folder / paths.MANIFEST).is_file():
            raise ValueError(f"TEST_SETS: {folder} holds no {paths.MANIFEST}: name split "
                             "folders made by `make split` (docs/datasets.md)")
        if not read_manifest(folder, "test"):
            raise ValueError(f"the split in {folder} has no test images: split a data set "
                             "with an official test list (dataset=ffpp, dfd, celebdf or dfdc) "
                             "or give TEST_FRACTION= to `make split`")
        if checkpoint is not None:
            check_identity(checkpoint.split, folder, checkpoint.path, "score its test split")
            check_unseen(checkpoint.split, folder, "test", checkpoint.path,
                         "score its test split")


def read_test_set(data_dir: str | os.PathLike) -> TestSet:
    """The test split of a split made by 01-split (`check_test_sets` checked it)."""
    root = resolve(data_dir)
    return TestSet(root.name, dataset_of(root), labelled_set(root, "test"), root)


def score_test_set(checkpoint: Checkpoint, test: TestSet, writer: csv.DictWriter,
                   batch_size: int, num_workers: int, amp: str) -> np.ndarray:
    """P(fake) of every crop of `test` (NaN where one cannot be read), each frame's row
    written as its batch is scored."""
    samples = test.images.samples

    def write(indices: list[int], p_fake: np.ndarray, errors: list[str]) -> None:
        for i, p, error in zip(indices, p_fake, errors, strict=True):
            if not error:
                s = samples[i]
                writer.writerow({"test_set": test.name, "dataset": test.dataset,
                                 "method": s.method, "label": s.label, "video": s.video,
                                 "frame": s.frame, "path": str(s.path), "p_fake": f"{p:.6f}"})

    return score(checkpoint, images_for(checkpoint, samples), batch_size=batch_size,
                 num_workers=num_workers, amp=amp, desc=test.name, on_batch=write).p_fake


def video_rows(test: TestSet, scores: np.ndarray) -> list[dict]:
    """One row per video (by name), its frames scored and its P(fake) by each rule; then the
    videos without a face: no mean score, 0.5 under the SBI rule."""
    ok = ~np.isnan(scores)
    images = test.images.subset(ok)
    videos, labels = images.videos, images.labels
    by_rule = {rule: video_scores(videos, labels, scores[ok], rule, images.column("frame"),
                                  images.column("area"))
               for rule in VIDEO_RULES}
    names, label, _ = by_rule["mean"]
    first = {v: s for v, s in list(zip(videos, images.samples, strict=True))[::-1]}
    counts = dict(zip(*np.unique(videos, return_counts=True), strict=True))
    rows = [{"test_set": test.name, "dataset": test.dataset, "method": first[v].method,
             "label": int(y), "video": v, "n_frames": int(counts[v]),
             **{f"p_fake_{rule}": float(found[2][k]) for rule, found in by_rule.items()}}
            for k, (v, y) in enumerate(zip(names, label, strict=True))]
    return rows + [{"test_set": test.name, "dataset": test.dataset, "method": clip["method"],
                    "label": LABELS[clip["label"]], "video": clip["source"], "n_frames": 0,
                    "p_fake_mean": math.nan, "p_fake_sbi": NO_FACE_SCORE}
                   for clip in test.images.faceless]


def _row(base: dict, labels, scores, threshold: float, clusters, n_resamples: int) -> dict:
    """One row of the table; `note` says why a number or an interval is missing."""
    m = with_intervals(binary_metrics(labels, scores, threshold), labels, scores, clusters,
                       n_resamples)
    missing = [name for name, value in LABELS.items() if value not in set(np.asarray(labels))]
    unit = "frame" if base["level"] == "frame" else "video"
    note = (f"no {missing[0]} {unit} in this test split"
            + ("" if base["method"] == ALL else f" for {base['method']}") + ": AUC, AP and "
            "EER are undefined" if missing else m["ci"].get("unavailable", ""))
    return {**base, **{f: value for name in NAMES
                       for f, value in zip((name, f"{name}_low", f"{name}_high"),
                                           (m[name], *m["ci"][name]), strict=True)},
            "note": note}


def table_rows(test: TestSet, scores: np.ndarray, videos: list[dict], threshold: float,
               n_resamples: int) -> list[dict]:
    """The table's rows of one test set: for the whole set and for each manipulation (its
    fakes against every real: `metrics.subgroups`), a frame-level row and a video-level row
    per rule, each metric with its interval (frames resample whole videos)."""
    ok = ~np.isnan(scores)
    labels, frame_videos = test.images.labels, test.images.videos
    video_labels = np.array([v["label"] for v in videos], dtype=int)
    methods = sorted({v["method"] for v in videos if v["method"] and v["label"]})
    frames = subgroups(labels, test.images.column("method"), "all", methods)
    by_video = subgroups(video_labels, [v["method"] for v in videos], "all", methods)
    chosen = {ALL: (np.ones(len(labels), bool), np.ones(len(videos), bool))}
    if len(methods) > 1:
        chosen |= {m: (frames[m], by_video[m]) for m in methods}
    rows = []
    for method, (frame, video) in chosen.items():
        frame = frame & ok
        picked = [v for v, keep in zip(videos, video, strict=True) if keep]
        with_face = [v for v in picked if v["n_frames"]]
        base = {"test_set": test.name, "dataset": test.dataset, "method": method,
                "n_frames": int(frame.sum()), "n_no_face": len(picked) - len(with_face)}
        rows.append(_row({**base, "level": "frame", "rule": "-",
                          "n_videos": len(set(frame_videos[frame].tolist()))},
                         labels[frame], scores[frame], threshold, frame_videos[frame],
                         n_resamples))
        for rule, counted in (("mean", with_face), ("sbi", picked)):
            rows.append(_row({**base, "level": "video", "rule": rule,
                              "n_videos": len(counted)},
                             [v["label"] for v in counted],
                             [v[f"p_fake_{rule}"] for v in counted], threshold,
                             [v["video"] for v in counted], n_resamples))
    return rows


def headline(rows: list[dict]) -> dict[str, float]:
    """Per test set, its video-level AUC under the mean rule (the run record's summary)."""
    return {r["test_set"]: r["auc"] for r in rows
            if r["method"] == ALL and r["level"] == "video" and r["rule"] == "mean"}


def _text(value: object) -> object:
    """A table cell: 4 decimals, empty where undefined (an AUC of one class)."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return value


def run_benchmark(params: BenchmarkParams) -> dict:
    """Score the run on each test set; write benchmark.csv, benchmark.json, the per-video
    and per-frame scores and the figure into the run; return the report."""
    run_dir = resolve(params.run_dir)
    checkpoint = load_model(run_dir, params.model_dir, params.onnx)
    check_test_sets(params.test_sets, checkpoint)  # every folder, before anything is written
    tests = [read_test_set(d) for d in params.test_sets]
    rows, videos = [], []
    with atomic_path(run_dir / paths.BENCHMARK_FRAMES) as tmp, open(
            tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FRAME_FIELDS)
        writer.writeheader()
        for test in tests:
            scores = score_test_set(checkpoint, test, writer, params.batch_size,
                                    params.num_workers, params.amp)
            these = video_rows(test, scores)
            videos += these
            rows += table_rows(test, scores, these, checkpoint.threshold, params.n_bootstrap)
    write_csv(run_dir / paths.BENCHMARK_VIDEOS, [
        {**v, **{f"p_fake_{rule}": "" if math.isnan(v[f"p_fake_{rule}"]) else
                 f"{v[f'p_fake_{rule}']:.6f}" for rule in VIDEO_RULES}} for v in videos],
        VIDEO_FIELDS)
    write_csv(run_dir / paths.BENCHMARK, [{k: _text(v) for k, v in r.items()} for r in rows],
              TABLE_FIELDS)
    # ONNX Runtime has no gradients: Grad-CAM reads the same folder's PyTorch weights.
    explained, grids = explain_test_sets(
        load_model(run_dir, params.model_dir) if params.onnx and params.n_explain else
        checkpoint, tests, params, run_dir)
    report = {"run": str(run_dir), "model": str(checkpoint.path),
              "scored_by": "ONNX Runtime" if params.onnx else "PyTorch",
              "threshold": checkpoint.threshold,
              "threshold_rule": checkpoint.threshold_rule,
              "test_sets": {t.name: str(resolve(d)) for t, d in zip(tests, params.test_sets,
                                                                     strict=True)},
              "rules": {"frame": "every face crop is one sample", **VIDEO_RULES},
              "interval": f"95% bootstrap interval of each metric ({params.n_bootstrap} "
                          "resamples; frame rows resample whole videos)",
              "headline": headline(rows), "rows": rows, "explanations": explained,
              "grids": grids}
    write_json(run_dir / paths.BENCHMARK_JSON, report)
    viz.save_figure(viz.plot_benchmark(rows), run_dir / paths.BENCHMARK_FIGURE)
    return report


def earlier_grids(run_dir: Path) -> list[Path]:
    """The grids of faces an earlier benchmark of the run wrote, as its benchmark.json
    lists them: plain PNG names inside benchmark_cams/ (any other name there is not ours)."""
    path = run_dir / paths.BENCHMARK_JSON
    try:
        listed = json.loads(path.read_text()).get("grids") if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    return [run_dir / paths.BENCHMARK_CAMS / name for name in listed or []
            if isinstance(name, str) and is_plain_name(name) and name.endswith(".png")]


def explain_test_sets(checkpoint: Checkpoint, tests: list[TestSet], params: BenchmarkParams,
                      run_dir: Path) -> tuple[list[dict], list[str]]:
    """The explanation rows (below), written beside the table with their figure and the
    grids of faces (their names returned, for benchmark.json); none with n_explain=0. What
    an earlier benchmark of the run wrote of these is removed first, and nothing else."""
    written = [run_dir / paths.BENCHMARK_EXPLANATIONS,
               run_dir / paths.BENCHMARK_EXPLANATIONS_FIGURE]
    grids = run_dir / paths.BENCHMARK_CAMS
    for path in [*written, *earlier_grids(run_dir)]:
        path.unlink(missing_ok=True)
    if not params.n_explain:
        return [], []
    layers = layers_of(checkpoint, params.layer, params.all_layers)
    rows, shown = explanation_rows(
        checkpoint, tests, params.n_explain, layers, params.batch_size, params.seed,
        params.n_bootstrap)
    write_csv(written[0], [{k: _text(v) for k, v in r.items()} for r in rows],
              EXPLANATION_FIELDS)
    if rows:
        viz.save_figure(viz.plot_explanations(rows, MEASURES), written[1])
    grids.mkdir(exist_ok=True)
    names = []
    for (test_set, method), overlays in shown.items():
        if overlays:
            names.append(f"{_safe(test_set)}-{_safe(method)}.png")
            viz.save_figure(viz.image_grid(overlays, [""] * len(overlays), ncols=4, title=(
                f"{test_set} · {method}: Grad-CAM for fake ({layers[0]}), mask outlined; "
                "faces drawn at random")), grids / names[-1])
    return rows, names


def _safe(name: str) -> str:
    """A name read from a manifest, fit to be part of a file name in one folder."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "_"


def record(params: BenchmarkParams) -> dict | None:
    """What run.json keeps of a finished 05-benchmark: each test set's video-level AUC under
    the mean rule, with its interval."""
    path = resolve(params.run_dir) / paths.BENCHMARK_JSON
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    rows = [r for r in report["rows"]
            if r["method"] == ALL and r["level"] == "video" and r["rule"] == "mean"]
    return {"video_auc": {r["test_set"]: r["auc"] for r in rows},
            "video_auc_ci": {r["test_set"]: [r["auc_low"], r["auc_high"]] for r in rows},
            "notes": {r["test_set"]: r["note"] for r in rows if r.get("note")},
            "explanations": report.get("explanations", [])}


def summary(record: dict) -> dict:
    """A run's headline numbers from 05-benchmark: each test set's video AUC, and where its
    explanations point (per test set, method and layer: each measure for the CAM and for
    random maps, the interval of their difference and its verdict)."""
    return {"test_video_auc": record.get("video_auc"),
            "test_video_auc_ci": record.get("video_auc_ci"),
            "test_video_notes": record.get("notes"),
            "test_explanations": {
                f"{r['test_set']} · {r['method']} · {r['layer']}": {
                    "masks": r["masks"], "n_crops": r["n_crops"],
                    **{m: {"cam": r[f"{m}_cam"], "random": r[f"{m}_random"],
                           "difference_ci": [r[f"{m}_low"], r[f"{m}_high"]],
                           "verdict": r[f"{m}_verdict"]} for m in MEASURES}}
                for r in record.get("explanations") or []} or None}


def summary_lines(summary: dict) -> list[str]:
    """05-benchmark's headline numbers in words."""
    intervals = summary.get("test_video_auc_ci") or {}
    notes = summary.get("test_video_notes") or {}
    return [f"test set {name}: video AUC {shown(auc, intervals.get(name))}"
            + (f" ({notes[name]})" if name in notes else "")
            + "; benchmark.csv has every level, rule and method"
            for name, auc in (summary.get("test_video_auc") or {}).items()] + [
        f"Grad-CAM on {name} ({row['n_crops']} crops, "
        f"{'self-blends' if row['masks'] == BLENDS else 'masks'}): pointing game "
        f"{row['pointing']['cam']:.3f} vs random {row['pointing']['random']:.3f}"
        + (f" ({row['pointing']['verdict']})" if row["pointing"]["verdict"] else "")
        + "; benchmark_explanations.csv has every measure"
        for name, row in (summary.get("test_explanations") or {}).items()]


def shown_lines(params: BenchmarkParams, report: dict) -> list[str]:
    """What the benchmark command prints: each test set's rows, and where the table is."""
    return [f"{r['test_set']} {r['method']} {r['level']} {r['rule']}: " + "  ".join(
            f"{TITLES[name]} {shown(r[name], [r[f'{name}_low'], r[f'{name}_high']])}"
            for name in NAMES) + f" ({r['n_videos']} videos, {r['n_frames']} frames)"
            + (f"; {r['note']}" if r["note"] else "") for r in report["rows"]] + [
        f"table: {from_here(resolve(params.run_dir) / paths.BENCHMARK)}"] + (
        [*explanation_lines(report["explanations"]), "explanations: " + from_here(
            resolve(params.run_dir) / paths.BENCHMARK_EXPLANATIONS)]
        if report.get("explanations") else [])


# -- where the explanations point ---------------------------------------------------------

# name: (what it is, lower is better)
MEASURES = {"pointing": ("pointing game", False), "energy": ("energy inside the mask", False),
            "iou": ("IoU of the top region", False), "deletion": ("deletion AUC", True)}
EXPLANATION_FIELDS = ["test_set", "dataset", "method", "masks", "layer", "n_crops", "n_videos",
                      *(f"{m}_{k}" for m in MEASURES
                        for k in ("cam", "random", "low", "high", "verdict")), "note"]
MASKS = "mask"  # the `masks` column: the crops' own masks, or self-blends standing in
BLENDS = "self-blend"
N_RANDOM = 3  # random maps drawn per crop, for each measure's baseline
SHOWN = 8  # faces per method in the figure of maps and masks


@dataclass
class Group:
    """The crops of one test set and method that are explained: how each is loaded."""

    test_set: str
    dataset: str
    method: str
    masks: str  # MASKS or BLENDS
    load: list  # per crop: (the model's input side) -> (RGB array, boolean mask at that side)
    videos: list[str]


@dataclass
class Scores:
    """Per crop, each measure for the CAM and for random maps (their mean)."""

    videos: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    shown: list[np.ndarray] = field(default_factory=list)  # overlays with the mask outlined

    def add(self, name: str, values: np.ndarray) -> None:
        self.values.setdefault(name, []).extend(float(v) for v in values)


def chosen(n_items: int, n: int, seed: int, key: str) -> list[int]:
    """Up to n of n_items indices, drawn at random from the seed and a group's name (so a
    group's choice does not depend on the others), in their order."""
    if n_items <= n:
        return list(range(n_items))
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return sorted(rng.choice(n_items, size=n, replace=False).tolist())


def _crop(sample: Sample):
    def load(size: int) -> tuple[np.ndarray, np.ndarray]:  # the mask as 03-gradcam reads it
        return np.array(load_image(sample.path)), load_mask(sample.mask, (size, size))
    return load


def _blend(blends: sbi.ValidationBlends, index: int):
    def load(size: int) -> tuple[np.ndarray, np.ndarray]:  # as 03-gradcam's self-blends
        image, _, mask = blends.image(index)
        return image, cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR) > 0
    return load


def explained_groups(test, n: int, seed: int) -> list[Group]:
    """What is explained on one test set (a `benchmark.TestSet`): up to n of its fakes with a
    mask per method, drawn at random; when none has a mask, up to n self-blends of its test
    reals with a face."""
    with_mask = [s for s in test.images.samples if s.label == 1 and s.mask is not None]
    if with_mask:
        by_method: dict[str, list[Sample]] = {}
        for sample in with_mask:
            by_method.setdefault(sample.method or ALL, []).append(sample)
        found = []
        for method, samples in sorted(by_method.items()):
            picked = [samples[i] for i in chosen(len(samples), n, seed, method)]
            found.append(Group(test.name, test.dataset, method, MASKS,
                               [_crop(s) for s in picked], [s.video for s in picked]))
        return found
    blends, _ = sbi.validation_blends(test.root, split="test")
    reals = len(blends.samples)
    picked = chosen(reals, n, seed, BLENDS)
    return [Group(test.name, test.dataset, BLENDS, BLENDS,
                  [_blend(blends, reals + i) for i in picked],
                  [blends.samples[i].video for i in picked])] if picked else []


def _batches(group: Group, batch_size: int, size: int) -> Iterator[tuple[list, list, list]]:
    for start in range(0, len(group.load), batch_size):
        loaded = [load(size) for load in group.load[start:start + batch_size]]
        yield ([image for image, _ in loaded], [mask for _, mask in loaded],
               group.videos[start:start + batch_size])


def explain_group(checkpoint: Checkpoint, group: Group, layer: str, batch_size: int,
                  seed: int, alpha: float = 0.5) -> Scores:
    """Every measure of a group's crops at one layer, a batch at a time; the overlays of
    its first SHOWN crops (drawn at random by `explained_groups`)."""
    size = checkpoint.image_size
    grid = checkpoint.arch.grid((size, size), layer)
    generator = torch.Generator().manual_seed(seed)
    scores = Scores()
    bar = tqdm(total=len(group.load), desc=f"explaining {group.test_set} {group.method}",
               unit="crop", leave=False)
    for images, masks, videos in _batches(group, batch_size, size):
        inputs, cams = explain(checkpoint, images, "fake", batch_size, layer)
        randoms = [random_maps(len(images), (size, size), grid, generator)
                   for _ in range(N_RANDOM)]
        drawn = [localization_scores(list(r), masks) for r in randoms]
        located = ("pointing", "iou", "energy")  # as localization_scores gives them
        for k, values in enumerate(localization_scores(list(cams.maps), masks)):
            scores.add(f"{located[k]}_cam", values)
            scores.add(f"{located[k]}_random", np.mean([d[k] for d in drawn], axis=0))
        per_cam, per_random, _, _ = deletion_areas(
            checkpoint.model, inputs, cams.maps, np.ones(len(images), int), randoms)
        scores.add("deletion_cam", per_cam)
        scores.add("deletion_random", per_random)
        scores.videos += videos
        for image, cam, mask in zip(images, cams.maps, masks, strict=True):
            if len(scores.shown) < SHOWN:
                face = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
                scores.shown.append(viz.outline(viz.overlay(face, cam, alpha), mask))
        bar.update(len(images))
    bar.close()
    return scores


def explanation_row(group: Group, layer: str, scores: Scores, n_resamples: int) -> dict:
    """A group's row: each measure for the CAM and random maps, the interval of their paired
    difference and its verdict; `note` says why an interval is missing."""
    base = {"test_set": group.test_set, "dataset": group.dataset, "method": group.method,
            "masks": group.masks, "layer": layer, "n_crops": len(scores.videos),
            "n_videos": len(set(scores.videos)), "note": ""}
    for name, (_, below) in MEASURES.items():
        cam, rand = (np.array(scores.values.get(f"{name}_{k}", []), float)
                     for k in ("cam", "random"))
        ci = mean_intervals(cam, rand, scores.videos, n_resamples)
        difference = ci.get("difference")
        base |= {f"{name}_cam": float(cam.mean()) if len(cam) else float("nan"),
                 f"{name}_random": float(rand.mean()) if len(rand) else float("nan"),
                 f"{name}_low": difference[0] if difference else float("nan"),
                 f"{name}_high": difference[1] if difference else float("nan"),
                 f"{name}_verdict": verdict(difference, below)}
        base["note"] = base["note"] or ci.get("unavailable", "")
    return base


def layers_of(checkpoint: Checkpoint, layer: str, every: bool) -> list[str]:
    """The layers explained: the one `layer` names (`auto` resolved), then, with `every`,
    the architecture's other Grad-CAM layers."""
    first = checkpoint.arch.layer_for(layer, (checkpoint.image_size,) * 2)
    return [first, *(name for name in archs.CAM_LAYERS if every and name != first)]


def explanation_rows(checkpoint: Checkpoint, tests: Sequence, n: int, layers: Sequence[str],
                     batch_size: int, seed: int, n_resamples: int
                     ) -> tuple[list[dict], dict[tuple[str, str], list[np.ndarray]]]:
    """The explanation rows of every test set (a row per method and layer, and one for all
    methods together when there are several), and the overlays each figure shows, by
    (test set, method), at the first layer."""
    rows, shown = [], {}
    for test in tests:
        found = explained_groups(test, n, seed)
        for k, name in enumerate(layers):
            together = Scores()
            for group in found:
                scores = explain_group(checkpoint, group, name, batch_size, seed)
                rows.append(explanation_row(group, name, scores, n_resamples))
                if k == 0:
                    shown[test.name, group.method] = scores.shown
                together.videos += scores.videos
                for key, values in scores.values.items():
                    together.add(key, np.array(values))
            if len(found) > 1:
                everything = Group(test.name, test.dataset, ALL, found[0].masks, [], [])
                rows.append(explanation_row(everything, name, together, n_resamples))
    return rows, shown


def explanation_lines(rows: Sequence[dict]) -> list[str]:
    """The rows in words: per test set, method and layer, each measure CAM against random
    with the verdict of their paired difference."""
    said = []
    for r in rows:
        masks = "self-blends" if r["masks"] == BLENDS else "masks"
        said.append(f"{r['test_set']} {r['method']} ({r['n_crops']} crops, {masks}, layer "
                    f"{r['layer']}): " + "; ".join(
                        f"{title} {r[f'{m}_cam']:.3f} vs random {r[f'{m}_random']:.3f}"
                        + (f" ({r[f'{m}_verdict']})" if r[f"{m}_verdict"] else "")
                        for m, (title, _) in MEASURES.items())
                    + (f"; {r['note']}" if r["note"] else ""))
    return said
