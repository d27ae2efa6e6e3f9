"""Cost per megapixel of high-resolution anomaly inspection by tiles (`AnomalyImageProcessor.predict` with
`tile_size`): the patch-memory scorer end to end (tiling, features, nearest neighbours, stitching, the map at the
photo's size, the score), eager PyTorch and onnxruntime.

The scorer is the pretrained one (`efficientnet-lite0` with `cadmtl anomaly fit`'s EfficientNet-Lite defaults,
`PRETRAINED_DEFAULTS`: 384 px input, feature levels 2 + 3 + 4, the projected search, the maps averaged over three
flips) where the `pretrained` extra is installed, else the random `tiny` preset. Its bank
is fitted on the tiles of synthetic textured normal photos (1 % coreset), so only the cost is measured. Prints a
Markdown table: tile size, overlap, tiles per megapixel, seconds per megapixel (eager, onnxruntime).

Examples:
    # the table in BENCHMARKS.md (one thread)
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_tiles.py --threads 1
    # quicker, eager only; the upright view only (no map flips)
    PYTHONPATH=. python benchmarks/bench_tiles.py --settings 512:64 --no-onnx --map-flips
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cadmtl.anomaly.models import anomaly_processor, score_images
from cadmtl.anomaly.patch_memory import PRETRAINED_DEFAULTS, RANDOM_INIT_DEFAULTS, PatchMemoryScorer
from cadmtl.features import load_backbone
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import tile_boxes


def textured(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 40 * np.sin(x / 6.0) + 40 * np.cos(y / 9.0)
    image = np.stack([base, base * 0.8 + 20, 255 - base], axis=-1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def build_scorer(
    backbone_name: str | None, map_flips: list[str] | None = None
) -> tuple[PatchMemoryScorer, str]:
    if backbone_name is None:
        try:
            from cadmtl.pretrained import require_timm, wheel_weights_path

            require_timm()
            wheel_weights_path("efficientnet-lite0")
            backbone_name = "efficientnet-lite0"
        except (ImportError, ValueError):
            backbone_name = "tiny"
    defaults = PRETRAINED_DEFAULTS if backbone_name.startswith("efficientnet") else RANDOM_INIT_DEFAULTS
    # by tiles `cadmtl anomaly fit` keeps the coreset bank (its dense memory is for whole images)
    settings = {**defaults, "image_size": (defaults["image_size"],) * 2, "neighbour_images": None}
    if map_flips is not None:
        settings["map_flips"] = map_flips
    return PatchMemoryScorer.from_backbone(load_backbone(backbone_name, 0)[0], **settings), backbone_name


def seconds(run, repeats: int) -> float:
    run()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backbone", default=None, help="default: efficientnet-lite0 if installed, else tiny"
    )
    parser.add_argument("--photo", type=int, nargs=2, default=(1536, 2048), help="height width of the photo")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["none", "256:0", "256:32", "512:64", "1024:128"],
        help="tile_size:overlap pairs; none = the whole photo at the model's size",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument(
        "--map-flips",
        nargs="*",
        default=None,
        help="override the defaults' map flips (h v hv); the option alone: the upright view only",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    scorer, backbone_name = build_scorer(args.backbone, args.map_flips)
    height, width = args.photo
    megapixels = height * width / 1e6
    photo = textured(height, width, seed=1)
    fit_processor = anomaly_processor(scorer, tile_size=256, tile_overlap=32)
    started = time.perf_counter()
    scorer.fit((fit_processor.tiles(textured(1024, 1024, seed))[0] for seed in (10, 11)), batch_size=8)
    print(
        f"scorer: {backbone_name} at {scorer.image_size[0]} px, bank {scorer.memory_bank.shape[0]} patches "
        f"(fitted on the 256:32 tiles of two 1024 x 1024 photos in {time.perf_counter() - started:.1f} s); "
        f"photo {width} x {height} ({megapixels:.2f} MP), map flips {scorer.config.map_flips or 'none'}, "
        f"{torch.get_num_threads()} torch thread(s)\n"
    )

    onnx_folder = None
    if not args.no_onnx:
        from cadmtl.export.onnx import export_onnx, session_options

        work = Path(tempfile.mkdtemp(prefix="bench-tiles-"))
        scorer.save_pretrained(work / "model")
        export_onnx(work / "model", work / "onnx")
        onnx_folder = work / "onnx"
        options = session_options(intra_op_num_threads=args.threads)

    print("| tile size | overlap | tiles / MP | eager s / MP | onnxruntime s / MP |")
    print("|---|---|---|---|---|")
    for setting in args.settings:
        tile_size, overlap = (None, 0) if setting == "none" else (int(v) for v in setting.split(":"))
        processor = anomaly_processor(
            scorer, tile_size=tile_size, tile_overlap=overlap if tile_size else None
        )
        tiles = 1 if tile_size is None else len(tile_boxes(height, width, tile_size, overlap))
        eager = seconds(
            lambda processor=processor: score_images(scorer, [photo], processor, args.batch_size),
            args.repeats,
        )
        onnx = "-"
        if onnx_folder is not None:
            from cadmtl.export.anomaly import AnomalyOnnxPredictor

            predictor = AnomalyOnnxPredictor(
                onnx_folder, options=options, tile_size=tile_size or 100_000, tile_overlap=overlap
            )
            onnx = f"{seconds(lambda predictor=predictor: predictor.predict([photo]), args.repeats) / megapixels:.2f}"
        label = "whole photo" if tile_size is None else str(tile_size)
        print(f"| {label} | {overlap} | {tiles / megapixels:.1f} | {eager / megapixels:.2f} | {onnx} |")


if __name__ == "__main__":
    main()
