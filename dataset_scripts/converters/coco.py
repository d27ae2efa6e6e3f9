"""COCO instances JSON (plus its image folder) -> :class:`SourceData` for det and seg configs.

A value of the wrong type is one line naming the file, the image or annotation id and the field: an image's ``id``,
``width`` or ``height`` that is not an integer (``"wide"``) stops the conversion; an annotation's ``image_id``,
``category_id``, ``bbox`` or polygon values that are not numbers drop that annotation (counted as
``malformed_annotation``, an error under ``--strict``).

Handled on the way in: category ids that are not contiguous or never used (``_background_`` with no
instances), ``iscrowd`` given as a JSON boolean, extra keys on any entry (ignored), polygons with several
parts, RLE in list or string form, annotations pointing at unknown images or categories (counted and
dropped), and image paths that leave the image folder (counted and skipped). An image is looked up as
``file_name`` in the image folder, then under the entry's ``path`` key (CVAT / COCO-Annotator exports).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..conversion import SourceAnnotation, SourceData, SourceSample
from ..images import relative_key, resolve_inside


class CocoFormatError(ValueError):
    pass


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CocoFormatError(f"{path}: COCO annotation file not found") from None
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: expected a JSON object with images, annotations and categories")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise CocoFormatError(f"{path}: missing or non-list keys {missing} (not a COCO instances file)")
    return data


def _as_int(value: object) -> int | None:
    """``value`` as an integer id or size (``3``, ``3.0``, ``"3"``), else None (``"wide"``, ``True``, ``[3]``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _as_numbers(values: object) -> list[float] | None:
    """A list of finite-or-not numbers (``[1, 2.5]``), else None (strings, booleans, nested lists)."""
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        return None
    return [float(v) for v in values]


def _integer_field(entry: dict, key: str, where: str) -> int:
    value = _as_int(entry[key])
    if value is None:
        raise CocoFormatError(f"{where}: {key} {entry[key]!r} is not an integer")
    return value


def _categories(data: dict, path: Path) -> dict[int, str]:
    categories: dict[int, str] = {}
    for entry in data["categories"]:
        if not isinstance(entry, dict) or "id" not in entry or "name" not in entry:
            raise CocoFormatError(f"{path}: category entry without id/name: {entry!r}")
        cat_id = _integer_field(entry, "id", f"{path}: category {entry['name']!r}")
        if cat_id in categories:
            raise CocoFormatError(f"{path}: category id {cat_id} is defined twice")
        categories[cat_id] = str(entry["name"])
    return categories


def read_coco(source: str | Path, images_dir: str | Path | None = None) -> SourceData:
    """Read a COCO instances file; images are resolved under ``images_dir`` (default: the JSON's folder)."""
    path = Path(source)
    data = _load(path)
    root = Path(images_dir) if images_dir is not None else path.parent
    categories = _categories(data, path)
    pre_issues: list[tuple[str, str, str]] = []

    samples: dict[int, SourceSample] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            pre_issues.append(("malformed_annotation", str(entry)[:80], "image entry without id/file_name"))
            continue
        image_id = _integer_field(entry, "id", f"{path}: image {entry['file_name']!r}")
        where = f"{path}: image {image_id}"
        if not isinstance(entry["file_name"], str):
            raise CocoFormatError(f"{where}: file_name {entry['file_name']!r} is not a string")
        width, height = (
            _integer_field(entry, key, where) if entry.get(key) not in (None, "", 0) else None
            for key in ("width", "height")
        )
        names = [entry["file_name"]] + ([entry["path"]] if isinstance(entry.get("path"), str) else [])
        resolved, unsafe = None, None
        for name in names:
            candidate = resolve_inside(root, name)
            if candidate is None:
                unsafe = name
                break
            if candidate.is_file():
                resolved = candidate
                break
        if unsafe is not None:
            pre_issues.append(("unsafe_path", str(unsafe), f"image {image_id} points outside {root}"))
            continue
        if resolved is None:
            pre_issues.append(("missing_file", str(entry["file_name"]), f"not found under {root}"))
            continue
        expected = (width, height) if width and height else None
        samples[image_id] = SourceSample(resolved, relative_key(resolved, root), expected_size=expected)

    known_images = {_as_int(e["id"]) for e in data["images"] if isinstance(e, dict) and "id" in e}
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        item = f"annotation {ann_id}"
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            pre_issues.append(("malformed_annotation", item, "no image_id/category_id"))
            continue
        wrong = [key for key in ("image_id", "category_id") if _as_int(ann[key]) is None]
        if wrong:  # dropped and counted like any unparseable annotation, with the file and field named
            detail = f"{path.name}: {wrong[0]} {ann[wrong[0]]!r} is not an integer"
            pre_issues.append(("malformed_annotation", item, detail))
            continue
        image_id = _as_int(ann["image_id"])
        if image_id not in known_images:
            pre_issues.append(("malformed_annotation", item, f"refers to unknown image id {image_id}"))
            continue
        sample = samples.get(image_id)
        if sample is None:
            continue  # the image itself was skipped and counted above
        category = categories.get(_as_int(ann["category_id"]))
        if category is None:
            pre_issues.append(("unknown_category", sample.key, f"{item}: category id {ann['category_id']}"))
            continue
        segmentation = ann.get("segmentation")
        polygons = segmentation if isinstance(segmentation, list) and segmentation else None
        if polygons and not isinstance(polygons[0], list):
            polygons = [polygons]  # a single flat polygon without the outer list
        rle = segmentation if isinstance(segmentation, dict) else None
        bbox = ann.get("bbox")
        if bbox is not None and (_as_numbers(bbox) is None or len(bbox) != 4):
            pre_issues.append(
                ("malformed_annotation", sample.key, f"{item}: bbox {bbox!r} is not [x, y, w, h] numbers")
            )
            if not polygons and rle is None:
                continue  # nothing else to place it by: dropped once, here
            bbox = None
        if polygons and not all(_as_numbers(polygon) is not None for polygon in polygons):
            pre_issues.append(
                (
                    "malformed_annotation",
                    sample.key,
                    f"{item}: segmentation holds values that are not numbers",
                )
            )
            continue
        sample.annotations.append(
            SourceAnnotation(
                label=category,
                bbox=[float(v) for v in bbox] if bbox is not None else None,
                polygons=polygons,
                rle=rle,
                iscrowd=bool(ann.get("iscrowd", False)),
                source_id=int(ann_id) if isinstance(ann_id, int) else None,
            )
        )

    label_names = [categories[k] for k in sorted(categories)]
    info = {"format": "coco", "path": str(path), "images": str(root), "categories": len(categories)}
    return SourceData(list(samples.values()), label_names, info, pre_issues)
