"""COCO, YOLO, class-folder and mask-folder converters on small sources built in the test."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from dataset_scripts.convert import main as convert_main
from dataset_scripts.schema import label_names
from dataset_scripts.taxonomy import load_taxonomy


def save_image(path: Path, size: tuple[int, int] = (64, 48), value: int = 90, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = (rng.integers(0, 40, (size[1], size[0], 3)) + value).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def rows(repo: Path, config: str, split: str = "train") -> dict[str, dict]:
    dataset = datasets.load_dataset(str(repo), config, split=split, streaming=True)
    return {row["image_id"]: row for row in dataset}


def run(*args: str) -> int:
    return convert_main([*map(str, args), "--no-progress"])


@pytest.fixture
def coco_source(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    save_image(root / "images" / "a.jpg")
    save_image(root / "images" / "b.jpg", value=140)
    save_image(root / "images" / "sub" / "c.png", value=30)
    scratch_mask = np.zeros((48, 64), np.uint8, order="F")
    scratch_mask[30:34, 40:60] = 1
    rle = mask_utils.encode(scratch_mask)
    rle["counts"] = rle["counts"].decode()
    crowd = np.zeros((48, 64), np.uint8, order="F")
    crowd[0:10, 0:64] = 1
    crowd_rle = mask_utils.encode(crowd)
    crowd_rle["counts"] = crowd_rle["counts"].decode()
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48, "extra": "ignored"},
            {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
            {"id": 5, "file_name": "sub/c.png", "width": 64, "height": 48},
        ],
        "categories": [
            {"id": 1, "name": "_background_"},
            {"id": 3, "name": "damage"},
            {"id": 7, "name": "Scratch"},
        ],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 3,
                "bbox": [10, 10, 20, 20],
                "iscrowd": False,
                "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]],
                "area": 400,
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 7,
                "bbox": [40, 30, 20, 4],
                "iscrowd": 0,
                "segmentation": rle,
            },
            {
                "id": 12,
                "image_id": 5,
                "category_id": 3,
                "bbox": [0, 0, 64, 10],
                "iscrowd": True,
                "segmentation": crowd_rle,
            },
            {
                "id": 13,
                "image_id": 5,
                "category_id": 3,
                "bbox": [20, 20, 10, 10],
                "iscrowd": False,
                "segmentation": [[20, 20, 30, 20, 30, 30, 20, 30]],
            },
        ],
    }
    (root / "images" / "annotations.json").write_text(json.dumps(data))
    (root / "mapping.yaml").write_text("labels:\n  damage: dent\n  _background_: null\n")
    return root


def test_coco_to_detection(coco_source: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    json_path = coco_source / "images" / "annotations.json"
    assert (
        run(
            "coco",
            json_path,
            "--output-dir",
            repo,
            "--config",
            "exterior_det",
            "--mapping",
            coco_source / "mapping.yaml",
        )
        == 0
    )
    names = load_taxonomy().label_names("exterior_det")
    data = rows(repo, "exterior_det")
    assert sorted(data) == ["train/a", "train/b", "train/sub/c"]
    a = data["train/a"]["objects"]
    assert a["bbox"] == [[10.0, 10.0, 20.0, 20.0], [40.0, 30.0, 20.0, 4.0]]
    assert [names[c] for c in a["category"]] == ["dent", "scratch"]
    assert a["id"] == [10, 11] and a["area"] == [400.0, 80.0]  # areas of the rasterised shapes
    assert data["train/b"]["is_normal"] and data["train/b"]["objects"]["bbox"] == []
    assert data["train/sub/c"]["objects"]["bbox"] == [
        [20.0, 20.0, 10.0, 10.0]
    ]  # the crowd region is no target
    assert data["train/a"]["domain"] == "exterior" and data["train/a"]["source"] == "converted"
    report = json.loads((repo / "reports" / "exterior_det" / "train.json").read_text())
    assert report["counts"] == {"crowd_ignored": 1} and report["rows_written"] == 3


def test_coco_to_segmentation_with_present_labels(coco_source: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    json_path = coco_source / "images" / "annotations.json"
    args = [
        "coco",
        json_path,
        "--output-dir",
        repo,
        "--config",
        "plant_seg",
        "--mapping",
        coco_source / "mapping.yaml",
    ]
    assert run(*args, "--label-set", "present", "--split", "validation") == 0
    dataset = datasets.load_dataset(str(repo), "plant_seg", split="validation", streaming=True)
    assert label_names(dataset.features, "seg") == ["background", "dent", "scratch"]
    data = {row["image_id"]: row for row in dataset}
    mask = np.asarray(data["validation/a"]["mask"])
    assert (mask[10:30, 10:30] == 1).all() and (mask[30:34, 40:60] == 2).all()
    assert int((mask > 0).sum()) == 400 + 80
    assert data["validation/a"]["mask_classes"] == [0, 1, 2]
    crowd = np.asarray(data["validation/sub/c"]["mask"])
    assert (crowd[0:10] == 255).all() and (crowd[20:30, 20:30] == 1).all()
    assert data["validation/sub/c"]["mask_classes"] == [0, 1]
    assert data["validation/b"]["is_normal"] and data["validation/b"]["mask_classes"] == [0]


def test_unmapped_labels_are_an_error_listing_them_or_counted_drops(
    coco_source: Path, tmp_path: Path, capsys
) -> None:
    repo = tmp_path / "repo"
    json_path = coco_source / "images" / "annotations.json"
    strict_map = tmp_path / "partial.yaml"
    strict_map.write_text("_background_: null\nScratch: scratch\n")  # "damage" is not a node and not mapped
    assert (
        run("coco", json_path, "--output-dir", repo, "--config", "exterior_det", "--mapping", strict_map) == 1
    )
    assert "source labels without a taxonomy node: ['damage']" in capsys.readouterr().err
    assert not (repo / "exterior_det").exists() or not list((repo / "exterior_det").glob("*.parquet"))
    assert (
        run(
            "coco",
            json_path,
            "--output-dir",
            repo,
            "--config",
            "exterior_det",
            "--mapping",
            strict_map,
            "--drop-unmapped",
        )
        == 0
    )
    report = json.loads((repo / "reports" / "exterior_det" / "train.json").read_text())
    assert report["counts"] == {"unmapped_label": 3}  # the crowd annotation is dropped for its label first
    assert rows(repo, "exterior_det")["train/a"]["objects"]["bbox"] == [[40.0, 30.0, 20.0, 4.0]]


def test_labels_outside_the_cad_domain_are_rejected(coco_source: Path, tmp_path: Path, capsys) -> None:
    mapping = tmp_path / "wrong.yaml"
    mapping.write_text("damage: brake_pad_worn\nScratch: scratch\n_background_: null\n")
    json_path = coco_source / "images" / "annotations.json"
    assert (
        run(
            "coco",
            json_path,
            "--output-dir",
            tmp_path / "r",
            "--config",
            "exterior_det",
            "--mapping",
            mapping,
        )
        == 1
    )
    assert "['brake_pad_worn'] are not classes of domain 'exterior'" in capsys.readouterr().err


def test_yolo_boxes_and_segments(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    root.mkdir()
    (root / "data.yaml").write_text(
        "names:\n  0: damage\n  1: scratch\ntrain: images/train\nval: images/val\n"
    )
    save_image(root / "images" / "train" / "x.jpg", size=(100, 50))
    save_image(root / "images" / "train" / "y.PNG", size=(100, 50))
    save_image(root / "images" / "val" / "z.jpg", size=(100, 50))
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "x.txt").write_text(
        "0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n1 0.9 0.9 0.4 0.4\nnot a line\n5 0.5 0.5 0.1 0.1\n"
    )
    mapping = tmp_path / "map.yaml"
    mapping.write_text("damage: dent\n")
    repo = tmp_path / "repo"
    assert run("yolo", root, "--output-dir", repo, "--config", "plant_det", "--mapping", mapping) == 0
    data = rows(repo, "plant_det")
    assert sorted(data) == ["train/images/train/x", "train/images/train/y"]
    boxes = data["train/images/train/x"]["objects"]["bbox"]
    assert boxes[0] == pytest.approx([40.0, 15.0, 20.0, 20.0])
    assert boxes[1] == pytest.approx([10.0, 5.0, 20.0, 10.0])  # from the segment's points
    assert boxes[2] == pytest.approx([70.0, 35.0, 30.0, 15.0])  # clipped at the image border
    assert data["train/images/train/y"]["is_normal"]
    report = json.loads((repo / "reports" / "plant_det" / "train.json").read_text())
    assert report["counts"] == {"box_clipped": 1, "malformed_annotation": 1, "unknown_category": 1}
    assert run("yolo", root, "--output-dir", repo, "--config", "plant_seg", "--mapping", mapping) == 0
    mask = np.asarray(rows(repo, "plant_seg")["train/images/train/x"]["mask"])
    assert (mask[6:14, 11:29] == 2).all() and (mask[16:34, 41:59] == 0).all()  # boxes are not drawn in masks
    report = json.loads((repo / "reports" / "plant_seg" / "train.json").read_text())
    assert report["counts"]["no_segmentation"] == 2
    assert (
        run(
            "yolo",
            root,
            "--output-dir",
            repo,
            "--config",
            "plant_det",
            "--mapping",
            mapping,
            "--split",
            "validation",
        )
        == 0
    )
    assert list(rows(repo, "plant_det", "validation")) == ["validation/images/val/z"]


def test_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "folders"
    save_image(root / "normal" / "n1.jpg")
    save_image(root / "brake_pad_worn" / "deep" / "w1.JPG", value=20)
    save_image(root / "Brake Rotor Rust" / "r1.png", value=160)
    (root / "brake_pad_worn" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    save_image(root / "stray.jpg")
    repo = tmp_path / "repo"
    assert run("folders", root, "--output-dir", repo, "--config", "chassis_cls", "--source-kind", "real") == 0
    data = rows(repo, "chassis_cls")
    names = load_taxonomy().label_names("chassis_cls")
    assert {k: names[v["label"]] for k, v in data.items()} == {
        "train/normal/n1": "normal",
        "train/brake_pad_worn/deep/w1": "brake_pad_worn",
        "train/Brake Rotor Rust/r1": "brake_rotor_rust",
    }
    worn = data["train/brake_pad_worn/deep/w1"]
    assert (worn["domain"], worn["system"], worn["part"], worn["source"]) == (
        "chassis",
        "brakes",
        "brake_pad",
        "real",
    )
    assert data["train/normal/n1"]["is_normal"] and (
        data["train/normal/n1"]["system"],
        data["train/normal/n1"]["part"],
    ) == ("", "")
    report = json.loads((repo / "reports" / "chassis_cls" / "train.json").read_text())
    assert report["counts"] == {"not_an_image": 1, "unlabelled_image": 1}


def test_mask_folders(tmp_path: Path) -> None:
    root = tmp_path / "masks"
    save_image(root / "images" / "a.jpg", size=(32, 24))
    save_image(root / "images" / "b.jpg", size=(32, 24))
    mask = np.zeros((24, 32), np.uint8)
    mask[2:6, 2:6] = 1
    mask[10:14, 10:14] = 2
    mask[20:22, 0:4] = 7  # not in the class list
    mask[0, 31] = 255
    (root / "masks").mkdir()
    Image.fromarray(mask, mode="L").save(root / "masks" / "a.png")
    Image.fromarray(mask, mode="L").save(root / "masks" / "orphan.png")
    (root / "classes.txt").write_text("background\ndamage\nscratch\n")
    mapping = tmp_path / "map.yaml"
    mapping.write_text("damage: dent\n")
    repo = tmp_path / "repo"
    assert run("masks", root, "--output-dir", repo, "--config", "exterior_seg", "--mapping", mapping) == 0
    data = rows(repo, "exterior_seg")
    names = load_taxonomy().label_names("exterior_seg")
    stored = np.asarray(data["train/images/a"]["mask"])
    assert (stored[2:6, 2:6] == names.index("dent")).all() and (
        stored[10:14, 10:14] == names.index("scratch")
    ).all()
    assert (stored[20:22, 0:4] == 255).all() and stored[0, 31] == 255
    assert data["train/images/a"]["mask_classes"] == sorted([0, names.index("dent"), names.index("scratch")])
    report = json.loads((repo / "reports" / "exterior_seg" / "train.json").read_text())
    assert report["counts"] == {"mask_unknown_value": 1, "missing_file": 1, "missing_mask": 1}


def test_format_and_task_must_fit(tmp_path: Path, capsys) -> None:
    root = tmp_path / "folders"
    save_image(root / "normal" / "n1.jpg")
    assert run("folders", root, "--output-dir", tmp_path / "repo", "--config", "exterior_det") == 1
    assert "folders sources make cls configs, not 'exterior_det'" in capsys.readouterr().err
    assert (
        run("coco", tmp_path / "missing.json", "--output-dir", tmp_path / "repo", "--config", "exterior_det")
        == 1
    )
    assert "missing.json: COCO annotation file not found" in capsys.readouterr().err


def test_adding_a_split_reuses_and_extends_the_class_list(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    save_image(first / "dent" / "a.jpg")
    save_image(first / "scratch" / "b.jpg", value=150)
    save_image(second / "crack" / "c.jpg", value=10)
    save_image(second / "dent" / "d.jpg", value=200)
    repo = tmp_path / "repo"
    assert run("folders", first, "--output-dir", repo, "--config", "plant_cls") == 0
    assert run("folders", second, "--output-dir", repo, "--config", "plant_cls", "--split", "validation") == 0
    for split in ("train", "validation"):
        features = datasets.load_dataset(str(repo), "plant_cls", split=split, streaming=True).features
        assert label_names(features, "cls") == ["dent", "scratch", "crack"]  # crack appended: old ids kept
    assert {r["image_id"]: r["label"] for r in rows(repo, "plant_cls", "validation").values()} == {
        "validation/crack/c": 2,
        "validation/dent/d": 0,
    }
