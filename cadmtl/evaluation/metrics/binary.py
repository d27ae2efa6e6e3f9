"""Image-level binary scores: exact, tie-aware AUROC / AP / F1-max, threshold calibration (F1-max or a target
false-positive rate) and the OK / NG verdict metrics. `cadmtl.anomaly.metrics` builds on these too."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .base import _as_numpy

# ----------------------------------------------------------------------------------------------------------
# Image-level binary scores: anomaly detection and the OK / NG verdict
# ----------------------------------------------------------------------------------------------------------
#
# Exact and tie-aware, computed with numpy from sorted scores (no sklearn, no histograms); "positive" means
# anomalous (NG) and an image is predicted positive when `score >= threshold`:
# * AUROC is the Mann-Whitney U statistic (a tie between a positive and a negative counts 1/2), i.e. the area
#   under the ROC curve with linear interpolation between distinct thresholds.
# * AP is the step definition `sum_n (R_n - R_{n-1}) P_n` over distinct thresholds (sklearn's
#   `average_precision_score`).
# * F1-max is the best F1 over every distinct threshold, with that threshold.
# `cadmtl.anomaly.metrics` builds its pixel metrics (AUROC, F1-max, AP over every pixel) on these too.

_AUROC_CHUNK = 1 << 22  # positives per searchsorted call in AUROC: keeps the index arrays bounded
VERDICT_CALIBRATIONS = ("f1_max", "fpr")
# Below this image AUROC a score barely ranks anomalous images above normal ones (0.5 is chance): no threshold on
# it gives a verdict worth showing, and calibration marks the verdict "uninformative" instead of storing one.
VERDICT_AUROC_FLOOR = 0.6
# A threshold whose recall minus false-positive rate (Youden's J, "informedness": 0 for flagging everything or
# nothing, 1 for a perfect split) is below this is barely better than flagging every image: F1-max lands there
# when most validation images are anomalous (e.g. recall 100 %, false-positive rate 96 %).
VERDICT_MIN_INFORMEDNESS = 0.1


def split_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (ascending) scores of the positives and of the negatives. `scores`, `labels`: (N,)."""
    scores, labels = np.asarray(scores).ravel(), np.asarray(labels).ravel().astype(bool)
    positives, negatives = scores[labels], scores[~labels]
    positives.sort()
    negatives.sort()
    return positives, negatives


def auroc_sorted(positives: np.ndarray, negatives: np.ndarray) -> float:
    """AUROC in [0, 1] (NaN without both classes) from sorted positive and negative scores.

    Mann-Whitney: for each positive, count the negatives strictly below it plus half of those equal to it.
    """
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    wins = 0.0
    for start in range(0, positives.size, _AUROC_CHUNK):
        chunk = positives[start : start + _AUROC_CHUNK]
        below = np.searchsorted(negatives, chunk, side="left")
        at_or_below = np.searchsorted(negatives, chunk, side="right")
        wins += float(below.sum(dtype=np.float64)) + 0.5 * float((at_or_below - below).sum(dtype=np.float64))
    return wins / (float(positives.size) * float(negatives.size))


def _curve_at_positive_thresholds(
    positives: np.ndarray, negatives: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, tp, fp) at each distinct positive score: recall only changes there, and between two of
    them lowering the threshold only adds false positives, so AP and F1-max need no other threshold."""
    thresholds = np.unique(positives)
    tp = positives.size - np.searchsorted(positives, thresholds, side="left")
    fp = negatives.size - np.searchsorted(negatives, thresholds, side="left")
    return thresholds, tp.astype(np.float64), fp.astype(np.float64)


def average_precision_sorted(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Step-wise average precision in [0, 1] (NaN without positives)."""
    if positives.size == 0:
        return math.nan
    _, tp, fp = _curve_at_positive_thresholds(positives, negatives)
    recall_gain = (tp - np.append(tp[1:], 0.0)) / positives.size  # thresholds ascending: tp decreasing
    return float(np.sum(recall_gain * tp / (tp + fp)))


