"""Evaluate a trained AnomalyLearner on an `_ad` split: the fused map and each proxy task's map alone.

Prints one Markdown table (image AUROC, pixel AUROC, AUPRO, ... per map) and the per-defect-type table of the fused
map; `--standardization` refits the normal statistics on the same held-out normals the training run used (the
carve-out is fixed), so global and per-pixel standardisation can be compared without retraining.

Example:
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_learner.py runs/learner data/tile --config tile_ad
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from cadmtl.anomaly.data import iter_anomaly_split, load_anomaly_split
from cadmtl.anomaly.learner import AnomalyLearner, image_scores, images_to_uint8, normalize
from cadmtl.anomaly.learner_training import carve_held_out
from cadmtl.anomaly.metrics import METRIC_KEYS, AnomalyMetrics, metrics_table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("repo")
    parser.add_argument("--config", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--standardization", choices=["global", "pixel"], default=None)
    parser.add_argument("--held-out-images", type=int, default=64, help="as in the training run")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    model = AnomalyLearner.from_pretrained(args.model_dir)
    config = model.config
    if args.standardization:
        train = load_anomaly_split(args.repo, args.config, "train")
        _, held = carve_held_out(len(train), args.held_out_images)
        normals = images_to_uint8([train[i].image for i in held], config.image_size)[0::2]
        config.standardization = args.standardization
        model.fit_normal_statistics(normalize(normals, config.image_mean, config.image_std))
    names = ["fused", *config.tasks]
    metrics = {name: AnomalyMetrics() for name in names}
    seconds, count, pending = 0.0, 0, []

    def flush() -> None:
        nonlocal seconds, count
        pixels = normalize(images_to_uint8([s.image for s in pending], config.image_size), *_stats(config))
        started = time.perf_counter()
        out = model.predict(pixels)
        seconds += time.perf_counter() - started
        count += len(pending)
        maps = {"fused": out.anomaly_maps, **out.task_maps}
        for name, value in maps.items():
            scores = image_scores(value, config.image_score, config.top_fraction)
            for i, sample in enumerate(pending):
                resized = F.interpolate(value[i][None, None], size=sample.size, mode="bilinear")[0, 0]
                metrics[name].update(
                    resized, sample.mask, sample.is_normal, sample.defect_type, float(scores[i])
                )
        pending.clear()

    for sample in iter_anomaly_split(args.repo, args.config, args.split):
        pending.append(sample)
        if len(pending) == args.batch_size:
            flush()
    if pending:
        flush()
    results = {name: metric.compute() for name, metric in metrics.items()}
    print(f"| map ({args.split}, {count} images) | " + " | ".join(METRIC_KEYS) + " |")
    print("|---|" + "---:|" * len(METRIC_KEYS))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[name][key]:.1f}" for key in METRIC_KEYS) + " |")
    print()
    print(metrics_table(results["fused"]["per_defect_type"]))
    print(
        f"\nscoring: {1000 * seconds / max(count, 1):.1f} ms per image ({torch.get_num_threads()} CPU threads)"
    )
    summary = {"results": results, "seconds_per_image": seconds / max(count, 1), "images": count}
    print(json.dumps({n: {k: results[n][k] for k in METRIC_KEYS} for n in names}))
    return summary


def _stats(config) -> tuple[list[float], list[float]]:
    return config.image_mean, config.image_std


if __name__ == "__main__":
    main()
