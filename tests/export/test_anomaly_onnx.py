"""ONNX export of the anomaly scorer, the learner and the reference localiser: parity with PyTorch (maps, scores,
verdicts, boxes), the graph's interface, and clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from cadmtl.anomaly import AnomalyLearner, AnomalyLearnerConfig, PatchMemoryScorer
from cadmtl.anomaly.data import to_pixel_values
from cadmtl.cli import main as cadmtl
from cadmtl.export.anomaly import (
    ANOMALY_OUTPUTS,
    LOCALIZER_INPUTS,
    LOCALIZER_OUTPUTS,
    AnomalyOnnxPredictor,
    LocalizerOnnxPredictor,
    export_localizer_onnx,
)
from cadmtl.export.onnx import export_onnx
from cadmtl.features import PatchFeatureExtractor, backbone_from_config, load_backbone
from cadmtl.model_kinds import LOCALIZER, inspect_model, is_hub_id
from cadmtl.reference.localize_pairs import PairRunner
from cadmtl.reference.localizer import ReferenceLocalizer, boxes_from_map
from cadmtl.testing import tiny_vit_config
from modeling_cadmtl_anomaly import AnomalyImageProcessor

SIZE = 64


def pictures(count: int = 3, seed: int = 0) -> list[Image.Image]:
    """A smooth texture with small noise; the last picture has a bright square (a defect)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:80, :100]
    texture = np.stack([np.sin(x / 5), np.cos(y / 7), np.sin((x + y) / 9)], axis=-1) * 60 + 128
    images = []
    for index in range(count):
        array = texture + rng.normal(0, 4, texture.shape)
        if index == count - 1:
            array[20:50, 30:60] = 255
        images.append(Image.fromarray(array.clip(0, 255).astype(np.uint8)))
    return images


def graph_interface(path: Path) -> tuple[list[str], list[str], int, bool]:
    model = onnx.load(path)
    opset = {entry.domain: entry.version for entry in model.opset_import}[""]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    return (
        [i.name for i in model.graph.input],
        [o.name for o in model.graph.output],
        opset,
        bool(batch.dim_param and not batch.dim_value),
    )


