"""Reference / query pairs for one-shot reference-guided localisation, written as a dataset repo folder.

A pairs repo holds one config, ``pairs``, whose splits keep the names of the split they were built from. Each row
pairs a **query** image (normal or anomalous) with a **reference**: a normal image of the same category,
"re-photographed" with a controlled misalignment (shift, scale, rotation, brightness). The misalignment is applied
to the reference only, so the query's boxes and mask stay exact.

Two sources:

* ``real`` (:func:`build_real_pairs`): every image of an ``*_ad`` split is a query (anomalous AND normal ones);
  its reference is a seeded draw from the normal images of the config's ``train`` split.
* ``synthetic`` (:func:`build_synthetic_pairs`): the normal images of a split are painted with exact-mask
  defects (``dataset_scripts.synthetic.place_defects``) for about half of the pairs; the reference is the clean
  image itself re-photographed, the query the painted one (or the clean one for a normal pair).

Columns (:func:`pair_features`): ``pair_id``, ``query_id``, ``reference_id`` (the same id for pairs sharing one
rendered reference, which lets the localiser cache its features), ``reference`` / ``query`` images, ``box``
(xyxy pixel edges of the query enclosing every anomalous pixel, ``[0, 0, 0, 0]`` when normal), ``boxes`` (one per
8-connected defect region, largest first), ``mask`` (0 / 1 / 255 PNG at the query's size), ``has_anomaly``,
``category``, ``defect_type``, ``source`` (``real`` / ``synthetic``), ``misalignment`` (the level name) and
``misalignment_params`` (JSON: the shift in pixels, scale, rotation in degrees and brightness gain applied).

Bad input:

* a reference of a different size than its query is kept at its own size when the aspect ratios agree within
  :data:`MAX_ASPECT_CHANGE` (the localiser resizes both images to the same square input, so its maps and boxes
  are in the query's frame either way, and one rendered reference can serve many queries); with very different
  shapes the reference is resized to the query's size (bilinear, its aspect ratio changes) before the
  misalignment, counted as ``resized_references`` (and its ``reference_id`` carries the size);
* an anomalous image in the reference pool (train split, or a normal-marked image with anomalous mask pixels)
  is never used as a reference: it is skipped and counted (``anomalous_references``); no normal reference at
  all is an error;
* a split that yields no pair is an error naming the repo, config and split.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Features, Image, List, Value
from PIL import Image as PILImage

from cadmtl.anomaly.metrics import connected_components
from cadmtl.data.pipeline import encoded_bytes, load_split
from dataset_scripts.images import encode_png, to_rgb
from dataset_scripts.options import add_output_dir_option, add_seed_option
from dataset_scripts.schema import AD, GOOD, kind_of_config
from dataset_scripts.synthetic import DefectSpec, place_defects
from dataset_scripts.taxonomy import SYNTHESIS_STYLES
from dataset_scripts.writer import SPLITS, shard_files, split_names, write_split

PAIRS_CONFIG = "pairs"
SOURCES = ("real", "synthetic")
ZERO_BOX = [0.0, 0.0, 0.0, 0.0]
ANOMALOUS_PIXEL, IGNORED_PIXEL = 1, 255

# Largest |shift| (fraction of each side), |scale - 1|, |rotation| (degrees), |brightness gain - 1| per level;
# each pair draws its parameters uniformly within these bounds (signs at random).
MISALIGNMENT_LEVELS: dict[str, dict[str, float]] = {
    "none": {"shift": 0.0, "scale": 0.0, "rotation": 0.0, "brightness": 0.0},
    "small": {"shift": 0.02, "scale": 0.03, "rotation": 2.0, "brightness": 0.05},
    "medium": {"shift": 0.05, "scale": 0.08, "rotation": 5.0, "brightness": 0.15},
    "large": {"shift": 0.10, "scale": 0.15, "rotation": 10.0, "brightness": 0.25},
}
DEFAULT_LEVELS = ("none", "small", "medium")
MAX_ASPECT_CHANGE = 1.25  # a reference whose width / height differs more from the query's is resized to it


def pair_features() -> Features:
    """The ``datasets.Features`` of the ``pairs`` config."""
    return Features(
        {
            "pair_id": Value("string"),
            "query_id": Value("string"),
            "reference_id": Value("string"),
            "reference": Image(),
            "query": Image(),
            "box": List(Value("float32"), length=4),
            "boxes": List(List(Value("float32"), length=4)),
            "mask": Image(),
            "has_anomaly": Value("bool"),
            "category": Value("string"),
            "defect_type": Value("string"),
            "source": Value("string"),
            "misalignment": Value("string"),
            "misalignment_params": Value("string"),
        }
    )


# ------------------------------------------------------------------------------------------------ geometry
def mask_boxes(mask: np.ndarray) -> tuple[list[float], list[list[float]]]:
    """(enclosing box, one box per 8-connected region) of the anomalous pixels (value 1) of a 0/1/255 mask.

    Boxes are xyxy pixel edges (a region over columns 3..5 spans x1 = 3, x2 = 6), as the localiser's
    ``boxes_from_map``; regions are ordered by area, largest first. No anomalous pixel: ``[0, 0, 0, 0]`` and [].
    """
    anomalous = np.asarray(mask) == ANOMALOUS_PIXEL
    if not anomalous.any():
        return list(ZERO_BOX), []
    ys, xs = np.nonzero(anomalous)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    labels, count = connected_components(anomalous)
    regions = []
    for label in range(1, count + 1):
        ys, xs = np.nonzero(labels == label)
        if ys.size:
            regions.append(
                (ys.size, [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
            )
    regions.sort(key=lambda item: -item[0])
    return box, [region for _, region in regions]


def similar_shapes(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """True when two (width, height) sizes have aspect ratios within :data:`MAX_ASPECT_CHANGE` of each other."""
    ratio = (a[0] / a[1]) / (b[0] / b[1])
    return 1 / MAX_ASPECT_CHANGE <= ratio <= MAX_ASPECT_CHANGE


def draw_misalignment(level: str, size: tuple[int, int], rng: np.random.Generator) -> dict[str, Any]:
    """Random parameters within ``level``'s bounds for an image of (height, width)."""
    if level not in MISALIGNMENT_LEVELS:
        raise ValueError(f"unknown misalignment level {level!r}; known: {list(MISALIGNMENT_LEVELS)}")
    bounds = MISALIGNMENT_LEVELS[level]
    height, width = size

    def signed(limit: float) -> float:
        return float(rng.uniform(-limit, limit)) if limit > 0 else 0.0

    return {
        "level": level,
        "dx": round(signed(bounds["shift"]) * width, 2),
        "dy": round(signed(bounds["shift"]) * height, 2),
        "scale": round(1.0 + signed(bounds["scale"]), 4),
        "rotation": round(signed(bounds["rotation"]), 3),
        "brightness": round(1.0 + signed(bounds["brightness"]), 4),
    }


