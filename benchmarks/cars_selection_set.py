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

`--against OTHER` scores a second model (fitted with the same `--max-train`) on the same photos at its saved weight
and reports its image AUROC minus the first model's, paired over the same resampled photos: the comparison of two
fits (another backbone, other head settings) whose spread is that of the difference, not of either number.

    cadmtl anomaly fit data/public --config cars_ad --output-dir out/cars-sel --image-size 256 \\
        --backbone efficientnet-lite0 --tile-size 256 --tile-overlap 0 --defect-head --max-train 250
    PYTHONPATH=. python benchmarks/cars_selection_set.py out/cars-sel/model data/public --held-out-from 250 \\
        --output out/cars-sel/selection.json
    PYTHONPATH=. python benchmarks/cars_selection_set.py out/cars-sel/model data/public --held-out-from 250 \\
        --against out/cars-sel-lite2/model --output out/cars-sel/against-lite2.json
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
    """Every held-out normal photo and its painted copy as `{"image", "mask" (None: normal), "type"}` (a painted copy
    also names its unpainted photo's place, "normal_index"), and how many photos had no room for their defect (kept
    as normals only)."""
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
        photos.append(
            {"image": painted[0], "mask": painted[1], "type": defect_type, "normal_index": len(photos) - 1}
        )
    return photos, not_placed


def part_maps(scorer: Any, images: list, processor: Any) -> list[list[np.ndarray]]:
    """The stitched maps at w 0 and w 1 (one list: the distances alone, for a scorer without a head)."""
    if scorer.defect_head is None:
        return [score_images(scorer, images, processor, desc="scoring")[1]]
    kept_weight = scorer.config.defect_head_weight
    parts = []
    for weight in (0.0, 1.0):
        scorer.config.defect_head_weight = weight
        parts.append(
            [m.astype(np.float16) for m in score_images(scorer, images, processor, desc=f"w {weight:g}")[1]]
        )
    scorer.config.defect_head_weight = kept_weight
    return parts


def blend(parts: list[list[np.ndarray]], weight: float, index: int) -> np.ndarray:
    if len(parts) == 1:
        return parts[0][index].astype(np.float32)
    return (1 - weight) * parts[0][index].astype(np.float32) + weight * parts[1][index].astype(np.float32)


def weighted_scores(
    scorer: Any, parts: list[list[np.ndarray]], weights: Sequence[float], truth: np.ndarray
) -> tuple[dict[float, np.ndarray], dict[float, float]]:
    """Per weight: every photo's image score (the scorer's own, on the blended map) and the pixel AUROC."""
    image_score, pixel_auroc = {}, {}
    for weight in weights:
        maps = [blend(parts, weight, i) for i in range(len(parts[0]))]
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
    return image_score, pixel_auroc


