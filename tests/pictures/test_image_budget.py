"""The pixel budget of `load_image` (`cadmtl predict`, `cadmtl anomaly predict`, the demo app): large images are
downscaled on load, the budget comes from `CADMTL_MAX_IMAGE_PIXELS`, and Pillow's decompression-bomb check still
refuses absurd sizes before anything is decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cadmtl.pictures import predict
from cadmtl.pictures.predict import DEFAULT_MAX_IMAGE_PIXELS, load_image, max_image_pixels


def _gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    return np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)


def test_the_budget_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("CADMTL_MAX_IMAGE_PIXELS", raising=False)
    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS == 12_000_000
    monkeypatch.setenv("CADMTL_MAX_IMAGE_PIXELS", "5e6")
    assert max_image_pixels() == 5_000_000
    monkeypatch.setenv("CADMTL_MAX_IMAGE_PIXELS", "0")
    assert max_image_pixels() is None
    monkeypatch.setenv("CADMTL_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(
        ValueError, match=r"CADMTL_MAX_IMAGE_PIXELS='lots' is not a number of pixels \(0: no budget\)"
    ):
        max_image_pixels()
    monkeypatch.setenv("CADMTL_MAX_IMAGE_PIXELS", "-3")
    with pytest.raises(ValueError, match="must be >= 0"):
        max_image_pixels()


def test_images_above_the_budget_are_downscaled_keeping_their_shape(tmp_path: Path, monkeypatch) -> None:
    Image.fromarray(_gradient(400, 300)).save(tmp_path / "wide.png")
    Image.fromarray(_gradient(800, 600)).save(tmp_path / "wide.jpg", quality=95)
    monkeypatch.setenv("CADMTL_MAX_IMAGE_PIXELS", "30000")
    assert load_image(tmp_path / "wide.png").size == (200, 150)  # 30 000 pixels, 4:3 kept
    # a JPEG is decoded at a reduced scale (1/4: 200x150) -- the full 800x600 never exists -- and keeps its look
    small = load_image(tmp_path / "wide.jpg")
    assert small.size == (200, 150) and small.mode == "RGB"
    reference = Image.fromarray(_gradient(800, 600)).resize((200, 150), Image.Resampling.BILINEAR)
    assert np.abs(np.asarray(small, dtype=np.float32) - np.asarray(reference, dtype=np.float32)).mean() < 3
    assert load_image(tmp_path / "wide.png", max_pixels=0).size == (400, 300)  # 0: no budget
    assert load_image(tmp_path / "wide.png", max_pixels=1_000_000).size == (400, 300)  # within the budget
    monkeypatch.setenv("CADMTL_MAX_IMAGE_PIXELS", "0")
    assert load_image(tmp_path / "wide.jpg").size == (800, 600)


def test_a_decompression_bomb_is_still_refused_and_reported(tmp_path: Path, monkeypatch) -> None:
    # 20 000 x 10 000 = 200 MP, above twice Pillow's MAX_IMAGE_PIXELS (~179 MP); a few kB of 1-bit PNG
    Image.new("1", (20_000, 10_000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(Image.DecompressionBombError, match="could be decompression bomb DOS attack"):
        load_image(tmp_path / "bomb.png")
    items = list(predict._read_items([predict.ImageSource(tmp_path / "bomb.png", Path("bomb.png"))], 1.0))
    assert items[0].image is None and items[0].error.startswith(
        "DecompressionBombError: Image size (200000000"
    )
