"""Composite procedural defects onto normal images and add them to a config split (``source = synthetic``).

    cadmtl data synthesize NORMAL_DIR --output-dir REPO_DIR --config exterior_seg
        --counts corrosion=20,missing_part=10 [--split train] [--instances 1] [--with-normals] [--seed 0]

NORMAL_DIR holds defect-free images (any image format, sub-folders allowed). For each ``anomaly=count``
the command paints ``count`` samples of that taxonomy anomaly, each on the next normal image (in a seeded
order), with the anomaly's ``synthesis`` style from ``taxonomy.yaml``. Every sample carries its exact
mask (seg) or tight box (det) or its class (cls). ``--with-normals`` also adds each normal image that was
used, once, as a normal sample (``source`` as ``--normal-source`` says, ``real`` by default): the
matching normal images the paper pairs with synthetic defects. Rows are appended to the split (or it is
created); the normal images are checked like any converted image and problems go to the report.
"""

from __future__ import annotations

import argparse
import io
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .conversion import SplitTarget
from .convert import add_output_arguments
from .images import (
    DEFAULT_MAX_PIXELS,
    StoredImage,
    image_extensions,
    read_image,
    relative_key,
    stored_from_array,
)
from .options import add_seed_option, exit_status
from .report import ValidationError, ValidationReport
from .schema import CONFIG_SCHEMAS, Instance, task_of_config
from .synthetic import DefectSpec, PlacedDefect, place_defects
from .taxonomy import Taxonomy, load_taxonomy
from .writer import DEFAULT_MAX_SHARD_SIZE, SplitWriteResult

DEFAULT_RADIUS = (0.08, 0.16)  # of the shorter image side


@dataclass
class SynthesisResult:
    report: ValidationReport
    written: SplitWriteResult
    counts: dict[str, int]