def per_type_diagnostics(
    photos: list[dict[str, Any]], maps: list[np.ndarray], scores: np.ndarray, labels: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per defect type, at one weight: the image AUROC of its painted photos against every normal one; the share
    of its painted photos whose map peaks on the defect (its highest value inside the mask above every value
    outside); and the median rise of the image score over the same photo unpainted, to set against the normal
    photos' own spread (`normal_score_std`). The peak test is stricter than `demo_route.peak_on_defect` (no dilation
    of the mask): the question here is whether the defect's values exceed everything else the photo holds, since
    only then can they raise the image score."""
    normal_std = float(scores[~labels].std())
    rows: dict[str, dict[str, float]] = {}
    for defect_type in dict.fromkeys(p["type"] for p in photos if p["type"] is not None):
        painted = [i for i, p in enumerate(photos) if p["type"] == defect_type]
        chosen = np.array(painted + list(np.where(~labels)[0]))
        peaks = [
            float(maps[i][photos[i]["mask"] > 0].max()) > float(maps[i][~(photos[i]["mask"] > 0)].max())
            for i in painted
        ]
        rises = [scores[i] - scores[photos[i]["normal_index"]] for i in painted]
        rows[defect_type] = {
            "painted_photos": len(painted),
            "image_auroc": 100 * binary_auroc(scores[chosen], labels[chosen]),
            "peak_on_defect_percent": 100 * float(np.mean(peaks)),
            "median_score_rise": float(np.median(rises)),
            "normal_score_std": normal_std,
        }
    return rows


def saved_weight(scorer: Any) -> float:
    return float(scorer.config.defect_head_weight) if scorer.defect_head is not None else 0.0


def measure(
    model_dir: str,
    repo: str,
    *,
    config: str,
    held_out_from: int,
    data_dir: Path | None,
    seed: int,
    against: str | None = None,
) -> dict[str, Any]:
    """The weight sweep of `model_dir` on the selection set; with `against`, a second model scored on the same
    photos at its saved weight, and its paired difference to the first."""
    scorer = load_anomaly_model(model_dir)
    photos, not_placed = selection_photos(repo, config, held_out_from, data_dir, seed)
    images = [p["image"] for p in photos]
    started = time.perf_counter()
    parts = part_maps(scorer, images, anomaly_processor(scorer))
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
    saved = saved_weight(scorer)
    weights = sorted({*(WEIGHTS if len(parts) == 2 else (0.0,)), saved})
    image_score, pixel_auroc = weighted_scores(scorer, parts, weights, truth)
    # one set of resampled photos (painted and normal drawn apart) for every weight and model: paired differences
    rng = np.random.default_rng(seed)
    positives, negatives = np.where(labels)[0], np.where(~labels)[0]
    draws = [
        np.concatenate([rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))])
        for _ in range(BOOTSTRAP_DRAWS)
    ]

    def bootstrap(scores: np.ndarray) -> np.ndarray:
        return 100 * np.array([binary_auroc(scores[d], labels[d]) for d in draws])

    resampled = {weight: bootstrap(scores) for weight, scores in image_score.items()}
    rows = [
        {
            "weight": weight,
            "image_auroc": 100 * binary_auroc(image_score[weight], labels),
            "image_auroc_bootstrap_std": float(resampled[weight].std()),
            "difference_to_saved": float((resampled[weight] - resampled[saved]).mean()),
            "difference_to_saved_std": float((resampled[weight] - resampled[saved]).std()),
            "pixel_auroc": pixel_auroc[weight],
        }
        for weight in image_score
    ]
    summary = {
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
        "per_type": per_type_diagnostics(
            photos, [blend(parts, saved, i) for i in range(len(photos))], image_score[saved], labels
        ),
    }
    if against is not None:
        other = load_anomaly_model(against)
        other_weight = saved_weight(other)
        # one pass at the other model's saved weight: its fused maps, scored as a single "part" (weight 0 reads it)
        other_parts = [score_images(other, images, anomaly_processor(other), desc=against)[1]]
        other_score, other_pixel = weighted_scores(other, other_parts, [0.0], truth)
        other_resampled = bootstrap(other_score[0.0])
        summary["against"] = {
            "model": against,
            "weight": other_weight,
            "image_auroc": 100 * binary_auroc(other_score[0.0], labels),
            "image_auroc_bootstrap_std": float(other_resampled.std()),
            "difference_to_model": float((other_resampled - resampled[saved]).mean()),
            "difference_to_model_std": float((other_resampled - resampled[saved]).std()),
            "pixel_auroc": other_pixel[0.0],
        }
    return summary


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
    if summary["per_type"]:
        lines += [
            "",
            f"Per defect type at w {summary['saved_weight']:g} (image score std over the normal photos: "
            f"{next(iter(summary['per_type'].values()))['normal_score_std']:.2f})",
            "",
            "| type | painted | image AUROC | map's peak on the defect % | median score rise over the unpainted photo |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {t} | {r['painted_photos']} | {r['image_auroc']:.1f} | {r['peak_on_defect_percent']:.0f} | "
            f"{r['median_score_rise']:+.2f} |"
            for t, r in summary["per_type"].items()
        ]
    if "against" in summary:
        a = summary["against"]
        lines += [
            "",
            f"`{a['model']}` at its saved w {a['weight']:g}: image AUROC {a['image_auroc']:.1f} "
            f"(bootstrap std {a['image_auroc_bootstrap_std']:.1f}), minus `{summary['model']}` at w "
            f"{summary['saved_weight']:g} (paired): {a['difference_to_model']:+.1f} ± "
            f"{a['difference_to_model_std']:.1f}; pixel AUROC {a['pixel_auroc']:.1f}",
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
    parser.add_argument(
        "--against",
        metavar="MODEL",
        help="a second model fitted with the same --max-train, scored on the same photos at its saved weight: "
        "its image AUROC minus the first model's, paired over the same resampled photos",
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
        against=args.against,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
