"""ONNX export (`cadmtl export onnx`) and `OnnxPredictor`: parity with PyTorch, per-task sizes, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from cadmtl.cli import main as cadmtl
from cadmtl.export.onnx import OnnxPredictor, export_onnx
from cadmtl.testing import tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel
from modeling_cadmtl.tasks_cadmtl import TASKS, output_fields

ALL_OUTPUTS = list(output_fields(TASKS))


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in ((80, 100), (120, 90), (64, 64))
    ]


def save_model(folder: Path, task_sizes: dict[str, int] | None, seed: int = 0) -> CadMtlModel:
    torch.manual_seed(seed)
    model = CadMtlModel(tiny_cadmtl_config("vit")).eval()
    with torch.no_grad():  # a non-zero detection bias: some scores above the threshold, so NMS has work to do
        model.det_head.cls_logits.bias.fill_(0.0)
    processor = CadMtlImageProcessor(size={"height": 64, "width": 64}, task_sizes=task_sizes)
    model.save_pretrained(folder, image_processor=processor)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[CadMtlModel, Path, Path]:
    root = tmp_path_factory.mktemp("onnx")
    model = save_model(root / "model", task_sizes=None)
    assert cadmtl(["export", "onnx", str(root / "model"), str(root / "onnx")]) == 0
    return model, root / "model", root / "onnx"


def test_a_folder_without_weights_is_refused_by_name(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(tiny_cadmtl_config().to_json_string())
    with pytest.raises(ValueError, match="no-weights holds no model weights"):
        export_onnx(empty, tmp_path / "out")
    assert cadmtl(["export", "onnx", str(empty), str(tmp_path / "out")]) == 2
    assert "no-weights holds no model weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"no such model folder: .*missing/model$"):
        export_onnx(tmp_path / "missing" / "model", tmp_path / "out")
    with pytest.raises(ValueError, match="opset must be >= 18"):
        export_onnx(empty, tmp_path / "out", opset=17)


def test_a_predictor_folder_without_the_graph_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"lacks model\.onnx"):
        OnnxPredictor(tmp_path)


@pytest.mark.slow
def test_export_writes_a_servable_folder(exported) -> None:
    _, _, folder = exported
    assert {"model.onnx", "config.json", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    graph = onnx.load(folder / "model.onnx").graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert [o.name for o in graph.output] == ALL_OUTPUTS
    opset = {entry.domain: entry.version for entry in onnx.load(folder / "model.onnx").opset_import}[""]
    assert opset >= 18
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch
    ops = {node.op_type for node in graph.node}
    assert "NonMaxSuppression" not in ops  # NMS stays in post-processing


@pytest.mark.slow
def test_onnx_matches_pytorch(exported) -> None:
    model, model_dir, folder = exported
    predictor = OnnxPredictor(folder)
    processor = CadMtlImageProcessor.from_pretrained(model_dir)
    pictures = images()
    for batch in (pictures[:1], pictures):
        pixel_values = processor(batch, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            reference = model(pixel_values)
        outputs = predictor.run(pixel_values)
        for name in ALL_OUTPUTS:
            torch.testing.assert_close(outputs[name], getattr(reference, name), atol=1e-4, rtol=0)

    results = predictor.predict(pictures, det_threshold=0.05)
    pixel_values = processor(pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = model(pixel_values)
    sizes = [(p.height, p.width) for p in pictures]
    expected = processor.post_process_object_detection(reference, threshold=0.05, target_sizes=sizes)
    assert sum(len(r["scores"]) for r in expected) > 0
    for got, want in zip(results["detection"], expected):
        assert torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-5, rtol=0)
    for got, want in zip(results["classification"], processor.post_process_image_classification(reference)):
        assert torch.equal(got["labels"], want["labels"])
    for got, want, size in zip(
        results["segmentation"],
        processor.post_process_semantic_segmentation(reference, target_sizes=sizes),
        sizes,
    ):
        assert tuple(got.shape) == size and (got == want).float().mean() > 0.999


@pytest.mark.slow
def test_outputs_that_do_not_match_the_labels_are_refused(exported, tmp_path: Path) -> None:
    _, _, folder = exported
    other = tmp_path / "mismatch"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    config["det_labels"] = ["dent", "scratch", "crack"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"det_logits has 2 classes but config\.json has 3 det_labels"):
        OnnxPredictor(other)


@pytest.mark.slow
def test_one_head_and_per_task_sizes(tmp_path: Path) -> None:
    sizes = {"cls": 32, "det": 64, "seg": 64}
    model = save_model(tmp_path / "model", task_sizes=sizes)
    export_onnx(tmp_path / "model", tmp_path / "cls", task="cls")
    predictor = OnnxPredictor(tmp_path / "cls")
    assert predictor.tasks == ("cls",) and predictor.input_size == (32, 32)
    pictures = images()
    processor = CadMtlImageProcessor.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        reference = model(processor(pictures, task="cls", return_tensors="pt")["pixel_values"], task="cls")
    results = predictor.predict(pictures[:1])
    assert set(results) == {"classification", "verdict"}
    [want] = processor.post_process_image_classification({"cls_logits": reference.cls_logits[:1]})
    torch.testing.assert_close(results["classification"][0]["scores"], want["scores"], atol=1e-5, rtol=0)
    # a classification-only graph: the verdict ("max") reads the classifier alone
    assert set(results["verdict"][0]["head_scores"]) == {"cls"}


@pytest.mark.slow
def test_heads_trained_at_different_sizes_get_a_dynamic_graph(tmp_path: Path) -> None:
    sizes = {"cls": 32, "det": 64, "seg": 48}
    model = save_model(tmp_path / "model", task_sizes=sizes)
    export_onnx(tmp_path / "model", tmp_path / "onnx")
    predictor = OnnxPredictor(tmp_path / "onnx")
    assert predictor.input_size is None and predictor.tasks == ("cls", "det", "seg")
    pictures = images()
    processor = CadMtlImageProcessor.from_pretrained(tmp_path / "model")
    results = predictor.predict(pictures, det_threshold=0.05)
    target_sizes = [(p.height, p.width) for p in pictures]
    with torch.no_grad():
        for task in ("cls", "det", "seg"):
            pixel_values = processor(pictures, task=task, return_tensors="pt")["pixel_values"]
            assert pixel_values.shape[-1] == sizes[task]
            reference = model(pixel_values, task=task)
            if task == "cls":
                want = processor.post_process_image_classification(reference)
                for got, expected in zip(results["classification"], want):
                    torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-5, rtol=0)
            elif task == "det":
                want = processor.post_process_object_detection(
                    reference, threshold=0.05, target_sizes=target_sizes
                )
                for got, expected in zip(results["detection"], want):
                    assert torch.equal(got["labels"], expected["labels"])
            else:
                want = processor.post_process_semantic_segmentation(reference, target_sizes=target_sizes)
                for got, expected in zip(results["segmentation"], want):
                    assert (got == expected).float().mean() > 0.999


@pytest.mark.slow
def test_onnx_verdicts_match_pytorch(exported) -> None:
    model, model_dir, folder = exported
    predictor = OnnxPredictor(folder)
    processor = CadMtlImageProcessor.from_pretrained(model_dir)
    pictures = images()
    with torch.no_grad():
        reference = model(processor(pictures, return_tensors="pt")["pixel_values"])
    expected = processor.post_process_verdict(reference, model.config)
    got = predictor.predict(pictures)["verdict"]
    assert len(got) == len(pictures) and model.config.verdict_threshold == 0.5
    for mine, theirs in zip(got, expected):
        assert mine["anomaly_score"] == pytest.approx(theirs["anomaly_score"], abs=1e-4)
        assert mine["head_scores"] == pytest.approx(theirs["head_scores"], abs=1e-4)
        assert set(mine["head_scores"]) == {"cls", "det", "seg"} and mine["verdict"] == theirs["verdict"]
    # a threshold between the images' scores: both paths split them the same way
    threshold = float(np.median([r["anomaly_score"] for r in expected]))
    onnx_verdicts = [
        r["verdict"] for r in predictor.predict(pictures, verdict_threshold=threshold)["verdict"]
    ]
    torch_verdicts = [
        r["verdict"] for r in processor.post_process_verdict(reference, model.config, threshold=threshold)
    ]
    assert onnx_verdicts == torch_verdicts and set(onnx_verdicts) == {"OK", "NG"}
