"""Image scores of a TILED patch-memory scorer, reduced five ways, on one split (RESULTS.md, "Session 5: scoring the
tiles at one scale"): the top 1 % of the stitched map (what `cadmtl anomaly evaluate` uses), the highest and the mean
tile score (each tile scored like a whole image: top 1 % of its distance grid), the stitched maximum and the mean of
a fixed 1,024 stitched pixels. Prints image AUROC overall and per defect type (each type against every normal image).

    cadmtl anomaly fit data/tile --config tile_ad --output-dir OUT --max-train 200 --seed 0 \\
        --tile-size 160 --tile-overlap 32 --image-size 320
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/tile_image_scores.py OUT/model data/tile --config tile_ad
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from cadmtl.anomaly.data import load_anomaly_split
from cadmtl.anomaly.metrics import binary_auroc, defect_type_subsets
from cadmtl.anomaly.models import anomaly_processor, load_anomaly_model
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import image_scores, stitch, tile_canvas
from modeling_cadmtl_anomaly.image_processing_cadmtl_anomaly import image_size_of

REDUCTIONS = (
    "stitched top 1 %",
    "highest tile score",
    "mean tile score",
    "stitched max",
    "stitched top 1,024 px",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a scorer fitted with --tile-size (DIR/model)")
    parser.add_argument("repo")
    parser.add_argument("--config", default="tile_ad")
    parser.add_argument("--split", default="validation")
    parser.add_argument(
        "--max-images", type=int, default=None, help="the split's first N images (a quick check)"
    )
    args = parser.parse_args()

    model = load_anomaly_model(args.model)
    processor = anomaly_processor(model)
    if processor.tile_size is None:
        parser.error(f"{args.model} was not fitted with --tile-size")
    samples = load_anomaly_split(args.repo, args.config, args.split, args.max_images)
    values, labels, types = [], [], []
    with torch.no_grad():
        for sample in tqdm(samples, desc=f"scoring {args.split}"):
            pixel_values, boxes = processor.tiles(sample.image)
            outputs = model(pixel_values)  # AnomalyOutput: maps (n, h, w), scores (n,)
            tile_maps, tile_scores = outputs.anomaly_maps, outputs.image_scores
            height, width = image_size_of(sample.image)
            placed, canvas = tile_canvas(boxes, height, width, tuple(tile_maps.shape[-2:]))
            stitched = stitch(tile_maps, placed, canvas)
            values.append(
                [
                    float(image_scores(stitched[None], "top_mean", 0.01)[0]),
                    float(tile_scores.max()),
                    float(tile_scores.mean()),
                    float(stitched.max()),
                    float(stitched.flatten().topk(min(1024, stitched.numel())).values.mean()),
                ]
            )
            labels.append(not sample.is_normal)
            types.append(None if sample.is_normal else sample.defect_type)
    scores, labels = np.array(values, dtype=np.float64), np.array(labels)
    subsets = defect_type_subsets(types)
    defect_types = list(subsets)
    print(f"| image score | all | {' | '.join(defect_types)} |")
    print("|---|---:|" + "---:|" * len(defect_types))
    for column, name in enumerate(REDUCTIONS):
        cells = [100 * binary_auroc(scores[:, column], labels)]
        for keep in subsets.values():
            cells.append(100 * binary_auroc(scores[keep, column], labels[keep]))
        print(f"| {name} | " + " | ".join(f"{cell:.1f}" for cell in cells) + " |")


if __name__ == "__main__":
    main()
