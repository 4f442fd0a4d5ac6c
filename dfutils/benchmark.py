"""The cross-dataset table (05-benchmark): one trained run scored on the test splits of one
or more prepared data sets, per frame and per video, per test set and per FF++ method.

Frame level: every face crop is one sample. Video level, two rules, each named in its row:
"mean" (a video's P(fake) is the mean of its frames', as DeepfakeBench scores; videos
without a face are left out and counted) and "sbi" (per frame the highest P(fake) among
the faces at least half the size of the frame's largest, then the mean over frames; a
video without a face scores 0.5 and is counted, as the Self-Blended Images evaluation
does). The faces step keeps the most confident face of each frame, so on its crops the
two rules differ by the videos without a face; the size rule matters for crops made
otherwise.

Scoring is streamed: crops are loaded a batch at a time and every frame's score goes to
benchmark_frames.csv as it comes, so memory holds one float per frame, never an image
more than a batch.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dfutils import LABELS, files
from dfutils.data import read_manifest
from dfutils.distributed import device as default_device
from dfutils.metrics import binary_metrics, bootstrap_auc
from dfutils.model import Checkpoint, for_inference, forward, load_checkpoint
from dfutils.params import Amp, BenchmarkParams
from dfutils.paths import atomic_path, resolve, write_csv, write_json
from dfutils.progress import tqdm
from dfutils.split import read_report

FRAME_FIELDS = ["test_set", "dataset", "method", "label", "video", "frame", "path", "p_fake"]
VIDEO_FIELDS = ["test_set", "dataset", "method", "label", "video", "n_frames", "p_fake_mean",
                "p_fake_sbi"]
TABLE_FIELDS = ["test_set", "dataset", "method", "level", "rule", "auc", "auc_low",
                "auc_high", "ap", "eer", "accuracy", "n_videos", "n_frames", "n_no_face"]
LEVELS = (("frame", "-"), ("video", "mean"), ("video", "sbi"))
NO_FACE_SCORE = 0.5  # the SBI rule's score of a video without a face
ALL = "all"  # the row of a whole test set; other rows are one method's fakes with all reals


@dataclass
class TestSet:
    """The test split of one prepared data set: its crops and its videos without a face."""

    name: str  # the split folder's name, unique among the test sets
    dataset: str  # the data set it was made from ("folder" for real/ + fake/)
    paths: list[Path]
    labels: np.ndarray  # fake = 1
    videos: list[str]
    methods: list[str]  # a crop's manipulation ("" for reals and plain folders)
    frames: list[int]  # its frame in the clip (-1 when unknown)
    areas: np.ndarray  # its face box area (1 when unknown)
    faceless: list[dict] = field(default_factory=list)  # {"source", "label", "method"}


def read_test_set(data_dir: str | os.PathLike, name: str | None = None) -> TestSet:
    """The test rows of a split made by 01-split, with the frame and face size of each
    crop (its faces.csv) and the split's test videos without a face; ValueError naming the
    folder when it has no test split."""
    root = resolve(data_dir)
    samples = read_manifest(root, "test")
    if not samples:
        raise ValueError(f"the split in {root} has no test images: split a data set with an "
                         "official test list (dataset=ffpp, dfd, celebdf or dfdc) or give "
                         "TEST_FRACTION= to `make split`")
    faces: dict[str, dict] = {}
    if (root / files.FACES).is_file():
        with open(root / files.FACES, newline="") as f:
            faces = {r["path"]: r for r in csv.DictReader(f)}
    report = read_report(root) or {}
    rel = [s.path.relative_to(root).as_posix() for s in samples]

    def area(path: str) -> float:
        box = json.loads(faces[path]["box"]) if path in faces else None
        return float((box[2] - box[0]) * (box[3] - box[1])) if box else 1.0

    return TestSet(
        name=name or root.name,
        dataset=((report.get("faces") or {}).get("dataset") or "folder"),
        paths=[s.path for s in samples], labels=np.array([s.label for s in samples]),
        videos=[s.video for s in samples], methods=[s.method for s in samples],
        frames=[int(faces[p]["frame"]) if p in faces else -1 for p in rel],
        areas=np.array([area(p) for p in rel]),
        faceless=[f for f in report.get("faceless", []) if f["split"] == "test"])


def score_stream(checkpoint: Checkpoint, test: TestSet, writer: csv.DictWriter,
                 batch_size: int = 32, num_workers: int = 0, amp: Amp = "off") -> np.ndarray:
    """P(fake) of every crop of `test`, a batch at a time, each frame's row written as it
    is scored; NaN (and no row) where a crop cannot be read."""
    from dfutils.inference import FileDataset

    device = default_device()
    model = for_inference(checkpoint.model, device)
    loader = DataLoader(FileDataset(test.paths, checkpoint.image_size,
                                    arch=checkpoint.params.arch),
                        batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    scores = np.full(len(test.paths), np.nan, dtype=np.float32)
    for images, indices, errors in tqdm(loader, desc=test.name, unit="batch"):
        with torch.inference_mode():
            p_fake = forward(model, images, device, amp)[1].cpu().numpy()
        for i, p, error in zip(indices.tolist(), p_fake, errors, strict=True):
            if error:
                continue
            scores[i] = p
            writer.writerow({"test_set": test.name, "dataset": test.dataset,
                             "method": test.methods[i], "label": int(test.labels[i]),
                             "video": test.videos[i], "frame": test.frames[i],
                             "path": str(test.paths[i]), "p_fake": f"{p:.6f}"})
    return scores


def sbi_video_score(frames: Sequence[int], areas: Sequence[float], scores: Sequence[float]
                    ) -> float:
    """The SBI rule for one video's faces: per frame, the highest P(fake) among the faces at
    least half the size of the frame's largest; then the mean over frames."""
    by_frame: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for k, (frame, a, p) in enumerate(zip(frames, areas, scores, strict=True)):
        by_frame[frame if frame >= 0 else -1 - k].append((a, p))  # unknown frame: its own
    per_frame = []
    for faces in by_frame.values():
        largest = max(a for a, _ in faces)
        per_frame.append(max(p for a, p in faces if a >= largest / 2))
    return float(np.mean(per_frame))