def f1_max_sorted(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """(best F1 in [0, 1], its threshold) over every threshold; (NaN, NaN) without positives. Among thresholds
    with the same best F1 the lowest is returned."""
    if positives.size == 0:
        return math.nan, math.nan
    thresholds, tp, fp = _curve_at_positive_thresholds(positives, negatives)
    f1 = 2 * tp / (tp + fp + positives.size)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def binary_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC in [0, 1]. `scores`: (N,) float, `labels`: (N,) bool/0-1 (1 = anomalous)."""
    return auroc_sorted(*split_scores(scores, labels))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise AP in [0, 1]. `scores`: (N,), `labels`: (N,)."""
    return average_precision_sorted(*split_scores(scores, labels))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(F1-max in [0, 1], threshold). `scores`: (N,), `labels`: (N,)."""
    return f1_max_sorted(*split_scores(scores, labels))


def calibrate_fpr(
    normal_scores: Sequence[float] | np.ndarray | torch.Tensor, target_fpr: float = 0.01
) -> float:
    """Smallest float32 threshold t with at most floor(target_fpr * n) normal scores >= t (anomalous:
    score >= t). Ties are never split: when several normal images share the score at the cut, the threshold goes
    above all of them. The threshold is a float32 value so the comparison holds for float32 and float64 scores."""
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    scores = np.sort(_as_numpy(normal_scores, "calibrate_fpr").astype(np.float32).ravel())
    if scores.size == 0:
        raise ValueError("calibrate_fpr needs at least one normal score")
    allowed = math.floor(target_fpr * scores.size)
    if allowed >= scores.size:
        return float(scores[0])
    return float(np.nextafter(scores[scores.size - 1 - allowed], np.float32(np.inf)))


def calibrate_f1(
    scores: Sequence[float] | np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray | torch.Tensor
) -> float:
    """Threshold of the best F1 (anomalous: score >= t); `labels` 1 = anomalous."""
    scores = _as_numpy(scores, "calibrate_f1").astype(np.float64).ravel()
    labels = _as_numpy(labels, "calibrate_f1").ravel().astype(bool)
    if not labels.any():
        raise ValueError("calibrate_f1 needs at least one anomalous sample")
    return f1_max(scores, labels)[1]


def calibrate_threshold(
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    method: str = "f1_max",
    target_fpr: float = 0.01,
) -> float:
    """The decision threshold of a binary score (anomalous: score >= t; `labels` 1 = anomalous) by `method`:
    `"f1_max"` (the threshold of the best F1, `calibrate_f1`) or `"fpr"` (the lowest threshold whose false-positive
    rate on the negatives is at most `target_fpr`, `calibrate_fpr`)."""
    if method == "f1_max":
        return calibrate_f1(scores, labels)
    if method == "fpr":
        scores = _as_numpy(scores, "calibrate_threshold").ravel()
        labels = _as_numpy(labels, "calibrate_threshold").ravel().astype(bool)
        return calibrate_fpr(scores[~labels], target_fpr)
    raise ValueError(f"Unknown calibration method {method!r}; expected one of {VERDICT_CALIBRATIONS}.")


def degenerate_threshold(
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    threshold: float,
    min_informedness: float = VERDICT_MIN_INFORMEDNESS,
) -> str | None:
    """Why `threshold` carries (next to) no information on labelled scores (anomalous: score >= threshold;
    `labels` 1 = anomalous), or None when it separates: it must leave at least one negative below it (a
    false-positive rate under 100 %), put at least one positive at or above it (a recall above 0) and have a recall
    at least `min_informedness` above its false-positive rate (flagging every image, or none, has both equal)."""
    scores = _as_numpy(scores, "degenerate_threshold").astype(np.float64).ravel()
    labels = _as_numpy(labels, "degenerate_threshold").ravel().astype(bool)
    flagged = scores >= threshold
    negatives, positives = int((~labels).sum()), int(labels.sum())
    false_positives, true_positives = int(flagged[~labels].sum()), int(flagged[labels].sum())
    if negatives and false_positives == negatives:
        return (
            f"the threshold {threshold:.6g} flags all {negatives} normal images (false-positive rate 100 %)"
        )
    if positives and true_positives == 0:
        return f"the threshold {threshold:.6g} flags none of the {positives} anomalous images (recall 0 %)"
    if negatives and positives:
        recall, fpr = true_positives / positives, false_positives / negatives
        if recall - fpr < min_informedness:
            return (
                f"the threshold {threshold:.6g} flags {false_positives} of {negatives} normal images (false-positive "
                f"rate {100 * fpr:.1f} %) and {true_positives} of {positives} anomalous ones (recall "
                f"{100 * recall:.1f} %): recall minus false-positive rate is {recall - fpr:.3f}, below "
                f"{min_informedness}"
            )
    return None


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def verdict_metrics(
    scores_by_source: Mapping[str, Sequence[float] | np.ndarray],
    is_normal: Sequence[bool] | np.ndarray,
    threshold: float | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Image-level metrics of the OK / NG verdict on a set of images labelled normal / anomalous.

    `scores_by_source`: an anomaly score per image for each verdict source (`"cls"`, `"det"`, `"seg"`, `"max"`);
    `is_normal[i]`: whether image i is defect-free. Returns fractions in [0, 1] (NaN where undefined):
    `{"n_images", "n_normal", "n_anomalous", "sources": {source: {"auroc", "f1_max", "f1_max_threshold"}}}` and,
    with a `threshold` and the `source` it applies to, `"at_threshold": {"source", "threshold", "precision",
    "recall", "fpr", "f1", "accuracy", "tp", "fp", "tn", "fn"}` (NG = score >= threshold; precision is NaN when
    no image is NG).
    """
    anomalous = ~_as_numpy(is_normal, "is_normal").ravel().astype(bool)
    results: dict[str, Any] = {
        "n_images": int(anomalous.size),
        "n_normal": int((~anomalous).sum()),
        "n_anomalous": int(anomalous.sum()),
        "sources": {},
    }
    for name, values in scores_by_source.items():
        values = _as_numpy(values, f"scores of {name}").astype(np.float64).ravel()
        if values.size != anomalous.size:
            raise ValueError(f"verdict_metrics: {values.size} {name} scores for {anomalous.size} images")
        positives, negatives = split_scores(values, anomalous)
        best_f1, best_threshold = f1_max_sorted(positives, negatives)
        results["sources"][name] = {
            "auroc": auroc_sorted(positives, negatives),
            "f1_max": best_f1,
            "f1_max_threshold": best_threshold,
        }
    if threshold is not None:
        if source not in scores_by_source:
            raise ValueError(f"verdict_metrics: the threshold's source {source!r} has no scores")
        predicted = _as_numpy(scores_by_source[source], "scores").astype(np.float64).ravel() >= threshold
        tp, fp = int((predicted & anomalous).sum()), int((predicted & ~anomalous).sum())
        fn, tn = int((~predicted & anomalous).sum()), int((~predicted & ~anomalous).sum())
        results["at_threshold"] = {
            "source": source,
            "threshold": float(threshold),
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "fpr": _ratio(fp, fp + tn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "accuracy": _ratio(tp + tn, int(anomalous.size)),
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
        }
    return results
