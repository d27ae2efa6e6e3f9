"""One inference path: `cadmtl predict` (Predictor), the inspection pipeline, the ONNX predictor, the verdict's
calibration scoring and the evaluation loop run each head at its own input size through
`CadMtlImageProcessor.forward_size_groups`, so on the same images they give the same scores, verdicts and
detections (a served prediction scores what evaluation reported)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert
from torchvision.transforms.v2.functional import pil_to_tensor
from transformers import pipeline

from cadmtl.data.pipeline import TaskTransform
from cadmtl.evaluation.loop import DETECTION_SCORE_THRESHOLD, evaluate_task
from cadmtl.evaluation.metrics import ClassificationMetrics, DetectionMetrics
from cadmtl.evaluation.verdict import VerdictTransform, score_verdict_batches, verdict_processor
from cadmtl.pictures.predict import Predictor
from cadmtl.testing import CLS_LABELS, DET_LABELS, detection_target, tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel
from modeling_cadmtl.pipeline_cadmtl import CadMtlInspectionPipeline

# Every head at its own size: three forward passes per batch.
SIZES = {"cls": 96, "det": 128, "seg": 160}
HEADS = ("cls", "det", "seg")
IMAGE_SHAPES = [(150, 200), (181, 170), (210, 260)]  # (height, width), none of them a model size
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[CadMtlModel, Path]:
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config(image_sizes=SIZES, verdict_threshold=THRESHOLD)).eval()
    with torch.no_grad():  # detection scores around 0.5: many detections, a det score near the threshold
        model.det_head.cls_logits.bias.fill_(0.0)
    folder = tmp_path_factory.mktemp("one-path") / "model"
    processor = CadMtlImageProcessor(size={"height": 128, "width": 128}, task_sizes=SIZES)
    model.save_pretrained(folder, image_processor=processor)
    return CadMtlModel.from_pretrained(folder).eval(), folder


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)) for shape in IMAGE_SHAPES]


def detection_targets(images: list[Image.Image]) -> list[dict[str, torch.Tensor]]:
    return [detection_target([[0.4, 0.5, 0.3, 0.2], [0.7, 0.3, 0.2, 0.4]], [0, 1]) for _ in images]


def evaluation_inputs(images: list[Image.Image], task: str) -> torch.Tensor:
    """The evaluation data pipeline's input (`TaskTransform(train=False)`), not the processor's."""
    transform = TaskTransform(task, SIZES[task], train=False)
    return torch.stack([transform.eval_pixels(pil_to_tensor(image)) for image in images])


@pytest.mark.slow
def test_the_five_consumers_agree(saved, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from cadmtl.export.onnx import OnnxPredictor, export_onnx

    model, folder = saved
    images = pictures()
    config = model.config

    # 1. cadmtl predict
    predictor = Predictor.from_pretrained(folder, device="cpu", det_threshold=DETECTION_SCORE_THRESHOLD)
    predictor.top_k_classes = len(CLS_LABELS)
    predicted = predictor(images)

    # 2. the inspection pipeline (one image per call)
    inspect = pipeline(model=str(folder), pipeline_class=CadMtlInspectionPipeline, device="cpu")
    inspected = [inspect(image, det_threshold=DETECTION_SCORE_THRESHOLD) for image in images]

    # 3. the ONNX predictor (a graph with dynamic input size: each head at its own size)
    export_onnx(folder, tmp_path / "onnx")
    exported = OnnxPredictor(tmp_path / "onnx").predict(images, det_threshold=DETECTION_SCORE_THRESHOLD)

    # 4. the verdict's calibration scoring, on the evaluation data pipeline's pixels
    processor = verdict_processor(config.image_sizes, config.verdict_heads)
    sides = [size["height"] for size, _ in processor.size_groups(config.verdict_heads)]
    transform = VerdictTransform(sides)
    items = [
        transform({"image": image, "image_id": str(i), "is_normal": True}) for i, image in enumerate(images)
    ]
    batch = {
        "pixel_values": {side: torch.stack([item["pixel_values"][side] for item in items]) for side in sides},
        "image_ids": [item["image_id"] for item in items],
        "is_normal": torch.ones(len(items), dtype=torch.bool),
    }
    calibration = score_verdict_batches(
        model,
        [batch],
        processor,
        config.verdict_heads,
        normal_class_id=config.normal_class_id,
        device=torch.device("cpu"),
        show_progress=False,
    )

    assert config.verdict_heads == HEADS and len(sides) == 3
    for index in range(len(images)):
        expected = predicted[index]
        assert set(expected.head_scores) == set(HEADS)
        for head in HEADS:
            assert inspected[index]["head_scores"][head] == pytest.approx(
                expected.head_scores[head], abs=1e-5
            )
            assert exported["verdict"][index]["head_scores"][head] == pytest.approx(
                expected.head_scores[head], abs=1e-4
            )
            assert calibration.scores[head][index] == pytest.approx(expected.head_scores[head], abs=1e-5)
        assert calibration.scores["max"][index] == pytest.approx(expected.anomaly_score, abs=1e-5)
        assert inspected[index]["anomaly_score"] == pytest.approx(expected.anomaly_score, abs=1e-5)
        assert exported["verdict"][index]["anomaly_score"] == pytest.approx(expected.anomaly_score, abs=1e-4)
        assert expected.verdict == inspected[index]["verdict"] == exported["verdict"][index]["verdict"]
        assert expected.verdict == ("NG" if calibration.scores["max"][index] >= THRESHOLD else "OK")
        # the same detections: the pipeline rounds boxes to pixels
        scores = expected.prediction.box_scores
        assert len(scores) > 0
        assert [d["score"] for d in inspected[index]["detections"]] == pytest.approx(
            scores.tolist(), abs=1e-5
        )
        np.testing.assert_allclose(exported["detection"][index]["scores"].numpy(), scores, atol=1e-4)
        np.testing.assert_allclose(
            exported["detection"][index]["boxes"].numpy(), expected.prediction.boxes, atol=1e-3
        )
        # the same classes, in the same order
        assert [c["label"] for c in inspected[index]["classes"]] == [
            name for name, _ in expected.prediction.classes
        ]
        assert exported["classification"][index]["label_names"] == [
            name for name, _ in expected.prediction.classes
        ]

    # 5. the evaluation loop scores what predict serves: the same metrics from its own batches as from the
    # Predictor's detections and class probabilities
    targets = detection_targets(images)
    sizes = torch.tensor(IMAGE_SHAPES)
    ids = [str(i) for i in range(len(images))]
    det_batch = {
        "pixel_values": evaluation_inputs(images, "det"),
        "labels": targets,
        "image_ids": ids,
        "orig_sizes": sizes,
    }
    evaluated = evaluate_task(
        model, [det_batch], "det", DET_LABELS, device=torch.device("cpu"), show_progress=False
    )
    served = DetectionMetrics(label_names=DET_LABELS)
    served.update(
        [
            {
                "boxes": torch.as_tensor(result.prediction.boxes),
                "scores": torch.as_tensor(result.prediction.box_scores),
                "labels": torch.as_tensor(result.prediction.box_labels),
                "image_id": image_id,
            }
            for result, image_id in zip(predicted, ids)
        ],
        [
            {
                "boxes": box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h]),
                "labels": target["class_labels"],
                "image_id": image_id,
            }
            for target, (h, w), image_id in zip(targets, IMAGE_SHAPES, ids)
        ],
    )
    served_metrics = served.compute_detailed().metrics
    assert served_metrics.keys() == evaluated.metrics.keys()
    for name, value in evaluated.metrics.items():
        assert served_metrics[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name

    labels = torch.tensor([0, 1, 2])
    cls_batch = {"pixel_values": evaluation_inputs(images, "cls"), "labels": labels}
    evaluated = evaluate_task(
        model, [cls_batch], "cls", CLS_LABELS, device=torch.device("cpu"), show_progress=False
    )
    probabilities = torch.zeros(len(images), len(CLS_LABELS))
    for index, result in enumerate(predicted):
        for name, value in result.prediction.classes:
            probabilities[index, CLS_LABELS.index(name)] = value
    served = ClassificationMetrics(len(CLS_LABELS), label_names=CLS_LABELS)
    served.update(probabilities.log(), labels)
    served_metrics = served.compute_detailed().metrics
    for name, value in evaluated.metrics.items():
        assert served_metrics[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name
