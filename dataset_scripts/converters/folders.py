"""Class-per-folder trees (``<root>/<class>/**/<image>``) -> :class:`SourceData` for cls configs.

The class is the name of the top-level folder an image sits in (sub-folders below it are allowed). Any
image extension Pillow knows counts, in any case; hidden files are ignored, other files are counted as
``not_an_image`` and images lying directly in ``<root>`` (no class) as ``unlabelled_image``.
"""

from __future__ import annotations

from pathlib import Path

from ..conversion import SourceData, SourceSample
from ..images import image_extensions, relative_key, resolve_inside


class FoldersFormatError(ValueError):
    pass


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def read_folders(source: str | Path) -> SourceData:
    """Read ``<root>/<class>/*`` (class names are the folder names, in sorted order)."""
    root = Path(source)
    if not root.is_dir():
        raise FoldersFormatError(f"{root}: not a folder")
    extensions = image_extensions()
    issues: list[tuple[str, str, str]] = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise FoldersFormatError(f"{root}: no class folders (expected <root>/<class>/<image>)")
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() in extensions:
            issues.append(
                ("unlabelled_image", path.name, "image directly in the root, not in a class folder")
            )
    samples = []
    for class_dir in class_dirs:
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or not _visible(path, root):
                continue
            key = relative_key(path, root)
            if resolve_inside(root, key) is None:
                issues.append(("unsafe_path", key, "link leads outside the source folder"))
                continue
            if path.suffix.lower() not in extensions:
                issues.append(("not_an_image", key, f"extension {path.suffix or '(none)'}"))
                continue
            samples.append(SourceSample(path, key, label=class_dir.name))
    info = {"format": "folders", "path": str(root), "classes": len(class_dirs)}
    return SourceData(samples, [d.name for d in class_dirs], info, issues)
