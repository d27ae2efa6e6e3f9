"""Evaluation metrics for the three CAD-MTL tasks, computed the way the standard tools compute them.

* [`ClassificationMetrics`]: top-k accuracy (`acc@1`, `acc@5`) over the whole split, per-class accuracy, error
  counts and a confusion matrix.
* [`DetectionMetrics`]: COCO AP / AP50 / AP75 / APs / APm / APl / AR@100 from pycocotools' `COCOeval`, run on
  in-memory COCO objects, plus per-class AP; and, at a chosen score threshold and IoU 0.5, per-class precision /
  recall / F1, precision-recall and precision / recall / F1-confidence curves and a detection confusion matrix
  with a background row and column (see [`detection_analysis`]).
* [`verdict_metrics`]: the image-level OK / NG verdict on images labelled normal / anomalous: AUROC and F1-max
  (+ its threshold) per score source, and precision / recall / false-positive rate at a chosen threshold;
  [`calibrate_threshold`] picks that threshold (F1-max or a target false-positive rate) and
  [`degenerate_threshold`] says when a threshold carries (next to) no information (it flags every normal image,
  no anomalous one, or its recall is less than [`VERDICT_MIN_INFORMEDNESS`] above its false-positive rate); below
  [`VERDICT_AUROC_FLOOR`] no threshold can separate the images. The exact, tie-aware
  AUROC / AP / F1-max here also serve `cadmtl.anomaly.metrics`.
* [`SegmentationMetrics`]: mIoU, mFscore, mPrecision, mRecall and aAcc from one confusion matrix accumulated over
  the whole split (mmsegmentation's `IoUMetric` definitions), plus per-class values.

Every metric follows the same streaming protocol: `update(predictions, targets)` per batch, `compute()` once at
the end (a `dict[str, float]` of fractions in [0, 1]), `compute_detailed()` for the per-class rows, counts and
confusion matrix (a [`MetricsReport`]), and `reset()` to start again.

Distributed evaluation: when `torch.distributed` is initialised, `compute()` and `compute_detailed()` are
*collective* calls: every rank must call them. Confusion matrices and hit counts are summed with `all_reduce`;
detection images are gathered with `all_gather_object`, evaluated once on rank 0 and the result (or the error)
is broadcast, so every rank gets the same numbers. If you already gathered predictions yourself (for example with
`accelerator.gather_for_metrics`) and feed the full split to every rank, pass `sync_on_compute=False`, or the
counts would be multiplied by the world size.

Example:

```python
metric = DetectionMetrics(label_names=list(model.config.id2label.values()))
for batch in dataloader:
    outputs = model(batch["pixel_values"])
    metric.update(processor.post_process_object_detection(outputs, target_sizes=batch["sizes"]), batch["targets"])
print(format_percentages(metric.compute()))  # {'AP': '41.27', 'AP50': '63.02', ...}
report = metric.compute_detailed()           # report.per_class["dent"]["AP"], report.to_dict() for JSON
```

The same numbers are available as a local 🤗 Evaluate module: see
`cadmtl.evaluation.hub_metric.CADMTL_METRICS_PATH`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dataset_scripts.schema import IGNORE_INDEX

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "VERDICT_AUROC_FLOOR",
    "VERDICT_CALIBRATIONS",
    "VERDICT_MIN_INFORMEDNESS",
    "ClassificationMetrics",
    "DetectionMetrics",
    "MetricsReport",
    "SegmentationMetrics",
    "average_precision",
    "binary_auroc",
    "calibrate_f1",
    "calibrate_fpr",
    "calibrate_threshold",
    "confidence_curves",
    "degenerate_threshold",
    "f1_max",
    "format_percentages",
    "verdict_metrics",
]


# ----------------------------------------------------------------------------------------------------------
# Result container and formatting
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MetricsReport:
    """Everything one metric computed over a split.

    Attributes:
        metrics: the headline numbers, exactly what `compute()` returns (fractions in [0, 1]; NaN where the
            number is undefined, see each metric's docstring).
        per_class: one row per class, keyed by class name: the per-class metric values (fractions, NaN where
            undefined) and the counts behind them (ints).
        counts: split-level counts (images, samples, errors, boxes...), so that a reader can tell how many
            mistakes a percentage stands for.
        label_names: the class names in class-id order.
        confusion_matrix: `(C, C)` int64 array, rows = ground truth class, columns = predicted class (the
            scikit-learn convention); `None` for detection, which has no confusion matrix.
        extra_metrics: secondary split-level values that are not headline keys (detection: the rest of the
            COCO summary, `AR@1`, `AR@10`, `ARs`, `ARm`, `ARl`, and the operating-point `precision`, `recall`,
            `F1`, `best_F1`, `best_F1_confidence`, see [`detection_analysis`]).
        analysis: threshold-dependent results, already JSON-ready (plain lists and numbers, no NaN): for detection
            the curves and the detection confusion matrix of [`detection_analysis`]; empty where a metric has none.
    """

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float | int | bool]]
    counts: dict[str, int]
    label_names: list[str]
    confusion_matrix: np.ndarray | None = field(default=None, repr=False)
    extra_metrics: dict[str, float] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy: NaN becomes `None` (JSON has no NaN) and the matrix becomes nested lists."""
        return {
            "metrics": {name: _json_number(value) for name, value in self.metrics.items()},
            "per_class": {
                class_name: {name: _json_number(value) for name, value in row.items()}
                for class_name, row in self.per_class.items()
            },
            "counts": {name: int(value) for name, value in self.counts.items()},
            "label_names": list(self.label_names),
            "confusion_matrix": None if self.confusion_matrix is None else self.confusion_matrix.tolist(),
            "extra_metrics": {name: _json_number(value) for name, value in self.extra_metrics.items()},
            "analysis": copy.deepcopy(self.analysis),
        }


def _json_number(value: float | int | bool) -> float | int | bool | None:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return None if math.isnan(value) else value


def format_percentages(
    metrics: Mapping[str, float], decimals: int = 2, undefined: str = "n/a"
) -> dict[str, str]:
    """Format a `compute()` result as percentage strings for tables: `{"AP": 0.4567}` -> `{"AP": "45.67"}`.

    Args:
        metrics: metric name -> fraction in [0, 1] (NaN or `None` for an undefined value).
        decimals: digits after the decimal point.
        undefined: the text written for NaN / `None` (e.g. `APs` on a split without small objects).
    """
    formatted = {}
    for name, value in metrics.items():
        if value is None or math.isnan(float(value)):
            formatted[name] = undefined
        else:
            formatted[name] = f"{100.0 * float(value):.{decimals}f}"
    return formatted


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _communication_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo, mpi and mixed "cpu:gloo,cuda:nccl" groups take CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks without touching the local state (compute() may be called twice)."""
    buffer = tensor.to(_communication_device(), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


# ----------------------------------------------------------------------------------------------------------
# Input conversion
# ----------------------------------------------------------------------------------------------------------


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, Image.Image):
        return torch.from_numpy(np.array(value))
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: expected a tensor or array, got {type(value).__name__} ({error})"
        ) from None
    if array.dtype == object:
        raise ValueError(f"{where}: expected a numeric tensor or array, got ragged or non-numeric data")
    # read-only arrays (decoded images, Arrow buffers) would make torch warn; a copy is cheap next to the metric
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _as_numpy(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: expected a tensor or array, got {type(value).__name__} ({error})"
        ) from None


def _check_label_names(label_names: Sequence[str] | None, num_classes: int, owner: str) -> list[str]:
    if label_names is None:
        return [str(class_id) for class_id in range(num_classes)]
    label_names = [str(name) for name in label_names]
    if len(label_names) != num_classes:
        raise ValueError(f"{owner}: got {len(label_names)} label_names for num_classes={num_classes}")
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"{owner}: label_names contain duplicates: {label_names}")
    return label_names


def _describe_values(values: torch.Tensor, limit: int = 5) -> str:
    unique = torch.unique(values).tolist()
    shown = ", ".join(str(value) for value in unique[:limit])
    return shown + (f" and {len(unique) - limit} more" if len(unique) > limit else "")


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray, undefined: float) -> np.ndarray:
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    result = np.full_like(numerator, undefined)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result


class _StreamingMetric(ABC):
    """The update / compute / reset protocol shared by the three task metrics."""

    def __init__(self, *, sync_on_compute: bool = True) -> None:
        self.sync_on_compute = sync_on_compute

    @abstractmethod
    def update(self, predictions: Any, targets: Any) -> None:
        """Add one batch of predictions and their ground truth."""

    @abstractmethod
    def compute_detailed(self) -> MetricsReport:
        """Headline metrics plus per-class rows, counts and (where it exists) the confusion matrix."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything added so far."""

    def compute(self) -> dict[str, float]:
        """The headline metrics over everything added since the last `reset()` (fractions in [0, 1])."""
        return self.compute_detailed().metrics

    def _syncs(self) -> bool:
        return self.sync_on_compute and _is_distributed()


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


# ----------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------


class ClassificationMetrics(_StreamingMetric):
    """Top-k accuracy over a split, with per-class accuracy, error counts and a confusion matrix.

    `compute()` returns `acc@k` for every `k` in `top_k` (by default `acc@1` and `acc@5`): the fraction of
    samples whose target class is among the `k` highest logits. When `k` is larger than the number of classes
    it is counted as `k = num_classes` (every sample is then a hit), and the key keeps the requested `k`.
    `acc@1` uses the first index of `torch.topk`, which is also the predicted class in the confusion matrix.

    `compute_detailed()` returns a [`MetricsReport`] with:

    * `counts`: `num_samples` and `errors@k` (misses per `k`): with 250 test images one error is 0.4 points, so
      tables should print the counts next to the percentages.
    * `per_class[name]`: `support` (samples of that class), `predicted` (samples predicted as it), `acc@k` (the
      class recall at `k`; NaN for a class without samples) and `errors@k`.
    * `confusion_matrix`: `(C, C)` int64, rows = target class, columns = top-1 prediction.

    Args:
        num_classes: number of classes `C`; logits must have `C` columns and targets lie in `[0, C)`.
        label_names: class names in id order (`id2label` order); defaults to the ids as strings.
        top_k: the `k` values to report.
        sync_on_compute: sum the counts over `torch.distributed` ranks in `compute()` (see module docstring).
    """

    def __init__(
        self,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        top_k: Sequence[int] = (1, 5),
        *,
        sync_on_compute: bool = True,
    ) -> None:
        super().__init__(sync_on_compute=sync_on_compute)
        if int(num_classes) < 1:
            raise ValueError(f"ClassificationMetrics: num_classes must be >= 1, got {num_classes}")
        top_k = tuple(int(k) for k in top_k)
        if not top_k or any(k < 1 for k in top_k) or len(set(top_k)) != len(top_k):
            raise ValueError(f"ClassificationMetrics: top_k must be distinct positive integers, got {top_k}")
        self.num_classes = int(num_classes)
        self.label_names = _check_label_names(label_names, self.num_classes, "ClassificationMetrics")
        self.top_k = top_k
        self.reset()

    def reset(self) -> None:
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        # hits per target class for each k, so per-class top-k accuracy survives the sum over ranks
        self._topk_hits = torch.zeros(len(self.top_k), self.num_classes, dtype=torch.int64)

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch.

        Args:
            predictions: logits (or probabilities) of shape `(N, C)`, floating point, no NaN.
            targets: class ids of shape `(N,)`, integers in `[0, C)`.
        """
        logits = _as_tensor(predictions, "ClassificationMetrics.update: predictions")
        labels = _as_tensor(targets, "ClassificationMetrics.update: targets")
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"ClassificationMetrics.update: predictions must be logits of shape (N, {self.num_classes}), "
                f"got {tuple(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise ValueError(
                f"ClassificationMetrics.update: predictions must be floating-point logits, got {logits.dtype}"
            )
        if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"ClassificationMetrics.update: targets must have shape ({logits.shape[0]},) to match "
                f"predictions {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(
                f"ClassificationMetrics.update: targets must be integer class ids, got {labels.dtype}"
            )
        if logits.shape[0] == 0:
            return
        nan_rows = torch.isnan(logits).any(dim=1)
        if nan_rows.any():
            rows = nan_rows.nonzero().flatten().tolist()
            raise ValueError(
                f"ClassificationMetrics.update: predictions contain NaN logits in rows {rows[:10]}"
            )
        labels = labels.to(logits.device, torch.int64)
        out_of_range = (labels < 0) | (labels >= self.num_classes)
        if out_of_range.any():
            raise ValueError(
                f"ClassificationMetrics.update: target ids must lie in [0, {self.num_classes}), got "
                f"{_describe_values(labels[out_of_range])}"
            )

        if self._confusion.device != logits.device:
            # keep the counts where the logits live: no host sync per batch, one small copy at compute()
            self._confusion = self._confusion.to(logits.device)
            self._topk_hits = self._topk_hits.to(logits.device)
        largest_k = min(max(self.top_k), self.num_classes)
        ranked = logits.topk(largest_k, dim=1).indices
        matches = ranked == labels[:, None]
        flat = labels * self.num_classes + ranked[:, 0]
        self._confusion += torch.bincount(flat, minlength=self.num_classes**2).view_as(self._confusion)
        for row, k in enumerate(self.top_k):
            hit = matches[:, : min(k, self.num_classes)].any(dim=1)
            self._topk_hits[row] += torch.bincount(labels[hit], minlength=self.num_classes)

    def compute_detailed(self) -> MetricsReport:
        confusion, topk_hits = self._confusion, self._topk_hits
        if self._syncs():
            confusion, topk_hits = _all_reduce_sum(confusion), _all_reduce_sum(topk_hits)
        confusion = confusion.cpu().numpy()
        topk_hits = topk_hits.cpu().numpy()
        support = confusion.sum(axis=1)
        num_samples = int(support.sum())
        if num_samples == 0:
            raise RuntimeError("ClassificationMetrics.compute: no samples were added (call update() first)")

        metrics = {f"acc@{k}": float(topk_hits[row].sum() / num_samples) for row, k in enumerate(self.top_k)}
        counts = {"num_samples": num_samples}
        counts.update(
            {f"errors@{k}": int(num_samples - topk_hits[row].sum()) for row, k in enumerate(self.top_k)}
        )
        per_class = {}
        predicted = confusion.sum(axis=0)
        for class_id, name in enumerate(self.label_names):
            row: dict[str, float | int | bool] = {
                "support": int(support[class_id]),
                "predicted": int(predicted[class_id]),
            }
            for k_row, k in enumerate(self.top_k):
                hits = int(topk_hits[k_row, class_id])
                row[f"acc@{k}"] = hits / support[class_id] if support[class_id] else math.nan
                row[f"errors@{k}"] = int(support[class_id]) - hits
            per_class[name] = row
        return MetricsReport(metrics, per_class, counts, list(self.label_names), confusion)


# ----------------------------------------------------------------------------------------------------------
# Semantic segmentation
# ----------------------------------------------------------------------------------------------------------


class SegmentationMetrics(_StreamingMetric):
    """mIoU, mFscore, mPrecision, mRecall and aAcc from one confusion matrix accumulated over the whole split.

    Definitions follow mmsegmentation's `IoUMetric` (`total_area_to_metrics`): per class `c`, with `TP` the
    pixels of class `c` predicted as `c`, `GT` the labelled pixels of class `c` and `P` the pixels predicted as
    `c` (on labelled pixels only):

    * `IoU = TP / (GT + P - TP)`, `Precision = TP / P`, `Recall = TP / GT` (mmsegmentation's per-class `Acc`),
      `Fscore = 2 * Precision * Recall / (Precision + Recall)` (F-beta with beta = 1);
    * `aAcc = sum(TP) / sum(GT)`: correct pixels over all labelled pixels;
    * the `m*` values are means over the classes that appear in the ground truth **or** the predictions of the
      split; classes absent from both are excluded (their per-class values are NaN).

    One difference from mmsegmentation, so that every mean covers the same classes: mmsegmentation leaves
    `Precision` NaN for a class that is in the ground truth but never predicted (and `Recall` NaN for a class that
    is predicted but absent from the ground truth), and its `nanmean` then silently drops that class from
    `mPrecision` and `mFscore`, which inflates them. Here those undefined ratios count as 0, as scikit-learn's
    and torchmetrics' default `zero_division=0` do. mIoU and aAcc are identical to mmsegmentation's.

    Pixels whose target is `ignore_index` are excluded everywhere (whatever was predicted there).

    Args:
        num_classes: number of classes `C`; predictions and (non-ignored) targets must lie in `[0, C)`.
        ignore_index: target value that marks unlabelled pixels.
        label_names: class names in id order; defaults to the ids as strings.
        reduce_zero_label: mmsegmentation / `evaluate`'s `mean_iou` option for datasets whose label 0 means
            "background, not a class": target 0 becomes `ignore_index` and every other target id is shifted down
            by one. Applied to targets only (the model already predicts the reduced ids).
        sync_on_compute: sum the confusion matrix over `torch.distributed` ranks in `compute()`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        label_names: Sequence[str] | None = None,
        reduce_zero_label: bool = False,
        *,
        sync_on_compute: bool = True,
    ) -> None:
        super().__init__(sync_on_compute=sync_on_compute)
        if int(num_classes) < 1:
            raise ValueError(f"SegmentationMetrics: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"SegmentationMetrics: ignore_index={self.ignore_index} is a valid class id for "
                f"num_classes={self.num_classes}; pick a value outside [0, {self.num_classes})"
            )
        self.label_names = _check_label_names(label_names, self.num_classes, "SegmentationMetrics")
        self.reduce_zero_label = bool(reduce_zero_label)
        self.reset()

    def reset(self) -> None:
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, predictions: Any, targets: Any) -> None:
        """Add a batch of class-id maps.

        Args:
            predictions: predicted class ids, a `(N, H, W)` or `(H, W)` integer tensor / array, or a list of
                `(H, W)` maps of different sizes (what `post_process_semantic_segmentation` returns). Not logits:
                take `argmax(dim=1)` first.
            targets: ground-truth class ids in the same layout (tensors, arrays or PIL `L` images), with
                `ignore_index` for unlabelled pixels.
        """
        prediction_maps = self._as_maps(predictions, "predictions")
        target_maps = self._as_maps(targets, "targets")
        if len(prediction_maps) != len(target_maps):
            raise ValueError(
                f"SegmentationMetrics.update: got {len(prediction_maps)} prediction maps and {len(target_maps)} "
                "target maps"
            )
        for index, (prediction, target) in enumerate(zip(prediction_maps, target_maps)):
            self._add_map(prediction, target, index)

    def _as_maps(self, value: Any, what: str) -> list[torch.Tensor]:
        where = f"SegmentationMetrics.update: {what}"
        if isinstance(value, (list, tuple)):
            maps = [_as_tensor(item, f"{where}[{index}]") for index, item in enumerate(value)]
            for index, item in enumerate(maps):
                if item.ndim != 2:
                    raise ValueError(f"{where}[{index}] must be an (H, W) map, got shape {tuple(item.shape)}")
        else:
            batch = _as_tensor(value, where)
            if batch.ndim == 2:
                maps = [batch]
            elif batch.ndim == 3:
                maps = list(batch)
            else:
                raise ValueError(f"{where} must have shape (N, H, W) or (H, W), got {tuple(batch.shape)}")
        for item in maps:
            if item.is_floating_point() or item.is_complex():
                raise ValueError(
                    f"{where} must hold integer class ids, got {item.dtype} (for logits use .argmax(dim=1) first)"
                )
        return maps

    def _add_map(self, prediction: torch.Tensor, target: torch.Tensor, index: int) -> None:
        if prediction.shape != target.shape:
            raise ValueError(
                f"SegmentationMetrics.update: prediction map {index} has shape {tuple(prediction.shape)} but its "
                f"target has shape {tuple(target.shape)}"
            )
        target = target.to(prediction.device, torch.int64)
        prediction = prediction.to(torch.int64)
        if self.reduce_zero_label:
            ignored = target == self.ignore_index
            target = torch.where(target == 0, self.ignore_index, target - 1)
            target[ignored] = self.ignore_index
        labelled = target != self.ignore_index
        target = target[labelled]
        prediction = prediction[labelled]
        bad_targets = (target < 0) | (target >= self.num_classes)
        if bad_targets.any():
            raise ValueError(
                f"SegmentationMetrics.update: target map {index} contains ids {_describe_values(target[bad_targets])}"
                f" outside [0, {self.num_classes}) (ignore_index={self.ignore_index})"
            )
        bad_predictions = (prediction < 0) | (prediction >= self.num_classes)
        if bad_predictions.any():
            raise ValueError(
                f"SegmentationMetrics.update: prediction map {index} contains ids "
                f"{_describe_values(prediction[bad_predictions])} outside [0, {self.num_classes}) on labelled pixels"
            )
        counts = torch.bincount(target * self.num_classes + prediction, minlength=self.num_classes**2)
        if self._confusion.device != counts.device:
            # keep the state where the maps live: no device copy of every map, one small copy at compute()
            self._confusion = self._confusion.to(counts.device)
        self._confusion += counts.view(self.num_classes, self.num_classes)

    def compute_detailed(self) -> MetricsReport:
        confusion = _all_reduce_sum(self._confusion) if self._syncs() else self._confusion
        confusion = confusion.cpu().numpy()
        true_positive = np.diag(confusion)
        ground_truth = confusion.sum(axis=1)
        predicted = confusion.sum(axis=0)
        union = ground_truth + predicted - true_positive
        present = union > 0
        if not present.any():
            raise RuntimeError(
                "SegmentationMetrics.compute: no labelled pixels were added (call update() first; are all "
                f"targets ignore_index={self.ignore_index}?)"
            )

        iou = _safe_divide(true_positive, union, math.nan)
        precision = _safe_divide(true_positive, predicted, 0.0)
        recall = _safe_divide(true_positive, ground_truth, 0.0)
        fscore = _safe_divide(2 * precision * recall, precision + recall, 0.0)
        precision[~present] = recall[~present] = fscore[~present] = math.nan

        metrics = {
            "mIoU": float(iou[present].mean()),
            "mFscore": float(fscore[present].mean()),
            "mPrecision": float(precision[present].mean()),
            "mRecall": float(recall[present].mean()),
            "aAcc": float(true_positive.sum() / ground_truth.sum()),
        }
        counts = {
            "labelled_pixels": int(ground_truth.sum()),
            "correct_pixels": int(true_positive.sum()),
            "classes_evaluated": int(present.sum()),
        }
        per_class = {
            name: {
                "IoU": float(iou[class_id]),
                "Fscore": float(fscore[class_id]),
                "Precision": float(precision[class_id]),
                "Recall": float(recall[class_id]),
                "gt_pixels": int(ground_truth[class_id]),
                "pred_pixels": int(predicted[class_id]),
                "present": bool(present[class_id]),
            }
            for class_id, name in enumerate(self.label_names)
        }
        return MetricsReport(metrics, per_class, counts, list(self.label_names), confusion)


