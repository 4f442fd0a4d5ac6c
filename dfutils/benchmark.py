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
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfutils import paths, viz
from dfutils.atomic import atomic_path, write_csv, write_json
from dfutils.datasets import LABELS
from dfutils.manifest import (
    LabelledSet,
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
    shown,
    subgroups,
    video_scores,
    with_intervals,
)
from dfutils.model import Checkpoint, load_checkpoint
from dfutils.params import BenchmarkParams
from dfutils.paths import from_here, resolve
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
    return TestSet(root.name, dataset_of(root), labelled_set(root, "test"))


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
    checkpoint = load_checkpoint(run_dir / paths.MODEL)
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
    report = {"run": str(run_dir), "threshold": checkpoint.threshold,
              "threshold_rule": checkpoint.threshold_rule,
              "test_sets": {t.name: str(resolve(d)) for t, d in zip(tests, params.test_sets,
                                                                     strict=True)},
              "rules": {"frame": "every face crop is one sample", **VIDEO_RULES},
              "interval": f"95% bootstrap interval of each metric ({params.n_bootstrap} "
                          "resamples; frame rows resample whole videos)",
              "headline": headline(rows), "rows": rows}
    write_json(run_dir / paths.BENCHMARK_JSON, report)
    viz.save_figure(viz.plot_benchmark(rows), run_dir / paths.BENCHMARK_FIGURE)
    return report


def record(params: BenchmarkParams) -> dict | None:
    """What run.json keeps of a finished 05-benchmark: each test set's video-level AUC under
    the mean rule, with its interval."""
    path = resolve(params.run_dir) / paths.BENCHMARK_JSON
    if not path.is_file():
        return None
    rows = [r for r in json.loads(path.read_text())["rows"]
            if r["method"] == ALL and r["level"] == "video" and r["rule"] == "mean"]
    return {"video_auc": {r["test_set"]: r["auc"] for r in rows},
            "video_auc_ci": {r["test_set"]: [r["auc_low"], r["auc_high"]] for r in rows},
            "notes": {r["test_set"]: r["note"] for r in rows if r.get("note")}}


def summary(record: dict) -> dict:
    """A run's headline numbers from 05-benchmark."""
    return {"test_video_auc": record.get("video_auc"),
            "test_video_auc_ci": record.get("video_auc_ci"),
            "test_video_notes": record.get("notes")}


def summary_lines(summary: dict) -> list[str]:
    """05-benchmark's headline numbers in words."""
    intervals = summary.get("test_video_auc_ci") or {}
    notes = summary.get("test_video_notes") or {}
    return [f"test set {name}: video AUC {shown(auc, intervals.get(name))}"
            + (f" ({notes[name]})" if name in notes else "")
            + "; benchmark.csv has every level, rule and method"
            for name, auc in (summary.get("test_video_auc") or {}).items()]


def shown_lines(params: BenchmarkParams, report: dict) -> list[str]:
    """What the benchmark command prints: each test set's rows, and where the table is."""
    return [f"{r['test_set']} {r['method']} {r['level']} {r['rule']}: " + "  ".join(
            f"{TITLES[name]} {shown(r[name], [r[f'{name}_low'], r[f'{name}_high']])}"
            for name in NAMES) + f" ({r['n_videos']} videos, {r['n_frames']} frames)"
            + (f"; {r['note']}" if r["note"] else "") for r in report["rows"]] + [
        f"table: {from_here(resolve(params.run_dir) / paths.BENCHMARK)}"]
