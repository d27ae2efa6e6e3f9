"""`cadmtl reference localize`: the training-free localiser on every pair of a pairs split.

A backbone (a preset name with random weights, a DINOv3 checkpoint folder / Hub id, or a CadMtl model folder)
gives patch features of the reference and the query, both resized to ``--image-size``; :mod:`.localizer` turns
their nearest-neighbour distances into a difference map at the query's own size and boxes in its pixels.

The pair threshold comes from a **calibration split** of the pairs repo (best F1, or ``--target-fpr`` on its
normal pairs) or from saved settings (``--settings OUT/localizer.json`` of an earlier run), never from the pairs
being evaluated. Reference features are cached by ``reference_id`` (pairs that share a rendered reference
compute its features once).

Writes ``OUT/predictions.jsonl`` (``pair_id``, ``boxes`` xyxy query pixels, ``scores``, ``has_anomaly``,
``score`` = the map's maximum), ``OUT/localizer.json`` (settings with the threshold, reusable),
``OUT/overlays/<pair_id>.png`` (reference | query, predicted boxes orange, true boxes blue) and, with
``--save-maps``, ``OUT/maps/<pair_id>.npy`` (float16 maps at the query's size, for pixel AUROC).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from cadmtl.anomaly.data import to_pixel_values
from cadmtl.features import (
    PatchFeatureExtractor,
    backbone_depth,
    load_backbone,
)
from cadmtl.model_kinds import LOCALIZER, LOCALIZER_FILE, require_model_kind
from cadmtl.pictures.overlays import ImagePrediction, draw_predictions
from dataset_scripts.options import (
    add_batch_size_option,
    add_device_option,
    add_output_dir_option,
    add_seed_option,
)
from dataset_scripts.safe_paths import SafeOutputPaths
from modeling_cadmtl_anomaly.configuration_cadmtl_anomaly import backbone_normalization

from .localizer import (
    ReferenceLocalizer,
    boxes_from_map,
    calibrate_threshold,
    difference_map,
    window_nearest_distance,
)
from .pairs import Pair, load_pairs

OVERLAY_LABELS = ("predicted", "true")  # palette entries 0 (orange) and 1 (sky blue)


# ------------------------------------------------------------------------------------------------ model
def default_layers(backbone: nn.Module) -> list[int]:
    """Half and three quarters of the depth (PatchMemoryScorer's default): mid-level, local features."""
    depth = backbone_depth(backbone.config)
    return sorted({max(1, depth // 2), max(1, 3 * depth // 4)})


class PairRunner:
    """Difference maps of pairs: batched query features, cached reference features, maps at query size."""

    def __init__(
        self,
        extractor: PatchFeatureExtractor,
        localizer: ReferenceLocalizer,
        image_size: int = 224,
        device: str | torch.device = "cpu",
        cache_size: int = 256,
        cache_references: bool = True,
    ) -> None:
        if image_size % extractor.stride:
            raise ValueError(
                f"--image-size {image_size} must be a multiple of the backbone stride {extractor.stride}"
            )
        self.extractor = extractor.to(device).eval()
        self.localizer, self.image_size, self.device = localizer, image_size, torch.device(device)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size, self.cache_references = cache_size, cache_references
        self.hits = self.misses = self.forwards = 0

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        self.forwards += len(images)
        pixels = to_pixel_values(images, self.image_size, *backbone_normalization(self.extractor.config))
        return self.extractor(pixels.to(self.device)).float()

    def reference_features(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """(B, C, h, w) features of the pairs' references, computing each missing ``reference_id`` once."""
        if not self.cache_references:
            return self.features([pair.reference for pair in pairs])
        missing: dict[str, Image.Image] = {}
        for pair in pairs:
            if pair.reference_id in self.cache:
                self.cache.move_to_end(pair.reference_id)
                self.hits += 1
            elif pair.reference_id not in missing:
                missing[pair.reference_id] = pair.reference
                self.misses += 1
            else:
                self.hits += 1
        if missing:
            for key, value in zip(missing, self.features(list(missing.values()))):
                self.cache[key] = value
        batch = torch.stack([self.cache[pair.reference_id] for pair in pairs])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return batch

    @torch.no_grad()
    def maps(self, pairs: Sequence[Pair]) -> list[torch.Tensor]:
        """One (H, W) difference map per pair, at the query's size."""
        query = self.features([pair.query for pair in pairs])
        reference = self.reference_features(pairs)
        distances = window_nearest_distance(
            query, reference, self.localizer.window, self.localizer.chunk_size
        )
        return [
            difference_map(d[None], (pair.query.height, pair.query.width), self.localizer.sigma)[0].cpu()
            for d, pair in zip(distances, pairs)
        ]

    def run(self, pairs: Iterable[Pair], batch_size: int = 8) -> Iterator[tuple[Pair, torch.Tensor]]:
        batch: list[Pair] = []
        for pair in pairs:
            batch.append(pair)
            if len(batch) == batch_size:
                yield from zip(batch, self.maps(batch))
                batch = []
        if batch:
            yield from zip(batch, self.maps(batch))


def runner_from_settings(settings: str | Path, device: str | torch.device = "cpu") -> PairRunner:
    """The calibrated localiser of an earlier run: `OUT/localizer.json` of `cadmtl reference localize` (or `OUT/`),
    with its backbone, layers, image size and threshold (the demo app's reference tab).

    Raises:
        ModelLoadError: `settings` does not exist or holds another kind of model (or none).
    """
    require_model_kind(settings, LOCALIZER)
    path = Path(settings)
    path = path / LOCALIZER_FILE if path.is_dir() else path
    saved = json.loads(path.read_text())
    backbone, _ = load_backbone(saved["model"])
    extractor = PatchFeatureExtractor(backbone, saved["layers"])
    return PairRunner(
        extractor, ReferenceLocalizer.from_dict(saved["localizer"]), saved["image_size"], device
    )


# ------------------------------------------------------------------------------------------------ outputs
def draw_pair(pair: Pair, boxes: np.ndarray, scores: np.ndarray, gap: int = 8) -> Image.Image:
    """Reference | query side by side; predicted boxes (orange, with scores) and true boxes (blue) on the query."""
    true = np.asarray(pair.boxes or [], dtype=np.float64).reshape(-1, 4)
    prediction = ImagePrediction(
        boxes=np.concatenate([np.asarray(boxes, dtype=np.float64).reshape(-1, 4), true]),
        box_scores=np.concatenate([np.asarray(scores, dtype=np.float64).reshape(-1), np.ones(len(true))]),
        box_labels=np.array([0] * len(boxes) + [1] * len(true), dtype=np.int64),
    )
    query = draw_predictions(pair.query, prediction, OVERLAY_LABELS, ["background"])
    reference = pair.reference.convert("RGB").resize(query.size, Image.BILINEAR)
    canvas = Image.new("RGB", (2 * query.width + gap, query.height), (255, 255, 255))
    canvas.paste(reference, (0, 0))
    canvas.paste(query, (query.width + gap, 0))
    return canvas


def calibrate(
    runner: PairRunner, pairs_repo: str, split: str, target_fpr: float | None, batch_size: int
) -> dict[str, Any]:
    """The pair threshold from a calibration split's map maxima (best F1 or the target FPR on normal pairs)."""
    scores, labels = [], []
    for pair, anomaly_map in runner.run(load_pairs(pairs_repo, split), batch_size):
        scores.append(float(anomaly_map.max()))
        labels.append(int(pair.has_anomaly))
    if target_fpr is None and not any(labels):
        raise ValueError(
            f"{pairs_repo}: calibration split {split!r} has no anomalous pair, so best-F1 calibration is "
            "impossible; pass --target-fpr (normal pairs only) or --settings"
        )
    if target_fpr is not None and all(labels):
        raise ValueError(f"{pairs_repo}: calibration split {split!r} has no normal pair for --target-fpr")
    threshold = calibrate_threshold(scores, labels, target_fpr)
    return {
        "split": split,
        "pairs": len(scores),
        "anomalous_pairs": int(sum(labels)),
        "rule": "best_f1" if target_fpr is None else f"target_fpr={target_fpr}",
        "threshold": threshold,
    }


def localize(
    model: str,
    pairs_repo: str,
    split: str,
    output_dir: str | Path,
    *,
    calibration_split: str | None = "validation",
    settings: str | Path | None = None,
    target_fpr: float | None = None,
    window: int | None = 2,
    sigma: float = 4.0,
    min_area: int = 1,
    image_size: int | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    overlays: int = 50,
    save_maps: bool = False,
    device: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Predict every pair of ``split``; returns the saved run settings (``OUT/localizer.json``)."""
    output_dir = Path(output_dir)
    saved: dict[str, Any] = json.loads(Path(settings).read_text()) if settings else {}
    if settings is None and calibration_split is None:
        raise ValueError("the threshold needs --calibration-split or --settings")
    if settings is None and calibration_split == split:
        raise ValueError(
            f"the calibration split {split!r} is the split being evaluated: the threshold must come from other "
            "pairs (build a validation split of the pairs repo) or from --settings"
        )
    if saved and saved.get("model") not in (None, model):
        raise ValueError(
            f"{settings} was calibrated for model {saved['model']!r}, not {model!r}: its threshold does not carry "
            "over to other features; calibrate on a split of the pairs repo instead"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone, described = load_backbone(model, seed)
    layers = list(layers or saved.get("layers") or default_layers(backbone))
    image_size = int(image_size or saved.get("image_size") or 224)
    extractor = PatchFeatureExtractor(backbone, layers)
    if saved:
        localizer = ReferenceLocalizer.from_dict(saved["localizer"])
    else:
        localizer = ReferenceLocalizer(window=window, sigma=sigma, min_area=min_area)
    runner = PairRunner(extractor, localizer, image_size, device)
    start = time.perf_counter()
    if saved:
        calibration = {**saved.get("calibration", {}), "from_settings": str(settings)}
    else:
        calibration = calibrate(runner, pairs_repo, calibration_split, target_fpr, batch_size)
        localizer.threshold = calibration["threshold"]
    output_dir.mkdir(parents=True, exist_ok=True)
    if overlays:
        (output_dir / "overlays").mkdir(exist_ok=True)
    if save_maps:
        (output_dir / "maps").mkdir(exist_ok=True)
    count = drawn = 0
    # pair ids come from the pairs repo: their files stay inside OUT (dataset_scripts.safe_paths)
    map_path = SafeOutputPaths(output_dir / "maps", ".npy")
    overlay_path = SafeOutputPaths(output_dir / "overlays", ".png")
    with open(output_dir / "predictions.jsonl", "w") as handle:
        for pair, anomaly_map in runner.run(load_pairs(pairs_repo, split), batch_size):
            boxes, scores, _ = boxes_from_map(anomaly_map, localizer.threshold, localizer.min_area)
            line = {
                "pair_id": pair.pair_id,
                "boxes": [[round(float(v), 2) for v in box] for box in boxes.tolist()],
                "scores": [round(float(s), 6) for s in scores.tolist()],
                "has_anomaly": bool(len(boxes)),
                "score": round(float(anomaly_map.max()), 6),
            }
            handle.write(json.dumps(line) + "\n")
            if save_maps:
                target = map_path(pair.pair_id)
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, anomaly_map.numpy().astype(np.float16))
            if overlays < 0 or drawn < overlays:
                target = overlay_path(pair.pair_id)
                target.parent.mkdir(parents=True, exist_ok=True)
                draw_pair(pair, boxes.numpy(), scores.numpy()).save(target)
                drawn += 1
            count += 1
    seconds = time.perf_counter() - start
    run = {
        "model": model,
        "backbone": described,
        "seed": seed,
        "layers": layers,
        "image_size": image_size,
        "localizer": localizer.to_dict(),
        "calibration": calibration,
        "pairs": str(pairs_repo),
        "split": split,
        "num_pairs": count,
        "seconds": round(seconds, 2),
        "reference_cache": {"hits": runner.hits, "misses": runner.misses, "backbone_images": runner.forwards},
    }
    (output_dir / "localizer.json").write_text(json.dumps(run, indent=2) + "\n")
    return run


EXAMPLE = (
    "examples:\n"
    "  cadmtl reference localize tiny data/pairs --split test --output-dir outputs/reference-tiny\n"
    "  cadmtl reference localize facebook/dinov3-vits16-pretrain-lvd1689m data/pairs --split test \\\n"
    "      --output-dir outputs/reference-vits16 --calibration-split validation --window 2 --image-size 448\n"
    "  cadmtl reference localize tiny data/pairs --split test --output-dir OUT2 --settings OUT/localizer.json"
)


VLM_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def is_vision_language_model(model: str) -> bool:
    """`tiny-random`, a folder whose config (or LoRA adapter's base) is a Qwen2-VL / Qwen2.5-VL, or a Qwen VL Hub id."""
    if model == "tiny-random":
        return True
    folder = Path(model)
    for name in ("config.json", "adapter_config.json", "grpo_settings.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            base = str(data.get("base_model_name_or_path", ""))
            return data.get("model_type") in VLM_MODEL_TYPES or name == "grpo_settings.json" or "VL" in base
    return not folder.exists() and "/" in model and "-VL" in model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadmtl reference localize",
        description="Run the training-free reference localiser on every pair of a pairs split.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        help="backbone preset (tiny, vits16, ...), DINOv3 checkpoint or CadMtl model folder (training-free "
        "localiser), or a vision-language model (Qwen2/2.5-VL id or folder, a GRPO output, tiny-random)",
    )
    parser.add_argument("pairs", help="pairs repo folder (from `cadmtl reference build-pairs`)")
    parser.add_argument("--split", default="test", help="the split to predict (test)")
    add_output_dir_option(parser, "folder for predictions.jsonl, localizer.json, overlays/ and maps/")
    parser.add_argument("--calibration-split", default="validation", help="pairs split giving the threshold")
    parser.add_argument(
        "--settings", default=None, help="a localizer.json whose threshold and settings to reuse"
    )
    parser.add_argument(
        "--target-fpr", type=float, default=None, help="threshold at this FPR on normal pairs"
    )
    parser.add_argument(
        "--window", default="2", help="search window in patches (0, 1, 2, ... or 'global'; default 2)"
    )
    parser.add_argument("--sigma", type=float, default=4.0, help="map smoothing in query pixels (4)")
    parser.add_argument("--min-area", type=int, default=1, help="smallest region kept, in pixels (1)")
    parser.add_argument("--image-size", type=int, default=None, help="square backbone input size (224)")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="backbone layers (default: 1/2, 3/4)"
    )
    add_batch_size_option(parser, 8, "pairs per forward pass")
    parser.add_argument("--overlays", type=int, default=50, help="overlay PNGs to write (0 none, -1 all; 50)")
    parser.add_argument("--save-maps", action="store_true", help="write OUT/maps/<pair_id>.npy (pixel AUROC)")
    add_device_option(parser)
    add_seed_option(parser, 0, "seed of a preset's random weights")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`cadmtl reference localize`."""
    args = build_parser().parse_args(argv)
    if is_vision_language_model(args.model):
        # A VLM answers with the GRPO prompt; its boxes come back in query pixels in the same predictions.jsonl.
        from cadmtl.reference.command import zero_shot_main

        return zero_shot_main(
            [
                "--model",
                args.model,
                "--dataset",
                args.pairs,
                "--split",
                args.split,
                "--output-dir",
                str(args.output_dir),
            ]
        )
    window = None if args.window.lower() in ("global", "none") else int(args.window)
    run = localize(
        args.model,
        args.pairs,
        args.split,
        args.output_dir,
        calibration_split=args.calibration_split,
        settings=args.settings,
        target_fpr=args.target_fpr,
        window=window,
        sigma=args.sigma,
        min_area=args.min_area,
        image_size=args.image_size,
        layers=args.layers,
        batch_size=args.batch_size,
        overlays=args.overlays,
        save_maps=args.save_maps,
        device=args.device,
        seed=args.seed,
    )
    print(
        f"{run['num_pairs']} pairs of {args.pairs} ({args.split}) -> {args.output_dir}/predictions.jsonl "
        f"(threshold {run['localizer']['threshold']:.4f} from {run['calibration'].get('split', args.settings)}; "
        f"{run['seconds']} s; reference cache {run['reference_cache']})"
    )
    return 0
