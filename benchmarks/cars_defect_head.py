"""A measured direction for the cars (issue 17): a small per-cell defect head on the scorer's frozen features,
trained on the normal train photos with defects painted by the project's painter, its map fused with the
patch-memory map; every defect type of the evaluation split is held out of the head's training in turn
(leave-one-type-out), so the head is never trained on the style it is scored on.

The product's head (`cadmtl anomaly fit --defect-head`, `cadmtl.anomaly.defect_head`) is trained on texture
anomalies instead, never on this painter, so it needs no leave-one-type-out; this script keeps the painter's
experiment runnable.

Steps (one run, all on CPU):
1. The tiled patch-memory scorer exactly as `cadmtl anomaly fit --backbone efficientnet-lite0 --image-size 256
   --tile-size 256 --tile-overlap 0` builds it (1 % coreset, 64-dim projected search, maps averaged over flips), and
   its maps of the evaluation split through the one scoring path (`score_images`).
2. Training cells: each normal train photo painted `--variants` times (one defect each, the split's defect types
   cycled, `place_defects` with `make-public`'s radius range, anywhere on the photo: the train split holds no car
   outline); the upright tile features of each painted photo, a cell positive where >= 25 % of it is painted, 5 % of
   the clean cells kept as negatives.
3. Per held-out type: an MLP head (C -> 128 -> 1, standardised inputs, positive-weighted BCE, AdamW, 6 epochs) on the
   cells of the other types; its probabilities on the upright tiles of the evaluation photos, stitched and blurred
   like the scorer's maps; the fused map = w * z(head) + (1 - w) * z(memory), each z-scored over all evaluation
   pixels (no labels used); the image score the top 1 % of the fused map. Metrics: the held-out type's images
   against every normal image of the split.

Example (2-core CPU, ~35 min):
    cadmtl data make-public data/public --data ../shared/data --configs cars_ad
    PYTHONPATH=. python benchmarks/cars_defect_head.py data/public --config cars_ad --split validation \\
        --output out/cars-defect-head.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from cadmtl.anomaly.command import bank_pixel_values
from cadmtl.anomaly.data import AnomalySample, load_anomaly_split, normal_only
from cadmtl.anomaly.metrics import compute_anomaly_metrics, defect_type_subsets
from cadmtl.anomaly.models import anomaly_processor, score_images
from cadmtl.anomaly.patch_memory import PatchMemoryScorer
from cadmtl.features import load_backbone
from dataset_scripts.synthesize import DEFAULT_RADIUS, defect_specs
from dataset_scripts.synthetic import place_defects
from dataset_scripts.taxonomy import load_taxonomy
from modeling_cadmtl_anomaly import AnomalyImageProcessor
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import gaussian_blur, image_scores, stitch

POSITIVE_SHARE = 0.25  # a training cell counts as a defect where at least this share of it is painted
NEGATIVE_KEEP = 0.05  # share of the clean cells kept as negatives


@torch.no_grad()
def tile_cells(
    scorer: PatchMemoryScorer, processor: AnomalyImageProcessor, image: Image.Image, mask: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, int, int, int]]]:
    """Upright tile features (T, C, h, w), the painted share of each cell (T, h, w) when `mask` is given, the boxes."""
    pixel_values, boxes = processor.tiles(image)
    features = scorer.patch_features(pixel_values)
    if mask is None:
        return features, None, boxes
    painted = torch.from_numpy(mask.astype(np.float32))
    shares = torch.stack(
        [
            F.adaptive_avg_pool2d(painted[y0:y1, x0:x1][None, None], features.shape[-2:])[0, 0]
            for x0, y0, x1, y1 in boxes
        ]
    )
    return features, shares, boxes


def training_cells(
    scorer: PatchMemoryScorer,
    processor: AnomalyImageProcessor,
    photos: Sequence[AnomalySample],
    defect_types: Sequence[str],
    config: str,
    variants: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cells (N, C) float16, labels (N,) bool, defect type index (N,)) from the painted normal photos."""
    specs = defect_specs(dict.fromkeys(defect_types, 1), config, load_taxonomy())
    generator = torch.Generator().manual_seed(seed)
    cells, labels, types = [], [], []
    skipped = 0
    for number, photo in enumerate(tqdm(photos, desc="painted train photos")):
        pixels = np.asarray(photo.image.convert("RGB"))
        for variant in range(variants):
            type_index = (number * variants + variant) % len(defect_types)
            rng = np.random.default_rng([seed, zlib.crc32(photo.image_id.encode()), variant])
            painted, placed = place_defects(
                pixels, [specs[defect_types[type_index]]], rng, radius_range=DEFAULT_RADIUS
            )
            if not placed:
                skipped += 1
                continue
            features, shares, _ = tile_cells(scorer, processor, Image.fromarray(painted), placed[0].mask)
            features = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
            shares = shares.reshape(-1)
            positive = shares >= POSITIVE_SHARE
            keep = positive | ((shares == 0) & (torch.rand(len(shares), generator=generator) < NEGATIVE_KEEP))
            cells.append(features[keep].half())
            labels.append(positive[keep])
            types.append(torch.full((int(keep.sum()),), type_index))
    if skipped:
        print(f"{skipped} painted copies had no room for their defect and were left out", file=sys.stderr)
    return torch.cat(cells), torch.cat(labels), torch.cat(types)


