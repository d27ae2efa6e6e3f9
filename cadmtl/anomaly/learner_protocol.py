"""Leave-one-type-out protocol for the from-scratch anomaly learner: settings are chosen on defect types that the
reported numbers never see.

    cadmtl anomaly protocol data/tile --config tile_ad --output-dir outputs/tile-loto --seeds 0 1 2 --max-minutes 10

For every seed the learner is trained ONCE on the train split's normal images (``cadmtl anomaly train`` with
``--seed S --max-minutes M`` and every other option given here passed through), because training never sees a
defect and so does not depend on the fold. Then, for every defect type T of the validation split (a *fold*):

* **tuning**: each candidate setting (``--standardization`` global / pixel statistics of the held-out train
  normals x ``--fusion`` rule, whose weights are fitted on the tuning images, x an extra blur of the maps, sigma 0
  or 4) is scored on the validation images
  of the OTHER types plus the validation normals, by the mean of image AUROC and pixel AUROC (pixels at the model
  size); the best one is kept;
* **report**: the test images of type T plus all test normals are scored with the kept setting: image AUROC, pixel
  AUROC and AUPRO (``AnomalyMetrics``, maps at each image's own size). The model as the default command saved it
  (its own fusion and standardisation) is reported beside it.

Writes to ``--output-dir``: ``seed-S/`` (each training run, reused when its ``results.json`` exists, so a stopped
protocol resumes), ``protocol.json`` (every fold, seed, candidate score and metric), ``protocol.md`` (the per-fold
table, mean +- std over the seeds) and ``maps.png`` (per fold, the ``--figure-images`` anomalous test images of the
held-out type with the lowest image score, first seed: the image with the true contour, each task's
standardised map and the fused map, all at the image's own size).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from cadmtl.evaluation.reporting import format_mean_std, mean_std
from cadmtl.pictures.overlays import draw_anomaly_map
from cadmtl.training.launch import reset_accelerate_state
from dataset_scripts.options import exit_status
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import gaussian_blur

from .data import AnomalySample, load_anomaly_split, normal_only
from .learner import (
    FUSIONS,
    STANDARDIZATIONS,
    AnomalyLearner,
    choose_task_weights,
    fuse_task_maps,
    image_scores,
    images_to_uint8,
    normal_statistics_of,
    normalize,
)
from .learner_training import carve_held_out
from .learner_training import parse_args as parse_train_args
from .learner_training import train as train_learner
from .metrics import AnomalyMetrics, binary_auroc

logger = logging.getLogger("cadmtl.anomaly.learner_protocol")
FOLDS = ("leave-one-type-out",)
REPORTED = ("image_auroc", "pixel_auroc", "aupro")


@dataclass(frozen=True)
class Setting:
    """One candidate inference setting chosen per fold."""

    standardization: str
    fusion: str
    blur: float = 0.0  # extra Gaussian blur (sigma, model pixels) of each raw map, on top of the model's own

    @property
    def name(self) -> str:
        return f"{self.standardization}+{self.fusion}" + (f"+blur{self.blur:g}" if self.blur else "")


EXTRA_BLURS = (0.0, 4.0)
CANDIDATES = tuple(Setting(s, f, b) for b in EXTRA_BLURS for s in STANDARDIZATIONS for f in FUSIONS)
Statistics = dict[
    tuple[str, float], dict[str, dict[str, torch.Tensor]]
]  # (standardization, blur) -> task stats


def blurred(raw: dict[str, torch.Tensor], sigma: float) -> dict[str, torch.Tensor]:
    return {t: gaussian_blur(m, sigma) for t, m in raw.items()} if sigma else raw


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="cadmtl anomaly protocol",
        description="Leave-one-type-out evaluation of the from-scratch anomaly learner: train on normals (once per "
        "seed), choose the inference settings on the other defect types' validation images, report the held-out "
        "type's test images. Options not listed here go to `cadmtl anomaly train` unchanged.",
        epilog="example: cadmtl anomaly protocol data/tile --config tile_ad --output-dir outputs/tile-loto "
        "--seeds 0 1 2 --max-minutes 10",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("repo", help="dataset repo (folder or Hub id) holding the _ad config")
    parser.add_argument("--config", required=True, help="an anomaly-detection config, e.g. tile_ad")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--folds", default=FOLDS[0], choices=FOLDS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--figure-images", type=int, default=3, help="worst test images per fold in maps.png")
    return parser.parse_known_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Maps of one trained model
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def raw_maps_of(model: AnomalyLearner, images: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{task: (N, S, S)} raw (smoothed, unstandardised) error maps of (N, 3, S, S) uint8 images."""
    config = model.config
    collected: dict[str, list[torch.Tensor]] = {}
    for start in range(0, images.shape[0], batch_size):
        pixels = normalize(images[start : start + batch_size], config.image_mean, config.image_std)
        for task, value in model.raw_error_maps(pixels).items():
            collected.setdefault(task, []).append(value.float().cpu())
    return {task: torch.cat(values) for task, values in collected.items()}