def parse_counts(text: str) -> dict[str, int]:
    """``"dent=20,scratch=5"`` -> ``{"dent": 20, "scratch": 5}``."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if not value.strip().isdigit() or int(value) <= 0:
            raise ValueError(f"--counts entry {item!r} must look like anomaly=N with N > 0")
        counts[name.strip()] = int(value)
    if not counts:
        raise ValueError("--counts is empty; give anomaly=N pairs, e.g. corrosion=20,dent=10")
    return counts


def defect_specs(counts: dict[str, int], config: str, taxonomy: Taxonomy) -> dict[str, DefectSpec]:
    """The paint style of each requested anomaly; clear errors for unknown or unpaintable ones."""
    domain = taxonomy.domain_of_config(config)
    specs, problems = {}, []
    for name in counts:
        if name not in taxonomy or taxonomy.node(name).kind != "anomaly":
            problems.append(f"{name!r} is not an anomaly of the taxonomy")
            continue
        node = taxonomy.node(name)
        if domain is not None and node.domain != domain:
            problems.append(f"{name!r} belongs to domain {node.domain!r}, not to {config!r}")
        elif node.synthesis is None:
            problems.append(f"{name!r} has no 'synthesis' style in the taxonomy; add one to paint it")
        else:
            specs[name] = DefectSpec(node.synthesis, name, node.color)
    if problems:
        raise ValueError("; ".join(problems))
    return specs


def _normal_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: normal-image folder not found")
    extensions = image_extensions()
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(f"{folder}: no images found")
    return files


def _row(
    task: str,
    target: SplitTarget,
    image: StoredImage,
    image_id: str,
    placed: list[PlacedDefect],
    lineage: tuple[str, str, str],
    source: str,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "image": image.feature(),
        "image_id": image_id,
        "width": image.width,
        "height": image.height,
        "domain": lineage[0],
        "system": lineage[1],
        "part": lineage[2],
        "source": source,
        "is_normal": not placed,
    }
    schema = CONFIG_SCHEMAS[task]
    instances = [Instance(target.class_id[p.anomaly], p.bbox, p.area, p.mask) for p in placed]
    empty_class = target.class_id[schema.normal_class] if schema.normal_class and not placed else None
    # Deterministic object ids, unique in practice: a checksum of the image id plus the instance number.
    ids = [zlib.crc32(image_id.encode()) * 64 + k for k in range(len(placed))]
    return row | schema.instance_columns(instances, (image.height, image.width), empty_class, ids)


def synthesize(
    normal_dir: str | Path,
    repo_dir: str | Path,
    config: str,
    counts: dict[str, int],
    *,
    split: str = "train",
    seed: int = 0,
    instances: int = 1,
    radius_range: tuple[float, float] = DEFAULT_RADIUS,
    with_normals: bool = False,
    normal_source: str = "real",
    existing: str = "append",
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_shards: int | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    taxonomy: Taxonomy | None = None,
    show_progress: bool = True,
) -> SynthesisResult:
    """Paint ``counts`` defects onto the images of ``normal_dir`` into ``config``/``split`` of ``repo_dir``."""
    taxonomy = taxonomy or load_taxonomy()
    task = task_of_config(config)
    schema = CONFIG_SCHEMAS[task]
    if schema.one_label_per_image and instances != 1:
        raise ValueError("classification samples hold exactly one defect; use --instances 1")
    if normal_source not in ("real", "converted", "synthetic"):
        raise ValueError(f"--normal-source must be real, converted or synthetic, got {normal_source!r}")
    specs = defect_specs(counts, config, taxonomy)
    normal_dir = Path(normal_dir)
    files = _normal_files(normal_dir)
    description = ", ".join(f"{name} {count}" for name, count in counts.items())
    report = ValidationReport(
        config,
        split,
        strict,
        {"format": "synthetic", "path": str(normal_dir), "description": f"procedural defects: {description}"},
    )
    targets = list(counts) + ([schema.normal_class] if schema.normal_class and with_normals else [])
    if schema.background:
        targets.append(schema.background)
    target = SplitTarget(
        repo_dir,
        config,
        split,
        targets,
        taxonomy,
        existing=existing,
        num_shards=num_shards,
        max_shard_size=max_shard_size,
    )
    rng = np.random.default_rng(seed)
    order = [files[i] for i in rng.permutation(len(files))]
    domain = taxonomy.domain_of_config(config) or ""
    loaded: dict[Path, StoredImage | None] = {}
    used: list[Path] = []
    jobs = [name for name, count in counts.items() for _ in range(count)]
    try:
        cursor = 0
        for number, anomaly in enumerate(
            tqdm(jobs, desc=f"synthesize {config}/{split}", disable=not show_progress)
        ):
            normal = None
            for _ in range(len(order)):  # next usable normal image, round robin
                path = order[cursor % len(order)]
                cursor += 1
                if path not in loaded:
                    report.rows_seen += 1
                    loaded[path] = read_image(
                        path, relative_key(path, normal_dir), report, max_pixels=max_pixels
                    )
                if loaded[path] is not None:
                    normal = (path, loaded[path])
                    break
            if normal is None:
                report.error(f"no usable normal image in {normal_dir}")
                break
            path, stored = normal
            pixels = np.asarray(Image.open(io.BytesIO(stored.data)).convert("RGB"))
            image, placed = place_defects(
                pixels, [specs[anomaly]] * instances, rng, radius_range=radius_range
            )
            if not placed:
                report.error(f"{relative_key(path, normal_dir)} is too small to hold a {anomaly} defect")
                continue
            synthetic = stored_from_array(image, "JPEG" if stored.format == "JPEG" else "PNG")
            stem = PurePosixPath(relative_key(path, normal_dir)).with_suffix("")
            lineage = taxonomy.common_lineage([anomaly])
            lineage = (lineage[0] or domain, lineage[1], lineage[2])
            image_id = f"{split}/synthetic/{anomaly}/{stem}-{number:06d}"
            target.add(
                _row(task, target, synthetic, image_id, placed, lineage, "synthetic"), synthetic, report
            )
            if path not in used:
                used.append(path)
        if with_normals:
            for path in used:
                stored = loaded[path]
                duplicate = target.duplicate_of(stored)
                if duplicate is not None:
                    report.add(
                        "duplicate_image", relative_key(path, normal_dir), f"same bytes as {duplicate}"
                    )
                    continue
                stem = PurePosixPath(relative_key(path, normal_dir)).with_suffix("")
                row = _row(
                    task, target, stored, f"{split}/normal/{stem}", [], (domain, "", ""), normal_source
                )
                target.add(row, stored, report)
    except BaseException:
        target.abort(report)
        raise
    written = target.finish(report, show_progress=show_progress)
    return SynthesisResult(report, written, dict(counts))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadmtl data synthesize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("normal_dir", type=Path, help="folder of defect-free images")
    add_output_arguments(parser)
    parser.add_argument("--counts", required=True, help="anomaly=N pairs, e.g. corrosion=20,dent=10")
    add_seed_option(parser, 0, "seed of the defect shapes and placements")
    parser.add_argument("--instances", type=int, default=1, help="defects per det/seg sample (1)")
    parser.add_argument(
        "--min-radius", type=float, default=DEFAULT_RADIUS[0], help="of the shorter side (0.08)"
    )
    parser.add_argument(
        "--max-radius", type=float, default=DEFAULT_RADIUS[1], help="of the shorter side (0.16)"
    )
    parser.add_argument("--with-normals", action="store_true", help="also add every normal image used, once")
    parser.add_argument("--normal-source", default="real", choices=["real", "converted", "synthetic"])
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`cadmtl data synthesize`."""
    args = build_parser().parse_args(argv)

    def run() -> None:
        result = synthesize(
            args.normal_dir,
            args.output_dir,
            args.config,
            parse_counts(args.counts),
            split=args.split,
            seed=args.seed,
            instances=args.instances,
            radius_range=(args.min_radius, args.max_radius),
            with_normals=args.with_normals,
            normal_source=args.normal_source,
            existing="replace" if args.overwrite else "append",
            strict=args.strict,
            max_pixels=args.max_pixels,
            num_shards=args.num_shards,
            max_shard_size=args.max_shard_size,
            taxonomy=load_taxonomy(args.taxonomy),
            show_progress=not args.no_progress,
        )
        print(result.report.to_markdown())
        print(f"split {args.config}/{args.split} now has {result.written.num_rows} rows")

    return exit_status(run, (ValidationError, ValueError, FileNotFoundError), error_status=1)


if __name__ == "__main__":
    sys.exit(main())
