"""The numbers this field reports, from scikit-learn where it has them.

Inputs are labels (fake = 1) and scores P(fake).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from sklearn import metrics as skm

from dfutils.params import ThresholdRule, choices


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


def choose_threshold(rule: ThresholdRule, labels, scores) -> float:
    """The decision threshold on P(fake): 0.5, or the validation EER threshold."""
    if rule == "0.5":
        return 0.5
    if rule == "eer":
        _, threshold = eer(labels, scores)
        return 0.5 if math.isnan(threshold) else threshold
    raise ValueError(f"threshold rule must be one of {', '.join(choices(ThresholdRule))}, "
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


def by_group(groups, labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One entry per group (a video, when a group is a clip's frames): its name, its label
    and its P(fake), the mean of its members' (as video-level scores are usually made)."""
    groups, labels = np.asarray(groups), np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    names, inverse = np.unique(groups, return_inverse=True)
    counts = np.bincount(inverse)
    mean = np.bincount(inverse, weights=scores) / counts
    label = np.bincount(inverse, weights=labels) / counts
    if not np.all((label == 0) | (label == 1)):
        raise ValueError("a group holds both real and fake images")
    return names, label.astype(int), mean


def grouped(groups) -> bool:
    """Whether any group holds more than one image (else video-level equals frame-level)."""
    return groups is not None and len(np.unique(np.asarray(groups))) < len(groups)


def video_metrics(groups, labels, scores, threshold: float = 0.5) -> dict:
    """binary_metrics over groups, each scored by its mean P(fake)."""
    _, label, mean = by_group(groups, labels, scores)
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


def resamples(n: int, clusters=None, n_resamples: int = 1000, seed: int = BOOTSTRAP_SEED
              ) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n items as integer weights (how often each item is drawn).

    With `clusters` (a video per frame), whole clusters are drawn: the frames of one video
    are not independent evidence, and drawing them one by one would give intervals far too
    narrow. Endless: the caller takes what it needs.
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


def binary_intervals(labels, scores, threshold: float = 0.5, clusters=None,
                     n_resamples: int = 1000) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals of accuracy, AUC, AP and EER (clustered by video
    when `clusters` is given); resamples that lack a class are drawn again."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    keys = ("accuracy", "auc", "ap", "eer")
    if not _both_classes(labels):
        return {k: [math.nan, math.nan] for k in keys}
    correct = ((scores >= threshold).astype(int) == labels).astype(float)
    drawn: dict[str, list[float]] = {k: [] for k in keys}
    for weights in resamples(len(labels), clusters, n_resamples):
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


def with_intervals(metrics: dict, labels, scores, clusters=None, n_resamples: int = 1000
                   ) -> dict:
    """binary_metrics' result with `ci`: the intervals of its accuracy, AUC, AP and EER."""
    return {**metrics, "ci": binary_intervals(labels, scores, metrics["threshold"], clusters,
                                              n_resamples)}


def mean_intervals(values: np.ndarray, baseline: np.ndarray | None = None, clusters=None,
                   n_resamples: int = 1000) -> dict[str, list[float]]:
    """Intervals of the mean of per-item values (a hit, a deletion AUC), and with a paired
    baseline (the same items under random maps) of the baseline's mean and of the mean
    difference: `difference` excludes 0 when the two really differ."""
    values = np.asarray(values, dtype=float)
    if not len(values):
        return {}
    drawn: dict[str, list[float]] = {"mean": [], "baseline": [], "difference": []}
    for weights, _ in zip(resamples(len(values), clusters), range(n_resamples), strict=False):
        drawn["mean"].append(float(np.average(values, weights=weights)))
        if baseline is not None:
            drawn["baseline"].append(float(np.average(baseline, weights=weights)))
            drawn["difference"].append(drawn["mean"][-1] - drawn["baseline"][-1])
    return {k: percentile_interval(v) for k, v in drawn.items() if v}


def bootstrap_auc(labels, scores, clusters=None, n_resamples: int = 1000) -> list[float]:
    """The 95% bootstrap interval of the ROC-AUC (clustered by video when given)."""
    return binary_intervals(labels, scores, 0.5, clusters, n_resamples)["auc"]


def shown(value: float, interval: Sequence[float] | None, digits: int = 3) -> str:
    """A number with its interval, as every printed summary shows it: `0.563 [0.41, 0.71]`."""
    if interval is None or any(math.isnan(v) for v in interval):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.2f}, {interval[1]:.2f}]"


NAMES = {"auc": "AUC", "ap": "AP", "eer": "EER", "accuracy": "accuracy"}


def metrics_line(metrics: dict, keys: Sequence[str] = ("auc", "ap", "eer", "accuracy")) -> str:
    """`AUC 0.563 [0.41, 0.71]  AP ...`: binary_metrics' numbers with their intervals."""
    intervals = metrics.get("ci") or {}
    return "  ".join(f"{NAMES[k]} {shown(metrics[k], intervals.get(k))}" for k in keys
                     if metrics.get(k) is not None)