def train_head(cells: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int = 6) -> nn.Module:
    """An MLP on standardised cell features, positive-weighted BCE; returns a module mapping (..., C) -> (...)."""
    torch.manual_seed(seed)
    x, y = cells.float(), labels.float()
    mean, std = x.mean(0), x.std(0) + 1e-4
    mlp = nn.Sequential(nn.Linear(x.shape[1], 128), nn.GELU(), nn.Linear(128, 1))
    optimizer = torch.optim.AdamW(mlp.parameters(), 1e-3, weight_decay=1e-2)
    positive_weight = (1 - y).sum() / y.sum().clamp_min(1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(1024):
            logits = mlp((x[batch] - mean) / std)[:, 0]
            loss = F.binary_cross_entropy_with_logits(logits, y[batch], pos_weight=positive_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    class Head(nn.Module):
        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(mlp((features - mean) / std)[..., 0])

    return Head().eval()


@torch.no_grad()
def head_map(
    head: nn.Module,
    features: torch.Tensor,
    boxes: Sequence[tuple[int, int, int, int]],
    size: tuple[int, int],
    sigma: float,
) -> np.ndarray:
    """The head's probabilities on each tile's cells, stitched at the photo's size (overlaps averaged), blurred."""
    probabilities = head(features.float().permute(0, 2, 3, 1))  # (T, h, w)
    return gaussian_blur(stitch(probabilities, boxes, size)[None], sigma)[0].numpy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo")
    parser.add_argument("--config", default="cars_ad")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--variants", type=int, default=2, help="painted copies of each train photo")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the table's numbers as JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    train = normal_only(load_anomaly_split(args.repo, args.config, "train", args.max_train), "train")
    evaluation = load_anomaly_split(args.repo, args.config, args.split)
    types = [None if s.is_normal else s.defect_type for s in evaluation]
    defect_types = sorted({t for t in types if t is not None})

    scorer = PatchMemoryScorer.from_backbone(
        load_backbone(args.backbone, args.seed)[0],
        layers=[2, 3, 4],
        coreset_fraction=0.01,
        image_size=(args.image_size, args.image_size),
        search_projection_dim=64,
        map_flips=["h", "v", "hv"],
        seed=args.seed,
    )
    scorer.config.tile_size, scorer.config.tile_overlap = args.tile_size, 0
    processor = anomaly_processor(scorer)
    scorer.fit(bank_pixel_values(tqdm([s.image for s in train], desc="bank features"), processor))
    _, memory_maps = score_images(scorer, [s.image for s in evaluation], processor, 8, "memory maps")
    cells, labels, cell_types = training_cells(
        scorer, processor, train, defect_types, args.config, args.variants, args.seed
    )
    print(f"{len(cells)} training cells, {int(labels.sum())} painted", file=sys.stderr)
    evaluation_cells = [tile_cells(scorer, processor, s.image, None) for s in evaluation]

    masks = [s.mask for s in evaluation]
    normal = [s.is_normal for s in evaluation]
    memory_pixels = np.concatenate([m.ravel() for m in memory_maps])
    memory_z = [(m - memory_pixels.mean()) / memory_pixels.std() for m in memory_maps]
    rows = []
    for held_out_index, held_out in enumerate(defect_types):
        head = train_head(
            cells[cell_types != held_out_index], labels[cell_types != held_out_index], args.seed
        )
        head_maps = [
            head_map(head, features, boxes, s.size, scorer.config.sigma)
            for s, (features, _, boxes) in zip(evaluation, evaluation_cells)
        ]
        head_pixels = np.concatenate([m.ravel() for m in head_maps])
        head_z = [(m - head_pixels.mean()) / head_pixels.std() for m in head_maps]
        subset = defect_type_subsets(types)[held_out]
        for weight in args.weights:
            fused = [weight * head_z[i] + (1 - weight) * memory_z[i] for i in subset]
            scores = [float(image_scores(torch.from_numpy(m)[None], "top_mean", 0.01)) for m in fused]
            metrics = compute_anomaly_metrics(
                fused, [masks[i] for i in subset], [normal[i] for i in subset], scores
            )
            rows.append({"held_out": held_out, "head_weight": weight, **metrics})
    print(f"| held-out type | {' | '.join(f'w {w:g}: image / pixel / AUPRO' for w in args.weights)} |")
    print(f"|---|{'---|' * len(args.weights)}")
    for held_out in [*defect_types, "mean"]:
        cells_text = []
        for weight in args.weights:
            chosen = [r for r in rows if r["head_weight"] == weight and held_out in (r["held_out"], "mean")]
            values = [np.mean([r[key] for r in chosen]) for key in ("image_auroc", "pixel_auroc", "aupro")]
            cells_text.append(" / ".join(f"{v:.1f}" for v in values))
        print(f"| {held_out} | {' | '.join(cells_text)} |")
    print(f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
