"""Image + mask-PNG folders -> :class:`SourceData` for seg configs.

Layout: ``<root>/images/**`` and ``<root>/masks/**`` with the same relative names (any image extension for
the image, usually ``.png`` for the mask), and a class list whose line ``i`` names mask value ``i``
(``classes.txt``, or ``names:`` in ``data.yaml``, or ``--classes FILE``); value 0 is normally
``background``. Mask value 255 means ignore. Images without a mask and masks without an image are counted.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..conversion import SourceData, SourceSample
from ..images import image_extensions, relative_key, resolve_inside
from ..mapping import read_class_names


class MasksFormatError(ValueError):
    pass


def _class_list(root: Path, classes_file: Path | None) -> list[str]:
    if classes_file is None and (root / "classes.txt").is_file():
        classes_file = root / "classes.txt"
    if classes_file is not None:
        names = read_class_names(classes_file)
    elif (root / "data.yaml").is_file():
        config = yaml.safe_load((root / "data.yaml").read_text(encoding="utf-8")) or {}
        raw = config.get("names")
        names = (
            [str(raw[k]) for k in sorted(raw, key=int)]
            if isinstance(raw, dict)
            else [str(n) for n in raw or []]
        )
    else:
        raise MasksFormatError(
            f"{root}: no class list: add classes.txt (line i names mask value i) or pass --classes"
        )
    if not names:
        raise MasksFormatError(f"{root}: the class list is empty")
    if len(names) > 255:
        raise MasksFormatError(f"{root}: {len(names)} classes do not fit 8-bit masks whose 255 means ignore")
    return names


def read_masks(source: str | Path, classes_file: str | Path | None = None) -> SourceData:
    """Read ``images/`` and ``masks/`` of ``source`` with its class list."""
    root = Path(source)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise MasksFormatError(f"{root}: missing {folder.name}/ folder (expected images/ and masks/)")
    names = _class_list(root, Path(classes_file) if classes_file else None)
    values = dict(enumerate(names))
    extensions = image_extensions()
    masks: dict[str, Path] = {}
    for path in sorted(masks_dir.rglob("*")):
        if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith("."):
            stem = relative_key(path.with_suffix(""), masks_dir)
            # Prefer a PNG when a stem has several mask files; lossy masks would corrupt class ids.
            if stem not in masks or path.suffix.lower() == ".png":
                masks[stem] = path
    issues: list[tuple[str, str, str]] = []
    samples = []
    matched = set()
    for path in sorted(images_dir.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in extensions:
            continue
        key = relative_key(path, root)
        if resolve_inside(root, key) is None:
            issues.append(("unsafe_path", key, "link leads outside the source folder"))
            continue
        stem = relative_key(path.with_suffix(""), images_dir)
        mask = masks.get(stem)
        if mask is None:
            issues.append(("missing_mask", key, f"no masks/{stem}.*"))
            continue
        matched.add(stem)
        samples.append(SourceSample(path, key, mask_path=mask, mask_values=values))
    for stem in sorted(set(masks) - matched):
        issues.append(("missing_file", relative_key(masks[stem], root), "mask without an image"))
    info = {"format": "masks", "path": str(root), "classes": len(names)}
    return SourceData(samples, names, info, issues)
