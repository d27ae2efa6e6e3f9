"""DetectionMetrics at an operating point: hand-computed precision / recall, curves and confusion matrix."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cadmtl.evaluation.metrics import DEFAULT_SCORE_THRESHOLD, DetectionMetrics, confidence_curves

NAMES = ["dent", "scratch"]


def _prediction(boxes, scores, labels) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float64),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _target(boxes, labels, **extra) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        **extra,
    }


def _two_images() -> tuple[list[dict], list[dict]]:
    """Image 1: a dent A and a scratch B; image 2: a scratch C. Worked out by hand in the tests below."""
    predictions = [
        _prediction(
            [[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [1, 0, 11, 10]],
            [0.9, 0.8, 0.6, 0.2],
            [0, 0, 1, 0],  # A found; B found as a dent; a scratch on nothing; a low-score duplicate of A
        ),
        _prediction(
            [[0, 0, 20, 15], [100, 100, 110, 110]], [0.5, 0.4], [1, 0]
        ),  # C found (IoU 0.75); a stray dent
    ]
    targets = [
        _target([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1]),
        _target([[0, 0, 20, 20]], [1]),
    ]
    return predictions, targets


def _report(score_threshold: float = 0.3):
    metric = DetectionMetrics(label_names=NAMES, score_threshold=score_threshold)
    metric.update(*_two_images())
    return metric.compute_detailed()


def test_default_threshold_is_the_one_predict_draws() -> None:
    assert DEFAULT_SCORE_THRESHOLD == 0.3
    assert DetectionMetrics().score_threshold == 0.3


def test_per_class_precision_recall_at_the_threshold() -> None:
    report = _report()
    # dent above 0.3: 0.9 (A), 0.8 (on the scratch B: a false positive for dent), 0.4 (stray); 0.2 is dropped
    dent = report.per_class["dent"]
    assert (dent["TP"], dent["FP"], dent["FN"]) == (1, 2, 0)
    assert dent["precision"] == pytest.approx(1 / 3)
    assert dent["recall"] == 1.0
    assert dent["F1"] == pytest.approx(0.5)
    # scratch: 0.6 (on nothing), 0.5 (C); B is missed
    scratch = report.per_class["scratch"]
    assert (scratch["TP"], scratch["FP"], scratch["FN"]) == (1, 1, 1)
    assert scratch["precision"] == scratch["recall"] == scratch["F1"] == pytest.approx(0.5)
    assert report.extra_metrics["precision"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert report.extra_metrics["recall"] == pytest.approx(0.75)
    assert report.extra_metrics["F1"] == pytest.approx(0.5)
    # the threshold moves only the operating point: at 0.1 the duplicate of A is one more dent false positive
    low = _report(score_threshold=0.1)
    assert (low.per_class["dent"]["TP"], low.per_class["dent"]["FP"]) == (1, 3)
    assert low.metrics == report.metrics


def test_confusion_matrix_has_ultralytics_semantics_rows_ground_truth() -> None:
    report = _report()
    matrix = report.analysis["confusion_matrix"]
    assert matrix["labels"] == ["dent", "scratch", "background"]
    # rows: true dent, scratch, background; columns: predicted dent, scratch, background
    assert matrix["matrix"] == [
        [1, 0, 0],  # A found as a dent
        [1, 1, 0],  # B found as a dent (class-agnostic match), C found as a scratch
        [1, 1, 0],  # the stray dent and the scratch on nothing match no box
    ]
    # at 0.7 only the two best dents remain: B and C are missed (C: its scratch scored 0.5)
    assert _report(score_threshold=0.7).analysis["confusion_matrix"]["matrix"] == [
        [1, 0, 0],
        [1, 0, 1],
        [0, 0, 0],
    ]
    assert report.confusion_matrix is None  # the (C, C) field stays classification / segmentation only


def test_pr_curve_is_cocoevals_ap50_curve() -> None:
    report = _report()
    analysis = report.analysis
    assert analysis["iou_threshold"] == 0.5 and analysis["score_threshold"] == 0.3
    assert len(analysis["recall_grid"]) == 101 and analysis["recall_grid"][50] == 0.5
    pr = analysis["pr_curve"]
    assert pr["per_class"]["dent"] == [1.0] * 101  # the first dent found the only dent
    # scratch: 0.6 false positive, then 0.5 true positive -> precision 1/2 at recall 1/2, nothing beyond
    assert pr["per_class"]["scratch"] == [0.5] * 51 + [0.0] * 50
    assert np.mean(pr["per_class"]["scratch"]) == pytest.approx(report.per_class["scratch"]["AP50"])
    assert np.mean(pr["all"]) == pytest.approx(report.metrics["AP50"])


def test_confidence_curves_by_hand() -> None:
    analysis = _report().analysis
    grid = analysis["confidence_grid"]
    assert len(grid) == 101 and grid[0] == 0.0 and grid[-1] == 1.0
    dent = analysis["confidence_curves"]["per_class"]["dent"]
    at = {round(value, 2): index for index, value in enumerate(grid)}
    assert dent["precision"][at[0.0]] == 0.25 and dent["recall"][at[0.0]] == 1.0  # all four dents kept
    assert dent["F1"][at[0.0]] == 0.4
    assert dent["precision"][at[0.85]] == 1.0 and dent["F1"][at[0.85]] == 1.0
    assert (dent["precision"][at[0.95]], dent["recall"][at[0.95]], dent["F1"][at[0.95]]) == (1.0, 0.0, 0.0)
    every = analysis["confidence_curves"]["all"]
    assert every["F1"][at[0.45]] == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-4)
    # best mean F1 7/12: dents 0.9 and 0.8 (F1 2/3) and both scratches (1/2), first reached at 0.40
    report = _report()
    assert report.extra_metrics["best_F1"] == pytest.approx(7 / 12)
    assert report.extra_metrics["best_F1_confidence"] == 0.4


def test_confidence_curves_function_edges() -> None:
    curves = confidence_curves([0.9, 0.1], [True, False], num_ground_truth=4, thresholds=[0.0, 0.5, 0.95])
    np.testing.assert_allclose(curves["precision"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(curves["recall"], [0.25, 0.25, 0.0])
    np.testing.assert_allclose(curves["F1"], [2 * 0.5 * 0.25 / 0.75, 0.4, 0.0])
    assert np.isnan(confidence_curves([0.5], [False], num_ground_truth=0)["recall"]).all()
    with pytest.raises(ValueError, match="2 scores for 1 TP flags"):
        confidence_curves([0.1, 0.2], [True], 1)


def test_classes_without_ground_truth_and_crowd_boxes() -> None:
    metric = DetectionMetrics(label_names=["dent", "scratch", "stain"])
    metric.update(
        [
            _prediction([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.8], [2, 1]),
            _prediction([], [], []),
        ],
        [
            # the stain prediction covers a crowd region: ignored, not a false positive
            _target([[0, 0, 20, 20], [70, 70, 80, 80]], [2, 0], iscrowd=torch.tensor([1, 0])),
            _target([[0, 0, 5, 5]], [0]),
        ],
    )
    report = metric.compute_detailed()
    assert report.analysis["confusion_matrix"]["matrix"] == [
        [0, 0, 0, 2],  # both dents missed
        [0, 0, 0, 0],
        [0, 0, 0, 0],  # the crowd stain is neither counted nor missed
        [0, 1, 0, 0],  # the scratch on nothing
    ]
    scratch = report.per_class["scratch"]  # predicted, no ground truth
    assert scratch["precision"] == 0.0 and math.isnan(scratch["recall"]) and math.isnan(scratch["F1"])
    stain = report.per_class["stain"]  # only a crowd box and a prediction on it: nothing to count
    assert (stain["TP"], stain["FP"], stain["FN"]) == (0, 0, 0) and math.isnan(stain["precision"])
    dent = report.per_class["dent"]
    assert (dent["precision"], dent["recall"], dent["F1"]) == (0.0, 0.0, 0.0)
    assert set(report.analysis["pr_curve"]["per_class"]) == {
        "dent"
    }  # curves only where there is ground truth
    assert report.extra_metrics["precision"] == 0.0 and report.extra_metrics["best_F1"] == 0.0


def test_instance_masks_use_mask_iou() -> None:
    mask = np.zeros((1, 20, 20), dtype=bool)
    mask[0, :10, :10] = True
    shifted = np.roll(mask, 5, axis=2)  # IoU 50 / 150
    metric = DetectionMetrics(label_names=NAMES, iou_type="segm")
    metric.update(
        [{"masks": np.concatenate([mask, shifted]), "scores": [0.9, 0.8], "labels": [1, 0]}],
        [{"masks": np.concatenate([mask, shifted]), "labels": [0, 1]}],
    )
    analysis = metric.compute_detailed().analysis
    # class-agnostic matching: each mask prediction matches the identical ground truth, whatever the class
    assert analysis["confusion_matrix"]["matrix"] == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]


def test_analysis_survives_the_json_round_trip() -> None:
    report = _report()
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["analysis"] == report.analysis
    for key in ("metrics", "per_class", "counts", "label_names", "confusion_matrix", "extra_metrics"):
        assert key in as_json  # the keys eval_results.json always had
    assert as_json["per_class"]["dent"]["precision"] == pytest.approx(1 / 3)
    assert as_json["extra_metrics"]["best_F1_confidence"] == 0.4
