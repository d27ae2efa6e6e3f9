"""Add one config split converted from COCO, YOLO, class folders or mask folders to a repo folder, or
an anomaly-detection config (all its splits) from an MVTec AD category, Magnetic-tile-style mask folders or
plain good/defect image folders.

    cadmtl data convert {coco,yolo,folders,masks} SOURCE --output-dir REPO_DIR --config NAME
        [--split train] [--mapping FILE] [--strict] [--drop-unmapped] [--overwrite | --append] ...
    cadmtl data convert mvtec CATEGORY_DIR --output-dir REPO_DIR --config NAME_ad
        [--validation-fraction 0] [--seed 0] [--strict] [--overwrite | --append] ...
    cadmtl data convert magnetic_tile SOURCE --output-dir REPO_DIR --config NAME_ad
        [--normal-test-fraction 0.3] [--validation-fraction 0.5] [--seed 0] [--mask-threshold 128] ...
    cadmtl data convert ad_folders SOURCE --output-dir REPO_DIR --config NAME_ad
        [--normal-test-fraction 0.3] [--validation-fraction 0.5] [--seed 0] ...

SOURCE is the COCO JSON file, or the dataset folder for the other formats. The command prints the
validation report, writes it to ``REPO_DIR/reports/<config>/<split>.{json,md}``, (re)writes the dataset
card and exits 1 when the conversion failed (nothing is written then), 2 on bad arguments.

Anomaly detection (``*_ad`` configs; see ``dataset_scripts/converters/anomaly.py``): the source decides the
splits, so there is no ``--split``. Train holds normal images only (anomalous ones there are excluded and
counted, or refused with ``--strict``); validation and test hold normal and anomalous images.
``--normal-test-fraction F`` (flat sources: magnetic_tile, ad_folders without split folders; default 0.3)
holds out a seeded fraction F of the normal images for evaluation; every anomalous image is an evaluation
image. ``--validation-fraction V`` moves a seeded fraction V of the evaluation images of each defect type
(``good`` included) to validation, the rest stays in test; default 0 for mvtec (the official test split
stays whole, no validation split) and 0.5 for flat sources. ``--seed`` (default 0) fixes both draws.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .conversion import ConversionResult, ConvertOptions, convert_ad_source, convert_source
from .converters import (
    AD_FORMATS,
    FORMAT_TASKS,
    read_ad_folders,
    read_coco,
    read_folders,
    read_magnetic_tile,
    read_masks,
    read_mvtec,
    read_yolo,
)
from .converters.anomaly import DEFAULT_NORMAL_TEST_FRACTION, DEFAULT_VALIDATION_FRACTION, has_split_folders
from .images import DEFAULT_MAX_PIXELS
from .mapping import load_mapping
from .options import add_output_dir_option, add_seed_option, exit_status
from .report import ValidationError
from .schema import task_of_config
from .taxonomy import load_taxonomy
from .writer import DEFAULT_MAX_SHARD_SIZE

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """``"384MB"`` -> bytes (binary units: 1 MB = 1024**2 bytes)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size (e.g. 384MB, 1GB, 500000000)")
    unit = (match[2] or "").lower().rstrip("b").rstrip("i")
    return int(float(match[1]) * _UNITS[unit])


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every command that writes a split shares (also used by ``synthesize``)."""
    add_output_dir_option(parser, "repo folder to create or update", old=["--out"])
    parser.add_argument("--config", required=True, help="config name, <name>_<cls|det|seg|ad>")
    parser.add_argument("--split", default="train", help="split to write (default: train)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace the split if it exists")
    existing.add_argument("--append", action="store_true", help="add rows to the split if it exists")
    parser.add_argument(
        "--strict", action="store_true", help="turn every skipped sample or annotation into an error"
    )
    parser.add_argument("--num-shards", type=int, help="shard count (default: by size, a power of two)")
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=DEFAULT_MAX_SHARD_SIZE,
        help="target shard size (default 384MB)",
    )
    parser.add_argument("--taxonomy", type=Path, help="taxonomy YAML (default: the packaged one)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def existing_policy(args: argparse.Namespace) -> str:
    return "replace" if args.overwrite else "append" if args.append else "error"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadmtl data convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", choices=sorted(FORMAT_TASKS), help="source format")
    parser.add_argument(
        "source", type=Path, help="COCO JSON file, or the dataset folder (an MVTec AD category for mvtec)"
    )
    add_output_arguments(parser)
    # None = not given: anomaly-detection formats take their splits from the source and refuse --split.
    parser.set_defaults(split=None)
    parser.add_argument("--mapping", type=Path, help="YAML mapping source label -> taxonomy node")
    parser.add_argument(
        "--drop-unmapped", action="store_true", help="drop (and count) labels the mapping lacks"
    )
    parser.add_argument(
        "--label-set",
        choices=["taxonomy", "present"],
        help="class list: every class of the CAD domain (default for CAD configs) or only the mapped ones",
    )
    parser.add_argument("--images", type=Path, help="COCO: image folder (default: the JSON file's folder)")
    parser.add_argument("--classes", type=Path, help="YOLO / masks: class list file, one name per line")
    parser.add_argument(
        "--source-kind",
        choices=["real", "converted"],
        default="converted",
        help="value of the source column: real (own captures) or converted (default: public data)",
    )
    parser.add_argument("--domain", default="", help="hierarchy override for every sample")
    parser.add_argument("--system", default="", help="hierarchy override for every sample")
    parser.add_argument("--part", default="", help="hierarchy override for every sample")
    parser.add_argument(
        "--id-prefix",
        help="prefix of image ids (default: '<split>/'; ad formats: none, ids are the source paths)",
    )
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip larger images")
    parser.add_argument(
        "--bbox-from",
        choices=["annotation", "segmentation"],
        default="annotation",
        help="det: take boxes as annotated, or recompute them from polygons / RLE",
    )
    ad = parser.add_argument_group("anomaly detection (mvtec, magnetic_tile, ad_folders)")
    ad.add_argument(
        "--normal-test-fraction",
        type=float,
        help=f"flat sources: seeded fraction of the normal images held out for validation + test "
        f"(default {DEFAULT_NORMAL_TEST_FRACTION}); the rest is train",
    )
    ad.add_argument(
        "--validation-fraction",
        type=float,
        help="seeded fraction of the evaluation images of each defect type moved from test to validation "
        "(default 0 for mvtec: no validation split; 0.5 for flat sources)",
    )
    add_seed_option(ad, 0, "seed of the split draws")
    ad.add_argument(
        "--mask-threshold",
        type=int,
        default=128,
        help="mask pixels >= this value are anomalous (soft masks; default 128)",
    )
    return parser


def _read_ad_source(args: argparse.Namespace):
    flat = args.format == "magnetic_tile" or (
        args.format == "ad_folders" and args.source.is_dir() and not has_split_folders(args.source)
    )
    if args.normal_test_fraction is not None and not flat:
        raise ValueError(
            f"--normal-test-fraction applies to flat sources (magnetic_tile, ad_folders without split "
            f"folders); the {args.format} layout of {args.source} already says which images are train"
        )
    fraction = args.validation_fraction
    if fraction is None:
        fraction = DEFAULT_VALIDATION_FRACTION[args.format] if flat else 0.0
    if args.format == "mvtec":
        return read_mvtec(args.source, validation_fraction=fraction, seed=args.seed)
    normal_test = (
        DEFAULT_NORMAL_TEST_FRACTION if args.normal_test_fraction is None else args.normal_test_fraction
    )
    reader = read_magnetic_tile if args.format == "magnetic_tile" else read_ad_folders
    return reader(args.source, normal_test_fraction=normal_test, validation_fraction=fraction, seed=args.seed)


def read_source(args: argparse.Namespace):
    if args.format in AD_FORMATS:
        return _read_ad_source(args)
    if args.format == "coco":
        return read_coco(args.source, args.images)
    if args.format == "yolo":
        return read_yolo(args.source, split=args.split, classes_file=args.classes)
    if args.format == "folders":
        return read_folders(args.source)
    return read_masks(args.source, classes_file=args.classes)


def run(args: argparse.Namespace) -> dict[str, ConversionResult]:
    """Convert as the arguments say; returns ``{split: result}`` (one split unless the format is ad)."""
    task = task_of_config(args.config)
    if task not in FORMAT_TASKS[args.format]:
        raise ValueError(
            f"{args.format} sources make {'/'.join(FORMAT_TASKS[args.format])} configs, not {args.config!r}"
        )
    ad = args.format in AD_FORMATS
    if ad:
        unused = [
            flag
            for flag, value in (
                ("--split", args.split),
                ("--mapping", args.mapping),
                ("--label-set", args.label_set),
                ("--classes", args.classes),
                ("--images", args.images),
            )
            if value is not None
        ]
        if unused:
            raise ValueError(
                f"{args.format}: {', '.join(unused)} not used: the source decides the splits and its folder "
                "names are the defect types"
            )
    else:
        unused = [
            flag
            for flag, value in (
                ("--normal-test-fraction", args.normal_test_fraction),
                ("--validation-fraction", args.validation_fraction),
            )
            if value is not None
        ]
        if unused:
            raise ValueError(f"{', '.join(unused)} apply to the formats {', '.join(AD_FORMATS)} only")
        args.split = args.split or "train"
    taxonomy = load_taxonomy(args.taxonomy)
    hierarchy = {
        k: v for k, v in (("domain", args.domain), ("system", args.system), ("part", args.part)) if v
    }
    options = ConvertOptions(
        repo_dir=args.output_dir,
        config=args.config,
        split=args.split or "train",
        mapping=load_mapping(args.mapping, taxonomy),
        taxonomy=taxonomy,
        strict=args.strict,
        drop_unmapped=args.drop_unmapped,
        existing=existing_policy(args),
        label_set=args.label_set,
        id_prefix=args.id_prefix,
        hierarchy=hierarchy,
        source_kind=args.source_kind,
        max_pixels=args.max_pixels,
        bbox_from=args.bbox_from,
        num_shards=args.num_shards,
        max_shard_size=args.max_shard_size,
        show_progress=not args.no_progress,
        mask_threshold=args.mask_threshold,
    )
    if ad:
        return convert_ad_source(read_source(args), options)
    return {options.split: convert_source(read_source(args), options)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def convert_and_report() -> None:
        results = run(args)
        for result in results.values():
            print(result.report.to_markdown())
        for split, result in results.items():
            written = result.written
            print(
                f"wrote {written.num_rows} rows in {len(written.files)} shard(s) to {args.output_dir / args.config} ({split})"
            )

    user_errors = (ValidationError, ValueError, FileExistsError, FileNotFoundError)
    return exit_status(convert_and_report, user_errors, error_status=1)


if __name__ == "__main__":
    sys.exit(main())