# ----------------------------------------------------------------------------------------------------------
# Object detection (COCO protocol)
# ----------------------------------------------------------------------------------------------------------


# The operating point of the threshold-dependent detection results (see DetectionMetrics): `cadmtl predict`'s
# default box threshold, and the IoU of AP50 / Ultralytics' confusion matrix.
DEFAULT_SCORE_THRESHOLD = 0.3
_ANALYSIS_IOU = 0.5
# Confidence curves are sampled at 0.00, 0.01, ..., 1.00 (the precision-recall curve on COCOeval's 101 recall
# points), rounded to 4 decimals: a few kB per class in eval_results.json.
_CONFIDENCE_GRID = np.round(np.linspace(0.0, 1.0, 101), 2)
_CURVE_DECIMALS = 4


@dataclass
class _DetectionImage:
    """One image's predictions and ground truth, validated and stored as compact numpy arrays / RLEs."""

    image_id: int | str | None
    pred_boxes: np.ndarray  # (n, 4) float64 xyxy
    pred_scores: np.ndarray  # (n,) float64
    pred_labels: np.ndarray  # (n,) int64
    gt_boxes: np.ndarray  # (m, 4) float64 xyxy
    gt_labels: np.ndarray  # (m,) int64
    gt_iscrowd: np.ndarray  # (m,) int64
    gt_area: np.ndarray | None  # (m,) float64, or None to use the box / mask area
    pred_rles: list[dict] | None = None  # iou_type="segm" only
    gt_rles: list[dict] | None = None
    image_size: tuple[int, int] | None = None  # (height, width), iou_type="segm" only


