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

Each kind is declared once, as a :class:`ConfigSchema` in :data:`CONFIG_SCHEMAS` (its columns and features, where
its ``ClassLabel`` sits, the label-list rules, its classes for defect-free images and unlabelled pixels, how
labelled instances become its label columns, its Hub task categories); the builders, the card and the converters
ask it instead of branching on the kind. The trainer and the evaluator import :func:`task_of_config`,
:func:`features_for` and :func:`label_names`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from datasets import ClassLabel, Features, Image, List, Value

from .images import encode_png
from .raster import mask_values

Task = Literal["cls", "det", "seg"]
TASKS: tuple[Task, ...] = ("cls", "det", "seg")  # the model's tasks (heads)
ConfigKind = Literal["cls", "det", "seg", "ad"]
AD: ConfigKind = "ad"  # anomaly detection: a config kind, not a model task
CONFIG_KINDS: tuple[ConfigKind, ...] = (*TASKS, AD)
GOOD = "good"  # the defect_type of normal images in ad configs (anomalib / MVTec AD naming)
NORMAL = "normal"  # the class of defect-free images in cls configs (a taxonomy node)
BACKGROUND = "background"  # mask value 0 of seg configs (a taxonomy node)
SOURCES = ("real", "synthetic", "converted")
IGNORE_INDEX = 255
MAX_SEG_CLASSES = 255  # ids 0..254; 255 is the ignore value
HIERARCHY_COLUMNS = ("domain", "system", "part")
COMMON_COLUMNS = ("image", "image_id", "width", "height", *HIERARCHY_COLUMNS, "source", "is_normal")


@dataclass(frozen=True)
class Instance:
    """One labelled object of an image: its class id, COCO xywh box and area in pixels, and its (H, W) bool mask."""

    class_id: int
    bbox: Sequence[float]
    area: float
    mask: np.ndarray


@dataclass(frozen=True)
class ConfigSchema:
    """What the rows of one config kind hold beyond :data:`COMMON_COLUMNS`.

    Attributes:
        kind: the config name suffix.
        columns: its own columns.
        class_label: where its ``ClassLabel`` sits in the features (a column, then a sub-field).
        label_features: label names -> the features of ``columns``.
        check_names: the kind's own rules on a label list (raises ``ValueError``), beyond non-empty and unique.
        normal_class: the class of a defect-free image, if the kind labels images (cls, ad).
        background: the class of unlabelled pixels, if the kind labels pixels with classes (seg).
        one_label_per_image: an image holds one class (cls, ad), not a list of instances.
        instance_columns: ``(instances, (H, W), class id of an image without instances, object ids)`` -> the
            label columns of an image whose labelled objects are ``instances`` (the demo and synthetic builders).
        hub_categories: the Hub ``task_categories`` a config of the kind adds to the dataset card.
        counted: what the dataset card's class counts count.
    """

    kind: ConfigKind
    columns: tuple[str, ...]
    class_label: tuple[str, ...]
    label_features: Callable[[list[str]], dict[str, Any]]
    check_names: Callable[[list[str]], None]
    normal_class: str | None
    background: str | None
    one_label_per_image: bool
    instance_columns: Callable[
        [Sequence[Instance], tuple[int, int], int | None, Sequence[int]], dict[str, Any]
    ]
    hub_categories: tuple[str, ...]
    counted: str

    @property
    def leading_classes(self) -> tuple[str, ...]:
        """The classes a label list of the kind starts with (``normal`` for cls, ``background`` for seg...)."""
        return tuple(name for name in (self.normal_class, self.background) if name is not None)


def _no_rule(names: list[str]) -> None:
    return None


def _check_seg_names(names: list[str]) -> None:
    if names[0] != BACKGROUND:
        raise ValueError(f"seg: the first label must be 'background' (mask value 0), got {names[0]!r}")
    if len(names) > MAX_SEG_CLASSES:
        raise ValueError(
            f"seg: {len(names)} classes do not fit a mask PNG whose value 255 means ignore "
            f"(at most {MAX_SEG_CLASSES} including background)"
        )


def _check_ad_names(names: list[str]) -> None:
    if names[0] != GOOD:
        raise ValueError(f"ad: the first defect type must be {GOOD!r} (the normal images), got {names[0]!r}")


def _class_columns(
    instances: Sequence[Instance], shape: tuple[int, int], empty_class: int | None, ids: Sequence[int]
) -> dict[str, Any]:
    """cls: the first instance's class, or the class of a defect-free image."""
    return {"label": instances[0].class_id if instances else empty_class}


