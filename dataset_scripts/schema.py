"""The column schema shared by every CAD 100K / public-benchmark config.

A config's kind is its name suffix (``*_cls``, ``*_det``, ``*_seg``, ``*_ad``). The first three are the
model's tasks (:data:`TASKS`); ``ad`` (anomaly detection: normal-only training data, image- and pixel-level
evaluation) is a config kind but not a model task, so code that loops over model tasks keeps using
:data:`TASKS` and :data:`CONFIG_KINDS` is the one list of suffixes. Every config has the common columns
``image, image_id, width, height, domain, system, part, source, is_normal``; then

* cls: ``label`` = ``ClassLabel`` (``normal`` first for CAD configs),
* det: ``objects`` = {``bbox`` COCO xywh in pixels, ``category`` ClassLabel, ``area``, ``id``},
* seg: ``mask`` = single-channel PNG (pixel = class id, 0 background, 255 ignore) and ``mask_classes`` =
  the ids present in the mask, whose ``ClassLabel`` carries the segmentation label names.
* ad: ``mask`` = single-channel PNG at the image's size (0 normal pixel, 1 anomalous, 255 ignore; all 0 for
  normal images, all 255 for anomalous images of sources without masks) and ``defect_type`` =
  ``ClassLabel`` whose first name is ``good`` (the normal images). Train splits hold normal images only.

The trainer and the evaluator import :func:`task_of_config`, :func:`features_for` and :func:`label_names`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from datasets import ClassLabel, Features, Image, List, Value

Task = Literal["cls", "det", "seg"]
TASKS: tuple[Task, ...] = ("cls", "det", "seg")  # the model's tasks (heads)
ConfigKind = Literal["cls", "det", "seg", "ad"]
AD: ConfigKind = "ad"  # anomaly detection: a config kind, not a model task
CONFIG_KINDS: tuple[ConfigKind, ...] = (*TASKS, AD)
GOOD = "good"  # the defect_type of normal images in ad configs (anomalib / MVTec AD naming)
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
KIND_COLUMNS: dict[ConfigKind, tuple[str, ...]] = {**TASK_COLUMNS, AD: ("mask", "defect_type")}


def kind_of_config(name: str) -> ConfigKind:
    """``"cls"``, ``"det"``, ``"seg"`` or ``"ad"`` from a config name such as ``exterior_seg``."""
    if isinstance(name, str) and "_" in name:
        suffix = name.rsplit("_", 1)[1]
        if suffix in CONFIG_KINDS:
            return suffix  # type: ignore[return-value]
    raise ValueError(
        f"config name {name!r} does not end in _cls, _det or _seg (model tasks) or _ad (anomaly detection), "
        "so its kind is unknown (name configs <something>_<kind>, e.g. exterior_seg, parts_cls or tile_ad)"
    )


def task_of_config(name: str) -> ConfigKind:
    """The config's kind (see :func:`kind_of_config`). Only ``cls``, ``det`` and ``seg`` are model tasks:
    check ``task_of_config(name) in TASKS`` before treating a config as training data for a head."""
    return kind_of_config(name)


def check_label_names(task: ConfigKind, names: Sequence[str]) -> list[str]:
    """Validate a label list for ``task`` and return it as a list (clear ``ValueError`` otherwise)."""
    names = list(names)
    if task not in CONFIG_KINDS:
        raise ValueError(f"unknown task {task!r}; expected a config kind in {CONFIG_KINDS}")
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
    if task == AD and names[0] != GOOD:
        raise ValueError(f"ad: the first defect type must be {GOOD!r} (the normal images), got {names[0]!r}")
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


def features_for(task: ConfigKind, label_names: Sequence[str]) -> Features:
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
    elif task == "seg":
        features["mask"] = Image()
        features["mask_classes"] = List(ClassLabel(names=names))
    else:
        features["mask"] = Image()
        features["defect_type"] = ClassLabel(names=names)
    return Features(features)


def label_names(features: Features, task: ConfigKind) -> list[str]:
    """The class names of a loaded config's features (for seg: ``mask_classes``, background first; for
    ad: ``defect_type``, ``good`` first)."""
    try:
        if task == "cls":
            feature = features["label"]
        elif task == "det":
            feature = features["objects"]["category"].feature
        elif task == "seg":
            feature = features["mask_classes"].feature
        elif task == AD:
            feature = features["defect_type"]
        else:
            raise ValueError(f"unknown task {task!r}; expected a config kind in {CONFIG_KINDS}")
    except (KeyError, AttributeError, TypeError):
        expected = {"cls": "label", "det": "objects.category", "seg": "mask_classes", AD: "defect_type"}[task]
        raise ValueError(
            f"these features have no {expected} ClassLabel, so they are not a {task} config: {features}"
        ) from None
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"{task}: expected a ClassLabel, got {feature!r}")
    return list(feature.names)