# COCOeval's stats vector, in its order (bbox and segm summaries share it)
_COCO_STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR@1",
    "AR@10",
    "AR@{max}",
    "ARs",
    "ARm",
    "ARl",
)


class DetectionMetrics(_StreamingMetric):
    """COCO detection metrics computed by pycocotools' `COCOeval`, exactly, on in-memory COCO objects.

    `compute()` returns `AP` (mean over IoU 0.50:0.95), `AP50`, `AP75`, `APs`, `APm`, `APl` and `AR@100` (with
    `max_dets=100`; the key follows `max_dets`), as fractions in [0, 1]. These are `COCOeval.stats[0:6]` and
    `stats[8]` with `params.maxDets = [1, 10, max_dets]`.

    Behaviour at the edges (documented because COCOeval's answer is easy to misread):

    * COCOeval reports -1 when a number has nothing to average, e.g. `APs` on a split without small ground-truth
      objects, or every value when the split has no ground-truth box at all. That -1 is returned as **NaN**
      (the key is kept, so tables stay aligned; [`format_percentages`] prints it as "n/a").
    * A class with ground-truth boxes but no predictions has AP 0 and counts in the mean; a class that has
      predictions but no ground truth has no AP (NaN in `per_class`) and does not count in the mean (COCOeval).
    * Images with no ground truth and no predictions are allowed; they change nothing. Images with no ground
      truth but with predictions add false positives. An image with ground truth and empty predictions adds
      misses; all-empty predictions give AP 0 wherever there are ground-truth boxes.
    * Label ids are the model's class ids (`0`-based, as `post_process_object_detection` returns them). Inside
      the COCO objects they become category id `label + 1` (COCO's 1-based convention; COCOeval itself would
      accept 0), and annotation ids start at 1: COCOeval records a match by storing the matched annotation id
      and reads 0 as "unmatched", so an annotation with id 0 would silently turn a true positive into a false
      positive.
    * Categories are `range(len(label_names))` when `label_names` is given (other labels are an error), else
      every label id seen in the ground truth or the predictions.

    Image ids: targets (and optionally predictions) may carry `"image_id"` (int or str). If they do, ids must be
    unique over the whole evaluation (all ranks); predictions that carry ids are paired with targets by id, and
    a prediction whose id is not among the targets is an error. Images are evaluated in sorted-id order, so the
    result does not depend on how the split was sharded. Without ids, images get sequential ids in order of
    arrival (rank 0's first, then rank 1's...), so two ranks' "image 0" never collide.

    `compute_detailed()` returns a [`MetricsReport`] whose `metrics` are the seven headline keys above,
    `extra_metrics` the rest of COCOeval's summary (`AR@1`, `AR@10`, `ARs`, `ARm`, `ARl`), `per_class[name]`
    holds `AP`, `AP50`, `AP75`, `AR@<max_dets>` (COCOeval's own per-category slices), `num_ground_truth`
    (non-crowd boxes) and `num_predictions`, and `counts` the split's image, box and prediction totals.

    At the operating point (`score_threshold`, IoU 0.5; see [`detection_analysis`]) `per_class[name]` also holds
    `precision`, `recall`, `F1`, `TP`, `FP` and `FN`, `extra_metrics` their class means (`precision`, `recall`,
    `F1`) and the best all-classes F1 over confidence (`best_F1`, `best_F1_confidence`), and `analysis` the
    precision-recall and confidence curves and the detection confusion matrix (what `cadmtl charts` draws).

    Args:
        label_names: class names in label-id order; fixes the category set (see above).
        iou_type: `"bbox"` (boxes) or `"segm"` (instance masks: predictions and targets then need `"masks"`,
            `(n, H, W)` binary, and boxes are optional).
        max_dets: the largest number of detections per image that is evaluated (highest scores first).
        score_threshold: the operating point: a detection counts when its score is above it (strictly, as
            `post_process_object_detection(threshold=...)` keeps boxes). Defaults to
            [`DEFAULT_SCORE_THRESHOLD`] (0.3, what `cadmtl predict` draws). It changes only the operating-point
            values and the confusion matrix, never AP / AR or the curves.
        sync_on_compute: gather images from all `torch.distributed` ranks in `compute()`.
    """

    def __init__(
        self,
        label_names: Sequence[str] | None = None,
        iou_type: Literal["bbox", "segm"] = "bbox",
        max_dets: int = 100,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        *,
        sync_on_compute: bool = True,
    ) -> None:
        super().__init__(sync_on_compute=sync_on_compute)
        if not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"DetectionMetrics: score_threshold must be in [0, 1], got {score_threshold}")
        self.score_threshold = float(score_threshold)
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"DetectionMetrics: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        if int(max_dets) < 1:
            raise ValueError(f"DetectionMetrics: max_dets must be >= 1, got {max_dets}")
        self.label_names = None if label_names is None else [str(name) for name in label_names]
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"DetectionMetrics: label_names contain duplicates: {self.label_names}")
        self.iou_type = iou_type
        self.max_dets = int(max_dets)
        self.recall_key = f"AR@{self.max_dets}"
        self.reset()

    def reset(self) -> None:
        self._images: list[_DetectionImage] = []
        self._seen_ids: set[int | str] = set()
        self._uses_ids: bool | None = None

    # ---- update and validation -------------------------------------------------------------------------

    def update(self, predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add a batch of images.

        Args:
            predictions: one dict per image as `post_process_object_detection` returns it: `"boxes"` `(n, 4)`
                xyxy in absolute pixels, `"scores"` `(n,)`, `"labels"` `(n,)`; optionally `"image_id"`; with
                `iou_type="segm"`, `"masks"` `(n, H, W)` binary.
            targets: one dict per image: `"boxes"` `(m, 4)` xyxy absolute, `"labels"` `(m,)`; optionally
                `"image_id"`, `"iscrowd"` `(m,)` and `"area"` `(m,)` (COCO's area, which decides small / medium /
                large; defaults to the box area, or the mask area for `"segm"`); with `iou_type="segm"`,
                `"masks"` `(m, H, W)` binary.
        """
        if isinstance(predictions, Mapping) or isinstance(targets, Mapping):
            raise ValueError(
                "DetectionMetrics.update: predictions and targets must be lists of dicts, one per image"
            )
        predictions, targets = list(predictions), list(targets)
        if len(predictions) != len(targets):
            raise ValueError(
                f"DetectionMetrics.update: got {len(predictions)} prediction dicts for {len(targets)} target dicts"
            )
        target_ids = [self._read_image_id(target, f"targets[{i}]") for i, target in enumerate(targets)]
        prediction_ids = [
            self._read_image_id(pred, f"predictions[{i}]") for i, pred in enumerate(predictions)
        ]
        uses_ids = self._check_id_usage(target_ids, prediction_ids)
        if uses_ids and any(image_id is not None for image_id in prediction_ids):
            predictions = self._pair_by_id(predictions, prediction_ids, target_ids)
        if uses_ids:
            repeated = sorted(str(i) for i, n in Counter(target_ids).items() if n > 1 or i in self._seen_ids)
            if repeated:
                raise ValueError(
                    f"DetectionMetrics.update: image_id {', '.join(repeated[:5])} was added more than once; image ids "
                    "must be unique over the whole evaluation"
                )

        new_images = [
            self._read_image(prediction, target, image_id, index)
            for index, (prediction, target, image_id) in enumerate(zip(predictions, targets, target_ids))
        ]
        self._images.extend(new_images)
        self._seen_ids.update(image_id for image_id in target_ids if image_id is not None)
        if targets:
            self._uses_ids = uses_ids

    def _check_id_usage(self, target_ids: list, prediction_ids: list) -> bool:
        if not target_ids:
            return bool(self._uses_ids)
        uses_ids = target_ids[0] is not None
        if any((image_id is not None) != uses_ids for image_id in target_ids):
            raise ValueError("DetectionMetrics.update: either every target has an 'image_id' or none does")
        if any(image_id is not None for image_id in prediction_ids) and not uses_ids:
            raise ValueError(
                "DetectionMetrics.update: predictions carry 'image_id' but targets do not, so they cannot be checked "
                "against the ground truth; add 'image_id' to the targets"
            )
        if self._uses_ids is not None and uses_ids != self._uses_ids:
            raise ValueError(
                "DetectionMetrics.update: earlier batches "
                + ("had" if self._uses_ids else "had no")
                + " 'image_id' in their targets and this one "
                + ("has" if uses_ids else "has none")
                + "; use image ids for every batch or for none"
            )
        return uses_ids

    @staticmethod
    def _pair_by_id(predictions: list, prediction_ids: list, target_ids: list) -> list:
        if any(image_id is None for image_id in prediction_ids):
            raise ValueError(
                "DetectionMetrics.update: either every prediction has an 'image_id' or none does"
            )
        known = set(target_ids)
        missing = [str(image_id) for image_id in prediction_ids if image_id not in known]
        if missing:
            raise ValueError(
                f"DetectionMetrics.update: predictions for image_id {', '.join(missing[:5])} have no ground truth "
                "in this batch (no target with that image_id)"
            )
        if len(set(prediction_ids)) != len(prediction_ids):
            raise ValueError("DetectionMetrics.update: two predictions have the same image_id in one batch")
        by_id = dict(zip(prediction_ids, predictions))
        return [by_id[image_id] for image_id in target_ids]

    @staticmethod
    def _read_image_id(entry: Mapping[str, Any], where: str) -> int | str | None:
        if not isinstance(entry, Mapping):
            raise ValueError(f"DetectionMetrics.update: {where} must be a dict, got {type(entry).__name__}")
        image_id = entry.get("image_id")
        if image_id is None:
            return None
        if isinstance(image_id, (torch.Tensor, np.ndarray, np.generic)):
            values = _as_numpy(image_id, f"DetectionMetrics.update: {where}['image_id']").reshape(-1)
            if values.size != 1:
                raise ValueError(
                    f"DetectionMetrics.update: {where}['image_id'] must be a single id, got {image_id}"
                )
            image_id = values[0].item()
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            raise ValueError(
                f"DetectionMetrics.update: {where}['image_id'] must be an int or str, got {image_id!r}"
            )
        return image_id

    def _read_image(
        self, prediction: Mapping[str, Any], target: Mapping[str, Any], image_id: int | str | None, index: int
    ) -> _DetectionImage:
        pred_where, target_where = f"predictions[{index}]", f"targets[{index}]"
        segm = self.iou_type == "segm"
        pred_labels = self._read_labels(prediction, pred_where)
        n = len(pred_labels)
        pred_scores = self._read_vector(prediction, "scores", n, pred_where, np.float64)
        gt_labels = self._read_labels(target, target_where)
        m = len(gt_labels)
        pred_boxes = self._read_boxes(prediction, n, pred_where, required=not segm)
        gt_boxes = self._read_boxes(target, m, target_where, required=not segm)
        iscrowd = self._read_vector(target, "iscrowd", m, target_where, np.int64, default=0)
        area = self._read_vector(target, "area", m, target_where, np.float64) if "area" in target else None
        if area is not None and (area < 0).any():
            raise ValueError(f"DetectionMetrics.update: {target_where}['area'] has negative values")

        image = _DetectionImage(
            image_id, pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, iscrowd, area
        )
        if segm:
            pred_masks = self._read_masks(prediction, n, pred_where)
            gt_masks = self._read_masks(target, m, target_where)
            if pred_masks.shape[1:] != gt_masks.shape[1:]:
                raise ValueError(
                    f"DetectionMetrics.update: {pred_where}['masks'] are {pred_masks.shape[1:]} but "
                    f"{target_where}['masks'] are {gt_masks.shape[1:]}; they must have the image size"
                )
            image.pred_rles = _encode_masks(pred_masks)
            image.gt_rles = _encode_masks(gt_masks)
            image.image_size = (int(gt_masks.shape[1]), int(gt_masks.shape[2]))
        return image

    def _read_labels(self, entry: Mapping[str, Any], where: str) -> np.ndarray:
        if "labels" not in entry:
            raise ValueError(f"DetectionMetrics.update: {where} has no 'labels' (keys: {sorted(entry)})")
        labels = _as_numpy(entry["labels"], f"DetectionMetrics.update: {where}['labels']").reshape(-1)
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"DetectionMetrics.update: {where}['labels'] must be integer class ids, got dtype {labels.dtype}"
            )
        labels = labels.astype(np.int64)
        upper = len(self.label_names) if self.label_names is not None else None
        bad = labels < 0
        if upper is not None:
            bad |= labels >= upper
        if bad.any():
            allowed = f"[0, {upper})" if upper is not None else "non-negative ids"
            raise ValueError(
                f"DetectionMetrics.update: {where}['labels'] contains {sorted(set(labels[bad].tolist()))[:5]}, "
                f"expected {allowed}"
            )
        return labels

    @staticmethod
    def _read_vector(
        entry: Mapping[str, Any], key: str, length: int, where: str, dtype: type, default: float | None = None
    ) -> np.ndarray:
        if key not in entry:
            if default is None:
                raise ValueError(f"DetectionMetrics.update: {where} has no '{key}' (keys: {sorted(entry)})")
            return np.full(length, default, dtype=dtype)
        values = _as_numpy(entry[key], f"DetectionMetrics.update: {where}['{key}']").reshape(-1)
        if len(values) != length:
            raise ValueError(
                f"DetectionMetrics.update: {where}['{key}'] has {len(values)} values for {length} labels"
            )
        values = values.astype(dtype)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            raise ValueError(f"DetectionMetrics.update: {where}['{key}'] contains NaN or infinite values")
        return values

    @staticmethod
    def _read_boxes(entry: Mapping[str, Any], length: int, where: str, required: bool) -> np.ndarray:
        if "boxes" not in entry:
            if required:
                raise ValueError(f"DetectionMetrics.update: {where} has no 'boxes' (keys: {sorted(entry)})")
            return np.zeros((length, 4), dtype=np.float64)
        boxes = _as_numpy(entry["boxes"], f"DetectionMetrics.update: {where}['boxes']").astype(np.float64)
        if boxes.size == 0 and length == 0:
            return boxes.reshape(0, 4)
        if boxes.shape != (length, 4):
            raise ValueError(
                f"DetectionMetrics.update: {where}['boxes'] must have shape ({length}, 4) (xyxy, one per label), "
                f"got {boxes.shape}"
            )
        if not np.isfinite(boxes).all():
            raise ValueError(f"DetectionMetrics.update: {where}['boxes'] contains NaN or infinite values")
        if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
            raise ValueError(
                f"DetectionMetrics.update: {where}['boxes'] has boxes with x2 < x1 or y2 < y1; boxes must be "
                "xyxy in absolute pixels"
            )
        return boxes

    @staticmethod
    def _read_masks(entry: Mapping[str, Any], length: int, where: str) -> np.ndarray:
        if "masks" not in entry:
            raise ValueError(
                f"DetectionMetrics.update: iou_type='segm' needs {where}['masks'] (keys: {sorted(entry)})"
            )
        masks = _as_numpy(entry["masks"], f"DetectionMetrics.update: {where}['masks']")
        if masks.ndim != 3 or masks.shape[0] != length:
            raise ValueError(
                f"DetectionMetrics.update: {where}['masks'] must have shape ({length}, H, W), got {masks.shape}"
            )
        if masks.dtype != np.bool_ and not np.isin(masks, (0, 1)).all():
            raise ValueError(f"DetectionMetrics.update: {where}['masks'] must be binary (0/1 or bool)")
        return masks.astype(bool)

    # ---- compute ---------------------------------------------------------------------------------------

    def compute_detailed(self) -> MetricsReport:
        if not self._syncs():
            return self._evaluate(self._images)
        gathered: list[list[_DetectionImage] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._images)
        # evaluate once on rank 0 and broadcast the report, or the error, so no rank is left waiting
        outcome: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                outcome[0] = self._evaluate([image for part in gathered for image in part])
            except Exception as error:  # any failure must reach the other ranks, or they wait forever
                outcome[0] = error
        dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    def _evaluate(self, images: list[_DetectionImage]) -> MetricsReport:
        if not images:
            raise RuntimeError("DetectionMetrics.compute: no images were added (call update() first)")
        images = self._order_images(images)
        if self.label_names is not None:
            label_ids = list(range(len(self.label_names)))
        else:
            seen = set()
            for image in images:
                seen.update(image.gt_labels.tolist())
                seen.update(image.pred_labels.tolist())
            label_ids = sorted(seen)
        ground_truth, detections = self._build_coco(images, label_ids)

        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints progress and its summary table
            evaluator = COCOeval(ground_truth, detections, self.iou_type)
            evaluator.params.maxDets = [1, 10, self.max_dets]
            evaluator.params.catIds = [label + 1 for label in label_ids]
            if label_ids:
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
                stats = [float(value) for value in evaluator.stats]
            else:
                stats = [-1.0] * len(_COCO_STAT_NAMES)
        summary = {
            name.format(max=self.max_dets): (math.nan if value == -1 else value)
            for name, value in zip(_COCO_STAT_NAMES, stats)
        }
        metrics = {key: summary[key] for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", self.recall_key)}

        per_class = self._per_class(evaluator if label_ids else None, images, label_ids)
        counts = {
            "num_images": len(images),
            "num_images_without_ground_truth": sum(len(image.gt_labels) == 0 for image in images),
            "num_ground_truth": sum(int((image.gt_iscrowd == 0).sum()) for image in images),
            "num_crowd": sum(int((image.gt_iscrowd != 0).sum()) for image in images),
            "num_predictions": sum(len(image.pred_labels) for image in images),
        }
        names = [self._name(label) for label in label_ids]
        extra = {key: value for key, value in summary.items() if key not in metrics}
        operating_point, analysis = detection_analysis(
            evaluator if label_ids else None,
            images,
            label_ids,
            names,
            score_threshold=self.score_threshold,
            iou_type=self.iou_type,
        )
        for name, row in operating_point.pop("per_class").items():
            per_class[name].update(row)
        extra.update(operating_point)
        return MetricsReport(metrics, per_class, counts, names, None, extra, analysis)

    def _order_images(self, images: list[_DetectionImage]) -> list[_DetectionImage]:
        uses_ids = {image.image_id is not None for image in images}
        if len(uses_ids) > 1:
            raise ValueError(
                "DetectionMetrics.compute: some images have an 'image_id' and others do not (ranks or batches "
                "disagree); use image ids everywhere or nowhere"
            )
        if uses_ids == {False}:
            return images
        duplicates = sorted(str(i) for i, n in Counter(image.image_id for image in images).items() if n > 1)
        if duplicates:
            raise ValueError(
                f"DetectionMetrics.compute: image_id {', '.join(duplicates[:5])} was added more than once (on "
                "different ranks?). A DistributedSampler pads the last batch with repeated images: evaluate with "
                "even shards, or drop the repeats (accelerate's gather_for_metrics does)"
            )
        # sort by id so the result does not depend on how the split was sharded (ties in score are broken by
        # image order inside COCOeval)
        return sorted(images, key=lambda image: (isinstance(image.image_id, str), image.image_id))

    def _build_coco(self, images: list[_DetectionImage], label_ids: list[int]) -> tuple[COCO, COCO]:
        coco_images, annotations, results = [], [], []
        for coco_image_id, image in enumerate(images, start=1):
            entry: dict[str, Any] = {"id": coco_image_id}
            if image.image_size is not None:
                entry["height"], entry["width"] = image.image_size
            coco_images.append(entry)
            gt_xywh = _xyxy_to_xywh(image.gt_boxes)
            for box_index in range(len(image.gt_labels)):
                annotation = {
                    "id": len(annotations) + 1,  # COCOeval reads a matched id of 0 as "unmatched"
                    "image_id": coco_image_id,
                    "category_id": int(image.gt_labels[box_index]) + 1,
                    "bbox": gt_xywh[box_index].tolist(),
                    "iscrowd": int(image.gt_iscrowd[box_index]),
                }
                if self.iou_type == "segm":
                    annotation["segmentation"] = image.gt_rles[box_index]
                    default_area = float(mask_utils.area(image.gt_rles[box_index]))
                else:
                    default_area = float(gt_xywh[box_index, 2] * gt_xywh[box_index, 3])
                annotation["area"] = (
                    default_area if image.gt_area is None else float(image.gt_area[box_index])
                )
                annotations.append(annotation)
            pred_xywh = _xyxy_to_xywh(image.pred_boxes)
            for box_index in range(len(image.pred_labels)):
                result = {
                    "image_id": coco_image_id,
                    "category_id": int(image.pred_labels[box_index]) + 1,
                    "score": float(image.pred_scores[box_index]),
                }
                if self.iou_type == "segm":
                    result["segmentation"] = image.pred_rles[box_index]
                else:
                    result["bbox"] = pred_xywh[box_index].tolist()
                results.append(result)

        categories = [{"id": label + 1, "name": self._name(label)} for label in label_ids]
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth = COCO()
            ground_truth.dataset = {
                "images": coco_images,
                "annotations": annotations,
                "categories": categories,
            }
            ground_truth.createIndex()
            if results:
                detections = ground_truth.loadRes(results)
            else:
                # loadRes indexes results[0], so an empty result set is built by hand
                detections = COCO()
                detections.dataset = {
                    "images": list(coco_images),
                    "annotations": [],
                    "categories": categories,
                }
                detections.createIndex()
        return ground_truth, detections

    def _per_class(
        self, evaluator: COCOeval | None, images: list[_DetectionImage], label_ids: list[int]
    ) -> dict[str, dict[str, float | int | bool]]:
        per_class = {}
        for k, label in enumerate(label_ids):
            row: dict[str, float | int | bool] = {}
            if evaluator is not None:
                precision = evaluator.eval[
                    "precision"
                ]  # (T iou thresholds, R recall points, K, A areas, M maxDets)
                recall = evaluator.eval["recall"]  # (T, K, A, M)
                thresholds = evaluator.params.iouThrs
                row["AP"] = _mean_defined(precision[:, :, k, 0, -1])
                row["AP50"] = _mean_defined(precision[np.isclose(thresholds, 0.5), :, k, 0, -1])
                row["AP75"] = _mean_defined(precision[np.isclose(thresholds, 0.75), :, k, 0, -1])
                row[self.recall_key] = _mean_defined(recall[:, k, 0, -1])
            row["num_ground_truth"] = sum(
                int(((image.gt_labels == label) & (image.gt_iscrowd == 0)).sum()) for image in images
            )
            row["num_predictions"] = sum(int((image.pred_labels == label).sum()) for image in images)
            per_class[self._name(label)] = row
        return per_class

    def _name(self, label: int) -> str:
        return self.label_names[label] if self.label_names is not None else str(label)


def _mean_defined(values: np.ndarray) -> float:
    """COCOeval's averaging: entries of -1 mean "no ground truth here" and are left out; none left gives NaN."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else math.nan


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    converted = boxes.astype(np.float64, copy=True)
    converted[:, 2:] -= converted[:, :2]
    return converted


def _encode_masks(masks: np.ndarray) -> list[dict]:
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


# ----------------------------------------------------------------------------------------------------------
# Detection at an operating point: precision / recall / F1, confidence curves, detection confusion matrix
# ----------------------------------------------------------------------------------------------------------


def confidence_curves(
    scores: Any, true_positive: Any, num_ground_truth: int, thresholds: Any = _CONFIDENCE_GRID
) -> dict[str, np.ndarray]:
    """Precision, recall and F1 of one class's detections against the confidence threshold.

    At threshold `t` the detections with `score > t` are kept (strictly, as post-processing keeps boxes). Where
    nothing is kept, precision is 1, recall 0 and F1 0: the end point of scikit-learn's `precision_recall_curve`
    and Ultralytics' `ap_per_class` curves. Without ground truth recall and F1 are NaN.

    Args:
        scores: `(D,)` detection scores.
        true_positive: `(D,)` bools, whether each detection matched a ground-truth box (at IoU 0.5 here).
        num_ground_truth: the class's ground-truth boxes (COCO's non-ignored ones).
        thresholds: the confidences to evaluate at.

    Returns:
        `{"precision", "recall", "F1", "kept", "TP"}`, each an array over `thresholds`.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    true_positive = np.asarray(true_positive, dtype=bool).reshape(-1)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if scores.shape != true_positive.shape:
        raise ValueError(f"confidence_curves: {scores.shape[0]} scores for {true_positive.shape[0]} TP flags")
    order = np.argsort(-scores, kind="stable")
    cumulative_tp = np.concatenate([[0], np.cumsum(true_positive[order])])
    # -scores sorted ascending: the entries below -t are the scores above t
    kept = np.searchsorted(-scores[order], -thresholds, side="left")
    tp = cumulative_tp[kept]
    precision = np.where(kept > 0, tp / np.maximum(kept, 1), 1.0)
    if num_ground_truth > 0:
        recall = tp / num_ground_truth
        f1 = _safe_divide(2 * precision * recall, precision + recall, 0.0)
    else:
        recall = np.full_like(precision, math.nan)
        f1 = np.full_like(precision, math.nan)
    return {"precision": precision, "recall": recall, "F1": f1, "kept": kept, "TP": tp}


def _coco_outcomes(evaluator: COCOeval, k: int, t: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores and TP flags of category `k`'s non-ignored detections at IoU index `t`, as COCOeval matched them.

    Reads `evalImgs` (ordered category, area range, image) for the "all" area range, exactly as
    `COCOeval.accumulate` does: crowd matches and detections beyond `maxDets` per image are left out.
    """
    num_images = len(evaluator.params.imgIds)
    start = k * len(evaluator.params.areaRng) * num_images
    entries = [entry for entry in evaluator.evalImgs[start : start + num_images] if entry is not None]
    if not entries:
        return np.zeros(0), np.zeros(0, dtype=bool), 0
    scores = np.concatenate([np.asarray(entry["dtScores"], dtype=np.float64) for entry in entries])
    matched = np.concatenate([np.asarray(entry["dtMatches"])[t] for entry in entries]) > 0
    ignored = np.concatenate([np.asarray(entry["dtIgnore"])[t] for entry in entries]).astype(bool)
    num_ground_truth = sum(int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0)) for entry in entries)
    return scores[~ignored], matched[~ignored], num_ground_truth


