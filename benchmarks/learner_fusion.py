"""Fusion rules of the anomaly learner compared on trained models: same weights, only the fusion changes.

For each saved learner (``cadmtl anomaly train ... --output-dir RUN`` -> ``RUN/model``) the standardised task maps
of the validation and test images are computed once; each rule of ``cadmtl.anomaly.learner.choose_task_weights``
picks its weights on the validation split (``normal_variance``: on its normal images only), and the test split is
scored with the fused map exactly as ``AnomalyLearner.predict`` fuses it (image score at the model size, map
resized to each image's own size for the pixel metrics). Single-task rows (``only:TASK``) show each task's map alone.
Prints a Markdown table (mean ± std over the models) and writes every number to ``--output``.

Example (the RESULTS.md table, three seeds of the tile learner):
    PYTHONPATH=. python benchmarks/learner_fusion.py outputs/learner/tile-s{0,1,2}/model \\
        --repo outputs/data/tile --config tile_ad --output outputs/learner/fusion.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cadmtl.anomaly.data import AnomalySample, load_anomaly_split
from cadmtl.anomaly.learner import (
    FUSIONS,
    AnomalyLearner,
    choose_task_weights,
    fuse_task_maps,
    image_scores,
    images_to_uint8,
    normalize,
)
from cadmtl.anomaly.learner_training import standardised_task_maps
from cadmtl.anomaly.metrics import AnomalyMetrics
from cadmtl.evaluation.reporting import mean_std_cell

KEYS = ("image_auroc", "pixel_auroc", "aupro")


def task_maps(model: AnomalyLearner, samples: Sequence[AnomalySample]) -> dict[str, torch.Tensor]:
    config = model.config
    pixels = images_to_uint8([s.image for s in samples], config.image_size)
    return standardised_task_maps(model, normalize(pixels, config.image_mean, config.image_std))


def test_metrics(
    model: AnomalyLearner,
    maps: dict[str, torch.Tensor],
    samples: Sequence[AnomalySample],
    weights: dict[str, float] | None,
) -> dict:
    fused = fuse_task_maps(maps, weights)
    scores = image_scores(fused, model.config.image_score, model.config.top_fraction)
    metrics = AnomalyMetrics()
    for sample, amap, score in zip(samples, fused, scores):
        full = F.interpolate(amap[None, None], size=sample.size, mode="bilinear", align_corners=False)[0, 0]
        metrics.update(full, sample.mask, sample.is_normal, sample.defect_type, float(score))
    return metrics.compute()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="saved learners (RUN/model)")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", default=None, help="JSON with every model's weights and metrics")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    validation = load_anomaly_split(args.repo, args.config, "validation")
    test = load_anomaly_split(args.repo, args.config, "test")
    labels = [not s.is_normal for s in validation]
    normals = [i for i, s in enumerate(validation) if s.is_normal]
    results: dict[str, list[dict]] = {}
    for path in args.models:
        model = AnomalyLearner.from_pretrained(path)
        val_maps, test_maps = task_maps(model, validation), task_maps(model, test)
        rules: dict[str, dict[str, float] | None] = {}
        for rule in FUSIONS:
            if rule == "normal_variance":
                chosen = {task: value[normals] for task, value in val_maps.items()}
                rules[rule] = choose_task_weights(chosen, None, rule, model.config.image_score)
            else:
                rules[rule] = choose_task_weights(val_maps, labels, rule, model.config.image_score)
        rules.update({f"only:{task}": {t: float(t == task) for t in model.config.tasks} for task in val_maps})
        for rule, weights in rules.items():
            metrics = test_metrics(model, test_maps, test, weights)
            results.setdefault(rule, []).append({"model": path, "weights": weights, "metrics": metrics})
            shown = {k: round(metrics[k], 1) for k in KEYS}
            print(f"{path} {rule}: {shown} weights {weights}", flush=True)
    print("\n| fusion | " + " | ".join(KEYS) + " | per defect type image AUROC |")
    print("|---|" + "---|" * (len(KEYS) + 1))
    for rule, runs in results.items():
        cells = [mean_std_cell([run["metrics"][key] for run in runs], digits=1) for key in KEYS]
        types = sorted(runs[0]["metrics"]["per_defect_type"])
        per_type = " / ".join(
            f"{t} {np.mean([run['metrics']['per_defect_type'][t]['image_auroc'] for run in runs]):.1f}"
            for t in types
        )
        print(f"| {rule} | " + " | ".join(cells) + f" | {per_type} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
