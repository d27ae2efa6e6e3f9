"""Build the public benchmark repo folder (the paper's public-benchmark protocol) from ``../shared/data``.

    cadmtl data make-public OUT_DIR [--data ../shared/data] [--limit N] [--configs cars_ad] [--seed 0]

- ``parts_det`` and ``parts_seg`` from carparts_dsmlr (COCO): ``trainingset`` is split 90/10 into train /
  validation by a hash of each image's file name (stable whatever the order or subset), ``testset`` is
  test. Masks are rasterised from the polygons (pixel = part id, 0 background; larger parts are painted
  first so small parts on top of them stay visible). Boxes are taken from the rasterised polygons, so
  the det and seg configs agree exactly; they match the upstream boxes to within 1 px (any box that did
  not would be counted as ``bbox_recomputed``).
- ``parts_cls`` from carparts50 (class folders): train / valid / test -> train / validation / test;
  grayscale and CMYK images are converted to RGB (counted as ``converted_mode``).

- ``cars_ad`` (anomaly detection) from the 500 carparts_dsmlr photos, which all show normal cars:
  :func:`cars_ad_source` holds out a seeded ``normal_test_fraction`` (0.3) of the photos for evaluation
  (split half / half into validation and test, the rest is the normal-only train split: 350 / 75 / 75), then
  paints one synthetic defect (``dataset_scripts.synthetic.place_defects``, the project's procedural
  styles, radius 8-16 % of the shorter side) on a seeded ``anomalous_fraction`` (half) of each evaluation
  split, its centre on the car (the union of the photo's part polygons). ``defect_type`` is the exterior
  anomaly painted (:data:`CARS_AD_ANOMALIES`, cycled so the types are balanced), the mask is exact (the
  pixels the defect changed) and ``source`` is ``synthetic`` for painted rows. Painted images are stored as
  PNG so that nothing but the defect differs from the JPEG they were painted on. A photo with no room for
  its defect stays normal and is counted (``defect_not_placed``).

Splits are converted test first, then validation, then train, so an image that appears in an evaluation
split and in train is dropped from train (``duplicate_image``). ``--limit N`` keeps the first N images of
each split, for quick tests.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .card import write_card
from .conversion import (
    ConversionResult,
    ConvertOptions,
    SourceData,
    SourceSample,
    convert_ad_source,
    convert_source,
)
from .converters import read_coco, read_folders
from .converters.anomaly import DEFAULT_NORMAL_TEST_FRACTION, assign_ad_splits
from .images import encode_png, read_image
from .mapping import LabelMapping, load_mapping
from .options import add_seed_option, exit_status
from .raster import draw_polygons
from .report import ValidationReport
from .schema import GOOD
from .synthesize import DEFAULT_RADIUS, defect_specs
from .synthetic import place_defects
from .taxonomy import Taxonomy, load_taxonomy

MAPPINGS = Path(__file__).with_name("mappings")
DEFAULT_DATA = Path("../shared/data")
CARS_AD = "cars_ad"
PUBLIC_CONFIGS = ("parts_cls", "parts_det", "parts_seg", CARS_AD)
# Exterior anomalies of the taxonomy that apply to every body part (one per paint style; paint_chip would
# repeat paint_peel's style).
CARS_AD_ANOMALIES = ("scratch", "dent", "crack", "paint_peel", "corrosion", "missing_part", "contamination")
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
`cars_ad` (normal-only anomaly detection): normal carparts_dsmlr photos for train; validation and test
hold held-out photos, half of them with one synthetic exterior defect painted on the car (exact masks,
`source` = synthetic). Built by `cadmtl data make-public` of the cad-mtl project.

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


def car_region(sample: SourceSample, height: int, width: int) -> np.ndarray | None:
    """The car in a carparts_dsmlr photo: the union of its part polygons (``None`` without any)."""
    polygons = [
        list(zip(polygon[0::2], polygon[1::2]))
        for annotation in sample.annotations
        for polygon in annotation.polygons or []
        if len(polygon) >= 6
    ]
    if not polygons:
        return None
    region = draw_polygons(height, width, polygons) >= 0.5
    return region if region.any() else None


def cars_ad_source(
    data_dir: str | Path,
    staging: str | Path,
    *,
    seed: int = 0,
    normal_test_fraction: float = DEFAULT_NORMAL_TEST_FRACTION,
    validation_fraction: float = 0.5,
    anomalous_fraction: float = 0.5,
    radius_range: tuple[float, float] = DEFAULT_RADIUS,
    limit: int | None = None,
    taxonomy: Taxonomy | None = None,
    show_progress: bool = True,
) -> SourceData:
    """The ``cars_ad`` source: every carparts_dsmlr photo with its split, a seeded ``anomalous_fraction`` of
    each evaluation split painted with one synthetic defect (PNG image and 0 / 255 mask written to
    ``staging``, which must outlive the conversion). See the module docstring."""
    if not 0 <= anomalous_fraction <= 1:
        raise ValueError(f"anomalous_fraction must be in [0, 1], got {anomalous_fraction}")
    root, staging = Path(data_dir) / "carparts_dsmlr", Path(staging)
    taxonomy = taxonomy or load_taxonomy()
    specs = defect_specs(dict.fromkeys(CARS_AD_ANOMALIES, 1), CARS_AD, taxonomy)
    samples = [
        replace(sample, key=f"{folder}/{sample.key}", label=GOOD)
        for folder in ("trainingset", "testset")
        for sample in read_coco(root / folder / "annotations.json").samples
    ]
    assign_ad_splits(
        samples, normal_test_fraction=normal_test_fraction, validation_fraction=validation_fraction, seed=seed
    )
    by_split: dict[str, list[SourceSample]] = {}
    for sample in sorted(samples, key=lambda s: s.key):
        by_split.setdefault(sample.split, []).append(sample)
    if limit:
        by_split = {split: group[:limit] for split, group in by_split.items()}
    issues: list[tuple[str, ...]] = []
    painted: Counter = Counter()
    for split in ("validation", "test"):
        group = by_split.get(split, [])
        order = np.random.default_rng([seed, zlib.crc32(CARS_AD.encode()), zlib.crc32(split.encode())])
        chosen = order.permutation(len(group))[: math.floor(len(group) * anomalous_fraction)]
        for rank, index in enumerate(
            tqdm(chosen, desc=f"{CARS_AD}/{split} defects", disable=not show_progress)
        ):
            sample, anomaly = group[index], CARS_AD_ANOMALIES[rank % len(CARS_AD_ANOMALIES)]
            # The pixels the pipeline would store (EXIF, mode), so the mask fits them; problems are left for
            # the pipeline to count when it reads the untouched photo.
            stored = read_image(
                sample.image_path,
                sample.key,
                ValidationReport(CARS_AD, split),
                expected_size=sample.expected_size,
            )
            if stored is None:
                continue
            pixels = np.asarray(Image.open(io.BytesIO(stored.data)).convert("RGB"))
            rng = np.random.default_rng([seed, zlib.crc32(sample.key.encode())])
            image, placed = place_defects(
                pixels,
                [specs[anomaly]],
                rng,
                radius_range=radius_range,
                region=car_region(sample, *pixels.shape[:2]),
            )
            if not placed:
                issues.append(
                    ("defect_not_placed", sample.key, f"{anomaly}: no free place on the car", split)
                )
                continue
            mask = np.zeros(pixels.shape[:2], np.uint8)
            mask[placed[0].mask] = 255
            target = staging / split / f"{index:05d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(encode_png(image))
            mask_path = target.with_name(f"{index:05d}_mask.png")
            mask_path.write_bytes(encode_png(mask))
            group[index] = replace(
                sample,
                image_path=target,
                mask_path=mask_path,
                label=anomaly,
                source="synthetic",
                annotations=[],
                expected_size=None,
            )
            painted[(split, anomaly)] += 1
    counts = "; ".join(
        f"{split}: "
        + ", ".join(f"{a} {painted[(split, a)]}" for a in CARS_AD_ANOMALIES if painted[(split, a)])
        for split in ("validation", "test")
    )
    info = {
        "format": "carparts_dsmlr photos + synthetic defects",
        "path": str(root),
        "description": (
            f"carparts_dsmlr trainingset + testset photos (normal cars); {normal_test_fraction:.0%} held out "
            f"for validation / test, {anomalous_fraction:.0%} of those painted with one synthetic defect on "
            f"the car (seed {seed}; {counts})"
        ),
        "citation": DSMLR_CITATION,
        "license_note": LICENSE_NOTE,
        "seed": seed,
    }
    kept = [sample for group in by_split.values() for sample in group]
    return SourceData(kept, [GOOD, *CARS_AD_ANOMALIES], info, issues)


def build_public(
    out_dir: str | Path,
    data_dir: str | Path = DEFAULT_DATA,
    *,
    limit: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    configs: Sequence[str] = PUBLIC_CONFIGS,
    show_progress: bool = True,
) -> dict[tuple[str, str], ConversionResult]:
    """Write ``configs`` (default all: ``parts_cls``, ``parts_det``, ``parts_seg`` and ``cars_ad``, whose split
    and defects ``seed`` draws) into ``out_dir``, leaving its other configs alone; returns each split's result."""
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    unknown = sorted(set(configs) - set(PUBLIC_CONFIGS))
    if unknown or not configs:
        raise ValueError(
            f"unknown public configs {unknown or list(configs)}; choose from {list(PUBLIC_CONFIGS)}"
        )
    for name in ("carparts_dsmlr", "carparts50"):
        if not (data_dir / name).is_dir():
            raise FileNotFoundError(
                f"{data_dir / name} not found; pass --data pointing at the shared data folder"
            )
    for config in configs:  # a rebuild starts clean, so old label lists or rows cannot leak in
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
    for config, splits, mapping in [job for job in jobs if job[0] in configs]:
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
    if CARS_AD in configs:
        with tempfile.TemporaryDirectory(prefix="cars_ad-") as staging:
            source = cars_ad_source(
                data_dir, staging, seed=seed, limit=limit, taxonomy=taxonomy, show_progress=show_progress
            )
            options = ConvertOptions(
                repo_dir=out_dir,
                config=CARS_AD,
                # the photos' sample-level hierarchy (exterior / body / whole_vehicle), not their part labels
                mapping=LabelMapping(hierarchy=dsmlr_mapping.hierarchy),
                taxonomy=taxonomy,
                existing="replace",
                show_progress=show_progress,
                update_card=False,
            )
            for split, result in convert_ad_source(source, options).items():
                results[(CARS_AD, split)] = result
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
    add_seed_option(parser, 0, "cars_ad: held-out photos and painted defects")
    parser.add_argument(
        "--configs", nargs="+", default=list(PUBLIC_CONFIGS), help="configs to (re)build (default: all)"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def run() -> None:
        results = build_public(
            args.out_dir,
            args.data,
            limit=args.limit,
            val_fraction=args.val_fraction,
            seed=args.seed,
            configs=args.configs,
            show_progress=not args.no_progress,
        )
        print("| config | split | seen | written | issues |")
        print("|---|---|---:|---:|---|")
        for (config, split), result in results.items():
            counts = ", ".join(f"{k} {v}" for k, v in sorted(result.report.counts().items())) or "-"
            print(
                f"| {config} | {split} | {result.report.rows_seen} | {result.report.rows_written} | {counts} |"
            )
        if (CARS_AD, "test") in results:
            print(f"\n{CARS_AD}: {results[(CARS_AD, 'test')].report.source['description']}")
        print(f"\nwrote {args.out_dir} in {time.perf_counter() - start:.1f} s")

    return exit_status(run, (ValueError, FileNotFoundError), error_status=1)


if __name__ == "__main__":
    sys.exit(main())
