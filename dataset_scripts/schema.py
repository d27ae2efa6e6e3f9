"""The column schema shared by every CAD 100K / public-benchmark config.

A config's task is its name suffix (``*_cls``, ``*_det``, ``*_seg``). Every config has the common columns
``image, image_id, width, height, domain, system, part, source, is_normal``; then

* cls: ``label`` = ``ClassLabel`` (``normal`` first for CAD configs),
* det: ``objects`` = {``bbox`` COCO xywh in pixels, ``category`` ClassLabel, ``area``, ``id``},
* seg: ``mask`` = single-channel PNG (pixel = class id, 0 background, 255 ignore) and ``mask_classes`` =
  the ids present in the mask, whose ``ClassLabel`` carries the segmentation label names.

The trainer and the evaluator import :func:`task_of_config`, :func:`features_for` and :func:`label_names`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from datasets import ClassLabel, Features, Image, List, Value

Task = Literal["cls", "det", "seg"]
TASKS: tuple[Task, ...] = ("cls", "det", "seg")
SOURCES = ("real", "synthetic", "converted")
IGNORE_INDEX = 255
MAX_SEG_CLASSES = 255  # ids 0..254; 255 is the ignore value
HIERARCHY_COLUMNS = ("domain", "system", "part")
COMMON_COLUMNS = ("image", "image_id", "width", "height", *HIERARCHY_COLUMNS, "source", "is_normal")
TASK_COLUMNS: dict[Task, tuple[str, ...]] = {
    "cls": ("label",),
    "det": ("objects",),
    "seg": ("mask", "mask_classes"),
}


def task_of_config(name: str) -> Task:
    """``"cls"``, ``"det"`` or ``"seg"`` from a config name such as ``exterior_seg``."""
    if isinstance(name, str) and "_" in name:
        suffix = name.rsplit("_", 1)[1]
        if suffix in TASKS:
            return suffix  # type: ignore[return-value]
    raise ValueError(
        f"config name {name!r} does not end in _cls, _det or _seg, so its task is unknown "
        "(name configs <something>_<task>, e.g. exterior_seg or parts_cls)"
    )


def check_label_names(task: Task, names: Sequence[str]) -> list[str]:
    """Validate a label list for ``task`` and return it as a list (clear ``ValueError`` otherwise)."""
    names = list(names)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not names:
        raise ValueError(f"{task}: the label list is empty")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{task}: label names are repeated: {duplicates}")
    if task == "seg":
        if names[0] != "background":
            raise ValueError(f"seg: the first label must be 'background' (mask value 0), got {names[0]!r}")
        if len(names) > MAX_SEG_CLASSES:
            raise ValueError(
                f"seg: {len(names)} classes do not fit a mask PNG whose value 255 means ignore "
                f"(at most {MAX_SEG_CLASSES} including background)"
            )
    return names


def common_features() -> dict:
    return {
        "image": Image(),
        "image_id": Value("string"),
        "width": Value("int32"),
        "height": Value("int32"),
        "domain": Value("string"),
        "system": Value("string"),
        "part": Value("string"),
        "source": Value("string"),
        "is_normal": Value("bool"),
    }


def features_for(task: Task, label_names: Sequence[str]) -> Features:
    """The ``datasets.Features`` of a config of ``task`` whose classes are ``label_names`` (in id order)."""
    names = check_label_names(task, label_names)
    features = common_features()
    if task == "cls":
        features["label"] = ClassLabel(names=names)
    elif task == "det":
        features["objects"] = {
            "bbox": List(List(Value("float32"), length=4)),
            "category": List(ClassLabel(names=names)),
            "area": List(Value("float32")),
            "id": List(Value("int64")),
        }
    else:
        features["mask"] = Image()
        features["mask_classes"] = List(ClassLabel(names=names))
    return Features(features)


def label_names(features: Features, task: Task) -> list[str]:
    """The class names of a loaded config's features (for seg: ``mask_classes``, background first)."""
    try:
        if task == "cls":
            feature = features["label"]
        elif task == "det":
            feature = features["objects"]["category"].feature
        elif task == "seg":
            feature = features["mask_classes"].feature
        else:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    except (KeyError, AttributeError, TypeError):
        expected = {"cls": "label", "det": "objects.category", "seg": "mask_classes"}[task]
        raise ValueError(
            f"these features have no {expected} ClassLabel, so they are not a {task} config: {features}"
        ) from None
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"{task}: expected a ClassLabel, got {feature!r}")
    return list(feature.names)
