"""Does a stride-4 feature level help the pretrained scorer find thin defects (the tile cracks)? Validation only.

EfficientNet-Lite's `blocks.1` (stride 4) is reduced to the stride-8 grid (3x3 average then 2x2 max, or 2x2
average) and added to levels 2 + 3 + 4; each variant is scored like `benchmarks/sweep_pretrained_anomaly.py`'s
stage 1 (a random 10 % of the bank images' patches, a 64-dim projected search with 16 candidates re-ranked exactly,
sigma 4, top_mean): image AUROC, pixel AUROC and image AUROC per defect type (that type's images + all normals).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/sweep_stride4_level.py --repo data/tile --config tile_ad
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.sweep_pretrained_anomaly import bank_images, flat, image_auroc, pixel_auroc, variant
from cadmtl.anomaly.data import load_anomaly_split, to_pixel_values
from cadmtl.anomaly.memory_bank import NearestNeighborIndex
from cadmtl.anomaly.metrics import defect_type_subsets
from cadmtl.pretrained import pretrained_backbone
from modeling_cadmtl_anomaly.configuration_cadmtl_anomaly import backbone_normalization

# Keys of the stride-4 reductions among the levels (2 / 3 / 4 are the usual ones).
STRIDE4_MAX, STRIDE4_AVG = 11, 12
VARIANTS = {
    "2 + 3 + 4 (the default)": (2, 3, 4),
    "+ stride 4, 3x3 average then 2x2 max": (STRIDE4_MAX, 2, 3, 4),
    "+ stride 4, 2x2 average": (STRIDE4_AVG, 2, 3, 4),
}


@torch.no_grad()
def level_features(backbone, images, size: int, mean, std, batch_size: int = 16) -> dict[int, torch.Tensor]:
    """level -> (N, C, h, w) float16 on the stride-8 grid, with the two stride-4 reductions."""
    out: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        pixels = to_pixel_values(images[start : start + batch_size], size, mean, std)
        stride4, stride8, stride16, stride32 = backbone(pixels).feature_maps
        grid = stride8.shape[-2:]
        levels = {
            2: stride8,
            3: F.interpolate(stride16, size=grid, mode="bilinear"),
            4: F.interpolate(stride32, size=grid, mode="bilinear"),
            STRIDE4_MAX: F.max_pool2d(F.avg_pool2d(stride4, 3, 1, 1, count_include_pad=False), 2),
            STRIDE4_AVG: F.avg_pool2d(stride4, 2),
        }
        for level, maps in levels.items():
            out.setdefault(level, []).append(maps.half())
    return {level: torch.cat(chunks) for level, chunks in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", required=True)
    parser.add_argument("--config", default="tile_ad")
    parser.add_argument("--backbone", default="efficientnet-lite2")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--bank-images", type=int, default=60, help="train normals in the bank")
    parser.add_argument(
        "--max-validation", type=int, default=None, help="first N validation images (smoke runs)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    backbone = pretrained_backbone(args.backbone, out_indices=(1, 2, 3, 4)).eval()
    mean, std = backbone_normalization(backbone.config)
    train = bank_images(args.repo, args.config, args.bank_images, args.seed)
    validation = load_anomaly_split(args.repo, args.config, "validation")[: args.max_validation]
    started = time.perf_counter()
    features = tuple(
        level_features(backbone, [s.image for s in samples], args.size, mean, std)
        for samples in (train, validation)
    )
    print(
        f"features of {len(train)} + {len(validation)} images: {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    subsets = defect_type_subsets([None if s.is_normal else s.defect_type for s in validation])
    types = list(subsets)
    print("\n| levels | image AUROC | pixel AUROC | " + " / ".join(types) + " image AUROC |")
    print("|---|---:|---:|---|")
    for name, layers in VARIANTS.items():
        bank_maps, query_maps = (variant(f, layers, pooled=True) for f in features)
        bank = flat(bank_maps)
        keep = torch.randperm(bank.shape[0], generator=torch.Generator().manual_seed(args.seed))
        index = NearestNeighborIndex(bank[keep[: bank.shape[0] // 10]], projection_dim=64, seed=args.seed)
        batch, _, grid_h, grid_w = query_maps.shape
        distances = index.search(flat(query_maps)).view(batch, grid_h, grid_w)
        per_type = [
            image_auroc(distances[chosen], [validation[i] for i in chosen], "top_mean")
            for chosen in subsets.values()
        ]
        print(
            f"| {name} | {image_auroc(distances, validation, 'top_mean'):.1f} "
            f"| {pixel_auroc(distances, validation, args.size, 4.0):.1f} | {' / '.join(f'{v:.1f}' for v in per_type)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
