"""Object detection: COCO AP / AR from pycocotools' `COCOeval` on in-memory COCO objects, per-class AP, and the
operating-point results of [`detection_analysis`]."""

from __future__ import annotations

import contextlib
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .base import MetricsReport, _as_numpy, _StreamingMetric
from .detection_analysis import DEFAULT_SCORE_THRESHOLD, _DetectionImage, _xyxy_to_xywh, detection_analysis

# ----------------------------------------------------------------------------------------------------------
# Object detection (COCO protocol)
# ----------------------------------------------------------------------------------------------------------

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


def _encode_masks(masks: np.ndarray) -> list[dict]:
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
