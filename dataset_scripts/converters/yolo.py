"""Ultralytics YOLO folders -> :class:`SourceData` for det (boxes) and seg (polygon segments) configs.

Layout (Ultralytics conventions): ``images/<split>/...`` with labels at the same relative path under
``labels/`` (``.../images/...`` -> ``.../labels/...``, extension ``.txt``); class names from ``data.yaml``
(``names:`` as a list or an id -> name mapping; split folders from its ``train`` / ``val`` / ``test`` keys,
which may also be ``.txt`` lists of images) or from ``classes.txt``. Any image extension, in any case.

A label line is ``class cx cy w h`` (a box) or ``class x1 y1 x2 y2 ... xn yn`` (a polygon segment, n >= 3),
all normalised to ``[0, 1]``. An image without a label file, or with an empty one, is a normal image.
Unparseable lines and unknown class ids are counted and dropped; coordinates past the image are clipped.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..conversion import SourceAnnotation, SourceData, SourceSample
from ..images import image_extensions, relative_key, resolve_inside
from ..mapping import read_class_names

SPLIT_KEYS = {"train": ("train",), "validation": ("val", "valid", "validation"), "test": ("test",)}


class YoloFormatError(ValueError):
    pass


def _class_names(root: Path, classes_file: Path | None) -> tuple[list[str], dict]:
    data_yaml = next((p for p in (root / "data.yaml", root / "dataset.yaml") if p.is_file()), None)
    config: dict = {}
    if data_yaml is not None:
        try:
            config = yaml.safe_load(data_yaml.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise YoloFormatError(f"{data_yaml}: not valid YAML: {error}") from None
        if not isinstance(config, dict):
            raise YoloFormatError(
                f"{data_yaml}: expected a mapping (names:, train:, val:), got {config!r:.60}"
            )
    if classes_file is None and "names" not in config and (root / "classes.txt").is_file():
        classes_file = root / "classes.txt"
    if classes_file is not None:
        names = read_class_names(classes_file)
    elif isinstance(config.get("names"), list):
        names = [str(n) for n in config["names"]]
    elif isinstance(config.get("names"), dict):
        wrong = [k for k in config["names"] if isinstance(k, bool) or not str(k).strip().isdigit()]
        if wrong:
            raise YoloFormatError(f"{data_yaml}: names: class id {wrong[0]!r} is not an integer")
        ids = sorted(int(k) for k in config["names"])
        if ids != list(range(len(ids))):
            raise YoloFormatError(f"{data_yaml}: class ids in 'names' must be 0..{len(ids) - 1}, got {ids}")
        names = [str(config["names"][k]) for k in sorted(config["names"], key=int)]
    else:
        raise YoloFormatError(f"{root}: no class names: add data.yaml with 'names:' or classes.txt")
    if not names:
        raise YoloFormatError(f"{root}: the class list is empty")
    return names, config


def _split_images(root: Path, split: str, config: dict) -> list[Path]:
    """Image files of ``split`` following data.yaml, else ``images/<split>``, else ``images/``."""
    base = root
    if isinstance(config.get("path"), str):
        base = resolve_inside(root, config["path"]) or root
    entries: list[str] = []
    for key in SPLIT_KEYS.get(split, (split,)):
        value = config.get(key)
        if value:
            entries = value if isinstance(value, list) else [value]
            break
    folders: list[Path] = []
    files: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise YoloFormatError(f"{root}: data.yaml {split!r} entry {entry!r} is not a path (a string)")
        target = resolve_inside(base, entry)
        if target is None or resolve_inside(root, target) is None:
            raise YoloFormatError(
                f"{root}: data.yaml entry {entry!r} for split {split!r} leaves the dataset folder"
            )
        if target.is_dir():
            folders.append(target)
        elif target.suffix == ".txt" and target.is_file():
            for line in target.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    files.append((target.parent / line.strip()).resolve())
        else:
            raise YoloFormatError(f"{root}: data.yaml entry {entry!r} for split {split!r} does not exist")
    if not entries:
        candidates = [root / "images" / k for k in SPLIT_KEYS.get(split, (split,))] + [root / "images"]
        found = next((c for c in candidates if c.is_dir()), None)
        split_folders = [root / "images" / k for keys in SPLIT_KEYS.values() for k in keys]
        if found == root / "images" and any(folder.is_dir() for folder in split_folders):
            found = None  # images/ holds other splits' folders, not this split's images
        if found is None:
            raise YoloFormatError(f"{root}: no images/ folder for split {split!r} (looked for {candidates})")
        folders = [found]
    extensions = image_extensions()
    for folder in folders:
        files += [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions]
    return sorted(set(files))


def _label_path(image: Path) -> Path:
    parts = list(image.parts)
    index = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if index is None:
        return image.with_suffix(".txt")
    parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_labels(path: Path, key: str, names: list[str], issues: list) -> list[SourceAnnotation]:
    annotations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path.name}:{number}"
        try:
            class_id = int(fields[0])
        except ValueError:
            issues.append(
                ("malformed_annotation", key, f"{where}: class id {fields[0][:30]!r} is not an integer")
            )
            continue
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            bad = next(v for v in fields[1:] if not _is_number(v))
            issues.append(("malformed_annotation", key, f"{where}: coordinate {bad[:30]!r} is not a number"))
            continue
        if not 0 <= class_id < len(names):
            issues.append(
                ("unknown_category", key, f"{where}: class id {class_id} (have {len(names)} classes)")
            )
            continue
        if len(values) == 4:
            cx, cy, w, h = values
            annotations.append(
                SourceAnnotation(names[class_id], bbox=[cx - w / 2, cy - h / 2, w, h], normalized=True)
            )
        elif len(values) >= 6 and len(values) % 2 == 0:
            annotations.append(SourceAnnotation(names[class_id], polygons=[values], normalized=True))
        else:
            issues.append(
                ("malformed_annotation", key, f"{where}: {len(values)} numbers (need 4, or >= 6 and even)")
            )
    return annotations


def read_yolo(source: str | Path, split: str = "train", classes_file: str | Path | None = None) -> SourceData:
    """Read the ``split`` of an Ultralytics YOLO dataset folder."""
    root = Path(source)
    if not root.is_dir():
        raise YoloFormatError(f"{root}: not a folder")
    names, config = _class_names(root, Path(classes_file) if classes_file else None)
    issues: list[tuple[str, str, str]] = []
    samples = []
    for image in _split_images(root, split, config):
        if resolve_inside(root, image) is None:
            issues.append(("unsafe_path", str(image), f"listed image lies outside {root}"))
            continue
        key = relative_key(image, root)
        label_file = _label_path(image)
        annotations = _parse_labels(label_file, key, names, issues) if label_file.is_file() else []
        samples.append(SourceSample(image, key, annotations))
    info = {"format": "yolo", "path": str(root), "split_folder": split, "classes": len(names)}
    return SourceData(samples, names, info, issues)
