"""`cadmtl anomaly`: normal-only anomaly detection on `*_ad` dataset configs.

    cadmtl anomaly fit data/cad100k-mini --config exterior_ad --output-dir outputs/ad-demo --backbone tiny
    cadmtl anomaly evaluate outputs/ad-demo/model data/cad100k-mini --config exterior_ad --split test \\
        --output-dir outputs/ad-demo/eval --save-maps
    cadmtl anomaly predict outputs/ad-demo/model photos/ --output-dir outputs/ad-demo/predict

`fit` builds the patch-memory scorer (PatchCore / AnomalyDINO family) from the train split's normal images and
calibrates its thresholds: F1-max on a validation split with defects, else a target false-positive rate on
held-out normal images (validation normals, or `--calibration-fraction` of the train split kept out of the bank).
Scores and maps: higher = more anomalous; maps are never normalised per image. A scorer left without thresholds
(no validation split and no train image to hold out) is saved with a warning, and its verdict reads `uncalibrated`
wherever one would show (scores.csv, `predict`, the demo app).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cadmtl.anomaly.data import AnomalySample, load_anomaly_split, normal_only
from cadmtl.anomaly.defect_head import fit_defect_head
from cadmtl.anomaly.learner import AnomalyLearner
from cadmtl.anomaly.metrics import AnomalyMetrics, f1_max, metrics_table
from cadmtl.anomaly.models import (
    UNCALIBRATED,
    anomaly_processor,
    image_verdict,
    load_anomaly_model,
    map_value_range,
    predict_image,
    score_images,
)
from cadmtl.anomaly.patch_memory import (
    PRETRAINED_DEFAULTS,
    RANDOM_INIT_DEFAULTS,
    PatchMemoryScorer,
    calibrate_f1,
    calibrate_fpr,
)
from cadmtl.features import load_backbone
from cadmtl.pictures.overlays import draw_anomaly_map
from cadmtl.pictures.predict import collect_images, load_image
from cadmtl.pretrained import INSTALL_HINT, PRETRAINED_PRESETS, require_timm, wheel_weights_path
from dataset_scripts.card import format_bytes
from dataset_scripts.options import (
    ERROR_VERDICT,
    SCORE_COLUMNS,
    add_batch_size_option,
    add_output_dir_option,
    add_seed_option,
    add_tile_options,
    exit_status,
    non_negative_int,
    positive_int,
)
from dataset_scripts.provenance import training_data_record
from dataset_scripts.safe_paths import SafeOutputPaths, safe_output_path
from modeling_cadmtl_anomaly import AnomalyImageProcessor
from modeling_cadmtl_anomaly.configuration_cadmtl_anomaly import MAP_FLIPS
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import check_tile_settings, tile_boxes

logger = logging.getLogger("cadmtl.anomaly")
# The scorer's backbone where the `pretrained` extra is installed (see `resolve_backbone`): Lite2 beat Lite0 on the
# tile validation split by 2.5 image / 0.9 pixel AUROC (RESULTS.md).
DEFAULT_BACKBONE = "efficientnet-lite2"
_UNCALIBRATED_REASON = "no validation split and no held-out normal train image to calibrate the thresholds on"


def _scores_and_maps(
    scorer: PatchMemoryScorer | AnomalyLearner,
    samples: Sequence[AnomalySample],
    batch_size: int,
    desc: str,
    processor: AnomalyImageProcessor | None = None,
) -> tuple[list[float], list[np.ndarray]]:
    """Image scores and anomaly maps at each image's original size, through `processor` (default: the scorer's
    own, with the tile settings it was fitted with)."""
    return score_images(scorer, [s.image for s in samples], processor, batch_size, desc)


def bank_pixel_values(
    images: Sequence[Image.Image], processor: AnomalyImageProcessor
) -> Iterator[torch.Tensor]:
    """The pixel values the bank is fitted on, one image at a time (a generator: tiles of many high-resolution
    images would not fit in memory at once): the whole image at the scorer's size, or its tiles."""
    for image in images:
        yield processor.tiles(image)[0]


