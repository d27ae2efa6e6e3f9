"""A larger set for choosing a cars scorer's settings than `cars_ad` validation's 75 photos.

Why: on those 75 photos a bootstrap puts one model's image AUROC at +- 6 points, the same model scores 69.8 on
validation and 76.9 on test, and the two splits prefer other defect-head weights (RESULTS.md, session 13).

The set: normal photos the scorer never fitted on, each scored as it is and again with ONE painted defect.
- The normal photos are the train photos after the first N (`cadmtl anomaly fit --max-train N` fits on the first N)
  and the validation normals. The validation normals also set the head's normal statistics and the thresholds, which
  moves no AUROC below except through the weight's scale.
- The painter is `benchmarks/demo_route.py`'s: `cars_ad`'s seven types cycled, centred on the car by the
  carparts_dsmlr part polygons, seeded per photo.

A scorer with a defect head is scored twice, at w 0 and at w 1 (its standardised distance part and head part). The
fused map of any w is their blend, since the blur, the stitching and the fusion are linear. Per weight it reports:
- the pooled image AUROC (the scorer's own image score on the blended map) and its bootstrap standard deviation over
  photos;
- the paired bootstrap difference to the model's saved weight: the same resampled photos score both weights, so
  the spread is that of the difference;
- the pixel AUROC over every photo, on every 4th pixel row and column.

    cadmtl anomaly fit data/public --config cars_ad --output-dir out/cars-sel --image-size 256 \\
        --backbone efficientnet-lite0 --tile-size 256 --tile-overlap 0 --defect-head --max-train 250
    PYTHONPATH=. python benchmarks/cars_selection_set.py out/cars-sel/model data/public --held-out-from 250 \\
        --output out/cars-sel/selection.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.demo_route import car_samples, painted_copy
from cadmtl.anomaly.data import load_anomaly_split
from cadmtl.anomaly.models import anomaly_processor, load_anomaly_model, score_images
from cadmtl.evaluation.metrics.binary import binary_auroc
from dataset_scripts.make_public import CARS_AD_ANOMALIES
from dataset_scripts.synthesize import defect_specs
from dataset_scripts.taxonomy import load_taxonomy
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import image_scores

WEIGHTS = (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0)
PIXEL_STRIDE = 4  # pixel AUROC on every 4th row and column: ~10x fewer pixels, the same value to ~0.1
BOOTSTRAP_DRAWS = 2000


def selection_photos(
    repo: str, config: str, held_out_from: int, data_dir: Path | None, seed: int
) -> tuple[list[dict[str, Any]], int]:
    """Every held-out normal photo and its painted copy as `{"image", "mask" (None: normal), "type"}`, and how many
    photos had no room for their defect (kept as normals only)."""
    train = load_anomaly_split(repo, config, "train")
    if len(train) <= held_out_from:
        raise ValueError(
            f"{repo} {config}/train has {len(train)} photos: none is left after --held-out-from {held_out_from}"
        )
    normals = train[held_out_from:] + [
        s for s in load_anomaly_split(repo, config, "validation") if s.is_normal
    ]
    specs = defect_specs(dict.fromkeys(CARS_AD_ANOMALIES, 1), config, load_taxonomy())
    polygons = car_samples(data_dir)
    photos, not_placed = [], 0
    for rank, sample in enumerate(normals):
        photos.append({"image": sample.image, "mask": None, "type": None})
        defect_type, _, painted = painted_copy(sample, rank, specs, CARS_AD_ANOMALIES, polygons, seed)
        if painted is None:
            not_placed += 1
            continue
        photos.append({"image": painted[0], "mask": painted[1], "type": defect_type})
    return photos, not_placed


def part_maps(scorer: Any, images: list, processor: Any) -> list[list[np.ndarray]]:
    """The stitched maps at w 0 and w 1 (one list: the distances alone, for a scorer without a head)."""
    if scorer.defect_head is None:
        return [score_images(scorer, images, processor, desc="scoring")[1]]
    saved_weight = scorer.config.defect_head_weight
    parts = []
    for weight in (0.0, 1.0):
        scorer.config.defect_head_weight = weight
        parts.append(
            [m.astype(np.float16) for m in score_images(scorer, images, processor, desc=f"w {weight:g}")[1]]
        )
    scorer.config.defect_head_weight = saved_weight
    return parts


def blend(parts: list[list[np.ndarray]], weight: float, index: int) -> np.ndarray:
    if len(parts) == 1:
        return parts[0][index].astype(np.float32)
    return (1 - weight) * parts[0][index].astype(np.float32) + weight * parts[1][index].astype(np.float32)


def measure(
    model_dir: str, repo: str, *, config: str, held_out_from: int, data_dir: Path | None, seed: int
) -> dict[str, Any]:
    scorer = load_anomaly_model(model_dir)
    processor = anomaly_processor(scorer)
    photos, not_placed = selection_photos(repo, config, held_out_from, data_dir, seed)
    started = time.perf_counter()
    parts = part_maps(scorer, [p["image"] for p in photos], processor)
    seconds = time.perf_counter() - started
    labels = np.array([p["mask"] is not None for p in photos])
    truth = np.concatenate(
        [
            (np.zeros(m.shape, bool) if p["mask"] is None else p["mask"])[
                ::PIXEL_STRIDE, ::PIXEL_STRIDE
            ].ravel()
            for p, m in zip(photos, parts[0])
        ]
    )
    weights = WEIGHTS if len(parts) == 2 else (0.0,)
    saved = float(scorer.config.defect_head_weight) if len(parts) == 2 else 0.0
    image_score, pixel_auroc = {}, {}
    for weight in sorted({*weights, saved}):
        maps = [blend(parts, weight, i) for i in range(len(photos))]
        image_score[weight] = np.array(
            [
                float(
                    image_scores(
                        torch.from_numpy(m)[None], scorer.config.image_score, scorer.config.top_fraction
                    )
                )
                for m in maps
            ]
        )
        pixels = np.concatenate([m[::PIXEL_STRIDE, ::PIXEL_STRIDE].ravel() for m in maps])
        pixel_auroc[weight] = 100 * binary_auroc(pixels, truth)
    # one set of resampled photos (painted and normal drawn apart) for every weight: paired differences
    rng = np.random.default_rng(seed)
    positives, negatives = np.where(labels)[0], np.where(~labels)[0]
    draws = [
        np.concatenate([rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))])
        for _ in range(BOOTSTRAP_DRAWS)
    ]
    bootstrap = {
        weight: 100 * np.array([binary_auroc(scores[d], labels[d]) for d in draws])
        for weight, scores in image_score.items()
    }
    rows = [
        {
            "weight": weight,
            "image_auroc": 100 * binary_auroc(image_score[weight], labels),
            "image_auroc_bootstrap_std": float(bootstrap[weight].std()),
            "difference_to_saved": float((bootstrap[weight] - bootstrap[saved]).mean()),
            "difference_to_saved_std": float((bootstrap[weight] - bootstrap[saved]).std()),
            "pixel_auroc": pixel_auroc[weight],
        }
        for weight in image_score
    ]
    return {
        "model": model_dir,
        "repo": repo,
        "config": config,
        "held_out_from": held_out_from,
        "normal_photos": int((~labels).sum()),
        "painted_photos": int(labels.sum()),
        "defect_not_placed": not_placed,
        "saved_weight": saved,
        "scoring_seconds": seconds,
        "rows": rows,
    }


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"`{summary['model']}`: {summary['normal_photos']} normal + {summary['painted_photos']} painted photos "
        f"(train photos from {summary['held_out_from']} on, and the validation normals)",
        "",
        f"| w | image AUROC | bootstrap std | minus w {summary['saved_weight']:g} (paired) | pixel AUROC |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['weight']:g} | {r['image_auroc']:.1f} | {r['image_auroc_bootstrap_std']:.1f} | "
        f"{r['difference_to_saved']:+.1f} ± {r['difference_to_saved_std']:.1f} | {r['pixel_auroc']:.1f} |"
        for r in summary["rows"]
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/cars_selection_set.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="a `cadmtl anomaly fit` model folder fitted with --max-train N")
    parser.add_argument("repo", help="the repo holding the config (cadmtl data make-public)")
    parser.add_argument("--config", default="cars_ad")
    parser.add_argument("--held-out-from", type=int, required=True, help="N of the fit's --max-train")
    parser.add_argument(
        "--data", type=Path, default=Path("../shared/data"), help="holds carparts_dsmlr's polygons"
    )
    parser.add_argument("--seed", type=int, default=0, help="the painter's and the bootstrap's seed")
    parser.add_argument("--output", type=Path, default=Path("selection.json"))
    args = parser.parse_args(argv)
    summary = measure(
        args.model,
        args.repo,
        config=args.config,
        held_out_from=args.held_out_from,
        data_dir=args.data,
        seed=args.seed,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
