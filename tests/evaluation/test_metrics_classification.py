"""ClassificationMetrics: hand-computed top-k accuracy, per-class rows, confusion matrix and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cadmtl.evaluation.metrics import ClassificationMetrics, format_percentages

# Four samples, classes 0..2 plus a class 3 that never occurs.
#   sample  logits                 target  top-1  top-2     hit@1  hit@2
#   0       [2.0, 1.0, 0.0, -1]    0       0      {0, 1}    yes    yes
#   1       [0.1, 0.5, 0.2, -1]    2       1      {1, 2}    no     yes
#   2       [3.0, 0.0, 1.0, -1]    1       0      {0, 2}    no     no
#   3       [0.0, 0.2, 5.0, -1]    2       2      {2, 1}    yes    yes
# acc@1 = 2/4, acc@2 = 3/4; acc@5 counts as acc@4 (k > C) = 4/4.
LOGITS = torch.tensor(
    [[2.0, 1.0, 0.0, -1.0], [0.1, 0.5, 0.2, -1.0], [3.0, 0.0, 1.0, -1.0], [0.0, 0.2, 5.0, -1.0]]
)
TARGETS = torch.tensor([0, 2, 1, 2])
NAMES = ["dent", "scratch", "crack", "stain"]


def _filled(top_k=(1, 2, 5)) -> ClassificationMetrics:
    metric = ClassificationMetrics(num_classes=4, label_names=NAMES, top_k=top_k)
    metric.update(LOGITS[:1], TARGETS[:1])
    metric.update(LOGITS[1:], TARGETS[1:])
    return metric


def test_hand_computed_topk_accuracy() -> None:
    assert _filled().compute() == {"acc@1": 0.5, "acc@2": 0.75, "acc@5": 1.0}


def test_default_keys_are_acc1_and_acc5() -> None:
    metric = ClassificationMetrics(num_classes=4)
    metric.update(LOGITS, TARGETS)
    assert list(metric.compute()) == ["acc@1", "acc@5"]


def test_detailed_report_counts_per_class_and_confusion_matrix() -> None:
    report = _filled().compute_detailed()
    assert report.counts == {"num_samples": 4, "errors@1": 2, "errors@2": 1, "errors@5": 0}
    # rows = target, columns = top-1 prediction
    np.testing.assert_array_equal(
        report.confusion_matrix, [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    )
    assert report.per_class["dent"] == {
        "support": 1,
        "predicted": 2,
        "acc@1": 1.0,
        "errors@1": 0,
        "acc@2": 1.0,
        "errors@2": 0,
        "acc@5": 1.0,
        "errors@5": 0,
    }
    assert report.per_class["scratch"]["acc@1"] == 0.0 and report.per_class["scratch"]["acc@2"] == 0.0
    assert report.per_class["crack"]["acc@1"] == 0.5 and report.per_class["crack"]["acc@2"] == 1.0
    assert report.per_class["crack"]["errors@1"] == 1
    assert report.per_class["stain"]["support"] == 0 and math.isnan(report.per_class["stain"]["acc@1"])
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["per_class"]["stain"]["acc@1"] is None
    assert as_json["confusion_matrix"][2] == [0, 1, 1, 0]
    assert as_json["label_names"] == NAMES


def test_matches_a_plain_recount_on_random_data() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(257, 11, generator=generator)
    targets = torch.randint(0, 11, (257,), generator=generator)
    metric = ClassificationMetrics(num_classes=11, top_k=(1, 3, 5))
    for start in range(0, 257, 64):
        metric.update(logits[start : start + 64], targets[start : start + 64])
    result = metric.compute()
    ranking = logits.argsort(dim=1, descending=True)
    for k in (1, 3, 5):
        expected = sum(int(targets[i]) in ranking[i, :k].tolist() for i in range(257)) / 257
        assert result[f"acc@{k}"] == pytest.approx(expected, abs=1e-12)
    confusion = metric.compute_detailed().confusion_matrix
    assert confusion.sum() == 257
    assert np.trace(confusion) == round(result["acc@1"] * 257)


def test_numpy_inputs_and_bf16_logits_are_accepted() -> None:
    metric = ClassificationMetrics(num_classes=4, top_k=(1,))
    metric.update(LOGITS.numpy(), TARGETS.numpy())
    metric.update(LOGITS.to(torch.bfloat16), TARGETS.tolist())
    assert metric.compute() == {"acc@1": 0.5}


def test_compute_is_repeatable_and_reset_clears() -> None:
    metric = _filled()
    assert metric.compute() == metric.compute()
    metric.reset()
    with pytest.raises(RuntimeError, match="no samples were added"):
        metric.compute()
    metric.update(LOGITS[:1], TARGETS[:1])
    assert metric.compute()["acc@1"] == 1.0


def test_empty_batch_is_a_no_op() -> None:
    metric = _filled()
    metric.update(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert metric.compute()["acc@1"] == 0.5


@pytest.mark.parametrize(
    ("logits", "targets", "message"),
    [
        (torch.tensor([[0.1, float("nan"), 0.2, 0.3]]), torch.tensor([0]), r"NaN logits in rows \[0\]"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), r"shape \(N, 4\), got \(2, 3\)"),
        (torch.zeros(4), torch.tensor([0]), r"shape \(N, 4\), got \(4,\)"),
        (torch.zeros(2, 4), torch.tensor([0, 1, 2]), r"targets must have shape \(2,\)"),
        (torch.zeros(2, 4), torch.tensor([0, 4]), r"target ids must lie in \[0, 4\), got 4"),
        (torch.zeros(2, 4), torch.tensor([-1, 0]), r"got -1"),
        (torch.zeros(2, 4), torch.tensor([0.0, 1.0]), "integer class ids"),
        (torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1]), "floating-point logits"),
    ],
)
def test_bad_input_raises_clear_errors(logits, targets, message) -> None:
    metric = ClassificationMetrics(num_classes=4)
    with pytest.raises(ValueError, match=message):
        metric.update(logits, targets)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="got 2 label_names for num_classes=3"):
        ClassificationMetrics(num_classes=3, label_names=["a", "b"])
    with pytest.raises(ValueError, match="top_k must be distinct positive integers"):
        ClassificationMetrics(num_classes=3, top_k=(1, 1))
    with pytest.raises(ValueError, match="top_k must be distinct positive integers"):
        ClassificationMetrics(num_classes=3, top_k=(0,))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ClassificationMetrics(num_classes=0)


def test_format_percentages() -> None:
    assert format_percentages({"acc@1": 0.996, "acc@5": 1.0}) == {"acc@1": "99.60", "acc@5": "100.00"}
    assert format_percentages({"AP": float("nan"), "AR": None}, decimals=1, undefined="-") == {
        "AP": "-",
        "AR": "-",
    }
    assert format_percentages({"acc@1": 0.123456}, decimals=3) == {"acc@1": "12.346"}
