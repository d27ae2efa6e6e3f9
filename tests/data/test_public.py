"""The public benchmark repo and the converters on a subset of the real data in ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from dataset_scripts.convert import main as convert_main
from dataset_scripts.converters import read_coco
from dataset_scripts.make_public import CARS_AD_ANOMALIES, build_public, validation_fraction_of
from dataset_scripts.schema import label_names

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
MAPPINGS = Path(__file__).resolve().parents[2] / "dataset_scripts" / "mappings"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"the shared real data folder {DATA} is absent")


@pytest.fixture(scope="module")
def public(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("public")
    build_public(out, DATA, limit=6, show_progress=False)
    return out


def test_configs_splits_and_labels(public: Path) -> None:
    assert sorted(datasets.get_dataset_config_names(str(public))) == [
        "cars_ad",
        "parts_cls",
        "parts_det",
        "parts_seg",
    ]
    for config, classes in (("parts_cls", 50), ("parts_det", 18), ("parts_seg", 19)):
        dataset = datasets.load_dataset(str(public), config, split="test", streaming=True)
        names = label_names(dataset.features, config.rsplit("_", 1)[1])
        assert len(names) == classes
        assert sum(1 for _ in dataset) == 6
    seg_names = label_names(
        datasets.load_dataset(str(public), "parts_seg", split="train", streaming=True).features, "seg"
    )
    assert seg_names[0] == "background" and "_background_" not in seg_names and "wheel" in seg_names


def test_detection_boxes_equal_the_segmentation_extents(public: Path) -> None:
    det = {
        r["image_id"]: r
        for r in datasets.load_dataset(str(public), "parts_det", split="validation", streaming=True)
    }
    seg = {
        r["image_id"]: r
        for r in datasets.load_dataset(str(public), "parts_seg", split="validation", streaming=True)
    }
    assert det.keys() == seg.keys() and len(det) == 6
    det_names = label_names(
        datasets.load_dataset(str(public), "parts_det", split="validation", streaming=True).features, "det"
    )
    seg_names = label_names(
        datasets.load_dataset(str(public), "parts_seg", split="validation", streaming=True).features, "seg"
    )
    for image_id, row in det.items():
        mask = np.asarray(seg[image_id]["mask"])
        assert row["domain"] == "exterior" and row["part"] == "whole_vehicle" and row["source"] == "converted"
        for (x, y, w, h), category in zip(row["objects"]["bbox"], row["objects"]["category"]):
            class_id = seg_names.index(det_names[category])
            visible = mask[int(y) : int(y + h), int(x) : int(x + w)] == class_id
            # Painting order may hide part of a large part under a small one, never all of it.
            assert visible.any(), (image_id, det_names[category])


def test_train_validation_split_by_name_hash(public: Path) -> None:
    for split, expected in (("train", False), ("validation", True)):
        for row in datasets.load_dataset(str(public), "parts_det", split=split, streaming=True):
            name = row["image_id"].rsplit("/", 1)[1] + ".jpg"
            assert (validation_fraction_of(name) < 0.1) is expected
    card = (public / "README.md").read_text()
    assert "Pasupa et al." in card and "do not redistribute" in card


def test_cars_ad_normal_train_and_half_painted_evaluation_splits(public: Path) -> None:
    """cars_ad: train all normal; validation / test hold floor(6 / 2) = 3 photos painted with one synthetic
    defect whose exact mask covers what changed (nothing else in the photo differs), the rest untouched."""
    train = list(datasets.load_dataset(str(public), "cars_ad", split="train", streaming=True))
    assert len(train) == 6 and all(r["is_normal"] and not np.asarray(r["mask"]).any() for r in train)
    for split in ("validation", "test"):
        dataset = datasets.load_dataset(str(public), "cars_ad", split=split, streaming=True)
        names = label_names(dataset.features, "ad")
        assert names[0] == "good" and set(names[1:]) <= set(CARS_AD_ANOMALIES)
        rows = list(dataset)
        painted = [r for r in rows if not r["is_normal"]]
        assert len(rows) == 6 and len(painted) == 3
        for row in rows:
            folder, _, stem = row["image_id"].split("/")
            photo = np.asarray(Image.open(DATA / "carparts_dsmlr" / folder / "JPEGImages" / f"{stem}.jpg"))
            image, mask = np.asarray(row["image"].convert("RGB")), np.asarray(row["mask"])
            assert mask.shape == image.shape[:2] == photo.shape[:2]
            assert (row["domain"], row["part"]) == ("exterior", "whole_vehicle")
            changed = np.abs(image.astype(int) - photo.astype(int)).max(-1) > 0
            if row["is_normal"]:
                assert names[row["defect_type"]] == "good" and row["source"] == "converted"
                assert not mask.any() and not changed.any()
                continue
            assert names[row["defect_type"]] in CARS_AD_ANOMALIES and row["source"] == "synthetic"
            assert set(np.unique(mask)) == {0, 1} and (changed[mask == 1]).mean() > 0.5
            ys, xs = np.nonzero(mask)
            near = np.zeros_like(changed)  # soft defect edges (coverage < 0.5) may touch a few pixels more
            near[max(ys.min() - 16, 0) : ys.max() + 17, max(xs.min() - 16, 0) : xs.max() + 17] = True
            assert not (changed & ~near).any()
    report = json.loads((public / "reports" / "cars_ad" / "test.json").read_text())
    assert "one synthetic defect on the car" in report["source"]["description"]


def test_folder_converter_on_real_carparts50(tmp_path: Path) -> None:
    """carparts50/test holds 2 grayscale images among 250; both are converted and counted."""
    repo = tmp_path / "repo"
    args = [
        "folders",
        DATA / "carparts50" / "test",
        "--output-dir",
        repo,
        "--config",
        "parts_cls",
        "--split",
        "test",
    ]
    assert (
        convert_main([*map(str, args), "--mapping", str(MAPPINGS / "carparts50.yaml"), "--no-progress"]) == 0
    )
    report = json.loads((repo / "reports" / "parts_cls" / "test.json").read_text())
    assert report["rows_written"] == 250 and report["counts"] == {"converted_mode": 2}
    rows = list(datasets.load_dataset(str(repo), "parts_cls", split="test", streaming=True))
    assert all(r["image"].mode == "RGB" for r in rows)
    names = label_names(
        datasets.load_dataset(str(repo), "parts_cls", split="test", streaming=True).features, "cls"
    )
    counts = {name: 0 for name in names}
    for row in rows:
        counts[names[row["label"]]] += 1
    assert set(counts.values()) == {5} and "carburetor" in counts
    alternator = next(r for r in rows if names[r["label"]] == "alternator")
    assert (alternator["domain"], alternator["system"], alternator["part"]) == (
        "electrical",
        "charging_starting",
        "alternator",
    )


def test_yolo_and_mask_converters_agree_with_coco_on_real_images(public: Path, tmp_path: Path) -> None:
    """The same real images exported as YOLO segments and as mask PNGs convert to the COCO-based masks."""
    coco = read_coco(DATA / "carparts_dsmlr" / "testset" / "annotations.json")
    seg = {
        r["image_id"]: r
        for r in datasets.load_dataset(str(public), "parts_seg", split="test", streaming=True)
    }
    names = label_names(
        datasets.load_dataset(str(public), "parts_seg", split="test", streaming=True).features, "seg"
    )
    yolo, masks = tmp_path / "yolo", tmp_path / "masks"
    (yolo / "labels" / "test").mkdir(parents=True)
    (yolo / "images" / "test").mkdir(parents=True)
    (masks / "images").mkdir(parents=True)
    (masks / "masks").mkdir(parents=True)
    (yolo / "classes.txt").write_text("\n".join(names[1:]) + "\n")
    (masks / "classes.txt").write_text("\n".join(names) + "\n")
    exported = []
    for sample in coco.samples:
        image_id = "test/" + sample.key.rsplit(".", 1)[0]
        if image_id not in seg:
            continue
        width, height = sample.expected_size
        name = sample.image_path.name
        lines = []
        for ann in sample.annotations:
            for polygon in ann.polygons or []:
                coords = [v / (width if i % 2 == 0 else height) for i, v in enumerate(polygon)]
                lines.append(" ".join([str(names.index(ann.label) - 1), *(f"{v:.6f}" for v in coords)]))
        (yolo / "labels" / "test" / name).with_suffix(".txt").write_text("\n".join(lines) + "\n")
        (yolo / "images" / "test" / name).write_bytes(sample.image_path.read_bytes())
        (masks / "images" / name).write_bytes(sample.image_path.read_bytes())
        seg[image_id]["mask"].save((masks / "masks" / name).with_suffix(".png"))
        exported.append((image_id, name.rsplit(".", 1)[0]))
    assert len(exported) == 6
    for fmt, source in (("yolo", yolo), ("masks", masks)):
        args = [
            fmt,
            source,
            "--output-dir",
            tmp_path / "repo",
            "--config",
            f"{fmt}_seg",
            "--split",
            "test",
            "--no-progress",
        ]
        assert convert_main([*map(str, args), "--label-set", "present"]) == 0
    yolo_rows = {
        r["image_id"].rsplit("/", 1)[1]: r
        for r in datasets.load_dataset(str(tmp_path / "repo"), "yolo_seg", split="test", streaming=True)
    }
    mask_rows = {
        r["image_id"].rsplit("/", 1)[1]: r
        for r in datasets.load_dataset(str(tmp_path / "repo"), "masks_seg", split="test", streaming=True)
    }
    yolo_names = label_names(
        datasets.load_dataset(str(tmp_path / "repo"), "yolo_seg", split="test", streaming=True).features,
        "seg",
    )
    for image_id, stem in exported:
        reference = np.asarray(seg[image_id]["mask"])
        assert np.array_equal(np.asarray(mask_rows[stem]["mask"]), reference)  # lossless round trip
        # Same polygons, rounded to 6 decimals of the image size: the masks agree up to edge pixels.
        from_yolo = np.asarray(yolo_rows[stem]["mask"])
        translated = np.array([names.index(n) for n in yolo_names], np.uint8)[from_yolo]
        assert (translated == reference).mean() > 0.995