def video_rows(test: TestSet, scores: np.ndarray) -> list[dict]:
    """One row per video: its frames scored, the mean rule's and the SBI rule's P(fake);
    videos without a face have no mean score and 0.5 under the SBI rule."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, video in enumerate(test.videos):
        if not math.isnan(scores[i]):
            members[video].append(i)
    rows = []
    for video, index in members.items():
        first = index[0]
        rows.append({
            "test_set": test.name, "dataset": test.dataset, "method": test.methods[first],
            "label": int(test.labels[first]), "video": video, "n_frames": len(index),
            "p_fake_mean": float(scores[index].mean()),
            "p_fake_sbi": sbi_video_score([test.frames[i] for i in index], test.areas[index],
                                          scores[index])})
    for clip in test.faceless:
        rows.append({"test_set": test.name, "dataset": test.dataset, "method": clip["method"],
                     "label": LABELS[clip["label"]], "video": clip["source"], "n_frames": 0,
                     "p_fake_mean": math.nan, "p_fake_sbi": NO_FACE_SCORE})
    return rows


def _row(base: dict, labels, scores, threshold: float, clusters, n_resamples: int) -> dict:
    m = binary_metrics(labels, scores, threshold)
    low, high = bootstrap_auc(labels, scores, clusters, n_resamples)
    return {**base, "auc": m["auc"], "auc_low": low, "auc_high": high, "ap": m["ap"],
            "eer": m["eer"], "accuracy": m["accuracy"]}


def table_rows(test: TestSet, scores: np.ndarray, videos: list[dict], threshold: float,
               n_resamples: int = 1000) -> list[dict]:
    """The table's rows of one test set: for the whole set and for each manipulation (its
    fakes against every real), a frame-level row and a video-level row per rule."""
    ok = ~np.isnan(scores)
    methods = sorted({m for m, y in zip(test.methods, test.labels, strict=True) if m and y}
                     | {v["method"] for v in videos if v["method"] and v["label"]})
    rows = []
    for method in [ALL, *methods] if len(methods) > 1 else [ALL]:
        def chosen(m: str, label: int, method: str = method) -> bool:
            return method == ALL or label == 0 or m == method
        frame = ok & np.array([chosen(m, y) for m, y in zip(test.methods, test.labels,
                                                            strict=True)])
        picked = [v for v in videos if chosen(v["method"], v["label"])]
        with_face = [v for v in picked if v["n_frames"]]
        base = {"test_set": test.name, "dataset": test.dataset, "method": method,
                "n_frames": int(frame.sum()), "n_no_face": len(picked) - len(with_face)}
        rows.append(_row({**base, "level": "frame", "rule": "-",
                          "n_videos": len({test.videos[i] for i in np.flatnonzero(frame)})},
                         test.labels[frame], scores[frame], threshold,
                         np.asarray(test.videos)[frame], n_resamples))
        for rule, chosen_videos in (("mean", with_face), ("sbi", picked)):
            rows.append(_row({**base, "level": "video", "rule": rule,
                              "n_videos": len(chosen_videos)},
                             [v["label"] for v in chosen_videos],
                             [v[f"p_fake_{rule}"] for v in chosen_videos], threshold, None,
                             n_resamples))
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
    from dfutils import viz

    run_dir = resolve(params.run_dir)
    checkpoint = load_checkpoint(run_dir / files.MODEL)
    tests = [read_test_set(d) for d in params.test_sets]  # every folder checked first
    names = [t.name for t in tests]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"two test sets are folders named {duplicated[0]!r}: their rows "
                         "could not be told apart; give each split folder its own name")
    rows, videos = [], []
    with atomic_path(run_dir / files.BENCHMARK_FRAMES) as tmp, open(
            tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FRAME_FIELDS)
        writer.writeheader()
        for test in tests:
            scores = score_stream(checkpoint, test, writer, params.batch_size,
                                  params.num_workers, params.amp)
            these = video_rows(test, scores)
            videos += these
            rows += table_rows(test, scores, these, checkpoint.threshold, params.n_bootstrap)
    write_csv(run_dir / files.BENCHMARK_VIDEOS, [
        {**v, "p_fake_mean": "" if math.isnan(v["p_fake_mean"]) else f"{v['p_fake_mean']:.6f}",
         "p_fake_sbi": f"{v['p_fake_sbi']:.6f}"} for v in videos], VIDEO_FIELDS)
    write_csv(run_dir / files.BENCHMARK, [{k: _text(v) for k, v in r.items()} for r in rows],
              TABLE_FIELDS)
    report = {"run": str(run_dir), "threshold": checkpoint.threshold,
              "threshold_rule": checkpoint.threshold_rule,
              "test_sets": {t.name: str(resolve(d)) for t, d in zip(tests, params.test_sets,
                                                                     strict=True)},
              "rules": {"frame": "every face crop is one sample",
                        "mean": "video P(fake) = mean of its frames'; videos without a face "
                                "left out (n_no_face)",
                        "sbi": "per frame the highest P(fake) among faces >= half the largest, "
                               "then the mean; a video without a face scores 0.5"},
              "interval": f"95% bootstrap interval of the AUC ({params.n_bootstrap} "
                          "resamples; frame rows resample whole videos)",
              "headline": headline(rows), "rows": rows}
    write_json(run_dir / files.BENCHMARK_JSON, report)
    viz.save_figure(viz.plot_benchmark(rows), run_dir / files.BENCHMARK_FIGURE)
    return report