def _operating_point(curve: Mapping[str, np.ndarray], num_ground_truth: int) -> dict[str, float | int]:
    """Precision / recall / F1 / TP / FP / FN from a one-threshold `confidence_curves` result.

    Unlike on the curves, precision with nothing kept is 0 when the class has ground truth (every box missed;
    scikit-learn's `zero_division=0`, as the segmentation metric) and NaN when it has none.
    """
    kept, tp = int(curve["kept"][0]), int(curve["TP"][0])
    # nothing kept: every box missed (0), or nothing to find (undefined)
    precision = tp / kept if kept else (0.0 if num_ground_truth else math.nan)
    recall = tp / num_ground_truth if num_ground_truth else math.nan
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "F1": f1,
        "TP": tp,
        "FP": kept - tp,
        "FN": num_ground_truth - tp,
    }


def _confusion_ious(image: _DetectionImage, keep: np.ndarray, iou_type: str) -> np.ndarray:
    """(kept detections, ground truths) IoU, crowd columns as COCO computes them (intersection / detection)."""
    crowd = (image.gt_iscrowd != 0).astype(np.uint8).tolist()
    if iou_type == "bbox":
        detections, ground_truth = _xyxy_to_xywh(image.pred_boxes[keep]), _xyxy_to_xywh(image.gt_boxes)
    else:
        detections = [image.pred_rles[index] for index in np.flatnonzero(keep)]
        ground_truth = image.gt_rles
    ious = mask_utils.iou(detections, ground_truth, crowd)
    return np.asarray(ious, dtype=np.float64).reshape(int(keep.sum()), len(image.gt_labels))


