"""The ONNX predictors tile like the PyTorch models: the same processor path with the graph in the model's place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cadmtl.anomaly.models import anomaly_processor, load_anomaly_model
from cadmtl.anomaly.patch_memory import PatchMemoryScorer
from cadmtl.export.anomaly import AnomalyOnnxPredictor
from cadmtl.export.onnx import OnnxPredictor, export_onnx
from cadmtl.features import load_backbone
from cadmtl.testing import tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel


def photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:150, :200]
    texture = np.stack([np.sin(x / 5), np.cos(y / 7), np.sin((x + y) / 9)], axis=-1) * 60 + 128
    images = []
    for index, (height, width) in enumerate([(150, 200), (120, 90)]):
        array = texture[:height, :width] + rng.normal(0, 4, (height, width, 3))
        if index == 0:
            array[60:75, 120:135] = 255  # a small defect
        images.append(Image.fromarray(array.clip(0, 255).astype(np.uint8)))
    return images


@pytest.mark.slow
def test_anomaly_onnx_tiles_like_pytorch(tmp_path: Path) -> None:
    scorer = PatchMemoryScorer.from_backbone(
        load_backbone("tiny", 0)[0], image_size=(64, 64), coreset_fraction=1.0
    )
    scorer.config.tile_size, scorer.config.tile_overlap = 64, 16
    processor = anomaly_processor(scorer)
    scorer.fit(processor.tiles(photos()[1])[0])
    scorer.image_threshold, scorer.pixel_threshold = 0.5, 0.5
    scorer.save_pretrained(tmp_path / "model")
    export_onnx(tmp_path / "model", tmp_path / "onnx")
    predictor = AnomalyOnnxPredictor(tmp_path / "onnx")
    assert (predictor.processor.tile_size, predictor.processor.tile_overlap) == (
        64,
        16,
    )  # saved with the graph
    model = load_anomaly_model(tmp_path / "model")
    images = photos()
    sizes = [(image.height, image.width) for image in images]
    expected = processor.post_process_anomaly_maps(
        processor.predict(model, images), target_sizes=sizes, **model.thresholds
    )
    for got, want, size in zip(predictor.predict(images), expected, sizes):
        assert tuple(got["anomaly_map"].shape) == size
        torch.testing.assert_close(got["anomaly_map"], want["anomaly_map"], atol=1e-4, rtol=0)
        assert got["score"] == pytest.approx(want["score"], abs=1e-4) and got["verdict"] == want["verdict"]
    # an override at the predictor: whole images (one tile each), as the PyTorch processor with the same setting
    whole = AnomalyOnnxPredictor(tmp_path / "onnx", tile_size=4096)
    reference = anomaly_processor(model, tile_size=4096).predict(model, images)
    got_scores = [result["score"] for result in whole.predict(images)]
    assert got_scores == pytest.approx(reference["image_scores"].tolist(), abs=1e-4)


@pytest.mark.slow
def test_cadmtl_onnx_tiles_like_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config()).eval()
    tiled = dict(tile_size=96, tile_overlap=32, tile_batch_size=4)
    model.save_pretrained(
        tmp_path / "model", image_processor=CadMtlImageProcessor(size={"height": 64, "width": 64}, **tiled)
    )
    export_onnx(tmp_path / "model", tmp_path / "onnx")
    predictor = OnnxPredictor(tmp_path / "onnx")
    assert predictor.processor.tile_size == 96  # the tiles saved with the model travel with the export
    processor = CadMtlImageProcessor(size={"height": 64, "width": 64}, **tiled)
    images = photos()
    with torch.no_grad():
        expected = processor.predict(model, images)
    got = processor.predict(predictor, images)
    assert set(got) == set(expected) and "seg_pixel_mask" in got  # two sizes: padded, masked
    for name, value in expected.items():
        torch.testing.assert_close(got[name].float(), value.float(), atol=1e-3, rtol=1e-3)
    results = predictor.predict(images, det_threshold=0.05)
    sizes = [(image.height, image.width) for image in images]
    masks = processor.post_process_semantic_segmentation(expected, target_sizes=sizes)
    for found, mask, size in zip(results["segmentation"], masks, sizes):
        assert tuple(found.shape) == size and (found == mask).float().mean() > 0.999
