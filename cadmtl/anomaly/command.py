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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.nn import functional as F
from tqdm.auto import tqdm

from cadmtl.anomaly.data import AnomalySample, load_anomaly_split, normal_only, to_pixel_values
from cadmtl.anomaly.learner import AnomalyLearner
from cadmtl.anomaly.metrics import AnomalyMetrics, f1_max, metrics_table
from cadmtl.anomaly.models import (
    UNCALIBRATED,
    image_verdict,
    load_anomaly_model,
    map_value_range,
    predict_image,
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
from dataset_scripts.safe_paths import SafeOutputPaths, safe_output_path

logger = logging.getLogger("cadmtl.anomaly")
DEFAULT_BACKBONE = "efficientnet-lite0"  # when the `pretrained` extra is installed (see `resolve_backbone`)
_UNCALIBRATED_REASON = "no validation split and no held-out normal train image to calibrate the thresholds on"


def _scores_and_maps(
    scorer: PatchMemoryScorer | AnomalyLearner, samples: Sequence[AnomalySample], batch_size: int, desc: str
) -> tuple[list[float], list[np.ndarray]]:
    """Image scores and anomaly maps at each image's original size (bilinear from the fit size)."""
    scores, maps = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        batch = samples[start : start + batch_size]
        pixel_values = to_pixel_values(
            [s.image for s in batch], scorer.image_size, scorer.image_mean, scorer.image_std
        )
        batch_maps, batch_scores = scorer.score(pixel_values)
        for sample, amap, score in zip(batch, batch_maps, batch_scores):
            full = F.interpolate(amap[None, None], size=sample.size, mode="bilinear", align_corners=False)[
                0, 0
            ]
            maps.append(full.numpy().astype(np.float32))
            scores.append(float(score))
    return scores, maps


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
    """`--backbone`, or the default: the ImageNet EfficientNet-Lite0 where the `pretrained` extra is installed,
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
    }
    settings = {**defaults, **{key: value for key, value in given.items() if value is not None}}
    size = settings["image_size"]
    settings["image_size"] = (size, size)
    return settings


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
        **settings,
    )
    started = time.perf_counter()
    pixel_values = to_pixel_values(
        [s.image for s in bank_images], scorer.image_size, scorer.image_mean, scorer.image_std
    )
    scorer.fit(pixel_values, batch_size=args.batch_size, few_shot=bool(args.few_shot))
    fit_seconds = time.perf_counter() - started
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
    scorer.save_pretrained(output / "model")
    summary = {
        "repo": args.repo,
        "config": args.config,
        "backbone": backbone_name,
        "settings": settings,
        "normal_images_in_bank": len(bank_images),
        "memory_bank_patches": int(scorer.memory_bank.shape[0]),
        "memory_bank_mb": scorer.memory_bank.numel() * 4 / 2**20,
        "fit_seconds": fit_seconds,
        "calibration": calibration_info,
    }
    (output / "fit_results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    scorer = load_anomaly_model(args.model)
    samples = load_anomaly_split(args.repo, args.config, args.split)
    started = time.perf_counter()
    scores, maps = _scores_and_maps(scorer, samples, args.batch_size, f"scoring {args.split}")
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
        "verdict_status": "calibrated" if scorer.image_threshold is not None else UNCALIBRATED,
    }
    (output / "eval_results.json").write_text(json.dumps(summary, indent=2))
    table = metrics_table(per_type, overall=results)
    (output / "eval_results.md").write_text(table + "\n")
    with open(output / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "is_normal", "score", "verdict"])
        for sample, score in zip(samples, scores):
            writer.writerow(
                [sample.image_id, int(sample.is_normal), f"{score:.6g}", image_verdict(scorer, score)]
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
            rows.append([str(source.path), "", "error", f"{type(error).__name__}: {error}"])
            continue
        picture, score, verdict = predict_image(scorer, image)
        target = safe_output_path(output, source.output_name.as_posix())
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target)
        rows.append([str(source.path), f"{score:.6g}", verdict, ""])
    with open(output / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "score", "verdict", "error"])
        writer.writerows(rows)
    failed = sum(1 for row in rows if row[2] == "error")
    print(
        f"scored {len(rows) - failed} images into {output}"
        + (f" ({failed} unreadable, see scores.csv)" if failed else "")
    )
    return 0


def train(argv: Sequence[str]) -> int:
    """`cadmtl anomaly train`: the self-supervised multi-task learner (its own module, under accelerate launch)."""
    from cadmtl.training.launch import run_child

    if {"-h", "--help"} & set(argv):
        from cadmtl.anomaly.learner_training import main as learner_main

        return learner_main(["--help"])
    # --quiet: a training error is the module's own one line, without the launcher's traceback (it exits 1).
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    return run_child([*launcher, "-m", "cadmtl.anomaly.learner_training", *argv])


def protocol(argv: Sequence[str]) -> int:
    """`cadmtl anomaly protocol`: leave-one-type-out evaluation of the learner (`cadmtl.anomaly.learner_protocol`)."""
    from cadmtl.anomaly.learner_protocol import main as protocol_main

    return protocol_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadmtl anomaly", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fit_parser = commands.add_parser(
        "fit",
        help="build the patch-memory scorer from normal images and calibrate it",
        epilog="example:\n  cadmtl anomaly fit data/cad100k-mini --config exterior_ad --output-dir outputs/ad --backbone tiny\n"
        "  cadmtl anomaly fit data/cad100k-mini --config exterior_ad --output-dir outputs/ad --search-lists 316",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit_parser.add_argument("repo", help="dataset repo folder or Hub id")
    fit_parser.add_argument("--config", required=True, help="an *_ad config")
    fit_parser.add_argument("--output-dir", required=True, help="the scorer is saved to OUTPUT_DIR/model")
    fit_parser.add_argument(
        "--backbone",
        default=None,
        help="preset (tiny, vits16, ...: random init; efficientnet-lite0/1/2: ImageNet weights), CadMtl model folder "
        f"or DINOv3 checkpoint; default {DEFAULT_BACKBONE} where the `pretrained` extra is installed, else tiny",
    )
    fit_parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="backbone layers (1-based; a timm backbone's feature levels 2 / 3 / 4 = strides 8 / 16 / 32); "
        "default: the backbone's (see --backbone)",
    )
    fit_parser.add_argument(
        "--coreset-fraction", type=float, default=None, help="default 0.1; 0.01 for efficientnet-lite"
    )
    fit_parser.add_argument(
        "--image-size", type=int, default=None, help="default 224; 256 for efficientnet-lite"
    )
    fit_parser.add_argument(
        "--sigma", type=float, default=None, help="Gaussian blur of the maps in input pixels; default 4"
    )
    fit_parser.add_argument(
        "--k", type=int, default=None, help="mean distance to the k nearest bank patches; default 1"
    )
    fit_parser.add_argument(
        "--image-score",
        choices=("max", "top_mean"),
        default=None,
        help="default top_mean; max for efficientnet-lite",
    )
    fit_parser.add_argument(
        "--no-pooling", action="store_true", help="no 3x3 neighbourhood averaging of the patch features"
    )
    fit_parser.add_argument(
        "--few-shot", type=int, default=0, help="keep all patches of only K normal images"
    )
    fit_parser.add_argument("--max-train", type=int, default=None, help="use the first N train images")
    fit_parser.add_argument("--calibration-split", default="validation")
    fit_parser.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.1,
        help="without a calibration split: this share of the train images is kept out of the bank to calibrate",
    )
    fit_parser.add_argument("--target-fpr", type=float, default=0.01)
    fit_parser.add_argument("--batch-size", type=int, default=8)
    fit_parser.add_argument("--seed", type=int, default=0)
    fit_parser.add_argument(
        "--search-lists",
        type=int,
        default=None,
        help="approximate inverted-file search when scoring: k-means lists of the bank (~sqrt of its size); "
        "default exact (the ONNX export always searches exactly)",
    )
    fit_parser.add_argument(
        "--search-probes", type=int, default=8, help="lists searched per patch with --search-lists"
    )

    eval_parser = commands.add_parser(
        "evaluate",
        help="image / pixel AUROC, AUPRO, F1-max, pixel AP on a split, scores.csv, optional maps",
        epilog="example:\n  cadmtl anomaly evaluate outputs/ad/model data/cad100k-mini --config exterior_ad --split test "
        "--output-dir outputs/ad/eval --save-maps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eval_parser.add_argument("model")
    eval_parser.add_argument("repo")
    eval_parser.add_argument("--config", required=True)
    eval_parser.add_argument("--split", default="test")
    eval_parser.add_argument("--output-dir", required=True)
    eval_parser.add_argument(
        "--save-maps", action="store_true", help="OUT/maps/<image_id>.npy (float32, original size)"
    )
    eval_parser.add_argument(
        "--save-pictures", action="store_true", help="heat maps with the true defect contour"
    )
    eval_parser.add_argument("--batch-size", type=int, default=8)

    predict_parser = commands.add_parser(
        "predict",
        help="heat-map PNGs and scores.csv with the OK / NG verdict for image files and folders",
        epilog="example:\n  cadmtl anomaly predict outputs/ad/model photos/ --output-dir outputs/ad/predict",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict_parser.add_argument("model")
    predict_parser.add_argument("inputs", nargs="+", help="image files and / or folders")
    predict_parser.add_argument("--output-dir", required=True)
    commands.add_parser(
        "train", help="train the from-scratch multi-task learner (see `cadmtl anomaly train --help`)"
    )
    commands.add_parser(
        "protocol",
        help="leave-one-type-out evaluation of the learner (see `cadmtl anomaly protocol --help`)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return train(argv[1:])
    if argv[:1] == ["protocol"]:
        return protocol(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    runner = {"fit": fit, "evaluate": evaluate, "predict": predict}[args.command]
    try:
        return runner(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