def _detection_confusion_matrix(
    images: Sequence[_DetectionImage],
    label_ids: list[int],
    score_threshold: float,
    iou_type: str,
    iou_threshold: float = _ANALYSIS_IOU,
) -> np.ndarray:
    """Ultralytics' detection confusion matrix, in this module's orientation (rows = ground truth).

    `(C + 1, C + 1)` int64; index `C` is background. Per image, detections with `score > score_threshold` are
    matched to ground-truth boxes of any class at `IoU >= iou_threshold`, one to one, highest IoU first
    (Ultralytics' `ConfusionMatrix.process_batch`): a matched pair counts in `[true class, predicted class]`, a
    missed ground-truth box in `[true class, background]`, a detection left unmatched in `[background, predicted
    class]`. Crowd boxes are neither counted nor missed, and a detection covering one (COCO's crowd IoU) is not a
    false positive.
    """
    num_classes = len(label_ids)
    background = num_classes
    position = {label: index for index, label in enumerate(label_ids)}
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for image in images:
        keep = image.pred_scores > score_threshold
        predicted = np.array([position[label] for label in image.pred_labels[keep]], dtype=np.int64)
        crowd = image.gt_iscrowd != 0
        truth = np.array([position[label] for label in image.gt_labels], dtype=np.int64)
        if len(predicted) and len(truth):
            ious = _confusion_ious(image, keep, iou_type)
        else:
            ious = np.zeros((len(predicted), len(truth)))
        real = np.flatnonzero(~crowd)
        detection_index, real_index = np.nonzero(ious[:, real] >= iou_threshold)
        gt_index = real[real_index]
        values = ious[detection_index, gt_index]
        # best IoU per detection, then best per ground truth (stable sorts: ties go to the lower index)
        order = np.argsort(-values, kind="stable")
        detection_index, gt_index, values = detection_index[order], gt_index[order], values[order]
        _, first = np.unique(detection_index, return_index=True)
        first = np.sort(first)
        detection_index, gt_index = detection_index[first], gt_index[first]
        _, first = np.unique(gt_index, return_index=True)
        detection_index, gt_index = detection_index[first], gt_index[first]

        np.add.at(matrix, (truth[gt_index], predicted[detection_index]), 1)
        missed = np.setdiff1d(real, gt_index)
        np.add.at(matrix, (truth[missed], background), 1)
        unmatched = np.setdiff1d(np.arange(len(predicted)), detection_index)
        if crowd.any() and len(unmatched):
            unmatched = unmatched[
                ~(ious[np.ix_(unmatched, np.flatnonzero(crowd))] >= iou_threshold).any(axis=1)
            ]
        np.add.at(matrix, (background, predicted[unmatched]), 1)
    return matrix


