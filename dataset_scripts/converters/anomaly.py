"""Anomaly-detection sources -> :class:`SourceData` for ``*_ad`` configs, every sample with its split.

- ``mvtec``: one MVTec AD category folder: ``train/good/``, ``test/<type>/`` (``good`` = normal) and
  ``ground_truth/<type>/<stem>_mask.png`` (``<stem>.png`` is accepted too). The layout says the splits;
  ``validation_fraction`` (default 0) moves a seeded part of test, per defect type, to validation.
- ``magnetic_tile``: one folder per defect type (``MT_Blowhole/``, ...; ``MT_Free/`` or ``good/`` = normal),
  images at any depth with a same-stem PNG mask next to them (``Imgs/X.jpg`` + ``Imgs/X.png``): every PNG
  that shares its stem with an image is that image's mask, any other image file is an image. Normal images
  need no mask; soft masks are thresholded (``ConvertOptions.mask_threshold``, default 128).
- ``ad_folders``: folders of images without masks (image-level labels only): ``good/`` = normal, any other
  folder = a defect type; either flat (``<root>/<type>/``) or under split folders
  (``<root>/{train,validation|val|valid,test}/<type>/``). Anomalous images get an all-255 (ignore) mask.

Flat sources (magnetic_tile, flat ad_folders) are split by :func:`assign_ad_splits`: a seeded
``normal_test_fraction`` (default 0.3) of the normal images is held out for evaluation, every anomalous image
is an evaluation image, and a seeded ``validation_fraction`` (default 0.5 for flat sources) of the evaluation
images of each defect type goes to validation, the rest to test (which keeps at least one image of each
type). The same source, fractions and seed give the same splits; adding images of one defect type does not move the others.

Problems found while reading (a mask without an image, an anomalous image without its mask, non-image
files, images outside a type folder) are counted in the report of the split they concern.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..conversion import SourceData, SourceSample
from ..images import image_extensions, relative_key, resolve_inside
from ..schema import GOOD

SPLIT_FOLDERS = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
}
DEFAULT_NORMAL_TEST_FRACTION = 0.3
DEFAULT_VALIDATION_FRACTION = {"mvtec": 0.0, "magnetic_tile": 0.5, "ad_folders": 0.5}
MASK_SUFFIX = "_mask"
NORMAL_FOLDERS = {"good", "free"}  # magnetic_tile: MT_Free; MVTec / anomalib: good

Issue = tuple[str, str, str, str]


class AnomalyFormatError(ValueError):
    pass


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path, root: Path, split: str, issues: list[Issue]) -> Iterator[Path]:
    """Image files under ``folder`` (sorted); non-images and links leaving ``root`` are counted."""
    extensions = image_extensions()
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or not _visible(path, root):
            continue
        key = relative_key(path, root)
        if resolve_inside(root, key) is None:
            issues.append(("unsafe_path", key, "link leads outside the source folder", split))
        elif path.suffix.lower() not in extensions:
            issues.append(("not_an_image", key, f"extension {path.suffix or '(none)'}", split))
        else:
            yield path


def _loose_images(folder: Path, root: Path, split: str, issues: list[Issue], where: str) -> None:
    extensions = image_extensions()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() in extensions:
            issues.append(("unlabelled_image", relative_key(path, root), f"image {where}", split))


def check_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def assign_ad_splits(
    samples: list[SourceSample],
    *,
    normal_test_fraction: float = DEFAULT_NORMAL_TEST_FRACTION,
    validation_fraction: float = 0.0,
    seed: int = 0,
) -> None:
    """Set ``sample.split`` in place, seeded and independent of file-system order.

    Samples without a split (flat sources): normal ones go to train except ``round(normal_test_fraction *
    n)`` held out for evaluation; anomalous ones are evaluation images. Evaluation images (those plus the
    ones the layout put in ``test``) go to validation for ``round(validation_fraction * n)`` of each defect
    type (``good`` included; a half rounds up), to test otherwise, but test keeps at least one image of every
    type it has. Samples the layout put in train or validation stay there.
    """
    normal_test_fraction = check_fraction("normal_test_fraction", normal_test_fraction)
    validation_fraction = check_fraction("validation_fraction", validation_fraction)

    def rng(*names: str) -> np.random.Generator:
        return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])

    def take(group: list[SourceSample], fraction: float, *names: str, keep: int = 0) -> set[int]:
        count = min(int(fraction * len(group) + 0.5), max(len(group) - keep, 0))
        return {int(i) for i in rng(*names).permutation(len(group))[:count]}

    normals = sorted(
        (s for s in samples if s.split is None and (s.label or GOOD) == GOOD), key=lambda s: s.key
    )
    held_out = take(normals, normal_test_fraction, "normal_test")
    for index, sample in enumerate(normals):
        sample.split = "test" if index in held_out else "train"
    for sample in samples:
        if sample.split is None:  # anomalous images of flat sources
            sample.split = "test"
    by_type: dict[str, list[SourceSample]] = {}
    for sample in samples:
        if sample.split == "test":
            by_type.setdefault(sample.label or GOOD, []).append(sample)
    for defect, group in sorted(by_type.items()):
        group.sort(key=lambda s: s.key)
        for index in take(group, validation_fraction, "validation", defect, keep=1):
            group[index].split = "validation"


def _info(fmt: str, root: Path, **extra) -> dict:
    return {"format": fmt, "path": str(root), **extra}


# ------------------------------------------------------------------------------------------- MVTec AD
def read_mvtec(source: str | Path, *, validation_fraction: float = 0.0, seed: int = 0) -> SourceData:
    """Read one MVTec AD category folder (``train/good``, ``test/<type>``, ``ground_truth/<type>``)."""
    root = Path(source)
    if not root.is_dir():
        raise AnomalyFormatError(f"{root}: not a folder")
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        found = [p.name for p in _subfolders(root)][:8]
        raise AnomalyFormatError(
            f"{root}: not an MVTec AD category folder (expected train/good/, test/<type>/ and "
            f"ground_truth/<type>/; found {found}); for the whole dataset pass one category, e.g. {root}/bottle"
        )
    gt_dir = root / "ground_truth"
    if not gt_dir.is_dir():
        raise AnomalyFormatError(
            f"{root}: no ground_truth/ folder with the masks of test/<type>/; "
            "for image-level labels only, convert the folders with format ad_folders"
        )
    issues: list[Issue] = []
    masks: dict[tuple[str, str], Path] = {}
    for type_dir in _subfolders(gt_dir):
        for path in _files(type_dir, root, "test", issues):
            stem = relative_key(path.with_suffix(""), type_dir)
            stem = stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else stem
            if (type_dir.name, stem) not in masks or path.suffix.lower() == ".png":
                masks[(type_dir.name, stem)] = path
    samples: list[SourceSample] = []
    used: set[tuple[str, str]] = set()
    for split in ("train", "test"):
        _loose_images(
            root / split, root, split, issues, f"directly in {split}/, outside a defect-type folder"
        )
        for type_dir in _subfolders(root / split):
            label = GOOD if type_dir.name.lower() == GOOD else type_dir.name
            for path in _files(type_dir, root, split, issues):
                key = relative_key(path, root)
                stem = relative_key(path.with_suffix(""), type_dir)
                mask = masks.get((type_dir.name, stem))
                if mask is not None:
                    used.add((type_dir.name, stem))
                elif label != GOOD and split == "test":
                    where = f"ground_truth/{type_dir.name}/{stem}{MASK_SUFFIX}.png"
                    issues.append(("missing_mask", key, f"no {where}", split))
                    continue
                samples.append(SourceSample(path, key, label=label, mask_path=mask, split=split))
    for (defect, stem), path in sorted(masks.items()):
        if (defect, stem) not in used:
            where = f"no test/{defect}/{stem}.*"
            issues.append(
                ("missing_file", relative_key(path, root), f"mask without an image ({where})", "test")
            )
    info = _info(
        "mvtec",
        root,
        description=f"MVTec AD layout: {root.name}",
        validation_fraction=validation_fraction,
        seed=seed,
    )
    return _source_data(samples, info, issues, validation_fraction=validation_fraction, seed=seed)


# ------------------------------------------------------------------------------------- magnetic tile
def _type_of_folder(name: str) -> str:
    """``MT_Blowhole`` -> ``blowhole``; ``MT_Free`` / ``good`` -> ``good``."""
    stripped = name[3:] if name.upper().startswith("MT_") else name
    stripped = stripped.lower()
    return GOOD if stripped in NORMAL_FOLDERS else stripped


def read_magnetic_tile(
    source: str | Path,
    *,
    normal_test_fraction: float = DEFAULT_NORMAL_TEST_FRACTION,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION["magnetic_tile"],
    seed: int = 0,
) -> SourceData:
    """Read defect-type folders whose images carry a same-stem PNG mask next to them (Magnetic-tile)."""
    root = Path(source)
    if not root.is_dir():
        raise AnomalyFormatError(f"{root}: not a folder")
    folders = _subfolders(root)
    if not folders:
        raise AnomalyFormatError(f"{root}: no defect-type folders (expected e.g. MT_Free/, MT_Crack/)")
    if not any(_type_of_folder(f.name) == GOOD for f in folders):
        raise AnomalyFormatError(
            f"{root}: no folder of normal images (MT_Free/ or good/) among {[f.name for f in folders]}"
        )
    issues: list[Issue] = []
    _loose_images(root, root, "train", issues, "directly in the root, outside a defect-type folder")
    samples: list[SourceSample] = []
    for folder in folders:
        label = _type_of_folder(folder.name)
        split = "train" if label == GOOD else "test"  # where counted problems are reported
        files = list(_files(folder, root, split, issues))
        by_stem: dict[Path, list[Path]] = {}
        for path in files:
            by_stem.setdefault(path.with_suffix(""), []).append(path)
        for stem, group in sorted(by_stem.items()):
            masks = [p for p in group if p.suffix.lower() == ".png"]
            images = [p for p in group if p.suffix.lower() != ".png"]
            mask = masks[0] if masks else None
            if not images:
                for path in masks:
                    key = relative_key(path, root)
                    issues.append(("missing_file", key, "mask without a same-stem image", split))
                continue
            for path in images:
                key = relative_key(path, root)
                if mask is None and label != GOOD:
                    issues.append(("missing_mask", key, f"no {stem.name}.png next to it", split))
                    continue
                samples.append(SourceSample(path, key, label=label, mask_path=mask))
    info = _info(
        "magnetic_tile",
        root,
        description=f"defect-type folders with same-stem PNG masks: {root.name}",
        normal_test_fraction=normal_test_fraction,
        validation_fraction=validation_fraction,
        seed=seed,
    )
    split_options = {"normal_test_fraction": normal_test_fraction, "validation_fraction": validation_fraction}
    return _source_data(samples, info, issues, **split_options, seed=seed)


# ------------------------------------------------------------------------------------- image folders
def has_split_folders(root: Path) -> bool:
    return any(p.name.lower() in SPLIT_FOLDERS for p in _subfolders(root))


def read_ad_folders(
    source: str | Path,
    *,
    normal_test_fraction: float = DEFAULT_NORMAL_TEST_FRACTION,
    validation_fraction: float = 0.0,
    seed: int = 0,
) -> SourceData:
    """Read ``good/`` + ``<type>/`` image folders (flat, or under train/validation/test folders); no masks."""
    root = Path(source)
    if not root.is_dir():
        raise AnomalyFormatError(f"{root}: not a folder")
    issues: list[Issue] = []
    samples: list[SourceSample] = []
    split_layout = has_split_folders(root)
    if split_layout:
        groups = []
        for folder in _subfolders(root):
            split = SPLIT_FOLDERS.get(folder.name.lower())
            if split is None:
                raise AnomalyFormatError(
                    f"{root}: {folder.name}/ next to split folders; use either <root>/<split>/<type>/ "
                    "(split = train, validation or test) or <root>/<type>/, not both"
                )
            _loose_images(folder, root, split, issues, f"directly in {folder.name}/, outside a type folder")
            groups += [(split, type_dir) for type_dir in _subfolders(folder)]
    else:
        groups = [(None, type_dir) for type_dir in _subfolders(root)]
    _loose_images(root, root, "train", issues, "directly in the root, outside a type folder")
    for split, type_dir in groups:
        label = GOOD if type_dir.name.lower() == GOOD else type_dir.name
        where = split or ("train" if label == GOOD else "test")
        for path in _files(type_dir, root, where, issues):
            samples.append(SourceSample(path, relative_key(path, root), label=label, split=split))
    if not any(s.label == GOOD for s in samples):
        raise AnomalyFormatError(f"{root}: no normal images (a good/ folder) found")
    info = _info(
        "ad_folders",
        root,
        description=(
            f"image folders {root.name}: image-level labels only, no masks "
            "(anomalous images have an all-255 = ignore mask; normal images all 0)"
        ),
        validation_fraction=validation_fraction,
        seed=seed,
        **({} if split_layout else {"normal_test_fraction": normal_test_fraction}),
    )
    split_options = {"normal_test_fraction": normal_test_fraction, "validation_fraction": validation_fraction}
    return _source_data(samples, info, issues, **split_options, seed=seed)


def _source_data(samples: list[SourceSample], info: dict, issues: list, **split_options: Any) -> SourceData:
    """The read source: its samples with their splits assigned (`assign_ad_splits(samples, **split_options)`),
    ``good`` then the sorted defect types, info and issues."""
    assign_ad_splits(samples, **split_options)
    types = sorted({s.label for s in samples if s.label != GOOD})
    return SourceData(samples, [GOOD, *types], info, list(issues))
