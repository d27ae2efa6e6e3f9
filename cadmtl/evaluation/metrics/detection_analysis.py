"""Detection at an operating point: per-class precision / recall / F1, confidence and precision-recall curves
and the detection confusion matrix, from COCOeval's own matching (see [`detection_analysis`])."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from .base import _safe_divide

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


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    converted = boxes.astype(np.float64, copy=True)
    converted[:, 2:] -= converted[:, :2]
    return converted


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