def rephotograph(image: PILImage.Image, params: dict[str, Any]) -> PILImage.Image:
    """``image`` re-photographed: rotated and scaled about its centre, shifted by (dx, dy) pixels, its
    brightness multiplied; borders are filled by reflection (no black wedges for the localiser to flag)."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    if params["dx"] == params["dy"] == params["rotation"] == 0 and params["scale"] == 1:
        out = array
    else:
        height, width = array.shape[:2]
        angle = math.radians(params["rotation"])
        cos, sin = math.cos(angle) / params["scale"], math.sin(angle) / params["scale"]
        # affine_grid maps output to input coordinates in [-1, 1]; account for the aspect ratio in the rotation.
        theta = torch.tensor(
            [
                [cos, -sin * height / width, -2 * params["dx"] / width],
                [sin * width / height, cos, -2 * params["dy"] / height],
            ],
            dtype=torch.float32,
        )[None]
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None]
        grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
        out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        out = out[0].permute(1, 2, 0).numpy()
    out = np.clip(out * params["brightness"], 0.0, 1.0)
    return PILImage.fromarray((out * 255.0 + 0.5).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class _AdImage:
    image_id: str
    image_bytes: bytes
    mask: np.ndarray
    is_normal: bool
    defect_type: str

    def image(self) -> PILImage.Image:
        return to_rgb(PILImage.open(io.BytesIO(self.image_bytes)))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), read from the header only."""
        return PILImage.open(io.BytesIO(self.image_bytes)).size


