"""The small sweep that chose the defaults of the patch-memory scorer on the ImageNet EfficientNet-Lite backbone
(`cadmtl anomaly fit --backbone efficientnet-lite0`), on the VALIDATION split of the magnetic-tile config only
(the test split is left for the final 3-seed runs in RESULTS.md).

Kept small for a shared 2-core CPU: the features of `--bank-images` train normals and of the validation images are
extracted once per input size (feature levels 2 / 3 / 4, resized to the stride-8 grid, not yet pooled); every
variant then slices channels, pools and searches on those. Stage 1 compares input size x layers with 3x3 pooling,
k = 1 and a random 10 % bank (sigma and the image score are post-processing, so every stage-1 search is scored
with each); stage 2 varies one thing at a time on the best stage-1 setting: no pooling, k = 3, greedy coreset shares. Rows are ranked by the mean of image and pixel
AUROC (percent). Prints Markdown tables and writes every number to `--output`.

Example (the RESULTS.md table):
    cadmtl data convert magnetic_tile ../shared/data/magnetic_tile --out data/tile --config tile_ad
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/sweep_pretrained_anomaly.py --repo data/tile --config tile_ad \\
        --output outputs/sweep_pretrained_anomaly.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cadmtl.anomaly.data import load_anomaly_split, normal_only, to_pixel_values
from cadmtl.anomaly.memory_bank import NearestNeighborIndex, greedy_coreset
from cadmtl.anomaly.metrics import auroc_sorted, binary_auroc
from cadmtl.features import PatchFeatureExtractor
from cadmtl.pretrained import pretrained_backbone
from modeling_cadmtl_anomaly.configuration_cadmtl_anomaly import backbone_normalization
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import gaussian_blur, image_scores


def bank_images(repo: str, config: str, count: int, seed: int) -> list:
    """A seeded draw of `count` train normals (in split order): the bank of the sweeps."""
    train = normal_only(load_anomaly_split(repo, config, "train"), "train")
    order = np.random.default_rng(seed).permutation(len(train))
    return [train[i] for i in sorted(order[:count])]


@torch.no_grad()
def raw_features(
    extractor: PatchFeatureExtractor, images, size: int, mean, std, batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """level (2 / 3 / 4) -> (N, C_level, h, w) float16 at the stride-8 grid, not pooled, for any Lite variant."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = to_pixel_values(images[start : start + batch_size], size, mean, std)
        chunks.append(extractor(pixels).half())
    widths = [extractor.backbone.channels[extractor._timm_level(level)] for level in extractor.layers]
    return dict(zip(extractor.layers, torch.cat(chunks).split(widths, dim=1)))


def variant(features: dict[int, torch.Tensor], layers: tuple[int, ...], pooled: bool) -> torch.Tensor:
    maps = torch.cat([features[layer] for layer in layers], dim=1).float()
    if pooled:
        maps = F.avg_pool2d(maps, 3, stride=1, padding=1, count_include_pad=False)
    return maps


def flat(maps: torch.Tensor) -> torch.Tensor:
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def image_auroc(distances: torch.Tensor, samples, score: str) -> float:
    """distances (N, h, w) -> image AUROC (percent) of the image score `score` ("max" / "top_mean")."""
    scores = image_scores(distances, score, 0.01).numpy()
    labels = np.array([not s.is_normal for s in samples])
    return 100 * binary_auroc(scores.astype(np.float64), labels)


def pixel_auroc(distances: torch.Tensor, samples, size: int, sigma: float) -> float:
    """distances (N, h, w) -> pixel AUROC (percent) with maps blurred at the fit size, resized to each image's
    own size (as `cadmtl anomaly evaluate`)."""
    maps = F.interpolate(distances[:, None], size=(size, size), mode="bilinear", align_corners=False)
    maps = gaussian_blur(maps[:, 0], sigma)
    positives, negatives = [], []
    for amap, sample in zip(maps, samples):
        full = F.interpolate(amap[None, None], size=sample.size, mode="bilinear", align_corners=False)[
            0, 0
        ].numpy()
        mask = np.asarray(sample.mask)
        positives.append(full[mask == 1])
        negatives.append(full[mask == 0])
    return 100 * auroc_sorted(np.sort(np.concatenate(positives)), np.sort(np.concatenate(negatives)))


