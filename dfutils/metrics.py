"""The numbers this field reports, from scikit-learn where it has them, each with its 95%
bootstrap interval: `NAMES` lists them once for every table, line and record that shows
them; `video_scores` is the one place a video gets its P(fake) from its frames'; `assess`
is the one evaluation of scored images (frame level, then video level).

Inputs are labels (fake = 1) and scores P(fake).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from sklearn import metrics as skm

# The metrics reported everywhere, in the order they are shown: what `binary_metrics`
# computes, what each interval bounds, what printed lines, run records and tables show.
NAMES = ("auc", "ap", "eer", "accuracy")
TITLES = {"auc": "AUC", "ap": "AP", "eer": "EER", "accuracy": "accuracy"}
THRESHOLD_RULES = ("0.5", "eer")  # the decision threshold: fixed 0.5, or the validation EER
# Video-level rules: how a video's P(fake) comes from its frames' (`video_scores`).
VIDEO_RULES = {
    "mean": "video P(fake) = mean of its frames'; videos without a face left out (n_no_face)",
    "sbi": "per frame the highest P(fake) among faces >= half the largest, then the mean; a "
           "video without a face scores 0.5"}
NO_FACE_SCORE = 0.5  # the SBI rule's score of a video without a face


def _both_classes(labels: np.ndarray) -> bool:
    return len(np.unique(labels)) == 2


def eer(labels, scores) -> tuple[float, float]:
    """Equal error rate and the threshold where false-positive and false-negative rates meet.

    Taken at the ROC point where |FPR - FNR| is smallest; the rate is their mean there.
    NaN for both when only one class is present.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    if not _both_classes(labels):
        return math.nan, math.nan
    fpr, tpr, thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    i = int(np.nanargmin(np.abs(fpr - fnr)))
    # roc_curve's first threshold is +inf (nothing predicted fake); cap it at 1.
    return float((fpr[i] + fnr[i]) / 2), float(min(thresholds[i], 1.0))


def choose_threshold(rule: str, labels, scores) -> float:
    """The decision threshold on P(fake): 0.5, or the validation EER threshold."""
    if rule == "0.5":
        return 0.5
    if rule == "eer":
        _, threshold = eer(labels, scores)
        return 0.5 if math.isnan(threshold) else threshold
    raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, "
                     f"got {rule!r}")


def binary_metrics(labels, scores, threshold: float = 0.5) -> dict:
    """Accuracy and confusion at `threshold`; ROC-AUC, AP and EER over all thresholds."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    both = _both_classes(labels)
    rate, eer_threshold = eer(labels, scores)
    return {
        "n": int(len(labels)),
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, predicted)) if len(labels) else math.nan,
        "auc": float(skm.roc_auc_score(labels, scores)) if both else math.nan,
        "ap": float(skm.average_precision_score(labels, scores)) if both else math.nan,
        "eer": rate,
        "eer_threshold": eer_threshold,
        # rows = true class, columns = predicted class, order (real, fake)
        "confusion": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def video_scores(videos, labels, scores, rule: str = "mean", frames=None, areas=None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One entry per video (a clip's frames, or an image alone): its name, its label and its
    P(fake) by `rule` (VIDEO_RULES): "mean" of its frames' (as DeepfakeBench scores), or
    "sbi": per frame (`frames`, -1 when unknown) the highest P(fake) among the faces at
    least half the size (`areas`) of the frame's largest, then the mean over frames (as
    the Self-Blended Images evaluation does). Videos in the order of their names."""
    videos, labels = np.asarray(videos), np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    names, inverse = np.unique(videos, return_inverse=True)
    counts = np.bincount(inverse)
    label = np.bincount(inverse, weights=labels) / counts
    if not np.all((label == 0) | (label == 1)):
        raise ValueError("a video holds both real and fake images")
    if rule == "mean":
        return names, label.astype(int), np.bincount(inverse, weights=scores) / counts
    if rule != "sbi":
        raise ValueError(f"video rule must be one of {', '.join(VIDEO_RULES)}, got {rule!r}")
    frames = np.full(len(videos), -1) if frames is None else np.asarray(frames)
    areas = np.ones(len(videos)) if areas is None else np.asarray(areas, dtype=float)
    per_video = [[] for _ in names]
    for k, (v, frame) in enumerate(zip(inverse, frames, strict=True)):
        per_video[v].append((frame if frame >= 0 else -1 - k, areas[k], scores[k]))
    return names, label.astype(int), np.array([_sbi_score(f) for f in per_video])


def _sbi_score(faces: list[tuple[int, float, float]]) -> float:
    """The SBI rule for one video's faces (frame, area, P(fake))."""
    by_frame: dict[int, list[tuple[float, float]]] = {}
    for frame, area, p in faces:
        by_frame.setdefault(frame, []).append((area, p))
    per_frame = [max(p for a, p in found if a >= max(a for a, _ in found) / 2)
                 for found in by_frame.values()]
    return float(np.mean(per_frame))