def _iter_ad(repo: str, config: str, split: str) -> Iterator[_AdImage]:
    """The rows of an ``_ad`` split with the image kept encoded (queries are stored as they came)."""
    if kind_of_config(config) != AD:
        raise ValueError(f"{config!r} is not an anomaly-detection config (its name must end in _ad)")
    dataset = load_split(repo, config, split, streaming=True)
    names = dataset.features["defect_type"].names
    for row in dataset.decode(False):
        mask = np.asarray(PILImage.open(io.BytesIO(encoded_bytes(row["mask"]))), dtype=np.uint8)
        defect = row["defect_type"]
        yield _AdImage(
            image_id=str(row["image_id"]),
            image_bytes=encoded_bytes(row["image"]),
            mask=mask,
            is_normal=bool(row["is_normal"]),
            defect_type=names[defect] if isinstance(defect, int) else str(defect),
        )


# ------------------------------------------------------------------------------------------------ building
@dataclass
class BuildReport:
    """What a build did: rows per split, and the counted skips and fixes."""

    rows: dict[str, int] = field(default_factory=dict)
    anomalous_pairs: dict[str, int] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        lines = [
            f"{split}: {rows} pairs ({self.anomalous_pairs.get(split, 0)} anomalous)"
            for split, rows in self.rows.items()
        ]
        lines += [f"{name}: {count}" for name, count in sorted(self.counts.items()) if count]
        return "\n".join(lines)


def _category(config: str, category: str | None) -> str:
    return category or config[: -len("_ad")]


def _png(image: PILImage.Image | np.ndarray) -> dict[str, Any]:
    array = np.asarray(image)
    return {"bytes": encode_png(array), "path": None}


def _reference_pool(repo: str, config: str, counts: Counter) -> list[_AdImage]:
    pool = []
    for sample in _iter_ad(repo, config, "train"):
        if not sample.is_normal or sample.defect_type != GOOD or (sample.mask == ANOMALOUS_PIXEL).any():
            counts["anomalous_references"] += 1
            continue
        pool.append(sample)
    if not pool:
        raise ValueError(
            f"{repo}/{config}: the train split has no normal image to use as a reference "
            f"({counts['anomalous_references']} anomalous ones were refused)"
        )
    return pool


def _pair_row(
    pair_id: str,
    query_id: str,
    reference_id: str,
    reference: PILImage.Image | bytes,
    query: PILImage.Image | bytes,
    mask: np.ndarray,
    category: str,
    defect_type: str,
    source: str,
    params: dict[str, Any],
) -> dict[str, Any]:
    box, boxes = mask_boxes(mask)
    return {
        "pair_id": pair_id,
        "query_id": query_id,
        "reference_id": reference_id,
        "reference": {"bytes": reference, "path": None} if isinstance(reference, bytes) else _png(reference),
        "query": {"bytes": query, "path": None} if isinstance(query, bytes) else _png(query),
        "box": box,
        "boxes": boxes,
        "mask": _png(mask.astype(np.uint8)),
        "has_anomaly": bool(boxes),
        "category": category,
        "defect_type": defect_type,
        "source": source,
        "misalignment": params["level"],
        "misalignment_params": json.dumps(params, sort_keys=True),
    }


def _check_levels(levels: Sequence[str]) -> list[str]:
    levels = list(levels)
    unknown = [level for level in levels if level not in MISALIGNMENT_LEVELS]
    if not levels or unknown:
        raise ValueError(
            f"misalignment levels {unknown or levels} unknown; choose from {list(MISALIGNMENT_LEVELS)}"
        )
    return levels