def _object_columns(
    instances: Sequence[Instance], shape: tuple[int, int], empty_class: int | None, ids: Sequence[int]
) -> dict[str, Any]:
    """det: one box, class, area and id per instance."""
    return {
        "objects": {
            "bbox": [list(instance.bbox) for instance in instances],
            "category": [instance.class_id for instance in instances],
            "area": [float(instance.area) for instance in instances],
            "id": list(ids),
        }
    }


def _mask_columns(
    instances: Sequence[Instance], shape: tuple[int, int], empty_class: int | None, ids: Sequence[int]
) -> dict[str, Any]:
    """seg: the class-id mask PNG (later instances painted over earlier ones) and the ids present in it."""
    mask = np.zeros(shape, np.uint8)
    for instance in instances:
        mask[instance.mask] = instance.class_id
    return {"mask": {"bytes": encode_png(mask), "path": None}, "mask_classes": mask_values(mask)}


def _anomaly_columns(
    instances: Sequence[Instance], shape: tuple[int, int], empty_class: int | None, ids: Sequence[int]
) -> dict[str, Any]:
    """ad: the binary mask PNG (1 anomalous) and the first instance's defect type, or ``good``'s."""
    mask = np.zeros(shape, np.uint8)
    for instance in instances:
        mask[instance.mask] = 1
    return {
        "mask": {"bytes": encode_png(mask), "path": None},
        "defect_type": instances[0].class_id if instances else empty_class,
    }


CONFIG_SCHEMAS: dict[ConfigKind, ConfigSchema] = {
    schema.kind: schema
    for schema in (
        ConfigSchema(
            kind="cls",
            columns=("label",),
            class_label=("label",),
            label_features=lambda names: {"label": ClassLabel(names=names)},
            check_names=_no_rule,
            normal_class=NORMAL,
            background=None,
            one_label_per_image=True,
            instance_columns=_class_columns,
            hub_categories=("image-classification",),
            counted="images",
        ),
        ConfigSchema(
            kind="det",
            columns=("objects",),
            class_label=("objects", "category"),
            label_features=lambda names: {
                "objects": {
                    "bbox": List(List(Value("float32"), length=4)),
                    "category": List(ClassLabel(names=names)),
                    "area": List(Value("float32")),
                    "id": List(Value("int64")),
                }
            },
            check_names=_no_rule,
            normal_class=None,
            background=None,
            one_label_per_image=False,
            instance_columns=_object_columns,
            hub_categories=("object-detection",),
            counted="objects",
        ),
        ConfigSchema(
            kind="seg",
            columns=("mask", "mask_classes"),
            class_label=("mask_classes",),
            label_features=lambda names: {"mask": Image(), "mask_classes": List(ClassLabel(names=names))},
            check_names=_check_seg_names,
            normal_class=None,
            background=BACKGROUND,
            one_label_per_image=False,
            instance_columns=_mask_columns,
            hub_categories=("image-segmentation",),
            counted="images containing the class",
        ),
        ConfigSchema(
            kind=AD,
            columns=("mask", "defect_type"),
            class_label=("defect_type",),
            label_features=lambda names: {"mask": Image(), "defect_type": ClassLabel(names=names)},
            check_names=_check_ad_names,
            normal_class=GOOD,
            background=None,
            one_label_per_image=True,
            instance_columns=_anomaly_columns,
            # image-level and pixel-level anomaly detection
            hub_categories=("image-classification", "image-segmentation"),
            counted="images",
        ),
    )
}
TASK_COLUMNS: dict[Task, tuple[str, ...]] = {task: CONFIG_SCHEMAS[task].columns for task in TASKS}
KIND_COLUMNS: dict[ConfigKind, tuple[str, ...]] = {
    kind: CONFIG_SCHEMAS[kind].columns for kind in CONFIG_KINDS
}


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
    CONFIG_SCHEMAS[task].check_names(names)
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
    return Features({**common_features(), **CONFIG_SCHEMAS[task].label_features(names)})


def label_names(features: Features, task: ConfigKind) -> list[str]:
    """The class names of a loaded config's features (for seg: ``mask_classes``, background first; for
    ad: ``defect_type``, ``good`` first)."""
    if task not in CONFIG_SCHEMAS:
        raise ValueError(f"unknown task {task!r}; expected a config kind in {CONFIG_KINDS}")
    schema = CONFIG_SCHEMAS[task]
    try:
        feature = features
        for key in schema.class_label:
            feature = feature[key]
        if not schema.one_label_per_image:  # a list of class ids per image: its element type
            feature = feature.feature
    except (KeyError, AttributeError, TypeError):
        expected = ".".join(schema.class_label)
        raise ValueError(
            f"these features have no {expected} ClassLabel, so they are not a {task} config: {features}"
        ) from None
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"{task}: expected a ClassLabel, got {feature!r}")
    return list(feature.names)
