"""Readers that turn the formats users already have into :class:`~dataset_scripts.conversion.SourceData`.

- ``coco``: a COCO instances JSON plus its image folder (boxes, polygons, RLE) -> det or seg configs
- ``yolo``: Ultralytics ``images/`` + ``labels/`` with ``data.yaml`` or ``classes.txt`` -> det or seg
- ``folders``: ``<root>/<class>/*`` class-per-folder trees -> cls
- ``masks``: ``images/`` + ``masks/`` with matching names and a class list -> seg
- ``mvtec``, ``magnetic_tile``, ``ad_folders``: anomaly-detection sources -> ad (see :mod:`.anomaly`)
"""

from .anomaly import read_ad_folders, read_magnetic_tile, read_mvtec
from .coco import read_coco
from .folders import read_folders
from .masks import read_masks
from .yolo import read_yolo

FORMAT_TASKS = {
    "coco": ("det", "seg"),
    "yolo": ("det", "seg"),
    "folders": ("cls",),
    "masks": ("seg",),
    "mvtec": ("ad",),
    "magnetic_tile": ("ad",),
    "ad_folders": ("ad",),
}
AD_FORMATS = tuple(f for f, kinds in FORMAT_TASKS.items() if kinds == ("ad",))

__all__ = [
    "AD_FORMATS",
    "FORMAT_TASKS",
    "read_ad_folders",
    "read_coco",
    "read_folders",
    "read_magnetic_tile",
    "read_masks",
    "read_mvtec",
    "read_yolo",
]
