"""Every bad-input case gives its counted skip (or fix) in the report, or its clear error."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from dataset_scripts.convert import main as convert_main
from dataset_scripts.images import read_image
from dataset_scripts.report import ValidationReport


def write(path: Path, image: Image.Image, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


def noise(size=(40, 30), seed=0) -> Image.Image:
    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    )


def convert(*args) -> int:
    return convert_main([*map(str, args), "--no-progress"])


def report_of(repo: Path, config: str, split: str = "train") -> dict:
    return json.loads((repo / "reports" / config / f"{split}.json").read_text())


def coco(root: Path, images: list[dict], annotations: list[dict]) -> Path:
    path = root / "annotations.json"
    categories = [{"id": 1, "name": "dent"}, {"id": 2, "name": "scratch"}]
    path.write_text(json.dumps({"images": images, "categories": categories, "annotations": annotations}))
    return path


def test_unreadable_images_are_counted_skips(tmp_path: Path) -> None:
    root = tmp_path / "src"
    write(root / "dent" / "good.jpg", noise())
    (root / "dent" / "text.jpg").write_text("this is not a JPEG")
    buffer = io.BytesIO()
    noise((50, 50), seed=3).save(buffer, format="JPEG")
    (root / "dent" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    write(root / "dent" / "huge.png", noise((60, 60), seed=4))
    repo = tmp_path / "repo"
    assert (
        convert("folders", root, "--output-dir", repo, "--config", "plant_cls", "--max-pixels", "3000") == 0
    )
    report = report_of(repo, "plant_cls")
    assert report["counts"] == {"over_pixel_limit": 1, "truncated": 1, "undecodable": 1}
    assert report["rows_seen"] == 4 and report["rows_written"] == 1
    details = {i["item"]: i["detail"] for i in report["issues"]}
    assert details["dent/huge.png"] == "60x60 > 3000 pixels"
    markdown = (repo / "reports" / "plant_cls" / "train.md").read_text()
    assert "| `truncated` | skip | 1 |" in markdown and "- `dent/cut.jpg`" in markdown
    card = (repo / "README.md").read_text()
    assert "## Cleaning and validation" in card and "| `plant_cls` | train | 4 | 1 | 1 | 1 | 1 |" in card


def test_strict_turns_skips_into_errors_and_writes_nothing(tmp_path: Path, capsys) -> None:
    root = tmp_path / "src"
    write(root / "dent" / "good.jpg", noise())
    (root / "dent" / "text.jpg").write_text("nope")
    repo = tmp_path / "repo"
    assert convert("folders", root, "--output-dir", repo, "--config", "plant_cls", "--strict") == 1
    err = capsys.readouterr().err
    assert "1 problem(s) (--strict: skips are errors); nothing was written" in err
    assert "undecodable: dent/text.jpg" in err
    assert not list(repo.glob("plant_cls/*.parquet")) and report_of(repo, "plant_cls")["strict"] is True


@pytest.mark.parametrize(
    "mode, save, detail",
    [
        ("L", {}, "L -> RGB"),
        ("CMYK", {"format": "JPEG"}, "CMYK -> RGB"),
        ("RGBA", {}, "RGBA -> RGB"),
        ("P", {}, "P -> RGB"),
        ("I;16", {}, "I;16 -> RGB"),
    ],
)
def test_non_rgb_images_are_converted_and_counted(tmp_path: Path, mode: str, save: dict, detail: str) -> None:
    if mode == "I;16":
        image = Image.fromarray(np.full((30, 40), 65535, np.uint16))  # 16-bit white must stay white, not clip
        suffix = ".png"
    else:
        image = noise().convert(mode)
        suffix = ".jpg" if save.get("format") == "JPEG" else ".png"
    path = write(tmp_path / f"img{suffix}", image, **save)
    report = ValidationReport("plant_cls", "train")
    stored = read_image(path, path.name, report)
    assert stored is not None and report.counts() == {"converted_mode": 1}
    assert report.issues[0].detail == detail
    decoded = Image.open(io.BytesIO(stored.data))
    assert decoded.mode == "RGB" and decoded.size == (40, 30)
    if mode == "I;16":
        assert np.asarray(decoded).min() == 255


def test_exif_orientation_follows_the_annotations(tmp_path: Path) -> None:
    raw = noise((40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = write(tmp_path / "rotated.jpg", raw, exif=exif.tobytes())
    report = ValidationReport("c_det", "train")
    upright = read_image(path, "rotated.jpg", report, expected_size=(30, 40))
    assert (upright.width, upright.height) == (30, 40) and report.counts() == {"exif_transposed": 1}
    report = ValidationReport("c_det", "train")
    kept = read_image(path, "rotated.jpg", report, expected_size=(40, 30))
    assert (kept.width, kept.height) == (40, 30) and report.counts() == {"reencoded": 1}
    assert Image.open(io.BytesIO(kept.data)).getexif().get(0x0112) is None  # readers must not rotate it again


def test_annotation_problems_in_coco(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write(root / name, noise((40, 30), seed=ord(name[0])))
    write(tmp_path / "outside.jpg", noise(seed=9))
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.jpg", "width": 80, "height": 60},  # size mismatch
        {"id": 3, "file_name": "../outside.jpg", "width": 40, "height": 30},  # escapes the folder
        {"id": 4, "file_name": "missing.jpg", "width": 40, "height": 30},
        {"id": 5, "file_name": "c.jpg", "width": 40, "height": 30},
    ]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [30, 20, 20, 20]},  # past the border: clipped
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},  # no width: degenerate
        {"id": 3, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]},  # unknown category
        {"id": 4, "image_id": 5, "category_id": 2, "segmentation": [[30, 20, 50, 20, 50, 40, 30, 40]]},
        {"id": 5, "image_id": 5, "category_id": 2, "segmentation": [[1, 1, 5, 5]]},  # two points
        {"id": 6, "image_id": 77, "category_id": 1, "bbox": [1, 1, 5, 5]},  # unknown image
    ]
    path = coco(root, images, annotations)
    repo = tmp_path / "repo"
    assert convert("coco", path, "--output-dir", repo, "--config", "plant_det", "--label-set", "present") == 0
    report = report_of(repo, "plant_det")
    assert report["counts"] == {
        "box_clipped": 1,
        "degenerate_box": 2,  # the zero-width box, and the two-point polygon that leaves no shape
        "degenerate_polygon": 1,
        "malformed_annotation": 1,
        "missing_file": 1,
        "polygon_clipped": 1,
        "size_mismatch": 1,
        "unknown_category": 1,
        "unsafe_path": 1,
    }
    data = {
        r["image_id"]: r for r in datasets.load_dataset(str(repo), "plant_det", split="train", streaming=True)
    }
    assert sorted(data) == ["train/a", "train/c"]
    assert data["train/a"]["objects"]["bbox"] == [[30.0, 20.0, 10.0, 10.0]]
    assert data["train/c"]["objects"]["bbox"] == [[30.0, 20.0, 10.0, 10.0]]  # polygon clipped to the image
    assert convert("coco", path, "--output-dir", repo, "--config", "plant_seg", "--label-set", "present") == 0
    seg = {
        r["image_id"]: r for r in datasets.load_dataset(str(repo), "plant_seg", split="train", streaming=True)
    }
    mask = np.asarray(seg["train/c"]["mask"])
    assert (mask[20:30, 30:40] == 2).all() and int((mask > 0).sum()) == 100
    assert report_of(repo, "plant_seg")["counts"]["no_segmentation"] == 2  # the box-only annotations of a.jpg


def test_duplicates_across_splits_are_dropped_from_the_later_split(tmp_path: Path) -> None:
    test_dir, train_dir = tmp_path / "test", tmp_path / "train"
    shared = noise(seed=42)
    write(test_dir / "dent" / "x.png", shared)
    write(train_dir / "dent" / "copy_of_x.png", shared)
    write(train_dir / "dent" / "y.png", noise(seed=43))
    write(train_dir / "dent" / "y_again.png", noise(seed=43))  # duplicate inside the split too
    repo = tmp_path / "repo"
    assert convert("folders", test_dir, "--output-dir", repo, "--config", "plant_cls", "--split", "test") == 0
    assert convert("folders", train_dir, "--output-dir", repo, "--config", "plant_cls") == 0
    report = report_of(repo, "plant_cls")
    assert report["counts"] == {"duplicate_image": 2}
    details = sorted(i["detail"] for i in report["issues"])
    assert details == ["same bytes as test:test/dent/x", "same bytes as train:train/dent/y"]
    assert report["rows_written"] == 1


def test_every_sample_skipped_is_an_error(tmp_path: Path, capsys) -> None:
    root = tmp_path / "src"
    (root / "dent").mkdir(parents=True)
    (root / "dent" / "a.jpg").write_text("broken")
    assert convert("folders", root, "--output-dir", tmp_path / "repo", "--config", "plant_cls") == 1
    assert "no usable samples" in capsys.readouterr().err


def test_yolo_split_paths_may_not_leave_the_dataset(tmp_path: Path, capsys) -> None:
    root = tmp_path / "yolo"
    root.mkdir()
    (root / "data.yaml").write_text("names: [dent]\ntrain: ../elsewhere\n")
    assert convert("yolo", root, "--output-dir", tmp_path / "repo", "--config", "plant_det") == 1
    assert "leaves the dataset folder" in capsys.readouterr().err
