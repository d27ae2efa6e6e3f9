"""DetectionMetrics: hand-computed AP, equality with pycocotools run directly, edge cases and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cadmtl.evaluation.metrics import DetectionMetrics, format_percentages

HEADLINE_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100")
CARPARTS_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "carparts_dsmlr" / "testset"


def _prediction(boxes, scores, labels) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _target(boxes, labels, **extra) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        **extra,
    }


def _xywh(box: np.ndarray) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def _pycocotools_directly(predictions, targets, category_ids, max_dets=(1, 10, 100)) -> COCOeval:
    """The reference: the usual COCO-json route through pycocotools, written independently of metrics.py."""
    images, annotations, results = [], [], []
    for image_id, (prediction, target) in enumerate(zip(predictions, targets)):
        images.append({"id": image_id})
        for box, label in zip(target["boxes"].double().numpy(), target["labels"].tolist()):
            xywh = _xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(
            prediction["boxes"].double().numpy(), prediction["scores"].tolist(), prediction["labels"].tolist()
        ):
            results.append({"image_id": image_id, "category_id": label, "bbox": _xywh(box), "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c} for c in category_ids],
        }
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _stats_as_metrics(stats: np.ndarray) -> dict[str, float]:
    values = [stats[0], stats[1], stats[2], stats[3], stats[4], stats[5], stats[8]]
    return {key: (math.nan if value == -1 else float(value)) for key, value in zip(HEADLINE_KEYS, values)}


def _assert_same(actual: dict[str, float], expected: dict[str, float], tolerance: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        if math.isnan(expected[key]):
            assert math.isnan(actual[key]), key
        else:
            assert actual[key] == pytest.approx(expected[key], abs=tolerance), key


def _random_split(seed: int, num_images: int = 12, num_classes: int = 4):
    """Jittered ground truth with label noise, misses, false positives, an empty image and a missing class.

    Class 3 never has ground truth (only false positives): COCOeval must leave it out of the mean.
    Class 2 has ground truth but is never predicted: it must count as AP 0.
    """
    rng = np.random.default_rng(seed)
    predictions, targets = [], []
    for image_index in range(num_images):
        gt_boxes, gt_labels = [], []
        num_boxes = 0 if image_index in (0, 5) else int(rng.integers(1, 6))
        for _ in range(num_boxes):
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.uniform(8, 160, 2)
            gt_boxes.append([x, y, x + w, y + h])
            gt_labels.append(int(rng.integers(0, 3)))
        boxes, scores, labels = [], [], []
        for box, label in zip(gt_boxes, gt_labels):
            if label == 2 or rng.random() < 0.2:
                continue  # class 2 is never detected; other boxes are missed 20% of the time
            jitter = rng.normal(0, 0.08 * (box[2] - box[0]), 4)
            boxes.append(list(np.asarray(box) + jitter))
            labels.append(label if rng.random() < 0.85 else int(rng.integers(0, 2)))
            scores.append(float(rng.uniform(0.3, 1.0)))
        extra = 0 if image_index == 0 else int(rng.integers(0, 3))  # image 0: no ground truth, no predictions
        for _ in range(extra):
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.uniform(4, 90, 2)
            boxes.append([x, y, x + w, y + h])
            labels.append(int(rng.choice([0, 1, 3])))
            scores.append(float(rng.uniform(0.0, 0.7)))
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        predictions.append(_prediction(boxes, scores, labels))
        targets.append(_target(gt_boxes, gt_labels))
    return predictions, targets


def test_hand_computed_single_class_ap() -> None:
    # One image, two 20x20 ground-truth boxes (area 400 < 32^2: "small"). Detections by score: an exact match
    # (TP, recall 0.5, precision 1) then a box far away (FP, recall 0.5, precision 0.5). COCO samples the
    # interpolated precision at 101 recall points 0, 0.01, ..., 1: the 51 points <= 0.5 get precision 1, the
    # other 50 get 0, at every IoU threshold (the match is exact). AP = AP50 = AP75 = APs = 51/101; recall 1/2.
    # No medium or large ground truth, so APm and APl are undefined: NaN, not COCOeval's -1.
    metric = DetectionMetrics(label_names=["scratch"])
    metric.update(
        [_prediction([[10, 10, 30, 30], [200, 200, 220, 220]], [0.9, 0.8], [0, 0])],
        [_target([[10, 10, 30, 30], [50, 50, 70, 70]], [0, 0])],
    )
    result = metric.compute()
    assert list(result) == list(HEADLINE_KEYS)
    for key in ("AP", "AP50", "AP75", "APs"):
        assert result[key] == pytest.approx(51 / 101, abs=1e-12)
    assert result["AR@100"] == pytest.approx(0.5)
    assert math.isnan(result["APm"]) and math.isnan(result["APl"])
    assert format_percentages(result)["APm"] == "n/a"
    assert format_percentages(result)["AP"] == "50.50"


def test_equals_pycocotools_on_random_multiclass_split() -> None:
    predictions, targets = _random_split(seed=3)
    metric = DetectionMetrics()
    # several update() calls of different sizes
    metric.update(predictions[:5], targets[:5])
    metric.update(predictions[5:6], targets[5:6])
    metric.update(predictions[6:], targets[6:])
    report = metric.compute_detailed()

    reference = _pycocotools_directly(predictions, targets, category_ids=[0, 1, 2, 3])
    _assert_same(report.metrics, _stats_as_metrics(reference.stats))
    assert 0 < report.metrics["AP"] < report.metrics["AP50"] < 1  # a non-trivial case
    assert report.extra_metrics["AR@1"] == pytest.approx(reference.stats[6], abs=1e-6)
    assert report.extra_metrics["ARl"] == pytest.approx(reference.stats[11], abs=1e-6)

    # per-class AP equals a separate pycocotools run restricted to that category
    for label in (0, 1, 2):
        single = _pycocotools_directly(predictions, targets, category_ids=[label])
        assert report.per_class[str(label)]["AP"] == pytest.approx(single.stats[0], abs=1e-6)
        assert report.per_class[str(label)]["AP50"] == pytest.approx(single.stats[1], abs=1e-6)
        assert report.per_class[str(label)]["AR@100"] == pytest.approx(single.stats[8], abs=1e-6)
    assert report.per_class["2"]["AP"] == 0.0  # ground truth, never predicted
    assert report.per_class["2"]["num_predictions"] == 0
    assert math.isnan(report.per_class["3"]["AP"])  # predicted, no ground truth: excluded from the mean
    assert report.per_class["3"]["num_ground_truth"] == 0
    assert report.counts["num_images"] == 12
    assert report.counts["num_images_without_ground_truth"] == 2
    assert report.counts["num_ground_truth"] == sum(len(t["labels"]) for t in targets)
    assert report.counts["num_predictions"] == sum(len(p["labels"]) for p in predictions)
    assert report.confusion_matrix is None
    json.dumps(report.to_dict())  # NaN became None, numpy scalars became Python numbers


def test_label_names_fix_the_category_set_and_names() -> None:
    predictions, targets = _random_split(seed=4)
    names = ["dent", "scratch", "crack", "stain", "never_seen"]
    metric = DetectionMetrics(label_names=names)
    metric.update(predictions, targets)
    report = metric.compute_detailed()
    assert list(report.per_class) == names
    assert report.label_names == names
    assert math.isnan(report.per_class["never_seen"]["AP"])
    # a category nobody uses does not change the means
    reference = _pycocotools_directly(predictions, targets, category_ids=[0, 1, 2, 3, 4])
    _assert_same(report.metrics, _stats_as_metrics(reference.stats))


def test_empty_predictions_give_zero_ap_where_there_is_ground_truth() -> None:
    _, targets = _random_split(seed=5)
    empty = [_prediction([], [], []) for _ in targets]
    metric = DetectionMetrics()
    metric.update(empty, targets)
    report = metric.compute_detailed()
    assert report.metrics["AP"] == 0.0
    assert report.metrics["AR@100"] == 0.0
    assert all(row["AP"] == 0.0 for row in report.per_class.values())
    assert report.counts["num_predictions"] == 0


def test_no_ground_truth_anywhere_gives_nan_not_minus_one() -> None:
    metric = DetectionMetrics()
    metric.update([_prediction([[0, 0, 10, 10]], [0.5], [1]), _prediction([], [], [])], [_target([], [])] * 2)
    result = metric.compute()
    assert all(math.isnan(value) for value in result.values())
    metric.reset()
    metric.update([_prediction([], [], [])], [_target([], [])])  # no labels at all: nothing to evaluate
    assert all(math.isnan(value) for value in metric.compute().values())


def test_images_without_ground_truth_or_predictions_change_nothing() -> None:
    predictions, targets = _random_split(seed=6)
    metric = DetectionMetrics()
    metric.update(predictions, targets)
    before = metric.compute()
    metric.update([_prediction([], [], [])] * 3, [_target([], [])] * 3)
    _assert_same(metric.compute(), before, tolerance=0)


def test_crowd_and_area_are_honoured_like_pycocotools() -> None:
    # A crowd region absorbs a detection without a false positive; a given area moves a box between
    # small/medium/large. Compare with pycocotools fed the same iscrowd and area.
    target = _target(
        [[0, 0, 100, 100], [200, 200, 260, 260], [300, 0, 340, 40]],
        [0, 0, 0],
        iscrowd=torch.tensor([0, 1, 0]),
        area=torch.tensor([9000.0, 3600.0, 500.0]),
    )
    prediction = _prediction(
        [[2, 2, 98, 99], [210, 210, 250, 250], [300, 0, 338, 41]], [0.9, 0.8, 0.7], [0, 0, 0]
    )
    metric = DetectionMetrics()
    metric.update([prediction], [target])

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": [{"id": 1}],
            "categories": [{"id": 7}],
            "annotations": [
                {
                    "id": i + 1,
                    "image_id": 1,
                    "category_id": 7,
                    "bbox": _xywh(box),
                    "area": area,
                    "iscrowd": crowd,
                }
                for i, (box, area, crowd) in enumerate(
                    zip(target["boxes"].double().numpy(), [9000.0, 3600.0, 500.0], [0, 1, 0])
                )
            ],
        }
        ground_truth.createIndex()
        results = [
            {"image_id": 1, "category_id": 7, "bbox": _xywh(box), "score": score}
            for box, score in zip(prediction["boxes"].double().numpy(), prediction["scores"].tolist())
        ]
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    _assert_same(metric.compute(), _stats_as_metrics(evaluator.stats))
    assert metric.compute_detailed().counts["num_crowd"] == 1


def test_segm_iou_type_equals_pycocotools() -> None:
    height, width = 40, 50
    gt_masks = np.zeros((2, height, width), dtype=bool)
    gt_masks[0, 5:20, 5:25] = True
    gt_masks[1, 25:38, 30:48] = True
    pred_masks = np.zeros((3, height, width), dtype=bool)
    pred_masks[0, 6:20, 5:24] = True  # good overlap with gt 0
    pred_masks[1, 25:30, 30:40] = True  # poor overlap with gt 1
    pred_masks[2, 0:4, 0:4] = True  # false positive
    metric = DetectionMetrics(iou_type="segm")
    metric.update(
        [
            {
                "masks": torch.from_numpy(pred_masks),
                "scores": torch.tensor([0.9, 0.6, 0.3]),
                "labels": torch.tensor([0, 1, 1]),
            }
        ],
        [{"masks": torch.from_numpy(gt_masks), "labels": torch.tensor([0, 1])}],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        encoded = mask_utils.encode(np.asfortranarray(gt_masks.transpose(1, 2, 0).astype(np.uint8)))
        ground_truth.dataset = {
            "images": [{"id": 1, "height": height, "width": width}],
            "categories": [{"id": 1}, {"id": 2}],
            "annotations": [
                {
                    "id": i + 1,
                    "image_id": 1,
                    "category_id": label,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": list(mask_utils.toBbox(rle)),
                    "iscrowd": 0,
                }
                for i, (rle, label) in enumerate(zip(encoded, [1, 2]))
            ],
        }
        ground_truth.createIndex()
        predicted = mask_utils.encode(np.asfortranarray(pred_masks.transpose(1, 2, 0).astype(np.uint8)))
        results = [
            {"image_id": 1, "category_id": label, "segmentation": rle, "score": score}
            for rle, label, score in zip(predicted, [1, 2, 2], [0.9, 0.6, 0.3])
        ]
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    _assert_same(metric.compute(), _stats_as_metrics(evaluator.stats))
    assert 0 < metric.compute()["AP"] < 1


def test_max_dets_names_the_recall_key_and_limits_detections() -> None:
    predictions, targets = _random_split(seed=7)
    metric = DetectionMetrics(max_dets=2)
    metric.update(predictions, targets)
    result = metric.compute()
    assert "AR@2" in result and "AR@100" not in result
    reference = _pycocotools_directly(predictions, targets, category_ids=[0, 1, 2, 3], max_dets=(1, 10, 2))
    expected = _stats_as_metrics(reference.stats)
    expected["AR@2"] = expected.pop("AR@100")
    _assert_same(result, expected)


def test_image_ids_pair_predictions_and_make_the_result_order_independent() -> None:
    predictions, targets = _random_split(seed=8)
    ids = [f"car_{index:03d}" for index in range(len(targets))]
    targets_with_ids = [{**target, "image_id": image_id} for target, image_id in zip(targets, ids)]
    predictions_with_ids = [
        {**prediction, "image_id": image_id} for prediction, image_id in zip(predictions, ids)
    ]

    in_order = DetectionMetrics()
    in_order.update(predictions, targets)

    shuffled = DetectionMetrics()
    order = np.random.default_rng(0).permutation(len(targets))
    half = len(order) // 2
    # second half first, and predictions listed in a different order than targets inside each batch
    for chunk in (order[half:], order[:half]):
        shuffled.update(
            [predictions_with_ids[i] for i in chunk[::-1]],
            [targets_with_ids[i] for i in chunk],
        )
    _assert_same(shuffled.compute(), in_order.compute(), tolerance=1e-12)


def test_carparts_test_split_equals_pycocotools_on_the_annotation_file() -> None:
    """Real COCO annotations (100 images, 18 used classes, polygon areas): perturbed ground truth as predictions."""
    annotation_file = CARPARTS_TEST / "annotations.json"
    if not annotation_file.is_file():
        pytest.skip(f"real data not available at {annotation_file}")
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
    rng = np.random.default_rng(0)
    category_ids = sorted(ground_truth.getCatIds())
    predictions, targets, results = [], [], []
    for image_id in sorted(ground_truth.getImgIds()):
        annotations = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=[image_id]))
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        labels = np.array([a["category_id"] for a in annotations], dtype=np.int64)
        keep = rng.random(len(labels)) > 0.15
        noisy = xyxy[keep] + rng.normal(0, 0.05, (int(keep.sum()), 1)) * (
            xyxy[keep, 2:4] - xyxy[keep, :2]
        ).repeat(2, 1)
        noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
        predicted_labels = np.where(
            rng.random(len(noisy)) < 0.1, rng.choice(category_ids, len(noisy)), labels[keep]
        )
        scores = rng.uniform(0.05, 1.0, len(noisy))
        predictions.append(
            {"boxes": noisy, "scores": scores, "labels": predicted_labels, "image_id": image_id}
        )
        targets.append(
            {
                "boxes": xyxy,
                "labels": labels,
                "image_id": image_id,
                "area": [a["area"] for a in annotations],
                "iscrowd": [int(a["iscrowd"]) for a in annotations],
            }
        )
        results += [
            {"image_id": image_id, "category_id": int(label), "bbox": _xywh(box), "score": float(score)}
            for box, label, score in zip(noisy, predicted_labels, scores)
        ]
    metric = DetectionMetrics()
    metric.update(predictions, targets)
    report = metric.compute_detailed()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    _assert_same(report.metrics, _stats_as_metrics(evaluator.stats))
    assert 0.2 < report.metrics["AP"] < 0.95
    # category 1 ("_background_") has no instances in the file: it is not part of any mean
    assert report.counts["num_ground_truth"] == len(ground_truth.getAnnIds())


@pytest.mark.parametrize(
    ("predictions", "targets", "message"),
    [
        ([_prediction([], [], [])], [], "1 prediction dicts for 0 target dicts"),
        (
            [_prediction([[0, 0, 5, 5]], [0.5, 0.4], [0])],
            [_target([], [])],
            r"predictions\[0\]\['scores'\] has 2 values for 1 labels",
        ),
        (
            [
                {
                    "boxes": torch.zeros(2, 3),
                    "scores": torch.ones(2),
                    "labels": torch.zeros(2, dtype=torch.long),
                }
            ],
            [_target([], [])],
            r"predictions\[0\]\['boxes'\] must have shape \(2, 4\)",
        ),
        (
            [_prediction([[0, 0, float("nan"), 5]], [0.5], [0])],
            [_target([], [])],
            "contains NaN or infinite values",
        ),
        ([_prediction([[10, 0, 5, 5]], [0.5], [0])], [_target([], [])], "x2 < x1 or y2 < y1"),
        (
            [_prediction([], [], [])],
            [_target([[0, 0, 5, 5]], [7])],
            r"targets\[0\]\['labels'\] contains \[7\]",
        ),
        ([_prediction([], [], [])], [_target([[0, 0, 5, 5]], [-1])], r"contains \[-1\]"),
        ([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], [_target([], [])], "has no 'scores'"),
        (
            [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([0.5])}],
            [_target([], [])],
            "must be integer class ids",
        ),
        ([_prediction([], [], [])], [{"labels": torch.tensor([0])}], r"targets\[0\] has no 'boxes'"),
        ({"boxes": torch.zeros(0, 4)}, [_target([], [])], "lists of dicts, one per image"),
    ],
)
def test_bad_input_raises_clear_errors(predictions, targets, message) -> None:
    metric = DetectionMetrics(label_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=message):
        metric.update(predictions, targets)


def test_image_id_errors() -> None:
    empty = _prediction([], [], [])
    metric = DetectionMetrics()
    with pytest.raises(ValueError, match="predictions for image_id 9 have no ground truth"):
        metric.update([{**empty, "image_id": 9}], [_target([], [], image_id=1)])
    with pytest.raises(ValueError, match="either every target has an 'image_id' or none does"):
        metric.update([empty, empty], [_target([], [], image_id=1), _target([], [])])
    with pytest.raises(ValueError, match="predictions carry 'image_id' but targets do not"):
        metric.update([{**empty, "image_id": 1}], [_target([], [])])
    metric.update([empty], [_target([], [], image_id=torch.tensor(4))])
    with pytest.raises(ValueError, match="image_id 4 was added more than once"):
        metric.update([empty], [_target([], [], image_id=4)])
    with pytest.raises(ValueError, match="earlier batches had 'image_id'"):
        metric.update([empty], [_target([], [])])


def test_compute_before_update_and_reset() -> None:
    metric = DetectionMetrics()
    with pytest.raises(RuntimeError, match="no images were added"):
        metric.compute()
    predictions, targets = _random_split(seed=9, num_images=4)
    metric.update(predictions, targets)
    first = metric.compute()
    _assert_same(metric.compute(), first, tolerance=0)  # compute() does not consume the state
    metric.reset()
    with pytest.raises(RuntimeError):
        metric.compute()


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="iou_type must be 'bbox' or 'segm'"):
        DetectionMetrics(iou_type="keypoints")
    with pytest.raises(ValueError, match="max_dets must be >= 1"):
        DetectionMetrics(max_dets=0)
    with pytest.raises(ValueError, match="duplicates"):
        DetectionMetrics(label_names=["a", "a"])
