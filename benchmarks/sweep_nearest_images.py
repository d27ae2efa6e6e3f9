"""Would a memory of the nearest normal images beat the coreset bank? Measured from a fitted scorer's backbone.

The patch-memory scorer searches a greedy coreset of 1 % of every train patch: its nearest-neighbour distances are
about the coreset's covering radius everywhere (~32 on the tiles), so a thin crack and the tiles' own streaks end up
at the same distance. This script scores each image SPADE-style instead: its K nearest train images by the mean of
their patch features, then the exact nearest neighbour of each patch among *all* the patches of those K images.
Dense memory makes the borders of the grid stand out (fewer similar border patches: 99 % of the normal tiles' highest
cell lies within 3 cells of the edge), so it also measures an image score on a border profile fitted on the validation
normals: each ring of cells (0 = the outermost, `--border-rings` rings) divided by its mean normal distance relative
to the interior's before the top 1 % is taken; the maps are left as they are.

Everything else is the scorer's own: its features (levels, pooling), its input size, its blur (sigma), its top-1 %
image score, and maps resized to each image's original size by `AnomalyImageProcessor.post_process_anomaly_maps`.
Validation and test splits are scored; the test split is only read for the report.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/sweep_nearest_images.py out/tile-lite2-s0/model data/tile \
        --config tile_ad --neighbours 10 20 40 --output out/nearest-images.json

Memory: every train image's patch features in float16 (666 tiles at 384 px, Lite2: 1.6 GB).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cadmtl.anomaly.data import AnomalySample, load_anomaly_split, to_pixel_values
from cadmtl.anomaly.metrics import AnomalyMetrics
from cadmtl.anomaly.models import anomaly_processor
from cadmtl.anomaly.patch_memory import PatchMemoryScorer
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import (
    border_profile,
    image_scores,
    ring_scale,
    upsample_blur,
)

SPLITS = ("validation", "test")


@torch.no_grad()
def patch_features(scorer: PatchMemoryScorer, sample: AnomalySample) -> torch.Tensor:
    """(C, h, w) float32: the scorer's pooled multi-level features of one image at its input size."""
    config = scorer.config
    pixels = to_pixel_values([sample.image], tuple(config.image_size), config.image_mean, config.image_std)
    return scorer.patch_features(pixels)[0]


@torch.no_grad()
def nearest_image_grids(
    scorer: PatchMemoryScorer, train: list[AnomalySample], queries: list[AnomalySample], neighbours: list[int]
) -> dict[int, np.ndarray]:
    """{K: (Q, h, w) distances of each query patch to its nearest patch among the K nearest train images}."""
    bank = torch.stack([patch_features(scorer, s).half() for s in tqdm(train, desc="train features")])
    count, channels, height, width = bank.shape
    descriptors = bank.float().mean((2, 3))  # (N, C): one vector per train image
    patches = bank.permute(0, 2, 3, 1).reshape(count, height * width, channels)  # (N, h*w, C)
    neighbours = sorted(set(neighbours))
    grids: dict[int, list[np.ndarray]] = {k: [] for k in neighbours}
    for sample in tqdm(queries, desc="scoring"):
        features = patch_features(scorer, sample)
        order = torch.cdist(features.mean((1, 2))[None], descriptors)[0].argsort()
        query = features.permute(1, 2, 0).reshape(-1, channels)
        best = torch.full((height * width,), float("inf"))
        done = 0
        for k in neighbours:  # each K only searches the images it adds to the previous K's
            candidates = patches[order[done:k]].reshape(-1, channels).float()
            best = torch.minimum(best, torch.cdist(query, candidates).min(1).values)
            done = k
            grids[k].append(best.view(height, width).numpy().copy())
    return {k: np.stack(v) for k, v in grids.items()}


def split_metrics(
    scorer: PatchMemoryScorer, samples: list[AnomalySample], grids: np.ndarray, score_scale: np.ndarray
) -> dict:
    """The evaluate command's metrics for grids scored the scorer's way (blur, top-1 % score, original sizes); the
    image score is taken from the grids divided by `score_scale` (h, w), the maps from the grids as they are."""
    config = scorer.config
    grid_tensor = torch.from_numpy(grids).float()
    scores = image_scores(
        grid_tensor / torch.from_numpy(score_scale).float(), config.image_score, config.top_fraction
    )
    maps = upsample_blur(grid_tensor, tuple(config.image_size), config.sigma)
    outputs = {"anomaly_maps": maps, "image_scores": scores}
    results = anomaly_processor(scorer).post_process_anomaly_maps(outputs, [s.size for s in samples])
    metrics = AnomalyMetrics()
    for sample, result in zip(samples, results):
        metrics.update(
            result["anomaly_map"],
            sample.mask,
            sample.is_normal,
            sample.defect_type,
            image_score=result["score"],
        )
    return metrics.compute()


def summary(results: dict) -> str:
    per_type = " ".join(
        f"{name} {values['image_auroc']:.1f}/{values['pixel_auroc']:.1f}"
        for name, values in results["per_defect_type"].items()
    )
    return (
        f"image {results['image_auroc']:.1f} pixel {results['pixel_auroc']:.1f} AUPRO {results['aupro']:.1f} "
        f"| per type image/pixel: {per_type}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a fitted patch-memory scorer (cadmtl anomaly fit ... /model)")
    parser.add_argument("repo")
    parser.add_argument("--config", required=True)
    parser.add_argument("--neighbours", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--border-rings", type=int, default=5)
    parser.add_argument("--max-train", type=int, default=None, help="use the first N train images")
    parser.add_argument("--output", type=Path, default=None, help="a JSON file for every number printed")
    args = parser.parse_args()

    start = time.time()
    scorer = PatchMemoryScorer.from_pretrained(args.model).eval()
    train = load_anomaly_split(args.repo, args.config, "train", args.max_train)
    splits = {name: load_anomaly_split(args.repo, args.config, name) for name in SPLITS}
    queries = [s for name in SPLITS for s in splits[name]]
    grids = nearest_image_grids(scorer, train, queries, args.neighbours)
    num_validation = len(splits["validation"])
    validation_normal = np.array([s.is_normal for s in splits["validation"]])
    report: dict = {"model": args.model, "train_images": len(train), "rows": []}
    for k, grid in grids.items():
        # the scorer's own profile (`cadmtl anomaly fit --neighbour-images`): fewer rings where the grid is small
        profile = border_profile(
            torch.from_numpy(grid[:num_validation][validation_normal]), args.border_rings
        )
        if profile is None:
            raise SystemExit(
                f"--border-rings {args.border_rings}: a {grid.shape[1:]} grid of cells has no interior"
            )
        scale = ring_scale(*grid.shape[1:], profile, torch.zeros(())).numpy()
        print(
            f"K={k}: border profile (rings 0..{len(profile) - 2}, interior) {np.round(profile, 3).tolist()}"
        )
        variants = (
            ("dense memory", np.ones_like(scale)),
            ("dense memory, image score / border profile", scale),
        )
        for variant, score_scale in variants:
            for name, part in (("validation", grid[:num_validation]), ("test", grid[num_validation:])):
                results = split_metrics(scorer, splits[name], part, score_scale)
                print(f"K={k} {variant:44s} {name:10s} {summary(results)}", flush=True)
                report["rows"].append(
                    {
                        "neighbours": k,
                        "variant": variant,
                        "split": name,
                        "profile": profile,
                        **results,
                    }
                )
    report["seconds"] = round(time.time() - start)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
