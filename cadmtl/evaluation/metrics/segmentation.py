"""Semantic segmentation: mIoU, mFscore, mPrecision, mRecall and aAcc from one confusion matrix (mmsegmentation's
`IoUMetric` definitions)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dataset_scripts.schema import IGNORE_INDEX

from .base import (
    MetricsReport,
    _all_reduce_sum,
    _as_tensor,
    _check_label_names,
    _describe_values,
    _safe_divide,
    _StreamingMetric,
)

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