def calibrate(
    scorer: PatchMemoryScorer, samples: Sequence[AnomalySample], target_fpr: float, batch_size: int
) -> dict:
    """Set the image and pixel thresholds from `samples`: F1-max when they hold defects, else the FPR target."""
    scores, maps = _scores_and_maps(scorer, samples, batch_size, "calibrating")
    labels = np.array([not s.is_normal for s in samples])
    if labels.any() and (~labels).any():
        scorer.image_threshold = calibrate_f1(scores, labels)
        pixels = np.concatenate([m.ravel() for m in maps])
        truth = np.concatenate([s.mask.ravel() for s in samples])
        keep = truth != 255
        _, scorer.pixel_threshold = f1_max(pixels[keep], (truth[keep] == 1))
        method = "f1_max"
    else:
        normal = [i for i, s in enumerate(samples) if s.is_normal]
        scorer.image_threshold = calibrate_fpr([scores[i] for i in normal], target_fpr)
        scorer.pixel_threshold = calibrate_fpr(np.concatenate([maps[i].ravel() for i in normal]), target_fpr)
        method = f"fpr@{target_fpr}"
    return {
        "method": method,
        "images": len(samples),
        "image_threshold": scorer.image_threshold,
        "pixel_threshold": scorer.pixel_threshold,
    }


def resolve_backbone(backbone: str | None) -> str:
    """`--backbone`, or the default: the ImageNet EfficientNet-Lite2 where the `pretrained` extra is installed,
    else the random `tiny` preset with a notice naming the extra (so the command runs on a bare install)."""
    if backbone is not None:
        return backbone
    try:
        require_timm()
        wheel_weights_path(DEFAULT_BACKBONE)
    except (ImportError, ValueError) as error:
        logger.warning(
            "no pretrained backbone (%s); fitting on the random-init `tiny` preset, whose features are near chance. "
            "For real features: %s",
            error,
            INSTALL_HINT,
        )
        return "tiny"
    return DEFAULT_BACKBONE


def scorer_settings(backbone: str, args: argparse.Namespace) -> dict:
    """The scorer's settings: the options given, the rest from the backbone's defaults (`PRETRAINED_DEFAULTS`
    for the EfficientNet-Lite presets, chosen on magnetic tile; `RANDOM_INIT_DEFAULTS` otherwise)."""
    defaults = PRETRAINED_DEFAULTS if backbone in PRETRAINED_PRESETS else RANDOM_INIT_DEFAULTS
    given = {
        "layers": args.layers,
        "image_size": args.image_size,
        "coreset_fraction": args.coreset_fraction,
        "sigma": args.sigma,
        "k": args.k,
        "image_score": args.image_score,
        "aggregate": False if args.no_pooling else None,
        "search_projection_dim": args.search_projection_dim,
        "map_flips": args.map_flips,
        "neighbour_images": args.neighbour_images,
    }
    settings = {**defaults, **{key: value for key, value in given.items() if value is not None}}
    if args.tile_size and args.neighbour_images is None:
        # The dense memory was chosen on whole tiles; by tiles it would hold every tile's patches (GBs for car
        # photos) and is unmeasured there, so a tiled fit keeps the coreset unless asked.
        settings["neighbour_images"] = None
    size = settings["image_size"]
    settings["image_size"] = (size, size)
    settings["search_projection_dim"] = settings["search_projection_dim"] or None  # 0: exact
    settings["neighbour_images"] = settings["neighbour_images"] or None  # 0: the coreset bank
    if settings["neighbour_images"]:
        if args.coreset_fraction is not None:
            raise ValueError(
                f"--coreset-fraction reduces a coreset bank, but this fit keeps a dense memory (--neighbour-images "
                f"{settings['neighbour_images']}): add --neighbour-images 0 for a coreset"
            )
        settings["coreset_fraction"] = 1.0  # a dense memory keeps every patch
    return settings


