"""Readers that turn the formats users already have into :class:`~dataset_scripts.pipeline.SourceData`.

- ``coco``: a COCO instances JSON plus its image folder (boxes, polygons, RLE) -> det or seg configs
- ``yolo``: Ultralytics ``images/`` + ``labels/`` with ``data.yaml`` or ``classes.txt`` -> det or seg
- ``folders``: ``<root>/<class>/*`` class-per-folder trees -> cls
- ``masks``: ``images/`` + ``masks/`` with matching names and a class list -> seg
"""

from .coco import read_coco
from .folders import read_folders
from .masks import read_masks
from .yolo import read_yolo

FORMAT_TASKS = {"coco": ("det", "seg"), "yolo": ("det", "seg"), "folders": ("cls",), "masks": ("seg",)}

__all__ = ["FORMAT_TASKS", "read_coco", "read_folders", "read_masks", "read_yolo"]
