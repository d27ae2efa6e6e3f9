"""High-resolution anomaly inspection by tiles: the scorer's one scoring path (`AnomalyImageProcessor.predict`)
with `tile_size`, fitting on tiles, the settings saved in the model's config, and the command's options."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cadmtl.anomaly.models import anomaly_processor, load_anomaly_model, predict_image, score_images
from cadmtl.anomaly.patch_memory import PatchMemoryScorer
from cadmtl.cli import main
from cadmtl.features import load_backbone
from dataset_scripts.make_demo import build_demo_dataset
from modeling_cadmtl_anomaly import AnomalyImageProcessor
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import image_scores


def textured(size: int, seed: int) -> Image.Image:
    """A periodic texture with noise, the same pattern in every image: what a normal surface looks like."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = 128 + 40 * np.sin(x / 6.0) + 40 * np.cos(y / 9.0)
    image = np.stack([base, base * 0.8 + 20, 255 - base], axis=-1) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    return load_backbone("tiny", 0)[0]


def scorer_on(
    backbone: torch.nn.Module, tile_size: int | None, normals: list[Image.Image]
) -> PatchMemoryScorer:
    scorer = PatchMemoryScorer.from_backbone(
        backbone, image_size=(64, 64), coreset_fraction=1.0, image_score="max"
    )
    scorer.config.tile_size = tile_size
    processor = anomaly_processor(scorer)
    scorer.fit((processor.tiles(image)[0] for image in normals), batch_size=64)
    return scorer


def test_a_tile_as_large_as_the_image_gives_the_untiled_map(backbone) -> None:
    images = [textured(96, 1), textured(96, 2)]
    scorer = scorer_on(backbone, None, [textured(96, 0)])
    whole = anomaly_processor(scorer).predict(scorer, images)
    tiled = anomaly_processor(scorer, tile_size=96, tile_overlap=8).predict(scorer, images)
    for got, expected in zip(
        tiled["anomaly_maps"], whole["anomaly_maps"]
    ):  # (batches of 1 vs 2: float noise)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # with tiles the image score is the stitched map's ("max" here), not the patch grid's
    expected_scores = image_scores(torch.stack(whole["anomaly_maps"]), "max")
    torch.testing.assert_close(tiled["image_scores"], expected_scores, atol=1e-5, rtol=0)


def test_a_small_defect_on_a_large_image_is_found_only_with_tiles(backbone) -> None:
    normal = textured(1024, 1)
    defect = np.asarray(textured(1024, 7)).copy()
    defect[500:510, 600:610] = 255  # 0.01 % of the image: under a pixel once the image is 64 x 64
    defect = Image.fromarray(defect)
    found = {}
    for tile_size in (None, 128):
        scorer = scorer_on(backbone, tile_size, [textured(1024, 0)])
        (normal_score, defect_score), (_, defect_map) = score_images(scorer, [normal, defect], batch_size=64)
        peak = np.unravel_index(defect_map.argmax(), defect_map.shape)
        near = abs(peak[0] - 505) <= 48 and abs(peak[1] - 605) <= 48
        found[tile_size] = bool(defect_score > normal_score and near)
        assert defect_map.shape == (1024, 1024)
    assert found == {None: False, 128: True}


def test_predict_image_uses_the_saved_tiles_and_an_override(backbone, tmp_path: Path) -> None:
    scorer = scorer_on(backbone, 64, [textured(128, 0)])
    scorer.image_threshold, scorer.pixel_threshold = 1.0, 1.0
    scorer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tile_size"] == 64
    assert AnomalyImageProcessor.from_pretrained(tmp_path).tile_size == 64  # the processor beside the weights
    loaded = load_anomaly_model(tmp_path)
    image = textured(128, 3)
    picture, score, _ = predict_image(loaded, image)
    tiled = anomaly_processor(loaded).predict(loaded, [image], image_score="max")
    assert picture.size == (128, 128) and score == pytest.approx(float(tiled["image_scores"][0]))
    assert tiled["anomaly_maps"][0].shape == (
        128,
        128,
    )  # 2 x 2 tiles of 64 at the model's 64: full resolution
    override = anomaly_processor(loaded, tile_size=128)
    assert (override.tile_size, override.tile_overlap) == (128, 0)
    _, whole_score, _ = predict_image(loaded, image, override)
    assert whole_score != score


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ad-tiles") / "mini"
    build_demo_dataset(folder, train=6, validation=4, test=4)
    return folder


def test_fit_on_tiles_saves_the_settings_that_evaluate_and_predict_use(repo: Path, tmp_path: Path) -> None:
    fit = ["anomaly", "fit", str(repo), "--config", "exterior_ad", "--output-dir", str(tmp_path / "fit")]
    options = ["--backbone", "tiny", "--image-size", "64", "--coreset-fraction", "0.5"]
    assert main([*fit, *options, "--tile-size", "96", "--tile-overlap", "32"]) == 0
    summary = json.loads((tmp_path / "fit" / "fit_results.json").read_text())
    assert summary["tiles"] == {"tile_size": 96, "tile_overlap": 32}
    config = json.loads((tmp_path / "fit" / "model" / "config.json").read_text())
    assert (config["tile_size"], config["tile_overlap"]) == (96, 32)
    model = str(tmp_path / "fit" / "model")
    evaluate = ["anomaly", "evaluate", model, str(repo), "--config", "exterior_ad", "--output-dir"]
    assert main([*evaluate, str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["tiles"] == {
        "tile_size": 96,
        "tile_overlap": 32,
    }
    assert main([*evaluate, str(tmp_path / "eval-whole"), "--tile-size", "4096"]) == 0
    results = json.loads((tmp_path / "eval-whole" / "eval_results.json").read_text())
    assert results["tiles"] == {"tile_size": 4096, "tile_overlap": 0}  # the option overrides the saved tiles


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tile-size", "16"], "--tile-size (tile_size) must be an integer of at least 32 pixels, got 16"),
        (["--tile-size", "-5"], "--tile-size (tile_size) must be an integer of at least 32 pixels, got -5"),
        (
            ["--tile-size", "64", "--tile-overlap", "64"],
            "--tile-overlap (tile_overlap) must be an integer from 0 to tile_size - 1 = 63 pixels, got 64",
        ),
        (["--tile-overlap", "8"], "--tile-overlap (tile_overlap=8) needs --tile-size (tile_size)"),
    ],
)
def test_bad_tile_options_are_one_line_errors_before_any_work(
    options, message, tmp_path: Path, capsys
) -> None:
    missing = str(tmp_path / "no-such-repo")  # never read: the options are checked first
    fit = ["anomaly", "fit", missing, "--config", "exterior_ad", "--output-dir", str(tmp_path / "out")]
    assert main([*fit, *options]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    if options[0] == "--tile-size":
        predict = [
            "anomaly",
            "predict",
            str(tmp_path / "no-model"),
            missing,
            "--output-dir",
            str(tmp_path / "p"),
        ]
        assert main([*predict, *options]) == 2
        assert re.fullmatch(f"error: {re.escape(message)}\n", capsys.readouterr().err)