def dense_memory_bytes(
    scorer: PatchMemoryScorer, sizes: Sequence[tuple[int, int]], tile_size: int | None, tile_overlap: int
) -> tuple[int, int]:
    """(patches, bytes) of the dense memory of images of `sizes` ((height, width) each): their tiles' (or their
    own) patch grids at the scorer's size, float16; the grid comes from one forward pass of a blank image."""
    height, width = scorer.image_size
    with torch.no_grad():
        grid = scorer.patch_features(torch.zeros(1, 3, height, width))
    cells, channels = grid.shape[-2] * grid.shape[-1], grid.shape[1]
    units = sum(len(tile_boxes(h, w, tile_size, tile_overlap)) if tile_size else 1 for h, w in sizes)
    return units * cells, units * cells * channels * 2


def fit(args: argparse.Namespace) -> int:
    train = normal_only(
        load_anomaly_split(args.repo, args.config, "train", args.max_train), f"{args.config}/train"
    )
    generator = np.random.default_rng(args.seed)
    order = generator.permutation(len(train))
    held_out_count = 0
    try:
        calibration = load_anomaly_split(args.repo, args.config, args.calibration_split)
    except ValueError:
        held_out_count = max(1, round(args.calibration_fraction * len(train))) if len(train) > 1 else 0
        calibration = [train[i] for i in order[:held_out_count]]
    bank_images = [train[i] for i in sorted(order[held_out_count:])]
    if args.few_shot:
        bank_images = bank_images[: args.few_shot]
    backbone_name = resolve_backbone(args.backbone)
    settings = scorer_settings(backbone_name, args)
    scorer = PatchMemoryScorer.from_backbone(
        load_backbone(backbone_name, args.seed)[0],
        seed=args.seed,
        search_num_lists=args.search_lists,
        search_num_probes=args.search_probes,
        num_candidates=args.search_candidates,
        query_stride=args.query_stride,
        **settings,
    )
    # Fitted on tiles, the bank holds patches at the scale the tiles are scored at (a small defect stays visible);
    # the settings are saved in the config so every scoring path tiles alike.
    scorer.config.tile_size, scorer.config.tile_overlap = args.tile_size, args.tile_overlap or 0
    processor = anomaly_processor(scorer)
    if scorer.config.neighbour_images:
        # refused before the features are computed, not by running out of memory after them
        patches, size = dense_memory_bytes(
            scorer, [s.size for s in bank_images], args.tile_size, args.tile_overlap or 0
        )
        if size > args.max_memory_gb * 2**30:
            raise ValueError(
                f"the dense memory of {len(bank_images)} {args.config}/train images ({patches:,} patches, float16) "
                f"would take {format_bytes(size)}, over --max-memory-gb {args.max_memory_gb:g}: fit a coreset "
                "with --neighbour-images 0, use fewer images (--max-train) or raise --max-memory-gb"
            )
    calibration_normals = [s for s in calibration if s.is_normal]
    if not 0.0 <= args.defect_head_weight <= 1.0:
        raise ValueError(f"--defect-head-weight must lie in [0, 1]; got {args.defect_head_weight:g}")
    if args.defect_head and not calibration_normals:
        raise ValueError(
            f"--defect-head puts its map on the memory's scale with held-out normal images, and {args.config} has "
            f"no normal image in its {args.calibration_split!r} split nor a held-out train image"
        )
    started = time.perf_counter()
    images = tqdm([s.image for s in bank_images], desc="bank features", leave=False)
    pixel_values = bank_pixel_values(images, processor)
    scorer.fit(pixel_values, batch_size=args.batch_size, few_shot=bool(args.few_shot))
    defect_head_info = None
    if args.defect_head:
        scorer.config.defect_head_weight = args.defect_head_weight
        defect_head_info = fit_defect_head(
            scorer,
            bank_pixel_values(
                tqdm([s.image for s in bank_images], desc="defect head cells", leave=False), processor
            ),
            bank_pixel_values(
                tqdm([s.image for s in calibration_normals], desc="defect head statistics", leave=False),
                processor,
            ),
            args.seed,
        )
    fit_seconds = time.perf_counter() - started
    if scorer.config.neighbour_images and calibration_normals and not args.tile_size:
        # A tiled scorer's image score comes from the stitched map, where tile borders are not image borders.
        images = tqdm([s.image for s in calibration_normals], desc="border profile", leave=False)
        profile = scorer.fit_border_profile(bank_pixel_values(images, processor), args.batch_size)
        logger.info("border profile of %d held-out normal images: %s", len(calibration_normals), profile)
    if calibration:
        calibration_info = calibrate(scorer, calibration, args.target_fpr, args.batch_size)
        if held_out_count:
            logger.warning(
                "%s has no %r split: the thresholds come from %d held-out normal train image(s) at the target "
                "false-positive rate %s; no anomalous image checked them",
                args.config,
                args.calibration_split,
                held_out_count,
                args.target_fpr,
            )
    else:
        calibration_info = {"method": "none", "status": UNCALIBRATED, "reason": _UNCALIBRATED_REASON}
        logger.warning(
            "%s: no %r split and no train image to hold out: the scorer is saved UNCALIBRATED (no thresholds, no "
            "OK / NG verdict; its verdicts read %r)",
            args.config,
            args.calibration_split,
            UNCALIBRATED,
        )
    output = Path(args.output_dir)
    # what it was fitted on, so the app can say when a scorer of generated demo images is served
    scorer.config.training_data = training_data_record(args.repo, [args.config])
    scorer.save_pretrained(output / "model")
    summary = {
        "repo": args.repo,
        "config": args.config,
        "backbone": backbone_name,
        "settings": settings,
        "tiles": {"tile_size": args.tile_size, "tile_overlap": args.tile_overlap or 0},
        "normal_images_in_bank": len(bank_images),
        "memory_bank_patches": int(scorer.memory_bank.shape[0]),
        "memory_bank_mb": scorer.memory_bank.numel() * scorer.memory_bank.element_size() / 2**20,
        "border_profile": scorer.config.border_profile,
        "defect_head": defect_head_info,
        "fit_seconds": fit_seconds,
        "calibration": calibration_info,
    }
    (output / "fit_results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    scorer = load_anomaly_model(args.model)
    processor = anomaly_processor(scorer, args.tile_size, args.tile_overlap)
    samples = load_anomaly_split(args.repo, args.config, args.split)
    started = time.perf_counter()
    scores, maps = _scores_and_maps(scorer, samples, args.batch_size, f"scoring {args.split}", processor)
    seconds = time.perf_counter() - started
    metrics = AnomalyMetrics()
    for sample, score, amap in zip(samples, scores, maps):
        metrics.update(amap, sample.mask, sample.is_normal, sample.defect_type, image_score=score)
    results = metrics.compute()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    per_type = results.pop("per_defect_type")
    summary = {
        "model": args.model,
        "repo": args.repo,
        "config": args.config,
        "split": args.split,
        "images": len(samples),
        "seconds_per_image": seconds / len(samples),
        "metrics": results,
        "per_defect_type": per_type,
        "thresholds": {"image": scorer.image_threshold, "pixel": scorer.pixel_threshold},
        "tiles": {"tile_size": processor.tile_size, "tile_overlap": processor.tile_overlap},
        "verdict_status": "calibrated" if scorer.image_threshold is not None else UNCALIBRATED,
    }
    (output / "eval_results.json").write_text(json.dumps(summary, indent=2))
    table = metrics_table(per_type, overall=results)
    (output / "eval_results.md").write_text(table + "\n")
    with open(output / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "is_normal", *SCORE_COLUMNS])
        for sample, score in zip(samples, scores):
            writer.writerow(
                [sample.image_id, int(sample.is_normal), f"{score:.6g}", image_verdict(scorer, score), ""]
            )
    if args.save_maps:
        map_path = SafeOutputPaths(output / "maps", ".npy")  # ids come from the dataset: kept inside OUT
        for sample, amap in zip(samples, maps):  # OUT/maps/<image_id>.npy (image ids may hold folders)
            target = map_path(sample.image_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, amap)
    if args.save_pictures:
        value_range = map_value_range(scorer, maps)
        picture_path = SafeOutputPaths(output / "pictures", ".png")
        for sample, amap in zip(samples, maps):
            target = picture_path(sample.image_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            draw_anomaly_map(sample.image, amap, value_range, true_mask=sample.mask).save(target)
    print(table)
    return 0


def predict(args: argparse.Namespace) -> int:
    scorer = load_anomaly_model(args.model)
    processor = anomaly_processor(scorer, args.tile_size, args.tile_overlap)
    sources = collect_images(args.inputs, exclude=args.output_dir)
    if not sources:
        raise FileNotFoundError(f"no images found in {args.inputs}")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for source in tqdm(sources, desc="predicting"):
        try:
            image = load_image(source.path)
        except Exception as error:  # a corrupt file is reported in scores.csv and the rest go on
            rows.append([str(source.path), "", ERROR_VERDICT, f"{type(error).__name__}: {error}"])
            continue
        picture, score, verdict = predict_image(scorer, image, processor)
        target = safe_output_path(output, source.output_name.as_posix())
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target)
        rows.append([str(source.path), f"{score:.6g}", verdict, ""])
    with open(output / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", *SCORE_COLUMNS])
        writer.writerows(rows)
    failed = sum(1 for row in rows if row[2] == ERROR_VERDICT)
    print(
        f"scored {len(rows) - failed} images into {output}"
        + (f" ({failed} unreadable, see scores.csv)" if failed else "")
    )
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """`cadmtl anomaly train`: the self-supervised multi-task learner (its own module, under accelerate launch)."""
    from cadmtl.training.launch import run_child

    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        from cadmtl.anomaly.learner_training import main as learner_main

        return learner_main(["--help"])
    # --quiet: a training error is the module's own one line, without the launcher's traceback (it exits 1).
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    return run_child([*launcher, "-m", "cadmtl.anomaly.learner_training", *argv])


TILE_OVERRIDE_HELP = "default: the tile settings the model was fitted with"


def _parser(name: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"cadmtl anomaly {name}",
        description=description,
        epilog="example:\n" + "\n".join(f"  {example}" for example in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def fit_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "fit",
        "Build the patch-memory scorer (PatchCore / AnomalyDINO family) from the train split's normal images and "
        "calibrate its thresholds: F1-max on a validation split with defects, else a target false-positive rate on "
        "held-out normal images (validation normals, or --calibration-fraction of the train split kept out of the "
        "bank). A scorer left without thresholds is saved with a warning; its verdict reads `uncalibrated`. With "
        "the EfficientNet-Lite presets the bank is a dense memory searched through each image's nearest train images "
        "(--neighbour-images).",
        [
            "cadmtl anomaly fit data/cad100k-mini --config exterior_ad --output-dir outputs/ad --backbone tiny",
            "cadmtl anomaly fit data/cad100k-mini --config exterior_ad --output-dir outputs/ad --neighbour-images 0 "
            "--search-lists 316",
        ],
    )
    parser.add_argument("repo", help="dataset repo folder or Hub id")
    parser.add_argument("--config", required=True, help="an *_ad config")
    add_output_dir_option(parser, "the scorer is saved to OUTPUT_DIR/model")
    parser.add_argument(
        "--backbone",
        default=None,
        help="preset (tiny, vits16, ...: random init; efficientnet-lite0/1/2: ImageNet weights), CadMtl model folder "
        f"or DINOv3 checkpoint; default {DEFAULT_BACKBONE} where the `pretrained` extra is installed, else tiny",
    )
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="backbone layers (1-based; a timm backbone's feature levels 2 / 3 / 4 = strides 8 / 16 / 32); "
        "default: the backbone's (see --backbone); 2 3 4 for efficientnet-lite",
    )
    parser.add_argument(
        "--coreset-fraction",
        type=float,
        default=None,
        help="default 0.1; 0.01 for efficientnet-lite where it keeps a coreset (--neighbour-images 0, or tiles)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="default 224; 384 for efficientnet-lite")
    parser.add_argument(
        "--sigma", type=float, default=None, help="Gaussian blur of the maps in input pixels; default 4"
    )
    parser.add_argument(
        "--k", type=int, default=None, help="mean distance to the k nearest bank patches; default 1"
    )
    parser.add_argument(
        "--image-score",
        choices=("max", "top_mean"),
        default=None,
        help="default top_mean (the mean of the top 1 %% of patch distances)",
    )
    parser.add_argument(
        "--no-pooling", action="store_true", help="no 3x3 neighbourhood averaging of the patch features"
    )
    parser.add_argument("--few-shot", type=int, default=0, help="keep all patches of only K normal images")
    parser.add_argument("--max-train", type=int, default=None, help="use the first N train images")
    parser.add_argument("--calibration-split", default="validation")
    parser.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.1,
        help="without a calibration split: this share of the train images is kept out of the bank to calibrate",
    )
    parser.add_argument("--target-fpr", type=float, default=0.01)
    add_batch_size_option(parser, 8)
    add_seed_option(parser, 0, "seed of the held-out draw, the coreset and a preset's random weights")
    parser.add_argument(
        "--search-lists",
        type=int,
        default=None,
        help="approximate inverted-file search when scoring: k-means lists of the bank (~sqrt of its size); "
        "default exact (the ONNX export searches exactly instead)",
    )
    parser.add_argument(
        "--search-probes", type=int, default=8, help="lists searched per patch with --search-lists"
    )
    parser.add_argument(
        "--search-projection-dim",
        type=non_negative_int,
        default=None,
        help="approximate search when scoring, in PyTorch and in the ONNX export: nearest-neighbour candidates "
        "on a seeded projection to this many dims, re-ranked exactly (--search-candidates of them); 0: exact; "
        "default 64 for the EfficientNet-Lite presets, else exact",
    )
    parser.add_argument(
        "--search-candidates",
        type=positive_int,
        default=16,
        help="candidates re-ranked exactly per patch with --search-projection-dim",
    )
    parser.add_argument(
        "--query-stride",
        type=positive_int,
        default=1,
        help="score the patch grid averaged over STRIDE x STRIDE cells (the bank keeps every cell): STRIDE^2 "
        "fewer searches for a coarser map; 2 gave 1.5-2x the onnxruntime speed on the tiles for 0.2-1.0 "
        "AUPRO (BENCHMARKS.md); saved in config.json (query_stride), where it can be changed without refitting",
    )
    parser.add_argument(
        "--map-flips",
        nargs="*",
        choices=sorted(MAP_FLIPS),
        default=None,
        metavar="FLIP",
        help="test-time augmentation of the maps: also score the input flipped (h: horizontally, v: vertically, "
        "hv: both) and average the flipped-back distances into the map; the image score stays the upright "
        "view's. Each flip is one more backbone pass. Default h v hv for the EfficientNet-Lite presets (tile "
        "validation pixel AUROC 92.8 -> 95.8, RESULTS.md), else none; `--map-flips` alone: none. Saved in "
        "config.json (map_flips), where it can be changed without refitting",
    )
    parser.add_argument(
        "--neighbour-images",
        type=non_negative_int,
        default=None,
        metavar="K",
        help="a dense memory instead of the coreset: every patch of every normal train image (float16), each "
        "image compared only with the patches of its K nearest train images (by mean feature), and the image "
        "score taken on a border profile fitted on the held-out normals (tile test image AUROC 95.3 -> 97.0, "
        "RESULTS.md); 0: the coreset bank. Default 20 for the EfficientNet-Lite presets without --tile-size, else 0. "
        "Memory: images x patches x channels x 2 bytes (666 tiles at 384 px with Lite2: 1.6 GB)",
    )
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=4.0,
        help="refuse, before any feature is computed, a dense memory (--neighbour-images) larger than this; the "
        "fit holds it in RAM and the model file is as large (default 4: about 1,800 images at 384 px with Lite2)",
    )
    parser.add_argument(
        "--defect-head",
        action="store_true",
        help="also train a small defect head on the same patch features, on synthetic anomalies (texture blends, "
        "cut-paste, uneven brightness, strokes, edge damage; never the car-defect painter) pasted into the bank "
        "images, and fuse its map with the memory's, both standardised on the held-out normals. Saved in the "
        "model (defect_head weights; config defect_head_*)",
    )
    parser.add_argument(
        "--defect-head-weight",
        type=float,
        default=0.25,
        metavar="W",
        help="the head's share of the fused map, (1 - W) * z(distance) + W * z(head) (default 0.25; saved in "
        "config.json, where it can be changed without refitting)",
    )
    add_tile_options(
        parser,
        "fit the bank on the tiles of the normal images and score by tiles (saved in the model's config: "
        "evaluate, predict, the app and the ONNX export tile alike)",
    )
    return parser


