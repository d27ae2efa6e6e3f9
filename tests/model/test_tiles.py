"""High-resolution inspection by tiles: the pure grid / stitching helpers (and their copy in the other Hub package)
and the multi-task processor's tiled inference path (`CadMtlImageProcessor.predict` with `tile_size`)."""

from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cadmtl.testing import tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel
from modeling_cadmtl import image_processing_cadmtl as cadmtl_tiles
from modeling_cadmtl_anomaly import features_cadmtl_anomaly as anomaly_tiles
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import (
    check_tile_settings,
    stitch,
    tile_boxes,
    tile_canvas,
)

TILE_HELPERS = ("check_tile_settings", "_tile_starts", "tile_boxes", "tile_canvas", "stitch")


# ------------------------------------------------------------------------------------------------ the grid
def test_the_two_hub_packages_hold_the_same_tile_helpers() -> None:
    for name in TILE_HELPERS:
        assert inspect.getsource(getattr(cadmtl_tiles, name)) == inspect.getsource(
            getattr(anomaly_tiles, name)
        )
    assert cadmtl_tiles.MIN_TILE_SIZE == anomaly_tiles.MIN_TILE_SIZE == 32


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap", "count"),
    [
        (1024, 1024, 256, 0, 16),  # 4 x 4, no shifted tile needed
        (1024, 1024, 256, 32, 25),  # stride 224: starts 0, 224, 448, 672 and 768 (shifted to the edge)
        (1000, 600, 512, 64, 6),  # rows 0, 448, 488 (two would share only 24 < 64 pixels) x columns 0, 88
        (100, 300, 128, 0, 3),  # a side shorter than a tile: one row spanning it
        (50, 40, 64, 16, 1),  # an image smaller than a tile: the whole image, one tile
    ],
)
def test_the_grid_covers_every_pixel_with_boxes_inside_the_image(height, width, tile, overlap, count) -> None:
    boxes = tile_boxes(height, width, tile, overlap)
    assert len(boxes) == count
    covered = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert (y1 - y0, x1 - x0) == (min(tile, height), min(tile, width))  # every tile the same size
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1


def test_the_grid_of_known_sizes() -> None:
    assert tile_boxes(100, 300, 128) == [(0, 0, 128, 100), (128, 0, 256, 100), (172, 0, 300, 100)]
    assert [box[0] for box in tile_boxes(256, 1024, 256, 32)] == [0, 224, 448, 672, 768]
    assert tile_boxes(50, 40, 64, 16) == [(0, 0, 40, 50)]


@pytest.mark.parametrize(
    ("tile", "overlap", "message"),
    [
        (16, 0, "--tile-size (tile_size) must be an integer of at least 32 pixels, got 16"),
        (0, 0, "--tile-size (tile_size) must be an integer of at least 32 pixels, got 0"),
        (-64, 0, "--tile-size (tile_size) must be an integer of at least 32 pixels, got -64"),
        (64.0, 0, "--tile-size (tile_size) must be an integer of at least 32 pixels, got 64.0"),
        (
            64,
            64,
            "--tile-overlap (tile_overlap) must be an integer from 0 to tile_size - 1 = 63 pixels, got 64",
        ),
        (
            64,
            -1,
            "--tile-overlap (tile_overlap) must be an integer from 0 to tile_size - 1 = 63 pixels, got -1",
        ),
        (None, 8, "--tile-overlap (tile_overlap=8) needs --tile-size (tile_size)"),
    ],
)
def test_bad_tile_settings_are_one_line_errors_naming_the_option(tile, overlap, message) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_tile_settings(tile, overlap)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CadMtlImageProcessor(tile_size=tile, tile_overlap=overlap)


# ------------------------------------------------------------------------------------------------ stitching
def test_stitching_a_constant_map_gives_the_constant() -> None:
    boxes = tile_boxes(300, 200, 64, 24)
    maps = torch.full((len(boxes), 2, 64, 64), 3.5)
    stitched = stitch(maps, boxes, (300, 200))
    assert stitched.shape == (2, 300, 200)
    torch.testing.assert_close(stitched, torch.full((2, 300, 200), 3.5))


