"""`--tile-size` / `--tile-overlap` of `cadmtl predict`, and the app's `CADMTL_TILE_SIZE` / `CADMTL_TILE_OVERLAP`."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cadmtl.cli import main
from cadmtl.testing import tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

REPO_ROOT = Path(__file__).resolve().parents[2]
BAD_OPTIONS = [
    (["--tile-size", "16"], "--tile-size (tile_size) must be an integer of at least 32 pixels, got 16"),
    (["--tile-size", "0"], "--tile-size (tile_size) must be an integer of at least 32 pixels, got 0"),
    (
        ["--tile-size", "64", "--tile-overlap", "80"],
        "--tile-overlap (tile_overlap) must be an integer from 0 to tile_size - 1 = 63 pixels, got 80",
    ),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_bad_tile_options_of_predict_are_one_line_errors_before_the_model_loads(
    options, message, tmp_path, capsys
):
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30)).save(image)
    argv = ["predict", str(tmp_path / "no-such-model"), str(image), "--output-dir", str(tmp_path / "out")]
    assert main([*argv, *options]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiles-model")
    model = CadMtlModel(tiny_cadmtl_config()).eval()
    model.save_pretrained(folder, image_processor=CadMtlImageProcessor(size={"height": 64, "width": 64}))
    return folder


def _summary(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_by_tiles_writes_boxes_in_image_pixels(model_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "in" / "wide.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 260, 3), dtype=np.uint8)).save(image)
    run = ["predict", str(model_dir), str(image), "--no-overlays", "--threshold", "0.05", "--output-dir"]
    assert main([*run, str(tmp_path / "whole")]) == 0
    assert main([*run, str(tmp_path / "huge-tile"), "--tile-size", "4096"]) == 0
    assert _summary(tmp_path / "huge-tile") == _summary(tmp_path / "whole")  # one tile = the whole image
    assert main([*run, str(tmp_path / "tiled"), "--tile-size", "64", "--tile-overlap", "16"]) == 0
    (row,) = _summary(tmp_path / "tiled")
    assert row["error"] == "" and row["verdict"] in ("OK", "NG")
    detections = json.loads((tmp_path / "tiled" / "detections.json").read_text())
    assert detections  # a random model at a low threshold: boxes from several tiles, merged
    for detection in detections:
        x, y, width, height = detection["bbox"]
        assert min(x, y) >= 0 and x + width <= 260 + 1e-3 and y + height <= 150 + 1e-3


# ------------------------------------------------------------------------------------------------------ the app
def _load_app():
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    offline = os.environ.get("HF_HUB_OFFLINE")
    spec = importlib.util.spec_from_file_location("cadmtl_demo_app_tiles", REPO_ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if offline is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    return module


def test_the_app_reads_its_tile_settings_from_the_environment(monkeypatch) -> None:
    app = _load_app()
    monkeypatch.delenv("CADMTL_TILE_SIZE", raising=False)
    monkeypatch.delenv("CADMTL_TILE_OVERLAP", raising=False)
    assert app.tile_settings() == (None, None)  # each model's saved settings
    monkeypatch.setenv("CADMTL_TILE_SIZE", "512")
    monkeypatch.setenv("CADMTL_TILE_OVERLAP", "64")
    assert app.tile_settings() == (512, 64)
    for size, overlap, message in [
        ("big", "", "CADMTL_TILE_SIZE='big' is not a whole number of pixels"),
        (
            "16",
            "",
            "CADMTL_TILE_SIZE / CADMTL_TILE_OVERLAP: --tile-size (tile_size) must be an integer of at least 32",
        ),
        (
            "64",
            "64",
            "CADMTL_TILE_SIZE / CADMTL_TILE_OVERLAP: --tile-overlap (tile_overlap) must be an integer from 0",
        ),
        (
            "",
            "8",
            "CADMTL_TILE_SIZE / CADMTL_TILE_OVERLAP: --tile-overlap (tile_overlap=8) needs --tile-size",
        ),
    ]:
        monkeypatch.setenv("CADMTL_TILE_SIZE", size)
        monkeypatch.setenv("CADMTL_TILE_OVERLAP", overlap)
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            app.tile_settings()
