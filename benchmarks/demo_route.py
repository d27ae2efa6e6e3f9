"""The real demo route, measured as a visitor of the app would meet it: the held-out NORMAL photos of a split, each
scored by the demo app's Anomaly tab as it is (`cadmtl.anomaly.models.inspect_image`, all of `app.inspect_anomaly`'s
scoring, with the processor `app.build_demo_app` builds), then the same photo with ONE synthetic defect painted by the
project's painter (`dataset_scripts.synthetic.place_defects`, the one `cadmtl data make-public` paints `cars_ad`
with: the taxonomy's styles, radius 8-16 % of the shorter side, centred on the car through the carparts_dsmlr part
polygons when `--data` holds them; seeded per photo) and scored again.

Per photo: the verdict on the normal photo, the verdict on the painted one, and whether the heat map's peak (the
argmax of the full-size anomaly map) falls inside the painted mask dilated by 2 % of the shorter side. Prints a
Markdown table (photos, OK on normals %, NG on painted %, NG with the peak on the defect %, per defect type,
seconds per photo) and writes the numbers and every photo's row as JSON.

Examples:
    cadmtl data make-public outputs/public-benchmark --data ../shared/data --configs cars_ad
    cadmtl anomaly fit outputs/public-benchmark --config cars_ad --image-size 256 --tile-size 256 \\
        --backbone efficientnet-lite0 \\
        --tile-overlap 0 --max-train 100 --output-dir outputs/cars-ad-scorer
    PYTHONPATH=. python benchmarks/demo_route.py outputs/cars-ad-scorer/model outputs/public-benchmark \\
        --config cars_ad --split test --output outputs/cars-ad-scorer/demo_route.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from cadmtl.anomaly.data import iter_anomaly_split
from cadmtl.anomaly.models import NG, OK, anomaly_processor, inspect_image, load_anomaly_model
from dataset_scripts.converters import read_coco
from dataset_scripts.make_public import CARS_AD_ANOMALIES, car_region
from dataset_scripts.synthesize import DEFAULT_RADIUS, defect_specs
from dataset_scripts.synthetic import DefectSpec, place_defects
from dataset_scripts.taxonomy import load_taxonomy

PEAK_TOLERANCE = (
    0.02  # of the shorter side: the painted mask is dilated by this much before the peak is checked
)


def percent(count: int, total: int) -> float | None:
    return None if total == 0 else 100.0 * count / total


def car_samples(data_dir: Path | None) -> dict[str, Any]:
    """carparts_dsmlr samples by the image id `cars_ad` gives them (`trainingset/JPEGImages/train48`: folder and key
    without its extension, as the converter names rows), {} without the annotations: defects are then centred
    anywhere on the photo."""
    samples: dict[str, Any] = {}
    root = None if data_dir is None else data_dir / "carparts_dsmlr"
    for folder in ("trainingset", "testset"):
        annotations = None if root is None else root / folder / "annotations.json"
        if annotations is not None and annotations.is_file():
            for sample in read_coco(annotations).samples:
                samples[f"{folder}/{PurePosixPath(sample.key).with_suffix('')}"] = sample
    return samples


def region_of(source: Any, height: int, width: int) -> np.ndarray | None:
    """The car (union of the part polygons) in the stored photo's frame; polygons are in the annotated frame,
    which a converter's pixel budget may have shrunk."""
    frame_width, frame_height = source.expected_size or (width, height)
    region = car_region(source, frame_height, frame_width)
    if region is None or region.shape == (height, width):
        return region
    resized = Image.fromarray(region.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


def paint_one_defect(
    image: Image.Image, spec: DefectSpec, seed: int, image_id: str, region: np.ndarray | None
) -> tuple[Image.Image, np.ndarray] | None:
    """The photo with one `spec` defect and its exact mask (bool H x W), or None when it found no place."""
    rng = np.random.default_rng([seed, zlib.crc32(image_id.encode())])
    painted, placed = place_defects(
        np.asarray(image), [spec], rng, radius_range=DEFAULT_RADIUS, region=region
    )
    if not placed:
        return None
    return Image.fromarray(painted), placed[0].mask


def painted_copy(
    sample: Any,
    rank: int,
    specs: dict[str, DefectSpec],
    defect_types: Sequence[str],
    polygons: dict[str, Any],
    seed: int,
) -> tuple[str, bool, tuple[Image.Image, np.ndarray] | None]:
    """The `rank`-th normal photo's painted copy: its defect type (`defect_types` cycled), whether the defect was
    centred on the car (the photo has part polygons in `polygons`), and `paint_one_defect`'s result."""
    defect_type = defect_types[rank % len(defect_types)]
    source = polygons.get(sample.image_id)
    region = None if source is None else region_of(source, sample.image.height, sample.image.width)
    painted = paint_one_defect(sample.image, specs[defect_type], seed, sample.image_id, region)
    return defect_type, region is not None, painted


def peak_on_defect(anomaly_map: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's argmax lies inside `mask` dilated by `PEAK_TOLERANCE` of the shorter side."""
    reach = PEAK_TOLERANCE * min(mask.shape)
    near_defect = ndimage.distance_transform_edt(~mask) <= reach
    y, x = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    return bool(near_defect[y, x])


def measure(
    model_dir: str,
    repo: str,
    *,
    config: str,
    split: str = "test",
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    defect_types: Sequence[str] = CARS_AD_ANOMALIES,
    data_dir: Path | None = None,
    seed: int = 0,
    limit: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score the split's normal photos and their painted copies through the app's Anomaly tab; see the module
    docstring. Returns the summary and every photo's row."""
    scorer = load_anomaly_model(model_dir)
    if scorer.image_threshold is None:  # every verdict would read "uncalibrated": nothing to measure
        raise ValueError(
            f"{model_dir}: the model has no image threshold (fitted without calibration images), so the app "
            "gives no OK / NG; fit it with a validation split or held-out normal images"
        )
    processor = anomaly_processor(scorer, tile_size, tile_overlap)  # as app.build_demo_app builds it
    specs = defect_specs(dict.fromkeys(defect_types, 1), config, load_taxonomy())
    polygons = car_samples(data_dir)
    normals = (s for s in iter_anomaly_split(repo, config, split) if s.is_normal)
    rows: list[dict[str, Any]] = []
    inspect_seconds = 0.0
    inspections = 0
    for rank, sample in enumerate(
        tqdm(normals, desc=f"{config}/{split} normal photos", total=limit, disable=not show_progress)
    ):
        if limit is not None and rank >= limit:
            break
        started = time.perf_counter()
        normal = inspect_image(scorer, sample.image, processor)
        inspect_seconds += time.perf_counter() - started
        inspections += 1
        defect_type, centred_on_car, painted = painted_copy(sample, rank, specs, defect_types, polygons, seed)
        row: dict[str, Any] = {
            "image_id": sample.image_id,
            "normal_score": normal.score,
            "normal_verdict": normal.verdict,
            "defect_type": defect_type,
            "centred_on_car": centred_on_car,
        }
        if painted is None:
            row["painted"] = False
        else:
            image, mask = painted
            started = time.perf_counter()
            result = inspect_image(scorer, image, processor)
            inspect_seconds += time.perf_counter() - started
            inspections += 1
            row.update(
                painted=True,
                defect_area=float(mask.mean()),
                painted_score=result.score,
                painted_verdict=result.verdict,
                peak_on_defect=peak_on_defect(result.anomaly_map, mask),
            )
        rows.append(row)
    if not rows:
        raise ValueError(f"{repo}: split {split!r} of config {config!r} has no normal photos")
    return summarize(rows, inspect_seconds / max(inspections, 1)) | {
        "model": str(model_dir),
        "repo": str(repo),
        "config": config,
        "split": split,
        "tile_size": processor.tile_size,
        "tile_overlap": processor.tile_overlap,
        "seed": seed,
        "rows": rows,
    }


def _rates(painted: list[dict[str, Any]]) -> dict[str, Any]:
    ng = sum(row["painted_verdict"] == NG for row in painted)
    on_defect = sum(row["painted_verdict"] == NG and row["peak_on_defect"] for row in painted)
    return {
        "painted": len(painted),
        "ng_on_painted": ng,
        "ng_on_painted_percent": percent(ng, len(painted)),
        "ng_with_peak_on_defect": on_defect,
        "ng_with_peak_on_defect_percent": percent(on_defect, len(painted)),
    }


def summarize(rows: list[dict[str, Any]], seconds_per_photo: float) -> dict[str, Any]:
    """The counts and percentages: OK over the normal photos, NG and NG-with-the-peak-on-the-defect over the
    painted ones (a photo whose defect found no place counts as normal only), overall and per defect type."""
    painted = [row for row in rows if row["painted"]]
    ok = sum(row["normal_verdict"] == OK for row in rows)
    per_type = {
        defect_type: _rates([row for row in painted if row["defect_type"] == defect_type])
        for defect_type in dict.fromkeys(row["defect_type"] for row in painted)
    }
    return {
        "photos": len(rows),
        "ok_on_normals": ok,
        "ok_on_normals_percent": percent(ok, len(rows)),
        "defect_not_placed": len(rows) - len(painted),
        **_rates(painted),
        "per_defect_type": per_type,
        "seconds_per_photo": seconds_per_photo,
    }


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def markdown(summary: dict[str, Any]) -> str:
    tiles = (
        f"tiles {summary['tile_size']} px, overlap {summary['tile_overlap']}"
        if summary["tile_size"]
        else "whole"
    )
    lines = [
        f"`{summary['model']}` on `{summary['repo']}` {summary['config']}/{summary['split']} ({tiles})",
        "",
        "| photos | OK on normals % | NG on painted % | NG with peak on the defect % | s / photo |",
        "|---:|---:|---:|---:|---:|",
        f"| {summary['photos']} | {_cell(summary['ok_on_normals_percent'])} | "
        f"{_cell(summary['ng_on_painted_percent'])} | {_cell(summary['ng_with_peak_on_defect_percent'])} | "
        f"{summary['seconds_per_photo']:.3f} |",
        "",
        "| defect type | painted | NG % | NG with peak on the defect % |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {rates['painted']} | {_cell(rates['ng_on_painted_percent'])} | "
        f"{_cell(rates['ng_with_peak_on_defect_percent'])} |"
        for name, rates in summary["per_defect_type"].items()
    ]
    if summary["defect_not_placed"]:
        lines += ["", f"{summary['defect_not_placed']} photo(s) had no room for their defect (normal only)."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/demo_route.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", help="model folder of `cadmtl anomaly fit` / `train` (the app's CADMTL_ANOMALY_MODEL)"
    )
    parser.add_argument("repo", help="repo folder (or Hub id) holding the _ad config")
    parser.add_argument("--config", default="cars_ad", help="the _ad config (cars_ad)")
    parser.add_argument("--split", default="test", help="whose normal photos are measured (test)")
    parser.add_argument(
        "--tile-size", type=int, help="override the scorer's saved tiles (the app's CADMTL_TILE_SIZE)"
    )
    parser.add_argument("--tile-overlap", type=int, help="override the saved overlap (CADMTL_TILE_OVERLAP)")
    parser.add_argument(
        "--defect-types",
        nargs="+",
        default=list(CARS_AD_ANOMALIES),
        help="taxonomy anomalies painted, cycled over the photos (cars_ad's seven)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data"),
        help="holds carparts_dsmlr, whose part polygons centre the defects on the car (../shared/data)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the painter's seed (0)")
    parser.add_argument("--limit", type=int, help="measure only the first N normal photos")
    parser.add_argument("--output", type=Path, default=Path("demo_route.json"), help="JSON to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = measure(
            args.model,
            args.repo,
            config=args.config,
            split=args.split,
            tile_size=args.tile_size,
            tile_overlap=args.tile_overlap,
            defect_types=args.defect_types,
            data_dir=args.data,
            seed=args.seed,
            limit=args.limit,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = markdown(summary)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