def grouped(groups) -> bool:
    """Whether any group holds more than one image (else video-level equals frame-level)."""
    return groups is not None and len(np.unique(np.asarray(groups))) < len(groups)


def video_metrics(videos, labels, scores, threshold: float = 0.5) -> dict:
    """binary_metrics over videos, each scored by its mean P(fake)."""
    _, label, mean = video_scores(videos, labels, scores)
    return binary_metrics(label, mean, threshold)


def calibration_bins(labels, scores, n_bins: int = 15) -> list[dict]:
    """Per equal-width bin of P(fake): its range, image count, mean P(fake), fraction fake."""
    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    which = np.clip((scores * n_bins).astype(int), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = which == b
        bins.append({"low": b / n_bins, "high": (b + 1) / n_bins, "n": int(members.sum()),
                     "mean_p_fake": float(scores[members].mean()) if members.any() else None,
                     "fraction_fake": float(labels[members].mean()) if members.any() else None})
    return bins


def expected_calibration_error(labels, scores, n_bins: int = 15) -> float:
    """ECE of P(fake): bin-weighted mean |fraction fake - mean P(fake)| over equal-width bins."""
    bins = [b for b in calibration_bins(labels, scores, n_bins) if b["n"]]
    total = sum(b["n"] * abs(b["fraction_fake"] - b["mean_p_fake"]) for b in bins)
    return float(total / max(sum(b["n"] for b in bins), 1))


BOOTSTRAP_SEED = 0  # every interval is drawn with this seed: the same data, the same interval
LEVEL = 0.95
# The fewest resampled units (videos; an image that is no clip's frame is its own) of each
# class for which an interval is given. With k units of a class a resample of it has only
# C(2k-1, k) compositions: 1 for k = 1 (every resample the same pair, a zero-width
# interval that claims certainty), 3 for k = 2, 10 for k = 3, 126 for k = 5. Below 5 the
# 2.5th and 97.5th percentiles of so few distinct resamples mean little, so none is given.
MIN_UNITS = 5
CLASS_NAMES = ("real", "fake")  # label 0, label 1


def too_few(labels, clusters) -> str:
    """Why no bootstrap interval can be given for these labels (too few units of a class,
    or one class only), or "" when one can."""
    labels = np.asarray(labels).astype(int)
    units = np.arange(len(labels)) if clusters is None else np.asarray(clusters)
    counts = [len(np.unique(units[labels == value])) for value in (0, 1)]
    short = [f"{k} {name}{'s' if k != 1 else ''}" for k, name in zip(counts, CLASS_NAMES,
                                                                    strict=True)
             if k < MIN_UNITS]
    if not short:
        return ""
    return (f"only {' and '.join(short)} to resample (a clip's frames count once); an "
            f"interval needs {MIN_UNITS} of each class")


def resamples(n: int, clusters=None, seed: int = BOOTSTRAP_SEED) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n items as integer weights (how often each item is drawn).

    With `clusters` (a name per item: its video), whole clusters are drawn, by their names
    in sorted order: the frames of one video are not independent evidence, and drawing them
    one by one would give intervals far too narrow; and the same items in another order get
    the same interval. Without, each item is drawn alone, in the order given. Endless: the
    caller takes what it needs.
    """
    names, cluster = np.unique(np.arange(n) if clusters is None else np.asarray(clusters),
                               return_inverse=True)
    rng = np.random.default_rng(seed)
    while True:
        yield np.bincount(rng.integers(0, len(names), len(names)),
                          minlength=len(names))[cluster]


def percentile_interval(values: Sequence[float], level: float = LEVEL) -> list[float]:
    """[low, high]: the central `level` of bootstrap values ([nan, nan] when none)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return [math.nan, math.nan]
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def binary_intervals(labels, scores, threshold: float, clusters, n_resamples: int
                     ) -> dict[str, list[float] | str]:
    """95% percentile-bootstrap intervals of every metric of NAMES (whole clusters drawn
    when `clusters` names them); resamples that lack a class are drawn again. With too few
    units of a class (`too_few`) every interval is [nan, nan] and "unavailable" says why."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    why = too_few(labels, clusters)
    if why:
        return {**{k: [math.nan, math.nan] for k in NAMES}, "unavailable": why}
    correct = ((scores >= threshold).astype(int) == labels).astype(float)
    drawn: dict[str, list[float]] = {k: [] for k in NAMES}
    for weights in resamples(len(labels), clusters):
        if not _both_classes(labels[weights > 0]):
            continue
        fpr, tpr, _ = skm.roc_curve(labels, scores, sample_weight=weights)
        i = int(np.nanargmin(np.abs(fpr - (1 - tpr))))
        drawn["accuracy"].append(float(np.average(correct, weights=weights)))
        drawn["auc"].append(float(skm.auc(fpr, tpr)))
        drawn["ap"].append(float(skm.average_precision_score(labels, scores,
                                                             sample_weight=weights)))
        drawn["eer"].append(float((fpr[i] + 1 - tpr[i]) / 2))
        if len(drawn["auc"]) == n_resamples:
            break
    return {k: percentile_interval(v) for k, v in drawn.items()}


def with_intervals(metrics: dict, labels, scores, clusters, n_resamples: int) -> dict:
    """binary_metrics' result with `ci`: the interval of each metric of NAMES."""
    return {**metrics, "ci": binary_intervals(labels, scores, metrics["threshold"], clusters,
                                              n_resamples)}


def mean_intervals(values: np.ndarray, baseline: np.ndarray | None, clusters,
                   n_resamples: int) -> dict[str, list[float]]:
    """Intervals of the mean of per-item values (a hit, a deletion AUC), and with a paired
    baseline (the same items under random maps) of the baseline's mean and of the mean
    difference: `difference` excludes 0 when the two really differ."""
    values = np.asarray(values, dtype=float)
    if not len(values):
        return {}
    units = len(np.unique(np.arange(len(values)) if clusters is None else clusters))
    if units < MIN_UNITS:
        return {"unavailable": f"only {units} to resample (a clip's images count once); an "
                               f"interval needs {MIN_UNITS}"}
    drawn: dict[str, list[float]] = {"mean": [], "baseline": [], "difference": []}
    for weights, _ in zip(resamples(len(values), clusters), range(n_resamples), strict=False):
        drawn["mean"].append(float(np.average(values, weights=weights)))
        if baseline is not None:
            drawn["baseline"].append(float(np.average(baseline, weights=weights)))
            drawn["difference"].append(drawn["mean"][-1] - drawn["baseline"][-1])
    return {k: percentile_interval(v) for k, v in drawn.items() if v}


def assess(labels, scores, videos, threshold: float, n_resamples: int) -> dict:
    """The one evaluation of scored images: binary_metrics at `threshold` with the 95%
    bootstrap interval of each (whole videos resampled; an image that is no clip's frame
    is its own video), and, when a video holds several images, the same per video (its
    frames' mean P(fake)) under "video"."""
    videos = np.asarray(videos)
    metrics = with_intervals(binary_metrics(labels, scores, threshold), labels, scores,
                             videos, n_resamples)
    if grouped(videos):
        names, label, mean = video_scores(videos, labels, scores)
        metrics["video"] = with_intervals(binary_metrics(label, mean, threshold), label, mean,
                                          names, n_resamples)
    return metrics


def subgroups(labels, names, reals: str, among: Sequence[str] | None = None
              ) -> dict[str, np.ndarray]:
    """The images of each subgroup, as boolean masks, by the one rule of a kind: per
    source folder (`reals="own"`: its fakes against its own reals, a combined split's
    data sets one by one), or per manipulation method (`reals="all"`: its fakes against
    every real, as FF++'s originals are shared by its methods). `names` is each image's
    source folder or method; images without one ("") make no subgroup. `among`: the
    subgroups to make (default: every name found; for a method, among the fakes)."""
    labels, names = np.asarray(labels).astype(int), np.asarray(names)
    if among is None:
        among = sorted(set((names[labels == 1] if reals == "all" else names).tolist()) - {""})
    every_real = labels == 0 if reals == "all" else np.zeros(len(labels), dtype=bool)
    return {name: (names == name) | every_real for name in among}


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def shown(value: float | None, interval: Sequence[float] | None, digits: int = 3) -> str:
    """A number with its interval, as every printed summary shows it: `0.563 [0.41, 0.71]`;
    an undefined one (an AUC of one class) as such."""
    if _missing(value):
        return "undefined"
    if interval is None or any(_missing(v) for v in interval):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def headline(prefix: str, metrics: dict) -> dict:
    """A run summary's entries of one set of metrics: <prefix>_<name> and its interval,
    <prefix>_<name>_ci, for every name of NAMES (None where not measured)."""
    intervals = metrics.get("ci") or {}
    return {key: value for name in NAMES for key, value in (
        (f"{prefix}_{name}", metrics.get(name)), (f"{prefix}_{name}_ci", intervals.get(name)))}


def headline_line(prefix: str, summary: dict) -> str:
    """`AUC 0.563 [0.41, 0.71]  AP ...` of a summary's entries with `prefix` (`headline`)."""
    return metrics_line({**{name: summary.get(f"{prefix}_{name}") for name in NAMES},
                         "ci": {name: summary.get(f"{prefix}_{name}_ci") for name in NAMES}})


def metrics_line(metrics: dict, keys: Sequence[str] = NAMES) -> str:
    """`AUC 0.563 [0.41, 0.71]  AP ...`: binary_metrics' numbers with their intervals."""
    intervals = metrics.get("ci") or {}
    line = "  ".join(f"{TITLES[k]} {shown(metrics[k], intervals.get(k))}" for k in keys
                     if k in metrics)
    return line + (f"  (no intervals: {intervals['unavailable']})"
                   if intervals.get("unavailable") else "")
