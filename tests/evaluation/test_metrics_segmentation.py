"""SegmentationMetrics: hand-computed mIoU & co. on crafted masks, an absent class, ignore pixels, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cadmtl.evaluation.metrics import SegmentationMetrics

IGNORE = 255

# Two 2x3 images, 4 classes (0 paint, 1 scratch, 2 dent, 3 crack: crack occurs nowhere), 255 = unlabelled.
TARGET_1 = [[0, 0, 1], [1, IGNORE, IGNORE]]
PRED_1 = [[0, 1, 1], [1, 2, 0]]
TARGET_2 = [[0, 0, 0], [2, 2, IGNORE]]
PRED_2 = [[0, 0, 2], [2, 0, 1]]
# Labelled (target, prediction) pairs; the three ignored pixels (predicted 2, 0, 1) are dropped:
#   image 1: (0,0) (0,1) (1,1) (1,1)      image 2: (0,0) (0,0) (0,2) (2,2) (2,0)
# Confusion matrix (rows target, columns prediction):
#   t0: [3, 1, 1, 0]   t1: [0, 2, 0, 0]   t2: [1, 0, 1, 0]   t3: [0, 0, 0, 0]
# TP = [3, 2, 1, 0], GT = row sums [5, 2, 2, 0], P = column sums [4, 3, 2, 0], union = GT + P - TP = [6, 3, 3, 0]
# Class 3 has union 0 (absent from both): excluded from every mean.
#   IoU       = [3/6, 2/3, 1/3]          mIoU       = (0.5 + 0.6667 + 0.3333) / 3 = 0.5   (0.375 if class 3 counted)
#   Precision = [3/4, 2/3, 1/2]          mPrecision = 1.916667 / 3 = 0.638889
#   Recall    = [3/5, 2/2, 1/2]          mRecall    = 2.1 / 3      = 0.7
#   Fscore    = 2PR/(P+R) = [0.9/1.35, (4/3)/(5/3), 0.5] = [0.666667, 0.8, 0.5]   mFscore = 1.966667 / 3 = 0.655556
#   aAcc      = sum(TP) / sum(GT) = 6 / 9 = 0.666667
EXPECTED = {
    "mIoU": 0.5,
    "mFscore": (2 / 3 + 0.8 + 0.5) / 3,
    "mPrecision": (0.75 + 2 / 3 + 0.5) / 3,
    "mRecall": 0.7,
    "aAcc": 6 / 9,
}
NAMES = ["paint", "scratch", "dent", "crack"]


def _filled(**kwargs) -> SegmentationMetrics:
    metric = SegmentationMetrics(num_classes=4, label_names=NAMES, **kwargs)
    metric.update(torch.tensor([PRED_1, PRED_2]), torch.tensor([TARGET_1, TARGET_2]))
    return metric


def test_hand_computed_metrics_with_absent_class_and_ignore_pixels() -> None:
    result = _filled().compute()
    assert list(result) == ["mIoU", "mFscore", "mPrecision", "mRecall", "aAcc"]
    for key, value in EXPECTED.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def test_detailed_report() -> None:
    report = _filled().compute_detailed()
    np.testing.assert_array_equal(
        report.confusion_matrix, [[3, 1, 1, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    )
    assert report.per_class["scratch"] == {
        "IoU": pytest.approx(2 / 3),
        "Fscore": pytest.approx(0.8),
        "Precision": pytest.approx(2 / 3),
        "Recall": 1.0,
        "gt_pixels": 2,
        "pred_pixels": 3,
        "present": True,
    }
    crack = report.per_class["crack"]
    assert crack["present"] is False and math.isnan(crack["IoU"]) and math.isnan(crack["Fscore"])
    assert report.counts == {"labelled_pixels": 9, "correct_pixels": 6, "classes_evaluated": 3}
    assert json.loads(json.dumps(report.to_dict()))["per_class"]["crack"]["IoU"] is None


def test_split_level_matrix_not_per_image_average() -> None:
    # Per-image mIoU would be mean(image 1, image 2); the split-level value differs, and is what we report.
    metric = SegmentationMetrics(num_classes=4)
    metric.update(torch.tensor([PRED_1]), torch.tensor([TARGET_1]))
    metric.update(torch.tensor(PRED_2), torch.tensor(TARGET_2))  # a single (H, W) map is accepted too
    assert metric.compute()["mIoU"] == pytest.approx(0.5, abs=1e-12)


def test_class_in_ground_truth_but_never_predicted_counts_as_zero_precision() -> None:
    # Target [0, 1], prediction [0, 0]. Class 0: TP 1, GT 1, P 2 -> IoU 1/2, Precision 1/2, Recall 1, F 2/3.
    # Class 1: TP 0, GT 1, P 0 -> IoU 0, Precision 0/0 counted as 0, Recall 0, F 0.
    # mPrecision = (0.5 + 0) / 2 = 0.25 (mmsegmentation's nanmean would drop class 1 and report 0.5).
    metric = SegmentationMetrics(num_classes=2)
    metric.update(torch.tensor([[0, 0]]), torch.tensor([[0, 1]]))
    result = metric.compute()
    assert result["mIoU"] == pytest.approx(0.25)
    assert result["mPrecision"] == pytest.approx(0.25)
    assert result["mRecall"] == pytest.approx(0.5)
    assert result["mFscore"] == pytest.approx(1 / 3)
    assert result["aAcc"] == pytest.approx(0.5)


def test_matches_a_pixel_by_pixel_recount_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    num_classes = 6
    targets = rng.integers(0, num_classes - 1, (5, 17, 23))  # class 5 never in the ground truth...
    predictions = np.where(
        rng.random(targets.shape) < 0.7, targets, rng.integers(0, num_classes - 2, targets.shape)
    )
    predictions[0, 0, 0] = 5  # ...but predicted once: present, IoU 0
    targets[rng.random(targets.shape) < 0.1] = IGNORE
    metric = SegmentationMetrics(num_classes=num_classes)
    metric.update(torch.from_numpy(predictions[:2]), torch.from_numpy(targets[:2]))
    metric.update(list(predictions[2:]), list(targets[2:]))  # numpy maps in a list
    result = metric.compute()

    labelled = targets != IGNORE
    t, p = targets[labelled], predictions[labelled]
    ious, precisions, recalls = [], [], []
    for c in range(num_classes):
        tp, gt, pred = np.sum((t == c) & (p == c)), np.sum(t == c), np.sum(p == c)
        if gt + pred == 0:
            continue
        ious.append(tp / (gt + pred - tp))
        precisions.append(tp / pred if pred else 0.0)
        recalls.append(tp / gt if gt else 0.0)
    assert len(ious) == 6
    assert result["mIoU"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert result["mPrecision"] == pytest.approx(np.mean(precisions), abs=1e-12)
    assert result["mRecall"] == pytest.approx(np.mean(recalls), abs=1e-12)
    assert result["aAcc"] == pytest.approx(np.mean(t == p), abs=1e-12)


def test_maps_of_different_sizes_pil_and_numpy() -> None:
    metric = SegmentationMetrics(num_classes=4)
    metric.update(
        [np.array(PRED_1, dtype=np.uint8), torch.tensor(PRED_2)],
        [Image.fromarray(np.array(TARGET_1, dtype=np.uint8)), np.array(TARGET_2).T.copy().T],
    )
    assert metric.compute()["mIoU"] == pytest.approx(0.5)
    metric.update([torch.zeros(5, 7, dtype=torch.long)], [torch.zeros(5, 7, dtype=torch.long)])
    assert metric.compute_detailed().counts["labelled_pixels"] == 9 + 35


def test_reduce_zero_label() -> None:
    # 0 becomes ignore, 1..3 become 0..2, 255 stays ignored.
    metric = SegmentationMetrics(num_classes=3, reduce_zero_label=True)
    metric.update(torch.tensor([[0, 0, 1], [1, 2, 2]]), torch.tensor([[0, 1, 1], [3, 2, IGNORE]]))
    report = metric.compute_detailed()
    # pairs: (0,0) (0,1) (2,1) (1,2); class 0: TP1 GT2 P1; class 1: TP0 GT1 P2; class 2: TP0 GT1 P1
    np.testing.assert_array_equal(report.confusion_matrix, [[1, 1, 0], [0, 0, 1], [0, 1, 0]])
    assert report.metrics["aAcc"] == pytest.approx(0.25)


def test_compute_is_repeatable_and_reset_clears() -> None:
    metric = _filled()
    assert metric.compute() == metric.compute()
    metric.reset()
    with pytest.raises(RuntimeError, match="no labelled pixels"):
        metric.compute()
    metric.update(torch.full((1, 2, 2), IGNORE), torch.full((1, 2, 2), IGNORE))
    with pytest.raises(RuntimeError, match="no labelled pixels"):
        metric.compute()


@pytest.mark.parametrize(
    ("predictions", "targets", "message"),
    [
        (
            torch.zeros(1, 2, 3, dtype=torch.long),
            torch.zeros(1, 3, 2, dtype=torch.long),
            r"prediction map 0 has shape \(2, 3\)",
        ),
        (
            torch.zeros(2, 2, 2, dtype=torch.long),
            torch.zeros(3, 2, 2, dtype=torch.long),
            "2 prediction maps and 3",
        ),
        (torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), r"\(N, H, W\) or \(H, W\)"),
        (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), r"argmax\(dim=1\)"),
        (
            torch.zeros(1, 2, 2, dtype=torch.long),
            torch.tensor([[[0, 7], [9, 255]]]),
            r"contains ids 7, 9 outside \[0, 4\)",
        ),
        (
            torch.tensor([[[0, 4], [0, 0]]]),
            torch.zeros(1, 2, 2, dtype=torch.long),
            "prediction map 0 contains ids 4",
        ),
        (
            [torch.zeros(2, 2, 2, dtype=torch.long)],
            [torch.zeros(2, 2, 2, dtype=torch.long)],
            r"\[0\] must be an \(H, W\) map",
        ),
        ([[[0, 1], [2]]], [[[0, 1], [2]]], r"predictions\[0\]: expected a tensor or array"),
    ],
)
def test_bad_input_raises_clear_errors(predictions, targets, message) -> None:
    metric = SegmentationMetrics(num_classes=4)
    with pytest.raises(ValueError, match=message):
        metric.update(predictions, targets)


def test_prediction_at_ignored_pixels_is_not_checked() -> None:
    metric = SegmentationMetrics(num_classes=4)
    metric.update(torch.tensor([[0, 255]]), torch.tensor([[0, 255]]))
    assert metric.compute()["aAcc"] == 1.0


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="ignore_index=2 is a valid class id"):
        SegmentationMetrics(num_classes=4, ignore_index=2)
    with pytest.raises(ValueError, match="got 1 label_names for num_classes=4"):
        SegmentationMetrics(num_classes=4, label_names=["a"])
    SegmentationMetrics(num_classes=4, ignore_index=-1)  # negative ignore values are fine