# ---------------------------------------------------------------------------------------------- clear errors
def test_unknown_model_types_and_folders_without_weights_are_refused(tmp_path: Path, capsys) -> None:
    served = "a CadMtl multi-task model, a patch-memory anomaly scorer, an anomaly learner or a reference localiser"
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (other / "model.safetensors").write_bytes(b"")  # only its presence is read
    message = (
        f"{other} holds a bert model (transformers), not {served}; cadmtl serves CadMtl, anomaly and "
        "reference-localiser models"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        export_onnx(other, tmp_path / "out")
    assert cadmtl(["export", "onnx", str(other), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"cadmtl export onnx: {message}\n"

    empty = tmp_path / "scorer-no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "cadmtl_patch_memory"}))
    with pytest.raises(ValueError, match="scorer-no-weights holds no model weights"):
        export_onnx(empty, tmp_path / "out")
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(
        ValueError, match="holds a patch-memory anomaly scorer: --task and --image-size only apply"
    ):
        export_onnx(empty, tmp_path / "out", task="det")
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(
        ValueError, match=r"notes\.json holds no saved model \(no config\.json\), not a CadMtl"
    ):
        export_onnx(tmp_path / "notes.json", tmp_path / "out")
    (tmp_path / "bad.json").write_text(json.dumps({"localizer": {}}))
    with pytest.raises(ValueError, match=r"bad\.json lacks \['model', 'layers', 'image_size'\]"):
        export_localizer_onnx(tmp_path / "bad.json", tmp_path / "out")


def test_model_kind_tells_the_saved_layouts_apart(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "localizer.json").write_text(json.dumps({"localizer": {}}))
    assert (
        inspect_model(tmp_path / "run").kind
        is inspect_model(tmp_path / "run" / "localizer.json").kind
        is LOCALIZER
    )
    assert is_hub_id("cad-mtl/dinov3-b-adaptive") and not is_hub_id(tmp_path / "run")


def test_predictors_refuse_incomplete_or_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"lacks model\.onnx, config\.json"):
        AnomalyOnnxPredictor(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"lacks model\.onnx, localizer\.json"):
        LocalizerOnnxPredictor(tmp_path)
    for name in ("model.onnx", "preprocessor_config.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "cadmtl"}))
    with pytest.raises(ValueError, match="is a 'cadmtl' config, not an anomaly model"):
        AnomalyOnnxPredictor(tmp_path)


# -------------------------------------------------------------------------------------------------- parity
def fitted_scorer(folder: Path) -> PatchMemoryScorer:
    torch.manual_seed(0)
    scorer = PatchMemoryScorer.from_backbone(
        backbone_from_config(tiny_vit_config()), layers=[1, 2], coreset_fraction=0.5, image_size=(SIZE, SIZE)
    )
    scorer.fit(to_pixel_values(pictures(4, seed=1)[:3], SIZE))  # normal pictures only
    scores = scorer.score(to_pixel_values(pictures(), SIZE))[1]
    scorer.image_threshold = float(scores.median())  # a threshold between the scores: both verdicts occur
    scorer.pixel_threshold = float(scorer.score(to_pixel_values(pictures(), SIZE))[0].quantile(0.9))
    scorer.save_pretrained(folder)
    return scorer


def assert_parity(model: torch.nn.Module, folder: Path, images: list[Image.Image]) -> None:
    predictor = AnomalyOnnxPredictor(folder)
    processor = AnomalyImageProcessor.from_pretrained(folder)
    for batch in (images[:1], images):
        pixel_values = processor(batch)["pixel_values"]
        reference = model.predict(pixel_values)
        outputs = predictor.run(pixel_values)
        torch.testing.assert_close(outputs["anomaly_maps"], reference.anomaly_maps, atol=1e-4, rtol=0)
        torch.testing.assert_close(outputs["image_scores"], reference.image_scores, atol=1e-4, rtol=0)
    sizes = [(image.height, image.width) for image in images]
    expected = processor.post_process_anomaly_maps(
        model.predict(processor(images)["pixel_values"]), target_sizes=sizes, **model.thresholds
    )
    results = predictor.predict(images)
    assert [r["verdict"] for r in results] == [r["verdict"] for r in expected]
    for got, want, size in zip(results, expected, sizes):
        assert tuple(got["anomaly_map"].shape) == size
        assert (got["mask"] == want["mask"]).float().mean() > 0.999  # pixels at the threshold may flip


@pytest.mark.slow
def test_scorer_export_matches_pytorch(tmp_path: Path) -> None:
    scorer = fitted_scorer(tmp_path / "model")
    assert cadmtl(["export", "onnx", str(tmp_path / "model"), str(tmp_path / "onnx")]) == 0
    inputs, outputs, opset, dynamic_batch = graph_interface(tmp_path / "onnx" / "model.onnx")
    assert inputs == ["pixel_values"] and outputs == list(ANOMALY_OUTPUTS) and opset >= 18 and dynamic_batch
    saved = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert (
        saved["image_threshold"] == scorer.image_threshold and saved["memory_bank_size"] == 24
    )  # 3 images x 16 patches x 50 %
    assert_parity(scorer, tmp_path / "onnx", pictures())
    verdicts = [r["verdict"] for r in AnomalyOnnxPredictor(tmp_path / "onnx").predict(pictures())]
    assert verdicts[-1] == "NG" and "OK" in verdicts


@pytest.mark.slow
def test_scorer_export_keeps_the_projected_search(tmp_path: Path) -> None:
    # `search_projection_dim` is searched in the graph as in PyTorch (the same seeded matrix, drawn before tracing)
    exact = fitted_scorer(tmp_path / "model")
    exact.config.search_projection_dim, exact.config.num_candidates = 4, 1
    exact.save_pretrained(tmp_path / "projected")
    projected = PatchMemoryScorer.from_pretrained(tmp_path / "projected")
    assert cadmtl(["export", "onnx", str(tmp_path / "projected"), str(tmp_path / "onnx")]) == 0
    assert_parity(projected, tmp_path / "onnx", pictures())
    pixel_values = AnomalyImageProcessor.from_pretrained(tmp_path / "onnx")(pictures())["pixel_values"]
    graph_maps = AnomalyOnnxPredictor(tmp_path / "onnx").run(pixel_values)["anomaly_maps"]
    exact_maps = PatchMemoryScorer.from_pretrained(tmp_path / "model").predict(pixel_values).anomaly_maps
    assert (graph_maps - exact_maps).abs().max() > 1e-3  # one candidate on 4 dims misses true neighbours


def test_scorer_export_keeps_the_query_stride(tmp_path: Path) -> None:
    # a 4 x 4 grid averaged over 3 x 3 windows: the graph's AveragePool (ceil mode) averages the partial windows'
    # real cells only, as PyTorch does
    scorer = fitted_scorer(tmp_path / "model")
    scorer.config.query_stride = 3
    scorer.save_pretrained(tmp_path / "strided")
    strided = PatchMemoryScorer.from_pretrained(tmp_path / "strided")
    assert cadmtl(["export", "onnx", str(tmp_path / "strided"), str(tmp_path / "onnx")]) == 0
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["query_stride"] == 3
    assert_parity(strided, tmp_path / "onnx", pictures())
    pixel_values = AnomalyImageProcessor.from_pretrained(tmp_path / "onnx")(pictures())["pixel_values"]
    every_cell = PatchMemoryScorer.from_pretrained(tmp_path / "model").predict(pixel_values).anomaly_maps
    assert (strided.predict(pixel_values).anomaly_maps - every_cell).abs().max() > 1e-3


def test_scorer_export_keeps_the_map_flips(tmp_path: Path) -> None:
    # the flipped views are scored in the graph too, and their grids flipped back before the average
    scorer = fitted_scorer(tmp_path / "model")
    scorer.config.map_flips = ["h", "v", "hv"]
    scorer.save_pretrained(tmp_path / "flipped")
    flipped = PatchMemoryScorer.from_pretrained(tmp_path / "flipped")
    assert cadmtl(["export", "onnx", str(tmp_path / "flipped"), str(tmp_path / "onnx")]) == 0
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["map_flips"] == ["h", "v", "hv"]
    assert_parity(flipped, tmp_path / "onnx", pictures())
    pixel_values = AnomalyImageProcessor.from_pretrained(tmp_path / "onnx")(pictures())["pixel_values"]
    upright = PatchMemoryScorer.from_pretrained(tmp_path / "model").predict(pixel_values)
    outputs = flipped.predict(pixel_values)
    torch.testing.assert_close(outputs.image_scores, upright.image_scores)
    assert (outputs.anomaly_maps - upright.anomaly_maps).abs().max() > 1e-3


def test_scorer_export_keeps_the_dense_memory_border_profile_and_defect_head(
    tmp_path: Path, tiny_dense_scorer
) -> None:
    # the nearest images' retrieval (TopK) and their patches' gather run in the graph, projected as in PyTorch; the
    # image score is taken on the border profile there too
    # the defect head runs in the graph on the same features, its map fused with the memory's
    normals = to_pixel_values(pictures(4, seed=1), SIZE)
    scorer = tiny_dense_scorer(normals[:3], normals[3:], SIZE, num_candidates=4)
    maps, scores = scorer.score(to_pixel_values(pictures(), SIZE))
    scorer.image_threshold, scorer.pixel_threshold = float(scores.median()), float(maps.quantile(0.9))
    scorer.save_pretrained(tmp_path / "model")
    dense = PatchMemoryScorer.from_pretrained(tmp_path / "model")
    assert cadmtl(["export", "onnx", str(tmp_path / "model"), str(tmp_path / "onnx")]) == 0
    saved = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert (
        saved["neighbour_images"] == 2
        and saved["memory_images"] == 3
        and saved["border_profile"] == [1.5, 1.0]
        and saved["defect_head_hidden"] == 128
        and len(saved["defect_head_statistics"]) == 4
    )
    assert_parity(dense, tmp_path / "onnx", pictures())
    initializers = {
        t.name: t.data_type for t in onnx.load(tmp_path / "onnx" / "model.onnx").graph.initializer
    }
    assert onnx.TensorProto.FLOAT16 in initializers.values()  # the memory is kept in float16


@pytest.mark.slow
@pytest.mark.parametrize("distill", [False, True], ids=["proxy-tasks", "with-distill-teacher"])
def test_learner_export_matches_pytorch(tmp_path: Path, distill: bool) -> None:
    if distill:
        pytest.importorskip("timm", reason="the distill teacher is a timm network (the `pretrained` extra)")
    teacher = (
        {"tasks": ["inpaint", "rotation", "segment", "distill"], "teacher_backbone": "tf_efficientnet_lite0"}
        if distill
        else {}
    )
    torch.manual_seed(0)
    learner = AnomalyLearner(AnomalyLearnerConfig(preset="tiny", image_size=32, **teacher)).eval()
    learner.fit_normal_statistics([to_pixel_values(pictures(4, seed=1)[:3], 32)])
    fused = learner.predict(to_pixel_values(pictures(), 32))
    learner.image_threshold = float(fused.image_scores.median())
    learner.pixel_threshold = float(fused.anomaly_maps.quantile(0.9))
    learner.save_pretrained(tmp_path / "model")
    export_onnx(tmp_path / "model", tmp_path / "onnx")
    assert graph_interface(tmp_path / "onnx" / "model.onnx")[1] == list(ANOMALY_OUTPUTS)
    assert_parity(learner, tmp_path / "onnx", pictures())


@pytest.mark.slow
def test_localizer_export_matches_the_localize_command(tmp_path: Path) -> None:
    run = {
        "model": "tiny",
        "seed": 0,
        "layers": [2, 3],
        "image_size": SIZE,
        "localizer": ReferenceLocalizer(window=1, sigma=2.0, threshold=0.05).to_dict(),
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "localizer.json").write_text(json.dumps(run))
    assert cadmtl(["export", "onnx", str(tmp_path / "run" / "localizer.json"), str(tmp_path / "onnx")]) == 0
    inputs, outputs, opset, dynamic_batch = graph_interface(tmp_path / "onnx" / "model.onnx")
    assert inputs == list(LOCALIZER_INPUTS) and outputs == list(LOCALIZER_OUTPUTS)
    assert opset >= 18 and dynamic_batch

    references = pictures(3, seed=2)[:2] * 2
    queries = [references[0], pictures(3, seed=2)[2], references[0].rotate(3), references[1]]
    predictor = LocalizerOnnxPredictor(tmp_path / "onnx")
    results = predictor.predict(references, queries)
    # What `cadmtl reference localize` computes for the same pairs.
    runner = PairRunner(
        PatchFeatureExtractor(load_backbone("tiny", 0)[0], [2, 3]),
        ReferenceLocalizer.from_dict(run["localizer"]),
        SIZE,
        cache_references=False,
    )
    maps = runner.maps([SimpleNamespace(query=q, reference=r) for q, r in zip(queries, references)])
    assert results[0]["score"] < 1e-3 and not results[0]["has_anomaly"]  # a query equal to its reference
    assert results[1]["has_anomaly"]
    for result, anomaly_map in zip(results, maps):
        torch.testing.assert_close(result["map"], anomaly_map, atol=1e-4, rtol=0)
        boxes, scores, _ = boxes_from_map(anomaly_map, 0.05)
        assert torch.equal(result["boxes"], boxes)
        torch.testing.assert_close(result["scores"], scores, atol=1e-4, rtol=0)
    batch = torch.randn(3, 3, SIZE, SIZE)
    raw = predictor.run(batch, batch.flip(-1))
    assert raw["difference_maps"].shape == (3, SIZE, SIZE) and raw["patch_distances"].shape == (3, 4, 4)
