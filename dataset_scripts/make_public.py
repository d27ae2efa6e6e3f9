"""Build the public benchmark repo folder (the paper's public-benchmark protocol) from ``../shared/data``.

    cadmtl data make-public OUT_DIR [--data ../shared/data] [--limit N]

- ``parts_det`` and ``parts_seg`` from carparts_dsmlr (COCO): ``trainingset`` is split 90/10 into train /
  validation by a hash of each image's file name (stable whatever the order or subset), ``testset`` is
  test. Masks are rasterised from the polygons (pixel = part id, 0 background; larger parts are painted
  first so small parts on top of them stay visible). Boxes are taken from the rasterised polygons, so
  the det and seg configs agree exactly; they match the upstream boxes to within 1 px (any box that did
  not would be counted as ``bbox_recomputed``).
- ``parts_cls`` from carparts50 (class folders): train / valid / test -> train / validation / test;
  grayscale and CMYK images are converted to RGB (counted as ``converted_mode``).

Splits are converted test first, then validation, then train, so an image that appears in an evaluation
split and in train is dropped from train (``duplicate_image``). ``--limit N`` keeps the first N images of
each split, for quick tests.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .card import write_card
from .converters import read_coco, read_folders
from .mapping import load_mapping
from .pipeline import ConversionResult, ConvertOptions, SourceData, convert_source
from .taxonomy import load_taxonomy

MAPPINGS = Path(__file__).with_name("mappings")
DEFAULT_DATA = Path("../shared/data")
PUBLIC_CONFIGS = ("parts_cls", "parts_det", "parts_seg")
DSMLR_CITATION = (
    "carparts_dsmlr: github.com/dsmlr/Car-Parts-Segmentation (annotation release V2). Pasupa et al., "
    '"Evaluation of deep learning algorithms for semantic segmentation of car parts", Complex & '
    "Intelligent Systems, 2021."
)
CARPARTS50_CITATION = (
    'carparts50: github.com/teesley/Car-Part-Identifier, a copy of the Kaggle "car parts 50 classes" set '
    "(listed upstream as CC0 / Apache-2.0; not confirmed)."
)
LICENSE_NOTE = (
    "Neither source ships a licence file: use this folder for research and testing, cite the sources and do "
    "not redistribute it."
)
INTRO = (
    """# CAD-MTL public car benchmark

Public car data in the CAD 100K layout, for the paper's public-benchmark protocol (classification,
detection and segmentation on public car data): `parts_cls` (50 car parts, carparts50), `parts_det` and
`parts_seg` (18 exterior parts, carparts_dsmlr). Class names are part nodes of the CAD 100K taxonomy.
Built by `cadmtl data make-public` of the cad-mtl project.

**Licence:** """
    + LICENSE_NOTE
)


def validation_fraction_of(name: str) -> float:
    """A stable number in ``[0, 1)`` from a file name: the train / validation split key."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2**64


def _subset(data: SourceData, samples: list, limit: int | None, **info: str) -> SourceData:
    kept = samples[:limit] if limit else samples
    return replace(data, samples=kept, info={**data.info, **info})


def _dsmlr_splits(data_dir: Path, val_fraction: float, limit: int | None) -> dict[str, SourceData]:
    root = data_dir / "carparts_dsmlr"
    training = read_coco(root / "trainingset" / "annotations.json")
    test = read_coco(root / "testset" / "annotations.json")
    train_samples, val_samples = [], []
    for sample in training.samples:
        (
            val_samples if validation_fraction_of(sample.image_path.name) < val_fraction else train_samples
        ).append(sample)
    common = {"citation": DSMLR_CITATION, "license_note": LICENSE_NOTE}
    return {
        "test": _subset(test, test.samples, limit, description="carparts_dsmlr testset", **common),
        "validation": _subset(
            training,
            val_samples,
            limit,
            description=f"carparts_dsmlr trainingset, {val_fraction:.0%} by name hash",
            **common,
        ),
        "train": _subset(
            training,
            train_samples,
            limit,
            description=f"carparts_dsmlr trainingset, {1 - val_fraction:.0%} by name hash",
            **common,
        ),
    }


def _carparts50_splits(data_dir: Path, limit: int | None) -> dict[str, SourceData]:
    root = data_dir / "carparts50"
    splits = {}
    for split, folder in (("test", "test"), ("validation", "valid"), ("train", "train")):
        data = read_folders(root / folder)
        description = f"carparts50 {folder}/"
        splits[split] = _subset(
            data,
            data.samples,
            limit,
            description=description,
            citation=CARPARTS50_CITATION,
            license_note=LICENSE_NOTE,
        )
    return splits


def build_public(
    out_dir: str | Path,
    data_dir: str | Path = DEFAULT_DATA,
    *,
    limit: int | None = None,
    val_fraction: float = 0.1,
    show_progress: bool = True,
) -> dict[tuple[str, str], ConversionResult]:
    """Write ``parts_cls``, ``parts_det`` and ``parts_seg`` into ``out_dir``; returns each split's result."""
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    for name in ("carparts_dsmlr", "carparts50"):
        if not (data_dir / name).is_dir():
            raise FileNotFoundError(
                f"{data_dir / name} not found; pass --data pointing at the shared data folder"
            )
    for config in PUBLIC_CONFIGS:  # a rebuild starts clean, so old label lists or rows cannot leak in
        shutil.rmtree(out_dir / config, ignore_errors=True)
        shutil.rmtree(out_dir / "reports" / config, ignore_errors=True)
    taxonomy = load_taxonomy()
    dsmlr_mapping = load_mapping(MAPPINGS / "carparts_dsmlr.yaml", taxonomy)
    parts50_mapping = load_mapping(MAPPINGS / "carparts50.yaml", taxonomy)
    dsmlr = _dsmlr_splits(data_dir, val_fraction, limit)
    parts50 = _carparts50_splits(data_dir, limit)
    jobs = [
        ("parts_det", dsmlr, dsmlr_mapping),
        ("parts_seg", dsmlr, dsmlr_mapping),
        ("parts_cls", parts50, parts50_mapping),
    ]
    results = {}
    for config, splits, mapping in jobs:
        for split, data in splits.items():
            options = ConvertOptions(
                repo_dir=out_dir,
                config=config,
                split=split,
                mapping=mapping,
                taxonomy=taxonomy,
                existing="replace",
                bbox_from="segmentation",
                show_progress=show_progress,
                update_card=False,
            )
            results[(config, split)] = convert_source(data, options)
    write_card(
        out_dir,
        pretty_name="CAD-MTL public car benchmark",
        license="other",
        intro=INTRO,
        repo_hint=str(out_dir),
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cadmtl data make-public",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path, help="repo folder to write")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="shared data folder (default ../shared/data)"
    )
    parser.add_argument("--limit", type=int, help="keep the first N images of each split (for tests)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="carparts_dsmlr validation share (0.1)"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        results = build_public(
            args.out_dir,
            args.data,
            limit=args.limit,
            val_fraction=args.val_fraction,
            show_progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("| config | split | seen | written | issues |")
    print("|---|---|---:|---:|---|")
    for (config, split), result in results.items():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(result.report.counts().items())) or "-"
        print(f"| {config} | {split} | {result.report.rows_seen} | {result.report.rows_written} | {counts} |")
    print(f"\nwrote {args.out_dir} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
