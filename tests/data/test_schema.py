"""Config-name tasks, features per task and reading label names back (what the trainer imports)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from datasets import ClassLabel, Features, Image, List, Value
from PIL import Image as PILImage

from dataset_scripts.schema import (
    COMMON_COLUMNS,
    CONFIG_KINDS,
    CONFIG_SCHEMAS,
    Instance,
    features_for,
    label_names,
    task_of_config,
)


@pytest.mark.parametrize(
    "name, task",
    [("exterior_seg", "seg"), ("ev_specific_cls", "cls"), ("parts_det", "det"), ("my_plant_cls", "cls")],
)
def test_task_of_config(name: str, task: str) -> None:
    assert task_of_config(name) == task


@pytest.mark.parametrize("name", ["exterior", "exterior_segmentation", "cls", "", "parts-det"])
def test_task_of_config_rejects_names_without_a_task_suffix(name: str) -> None:
    with pytest.raises(ValueError, match="does not end in _cls, _det or _seg"):
        task_of_config(name)


def test_features_per_task_and_label_names_round_trip() -> None:
    cls = features_for("cls", ["normal", "rust"])
    det = features_for("det", ["dent", "scratch"])
    seg = features_for("seg", ["background", "dent"])
    for features in (cls, det, seg):
        assert list(features)[: len(COMMON_COLUMNS)] == list(COMMON_COLUMNS)
        assert features["image"] == Image() and features["width"] == Value("int32")
        assert features["is_normal"] == Value("bool")
    assert cls["label"] == ClassLabel(names=["normal", "rust"])
    assert det["objects"]["bbox"] == List(List(Value("float32"), length=4))
    assert det["objects"]["category"] == List(ClassLabel(names=["dent", "scratch"]))
    assert seg["mask"] == Image() and seg["mask_classes"] == List(ClassLabel(names=["background", "dent"]))
    assert label_names(cls, "cls") == ["normal", "rust"]
    assert label_names(det, "det") == ["dent", "scratch"]
    assert label_names(seg, "seg") == ["background", "dent"]
    # Through the Arrow schema metadata, as load_dataset restores them from Parquet.
    assert label_names(Features.from_arrow_schema(det.arrow_schema), "det") == ["dent", "scratch"]


@pytest.mark.parametrize(
    "task, names, message",
    [
        ("seg", ["dent", "background"], "first label must be 'background'"),
        ("seg", ["background"] + [f"c{i}" for i in range(255)], "do not fit a mask PNG"),
        ("det", ["dent", "dent"], "repeated"),
        ("cls", [], "empty"),
        ("ocr", ["a"], "unknown task"),
    ],
)
def test_features_for_rejects_bad_label_lists(task: str, names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        features_for(task, names)


def test_label_names_of_the_wrong_task_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no mask_classes ClassLabel, so they are not a seg config"):
        label_names(features_for("cls", ["normal", "rust"]), "seg")


@pytest.mark.parametrize("kind", CONFIG_KINDS)
def test_instance_columns_of_every_kind_fit_its_features_and_read_back(kind: str) -> None:
    """Each `ConfigSchema` turns labelled instances into exactly its columns, in a form its features encode."""
    schema = CONFIG_SCHEMAS[kind]
    names = [*schema.leading_classes, "dent", "scratch"]
    features = features_for(kind, names)
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:5] = True
    first = len(schema.leading_classes)
    instances = [Instance(first + 1, (2.0, 1.0, 3.0, 2.0), 6.0, mask)]
    empty = 0 if schema.normal_class else None
    columns = schema.instance_columns(instances, (6, 8), empty, [7])
    assert tuple(columns) == schema.columns
    features.encode_example(dict.fromkeys(COMMON_COLUMNS) | {"image": None} | columns)
    labelled = {"cls": ("label", first + 1), "ad": ("defect_type", first + 1)}.get(kind)
    if labelled:
        assert columns[labelled[0]] == labelled[1]
        assert schema.instance_columns([], (6, 8), empty, [])[labelled[0]] == 0
    if "objects" in columns:
        assert columns["objects"] == {
            "bbox": [[2.0, 1.0, 3.0, 2.0]],
            "category": [first + 1],
            "area": [6.0],
            "id": [7],
        }
    if "mask" in columns:
        stored = np.array(PILImage.open(io.BytesIO(columns["mask"]["bytes"])))
        assert stored[mask].tolist() == [1 if kind == "ad" else first + 1] * 6 and not stored[~mask].any()
    if "mask_classes" in columns:
        assert columns["mask_classes"] == [0, first + 1]  # the background is present too