def evaluate(features, size, layers, pooled, k, bank_choice, args, validation, stage) -> list[dict]:
    """Rows of one (size, layers, pooling, k, bank) setting: every sigma x image score on the validation split.
    `bank_choice`: "random 10 %" of the bank images' patches, or a greedy coreset fraction."""
    bank_maps, query_maps = (variant(f, layers, pooled) for f in features)
    bank = flat(bank_maps)
    if bank_choice == "random 10 %":
        keep = torch.randperm(bank.shape[0], generator=torch.Generator().manual_seed(args.seed))
        bank = bank[keep[: bank.shape[0] // 10]]
    else:
        bank = bank[greedy_coreset(bank, bank_choice, args.seed)]
        bank_choice = f"greedy {100 * bank_choice:g} %"
    batch, _, grid_h, grid_w = query_maps.shape
    # A seeded 64-dim projection finds 16 candidates, re-ranked exactly: cheap enough for a shared CPU.
    index = NearestNeighborIndex(bank, projection_dim=args.projection_dim, num_candidates=16, seed=args.seed)
    distances = index.search(flat(query_maps), k).view(batch, grid_h, grid_w)
    # The image score does not depend on sigma, the pixel maps not on the image score.
    pixel = {sigma: pixel_auroc(distances, validation, size, sigma) for sigma in args.sigmas}
    image = {score: image_auroc(distances, validation, score) for score in ("max", "top_mean")}
    setting = {
        "stage": stage,
        "size": size,
        "layers": list(layers),
        "pooled": pooled,
        "k": k,
        "bank": bank_choice,
    }
    return [
        {
            **setting,
            "bank_entries": int(bank.shape[0]),
            "sigma": sigma,
            "image_score": score,
            "image_auroc": image[score],
            "pixel_auroc": pixel[sigma],
        }
        for sigma, score in itertools.product(args.sigmas, image)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", required=True)
    parser.add_argument("--config", default="tile_ad")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 320])
    parser.add_argument("--bank-images", type=int, default=60, help="train normals in the sweep's bank")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--coreset-fractions", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--projection-dim", type=int, default=64, help="approximate search (exact re-ranking); 0: exact"
    )
    parser.add_argument("--output", default="outputs/sweep_pretrained_anomaly.json")
    args = parser.parse_args()

    backbone = pretrained_backbone(args.backbone)
    mean, std = backbone_normalization(backbone.config)
    extractor = PatchFeatureExtractor(backbone, [2, 3, 4], aggregate=False).eval()
    train = bank_images(args.repo, args.config, args.bank_images, args.seed)
    validation = load_anomaly_split(args.repo, args.config, "validation")
    rows, started = [], time.perf_counter()
    print(f"{len(train)} train normals in the bank, {len(validation)} validation images", flush=True)
    cached: dict[int, tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}
    for size in args.sizes:
        cached[size] = (
            raw_features(extractor, [s.image for s in train], size, mean, std),
            raw_features(extractor, [s.image for s in validation], size, mean, std),
        )
        print(f"features at {size} px: {time.perf_counter() - started:.0f} s", flush=True)
        for layers in ((2, 3), (2, 3, 4)):
            rows += evaluate(cached[size], size, layers, True, 1, "random 10 %", args, validation, stage=1)
            print(f"  layers {layers}: {time.perf_counter() - started:.0f} s", flush=True)

    def rank(row: dict) -> float:
        return (row["image_auroc"] + row["pixel_auroc"]) / 2

    best = max(rows, key=rank)
    size, layers = best["size"], tuple(best["layers"])
    rows += evaluate(cached[size], size, layers, False, 1, "random 10 %", args, validation, stage=2)
    rows += evaluate(cached[size], size, layers, True, 3, "random 10 %", args, validation, stage=2)
    print(f"  no pooling, k = 3: {time.perf_counter() - started:.0f} s", flush=True)
    for fraction in args.coreset_fractions:
        rows += evaluate(cached[size], size, layers, True, 1, fraction, args, validation, stage=2)
        print(f"  coreset {fraction}: {time.perf_counter() - started:.0f} s", flush=True)

    print(
        "\n| stage | size | layers | 3x3 pooling | k | sigma | image score | bank | image AUROC | pixel AUROC |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['stage']} | {row['size']} | {'+'.join(map(str, row['layers']))} | {'yes' if row['pooled'] else 'no'} "
            f"| {row['k']} | {row['sigma']:g} | {row['image_score']} | {row['bank']} | {row['image_auroc']:.1f} "
            f"| {row['pixel_auroc']:.1f} |"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps({"seconds": time.perf_counter() - started, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
