"""Classification: top-k accuracy, per-class accuracy, error counts and a confusion matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import (
    MetricsReport,
    _all_reduce_sum,
    _as_tensor,
    _check_label_names,
    _describe_values,
    _StreamingMetric,
)

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
