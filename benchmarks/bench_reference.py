"""Cost of the training-free reference localiser (cadmtl.reference.localize_pairs.PairRunner) per pair, on CPU.

For each backbone (random weights: the `tiny` preset and one shaped like DINOv3 ViT-S/16) and each search window
(1, 2, 4 patches, global), times whole pairs through the command's code path (PIL images -> pixel values ->
patch features -> nearest-neighbour distances -> difference map at the query's size -> boxes), with the
reference features cached (every pair shares one reference) and not cached (every pair has its own), and
divides by one backbone forward of one image (the `forward` column). Goal: <= 2.2x a forward per uncached pair
(two forwards plus the localiser's own work), ~1.2x cached.

Prints a Markdown table.

Examples:
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_reference.py
    PYTHONPATH=. python benchmarks/bench_reference.py --backbones tiny --pairs 4 --windows 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from cadmtl.anomaly.data import to_pixel_values
from cadmtl.features import PatchFeatureExtractor, backbone_from_preset
from cadmtl.reference.localize_pairs import PairRunner, default_layers
from cadmtl.reference.localizer import ReferenceLocalizer, boxes_from_map
from cadmtl.reference.pairs import Pair

BACKBONES = {"tiny": "tiny", "vit-s16": "vits16"}


def make_pairs(count: int, size: int, shared_reference: bool, seed: int = 0) -> list[Pair]:
    rng = np.random.default_rng(seed)

    def image() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))

    reference = image()
    return [
        Pair(
            f"p{i}",
            f"q{i}",
            "shared" if shared_reference else f"r{i}",
            reference if shared_reference else image(),
            image(),
            [0.0] * 4,
            [],
            None,
            False,
            "bench",
            "good",
            "synthetic",
            "none",
            {},
        )
        for i in range(count)
    ]


def time_forward(extractor: PatchFeatureExtractor, size: int, repeats: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one backbone forward of one image, pixel preparation included."""
    images = make_pairs(1, size, True)[0].query
    with torch.no_grad():
        extractor(to_pixel_values([images], size))  # warm-up
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(repeats):
            extractor(to_pixel_values([images], size))
    return (time.process_time() - cpu) / repeats, (time.perf_counter() - wall) / repeats


def time_pairs(runner: PairRunner, pairs: list[Pair]) -> tuple[float, float]:
    """(CPU, wall) seconds per pair, batch size 1 (one pair at a time, as an inspection station sees them).

    The box threshold is the warm-up pair's 99th map percentile (about 1 % of the pixels above it, as a
    calibrated threshold on an anomalous pair), so the connected components cost what they cost in use.
    """
    runner.cache.clear()
    [(_, first)] = list(runner.run(pairs[:1], batch_size=1))  # warm-up (caches the shared reference)
    threshold = float(torch.quantile(first.flatten(), 0.99))
    cpu, wall = time.process_time(), time.perf_counter()
    for _, anomaly_map in runner.run(pairs[1:], batch_size=1):
        boxes_from_map(anomaly_map, threshold)
    count = len(pairs) - 1
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--windows", nargs="+", default=["1", "2", "4", "global"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--pairs", type=int, default=6, help="timed pairs per row (+1 warm-up)")
    parser.add_argument("--repeats", type=int, default=5, help="forwards timed for the reference column")
    args = parser.parse_args()
    print(
        f"CPU, {torch.get_num_threads()} thread(s), {args.image_size} px, batch size 1, random weights; "
        "ms are CPU time of the process (wall time in brackets)\n"
    )
    print("| backbone | window | reference | forward ms | per pair ms | pairs/s (CPU) | x forward |")
    print("|---|---|---|---|---|---|---|")
    for name in args.backbones:
        torch.manual_seed(0)
        backbone = backbone_from_preset(BACKBONES[name]).eval()
        extractor = PatchFeatureExtractor(backbone, default_layers(backbone))
        forward, forward_wall = time_forward(extractor, args.image_size, args.repeats)
        for window_text in args.windows:
            window = None if window_text == "global" else int(window_text)
            for cached in (True, False):
                runner = PairRunner(extractor, ReferenceLocalizer(window=window), args.image_size)
                per_pair, per_pair_wall = time_pairs(
                    runner, make_pairs(args.pairs + 1, args.image_size, cached)
                )
                print(
                    f"| {name} | {window_text} | {'cached' if cached else 'not cached'} | "
                    f"{1000 * forward:.1f} ({1000 * forward_wall:.0f}) | "
                    f"{1000 * per_pair:.1f} ({1000 * per_pair_wall:.0f}) | {1 / per_pair:.1f} | "
                    f"{per_pair / forward:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
