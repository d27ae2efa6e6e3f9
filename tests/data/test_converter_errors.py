"""Wrong input to the converters: values of the wrong type are one line naming the file, the id and the field;
`--strict` failures leave no data behind; the report counts every sample the source listed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_scripts.convert import main as convert_main


def convert(*args) -> int:
    return convert_main([*map(str, args), "--no-progress"])


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)


def _coco(root: Path, images: list[dict], annotations: list[dict]) -> Path:
    for entry in images:
        if entry.get("file_name") in ("a.png", "b.png"):
            _image(root / entry["file_name"], seed=entry["id"])
    path = root / "annotations.json"
    categories = [{"id": 1, "name": "dent"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    (root / "mapping.yaml").write_text("dent: dent\n")
    return path


def _last_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("width", "wide", r"annotations\.json: image 2: width 'wide' is not an integer"),
        ("height", [40], r"annotations\.json: image 2: height \[40\] is not an integer"),
        ("id", "two", r"annotations\.json: image 'b\.png': id 'two' is not an integer"),
        ("file_name", 7, r"annotations\.json: image 2: file_name 7 is not a string"),
    ],
)
def test_coco_image_values_of_the_wrong_type_are_one_line(tmp_path, capsys, field, value, message) -> None:
    images = [
        {"id": 1, "file_name": "a.png", "width": 48, "height": 40},
        {"id": 2, "file_name": "b.png", "width": 48, "height": 40},
    ]
    path = _coco(tmp_path / "src", images, [])
    images[1][field] = value
    coco = json.loads(path.read_text())
    coco["images"] = images
    path.write_text(json.dumps(coco))
    repo = tmp_path / "repo"
    assert (
        convert(
            "coco",
            path,
            "--output-dir",
            repo,
            "--config",
            "plant_det",
            "--mapping",
            path.parent / "mapping.yaml",
        )
        == 1
    )
    line = _last_error_line(capsys)
    assert line.startswith(f"error: {path}") and re.search(message, line)
    assert not (repo / "plant_det").exists()


def test_coco_annotation_values_of_the_wrong_type_are_dropped_with_id_and_field_named(
    tmp_path, capsys
) -> None:
    images = [{"id": 1, "file_name": "a.png", "width": 48, "height": 40}]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"id": 11, "image_id": "one", "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [2, "wide", 10, 10]},
        {
            "id": 13,
            "image_id": 1,
            "category_id": 1,
            "bbox": [2, 2, 5, 5],
            "segmentation": [[1, 1, "x", 2, 3, 3]],
        },
    ]
    path = _coco(tmp_path / "src", images, annotations)
    repo = tmp_path / "repo"
    assert (
        convert(
            "coco",
            path,
            "--output-dir",
            repo,
            "--config",
            "plant_det",
            "--mapping",
            path.parent / "mapping.yaml",
        )
        == 0
    )
    report = json.loads((repo / "reports" / "plant_det" / "train.json").read_text())
    details = {(i["item"], i["detail"]) for i in report["issues"] if i["kind"] == "malformed_annotation"}
    assert details == {
        ("annotation 11", "annotations.json: image_id 'one' is not an integer"),
        ("a.png", "annotation 12: bbox [2, 'wide', 10, 10] is not [x, y, w, h] numbers"),
        ("a.png", "annotation 13: segmentation holds values that are not numbers"),
    }
    assert report["rows_written"] == 1

    strict = tmp_path / "strict"
    assert (
        convert(
            "coco",
            path,
            "--output-dir",
            strict,
            "--config",
            "plant_det",
            "--mapping",
            path.parent / "mapping.yaml",
            "--strict",
        )
        == 1
    )
    assert "3 problem(s) (--strict: skips are errors); nothing was written" in capsys.readouterr().err
    assert not (strict / "plant_det").exists()


def test_a_failed_strict_conversion_leaves_no_config_folder(tmp_path, capsys) -> None:
    images = [
        {"id": 1, "file_name": "a.png", "width": 48, "height": 40},
        {"id": 2, "file_name": "missing.png", "width": 48, "height": 40},
    ]
    path = _coco(tmp_path / "src", images, [])
    repo = tmp_path / "repo"
    args = [
        "coco",
        path,
        "--output-dir",
        repo,
        "--config",
        "plant_det",
        "--mapping",
        path.parent / "mapping.yaml",
    ]
    assert convert(*args, "--strict") == 1
    assert "nothing was written" in capsys.readouterr().err
    # only the report that says why is left: no config folder, no shard, no staging file, no card
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        "reports", "reports/plant_det", "reports/plant_det/train.json", "reports/plant_det/train.md"
    ]  # fmt: skip
    assert convert(*args) == 0  # without --strict the missing file is a counted skip
    assert len(list((repo / "plant_det").glob("train-*.parquet"))) == 1


def test_a_failed_strict_anomaly_conversion_leaves_no_config_folder(tmp_path, capsys) -> None:
    source = tmp_path / "tile"
    for index in range(4):
        _image(source / "train" / "good" / f"{index}.png", index)
        _image(source / "test" / "good" / f"{index}.png", 10 + index)
    _image(source / "train" / "crack" / "0.png", 20)  # anomalous in train: a skip, so an error under --strict
    _image(source / "test" / "crack" / "0.png", 21)
    repo = tmp_path / "repo"
    assert convert("ad_folders", source, "--output-dir", repo, "--config", "tile_ad", "--strict") == 1
    assert "anomalous_in_train" in capsys.readouterr().err
    assert not (repo / "tile_ad").exists() and (repo / "reports" / "tile_ad").is_dir()


def test_samples_seen_counts_every_image_the_source_lists(tmp_path, capsys) -> None:
    images = [
        {"id": 1, "file_name": "a.png", "width": 48, "height": 40},
        {"id": 2, "file_name": "b.png", "width": 48, "height": 40},
        {"id": 3, "file_name": "gone.png", "width": 48, "height": 40},
    ]
    path = _coco(tmp_path / "src", images, [])
    repo = tmp_path / "repo"
    assert (
        convert(
            "coco",
            path,
            "--output-dir",
            repo,
            "--config",
            "plant_det",
            "--mapping",
            path.parent / "mapping.yaml",
        )
        == 0
    )
    assert "Samples seen: 3; rows written: 2." in capsys.readouterr().out
    report = json.loads((repo / "reports" / "plant_det" / "train.json").read_text())
    assert report["rows_seen"] == 3 == report["rows_written"] + report["counts"]["missing_file"]


@pytest.mark.parametrize(
    ("data_yaml", "message"),
    [
        ("names: {0: dent, one: scratch}\n", r"data\.yaml: names: class id 'one' is not an integer"),
        ("- dent\n- scratch\n", r"data\.yaml: expected a mapping"),
        ("names: [dent]\ntrain: 5\n", r"data\.yaml 'train' entry 5 is not a path"),
    ],
)
def test_yolo_config_values_of_the_wrong_type_are_one_line(tmp_path, capsys, data_yaml, message) -> None:
    root = tmp_path / "yolo"
    _image(root / "images" / "train" / "a.png")
    (root / "data.yaml").write_text(data_yaml)
    assert convert("yolo", root, "--output-dir", tmp_path / "repo", "--config", "plant_det") == 1
    line = _last_error_line(capsys)
    assert re.search(message, line), line


def test_yolo_label_values_of_the_wrong_type_name_the_file_line_and_field(tmp_path) -> None:
    root = tmp_path / "yolo"
    _image(root / "images" / "train" / "a.png")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.2\ndent 0.5 0.5 0.2 0.2\n0 0.5 wide 0.2 0.2\n"
    )
    (root / "data.yaml").write_text("names: [dent]\n")
    (root / "mapping.yaml").write_text("dent: dent\n")
    repo = tmp_path / "repo"
    assert (
        convert(
            "yolo", root, "--output-dir", repo, "--config", "plant_det", "--mapping", root / "mapping.yaml"
        )
        == 0
    )
    report = json.loads((repo / "reports" / "plant_det" / "train.json").read_text())
    assert [i["detail"] for i in report["issues"] if i["kind"] == "malformed_annotation"] == [
        "a.txt:2: class id 'dent' is not an integer",
        "a.txt:3: coordinate 'wide' is not a number",
    ]