def test_overlaps_are_averaged_exactly() -> None:
    # two 2 x 4 tiles on a 2 x 6 canvas, sharing columns 2 and 3
    maps = torch.stack([torch.full((2, 4), 1.0), torch.full((2, 4), 4.0)])
    stitched = stitch(maps, [(0, 0, 4, 2), (2, 0, 6, 2)], (2, 6))
    assert stitched.tolist() == [[1.0, 1.0, 2.5, 2.5, 4.0, 4.0]] * 2
    # a map that differs from its box is resized to it: a 1 x 1 tile of 8 over a 2 x 2 box
    assert stitch(torch.full((1, 1, 1), 8.0), [(0, 0, 2, 2)], (2, 3)).tolist() == [[8.0, 8.0, 0.0]] * 2


def test_the_canvas_places_tiles_at_the_model_resolution_ending_at_the_edge() -> None:
    boxes = tile_boxes(1024, 1000, 256, 32)
    placed, canvas = tile_canvas(boxes, 1024, 1000, (64, 64))  # a quarter of the image's resolution
    assert canvas == (256, 250)
    assert all(x1 - x0 == 64 and y1 - y0 == 64 for x0, y0, x1, y1 in placed)
    assert max(x1 for _, _, x1, _ in placed) == 250 and max(y1 for _, _, _, y1 in placed) == 256
    assert placed[1] == (56, 0, 120, 64)  # x0 = 224 pixels -> 56 at a quarter
    # a tile of the whole image: the canvas is the model's input
    assert tile_canvas([(0, 0, 130, 90)], 90, 130, (64, 64)) == ([(0, 0, 64, 64)], (64, 64))


# ------------------------------------------------------------------------------ the multi-task processor
def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_a_tile_as_large_as_the_image_gives_the_untiled_prediction() -> None:
    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config()).eval()
    images = [random_image(96, 128), random_image(96, 128, seed=1)]
    whole = CadMtlImageProcessor(size={"height": 64, "width": 64})
    tiled = CadMtlImageProcessor(size={"height": 64, "width": 64}, tile_size=128, tile_overlap=16)
    with torch.no_grad():
        expected, got = whole.predict(model, images), tiled.predict(model, images)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0)


class BrightSquareModel:
    """A stand-in multi-task model: on each input it 'detects' the bright pixels (one box of class 0 at the first
    location, every other location scores 0) and 'segments' them (class 1 where bright)."""

    def __init__(self, locations: int = 5) -> None:
        self.locations = locations
        self.calls: list[tuple[int, str | None]] = []

    def __call__(self, pixel_values: torch.Tensor, task: str | None = None, **_: object) -> SimpleNamespace:
        self.calls.append((len(pixel_values), task))
        batch, _, height, width = pixel_values.shape
        bright = pixel_values.mean(dim=1) > 0  # (B, H, W)
        logits = torch.full((batch, self.locations, 2), -20.0)
        boxes = torch.full((batch, self.locations, 4), 0.5)
        for index, mask in enumerate(bright):
            rows, columns = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
            if len(rows):
                x0, x1 = columns.min() / width, (columns.max() + 1) / width
                y0, y1 = rows.min() / height, (rows.max() + 1) / height
                boxes[index, 0] = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
                logits[index, 0, 0] = 20.0
        seg = torch.stack([torch.zeros_like(bright, dtype=torch.float32), bright.float() * 2 - 1], dim=1)
        return SimpleNamespace(
            cls_logits=torch.zeros(batch, 3),
            det_logits=logits,
            det_centerness_logits=torch.full((batch, self.locations), 20.0),
            pred_boxes=boxes,
            seg_logits=seg,
        )


def square_image(height: int, width: int, box: tuple[int, int, int, int]) -> Image.Image:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = 255
    return Image.fromarray(array)


