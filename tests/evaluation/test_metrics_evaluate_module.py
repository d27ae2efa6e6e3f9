"""The local `evaluate` module loads offline and reports exactly what the metric classes report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

evaluate = pytest.importorskip("evaluate")

from cadmtl.evaluation.hub_metric import CADMTL_METRICS_PATH  # noqa: E402
from cadmtl.evaluation.metrics import (  # noqa: E402
    ClassificationMetrics,
    DetectionMetrics,
    SegmentationMetrics,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # evaluate reads these at import time, so patch its config as well as the environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True, raising=False)
    monkeypatch.setattr(evaluate.config, "HF_HUB_OFFLINE", True, raising=False)


def _same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert (math.isnan(value) and math.isnan(actual[key])) or actual[key] == pytest.approx(
            value, abs=1e-12
        ), key


def _detection_batch(seed: int, with_ids: bool = False):
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for index in range(6):
        count = int(rng.integers(0, 4))
        xy = rng.uniform(0, 100, (count, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (count, 2))], axis=1)
        labels = rng.integers(0, 3, count)
        predictions.append(
            {
                "boxes": torch.from_numpy(boxes + rng.normal(0, 3, boxes.shape)).clamp(min=0).float(),
                "scores": torch.from_numpy(rng.uniform(0, 1, count)).float(),
                "labels": torch.from_numpy(labels),
            }
        )
        references.append({"boxes": torch.from_numpy(boxes).float(), "labels": torch.from_numpy(labels)})
        if with_ids:
            predictions[-1]["image_id"] = references[-1]["image_id"] = f"img-{seed}-{index}"
    for prediction in predictions:  # keep xyxy valid after the noise
        prediction["boxes"][:, 2:] = torch.maximum(prediction["boxes"][:, 2:], prediction["boxes"][:, :2] + 1)
    return predictions, references


def test_path_constant_points_at_the_module() -> None:
    folder = Path(CADMTL_METRICS_PATH)
    assert folder.is_absolute() and (folder / "cadmtl_metrics.py").is_file()


def test_classification_matches_metric_class() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 7, generator=generator)
    labels = torch.randint(0, 7, (40,), generator=generator)
    module = evaluate.load(CADMTL_METRICS_PATH, "classification")
    for start in (0, 20):  # streaming with add_batch
        module.add_batch(
            predictions=logits[start : start + 20].tolist(), references=labels[start : start + 20].tolist()
        )
    result = module.compute(top_k=(1, 3))
    metric = ClassificationMetrics(7, top_k=(1, 3))
    metric.update(logits, labels)
    _same(result, metric.compute())


def test_detection_matches_metric_class_from_file_path() -> None:
    predictions, references = _detection_batch(seed=1)
    module = evaluate.load(str(Path(CADMTL_METRICS_PATH) / "cadmtl_metrics.py"), "detection")
    result = module.compute(
        predictions=predictions, references=references, detailed=True, score_threshold=0.5
    )
    metric = DetectionMetrics(score_threshold=0.5)
    metric.update(predictions, references)
    report = metric.compute_detailed()
    _same({key: result[key] for key in report.metrics}, report.metrics)
    assert result["counts"] == report.counts
    assert result["per_class"] == report.to_dict()["per_class"]
    assert result["analysis"] == report.analysis and result["analysis"]["score_threshold"] == 0.5
    assert 0 < result["AP"] < 1


def test_detection_with_string_image_ids_and_optional_fields() -> None:
    predictions, references = _detection_batch(seed=2, with_ids=True)
    references[0]["iscrowd"] = [0] * len(references[0]["labels"])
    module = evaluate.load(CADMTL_METRICS_PATH, "detection")
    result = module.compute(
        predictions=predictions[::-1], references=references[::-1], label_names=["a", "b", "c"]
    )
    metric = DetectionMetrics(label_names=["a", "b", "c"])
    metric.update(predictions, references)
    _same(result, metric.compute())


def test_segmentation_matches_metric_class() -> None:
    rng = np.random.default_rng(3)
    targets = [rng.integers(0, 4, (6 + i, 9)).astype(np.uint8) for i in range(3)]
    for target in targets:
        target[0, :3] = 255
    predictions = [np.where(rng.random(t.shape) < 0.7, t % 4, 1).astype(np.uint8) for t in targets]
    module = evaluate.load(CADMTL_METRICS_PATH, "segmentation")
    result = module.compute(predictions=predictions, references=targets, num_classes=5, detailed=True)
    metric = SegmentationMetrics(num_classes=5)
    metric.update(predictions, targets)
    report = metric.compute_detailed()
    _same({key: result[key] for key in report.metrics}, report.metrics)
    assert result["confusion_matrix"] == report.confusion_matrix.tolist()
    assert result["per_class"]["4"]["IoU"] is None  # class 4 absent from both: JSON-safe None


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown config 'default'"):
        evaluate.load(CADMTL_METRICS_PATH)
    module = evaluate.load(CADMTL_METRICS_PATH, "segmentation")
    with pytest.raises(ValueError, match="pass num_classes"):
        module.compute(predictions=[np.zeros((2, 2), np.uint8)], references=[np.zeros((2, 2), np.uint8)])
    module = evaluate.load(CADMTL_METRICS_PATH, "classification")
    with pytest.raises(ValueError, match=r"unexpected compute\(\) arguments \['ignore_index'\]"):
        module.compute(predictions=[[0.0, 1.0]], references=[1], ignore_index=3)