def standardise(
    raw: dict[str, torch.Tensor], statistics: dict[str, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    return {t: (m - statistics[t]["location"]) / statistics[t]["scale"] for t, m in raw.items()}


def masks_at(samples: Sequence[AnomalySample], size: int) -> torch.Tensor:
    """(N, S, S) uint8 masks resized with nearest neighbour (0 / 1 / 255 kept)."""
    stacked = [
        F.interpolate(
            torch.from_numpy(np.array(s.mask))[None, None].float(), size=(size, size), mode="nearest"
        )[0, 0]
        for s in samples
    ]
    return torch.stack(stacked).to(torch.uint8)


def tuning_score(fused: torch.Tensor, scores: torch.Tensor, labels: np.ndarray, masks: torch.Tensor) -> float:
    """Mean of image AUROC and pixel AUROC (model-size masks, ignored pixels left out), in percent."""
    image = binary_auroc(scores.double().numpy(), labels)
    keep = masks != 255
    pixel = binary_auroc(fused[keep].double().numpy(), (masks[keep] == 1).numpy())
    return 50.0 * (image + pixel)


def choose_setting(
    raw: dict[float, dict[str, torch.Tensor]],
    statistics: Statistics,
    samples: Sequence[AnomalySample],
    masks: torch.Tensor,
    image_score: str,
    top_fraction: float,
) -> tuple[Setting, dict[str, float] | None, dict[str, float]]:
    """The candidate with the best tuning score on `samples` (normal and anomalous), its fusion weights and every
    candidate's score. `raw`: {extra blur: {task: (N, S, S) raw maps of `samples`}}."""
    labels = np.array([not s.is_normal for s in samples])
    scored: dict[str, float] = {}
    best: tuple[float, Setting, dict[str, float] | None] | None = None
    for setting in CANDIDATES:
        maps = standardise(raw[setting.blur], statistics[(setting.standardization, setting.blur)])
        weights = choose_task_weights(maps, labels, setting.fusion, image_score, top_fraction)
        fused = fuse_task_maps(maps, weights)
        value = tuning_score(fused, image_scores(fused, image_score, top_fraction), labels, masks)
        scored[setting.name] = value
        if best is None or value > best[0]:
            best = (value, setting, weights)
    assert best is not None
    return best[1], best[2], scored


def full_size(value: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(value[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def test_metrics(
    maps: dict[str, torch.Tensor],
    weights: dict[str, float] | None,
    samples: Sequence[AnomalySample],
    image_score: str,
    top_fraction: float,
) -> tuple[dict[str, float], torch.Tensor]:
    """Image / pixel AUROC and AUPRO of `samples` (maps upsampled to each image's size) and the image scores."""
    fused = fuse_task_maps(maps, weights)
    scores = image_scores(fused, image_score, top_fraction)
    metrics = AnomalyMetrics()
    for i, sample in enumerate(samples):
        metrics.update(
            full_size(fused[i], sample.size),
            sample.mask,
            sample.is_normal,
            sample.defect_type,
            float(scores[i]),
        )
    results = metrics.compute()
    return {key: float(results[key]) for key in REPORTED}, scores


# ----------------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------------

PANEL_HEIGHT = 150


def _panel(image: Image.Image, title: str) -> Image.Image:
    width = max(1, round(image.width * PANEL_HEIGHT / image.height))
    panel = Image.new("RGB", (max(width, 90), PANEL_HEIGHT + 16), "white")
    panel.paste(image.resize((width, PANEL_HEIGHT)), (0, 16))
    ImageDraw.Draw(panel).text((2, 2), title, fill="black")
    return panel


def map_rows(
    samples: Sequence[AnomalySample],
    maps: dict[str, torch.Tensor],
    fused: torch.Tensor,
    scores: torch.Tensor,
    normal_indices: Sequence[int],
    worst: Sequence[int],
) -> list[Image.Image]:
    """One row per image index in `worst`: the image with its true contour, each task map, the fused map. Each
    column's colours span the 50th to 99.9th percentile of that map over the normal images, so normal looks dark."""
    columns = {**{f"task {t}": m for t, m in maps.items()}, "fused": fused}
    ranges = {}
    for name, value in columns.items():
        normal = value[list(normal_indices)].flatten()
        low, high = torch.quantile(normal[:: max(1, normal.numel() // 200_000)], torch.tensor([0.5, 0.999]))
        ranges[name] = (float(low), float(high) if high > low else float(low) + 1.0)
    rows = []
    for i in worst:
        sample = samples[i]
        contour = draw_anomaly_map(
            sample.image, np.zeros(sample.size, np.float32), (0.0, 1.0), true_mask=sample.mask, alpha=0.0
        )
        panels = [_panel(contour, f"{sample.defect_type} {sample.image_id[:18]} s={float(scores[i]):.2f}")]
        for name, value in columns.items():
            heat = draw_anomaly_map(
                sample.image,
                full_size(value[i], sample.size).numpy(),
                ranges[name],
                true_mask=sample.mask,
            )
            panels.append(_panel(heat, name))
        row = Image.new("RGB", (sum(p.width for p in panels) + 4 * len(panels), panels[0].height), "white")
        x = 0
        for panel in panels:
            row.paste(panel, (x, 0))
            x += panel.width + 4
        rows.append(row)
    return rows


def stack_rows(rows: Sequence[Image.Image], headings: Sequence[str | None]) -> Image.Image:
    height = sum(r.height + (18 if h else 0) for r, h in zip(rows, headings, strict=True))
    canvas = Image.new("RGB", (max(r.width for r in rows), height), "white")
    y = 0
    draw = ImageDraw.Draw(canvas)
    for row, heading in zip(rows, headings, strict=True):
        if heading:
            draw.text((2, y + 3), heading, fill="black")
            y += 18
        canvas.paste(row, (0, y))
        y += row.height
    return canvas


# ----------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------


def train_seed(repo: str, config: str, run_dir: Path, seed: int, extra: Sequence[str]) -> dict[str, Any]:
    """Train one seed's learner into `run_dir` (or reuse a finished run there); returns its results.json."""
    results = run_dir / "results.json"
    if results.is_file() and (run_dir / "model" / "config.json").is_file():
        logger.info("seed %d: reusing the finished run in %s", seed, run_dir)
        return json.loads(results.read_text())
    summary = train_learner(
        [repo, "--config", config, "--output-dir", str(run_dir), "--seed", str(seed), *extra]
    )
    # Each run makes its own Accelerator: reset Accelerate's process-wide singletons for the next one.
    reset_accelerate_state()
    return summary


def run_protocol(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the protocol described by the command-line arguments; returns what protocol.json holds."""
    args, extra = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # The training options (held-out images, image size, ...) as `cadmtl anomaly train` reads them.
    train_args = parse_train_args([args.repo, "--config", args.config, "--output-dir", "unused", *extra])
    if train_args.tile_size is not None:
        raise ValueError(
            "cadmtl anomaly protocol tunes and scores whole images and cannot take --tile-size yet; a learner trained "
            "on tiles is reported per defect type by `cadmtl anomaly evaluate MODEL REPO --config C --split test`"
        )
    validation = load_anomaly_split(args.repo, args.config, "validation")
    test = load_anomaly_split(args.repo, args.config, "test")
    types = sorted({s.defect_type for s in validation if not s.is_normal})
    missing = sorted({s.defect_type for s in test if not s.is_normal} - set(types))
    if len(types) < 2:
        raise ValueError(
            f"{args.repo}/{args.config}: leave-one-type-out needs at least 2 defect types in the validation split; "
            f"found {types}"
        )
    if missing:
        raise ValueError(f"{args.repo}/{args.config}: test defect types {missing} have no validation images")
    train = normal_only(
        load_anomaly_split(args.repo, args.config, "train", limit=train_args.max_train_images),
        f"{args.config}/train",
    )
    _, held_index = carve_held_out(len(train), train_args.held_out_images, f"{args.config}/train")
    statistics_images = [train[i].image for i in held_index][0::2]  # the half `cadmtl anomaly train` fits on

    report: dict[str, Any] = {
        "command": "cadmtl anomaly protocol " + " ".join(sys.argv[2:] if argv is None else argv),
        "folds": args.folds,
        "types": types,
        "seeds": args.seeds,
        "candidates": [c.name for c in CANDIDATES],
        "runs": {},
        "per_fold": {t: {"seeds": {}} for t in types},
    }
    figure_rows: list[Image.Image] = []
    figure_headings: list[str | None] = []
    for seed_number, seed in enumerate(args.seeds):
        run_dir = output_dir / f"seed-{seed}"
        summary = train_seed(args.repo, args.config, run_dir, seed, extra)
        report["runs"][str(seed)] = {
            k: summary.get(k)
            for k in (
                "steps",
                "max_steps",
                "stopped_early",
                "train_seconds",
                "seconds_to_saved_model",
                "fusion",
            )
        }
        model = AnomalyLearner.from_pretrained(run_dir / "model")
        config = model.config
        size = config.image_size
        raw_normals = raw_maps_of(model, images_to_uint8(statistics_images, size))
        statistics: Statistics = {
            (s, b): {t: normal_statistics_of(m, s) for t, m in blurred(raw_normals, b).items()}
            for s in STANDARDIZATIONS
            for b in EXTRA_BLURS
        }
        raw_validation = raw_maps_of(model, images_to_uint8([s.image for s in validation], size))
        raw_validation_blurred = {b: blurred(raw_validation, b) for b in EXTRA_BLURS}
        raw_test = raw_maps_of(model, images_to_uint8([s.image for s in test], size))
        validation_masks = masks_at(validation, size)
        saved = {
            t: {"location": getattr(model, f"{t}_location"), "scale": getattr(model, f"{t}_scale")}
            for t in config.tasks
        }
        for held_out in types:
            tune = [i for i, s in enumerate(validation) if s.is_normal or s.defect_type != held_out]
            report_on = [i for i, s in enumerate(test) if s.is_normal or s.defect_type == held_out]
            setting, weights, scored = choose_setting(
                {b: {t: m[tune] for t, m in raw.items()} for b, raw in raw_validation_blurred.items()},
                statistics,
                [validation[i] for i in tune],
                validation_masks[tune],
                config.image_score,
                config.top_fraction,
            )
            samples = [test[i] for i in report_on]
            maps = standardise(
                blurred({t: m[report_on] for t, m in raw_test.items()}, setting.blur),
                statistics[(setting.standardization, setting.blur)],
            )
            chosen, scores = test_metrics(maps, weights, samples, config.image_score, config.top_fraction)
            default, _ = test_metrics(
                standardise({t: m[report_on] for t, m in raw_test.items()}, saved),
                config.task_weights,
                samples,
                config.image_score,
                config.top_fraction,
            )
            report["per_fold"][held_out]["seeds"][str(seed)] = {
                "setting": setting.name,
                "weights": weights,
                "tuning_scores": scored,
                "test": chosen,
                "default_command": default,
            }
            logger.info(
                "seed %d, held-out %s: chose %s; test image / pixel AUROC / AUPRO %.1f / %.1f / %.1f "
                "(default command %.1f / %.1f / %.1f)",
                seed,
                held_out,
                setting.name,
                *(chosen[k] for k in REPORTED),
                *(default[k] for k in REPORTED),
            )
            if seed_number == 0 and args.figure_images > 0:
                anomalous = [j for j, s in enumerate(samples) if not s.is_normal]
                worst = sorted(anomalous, key=lambda j: float(scores[j]))[: args.figure_images]
                normal = [j for j, s in enumerate(samples) if s.is_normal]
                rows = map_rows(samples, maps, fuse_task_maps(maps, weights), scores, normal, worst)
                figure_rows.extend(rows)
                figure_headings.extend(
                    [f"held-out {held_out} (seed {seed}, {setting.name}): lowest-scored test images"]
                    + [None] * (len(rows) - 1)
                )
        # Written after every seed, so a protocol stopped before its last seed still leaves its tables.
        write_outputs(report, output_dir)
        if figure_rows and seed_number == 0:
            stack_rows(figure_rows, figure_headings).save(output_dir / "maps.png")
    return report


def write_outputs(report: dict[str, Any], output_dir: Path) -> None:
    """Fill each fold's mean / std over the seeds done so far; write protocol.json and protocol.md."""
    report["seeds_done"] = sorted({int(k) for f in report["per_fold"].values() for k in f["seeds"]})
    for fold in report["per_fold"].values():
        for source in ("test", "default_command"):
            fold[source] = {
                key: dict(zip(("mean", "std"), mean_std([r[source][key] for r in fold["seeds"].values()])))
                for key in REPORTED
            }
    (output_dir / "protocol.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "protocol.md").write_text(protocol_table(report) + "\n")


def protocol_table(report: dict[str, Any]) -> str:
    """The per-fold Markdown table (mean ± std over the seeds)."""
    done = report.get("seeds_done", report["seeds"])
    seeds = len(done)
    lines = [
        f"Leave-one-type-out, {seeds} seed(s) ({', '.join(map(str, done))}); settings chosen on the "
        "other types' validation images; test = the held-out type's test images + all test normals.",
        "",
        "| held-out type | tuned on | image AUROC | pixel AUROC | AUPRO | settings chosen (per seed) | default "
        "command: image / pixel AUROC / AUPRO |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for held_out, fold in report["per_fold"].items():
        others = " + ".join(t for t in report["types"] if t != held_out)
        chosen = ", ".join(r["setting"] for r in fold["seeds"].values())
        cells = [
            format_mean_std(fold["test"][k]["mean"], fold["test"][k]["std"], seeds, digits=1)
            for k in REPORTED
        ]
        default = " / ".join(f"{fold['default_command'][k]['mean']:.1f}" for k in REPORTED)
        lines.append(f"| {held_out} | {others} | {' | '.join(cells)} | {chosen} | {default} |")
    means = {
        k: float(np.mean([fold["test"][k]["mean"] for fold in report["per_fold"].values()])) for k in REPORTED
    }
    lines.append("| **mean of folds** | | " + " | ".join(f"{means[k]:.1f}" for k in REPORTED) + " | | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`cadmtl anomaly protocol`: exit status 0, or 2 with one line on stderr for a user error."""
    return exit_status(lambda: run_protocol(argv))


if __name__ == "__main__":
    raise SystemExit(main())