def build_real_pairs(
    repo: str,
    config: str,
    split: str,
    *,
    seed: int = 0,
    levels: Sequence[str] = DEFAULT_LEVELS,
    category: str | None = None,
    report: BuildReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows pairing every image of ``config/split`` with a seeded normal reference from ``config/train``.

    The reference is drawn among the train images whose shape is similar to the query's
    (:func:`similar_shapes`), or among all of them (then resized) when none is.

    Each (reference image, level) is rendered once, with parameters drawn from a generator seeded by ``seed``
    and the reference's index, so pairs that share it share the ``reference_id`` (and the localiser's cache).
    """
    levels = _check_levels(levels)
    report = report if report is not None else BuildReport()
    counts = report.counts
    pool = _reference_pool(repo, config, counts)
    pool_sizes = [sample.size for sample in pool]
    rng = np.random.default_rng([seed, 0])
    rendered: dict[tuple, tuple[str, bytes, dict[str, Any]]] = {}
    category = _category(config, category)
    index = 0
    for query in _iter_ad(repo, config, split):
        query_size = PILImage.open(io.BytesIO(query.image_bytes)).size  # (width, height)
        similar = [i for i, size in enumerate(pool_sizes) if similar_shapes(size, query_size)]
        candidates = similar or range(len(pool))  # a reference of a similar shape when there is one
        choice = candidates[int(rng.integers(len(candidates)))]
        level = levels[int(rng.integers(len(levels)))]
        if not query.is_normal and not (query.mask == ANOMALOUS_PIXEL).any():
            counts["anomalous_without_mask_pixels"] += 1  # its box is unknown: no pair to score
            continue
        resize = not similar_shapes(pool_sizes[choice], query_size)
        key = (choice, level, query_size if resize else None)
        if key not in rendered:
            reference = pool[choice].image()
            size_tag = ""
            if resize:
                counts["resized_references"] += 1
                reference = reference.resize(query_size, PILImage.BILINEAR)
                size_tag = f"@{query_size[0]}x{query_size[1]}"
            level_rng = np.random.default_rng([seed, 1, choice, levels.index(level)])
            params = draw_misalignment(level, (reference.height, reference.width), level_rng)
            reference_id = f"{pool[choice].image_id}#{level}{size_tag}"
            rendered[key] = (reference_id, encode_png(np.asarray(rephotograph(reference, params))), params)
        reference_id, reference_png, params = rendered[key]
        index += 1
        yield _pair_row(
            f"{split}-{index - 1:05d}",
            query.image_id,
            reference_id,
            reference_png,
            query.image_bytes,
            query.mask,
            category,
            query.defect_type,
            "real",
            params,
        )


def build_synthetic_pairs(
    repo: str,
    config: str,
    split: str,
    *,
    seed: int = 0,
    levels: Sequence[str] = DEFAULT_LEVELS,
    category: str | None = None,
    anomalous_fraction: float = 0.5,
    max_defects: int = 2,
    report: BuildReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows built from the normal images of ``config/split``: about ``anomalous_fraction`` of them are painted
    with 1..``max_defects`` synthetic defects (the query), the reference is the clean image re-photographed."""
    levels = _check_levels(levels)
    if not 0 <= anomalous_fraction <= 1:
        raise ValueError(f"anomalous_fraction must be in [0, 1], got {anomalous_fraction}")
    report = report if report is not None else BuildReport()
    category = _category(config, category)
    rng = np.random.default_rng([seed, 2])
    index = 0
    for sample in _iter_ad(repo, config, split):
        if not sample.is_normal or (sample.mask == ANOMALOUS_PIXEL).any():
            report.counts["anomalous_sources_skipped"] += 1
            continue
        clean = sample.image()
        level = levels[int(rng.integers(len(levels)))]
        params = draw_misalignment(level, (clean.height, clean.width), rng)
        reference = rephotograph(clean, params)
        mask = np.zeros((clean.height, clean.width), np.uint8)
        query: PILImage.Image | bytes = sample.image_bytes
        defect_type = GOOD
        # exactly floor(n * fraction) painted queries among the first n, spread evenly
        if math.floor((index + 1) * anomalous_fraction) > math.floor(index * anomalous_fraction):
            styles = rng.choice(SYNTHESIS_STYLES, size=int(rng.integers(1, max_defects + 1)))
            painted, placed = place_defects(np.asarray(clean), [DefectSpec(str(s)) for s in styles], rng)
            if placed:
                query = PILImage.fromarray(painted)
                for defect in placed:
                    mask[defect.mask] = ANOMALOUS_PIXEL
                defect_type = "+".join(sorted({d.style for d in placed}))
            else:
                report.counts["defects_not_placed"] += 1
        yield _pair_row(
            f"{split}-synthetic-{index:05d}",
            sample.image_id,
            f"{sample.image_id}#{level}",
            reference,
            query,
            mask,
            category,
            defect_type,
            "synthetic",
            params,
        )
        index += 1


