"""Synthetic defects: exact masks and boxes, local edits, reproducibility, and the synthesize command."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from dataset_scripts.procedural import make_surface
from dataset_scripts.raster import bbox_of_mask
from dataset_scripts.schema import label_names
from dataset_scripts.synthesize import main as synthesize_main
from dataset_scripts.synthesize import parse_counts
from dataset_scripts.synthetic import STYLES, DefectSpec, place_defects, synthesize_defect
from dataset_scripts.taxonomy import SYNTHESIS_STYLES


@pytest.fixture(scope="module")
def panel() -> np.ndarray:
    return make_surface("panel", 120, 160, np.random.default_rng(7))


def test_every_taxonomy_style_is_implemented() -> None:
    assert set(STYLES) == set(SYNTHESIS_STYLES)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_mask_box_and_image_agree(panel: np.ndarray, style: str) -> None:
    defect = synthesize_defect(panel, style, np.random.default_rng(1), center=(80.0, 60.0), radius=25.0)
    assert defect.image.shape == panel.shape and defect.image.dtype == np.uint8
    assert defect.mask.any() and defect.bbox == bbox_of_mask(defect.mask)
    x, y, w, h = (int(v) for v in defect.bbox)
    assert x >= 0 and y >= 0 and x + w <= 160 and y + h <= 120
    changed = np.abs(defect.image.astype(int) - panel.astype(int)).max(axis=2) > 12
    # The defect is visible where its mask is ...
    assert changed[defect.mask].mean() > 0.3
    # ... and the picture is untouched far from it (soft edges and shadows stay within a few pixels).
    far = np.ones_like(defect.mask)
    far[max(0, y - 8) : y + h + 8, max(0, x - 8) : x + w + 8] = False
    assert not changed[far].any()


def test_same_seed_same_defect(panel: np.ndarray) -> None:
    first = synthesize_defect(panel, "corrosion", np.random.default_rng(3))
    second = synthesize_defect(panel, "corrosion", np.random.default_rng(3))
    other = synthesize_defect(panel, "corrosion", np.random.default_rng(4))
    assert np.array_equal(first.image, second.image) and np.array_equal(first.mask, second.mask)
    assert not np.array_equal(first.mask, other.mask)


def test_lighting_follows_the_image() -> None:
    """The same stain on a dark and on a bright surface comes out darker on the dark one."""
    dark = np.full((80, 80, 3), 40, np.uint8)
    bright = np.full((80, 80, 3), 220, np.uint8)
    bright[:, :40] = 40  # a lighting step inside the window: the defect must follow it
    defect = synthesize_defect(bright, "stain", np.random.default_rng(0), center=(40.0, 40.0), radius=20.0)
    left = defect.image[defect.mask & (np.arange(80) < 38)[None, :]].mean()
    right = defect.image[defect.mask & (np.arange(80) > 42)[None, :]].mean()
    assert right > left
    assert synthesize_defect(dark, "stain", np.random.default_rng(0)).mask.any()


def test_place_defects_keeps_masks_disjoint(panel: np.ndarray) -> None:
    specs = [
        DefectSpec("scratch", "scratch"),
        DefectSpec("corrosion", "corrosion"),
        DefectSpec("dent", "dent"),
    ]
    _, placed = place_defects(panel, specs, np.random.default_rng(5), radius_range=(0.1, 0.15))
    assert [p.anomaly for p in placed] == ["scratch", "corrosion", "dent"]
    union = np.zeros(panel.shape[:2], int)
    for p in placed:
        union += p.mask
        assert p.bbox == bbox_of_mask(p.mask) and p.area == int(p.mask.sum())
    assert union.max() == 1


def test_place_defects_centres_fall_in_the_region(panel: np.ndarray) -> None:
    """A region (the car in a street photo) bounds where defects go; a region without room places none."""
    region = np.zeros(panel.shape[:2], bool)
    region[:, 120:] = True  # the right quarter of the 160 px wide panel
    for seed in range(5):
        _, placed = place_defects(
            panel,
            [DefectSpec("corrosion")],
            np.random.default_rng(seed),
            radius_range=(0.1, 0.12),
            region=region,
        )
        assert len(placed) == 1
        assert np.nonzero(placed[0].mask)[1].mean() > 105  # centre at x >= 120, blob radius <= 14.4 px
    edge = np.zeros(panel.shape[:2], bool)
    edge[:, 0] = True  # no pixel of it is a radius away from the border
    _, placed = place_defects(panel, [DefectSpec("dent")], np.random.default_rng(0), region=edge)
    assert placed == []
    with pytest.raises(ValueError, match="region of shape"):
        place_defects(panel, [DefectSpec("dent")], np.random.default_rng(0), region=region[:, :10])


def test_invalid_requests_are_clear(panel: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown synthesis style 'smudge'"):
        synthesize_defect(panel, "smudge", np.random.default_rng(0))
    with pytest.raises(ValueError, match="too small to draw"):
        synthesize_defect(panel, "dent", np.random.default_rng(0), radius=2.0)
    with pytest.raises(ValueError, match="anomaly=N"):
        parse_counts("dent=0")


def _normals(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(make_surface("panel", 90, 120, rng)).save(folder / f"n{index}.jpg", quality=95)
    return folder


def test_synthesize_segmentation_with_matching_normals(tmp_path: Path) -> None:
    normals = _normals(tmp_path / "normals", 3)
    repo = tmp_path / "repo"
    args = [
        normals,
        "--output-dir",
        repo,
        "--config",
        "exterior_seg",
        "--counts",
        "corrosion=3,dent=2",
        "--with-normals",
    ]
    assert synthesize_main([*map(str, args), "--no-progress"]) == 0
    dataset = datasets.load_dataset(str(repo), "exterior_seg", split="train", streaming=True)
    names = label_names(dataset.features, "seg")
    rows = list(dataset)
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    normal = [r for r in rows if r["is_normal"]]
    assert len(synthetic) == 5 and len(normal) == 3 and all(r["source"] == "real" for r in normal)
    assert sorted(names[max(r["mask_classes"])] for r in synthetic) == ["corrosion"] * 3 + ["dent"] * 2
    for row in synthetic:
        mask = np.asarray(row["mask"])
        assert row["mask_classes"] == sorted({0, *np.unique(mask).tolist()}) and not row["is_normal"]
        assert row["image_id"].startswith("train/synthetic/") and row["domain"] == "exterior"
    for row in normal:
        assert row["mask_classes"] == [0] and not np.asarray(row["mask"]).any()
    report = json.loads((repo / "reports" / "exterior_seg" / "train.json").read_text())
    assert report["source"]["description"] == "procedural defects: corrosion 3, dent 2"


def test_synthesize_detection_boxes_match_the_painted_defect(tmp_path: Path) -> None:
    normals = _normals(tmp_path / "normals", 2)
    repo = tmp_path / "repo"
    args = [
        normals,
        "--output-dir",
        repo,
        "--config",
        "general_det",
        "--counts",
        "fastener_corroded=2",
        "--instances",
        "2",
    ]
    assert synthesize_main([*map(str, args), "--no-progress", "--seed", "3"]) == 0
    rows = list(datasets.load_dataset(str(repo), "general_det", split="train", streaming=True))
    assert len(rows) == 2
    for row in rows:
        objects = row["objects"]
        assert len(objects["bbox"]) == 2
        original = np.asarray(Image.open(normals / f"{row['image_id'].split('/')[-1].rsplit('-', 1)[0]}.jpg"))
        changed = np.abs(np.asarray(row["image"]).astype(int) - original.astype(int)).max(axis=2) > 40
        for x, y, w, h in objects["bbox"]:
            inside = changed[int(y) : int(y + h), int(x) : int(x + w)]
            assert inside.mean() > 0.2  # the box frames visible rust
        assert row["system"] == "fasteners" and row["part"] == ""
    # Appending a second run keeps the first rows and adds the new ones.
    assert synthesize_main([*map(str, args), "--no-progress", "--seed", "4"]) == 0
    assert sum(1 for _ in datasets.load_dataset(str(repo), "general_det", split="train", streaming=True)) == 4


def test_synthesize_rejects_anomalies_it_cannot_paint(tmp_path: Path, capsys) -> None:
    normals = _normals(tmp_path / "normals", 1)
    args = [
        normals,
        "--output-dir",
        tmp_path / "repo",
        "--config",
        "exterior_det",
        "--counts",
        "brake_pad_worn=1,blob=1",
    ]
    assert synthesize_main([*map(str, args), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "'blob' is not an anomaly" in err and "'brake_pad_worn' belongs to domain 'chassis'" in err