def test_detections_from_overlapping_tiles_are_merged_into_one_box_in_image_pixels() -> None:
    image = square_image(256, 256, (100, 100, 140, 140))
    processor = CadMtlImageProcessor(size={"height": 64, "width": 64}, tile_size=160, tile_overlap=96)
    model = BrightSquareModel()
    outputs = processor.predict(model, [image], ("det",))
    assert len(tile_boxes(256, 256, 160, 96)) == 9  # every one of the 9 tiles holds the whole square
    assert (outputs["det_logits"][0, :, 0] > 0).sum() == 9  # 9 detections before the merge
    assert model.calls == [(8, "det"), (1, "det")]  # tile_batch_size 8 per forward pass
    (found,) = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(256, 256)])
    assert found["labels"].tolist() == [0]  # the duplicates across the tile seams are gone
    torch.testing.assert_close(
        found["boxes"][0], torch.tensor([100.0, 100.0, 140.0, 140.0]), atol=4.0, rtol=0
    )
    assert processor.post_process_anomaly_score(outputs)[0]["head_scores"]["det"] == pytest.approx(1.0)


def test_segmentation_is_stitched_over_images_of_different_sizes() -> None:
    images = [square_image(200, 300, (220, 20, 260, 60)), square_image(120, 90, (10, 70, 40, 100))]
    processor = CadMtlImageProcessor(size={"height": 64, "width": 64}, tile_size=100, tile_overlap=20)
    outputs = processor.predict(BrightSquareModel(), images, ("cls", "seg"))
    assert outputs["cls_logits"].shape == (2, 3)  # the classifier saw each whole image once
    assert outputs["seg_logits"].shape[0] == 2 and "seg_pixel_mask" in outputs
    masks = processor.post_process_semantic_segmentation(outputs, target_sizes=[(200, 300), (120, 90)])
    for mask, image in zip(masks, images):
        truth = torch.from_numpy(np.asarray(image)[..., 0] > 0)
        assert mask.shape == truth.shape
        assert ((mask == 1) == truth).float().mean() > 0.99  # the squares land where they are in each image
    area = [score["head_scores"]["seg"] for score in processor.post_process_anomaly_score(outputs)]
    assert area == pytest.approx([40 * 40 / (200 * 300), 30 * 30 / (120 * 90)], rel=0.15)


def test_tile_settings_are_saved_with_the_processor_and_overridden(tmp_path) -> None:
    CadMtlImageProcessor(tile_size=512, tile_overlap=64).save_pretrained(tmp_path)
    loaded = CadMtlImageProcessor.from_pretrained(tmp_path)
    assert (loaded.tile_size, loaded.tile_overlap, loaded.tile_batch_size) == (512, 64, 8)
    loaded.set_tiles(tile_overlap=32)
    assert (loaded.tile_size, loaded.tile_overlap) == (512, 32)
    loaded.set_tiles(256)
    assert (loaded.tile_size, loaded.tile_overlap) == (256, 0)
    with pytest.raises(ValueError, match=r"^--tile-overlap \(tile_overlap\) must be"):
        loaded.set_tiles(tile_overlap=256)


def test_the_inspection_pipeline_tiles_through_the_same_path(tmp_path) -> None:
    from transformers import pipeline

    from modeling_cadmtl.pipeline_cadmtl import CadMtlInspectionPipeline

    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config(verdict_threshold=0.4)).eval()
    processor = CadMtlImageProcessor(size={"height": 64, "width": 64}, tile_size=64, tile_overlap=16)
    model.save_pretrained(tmp_path, image_processor=processor)
    image = random_image(100, 150, seed=3)
    with torch.no_grad():
        outputs = processor.predict(model, [image])
        whole = CadMtlImageProcessor(size={"height": 64, "width": 64}).predict(model, [image])
    assert outputs["det_logits"].shape[1] == 6 * whole["det_logits"].shape[1]  # 2 rows x 3 columns of tiles
    expected = processor.post_process_verdict(outputs, model.config)[0]
    result = pipeline(model=str(tmp_path), pipeline_class=CadMtlInspectionPipeline)(image)
    assert result["verdict"] == expected["verdict"]
    assert result["head_scores"] == pytest.approx(expected["head_scores"])