def write_pairs_card(out: str | Path) -> Path:
    """A minimal dataset card declaring the ``pairs`` config and its splits (so ``load_dataset`` finds them)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    out = Path(out)
    splits = sorted(split_names(out, PAIRS_CONFIG), key=lambda s: (SPLITS.index(s) if s in SPLITS else 9, s))
    data = DatasetCardData(
        pretty_name=out.name,
        license="other",
        task_categories=["object-detection"],
        tags=["automotive", "anomaly-detection", "reference-guided"],
    )
    data["configs"] = [
        {
            "config_name": PAIRS_CONFIG,
            "default": True,
            "data_files": [{"split": s, "path": f"{PAIRS_CONFIG}/{s}-*.parquet"} for s in splits],
        }
    ]
    text = (
        f"---\n{data.to_yaml()}\n---\n\n# {out.name}\n\nReference / query pairs for reference-guided defect "
        "localisation, built by `cadmtl reference build-pairs` (see `cadmtl/reference/pairs.py` for the "
        "columns).\n\n```python\nfrom datasets import load_dataset\n"
        f'pairs = load_dataset("{out}", "{PAIRS_CONFIG}", split="{splits[0] if splits else "test"}", '
        "streaming=True)\n```\n"
    )
    card = DatasetCard(text)
    path = out / "README.md"
    card.save(path)
    return path


def build_pairs(
    repo: str,
    config: str,
    split: str,
    out: str | Path,
    *,
    source: str = "real",
    seed: int = 0,
    levels: Sequence[str] = DEFAULT_LEVELS,
    category: str | None = None,
    overwrite: bool = False,
    anomalous_fraction: float = 0.5,
) -> BuildReport:
    """Write ``out/pairs/<split>-*.parquet`` and the card; returns the :class:`BuildReport`."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    report = BuildReport()
    builder = build_real_pairs if source == "real" else build_synthetic_pairs
    options: dict[str, Any] = {"seed": seed, "levels": levels, "category": category, "report": report}
    if source == "synthetic":
        options["anomalous_fraction"] = anomalous_fraction
    anomalous = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal anomalous
        for row in builder(str(repo), config, split, **options):
            anomalous += row["has_anomaly"]
            yield row

    try:
        result = write_split(
            out,
            PAIRS_CONFIG,
            split,
            rows(),
            pair_features(),
            existing="replace" if overwrite else "error",
            shuffle_rows=False,
        )
    except ValueError as error:
        if "would be empty" in str(error):
            raise ValueError(
                f"{repo}/{config}/{split}: no pair was built ({source} source; counts: {dict(report.counts)})"
            ) from error
        raise
    report.rows[split] = result.num_rows
    report.anomalous_pairs[split] = anomalous
    write_pairs_card(out)
    (Path(out) / PAIRS_CONFIG / f"build-{split}.json").write_text(
        json.dumps(
            {
                "repo": str(repo),
                "config": config,
                "split": split,
                "source": source,
                "seed": seed,
                "levels": list(levels),
                "rows": result.num_rows,
                "anomalous_pairs": anomalous,
                "counts": dict(report.counts),
            },
            indent=2,
        )
        + "\n"
    )
    return report


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Pair:
    """One decoded pair: RGB images of the same size, the query's boxes (xyxy pixels) and mask (0/1/255)."""

    pair_id: str
    query_id: str
    reference_id: str
    reference: PILImage.Image
    query: PILImage.Image
    box: list[float]
    boxes: list[list[float]]
    mask: np.ndarray | None
    has_anomaly: bool
    category: str
    defect_type: str
    source: str
    misalignment: str
    misalignment_params: dict[str, Any]