def _json_curve(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(value) else round(float(value), _CURVE_DECIMALS) for value in values]


def detection_analysis(
    evaluator: COCOeval | None,
    images: Sequence[_DetectionImage],
    label_ids: list[int],
    names: list[str],
    *,
    score_threshold: float,
    iou_type: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The threshold-dependent detection results of [`DetectionMetrics`], from COCOeval's own matching at IoU 0.5.

    Returns `(operating_point, analysis)`:

    * `operating_point`: `per_class[name]` with `precision`, `recall`, `F1`, `TP`, `FP`, `FN` of the detections
      with `score > score_threshold` (COCO's greedy matching by score at IoU 0.5, crowd and `max_dets` rules
      included); `precision`, `recall`, `F1`: their means over the classes with ground truth (Ultralytics' `mp`,
      `mr`, at a fixed threshold); `best_F1`, `best_F1_confidence`: the highest point of the all-classes F1 curve.
    * `analysis` (JSON-ready; curves are lists rounded to 4 decimals, `None` where undefined):
      `iou_threshold`, `score_threshold`; `recall_grid` (COCOeval's 101 recall points) and `pr_curve`: `{"all",
      "per_class"}` the interpolated precision at each recall, COCOeval's own AP50 curve (its mean is the class's
      `AP50`; "all" is the mean over classes with ground truth, whose mean is `AP50`); `confidence_grid` (0.00
      to 1.00 by 0.01) and `confidence_curves`: `{"all", "per_class"}`, each `{"precision", "recall", "F1"}`
      against confidence (see [`confidence_curves`]; "all" is the mean over classes with ground truth, as in
      Ultralytics); `confusion_matrix`: `{"labels", "matrix"}`, the class names plus "background" and the
      `(C + 1, C + 1)` counts, rows = ground truth, columns = prediction, Ultralytics' matching (class-agnostic,
      one to one, IoU >= 0.5, `score > score_threshold`): `[c, background]` counts missed boxes of class `c`,
      `[background, c]` detections of `c` that match nothing. Classes without ground truth have no curves.
    """
    operating_point: dict[str, Any] = {"per_class": {}}
    thresholds = np.asarray([score_threshold])
    pr_curves: dict[str, list] = {}
    curves: dict[str, dict[str, list]] = {}
    class_curves: list[dict[str, np.ndarray]] = []
    class_pr: list[np.ndarray] = []
    class_points: list[dict[str, float | int]] = []
    recall_grid: list[float] = []
    if evaluator is not None:
        t = int(np.flatnonzero(np.isclose(evaluator.params.iouThrs, _ANALYSIS_IOU))[0])
        recall_grid = [round(float(value), 2) for value in evaluator.params.recThrs]
        for k, name in enumerate(names):
            scores, true_positive, num_ground_truth = _coco_outcomes(evaluator, k, t)
            point = _operating_point(
                confidence_curves(scores, true_positive, num_ground_truth, thresholds), num_ground_truth
            )
            operating_point["per_class"][name] = point
            if num_ground_truth == 0:
                continue
            class_points.append(point)
            curve = confidence_curves(scores, true_positive, num_ground_truth)
            class_curves.append(curve)
            curves[name] = {key: _json_curve(curve[key]) for key in ("precision", "recall", "F1")}
            precision = evaluator.eval["precision"][t, :, k, 0, -1]
            class_pr.append(precision)
            pr_curves[name] = _json_curve(precision)
    for key in ("precision", "recall", "F1"):
        operating_point[key] = float(np.mean([p[key] for p in class_points])) if class_points else math.nan
    all_curves = None
    if class_curves:
        means = {
            key: np.mean([curve[key] for curve in class_curves], axis=0)
            for key in ("precision", "recall", "F1")
        }
        best = int(np.argmax(means["F1"]))
        operating_point["best_F1"] = float(means["F1"][best])
        operating_point["best_F1_confidence"] = float(_CONFIDENCE_GRID[best])
        all_curves = {key: _json_curve(value) for key, value in means.items()}
    else:
        operating_point["best_F1"] = operating_point["best_F1_confidence"] = math.nan
    matrix = _detection_confusion_matrix(images, label_ids, score_threshold, iou_type)
    analysis = {
        "iou_threshold": _ANALYSIS_IOU,
        "score_threshold": score_threshold,
        "recall_grid": recall_grid,
        "pr_curve": {
            "all": _json_curve(np.mean(class_pr, axis=0)) if class_pr else None,
            "per_class": pr_curves,
        },
        "confidence_grid": [float(value) for value in _CONFIDENCE_GRID],
        "confidence_curves": {"all": all_curves, "per_class": curves},
        "confusion_matrix": {"labels": [*names, "background"], "matrix": matrix.tolist()},
    }
    return operating_point, analysis