def evaluate_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "evaluate",
        "Image / pixel AUROC, AUPRO, F1-max and pixel AP of an anomaly model on a split: eval_results.json / .md, "
        "scores.csv (image_id, is_normal, anomaly_score, verdict, error) and optional maps and pictures.",
        [
            "cadmtl anomaly evaluate outputs/ad/model data/cad100k-mini --config exterior_ad --split test "
            "--output-dir outputs/ad/eval --save-maps"
        ],
    )
    parser.add_argument("model", help="anomaly model folder (DIR/model of `cadmtl anomaly fit / train`)")
    parser.add_argument("repo", help="dataset repo folder or Hub id")
    parser.add_argument("--config", required=True, help="an *_ad config")
    parser.add_argument("--split", default="test")
    add_output_dir_option(parser, "folder for eval_results.json / .md, scores.csv, maps/ and pictures/")
    parser.add_argument(
        "--save-maps", action="store_true", help="OUT/maps/<image_id>.npy (float32, original size)"
    )
    parser.add_argument("--save-pictures", action="store_true", help="heat maps with the true defect contour")
    add_batch_size_option(parser, 8)
    add_tile_options(parser, TILE_OVERRIDE_HELP)
    return parser


def predict_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "predict",
        "Heat-map PNGs and scores.csv (file_name, anomaly_score, verdict, error) with the OK / NG verdict for "
        "image files and folders; an unreadable file gets verdict `error` and its message, the rest go on.",
        ["cadmtl anomaly predict outputs/ad/model photos/ --output-dir outputs/ad/predict"],
    )
    parser.add_argument("model", help="anomaly model folder (DIR/model of `cadmtl anomaly fit / train`)")
    parser.add_argument("inputs", nargs="+", help="image files and / or folders")
    add_output_dir_option(parser, "folder for the heat-map PNGs and scores.csv")
    add_tile_options(parser, TILE_OVERRIDE_HELP)
    return parser


def _run(
    runner: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def run() -> int:
        if args.tile_size is not None or runner is fit:  # before any data or model is loaded
            check_tile_settings(args.tile_size, args.tile_overlap)
        return runner(args)

    return exit_status(run)


def fit_main(argv: Sequence[str] | None = None) -> int:
    """`cadmtl anomaly fit`."""
    return _run(fit, fit_parser(), argv)


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """`cadmtl anomaly evaluate`."""
    return _run(evaluate, evaluate_parser(), argv)


def predict_main(argv: Sequence[str] | None = None) -> int:
    """`cadmtl anomaly predict`."""
    return _run(predict, predict_parser(), argv)
