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

Modules: `classification`, `detection` (COCO AP), `detection_analysis` (operating point, curves, confusion
matrix), `segmentation`, `binary` (image AUROC / AP / F1-max, threshold calibration, verdict metrics) and `base`
(the report and the streaming protocol). Import the public names from here.
"""

from .base import MetricsReport, format_percentages
from .binary import (
    VERDICT_AUROC_FLOOR,
    VERDICT_CALIBRATIONS,
    VERDICT_MIN_INFORMEDNESS,
    auroc_sorted,
    average_precision,
    average_precision_sorted,
    binary_auroc,
    calibrate_f1,
    calibrate_fpr,
    calibrate_threshold,
    degenerate_threshold,
    f1_max,
    f1_max_sorted,
    split_scores,
    verdict_metrics,
)
from .classification import ClassificationMetrics
from .detection import DetectionMetrics
from .detection_analysis import DEFAULT_SCORE_THRESHOLD, confidence_curves, detection_analysis
from .segmentation import SegmentationMetrics

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "VERDICT_AUROC_FLOOR",
    "VERDICT_CALIBRATIONS",
    "VERDICT_MIN_INFORMEDNESS",
    "ClassificationMetrics",
    "DetectionMetrics",
    "MetricsReport",
    "SegmentationMetrics",
    "auroc_sorted",
    "average_precision",
    "average_precision_sorted",
    "binary_auroc",
    "calibrate_f1",
    "calibrate_fpr",
    "calibrate_threshold",
    "confidence_curves",
    "degenerate_threshold",
    "detection_analysis",
    "f1_max",
    "f1_max_sorted",
    "format_percentages",
    "split_scores",
    "verdict_metrics",
]