def _open_pairs(repo: str | Path, split: str, columns: Sequence[str] | None = None):
    import datasets

    repo = str(repo)
    if Path(repo).is_dir():
        files = shard_files(repo, PAIRS_CONFIG, split)
        if not files:
            raise ValueError(
                f"{repo}: the pairs repo has no split {split!r}; available splits: "
                f"{split_names(repo, PAIRS_CONFIG)} (build it with `cadmtl reference build-pairs ... --split {split}`)"
            )
        dataset = datasets.load_dataset(
            "parquet", data_files={split: [str(f) for f in files]}, split=split, streaming=True
        )
    elif Path(repo).exists() or repo.startswith((".", "/")):
        raise ValueError(f"{repo}: not a pairs repo folder (build one with `cadmtl reference build-pairs`)")
    else:
        try:
            dataset = datasets.load_dataset(repo, PAIRS_CONFIG, split=split, streaming=True)
        except Exception as error:  # datasets raises many types (offline, missing repo, missing split)
            raise ValueError(f"cannot open split {split!r} of pairs repo {repo!r}: {error}") from error
    if columns is not None:
        dataset = dataset.select_columns(list(columns))
    return dataset.decode(False)


def load_pairs(repo: str | Path, split: str, with_images: bool = True) -> Iterator[Pair]:
    """The pairs of ``split``, streamed in stored order; ``with_images=False`` skips decoding the images
    (``reference`` / ``query`` are then None) for evaluation."""
    columns = None if with_images else [c for c in pair_features() if c not in ("reference", "query")]
    count = 0
    for row in _open_pairs(repo, split, columns):
        count += 1
        mask = row.get("mask")
        yield Pair(
            pair_id=row["pair_id"],
            query_id=row["query_id"],
            reference_id=row["reference_id"],
            reference=to_rgb(PILImage.open(io.BytesIO(encoded_bytes(row["reference"]))))
            if with_images
            else None,
            query=to_rgb(PILImage.open(io.BytesIO(encoded_bytes(row["query"])))) if with_images else None,
            box=[float(v) for v in row["box"]],
            boxes=[[float(v) for v in b] for b in row["boxes"]],
            mask=None
            if mask is None
            else np.asarray(PILImage.open(io.BytesIO(encoded_bytes(mask))), dtype=np.uint8),
            has_anomaly=bool(row["has_anomaly"]),
            category=row["category"],
            defect_type=row["defect_type"],
            source=row["source"],
            misalignment=row["misalignment"],
            misalignment_params=json.loads(row["misalignment_params"]),
        )
    if count == 0:
        raise ValueError(f"{repo}: split {split!r} of the pairs repo is empty")


# ------------------------------------------------------------------------------------------------ command
EXAMPLE = (
    "example:\n"
    "  cadmtl reference build-pairs data/cad100k-mini --config exterior_ad --split test --output-dir data/pairs\n"
    "  cadmtl reference build-pairs data/cad100k-mini --config exterior_ad --split validation --output-dir data/pairs\n"
    "  cadmtl reference build-pairs REPO --config tile_ad --split test --output-dir PAIRS --source synthetic"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadmtl reference build-pairs",
        description="Pair every query image of an _ad split with a re-photographed normal reference.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("repo", help="dataset repo folder or Hub id holding the _ad config")
    parser.add_argument("--config", required=True, help="the NAME_ad config")
    parser.add_argument(
        "--split", required=True, help="the split whose images become queries (kept as the name)"
    )
    add_output_dir_option(parser, "pairs repo folder to write (config `pairs`)", old=["--out"])
    add_seed_option(parser, 0, "seed of the reference draws and misalignments")
    parser.add_argument(
        "--levels",
        nargs="+",
        default=list(DEFAULT_LEVELS),
        choices=list(MISALIGNMENT_LEVELS),
        help=f"misalignment levels drawn per pair (default {' '.join(DEFAULT_LEVELS)})",
    )
    parser.add_argument(
        "--category", default=None, help="category name (default: the config name without _ad)"
    )
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="real",
        help="real: the split's own images; synthetic: defects painted on its normal images",
    )
    parser.add_argument(
        "--anomalous-fraction", type=float, default=0.5, help="synthetic: share of painted queries (0.5)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing split of the pairs repo"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`cadmtl reference build-pairs`."""
    args = build_parser().parse_args(argv)
    report = build_pairs(
        args.repo,
        args.config,
        args.split,
        args.output_dir,
        source=args.source,
        seed=args.seed,
        levels=args.levels,
        category=args.category,
        overwrite=args.overwrite,
        anomalous_fraction=args.anomalous_fraction,
    )
    print(f"wrote {args.output_dir}/{PAIRS_CONFIG}\n{report.summary()}")
    return 0
